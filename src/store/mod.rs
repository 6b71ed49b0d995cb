//! The `Store` trait: every persistent operation the server needs, implemented by the embedded
//! SQLite backend and the MongoDB backend. Calls are blocking and run only on worker threads.

pub mod manage;
pub mod mongo;
#[cfg(feature = "bench-noop")]
pub mod noop;
pub mod sqlite;

use std::fmt;

use crate::config::{Config, StoreKind};
use crate::model::{
    Appended, CreatedGroup, Entry, GroupHistory, GroupReadState, GroupRef, GroupsPage, GroupsQuery,
    MemberOf, MembershipsPage, Message, MessagePage, NewMessage, Notify, PageQuery, PushJob,
    PushPolicy, PushQueueState, ReadMark, Role, UserProfile, Visit, MAX_GROUP_LIST,
    MAX_UNREAD_ON_ENTER,
};

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    UserNotFound,
    GroupExists,
    GroupNotFound,
    NotAMember,
    /// The user already created `MAX_GROUPS_PER_USER` groups.
    QuotaExceeded,
    /// The user is banned from the group (`join_group`).
    Banned,
    /// The user's role does not allow this; the text says what would.
    Forbidden(&'static str),
    /// No message with that seq (never stored, removed by retention, or the group's).
    MessageNotFound,
    /// A direct conversation refused the sender: the other member blocked them.
    Blocked,
    /// A mention names someone who is not a member of the conversation (the name).
    NotMentionable(String),
    /// The database could not be reached or failed; nothing was changed.
    Unavailable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::UserNotFound => write!(f, "user not found"),
            StoreError::GroupExists => write!(f, "group exists"),
            StoreError::GroupNotFound => write!(f, "group not found"),
            StoreError::NotAMember => write!(f, "not a member"),
            StoreError::QuotaExceeded => write!(f, "group quota reached"),
            StoreError::Banned => write!(f, "banned"),
            StoreError::Forbidden(why) => write!(f, "forbidden: {why}"),
            StoreError::MessageNotFound => write!(f, "message not found"),
            StoreError::Blocked => write!(f, "blocked"),
            StoreError::NotMentionable(name) => write!(f, "not mentionable: {name}"),
            StoreError::Unavailable(reason) => write!(f, "store unavailable: {reason}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// What every store call returns.
pub type StoreResult<T> = Result<T, StoreError>;

/// Persistent chat state. One instance per worker thread.
pub trait Store: Send {
    /// Finds the user, creating it if new and `may_create`; `true` when it was created.
    /// A missing user that may not be created is `UserNotFound`. `group_list` holds the first
    /// `MAX_GROUP_LIST` group names in byte order (`group_list_has_more` when there are more).
    fn find_user(&mut self, username: &str, create: bool) -> StoreResult<(UserProfile, bool)>;
    /// Creates a group with its creator as first member. `max_per_user` (0: no limit) caps how
    /// many groups one user may have created (`QuotaExceeded` beyond).
    fn create_group(&mut self, creator: MemberOf, quota: usize) -> StoreResult<CreatedGroup>;
    /// Adds the user to the group; a member joining again is a success that changes nothing.
    fn join_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef>;
    fn leave_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef>;
    /// Stores a batch of messages in one commit, each with the next `seq` of its group.
    /// The result has one entry per input, in order. A message whose (username,
    /// client_msg_id) was stored before, by any connection or instance, or earlier in the same
    /// batch, is not stored again: its entry is that original with `duplicate` set (a unique
    /// index enforces this even against a concurrent writer).
    fn append_messages(&mut self, batch: &[NewMessage]) -> Vec<StoreResult<Appended>>;
    /// Enters a room: applies `leaving` (the mark for the room left, if any) and reports the
    /// member's read state in `group_name`.
    fn visit_group(&mut self, entry: &Entry) -> StoreResult<Visit>;
    /// Like `visit_group`, and returns the history (split by the member's `last_read_seq`,
    /// trimmed by `fit_history` to `reply_budget` encoded bytes) and marks read exactly what it
    /// returns.
    fn enter_group(&mut self, entry: &Entry, reply_budget: usize) -> StoreResult<GroupHistory>;
    /// Raises read markers (a no-op for non-members and for marks below the current one).
    /// The timestamp `last_read` becomes now when the mark reaches the group's newest message,
    /// else the marked message's time.
    fn mark_read(&mut self, marks: &[ReadMark]) -> StoreResult<()>;
    /// One membership's read state (`GroupNotFound`, `NotAMember`); O(1) per group.
    fn read_state(&mut self, username: &str, group_name: &str) -> StoreResult<GroupReadState>;
    /// A page of the user's memberships with their read state, by group name (byte order),
    /// in a number of queries that does not grow with the page.
    fn my_groups(&mut self, username: &str, query: &GroupsQuery) -> StoreResult<MembershipsPage>;
    fn fetch_messages(&mut self, member: MemberOf, page: PageQuery) -> StoreResult<MessagePage>;
    /// A page of groups by name (byte order), each with its member count, while small its
    /// members, and `asking`'s role where a member.
    fn list_groups(&mut self, query: &GroupsQuery, asking: &str) -> StoreResult<GroupsPage>;
    /// The names of a group's members (`GroupNotFound` when there is no such group).
    fn group_members(&mut self, group_name: &str) -> StoreResult<Vec<String>>;
    /// The newest seq of each named group that exists, in one query (peer mode's tail check:
    /// MongoDB answers from the seq hints, which an instance raises right after it stores).
    fn group_heads(&mut self, group_names: &[String]) -> StoreResult<Vec<(String, u64)>>;
    /// Messages of a group with `seq > after_seq`, oldest first, at most `limit` (peer recovery).
    fn messages_after(&mut self, group: &str, after: u64, limit: u32) -> StoreResult<Vec<Message>>;

    // Primitives for managing messages, members and groups. Who may do what is decided once,
    // above the backends, in `manage.rs`; these only read and write.

    /// One message by seq, tombstones included (`None`: there is none; `GroupNotFound`).
    fn message_at(&mut self, group_name: &str, seq: u64) -> StoreResult<Option<Message>>;
    /// Replaces a live message's text (`Some`, stamping `edited_at` with `at`) or erases it
    /// into a tombstone (`None`). Never touches a tombstone, so an edit racing a delete can
    /// not bring text back: `None` when the message is missing or already deleted.
    fn rewrite(&mut self, group: &str, seq: u64, change: Rewrite) -> StoreResult<Option<Message>>;
    /// The member's role (`GroupNotFound`, `NotAMember`).
    fn role(&mut self, group_name: &str, username: &str) -> StoreResult<Role>;
    /// Sets a member's role (`NotAMember`).
    fn set_role(&mut self, group_name: &str, username: &str, role: Role) -> StoreResult<()>;
    /// The members holding `role`, in joining order.
    fn members_with_role(&mut self, group_name: &str, role: Role) -> StoreResult<Vec<String>>;
    /// Bans (a banned user's `join_group` is `Banned`) or lifts a ban (`GroupNotFound`).
    fn set_banned(&mut self, group_name: &str, username: &str, banned: bool) -> StoreResult<()>;
    /// Removes a group: its memberships, messages and bans go with it. A group created later
    /// under the name is a new group with a new epoch.
    fn remove_group(&mut self, group_name: &str) -> StoreResult<()>;
    /// Retention: removes at most `limit` of the group's oldest messages among those with
    /// `seq < below_seq` or a timestamp before `older_than`, and records where its history now
    /// starts (`first_seq`). Returns how many it removed (0: nothing left to prune).
    fn prune(&mut self, group_name: &str, cut: &PruneCut, limit: u32) -> StoreResult<u64>;
    /// At most `limit` group names after `after`, by name, with each group's newest seq.
    fn group_names(&mut self, after: &str, limit: u32) -> StoreResult<Vec<(String, u64)>>;
    /// The groups `username` owns, by name.
    fn owned_groups(&mut self, username: &str) -> StoreResult<Vec<String>>;
    /// Erases a user: their messages become tombstones with no author (`username` empty),
    /// their memberships, bans, the groups they count as creator of (the quota) and the user
    /// record go, and the erasure is recorded (`erasures_since`) so that every running server
    /// closes the user's connections. Memberships go before the messages are scrubbed: a send
    /// racing the erasure is either refused (no longer a member) or scrubbed. Returns the
    /// groups they were in (`UserNotFound`). Owned groups are handed over first
    /// (`manage::erase`).
    fn erase_user(&mut self, username: &str) -> StoreResult<Vec<String>>;
    /// Users erased at or after `since_ms` (milliseconds since the Unix epoch), with when.
    fn erasures_since(&mut self, since_ms: u64) -> StoreResult<Vec<(String, u64)>>;

    // Direct conversations, blocking and notification levels (docs/PROTOCOL.md).

    /// The direct conversation of `username` and `other` (`model::direct::name_of`), created
    /// with both as members on first use; `other`'s membership stays hidden from their
    /// `my_groups` until its first message. Shows it to `username` again if they had left it.
    /// `UserNotFound` for either user; `Blocked` when `other` blocked `username`.
    fn open_direct(&mut self, username: &str, other: &str) -> StoreResult<GroupRef>;
    /// Blocks or unblocks `other` for `username` (safe to repeat) and returns everyone
    /// `username` blocks, by name. Blocking an unknown user is `UserNotFound`.
    fn set_blocked(&mut self, username: &str, other: &str, on: bool) -> StoreResult<Vec<String>>;
    /// Everyone `username` blocks, by name.
    fn blocked_users(&mut self, username: &str) -> StoreResult<Vec<String>>;
    /// A member's notification level in a conversation (`GroupNotFound`, `NotAMember`).
    fn set_notify(&mut self, member: MemberOf, level: Notify) -> StoreResult<()>;

    // The offline push queue (`push`): written with the messages, drained by the push worker.

    /// From now on each stored direct message or mention queues its push jobs
    /// (`model::push_recipients`) with the message (`None`: nothing is queued).
    fn set_push(&mut self, _policy: Option<PushPolicy>) {}
    /// Takes up to `limit` jobs that are due (oldest due first) and leases them: none is
    /// handed out again before `now_ms + lease_ms`, on this process or another, so a worker
    /// that dies mid-delivery leaves its jobs to be taken again (at least once).
    fn claim_pushes(&mut self, now_ms: u64, lease_ms: u64, limit: u32)
        -> StoreResult<Vec<PushJob>>;
    /// Claimed jobs' ends, by id: delivered or given up (`None`: removed), or due again at
    /// this time with one more attempt counted.
    fn settle_pushes(&mut self, outcomes: &[(String, Option<u64>)]) -> StoreResult<()>;
    /// Enforces the queue's bounds (jobs queued before `expire_before_ms`, then the oldest
    /// beyond `max_jobs`, are dropped) and reports what is left.
    fn trim_pushes(&mut self, max_jobs: u64, expire_before_ms: u64) -> StoreResult<PushQueueState>;
}

/// A non-member's answer: `NotAMember`, but `GroupNotFound` for a direct conversation (a
/// third user learns nothing of a pair's conversation, not even that it exists).
pub(crate) fn not_a_member(group_name: &str) -> StoreError {
    if crate::model::direct::is_direct(group_name) {
        StoreError::GroupNotFound
    } else {
        StoreError::NotAMember
    }
}

/// Whether a mention list may be stored for `sender` in a conversation: each name a member,
/// `ROOM_MENTION` only from the owner or an admin. `role_of` answers a member's role (`None`
/// for a non-member) in the backend's own transaction.
pub(crate) fn check_mentions(
    mentions: &[String],
    sender_role: Role,
    mut is_member: impl FnMut(&str) -> StoreResult<bool>,
) -> StoreResult<()> {
    for name in mentions {
        if name == crate::model::ROOM_MENTION {
            if !sender_role.moderates() {
                return Err(StoreError::Forbidden(
                    "Only the owner and admins may mention @room.",
                ));
            }
        } else if !is_member(name)? {
            return Err(StoreError::NotMentionable(name.clone()));
        }
    }
    Ok(())
}

/// How `Store::rewrite` changes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite<'a> {
    /// New text, edited at this time, and its mentions when the edit names them (`None`:
    /// they stay as they were).
    Edit {
        text: &'a str,
        at: &'a str,
        mentions: Option<&'a [String]>,
    },
    /// Erase the text: the message becomes a tombstone.
    Erase,
}

/// Which of a group's oldest messages retention removes: those with `seq < below_seq`, and
/// those older than `older_than` (never the newest; see `Store::prune`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneCut<'a> {
    pub below_seq: u64,
    pub older_than: Option<&'a str>,
}

