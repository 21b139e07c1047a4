// SPDX-License-Identifier: Apache-2.0
//! A short loop that must not be preempted by the threads it wakes.
#![allow(
    unsafe_code,
    reason = "the thread's scheduling policy is only reachable through libc; see the SAFETY comments"
)]

/// Runs `f` with the calling thread under `SCHED_FIFO` (the lowest real-time priority), then
/// puts the thread's policy back. For a loop that wakes many threads, such as one that ends
/// many VMs' pauses: on a host with fewer cores than the threads it wakes, each woken vCPU
/// thread would otherwise preempt the loop, and the last VMs would wait out the first ones'
/// catch-up work. `f` must be short and must not spin: nothing else of normal priority runs
/// on its core meanwhile. Without the privilege for it, `f` runs at normal priority.
pub fn realtime<R>(f: impl FnOnce() -> R) -> R {
    let _guard = Realtime::enter();
    f()
}

/// A `sched_param` of all zeroes (musl's has more fields than glibc's).
fn zeroed_param() -> libc::sched_param {
    // SAFETY: sched_param is plain integers; all zeroes is a valid value of it.
    unsafe { std::mem::zeroed() }
}

/// The thread's scheduling policy and priority before [`realtime`], put back on drop.
struct Realtime {
    policy: libc::c_int,
    param: libc::sched_param,
}

impl Realtime {
    fn enter() -> Option<Self> {
        // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
        let policy = unsafe { libc::sched_getscheduler(0) };
        if policy < 0 {
            return None;
        }
        let mut param = zeroed_param();
        // SAFETY: `param` is a valid, writable sched_param for the calling thread's priority.
        if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
            return None;
        }
        let mut fifo = zeroed_param();
        fifo.sched_priority = 1;
        // SAFETY: `fifo` is a valid sched_param; the call changes only the calling thread.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) } != 0 {
            log::debug!(
                "no real-time priority for a critical loop: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Realtime { policy, param })
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        // SAFETY: `self.param` is the calling thread's own earlier priority, read in `enter`.
        if unsafe { libc::sched_setscheduler(0, self.policy, &self.param) } != 0 {
            log::error!(
                "cannot put a thread back to its scheduling policy: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: reads the calling thread's policy.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn the_policy_is_put_back() {
        let before = policy();
        let inside = realtime(policy);
        // Root may take a real-time policy; anyone else runs `f` as before.
        // SAFETY: geteuid only reads the caller's effective uid.
        let root = unsafe { libc::geteuid() } == 0;
        let want = if root { libc::SCHED_FIFO } else { before };
        assert_eq!(inside, want);
        assert_eq!(policy(), before);
    }
}
