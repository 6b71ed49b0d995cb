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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::Token;
use serde::{Deserialize, Serialize};

use super::{Cx, LiveFeature, Memberships, MembershipsOf};
use crate::metrics::Gauges;
use crate::peer::Reach;
use crate::session::{LiveEffect, Session};

/// The feature's name, and its relay note's kind.
const PRESENCE: &str = "presence";

/// Who is logged in on one instance (its whole list, sent every few seconds and on change):
/// this feature's relay note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceSnapshot {
    pub node: String,
    pub users: Vec<String>,
}

/// How long a user whose last connection closed still counts as online.
const PRESENCE_GRACE: Duration = Duration::from_secs(3);
/// How often an instance sends its snapshot of logged-in users.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(2);
/// A peer's snapshot this old is taken as the peer gone.
const SNAPSHOT_EXPIRY: Duration = Duration::from_secs(6);

/// Presence state of this instance.
#[derive(Debug, Default)]
pub struct Presence {
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
    /// This instance's node id (its snapshots name it).
    node_id: String,
    /// Logged-in protocol-3 connections here: with none, nobody here is told of presence.
    listeners: HashSet<Token>,
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
    /// Other instances' logged-in users, from their latest snapshots (for `push::Online`).
    remote: HashMap<String, (HashSet<String>, Instant)>,
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
                remote: HashMap::new(),
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

    /// Another instance's latest snapshot (any loop that receives it records it).
    fn remote_snapshot(&self, node: &str, users: &HashSet<String>) {
        let mut shared = self.shared();
        shared
            .remote
            .retain(|_, (_, at)| at.elapsed() <= SNAPSHOT_EXPIRY);
        shared
            .remote
            .insert(node.to_string(), (users.clone(), Instant::now()));
    }
}

/// The push worker's question: online on this process (logged in, or in the grace) or in a
/// fresh snapshot of another instance.
impl crate::push::Online for LoopsPresence {
    fn is_online(&self, username: &str) -> bool {
        let shared = self.shared();
        shared.present.contains_key(username)
            || shared
                .remote
                .values()
                .any(|(users, at)| at.elapsed() <= SNAPSHOT_EXPIRY && users.contains(username))
    }
}

impl Presence {
    /// Presence of a loop sharing `loops` with its process's other loops.
    pub fn shared(loops: Arc<LoopsPresence>, loop_index: usize, node_id: String) -> Presence {
        Presence {
            loops,
            loop_index,
            node_id,
            ..Presence::default()
        }
    }

    /// Online anywhere: a connection here (or in its grace), on another loop, or in a fresh
    /// peer snapshot.
    fn is_online(&self, username: &str) -> bool {
        self.loops.contains(username) || self.online_here_or_on_peers(username)
    }

    /// Online here (or in the grace), or in a fresh peer snapshot; not the loops' table.
    fn online_here_or_on_peers(&self, username: &str) -> bool {
        self.here.contains_key(username)
            || self.leaving.contains_key(username)
            || self
                .remote
                .values()
                .any(|(users, _)| users.contains(username))
    }

    /// A connection of `username` that counts for presence logged in here.
    fn user_came(&mut self, cx: &mut Cx<'_>, username: &str) {
        let connections = self.here.entry(username.to_string()).or_default();
        *connections += 1;
        if *connections > 1 {
            return;
        }
        if self.leaving.remove(username).is_none() {
            self.loops.arrived(username, self.loop_index);
        }
        self.check(cx, username);
        self.changed = true;
    }

    /// A connection of `username` that counted for presence closed; after their last one here
    /// they are offline once the grace ends, unless they come back.
    fn user_went(&mut self, username: &str) {
        let Some(connections) = self.here.get_mut(username) else {
            return;
        };
        *connections -= 1;
        if *connections > 0 {
            return;
        }
        self.here.remove(username);
        self.leaving
            .insert(username.to_string(), Instant::now() + PRESENCE_GRACE);
    }

    /// Another instance's snapshot: users that appeared or vanished there are checked.
    fn snapshot_came(&mut self, cx: &mut Cx<'_>, snapshot: PresenceSnapshot) {
        let users: HashSet<String> = snapshot.users.into_iter().collect();
        self.loops.remote_snapshot(&snapshot.node, &users);
        let old = self
            .remote
            .insert(snapshot.node, (users.clone(), Instant::now()))
            .map(|(old, _)| old)
            .unwrap_or_default();
        let changed: Vec<String> = users.symmetric_difference(&old).cloned().collect();
        for username in changed {
            self.check(cx, &username);
        }
    }

