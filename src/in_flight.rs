//! One connection's requests in flight, answered in the order they were made.
//!
//! IRC servers relay a client's pipelined lines at once; a chat server that persists must wait
//! for the store, and answering one request at a time makes each `send_message` wait a full
//! store round trip behind the previous one. Here up to `depth` messages of one connection
//! (`EMBEDDED_PIPELINE_DEPTH` on the embedded store) are with the store at once (they reach the writer together and share a commit),
//! while every reply still leaves in request order: an answer that comes back early, or an
//! immediate reply (`ping`, a validation error) made while a store job is out, waits in its slot
//! until everything before it is answered.
//!
//! Only messages pipeline. Any other store job is a barrier: it starts once nothing is in
//! flight, and nothing after it is planned until it is answered. That keeps every rule the
//! protocol had with one request at a time: a read after a send sees the send, a request after
//! `find_user` or `enter_group` is planned with the session they produced, and a leave cannot
//! overtake an enter.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use crate::protocol::RequestId;
use crate::session::Completed;

/// Most messages one connection may have with the embedded store at once (see the module doc).
/// With SQLite a batch costs one commit whatever its size; a MongoDB insert costs per message,
/// so there the server keeps one request in flight (`pipeline_depth`), as a slow store would
/// otherwise make a connection's later messages wait out the store timeout behind its own.
pub const EMBEDDED_PIPELINE_DEPTH: usize = 16;

/// Requests answered by the store timeout whose tickets are remembered, so their late results
/// reach the client as broadcasts.
const TIMED_OUT_MEMORY: usize = 16;

#[derive(Debug)]
struct Slot {
    /// `None` for an immediate reply kept in line.
    ticket: Option<u64>,
    id: Option<RequestId>,
    since: Instant,
    /// The server's leave clock when the job was submitted.
    leave_clock: u64,
    pipelined: bool,
    answer: Option<Completed>,
    /// A sent message's reply waiting for the message itself to go to the room (the
    /// sequencer holds it for an earlier seq): it does not go out before then.
    waits_for_release: bool,
}

/// An answer whose turn has come.
#[derive(Debug)]
pub struct Answered {
    pub completed: Completed,
    /// The leave clock at submission (an enter answered after a later leave is not applied).
    pub leave_clock: u64,
}

#[derive(Debug)]
pub struct InFlight {
    /// Most store jobs in flight at once.
    depth: usize,
    slots: VecDeque<Slot>,
    last_ticket: u64,
    timed_out: VecDeque<u64>,
}

impl InFlight {
    pub fn new(depth: usize) -> InFlight {
        InFlight {
            depth: depth.max(1),
            slots: VecDeque::new(),
            last_ticket: 0,
            timed_out: VecDeque::new(),
        }
    }

    /// Nothing is in flight and no reply waits for its turn.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether another request may be planned: not while a barrier job is out, and not past
    /// the depth.
    pub fn accepts_requests(&self) -> bool {
        // Slots are few (the depth, plus immediate replies queued behind them): counting the
        // unanswered ones is cheaper to get right than a counter kept beside them.
        let waiting = self
            .slots
            .iter()
            .filter(|slot| slot.answer.is_none())
            .count();
        waiting < self.depth && self.slots.iter().all(|slot| slot.pipelined)
    }

    /// Whether a store job may start now (`pipelined`: it is a message).
    pub fn admits(&self, pipelined: bool) -> bool {
        self.slots.is_empty() || (pipelined && self.accepts_requests())
    }

    /// Records a submitted store job; returns its ticket.
    pub fn start(
        &mut self,
        id: Option<RequestId>,
        leave_clock: u64,
        pipelined: bool,
        now: Instant,
    ) -> u64 {
        self.last_ticket += 1;
        self.slots.push_back(Slot {
            ticket: Some(self.last_ticket),
            id,
            since: now,
            leave_clock,
            pipelined,
            answer: None,
            waits_for_release: false,
        });
        self.last_ticket
    }

    /// An immediate reply: handed back to be sent now when nothing is in flight, else kept in
    /// line behind the requests before it.
    pub fn in_order(&mut self, line: Vec<u8>) -> Option<Vec<u8>> {
        if self.slots.is_empty() {
            return Some(line);
        }
        self.slots.push_back(Slot {
            ticket: None,
            id: None,
            since: Instant::now(),
            leave_clock: 0,
            pipelined: true,
            answer: Some(Completed::reply(line)),
            waits_for_release: false,
        });
        None
    }

