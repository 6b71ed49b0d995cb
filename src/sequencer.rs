//! Per-group delivery order: every stored message reaches this node's rooms once, in `seq` order.
//!
//! Messages arrive from this node's workers (already in order) and, in peer mode, from other
//! instances through Redis (in any order, possibly twice, possibly not at all). For each group
//! whose room is occupied here, a `GroupOrder` remembers the highest `seq` released to the room
//! and holds anything that arrives early. A gap older than `GAP_WAIT` (or any sign that the room
//! is behind: a later head seen at `enter_group`, a peer link that came back) asks the event loop
//! to read the missing range from the database.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::model::Message;
use crate::workers::Requester;

/// How long a missing `seq` may be waited for before it is read from the database.
pub const GAP_WAIT: Duration = Duration::from_millis(250);
/// Released messages kept per group in peer mode, to catch up a connection whose `enter_group`
/// raced them (on a single node the workers' order rules that race out, so none are kept).
pub const RECENT_IN_PEER_MODE: usize = 256;
/// Most messages one database catch-up read returns.
pub const CATCH_UP_BATCH: u32 = 1000;

/// A message ready for the room, with who stored it (that connection already has its reply).
pub type Release = (Message, Requester);

#[derive(Debug)]
struct GroupOrder {
    delivered: u64,
    held: BTreeMap<u64, Release>,
    recent: VecDeque<Message>,
    /// When the room first noticed it was behind (a gap, or a newer head elsewhere).
    behind_since: Option<Instant>,
    /// A head `seq` known to exist beyond `delivered`.
    known_head: u64,
    fetching: bool,
}

/// A database read the event loop should make: messages of `group_name` after `after_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    pub group_name: String,
    pub after_seq: u64,
}

#[derive(Debug, Default)]
pub struct Sequencer {
    groups: HashMap<String, GroupOrder>,
    keep_recent: usize,
}

impl GroupOrder {
    fn new(floor: u64) -> GroupOrder {
        GroupOrder {
            delivered: floor,
            held: BTreeMap::new(),
            recent: VecDeque::new(),
            behind_since: None,
            known_head: floor,
            fetching: false,
        }
    }

    /// Behind by an unknown amount: read the database after what was delivered, at once.
    fn suspect(&mut self, now: Instant) {
        self.known_head = u64::MAX;
        self.behind_since = Some(now - GAP_WAIT);
    }

    fn release_ready(&mut self, out: &mut Vec<Release>, keep_recent: usize) {
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() > self.delivered + 1 {
                break;
            }
            let (seq, release) = entry.remove_entry();
            if seq == self.delivered + 1 {
                self.delivered = seq;
                self.remember(&release.0, keep_recent);
                out.push(release);
            }
        }
        self.known_head = self.known_head.max(self.delivered);
        if self.held.is_empty() && self.known_head <= self.delivered {
            self.behind_since = None;
        } else if self.behind_since.is_none() {
            self.behind_since = Some(Instant::now());
        }
    }

    fn remember(&mut self, message: &Message, keep_recent: usize) {
        if keep_recent == 0 {
            return;
        }
        if self.recent.len() >= keep_recent {
            self.recent.pop_front();
        }
        self.recent.push_back(message.clone());
    }
}

impl Sequencer {
    /// A sequencer that keeps the last `keep_recent` released messages of each group.
    pub fn new(keep_recent: usize) -> Sequencer {
        Sequencer {
            groups: HashMap::new(),
            keep_recent,
        }
    }

    /// A connection entered the group's room with history up to `floor`. Returns the released
    /// messages it missed (those after `floor` that the room already had).
    pub fn enter(&mut self, group_name: &str, floor: u64) -> Vec<Message> {
        let order = self
            .groups
            .entry(group_name.to_string())
            .or_insert_with(|| GroupOrder::new(floor));
        if floor > order.delivered {
            order.known_head = order.known_head.max(floor);
            order.behind_since.get_or_insert_with(Instant::now);
        }
        let missed: Vec<Message> = order
            .recent
            .iter()
            .filter(|m| m.seq > floor)
            .cloned()
            .collect();
        let oldest_kept = order.recent.front().map_or(order.delivered + 1, |m| m.seq);
        if floor + 1 < oldest_kept && floor < order.delivered {
            log::warn!(
                "{group_name}: a connection entered at seq {floor}, older than the messages kept; it recovers with fetch_messages"
            );
        }
        missed
    }

    /// The room of this group emptied on this node.
    /// Returns the origins of the messages it still held (their senders' replies wait for them).
    pub fn forget(&mut self, group_name: &str) -> Vec<Requester> {
        self.groups
            .remove(group_name)
            .map(|order| order.held.into_values().map(|(_, origin)| origin).collect())
            .unwrap_or_default()
    }

    /// Whether message `seq` of the group is held back (waiting for an earlier seq).
    pub fn holds(&self, group_name: &str, seq: u64) -> bool {
        self.groups
            .get(group_name)
            .is_some_and(|order| order.held.contains_key(&seq))
    }

