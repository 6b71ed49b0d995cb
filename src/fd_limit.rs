//! The open-file limit: raises the process's soft `RLIMIT_NOFILE` at start-up so that
//! `MAX_CONNECTIONS` client sockets fit (a shell's default soft limit is often 1024 while the hard
//! limit is far higher), and says so when the hard limit is too low.

/// File descriptors kept for everything that is not a client socket: the listeners, the
/// store's files and sockets, Redis, logging and metrics clients.
const HEADROOM: u64 = 256;

/// What raising the limit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdLimit {
    /// The soft limit already allowed `wanted` descriptors.
    Enough { soft: u64 },
    /// The soft limit was raised from `from` to `to`.
    Raised { from: u64, to: u64 },
    /// The hard limit (or the raise failed) leaves fewer than `wanted` descriptors.
    Short { soft: u64, wanted: u64 },
}

/// Descriptors this process has open and its soft limit (for the fd-headroom metrics).
pub fn usage() -> (usize, u64) {
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count());
    (open, current().map_or(0, |(soft, _)| soft))
}

/// The current (soft, hard) open-file limits.
fn current() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through a valid pointer.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (status == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft open-file limit to fit `max_connections` clients, within the hard limit.
pub fn fit_connections(max_connections: usize) -> FdLimit {
    let wanted = (max_connections as u64).saturating_add(HEADROOM);
    let Some((soft, hard)) = current() else {
        return FdLimit::Short { soft: 0, wanted };
    };
    if soft >= wanted {
        return FdLimit::Enough { soft };
    }
    let target = wanted.min(hard);
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one rlimit struct through a valid pointer.
    if target <= soft || unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return FdLimit::Short { soft, wanted };
    }
    if target < wanted {
        return FdLimit::Short {
            soft: target,
            wanted,
        };
    }
    FdLimit::Raised {
        from: soft,
        to: target,
    }
}

/// Raises the limit and logs the outcome once.
pub fn fit_and_log(max_connections: usize) {
    match fit_connections(max_connections) {
        FdLimit::Enough { .. } => {}
        FdLimit::Raised { from, to } => {
            log::info!("raised the open-file limit from {from} to {to} for MAX_CONNECTIONS")
        }
        FdLimit::Short { soft, wanted } => log::warn!(
            "open-file limit is {soft}, MAX_CONNECTIONS needs about {wanted}: \
             connections past the limit will wait in the accept queue (raise LimitNOFILE / ulimit -n)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_need_is_already_met() {
        assert!(matches!(fit_connections(1), FdLimit::Enough { .. }));
    }

    #[test]
    fn the_soft_limit_ends_at_least_as_high_as_asked_or_at_the_hard_limit() {
        let outcome = fit_connections(4096);
        let (soft, hard) = current().expect("getrlimit works");
        assert!(
            soft >= (4096 + HEADROOM).min(hard),
            "{outcome:?}: soft {soft}"
        );
    }
}