/// Opens the backend the configuration selects (one call per worker).
pub fn open(config: &Config) -> StoreResult<Box<dyn Store>> {
    let mut store: Box<dyn Store> = match &config.store {
        StoreKind::Embedded {
            data_dir,
            durable,
            wal_limit,
        } => Box::new(sqlite::SqliteStore::open(data_dir, *durable, *wal_limit)?),
        StoreKind::Mongo { uri, database } => {
            mongo::MongoStore::connect(uri, database, config.store_timeout)?
        }
        #[cfg(feature = "bench-noop")]
        StoreKind::Noop => Box::new(noop::NoopStore::open()),
    };
    store.set_push(config.push.as_ref().map(|push| PushPolicy {
        preview: push.preview,
    }));
    Ok(store)
}

/// After a clean shutdown, once every worker has closed its store: the embedded store's WAL is
/// checkpointed and cut to zero bytes, so no old page image (the text of a deleted message
/// among them) stays on disk beside the database. Nothing to do for MongoDB.
pub fn close_cleanly(config: &Config) {
    if let StoreKind::Embedded { data_dir, .. } = &config.store {
        if let Err(error) = sqlite::truncate_wal(data_dir) {
            log::warn!("the WAL was not truncated at shutdown: {error}");
        }
    }
}

/// Bytes one item adds to a JSON reply (its encoding and a separating comma), counted
/// without building the encoding.
pub(crate) fn encoded_len<T: serde::Serialize>(item: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(1);
    // Encoding a plain struct of strings and numbers cannot fail; count 0 bytes if it did.
    let _ = serde_json::to_writer(&mut counter, item);
    counter.0
}

