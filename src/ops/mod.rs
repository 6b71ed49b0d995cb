//! One module per request event, after mini-redis's `cmd/`: each file holds the event's fields
//! and their validation (`Event::parse`), its rules (`Event::plan`), what it asks of the store
//! (`StoreCall::run`) and how its reply is encoded (`StoreCall::answer`). `EVENTS` is the
//! registry: adding an event is one new file plus one line there (docs/ARCHITECTURE.md).
//!
//! Two traits because an event is used on two threads: `Event` is planned on the event loop;
//! the `StoreCall` it may produce travels to a store worker and back. The call keeps its
//! result next to itself (`Pending`), so a reply can only ever be built from the output of the
//! call that produced it.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::protocol::{encode_failure, ErrorCode, EventError, Failure, ProtocolError};
pub use crate::session::Completed;
use crate::session::{Effect, Rules, Session};
use crate::store::{Store, StoreError};
use crate::workers::Work;
pub use crate::workers::{Call, Route};

pub mod dispatch;
pub mod fields;

mod blocking;
mod create_group;
mod delete_group;
mod delete_message;
mod edit_message;
mod enter_group;
mod fetch_messages;
mod find_user;
pub mod hello;
mod join_group;
mod leave_group;
mod list_groups;
mod mark_read;
mod moderation;
pub mod my_groups;
mod open_direct;
mod ping;
pub mod resume;
pub mod send_message;
mod set_notify;
mod set_role;
pub mod typing;
mod visit_group;

/// Every request event, in the order `hello` and `unknown_event` list them.
pub const EVENTS: [EventEntry; 26] = [
    entry::<hello::Hello>(),
    entry::<find_user::FindUser>(),
    entry::<create_group::CreateGroup>(),
    entry::<join_group::JoinGroup>(),
    entry::<leave_group::LeaveGroup>(),
    entry::<send_message::SendMessage>(),
    entry::<visit_group::VisitGroup>(),
    entry::<enter_group::EnterGroup>(),
    entry::<fetch_messages::FetchMessages>(),
    entry::<list_groups::ListGroups>(),
    entry::<ping::Ping>(),
    entry::<mark_read::MarkRead>(),
    entry::<my_groups::MyGroups>(),
    entry::<typing::Typing>(),
    entry::<edit_message::EditMessage>(),
    entry::<delete_message::DeleteMessage>(),
    entry::<set_role::SetRole>(),
    entry::<moderation::Moderate<moderation::Remove>>(),
    entry::<moderation::Moderate<moderation::Ban>>(),
    entry::<moderation::Moderate<moderation::Unban>>(),
    entry::<delete_group::DeleteGroup>(),
    entry::<open_direct::OpenDirect>(),
    entry::<blocking::Blocking<blocking::Block>>(),
    entry::<blocking::Blocking<blocking::Unblock>>(),
    entry::<blocking::Blocking<blocking::List>>(),
    entry::<set_notify::SetNotify>(),
];

/// A request's `data` object.
pub type Data = Map<String, Value>;

/// What planning an event may look at.
pub struct Context<'a> {
    pub session: &'a Session,
    pub rules: &'a Rules,
    /// The request `id`, echoed in an immediate reply.
    pub id: Option<&'a RawValue>,
    /// Encoded bytes a history reply may take (`MAX_REPLY_BYTES` less the envelope and id).
    pub reply_budget: usize,
}

/// What a request becomes: what its event plans (`Event::plan`, where a store job has no
/// `id` yet) and what the dispatcher hands the loop (`dispatch::plan`, the request's `id`
/// filled in).
#[derive(Debug)]
pub enum Plan {
    /// Answer now with this line.
    Reply(Vec<u8>),
    /// Answer now with this line, and change the session so.
    ReplyAnd(Vec<u8>, Effect),
    /// Run this store job; its completion produces the reply (echoing `id`).
    Store {
        work: Work,
        id: Option<crate::protocol::RequestId>,
    },
    /// A `find_user` that failed authentication: answer with this line, and count it (the
    /// connection is closed after `MAX_AUTH_FAILURES`).
    Refused(Vec<u8>),
}

/// A request event, planned on the event loop.
pub trait Event: Sized {
    /// The wire name (`"event"` of the request).
    const NAME: &'static str;
    /// May be sent before `find_user` has bound the connection.
    const BEFORE_LOGIN: bool = false;
    /// Its data names the acting user (`username`); after login the field may be left out.
    const NAMES_USER: bool = true;

    /// Validates the event's fields.
    fn parse(data: &Data) -> Result<Self, ProtocolError>;

    /// The user the request acts for, when it names one (checked against the login).
    fn acting_user(&self) -> Option<&str> {
        None
    }

    /// Answers now or names the store job.
    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure>;
}

