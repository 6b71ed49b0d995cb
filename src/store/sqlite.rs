//! The embedded store: SQLite (WAL mode) in `DATA_DIR/noomnim.sqlite3`, one connection per worker.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::{
    check_mentions, created_group, entered_mark, history, not_a_member, profile, split_page,
    EnterRows, PruneCut, Rewrite, Store, StoreError, StoreResult,
};
use crate::model::{
    direct, new_object_id, now_timestamp, push_recipients, unix_millis, Appended, Attention,
    CreatedGroup, Entry, GroupHistory, GroupReadState, GroupRef, GroupSummary, GroupsPage,
    GroupsQuery, MemberOf, MembershipsPage, Message, MessagePage, NewMessage, Notify, PageQuery,
    PushJob, PushPolicy, PushQueueState, ReadMark, Role, UserProfile, Visit, MAX_GROUP_LIST,
    MAX_LISTED_MEMBERS, MAX_READ_ON_ENTER, MAX_UNREAD_ON_ENTER,
};

/// The schema version this code writes (`PRAGMA user_version`). 0: a database made before
/// versions existed (v1: no read marker by seq, no group creator), or a new file.
const SCHEMA_VERSION: i64 = 6;

/// The v1 tables, as the first release created them; migrations run from here.
const SCHEMA_V1: &str = "
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

/// v1 → v2: a read marker by seq beside the seed's `last_read` time (filled from it, so what
/// was read stays read), and who created each group (for `MAX_GROUPS_PER_USER`; groups made
/// before v2 have no creator and count for nobody).
const MIGRATE_V1_TO_V2: &str = "
ALTER TABLE members ADD COLUMN last_read_seq INTEGER NOT NULL DEFAULT 0;
UPDATE members SET last_read_seq = (
    SELECT COALESCE(MAX(m.seq), 0) FROM messages m
    WHERE m.group_name = members.group_name AND m.timestamp <= members.last_read
);
ALTER TABLE groups ADD COLUMN creator TEXT;
CREATE INDEX IF NOT EXISTS groups_by_creator ON groups (creator);
";

/// v2 → v3: idempotent sends. The unique index is the rule "at most one message per
/// (username, client_msg_id)"; messages sent without an id (NULL) are not in it.
const MIGRATE_V2_TO_V3: &str = "
ALTER TABLE messages ADD COLUMN client_msg_id TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_client_msg_id
    ON messages (username, client_msg_id) WHERE client_msg_id IS NOT NULL;
";

/// v3 → v4: messages people manage. Edits (`edited_at`) and tombstones (`deleted`, text
/// erased); roles (the creator of a group becomes its owner); bans; where retention left a
/// group's history starting (`first_seq`); and user erasures, which running servers poll to
/// close the erased user's connections.
const MIGRATE_V3_TO_V4: &str = "
ALTER TABLE messages ADD COLUMN edited_at TEXT;
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
UPDATE members SET role = 'owner'
    WHERE username = (SELECT creator FROM groups g WHERE g.group_name = members.group_name);
ALTER TABLE groups ADD COLUMN first_seq INTEGER NOT NULL DEFAULT 1;
CREATE TABLE IF NOT EXISTS bans (
    group_name TEXT NOT NULL,
    username TEXT NOT NULL,
    PRIMARY KEY (group_name, username)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS erasures (
    username TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS erasures_by_time ON erasures (at);
";

/// v4 → v5: talking to one person and getting attention. A group's `kind` ('direct' for a
/// direct conversation, NULL for a group); a member's `hidden` (a direct conversation they
/// left or were never shown yet) and notification level; each message's mention list (JSON)
/// and one row per mentioned name (`mentions`, counted after a member's marker); who blocks
/// whom; and the offline push queue, written in the commit of the message it tells of.
const MIGRATE_V4_TO_V5: &str = "
ALTER TABLE groups ADD COLUMN kind TEXT;
ALTER TABLE members ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN notify TEXT NOT NULL DEFAULT 'all';
ALTER TABLE messages ADD COLUMN mentions TEXT;
CREATE TABLE IF NOT EXISTS mentions (
    group_name TEXT NOT NULL,
    username TEXT NOT NULL,
    seq INTEGER NOT NULL,
    author TEXT NOT NULL,
    PRIMARY KEY (group_name, username, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    blocker TEXT NOT NULL,
    blocked TEXT NOT NULL,
    PRIMARY KEY (blocker, blocked)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_blocked ON blocks (blocked);
CREATE TABLE IF NOT EXISTS push_queue (
    id TEXT PRIMARY KEY NOT NULL,
    username TEXT NOT NULL,
    group_name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    kind TEXT NOT NULL,
    preview TEXT,
    created_ms INTEGER NOT NULL,
    next_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS push_queue_by_due ON push_queue (next_ms);
CREATE INDEX IF NOT EXISTS push_queue_by_age ON push_queue (created_ms);
";

/// v5 → v6: threads. A reply's `reply_to` (its thread's root), and on each root the count of
/// its replies that are not deleted and the newest of them, kept in the commits that change
/// them (`recount_replies`); replies found by thread through a partial index.
const MIGRATE_V5_TO_V6: &str = "
ALTER TABLE messages ADD COLUMN reply_to INTEGER;
ALTER TABLE messages ADD COLUMN reply_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN last_reply_seq INTEGER;
CREATE INDEX IF NOT EXISTS messages_by_thread ON messages (group_name, reply_to, seq)
    WHERE reply_to IS NOT NULL;
";

/// v1's index of messages by time serves only the v1 → v2 migration above (read state is by
/// `seq` since v2) but cost a B-tree update, about one more page per group written, in every
/// commit of messages. Dropped without a version step: a server of the same schema version
/// never reads it, so an older v3 server still opens the file.
const DROP_UNUSED_INDEXES: &str = "DROP INDEX IF EXISTS messages_by_time;";

/// A user's memberships by group name (`find_user`'s `group_list`, `my_groups` pages): read
/// in name order from the index instead of sorting every membership of the user. Created
/// without a version step, like the drop above: an older server of the same version ignores it.
const ADD_INDEXES: &str =
    "CREATE INDEX IF NOT EXISTS members_by_user_and_group ON members (username, group_name);";

const MESSAGE_COLUMNS: &str =
    "id, group_name, username, text, timestamp, seq, client_msg_id, edited_at, deleted, mentions,
     reply_to, reply_count, last_reply_seq";

/// One worker's connection to the embedded database.
pub struct SqliteStore {
    connection: Connection,
    /// What each stored message queues for the push webhook (`None`: push is off).
    push: Option<PushPolicy>,
    /// The newest erasure `erasures_since` has reported (later ones ask for a WAL cut once).
    newest_erasure_seen: u64,
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Unavailable(format!("sqlite: {error}"))
    }
}

/// The embedded store's database file in `DATA_DIR` (its `-wal` and `-shm` beside it).
pub const DATABASE_FILE: &str = "noomnim.sqlite3";

/// Where the embedded store of `data_dir` keeps its database.
pub fn database_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(DATABASE_FILE)
}

impl SqliteStore {
    /// Opens (creating if needed) the database under `data_dir`. `durable`: every commit is
    /// fsynced before it is acknowledged (`synchronous=FULL`); otherwise commits survive a
    /// process crash but the last ones may be lost to a power cut (`NORMAL`).
    pub fn open(data_dir: &Path, durable: bool, wal_limit: u64) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let path = database_path(data_dir);
        let connection = Connection::open(&path)?;
        connection.busy_timeout(Duration::from_secs(10))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
        // A deleted message's text (and a pruned or erased one's) is overwritten with zeros in
        // the file, not just unlinked from the B-tree: deleting erases.
        connection.pragma_update(None, "secure_delete", "ON")?;
        // Checkpoints run on their own thread, so no commit waits for one.
        connection.pragma_update(None, "wal_autocheckpoint", 0)?;
        // After a checkpoint resets the WAL, SQLite truncates the file back to this size, so a
        // burst of writes does not leave a huge WAL on disk for good.
        connection.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
        let mut store = SqliteStore {
            connection,
            push: None,
            newest_erasure_seen: 0,
        };
        store.migrate()?;
        start_checkpointer(path, wal_limit);
        Ok(store)
    }

    /// Brings the schema to `SCHEMA_VERSION`, one step at a time, in one transaction.
    fn migrate(&mut self) -> StoreResult<()> {
        let tx = self.write()?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Unavailable(format!(
                "the database has schema version {version}, newer than this server's {SCHEMA_VERSION}"
            )));
        }
        // Say so when an existing database is upgraded: on a large one it can take a while.
        let existing: bool = tx
            .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'users'")?
            .exists([])?;
        let upgrading = existing && version < SCHEMA_VERSION;
        let started = std::time::Instant::now();
        if upgrading {
            log::info!("upgrading the embedded store from schema {version} to {SCHEMA_VERSION}");
        }
        if version < 2 {
            tx.execute_batch(SCHEMA_V1)?;
            tx.execute_batch(MIGRATE_V1_TO_V2)?;
        }
        if version < 3 {
            tx.execute_batch(MIGRATE_V2_TO_V3)?;
        }
        if version < 4 {
            tx.execute_batch(MIGRATE_V3_TO_V4)?;
        }
        if version < 5 {
            tx.execute_batch(MIGRATE_V4_TO_V5)?;
        }
        if version < 6 {
            tx.execute_batch(MIGRATE_V5_TO_V6)?;
        }
        tx.execute_batch(DROP_UNUSED_INDEXES)?;
        tx.execute_batch(ADD_INDEXES)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        if upgrading {
            log::info!(
                "schema upgrade done in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// Begins a write transaction. Writers of this process take turns on a mutex first: SQLite's
    /// own lock makes a waiting connection sleep in steps of up to 100 ms, which under load
    /// turned into second-long stalls; the mutex hands the turn over at once.
    fn write(&mut self) -> StoreResult<WriteTx<'_>> {
        let turn = writer_turn();
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Ok(WriteTx { tx, _turn: turn })
    }
}

/// This process's writers (and the checkpointer when it must reset the WAL) take turns here.
static TURN: Mutex<()> = Mutex::new(());

fn writer_turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// Checkpoints the whole WAL into the database file and truncates it to zero bytes (during
/// the writers' turn; at shutdown nobody waits for it).
pub fn truncate_wal(data_dir: &Path) -> rusqlite::Result<()> {
    let connection = Connection::open(database_path(data_dir))?;
    connection.busy_timeout(Duration::from_secs(5))?;
    let _turn = writer_turn();
    connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// At most this often the WAL is cut to zero bytes because text was erased (so a client
/// deleting in a loop costs the writers at most one TRUNCATE, 25-37 ms, a second).
const SCRUB_EVERY: Duration = Duration::from_secs(1);

/// How long a checkpoint holding the writers' turn waits for readers of an older snapshot (a
/// backup's long read, say) before giving up until the next round: never long enough to be
/// felt by a sender.
const CHECKPOINT_WAIT: Duration = Duration::from_millis(10);

/// Set when a commit overwrote or removed message text (an edit, a delete, retention, a
/// group's deletion): the old text still sits in WAL frames until the WAL is cut, so the
/// checkpointer cuts it (TRUNCATE) within about `SCRUB_EVERY`. Starts set: a WAL left by a
/// crash may hold erased text too.
static ERASED_TEXT_IN_WAL: AtomicBool = AtomicBool::new(true);

/// Asks the checkpointer to cut the WAL soon (text was erased).
fn scrub_wal_soon() {
    ERASED_TEXT_IN_WAL.store(true, Ordering::Relaxed);
}

/// Starts (once per process) the thread that checkpoints the WAL in the background.
fn start_checkpointer(path: std::path::PathBuf, wal_limit: u64) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_forever(&path, wal_limit));
        if let Err(error) = spawned {
            log::warn!("cannot start the checkpoint thread: {error}");
        }
    });
}

