//! Domain records shared by the store backends, the protocol encoder and the peer relay.
//!
//! Field names are the wire names from docs/PROTOCOL.md, so a record serialises straight into a reply.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One stored chat message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    #[serde(rename = "_id")]
    pub id: String,
    pub group_name: String,
    pub username: String,
    /// Empty only in a tombstone (`deleted`): a live message's text is never empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    pub timestamp: String,
    pub seq: u64,
    /// The sender's idempotency key (`send_message {client_msg_id}`), when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    /// When the text was last replaced (`edit_message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    /// A tombstone: the message was deleted and its text erased; its seq stays taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The members the sender named (`send_message {mentions}`, `@room` for all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
    /// The thread this message answers: its root's seq (`send_message {reply_to}`; a reply
    /// to a reply joins the root's thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// A thread root's replies that are not deleted (left out while 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reply_count: u64,
    /// The newest of those replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply_seq: Option<u64>,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// A member's standing in a group: the creator is its `owner`; the owner names `admin`s;
/// owner and admins moderate (remove, ban, delete any message).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    #[default]
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    /// The stored name back (anything unknown is a plain member).
    pub fn parse(text: &str) -> Role {
        match text {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }

    /// May remove, ban and delete others' messages.
    pub fn moderates(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// A message waiting to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub group_name: String,
    pub username: String,
    pub text: String,
    /// At most one message is ever stored per (username, client_msg_id).
    pub client_msg_id: Option<String>,
    /// Members named (validated by the store against the group's members; `ROOM_MENTION`
    /// only from its owner and admins).
    pub mentions: Vec<String>,
    /// The seq of the message this one answers, in the same conversation.
    pub reply_to: Option<u64>,
}

/// The mention of every member of a conversation.
pub const ROOM_MENTION: &str = "@room";

/// The outcome of storing one `NewMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub message: Message,
    /// The sender already stored a message under this `client_msg_id`: `message` is that
    /// original, and nothing new was stored (so nothing is broadcast).
    pub duplicate: bool,
    /// A direct conversation's other member, when this message made the conversation show
    /// in their `my_groups` (its first message, or the first since they left it).
    pub revealed_to: Option<String>,
}

impl Appended {
    pub fn new(message: Message) -> Appended {
        Appended {
            message,
            duplicate: false,
            revealed_to: None,
        }
    }

    pub fn duplicate(message: Message) -> Appended {
        Appended {
            message,
            duplicate: true,
            revealed_to: None,
        }
    }
}

/// A group member entry, shaped like the original backend's `groups.user` items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    #[serde(rename = "name_ID")]
    pub name_id: String,
    pub last_read: String,
}

/// A user as `find_user` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserProfile {
    #[serde(rename = "_id")]
    pub id: String,
    pub username: String,
    /// The user's groups by name (byte order), at most `MAX_GROUP_LIST` of them.
    pub group_list: Vec<String>,
    /// More groups than `group_list` holds: `my_groups {after}` pages through all of them.
    /// Only written when true, so v1 replies keep their shape.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub group_list_has_more: bool,
}

/// Most group names `find_user` lists (fewer when they would not fit `MAX_REPLY_BYTES`).
pub const MAX_GROUP_LIST: u32 = 1000;

/// A newly created group as `create_group` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreatedGroup {
    pub group_name: String,
    pub user: Vec<Member>,
}

/// The reply data of `join_group` and `leave_group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupRef {
    pub group_id: String,
    pub group_name: String,
}

/// One row of `list_groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupSummary {
    pub group_name: String,
    pub member_count: u64,
    /// v1's member list, kept only while it has at most `MAX_LISTED_MEMBERS` names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
    /// The asking user's role, when a member.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

impl GroupSummary {
    /// A row from the group's full member list (in joining order).
    pub fn new(group_name: String, members: Vec<String>) -> GroupSummary {
        GroupSummary {
            group_name,
            member_count: members.len() as u64,
            members: (members.len() <= MAX_LISTED_MEMBERS).then_some(members),
            role: None,
        }
    }
}

/// A page of `list_groups`, by group name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupsPage {
    pub groups: Vec<GroupSummary>,
    pub has_more: bool,
}

/// A page of `my_groups`, by group name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipsPage {
    pub groups: Vec<GroupReadState>,
    pub has_more: bool,
}

/// Which page of `list_groups` or `my_groups`: groups named after `after` (byte order), at
/// most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupsQuery {
    pub after: Option<String>,
    pub limit: u32,
}

/// Groups with more members than this list only `member_count` in `list_groups`.
pub const MAX_LISTED_MEMBERS: usize = 100;

