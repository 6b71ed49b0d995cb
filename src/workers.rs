//! Database worker threads: take store jobs over crossbeam channels, run them on their own
//! `Store`, and hand completions back to the event loop through a channel and the `mio::Waker`.
//!
//! Jobs that name a group always go to the same worker, so one node stores and reports a group's
//! messages in `seq` order. A worker drains its queue and stores all waiting messages in one
//! commit (group commit). With a single-writer database (SQLite), every message and every room
//! entry goes to one writer worker instead, so one commit covers the waiting messages of all
//! groups rather than one commit per worker taking turns on the database lock.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::{Token, Waker};

use crate::model::{
    Appended, CreatedGroup, GroupHistory, GroupReadState, GroupRef, GroupsPage, GroupsQuery,
    Message, MessagePage, NewMessage, PageQuery, ReadMark, UserProfile, Visit,
};
use crate::store::{fit_messages, Store, StoreError};

/// Most jobs a worker takes from its queue in one round.
const MAX_BATCH: usize = 512;

/// A store operation requested by the event loop.
#[derive(Debug, Clone)]
pub enum StoreOp {
    FindUser {
        username: String,
        /// Why the name may not be used for a new user (`None`: it may).
        new_name: Option<String>,
    },
    CreateGroup {
        username: String,
        group_name: String,
        max_per_user: usize,
    },
    JoinGroup {
        username: String,
        group_name: String,
    },
    LeaveGroup {
        username: String,
        group_name: String,
    },
    SendMessage(NewMessage),
    VisitGroup {
        username: String,
        group_name: String,
        leaving: Option<ReadMark>,
    },
    EnterGroup {
        username: String,
        group_name: String,
        leaving: Option<ReadMark>,
        /// Encoded bytes the history may take in the reply.
        reply_budget: usize,
    },
    /// An implicit read mark (a connection closed in a room).
    MarkRead(ReadMark),
    /// `mark_read`: raise the marker (clamped to the group's newest seq) and report the state.
    MarkReadUpTo(ReadMark),
    MyGroups {
        username: String,
    },
    FetchMessages {
        username: String,
        group_name: String,
        page: PageQuery,
        reply_budget: usize,
    },
    ListGroups(GroupsQuery),
    MessagesAfter {
        group_name: String,
        after_seq: u64,
        limit: u32,
    },
}

/// How message writes are spread over the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRouting {
    /// By group: writers run in parallel (a database that takes concurrent writes).
    ByGroup,
    /// Messages and room entries all go to the first worker (a single-writer database).
    OneWriter,
}

impl StoreOp {
    /// Jobs ordered against a group's message stream and its room: storing messages, entering
    /// a room (whose reply fixes the `seq` after which live broadcasts start), joining and
    /// leaving (so a leave can never complete before an earlier-submitted enter of the same
    /// user and leave it in the room), and read marks (batched into the writer's commits, so a
    /// closing connection never waits for, or holds up, the writers' turn).
    fn orders_with_messages(&self) -> bool {
        matches!(
            self,
            StoreOp::SendMessage(_)
                | StoreOp::VisitGroup { .. }
                | StoreOp::EnterGroup { .. }
                | StoreOp::JoinGroup { .. }
                | StoreOp::LeaveGroup { .. }
                | StoreOp::MarkRead(_)
                | StoreOp::MarkReadUpTo(_)
        )
    }

    /// The key that picks the worker: the group when there is one.
    fn routing_key(&self) -> Option<&str> {
        match self {
            StoreOp::CreateGroup { group_name, .. }
            | StoreOp::JoinGroup { group_name, .. }
            | StoreOp::LeaveGroup { group_name, .. }
            | StoreOp::VisitGroup { group_name, .. }
            | StoreOp::EnterGroup { group_name, .. }
            | StoreOp::FetchMessages { group_name, .. }
            | StoreOp::MessagesAfter { group_name, .. } => Some(group_name),
            StoreOp::MarkRead(mark) | StoreOp::MarkReadUpTo(mark) => Some(&mark.group_name),
            StoreOp::MyGroups { username } => Some(username),
            StoreOp::SendMessage(message) => Some(&message.group_name),
            StoreOp::FindUser { username, .. } => Some(username),
            StoreOp::ListGroups(_) => None,
        }
    }
}