    /// A stored message arrived; returns what can now go to the room, in order.
    pub fn offer(&mut self, message: Message, origin: Requester) -> Vec<Release> {
        let mut out = Vec::new();
        let Some(order) = self.groups.get_mut(&message.group_name) else {
            return out;
        };
        if message.seq <= order.delivered {
            return out;
        }
        order.known_head = order.known_head.max(message.seq);
        order.held.entry(message.seq).or_insert((message, origin));
        order.release_ready(&mut out, self.keep_recent);
        out
    }

    /// One group's room may have missed messages (its relay subscription just started): read
    /// after what it delivered, now.
    pub fn suspect(&mut self, group_name: &str) {
        if let Some(order) = self.groups.get_mut(group_name) {
            order.suspect(Instant::now());
        }
    }

    /// Every occupied group should check the database for messages it may have missed.
    pub fn suspect_all(&mut self) {
        let now = Instant::now();
        for order in self.groups.values_mut() {
            order.suspect(now);
        }
    }

    /// The occupied groups, for the batched head check (one query for all of them).
    pub fn occupied(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// The database's newest seqs of occupied groups (the batched head check): a group whose
    /// head is beyond what its room delivered is behind, and reads the rest once `GAP_WAIT`
    /// has passed (unless the relay brings it first). Finds a silent tail, messages a peer
    /// stored but could not relay, without reading anything for a group that is up to date.
    pub fn heads_seen(&mut self, heads: Vec<(String, u64)>) {
        let now = Instant::now();
        for (group_name, head) in heads {
            let Some(order) = self.groups.get_mut(&group_name) else {
                continue;
            };
            if head > order.delivered {
                order.known_head = order.known_head.max(head);
                order.behind_since.get_or_insert(now);
            }
        }
    }

    /// The newest seq released to the group's room here (occupied groups only).
    pub fn delivered(&self, group_name: &str) -> Option<u64> {
        self.groups.get(group_name).map(|order| order.delivered)
    }

    /// Catch-up reads in flight.
    pub fn fetching(&self) -> usize {
        self.groups.values().filter(|order| order.fetching).count()
    }

    /// Catch-up reads that are due now, at most `most` (each group has at most one in flight;
    /// the caller caps how many run at once so catch-up never takes every worker).
    pub fn due_catch_ups(&mut self, now: Instant, most: usize) -> Vec<CatchUp> {
        let mut due = Vec::new();
        for (group_name, order) in &mut self.groups {
            if due.len() >= most {
                break;
            }
            let overdue = order
                .behind_since
                .is_some_and(|since| now.duration_since(since) >= GAP_WAIT);
            if overdue && !order.fetching {
                order.fetching = true;
                due.push(CatchUp {
                    group_name: group_name.clone(),
                    after_seq: order.delivered,
                });
            }
        }
        due
    }

    /// The answer to a catch-up read: the stored messages after `after_seq`, in order (`None`
    /// when the read failed). A gap the database cannot fill is skipped, so the room never stalls.
    pub fn caught_up(&mut self, group_name: &str, found: Option<Vec<Message>>) -> Vec<Release> {
        let mut out = Vec::new();
        let Some(order) = self.groups.get_mut(group_name) else {
            return out;
        };
        order.fetching = false;
        let Some(found) = found else {
            order.behind_since = Some(Instant::now());
            return out;
        };
        let complete = found.len() < CATCH_UP_BATCH as usize;
        for message in found {
            if message.seq > order.delivered {
                order
                    .held
                    .entry(message.seq)
                    .or_insert((message, Requester::Server));
            }
        }
        order.release_ready(&mut out, self.keep_recent);
        if complete {
            if let Some(&first_held) = order.held.keys().next() {
                log::warn!(
                    "{group_name}: seq {} to {} not found in the store; skipping",
                    order.delivered + 1,
                    first_held - 1
                );
                order.delivered = first_held - 1;
                order.release_ready(&mut out, self.keep_recent);
            }
            if order.held.is_empty() {
                order.known_head = order.delivered;
                order.behind_since = None;
            }
        }
        out
    }

    /// Messages held back across all groups (waiting for an earlier seq).
    pub fn held(&self) -> usize {
        self.groups.values().map(|order| order.held.len()).sum()
    }

    /// When the next catch-up could fall due (for the poll timeout).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.groups
            .values()
            .filter(|order| !order.fetching)
            .filter_map(|order| order.behind_since.map(|since| since + GAP_WAIT))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64) -> Message {
        Message {
            id: format!("{seq:024x}"),
            group_name: "g".into(),
            username: "u".into(),
            text: format!("m{seq}"),
            timestamp: "2026-11-25T00:00:00.000Z".into(),
            seq,
            client_msg_id: None,
            ..Message::default()
        }
    }

    fn seqs(released: &[Release]) -> Vec<u64> {
        released.iter().map(|(m, _)| m.seq).collect()
    }

