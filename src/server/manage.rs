//! Managing messages and groups, the loop's half (the rules are `store/manage.rs`'s, one layer
//! down): what the room sees of edits, deletes, role changes, removals,
//! bans and deleted groups reach every connection in the group's room (every protocol), here
//! and, through the group's relay channel, on every other instance.

use std::collections::HashSet;

use serde_json::value::RawValue;

use super::*;
use crate::model::unix_millis;
use crate::ops::{Completed, Route, StoreCall};
use crate::peer::RoomLine;

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
    pub(super) leaves: HashMap<(String, String), (u64, Instant)>,
    /// Groups deleted (here or on a peer) recently: the clock when seen (a resume page read
    /// before the deletion is not sent after it).
    pub(super) group_deletes: HashMap<String, (u64, Instant)>,
    /// Seqs of messages deleted recently, per group (`edit_after_delete`).
    pub(super) deleted_seqs: HashMap<String, std::collections::HashSet<u64>>,
}

/// What this server knows of the erasure log.
pub(super) struct Erasures {
    /// Nothing before this is acted on (the server's start: older erasures closed whatever
    /// connections they had, and the name may have been registered again since).
    started_ms: u64,
    seen: HashSet<(String, u64)>,
    last_poll: Option<Instant>,
    in_flight: bool,
}

impl Erasures {
    pub(super) fn new() -> Erasures {
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

impl Server {
    /// A line for the group's room here and on every other instance, but `origin` (which got
    /// the reply). `closes`: the group is gone, and every connection leaves the room after it.
    pub(super) fn room_line(
        &mut self,
        group_name: &str,
        line: Vec<u8>,
        origin: Option<Token>,
        closes: bool,
    ) {
        if let Some(peer) = &self.peer {
            let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(&line));
            peer.publish_room(RoomLine {
                group_name: group_name.to_string(),
                line: text.into_owned(),
                closes,
            });
        }
        self.room_line_here(group_name, &line, origin, closes);
    }

    /// The local half of `room_line` (also what a peer's relayed line becomes here).
    pub(super) fn room_line_here(
        &mut self,
        group_name: &str,
        line: &[u8],
        origin: Option<Token>,
        closes: bool,
    ) {
        if self.edit_after_delete(group_name, line) {
            log::debug!("{group_name}: an edit relayed after the message's delete dropped");
            return;
        }
        for token in self.rooms.members(group_name) {
            if Some(token) != origin {
                self.notify(token, line.to_vec());
            }
            if closes {
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.leave_room();
                }
                self.leave_room(group_name, token);
            }
            self.touch(token);
        }
        if closes {
            self.group_gone(group_name, line);
            self.group_deleted_for_resumes(group_name, line);
        }
    }

    /// Whether `line` is a `message_edited` of a message whose `message_deleted` this instance
    /// already passed on. Stored, an edit never follows a delete (the store refuses to edit a
    /// tombstone), but relayed from two instances the two lines may arrive the other way
    /// round; the late edit would leave clients showing deleted text, so it is dropped. The
    /// deletes remembered are bounded (per group and in all).
    fn edit_after_delete(&mut self, group_name: &str, line: &[u8]) -> bool {
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
                .access
                .deleted_seqs
                .get(group_name)
                .is_some_and(|seqs| seqs.contains(&seq));
        }
        if self.access.deleted_seqs.len() >= MAX_GROUPS_WITH_DELETES {
            self.access.deleted_seqs.clear();
        }
        let seqs = self
            .access
            .deleted_seqs
            .entry(group_name.to_string())
            .or_default();
        if seqs.len() >= MAX_DELETES_PER_GROUP {
            seqs.clear();
        }
        seqs.insert(seq);
        false
    }

    /// A deleted group's protocol-3 watchers outside its room (their sidebars list it) hear
    /// the same `group_deleted` and stop watching it.
    fn group_gone(&mut self, group_name: &str, line: &[u8]) {
        let watchers = self
            .activity
            .watchers
            .get(group_name)
            .cloned()
            .unwrap_or_default();
        for token in watchers {
            self.unwatch_group(token, group_name);
            let elsewhere = self
                .connections
                .get(&token)
                .is_some_and(|c| c.session().room_name() != Some(group_name));
            if elsewhere {
                self.notify(token, line.to_vec());
            }
        }
    }

    /// A moderator took `departure.username` out of the group: the room hears `line`, and
    /// the user's connections everywhere leave it with `left_group {reason}`.
    pub(super) fn removed(&mut self, departure: Departure, line: Vec<u8>, origin: Token) {
        self.room_line(&departure.group_name, line, Some(origin), false);
        if let Some(peer) = &self.peer {
            peer.publish_leave(departure.clone());
        }
        self.tell_left(&departure, None);
        self.user_left(departure);
    }

    /// Reads the erasure log every `ERASURE_POLL` (from the sweep).
    pub(super) fn poll_erasures(&mut self, now: Instant) {
        let erasures = &mut self.erasures;
        let since_last = erasures.last_poll.map(|at| now.duration_since(at));
        // A read that never came back (its job timed out unanswered) is given up after a while.
        let waiting = erasures.in_flight && since_last.is_some_and(|s| s < 15 * ERASURE_POLL);
        if waiting || since_last.is_some_and(|s| s < ERASURE_POLL) {
            return;
        }
        let Some(pool) = self.pool.as_mut() else {
            return;
        };
        erasures.last_poll = Some(now);
        erasures.in_flight = true;
        let since_ms = unix_millis()
            .saturating_sub(ERASURE_WINDOW_MS)
            .max(erasures.started_ms);
        pool.submit(
            Requester::Server,
            crate::ops::work(ErasurePoll { since_ms }),
        );
    }

    /// Closes the connections of users erased since the last read (`closing account_erased`).
    pub(super) fn erased(&mut self, erased: Vec<(String, u64)>) {
        self.erasures.in_flight = false;
        let oldest = unix_millis().saturating_sub(2 * ERASURE_WINDOW_MS);
        self.erasures.seen.retain(|(_, at)| *at >= oldest);
        for (username, at) in erased {
            if !self.erasures.seen.insert((username.clone(), at)) {
                continue;
            }
            let tokens = self.devices.connections_of(&username);
            if !tokens.is_empty() {
                log::info!("closing {} connection(s) of an erased user", tokens.len());
            }
            for token in tokens {
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.announce(Closing::AccountErased);
                }
                self.close(token);
            }
        }
    }
}
