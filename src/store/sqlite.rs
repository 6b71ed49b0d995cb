//! The embedded store: SQLite (WAL mode) in `DATA_DIR/noomnim.sqlite3`, one connection per worker.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::{split_page, Store, StoreError};
use crate::model::{
    new_object_id, now_timestamp, CreatedGroup, GroupHistory, GroupRef, GroupSummary, Member,
    Message, MessagePage, NewMessage, PageQuery, UserProfile, Visit, MAX_READ_ON_ENTER,
    MAX_UNREAD_ON_ENTER,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    group_name TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS members (
    group_name TEXT NOT NULL,
    username TEXT NOT NULL,
    last_read TEXT NOT NULL,
    UNIQUE (group_name, username)
);
CREATE INDEX IF NOT EXISTS members_by_user ON members (username);
CREATE TABLE IF NOT EXISTS messages (
    group_name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    username TEXT NOT NULL,
    text TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    PRIMARY KEY (group_name, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (group_name, timestamp);
";

const MESSAGE_COLUMNS: &str = "id, group_name, username, text, timestamp, seq";

/// One worker's connection to the embedded database.
pub struct SqliteStore {
    connection: Connection,
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Unavailable(format!("sqlite: {error}"))
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database under `data_dir`. `durable`: every commit is
    /// fsynced before it is acknowledged (`synchronous=FULL`); otherwise commits survive a
    /// process crash but the last ones may be lost to a power cut (`NORMAL`).
    pub fn open(data_dir: &Path, durable: bool) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let path = data_dir.join("noomnim.sqlite3");
        let connection = Connection::open(&path)?;
        connection.busy_timeout(Duration::from_secs(10))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
        // Checkpoints run on their own thread, so no commit waits for one.
        connection.pragma_update(None, "wal_autocheckpoint", 0)?;
        connection.execute_batch(SCHEMA)?;
        start_checkpointer(path);
        Ok(SqliteStore { connection })
    }

    /// Begins a write transaction. Writers of this process take turns on a mutex first: SQLite's
    /// own lock makes a waiting connection sleep in steps of up to 100 ms, which under load
    /// turned into second-long stalls; the mutex hands the turn over at once.
    fn write(&mut self) -> Result<WriteTx<'_>, StoreError> {
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Ok(WriteTx { tx, _turn: turn })
    }
}

/// A write transaction and this process's writer turn (released after the transaction ends).
struct WriteTx<'a> {
    tx: Transaction<'a>,
    _turn: MutexGuard<'static, ()>,
}

impl<'a> std::ops::Deref for WriteTx<'a> {
    type Target = Transaction<'a>;

    fn deref(&self) -> &Transaction<'a> {
        &self.tx
    }
}

impl WriteTx<'_> {
    fn commit(self) -> rusqlite::Result<()> {
        self.tx.commit()
    }
}

/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Starts (once per process) the thread that checkpoints the WAL in the background.
fn start_checkpointer(path: std::path::PathBuf) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_forever(&path));
        if let Err(error) = spawned {
            log::warn!("cannot start the checkpoint thread: {error}");
        }
    });
}

fn checkpoint_forever(path: &Path) {
    let connection = match Connection::open(path) {
        Ok(connection) => connection,
        Err(error) => {
            log::warn!("checkpoint thread cannot open {}: {error}", path.display());
            return;
        }
    };
    let _ = connection.busy_timeout(Duration::from_secs(1));
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        let done = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        if let Err(error) = done {
            log::debug!("checkpoint skipped: {error}");
        }
    }
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: row.get(0)?,
        group_name: row.get(1)?,
        username: row.get(2)?,
        text: row.get(3)?,
        timestamp: row.get(4)?,
        seq: row.get::<_, i64>(5)? as u64,
    })
}

fn query_messages(
    tx: &Connection,
    filter: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<Message>, StoreError> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE {filter}");
    let mut statement = tx.prepare_cached(&sql)?;
    let rows = statement.query_map(args, message_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn user_exists(tx: &Connection, username: &str) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM users WHERE username = ?1")?
        .exists([username])?)
}

fn group_id(tx: &Connection, group_name: &str) -> Result<String, StoreError> {
    tx.prepare_cached("SELECT id FROM groups WHERE group_name = ?1")?
        .query_row([group_name], |row| row.get(0))
        .optional()?
        .ok_or(StoreError::GroupNotFound)
}

/// The member's `last_read`, after checking that the group exists and the user belongs to it.
fn member_last_read(
    tx: &Connection,
    username: &str,
    group_name: &str,
) -> Result<String, StoreError> {
    group_id(tx, group_name)?;
    tx.prepare_cached("SELECT last_read FROM members WHERE group_name = ?1 AND username = ?2")?
        .query_row([group_name, username], |row| row.get(0))
        .optional()?
        .ok_or(StoreError::NotAMember)
}