/// Keeps the longest run of `messages` (oldest first) that fits `budget` bytes: from the oldest
/// end when `keep_oldest`, else from the newest. Returns what was kept and whether any was cut.
/// At least one message is always kept, so a reply always makes progress.
pub fn fit_messages(
    messages: Vec<Message>,
    keep_oldest: bool,
    budget: usize,
) -> (Vec<Message>, bool) {
    fit(messages, keep_oldest, budget, true)
}

/// Keeps the first items of a page that fit `budget` bytes (at least one); true when any was
/// cut. Every listing reply (groups, memberships, names) is fitted with this.
pub fn fit_page<T: serde::Serialize>(items: Vec<T>, budget: usize) -> (Vec<T>, bool) {
    fit(items, true, budget, true)
}

fn fit<T: serde::Serialize>(
    mut messages: Vec<T>,
    keep_oldest: bool,
    budget: usize,
    at_least_one: bool,
) -> (Vec<T>, bool) {
    let mut used = 0;
    let mut kept = 0;
    let sizes = messages.iter().map(encoded_len);
    let sizes: Vec<usize> = if keep_oldest {
        sizes.collect()
    } else {
        sizes.rev().collect()
    };
    for size in sizes {
        if used + size > budget && (kept > 0 || !at_least_one) {
            break;
        }
        used += size;
        kept += 1;
    }
    let cut = kept < messages.len();
    if keep_oldest {
        messages.truncate(kept);
    } else {
        messages.drain(..messages.len() - kept);
    }
    (messages, cut)
}

