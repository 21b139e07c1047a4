// SPDX-License-Identifier: Apache-2.0
//! The daemon's descriptor budget: `RLIMIT_NOFILE` raised at start ([`raise_nofile`]), and the
//! admission of a new sandbox against it ([`FdBudget`]), so that a Create that would run the
//! process out of descriptors is refused with `RESOURCE_EXHAUSTED` naming the limit, instead of
//! the sandbox failing later inside Start with `EMFILE` (and taking an fd another sandbox's
//! container needed).
//!
//! Every sandbox lives in this one process, so the per-process limit is the density limit:
//! [`FDS_PER_SANDBOX`] descriptors a sandbox, measured with `sandboxer-bench density`.

use std::io;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors one sandbox is budgeted, from the listing `sandboxer-bench density` prints
/// (BENCHMARKS.md), one vCPU: 14 for a booted sandbox (the VM and vCPU, the guest memory's
/// memfd, the VMM thread's epoll and wake-up EventFd, the vsock device's notify EventFd and its
/// muxer's epoll, timerfd and command EventFd, the console log, and 4 sockets: the hybrid vsock
/// listener, both ends of the agent connection, the Task endpoint's listener; a clone has no
/// memfd of its own: 13), plus 2 for the first container's root filesystem (its block slot's
/// notify EventFd and the image file). More containers, streams and vCPUs than that come out
/// of [`RESERVED_FDS`].
pub const FDS_PER_SANDBOX: u64 = 16;

/// Descriptors kept free beyond the daemon's own at start and the sandboxes' budget: engine
/// connections, pre-built VM shells and templates (a few each), image building, and the
/// containers and streams beyond a sandbox's first.
pub const RESERVED_FDS: u64 = 256;

/// `RLIMIT_NOFILE` before and after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimits {
    /// The soft limit the process started with.
    pub soft_was: u64,
    /// The hard limit it started with.
    pub hard_was: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit now.
    pub hard: u64,
}

/// Raises this process's `RLIMIT_NOFILE`: the hard limit toward `/proc/sys/fs/nr_open` (the
/// kernel's ceiling; only a process with `CAP_SYS_RESOURCE`, such as root, may raise it, so a
/// refusal keeps the hard limit it has), then the soft limit up to the hard one (always
/// allowed). The soft limit is the one that counts: it is what `EMFILE` is measured against.
pub fn raise_nofile() -> io::Result<NofileLimits> {
    let (soft_was, hard_was) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mut hard = hard_was;
    if let Some(nr_open) = nr_open.filter(|n| *n > hard_was) {
        match setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open) {
            Ok(()) => hard = nr_open,
            // EPERM: no CAP_SYS_RESOURCE; keep the hard limit the process has.
            Err(e) => tracing::debug!(error = %e, nr_open, "cannot raise the hard RLIMIT_NOFILE"),
        }
    }
    if soft_was < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(NofileLimits {
        soft_was,
        hard_was,
        soft,
        hard,
    })
}

/// The soft `RLIMIT_NOFILE` of this process now.
pub fn nofile_soft_limit() -> io::Result<u64> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .map_err(io::Error::from)
}

/// Descriptors open in this process now (one listing of `/proc/self/fd`: milliseconds at
/// thousands of descriptors, so done once, not per Create).
pub fn open_fds() -> io::Result<u64> {
    let count = std::fs::read_dir("/proc/self/fd")?.count();
    // The listing's own descriptor was counted too.
    Ok(u64::try_from(count.saturating_sub(1)).unwrap_or(u64::MAX))
}

/// A Create refused because the sandboxes would outgrow the descriptor limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "RLIMIT_NOFILE {limit} leaves no room for another sandbox: {sandboxes} sandboxes at \
     {per_sandbox} descriptors each, {baseline} the daemon held at start and {reserved} kept \
     free need {needed} (raise the daemon's RLIMIT_NOFILE, e.g. LimitNOFILE= in its systemd \
     unit, or shut sandboxes down)"
)]
pub struct FdLimitError {
    /// The soft `RLIMIT_NOFILE`.
    pub limit: u64,
    /// Sandboxes the daemon holds already.
    pub sandboxes: u64,
    /// [`FDS_PER_SANDBOX`].
    pub per_sandbox: u64,
    /// Descriptors the daemon held when it started.
    pub baseline: u64,
    /// [`RESERVED_FDS`].
    pub reserved: u64,
    /// What one more sandbox would need in all.
    pub needed: u64,
}

/// Decides whether one more sandbox fits the descriptor limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    /// Descriptors the daemon held before any sandbox (its sockets, runtime, KVM handle).
    pub baseline: u64,
}

impl FdBudget {
    /// The budget of this process as it is now, before its first sandbox.
    pub fn measure() -> Self {
        FdBudget {
            baseline: open_fds().unwrap_or(0),
        }
    }

    /// Whether a sandbox may be added to `sandboxes` existing ones under `limit` (the soft
    /// `RLIMIT_NOFILE`): every sandbox the daemon knows counts [`FDS_PER_SANDBOX`] until it is
    /// shut down, on top of the baseline and [`RESERVED_FDS`].
    pub fn admit(&self, limit: u64, sandboxes: usize) -> Result<(), FdLimitError> {
        let sandboxes = u64::try_from(sandboxes).unwrap_or(u64::MAX);
        let needed = sandboxes
            .saturating_add(1)
            .saturating_mul(FDS_PER_SANDBOX)
            .saturating_add(self.baseline)
            .saturating_add(RESERVED_FDS);
        if needed > limit {
            return Err(FdLimitError {
                limit,
                sandboxes,
                per_sandbox: FDS_PER_SANDBOX,
                baseline: self.baseline,
                reserved: RESERVED_FDS,
                needed,
            });
        }
        Ok(())
    }

    /// How many sandboxes fit under `limit` in all.
    pub fn capacity(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.baseline.saturating_add(RESERVED_FDS)) / FDS_PER_SANDBOX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_is_admitted_while_its_budget_fits_and_refused_after() {
        let budget = FdBudget { baseline: 40 };
        // 40 + 256 + 16 * n: with a limit of 20,000, 1,231 sandboxes fit.
        assert_eq!(budget.capacity(20_000), 1231);
        assert_eq!(budget.admit(20_000, 0), Ok(()));
        assert_eq!(budget.admit(20_000, 1230), Ok(()));
        let refused = budget.admit(20_000, 1231).unwrap_err();
        assert_eq!(refused.needed, 40 + 256 + 1232 * 16);
        assert_eq!((refused.limit, refused.sandboxes), (20_000, 1231));
        let text = refused.to_string();
        assert!(text.contains("RLIMIT_NOFILE 20000"), "{text}");
        assert!(text.contains("1231 sandboxes at 16 descriptors"), "{text}");
        // The old default soft limit of many hosts leaves room for 45.
        assert_eq!(budget.capacity(1024), 45);
        // A limit below the daemon's own needs admits nothing, without overflow anywhere.
        assert!(budget.admit(100, 0).is_err());
        assert_eq!(budget.capacity(100), 0);
        assert!(budget.admit(u64::MAX - 1, usize::MAX).is_err());
    }

    #[test]
    fn the_limits_are_read_and_the_soft_one_never_lowered() {
        let before = nofile_soft_limit().unwrap();
        let limits = raise_nofile().unwrap();
        assert!(limits.soft >= limits.soft_was && limits.soft >= before);
        assert_eq!(
            limits.soft, limits.hard,
            "the soft limit goes up to the hard one"
        );
        assert!(limits.hard >= limits.hard_was);
        assert!(open_fds().unwrap() >= 3);
    }
}
