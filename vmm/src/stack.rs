// SPDX-License-Identifier: Apache-2.0
//! What a VM's thread tells about itself once it runs: its host thread id, and where its stack
//! starts, so that the stack a rare deep call will use can be faulted in ahead.
//!
//! A vCPU or VMM thread lives shallow: waiting, running the guest, serving one event at a
//! time. Saving its VM for a live handover goes deeper than it ever went (a vCPU's whole state
//! in locals, the kick signal's frame with the XSAVE area), and each page of stack it touches
//! for the first time is a page fault inside the VM's freeze: about nine a VM, a tenth of the
//! handover's CPU on the development host. [`ThreadSeen::populate_stack`] takes them ahead,
//! from any thread, while the VM still runs.
#![allow(
    unsafe_code,
    reason = "faulting pages in takes madvise, only reachable through libc; see the SAFETY comment"
)]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// How deep below its first frame a thread's stack is faulted in ahead of a handover: what
/// the save's calls reach with room to spare (they fault in about five pages on a vCPU
/// thread, four on a VMM thread), well inside the threads' 256 KiB stacks.
pub(crate) const HANDOVER_DEPTH: usize = 64 * 1024;
/// The host's page size (x86-64).
const PAGE: usize = 4096;

/// A thread's host thread id and first frame, each 0 until the thread runs.
#[derive(Debug, Default)]
pub(crate) struct ThreadSeen {
    tid: AtomicU32,
    stack_top: AtomicUsize,
}

impl ThreadSeen {
    /// Records the calling thread: call it first thing on the thread.
    pub(crate) fn record(&self) {
        let id = rustix::thread::gettid().as_raw_nonzero().get();
        self.tid.store(id.unsigned_abs(), Ordering::Relaxed);
        let here = 0_u8;
        let top = std::ptr::from_ref(std::hint::black_box(&here)) as usize;
        self.stack_top.store(top, Ordering::Relaxed);
    }

    /// The host thread id (0 before the thread runs).
    pub(crate) fn tid(&self) -> u32 {
        self.tid.load(Ordering::Relaxed)
    }

    /// Faults in the `depth` bytes of the thread's stack below the page of its first frame,
    /// from any thread. Pages already there stay as they are; nothing is written. Does
    /// nothing for a thread that has not run.
    pub(crate) fn populate_stack(&self, depth: usize) -> std::io::Result<()> {
        let top = self.stack_top.load(Ordering::Relaxed);
        let end = top & !(PAGE - 1);
        let Some(start) = end.checked_sub(depth.next_multiple_of(PAGE)) else {
            return Ok(());
        };
        if top == 0 || start == end {
            return Ok(());
        }
        // SAFETY: MADV_POPULATE_WRITE faults pages in as a write would, without changing what
        // they hold, and fails (ENOMEM) on a range that is not mapped: no memory of this
        // process changes, whichever mapping the range lies in (the thread's stack while it
        // runs).
        let done = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if done == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of the `depth` bytes of stack below the page of `seen`'s first frame are
    /// resident (`mincore`: this range only, whatever the test's other threads do).
    fn resident_below(seen: &ThreadSeen, depth: usize) -> usize {
        let end = seen.stack_top.load(Ordering::Relaxed) & !(PAGE - 1);
        let start = end - depth;
        let mut pages = vec![0_u8; depth / PAGE];
        // SAFETY: the range is mapped (the thread's stack, the thread alive) and `pages` has a
        // byte for each of its pages; mincore only writes those bytes.
        let done = unsafe { libc::mincore(start as *mut libc::c_void, depth, pages.as_mut_ptr()) };
        assert_eq!(done, 0, "{}", std::io::Error::last_os_error());
        pages.iter().filter(|&&p| p & 1 == 1).count()
    }

    #[test]
    fn a_threads_stack_is_faulted_in_from_another_thread() {
        let seen = std::sync::Arc::new(ThreadSeen::default());
        // Not run yet: nothing to do.
        seen.populate_stack(HANDOVER_DEPTH).unwrap();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        // A stack size no other thread of the test binary has: glibc hands an exited thread's
        // stack (its pages still resident) to a new thread of about the same size.
        let thread = std::thread::Builder::new()
            .stack_size(384 * 1024)
            .spawn({
                let seen = std::sync::Arc::clone(&seen);
                move || {
                    seen.record();
                    ready_tx.send(()).unwrap();
                    done_rx.recv().unwrap();
                }
            })
            .unwrap();
        ready.recv().unwrap();
        let here = rustix::thread::gettid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs();
        assert_ne!(seen.tid(), 0);
        assert_ne!(seen.tid(), here, "the spawned thread's id, not this one's");
        let pages = HANDOVER_DEPTH / PAGE;
        // A thread that never went deep has most of that stack not yet faulted in.
        let before = resident_below(&seen, HANDOVER_DEPTH);
        assert!(before < pages, "{before} of {pages} pages resident already");
        seen.populate_stack(HANDOVER_DEPTH).unwrap();
        assert_eq!(resident_below(&seen, HANDOVER_DEPTH), pages);
        // Again: nothing to do, and no harm.
        seen.populate_stack(HANDOVER_DEPTH).unwrap();
        assert_eq!(resident_below(&seen, HANDOVER_DEPTH), pages);
        done.send(()).unwrap();
        thread.join().unwrap();
    }
}
