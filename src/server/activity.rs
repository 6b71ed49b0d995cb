//! Protocol 3's activity in every group: a logged-in protocol-3 connection hears of new
//! messages in each group of its user whose room it is not in, as `group_activity
//! {group_name, last_seq, unread_count}`, at most one per group per `ACTIVITY_INTERVAL_MS`
//! and always one after the last message of a burst (a trailing notice).
//!
//! The loop keeps, per group with interested connections here, which connections those are
//! (loaded with one `my_groups` read when a connection is logged in and on protocol 3, kept
//! current by joins and leaves), the users' read markers (for `unread_count`), and one
//! coalescing state. Messages stored here, relayed messages and catch-up reads all feed it.
//! In peer mode the instance that stores a group's messages publishes the same coalesced
//! notice on the group's activity channel, which an instance subscribes to only while it has
//! interested connections: it then receives one small notice per group per interval, never
//! the group's message stream.

use super::*;
use crate::model::{GroupReadState, GroupsQuery};
use crate::ops::{Completed, Route, StoreCall};
use crate::peer::{GroupActivity, ACTIVITY_KEY};

/// The activity feature's own state (see the module's doc).
#[derive(Debug, Default)]
pub(super) struct Activity {
    /// Per group, the protocol-3 connections here whose user is a member.
    pub(super) watchers: HashMap<String, std::collections::HashSet<Token>>,
    /// Per such connection, its groups.
    pub(super) watching: HashMap<Token, std::collections::HashSet<String>>,
    /// The known read markers of their users, per user and group.
    pub(super) marks: HashMap<String, HashMap<String, u64>>,
    /// Each group's coalescing state.
    pub(super) groups: HashMap<String, ActivityState>,
    /// When the next trailing notice is due.
    pub(super) wake: Option<Instant>,
}

/// One group's coalescing state.
#[derive(Debug, Default)]
pub(super) struct ActivityState {
    last_seq: u64,
    sent_at: Option<Instant>,
    /// A newer seq than the last notice carries waits for the interval to pass.
    due: bool,
    /// A message stored on this instance since the last notice (so peers are told).
    stored_here: bool,
}

/// What a user's memberships are read for.
#[derive(Debug)]
pub(super) enum MembershipsFor {
    /// A connection's activity notices (`Effect::Watch`).
    Activity,
    /// Telling the user's rooms that the user came online or went offline.
    Presence { online: bool },
}

/// The store read of a user's memberships (the first page, by name).
#[derive(Debug)]
pub(super) struct Memberships {
    pub(super) username: String,
    pub(super) purpose: MembershipsFor,
}

impl StoreCall for Memberships {
    type Output = Vec<GroupReadState>;

    fn route(&self) -> Route<'_> {
        Route::by(&self.username)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Vec<GroupReadState>, StoreError> {
        let query = GroupsQuery {
            after: None,
            limit: crate::ops::my_groups::MAX_MEMBERSHIPS_PAGE,
        };
        Ok(store.my_groups(&self.username, &query)?.groups)
    }

    fn answer(
        self,
        groups: Vec<GroupReadState>,
        _: Option<&serde_json::value::RawValue>,
    ) -> Completed {
        let effect = match self.purpose {
            MembershipsFor::Activity => Effect::Watch(groups),
            MembershipsFor::Presence { online } => Effect::Presence {
                username: self.username,
                online,
                groups: groups.into_iter().map(|g| g.group_name).collect(),
            },
        };
        // No line: the server's own read, answered with an effect only.
        Completed {
            line: Vec::new(),
            effect,
            shows: None,
        }
    }
}

impl Server {
    /// Starts loading a connection's memberships once it is logged in and on protocol 3.
    pub(super) fn start_activity(&mut self, token: Token) {
        if self.activity.watching.contains_key(&token) {
            return;
        }
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        let Some(username) = connection.session().username.clone() else {
            return;
        };
        if connection.session().protocol < 3 {
            return;
        }
        self.activity.watching.insert(token, Default::default());
        let work = crate::ops::work(Memberships {
            username,
            purpose: MembershipsFor::Activity,
        });
        super::start_job(
            connection,
            &mut self.pool,
            token,
            work,
            None,
            self.access.clock,
        );
    }

