//! Per-connection request handling: what one framed request line becomes (an immediate reply or
//! a store job), and the session state the events read and their completions change (`Effect`).
//!
//! Pure functions over the session state; the event loop applies the effects. Each event's own
//! rules are in its module under `ops/`.

use crate::auth::Authenticator;
use crate::framing::Frame;
use crate::model::{Message, ReadMark};
use crate::ops::{Context, Planned};
use crate::protocol::{
    decode_envelope, encode_failure, Envelope, ErrorCode, Failure, ProtocolError, RequestId,
};
use crate::read_marker::ReadFrontier;
use crate::workers::Work;

/// The room a connection is in, and the newest `seq` it already has from history: live
/// broadcasts at or below it are not sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub group_name: String,
    pub floor_seq: u64,
    /// What of this room the client has really been sent (for the implicit read mark).
    pub frontier: ReadFrontier,
    /// Entering raised the user's read marker (the user's other devices hear of it).
    pub marker_rose: bool,
}

impl Room {
    pub fn new(group_name: String, floor_seq: u64, read_seq: u64) -> Room {
        Room {
            group_name,
            floor_seq,
            frontier: ReadFrontier::new(read_seq),
            marker_rose: false,
        }
    }
}

/// What of the running configuration shapes replies and store requests.
#[derive(Debug, Clone)]
pub struct Rules {
    /// No reply line may be longer (`MAX_REPLY_BYTES`).
    pub max_reply_bytes: usize,
    /// Groups one user may create (`MAX_GROUPS_PER_USER`, 0: no limit).
    pub max_groups_per_user: usize,
    /// The `hello` reply's data, built once (for plain and for TLS connections).
    pub hello: std::rc::Rc<serde_json::Value>,
    pub hello_tls: std::rc::Rc<serde_json::Value>,
    /// Checks `find_user` tokens when authentication is on.
    pub auth: Option<std::rc::Rc<Authenticator>>,
    /// Most backlog messages a `since_seq` resume streams (`RESUME_MAX_MESSAGES`).
    pub resume_max_messages: u64,
}

/// Bytes of a history reply that are not messages: the event name, `group_name`, flags and the
/// request `id` are added to this.
const REPLY_OVERHEAD: usize = 512;

/// A user's read marker in a group and what lies after it (`read_marker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    pub username: String,
    pub group_name: String,
    pub last_read_seq: u64,
    pub unread_count: u64,
}

/// What a connection is logged in as and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub username: Option<String>,
    pub room: Option<Room>,
    /// The connection came in over TLS.
    pub tls: bool,
    /// The protocol version it speaks: 2 until `hello {protocol: 3}`.
    pub protocol: u8,
    /// A `since_seq` resume still streaming its backlog (see `ops/resume.rs`).
    pub resume: Option<ResumeCursor>,
    /// What reached the client marks read by itself (leaving a room, closing, entering);
    /// off after `hello {implicit_read: false}`: only `mark_read` moves the marker.
    pub implicit_read: bool,
    /// Whether the connection makes its user online (protocol 3's presence); off after
    /// `hello {presence: false}`, sent before logging in (a one-shot command, a bot).
    pub presence: bool,
}

impl Default for Session {
    fn default() -> Session {
        Session {
            username: None,
            room: None,
            tls: false,
            protocol: 2,
            resume: None,
            implicit_read: true,
            presence: true,
        }
    }
}

/// What a `hello` asked to change on its connection (`None`: left as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    pub protocol: Option<u8>,
    pub implicit_read: Option<bool>,
    pub presence: Option<bool>,
}

/// Where a gapless resume stands: the backlog of `group_name` has been sent up to
/// `after_seq`; the next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeCursor {
    pub group_name: String,
    pub after_seq: u64,
    /// The backlog is read up to the head: the next page is the hand-over, ordered with the
    /// group's messages (see `ops/resume.rs`).
    pub handover: bool,
    /// The group's epoch when the stream started: a page of another epoch ends it.
    pub epoch: String,
}

impl Session {
    pub fn room_name(&self) -> Option<&str> {
        self.room.as_ref().map(|room| room.group_name.as_str())
    }

    /// The read mark leaving the current room implies: up to what the client was really sent,
    /// and only when that is beyond what the store already has.
    pub fn leaving_mark(&self) -> Option<ReadMark> {
        if !self.implicit_read {
            return None;
        }
        let (username, room) = (self.username.as_ref()?, self.room.as_ref()?);
        room.frontier.mark_due().map(|seq| ReadMark {
            username: username.clone(),
            group_name: room.group_name.clone(),
            seq,
        })
    }
}

