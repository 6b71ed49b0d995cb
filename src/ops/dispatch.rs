//! The request dispatcher: what one framed request line becomes. The envelope is decoded (the
//! event looked up in `EVENTS`), the session checked (`not_logged_in`), then the event's module
//! validates and plans it: an immediate reply, or a store job whose completion replies.
//!
//! Pure over the session state, so it is tested without sockets (below).

use super::{event_names, find, suggestion, Context, Plan};
use crate::framing::Frame;
use crate::protocol::reply::encode_line;
use crate::protocol::{
    decode_envelope, encode_failure, Envelope, ErrorCode, Failure, ProtocolError,
};
use crate::session::{Rules, Session};

/// Bytes of a history reply that are not messages: the event name, `group_name`, flags and the
/// request `id` are added to this.
const REPLY_OVERHEAD: usize = 512;

/// An event's registry row by name, or the `unknown_event` text (saying what was most likely
/// meant, when anything was).
fn lookup(name: &str) -> Result<&'static super::EventEntry, String> {
    find(name).ok_or_else(|| match suggestion(name) {
        Some(meant) => format!("Unknown event. Did you mean \"{meant}\"?"),
        None => "Unknown event.".to_string(),
    })
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
    let envelope = match decode_envelope(&line, lookup) {
        Ok(envelope) => envelope,
        // An unknown event's error also lists the events there are.
        Err(rejected) if rejected.error.code == ErrorCode::UnknownEvent => {
            let data = serde_json::json!({
                "Error": rejected.error.text,
                "code": ErrorCode::UnknownEvent.as_str(),
                "events": event_names(),
            });
            return Plan::Reply(encode_line("error", &data, rejected.id.as_deref()));
        }
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
        Ok(Plan::Store { work, .. }) => Plan::Store { work, id },
        Ok(plan) => plan,
        Err(
            failure @ Failure::Protocol(ProtocolError {
                code: ErrorCode::Unauthorized,
                ..
            }),
        ) => Plan::Refused(encode_failure(&failure, id.as_deref())),
        Err(failure) => Plan::Reply(encode_failure(&failure, id.as_deref())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Room;
    use crate::workers::Work;

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
        let alice = Session::logged_in("alice");
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
        let reply = reply_json(plan_line(&Session::logged_in("alice"), line));
        assert_eq!(reply["data"]["code"], "forbidden");
    }

    #[test]
    fn visiting_the_current_room_is_already_in_the_group() {
        let mut session = Session::logged_in("alice");
        session.room = Some(Room::new("g".into(), 0, 0));
        let line = r#"{"event":"visit_group","data":{"username":"alice","group_name":"g"}}"#;
        let reply = reply_json(plan_line(&session, line));
        assert_eq!(reply["event"], "already_in_the_group");
        assert_eq!(
            reply["data"]["Error"],
            "User is already in selected chatroom."
        );
    }
}
