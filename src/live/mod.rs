//! Live features: what the server pushes to clients without being asked (presence, activity
//! in every group, a user's devices in sync, typing). Each is a type of its own in a file of
//! its own, owning its state, and reacts to a few named moments of the event loop, the hooks
//! of `LiveFeature`: a user logged in or closed, joined or left a group, a read marker rose, a
//! message was seen, one of its own effects or relay notes arrived, the once-a-second sweep,
//! the end of a turn. A feature sees the loop's connections and rooms through `LoopView` and
//! answers with what to do in an `Outbox` (lines to send, notes to relay, channels to watch,
//! store reads to start), which the loop carries out. So the loop holds sockets, connections
//! and the list `registered()`, and knows no feature; a feature knows no socket.
//!
//! Adding one: a file here with a type implementing `LiveFeature` (its relay notes and
//! effects declared in that file), and one line in `registered()`. See docs/ARCHITECTURE.md.

use std::time::Instant;

use mio::Token;
use serde_json::value::RawValue;

use crate::metrics::{Gauges, Metrics};
use crate::model::{GroupReadState, GroupsQuery};
use crate::ops::{Completed, Route, StoreCall};
use crate::peer::{Departure, FeatureNote, Reach};
use crate::session::{Effect, LiveEffect, ReadState, Session};
use crate::store::{Store, StoreError};
use crate::workers::Work;

pub mod activity;
pub mod attention;
pub mod devices;
pub mod presence;
pub mod typing;

/// What the loop is configured with that features need.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `ACTIVITY_INTERVAL_MS`.
    pub activity_interval: std::time::Duration,
    /// This instance's node id (presence snapshots name it).
    pub node_id: String,
}

/// Every live feature, in the order the loop calls them (a line two features send to one
/// connection at one moment goes out in this order). One line per feature.
pub fn registered(
    settings: &Settings,
    loops: std::sync::Arc<presence::LoopsPresence>,
    loop_index: usize,
) -> Vec<Box<dyn LiveFeature>> {
    vec![
        Box::new(activity::Activity::new(settings.activity_interval)),
        Box::new(devices::Devices),
        Box::new(typing::Typing::default()),
        Box::new(attention::Attention),
        Box::new(presence::Presence::shared(
            loops,
            loop_index,
            settings.node_id.clone(),
        )),
    ]
}

/// What a feature may read of the loop.
pub trait LoopView {
    /// A connection's session (`None` once it closed).
    fn session(&self, token: Token) -> Option<&Session>;
    /// The connections in a group's room here.
    fn room_members(&self, group_name: &str) -> Vec<Token>;
    /// A logged-in user's connections here.
    fn connections_of(&self, username: &str) -> &[Token];
}

/// Where a change came from: a request of a connection here, or another instance (or loop),
/// whose own features already told that side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Here(Token),
    Peer,
}

/// What a feature learned from a relay note that the other features should hear of as if it
/// happened here (a read marker or a join on another instance).
#[derive(Debug, Clone)]
pub enum Learned {
    MarkerRose(ReadState),
    Joined {
        username: String,
        group_name: String,
    },
    /// A message (`seq`) mentions the user (by name or `@room`).
    Mentioned {
        username: String,
        group_name: String,
        seq: u64,
    },
}

/// What the features ask the loop to do, collected during one hook call.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Lines for connections (counted toward each one's `MAX_OUTPUT_BYTES`).
    pub lines: Vec<(Token, Vec<u8>)>,
    /// Notes for the other instances (or loops).
    pub notes: Vec<FeatureNote>,
    /// Relay channels to start (`true`) or stop receiving, by watch key.
    pub watches: Vec<(String, bool)>,
    /// Store reads: for a connection (answered in its request order) or the server's own.
    pub reads: Vec<(Option<Token>, Work)>,
    /// What the other features should hear of (`Learned`).
    pub learned: Vec<Learned>,
}

/// A hook's view of the loop and where it puts what it wants done.
pub struct Cx<'a> {
    pub view: &'a dyn LoopView,
    /// Other instances (or loops) exist to relay to.
    pub peers: bool,
    pub now: Instant,
    pub metrics: &'a mut Metrics,
    out: &'a mut Outbox,
}