    /// The memberships loaded: the connection hears of these groups from now on.
    pub(super) fn watch_groups(&mut self, token: Token, groups: Vec<GroupReadState>) {
        let Some(username) = self
            .connections
            .get(&token)
            .and_then(|c| c.session().username.clone())
        else {
            return;
        };
        for group in groups {
            self.know_mark(&username, &group.group_name, group.last_read_seq);
            let state = self
                .activity
                .groups
                .entry(group.group_name.clone())
                .or_default();
            state.last_seq = state.last_seq.max(group.last_seq);
            self.watch_group(token, group.group_name);
        }
    }

    fn watch_group(&mut self, token: Token, group_name: String) {
        let Some(groups) = self.activity.watching.get_mut(&token) else {
            return;
        };
        groups.insert(group_name.clone());
        let watchers = self
            .activity
            .watchers
            .entry(group_name.clone())
            .or_default();
        if watchers.is_empty() {
            if let Some(peer) = &self.peer {
                peer.watch(&format!("{ACTIVITY_KEY}{group_name}"));
            }
        }
        watchers.insert(token);
    }

    pub(super) fn unwatch_group(&mut self, token: Token, group_name: &str) {
        if let Some(groups) = self.activity.watching.get_mut(&token) {
            groups.remove(group_name);
        }
        let Some(watchers) = self.activity.watchers.get_mut(group_name) else {
            return;
        };
        watchers.remove(&token);
        if watchers.is_empty() {
            self.activity.watchers.remove(group_name);
            if let Some(peer) = &self.peer {
                peer.unwatch(&format!("{ACTIVITY_KEY}{group_name}"));
            }
        }
    }

    /// A closing connection stops hearing of its groups; the last connection of a user takes
    /// the user's known read markers with it.
    pub(super) fn stop_activity(&mut self, token: Token, username: &str) {
        if let Some(groups) = self.activity.watching.remove(&token) {
            for group in groups {
                self.unwatch_group(token, &group);
            }
        }
        let others = self
            .devices
            .users
            .get(username)
            .is_some_and(|tokens| tokens.iter().any(|t| *t != token));
        if !others {
            self.activity.marks.remove(username);
        }
    }

    /// The user joined a group: their connections here that hear of activity add it.
    pub(super) fn joined_activity(&mut self, username: &str, group_name: &str) {
        let tokens = self.devices.connections_of(username);
        for token in tokens {
            if self.activity.watching.contains_key(&token) {
                self.watch_group(token, group_name.to_string());
            }
        }
    }

    /// The user left a group (here or on a peer): their connections here drop it.
    pub(super) fn left_activity(&mut self, username: &str, group_name: &str) {
        let tokens = self.devices.connections_of(username);
        for token in tokens {
            self.unwatch_group(token, group_name);
        }
    }

    /// A user's read marker in a group is known to be at least `seq` (kept only for users
    /// with a protocol-3 connection here).
    pub(super) fn know_mark(&mut self, username: &str, group_name: &str, seq: u64) {
        let has_watcher = self.devices.users.get(username).is_some_and(|tokens| {
            tokens
                .iter()
                .any(|t| self.activity.watching.contains_key(t))
        });
        if !has_watcher {
            return;
        }
        let mark = self
            .activity
            .marks
            .entry(username.to_string())
            .or_default()
            .entry(group_name.to_string())
            .or_default();
        *mark = (*mark).max(seq);
    }

    /// Reads what a line to a user's devices from another instance says about their state: a
    /// raised read marker, or a group joined (their connections here then hear of it too).
    pub(super) fn note_user_line(&mut self, username: &str, line: &[u8]) {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        let group = value["data"]["group_name"].as_str().unwrap_or_default();
        match value["event"].as_str() {
            Some("read_marker") => {
                let seq = value["data"]["last_read_seq"].as_u64().unwrap_or(0);
                self.know_mark(username, group, seq);
            }
            Some("joined_group") => self.joined_activity(username, group),
            _ => {}
        }
    }

