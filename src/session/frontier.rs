//! What a connection has actually shown its client of its room's messages, so implicit read
//! marks (closing, visiting another group) never mark a message the client could not have
//! received.
//!
//! The connection reports each message line of its room once its last byte has gone to the
//! socket (a live broadcast, a catch-up line, a history page). `shown` is the highest seq up to
//! which the client has seen every message: it advances only over contiguous runs, because a
//! client dropped after seq 61 that later got 900 live ones has still not seen 62..899.

/// The read frontier of one room visit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFrontier {
    /// The marker the store holds (set when the room was entered, or by the last mark).
    stored: u64,
    /// Every message up to this seq has been written to the socket (or was read before).
    shown: u64,
    /// The newest contiguous run written beyond a hole, waiting for the hole to be filled
    /// (e.g. live broadcasts while the client pages through older unread history).
    ahead: Option<(u64, u64)>,
}

impl ReadFrontier {
    /// A frontier starting at the store's marker.
    pub fn new(stored: u64) -> ReadFrontier {
        ReadFrontier {
            stored,
            shown: stored,
            ahead: None,
        }
    }

    /// The marker the store held when the visit started (or after its last mark).
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Messages `first..=last` (contiguous seqs) were written to the socket.
    pub fn written(&mut self, first: u64, last: u64) {
        if first <= self.shown.saturating_add(1) {
            self.shown = self.shown.max(last);
        } else {
            self.ahead = match self.ahead {
                Some((low, high)) if first <= high.saturating_add(1) && last >= low => {
                    Some((low.min(first), high.max(last)))
                }
                _ => Some((first, last)),
            };
        }
        if let Some((low, high)) = self.ahead {
            if low <= self.shown.saturating_add(1) {
                self.shown = self.shown.max(high);
                self.ahead = None;
            }
        }
    }

    /// The mark to store when the client leaves the room, if it saw anything new.
    pub fn mark_due(&self) -> Option<u64> {
        (self.shown > self.stored).then_some(self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_writes_advance_the_frontier() {
        let mut frontier = ReadFrontier::new(5);
        assert_eq!(frontier.mark_due(), None);
        frontier.written(6, 6);
        frontier.written(7, 9);
        assert_eq!(frontier.mark_due(), Some(9));
    }

    #[test]
    fn writes_beyond_a_hole_count_only_once_the_hole_is_filled() {
        let mut frontier = ReadFrontier::new(61);
        for seq in 900..=950 {
            frontier.written(seq, seq);
        }
        assert_eq!(frontier.mark_due(), None, "62..899 were never written");
        frontier.written(62, 500);
        assert_eq!(frontier.mark_due(), Some(500));
        frontier.written(501, 899);
        assert_eq!(frontier.mark_due(), Some(950), "the live run joins up");
    }

    #[test]
    fn old_pages_do_not_move_it_back() {
        let mut frontier = ReadFrontier::new(10);
        frontier.written(1, 4);
        assert_eq!(frontier.mark_due(), None);
        frontier.written(11, 12);
        frontier.written(3, 8);
        assert_eq!(frontier.mark_due(), Some(12));
    }
}
