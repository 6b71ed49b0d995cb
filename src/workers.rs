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

use crate::model::{Appended, Message, NewMessage, ReadMark};
use crate::session::Completed;
use crate::store::{Store, StoreError};

/// Most jobs a worker takes from its queue in one round.
const MAX_BATCH: usize = 512;

/// Where a store job runs: the worker picked by `key` (a group, or a user), or any worker.
/// Jobs that `orders_with_messages` all go to the single writer of a single-writer database,
/// so they keep their order against a group's messages (see `workers.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub key: Option<&'a str>,
    pub orders_with_messages: bool,
}

impl<'a> Route<'a> {
    /// Ordered with the group's message stream and room entries.
    pub fn with_messages(group_name: &'a str) -> Route<'a> {
        Route {
            key: Some(group_name),
            orders_with_messages: true,
        }
    }

    /// On the worker of `key`, not ordered against messages.
    pub fn by(key: &'a str) -> Route<'a> {
        Route {
            key: Some(key),
            orders_with_messages: false,
        }
    }

    /// On any worker.
    pub fn any() -> Route<'a> {
        Route {
            key: None,
            orders_with_messages: false,
        }
    }
}

/// A store call and, once run, its result: what the worker queues carry (object-safe). The
/// request events' calls implement it (`ops::StoreCall`); the workers only route, run, fail
/// and finish them.
pub trait Call: Send + std::fmt::Debug {
    fn route(&self) -> Route<'_>;
    fn run(&mut self, store: &mut dyn Store);
    /// Records a result without running (the job waited longer than the store timeout).
    fn fail(&mut self, error: StoreError);
    /// The reply, never longer than `max_reply_bytes` (see `ops::within_reply_limit`).
    fn finish(
        self: Box<Self>,
        id: Option<&serde_json::value::RawValue>,
        max_reply_bytes: usize,
    ) -> Completed;
}

/// A store job. Request events bring a `Call` (their module's `StoreCall`); messages and
/// implicit read marks are separate kinds because the worker batches them into one commit, and
/// catch-up reads are the server's own.
#[derive(Debug)]
pub enum Work {
    /// `send_message`: store one message (batched with its neighbours).
    Append(NewMessage),
    /// An implicit read mark (a connection left a room or closed), batched after the rest.
    Mark(ReadMark),
    /// Read a group's messages after `after_seq` (the sequencer's gap fill).
    CatchUp {
        group_name: String,
        after_seq: u64,
        limit: u32,
    },
    /// The newest seq of these groups (peer mode's batched tail check).
    Heads(Vec<String>),
    /// Any other request event's store job.
    Call(Box<dyn Call>),
}

impl Work {
    /// Whether it may be in flight next to others of the same connection: only messages
    /// (see `in_flight.rs`).
    pub fn pipelines(&self) -> bool {
        matches!(self, Work::Append(_))
    }

    /// Which worker runs it. Messages, marks and room entries are ordered against a group's
    /// message stream (see `Route`).
    fn route(&self) -> Route<'_> {
        match self {
            Work::Append(message) => Route::with_messages(&message.group_name),
            Work::Mark(mark) => Route::with_messages(&mark.group_name),
            Work::CatchUp { group_name, .. } => Route::by(group_name),
            Work::Heads(_) => Route::any(),
            Work::Call(call) => call.route(),
        }
    }
}

/// A finished job.
// Nearly every outcome is `Appended` (a message); boxing it to shrink the rare ones would
// cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outcome {
    Appended(Result<Appended, StoreError>),
    Marked(Result<(), StoreError>),
    CaughtUp {
        group_name: String,
        result: Result<Vec<Message>, StoreError>,
    },
    /// The groups' newest seqs (`Work::Heads`).
    Heads(Result<Vec<(String, u64)>, StoreError>),
    /// The call, holding its result.
    Called(Box<dyn Call>),
}

/// How message writes are spread over the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRouting {
    /// By group: writers run in parallel (a database that takes concurrent writes).
    ByGroup,
    /// Messages and room entries all go to the first worker (a single-writer database).
    OneWriter,
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
    pub work: Work,
    pub queued_at: Instant,
}

/// A finished job on its way back to the event loop.
#[derive(Debug)]
pub struct Finished {
    pub requester: Requester,
    pub outcome: Outcome,
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
        done: Sender<Finished>,
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
    pub fn submit(&mut self, requester: Requester, work: Work) {
        let index = self.worker_for(work.route());
        let job = Job {
            requester,
            work,
            queued_at: Instant::now(),
        };
        if let Err(error) = self.queues[index].send(job) {
            log::error!(
                "store worker {index} has stopped; job dropped: {:?}",
                error.0.work
            );
        }
    }

