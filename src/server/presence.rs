//! Protocol 3's presence: who is online. A user is online while they have a logged-in
//! connection on any instance. Going offline waits `PRESENCE_GRACE` (a reconnect within it is
//! silent). Each instance tells the others who is logged in on it with a full snapshot every
//! `SNAPSHOT_EVERY`, and at the next sweep (within a second) after a change (control channel); a snapshot older than
//! `SNAPSHOT_EXPIRY` is dropped, so a killed instance's users go offline within about 7 s.
//! When a user's state changes, the rooms here of the user's groups get `presence
//! {group_name, username, online}` (protocol-3 connections, not the user's own), and
//! `enter_group` on protocol 3 answers `online`: the group's members online now.
//!
//! The event loops of one process (`IO_THREADS`) also exchange snapshots, for the events; for
//! `online` they share one table of who is present on which loop, so a user who logged in on
//! one loop is in the next `enter_group`'s `online` on any other at once, not after a snapshot.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use super::*;
use crate::peer::PresenceSnapshot;

/// How long a user whose last connection closed still counts as online.
const PRESENCE_GRACE: Duration = Duration::from_secs(3);
/// How often an instance sends its snapshot of logged-in users.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(2);
/// A peer's snapshot this old is taken as the peer gone.
const SNAPSHOT_EXPIRY: Duration = Duration::from_secs(6);

/// Presence state of this instance.
#[derive(Debug, Default)]
pub(super) struct Presence {
    /// Users whose last connection here closed, and when they go offline (grace).
    leaving: HashMap<String, Instant>,
    /// Other instances' logged-in users, and when their snapshot arrived.
    remote: HashMap<String, (HashSet<String>, Instant)>,
    /// Users announced online (the state rooms were last told).
    online: HashSet<String>,
    last_snapshot: Option<Instant>,
    /// Users logged in here changed since the last snapshot (sent at the next sweep, so a
    /// burst of logins costs one snapshot, not one per login).
    changed: bool,
    /// Who is present (logged in or in their grace) on the process's loops.
    loops: Arc<LoopsPresence>,
}

/// Users present on this process's event loops: for each, on how many loops. Shared by the
/// loops; each changes only its own users' counts (a user's first connection on the loop, and
/// the end of their grace there).
#[derive(Debug, Default)]
pub struct LoopsPresence {
    present: Mutex<HashMap<String, usize>>,
}

impl LoopsPresence {
    fn present(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // Every step below leaves the counts whole, so a panicked holder left them usable.
        self.present
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn arrived(&self, username: &str) {
        *self.present().entry(username.to_string()).or_default() += 1;
    }

    fn departed(&self, username: &str) {
        let mut present = self.present();
        if let Some(loops) = present.get_mut(username) {
            *loops -= 1;
            if *loops == 0 {
                present.remove(username);
            }
        }
    }

    fn contains(&self, username: &str) -> bool {
        self.present().contains_key(username)
    }
}

impl Presence {
    /// Presence of a loop sharing `loops` with its process's other loops.
    pub(super) fn shared(loops: Arc<LoopsPresence>) -> Presence {
        Presence {
            loops,
            ..Presence::default()
        }
    }

    pub(super) fn online_count(&self) -> usize {
        self.online.len()
    }
}

impl Server {
    /// Online anywhere: a connection here (or in its grace), on another loop, or in a fresh
    /// peer snapshot.
    fn is_online(&self, username: &str) -> bool {
        self.presence.loops.contains(username) || self.online_here_or_on_peers(username)
    }

    /// Online here (or in the grace), or in a fresh peer snapshot; not the loops' table.
    fn online_here_or_on_peers(&self, username: &str) -> bool {
        self.users.contains_key(username)
            || self.presence.leaving.contains_key(username)
            || self
                .presence
                .remote
                .values()
                .any(|(users, _)| users.contains(username))
    }