/// A `find_user` profile from the user's group names, read in name order with one more than
/// `MAX_GROUP_LIST` (which only says that there are more).
pub(crate) fn profile(id: String, username: &str, mut group_list: Vec<String>) -> UserProfile {
    let group_list_has_more = group_list.len() > MAX_GROUP_LIST as usize;
    group_list.truncate(MAX_GROUP_LIST as usize);
    UserProfile {
        id,
        username: username.to_string(),
        group_list,
        group_list_has_more,
    }
}

/// The `create_group` reply: the creator is the only member.
pub(crate) fn created_group(group_name: &str, username: &str, last_read: String) -> CreatedGroup {
    CreatedGroup {
        group_name: group_name.to_string(),
        user: vec![crate::model::Member {
            name_id: username.to_string(),
            last_read,
        }],
    }
}

/// What a backend reads for `enter_group`; `history` makes the reply of it.
pub(crate) struct EnterRows {
    /// Messages after the marker, oldest first, up to `MAX_UNREAD_ON_ENTER + 1`.
    pub unread: Vec<Message>,
    /// Messages at or before the marker, newest first, up to `MAX_READ_ON_ENTER`.
    pub read_newest_first: Vec<Message>,
    pub last_read_seq: u64,
    pub head_seq: u64,
    pub epoch: String,
    pub first_seq: u64,
}