/// Runs `PRAGMA wal_checkpoint(mode)`; true when it completed (false: readers or a writer of
/// another process were in the way, and it did what it could).
fn checkpoint(connection: &Connection, mode: &str) -> rusqlite::Result<bool> {
    connection.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok(row.get::<_, i64>(0)? == 0)
    })
}

/// Checkpoints every `CHECKPOINT_EVERY`; past `wal_limit` bytes of WAL, also resets it; after
/// text was erased, cuts it to nothing.
fn checkpoint_forever(path: &Path, wal_limit: u64) {
    let connection = match Connection::open(path) {
        Ok(connection) => connection,
        Err(error) => {
            log::warn!("checkpoint thread cannot open {}: {error}", path.display());
            return;
        }
    };
    // Only RESTART and TRUNCATE wait (PASSIVE never does), and they wait holding the writers'
    // turn: a backup's long read once kept every sender waiting a whole second here.
    let _ = connection.busy_timeout(CHECKPOINT_WAIT);
    let wal = path.with_extension("sqlite3-wal");
    // When the last RESTART happened, as the WAL's modification time then.
    let mut restarted = None;
    let mut scrubbed: Option<std::time::Instant> = None;
    let written_at = |wal: &Path| std::fs::metadata(wal).and_then(|m| m.modified()).ok();
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        // A passive checkpoint never blocks a writer, but under a steady stream of commits it
        // never catches up with the WAL's end, and the WAL only starts over from its beginning
        // once a checkpoint has caught up: so it grows without bound. Past the limit, one
        // RESTART checkpoint during the writers' turn catches up (most pages were already
        // copied by the passive ones) and makes the next commit start over at the file's
        // beginning and cut the file back towards `journal_size_limit` (the same limit).
        // Not TRUNCATE while writers are busy: cutting the file to zero cost 25-37 ms under
        // their turn (a journaled truncate, then every later commit appends to fresh blocks),
        // RESTART 0.03-6 ms (docs/BENCHMARKS-LOG.md). Still over the limit and not written since
        // the last RESTART: no commit came to reuse the file, so TRUNCATE, which then keeps no
        // one waiting, gives the space back. Erased text is the exception: it must leave the
        // WAL, and only TRUNCATE takes it out of the file.
        let mut done = checkpoint(&connection, "PASSIVE").map(|_| ());
        let over = std::fs::metadata(&wal).is_ok_and(|m| m.len() > wal_limit);
        let scrub_due = ERASED_TEXT_IN_WAL.load(Ordering::Relaxed)
            && scrubbed.is_none_or(|at| at.elapsed() >= SCRUB_EVERY);
        if done.is_ok() && (over || scrub_due) {
            let idle = restarted.is_some() && restarted == written_at(&wal);
            let mode = if idle || scrub_due {
                "TRUNCATE"
            } else {
                "RESTART"
            };
            if scrub_due {
                // Cleared first: text erased while this runs sets it again.
                ERASED_TEXT_IN_WAL.store(false, Ordering::Relaxed);
                scrubbed = Some(std::time::Instant::now());
            }
            let _turn = writer_turn();
            let held = std::time::Instant::now();
            let completed = checkpoint(&connection, mode);
            log::debug!("WAL {mode} held the writers for {:?}", held.elapsed());
            if scrub_due && !matches!(completed, Ok(true)) {
                scrub_wal_soon();
            }
            done = completed.map(|_| ());
            restarted = if idle || mode == "TRUNCATE" {
                None
            } else {
                written_at(&wal)
            };
        } else {
            restarted = None;
        }
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
        client_msg_id: row.get(6)?,
        edited_at: row.get(7)?,
        deleted: row.get::<_, i64>(8)? != 0,
        mentions: decode_mentions(row.get(9)?),
        reply_to: row.get::<_, Option<i64>>(10)?.map(|seq| seq as u64),
        reply_count: row.get::<_, i64>(11)? as u64,
        last_reply_seq: row.get::<_, Option<i64>>(12)?.map(|seq| seq as u64),
    })
}