/// What a store operation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutput {
    User { profile: UserProfile, created: bool },
    GroupCreated(CreatedGroup),
    Joined(GroupRef),
    Left(GroupRef),
    Stored(Appended),
    Visited(Visit),
    Entered(GroupHistory),
    Page(MessagePage),
    Groups(GroupsPage),
    Messages(Vec<Message>),
    ReadState(GroupReadState),
    MyGroups(Vec<GroupReadState>),
    Done,
}

/// Who asked: a connection (its token, and which of its requests: a connection's request
/// answered `unavailable` by the store timeout may still complete later, and must not be
/// taken for the next one), or the server itself (peer recovery, bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    Connection(Token, u64),
    Server,
}

/// A job on its way to a worker.
#[derive(Debug)]
pub struct Job {
    pub requester: Requester,
    pub op: StoreOp,
    pub queued_at: Instant,
}

/// A finished job on its way back to the event loop.
#[derive(Debug)]
pub struct Completion {
    pub requester: Requester,
    pub op: StoreOp,
    pub result: Result<StoreOutput, StoreError>,
    /// From queueing the job to its result.
    pub elapsed: Duration,
}

/// Handle the event loop uses to submit jobs.
pub struct WorkerPool {
    queues: Vec<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    next: usize,
    routing: WriteRouting,
}

impl WorkerPool {
    /// Starts one thread per store; completions go to `done` and wake `waker`.
    pub fn start(
        stores: Vec<Box<dyn Store>>,
        done: Sender<Completion>,
        waker: Arc<Waker>,
        timeout: Duration,
        routing: WriteRouting,
    ) -> std::io::Result<WorkerPool> {
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        for (index, store) in stores.into_iter().enumerate() {
            let (sender, receiver) = crossbeam_channel::unbounded();
            let worker = Worker {
                store,
                jobs: receiver,
                done: done.clone(),
                waker: waker.clone(),
                timeout,
            };
            let thread = std::thread::Builder::new()
                .name(format!("store-{index}"))
                .spawn(move || worker.run())?;
            queues.push(sender);
            threads.push(thread);
        }
        Ok(WorkerPool {
            queues,
            threads,
            next: 0,
            routing,
        })
    }

    /// Queues a job; never blocks.
    pub fn submit(&mut self, requester: Requester, op: StoreOp) {
        let index = self.worker_for(&op);
        let job = Job {
            requester,
            op,
            queued_at: Instant::now(),
        };
        if let Err(error) = self.queues[index].send(job) {
            log::error!(
                "store worker {index} has stopped; job dropped: {:?}",
                error.0.op
            );
        }
    }

    /// Which worker runs `op`: the one writer, the group's (or user's) worker, or the next in turn.
    fn worker_for(&mut self, op: &StoreOp) -> usize {
        if self.routing == WriteRouting::OneWriter && op.orders_with_messages() {
            return 0;
        }
        match op.routing_key() {
            Some(key) => {
                let mut hasher = DefaultHasher::new();
                key.hash(&mut hasher);
                (hasher.finish() % self.queues.len() as u64) as usize
            }
            None => {
                self.next = (self.next + 1) % self.queues.len();
                self.next
            }
        }
    }