/// The `enter_group` history of what was read, fitted to `budget` bytes; its `read_seq` is
/// the mark the backend then stores (see `read_seq_after_enter`), or the marker as it was
/// when the entry does not mark (`Entry::marks_entry`).
pub(crate) fn history(rows: EnterRows, budget: usize, marks_entry: bool) -> GroupHistory {
    let (unread, unread_has_more) = split_page(rows.unread, MAX_UNREAD_ON_ENTER);
    let mut read = rows.read_newest_first;
    read.reverse();
    let (unread, unread_has_more, read) = fit_history(unread, unread_has_more, read, budget);
    let read_seq = match marks_entry {
        true => read_seq_after_enter(rows.last_read_seq, rows.head_seq, &unread, unread_has_more),
        false => rows.last_read_seq,
    };
    GroupHistory {
        marker_before: rows.last_read_seq,
        unread,
        unread_has_more,
        read,
        head_seq: rows.head_seq,
        read_seq,
        epoch: rows.epoch,
        first_seq: rows.first_seq,
    }
}

/// The read mark of entering a group (the `read_seq` of its history), when it rises.
pub(crate) fn entered_mark(
    username: &str,
    group_name: &str,
    history: &GroupHistory,
) -> Option<ReadMark> {
    (history.read_seq > history.marker_before).then(|| ReadMark {
        username: username.to_string(),
        group_name: group_name.to_string(),
        seq: history.read_seq,
    })
}

/// Fits an `enter_group` history into `budget` bytes: unread first (oldest kept, the rest is
/// `unread_has_more`), then as many of the newest read messages as still fit.
pub(crate) fn fit_history(
    unread: Vec<Message>,
    unread_has_more: bool,
    read: Vec<Message>,
    budget: usize,
) -> (Vec<Message>, bool, Vec<Message>) {
    let (unread, cut) = fit_messages(unread, true, budget);
    let used: usize = unread.iter().map(encoded_len).sum();
    let read = fit(read, false, budget.saturating_sub(used), false).0;
    (unread, unread_has_more || cut, read)
}

/// The marker after entering: the newest message handed over, or the head when all were.
pub(crate) fn read_seq_after_enter(
    previous: u64,
    head_seq: u64,
    unread: &[Message],
    unread_has_more: bool,
) -> u64 {
    if unread_has_more {
        unread.last().map_or(previous, |m| m.seq).max(previous)
    } else {
        head_seq.max(previous)
    }
}

/// Splits a page of `limit + 1` rows into the page and whether there was more.
pub(crate) fn split_page(mut rows: Vec<Message>, limit: u32) -> (Vec<Message>, bool) {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    (rows, has_more)
}

#[cfg(test)]
pub(crate) mod contract;