fn set_last_read(tx: &Connection, username: &str, group_name: &str) -> Result<(), StoreError> {
    tx.prepare_cached("UPDATE members SET last_read = ?3 WHERE group_name = ?1 AND username = ?2")?
        .execute(params![group_name, username, now_timestamp()])?;
    Ok(())
}

fn head_seq(tx: &Connection, group_name: &str) -> Result<u64, StoreError> {
    let seq: i64 = tx
        .prepare_cached("SELECT last_seq FROM groups WHERE group_name = ?1")?
        .query_row([group_name], |row| row.get(0))?;
    Ok(seq as u64)
}

fn append_one(
    tx: &Connection,
    message: &NewMessage,
    timestamp: &str,
) -> Result<Message, StoreError> {
    member_last_read(tx, &message.username, &message.group_name)?;
    let seq: i64 = tx
        .prepare_cached(
            "UPDATE groups SET last_seq = last_seq + 1 WHERE group_name = ?1 RETURNING last_seq",
        )?
        .query_row([&message.group_name], |row| row.get(0))?;
    let stored = Message {
        id: new_object_id(),
        group_name: message.group_name.clone(),
        username: message.username.clone(),
        text: message.text.clone(),
        timestamp: timestamp.to_string(),
        seq: seq as u64,
    };
    tx.prepare_cached(
        "INSERT INTO messages (id, group_name, username, text, timestamp, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![stored.id, stored.group_name, stored.username, stored.text, stored.timestamp, seq])?;
    Ok(stored)
}

impl Store for SqliteStore {
    fn find_or_create_user(&mut self, username: &str) -> Result<(UserProfile, bool), StoreError> {
        let tx = self.write()?;
        let existing: Option<String> = tx
            .prepare_cached("SELECT id FROM users WHERE username = ?1")?
            .query_row([username], |row| row.get(0))
            .optional()?;
        let created = existing.is_none();
        let id = match existing {
            Some(id) => id,
            None => {
                let id = new_object_id();
                tx.execute(
                    "INSERT INTO users (username, id) VALUES (?1, ?2)",
                    [username, &id],
                )?;
                id
            }
        };
        let group_list = tx
            .prepare_cached("SELECT group_name FROM members WHERE username = ?1 ORDER BY rowid")?
            .query_map([username], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        tx.commit()?;
        Ok((
            UserProfile {
                id,
                username: username.to_string(),
                group_list,
            },
            created,
        ))
    }

    fn create_group(
        &mut self,
        username: &str,
        group_name: &str,
    ) -> Result<CreatedGroup, StoreError> {
        let tx = self.write()?;
        if !user_exists(&tx, username)? {
            return Err(StoreError::UserNotFound);
        }
        if group_id(&tx, group_name).is_ok() {
            return Err(StoreError::GroupExists);
        }
        let last_read = now_timestamp();
        tx.execute(
            "INSERT INTO groups (group_name, id) VALUES (?1, ?2)",
            [group_name, &new_object_id()],
        )?;
        tx.execute(
            "INSERT INTO members (group_name, username, last_read) VALUES (?1, ?2, ?3)",
            [group_name, username, &last_read],
        )?;
        tx.commit()?;
        let user = vec![Member {
            name_id: username.to_string(),
            last_read,
        }];
        Ok(CreatedGroup {
            group_name: group_name.to_string(),
            user,
        })
    }

    fn join_group(&mut self, username: &str, group_name: &str) -> Result<GroupRef, StoreError> {
        let tx = self.write()?;
        if !user_exists(&tx, username)? {
            return Err(StoreError::UserNotFound);
        }
        let group_id = group_id(&tx, group_name)?;
        tx.execute(
            "INSERT OR IGNORE INTO members (group_name, username, last_read) VALUES (?1, ?2, ?3)",
            [group_name, username, &now_timestamp()],
        )?;
        tx.commit()?;
        Ok(GroupRef {
            group_id,
            group_name: group_name.to_string(),
        })
    }

    fn leave_group(&mut self, username: &str, group_name: &str) -> Result<GroupRef, StoreError> {
        let tx = self.write()?;
        if !user_exists(&tx, username)? {
            return Err(StoreError::UserNotFound);
        }
        let group_id = group_id(&tx, group_name)?;
        let removed = tx.execute(
            "DELETE FROM members WHERE group_name = ?1 AND username = ?2",
            [group_name, username],
        )?;
        if removed == 0 {
            return Err(StoreError::NotAMember);
        }
        tx.commit()?;
        Ok(GroupRef {
            group_id,
            group_name: group_name.to_string(),
        })
    }

    fn append_messages(&mut self, batch: &[NewMessage]) -> Vec<Result<Message, StoreError>> {
        let unavailable = |error: StoreError| batch.iter().map(|_| Err(error.clone())).collect();
        let tx = match self.write() {
            Ok(tx) => tx,
            Err(error) => return unavailable(error),
        };
        let timestamp = now_timestamp();
        let results: Vec<_> = batch
            .iter()
            .map(|message| append_one(&tx, message, &timestamp))
            .collect();
        if let Some(Err(error @ StoreError::Unavailable(_))) = results.iter().find(|r| r.is_err()) {
            return unavailable(error.clone());
        }
        match tx.commit() {
            Ok(()) => results,
            Err(error) => unavailable(error.into()),
        }
    }

    fn visit_group(
        &mut self,
        username: &str,
        group_name: &str,
        leaving: Option<&str>,
    ) -> Result<Visit, StoreError> {
        let tx = self.write()?;
        let last_read = member_last_read(&tx, username, group_name)?;
        if let Some(left) = leaving {
            set_last_read(&tx, username, left)?;
        }
        let head_seq = head_seq(&tx, group_name)?;
        tx.commit()?;
        Ok(Visit {
            last_read,
            head_seq,
        })
    }

    fn enter_group(
        &mut self,
        username: &str,
        group_name: &str,
        leaving: Option<&str>,
    ) -> Result<GroupHistory, StoreError> {
        let tx = self.write()?;
        let last_read = member_last_read(&tx, username, group_name)?;
        let unread = query_messages(
            &tx,
            "group_name = ?1 AND timestamp > ?2 ORDER BY seq LIMIT ?3",
            params![group_name, last_read, MAX_UNREAD_ON_ENTER + 1],
        )?;
        let (unread, unread_has_more) = split_page(unread, MAX_UNREAD_ON_ENTER);
        let mut read = query_messages(
            &tx,
            "group_name = ?1 AND timestamp <= ?2 ORDER BY seq DESC LIMIT ?3",
            params![group_name, last_read, MAX_READ_ON_ENTER],
        )?;
        read.reverse();
        for group in leaving.into_iter().chain(Some(group_name)) {
            set_last_read(&tx, username, group)?;
        }
        let head_seq = head_seq(&tx, group_name)?;
        tx.commit()?;
        Ok(GroupHistory {
            unread,
            unread_has_more,
            read,
            head_seq,
        })
    }

    fn mark_read(&mut self, username: &str, group_name: &str) -> Result<(), StoreError> {
        set_last_read(&self.connection, username, group_name)
    }

    fn fetch_messages(
        &mut self,
        username: &str,
        group_name: &str,
        page: PageQuery,
    ) -> Result<MessagePage, StoreError> {
        let tx = self.connection.transaction()?;
        member_last_read(&tx, username, group_name)?;
        let after = page.after_seq.unwrap_or(0) as i64;
        let before = page
            .before_seq
            .map_or(i64::MAX, |seq| seq.min(i64::MAX as u64) as i64);
        let order = if page.after_seq.is_some() {
            "ASC"
        } else {
            "DESC"
        };
        let filter =
            format!("group_name = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq {order} LIMIT ?4");
        let rows = query_messages(
            &tx,
            &filter,
            params![group_name, after, before, page.limit + 1],
        )?;
        let (mut messages, has_more) = split_page(rows, page.limit);
        if page.after_seq.is_none() {
            messages.reverse();
        }
        Ok(MessagePage { messages, has_more })
    }

    fn list_groups(&mut self) -> Result<Vec<GroupSummary>, StoreError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT g.group_name, m.username FROM groups g LEFT JOIN members m ON m.group_name = g.group_name
             ORDER BY g.group_name, m.rowid",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
        })?;
        let mut groups: Vec<GroupSummary> = Vec::new();
        for row in rows {
            let (group_name, member) = row?;
            if groups.last().map(|g| &g.group_name) != Some(&group_name) {
                groups.push(GroupSummary {
                    group_name,
                    members: Vec::new(),
                });
            }
            if let (Some(member), Some(group)) = (member, groups.last_mut()) {
                group.members.push(member);
            }
        }
        Ok(groups)
    }

    fn messages_after(
        &mut self,
        group_name: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        query_messages(
            &self.connection,
            "group_name = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            params![group_name, after_seq as i64, limit],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(name: &str) -> (SqliteStore, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("noomnim-sqlite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (SqliteStore::open(&dir, true).expect("open store"), dir)
    }

    #[test]
    fn satisfies_the_store_contract() {
        let (mut store, dir) = temp_store("contract");
        super::super::contract::check_all(&mut store, "");
        let _ = std::fs::remove_dir_all(dir);
    }
}
