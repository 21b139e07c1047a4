// SPDX-License-Identifier: Apache-2.0
//! The process heap of a process that holds many VMs.
//!
//! Every KVM VM registers an MMU notifier on its process's address space, and every change of
//! a mapping anywhere in the process (`mprotect`, `munmap`, `madvise(MADV_DONTNEED)`) calls
//! every VM's notifier: a mapping change costs in proportion to the VMs the process holds.
//! glibc's allocator grows a thread arena's heap with one `mprotect` per step of 128 KiB by
//! default; a daemon rebuilding a hundred VMs at once (a live upgrade's new process) made
//! thousands of them, each walking a hundred VMs' notifiers.
#![allow(
    unsafe_code,
    reason = "the allocator's parameters are only reachable through libc; see the SAFETY comment"
)]

/// The step a thread arena's heap grows by (and keeps free at its top when trimmed).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const HEAP_STEP: libc::c_int = 4 << 20;

/// Makes the allocator grow its heaps 4 MiB at a time: fewer, larger mapping changes.
/// Address space only: the pages are not touched until used. Each heap may keep up to a step of
/// freed memory at its top instead of handing it back. Call it before other threads exist. A
/// no-op where the C library has no such setting (musl).
pub fn grow_heap_in_large_steps() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; it touches no memory of ours.
        let set = unsafe { libc::mallopt(libc::M_TOP_PAD, HEAP_STEP) };
        if set != 1 {
            log::warn!("mallopt(M_TOP_PAD) refused: the heap grows in small steps");
        }
    }
}

/// Faults in up to a step ([`grow_heap_in_large_steps`]) of the calling thread's heap ahead of a
/// burst of allocations whose page faults would land where time counts (a live handover's
/// rebuilding of frozen VMs, a few pages each): touches `bytes` of it, in chunks the heap
/// serves, and frees them. The heap keeps up to a step free at its top, resident, so the burst
/// reuses those pages. A no-op where the C library has no such setting (musl).
pub fn warm_heap(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Below glibc's mmap threshold (128 KiB): served by the heap, not a mapping of its own.
        const CHUNK: usize = 64 * 1024;
        let step = usize::try_from(HEAP_STEP).unwrap_or(0);
        let chunks: Vec<Vec<u8>> = (0..bytes.min(step).div_ceil(CHUNK))
            .map(|_| vec![1_u8; CHUNK])
            .collect();
        drop(std::hint::black_box(chunks));
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}
