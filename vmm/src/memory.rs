// SPDX-License-Identifier: Apache-2.0
//! Guest memory: one memfd per VM, mapped as the standard x86 layout.
//!
//! RAM sits below the 32-bit MMIO gap; whatever does not fit continues at 4 GiB. Backing it with
//! a memfd (rather than anonymous memory) lets later features share or snapshot it: a template
//! VM's memory can be mapped copy-on-write by its clones, and a snapshot is the file's content.
//!
//! The memfd is one descriptor shared as `Arc<File>` by everything that needs it (the mapped
//! regions, the VM handle, the snapshot source; a template's clones share the template's), never
//! duplicated: a VM holds at most one memfd descriptor, a clone none of its own.
#![allow(
    unsafe_code,
    reason = "memfd_create and the memfd mapping need libc; see the SAFETY comments"
)]

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use devices::{GuestMemoryMmap, GuestRegionMmap};

use vm_memory::mmap::MmapRegionBuilder;

mod delta;

pub use delta::DeltaError;
pub(crate) use delta::{Precopy, capture_delta, capture_since};
use vm_memory::{FileOffset, GuestAddress};

use crate::arch::layout::{HIGH_RAM_START, MMIO_GAP_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("Failed to create the guest memory memfd")]
    CreateMemfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("Failed to size the guest memory memfd to {0} bytes")]
    SetSize(u64, #[source] std::io::Error),
    /// Mapping the memfd (shared, or a template's copy-on-write) failed.
    #[error("Failed to map guest memory")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The mapped regions do not form a guest memory.
    #[error("Invalid guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// The requested size does not fit the address space.
    #[error("Guest memory size {0} bytes is not representable")]
    Size(u64),
}

/// Guest RAM as `(guest address, size)` ranges for `mem_bytes` of memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(HIGH_RAM_START), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Guest memory and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped guest memory.
    pub mem: GuestMemoryMmap,
    /// The memfd holding its contents (for a copy-on-write clone: the template's, which holds
    /// the pages the clone has not written).
    pub file: Arc<File>,
    /// Whether `mem` is a private (copy-on-write) mapping of `file`.
    pub private: bool,
}

impl GuestRam {
    /// Creates `mem_bytes` of guest memory backed by a fresh memfd.
    pub fn new(mem_bytes: u64) -> Result<Self, MemoryError> {
        Self::shared(&Arc::new(guest_memfd(mem_bytes)?), mem_bytes)
    }

    /// Maps an existing guest memory memfd (`mem_bytes` long) shared: the guest sees and
    /// changes the very pages another VM had (a live handover; DESIGN.md section 8).
    pub fn shared(file: &Arc<File>, mem_bytes: u64) -> Result<Self, MemoryError> {
        // Nothing reads what the host wrote into a VM's own memory (a handover moves none of
        // it): a dirty bitmap of one bit a region.
        let mem = map(file, mem_bytes, libc::MAP_SHARED, |len| len)?;
        Ok(GuestRam {
            mem,
            file: Arc::clone(file),
            private: false,
        })
    }

    /// Maps `file` (a template's memory, `mem_bytes` long) copy-on-write: the guest reads the
    /// template's pages and each page it writes becomes its own (`MAP_PRIVATE`); the template's
    /// memfd never changes.
    pub fn copy_on_write(file: &Arc<File>, mem_bytes: u64) -> Result<Self, MemoryError> {
        // What the host writes into a clone is read at a handover (`kvm::dirty`): a bit per
        // `HOST_WRITE_CHUNK` (a bit a page would cost each idle clone a page of RSS).
        let mem = map(file, mem_bytes, libc::MAP_PRIVATE, |_| HOST_WRITE_CHUNK)?;
        Ok(GuestRam {
            mem,
            file: Arc::clone(file),
            private: true,
        })
    }

    /// Copies the pages a copy-on-write clone has written (its private pages) into a fresh
    /// sparse memfd, each at its own offset, so another process can rebuild the clone on the
    /// template's memfd ([`GuestRam::apply_delta`]). The clone must not run meanwhile.
    ///
    /// Private pages are found in `/proc/self/pagemap`: present and not file-backed, or
    /// swapped out (a swapped page may be a template page; copying it costs memory, not
    /// correctness).
    #[cfg(test)]
    pub(crate) fn capture_delta(&self) -> Result<File, DeltaError> {
        delta::capture_delta(&self.mem)
    }

    /// Writes the pages of `delta` ([`GuestRam::capture_delta`]'s memfd) into this memory,
    /// each at its offset: a clone rebuilt on its template's memfd gets back what it wrote.
    /// Only the delta's data ranges are read (`SEEK_DATA`/`SEEK_HOLE`).
    pub fn apply_delta(&self, delta: &File) -> Result<u64, DeltaError> {
        delta::apply(&self.mem, delta)
    }