/// The root of the thread a reply to `seq` joins: `seq` itself, or its root when it is a
/// reply. `MessageNotFound` when there is no such message or it was deleted.
fn thread_root(tx: &Connection, group_name: &str, seq: u64) -> StoreResult<u64> {
    let parent: Option<(Option<i64>, i64)> = tx
        .prepare_cached(
            "SELECT reply_to, deleted FROM messages WHERE group_name = ?1 AND seq = ?2",
        )?
        .query_row(
            params![group_name, seq.min(i64::MAX as u64) as i64],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    match parent {
        Some((_, deleted)) if deleted != 0 => Err(StoreError::MessageNotFound),
        Some((root, _)) => Ok(root.map_or(seq, |root| root as u64)),
        None => Err(StoreError::MessageNotFound),
    }
}

/// Sets a thread root's `reply_count` and `last_reply_seq` from its replies that are not
/// deleted (after a delete, retention or an erasure took some).
fn recount_replies(tx: &Connection, group_name: &str, root: u64) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE messages SET
            reply_count = (SELECT COUNT(*) FROM messages r WHERE r.group_name = ?1
                AND r.reply_to = ?2 AND r.deleted = 0),
            last_reply_seq = (SELECT MAX(r.seq) FROM messages r WHERE r.group_name = ?1
                AND r.reply_to = ?2 AND r.deleted = 0)
         WHERE group_name = ?1 AND seq = ?2",
    )?
    .execute(params![group_name, root as i64])?;
    Ok(())
}

/// A message's stored mention list (a JSON array; NULL when it names nobody).
fn decode_mentions(stored: Option<String>) -> Vec<String> {
    stored
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

fn encode_mentions(mentions: &[String]) -> Option<String> {
    (!mentions.is_empty())
        .then(|| serde_json::to_string(mentions).ok())
        .flatten()
}

/// Records who a message mentions (the author never counts as mentioning themself).
fn write_mentions(tx: &Connection, message: &Message) -> StoreResult<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO mentions (group_name, username, seq, author) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for name in message.mentions.iter().filter(|n| **n != message.username) {
        insert.execute(params![
            message.group_name,
            name,
            message.seq as i64,
            message.username
        ])?;
    }
    Ok(())
}

/// The SQL count of mentions of a user (by name or `@room`, by others) in a group after a
/// seq, given the three as SQL expressions: one text for `mention_count` and `my_groups`.
macro_rules! mentions_after {
    ($user:literal, $group:literal, $after:literal) => {
        concat!(
            "(SELECT COUNT(*) FROM mentions x WHERE x.group_name = ",
            $group,
            " AND x.username IN (",
            $user,
            ", '@room') AND x.seq > ",
            $after,
            " AND x.author != ",
            $user,
            ")"
        )
    };
}

/// Mentions of `username` (by name or `@room`, by others) after their marker.
fn mention_count(
    tx: &Connection,
    username: &str,
    group_name: &str,
    after: u64,
) -> StoreResult<u64> {
    let count: i64 = tx
        .prepare_cached(concat!("SELECT ", mentions_after!("?2", "?1", "?3")))?
        .query_row(params![group_name, username, after as i64], |row| {
            row.get(0)
        })?;
    Ok(count as u64)
}

/// The attention fields of one membership (`model::Attention`).
fn attention_of(
    tx: &Connection,
    username: &str,
    group_name: &str,
    mark: u64,
) -> StoreResult<Attention> {
    let (notify, kind, with): (String, Option<String>, Option<String>) = tx
        .prepare_cached(
            "SELECT m.notify, g.kind, (SELECT o.username FROM members o
                 WHERE g.kind IS NOT NULL AND o.group_name = m.group_name AND o.username != ?2)
             FROM members m JOIN groups g ON g.group_name = m.group_name
             WHERE m.group_name = ?1 AND m.username = ?2",
        )?
        .query_row([group_name, username], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?
        .ok_or_else(|| not_a_member(group_name))?;
    Ok(Attention {
        mention_count: mention_count(tx, username, group_name, mark)?,
        notify: Notify::parse(&notify).unwrap_or_default(),
        kind,
        with,
    })
}

/// The other member of a direct conversation (`None`: they were erased).
fn direct_partner(
    tx: &Connection,
    group_name: &str,
    username: &str,
) -> StoreResult<Option<String>> {
    Ok(tx
        .prepare_cached(
            "SELECT username FROM members WHERE group_name = ?1 AND username != ?2 LIMIT 1",
        )?
        .query_row([group_name, username], |row| row.get(0))
        .optional()?)
}

/// Queues the push jobs of a stored message (direct, or mentioning someone), in its commit.
fn queue_pushes(
    tx: &Connection,
    message: &Message,
    is_direct: bool,
    policy: PushPolicy,
) -> StoreResult<()> {
    if !is_direct && message.mentions.is_empty() {
        return Ok(());
    }
    let members: Vec<(String, Notify)> = tx
        .prepare_cached("SELECT username, notify FROM members WHERE group_name = ?1")?
        .query_map([&message.group_name], |row| {
            let level: String = row.get(1)?;
            Ok((row.get(0)?, Notify::parse(&level).unwrap_or_default()))
        })?
        .collect::<Result<_, _>>()?;
    let recipients = push_recipients(message, is_direct, &members);
    let mut insert = tx.prepare_cached(
        "INSERT INTO push_queue (id, username, group_name, seq, sender, kind, preview,
         created_ms, next_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
    )?;
    for job in PushJob::for_message(message, &recipients, policy) {
        insert.execute(params![
            job.id,
            job.username,
            job.group_name,
            job.seq as i64,
            job.sender,
            job.kind,
            job.preview,
            job.created_ms as i64
        ])?;
    }
    Ok(())
}

/// A message no longer counts as mentioning anyone (deleted, or its mentions edited).
fn forget_mentions(tx: &Connection, group_name: &str, seq: i64) -> StoreResult<()> {
    tx.prepare_cached("DELETE FROM mentions WHERE group_name = ?1 AND seq = ?2")?
        .execute(params![group_name, seq])?;
    Ok(())
}

/// Everyone `username` blocks, by name.
fn blocked_by(tx: &Connection, username: &str) -> StoreResult<Vec<String>> {
    Ok(tx
        .prepare_cached("SELECT blocked FROM blocks WHERE blocker = ?1 ORDER BY blocked")?
        .query_map([username], |row| row.get(0))?
        .collect::<Result<Vec<String>, _>>()?)
}

fn blocks(tx: &Connection, blocker: &str, blocked: &str) -> StoreResult<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM blocks WHERE blocker = ?1 AND blocked = ?2")?
        .exists([blocker, blocked])?)
}

fn is_member(tx: &Connection, group_name: &str, username: &str) -> StoreResult<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM members WHERE group_name = ?1 AND username = ?2")?
        .exists([group_name, username])?)
}

fn query_messages(
    tx: &Connection,
    filter: &str,
    args: impl rusqlite::Params,
) -> StoreResult<Vec<Message>> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE {filter}");
    let mut statement = tx.prepare_cached(&sql)?;
    let rows = statement.query_map(args, message_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn user_exists(tx: &Connection, username: &str) -> StoreResult<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM users WHERE username = ?1")?
        .exists([username])?)
}

fn group_id(tx: &Connection, group_name: &str) -> StoreResult<String> {
    Ok(group_row(tx, group_name)?.0)
}

/// A group's id and `first_seq`.
fn group_row(tx: &Connection, group_name: &str) -> StoreResult<(String, u64)> {
    tx.prepare_cached("SELECT id, first_seq FROM groups WHERE group_name = ?1")?
        .query_row([group_name], |row| {
            Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
        })
        .optional()?
        .ok_or(StoreError::GroupNotFound)
}

