//! Protocol 3's activity in every group: a logged-in protocol-3 connection hears of new
//! messages in each group of its user whose room it is not in, as `group_activity
//! {group_name, last_seq, unread_count, mention_count?}`, at most one per group per
//! `ACTIVITY_INTERVAL_MS` and always one after the last message of a burst (a trailing
//! notice). `mention_count` is the store's count at the user's last known read state (the
//! memberships read, a `read_marker` that said it) plus the mentions seen since; it is left
//! out while unknown (a marker rose by an implicit mark below the head).
//!
//! The loop keeps, per group with interested connections here, which connections those are
//! (loaded with one `my_groups` read when a connection is logged in and on protocol 3, kept
//! current by joins and leaves), the users' read markers (for `unread_count`), and one
//! coalescing state. Messages stored here, relayed messages and catch-up reads all feed it.
//! In peer mode the instance that stores a group's messages publishes the same coalesced
//! notice on the group's activity channel, which an instance subscribes to only while it has
//! interested connections: it then receives one small notice per group per interval, never
//! the group's message stream.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mio::Token;
use serde::{Deserialize, Serialize};

use super::{Cx, LiveFeature, Memberships, MembershipsOf, Origin};
use crate::peer::{Departure, Reach, ACTIVITY_KEY};
use crate::session::{LiveEffect, ReadState, Session};

/// The feature's name, and its relay note's kind.
const ACTIVITY: &str = "activity";

/// A group's newest seq, from the instance that stored it (coalesced): this feature's relay
/// note, on the group's activity channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupActivity {
    pub group_name: String,
    pub last_seq: u64,
}

/// The activity feature's own state (see the module's doc).
#[derive(Debug, Default)]
pub struct Activity {
    /// `ACTIVITY_INTERVAL_MS`.
    interval: Duration,
    /// Per group, the protocol-3 connections here whose user is a member.
    watchers: HashMap<String, HashSet<Token>>,
    /// Per such connection, its groups.
    watching: HashMap<Token, HashSet<String>>,
    /// The known read markers of their users, per user and group.
    marks: HashMap<String, HashMap<String, u64>>,
    /// Their users' mention counts, per user and group, where known.
    mentions: HashMap<String, HashMap<String, MentionTally>>,
    /// Each group's coalescing state.
    groups: HashMap<String, ActivityState>,
    /// When the next trailing notice is due.
    wake: Option<Instant>,
}

/// A user's mentions in one group: the store's count at a read mark, and the mentions seen
/// after it since.
#[derive(Debug, Default)]
struct MentionTally {
    counted: u64,
    at_mark: u64,
    seen: std::collections::BTreeSet<u64>,
}

impl MentionTally {
    fn count(&self) -> u64 {
        self.counted + self.seen.range(self.at_mark + 1..).count() as u64
    }
}

/// One group's coalescing state.
#[derive(Debug, Default)]
struct ActivityState {
    last_seq: u64,
    sent_at: Option<Instant>,
    /// A newer seq than the last notice carries waits for the interval to pass.
    due: bool,
    /// A message stored on this instance since the last notice (so peers are told).
    stored_here: bool,
}

impl Activity {
    pub fn new(interval: Duration) -> Activity {
        Activity {
            interval,
            ..Activity::default()
        }
    }

    /// Starts loading a connection's memberships once it is logged in and on protocol 3.
    fn start(&mut self, cx: &mut Cx<'_>, token: Token) {
        if self.watching.contains_key(&token) {
            return;
        }
        let Some(session) = cx.view.session(token) else {
            return;
        };
        let Some(username) = session.username.clone() else {
            return;
        };
        if session.protocol < 3 {
            return;
        }
        self.watching.insert(token, HashSet::new());
        let read = Memberships {
            username,
            feature: ACTIVITY,
            context: (),
        };
        cx.read(Some(token), crate::ops::work(read));
    }

    /// A connection stops hearing of its groups; without `others` (the user's other
    /// connections here) the user's known read markers go too.
    fn stop(&mut self, cx: &mut Cx<'_>, token: Token, username: &str, others: bool) {
        if let Some(groups) = self.watching.remove(&token) {
            for group in groups {
                self.unwatch_group(cx, token, &group);
            }
        }
        if !others {
            self.marks.remove(username);
            self.mentions.remove(username);
        }
    }

    fn watch_group(&mut self, cx: &mut Cx<'_>, token: Token, group_name: String) {
        let Some(groups) = self.watching.get_mut(&token) else {
            return;
        };
        groups.insert(group_name.clone());
        let watchers = self.watchers.entry(group_name.clone()).or_default();
        if watchers.is_empty() {
            cx.watch(format!("{ACTIVITY_KEY}{group_name}"), true);
        }
        watchers.insert(token);
    }

    fn unwatch_group(&mut self, cx: &mut Cx<'_>, token: Token, group_name: &str) {
        if let Some(groups) = self.watching.get_mut(&token) {
            groups.remove(group_name);
        }
        let Some(watchers) = self.watchers.get_mut(group_name) else {
            return;
        };
        watchers.remove(&token);
        if watchers.is_empty() {
            self.watchers.remove(group_name);
            cx.watch(format!("{ACTIVITY_KEY}{group_name}"), false);
        }
    }

