//! Per-connection request handling: what one framed request line becomes (an immediate reply or
//! a store job), and what a finished store job becomes (a reply and its effect on the session).
//!
//! Pure functions over the session state; the event loop applies the effects.

use crate::auth::Authenticator;
use crate::framing::Frame;
use crate::model::{now_timestamp, Message, NewMessage, ReadMark};
use crate::protocol::{
    decode_envelope, encode_failure, encode_reply, ErrorCode, EventError, Failure, ProtocolError,
    Reply, Request, RequestId,
};
use crate::read_marker::ReadFrontier;
use crate::store::StoreError;
use crate::workers::{StoreOp, StoreOutput};

/// The room a connection is in, and the newest `seq` it already has from history: live
/// broadcasts at or below it are not sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub group_name: String,
    pub floor_seq: u64,
    /// What of this room the client has really been sent (for the implicit read mark).
    pub frontier: ReadFrontier,
}

impl Room {
    pub fn new(group_name: String, floor_seq: u64, read_seq: u64) -> Room {
        Room {
            group_name,
            floor_seq,
            frontier: ReadFrontier::new(read_seq),
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
}

/// Bytes of a history reply that are not messages: the event name, `group_name`, flags and the
/// request `id` are added to this.
const REPLY_OVERHEAD: usize = 512;

/// What a connection is logged in as and where it is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Session {
    pub username: Option<String>,
    pub room: Option<Room>,
    /// The connection came in over TLS.
    pub tls: bool,
}

impl Session {
    pub fn room_name(&self) -> Option<&str> {
        self.room.as_ref().map(|room| room.group_name.as_str())
    }