    /// Which worker runs a job: the one writer, the group's (or user's) worker, or the next in
    /// turn. With one writer, the other jobs go to the other workers (when there are any): a
    /// read must not wait in the writer's queue behind a burst of messages, nor hold them up.
    fn worker_for(&mut self, route: Route<'_>) -> usize {
        let one_writer = self.routing == WriteRouting::OneWriter;
        if one_writer && route.orders_with_messages {
            return 0;
        }
        let first = usize::from(one_writer && self.queues.len() > 1);
        let readers = self.queues.len() - first;
        first
            + match route.key {
                Some(key) => {
                    let mut hasher = DefaultHasher::new();
                    key.hash(&mut hasher);
                    (hasher.finish() % readers as u64) as usize
                }
                None => {
                    self.next = (self.next + 1) % readers;
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
    done: Sender<Finished>,
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
        let mut messages: Vec<(Requester, NewMessage, Instant)> = Vec::new();
        let mut marks: Vec<(Requester, ReadMark, Instant)> = Vec::new();
        for job in batch {
            let Job {
                requester,
                work,
                queued_at,
            } = job;
            let done = match work {
                Work::Append(message) => {
                    messages.push((requester, message, queued_at));
                    continue;
                }
                Work::Mark(mark) => {
                    marks.push((requester, mark, queued_at));
                    continue;
                }
                Work::Call(mut call) => {
                    self.store_messages(std::mem::take(&mut messages));
                    if self.expired(queued_at) {
                        call.fail(expired_error());
                    } else {
                        call.run(self.store.as_mut());
                    }
                    Outcome::Called(call)
                }
                Work::CatchUp {
                    group_name,
                    after_seq,
                    limit,
                } => {
                    self.store_messages(std::mem::take(&mut messages));
                    let result = if self.expired(queued_at) {
                        Err(expired_error())
                    } else {
                        self.store.messages_after(&group_name, after_seq, limit)
                    };
                    Outcome::CaughtUp { group_name, result }
                }
                Work::Heads(groups) => {
                    self.store_messages(std::mem::take(&mut messages));
                    let result = if self.expired(queued_at) {
                        Err(expired_error())
                    } else {
                        self.store.group_heads(&groups)
                    };
                    Outcome::Heads(result)
                }
            };
            self.finish(requester, done, queued_at);
        }
        self.store_messages(messages);
        self.store_marks(marks);
    }

    fn store_marks(&mut self, jobs: Vec<(Requester, ReadMark, Instant)>) {
        if jobs.is_empty() {
            return;
        }
        let marks: Vec<ReadMark> = jobs.iter().map(|(_, mark, _)| mark.clone()).collect();
        let result = self.store.mark_read(&marks);
        for (requester, _, queued_at) in jobs {
            self.finish(requester, Outcome::Marked(result.clone()), queued_at);
        }
    }

    fn store_messages(&mut self, jobs: Vec<(Requester, NewMessage, Instant)>) {
        let (stale, fresh): (Vec<_>, Vec<_>) = jobs
            .into_iter()
            .partition(|(_, _, queued_at)| self.expired(*queued_at));
        for (requester, _, queued_at) in stale {
            self.finish(
                requester,
                Outcome::Appended(Err(expired_error())),
                queued_at,
            );
        }
        if fresh.is_empty() {
            return;
        }
        let (senders, batch): (Vec<(Requester, Instant)>, Vec<NewMessage>) = fresh
            .into_iter()
            .map(|(requester, message, queued_at)| ((requester, queued_at), message))
            .unzip();
        let results = self.store.append_messages(&batch);
        for ((requester, queued_at), result) in senders.into_iter().zip(results) {
            self.finish(requester, Outcome::Appended(result), queued_at);
        }
    }

    /// A job that waited longer than the store timeout is answered `unavailable` unrun.
    fn expired(&self, queued_at: Instant) -> bool {
        queued_at.elapsed() > self.timeout
    }

    fn finish(&self, requester: Requester, outcome: Outcome, queued_at: Instant) {
        if let Outcome::Appended(Err(StoreError::Unavailable(reason)))
        | Outcome::Marked(Err(StoreError::Unavailable(reason))) = &outcome
        {
            log::warn!("store call failed: {reason}");
        }
        let finished = Finished {
            requester,
            outcome,
            elapsed: queued_at.elapsed(),
        };
        if self.done.send(finished).is_err() {
            log::debug!("event loop gone; completion dropped");
        }
    }
}

fn expired_error() -> StoreError {
    StoreError::Unavailable("request waited longer than STORE_TIMEOUT_MS".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::Frame;
    use crate::ops::dispatch::plan;
    use crate::ops::Plan;
    use crate::session::{Rules, Session};

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

    fn send(group: &str) -> Work {
        Work::Append(NewMessage {
            group_name: group.into(),
            username: "u".into(),
            text: "t".into(),
            client_msg_id: None,
            mentions: Vec::new(),
            reply_to: None,
        })
    }

    /// The job a request line from the logged-in user "u" becomes.
    fn planned(event: &str, group: &str) -> Work {
        let rules = Rules {
            max_reply_bytes: 1 << 20,
            max_groups_per_user: 0,
            hello: std::rc::Rc::new(serde_json::json!({})),
            hello_tls: std::rc::Rc::new(serde_json::json!({})),
            auth: None,
            resume_max_messages: 10_000,
        };
        let session = Session {
            username: Some("u".into()),
            ..Session::default()
        };
        let line = format!(r#"{{"event":"{event}","data":{{"group_name":"{group}","seq":1}}}}"#);
        match plan(&session, Frame::Line(line.into_bytes()), &rules) {
            Plan::Store { work, .. } => work,
            other => panic!("{event} is a store job, got {other:?}"),
        }
    }

    fn enter(group: &str) -> Work {
        planned("enter_group", group)
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
                Work::Mark(ReadMark {
                    username: "u".into(),
                    group_name: group_name.clone(),
                    seq: 3,
                }),
            );
            pool.submit(Requester::Server, planned("mark_read", &group_name));
            pool.submit(Requester::Server, planned("leave_group", &group_name));
            pool.submit(Requester::Server, planned("join_group", &group_name));
        }
        assert_eq!(queue_lengths(&receivers), vec![80, 0, 0, 0]);
        // Reads that need no order against messages still spread by group.
        for group in 0..20 {
            pool.submit(
                Requester::Server,
                planned("fetch_messages", &format!("g{group}")),
            );
        }
        let lengths = queue_lengths(&receivers);
        assert!(lengths[1..].iter().any(|&n| n > 0), "{lengths:?}");
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
                    .filter(|job| job.work.route().key == Some("g7"))
                    .count()
            })
            .collect();
        let mut sorted = g7_per_worker.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 0, 0, 3], "{g7_per_worker:?}");
    }
}