impl<'a> Cx<'a> {
    pub fn new(
        view: &'a dyn LoopView,
        out: &'a mut Outbox,
        peers: bool,
        metrics: &'a mut Metrics,
    ) -> Cx<'a> {
        Cx {
            view,
            peers,
            now: Instant::now(),
            metrics,
            out,
        }
    }

    /// A line for one connection.
    pub fn send(&mut self, token: Token, line: Vec<u8>) {
        self.out.lines.push((token, line));
    }

    /// `line` for the protocol-3 connections in a group's room here, but `about`'s own (a
    /// line about that user: typing, presence).
    pub fn tell_room(&mut self, group_name: &str, line: &[u8], about: &str) {
        for token in self.view.room_members(group_name) {
            let hears = self.view.session(token).is_some_and(|session| {
                session.protocol >= 3 && session.username.as_deref() != Some(about)
            });
            if hears {
                self.send(token, line.to_vec());
            }
        }
    }

    /// `line` for every protocol-3 connection of `username` here but `except`.
    pub fn tell_user(&mut self, username: &str, line: &[u8], except: Option<Token>) {
        let tokens = self.view.connections_of(username).to_vec();
        for token in tokens.into_iter().filter(|t| Some(*t) != except) {
            let on_protocol_3 = self
                .view
                .session(token)
                .is_some_and(|session| session.protocol >= 3);
            if on_protocol_3 {
                self.send(token, line.to_vec());
            }
        }
    }

    /// A note for the other instances (nothing without them).
    pub fn relay(&mut self, kind: &'static str, reach: Reach, body: serde_json::Value) {
        if self.peers {
            self.out.notes.push(FeatureNote { kind, reach, body });
        }
    }

    /// Starts or stops receiving a relay channel (a watch key: `peer::ACTIVITY_KEY` + group).
    pub fn watch(&mut self, key: String, on: bool) {
        if self.peers {
            self.out.watches.push((key, on));
        }
    }

    /// A store read whose answer comes back, as an effect, through the connection's requests
    /// in order (`None`: the server's own read).
    pub fn read(&mut self, token: Option<Token>, work: Work) {
        self.out.reads.push((token, work));
    }

    /// Tells the other features what a relay note said (`Learned`).
    pub fn learned(&mut self, learned: Learned) {
        self.out.learned.push(learned);
    }
}

/// A live feature: its state, and what it does at each moment of the loop. Every hook has a
/// default that does nothing, so a feature names only the moments it cares about.
pub trait LiveFeature {
    /// Its name: effects addressed to it (`LiveEffect::feature`) carry it.
    fn name(&self) -> &'static str;