/// What to do with one request line.
#[derive(Debug)]
pub enum Plan {
    /// Answer now with this line.
    Reply(Vec<u8>),
    /// Answer now with this line, and change the session so.
    ReplyAnd(Vec<u8>, Effect),
    /// Run this store job; its completion produces the reply.
    Store { work: Work, id: Option<RequestId> },
    /// A `find_user` that failed authentication: answer with this line, and count it (the
    /// connection is closed after `MAX_AUTH_FAILURES`).
    Refused(Vec<u8>),
}

/// Failed `find_user` authentications after which the connection is closed (`auth_failed`).
pub const MAX_AUTH_FAILURES: u32 = 3;

/// How a finished job changes the connection's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    Bind(String),
    EnterRoom(Room),
    /// The user left the group: every connection of this user in that room leaves it.
    LeftGroup {
        username: String,
        group_name: String,
    },
    /// `hello` changed the connection's settings (protocol version, implicit read marks).
    Settings(Settings),
    /// A resume streams its backlog: out of the current room, the next page after this.
    Resume(ResumeCursor),
    /// A resume reached the head: the connection enters the room (as `EnterRoom`).
    Resumed(Room),
    /// The user is typing in the group's room (relayed to the others, rate-limited).
    Typing {
        username: String,
        group_name: String,
    },
    /// The user's read marker rose: their other devices hear `read_marker` (devices in sync).
    ReadMarker(ReadState),
    /// The user joined a group: their other devices hear `joined_group`, and their
    /// connections here hear of the group's activity from now on.
    JoinedGroup {
        username: String,
        group_name: String,
    },
    /// The connection's memberships, loaded for activity notices.
    Watch(Vec<crate::model::GroupReadState>),
    /// The reply (an `enter_group`, plain or the head of a resume) gains `online`: those of
    /// these members who are online (protocol 3); then the effect inside is applied.
    Online(Box<Effect>, Vec<String>),
    /// A user came online or went offline: tell the rooms here of these groups.
    Presence {
        username: String,
        online: bool,
        groups: Vec<String>,
    },
    /// A line for everyone in the group's room, on every instance (an edit, a delete, a role
    /// change), but the connection that asked (it has the reply).
    RoomLine {
        group_name: String,
        line: Vec<u8>,
    },
    /// A moderator removed or banned `username` (`reason`): every connection of that user
    /// leaves the room on every instance and hears `left_group {reason}`; the room hears
    /// `line` (`member_removed`).
    Removed {
        username: String,
        group_name: String,
        reason: &'static str,
        line: Vec<u8>,
    },
    /// The group was deleted: its room hears `line` (`group_deleted`) and empties, on every
    /// instance.
    GroupDeleted {
        group_name: String,
        line: Vec<u8>,
    },
    /// Users erased (from the store's erasure log, with when): their connections here close.
    Erased(Vec<(String, u64)>),
}

/// Plans one framed request: decode the envelope, check the session, then hand the data to
/// the event's module (`ops::EVENTS`) to validate and plan.
pub fn plan(session: &Session, frame: Frame, rules: &Rules) -> Plan {
    let line = match frame {
        Frame::Line(line) => line,
        Frame::TooLong => {
            let error = ProtocolError::new(ErrorCode::LineTooLong, "Request line is too long.");
            return Plan::Reply(encode_failure(&error.into(), None));
        }
    };
    let envelope = match decode_envelope(&line) {
        Ok(envelope) => envelope,
        Err(rejected) => {
            return Plan::Reply(encode_failure(
                &rejected.error.into(),
                rejected.id.as_deref(),
            ))
        }
    };
    let Envelope {
        event,
        mut data,
        id,
    } = envelope;
    // A history reply must fit `max_reply_bytes` with the id echoed in it.
    let reply_budget = rules
        .max_reply_bytes
        .saturating_sub(REPLY_OVERHEAD + id.as_ref().map_or(0, |id| id.get().len()));
    let planned = if session.username.is_none() && !event.before_login {
        Err(ProtocolError::new(ErrorCode::NotLoggedIn, "Log in with find_user first.").into())
    } else {
        // Protocol v2: after find_user, `username` may be left out and means the bound user.
        if let Some(bound) = &session.username {
            if event.names_user && !data.contains_key("username") {
                data.insert("username".into(), serde_json::Value::String(bound.clone()));
            }
        }
        let context = Context {
            session,
            rules,
            id: id.as_deref(),
            reply_budget,
        };
        event.plan(&data, &context)
    };
    match planned {
        Ok(Planned::Now(line)) => Plan::Reply(line),
        Ok(Planned::NowAnd(line, effect)) => Plan::ReplyAnd(line, effect),
        Ok(Planned::Store(work)) => Plan::Store { work, id },
        Err(
            failure @ Failure::Protocol(ProtocolError {
                code: ErrorCode::Unauthorized,
                ..
            }),
        ) => Plan::Refused(encode_failure(&failure, id.as_deref())),
        Err(failure) => Plan::Reply(encode_failure(&failure, id.as_deref())),
    }
}

