//! Error replies: the protocol-level `error` event codes and the per-event (seed) error events.

use std::fmt;

/// Codes of the protocol-level `error` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadJson,
    UnknownEvent,
    BadRequest,
    LineTooLong,
    NotLoggedIn,
    Forbidden,
    RateLimited,
    Unavailable,
    QuotaExceeded,
    Unauthorized,
    /// A reply that would exceed `MAX_REPLY_BYTES` (every listing fits itself first; this is
    /// the last guard, in one place for every event).
    ReplyTooLarge,
    /// A request that needs the connection in the group's room (`typing`).
    NotInRoom,
    /// A `join_group` by a user the group banned.
    Banned,
    /// A message (by seq) that does not exist or was deleted.
    NotFound,
    /// A mention of someone who is not a member of the conversation.
    NotMentionable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownEvent,
        ErrorCode::BadRequest,
        ErrorCode::LineTooLong,
        ErrorCode::NotLoggedIn,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::QuotaExceeded,
        ErrorCode::Unauthorized,
        ErrorCode::ReplyTooLarge,
        ErrorCode::NotInRoom,
        ErrorCode::Banned,
        ErrorCode::NotFound,
        ErrorCode::NotMentionable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ReplyTooLarge => "reply_too_large",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::Banned => "banned",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotMentionable => "not_mentionable",
        }
    }
}

/// A protocol-level error: sent as `{"event":"error","data":{"Error":text,"code":code}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub text: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, text: &str) -> ProtocolError {
        ProtocolError {
            code,
            text: text.to_string(),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.text)
    }
}

/// An event-specific error reply: its own event name with data `{"Error": text}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventError {
    NameNotFound,
    GroupAlreadyCreated,
    GroupNotFound,
    NotAMember,
    AlreadyInTheGroup,
}

impl EventError {
    pub const ALL: [EventError; 5] = [
        EventError::NameNotFound,
        EventError::GroupAlreadyCreated,
        EventError::GroupNotFound,
        EventError::NotAMember,
        EventError::AlreadyInTheGroup,
    ];

    pub fn event(self) -> &'static str {
        match self {
            EventError::NameNotFound => "name_not_found",
            EventError::GroupAlreadyCreated => "group_already_created",
            EventError::GroupNotFound => "group_not_found",
            EventError::NotAMember => "not_a_member",
            EventError::AlreadyInTheGroup => "already_in_the_group",
        }
    }

    /// The human text; the seed texts are byte-for-byte the original backend's.
    pub fn text(self) -> &'static str {
        match self {
            EventError::NameNotFound => "User could not be found.",
            EventError::GroupAlreadyCreated => "Group has already been created.",
            EventError::GroupNotFound => "Group that user selects can not be found.",
            EventError::NotAMember => "User is not a member of this group.",
            EventError::AlreadyInTheGroup => "User is already in selected chatroom.",
        }
    }
}

/// Any error reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Event(EventError),
    Protocol(ProtocolError),
}

impl From<EventError> for Failure {
    fn from(error: EventError) -> Failure {
        Failure::Event(error)
    }
}

impl From<ProtocolError> for Failure {
    fn from(error: ProtocolError) -> Failure {
        Failure::Protocol(error)
    }
}