    /// A connection logged in as `username` (its session says which protocol and settings).
    fn logged_in(&mut self, _cx: &mut Cx<'_>, _token: Token, _username: &str) {}

    /// A logged-in connection's `hello` changed its settings (protocol 2 and 3 back and forth).
    fn settings_changed(&mut self, _cx: &mut Cx<'_>, _token: Token) {}

    /// A logged-in connection closed (it is gone from the view already; `session` was its).
    fn closed(&mut self, _cx: &mut Cx<'_>, _token: Token, _session: &Session) {}

    /// A user joined a group.
    fn joined(&mut self, _cx: &mut Cx<'_>, _origin: Origin, _username: &str, _group_name: &str) {}

    /// A user is out of a group (left, removed or banned: `departure.reason`), here or on a
    /// peer (`Origin::Peer`).
    fn left(&mut self, _cx: &mut Cx<'_>, _origin: Origin, _departure: &Departure) {}

    /// A group was deleted; `line` is its `group_deleted`.
    fn group_deleted(&mut self, _cx: &mut Cx<'_>, _group_name: &str, _line: &[u8]) {}

    /// A user's read marker rose.
    fn marker_rose(&mut self, _cx: &mut Cx<'_>, _origin: Origin, _state: &ReadState) {}

    /// A message mentions a user (here or on a peer; told once per instance).
    fn mentioned(&mut self, _cx: &mut Cx<'_>, _username: &str, _group_name: &str, _seq: u64) {}

    /// A message of `group_name` with `seq` exists (stored here when `stored_here`). Called
    /// for every message: keep it cheap.
    fn message_seen(&mut self, _cx: &mut Cx<'_>, _group_name: &str, _seq: u64, _stored_here: bool) {
    }

    /// One of its own effects (a request's, or a store read it started), for a connection or
    /// (`None`) the server.
    fn effect(&mut self, _cx: &mut Cx<'_>, _token: Option<Token>, _effect: LiveEffect) {}

    /// A relay note from another instance or loop; `kind` is the note's kind (a feature
    /// ignores kinds that are not its own).
    fn relayed(&mut self, _cx: &mut Cx<'_>, _kind: &str, _body: &serde_json::Value) {}

    /// Once a second.
    fn sweep(&mut self, _cx: &mut Cx<'_>) {}

    /// Every turn of the loop, before connections are serviced.
    fn end_turn(&mut self, _cx: &mut Cx<'_>) {}

    /// When the loop must wake for it next (a trailing notice).
    fn wake_at(&self) -> Option<Instant> {
        None
    }

    /// Those of `members` online now, when this feature knows (presence).
    fn online_members(&self, _members: &[String]) -> Option<Vec<String>> {
        None
    }

    /// Its gauges for `/metrics`.
    fn report(&self, _gauges: &mut Gauges) {}
}

/// A user's memberships read for a feature (the first page, by name): answered as that
/// feature's effect, `MembershipsOf`, carrying `context` back.
#[derive(Debug)]
pub struct Memberships<T> {
    pub username: String,
    pub feature: &'static str,
    pub context: T,
}

/// What a `Memberships` read answers.
#[derive(Debug, Clone)]
pub struct MembershipsOf<T> {
    pub username: String,
    pub groups: Vec<GroupReadState>,
    pub context: T,
}

impl<T: Clone + Send + Sync + std::fmt::Debug + 'static> StoreCall for Memberships<T> {
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

    fn answer(self, groups: Vec<GroupReadState>, _: Option<&RawValue>) -> Completed {
        let read = MembershipsOf {
            username: self.username,
            groups,
            context: self.context,
        };
        // No line: the server's own read, answered with an effect only.
        Completed {
            line: Vec::new(),
            effect: Effect::Live(LiveEffect::new(self.feature, read)),
            shows: None,
        }
    }
}

/// A line the server sends unasked: `{"event": event, "data": data}` and a newline.
pub fn notice(event: &str, data: serde_json::Value) -> Vec<u8> {
    crate::protocol::reply::encode_line(event, &data, None)
}

/// A line as the connections get it, from a relay note's text (which has no newline).
pub fn line_of(text: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(text.len() + 1);
    line.extend_from_slice(text.as_bytes());
    line.push(b'\n');
    line
}

/// The features driven through their hooks over a view made of plain data: what each sends,
/// relays and reads, without sockets or a store.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::GroupReadState;

    #[derive(Default)]
    struct PlainView {
        sessions: HashMap<Token, Session>,
        rooms: HashMap<String, Vec<Token>>,
        users: HashMap<String, Vec<Token>>,
    }

    impl PlainView {
        /// A logged-in connection on `protocol`, in `room` when given.
        fn connect(&mut self, token: usize, username: &str, protocol: u8, room: Option<&str>) {
            let token = Token(token);
            let mut session = Session {
                username: Some(username.to_string()),
                protocol,
                ..Session::default()
            };
            if let Some(group_name) = room {
                session.room = Some(crate::session::Room::new(group_name.to_string(), 0, 0));
                self.rooms
                    .entry(group_name.to_string())
                    .or_default()
                    .push(token);
            }
            self.sessions.insert(token, session);
            self.users
                .entry(username.to_string())
                .or_default()
                .push(token);
        }
    }

    impl LoopView for PlainView {
        fn session(&self, token: Token) -> Option<&Session> {
            self.sessions.get(&token)
        }
        fn room_members(&self, group_name: &str) -> Vec<Token> {
            self.rooms.get(group_name).cloned().unwrap_or_default()
        }
        fn connections_of(&self, username: &str) -> &[Token] {
            self.users.get(username).map_or(&[], Vec::as_slice)
        }
    }

    /// Calls one hook and returns what the feature asked for.
    fn call(view: &PlainView, peers: bool, hook: impl FnOnce(&mut Cx<'_>)) -> Outbox {
        let mut out = Outbox::default();
        let mut metrics = Metrics::default();
        hook(&mut Cx::new(view, &mut out, peers, &mut metrics));
        out
    }

    fn events(out: &Outbox) -> Vec<(usize, String)> {
        out.lines
            .iter()
            .map(|(token, line)| (token.0, String::from_utf8_lossy(line).trim().to_string()))
            .collect()
    }

    #[test]
    fn typing_reaches_the_others_on_protocol_3_once_per_interval() {
        let mut view = PlainView::default();
        view.connect(1, "ann", 3, Some("g"));
        view.connect(2, "bob", 3, Some("g"));
        view.connect(3, "cy", 2, Some("g"));
        view.connect(4, "dee", 3, Some("other"));
        let mut typing = typing::Typing::default();
        let effect = || {
            let typing = crate::ops::typing::TypingIn {
                username: "ann".into(),
                group_name: "g".into(),
            };
            LiveEffect::new(crate::ops::typing::FEATURE, typing)
        };
        let out = call(&view, true, |cx| {
            typing.effect(cx, Some(Token(1)), effect())
        });
        assert_eq!(
            events(&out),
            vec![(
                2,
                r#"{"event":"typing","data":{"group_name":"g","username":"ann"}}"#.to_string()
            )]
        );
        assert_eq!(out.notes.len(), 1);
        assert_eq!(out.notes[0].reach, Reach::Room("g".into()));
        let again = call(&view, true, |cx| {
            typing.effect(cx, Some(Token(1)), effect())
        });
        assert!(again.lines.is_empty() && again.notes.is_empty());
        // From a peer: told here, never relayed back.
        let body = out.notes[0].body.clone();
        let relayed = call(&view, true, |cx| typing.relayed(cx, "typing", &body));
        assert_eq!(relayed.lines.len(), 1);
        assert!(relayed.notes.is_empty());
    }

    #[test]
    fn a_marker_from_another_instance_reaches_the_devices_and_the_other_features() {
        let mut view = PlainView::default();
        view.connect(1, "ann", 3, None);
        view.connect(2, "ann", 2, None);
        let mut devices = devices::Devices;
        let state = ReadState {
            username: "ann".into(),
            group_name: "g".into(),
            last_read_seq: 7,
            unread_count: 2,
            mention_count: Some(1),
        };
        let out = call(&view, true, |cx| {
            devices.marker_rose(cx, Origin::Here(Token(9)), &state)
        });
        assert_eq!(events(&out).len(), 1, "protocol 3 only");
        let body = out.notes[0].body.clone();
        let relayed = call(&view, true, |cx| devices.relayed(cx, "user", &body));
        assert_eq!(events(&relayed), events(&out));
        assert!(relayed.notes.is_empty());
        match relayed.learned.as_slice() {
            [Learned::MarkerRose(learned)] => assert_eq!(learned, &state),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn activity_counts_mentions_from_the_store_and_those_seen_since() {
        let mut view = PlainView::default();
        view.connect(1, "ann", 3, None);
        let mut activity = activity::Activity::new(std::time::Duration::ZERO);
        call(&view, false, |cx| activity.logged_in(cx, Token(1), "ann"));
        let attention = crate::model::Attention {
            mention_count: 2,
            ..crate::model::Attention::default()
        };
        let memberships = MembershipsOf {
            username: "ann".to_string(),
            groups: vec![
                GroupReadState::new("g".into(), "1".into(), 10, 8).with_attention(attention)
            ],
            context: (),
        };
        call(&view, false, |cx| {
            activity.effect(cx, Some(Token(1)), LiveEffect::new("activity", memberships))
        });
        let count = |out: &Outbox| -> Vec<serde_json::Value> {
            out.lines
                .iter()
                .map(|(_, line)| serde_json::from_slice::<serde_json::Value>(line).expect("json"))
                .map(|line| line["data"]["mention_count"].clone())
                .collect()
        };
        let out = call(&view, false, |cx| activity.message_seen(cx, "g", 11, true));
        assert_eq!(count(&out), vec![serde_json::json!(2)]);
        call(&view, false, |cx| activity.mentioned(cx, "ann", "g", 11));
        let trailing = call(&view, false, |cx| activity.end_turn(cx));
        assert_eq!(
            count(&trailing),
            vec![serde_json::json!(3)],
            "a trailing notice"
        );
        let read = ReadState {
            username: "ann".into(),
            group_name: "g".into(),
            last_read_seq: 11,
            unread_count: 0,
            mention_count: Some(0),
        };
        call(&view, false, |cx| {
            activity.marker_rose(cx, Origin::Here(Token(1)), &read)
        });
        let out = call(&view, false, |cx| activity.message_seen(cx, "g", 12, true));
        assert_eq!(count(&out), vec![serde_json::json!(0)]);
    }

    #[test]
    fn activity_counts_unread_and_coalesces_a_burst() {
        let mut view = PlainView::default();
        view.connect(1, "ann", 3, None);
        view.connect(2, "bob", 3, Some("g"));
        let mut activity = activity::Activity::new(std::time::Duration::from_secs(60));
        let out = call(&view, false, |cx| activity.logged_in(cx, Token(1), "ann"));
        assert_eq!(out.reads.len(), 1, "memberships are read");
        let memberships = MembershipsOf {
            username: "ann".to_string(),
            groups: vec![GroupReadState {
                group_name: "g".into(),
                group_id: "1".into(),
                last_seq: 10,
                last_read_seq: 8,
                unread_count: 2,
                role: crate::model::Role::Member,
                attention: None,
            }],
            context: (),
        };
        let effect = LiveEffect::new("activity", memberships);
        call(&view, false, |cx| {
            activity.effect(cx, Some(Token(1)), effect)
        });
        let out = call(&view, false, |cx| activity.message_seen(cx, "g", 11, true));
        assert_eq!(
            events(&out),
            vec![(
                1,
                r#"{"event":"group_activity","data":{"group_name":"g","last_seq":11,"unread_count":3}}"#
                    .to_string()
            )]
        );
        let burst = call(&view, false, |cx| activity.message_seen(cx, "g", 12, true));
        assert!(burst.lines.is_empty());
        assert!(activity.wake_at().is_some(), "a trailing notice is due");
    }
}