    /// Members of a group online now (for `enter_group`'s `online`).
    pub(super) fn online_members(&self, members: Vec<String>) -> Vec<String> {
        // One lock on the loops' table for the whole list.
        let on_loops = self.presence.loops.present();
        members
            .into_iter()
            .filter(|member| on_loops.contains_key(member) || self.online_here_or_on_peers(member))
            .collect()
    }

    /// A user's first connection here logged in.
    pub(super) fn user_came(&mut self, username: &str) {
        if self.presence.leaving.remove(username).is_none() {
            self.presence.loops.arrived(username);
        }
        self.presence_check(username);
        self.presence.changed = true;
    }

    /// A user's last connection here closed: offline after the grace, unless they come back.
    pub(super) fn user_went(&mut self, username: &str) {
        self.presence
            .leaving
            .insert(username.to_string(), Instant::now() + PRESENCE_GRACE);
    }

    /// Another instance's snapshot: users that appeared or vanished there are checked.
    pub(super) fn presence_snapshot(&mut self, snapshot: PresenceSnapshot) {
        let users: HashSet<String> = snapshot.users.into_iter().collect();
        let old = self
            .presence
            .remote
            .insert(snapshot.node, (users.clone(), Instant::now()))
            .map(|(old, _)| old)
            .unwrap_or_default();
        let changed: Vec<String> = users.symmetric_difference(&old).cloned().collect();
        for username in changed {
            self.presence_check(&username);
        }
    }

    /// Graces that ended, peers that went silent, and this instance's periodic snapshot
    /// (from the sweep).
    pub(super) fn presence_sweep(&mut self, now: Instant) {
        let ended: Vec<String> = self
            .presence
            .leaving
            .iter()
            .filter(|(_, due)| **due <= now)
            .map(|(user, _)| user.clone())
            .collect();
        for username in &ended {
            self.presence.leaving.remove(username);
            self.presence.loops.departed(username);
            self.presence_check(username);
        }
        let gone: Vec<String> = self
            .presence
            .remote
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > SNAPSHOT_EXPIRY)
            .map(|(node, _)| node.clone())
            .collect();
        for node in gone {
            if let Some((users, _)) = self.presence.remote.remove(&node) {
                log::info!("presence: no snapshot from {node}; its users are offline here");
                for username in users {
                    self.presence_check(&username);
                }
            }
        }
        let due = self
            .presence
            .last_snapshot
            .is_none_or(|at| now.duration_since(at) >= SNAPSHOT_EVERY);
        if due || self.presence.changed || !ended.is_empty() {
            self.send_snapshot();
        }
    }

    fn send_snapshot(&mut self) {
        let Some(peer) = &self.peer else {
            return;
        };
        self.presence.last_snapshot = Some(Instant::now());
        self.presence.changed = false;
        let users: Vec<String> = self
            .users
            .keys()
            .chain(self.presence.leaving.keys())
            .cloned()
            .collect();
        peer.publish_presence(PresenceSnapshot {
            node: self.config.node_id.clone(),
            users,
        });
    }

    /// Tells the user's rooms here if their state changed (after reading their groups).
    fn presence_check(&mut self, username: &str) {
        let online = self.is_online(username);
        if online == self.presence.online.contains(username) {
            return;
        }
        if online {
            self.presence.online.insert(username.to_string());
        } else {
            self.presence.online.remove(username);
        }
        self.metrics.presence_events += 1;
        // Nobody here speaks protocol 3: nobody to tell, no store read.
        if self.watching.is_empty() {
            return;
        }
        let work = crate::ops::work(super::activity::Memberships {
            username: username.to_string(),
            purpose: super::activity::MembershipsFor::Presence { online },
        });
        if let Some(pool) = self.pool.as_mut() {
            pool.submit(Requester::Server, work);
        }
    }

    /// `presence` to the protocol-3 connections in the rooms here of these groups.
    pub(super) fn presence_to_rooms(&mut self, username: &str, online: bool, groups: Vec<String>) {
        for group in groups {
            let line = crate::protocol::reply::encode_line(
                "presence",
                &serde_json::json!({"group_name": group, "username": username, "online": online}),
                None,
            );
            self.tell_room(&group, &line, username);
        }
    }
}
