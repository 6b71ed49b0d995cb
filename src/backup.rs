//! `noomnim backup PATH`: a consistent copy of the embedded store, taken while the server keeps
//! serving. SQLite's `VACUUM INTO` reads the database inside one read transaction (in WAL mode
//! writers go on meanwhile) and writes a compact, self-contained copy: every commit acknowledged
//! before the backup began is in it, nothing half-written is. Restoring is copying the file
//! back as `DATA_DIR/noomnim.sqlite3` while the server is stopped (README, "Backup").
//!
//! The copy is written to a hidden temporary file beside PATH and linked to PATH only once it is
//! complete and on disk: a backup that fails or is killed leaves nothing at PATH (a killed one
//! may leave its `.NAME.partial-PID` file, which the next backup to that PATH removes). PATH
//! must be a new plain file path: not an existing file, not a link (dangling ones included),
//! not a SQLite URI, not one of the store's own files.
//!
//! On a terminal it says what it is doing and prints a summary; elsewhere only the summary.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use crate::config::{Config, StoreKind};

/// Why a backup could not be made (the message names what to fix).
#[derive(Debug)]
pub struct BackupError(pub String);

impl std::fmt::Display for BackupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Copies the embedded store named by `config` to `target` (which must not exist yet).
/// Returns the summary line.
pub fn backup(config: &Config, target: &Path) -> Result<String, BackupError> {
    let data_dir = match &config.store {
        StoreKind::Embedded { data_dir, .. } => data_dir.clone(),
        StoreKind::Mongo { .. } => {
            return Err(BackupError(
                "MONGODB_URI is set: back MongoDB up with mongodump (README, \"Backup\")".into(),
            ))
        }
        #[cfg(feature = "bench-noop")]
        StoreKind::Noop => return Err(BackupError("the no-op store keeps nothing".into())),
    };
    let source = crate::store::sqlite::database_path(&data_dir);
    if !source.exists() {
        return Err(BackupError(format!(
            "no embedded store at {} (DATA_DIR)",
            source.display()
        )));
    }
    check_target(target, &data_dir)?;
    let partial = partial_path(target)?;
    remove_partial(&partial);
    let loud = std::io::stderr().is_terminal();
    if loud {
        eprintln!(
            "backing up {} to {} ...",
            source.display(),
            target.display()
        );
    }
    let started = Instant::now();
    // A reader like any other (VACUUM INTO writes only the target; a read-only open of a WAL
    // database would need its shared-memory file writable anyway).
    let connection = rusqlite::Connection::open(&source)
        .map_err(|e| BackupError(format!("cannot open {}: {e}", source.display())))?;
    // The server may be committing: wait for its write turn rather than fail.
    let _ = connection.busy_timeout(std::time::Duration::from_secs(30));
    let messages: i64 = connection
        .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
        .unwrap_or(0);
    let partial_text = partial
        .to_str()
        .ok_or_else(|| BackupError("the target path is not valid UTF-8".into()))?;
    let source_bytes = std::fs::metadata(&source).map(|m| m.len()).unwrap_or(0);
    let copying = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let progress = loud.then(|| show_progress(partial.clone(), source_bytes, copying.clone()));
    let flusher = write_back_as_it_goes(partial.clone(), copying.clone());
    pace(&connection, partial.clone(), config.backup_mb_per_s);
    let copied = connection.execute("VACUUM INTO ?1", [partial_text]);
    copying.store(false, std::sync::atomic::Ordering::Relaxed);
    for thread in progress.into_iter().chain([flusher]) {
        let _ = thread.join();
    }
    let finished = copied.map_err(|e| e.to_string()).and_then(|_| {
        // On disk before it gets its name; the link fails if PATH appeared meanwhile.
        std::fs::File::open(&partial)
            .and_then(|file| file.sync_all())
            .and_then(|()| std::fs::hard_link(&partial, target))
            .map_err(|e| e.to_string())
    });
    remove_partial(&partial);
    finished.map_err(|e| BackupError(format!("cannot write {}: {e}", target.display())))?;
    let bytes = std::fs::metadata(target).map(|m| m.len()).unwrap_or(0);
    Ok(format!(
        "backup: {} ({bytes} bytes, about {messages} messages) written in {:.1} s; restore by \
         copying it to DATA_DIR/noomnim.sqlite3 while the server is stopped",
        target.display(),
        started.elapsed().as_secs_f64()
    ))
}

