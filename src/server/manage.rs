//! Managing messages and groups, the loop's memory of it (the rules are `store/manage.rs`'s,
//! one layer down): where access ended lately (leaves, removals, bans, deleted groups and
//! messages), so that what was read before and arrives after is not applied, and the erasure
//! log's read point. The loop sends the room lines themselves (`Server::room_line`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use crate::model::unix_millis;
use crate::ops::{Completed, Route, StoreCall};
use crate::session::Effect;
use crate::store::{Store, StoreError};
use crate::workers::Work;

/// How long a leave is remembered: an `enter_group` submitted before it but completing after
/// it must not put the user back in the room.
const LEAVE_MEMORY: Duration = Duration::from_secs(60);

/// How often the erasure log is read (a user erased anywhere is cut off within about this).
const ERASURE_POLL: Duration = Duration::from_secs(2);
/// How far back each read looks: any instance's erasure, written with its own clock, is seen
/// however late its write lands within this.
const ERASURE_WINDOW_MS: u64 = 60_000;

/// Where access ended lately, for what was read before it and arrives after: a resume page
/// or an `enter_group` answered after the user left or the group went is not applied, and an
/// edit that arrives after its message's delete is dropped.
#[derive(Debug, Default)]
pub(super) struct AccessEnds {
    /// Counts leaves and deletions seen here; a request remembers it when submitted.
    pub(super) clock: u64,
    /// Leaves seen (here or from peers) by (username, group): the clock when seen.
    leaves: HashMap<(String, String), (u64, Instant)>,
    /// Groups deleted (here or on a peer) recently: the clock when seen (a resume page read
    /// before the deletion is not sent after it).
    group_deletes: HashMap<String, (u64, Instant)>,
    /// Seqs of messages deleted recently, per group (`edit_after_delete`).
    deleted_seqs: HashMap<String, HashSet<u64>>,
}

/// Moderation's memory: where access ended, and the erasure log's read point.
pub(super) struct Moderation {
    pub(super) access: AccessEnds,
    erasures: Erasures,
}

/// What this server knows of the erasure log.
struct Erasures {
    /// Nothing before this is acted on (the server's start: older erasures closed whatever
    /// connections they had, and the name may have been registered again since).
    started_ms: u64,
    seen: HashSet<(String, u64)>,
    last_poll: Option<Instant>,
    in_flight: bool,
}

impl Erasures {
    fn new() -> Erasures {
        Erasures {
            started_ms: unix_millis(),
            seen: HashSet::new(),
            last_poll: None,
            in_flight: false,
        }
    }
}

/// The server's own read of the erasure log.
#[derive(Debug)]
struct ErasurePoll {
    since_ms: u64,
}

impl StoreCall for ErasurePoll {
    type Output = Vec<(String, u64)>;

    fn route(&self) -> Route<'_> {
        Route::any()
    }

    /// A failed read is an empty one (logged): the next poll reads the same window again.
    fn run(&self, store: &mut dyn Store) -> Result<Self::Output, StoreError> {
        Ok(store.erasures_since(self.since_ms).unwrap_or_else(|error| {
            log::warn!("reading the erasure log failed: {error}");
            Vec::new()
        }))
    }

    fn answer(self, erased: Self::Output, _: Option<&RawValue>) -> Completed {
        Completed {
            line: Vec::new(),
            effect: Effect::Erased(erased),
            shows: None,
        }
    }
}

/// Deletes remembered per group, and groups with remembered deletes, for dropping an edit
/// relayed after its message's delete (`edit_after_delete`).
const MAX_DELETES_PER_GROUP: usize = 4096;
const MAX_GROUPS_WITH_DELETES: usize = 10_000;

impl AccessEnds {
    /// A user left a group (here or on a peer); the clock moves on.
    pub(super) fn left(&mut self, username: String, group_name: String) {
        self.clock += 1;
        self.leaves
            .insert((username, group_name), (self.clock, Instant::now()));
    }