/// History returned by `enter_group`, both lists oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupHistory {
    pub unread: Vec<Message>,
    pub unread_has_more: bool,
    pub read: Vec<Message>,
    /// The newest `seq` of the group when the history was read (0: no messages yet).
    pub head_seq: u64,
    /// The member's `last_read_seq` after entering: everything up to it was in this reply or
    /// read before. Below `head_seq` when the unread list was cut short (`unread_has_more`).
    pub read_seq: u64,
    /// The member's `last_read_seq` before entering (below `read_seq` when entering marked).
    pub marker_before: u64,
    /// The group's seq numbering identity (see `MessagePage::epoch`).
    pub epoch: String,
    /// The oldest seq still stored (retention may have removed older ones; 1 if none did).
    pub first_seq: u64,
}

/// A page of `fetch_messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    pub has_more: bool,
    /// Changes if and only if the group's `seq` numbering restarted: it is the group's id,
    /// which a re-created group or a replaced store does not share.
    pub epoch: String,
    /// The oldest seq still stored (see `GroupHistory::first_seq`).
    pub first_seq: u64,
}

/// Which page of a group's history `fetch_messages` wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery {
    pub before_seq: Option<u64>,
    pub after_seq: Option<u64>,
    pub limit: u32,
    /// Only this thread: its root (this seq) and the replies to it.
    pub thread: Option<u64>,
}

/// What entering a room (`visit_group`) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visit {
    pub last_read: String,
    pub head_seq: u64,
    /// The member's marker in the visited group (messages up to it count as read).
    pub last_read_seq: u64,
}

/// One membership's read state, as `my_groups` and `mark_read` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupReadState {
    pub group_name: String,
    pub group_id: String,
    pub last_seq: u64,
    pub last_read_seq: u64,
    pub unread_count: u64,
    /// The member's role (`my_groups`).
    pub role: Role,
    /// Protocol 3's attention fields (`None` on protocol 2, which keeps its replies as they
    /// were).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub attention: Option<Attention>,
}

/// What protocol 3 adds to a membership's read state: the mentions of the user after their
/// marker, their notification level, and for a direct conversation its kind and other member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    pub mention_count: u64,
    pub notify: Notify,
    /// `"direct"` for a direct conversation (left out for a group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A direct conversation's other member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<String>,
}

/// A member's notification level in a conversation (`set_notify`): counts are kept at every
/// level; it tells clients how to show them and decides what is pushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Notify {
    #[default]
    All,
    Mentions,
    None,
}

impl Notify {
    pub fn as_str(self) -> &'static str {
        match self {
            Notify::All => "all",
            Notify::Mentions => "mentions",
            Notify::None => "none",
        }
    }

    /// The stored name back (`None` for an unknown one).
    pub fn parse(text: &str) -> Option<Notify> {
        match text {
            "all" => Some(Notify::All),
            "mentions" => Some(Notify::Mentions),
            "none" => Some(Notify::None),
            _ => None,
        }
    }
}

/// An offline notification waiting in the store's queue for the webhook (`push`): who is to
/// be told, of which message, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJob {
    /// Unique, and the receiver's idempotency key: a job retried is the same id.
    pub id: String,
    /// The recipient.
    pub username: String,
    pub group_name: String,
    pub seq: u64,
    pub sender: String,
    /// `"direct"` (a direct message) or `"mention"`.
    pub kind: String,
    /// The message's first `PUSH_PREVIEW_CHARS` characters (`None` with `PUSH_PREVIEW=false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// When it was queued (milliseconds since the Unix epoch).
    pub created_ms: u64,
    /// Failed deliveries so far.
    pub attempts: u32,
}

/// What the store queues for the webhook with each message (`None`: push is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushPolicy {
    /// Whether a job carries a preview of the text.
    pub preview: bool,
}

/// Characters of a message a push preview carries at most.
pub const PUSH_PREVIEW_CHARS: usize = 140;

/// The push queue after a trim: what went past the bounds, and what is left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushQueueState {
    /// Jobs dropped now (beyond the queue's bound or its age limit).
    pub dropped: u64,
    pub queued: u64,
    /// When the oldest job left was queued.
    pub oldest_ms: Option<u64>,
}