    #[test]
    fn says_what_it_holds_and_hands_back_the_senders_of_it_when_the_room_empties() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        sequencer.enter("g", 0);
        let sender = Requester::Connection(mio::Token(3), 9);
        assert!(sequencer.offer(message(2), sender).is_empty());
        assert!(sequencer.holds("g", 2), "2 waits for 1");
        assert!(!sequencer.holds("g", 1));
        assert!(!sequencer.holds("other", 2));
        let released = sequencer.offer(message(1), Requester::Server);
        assert_eq!(seqs(&released), vec![1, 2]);
        assert!(matches!(
            released[1].1,
            Requester::Connection(mio::Token(3), 9)
        ));
        assert!(!sequencer.holds("g", 2), "released");
        assert!(sequencer.offer(message(4), sender).is_empty());
        let origins = sequencer.forget("g");
        assert!(matches!(
            origins[..],
            [Requester::Connection(mio::Token(3), 9)]
        ));
        assert!(!sequencer.holds("g", 4));
    }

    #[test]
    fn holds_early_messages_and_releases_them_in_order() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        sequencer.enter("g", 6);
        assert!(sequencer.offer(message(8), Requester::Server).is_empty());
        assert_eq!(
            seqs(&sequencer.offer(message(7), Requester::Server)),
            vec![7, 8]
        );
        assert!(
            sequencer.offer(message(8), Requester::Server).is_empty(),
            "duplicate"
        );
        assert!(
            sequencer.offer(message(3), Requester::Server).is_empty(),
            "old"
        );
    }

    #[test]
    fn a_gap_becomes_a_catch_up_read_after_the_wait() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        sequencer.enter("g", 0);
        sequencer.offer(message(2), Requester::Server);
        assert!(sequencer
            .due_catch_ups(Instant::now(), usize::MAX)
            .is_empty());
        let later = Instant::now() + GAP_WAIT;
        let due = sequencer.due_catch_ups(later, usize::MAX);
        assert_eq!(
            due,
            vec![CatchUp {
                group_name: "g".into(),
                after_seq: 0
            }]
        );
        assert!(
            sequencer.due_catch_ups(later, usize::MAX).is_empty(),
            "one read in flight"
        );
        let released = sequencer.caught_up("g", Some(vec![message(1), message(2)]));
        assert_eq!(seqs(&released), vec![1, 2]);
        assert_eq!(sequencer.next_deadline(), None);
    }

    #[test]
    fn an_unfillable_gap_is_skipped() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        sequencer.enter("g", 0);
        sequencer.offer(message(3), Requester::Server);
        let released = sequencer.caught_up("g", Some(vec![message(3)]));
        assert_eq!(seqs(&released), vec![3]);
    }

    #[test]
    fn a_late_entrant_gets_what_the_room_already_had() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        sequencer.enter("g", 0);
        for seq in 1..=3 {
            sequencer.offer(message(seq), Requester::Server);
        }
        let missed: Vec<u64> = sequencer.enter("g", 1).iter().map(|m| m.seq).collect();
        assert_eq!(missed, vec![2, 3]);
    }

    #[test]
    fn a_head_check_reads_only_groups_that_are_behind() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        sequencer.enter("g", 0);
        sequencer.enter("idle", 7);
        sequencer.offer(message(1), Requester::Server);
        sequencer.heads_seen(vec![("g".into(), 2), ("idle".into(), 7)]);
        let due = sequencer.due_catch_ups(Instant::now() + GAP_WAIT, usize::MAX);
        assert_eq!(
            due,
            vec![CatchUp {
                group_name: "g".into(),
                after_seq: 1
            }]
        );
        let released = sequencer.caught_up("g", Some(vec![message(2)]));
        assert_eq!(seqs(&released), vec![2], "the unrelayed tail is delivered");
        assert_eq!(sequencer.fetching(), 0);
        assert!(sequencer.caught_up("g", Some(vec![])).is_empty());
        assert_eq!(sequencer.next_deadline(), None);
    }

    #[test]
    fn catch_ups_run_at_most_the_cap_at_once() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        for group in ["a", "b", "c"] {
            sequencer.enter(group, 0);
        }
        sequencer.suspect_all();
        let first = sequencer.due_catch_ups(Instant::now() + GAP_WAIT, 2);
        assert_eq!(first.len(), 2);
        assert_eq!(sequencer.fetching(), 2);
        sequencer.caught_up(&first[0].group_name, Some(vec![]));
        let second = sequencer.due_catch_ups(Instant::now() + GAP_WAIT, 2 - sequencer.fetching());
        assert_eq!(second.len(), 1, "the third group's turn");
    }

    #[test]
    fn an_entrant_ahead_of_the_room_triggers_a_catch_up() {
        let mut sequencer = Sequencer::new(RECENT_IN_PEER_MODE);
        sequencer.enter("g", 0);
        sequencer.enter("g", 5);
        let due = sequencer.due_catch_ups(Instant::now() + GAP_WAIT, usize::MAX);
        assert_eq!(due.len(), 1);
        assert!(sequencer.caught_up("g", Some(vec![])).is_empty());
        assert_eq!(sequencer.next_deadline(), None, "nothing more to find");
    }
}