/// A membership as the queries need it.
struct MemberState {
    group_id: String,
    first_seq: u64,
    last_read: String,
    last_read_seq: u64,
}

/// The member's read state and the group's id, after checking that the group exists and the
/// user belongs to it.
fn member_state(tx: &Connection, username: &str, group_name: &str) -> StoreResult<MemberState> {
    let (group_id, first_seq) = group_row(tx, group_name)?;
    let (last_read, last_read_seq) = tx
        .prepare_cached(
            "SELECT last_read, last_read_seq FROM members WHERE group_name = ?1 AND username = ?2",
        )?
        .query_row([group_name, username], |row| {
            Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
        })
        .optional()?
        .ok_or_else(|| not_a_member(group_name))?;
    Ok(MemberState {
        group_id,
        first_seq,
        last_read,
        last_read_seq,
    })
}

/// The message `username` stored under `client_msg_id`, if any.
fn sent_before(
    tx: &Connection,
    username: &str,
    client_msg_id: &str,
) -> StoreResult<Option<Message>> {
    Ok(query_messages(
        tx,
        "username = ?1 AND client_msg_id = ?2",
        params![username, client_msg_id],
    )?
    .pop())
}

/// Raises a read marker (see `Store::mark_read`). SQLite evaluates every `SET` expression
/// against the row as it was, so `last_read_seq` on the right is the old marker.
fn set_read(tx: &Connection, mark: &ReadMark) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE members SET
            last_read = CASE
                WHEN ?3 >= (SELECT last_seq FROM groups g WHERE g.group_name = ?1) THEN ?4
                WHEN ?3 > last_read_seq THEN COALESCE(
                    (SELECT timestamp FROM messages m WHERE m.group_name = ?1 AND m.seq = ?3),
                    last_read)
                ELSE last_read END,
            last_read_seq = MAX(last_read_seq, ?3)
         WHERE group_name = ?1 AND username = ?2",
    )?
    .execute(params![
        mark.group_name,
        mark.username,
        mark.seq.min(i64::MAX as u64) as i64,
        now_timestamp()
    ])?;
    Ok(())
}

fn head_seq(tx: &Connection, group_name: &str) -> StoreResult<u64> {
    let seq: i64 = tx
        .prepare_cached("SELECT last_seq FROM groups WHERE group_name = ?1")?
        .query_row([group_name], |row| row.get(0))?;
    Ok(seq as u64)
}

/// One commit's worth of messages: what the batch already checked is not asked again. Each
/// sender's membership is checked once per batch (nothing else writes while the batch holds
/// the writers' turn), and each group's `last_seq` is read once, counted up here and written
/// once at the end, instead of four statements per message.
#[derive(Default)]
struct Appender {
    /// Push jobs are queued with the messages (`None`: push is off).
    push: Option<PushPolicy>,
    /// Per group: the senders (and mentioned users) found to be members (keyed so that a
    /// lookup allocates nothing).
    members: HashMap<String, HashSet<String>>,
    /// Per group: the last seq given out in this batch.
    last_seq: HashMap<String, i64>,
}

impl Appender {
    fn append(
        &mut self,
        tx: &Connection,
        message: &NewMessage,
        timestamp: &str,
    ) -> StoreResult<Appended> {
        // The original is returned whatever happened since (the sender left the group, or
        // reused the id for another group): a retry must never store a second copy.
        if let Some(id) = &message.client_msg_id {
            if let Some(original) = sent_before(tx, &message.username, id)? {
                return Ok(Appended::duplicate(original));
            }
        }
        let checked = self
            .members
            .get(&message.group_name)
            .is_some_and(|senders| senders.contains(&message.username));
        let is_direct = direct::is_direct(&message.group_name);
        if !checked {
            check_member(tx, &message.username, &message.group_name)?;
            if is_direct {
                if let Some(partner) = direct_partner(tx, &message.group_name, &message.username)? {
                    if blocks(tx, &partner, &message.username)? {
                        return Err(StoreError::Blocked);
                    }
                }
            }
            self.members
                .entry(message.group_name.clone())
                .or_default()
                .insert(message.username.clone());
        }
        if !message.mentions.is_empty() {
            // The sender's role matters only for `@room`; members found once are not asked
            // again in the batch (a busy group's mentions name the same few people).
            let role = match message
                .mentions
                .iter()
                .any(|n| n == crate::model::ROOM_MENTION)
            {
                true => role_of(tx, &message.group_name, &message.username)?.unwrap_or_default(),
                false => Role::Member,
            };
            let known = self.members.entry(message.group_name.clone()).or_default();
            check_mentions(&message.mentions, role, |name| {
                if known.contains(name) {
                    return Ok(true);
                }
                let member = is_member(tx, &message.group_name, name)?;
                if member {
                    known.insert(name.to_string());
                }
                Ok(member)
            })?;
        }
        let reply_to = match message.reply_to {
            Some(seq) => Some(thread_root(tx, &message.group_name, seq)?),
            None => None,
        };
        let seq = match self.last_seq.get(&message.group_name) {
            Some(last) => last + 1,
            None => head_seq(tx, &message.group_name)? as i64 + 1,
        };
        let stored = Message {
            id: new_object_id(),
            group_name: message.group_name.clone(),
            username: message.username.clone(),
            text: message.text.clone(),
            timestamp: timestamp.to_string(),
            seq: seq as u64,
            client_msg_id: message.client_msg_id.clone(),
            mentions: message.mentions.clone(),
            reply_to,
            ..Message::default()
        };
        tx.prepare_cached(
            "INSERT INTO messages (id, group_name, username, text, timestamp, seq, client_msg_id,
             mentions, reply_to) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            stored.id,
            stored.group_name,
            stored.username,
            stored.text,
            stored.timestamp,
            seq,
            stored.client_msg_id,
            encode_mentions(&stored.mentions),
            reply_to.map(|root| root as i64)
        ])?;
        if let Some(root) = reply_to {
            tx.prepare_cached(
                "UPDATE messages SET reply_count = reply_count + 1, last_reply_seq = ?3
                 WHERE group_name = ?1 AND seq = ?2",
            )?
            .execute(params![stored.group_name, root as i64, seq])?;
        }
        if !stored.mentions.is_empty() {
            write_mentions(tx, &stored)?;
        }
        // A direct conversation shows again for whoever had left it (or never saw it).
        if let Some(policy) = self.push {
            queue_pushes(tx, &stored, is_direct, policy)?;
        }
        let revealed_to = if is_direct {
            let shown: Vec<String> = tx
                .prepare_cached(
                    "UPDATE members SET hidden = 0 WHERE group_name = ?1 AND hidden = 1
                     RETURNING username",
                )?
                .query_map([&message.group_name], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            shown.into_iter().find(|name| *name != message.username)
        } else {
            None
        };
        // Only a stored message takes its number: a failed insert leaves no gap.
        match self.last_seq.get_mut(&message.group_name) {
            Some(last) => *last = seq,
            None => {
                self.last_seq.insert(message.group_name.clone(), seq);
            }
        }
        Ok(Appended {
            revealed_to,
            ..Appended::new(stored)
        })
    }

    /// Writes each group's new `last_seq` (in the same transaction, before the commit).
    fn finish(self, tx: &Connection) -> StoreResult<()> {
        let mut update =
            tx.prepare_cached("UPDATE groups SET last_seq = ?2 WHERE group_name = ?1")?;
        for (group_name, seq) in &self.last_seq {
            update.execute(params![group_name, seq])?;
        }
        Ok(())
    }
}

/// The user's role in the group, or `None` when not a member.
fn role_of(tx: &Connection, group_name: &str, username: &str) -> StoreResult<Option<Role>> {
    let role: Option<String> = tx
        .prepare_cached("SELECT role FROM members WHERE group_name = ?1 AND username = ?2")?
        .query_row([group_name, username], |row| row.get(0))
        .optional()?;
    Ok(role.map(|role| Role::parse(&role)))
}