/// A store job of one event: runs on a worker thread, answered on the event loop.
pub trait StoreCall: Send + std::fmt::Debug + 'static {
    type Output: Send + std::fmt::Debug;

    /// Which worker runs it.
    fn route(&self) -> Route<'_>;

    /// The store work (on a worker thread).
    fn run(&self, store: &mut dyn Store) -> Result<Self::Output, StoreError>;

    /// The reply line and session effect of a success (on the event loop).
    fn answer(self, output: Self::Output, id: Option<&RawValue>) -> Completed;

    /// The reply to a store error; most events answer with the usual mapping.
    fn failure(&self, error: StoreError) -> Failure {
        failure_of(error)
    }
}

#[derive(Debug)]
struct Pending<C: StoreCall> {
    call: C,
    result: Option<Result<C::Output, StoreError>>,
}

impl<C: StoreCall> Call for Pending<C> {
    fn route(&self) -> Route<'_> {
        self.call.route()
    }

    fn run(&mut self, store: &mut dyn Store) {
        self.result = Some(self.call.run(store));
    }

    fn fail(&mut self, error: StoreError) {
        self.result = Some(Err(error));
    }

    fn finish(self: Box<Self>, id: Option<&RawValue>, max_reply_bytes: usize) -> Completed {
        let Pending { call, result } = *self;
        let result =
            result.unwrap_or_else(|| Err(StoreError::Unavailable("the job never ran".into())));
        let completed = match result {
            Ok(output) => call.answer(output, id),
            Err(error) => Completed::reply(encode_failure(&call.failure(error), id)),
        };
        within_reply_limit(completed, id, max_reply_bytes)
    }
}

/// The one place `MAX_REPLY_BYTES` is enforced for every store-backed reply: each listing
/// shrinks its page to its budget first, so this only fires on a bug, and then the client gets
/// a clear error instead of a line it may not be able to take (and nothing changes state).
pub fn within_reply_limit(
    completed: Completed,
    id: Option<&RawValue>,
    max_reply_bytes: usize,
) -> Completed {
    if completed.line.len() <= max_reply_bytes {
        return completed;
    }
    log::error!(
        "a reply of {} bytes exceeded MAX_REPLY_BYTES ({max_reply_bytes}); sent reply_too_large",
        completed.line.len()
    );
    let error = ProtocolError::new(
        ErrorCode::ReplyTooLarge,
        "The reply would exceed MAX_REPLY_BYTES; ask for a smaller page (limit).",
    );
    Completed::reply(encode_failure(&error.into(), id))
}

/// A page of groups fitted to the reply budget: `{groups, has_more, next_after?}`, where
/// `next_after` (present whenever `has_more` is) names the last group given: ask again with
/// `after` set to it. `list_groups` and `my_groups` answer with this.
pub fn groups_page<T: serde::Serialize>(
    rows: Vec<T>,
    more: bool,
    budget: usize,
    name: impl Fn(&T) -> &str,
) -> serde_json::Value {
    let (rows, cut) = crate::store::fit_page(rows, budget);
    let has_more = more || cut;
    let mut data = serde_json::json!({ "groups": rows, "has_more": has_more });
    if has_more {
        data["next_after"] = serde_json::json!(rows.last().map(name));
    }
    data
}

/// A history reply says where the group's history now starts (`first_seq`) once retention
/// removed its beginning; before that every seq from 1 is there and the field is left out.
pub fn mark_history_start(data: &mut serde_json::Value, first_seq: u64) {
    if first_seq > 1 {
        data["first_seq"] = serde_json::json!(first_seq);
    }
}

/// The logged-in user a request acts as (every event after login has one).
pub fn acting(context: &Context<'_>) -> Result<String, Failure> {
    context.session.username.clone().ok_or_else(|| {
        ProtocolError::new(ErrorCode::NotLoggedIn, "Log in with find_user first.").into()
    })
}

/// The reply to an edit or delete (`event`, with the message as now stored) and, when it
/// changed anything, the same line for the group's room.
pub fn message_changed(
    event: &str,
    rewritten: crate::store::manage::Rewritten,
    id: Option<&RawValue>,
) -> Completed {
    let message = &rewritten.message;
    let effect = if rewritten.changed {
        Effect::RoomLine {
            group_name: message.group_name.clone(),
            line: crate::protocol::reply::encode_line(event, message, None),
        }
    } else {
        Effect::None
    };
    Completed {
        line: crate::protocol::reply::encode_line(event, message, id),
        effect,
        shows: None,
    }
}

/// The devices-in-sync feature's name (`live::devices`).
pub const DEVICES: &str = "devices";

/// A line for the user's other protocol-3 devices, here and on every other instance (a
/// request's change of the user's own settings: blocks, notification levels): the devices
/// feature's effect.
#[derive(Debug, Clone)]
pub struct ToDevices {
    pub username: String,
    pub line: Vec<u8>,
}

impl ToDevices {
    /// The effect of a request whose reply `line` the user's other devices hear too.
    pub fn effect(username: &str, line: Vec<u8>) -> Effect {
        let to_devices = ToDevices {
            username: username.to_string(),
            line,
        };
        Effect::Live(crate::session::LiveEffect::new(DEVICES, to_devices))
    }
}

/// The store job for a call, as a request plans it.
pub fn store<C: StoreCall>(call: C) -> Plan {
    Plan::Store {
        work: work(call),
        id: None,
    }
}