/// Whether a stored message goes live to a connection in this session.
pub fn receives(session: &Session, message: &Message) -> bool {
    matches!(&session.room, Some(room) if room.group_name == message.group_name && message.seq > room.floor_seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_line(session: &Session, line: &str) -> Plan {
        let rules = Rules {
            max_reply_bytes: 1 << 20,
            max_groups_per_user: 0,
            hello: std::rc::Rc::new(serde_json::json!({"server": "noomnim"})),
            hello_tls: std::rc::Rc::new(serde_json::json!({"server": "noomnim", "tls": true})),
            auth: None,
            resume_max_messages: 10_000,
        };
        plan(session, Frame::Line(line.as_bytes().to_vec()), &rules)
    }

    fn reply_json(plan: Plan) -> serde_json::Value {
        match plan {
            Plan::Reply(bytes) | Plan::Refused(bytes) | Plan::ReplyAnd(bytes, _) => {
                serde_json::from_slice(&bytes).expect("reply is json")
            }
            Plan::Store { work, .. } => panic!("expected an immediate reply, got job {work:?}"),
        }
    }

    fn logged_in(name: &str) -> Session {
        Session {
            username: Some(name.into()),
            ..Session::default()
        }
    }

    #[test]
    fn events_before_login_are_refused_but_ping_works() {
        let session = Session::default();
        let reply = reply_json(plan_line(&session, r#"{"event":"list_groups","id":1}"#));
        assert_eq!(reply["data"]["code"], "not_logged_in");
        assert_eq!(reply["id"], 1);
        let reply = reply_json(plan_line(&session, r#"{"event":"ping"}"#));
        assert_eq!(reply["event"], "pong");
    }

    #[test]
    fn fields_are_validated_by_the_event() {
        let alice = logged_in("alice");
        for line in [
            r#"{"event":"fetch_messages","data":{"group_name":"g","limit":0}}"#,
            r#"{"event":"create_group","data":{"group_name":"g\u200d"}}"#,
            r#"{"event":"send_message","data":{"group_name":"g"}}"#,
            r#"{"event":"mark_read","data":{"group_name":"g","seq":-1}}"#,
        ] {
            let reply = reply_json(plan_line(&alice, line));
            assert_eq!(reply["data"]["code"], "bad_request", "{line}");
        }
        let line = r#"{"event":"send_message","data":{"group_name":"g","text":"hi"}}"#;
        assert!(matches!(
            plan_line(&alice, line),
            Plan::Store {
                work: Work::Append(_),
                ..
            }
        ));
    }

    #[test]
    fn acting_for_someone_else_is_forbidden() {
        let line = r#"{"event":"join_group","data":{"username":"mallory","group_name":"g"}}"#;
        let reply = reply_json(plan_line(&logged_in("alice"), line));
        assert_eq!(reply["data"]["code"], "forbidden");
    }

    #[test]
    fn visiting_the_current_room_is_already_in_the_group() {
        let mut session = logged_in("alice");
        session.room = Some(Room::new("g".into(), 0, 0));
        let line = r#"{"event":"visit_group","data":{"username":"alice","group_name":"g"}}"#;
        let reply = reply_json(plan_line(&session, line));
        assert_eq!(reply["event"], "already_in_the_group");
        assert_eq!(
            reply["data"]["Error"],
            "User is already in selected chatroom."
        );
    }

    #[test]
    fn broadcasts_skip_messages_already_in_history() {
        let mut session = logged_in("alice");
        session.room = Some(Room::new("g".into(), 5, 5));
        let mut message = Message {
            id: String::new(),
            group_name: "g".into(),
            username: "bob".into(),
            text: "x".into(),
            timestamp: String::new(),
            seq: 5,
            client_msg_id: None,
            ..Message::default()
        };
        assert!(!receives(&session, &message));
        message.seq = 6;
        assert!(receives(&session, &message));
        message.group_name = "other".into();
        assert!(!receives(&session, &message));
    }
}