    /// A message of `group_name` with `seq` exists (stored here when `stored_here`). Called
    /// for every message: nothing is kept for a group nobody here watches unless peers may
    /// (a message stored here in peer mode), and a known group costs no allocation.
    pub(super) fn activity_seen(&mut self, group_name: &str, seq: u64, stored_here: bool) {
        let peers_may_watch = stored_here && self.peer.is_some();
        if !peers_may_watch && !self.activity.watchers.contains_key(group_name) {
            return;
        }
        let interval = self.config.activity_interval;
        if !self.activity.groups.contains_key(group_name) {
            self.activity
                .groups
                .insert(group_name.to_string(), ActivityState::default());
        }
        let Some(state) = self.activity.groups.get_mut(group_name) else {
            return;
        };
        if seq <= state.last_seq {
            return;
        }
        state.last_seq = seq;
        state.stored_here |= peers_may_watch;
        if let Some(sent) = state.sent_at.filter(|sent| sent.elapsed() < interval) {
            state.due = true;
            let at = sent + interval;
            self.activity.wake = Some(self.activity.wake.map_or(at, |wake| wake.min(at)));
            return;
        }
        self.emit_activity(group_name);
    }

    /// Sends a group's notice to the interested connections here and, for messages stored
    /// here, to the other instances.
    fn emit_activity(&mut self, group_name: &str) {
        let Some(state) = self.activity.groups.get_mut(group_name) else {
            return;
        };
        state.sent_at = Some(Instant::now());
        state.due = false;
        let last_seq = state.last_seq;
        if std::mem::take(&mut state.stored_here) {
            if let Some(peer) = &self.peer {
                peer.publish_activity(GroupActivity {
                    group_name: group_name.to_string(),
                    last_seq,
                });
            }
        }
        let tokens: Vec<Token> = self
            .activity
            .watchers
            .get(group_name)
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        for token in tokens {
            let Some(connection) = self.connections.get_mut(&token) else {
                continue;
            };
            let session = connection.session();
            if session.room_name() == Some(group_name) || connection.is_doomed() {
                continue;
            }
            let Some(username) = session.username.as_deref() else {
                continue;
            };
            let mark = self
                .activity
                .marks
                .get(username)
                .and_then(|groups| groups.get(group_name))
                .copied()
                .unwrap_or(0);
            let line = crate::protocol::reply::encode_line(
                "group_activity",
                &serde_json::json!({
                    "group_name": group_name,
                    "last_seq": last_seq,
                    "unread_count": last_seq.saturating_sub(mark),
                }),
                None,
            );
            self.notify(token, line);
        }
    }

    /// Sends the trailing notices whose interval has passed (only when one is due: no scan
    /// on other turns).
    pub(super) fn release_activity(&mut self) {
        if self.activity.wake.is_none_or(|wake| wake > Instant::now()) {
            return;
        }
        let interval = self.config.activity_interval;
        let due: Vec<String> = self
            .activity
            .groups
            .iter()
            .filter(|(_, s)| s.due && s.sent_at.is_none_or(|sent| sent.elapsed() >= interval))
            .map(|(group, _)| group.clone())
            .collect();
        for group in due {
            self.emit_activity(&group);
        }
        self.activity.wake = self
            .activity
            .groups
            .values()
            .filter(|s| s.due)
            .filter_map(|s| s.sent_at.map(|sent| sent + interval))
            .min();
    }

    /// Forgets coalescing states of groups nobody here watches and that went quiet (sweep).
    pub(super) fn forget_quiet_activity(&mut self) {
        let interval = self.config.activity_interval;
        let watchers = &self.activity.watchers;
        self.activity.groups.retain(|group, state| {
            watchers.contains_key(group)
                || state.due
                || state.sent_at.is_some_and(|sent| sent.elapsed() < interval)
        });
    }
}