    fn send_snapshot(&mut self, cx: &mut Cx<'_>) {
        if !cx.peers {
            return;
        }
        self.last_snapshot = Some(Instant::now());
        self.changed = false;
        let users: Vec<String> = self
            .here
            .keys()
            .chain(self.leaving.keys())
            .cloned()
            .collect();
        let snapshot = PresenceSnapshot {
            node: self.node_id.clone(),
            users,
        };
        if let Ok(body) = serde_json::to_value(snapshot) {
            cx.relay(PRESENCE, Reach::Everyone, body);
        }
    }

    /// Tells the user's rooms here if their state changed (after reading their groups).
    fn check(&mut self, cx: &mut Cx<'_>, username: &str) {
        let online = self.is_online(username);
        if online == self.online.contains(username) {
            return;
        }
        if online {
            self.online.insert(username.to_string());
        } else {
            self.online.remove(username);
        }
        cx.metrics.presence_events += 1;
        // Nobody here speaks protocol 3: nobody to tell, no store read.
        if self.listeners.is_empty() {
            return;
        }
        let read = Memberships {
            username: username.to_string(),
            feature: PRESENCE,
            context: online,
        };
        cx.read(None, crate::ops::work(read));
    }

    /// Whether a connection hears presence (logged in, protocol 3).
    fn listens(&mut self, cx: &Cx<'_>, token: Token) {
        let listens = cx
            .view
            .session(token)
            .is_some_and(|s| s.username.is_some() && s.protocol >= 3);
        if listens {
            self.listeners.insert(token);
        } else {
            self.listeners.remove(&token);
        }
    }
}

impl LiveFeature for Presence {
    fn name(&self) -> &'static str {
        PRESENCE
    }

    fn logged_in(&mut self, cx: &mut Cx<'_>, token: Token, username: &str) {
        self.listens(cx, token);
        if cx.view.session(token).is_none_or(|s| s.presence) {
            self.user_came(cx, username);
        }
    }

    fn settings_changed(&mut self, cx: &mut Cx<'_>, token: Token) {
        self.listens(cx, token);
    }

    fn closed(&mut self, _: &mut Cx<'_>, token: Token, session: &Session) {
        self.listeners.remove(&token);
        if let (Some(username), true) = (&session.username, session.presence) {
            self.user_went(username);
        }
    }

    /// The user's groups were read: `presence` to the protocol-3 connections in their rooms here.
    fn effect(&mut self, cx: &mut Cx<'_>, _: Option<Token>, effect: LiveEffect) {
        let Some(read) = effect.take::<MembershipsOf<bool>>() else {
            return;
        };
        for group in read.groups {
            let line = super::notice(
                "presence",
                serde_json::json!({
                    "group_name": group.group_name,
                    "username": read.username,
                    "online": read.context,
                }),
            );
            cx.tell_room(&group.group_name, &line, &read.username);
        }
    }

    fn relayed(&mut self, cx: &mut Cx<'_>, kind: &str, body: &serde_json::Value) {
        if kind != PRESENCE {
            return;
        }
        match PresenceSnapshot::deserialize(body) {
            Ok(snapshot) => self.snapshot_came(cx, snapshot),
            Err(error) => log::warn!("ignoring a malformed presence snapshot: {error}"),
        }
    }

    /// Graces that ended, peers that went silent, and this instance's periodic snapshot.
    fn sweep(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        let ended: Vec<String> = self
            .leaving
            .iter()
            .filter(|(_, due)| **due <= now)
            .map(|(user, _)| user.clone())
            .collect();
        for username in &ended {
            self.leaving.remove(username);
            self.loops.departed(username, self.loop_index);
            self.check(cx, username);
        }
        let gone: Vec<String> = self
            .remote
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > SNAPSHOT_EXPIRY)
            .map(|(node, _)| node.clone())
            .collect();
        for node in gone {
            if let Some((users, _)) = self.remote.remove(&node) {
                log::info!("presence: no snapshot from {node}; its users are offline here");
                for username in users {
                    self.check(cx, &username);
                }
            }
        }
        let due = self
            .last_snapshot
            .is_none_or(|at| now.duration_since(at) >= SNAPSHOT_EVERY);
        if due || self.changed || !ended.is_empty() {
            self.send_snapshot(cx);
        }
    }

    /// Users who came to or left the process on another loop are checked here (their rooms on
    /// this loop hear `presence`).
    fn end_turn(&mut self, cx: &mut Cx<'_>) {
        for username in self.loops.take_inbox(self.loop_index) {
            self.check(cx, &username);
        }
    }

    /// Members of a group online now (for `enter_group`'s `online`).
    fn online_members(&self, members: &[String]) -> Option<Vec<String>> {
        // One lock on the loops' table for the whole list.
        let shared = self.loops.shared();
        let online = members
            .iter()
            .filter(|member| {
                shared.present.contains_key(member.as_str()) || self.online_here_or_on_peers(member)
            })
            .cloned()
            .collect();
        Some(online)
    }

    fn report(&self, gauges: &mut Gauges) {
        gauges.presence_online = self.online.len();
    }
}