/// Refuses a target that is not a new plain file path outside the store's own files.
fn check_target(target: &Path, data_dir: &Path) -> Result<(), BackupError> {
    let refuse = |why: &str| Err(BackupError(format!("{}: {why}", target.display())));
    let Some(text) = target.to_str() else {
        return refuse("the path is not valid UTF-8");
    };
    if text.starts_with("file:") || text.contains('?') {
        return refuse("name a plain file path, not a SQLite URI");
    }
    if std::fs::symlink_metadata(target).is_ok() {
        return refuse("exists already (a file, directory or link); name a new file");
    }
    let Some(name) = target.file_name().and_then(|name| name.to_str()) else {
        return refuse("name a file");
    };
    let parent = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let Ok(parent) = parent.canonicalize() else {
        return refuse("its directory does not exist");
    };
    let in_store = data_dir.canonicalize().is_ok_and(|store| {
        store == parent
            && (name.starts_with(crate::store::sqlite::DATABASE_FILE)
                || name == crate::start::STORE_LOCK_FILE)
    });
    if in_store {
        return refuse("that is one of the store's own files");
    }
    Ok(())
}

/// The temporary name the copy is written under, beside the target.
fn partial_path(target: &Path) -> Result<std::path::PathBuf, BackupError> {
    let name = target
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| BackupError(format!("{}: name a file", target.display())))?;
    Ok(target.with_file_name(format!(".{name}.partial-{}", std::process::id())))
}

/// Removes a temporary copy and the journal SQLite may have left beside it.
fn remove_partial(partial: &Path) {
    let _ = std::fs::remove_file(partial);
    let mut journal = partial.as_os_str().to_owned();
    journal.push("-journal");
    let _ = std::fs::remove_file(journal);
}

/// Redraws "copied X of about Y MB" on stderr every 200 ms while the copy grows (the copy is
/// compacted, so it ends below the source's size; the final summary says what it came to).
/// Holds the copy to `mb_per_s` (0: no limit): SQLite calls the handler every few thousand
/// steps of the copy, and it sleeps while more has been written than the pace allows. A copy
/// at full speed fills the disk's queue, and every commit's fsync waits behind it.
fn pace(connection: &rusqlite::Connection, partial: std::path::PathBuf, mb_per_s: u64) {
    if mb_per_s == 0 {
        return;
    }
    let bytes_per_s = (mb_per_s << 20) as f64;
    let started = Instant::now();
    connection.progress_handler(
        10_000,
        Some(move || {
            let written = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) as f64;
            let ahead = written / bytes_per_s - started.elapsed().as_secs_f64();
            if ahead > 0.0 {
                std::thread::sleep(std::time::Duration::from_secs_f64(ahead.min(1.0)));
            }
            false // go on
        }),
    );
}

/// Writes the copy out to disk while it is being made, a few megabytes at a time. Left to the
/// end, the copy's one `fsync` wrote hundreds of megabytes at once, and the server's own
/// commit fsyncs (one per commit with `EMBEDDED_SYNC` on) queued behind it on the file
/// system's journal: an 800 ms stall for every sender (docs/BENCHMARKS-LOG.md, "Backup beside
/// senders"). `sync_file_range` starts and waits for the data's writeback only, without a
/// journal commit, so the final `fsync` has little left to do.
fn write_back_as_it_goes(
    partial: std::path::PathBuf,
    copying: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::os::fd::AsRawFd;
    std::thread::spawn(move || {
        let mut file = None;
        while copying.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(10));
            if file.is_none() {
                file = std::fs::File::open(&partial).ok();
            }
            if let Some(file) = &file {
                // SAFETY: a plain system call on a descriptor this thread owns; its flags ask
                // only for the writeback of dirty pages, which changes no memory of ours.
                unsafe {
                    libc::sync_file_range(
                        file.as_raw_fd(),
                        0,
                        0,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
            }
        }
    })
}

fn show_progress(
    target: std::path::PathBuf,
    source_bytes: u64,
    copying: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mb = |bytes: u64| bytes as f64 / 1_048_576.0;
        while copying.load(std::sync::atomic::Ordering::Relaxed) {
            let written = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
            let share = if source_bytes > 0 {
                (written as f64 * 100.0 / source_bytes as f64).min(99.0)
            } else {
                0.0
            };
            eprint!(
                "\r  copied {:.1} of about {:.1} MB ({share:.0}%) ",
                mb(written),
                mb(source_bytes)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        eprintln!("\r  copy complete{}", " ".repeat(40));
    })
}
