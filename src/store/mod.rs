//! The `Store` trait: every persistent operation the server needs, implemented by the embedded
//! SQLite backend and the MongoDB backend. Calls are blocking and run only on worker threads.

pub mod mongo;
#[cfg(feature = "bench-noop")]
pub mod noop;
pub mod sqlite;

use std::fmt;

use crate::config::{Config, StoreKind};
use crate::model::{
    CreatedGroup, GroupHistory, GroupRef, GroupSummary, Message, MessagePage, NewMessage,
    PageQuery, UserProfile, Visit,
};

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    UserNotFound,
    GroupExists,
    GroupNotFound,
    NotAMember,
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
            StoreError::Unavailable(reason) => write!(f, "store unavailable: {reason}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Persistent chat state. One instance per worker thread.
pub trait Store: Send {
    /// Finds the user, creating it if new; `true` when it was created.
    fn find_or_create_user(&mut self, username: &str) -> Result<(UserProfile, bool), StoreError>;
    fn create_group(
        &mut self,
        username: &str,
        group_name: &str,
    ) -> Result<CreatedGroup, StoreError>;
    /// Adds the user to the group; a member joining again is a success that changes nothing.
    fn join_group(&mut self, username: &str, group_name: &str) -> Result<GroupRef, StoreError>;
    fn leave_group(&mut self, username: &str, group_name: &str) -> Result<GroupRef, StoreError>;
    /// Stores a batch of messages in one commit, each with the next `seq` of its group.
    /// The result has one entry per input, in order.
    fn append_messages(&mut self, batch: &[NewMessage]) -> Vec<Result<Message, StoreError>>;
    /// Enters a room: marks `leaving` read (if any) and reports the member's `last_read` in `group_name`.
    fn visit_group(
        &mut self,
        username: &str,
        group_name: &str,
        leaving: Option<&str>,
    ) -> Result<Visit, StoreError>;
    /// Like `visit_group`, and returns the history and marks `group_name` read.
    fn enter_group(
        &mut self,
        username: &str,
        group_name: &str,
        leaving: Option<&str>,
    ) -> Result<GroupHistory, StoreError>;
    /// Sets the member's `last_read` in the group to now (a no-op for non-members).
    fn mark_read(&mut self, username: &str, group_name: &str) -> Result<(), StoreError>;
    fn fetch_messages(
        &mut self,
        username: &str,
        group_name: &str,
        page: PageQuery,
    ) -> Result<MessagePage, StoreError>;
    fn list_groups(&mut self) -> Result<Vec<GroupSummary>, StoreError>;
    /// Messages of a group with `seq > after_seq`, oldest first, at most `limit` (peer recovery).
    fn messages_after(
        &mut self,
        group_name: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;
}

/// Opens the backend the configuration selects (one call per worker).
pub fn open(config: &Config) -> Result<Box<dyn Store>, StoreError> {
    match &config.store {
        StoreKind::Embedded { data_dir, durable } => {
            Ok(Box::new(sqlite::SqliteStore::open(data_dir, *durable)?))
        }
        StoreKind::Mongo { uri, database } => {
            mongo::MongoStore::connect(uri, database, config.store_timeout)
        }
        #[cfg(feature = "bench-noop")]
        StoreKind::Noop => Ok(Box::new(noop::NoopStore::open())),
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