    /// A user's read marker in a group is known to be at least `seq` (kept only for users
    /// with a protocol-3 connection here).
    fn know_mark(&mut self, cx: &Cx<'_>, username: &str, group_name: &str, seq: u64) {
        let has_watcher = cx
            .view
            .connections_of(username)
            .iter()
            .any(|t| self.watching.contains_key(t));
        if !has_watcher {
            return;
        }
        let mark = self
            .marks
            .entry(username.to_string())
            .or_default()
            .entry(group_name.to_string())
            .or_default();
        *mark = (*mark).max(seq);
    }

    /// Sends a group's notice to the interested connections here and, for messages stored
    /// here, to the other instances.
    fn emit(&mut self, cx: &mut Cx<'_>, group_name: &str) {
        let Some(state) = self.groups.get_mut(group_name) else {
            return;
        };
        state.sent_at = Some(Instant::now());
        state.due = false;
        let last_seq = state.last_seq;
        if std::mem::take(&mut state.stored_here) {
            let note = GroupActivity {
                group_name: group_name.to_string(),
                last_seq,
            };
            if let Ok(body) = serde_json::to_value(note) {
                cx.relay(ACTIVITY, Reach::Activity(group_name.to_string()), body);
            }
        }
        let Some(watchers) = self.watchers.get(group_name) else {
            return;
        };
        for &token in watchers {
            let Some(session) = cx.view.session(token) else {
                continue;
            };
            if session.room_name() == Some(group_name) {
                continue;
            }
            let Some(username) = session.username.as_deref() else {
                continue;
            };
            let mark = self
                .marks
                .get(username)
                .and_then(|groups| groups.get(group_name))
                .copied()
                .unwrap_or(0);
            let mut data = serde_json::json!({
                "group_name": group_name,
                "last_seq": last_seq,
                "unread_count": last_seq.saturating_sub(mark),
            });
            let mentions = self
                .mentions
                .get(username)
                .and_then(|groups| groups.get(group_name));
            if let Some(tally) = mentions {
                data["mention_count"] = serde_json::json!(tally.count());
            }
            cx.send(token, super::notice("group_activity", data));
        }
    }
}

