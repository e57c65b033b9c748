//! The launcher's limit on open files. Each local rank costs the launcher
//! a few descriptors (about four were measured: its pipes and files), so a
//! common soft limit of 1024 would cap a job at about 250 local ranks. The
//! launcher raises its soft limit towards the hard one at start, and ranks
//! get the soft limit the launcher started with.

use std::sync::atomic::{AtomicU64, Ordering};

/// The highest soft limit the launcher sets for itself.
const MAX_SOFT_LIMIT: u64 = 65_536;

/// The soft and hard limits the launcher started with, once it raised its
/// own; zero while unchanged.
static STARTED_SOFT: AtomicU64 = AtomicU64::new(0);
static STARTED_HARD: AtomicU64 = AtomicU64::new(0);

/// Raises the soft limit on open files to the hard limit, at most to
/// [`MAX_SOFT_LIMIT`]. Failures leave the limit as it was.
pub fn raise() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let target = limit.rlim_max.min(MAX_SOFT_LIMIT);
    if limit.rlim_cur >= target {
        return;
    }
    let raised = libc::rlimit { rlim_cur: target, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        STARTED_SOFT.store(limit.rlim_cur, Ordering::Relaxed);
        STARTED_HARD.store(limit.rlim_max, Ordering::Relaxed);
    }
}

/// Gives a child the soft limit the launcher started with. Runs between
/// fork and exec, so it only makes the async-signal-safe setrlimit call.
pub(crate) fn restore_in_child() {
    let soft = STARTED_SOFT.load(Ordering::Relaxed);
    if soft == 0 {
        return;
    }
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: STARTED_HARD.load(Ordering::Relaxed) };
    // SAFETY: setrlimit only reads the struct it is given.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}