    /// Files the answer of job `ticket`, built by `finish` from the request id. False when the
    /// job is not in flight (it was answered by the store timeout).
    pub fn answer(
        &mut self,
        ticket: u64,
        finish: impl FnOnce(Option<&RawValue>) -> Completed,
    ) -> bool {
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|slot| slot.ticket == Some(ticket) && slot.answer.is_none())
        else {
            return false;
        };
        slot.answer = Some(finish(slot.id.as_deref()));
        true
    }

    /// The oldest answer, once everything before it has gone.
    pub fn next_ready(&mut self) -> Option<Answered> {
        if self.slots.front()?.waits_for_release {
            return None;
        }
        let answer = self.slots.front_mut()?.answer.take()?;
        let slot = self.slots.pop_front()?;
        Some(Answered {
            completed: answer,
            leave_clock: slot.leave_clock,
        })
    }

    /// Job `ticket`'s answer waits (`waits` true) or no longer waits for its message's release.
    pub fn wait_for_release(&mut self, ticket: u64, waits: bool) {
        if let Some(slot) = self
            .slots
            .iter_mut()
            .find(|slot| slot.ticket == Some(ticket))
        {
            slot.waits_for_release = waits;
        }
    }

    /// Whether the oldest job has been out longer than `limit`.
    pub fn overdue(&self, now: Instant, limit: Duration) -> bool {
        self.slots
            .front()
            .is_some_and(|slot| slot.answer.is_none() && now.duration_since(slot.since) > limit)
    }

    /// Gives up on the oldest job (the store timeout answers it): returns its request id.
    pub fn give_up_oldest(&mut self) -> Option<Option<RequestId>> {
        if self.slots.front()?.answer.is_some() {
            return None;
        }
        let slot = self.slots.pop_front()?;
        if let Some(ticket) = slot.ticket {
            if self.timed_out.len() >= TIMED_OUT_MEMORY {
                self.timed_out.pop_front();
            }
            self.timed_out.push_back(ticket);
        }
        Some(slot.id)
    }

    /// Whether job `ticket` was answered by the store timeout.
    pub fn timed_out(&self, ticket: u64) -> bool {
        self.timed_out.contains(&ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Option<RequestId> {
        RawValue::from_string(text.to_string()).ok()
    }

    fn line(answered: Answered) -> String {
        String::from_utf8(answered.completed.line).expect("utf-8")
    }

    fn echo(id: Option<&RawValue>) -> Completed {
        Completed::reply(id.map_or("-", RawValue::get).as_bytes().to_vec())
    }

    #[test]
    fn answers_leave_in_request_order() {
        let mut in_flight = InFlight::new(EMBEDDED_PIPELINE_DEPTH);
        let now = Instant::now();
        let first = in_flight.start(id("1"), 0, true, now);
        let second = in_flight.start(id("2"), 0, true, now);
        assert_eq!(in_flight.in_order(b"pong".to_vec()), None);
        assert!(in_flight.answer(second, echo));
        assert!(in_flight.next_ready().is_none(), "2 must wait for 1");
        assert!(in_flight.answer(first, echo));
        let order: Vec<String> = std::iter::from_fn(|| in_flight.next_ready())
            .map(line)
            .collect();
        assert_eq!(order, ["1", "2", "pong"]);
        assert!(in_flight.is_empty());
        assert_eq!(in_flight.in_order(b"now".to_vec()), Some(b"now".to_vec()));
    }

    #[test]
    fn only_messages_pipeline_and_barriers_stand_alone() {
        let mut in_flight = InFlight::new(EMBEDDED_PIPELINE_DEPTH);
        let now = Instant::now();
        assert!(in_flight.admits(false));
        let barrier = in_flight.start(None, 0, false, now);
        assert!(!in_flight.accepts_requests());
        assert!(!in_flight.admits(true));
        assert!(in_flight.answer(barrier, echo));
        assert!(in_flight.next_ready().is_some());
        for _ in 0..EMBEDDED_PIPELINE_DEPTH {
            assert!(in_flight.admits(true));
            in_flight.start(None, 0, true, now);
        }
        assert!(!in_flight.admits(true), "at most the depth");
        assert!(!in_flight.accepts_requests());
        assert!(
            !in_flight.admits(false),
            "a barrier waits for an empty queue"
        );
    }

    #[test]
    fn depth_one_is_one_request_at_a_time() {
        let mut in_flight = InFlight::new(1);
        let ticket = in_flight.start(None, 0, true, Instant::now());
        assert!(!in_flight.accepts_requests());
        assert!(in_flight.answer(ticket, echo));
        assert!(in_flight.next_ready().is_some());
        assert!(in_flight.accepts_requests());
    }

    #[test]
    fn a_timed_out_job_is_answered_once_and_remembered() {
        let mut in_flight = InFlight::new(EMBEDDED_PIPELINE_DEPTH);
        let start = Instant::now();
        let first = in_flight.start(id("1"), 0, true, start);
        let second = in_flight.start(id("2"), 0, true, start);
        let later = start + Duration::from_secs(10);
        assert!(in_flight.overdue(later, Duration::from_secs(5)));
        assert_eq!(
            in_flight
                .give_up_oldest()
                .flatten()
                .map(|id| id.get().to_string()),
            Some("1".into())
        );
        assert!(in_flight.timed_out(first));
        assert!(
            !in_flight.answer(first, echo),
            "a late result is not answered twice"
        );
        assert!(in_flight.answer(second, echo));
        assert_eq!(in_flight.next_ready().map(line), Some("2".into()));
    }
}
