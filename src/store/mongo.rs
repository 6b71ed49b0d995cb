//! The MongoDB backend, on the official driver's blocking (`sync`) API, used only from workers.
//!
//! Collections are shaped like the original backend's: `users {_id, username}`,
//! `groups {_id, group_name, user: [{name_ID, last_read}]}` and
//! `messages {_id, group_name, username, text, timestamp, seq}`; times are BSON dates.
//!
//! `seq` is assigned by the unique `{group_name, seq}` index, never by a counter alone: a batch
//! takes the numbers after the group's head and is inserted with one ordered `insert_many`. The
//! head comes from `counters {_id: group_name, seq}`, a hint raised with `$max` after each
//! insert, so the common case costs no `max(seq)` query. When another process took those
//! numbers first (or the hint is stale after a crash), the insert fails with a duplicate key, the
//! messages that did land are looked up by `_id`, and the rest retry above the real `max(seq)`.
//! A message is stored with a number or not at all, so no process, crash or outage can leave a
//! gap (a reserve-then-insert counter would leave one on a crash between the two steps).
//!
//! Idempotent sends rest on a second unique index, `{username, client_msg_id}` (partial: only
//! messages that have an id). Before each insert attempt the batch's ids are looked up; one
//! that another connection or instance stored meanwhile makes the insert fail with a duplicate
//! key, and the next attempt finds it and answers with that original.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::sync::{Client, Collection, Database};
use mongodb::IndexModel;

use super::{
    check_mentions, created_group, entered_mark, history, not_a_member, profile, split_page,
    EnterRows, PruneCut, Rewrite, Store, StoreError, StoreResult,
};
use crate::model::{
    direct, format_timestamp, push_recipients, unix_millis, Appended, Attention, CreatedGroup,
    Entry, GroupHistory, GroupReadState, GroupRef, GroupSummary, GroupsPage, GroupsQuery, MemberOf,
    MembershipsPage, Message, MessagePage, NewMessage, Notify, PageQuery, PushJob, PushPolicy,
    PushQueueState, ReadMark, Role, UserProfile, Visit, MAX_GROUP_LIST, MAX_READ_ON_ENTER,
    MAX_UNREAD_ON_ENTER, PUSH_PREVIEW_CHARS, ROOM_MENTION,
};

const DUPLICATE_KEY: i32 = 11000;
/// The schema this code writes, recorded in `meta {_id: "schema", version}`. 1: the first
/// release; 2: read markers by seq (`user.last_read_seq`, read lazily where missing) and
/// `groups.creator`; 3: `messages.client_msg_id` and its unique index. Older databases need
/// 4: edits and tombstones (`messages.edited_at`, `deleted`), roles (`user.role`; an entry
/// without one is its group's `creator`'s owner entry or a member), bans (`groups.banned`),
/// `groups.first_seq` (retention) and the `erasures` collection. 5: direct conversations
/// (`groups.kind`, `user.hidden`), notification levels (`user.notify`), mentions
/// (`messages.mentions`) and blocks (`users.blocked`). Older databases need no rewrite (new
/// fields are optional); a newer one is refused.
const SCHEMA_VERSION: i64 = 5;
/// How often one batch retries after losing `seq` numbers to another process.
const MAX_SEQ_RETRIES: usize = 1000;
/// How long a push job waits for its message to land before it is taken for an orphan (its
/// message's insert failed, or the instance died between the job's write and the message's).
/// Far beyond any insert's time (`STORE_TIMEOUT_MS` and its retries).
const ORPHAN_GRACE_MS: u64 = 120_000;
/// Group names one query lists at most (`$in`, `$or`): a page of 1,000 memberships is read in
/// a few queries of this size. MongoDB takes far more; smaller queries keep each one's time
/// bounded, and the MongoDB-compatible test server refuses expressions of ~500 names.
const NAMES_PER_QUERY: usize = 200;
/// How soon a job whose message has not landed yet is looked at again.
const ORPHAN_RECHECK_MS: u64 = 1_000;

pub struct MongoStore {
    users: Collection<Document>,
    groups: Collection<Document>,
    messages: Collection<Document>,
    counters: Collection<Document>,
    meta: Collection<Document>,
    erasures: Collection<Document>,
    push_queue: Collection<Document>,
    /// What each stored message queues for the push webhook (`None`: push is off).
    push: Option<PushPolicy>,
    indexes_ready: bool,
    max_time: Duration,
}

impl From<MongoError> for StoreError {
    fn from(error: MongoError) -> StoreError {
        StoreError::Unavailable(format!("mongodb: {error}"))
    }
}