impl LiveFeature for Activity {
    fn name(&self) -> &'static str {
        ACTIVITY
    }

    fn logged_in(&mut self, cx: &mut Cx<'_>, token: Token, _: &str) {
        self.start(cx, token);
    }

    /// Back on protocol 2: no more activity notices (protocol 3's alone).
    fn settings_changed(&mut self, cx: &mut Cx<'_>, token: Token) {
        let Some(session) = cx.view.session(token) else {
            return;
        };
        match session.username.clone() {
            Some(username) if session.protocol < 3 => {
                let others = cx
                    .view
                    .connections_of(&username)
                    .iter()
                    .any(|t| *t != token);
                self.stop(cx, token, &username, others);
            }
            _ => self.start(cx, token),
        }
    }

    fn closed(&mut self, cx: &mut Cx<'_>, token: Token, session: &Session) {
        if let Some(username) = &session.username {
            let others = !cx.view.connections_of(username).is_empty();
            self.stop(cx, token, username, others);
        }
    }

    /// The user's connections here that hear of activity add the group.
    fn joined(&mut self, cx: &mut Cx<'_>, _: Origin, username: &str, group_name: &str) {
        for token in cx.view.connections_of(username).to_vec() {
            if self.watching.contains_key(&token) {
                self.watch_group(cx, token, group_name.to_string());
            }
        }
        // What was said before joining counts as read: no mentions yet.
        let watched = cx
            .view
            .connections_of(username)
            .iter()
            .any(|t| self.watching.contains_key(t));
        if watched {
            self.mentions
                .entry(username.to_string())
                .or_default()
                .entry(group_name.to_string())
                .or_default();
        }
    }

    /// The user's connections here drop the group.
    fn left(&mut self, cx: &mut Cx<'_>, _: Origin, departure: &Departure) {
        for token in cx.view.connections_of(&departure.username).to_vec() {
            self.unwatch_group(cx, token, &departure.group_name);
        }
    }

    /// Its protocol-3 watchers outside the room (their sidebars list it) hear the same
    /// `group_deleted` and stop watching it.
    fn group_deleted(&mut self, cx: &mut Cx<'_>, group_name: &str, line: &[u8]) {
        let watchers = self.watchers.get(group_name).cloned().unwrap_or_default();
        for token in watchers {
            self.unwatch_group(cx, token, group_name);
            let elsewhere = cx
                .view
                .session(token)
                .is_some_and(|s| s.room_name() != Some(group_name));
            if elsewhere {
                cx.send(token, line.to_vec());
            }
        }
    }

    /// This instance's notices count from the raised marker (and the mentions from the
    /// count it says, else they are unknown until one does).
    fn marker_rose(&mut self, cx: &mut Cx<'_>, _: Origin, state: &ReadState) {
        self.know_mark(cx, &state.username, &state.group_name, state.last_read_seq);
        let Some(groups) = self.mentions.get_mut(&state.username) else {
            return;
        };
        match state.mention_count {
            Some(counted) => {
                let tally = groups.entry(state.group_name.clone()).or_default();
                tally.counted = counted;
                tally.at_mark = state.last_read_seq;
                let mark = state.last_read_seq;
                tally.seen.retain(|seq| *seq > mark);
            }
            None => {
                groups.remove(&state.group_name);
            }
        }
    }

    /// A mention of a user with watchers here counts, and the group's next notice says so
    /// (a trailing one: the message's own notice may have gone out before this).
    fn mentioned(&mut self, _: &mut Cx<'_>, username: &str, group_name: &str, seq: u64) {
        let Some(tally) = self
            .mentions
            .get_mut(username)
            .and_then(|groups| groups.get_mut(group_name))
        else {
            return;
        };
        if seq <= tally.at_mark || !tally.seen.insert(seq) {
            return;
        }
        if let Some(state) = self.groups.get_mut(group_name) {
            let at = state
                .sent_at
                .map_or_else(Instant::now, |sent| sent + self.interval);
            mark_due(state, &mut self.wake, at);
        }
    }

    /// Nothing is kept for a group nobody here watches unless peers may (a message stored
    /// here in peer mode), and a known group costs no allocation.
    fn message_seen(&mut self, cx: &mut Cx<'_>, group_name: &str, seq: u64, stored_here: bool) {
        let peers_may_watch = stored_here && cx.peers;
        if !peers_may_watch && !self.watchers.contains_key(group_name) {
            return;
        }
        if !self.groups.contains_key(group_name) {
            self.groups
                .insert(group_name.to_string(), ActivityState::default());
        }
        let Some(state) = self.groups.get_mut(group_name) else {
            return;
        };
        if seq <= state.last_seq {
            return;
        }
        state.last_seq = seq;
        state.stored_here |= peers_may_watch;
        if let Some(sent) = state.sent_at.filter(|sent| sent.elapsed() < self.interval) {
            mark_due(state, &mut self.wake, sent + self.interval);
            return;
        }
        self.emit(cx, group_name);
    }

    /// The connection's memberships loaded: it hears of these groups from now on.
    fn effect(&mut self, cx: &mut Cx<'_>, token: Option<Token>, effect: LiveEffect) {
        let (Some(token), Some(read)) = (token, effect.take::<MembershipsOf<()>>()) else {
            return;
        };
        let Some(username) = cx.view.session(token).and_then(|s| s.username.clone()) else {
            return;
        };
        for group in read.groups {
            self.know_mark(cx, &username, &group.group_name, group.last_read_seq);
            if let Some(attention) = &group.attention {
                let tally = MentionTally {
                    counted: attention.mention_count,
                    at_mark: group.last_read_seq,
                    seen: Default::default(),
                };
                self.mentions
                    .entry(username.clone())
                    .or_default()
                    .insert(group.group_name.clone(), tally);
            }
            let state = self.groups.entry(group.group_name.clone()).or_default();
            state.last_seq = state.last_seq.max(group.last_seq);
            self.watch_group(cx, token, group.group_name);
        }
    }

    fn relayed(&mut self, cx: &mut Cx<'_>, kind: &str, body: &serde_json::Value) {
        if kind != ACTIVITY {
            return;
        }
        if let Ok(note) = GroupActivity::deserialize(body) {
            self.message_seen(cx, &note.group_name, note.last_seq, false);
        }
    }

    /// Forgets coalescing states of groups nobody here watches and that went quiet.
    fn sweep(&mut self, _: &mut Cx<'_>) {
        let interval = self.interval;
        let watchers = &self.watchers;
        self.groups.retain(|group, state| {
            watchers.contains_key(group)
                || state.due
                || state.sent_at.is_some_and(|sent| sent.elapsed() < interval)
        });
    }

    /// Sends the trailing notices whose interval has passed (only when one is due: no scan
    /// on other turns).
    fn end_turn(&mut self, cx: &mut Cx<'_>) {
        if self.wake.is_none_or(|wake| wake > Instant::now()) {
            return;
        }
        let interval = self.interval;
        let due: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, s)| s.due && s.sent_at.is_none_or(|sent| sent.elapsed() >= interval))
            .map(|(group, _)| group.clone())
            .collect();
        for group in due {
            self.emit(cx, &group);
        }
        self.wake = self
            .groups
            .values()
            .filter(|s| s.due)
            .filter_map(|s| s.sent_at.map(|sent| sent + interval))
            .min();
    }

    fn wake_at(&self) -> Option<Instant> {
        self.wake
    }
}

/// A trailing notice for the group is owed at `at`: the feature's wake-up comes no later.
fn mark_due(state: &mut ActivityState, wake: &mut Option<Instant>, at: Instant) {
    state.due = true;
    *wake = Some(wake.map_or(at, |wake| wake.min(at)));
}