    /// The read mark leaving the current room implies: up to what the client was really sent,
    /// and only when that is beyond what the store already has.
    pub fn leaving_mark(&self) -> Option<ReadMark> {
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
    /// Run this store job; its completion produces the reply.
    Store { op: StoreOp, id: Option<RequestId> },
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
}

/// Plans one framed request.
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
    let id = envelope.id.clone();
    // A history reply must fit `max_reply_bytes` with the id echoed in it.
    let budget = rules
        .max_reply_bytes
        .saturating_sub(REPLY_OVERHEAD + id.as_ref().map_or(0, |id| id.get().len()));
    match check_and_plan(session, envelope, rules, budget) {
        Ok(Planned::Now(reply)) => Plan::Reply(encode_reply(&reply, id.as_deref())),
        Ok(Planned::Later(op)) => Plan::Store { op, id },
        Err(
            failure @ Failure::Protocol(ProtocolError {
                code: ErrorCode::Unauthorized,
                ..
            }),
        ) => Plan::Refused(encode_failure(&failure, id.as_deref())),
        Err(failure) => Plan::Reply(encode_failure(&failure, id.as_deref())),
    }
}

enum Planned {
    Now(Reply),
    Later(StoreOp),
}

fn check_and_plan(
    session: &Session,
    envelope: crate::protocol::Envelope,
    rules: &Rules,
    budget: usize,
) -> Result<Planned, Failure> {
    if session.username.is_none() && !envelope.kind.allowed_before_login() {
        return Err(
            ProtocolError::new(ErrorCode::NotLoggedIn, "Log in with find_user first.").into(),
        );
    }
    let mut envelope = envelope;
    // Protocol v2: after find_user, `username` may be left out and means the bound user.
    if let Some(bound) = &session.username {
        if !envelope.data.contains_key("username") && envelope.kind.names_user() {
            envelope
                .data
                .insert("username".into(), serde_json::Value::String(bound.clone()));
        }
    }
    let request = envelope.into_request()?;
    if let (Some(bound), Some(named)) = (&session.username, request.username()) {
        if bound != named {
            let text = "Username does not match the logged-in user.";
            return Err(ProtocolError::new(ErrorCode::Forbidden, text).into());
        }
    }
    Ok(match request {
        Request::Hello if session.tls => Planned::Now(Reply::Hello(rules.hello_tls.clone())),
        Request::Hello => Planned::Now(Reply::Hello(rules.hello.clone())),
        Request::MarkRead {
            username,
            group_name,
            seq,
        } => Planned::Later(StoreOp::MarkReadUpTo(ReadMark {
            username,
            group_name,
            seq,
        })),
        Request::MyGroups { username } => Planned::Later(StoreOp::MyGroups { username }),
        Request::Ping => Planned::Now(Reply::Pong {
            time: now_timestamp(),
        }),
        Request::FindUser {
            username,
            new_name,
            token,
        } => {
            if let Some(auth) = &rules.auth {
                // One answer for every way to fail, so a client learns nothing from it.
                if !token.is_some_and(|token| auth.admits(&token, &username)) {
                    let text = "Authentication failed.";
                    return Err(ProtocolError::new(ErrorCode::Unauthorized, text).into());
                }
            }
            Planned::Later(StoreOp::FindUser {
                username,
                new_name: new_name.err(),
            })
        }
        Request::ListGroups(query) => Planned::Later(StoreOp::ListGroups(query)),
        Request::CreateGroup {
            username,
            group_name,
        } => Planned::Later(StoreOp::CreateGroup {
            username,
            group_name,
            max_per_user: rules.max_groups_per_user,
        }),
        Request::JoinGroup {
            username,
            group_name,
        } => Planned::Later(StoreOp::JoinGroup {
            username,
            group_name,
        }),
        Request::LeaveGroup {
            username,
            group_name,
        } => Planned::Later(StoreOp::LeaveGroup {
            username,
            group_name,
        }),
        Request::SendMessage {
            username,
            group_name,
            text,
            client_msg_id,
        } => Planned::Later(StoreOp::SendMessage(NewMessage {
            group_name,
            username,
            text,
            client_msg_id,
        })),
        Request::VisitGroup {
            username,
            group_name,
        } => {
            if session.room_name() == Some(group_name.as_str()) {
                return Err(EventError::AlreadyInTheGroup.into());
            }
            let leaving = session.leaving_mark();
            Planned::Later(StoreOp::VisitGroup {
                username,
                group_name,
                leaving,
            })
        }
        Request::EnterGroup {
            username,
            group_name,
        } => {
            let leaving = session
                .leaving_mark()
                .filter(|mark| mark.group_name != group_name);
            Planned::Later(StoreOp::EnterGroup {
                username,
                group_name,
                leaving,
                reply_budget: budget,
            })
        }
        Request::FetchMessages {
            username,
            group_name,
            page,
        } => Planned::Later(StoreOp::FetchMessages {
            username,
            group_name,
            page,
            reply_budget: budget,
        }),
    })
}

/// A finished job, ready for the requester.
#[derive(Debug)]
pub struct Completed {
    pub line: Vec<u8>,
    pub effect: Effect,
    /// The group messages the line carries: (group, first seq, last seq), contiguous.
    pub shows: Option<(String, u64, u64)>,
}

/// Turns a finished job into the reply line for the requester and the session effect.
pub fn complete(
    op: StoreOp,
    result: Result<StoreOutput, StoreError>,
    id: Option<&serde_json::value::RawValue>,
) -> Completed {
    let new_name = match &op {
        StoreOp::FindUser { new_name, .. } => new_name.clone(),
        _ => None,
    };
    match result.map(|output| success(op, output)) {
        Ok((reply, effect)) => Completed {
            shows: shown_messages(&reply),
            line: encode_reply(&reply, id),
            effect,
        },
        // A name the creation rules refuse was not found among existing users.
        Err(StoreError::UserNotFound) if new_name.is_some() => {
            let text = new_name.unwrap_or_default();
            let failure = ProtocolError::new(ErrorCode::BadRequest, &text).into();
            Completed {
                line: encode_failure(&failure, id),
                effect: Effect::None,
                shows: None,
            }
        }
        Err(error) => Completed {
            line: encode_failure(&failure_of(error), id),
            effect: Effect::None,
            shows: None,
        },
    }
}

/// Which group messages a reply shows the client (history pages and the sender's own ack).
fn shown_messages(reply: &Reply) -> Option<(String, u64, u64)> {
    match reply {
        Reply::MessageSent(sent) => Some((
            sent.message.group_name.clone(),
            sent.message.seq,
            sent.message.seq,
        )),
        Reply::Messages { group_name, page } => {
            let (first, last) = (page.messages.first()?, page.messages.last()?);
            Some((group_name.clone(), first.seq, last.seq))
        }
        _ => None,
    }
}

fn success(op: StoreOp, output: StoreOutput) -> (Reply, Effect) {
    match (op, output) {
        (StoreOp::FindUser { username, .. }, StoreOutput::User { profile, created }) => {
            let reply = if created {
                Reply::UserCreated(profile)
            } else {
                Reply::UserFound(profile)
            };
            (reply, Effect::Bind(username))
        }
        (_, StoreOutput::GroupCreated(group)) => (Reply::GroupCreated(group), Effect::None),
        (_, StoreOutput::Joined(group)) => (Reply::JoinSuccess(group), Effect::None),
        (
            StoreOp::LeaveGroup {
                username,
                group_name,
            },
            StoreOutput::Left(group),
        ) => (
            Reply::LeaveSuccess(group),
            Effect::LeftGroup {
                username,
                group_name,
            },
        ),
        (_, StoreOutput::Stored(sent)) => (Reply::MessageSent(sent), Effect::None),
        (
            StoreOp::VisitGroup {
                username,
                group_name,
                ..
            },
            StoreOutput::Visited(visit),
        ) => {
            let room = Room::new(group_name.clone(), visit.head_seq, visit.last_read_seq);
            let reply = Reply::UserVisited {
                username,
                group_name,
                last_read: visit.last_read,
            };
            (reply, Effect::EnterRoom(room))
        }
        (StoreOp::EnterGroup { group_name, .. }, StoreOutput::Entered(history)) => {
            let room = Room::new(group_name.clone(), history.head_seq, history.read_seq);
            (
                Reply::EnterGroup {
                    group_name,
                    history,
                },
                Effect::EnterRoom(room),
            )
        }
        (StoreOp::FetchMessages { group_name, .. }, StoreOutput::Page(page)) => {
            (Reply::Messages { group_name, page }, Effect::None)
        }
        (_, StoreOutput::Groups(groups)) => (Reply::Groups(groups), Effect::None),
        (_, StoreOutput::ReadState(state)) => (Reply::MarkedRead(state), Effect::None),
        (_, StoreOutput::MyGroups(groups)) => (Reply::MyGroups(groups), Effect::None),
        (op, output) => {
            log::error!("store answered {op:?} with {output:?}");
            (
                Reply::Pong {
                    time: now_timestamp(),
                },
                Effect::None,
            )
        }
    }
}

/// The error reply for a store error.
pub fn failure_of(error: StoreError) -> Failure {
    match error {
        StoreError::UserNotFound => EventError::NameNotFound.into(),
        StoreError::GroupExists => EventError::GroupAlreadyCreated.into(),
        StoreError::GroupNotFound => EventError::GroupNotFound.into(),
        StoreError::NotAMember => EventError::NotAMember.into(),
        StoreError::QuotaExceeded => ProtocolError::new(
            ErrorCode::QuotaExceeded,
            "You have created as many groups as one user may (MAX_GROUPS_PER_USER).",
        )
        .into(),
        StoreError::Unavailable(_) => ProtocolError::new(
            ErrorCode::Unavailable,
            "The store is unavailable; nothing was stored.",
        )
        .into(),
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
        };
        plan(session, Frame::Line(line.as_bytes().to_vec()), &rules)
    }

    fn reply_json(plan: Plan) -> serde_json::Value {
        match plan {
            Plan::Reply(bytes) | Plan::Refused(bytes) => {
                serde_json::from_slice(&bytes).expect("reply is json")
            }
            Plan::Store { op, .. } => panic!("expected an immediate reply, got job {op:?}"),
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
        };
        assert!(!receives(&session, &message));
        message.seq = 6;
        assert!(receives(&session, &message));
        message.group_name = "other".into();
        assert!(!receives(&session, &message));
    }
}