    /// Closes the queues and waits for the workers to finish what they hold.
    pub fn shutdown(self) {
        drop(self.queues);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

struct Worker {
    store: Box<dyn Store>,
    jobs: Receiver<Job>,
    done: Sender<Completion>,
    waker: Arc<Waker>,
    timeout: Duration,
}

impl Worker {
    fn run(mut self) {
        while let Ok(first) = self.jobs.recv() {
            let mut batch = vec![first];
            batch.extend(self.jobs.try_iter().take(MAX_BATCH - 1));
            self.run_batch(batch);
            if let Err(error) = self.waker.wake() {
                log::error!("cannot wake the event loop: {error}");
            }
        }
    }

    /// Runs a batch in order, storing each run of consecutive messages in one commit. Read
    /// marks (monotonic, so their order against the rest does not matter) are applied together
    /// in one commit after the batch.
    fn run_batch(&mut self, batch: Vec<Job>) {
        let mut messages: Vec<Job> = Vec::new();
        let mut marks: Vec<Job> = Vec::new();
        for job in batch {
            if matches!(job.op, StoreOp::SendMessage(_)) {
                messages.push(job);
                continue;
            }
            if matches!(job.op, StoreOp::MarkRead(_)) {
                marks.push(job);
                continue;
            }
            self.store_messages(std::mem::take(&mut messages));
            let result = if self.expired(&job) {
                Err(expired())
            } else {
                execute(self.store.as_mut(), &job.op)
            };
            self.finish(job, result);
        }
        self.store_messages(messages);
        self.store_marks(marks);
    }

    fn store_marks(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let marks: Vec<ReadMark> = jobs
            .iter()
            .filter_map(|job| match &job.op {
                StoreOp::MarkRead(mark) => Some(mark.clone()),
                _ => None,
            })
            .collect();
        let result = self.store.mark_read(&marks).map(|()| StoreOutput::Done);
        for job in jobs {
            self.finish(job, result.clone());
        }
    }

    fn store_messages(&mut self, jobs: Vec<Job>) {
        let (stale, fresh): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|job| self.expired(job));
        for job in stale {
            self.finish(job, Err(expired()));
        }
        if fresh.is_empty() {
            return;
        }
        let batch: Vec<NewMessage> = fresh
            .iter()
            .filter_map(|job| match &job.op {
                StoreOp::SendMessage(message) => Some(message.clone()),
                _ => None,
            })
            .collect();
        let results = self.store.append_messages(&batch);
        for (job, result) in fresh.into_iter().zip(results) {
            self.finish(job, result.map(StoreOutput::Stored));
        }
    }

    /// A job that waited longer than the store timeout is answered `unavailable` unrun.
    fn expired(&self, job: &Job) -> bool {
        job.queued_at.elapsed() > self.timeout
    }

    fn finish(&self, job: Job, result: Result<StoreOutput, StoreError>) {
        if let Err(StoreError::Unavailable(reason)) = &result {
            log::warn!("store call failed: {reason}");
        }
        let completion = Completion {
            requester: job.requester,
            op: job.op,
            result,
            elapsed: job.queued_at.elapsed(),
        };
        if self.done.send(completion).is_err() {
            log::debug!("event loop gone; completion dropped");
        }
    }
}

fn expired() -> StoreError {
    StoreError::Unavailable("request waited longer than STORE_TIMEOUT_MS".into())
}

/// Runs one non-batched operation.
fn execute(store: &mut dyn Store, op: &StoreOp) -> Result<StoreOutput, StoreError> {
    Ok(match op {
        StoreOp::FindUser { username, new_name } => {
            let (profile, created) = store.find_or_create_user(username, new_name.is_none())?;
            StoreOutput::User { profile, created }
        }
        StoreOp::CreateGroup {
            username,
            group_name,
            max_per_user,
        } => StoreOutput::GroupCreated(store.create_group(username, group_name, *max_per_user)?),
        StoreOp::JoinGroup {
            username,
            group_name,
        } => StoreOutput::Joined(store.join_group(username, group_name)?),
        StoreOp::LeaveGroup {
            username,
            group_name,
        } => StoreOutput::Left(store.leave_group(username, group_name)?),
        StoreOp::SendMessage(message) => {
            let mut results = store.append_messages(std::slice::from_ref(message));
            StoreOutput::Stored(
                results
                    .pop()
                    .unwrap_or_else(|| Err(StoreError::Unavailable("no result".into())))?,
            )
        }
        StoreOp::VisitGroup {
            username,
            group_name,
            leaving,
        } => StoreOutput::Visited(store.visit_group(username, group_name, leaving.as_ref())?),
        StoreOp::EnterGroup {
            username,
            group_name,
            leaving,
            reply_budget,
        } => StoreOutput::Entered(store.enter_group(
            username,
            group_name,
            leaving.as_ref(),
            *reply_budget,
        )?),
        StoreOp::MarkRead(mark) => {
            store.mark_read(std::slice::from_ref(mark))?;
            StoreOutput::Done
        }
        StoreOp::MarkReadUpTo(mark) => {
            let before = store.read_state(&mark.username, &mark.group_name)?;
            let clamped = ReadMark {
                seq: mark.seq.min(before.last_seq),
                ..mark.clone()
            };
            store.mark_read(std::slice::from_ref(&clamped))?;
            StoreOutput::ReadState(store.read_state(&mark.username, &mark.group_name)?)
        }
        StoreOp::MyGroups { username } => StoreOutput::MyGroups(store.my_groups(username)?),
        StoreOp::FetchMessages {
            username,
            group_name,
            page,
            reply_budget,
        } => {
            let mut found = store.fetch_messages(username, group_name, *page)?;
            // Pages after a seq keep their oldest messages, pages before one their newest, so
            // the next page continues where this one stopped.
            let (messages, cut) =
                fit_messages(found.messages, page.after_seq.is_some(), *reply_budget);
            found.messages = messages;
            found.has_more |= cut;
            StoreOutput::Page(found)
        }
        StoreOp::ListGroups(query) => StoreOutput::Groups(store.list_groups(query)?),
        StoreOp::MessagesAfter {
            group_name,
            after_seq,
            limit,
        } => StoreOutput::Messages(store.messages_after(group_name, *after_seq, *limit)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of `n` queues without threads, and the receiving ends to inspect.
    fn pool(n: usize, routing: WriteRouting) -> (WorkerPool, Vec<Receiver<Job>>) {
        let (queues, receivers) = (0..n).map(|_| crossbeam_channel::unbounded()).unzip();
        let pool = WorkerPool {
            queues,
            threads: Vec::new(),
            next: 0,
            routing,
        };
        (pool, receivers)
    }

    fn send(group: &str) -> StoreOp {
        StoreOp::SendMessage(NewMessage {
            group_name: group.into(),
            username: "u".into(),
            text: "t".into(),
            client_msg_id: None,
        })
    }

    fn enter(group: &str) -> StoreOp {
        StoreOp::EnterGroup {
            username: "u".into(),
            group_name: group.into(),
            leaving: None,
            reply_budget: 1 << 20,
        }
    }

    fn queue_lengths(receivers: &[Receiver<Job>]) -> Vec<usize> {
        receivers.iter().map(Receiver::len).collect()
    }

    #[test]
    fn one_writer_takes_every_message_and_room_entry() {
        let (mut pool, receivers) = pool(4, WriteRouting::OneWriter);
        for group in 0..20 {
            pool.submit(Requester::Server, send(&format!("g{group}")));
            pool.submit(Requester::Server, enter(&format!("g{group}")));
        }
        assert_eq!(queue_lengths(&receivers), vec![40, 0, 0, 0]);
    }

    /// Issue 11 items 5 and 6: a close-time read mark used to go to any worker and wait there
    /// for the writers' turn (stalling that worker's other requests for seconds in a storm),
    /// and a leave could overtake an enter of the same user. Both now queue behind the writer.
    #[test]
    fn marks_leaves_and_joins_queue_with_the_writer() {
        let (mut pool, receivers) = pool(4, WriteRouting::OneWriter);
        for group in 0..20 {
            let group_name = format!("g{group}");
            pool.submit(
                Requester::Server,
                StoreOp::MarkRead(ReadMark {
                    username: "u".into(),
                    group_name: group_name.clone(),
                    seq: 3,
                }),
            );
            pool.submit(
                Requester::Server,
                StoreOp::LeaveGroup {
                    username: "u".into(),
                    group_name: group_name.clone(),
                },
            );
            pool.submit(
                Requester::Server,
                StoreOp::JoinGroup {
                    username: "u".into(),
                    group_name,
                },
            );
        }
        assert_eq!(queue_lengths(&receivers), vec![60, 0, 0, 0]);
    }

    #[test]
    fn by_group_spreads_groups_but_keeps_each_on_one_worker() {
        let (mut pool, receivers) = pool(4, WriteRouting::ByGroup);
        for group in 0..20 {
            pool.submit(Requester::Server, send(&format!("g{group}")));
        }
        let lengths = queue_lengths(&receivers);
        assert!(
            lengths.iter().filter(|&&n| n > 0).count() > 1,
            "{lengths:?}"
        );
        pool.submit(Requester::Server, enter("g7"));
        pool.submit(Requester::Server, send("g7"));
        let g7_per_worker: Vec<usize> = receivers
            .iter()
            .map(|r| {
                r.try_iter()
                    .filter(|job| job.op.routing_key() == Some("g7"))
                    .count()
            })
            .collect();
        let mut sorted = g7_per_worker.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 0, 0, 3], "{g7_per_worker:?}");
    }
}