impl MongoStore {
    /// Creates a client; the connection itself is made lazily, so start-up never waits on MongoDB.
    pub fn connect(uri: &str, database: &str, timeout: Duration) -> StoreResult<Box<dyn Store>> {
        let mut options = ClientOptions::parse(uri).run()?;
        // A call in flight to a server that is up but silent (frozen, partitioned) is not
        // interrupted here: the event loop answers such a request `unavailable` itself once it
        // outlives STORE_TIMEOUT_MS. (Shortening the driver's heartbeat to catch it instead made
        // busy but healthy servers look dead and interrupted good writes.)
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout.min(Duration::from_secs(5)));
        options.app_name = Some("noomnim".into());
        let client = Client::with_options(options)?;
        let db: Database = client.database(database);
        let mut store = MongoStore {
            users: db.collection("users"),
            groups: db.collection("groups"),
            messages: db.collection("messages"),
            counters: db.collection("counters"),
            meta: db.collection("meta"),
            erasures: db.collection("erasures"),
            push_queue: db.collection("push_queue"),
            push: None,
            indexes_ready: false,
            max_time: timeout,
        };
        if let Err(error) = store.ensure_indexes() {
            log::warn!("MongoDB not ready at start-up ({error}); will retry on first use");
        }
        Ok(Box::new(store))
    }

    /// Creates the indexes the queries and the uniqueness rules need (idempotent).
    fn ensure_indexes(&mut self) -> StoreResult<()> {
        if self.indexes_ready {
            return Ok(());
        }
        let recorded = first(&self.meta, doc! {"_id": "schema"}, None)?
            .and_then(|schema| seq_of_field(&schema, "version"))
            .unwrap_or(1);
        if recorded > SCHEMA_VERSION as u64 {
            return Err(StoreError::Unavailable(format!(
                "the database has schema version {recorded}, newer than this server's {SCHEMA_VERSION}"
            )));
        }
        let unique = |keys: Document| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(true).build())
                .build()
        };
        self.users
            .create_index(unique(doc! {"username": 1}))
            .run()?;
        self.groups
            .create_index(unique(doc! {"group_name": 1}))
            .run()?;
        self.groups
            .create_index(IndexModel::builder().keys(doc! {"user.name_ID": 1}).build())
            .run()?;
        self.groups
            .create_index(IndexModel::builder().keys(doc! {"creator": 1}).build())
            .run()?;
        self.messages
            .create_index(unique(doc! {"group_name": 1, "seq": 1}))
            .run()?;
        self.messages
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"group_name": 1, "timestamp": 1})
                    .build(),
            )
            .run()?;
        self.messages
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"username": 1, "client_msg_id": 1})
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .partial_filter_expression(doc! {"client_msg_id": {"$exists": true}})
                            .build(),
                    )
                    .build(),
            )
            .run()?;
        self.erasures
            .create_index(IndexModel::builder().keys(doc! {"at": 1}).build())
            .run()?;
        // A thread's replies (`fetch_messages {thread}`, recounts), and mentions by name;
        // each holds only the messages that have the field.
        for (keys, field) in [
            (doc! {"group_name": 1, "reply_to": 1, "seq": 1}, "reply_to"),
            (doc! {"mentions": 1, "group_name": 1, "seq": 1}, "mentions"),
        ] {
            let only_with_field = IndexOptions::builder()
                .partial_filter_expression(doc! {field: {"$exists": true}})
                .build();
            self.messages
                .create_index(
                    IndexModel::builder()
                        .keys(keys)
                        .options(only_with_field)
                        .build(),
                )
                .run()?;
        }
        for key in ["next_ms", "created_ms", "message_id"] {
            self.push_queue
                .create_index(IndexModel::builder().keys(doc! {key: 1}).build())
                .run()?;
        }
        self.meta
            .update_one(
                doc! {"_id": "schema"},
                doc! {"$max": {"version": SCHEMA_VERSION}},
            )
            .upsert(true)
            .run()?;
        self.indexes_ready = true;
        Ok(())
    }

    fn user_exists(&self, username: &str) -> StoreResult<bool> {
        Ok(first(&self.users, doc! {"username": username}, None)?.is_some())
    }

    fn group(&self, group_name: &str) -> StoreResult<Document> {
        first(&self.groups, doc! {"group_name": group_name}, None)?.ok_or(StoreError::GroupNotFound)
    }

    fn head_seq(&self, group_name: &str) -> StoreResult<u64> {
        let newest = first(
            &self.messages,
            doc! {"group_name": group_name},
            Some(doc! {"seq": -1}),
        )?;
        Ok(newest.and_then(|m| seq_of(&m)).unwrap_or(0))
    }

    /// Raises a read marker (see `Store::mark_read`); `head_seq` is the group's newest seq.
    fn set_read(&self, mark: &ReadMark, head_seq: u64) -> StoreResult<()> {
        let seq = mark.seq.min(i64::MAX as u64) as i64;
        if mark.seq >= head_seq {
            // Caught up with the head: `last_read` is now, as the seed's enter/visit set it.
            self.groups
                .update_one(
                    doc! {"group_name": &mark.group_name, "user.name_ID": &mark.username},
                    doc! {
                        "$set": {"user.$.last_read": mongodb::bson::DateTime::now()},
                        "$max": {"user.$.last_read_seq": seq},
                    },
                )
                .run()?;
            return Ok(());
        }
        let marked = first(
            &self.messages,
            doc! {"group_name": &mark.group_name, "seq": seq},
            None,
        )?;
        let Some(time) = marked.map(|m| timestamp_of(m.get("timestamp"))) else {
            return Ok(());
        };
        // Only a marker below the new one (or none yet) moves, and `last_read` moves with it.
        let below = doc! {"name_ID": &mark.username, "last_read_seq": {"$not": {"$gte": seq}}};
        self.groups
            .update_one(
                doc! {"group_name": &mark.group_name, "user": {"$elemMatch": below}},
                doc! {"$set": {"user.$.last_read": datetime_from(&time), "user.$.last_read_seq": seq}},
            )
            .run()?;
        Ok(())
    }

    /// One message of a group by seq, if stored.
    fn stored_message(&self, group_name: &str, seq: i64) -> StoreResult<Option<Message>> {
        first(
            &self.messages,
            doc! {"group_name": group_name, "seq": seq},
            None,
        )?
        .map(|document| message_from(&document))
        .transpose()
    }

    /// Groups matching `filter` by name, at most `limit` (one more than a page asks for).
    fn groups_by_name(
        &self,
        filter: Document,
        limit: u32,
    ) -> StoreResult<mongodb::sync::Cursor<Document>> {
        Ok(self
            .groups
            .find(filter)
            .sort(doc! {"group_name": 1})
            .limit(i64::from(limit))
            .max_time(self.max_time)
            .run()?)
    }

    /// The names of every group matching `filter`, in name order.
    fn group_names_where(&self, filter: Document) -> StoreResult<Vec<String>> {
        let cursor = self
            .groups
            .find(filter)
            .projection(doc! {"group_name": 1})
            .sort(doc! {"group_name": 1})
            .run()?;
        let mut names = Vec::new();
        for group in cursor {
            if let Ok(name) = group?.get_str("group_name") {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    /// The member's read marker. Entries written before markers existed have only the
    /// `last_read` time: the marker is then the newest message at or before it.
    fn member_read_seq(&self, group: &Document, username: &str) -> StoreResult<u64> {
        let entry = member_entry(group, username).ok_or_else(|| not_a_member_of(group))?;
        if let Some(seq) = seq_of_field(entry, "last_read_seq") {
            return Ok(seq);
        }
        let group_name = group.get_str("group_name").unwrap_or_default();
        let last_read = datetime_from(&timestamp_of(entry.get("last_read")));
        let newest_read = first(
            &self.messages,
            doc! {"group_name": group_name, "timestamp": {"$lte": last_read}},
            Some(doc! {"seq": -1}),
        )?;
        Ok(newest_read.and_then(|m| seq_of(&m)).unwrap_or(0))
    }

    fn find_messages(
        &self,
        filter: Document,
        ascending: bool,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        let cursor = self
            .messages
            .find(filter)
            .sort(doc! {"seq": if ascending { 1 } else { -1 }})
            .limit(i64::from(limit))
            .max_time(self.max_time)
            .run()?;
        let mut found = Vec::new();
        for document in cursor {
            found.push(message_from(&document?)?);
        }
        Ok(found)
    }

    /// Stores the messages of one group (all from members) under fresh `seq` numbers, or
    /// finds the original of those whose `client_msg_id` their sender already used. Returns
    /// what was settled and, when it stopped early, the error for the rest.
    fn insert_with_seq(
        &self,
        group_name: &str,
        mut pending: Vec<(usize, Message)>,
    ) -> (Vec<(usize, Appended)>, Option<StoreError>) {
        let mut settled = Vec::new();
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            if attempts > MAX_SEQ_RETRIES {
                let error = StoreError::Unavailable("too much contention assigning seq".into());
                return (settled, Some(error));
            }
            // On every attempt: a concurrent writer may have stored one of these ids since.
            match self.sent_before(&pending) {
                Ok(originals) => {
                    let (repeats, fresh): (Vec<_>, Vec<_>) = pending
                        .into_iter()
                        .partition(|(_, m)| original_of(&originals, m).is_some());
                    for (index, message) in repeats {
                        if let Some(original) = original_of(&originals, &message) {
                            settled.push((index, Appended::duplicate(original.clone())));
                        }
                    }
                    pending = fresh;
                }
                Err(error) => return (settled, Some(error)),
            }
            if pending.is_empty() {
                break;
            }
            let head = if attempts == 1 {
                self.head_hint(group_name)
            } else {
                self.head_seq(group_name)
            };
            let head = match head {
                Ok(head) => head,
                Err(error) => return (settled, Some(error)),
            };
            for (offset, (_, message)) in pending.iter_mut().enumerate() {
                message.seq = head + 1 + offset as u64;
            }
            let documents: Vec<Document> =
                pending.iter().map(|(_, m)| message_document(m)).collect();
            match self.messages.insert_many(documents).ordered(true).run() {
                Ok(_) => {
                    settled.extend(pending.drain(..).map(|(i, m)| (i, Appended::new(m))));
                }
                Err(error) if is_duplicate_key(&error) => {
                    let landed = match self.landed_ids(&pending) {
                        Ok(landed) => landed,
                        Err(error) => return (settled, Some(error)),
                    };
                    let (done, rest): (Vec<_>, Vec<_>) = pending
                        .into_iter()
                        .partition(|(_, m)| landed.contains_key(&m.id));
                    settled.extend(done.into_iter().map(|(i, m)| (i, Appended::new(m))));
                    pending = rest;
                }
                Err(error) => return (settled, Some(error.into())),
            }
        }
        let top = settled
            .iter()
            .filter(|(_, a)| !a.duplicate)
            .map(|(_, a)| a.message.seq)
            .max();
        if let Some(top) = top {
            self.raise_head_hint(group_name, top);
        }
        (settled, None)
    }

    /// The stored originals of those pending messages whose sender already used their
    /// `client_msg_id` (no query when none has an id).
    fn sent_before(&self, pending: &[(usize, Message)]) -> StoreResult<Vec<Message>> {
        let keys: Vec<Document> = pending
            .iter()
            .filter_map(|(_, m)| {
                let id = m.client_msg_id.as_ref()?;
                Some(doc! {"username": &m.username, "client_msg_id": id})
            })
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let most = keys.len() as u32;
        self.find_messages(doc! {"$or": keys}, true, most)
    }

    /// The newest seq of each group, in two queries whatever their number: the `counters`
    /// hints, then every message above its group's hint (none, unless a hint was left behind
    /// by a failed raise). A group with no hint yet (no message since hints existed) is read
    /// once by itself and gets one, so the next call finds it.
    fn head_seqs(&self, names: &[&str]) -> StoreResult<HashMap<String, u64>> {
        let mut heads = HashMap::with_capacity(names.len());
        for chunk in names.chunks(NAMES_PER_QUERY) {
            heads.extend(self.head_seqs_of(chunk)?);
        }
        Ok(heads)
    }

    /// `head_seqs` of at most `NAMES_PER_QUERY` groups.
    fn head_seqs_of(&self, names: &[&str]) -> StoreResult<HashMap<String, u64>> {
        let mut heads = HashMap::with_capacity(names.len());
        if names.is_empty() {
            return Ok(heads);
        }
        let cursor = self
            .counters
            .find(doc! {"_id": {"$in": names.to_vec()}})
            .max_time(self.max_time)
            .run()?;
        for counter in cursor {
            let counter = counter?;
            if let (Ok(name), Some(seq)) = (counter.get_str("_id"), seq_of(&counter)) {
                heads.insert(name.to_string(), seq);
            }
        }
        let mut above_hints = Vec::with_capacity(names.len());
        for name in names {
            match heads.get(*name) {
                Some(&hint) => {
                    above_hints.push(doc! {"group_name": *name, "seq": {"$gt": hint as i64}})
                }
                None => {
                    let head = self.head_seq(name)?;
                    self.raise_head_hint(name, head);
                    heads.insert(name.to_string(), head);
                }
            }
        }
        if !above_hints.is_empty() {
            let cursor = self
                .messages
                .find(doc! {"$or": above_hints})
                .projection(doc! {"group_name": 1, "seq": 1})
                .max_time(self.max_time)
                .run()?;
            for message in cursor {
                let message = message?;
                if let (Ok(name), Some(seq)) = (message.get_str("group_name"), seq_of(&message)) {
                    let head = heads.entry(name.to_string()).or_insert(0);
                    *head = (*head).max(seq);
                }
            }
        }
        Ok(heads)
    }

    /// The group's head `seq` as the `counters` hint has it (0 when there is none yet).
    fn head_hint(&self, group_name: &str) -> StoreResult<u64> {
        let counter = first(&self.counters, doc! {"_id": group_name}, None)?;
        Ok(counter.and_then(|c| seq_of(&c)).unwrap_or(0))
    }

    /// Raises the hint to `seq`. Failing here loses nothing: the next insert under a stale hint
    /// meets the unique index and falls back to the real head.
    fn raise_head_hint(&self, group_name: &str, seq: u64) {
        let raised = self
            .counters
            .update_one(doc! {"_id": group_name}, doc! {"$max": {"seq": seq as i64}})
            .upsert(true)
            .run();
        if let Err(error) = raised {
            log::debug!("seq hint for {group_name} not raised: {error}");
        }
    }

    /// Which of these messages are in the database (after a partly failed insert).
    fn landed_ids(&self, pending: &[(usize, Message)]) -> StoreResult<HashMap<String, ()>> {
        let ids = object_ids(pending.iter().map(|(_, m)| m.id.as_str()));
        let cursor = self
            .messages
            .find(doc! {"_id": {"$in": ids}})
            .projection(doc! {"_id": 1})
            .run()?;
        let mut landed = HashMap::new();
        for document in cursor {
            if let Ok(id) = document?.get_object_id("_id") {
                landed.insert(id.to_hex(), ());
            }
        }
        Ok(landed)
    }

    fn append_group(
        &self,
        group_name: &str,
        items: Vec<(usize, &NewMessage)>,
        now: &str,
    ) -> Vec<(usize, StoreResult<Appended>)> {
        let group = match self.group(group_name) {
            Ok(group) => group,
            // A retry still gets its original when the group is gone or was never there
            // (the idempotency key is the sender's, whatever group the retry names).
            Err(StoreError::GroupNotFound) => {
                let strangers = items.into_iter().map(|(i, m)| (i, unstored(m, now)));
                return self.retries_of_strangers(strangers.collect(), StoreError::GroupNotFound);
            }
            Err(error) => {
                return items
                    .into_iter()
                    .map(|(i, _)| (i, Err(error.clone())))
                    .collect()
            }
        };
        let members = member_names(&group);
        let (members_items, strangers): (Vec<_>, Vec<_>) = items
            .into_iter()
            .map(|(i, m)| (i, unstored(m, now)))
            .partition(|(_, m)| members.contains(&m.username));
        let mut results = self.retries_of_strangers(strangers, not_a_member(group_name));
        let (members_items, refused) = self.may_post(&group, members_items);
        results.extend(refused);
        let (members_items, refused) = self.thread_roots(group_name, members_items);
        results.extend(refused);
        let indexes: Vec<usize> = members_items.iter().map(|(i, _)| *i).collect();
        // The push jobs go in before the messages they tell of (no transaction puts the two
        // in one commit here): a job whose message never lands is dropped by the worker, a
        // message is never stored without its jobs. If they cannot be queued, nothing is.
        if let Some(policy) = self.push {
            if let Err(error) = self.queue_pushes(&group, &members_items, policy) {
                results.extend(indexes.into_iter().map(|i| (i, Err(error.clone()))));
                return results;
            }
        }
        let (mut settled, error) = self.insert_with_seq(group_name, members_items);
        self.count_replies(group_name, &settled);
        if direct::is_direct(group_name) && settled.iter().any(|(_, a)| !a.duplicate) {
            let revealed = self.show_direct(&group);
            if let Some((_, first)) = settled.iter_mut().find(|(_, a)| !a.duplicate) {
                first.revealed_to = revealed.filter(|name| *name != first.message.username);
            }
        }
        let (settled, error, refused) = self.unless_access_went(&group, group_name, settled, error);
        let mut settled: HashMap<usize, Appended> = settled.into_iter().collect();
        let refused_indexes: Vec<usize> = refused.iter().map(|(i, _)| *i).collect();
        results.extend(refused.into_iter().map(|(i, e)| (i, Err(e))));
        for i in indexes.into_iter().filter(|i| !refused_indexes.contains(i)) {
            let outcome = settled.remove(&i).ok_or_else(|| {
                error
                    .clone()
                    .unwrap_or_else(|| StoreError::Unavailable("lost result".into()))
            });
            results.push((i, outcome));
        }
        results
    }

    /// Of a group's members' messages, those that may be stored, and the refusals of the
    /// rest: a direct conversation's member blocked by the other, a mention of a non-member
    /// (or of `@room` by someone who does not moderate).
    fn may_post(
        &self,
        group: &Document,
        items: Vec<(usize, Message)>,
    ) -> (Vec<(usize, Message)>, Settled) {
        let members = member_names(group);
        let blocked_by_partner = |sender: &str| -> StoreResult<bool> {
            if group.get_str("kind") != Ok(direct::KIND) {
                return Ok(false);
            }
            let Some(partner) = members.iter().find(|name| *name != sender) else {
                return Ok(false);
            };
            let filter = doc! {"username": partner, "blocked": sender};
            Ok(first(&self.users, filter, None)?.is_some())
        };
        let mut kept = Vec::with_capacity(items.len());
        let mut refused = Vec::new();
        for (index, message) in items {
            let checked = blocked_by_partner(&message.username).and_then(|blocked| {
                if blocked {
                    return Err(StoreError::Blocked);
                }
                let role = member_role(group, &message.username)?;
                check_mentions(&message.mentions, role, |name| {
                    Ok(members.iter().any(|member| member == name))
                })
            });
            match checked {
                Ok(()) => kept.push((index, message)),
                Err(error) => refused.push((index, Err(error))),
            }
        }
        (kept, refused)
    }

    /// Replies join their thread: each `reply_to` (the message answered) becomes its
    /// thread's root, in one query for the batch; a reply to a message that is not there or
    /// was deleted is refused (`MessageNotFound`).
    fn thread_roots(
        &self,
        group_name: &str,
        items: Vec<(usize, Message)>,
    ) -> (Vec<(usize, Message)>, Settled) {
        let asked: Vec<i64> = items
            .iter()
            .filter_map(|(_, m)| m.reply_to)
            .map(|seq| seq.min(i64::MAX as u64) as i64)
            .collect();
        if asked.is_empty() {
            return (items, Vec::new());
        }
        let found = self.find_messages(
            doc! {"group_name": group_name, "seq": {"$in": &asked}, "deleted": {"$ne": true}},
            true,
            asked.len() as u32,
        );
        let found = match found {
            Ok(found) => found,
            Err(error) => {
                let refused = items.into_iter().map(|(i, _)| (i, Err(error.clone())));
                return (Vec::new(), refused.collect());
            }
        };
        let mut kept = Vec::with_capacity(items.len());
        let mut refused = Vec::new();
        for (index, mut message) in items {
            let Some(parent) = message.reply_to else {
                kept.push((index, message));
                continue;
            };
            match found.iter().find(|m| m.seq == parent) {
                Some(answered) => {
                    message.reply_to = Some(answered.reply_to.unwrap_or(parent));
                    kept.push((index, message));
                }
                None => refused.push((index, Err(StoreError::MessageNotFound))),
            }
        }
        (kept, refused)
    }

    /// Counts the replies just stored on their roots. An instance that dies between the
    /// insert and this leaves a root's count one short until a delete of one of its replies
    /// counts it again (`recount_replies`).
    fn count_replies(&self, group_name: &str, settled: &[(usize, Appended)]) {
        for (_, appended) in settled.iter().filter(|(_, a)| !a.duplicate) {
            let Some(root) = appended.message.reply_to else {
                continue;
            };
            let counted = self
                .messages
                .update_one(
                    doc! {"group_name": group_name, "seq": root as i64},
                    doc! {
                        "$inc": {"reply_count": 1_i64},
                        "$max": {"last_reply_seq": appended.message.seq as i64},
                    },
                )
                .run();
            if let Err(error) = counted {
                log::warn!("the reply count of {group_name} #{root} was not raised: {error}");
            }
        }
    }

    /// Sets a thread root's `reply_count` and `last_reply_seq` from its replies that are not
    /// deleted.
    fn recount_replies(&self, group_name: &str, root: u64) -> StoreResult<()> {
        let replies =
            doc! {"group_name": group_name, "reply_to": root as i64, "deleted": {"$ne": true}};
        let count = self.messages.count_documents(replies.clone()).run()?;
        let newest = first(&self.messages, replies, Some(doc! {"seq": -1}))?
            .and_then(|reply| seq_of(&reply));
        let update = match newest {
            Some(seq) => doc! {"$set": {"reply_count": count as i64, "last_reply_seq": seq as i64}},
            None => doc! {"$unset": {"reply_count": "", "last_reply_seq": ""}},
        };
        self.messages
            .update_one(doc! {"group_name": group_name, "seq": root as i64}, update)
            .run()?;
        Ok(())
    }

    /// Queues the push jobs of messages about to be stored (direct, or mentioning someone),
    /// each keyed by its message's `_id` (already chosen) and holding no text: the worker
    /// reads the message's seq, and its text for the preview, when it delivers, so a job
    /// outlives neither an edit nor a delete, and a job whose message never landed (an
    /// instance killed between the two writes, a retry that found its original) is dropped
    /// after `ORPHAN_GRACE_MS`.
    fn queue_pushes(
        &self,
        group: &Document,
        pending: &[(usize, Message)],
        policy: PushPolicy,
    ) -> StoreResult<()> {
        let is_direct = group.get_str("kind") == Ok(direct::KIND);
        if !is_direct && pending.iter().all(|(_, m)| m.mentions.is_empty()) {
            return Ok(());
        }
        let members: Vec<(String, Notify)> = member_names(group)
            .into_iter()
            .map(|name| {
                let level = member_entry(group, &name)
                    .and_then(|entry| entry.get_str("notify").ok())
                    .and_then(Notify::parse)
                    .unwrap_or_default();
                (name, level)
            })
            .collect();
        let mut documents = Vec::new();
        for (_, message) in pending {
            if !is_direct && message.mentions.is_empty() {
                continue;
            }
            let recipients = push_recipients(message, is_direct, &members);
            for job in PushJob::for_message(message, &recipients, policy) {
                documents.push(doc! {
                    "_id": &job.id,
                    "message_id": &message.id,
                    "username": &job.username,
                    "group_name": &job.group_name,
                    "sender": &job.sender,
                    "kind": &job.kind,
                    "with_preview": policy.preview,
                    "created_ms": job.created_ms as i64,
                    "next_ms": job.created_ms as i64,
                    "attempts": 0_i64,
                });
            }
        }
        if documents.is_empty() {
            return Ok(());
        }
        self.push_queue.insert_many(documents).run()?;
        Ok(())
    }

    /// Completes claimed jobs from their messages (seq, and the preview from the text as it
    /// is now); returns those to deliver. A job whose message was deleted, or never landed
    /// within `ORPHAN_GRACE_MS`, is dropped; one whose message has not landed yet waits a
    /// second.
    fn resolve_pushes(
        &self,
        claimed: Vec<(PushJob, Option<String>, bool)>,
        now_ms: u64,
    ) -> StoreResult<Vec<PushJob>> {
        let ids = object_ids(claimed.iter().filter_map(|(_, id, _)| id.as_deref()));
        let mut messages: HashMap<String, Document> = HashMap::new();
        if !ids.is_empty() {
            let cursor = self
                .messages
                .find(doc! {"_id": {"$in": ids}})
                .projection(doc! {"seq": 1, "text": 1, "deleted": 1})
                .max_time(self.max_time)
                .run()?;
            for message in cursor {
                let message = message?;
                if let Ok(id) = message.get_object_id("_id") {
                    messages.insert(id.to_hex(), message);
                }
            }
        }
        let (mut ready, mut gone, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
        for (mut job, message_id, with_preview) in claimed {
            let Some(message_id) = message_id else {
                // Queued by an earlier version, with its seq and preview.
                ready.push(job);
                continue;
            };
            match messages.get(&message_id) {
                Some(message) if message.get_bool("deleted") != Ok(true) => {
                    job.seq = seq_of(message).unwrap_or(0);
                    job.preview = with_preview.then(|| {
                        let text = message.get_str("text").unwrap_or_default();
                        text.chars().take(PUSH_PREVIEW_CHARS).collect()
                    });
                    ready.push(job);
                }
                Some(_) => gone.push(job.id),
                None if now_ms.saturating_sub(job.created_ms) > ORPHAN_GRACE_MS => {
                    gone.push(job.id)
                }
                None => waiting.push(job.id),
            }
        }
        if !gone.is_empty() {
            self.push_queue
                .delete_many(doc! {"_id": {"$in": gone}})
                .run()?;
        }
        if !waiting.is_empty() {
            self.push_queue
                .update_many(
                    doc! {"_id": {"$in": waiting}},
                    doc! {"$set": {"next_ms": (now_ms + ORPHAN_RECHECK_MS) as i64}},
                )
                .run()?;
        }
        Ok(ready)
    }

    /// Shows a direct conversation to members who had it hidden (left, or not yet shown);
    /// returns one of them (the other member, to be told). Best effort: a failure leaves it
    /// hidden until the next message.
    fn show_direct(&self, group: &Document) -> Option<String> {
        let group_name = group.get_str("group_name").ok()?;
        let hidden: Vec<String> = member_names(group)
            .into_iter()
            .filter(|name| is_hidden(group, name))
            .collect();
        for name in &hidden {
            let shown = self
                .groups
                .update_one(
                    doc! {"group_name": group_name, "user.name_ID": name},
                    doc! {"$unset": {"user.$.hidden": ""}},
                )
                .run();
            if let Err(error) = shown {
                log::warn!("a direct conversation stays hidden from a member: {error}");
            }
        }
        hidden.into_iter().next()
    }

    /// Mentions of `username` after their marker, per group, in one query.
    fn mention_counts(
        &self,
        username: &str,
        marks: &[(String, u64)],
    ) -> StoreResult<HashMap<String, u64>> {
        let mut counts = HashMap::new();
        for chunk in marks.chunks(NAMES_PER_QUERY) {
            counts.extend(self.mention_counts_of(username, chunk)?);
        }
        Ok(counts)
    }

    /// `mention_counts` of at most `NAMES_PER_QUERY` groups.
    fn mention_counts_of(
        &self,
        username: &str,
        marks: &[(String, u64)],
    ) -> StoreResult<HashMap<String, u64>> {
        let mut counts = HashMap::new();
        if marks.is_empty() {
            return Ok(counts);
        }
        // One condition on the mention index (not one clause per group, which servers
        // evaluate clause by clause): mentions of the user after the lowest marker of the
        // page, counted per group above its own marker here.
        let lowest = marks.iter().map(|(_, mark)| *mark).min().unwrap_or(0);
        let names: Vec<&str> = marks.iter().map(|(name, _)| name.as_str()).collect();
        let mark_of: HashMap<&str, u64> = marks.iter().map(|(n, m)| (n.as_str(), *m)).collect();
        let filter = doc! {
            "mentions": {"$in": [username, ROOM_MENTION]},
            "group_name": {"$in": names},
            "seq": {"$gt": lowest.min(i64::MAX as u64) as i64},
            "username": {"$ne": username},
            "deleted": {"$ne": true},
        };
        let cursor = self
            .messages
            .find(filter)
            .projection(doc! {"group_name": 1, "seq": 1})
            .max_time(self.max_time)
            .run()?;
        for document in cursor {
            let document = document?;
            let (Ok(name), Some(seq)) = (document.get_str("group_name"), seq_of(&document)) else {
                continue;
            };
            if mark_of.get(name).is_some_and(|mark| seq > *mark) {
                *counts.entry(name.to_string()).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// A `delete_group` running beside this append (on another worker: another event loop's
    /// or another instance's) may have removed the group between the read that found it and
    /// the insert, leaving messages behind that a group later made under the name would show
    /// (and number after). So the group is read again after the insert: if it is gone, or is
    /// another group of the name (another id), what this append inserted is removed again and
    /// refused `group_not_found`. A delete that comes after this second read removes the
    /// messages itself (they were inserted before it).
    ///
    /// The same read closes the race with a ban, a removal or an erasure (one update of the
    /// group document each): a sender no longer a member when the group is read again has what
    /// it inserted made a tombstone and refused (`banned` or `not_a_member`), so no message is ever
    /// stored after a ban was answered. A ban or erasure after this read comes after the
    /// insert, so the message was sent while a member (an erasure then scrubs it, as it
    /// scrubs the sender's messages only after taking their memberships).
    fn unless_access_went(
        &self,
        group: &Document,
        group_name: &str,
        settled: Vec<(usize, Appended)>,
        error: Option<StoreError>,
    ) -> AccessChecked {
        let inserted = |settled: &[(usize, Appended)], keep: &dyn Fn(&Message) -> bool| {
            object_ids(
                settled
                    .iter()
                    .filter(|(_, appended)| !appended.duplicate && keep(&appended.message))
                    .map(|(_, appended)| appended.message.id.as_str()),
            )
        };
        if inserted(&settled, &|_| true).is_empty() {
            return (settled, error, Vec::new());
        }
        let now = match self.group(group_name) {
            Ok(now) => Some(now),
            Err(StoreError::GroupNotFound) => None,
            // Cannot tell: the insert stands (a delete or erasure still running removes it).
            Err(_) => return (settled, error, Vec::new()),
        };
        let now = now.filter(|now| {
            group_ref(now, group_name).group_id == group_ref(group, group_name).group_id
        });
        let Some(now) = now else {
            let ids = inserted(&settled, &|_| true);
            if let Err(error) = self.messages.delete_many(doc! {"_id": {"$in": ids}}).run() {
                return (Vec::new(), Some(error.into()), Vec::new());
            }
            let kept = settled.into_iter().filter(|(_, a)| a.duplicate).collect();
            return (kept, Some(StoreError::GroupNotFound), Vec::new());
        };
        let members = member_names(&now);
        let banned = |name: &str| names_include(&now, "banned", name);
        // A ban is written before the member is taken out: banned counts as gone already.
        let outsider =
            |message: &Message| !members.contains(&message.username) || banned(&message.username);
        let ids = inserted(&settled, &outsider);
        if ids.is_empty() {
            return (settled, error, Vec::new());
        }
        // Tombstones rather than removals: their seqs are taken, and a group's seqs stay
        // gapless (a room reading the gap from the store gets them as deleted messages). No
        // author either: the message was refused, and its sender may be being erased.
        let scrub = self.messages.update_many(
            doc! {"_id": {"$in": ids}},
            doc! {"$set": {"deleted": true, "username": ""}, "$unset": {"text": "", "edited_at": "", "client_msg_id": ""}},
        );
        if let Err(error) = scrub.run() {
            return (Vec::new(), Some(error.into()), Vec::new());
        }
        let (refused, kept): (Vec<_>, Vec<_>) = settled
            .into_iter()
            .partition(|(_, a)| !a.duplicate && outsider(&a.message));
        let refused = refused
            .into_iter()
            .map(|(i, a)| {
                let refusal = if banned(&a.message.username) {
                    StoreError::Banned
                } else {
                    StoreError::NotAMember
                };
                (i, refusal)
            })
            .collect();
        (kept, error, refused)
    }

    /// Messages from non-members are refused (`refusal`), except a retry of one stored before
    /// (the sender may have left the group since): that gets its original, never a second copy.
    fn retries_of_strangers(
        &self,
        strangers: Vec<(usize, Message)>,
        refusal: StoreError,
    ) -> Vec<(usize, StoreResult<Appended>)> {
        let originals = match self.sent_before(&strangers) {
            Ok(originals) => originals,
            Err(error) => {
                return strangers
                    .into_iter()
                    .map(|(i, _)| (i, Err(error.clone())))
                    .collect()
            }
        };
        strangers
            .into_iter()
            .map(|(i, message)| {
                let outcome = original_of(&originals, &message)
                    .map(|original| Appended::duplicate(original.clone()))
                    .ok_or_else(|| refusal.clone());
                (i, outcome)
            })
            .collect()
    }
}

/// Outcomes of some of a batch's messages, by their index in the batch.
type Settled = Vec<(usize, StoreResult<Appended>)>;

/// A message about to be stored (its `seq` is set when it is inserted).
/// What stood of an insert once the group was read again: the messages kept, the error for
/// the rest, and those refused one by one (their sender lost access meanwhile).
type AccessChecked = (
    Vec<(usize, Appended)>,
    Option<StoreError>,
    Vec<(usize, StoreError)>,
);

fn unstored(message: &NewMessage, now: &str) -> Message {
    Message {
        id: ObjectId::new().to_hex(),
        group_name: message.group_name.clone(),
        username: message.username.clone(),
        text: message.text.clone(),
        timestamp: now.to_string(),
        seq: 0,
        client_msg_id: message.client_msg_id.clone(),
        mentions: message.mentions.clone(),
        // The message answered, until `thread_roots` puts its thread's root here.
        reply_to: message.reply_to,
        ..Message::default()
    }
}

/// The original of `message` among `originals`: same sender, same `client_msg_id`.
fn original_of<'a>(originals: &'a [Message], message: &Message) -> Option<&'a Message> {
    let id = message.client_msg_id.as_ref()?;
    originals
        .iter()
        .find(|o| o.username == message.username && o.client_msg_id.as_ref() == Some(id))
}

/// The first matching document. (`find_one` sends `limit: -1`, which some MongoDB-compatible
/// servers refuse; `limit: 1` means the same everywhere.)
fn first(
    collection: &Collection<Document>,
    filter: Document,
    sort: Option<Document>,
) -> StoreResult<Option<Document>> {
    let mut cursor = collection.find(filter).limit(1);
    if let Some(sort) = sort {
        cursor = cursor.sort(sort);
    }
    Ok(cursor.run()?.next().transpose()?)
}

fn is_duplicate_key(error: &MongoError) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(e) => e
            .write_errors
            .iter()
            .flatten()
            .any(|w| w.code == DUPLICATE_KEY),
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Message ids (hex) as the `_id` values to match; an id that is not one matches nothing.
fn object_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<Bson> {
    ids.filter_map(|id| ObjectId::parse_str(id).ok())
        .map(Bson::ObjectId)
        .collect()
}

fn seq_of(document: &Document) -> Option<u64> {
    seq_of_field(document, "seq")
}

fn seq_of_field(document: &Document, field: &str) -> Option<u64> {
    match document.get(field) {
        Some(Bson::Int64(seq)) => Some(*seq as u64),
        Some(Bson::Int32(seq)) => Some(*seq as u64),
        Some(Bson::Double(seq)) => Some(*seq as u64),
        _ => None,
    }
}

fn timestamp_of(value: Option<&Bson>) -> String {
    let millis = match value {
        Some(Bson::DateTime(time)) => time.timestamp_millis(),
        Some(Bson::String(text)) => return text.clone(),
        _ => 0,
    };
    DateTime::<Utc>::from_timestamp_millis(millis)
        .map(format_timestamp)
        .unwrap_or_default()
}

fn datetime_from(timestamp: &str) -> mongodb::bson::DateTime {
    match DateTime::parse_from_rfc3339(timestamp) {
        Ok(time) => mongodb::bson::DateTime::from_millis(time.timestamp_millis()),
        Err(_) => mongodb::bson::DateTime::now(),
    }
}

fn message_document(message: &Message) -> Document {
    let id = ObjectId::parse_str(&message.id).unwrap_or_else(|_| ObjectId::new());
    let mut document = doc! {
        "_id": id,
        "group_name": &message.group_name,
        "username": &message.username,
        "text": &message.text,
        "timestamp": datetime_from(&message.timestamp),
        "seq": message.seq as i64,
    };
    if let Some(id) = &message.client_msg_id {
        document.insert("client_msg_id", id);
    }
    if !message.mentions.is_empty() {
        document.insert("mentions", &message.mentions);
    }
    if let Some(root) = message.reply_to {
        document.insert("reply_to", root as i64);
    }
    document
}

fn message_from(document: &Document) -> StoreResult<Message> {
    let text = |field: &str| document.get_str(field).map(str::to_string);
    let broken = |e| StoreError::Unavailable(format!("malformed message document: {e}"));
    Ok(Message {
        id: document
            .get_object_id("_id")
            .map(|id| id.to_hex())
            .map_err(broken)?,
        group_name: text("group_name").map_err(broken)?,
        username: text("username").map_err(broken)?,
        // A tombstone has no text at all.
        text: text("text").unwrap_or_default(),
        timestamp: timestamp_of(document.get("timestamp")),
        seq: seq_of(document).unwrap_or(0),
        client_msg_id: document.get_str("client_msg_id").ok().map(str::to_string),
        edited_at: document.get("edited_at").map(|at| timestamp_of(Some(at))),
        deleted: document.get_bool("deleted").unwrap_or(false),
        mentions: names_in(document, "mentions"),
        reply_to: seq_of_field(document, "reply_to"),
        reply_count: seq_of_field(document, "reply_count").unwrap_or(0),
        last_reply_seq: seq_of_field(document, "last_reply_seq"),
    })
}

/// A document's array of names (`banned`, `blocked`, `mentions`); none when it has none.
fn names_in(document: &Document, field: &str) -> Vec<String> {
    document
        .get_array(field)
        .map(|names| {
            names
                .iter()
                .filter_map(|name| name.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a document's array of names holds `name`.
fn names_include(document: &Document, field: &str, name: &str) -> bool {
    document
        .get_array(field)
        .is_ok_and(|names| names.iter().any(|n| n.as_str() == Some(name)))
}

/// The `group.user` entries as (name, last_read).
fn members_of(group: &Document) -> Vec<(String, String)> {
    let Ok(entries) = group.get_array("user") else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(Bson::as_document)
        .filter_map(|entry| {
            let name = entry.get_str("name_ID").ok()?;
            Some((name.to_string(), timestamp_of(entry.get("last_read"))))
        })
        .collect()
}

fn member_names(group: &Document) -> Vec<String> {
    members_of(group)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

fn group_ref(group: &Document, group_name: &str) -> GroupRef {
    let group_id = group
        .get_object_id("_id")
        .map(|id| id.to_hex())
        .unwrap_or_default();
    GroupRef {
        group_id,
        group_name: group_name.to_string(),
    }
}

/// The member's `last_read` in the group, or why there is none.
fn member_last_read(group: &Document, username: &str) -> StoreResult<String> {
    member_entry(group, username)
        .map(|entry| timestamp_of(entry.get("last_read")))
        .ok_or_else(|| not_a_member_of(group))
}

/// `store::not_a_member` for a group document.
fn not_a_member_of(group: &Document) -> StoreError {
    not_a_member(group.get_str("group_name").unwrap_or_default())
}

/// The attention fields of a membership from its group document (`mention_count` is counted
/// by the caller, in one query for a page).
fn attention_of(group: &Document, username: &str, mention_count: u64) -> Attention {
    let entry = member_entry(group, username);
    let notify = entry
        .and_then(|entry| entry.get_str("notify").ok())
        .and_then(Notify::parse)
        .unwrap_or_default();
    let is_direct = group.get_str("kind") == Ok(direct::KIND);
    Attention {
        mention_count,
        notify,
        kind: is_direct.then(|| direct::KIND.to_string()),
        with: is_direct
            .then(|| {
                member_names(group)
                    .into_iter()
                    .find(|name| name != username)
            })
            .flatten(),
    }
}

/// A member whose direct conversation is hidden from their `my_groups`.
fn is_hidden(group: &Document, username: &str) -> bool {
    member_entry(group, username).is_some_and(|entry| entry.get_bool("hidden") == Ok(true))
}

/// The groups a user is a member of and sees (not a direct conversation they left).
fn shown_to(username: &str) -> Document {
    doc! {"user": {"$elemMatch": {"name_ID": username, "hidden": {"$ne": true}}}}
}

/// The member's role: as recorded, else (entries from before roles) owner for the group's
/// creator and member for everyone else.
fn member_role(group: &Document, username: &str) -> StoreResult<Role> {
    let entry = member_entry(group, username).ok_or_else(|| not_a_member_of(group))?;
    Ok(match entry.get_str("role") {
        Ok(role) => Role::parse(role),
        Err(_) if group.get_str("creator") == Ok(username) => Role::Owner,
        Err(_) => Role::Member,
    })
}

fn first_seq_of(group: &Document) -> u64 {
    seq_of_field(group, "first_seq").unwrap_or(1)
}

/// The member's entry in `group.user`.
fn member_entry<'a>(group: &'a Document, username: &str) -> Option<&'a Document> {
    group
        .get_array("user")
        .ok()?
        .iter()
        .filter_map(Bson::as_document)
        .find(|entry| entry.get_str("name_ID") == Ok(username))
}

impl Store for MongoStore {
    fn find_user(&mut self, username: &str, may_create: bool) -> StoreResult<(UserProfile, bool)> {
        self.ensure_indexes()?;
        let existing = first(&self.users, doc! {"username": username}, None)?;
        let (id, created) = match existing {
            Some(user) => (
                user.get_object_id("_id")
                    .map(|id| id.to_hex())
                    .unwrap_or_default(),
                false,
            ),
            None if !may_create => return Err(StoreError::UserNotFound),
            None => {
                let id = ObjectId::new();
                match self
                    .users
                    .insert_one(doc! {"_id": id, "username": username})
                    .run()
                {
                    Ok(_) => (id.to_hex(), true),
                    Err(error) if is_duplicate_key(&error) => {
                        return self.find_user(username, false)
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        let cursor = self
            .groups
            .find(shown_to(username))
            .projection(doc! {"group_name": 1})
            .sort(doc! {"group_name": 1})
            .limit(i64::from(MAX_GROUP_LIST) + 1)
            .max_time(self.max_time)
            .run()?;
        let mut group_list = Vec::new();
        for group in cursor {
            if let Ok(name) = group?.get_str("group_name") {
                group_list.push(name.to_string());
            }
        }
        Ok((profile(id, username, group_list), created))
    }

    fn create_group(&mut self, creator: MemberOf, quota: usize) -> StoreResult<CreatedGroup> {
        let (username, group_name) = (creator.username, creator.group_name);
        self.ensure_indexes()?;
        if !self.user_exists(username)? {
            return Err(StoreError::UserNotFound);
        }
        if first(&self.groups, doc! {"group_name": group_name}, None)?.is_some() {
            return Err(StoreError::GroupExists);
        }
        if quota > 0 {
            let created = self
                .groups
                .count_documents(doc! {"creator": username})
                .run()?;
            if created >= quota as u64 {
                return Err(StoreError::QuotaExceeded);
            }
        }
        let now = mongodb::bson::DateTime::now();
        let group = doc! {
            "_id": ObjectId::new(),
            "group_name": group_name,
            "creator": username,
            "user": [{"name_ID": username, "last_read": now, "last_read_seq": 0_i64, "role": "owner"}],
        };
        match self.groups.insert_one(group).run() {
            Ok(_) => {}
            Err(error) if is_duplicate_key(&error) => return Err(StoreError::GroupExists),
            Err(error) => return Err(error.into()),
        }
        // A seq hint from the start, so listing read states finds every group's head in one
        // query (`head_seqs`); only groups older than hints are read one by one, once.
        self.raise_head_hint(group_name, 0);
        let last_read = timestamp_of(Some(&Bson::DateTime(now)));
        Ok(created_group(group_name, username, last_read))
    }

    fn join_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef> {
        self.ensure_indexes()?;
        if !self.user_exists(username)? {
            return Err(StoreError::UserNotFound);
        }
        let group = self.group(group_name)?;
        // Nobody joins a direct conversation: its two members have it from `open_direct`.
        if direct::is_direct(group_name) {
            member_role(&group, username)?;
            return Ok(group_ref(&group, group_name));
        }
        if names_include(&group, "banned", username) {
            return Err(StoreError::Banned);
        }
        // The ban is checked again in the update itself: a ban landing between the read above
        // and this write must still win.
        self.groups
            .update_one(
                doc! {"group_name": group_name, "user.name_ID": {"$ne": username}, "banned": {"$ne": username}},
                doc! {"$push": {"user": {"name_ID": username, "last_read": mongodb::bson::DateTime::now(), "last_read_seq": self.head_seq(group_name)? as i64}}},
            )
            .run()?;
        Ok(group_ref(&group, group_name))
    }

    fn leave_group(&mut self, username: &str, group_name: &str) -> StoreResult<GroupRef> {
        self.ensure_indexes()?;
        if !self.user_exists(username)? {
            return Err(StoreError::UserNotFound);
        }
        let group = self.group(group_name)?;
        // Leaving a direct conversation hides it until its next message.
        let update = if direct::is_direct(group_name) {
            doc! {"$set": {"user.$.hidden": true}}
        } else {
            doc! {"$pull": {"user": {"name_ID": username}}}
        };
        let result = self
            .groups
            .update_one(
                doc! {"group_name": group_name, "user.name_ID": username},
                update,
            )
            .run()?;
        if result.matched_count == 0 {
            return Err(not_a_member(group_name));
        }
        Ok(group_ref(&group, group_name))
    }

    fn append_messages(&mut self, batch: &[NewMessage]) -> Vec<StoreResult<Appended>> {
        if let Err(error) = self.ensure_indexes() {
            return batch.iter().map(|_| Err(error.clone())).collect();
        }
        let now = crate::model::now_timestamp();
        let mut by_group: Vec<(&str, Vec<(usize, &NewMessage)>)> = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            match by_group
                .iter_mut()
                .find(|(name, _)| *name == message.group_name)
            {
                Some((_, items)) => items.push((index, message)),
                None => by_group.push((&message.group_name, vec![(index, message)])),
            }
        }
        let mut results: Vec<Option<StoreResult<Appended>>> = batch.iter().map(|_| None).collect();
        for (group_name, items) in by_group {
            for (index, outcome) in self.append_group(group_name, items, &now) {
                results[index] = Some(outcome);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Unavailable("lost result".into()))))
            .collect()
    }

    fn visit_group(&mut self, entry: &Entry) -> StoreResult<Visit> {
        let (username, group_name) = (entry.member.username, entry.member.group_name);
        let leaving = entry.leaving;
        self.ensure_indexes()?;
        let group = self.group(group_name)?;
        let last_read = member_last_read(&group, username)?;
        let last_read_seq = self.member_read_seq(&group, username)?;
        if let Some(mark) = leaving {
            self.mark_read(std::slice::from_ref(mark))?;
        }
        Ok(Visit {
            last_read,
            head_seq: self.head_seq(group_name)?,
            last_read_seq,
        })
    }

    fn enter_group(&mut self, entry: &Entry, reply_budget: usize) -> StoreResult<GroupHistory> {
        let (username, group_name) = (entry.member.username, entry.member.group_name);
        let leaving = entry.leaving;
        self.ensure_indexes()?;
        let group = self.group(group_name)?;
        let last_read_seq = self.member_read_seq(&group, username)?;
        let marker = last_read_seq.min(i64::MAX as u64) as i64;
        let head_seq = self.head_seq(group_name)?;
        let unread =
            doc! {"group_name": group_name, "seq": {"$gt": marker, "$lte": head_seq as i64}};
        let read = doc! {"group_name": group_name, "seq": {"$lte": marker}};
        let rows = EnterRows {
            unread: self.find_messages(unread, true, MAX_UNREAD_ON_ENTER + 1)?,
            read_newest_first: self.find_messages(read, false, MAX_READ_ON_ENTER)?,
            last_read_seq,
            head_seq,
            epoch: group_ref(&group, group_name).group_id,
            first_seq: first_seq_of(&group),
        };
        let history = history(rows, reply_budget, entry.marks_entry);
        if let Some(mark) = leaving {
            self.mark_read(std::slice::from_ref(mark))?;
        }
        if let Some(entered) = entered_mark(username, group_name, &history) {
            self.set_read(&entered, head_seq)?;
        }
        Ok(history)
    }

    fn mark_read(&mut self, marks: &[ReadMark]) -> StoreResult<()> {
        for mark in marks {
            let head_seq = self.head_seq(&mark.group_name)?;
            self.set_read(mark, head_seq)?;
        }
        Ok(())
    }

    fn read_state(&mut self, username: &str, group_name: &str) -> StoreResult<GroupReadState> {
        self.ensure_indexes()?;
        let group = self.group(group_name)?;
        let last_read_seq = self.member_read_seq(&group, username)?;
        let id = group_ref(&group, group_name).group_id;
        let mentions = self.mention_counts(username, &[(group_name.to_string(), last_read_seq)])?;
        let attention = attention_of(&group, username, mentions.values().sum());
        Ok(GroupReadState::new(
            group_name.to_string(),
            id,
            self.head_seq(group_name)?,
            last_read_seq,
        )
        .with_attention(attention))
    }

    fn my_groups(&mut self, username: &str, query: &GroupsQuery) -> StoreResult<MembershipsPage> {
        self.ensure_indexes()?;
        let mut filter = shown_to(username);
        if let Some(after) = &query.after {
            filter.insert("group_name", doc! {"$gt": after});
        }
        let cursor = self.groups_by_name(filter, query.limit + 1)?;
        let mut groups = cursor.collect::<Result<Vec<Document>, _>>()?;
        let has_more = groups.len() > query.limit as usize;
        groups.truncate(query.limit as usize);
        let names: Vec<&str> = groups
            .iter()
            .filter_map(|group| group.get_str("group_name").ok())
            .collect();
        let heads = self.head_seqs(&names)?;
        let mut marks = Vec::with_capacity(groups.len());
        for group in &groups {
            let group_name = group.get_str("group_name").unwrap_or_default().to_string();
            marks.push((group_name, self.member_read_seq(group, username)?));
        }
        let mentions = self.mention_counts(username, &marks)?;
        let mut states = Vec::with_capacity(groups.len());
        for (group, (group_name, last_read_seq)) in groups.iter().zip(marks) {
            let id = group_ref(group, &group_name).group_id;
            let last_seq = heads.get(&group_name).copied().unwrap_or(0);
            let role = member_role(group, username)?;
            let mention_count = mentions.get(&group_name).copied().unwrap_or(0);
            let attention = attention_of(group, username, mention_count);
            states.push(
                GroupReadState::new(group_name, id, last_seq, last_read_seq)
                    .with_role(role)
                    .with_attention(attention),
            );
        }
        Ok(MembershipsPage {
            groups: states,
            has_more,
        })
    }

    fn fetch_messages(&mut self, member: MemberOf, page: PageQuery) -> StoreResult<MessagePage> {
        let (username, group_name) = (member.username, member.group_name);
        self.ensure_indexes()?;
        let group = self.group(group_name)?;
        member_last_read(&group, username)?;
        let mut seq_range = doc! {"$gt": page.after_seq.unwrap_or(0).min(i64::MAX as u64) as i64};
        if let Some(before) = page.before_seq {
            seq_range.insert("$lt", before.min(i64::MAX as u64) as i64);
        }
        let ascending = page.after_seq.is_some();
        let mut filter = doc! {"group_name": group_name, "seq": seq_range};
        // A thread: its root and the replies to it (the root's thread when `thread` names a
        // reply).
        if let Some(seq) = page.thread {
            let named = self
                .stored_message(group_name, seq.min(i64::MAX as u64) as i64)?
                .ok_or(StoreError::MessageNotFound)?;
            let root = named.reply_to.unwrap_or(named.seq) as i64;
            filter.insert("$or", vec![doc! {"seq": root}, doc! {"reply_to": root}]);
        }
        let rows = self.find_messages(filter, ascending, page.limit + 1)?;
        let (mut messages, has_more) = split_page(rows, page.limit);
        if !ascending {
            messages.reverse();
        }
        Ok(MessagePage {
            messages,
            has_more,
            epoch: group_ref(&group, group_name).group_id,
            first_seq: first_seq_of(&group),
        })
    }

    fn list_groups(&mut self, query: &GroupsQuery, asking: &str) -> StoreResult<GroupsPage> {
        let mut filter = doc! {"kind": {"$ne": direct::KIND}};
        if let Some(after) = &query.after {
            filter.insert("group_name", doc! {"$gt": after});
        }
        let cursor = self.groups_by_name(filter, query.limit + 1)?;
        let mut groups = Vec::new();
        for group in cursor {
            let group = group?;
            let group_name = group.get_str("group_name").unwrap_or_default().to_string();
            let mut summary = GroupSummary::new(group_name, member_names(&group));
            summary.role = member_role(&group, asking).ok();
            groups.push(summary);
        }
        let has_more = groups.len() > query.limit as usize;
        groups.truncate(query.limit as usize);
        Ok(GroupsPage { groups, has_more })
    }

    fn group_members(&mut self, group_name: &str) -> StoreResult<Vec<String>> {
        Ok(member_names(&self.group(group_name)?))
    }

    fn group_heads(&mut self, group_names: &[String]) -> StoreResult<Vec<(String, u64)>> {
        let cursor = self
            .counters
            .find(doc! {"_id": {"$in": group_names.to_vec()}})
            .max_time(self.max_time)
            .run()?;
        let mut heads = Vec::with_capacity(group_names.len());
        for counter in cursor {
            let counter = counter?;
            if let (Ok(name), Some(seq)) = (counter.get_str("_id"), seq_of(&counter)) {
                heads.push((name.to_string(), seq));
            }
        }
        Ok(heads)
    }

    fn messages_after(&mut self, group: &str, after: u64, limit: u32) -> StoreResult<Vec<Message>> {
        let (group_name, after_seq) = (group, after);
        self.find_messages(
            doc! {"group_name": group_name, "seq": {"$gt": after_seq.min(i64::MAX as u64) as i64}},
            true,
            limit,
        )
    }

    fn message_at(&mut self, group_name: &str, seq: u64) -> StoreResult<Option<Message>> {
        self.ensure_indexes()?;
        self.group(group_name)?;
        self.stored_message(group_name, seq.min(i64::MAX as u64) as i64)
    }

    fn rewrite(&mut self, group: &str, seq: u64, change: Rewrite) -> StoreResult<Option<Message>> {
        let group_name = group;
        self.ensure_indexes()?;
        let seq = seq.min(i64::MAX as u64) as i64;
        let update = match change {
            Rewrite::Edit { text, at, mentions } => {
                let mut update = doc! {"$set": {"text": text, "edited_at": datetime_from(at)}};
                match mentions {
                    Some([]) => {
                        update.insert("$unset", doc! {"mentions": ""});
                    }
                    Some(names) => {
                        if let Ok(set) = update.get_document_mut("$set") {
                            set.insert("mentions", names);
                        }
                    }
                    None => {}
                }
                update
            }
            // The text is removed from the document, not flagged: a tombstone keeps no trace.
            Rewrite::Erase => {
                // A deleted message is not pushed (its preview would outlive it).
                self.push_queue
                    .delete_many(doc! {"group_name": group_name, "seq": seq})
                    .run()?;
                doc! {"$set": {"deleted": true}, "$unset": {"text": "", "edited_at": "", "mentions": ""}}
            }
        };
        let changed = self
            .messages
            .update_one(
                doc! {"group_name": group_name, "seq": seq, "deleted": {"$ne": true}},
                update,
            )
            .run()?;
        if changed.matched_count == 0 {
            return Ok(None);
        }
        let message = self.stored_message(group_name, seq)?;
        // A deleted reply no longer counts on its thread's root.
        if let (Rewrite::Erase, Some(root)) = (change, message.as_ref().and_then(|m| m.reply_to)) {
            self.recount_replies(group_name, root)?;
        }
        Ok(message)
    }

    fn role(&mut self, group_name: &str, username: &str) -> StoreResult<Role> {
        self.ensure_indexes()?;
        member_role(&self.group(group_name)?, username)
    }

    fn set_role(&mut self, group_name: &str, username: &str, role: Role) -> StoreResult<()> {
        self.ensure_indexes()?;
        let changed = self
            .groups
            .update_one(
                doc! {"group_name": group_name, "user.name_ID": username},
                doc! {"$set": {"user.$.role": role.as_str()}},
            )
            .run()?;
        if changed.matched_count == 0 {
            self.group(group_name)?;
            return Err(not_a_member(group_name));
        }
        Ok(())
    }

    fn members_with_role(&mut self, group_name: &str, role: Role) -> StoreResult<Vec<String>> {
        self.ensure_indexes()?;
        let group = self.group(group_name)?;
        Ok(member_names(&group)
            .into_iter()
            .filter(|name| member_role(&group, name).is_ok_and(|r| r == role))
            .collect())
    }

    fn set_banned(&mut self, group_name: &str, username: &str, banned: bool) -> StoreResult<()> {
        self.ensure_indexes()?;
        let update = if banned {
            doc! {"$addToSet": {"banned": username}}
        } else {
            doc! {"$pull": {"banned": username}}
        };
        let changed = self
            .groups
            .update_one(doc! {"group_name": group_name}, update)
            .run()?;
        if changed.matched_count == 0 {
            return Err(StoreError::GroupNotFound);
        }
        Ok(())
    }

    fn remove_group(&mut self, group_name: &str) -> StoreResult<()> {
        self.ensure_indexes()?;
        // The group document first: from then on no join or send finds the group, so nothing
        // new lands among the messages being removed.
        let removed = self
            .groups
            .delete_one(doc! {"group_name": group_name})
            .run()?;
        if removed.deleted_count == 0 {
            return Err(StoreError::GroupNotFound);
        }
        self.messages
            .delete_many(doc! {"group_name": group_name})
            .run()?;
        self.push_queue
            .delete_many(doc! {"group_name": group_name})
            .run()?;
        // A group created later under this name numbers from 1 again.
        self.counters.delete_one(doc! {"_id": group_name}).run()?;
        Ok(())
    }

    fn prune(&mut self, group_name: &str, cut: &PruneCut, limit: u32) -> StoreResult<u64> {
        let (below_seq, older_than) = (cut.below_seq, cut.older_than);
        self.ensure_indexes()?;
        // The newest message always stays: MongoDB's head is the highest stored seq.
        let head = self.head_seq(group_name)?.max(self.head_hint(group_name)?);
        let below = below_seq.min(head).min(i64::MAX as u64) as i64;
        let mut which = vec![doc! {"seq": {"$lt": below}}];
        if let Some(older_than) = older_than {
            which.push(doc! {"timestamp": {"$lt": datetime_from(older_than)}});
        }
        let filter = doc! {"group_name": group_name, "seq": {"$lt": head as i64}, "$or": which};
        let cursor = self
            .messages
            .find(filter)
            .sort(doc! {"seq": 1})
            .limit(i64::from(limit))
            .projection(doc! {"seq": 1})
            .max_time(self.max_time)
            .run()?;
        let mut seqs = Vec::new();
        for document in cursor {
            if let Some(seq) = seq_of(&document?) {
                seqs.push(seq as i64);
            }
        }
        let Some(&last) = seqs.last() else {
            return Ok(0);
        };
        let removed = self
            .messages
            .delete_many(doc! {"group_name": group_name, "seq": {"$lte": last}})
            .run()?;
        self.groups
            .update_one(
                doc! {"group_name": group_name},
                doc! {"$max": {"first_seq": last + 1}},
            )
            .run()?;
        Ok(removed.deleted_count)
    }

    fn group_names(&mut self, after: &str, limit: u32) -> StoreResult<Vec<(String, u64)>> {
        self.ensure_indexes()?;
        let cursor = self
            .groups
            .find(doc! {"group_name": {"$gt": after}})
            .projection(doc! {"group_name": 1})
            .sort(doc! {"group_name": 1})
            .limit(i64::from(limit))
            .max_time(self.max_time)
            .run()?;
        let mut names = Vec::new();
        for group in cursor {
            if let Ok(name) = group?.get_str("group_name") {
                names.push(name.to_string());
            }
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let heads = self.head_seqs(&refs)?;
        Ok(names
            .into_iter()
            .map(|name| {
                let head = heads.get(&name).copied().unwrap_or(0);
                (name, head)
            })
            .collect())
    }

    fn owned_groups(&mut self, username: &str) -> StoreResult<Vec<String>> {
        self.ensure_indexes()?;
        self.group_names_where(
            doc! {"user": {"$elemMatch": {"name_ID": username, "role": "owner"}}},
        )
    }

    fn erase_user(&mut self, username: &str) -> StoreResult<Vec<String>> {
        self.ensure_indexes()?;
        if !self.user_exists(username)? {
            return Err(StoreError::UserNotFound);
        }
        let groups = self.group_names_where(doc! {"user.name_ID": username})?;
        // Memberships first: from then on a send of theirs is refused, and one that raced
        // this finds itself no longer a member when it reads the group again and scrubs what
        // it inserted (`unless_access_went`); whatever was inserted before is scrubbed below.
        self.groups
            .update_many(
                doc! {"user.name_ID": username},
                doc! {"$pull": {"user": {"name_ID": username}}},
            )
            .run()?;
        self.groups
            .update_many(
                doc! {"banned": username},
                doc! {"$pull": {"banned": username}},
            )
            .run()?;
        // A name registered again starts with a fresh group quota.
        self.groups
            .update_many(doc! {"creator": username}, doc! {"$unset": {"creator": ""}})
            .run()?;
        let threads: Vec<(String, u64)> = self
            .messages
            .find(doc! {"username": username, "reply_to": {"$exists": true}, "deleted": {"$ne": true}})
            .projection(doc! {"group_name": 1, "reply_to": 1})
            .max_time(self.max_time)
            .run()?
            .filter_map(|reply| {
                let reply = reply.ok()?;
                let root = seq_of_field(&reply, "reply_to")?;
                Some((reply.get_str("group_name").ok()?.to_string(), root))
            })
            .collect();
        self.messages
            .update_many(
                doc! {"username": username},
                doc! {"$set": {"deleted": true, "username": ""}, "$unset": {"text": "", "edited_at": "", "client_msg_id": "", "mentions": ""}},
            )
            .run()?;
        // Their replies no longer count on the threads they answered.
        let mut threads = threads;
        threads.sort();
        threads.dedup();
        for (group_name, root) in &threads {
            self.recount_replies(group_name, *root)?;
        }
        self.messages
            .update_many(
                doc! {"mentions": username},
                doc! {"$pull": {"mentions": username}},
            )
            .run()?;
        self.users
            .update_many(
                doc! {"blocked": username},
                doc! {"$pull": {"blocked": username}},
            )
            .run()?;
        self.push_queue
            .delete_many(doc! {"$or": [{"username": username}, {"sender": username}]})
            .run()?;
        // The user record last: an erasure that failed half-way can be run again.
        self.users.delete_one(doc! {"username": username}).run()?;
        self.erasures
            .insert_one(doc! {"username": username, "at": unix_millis() as i64})
            .run()?;
        Ok(groups)
    }

    fn open_direct(&mut self, username: &str, other: &str) -> StoreResult<GroupRef> {
        self.ensure_indexes()?;
        let group_name = direct::name_of(username, other);
        // Both users in one read: the other's `blocked` list comes with it.
        let users: Vec<Document> = self
            .users
            .find(doc! {"username": {"$in": [username, other]}})
            .max_time(self.max_time)
            .run()?
            .collect::<Result<_, _>>()?;
        let found = |name: &str| users.iter().find(|u| u.get_str("username") == Ok(name));
        let (Some(_), Some(partner)) = (found(username), found(other)) else {
            return Err(StoreError::UserNotFound);
        };
        if names_include(partner, "blocked", username) {
            return Err(StoreError::Blocked);
        }
        let entry = |name: &str, hidden: bool| {
            let mut entry = doc! {
                "name_ID": name,
                "last_read": mongodb::bson::DateTime::now(),
                "last_read_seq": 0_i64,
                "role": "member",
            };
            if hidden {
                entry.insert("hidden", true);
            }
            entry
        };
        let id = ObjectId::new();
        let group = doc! {
            "_id": id,
            "group_name": &group_name,
            "kind": direct::KIND,
            "user": [entry(username, false), entry(other, true)],
        };
        // The first opening creates it: nothing more to do.
        match self.groups.insert_one(group).run() {
            Ok(_) => {
                self.raise_head_hint(&group_name, 0);
                return Ok(GroupRef {
                    group_id: id.to_hex(),
                    group_name,
                });
            }
            Err(error) if is_duplicate_key(&error) => {}
            Err(error) => return Err(error.into()),
        }
        // Opened before: the opener sees it again if they had left it, and either user may
        // have been erased and registered again since (a member anew). Written only when so.
        let group = self.group(&group_name)?;
        for (name, hidden) in [(username, false), (other, true)] {
            if member_entry(&group, name).is_none() {
                self.groups
                    .update_one(
                        doc! {"group_name": &group_name, "user.name_ID": {"$ne": name}},
                        doc! {"$push": {"user": entry(name, hidden)}},
                    )
                    .run()?;
            }
        }
        if is_hidden(&group, username) {
            self.groups
                .update_one(
                    doc! {"group_name": &group_name, "user.name_ID": username},
                    doc! {"$unset": {"user.$.hidden": ""}},
                )
                .run()?;
        }
        Ok(group_ref(&group, &group_name))
    }

    fn set_blocked(&mut self, username: &str, other: &str, on: bool) -> StoreResult<Vec<String>> {
        self.ensure_indexes()?;
        if on && !self.user_exists(other)? {
            return Err(StoreError::UserNotFound);
        }
        let update = if on {
            doc! {"$addToSet": {"blocked": other}}
        } else {
            doc! {"$pull": {"blocked": other}}
        };
        let changed = self
            .users
            .update_one(doc! {"username": username}, update)
            .run()?;
        if changed.matched_count == 0 {
            return Err(StoreError::UserNotFound);
        }
        self.blocked_users(username)
    }

    fn blocked_users(&mut self, username: &str) -> StoreResult<Vec<String>> {
        self.ensure_indexes()?;
        let user = first(&self.users, doc! {"username": username}, None)?
            .ok_or(StoreError::UserNotFound)?;
        let mut names = names_in(&user, "blocked");
        names.sort();
        Ok(names)
    }

    fn set_notify(&mut self, member: MemberOf, level: Notify) -> StoreResult<()> {
        self.ensure_indexes()?;
        let changed = self
            .groups
            .update_one(
                doc! {"group_name": member.group_name, "user.name_ID": member.username},
                doc! {"$set": {"user.$.notify": level.as_str()}},
            )
            .run()?;
        if changed.matched_count == 0 {
            self.group(member.group_name)?;
            return Err(not_a_member(member.group_name));
        }
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
        self.ensure_indexes()?;
        let due: Vec<String> = self
            .push_queue
            .find(doc! {"next_ms": {"$lte": now_ms as i64}})
            .sort(doc! {"next_ms": 1})
            .limit(i64::from(limit))
            .projection(doc! {"_id": 1})
            .max_time(self.max_time)
            .run()?
            .filter_map(|document| Some(document.ok()?.get_str("_id").ok()?.to_string()))
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        // Leased under a token of this claim, and only those still due: a job another
        // instance's worker took since the read is not taken twice.
        let lease = ObjectId::new().to_hex();
        self.push_queue
            .update_many(
                doc! {"_id": {"$in": &due}, "next_ms": {"$lte": now_ms as i64}},
                doc! {"$set": {"next_ms": (now_ms + lease_ms) as i64, "lease": &lease}},
            )
            .run()?;
        let cursor = self
            .push_queue
            .find(doc! {"lease": &lease})
            .max_time(self.max_time)
            .run()?;
        let mut claimed = Vec::new();
        for document in cursor {
            let document = document?;
            let Ok(id) = document.get_str("_id") else {
                continue;
            };
            let text = |key: &str| document.get_str(key).unwrap_or_default().to_string();
            let job = PushJob {
                id: id.to_string(),
                username: text("username"),
                group_name: text("group_name"),
                seq: seq_of(&document).unwrap_or(0),
                sender: text("sender"),
                kind: text("kind"),
                preview: document.get_str("preview").ok().map(str::to_string),
                created_ms: seq_of_field(&document, "created_ms").unwrap_or(0),
                attempts: seq_of_field(&document, "attempts").unwrap_or(0) as u32,
            };
            let message_id = document.get_str("message_id").ok().map(str::to_string);
            let with_preview = document.get_bool("with_preview").unwrap_or(false);
            claimed.push((job, message_id, with_preview));
        }
        self.resolve_pushes(claimed, now_ms)
    }

    fn settle_pushes(&mut self, outcomes: &[(String, Option<u64>)]) -> StoreResult<()> {
        self.ensure_indexes()?;
        let done: Vec<&String> = outcomes
            .iter()
            .filter(|(_, at)| at.is_none())
            .map(|(id, _)| id)
            .collect();
        if !done.is_empty() {
            self.push_queue
                .delete_many(doc! {"_id": {"$in": done}})
                .run()?;
        }
        // One update per distinct time (a batch's retries share a few).
        let mut retries: HashMap<u64, Vec<&String>> = HashMap::new();
        for (id, at) in outcomes {
            if let Some(at) = at {
                retries.entry(*at).or_default().push(id);
            }
        }
        for (at, ids) in retries {
            self.push_queue
                .update_many(
                    doc! {"_id": {"$in": ids}},
                    doc! {"$set": {"next_ms": at as i64}, "$inc": {"attempts": 1_i64}},
                )
                .run()?;
        }
        Ok(())
    }

    fn trim_pushes(&mut self, max_jobs: u64, expire_before_ms: u64) -> StoreResult<PushQueueState> {
        self.ensure_indexes()?;
        let mut dropped = self
            .push_queue
            .delete_many(doc! {"created_ms": {"$lt": expire_before_ms as i64}})
            .run()?
            .deleted_count;
        let mut queued = self.push_queue.count_documents(doc! {}).run()?;
        if queued > max_jobs {
            let cursor = self
                .push_queue
                .find(doc! {})
                .sort(doc! {"created_ms": 1})
                .limit((queued - max_jobs) as i64)
                .projection(doc! {"_id": 1})
                .run()?;
            let mut ids = Vec::new();
            for document in cursor {
                if let Ok(id) = document?.get_str("_id") {
                    ids.push(id.to_string());
                }
            }
            dropped += self
                .push_queue
                .delete_many(doc! {"_id": {"$in": ids}})
                .run()?
                .deleted_count;
            queued = queued.saturating_sub(dropped);
        }
        let oldest = first(&self.push_queue, doc! {}, Some(doc! {"created_ms": 1}))?
            .and_then(|job| seq_of_field(&job, "created_ms"));
        Ok(PushQueueState {
            dropped,
            queued,
            oldest_ms: oldest,
        })
    }

    fn erasures_since(&mut self, since_ms: u64) -> StoreResult<Vec<(String, u64)>> {
        self.ensure_indexes()?;
        let cursor = self
            .erasures
            .find(doc! {"at": {"$gte": since_ms.min(i64::MAX as u64) as i64}})
            .sort(doc! {"at": 1})
            .max_time(self.max_time)
            .run()?;
        let mut erased = Vec::new();
        for erasure in cursor {
            let erasure = erasure?;
            if let (Ok(name), Some(at)) =
                (erasure.get_str("username"), seq_of_field(&erasure, "at"))
            {
                erased.push((name.to_string(), at));
            }
        }
        Ok(erased)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the store contract against the MongoDB named by `NOOMNIM_TEST_MONGODB_URI`.
    #[test]
    fn satisfies_the_store_contract() {
        let uri = std::env::var("NOOMNIM_TEST_MONGODB_URI").expect(
            "NOOMNIM_TEST_MONGODB_URI is not set: start tools/services.sh (bash .ci/run does)",
        );
        let database = format!("noomnim_contract_{}", std::process::id());
        let mut store =
            MongoStore::connect(&uri, &database, Duration::from_secs(5)).expect("connect");
        super::super::contract::check_all(store.as_mut(), "");
    }

    /// A database written by a newer server is refused, not half-understood.
    #[test]
    fn records_its_schema_and_refuses_a_newer_one() {
        let uri = std::env::var("NOOMNIM_TEST_MONGODB_URI").expect("NOOMNIM_TEST_MONGODB_URI");
        let database = format!("noomnim_schema_{}", std::process::id());
        let client = Client::with_uri_str(&uri).expect("client");
        let meta = client.database(&database).collection::<Document>("meta");
        let mut store =
            MongoStore::connect(&uri, &database, Duration::from_secs(5)).expect("connect");
        let page = PageQuery {
            before_seq: None,
            after_seq: None,
            limit: 1,
            thread: None,
        };
        let nobody = MemberOf {
            username: "nobody",
            group_name: "nothing",
        };
        let _ = store.fetch_messages(nobody, page);
        let schema = first(&meta, doc! {"_id": "schema"}, None)
            .expect("read")
            .expect("recorded");
        assert_eq!(
            seq_of_field(&schema, "version"),
            Some(SCHEMA_VERSION as u64)
        );
        meta.update_one(doc! {"_id": "schema"}, doc! {"$set": {"version": 99_i64}})
            .run()
            .expect("bump");
        let mut newer =
            MongoStore::connect(&uri, &database, Duration::from_secs(5)).expect("connect");
        match newer.fetch_messages(nobody, page) {
            Err(StoreError::Unavailable(reason)) => assert!(reason.contains("newer"), "{reason}"),
            other => panic!("a newer schema was not refused: {other:?}"),
        }
    }
}
