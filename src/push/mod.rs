//! Offline push: a direct message or a mention for a user who is not connected anywhere is
//! POSTed to the operator's webhook (`PUSH_WEBHOOK_URL`), signed (`webhook`), so a phone or
//! e-mail notification can be sent from there.
//!
//! At least once: the store queues each job with the message it tells of (SQLite: in the same
//! commit; MongoDB: just before it, keyed by the message's id, and a job whose message never
//! landed is dropped when claimed), and this worker thread (one per process) claims due jobs with a lease, so a job
//! whose worker died (kill -9, a lost instance) is taken again when the lease ends, here or on
//! another instance sharing the store. A delivered job is removed; a failed one is retried
//! with exponential backoff (`PUSH_RETRY_MS`, 1 s, doubling to 5 min). Each carries its id, the receiver's
//! idempotency key. Bounded: past `PUSH_QUEUE_MAX` jobs the oldest are dropped, and a job not
//! delivered within `PUSH_MAX_AGE` is given up (both counted, `noomnim_push_dropped_total`).
//!
//! Nobody online is pushed: a job for a user online now (any instance, as presence knows it)
//! is held until `SETTLE` after it was queued (a killed instance's users read as online for up
//! to 7 s) and dropped if they are still online then; the message reached them.

pub mod webhook;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, PushConfig};
use crate::model::{unix_millis, PushJob};
use crate::store::{self, Store, StoreResult};

/// Who is online anywhere (the live presence feature answers it for the process).
pub trait Online: Send + Sync {
    fn is_online(&self, username: &str) -> bool;
}

/// How often the worker looks for due jobs.
const POLL: Duration = Duration::from_millis(100);
/// How long a claimed job is the worker's before another may take it.
const LEASE_MS: u64 = 60_000;
/// Jobs claimed at once.
const BATCH: u32 = 100;
/// How long after queueing a job for an online user waits for presence to settle.
const SETTLE_MS: u64 = 10_000;
/// The longest pause between retries.
const MAX_BACKOFF_MS: u64 = 300_000;
/// How often the queue's bounds are enforced and its gauges read.
const TRIM_EVERY_MS: u64 = 1_000;

/// The worker's counters and gauges (`/metrics`).
pub static DELIVERED: AtomicU64 = AtomicU64::new(0);
pub static FAILED: AtomicU64 = AtomicU64::new(0);
pub static DROPPED: AtomicU64 = AtomicU64::new(0);
pub static SKIPPED_ONLINE: AtomicU64 = AtomicU64::new(0);
pub static QUEUED: AtomicU64 = AtomicU64::new(0);
pub static OLDEST_AGE_MS: AtomicU64 = AtomicU64::new(0);

/// The pause before retry `attempts + 1`: `first_ms` (`PUSH_RETRY_MS`), doubling, at most
/// 5 min.
pub fn backoff_ms(first_ms: u64, attempts: u32) -> u64 {
    first_ms
        .saturating_mul(1u64 << attempts.min(30))
        .min(MAX_BACKOFF_MS)
}

/// Starts the worker when push is configured.
pub fn start(config: &Config, online: Arc<dyn Online>) {
    let Some(push) = config.push.clone() else {
        return;
    };
    let config = config.clone();
    let spawned = std::thread::Builder::new()
        .name("push".into())
        .spawn(move || run(&config, &push, online.as_ref()));
    if let Err(error) = spawned {
        log::error!("the push worker did not start: {error}");
    }
}

fn run(config: &Config, push: &PushConfig, online: &dyn Online) {
    let mut kept: Option<Box<dyn Store>> = None;
    let mut last_trim = 0;
    loop {
        std::thread::sleep(POLL);
        let store = match kept.take() {
            Some(store) => Ok(store),
            None => store::open(config),
        };
        let pass = store.and_then(|mut store| {
            let now = unix_millis();
            if now.saturating_sub(last_trim) >= TRIM_EVERY_MS {
                trim(store.as_mut(), push, now)?;
                last_trim = now;
            }
            while deliver_due(store.as_mut(), push, online)? == BATCH as usize {}
            kept = Some(store);
            Ok(())
        });
        if let Err(error) = pass {
            log::warn!("push: the queue could not be read (retried): {error}");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Drops what is past the bounds and reads the gauges.
fn trim(store: &mut dyn Store, push: &PushConfig, now: u64) -> StoreResult<()> {
    let expire_before = now.saturating_sub(push.max_age.as_millis() as u64);
    let state = store.trim_pushes(push.queue_max, expire_before)?;
    if state.dropped > 0 {
        log::warn!(
            "push: {} undelivered notice(s) dropped (PUSH_QUEUE_MAX or PUSH_MAX_AGE)",
            state.dropped
        );
        DROPPED.fetch_add(state.dropped, Ordering::Relaxed);
    }
    QUEUED.store(state.queued, Ordering::Relaxed);
    let oldest = state.oldest_ms.map_or(0, |at| now.saturating_sub(at));
    OLDEST_AGE_MS.store(oldest, Ordering::Relaxed);
    Ok(())
}

/// Claims the due jobs and settles each; returns how many were claimed.
fn deliver_due(
    store: &mut dyn Store,
    push: &PushConfig,
    online: &dyn Online,
) -> StoreResult<usize> {
    let now = unix_millis();
    let jobs = store.claim_pushes(now, LEASE_MS, BATCH)?;
    let outcomes: Vec<(String, Option<u64>)> = jobs
        .iter()
        .map(|job| (job.id.clone(), settle(job, push, online, now)))
        .collect();
    store.settle_pushes(&outcomes)?;
    Ok(jobs.len())
}

/// What becomes of one claimed job: `None` (delivered, or not needed), or when to try again
/// (`now`: the claim's time, so a batch's retries share their times).
fn settle(job: &PushJob, push: &PushConfig, online: &dyn Online, now: u64) -> Option<u64> {
    if online.is_online(&job.username) {
        let settled = job.created_ms + SETTLE_MS;
        if now < settled {
            return Some(settled);
        }
        SKIPPED_ONLINE.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    match webhook::post(&push.url, &push.secret, job) {
        Ok(()) => {
            DELIVERED.fetch_add(1, Ordering::Relaxed);
            None
        }
        Err(error) => {
            FAILED.fetch_add(1, Ordering::Relaxed);
            log::debug!("push {} failed (retried): {error}", job.id);
            Some(now + backoff_ms(push.retry.as_millis() as u64, job.attempts))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_five_minutes() {
        assert_eq!(backoff_ms(1_000, 0), 1_000);
        assert_eq!(backoff_ms(1_000, 3), 8_000);
        assert_eq!(backoff_ms(1_000, 9), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(1_000, u32::MAX), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(50, 2), 200);
    }
}
