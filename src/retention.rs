//! Retention: a background thread that removes messages past `RETENTION_MAX_AGE` or beyond
//! `RETENTION_MAX_MESSAGES` per group, every `RETENTION_INTERVAL_MS`, in small batches.
//!
//! Each batch is one short write (at most `PRUNE_BATCH` rows, oldest first by the primary key)
//! followed by a pause, so a prune of millions of messages never holds the writers' turn for
//! long (docs/BENCHMARKS-LOG.md measures `send_message` during one). The rules (what is past the
//! limits, that the newest message stays) are in `store::manage`; history replies then carry
//! `first_seq`. In peer mode every instance prunes; removing what is already gone is a no-op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Config;
use crate::store::manage::{prune_batch, Retention};
use crate::store::{self, Store, StoreError};

/// Most messages one batch removes.
pub const PRUNE_BATCH: u32 = 100;
/// The pause after each batch: the writers' turn is free for at least this long.
const BETWEEN_BATCHES: Duration = Duration::from_millis(5);
/// Groups read per page of the walk.
const GROUPS_PER_PAGE: u32 = 1000;

/// Messages removed by retention since start (the `noomnim_retention_pruned_total` metric).
pub static PRUNED: AtomicU64 = AtomicU64::new(0);

/// Starts the pruner when retention is on.
pub fn start(config: &Config) {
    if config.retention.is_off() {
        return;
    }
    let (retention, every) = (config.retention, config.retention_interval);
    let mut config = config.clone();
    // A prune needs no fsync of its own: one lost to a power cut is redone by the next pass.
    // Without it a batch holds the writers' turn for a fraction of the time.
    if let crate::config::StoreKind::Embedded { durable, .. } = &mut config.store {
        *durable = false;
    }
    let spawned = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || {
            // Opened at the first pass and kept; after a failure, opened again at the next.
            let mut kept: Option<Box<dyn Store>> = None;
            loop {
                std::thread::sleep(every);
                let pass = match kept.take() {
                    Some(store) => Ok(store),
                    None => store::open(&config),
                }
                .and_then(|mut store| {
                    let removed = prune_all(store.as_mut(), &retention)?;
                    kept = Some(store);
                    Ok(removed)
                });
                match pass {
                    Ok(0) => {}
                    Ok(removed) => log::info!("retention removed {removed} message(s)"),
                    Err(error) => log::warn!("retention pass failed (retried next time): {error}"),
                }
            }
        });
    if let Err(error) = spawned {
        log::warn!("cannot start the retention thread: {error}");
    }
}

/// One pass over every group; returns how many messages it removed.
pub fn prune_all(store: &mut dyn Store, retention: &Retention) -> Result<u64, StoreError> {
    let mut after = String::new();
    let mut total = 0;
    loop {
        let page = store.group_names(&after, GROUPS_PER_PAGE)?;
        for (group_name, head) in &page {
            loop {
                let removed = prune_batch(store, retention, group_name, *head, PRUNE_BATCH)?;
                total += removed;
                PRUNED.fetch_add(removed, Ordering::Relaxed);
                if removed < u64::from(PRUNE_BATCH) {
                    break;
                }
                std::thread::sleep(BETWEEN_BATCHES);
            }
        }
        match page.last() {
            Some((last, _)) if page.len() == GROUPS_PER_PAGE as usize => after = last.clone(),
            _ => return Ok(total),
        }
    }
}
