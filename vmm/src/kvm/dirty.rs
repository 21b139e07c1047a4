// SPDX-License-Identifier: Apache-2.0
//! Which pages of a VM's memory were written since a point in time: the guest's writes from
//! KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` on its memory slots; KVM's own writes into guest
//! memory, such as the clock page, are logged there too), the host's (the devices', through
//! vm-memory) from the dirty bitmap of each region ([`devices::GuestMemoryMmap`]), whose bit
//! may stand for several pages (all reported written). A live
//! handover uses it to copy only the pages of a clone written since its pages were copied
//! ahead ([`crate::Vm::precopy`]). The ioctls run on the thread that asks (the daemon's), not
//! on the VM's own threads, whose filters allow neither setting memory slots nor reading
//! their log.

use devices::GuestMemoryMmap;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{KvmError, set_slots};
use crate::memory::HOST_WRITE_CHUNK;

/// `KVM_MEM_LOG_DIRTY_PAGES`.
const LOG_DIRTY_PAGES: u32 = 1;
/// Bytes in a page (of the dirty log and of the bitmaps).
const PAGE: u64 = 4096;

/// Starts (`on`) or ends logging the writes to `mem`. Started, both logs are empty: what
/// [`written`] reports is what was written from here on.
pub(crate) fn track(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), KvmError> {
    set_slots(vm, mem, if on { LOG_DIRTY_PAGES } else { 0 })?;
    if on {
        written(vm, mem)?;
    }
    Ok(())
}

/// The pages written since [`track`] started or the last call, one bit a page of `mem` in
/// order (its regions one after the other, as its memfd lays them out), and empties both
/// logs.
pub(crate) fn written(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>, KvmError> {
    let pages: u64 = mem.iter().map(|r| r.len() / PAGE).sum();
    let mut out = vec![0u64; usize::try_from(pages.div_ceil(64)).unwrap_or(0)];
    let mut first = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let slot = u32::try_from(index).map_err(|_| KvmError::TooManyRegions(index))?;
        let len = usize::try_from(region.len()).map_err(|_| KvmError::TooManyRegions(index))?;
        let guest = vm
            .get_dirty_log(slot, len)
            .map_err(|source| KvmError::DirtyLog { slot, source })?;
        // The region mapping's own bitmap (not the slice view `GuestMemoryRegion` gives).
        let host = std::ops::Deref::deref(region).bitmap();
        let region_pages = region.len() / PAGE;
        let mut mark = |page: u64| {
            let at = first + page;
            if let Some(w) = out.get_mut(usize::try_from(at / 64).unwrap_or(usize::MAX)) {
                *w |= 1 << (at % 64);
            }
        };
        // Set bits only: the cost follows the pages written, not the memory's size.
        for_each_set(&guest, &mut mark);
        // A host bit stands for `HOST_WRITE_CHUNK` bytes of a clone, or a whole region.
        let chunk_pages = match host.len() {
            0 | 1 => region_pages,
            _ => u64::try_from(HOST_WRITE_CHUNK).unwrap_or(u64::MAX) / PAGE,
        };
        debug_assert!(
            host.len() <= 1 || host.len() == len.div_ceil(HOST_WRITE_CHUNK),
            "a host-write bitmap of {} bits for {len} bytes",
            host.len()
        );
        // Frozen at a handover, no write comes between this read and its reset; as logging
        // starts, a write lost here is read by the copy that follows.
        for_each_set(&host.get_and_reset(), |bit| {
            let start = bit.saturating_mul(chunk_pages);
            for page in start..start.saturating_add(chunk_pages).min(region_pages) {
                mark(page);
            }
        });
        first += region_pages;
    }
    Ok(out)
}

/// Calls `f` with the index of every set bit of `words`.
fn for_each_set(words: &[u64], mut f: impl FnMut(u64)) {
    for (w, &word) in (0u64..).zip(words) {
        let mut rest = word;
        while rest != 0 {
            f(w * 64 + u64::from(rest.trailing_zeros()));
            rest &= rest - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvm_ioctls::Kvm;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::{GuestRam, guest_memfd};

    fn pages_of(bits: &[u64]) -> Vec<usize> {
        (0..bits.len() * 64)
            .filter(|&i| bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0))
            .collect()
    }

    #[test]
    fn host_writes_mark_their_chunk_and_logging_starts_empty() {
        test_guests::require_kvm!();
        let kvm = Kvm::new().unwrap();
        let template = Arc::new(guest_memfd(8 << 20).unwrap());
        let clone = GuestRam::copy_on_write(&template, 8 << 20).unwrap();
        let vm = kvm.create_vm().unwrap();
        crate::kvm::register_memory(&vm, &clone.mem).unwrap();
        // Written before logging starts: not reported.
        clone.mem.write_obj(1u64, GuestAddress(0)).unwrap();
        track(&vm, &clone.mem, true).unwrap();
        assert_eq!(
            pages_of(&written(&vm, &clone.mem).unwrap()),
            Vec::<usize>::new()
        );
        // A host write marks the pages of its chunk, and only those.
        clone.mem.write_obj(2u64, GuestAddress(9 * 4096)).unwrap();
        let chunk = HOST_WRITE_CHUNK / 4096;
        let want: Vec<usize> = (chunk..2 * chunk).collect();
        assert!(want.contains(&9));
        assert_eq!(pages_of(&written(&vm, &clone.mem).unwrap()), want);
        // Read and emptied.
        assert_eq!(
            pages_of(&written(&vm, &clone.mem).unwrap()),
            Vec::<usize>::new()
        );
        track(&vm, &clone.mem, false).unwrap();
        drop(vm);
    }
}