/// The store job for a call the server makes itself (not planned from a request).
pub fn work<C: StoreCall>(call: C) -> Work {
    Work::Call(Box::new(Pending { call, result: None }))
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
        StoreError::Banned => ProtocolError::new(
            ErrorCode::Banned,
            "You are banned from this group; an admin or its owner may lift the ban.",
        )
        .into(),
        StoreError::Forbidden(why) => ProtocolError::new(ErrorCode::Forbidden, why).into(),
        StoreError::MessageNotFound => ProtocolError::new(
            ErrorCode::NotFound,
            "No such message in this group (never sent, deleted, or removed by retention).",
        )
        .into(),
        // Says no more than a permission refusal: not that the other member blocked you.
        StoreError::Blocked => ProtocolError::new(
            ErrorCode::Forbidden,
            "This conversation does not accept your messages.",
        )
        .into(),
        StoreError::NotMentionable(name) => ProtocolError {
            code: ErrorCode::NotMentionable,
            text: format!(
                "'{name}' is not a member of this conversation; only members can be mentioned. Nothing was stored."
            ),
        }
        .into(),
        StoreError::Unavailable(_) => ProtocolError::new(
            ErrorCode::Unavailable,
            "The store is unavailable; nothing was stored.",
        )
        .into(),
    }
}

/// A registry row: an event's name, its login rules, and its parse-then-plan function.
pub struct EventEntry {
    pub name: &'static str,
    pub before_login: bool,
    pub names_user: bool,
    plan: fn(&Data, &Context<'_>) -> Result<Plan, Failure>,
}

impl EventEntry {
    /// Validates `data` and plans the request.
    pub fn plan(&self, data: &Data, context: &Context<'_>) -> Result<Plan, Failure> {
        (self.plan)(data, context)
    }
}

impl std::fmt::Debug for EventEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

const fn entry<E: Event>() -> EventEntry {
    EventEntry {
        name: E::NAME,
        before_login: E::BEFORE_LOGIN,
        names_user: E::NAMES_USER,
        plan: parse_and_plan::<E>,
    }
}

fn parse_and_plan<E: Event>(data: &Data, context: &Context<'_>) -> Result<Plan, Failure> {
    let event = E::parse(data)?;
    if let (Some(bound), Some(named)) = (&context.session.username, event.acting_user()) {
        if bound != named {
            let text = "Username does not match the logged-in user.";
            return Err(ProtocolError::new(ErrorCode::Forbidden, text).into());
        }
    }
    event.plan(context)
}

/// The registry row of an event name.
pub fn find(name: &str) -> Option<&'static EventEntry> {
    EVENTS.iter().find(|entry| entry.name == name)
}

/// The wire names of every request event.
pub fn event_names() -> Vec<&'static str> {
    EVENTS.iter().map(|entry| entry.name).collect()
}

/// The event an unknown name most likely meant: a misspelling (at most two edits, and at most
/// a third of the name), the first word of one (`join` → `join_group`), or what other chat
/// protocols call it (`login` → `find_user`, `history` → `fetch_messages`).
pub fn suggestion(name: &str) -> Option<&'static str> {
    const OTHER_NAMES: [(&str, &str); 10] = [
        ("login", "find_user"),
        ("register", "find_user"),
        ("auth", "find_user"),
        ("send", "send_message"),
        ("say", "send_message"),
        ("msg", "send_message"),
        ("history", "fetch_messages"),
        ("groups", "list_groups"),
        ("pong", "ping"),
        ("dm", "open_direct"),
    ];
    let lower = name.to_ascii_lowercase();
    if name.len() > 64 {
        return None;
    }
    if let Some((_, event)) = OTHER_NAMES.iter().find(|(other, _)| *other == lower) {
        return Some(event);
    }
    let names = event_names();
    if let Some(event) = names
        .iter()
        .find(|event| event.split('_').next() == Some(lower.as_str()))
    {
        return Some(event);
    }
    names
        .into_iter()
        .map(|event| (edit_distance(&lower, event), event))
        .filter(|(distance, _)| *distance <= 2 && *distance * 3 <= lower.chars().count())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, event)| event)
}

/// Levenshtein distance (insertions, deletions and substitutions of characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_events_get_a_likely_meaning() {
        assert_eq!(suggestion("send_mesage"), Some("send_message"));
        assert_eq!(suggestion("SEND_MESSAGE"), Some("send_message"));
        assert_eq!(suggestion("join"), Some("join_group"));
        assert_eq!(suggestion("login"), Some("find_user"));
        assert_eq!(suggestion("history"), Some("fetch_messages"));
        assert_eq!(suggestion("dance"), None);
        assert_eq!(suggestion("ab"), None, "too short to guess from");
    }

    #[test]
    fn every_event_has_one_distinct_name() {
        let mut names = event_names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EVENTS.len());
        assert!(find("send_message").is_some_and(|entry| !entry.before_login));
        assert!(find("hello").is_some_and(|entry| entry.before_login && !entry.names_user));
        assert!(find("dance").is_none());
    }
}