    /// Bytes of guest memory that hold data (pages the guest or the VMM touched).
    #[cfg(test)]
    pub(crate) fn resident_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// Bytes of a clone's memory one bit of its host-write bitmap stands for: the devices write a
/// few buffers and rings between a copy ahead and a handover, and each bit set makes the
/// handover copy the clone's own pages of its chunk.
pub(crate) const HOST_WRITE_CHUNK: usize = 32 << 10;

/// Maps `file` (`mem_bytes` long) as guest memory with `flags` (`MAP_SHARED` or
/// `MAP_PRIVATE`), each region with a dirty bitmap of one bit per `chunk(region length)`
/// bytes.
fn map(
    file: &Arc<File>,
    mem_bytes: u64,
    flags: i32,
    chunk: impl Fn(usize) -> usize,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, size) in ram_ranges(mem_bytes) {
        let len = usize::try_from(size).map_err(|_| MemoryError::Size(mem_bytes))?;
        let chunk = std::num::NonZeroUsize::new(chunk(len)).ok_or(MemoryError::Size(mem_bytes))?;
        let bitmap = vm_memory::bitmap::AtomicBitmap::new(len, chunk);
        let region = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | flags)
            .with_file_offset(FileOffset::from_arc(Arc::clone(file), offset))
            .build()
            .map_err(MemoryError::Map)?;
        let region = GuestRegionMmap::new(region, addr).ok_or(MemoryError::Size(mem_bytes))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

/// A fresh guest memory memfd, `mem_bytes` long, no page allocated yet: what the VMM maps for
/// a VM's memory, and what a caller makes for [`crate::VmConfig::memory`].
pub fn guest_memfd(mem_bytes: u64) -> Result<File, MemoryError> {
    let file = create_memfd(c"sandboxer-guest-ram")?;
    file.set_len(mem_bytes)
        .map_err(|e| MemoryError::SetSize(mem_bytes, e))?;
    Ok(file)
}

fn create_memfd(name: &CStr) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid; the call has no
    // memory-safety preconditions beyond that.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    debug_assert!(file.as_raw_fd() >= 0);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    #[test]
    fn small_memory_is_one_range_below_the_gap() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn large_memory_continues_above_4g() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(HIGH_RAM_START), (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn memfd_backed_memory_reads_back_and_counts_resident_pages() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert_eq!(ram.mem.num_regions(), 1);
        assert_eq!(ram.resident_bytes().unwrap(), 0);
        ram.mem
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(ram.resident_bytes().unwrap(), 4096);
    }

    #[test]
    fn a_copy_on_write_clone_sees_the_template_and_keeps_its_writes() {
        let template = GuestRam::new(8 << 20).unwrap();
        template.mem.write_obj(1u64, GuestAddress(0x2000)).unwrap();
        template.mem.write_obj(2u64, GuestAddress(0x3000)).unwrap();
        let a = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        let b = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        assert!(a.private && b.private);
        assert_eq!(a.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 1);
        a.mem.write_obj(10u64, GuestAddress(0x2000)).unwrap();
        b.mem.write_obj(20u64, GuestAddress(0x2000)).unwrap();
        assert_eq!(a.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 10);
        assert_eq!(b.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 20);
        assert_eq!(
            template.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            1
        );
        // The template's pages stay shared: its memfd holds only what it wrote.
        assert_eq!(template.resident_bytes().unwrap(), 2 * 4096);
        assert_eq!(b.mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 2);
    }

    #[test]
    fn a_clone_rebuilt_from_its_delta_has_what_it_wrote_and_shares_the_rest() {
        let template = GuestRam::new(8 << 20).unwrap();
        template.mem.write_obj(1u64, GuestAddress(0x2000)).unwrap();
        template.mem.write_obj(2u64, GuestAddress(0x5000)).unwrap();
        let clone = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        clone.mem.write_obj(10u64, GuestAddress(0x2000)).unwrap();
        clone.mem.write_obj(0u64, GuestAddress(0x7f_f000)).unwrap();
        // A page only read stays the template's.
        assert_eq!(clone.mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 2);

        let delta = clone.capture_delta().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            delta.metadata().unwrap().blocks() * 512,
            2 * 4096,
            "only the two written pages are copied"
        );
        let rebuilt = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        assert_eq!(rebuilt.apply_delta(&delta).unwrap(), 2 * 4096);
        assert_eq!(
            rebuilt.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            10
        );
        assert_eq!(
            rebuilt.mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(),
            2
        );
        assert_eq!(
            rebuilt
                .mem
                .read_obj::<u64>(GuestAddress(0x7f_f000))
                .unwrap(),
            0
        );
        assert_eq!(
            template.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            1
        );
    }

    #[test]
    fn memory_mapped_shared_again_sees_and_keeps_the_same_pages() {
        let first = GuestRam::new(8 << 20).unwrap();
        first.mem.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        let second = GuestRam::shared(&first.file, 8 << 20).unwrap();
        assert!(!second.private);
        assert_eq!(second.mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 7);
        second.mem.write_obj(8u64, GuestAddress(0x3000)).unwrap();
        assert_eq!(first.mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 8);
    }

    #[test]
    fn guest_memory_holds_one_memfd_descriptor_and_a_clone_none() {
        let count = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|t| {
                        t.to_string_lossy()
                            .starts_with("/memfd:sandboxer-guest-ram-test-count")
                    })
                })
                .count()
        };
        // A memfd of its own name, so that other tests' memory does not count.
        let file = Arc::new(create_memfd(c"sandboxer-guest-ram-test-count").unwrap());
        file.set_len(8 << 20).unwrap();
        let a = GuestRam::copy_on_write(&file, 8 << 20).unwrap();
        let b = GuestRam::copy_on_write(&file, 8 << 20).unwrap();
        assert_eq!(count(), 1, "clones share the template's descriptor");
        drop(file);
        assert_eq!(count(), 1, "kept open by the clones' mappings");
        drop((a, b));
        assert_eq!(count(), 0);
    }

    #[test]
    fn memory_split_around_the_gap_maps_both_parts() {
        // Mapping is lazy (MAP_NORESERVE on a sparse memfd): this costs no real memory.
        let ram = GuestRam::new(MMIO_GAP_START + (16 << 20)).unwrap();
        assert_eq!(ram.mem.num_regions(), 2);
        ram.mem
            .write_obj(7u8, GuestAddress(HIGH_RAM_START))
            .unwrap();
        assert!(
            ram.mem
                .write_obj(7u8, GuestAddress(MMIO_GAP_START))
                .is_err()
        );
    }
}