impl PushJob {
    /// The jobs a stored message makes: one per recipient, each told by `kind`.
    pub fn for_message(
        message: &Message,
        recipients: &[(String, &'static str)],
        policy: PushPolicy,
    ) -> Vec<PushJob> {
        let created_ms = unix_millis();
        let preview = policy
            .preview
            .then(|| message.text.chars().take(PUSH_PREVIEW_CHARS).collect());
        recipients
            .iter()
            .map(|(username, kind)| PushJob {
                id: new_object_id(),
                username: username.clone(),
                group_name: message.group_name.clone(),
                seq: message.seq,
                sender: message.username.clone(),
                kind: kind.to_string(),
                preview: preview.clone(),
                created_ms,
                attempts: 0,
            })
            .collect()
    }
}

/// Who a stored message is pushed to, from the conversation's members and their levels
/// (`members`: name and level, read by the backend; only those it needs): a direct
/// conversation's other member unless their level is `none`, and each member it mentions
/// (`@room`: all) whose level is not `none`. Never the sender; each once.
pub fn push_recipients(
    message: &Message,
    is_direct: bool,
    members: &[(String, Notify)],
) -> Vec<(String, &'static str)> {
    let room = message.mentions.iter().any(|name| name == ROOM_MENTION);
    let mut recipients: Vec<(String, &'static str)> = Vec::new();
    for (name, level) in members {
        if *name == message.username || *level == Notify::None {
            continue;
        }
        let mentioned = room || message.mentions.contains(name);
        let kind = match (is_direct, mentioned) {
            (true, _) => "direct",
            (false, true) => "mention",
            (false, false) => continue,
        };
        if !recipients.iter().any(|(known, _)| known == name) {
            recipients.push((name.clone(), kind));
        }
    }
    recipients
}

/// Direct conversations: a conversation of exactly two users, stored as a group under a name
/// derived from the pair, which `create_group` refuses (names starting with `DIRECT_PREFIX`).
pub mod direct {
    /// What every direct conversation's name starts with.
    pub const DIRECT_PREFIX: &str = "@dm:";
    /// The `kind` `my_groups` gives a direct conversation.
    pub const KIND: &str = "direct";

    /// The conversation of two users: the same whichever of them asks. A digest of the pair
    /// (each name length-prefixed, so no two pairs share an input), 24 hex digits: it fits the
    /// name limit whatever the usernames' length, and names nobody to those who see it.
    pub fn name_of(a: &str, b: &str) -> String {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        let mut input = Vec::with_capacity(first.len() + second.len() + 16);
        for name in [first, second] {
            input.extend_from_slice(&(name.len() as u64).to_be_bytes());
            input.extend_from_slice(name.as_bytes());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &input);
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!("{DIRECT_PREFIX}{hex}")
    }

    /// A name of a direct conversation (reserved: no group may take it).
    pub fn is_direct(group_name: &str) -> bool {
        group_name.starts_with(DIRECT_PREFIX)
    }
}

impl GroupReadState {
    pub fn new(group_name: String, group_id: String, last_seq: u64, last_read_seq: u64) -> Self {
        GroupReadState {
            group_name,
            group_id,
            last_seq,
            last_read_seq,
            unread_count: last_seq.saturating_sub(last_read_seq),
            role: Role::Member,
            attention: None,
        }
    }

    pub fn with_role(self, role: Role) -> Self {
        GroupReadState { role, ..self }
    }

    pub fn with_attention(self, attention: Attention) -> Self {
        GroupReadState {
            attention: Some(attention),
            ..self
        }
    }
}

/// A user and a group, as store calls about one membership take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberOf<'a> {
    pub username: &'a str,
    pub group_name: &'a str,
}

/// Entering a group's room (`visit_group`, `enter_group`): the member, and the read mark of
/// the room being left (stored in the same step).
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub member: MemberOf<'a>,
    pub leaving: Option<&'a ReadMark>,
    /// `enter_group` marks read what its reply holds (off for a connection that turned
    /// implicit read marks off: `hello {implicit_read: false}`).
    pub marks_entry: bool,
}

/// Raise `username`'s read marker in `group_name` to `seq` (never lowers it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMark {
    pub username: String,
    pub group_name: String,
    pub seq: u64,
}

/// Most unread messages `enter_group` returns at once; the rest come with `fetch_messages`.
pub const MAX_UNREAD_ON_ENTER: u32 = 1000;
/// Most already-read messages `enter_group` returns.
pub const MAX_READ_ON_ENTER: u32 = 100;

/// Formats a time as docs/PROTOCOL.md wants: ISO-8601 UTC with milliseconds and a `Z`.
pub fn format_timestamp(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The current time in wire format.
pub fn now_timestamp() -> String {
    format_timestamp(Utc::now())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh 24-hex-digit ObjectId string.
pub fn new_object_id() -> String {
    mongodb::bson::oid::ObjectId::new().to_hex()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let time = Utc
            .with_ymd_and_hms(2026, 11, 24, 19, 10, 0)
            .single()
            .expect("valid date");
        assert_eq!(format_timestamp(time), "2026-11-24T19:10:00.000Z");
    }

    #[test]
    fn a_pair_has_one_direct_conversation() {
        let name = direct::name_of("ann", "bob");
        assert_eq!(name, direct::name_of("bob", "ann"));
        assert_ne!(name, direct::name_of("ann", "bobby"));
        assert_ne!(direct::name_of("a", "bc"), direct::name_of("ab", "c"));
        assert!(direct::is_direct(&name));
        assert_eq!(name.len(), direct::DIRECT_PREFIX.len() + 24);
    }

    #[test]
    fn object_ids_are_24_hex_digits() {
        let id = new_object_id();
        assert_eq!(id.len(), 24);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
