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
use std::sync::atomic::AtomicBool;
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
    /// Users logged in here, with how many of their connections count for presence (all but
    /// those that said `hello {presence: false}`: a one-shot command is not someone online).
    here: HashMap<String, usize>,
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
    /// Who is present (logged in or in their grace) on the process's loops, and this loop's
    /// number among them.
    loops: Arc<LoopsPresence>,
    loop_index: usize,
}

/// Users present on this process's event loops, shared by the loops: for each user, on how
/// many loops; each loop changes only its own users' counts (a user's first connection on the
/// loop, and the end of their grace there). When a user comes to the process or leaves it,
/// every other loop gets the name in its inbox and is woken, and checks the user at the end of
/// its turn: the rooms on all loops hear `presence` as promptly as on one loop, and
/// `enter_group`'s `online` reads the table, so it is current on every loop at once.
/// (Snapshots still cross the loops for what they carry between instances.)
#[derive(Debug, Default)]
pub struct LoopsPresence {
    shared: Mutex<SharedPresence>,
    /// Per loop: whether its inbox has names (read every turn without taking the lock).
    mail: Vec<AtomicBool>,
    wakers: Arc<crate::loop_wakers::LoopWakers>,
}

#[derive(Debug, Default)]
struct SharedPresence {
    present: HashMap<String, usize>,
    /// Per loop: users whose presence in the process changed since the loop last looked.
    inboxes: Vec<Vec<String>>,
}

/// Names an inbox holds at most (a loop that stopped reading must not grow it forever; the
/// snapshots cover what is dropped).
const INBOX_CAP: usize = 100_000;

impl LoopsPresence {
    pub fn new(loops: usize, wakers: Arc<crate::loop_wakers::LoopWakers>) -> LoopsPresence {
        LoopsPresence {
            shared: Mutex::new(SharedPresence {
                present: HashMap::new(),
                inboxes: vec![Vec::new(); loops],
            }),
            mail: (0..loops).map(|_| AtomicBool::new(false)).collect(),
            wakers,
        }
    }

    fn shared(&self) -> MutexGuard<'_, SharedPresence> {
        // Every step below leaves the state whole, so a panicked holder left it usable.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn arrived(&self, username: &str, from: usize) {
        let mut shared = self.shared();
        let loops = shared.present.entry(username.to_string()).or_default();
        *loops += 1;
        if *loops == 1 {
            self.tell_others(&mut shared, username, from);
        }
    }

    fn departed(&self, username: &str, from: usize) {
        let mut shared = self.shared();
        let Some(loops) = shared.present.get_mut(username) else {
            return;
        };
        *loops -= 1;
        if *loops == 0 {
            shared.present.remove(username);
            self.tell_others(&mut shared, username, from);
        }
    }

    fn tell_others(&self, shared: &mut SharedPresence, username: &str, from: usize) {
        for (index, inbox) in shared.inboxes.iter_mut().enumerate() {
            if index == from || inbox.len() >= INBOX_CAP {
                continue;
            }
            inbox.push(username.to_string());
            if let Some(mail) = self.mail.get(index) {
                mail.store(true, Ordering::Release);
            }
            self.wakers.wake(index);
        }
    }

    /// Loop `index`'s inbox, emptied (nothing, without the lock, when it is empty).
    fn take_inbox(&self, index: usize) -> Vec<String> {
        match self.mail.get(index) {
            // Load first: a swap would write the shared flag every turn of every loop.
            Some(mail) if mail.load(Ordering::Acquire) && mail.swap(false, Ordering::AcqRel) => {
                self.shared()
                    .inboxes
                    .get_mut(index)
                    .map(std::mem::take)
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    fn contains(&self, username: &str) -> bool {
        self.shared().present.contains_key(username)
    }
}

impl Presence {
    /// Presence of a loop sharing `loops` with its process's other loops.
    pub(super) fn shared(loops: Arc<LoopsPresence>, loop_index: usize) -> Presence {
        Presence {
            loops,
            loop_index,
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
        self.presence.here.contains_key(username)
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
        let shared = self.presence.loops.shared();
        members
            .into_iter()
            .filter(|member| {
                shared.present.contains_key(member) || self.online_here_or_on_peers(member)
            })
            .collect()
    }

    /// End of a turn: users who came to or left the process on another loop are checked here
    /// (their rooms on this loop hear `presence`).
    pub(super) fn presence_from_loops(&mut self) {
        for username in self.presence.loops.take_inbox(self.presence.loop_index) {
            self.presence_check(&username);
        }
    }

    /// A connection of `username` that counts for presence logged in here.
    pub(super) fn user_came(&mut self, username: &str) {
        let connections = self.presence.here.entry(username.to_string()).or_default();
        *connections += 1;
        if *connections > 1 {
            return;
        }
        if self.presence.leaving.remove(username).is_none() {
            self.presence
                .loops
                .arrived(username, self.presence.loop_index);
        }
        self.presence_check(username);
        self.presence.changed = true;
    }

    /// A connection of `username` that counted for presence closed; after their last one here
    /// they are offline once the grace ends, unless they come back.
    pub(super) fn user_went(&mut self, username: &str) {
        let Some(connections) = self.presence.here.get_mut(username) else {
            return;
        };
        *connections -= 1;
        if *connections > 0 {
            return;
        }
        self.presence.here.remove(username);
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
            self.presence
                .loops
                .departed(username, self.presence.loop_index);
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
            .presence
            .here
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
        if self.activity.watching.is_empty() {
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
