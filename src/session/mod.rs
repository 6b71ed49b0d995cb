//! A connection's session: the state the request events read (who is logged in, the room,
//! the protocol, the resume in progress) and what their completions change (`Effect`, carried
//! by a `Completed` request). What one request line becomes is `ops::dispatch`; the event loop
//! applies the effects.

pub mod frontier;

use crate::auth::Authenticator;
use crate::model::{Message, ReadMark};
use frontier::ReadFrontier;

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

/// A user's read marker in a group and what lies after it (`read_marker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    pub username: String,
    pub group_name: String,
    pub last_read_seq: u64,
    pub unread_count: u64,
    /// Mentions of the user after the marker, when known (always when the marker reached the
    /// newest message: then 0).
    pub mention_count: Option<u64>,
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
    /// A session logged in as `name`, for tests of what a session plans and receives.
    #[cfg(test)]
    pub fn logged_in(name: &str) -> Session {
        Session {
            username: Some(name.into()),
            ..Session::default()
        }
    }

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
    /// The user's read marker rose: their other devices hear `read_marker` (devices in sync).
    ReadMarker(ReadState),
    /// The user joined a group: their other devices hear `joined_group`, and their
    /// connections here hear of the group's activity from now on.
    JoinedGroup {
        username: String,
        group_name: String,
    },
    /// The reply (an `enter_group`, plain or the head of a resume) gains `online`: those of
    /// these members who are online (protocol 3); then the effect inside is applied.
    Online(Box<Effect>, Vec<String>),
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
    /// What only one live feature understands (`typing`, a feature's own store read): the
    /// loop hands it to that feature.
    Live(LiveEffect),
}

/// An effect for one live feature (`live/`): the feature's name and a value of its own type,
/// which the loop passes on without knowing it (so a feature adds no variant here).
#[derive(Clone)]
pub struct LiveEffect {
    pub feature: &'static str,
    body: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

impl LiveEffect {
    pub fn new<T: std::any::Any + Send + Sync>(feature: &'static str, body: T) -> LiveEffect {
        LiveEffect {
            feature,
            body: std::sync::Arc::new(body),
        }
    }

    /// The value, when it is a `T`.
    pub fn take<T: std::any::Any + Send + Sync + Clone>(self) -> Option<T> {
        let body = self.body.downcast::<T>().ok()?;
        Some(std::sync::Arc::try_unwrap(body).unwrap_or_else(|shared| (*shared).clone()))
    }
}

impl PartialEq for LiveEffect {
    fn eq(&self, other: &LiveEffect) -> bool {
        self.feature == other.feature && std::sync::Arc::ptr_eq(&self.body, &other.body)
    }
}

impl Eq for LiveEffect {}

impl std::fmt::Debug for LiveEffect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveEffect({})", self.feature)
    }
}

/// Whether a stored message goes live to a connection in this session.
pub fn receives(session: &Session, message: &Message) -> bool {
    matches!(&session.room, Some(room) if room.group_name == message.group_name && message.seq > room.floor_seq)
}

/// A finished request, ready for its connection: the reply line, what it changes, and the
/// group messages the line carries.
#[derive(Debug)]
pub struct Completed {
    pub line: Vec<u8>,
    pub effect: Effect,
    /// The group messages the line carries: (group, first seq, last seq), contiguous.
    pub shows: Option<(String, u64, u64)>,
}

impl Completed {
    /// A reply that changes nothing else.
    pub fn reply(line: Vec<u8>) -> Completed {
        Completed {
            line,
            effect: Effect::None,
            shows: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasts_skip_messages_already_in_history() {
        let mut session = Session::logged_in("alice");
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