/// Whether the user belongs to the group: one lookup when it does (the common case); the
/// group's existence is asked only to tell `GroupNotFound` from `NotAMember`.
fn check_member(tx: &Connection, username: &str, group_name: &str) -> StoreResult<()> {
    let member = tx
        .prepare_cached("SELECT 1 FROM members WHERE group_name = ?1 AND username = ?2")?
        .exists([group_name, username])?;
    if member {
        return Ok(());
    }
    group_id(tx, group_name)?;
    Err(not_a_member(group_name))
}

impl Store for SqliteStore {
    fn find_user(&mut self, username: &str, may_create: bool) -> StoreResult<(UserProfile, bool)> {
        let tx = self.write()?;
        let existing: Option<String> = tx
            .prepare_cached("SELECT id FROM users WHERE username = ?1")?
            .query_row([username], |row| row.get(0))
            .optional()?;
        let created = existing.is_none();
        let id = match existing {
            Some(id) => id,
            None if !may_create => return Err(StoreError::UserNotFound),
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
            .prepare_cached(
                "SELECT group_name FROM members WHERE username = ?1 AND hidden = 0
                 ORDER BY group_name LIMIT ?2",
            )?
            .query_map(params![username, MAX_GROUP_LIST + 1], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        tx.commit()?;
        Ok((profile(id, username, group_list), created))
    }

    fn create_group(&mut self, creator: MemberOf, quota: usize) -> StoreResult<CreatedGroup> {
        let (username, group_name) = (creator.username, creator.group_name);
        let tx = self.write()?;
        if !user_exists(&tx, username)? {
            return Err(StoreError::UserNotFound);
        }
        if group_id(&tx, group_name).is_ok() {
            return Err(StoreError::GroupExists);
        }
        if quota > 0 {
            let created: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM groups WHERE creator = ?1")?
                .query_row([username], |row| row.get(0))?;
            if created as usize >= quota {
                return Err(StoreError::QuotaExceeded);
            }
        }
        let last_read = now_timestamp();
        tx.execute(
            "INSERT INTO groups (group_name, id, creator) VALUES (?1, ?2, ?3)",
            [group_name, &new_object_id(), username],
        )?;
        tx.execute(
            "INSERT INTO members (group_name, username, last_read, role) VALUES (?1, ?2, ?3, 'owner')",
            [group_name, username, &last_read],
        )?;
        tx.commit()?;
        Ok(created_group(group_name, username, last_read))
    }

    fn join_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef> {
        let tx = self.write()?;
        if !user_exists(&tx, username)? {
            return Err(StoreError::UserNotFound);
        }
        let group_id = group_id(&tx, group_name)?;
        // Nobody joins a direct conversation: its two members have it from `open_direct`.
        if direct::is_direct(group_name) {
            check_member(&tx, username, group_name)?;
            return Ok(GroupRef {
                group_id,
                group_name: group_name.to_string(),
            });
        }
        if tx
            .prepare_cached("SELECT 1 FROM bans WHERE group_name = ?1 AND username = ?2")?
            .exists([group_name, username])?
        {
            return Err(StoreError::Banned);
        }
        tx.execute(
            // What was said before joining counts as read, as the seed's `last_read := now` had it.
            "INSERT OR IGNORE INTO members (group_name, username, last_read, last_read_seq)
             VALUES (?1, ?2, ?3, (SELECT last_seq FROM groups WHERE group_name = ?1))",
            [group_name, username, &now_timestamp()],
        )?;
        tx.commit()?;
        Ok(GroupRef {
            group_id,
            group_name: group_name.to_string(),
        })
    }

    fn leave_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef> {
        let tx = self.write()?;
        if !user_exists(&tx, username)? {
            return Err(StoreError::UserNotFound);
        }
        let group_id = group_id(&tx, group_name)?;
        // Leaving a direct conversation hides it until its next message.
        let sql = if direct::is_direct(group_name) {
            "UPDATE members SET hidden = 1 WHERE group_name = ?1 AND username = ?2"
        } else {
            "DELETE FROM members WHERE group_name = ?1 AND username = ?2"
        };
        let removed = tx.execute(sql, [group_name, username])?;
        if removed == 0 {
            return Err(not_a_member(group_name));
        }
        tx.commit()?;
        Ok(GroupRef {
            group_id,
            group_name: group_name.to_string(),
        })
    }

    fn append_messages(&mut self, batch: &[NewMessage]) -> Vec<StoreResult<Appended>> {
        let unavailable = |error: StoreError| batch.iter().map(|_| Err(error.clone())).collect();
        let push = self.push;
        let tx = match self.write() {
            Ok(tx) => tx,
            Err(error) => return unavailable(error),
        };
        let timestamp = now_timestamp();
        let mut appender = Appender {
            push,
            ..Appender::default()
        };
        let results: Vec<_> = batch
            .iter()
            .map(|message| appender.append(&tx, message, &timestamp))
            .collect();
        if let Some(Err(error @ StoreError::Unavailable(_))) = results.iter().find(|r| r.is_err()) {
            return unavailable(error.clone());
        }
        if let Err(error) = appender.finish(&tx) {
            return unavailable(error);
        }
        match tx.commit() {
            Ok(()) => results,
            Err(error) => unavailable(error.into()),
        }
    }

    fn visit_group(&mut self, entry: &Entry) -> StoreResult<Visit> {
        let (username, group_name) = (entry.member.username, entry.member.group_name);
        let leaving = entry.leaving;
        let tx = self.write()?;
        let MemberState {
            last_read,
            last_read_seq,
            ..
        } = member_state(&tx, username, group_name)?;
        if let Some(mark) = leaving {
            set_read(&tx, mark)?;
        }
        let head_seq = head_seq(&tx, group_name)?;
        tx.commit()?;
        Ok(Visit {
            last_read,
            head_seq,
            last_read_seq,
        })
    }

    fn enter_group(&mut self, entry: &Entry, reply_budget: usize) -> StoreResult<GroupHistory> {
        let (username, group_name) = (entry.member.username, entry.member.group_name);
        let leaving = entry.leaving;
        let tx = self.write()?;
        let member = member_state(&tx, username, group_name)?;
        let marker = member.last_read_seq as i64;
        let rows = EnterRows {
            unread: query_messages(
                &tx,
                "group_name = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                params![group_name, marker, MAX_UNREAD_ON_ENTER + 1],
            )?,
            read_newest_first: query_messages(
                &tx,
                "group_name = ?1 AND seq <= ?2 ORDER BY seq DESC LIMIT ?3",
                params![group_name, marker, MAX_READ_ON_ENTER],
            )?,
            last_read_seq: member.last_read_seq,
            head_seq: head_seq(&tx, group_name)?,
            epoch: member.group_id,
            first_seq: member.first_seq,
        };
        let history = history(rows, reply_budget, entry.marks_entry);
        let entered = entered_mark(username, group_name, &history);
        for mark in leaving.into_iter().chain(entered.as_ref()) {
            set_read(&tx, mark)?;
        }
        tx.commit()?;
        Ok(history)
    }

    fn mark_read(&mut self, marks: &[ReadMark]) -> StoreResult<()> {
        if marks.is_empty() {
            return Ok(());
        }
        let tx = self.write()?;
        for mark in marks {
            set_read(&tx, mark)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn read_state(&mut self, username: &str, group_name: &str) -> StoreResult<GroupReadState> {
        let member = member_state(&self.connection, username, group_name)?;
        let last_seq = head_seq(&self.connection, group_name)?;
        let attention = attention_of(&self.connection, username, group_name, member.last_read_seq)?;
        Ok(GroupReadState::new(
            group_name.to_string(),
            member.group_id,
            last_seq,
            member.last_read_seq,
        )
        .with_attention(attention))
    }

    fn my_groups(&mut self, username: &str, query: &GroupsQuery) -> StoreResult<MembershipsPage> {
        let mut statement = self.connection.prepare_cached(concat!(
            "SELECT g.group_name, g.id, g.last_seq, m.last_read_seq, m.role, m.notify, g.kind,
                (SELECT o.username FROM members o WHERE g.kind IS NOT NULL
                    AND o.group_name = m.group_name AND o.username != ?1), ",
            mentions_after!("?1", "m.group_name", "m.last_read_seq"),
            " FROM members m JOIN groups g ON g.group_name = m.group_name
             WHERE m.username = ?1 AND m.group_name > ?2 AND m.hidden = 0
             ORDER BY m.group_name LIMIT ?3",
        ))?;
        let after = query.after.as_deref().unwrap_or("");
        let rows = statement.query_map(params![username, after, query.limit + 1], |row| {
            let attention = Attention {
                notify: Notify::parse(&row.get::<_, String>(5)?).unwrap_or_default(),
                kind: row.get(6)?,
                with: row.get(7)?,
                mention_count: row.get::<_, i64>(8)? as u64,
            };
            Ok(GroupReadState::new(
                row.get(0)?,
                row.get(1)?,
                row.get::<_, i64>(2)? as u64,
                row.get::<_, i64>(3)? as u64,
            )
            .with_role(Role::parse(&row.get::<_, String>(4)?))
            .with_attention(attention))
        })?;
        let mut groups = rows.collect::<Result<Vec<_>, _>>()?;
        let has_more = groups.len() > query.limit as usize;
        groups.truncate(query.limit as usize);
        Ok(MembershipsPage { groups, has_more })
    }

    fn fetch_messages(&mut self, member: MemberOf, page: PageQuery) -> StoreResult<MessagePage> {
        let (username, group_name) = (member.username, member.group_name);
        let tx = self.connection.transaction()?;
        let member = member_state(&tx, username, group_name)?;
        let after = page.after_seq.unwrap_or(0).min(i64::MAX as u64) as i64;
        let before = page
            .before_seq
            .map_or(i64::MAX, |seq| seq.min(i64::MAX as u64) as i64);
        let order = if page.after_seq.is_some() {
            "ASC"
        } else {
            "DESC"
        };
        let rows = match page.thread {
            None => {
                let filter = format!(
                    "group_name = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq {order} LIMIT ?4"
                );
                query_messages(
                    &tx,
                    &filter,
                    params![group_name, after, before, page.limit + 1],
                )?
            }
            // A thread: its root and the replies to it (the root's thread when `thread`
            // names a reply); each found by index.
            Some(seq) => {
                let named = query_messages(
                    &tx,
                    "group_name = ?1 AND seq = ?2",
                    params![group_name, seq.min(i64::MAX as u64) as i64],
                )?;
                let root = named
                    .first()
                    .map(|m| m.reply_to.unwrap_or(m.seq))
                    .ok_or(StoreError::MessageNotFound)?;
                let filter = format!(
                    "group_name = ?1 AND seq > ?2 AND seq < ?3 AND (seq = ?5 OR reply_to = ?5)
                     ORDER BY seq {order} LIMIT ?4"
                );
                query_messages(
                    &tx,
                    &filter,
                    params![group_name, after, before, page.limit + 1, root as i64],
                )?
            }
        };
        let (mut messages, has_more) = split_page(rows, page.limit);
        if page.after_seq.is_none() {
            messages.reverse();
        }
        Ok(MessagePage {
            messages,
            has_more,
            epoch: member.group_id,
            first_seq: member.first_seq,
        })
    }

    fn list_groups(&mut self, query: &GroupsQuery, asking: &str) -> StoreResult<GroupsPage> {
        let tx = self.connection.transaction()?;
        // Names compare as bytes (SQLite's BINARY collation on UTF-8), the order `after` pages by.
        let names: Vec<String> = tx
            .prepare_cached(
                "SELECT group_name FROM groups WHERE group_name > ?1 AND kind IS NULL
                 ORDER BY group_name LIMIT ?2",
            )?
            .query_map(
                params![query.after.as_deref().unwrap_or(""), query.limit + 1],
                |row| row.get(0),
            )?
            .collect::<Result<_, _>>()?;
        let has_more = names.len() > query.limit as usize;
        let mut groups = Vec::with_capacity(names.len());
        for group_name in names.into_iter().take(query.limit as usize) {
            let count: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM members WHERE group_name = ?1")?
                .query_row([&group_name], |row| row.get(0))?;
            let members = if count as usize <= MAX_LISTED_MEMBERS {
                let listed = tx
                    .prepare_cached(
                        "SELECT username FROM members WHERE group_name = ?1 ORDER BY rowid",
                    )?
                    .query_map([&group_name], |row| row.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Some(listed)
            } else {
                None
            };
            let role = role_of(&tx, &group_name, asking)?;
            groups.push(GroupSummary {
                group_name,
                member_count: count as u64,
                members,
                role,
            });
        }
        Ok(GroupsPage { groups, has_more })
    }

    fn group_members(&mut self, group_name: &str) -> StoreResult<Vec<String>> {
        group_id(&self.connection, group_name)?;
        let names = self
            .connection
            .prepare_cached("SELECT username FROM members WHERE group_name = ?1 ORDER BY rowid")?
            .query_map([group_name], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(names)
    }

    fn group_heads(&mut self, group_names: &[String]) -> StoreResult<Vec<(String, u64)>> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT last_seq FROM groups WHERE group_name = ?1")?;
        let mut heads = Vec::with_capacity(group_names.len());
        for name in group_names {
            let seq: Option<i64> = statement.query_row([name], |row| row.get(0)).optional()?;
            if let Some(seq) = seq {
                heads.push((name.clone(), seq as u64));
            }
        }
        Ok(heads)
    }

    fn messages_after(&mut self, group: &str, after: u64, limit: u32) -> StoreResult<Vec<Message>> {
        let (group_name, after_seq) = (group, after);
        query_messages(
            &self.connection,
            "group_name = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            params![group_name, after_seq.min(i64::MAX as u64) as i64, limit],
        )
    }

    fn message_at(&mut self, group_name: &str, seq: u64) -> StoreResult<Option<Message>> {
        group_id(&self.connection, group_name)?;
        Ok(query_messages(
            &self.connection,
            "group_name = ?1 AND seq = ?2",
            params![group_name, seq.min(i64::MAX as u64) as i64],
        )?
        .pop())
    }

    fn rewrite(&mut self, group: &str, seq: u64, change: Rewrite) -> StoreResult<Option<Message>> {
        let group_name = group;
        let tx = self.write()?;
        let seq = seq.min(i64::MAX as u64) as i64;
        let changed = match change {
            Rewrite::Edit {
                text,
                at,
                mentions: None,
            } => tx
                .prepare_cached(
                    "UPDATE messages SET text = ?3, edited_at = ?4
                     WHERE group_name = ?1 AND seq = ?2 AND deleted = 0",
                )?
                .execute(params![group_name, seq, text, at])?,
            Rewrite::Edit {
                text,
                at,
                mentions: Some(mentions),
            } => {
                let changed = tx
                    .prepare_cached(
                        "UPDATE messages SET text = ?3, edited_at = ?4, mentions = ?5
                         WHERE group_name = ?1 AND seq = ?2 AND deleted = 0",
                    )?
                    .execute(params![
                        group_name,
                        seq,
                        text,
                        at,
                        encode_mentions(mentions)
                    ])?;
                if changed > 0 {
                    forget_mentions(&tx, group_name, seq)?;
                    if let Some(message) = query_messages(
                        &tx,
                        "group_name = ?1 AND seq = ?2",
                        params![group_name, seq],
                    )?
                    .pop()
                    {
                        write_mentions(&tx, &message)?;
                    }
                }
                changed
            }
            // The text is overwritten, not flagged: a tombstone keeps no trace of it.
            Rewrite::Erase => {
                forget_mentions(&tx, group_name, seq)?;
                // A deleted message is not pushed (its preview would outlive it).
                tx.prepare_cached("DELETE FROM push_queue WHERE group_name = ?1 AND seq = ?2")?
                    .execute(params![group_name, seq])?;
                tx.prepare_cached(
                    "UPDATE messages SET text = '', edited_at = NULL, deleted = 1, mentions = NULL
                     WHERE group_name = ?1 AND seq = ?2 AND deleted = 0",
                )?
                .execute(params![group_name, seq])?
            }
        };
        let message = if changed == 0 {
            None
        } else {
            query_messages(
                &tx,
                "group_name = ?1 AND seq = ?2",
                params![group_name, seq],
            )?
            .pop()
        };
        // A deleted reply no longer counts on its thread's root.
        if let (Rewrite::Erase, Some(root)) = (change, message.as_ref().and_then(|m| m.reply_to)) {
            recount_replies(&tx, group_name, root)?;
        }
        tx.commit()?;
        if message.is_some() {
            scrub_wal_soon();
        }
        Ok(message)
    }

    fn role(&mut self, group_name: &str, username: &str) -> StoreResult<Role> {
        group_id(&self.connection, group_name)?;
        role_of(&self.connection, group_name, username)?.ok_or_else(|| not_a_member(group_name))
    }

    fn set_role(&mut self, group_name: &str, username: &str, role: Role) -> StoreResult<()> {
        let tx = self.write()?;
        let changed = tx
            .prepare_cached("UPDATE members SET role = ?3 WHERE group_name = ?1 AND username = ?2")?
            .execute(params![group_name, username, role.as_str()])?;
        if changed == 0 {
            return Err(StoreError::NotAMember);
        }
        tx.commit()?;
        Ok(())
    }

    fn members_with_role(&mut self, group_name: &str, role: Role) -> StoreResult<Vec<String>> {
        Ok(self
            .connection
            .prepare_cached(
                "SELECT username FROM members WHERE group_name = ?1 AND role = ?2 ORDER BY rowid",
            )?
            .query_map(params![group_name, role.as_str()], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?)
    }

    fn set_banned(&mut self, group_name: &str, username: &str, banned: bool) -> StoreResult<()> {
        let tx = self.write()?;
        group_id(&tx, group_name)?;
        let sql = if banned {
            "INSERT OR IGNORE INTO bans (group_name, username) VALUES (?1, ?2)"
        } else {
            "DELETE FROM bans WHERE group_name = ?1 AND username = ?2"
        };
        tx.prepare_cached(sql)?.execute([group_name, username])?;
        tx.commit()?;
        Ok(())
    }

    fn remove_group(&mut self, group_name: &str) -> StoreResult<()> {
        let tx = self.write()?;
        group_id(&tx, group_name)?;
        for table in [
            "messages",
            "mentions",
            "push_queue",
            "members",
            "bans",
            "groups",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE group_name = ?1"),
                [group_name],
            )?;
        }
        tx.commit()?;
        scrub_wal_soon();
        Ok(())
    }

    fn prune(&mut self, group_name: &str, cut: &PruneCut, limit: u32) -> StoreResult<u64> {
        let (below_seq, older_than) = (cut.below_seq, cut.older_than);
        let tx = self.write()?;
        let below = below_seq.min(i64::MAX as u64) as i64;
        // Oldest first, by the primary key: a batch costs `limit` row deletions however large
        // the group is. Always a prefix of the history (everything up to the newest message
        // chosen), so it stays gapless from `first_seq`, and never the newest message.
        let removed = tx
            .prepare_cached(
                "DELETE FROM messages WHERE group_name = ?1 AND seq <= (
                    SELECT MAX(seq) FROM (SELECT seq FROM messages WHERE group_name = ?1
                    AND seq < (SELECT last_seq FROM groups WHERE group_name = ?1)
                    AND (seq < ?2 OR timestamp < ?3) ORDER BY seq LIMIT ?4))",
            )?
            .execute(params![group_name, below, older_than.unwrap_or(""), limit])?;
        if removed > 0 {
            tx.prepare_cached(
                "UPDATE groups SET first_seq = COALESCE(
                    (SELECT MIN(seq) FROM messages WHERE group_name = ?1), last_seq + 1)
                 WHERE group_name = ?1",
            )?
            .execute([group_name])?;
            tx.prepare_cached(
                "DELETE FROM mentions WHERE group_name = ?1
                 AND seq < (SELECT first_seq FROM groups WHERE group_name = ?1)",
            )?
            .execute([group_name])?;
        }
        tx.commit()?;
        if removed > 0 {
            scrub_wal_soon();
        }
        Ok(removed as u64)
    }

    fn group_names(&mut self, after: &str, limit: u32) -> StoreResult<Vec<(String, u64)>> {
        Ok(self
            .connection
            .prepare_cached(
                "SELECT group_name, last_seq FROM groups WHERE group_name > ?1
                 ORDER BY group_name LIMIT ?2",
            )?
            .query_map(params![after, limit], |row| {
                Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn owned_groups(&mut self, username: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .connection
            .prepare_cached(
                "SELECT group_name FROM members WHERE username = ?1 AND role = 'owner'
                 ORDER BY group_name",
            )?
            .query_map([username], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?)
    }

    fn erase_user(&mut self, username: &str) -> StoreResult<Vec<String>> {
        let tx = self.write()?;
        if !user_exists(&tx, username)? {
            return Err(StoreError::UserNotFound);
        }
        let groups = tx
            .prepare_cached(
                "SELECT group_name FROM members WHERE username = ?1 ORDER BY group_name",
            )?
            .query_map([username], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        // No index of messages by sender (it would cost every send a B-tree update): an
        // erasure reads the table once, a rare price for a rare request.
        tx.execute(
            "DELETE FROM mentions WHERE username = ?1 OR author = ?1",
            [username],
        )?;
        let threads = tx
            .prepare_cached(
                "SELECT DISTINCT group_name, reply_to FROM messages
                 WHERE username = ?1 AND reply_to IS NOT NULL AND deleted = 0",
            )?
            .query_map([username], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        tx.execute(
            "UPDATE messages SET text = '', username = '', edited_at = NULL, deleted = 1,
             client_msg_id = NULL, mentions = NULL WHERE username = ?1",
            [username],
        )?;
        // Their replies no longer count on the threads they answered.
        for (group_name, root) in &threads {
            recount_replies(&tx, group_name, *root)?;
        }
        tx.execute(
            "DELETE FROM blocks WHERE blocker = ?1 OR blocked = ?1",
            [username],
        )?;
        tx.execute(
            "DELETE FROM push_queue WHERE username = ?1 OR sender = ?1",
            [username],
        )?;
        for table in ["members", "bans", "users"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE username = ?1"),
                [username],
            )?;
        }
        // A name registered again starts with a fresh group quota.
        tx.execute(
            "UPDATE groups SET creator = NULL WHERE creator = ?1",
            [username],
        )?;
        tx.execute(
            "INSERT INTO erasures (username, at) VALUES (?1, ?2)",
            params![username, unix_millis() as i64],
        )?;
        tx.commit()?;
        // This is `noomnim admin`'s process, which ends now: the erased text leaves the WAL
        // before it does (a server's checkpointer would not know of it).
        let _turn = writer_turn();
        if !matches!(checkpoint(&self.connection, "TRUNCATE"), Ok(true)) {
            log::warn!(
                "the WAL could not be cut now; a running server cuts it when it sees the erasure"
            );
        }
        Ok(groups)
    }

    fn open_direct(&mut self, username: &str, other: &str) -> StoreResult<GroupRef> {
        let group_name = direct::name_of(username, other);
        let tx = self.write()?;
        if !user_exists(&tx, username)? || !user_exists(&tx, other)? {
            return Err(StoreError::UserNotFound);
        }
        if blocks(&tx, other, username)? {
            return Err(StoreError::Blocked);
        }
        let group_id = match group_id(&tx, &group_name) {
            Ok(id) => id,
            Err(StoreError::GroupNotFound) => {
                let id = new_object_id();
                tx.execute(
                    "INSERT INTO groups (group_name, id, kind) VALUES (?1, ?2, 'direct')",
                    [&group_name, &id],
                )?;
                id
            }
            Err(error) => return Err(error),
        };
        // Both are members from the start (either may send at once); the other sees it once
        // its first message arrives. A user erased and registered again is a member anew.
        let now = now_timestamp();
        let mut add = tx.prepare_cached(
            "INSERT OR IGNORE INTO members (group_name, username, last_read, last_read_seq, hidden)
             VALUES (?1, ?2, ?3, 0, ?4)",
        )?;
        add.execute(params![group_name, username, now, 0])?;
        add.execute(params![group_name, other, now, 1])?;
        drop(add);
        tx.execute(
            "UPDATE members SET hidden = 0 WHERE group_name = ?1 AND username = ?2",
            [&group_name, username],
        )?;
        tx.commit()?;
        Ok(GroupRef {
            group_id,
            group_name,
        })
    }

    fn set_blocked(&mut self, username: &str, other: &str, on: bool) -> StoreResult<Vec<String>> {
        let tx = self.write()?;
        if on {
            if !user_exists(&tx, other)? {
                return Err(StoreError::UserNotFound);
            }
            tx.execute(
                "INSERT OR IGNORE INTO blocks (blocker, blocked) VALUES (?1, ?2)",
                [username, other],
            )?;
        } else {
            tx.execute(
                "DELETE FROM blocks WHERE blocker = ?1 AND blocked = ?2",
                [username, other],
            )?;
        }
        let list = blocked_by(&tx, username)?;
        tx.commit()?;
        Ok(list)
    }

    fn blocked_users(&mut self, username: &str) -> StoreResult<Vec<String>> {
        blocked_by(&self.connection, username)
    }

    fn set_notify(&mut self, member: MemberOf, level: Notify) -> StoreResult<()> {
        let tx = self.write()?;
        let changed = tx
            .prepare_cached(
                "UPDATE members SET notify = ?3 WHERE group_name = ?1 AND username = ?2",
            )?
            .execute(params![member.group_name, member.username, level.as_str()])?;
        if changed == 0 {
            group_id(&tx, member.group_name)?;
            return Err(not_a_member(member.group_name));
        }
        tx.commit()?;
        Ok(())
    }

    fn set_push(&mut self, policy: Option<PushPolicy>) {
        self.push = policy;
    }

    fn claim_pushes(
        &mut self,
        now_ms: u64,
        lease_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<PushJob>> {
        // Read first: the worker asks ten times a second, and an empty queue must not take
        // the single writer's turn from the senders.
        let due: bool = self
            .connection
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM push_queue WHERE next_ms <= ?1)")?
            .query_row([now_ms as i64], |row| row.get(0))?;
        if !due {
            return Ok(Vec::new());
        }
        let tx = self.write()?;
        let jobs = tx
            .prepare_cached(
                "SELECT id, username, group_name, seq, sender, kind, preview, created_ms, attempts
                 FROM push_queue WHERE next_ms <= ?1 ORDER BY next_ms LIMIT ?2",
            )?
            .query_map(params![now_ms as i64, limit], |row| {
                Ok(PushJob {
                    id: row.get(0)?,
                    username: row.get(1)?,
                    group_name: row.get(2)?,
                    seq: row.get::<_, i64>(3)? as u64,
                    sender: row.get(4)?,
                    kind: row.get(5)?,
                    preview: row.get(6)?,
                    created_ms: row.get::<_, i64>(7)? as u64,
                    attempts: row.get::<_, i64>(8)? as u32,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut lease = tx.prepare_cached("UPDATE push_queue SET next_ms = ?2 WHERE id = ?1")?;
        for job in &jobs {
            lease.execute(params![job.id, (now_ms + lease_ms) as i64])?;
        }
        drop(lease);
        tx.commit()?;
        Ok(jobs)
    }

    fn settle_pushes(&mut self, outcomes: &[(String, Option<u64>)]) -> StoreResult<()> {
        let tx = self.write()?;
        for (id, retry_at_ms) in outcomes {
            match retry_at_ms {
                None => tx
                    .prepare_cached("DELETE FROM push_queue WHERE id = ?1")?
                    .execute([id])?,
                Some(at) => tx
                    .prepare_cached(
                        "UPDATE push_queue SET next_ms = ?2, attempts = attempts + 1 WHERE id = ?1",
                    )?
                    .execute(params![id, *at as i64])?,
            };
        }
        tx.commit()?;
        Ok(())
    }

    fn trim_pushes(&mut self, max_jobs: u64, expire_before_ms: u64) -> StoreResult<PushQueueState> {
        // Read first, as in `claim_pushes`: only a queue past its bounds is written.
        let (queued, oldest): (i64, Option<i64>) = self.connection.query_row(
            "SELECT COUNT(*), MIN(created_ms) FROM push_queue",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        if queued as u64 <= max_jobs && oldest.is_none_or(|at| at >= expire_before_ms as i64) {
            return Ok(PushQueueState {
                dropped: 0,
                queued: queued as u64,
                oldest_ms: oldest.map(|ms| ms as u64),
            });
        }
        let tx = self.write()?;
        let mut dropped = tx
            .prepare_cached("DELETE FROM push_queue WHERE created_ms < ?1")?
            .execute([expire_before_ms as i64])? as u64;
        let queued: i64 = tx.query_row("SELECT COUNT(*) FROM push_queue", [], |row| row.get(0))?;
        let mut queued = queued as u64;
        if queued > max_jobs {
            dropped += tx
                .prepare_cached(
                    "DELETE FROM push_queue WHERE id IN
                     (SELECT id FROM push_queue ORDER BY created_ms LIMIT ?1)",
                )?
                .execute([(queued - max_jobs) as i64])? as u64;
            queued = max_jobs;
        }
        let oldest: Option<i64> =
            tx.query_row("SELECT MIN(created_ms) FROM push_queue", [], |row| {
                row.get(0)
            })?;
        tx.commit()?;
        Ok(PushQueueState {
            dropped,
            queued,
            oldest_ms: oldest.map(|ms| ms as u64),
        })
    }

    fn erasures_since(&mut self, since_ms: u64) -> StoreResult<Vec<(String, u64)>> {
        let erasures = self
            .connection
            .prepare_cached("SELECT username, at FROM erasures WHERE at >= ?1 ORDER BY at")?
            .query_map([since_ms.min(i64::MAX as u64) as i64], |row| {
                Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        // Made by `noomnim admin` in its own process: in case it could not cut the WAL. Each
        // poll reads back a minute of the log, so only an erasure not reported before asks.
        let newest = erasures.iter().map(|(_, at)| *at).max().unwrap_or(0);
        if newest > self.newest_erasure_seen {
            self.newest_erasure_seen = newest;
            scrub_wal_soon();
        }
        Ok(erasures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(name: &str) -> (SqliteStore, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("noomnim-sqlite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (
            SqliteStore::open(&dir, true, 64 << 20).expect("open store"),
            dir,
        )
    }

    #[test]
    fn satisfies_the_store_contract() {
        let (mut store, dir) = temp_store("contract");
        super::super::contract::check_all(&mut store, "");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_message_commit_updates_no_index_by_time() {
        let (store, dir) = temp_store("indexes");
        let index_names: Vec<String> = store
            .connection
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'",
            )
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<_, _>>()
            })
            .expect("list indexes");
        assert!(
            !index_names.iter().any(|name| name == "messages_by_time"),
            "{index_names:?}"
        );
        assert!(
            index_names
                .iter()
                .any(|name| name == "messages_by_client_msg_id"),
            "{index_names:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