    /// A group was deleted (here or on a peer); the clock moves on.
    pub(super) fn group_deleted(&mut self, group_name: &str) {
        self.clock += 1;
        self.group_deletes
            .insert(group_name.to_string(), (self.clock, Instant::now()));
    }

    /// Whether `username` left `group_name` after the clock read `since`.
    pub(super) fn left_since(&self, username: String, group_name: &str, since: u64) -> bool {
        self.leaves
            .get(&(username, group_name.to_string()))
            .is_some_and(|(clock, _)| *clock > since)
    }

    /// Whether `group_name` was deleted after the clock read `since`.
    pub(super) fn deleted_since(&self, group_name: &str, since: u64) -> bool {
        self.group_deletes
            .get(group_name)
            .is_some_and(|(clock, _)| *clock > since)
    }

    /// Forgets leaves and deletions older than `LEAVE_MEMORY` (from the sweep).
    pub(super) fn forget_old(&mut self, now: Instant) {
        self.leaves
            .retain(|_, (_, seen)| now.duration_since(*seen) < LEAVE_MEMORY);
        self.group_deletes
            .retain(|_, (_, seen)| now.duration_since(*seen) < LEAVE_MEMORY);
    }

    /// Whether `line` is a `message_edited` of a message whose `message_deleted` this instance
    /// already passed on. Stored, an edit never follows a delete (the store refuses to edit a
    /// tombstone), but relayed from two instances the two lines may arrive the other way
    /// round; the late edit would leave clients showing deleted text, so it is dropped. The
    /// deletes remembered are bounded (per group and in all).
    pub(super) fn edit_after_delete(&mut self, group_name: &str, line: &[u8]) -> bool {
        let deleted = line.starts_with(br#"{"event":"message_deleted""#);
        if !deleted && !line.starts_with(br#"{"event":"message_edited""#) {
            return false;
        }
        let Some(seq) = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|value| value["data"]["seq"].as_u64())
        else {
            return false;
        };
        if !deleted {
            return self
                .deleted_seqs
                .get(group_name)
                .is_some_and(|seqs| seqs.contains(&seq));
        }
        if self.deleted_seqs.len() >= MAX_GROUPS_WITH_DELETES {
            self.deleted_seqs.clear();
        }
        let seqs = self.deleted_seqs.entry(group_name.to_string()).or_default();
        if seqs.len() >= MAX_DELETES_PER_GROUP {
            seqs.clear();
        }
        seqs.insert(seq);
        false
    }
}

impl Moderation {
    pub(super) fn new() -> Moderation {
        Moderation {
            access: AccessEnds::default(),
            erasures: Erasures::new(),
        }
    }

    /// The erasure log's next read, once `ERASURE_POLL` has passed (from the sweep).
    pub(super) fn erasure_poll(&mut self, now: Instant) -> Option<Work> {
        let erasures = &mut self.erasures;
        let since_last = erasures.last_poll.map(|at| now.duration_since(at));
        // A read that never came back (its job timed out unanswered) is given up after a while.
        let waiting = erasures.in_flight && since_last.is_some_and(|s| s < 15 * ERASURE_POLL);
        if waiting || since_last.is_some_and(|s| s < ERASURE_POLL) {
            return None;
        }
        erasures.last_poll = Some(now);
        erasures.in_flight = true;
        let since_ms = unix_millis()
            .saturating_sub(ERASURE_WINDOW_MS)
            .max(erasures.started_ms);
        Some(crate::ops::work(ErasurePoll { since_ms }))
    }

    /// The users of a read of the erasure log not acted on before.
    pub(super) fn newly_erased(&mut self, erased: Vec<(String, u64)>) -> Vec<String> {
        self.erasures.in_flight = false;
        let oldest = unix_millis().saturating_sub(2 * ERASURE_WINDOW_MS);
        self.erasures.seen.retain(|(_, at)| *at >= oldest);
        erased
            .into_iter()
            .filter(|(username, at)| self.erasures.seen.insert((username.clone(), *at)))
            .map(|(username, _)| username)
            .collect()
    }
}
