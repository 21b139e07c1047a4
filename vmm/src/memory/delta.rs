// SPDX-License-Identifier: Apache-2.0
//! A template clone's own pages, carried across a live handover.
//!
//! A clone maps its template's memfd copy-on-write: each page it writes becomes anonymous
//! memory of this process, which no other process can map. A handover therefore copies those
//! pages into a sparse memfd (each at its offset) and the new process writes them back into
//! its own copy-on-write mapping of the template ([`apply`]).
//!
//! The copy can mostly be made while the clone still runs ([`Precopy`]): frozen, the handover
//! then carries only the pages written since the copy began ([`capture_since`]), named by the
//! dirty logs ([`crate::kvm::dirty`]), or without them, the pages that differ from their copy
//! or are new. A page the guest wrote during the copy is in the logs, or differs from it (or
//! was written back to the very same bytes), so a torn copy is harmless. Guest memory is never
//! discarded (no balloon, no `MADV_DONTNEED`): a page once the clone's stays its own, so the
//! copy ahead plus the frozen delta is the clone's memory.
//!
//! The clone's own pages are the present anonymous pages and the swapped ones of its mapping
//! (a swapped page may be the template's; copying it costs memory, not correctness), found
//! with the `PAGEMAP_SCAN` ioctl (Linux 6.7), which returns just their ranges, or on older
//! kernels by reading each page's `/proc/self/pagemap` entry.
#![allow(
    unsafe_code,
    reason = "PAGEMAP_SCAN is an ioctl without a safe binding; see the SAFETY comments"
)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use devices::GuestMemoryMmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, VolatileMemory,
};

use super::{MemoryError, create_memfd};

/// Bytes in a page of guest memory.
const PAGE: usize = 4096;
/// Pagemap entries read at once (without `PAGEMAP_SCAN`).
const PAGEMAP_BATCH: usize = 512;
/// Page ranges `PAGEMAP_SCAN` returns at once.
const SCAN_BATCH: usize = 256;
/// Pages written to the delta memfd in one call at most.
const RUN_PAGES: usize = 64;

/// Ids of copies taken ahead: unique in the process.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Why a clone's written pages could not be saved or brought back.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The delta memfd could not be created.
    #[error("Failed to create the memfd for a clone's pages")]
    Memfd(#[source] MemoryError),
    /// `/proc/self/pagemap` could not be read.
    #[error("Failed to read /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    /// Reading or writing the delta failed.
    #[error("Failed to copy a clone's pages")]
    Io(#[source] std::io::Error),
    /// Mapping the copy taken ahead failed.
    #[error("Failed to map a clone's pages copied ahead")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// An offset does not fit the guest memory.
    #[error("A page offset lies outside the guest memory")]
    Size,
}

/// A clone's written pages copied while it ran, ahead of its handover
/// ([`crate::Vm::precopy`]): the handover then copies only the pages that differ from them
/// ([`capture_since`]), and the new process writes these into the VM it builds ahead
/// ([`crate::PreparedShell::with_base`]).
#[derive(Debug)]
pub(crate) struct Precopy {
    /// Tells this copy apart (a shell it was written into, and the handover's delta on top
    /// of it, carry it).
    pub(crate) id: u64,
    /// The pages, each at its offset (a sparse memfd).
    pub(crate) file: Arc<File>,
    /// Which pages `file` holds: one bit per page of guest memory.
    pages: Vec<u64>,
    /// `file` mapped read-only, its pages faulted in, where a frozen comparison may run (no
    /// log; debug builds check the log with it): it reads them without a system call or a
    /// fault.
    view: Option<MmapRegion>,
    /// Whether the writes since the copy began are logged ([`crate::kvm::dirty`]).
    pub(crate) logged: bool,
}

impl Precopy {
    /// Copies the pages a running clone has written so far (the guest may write any of them
    /// meanwhile: see the module's documentation). `logged`: the writes from before this
    /// copy on are logged ([`crate::kvm::dirty::track`]).
    pub(crate) fn take(mem: &GuestMemoryMmap, logged: bool) -> Result<Precopy, DeltaError> {
        let (file, pages) = capture(mem, None, None)?;
        let file = Arc::new(file);
        let mut copy = Precopy {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            file,
            pages,
            view: None,
            logged,
        };
        if !logged || cfg!(debug_assertions) {
            copy.view = Some(copy.map_view()?);
        }
        Ok(copy)
    }

    /// [`Precopy::view`]: `file` mapped, the pages it holds faulted in (reading a hole of a
    /// shared memfd mapping would allocate a page: only held pages are touched).
    fn map_view(&self) -> Result<MmapRegion, DeltaError> {
        let len = usize::try_from(self.file.metadata().map_err(DeltaError::Io)?.len())
            .map_err(|_| DeltaError::Size)?;
        let view = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(Arc::clone(&self.file), 0))
            .build()
            .map_err(DeltaError::Map)?;
        let mut byte = [0u8; 1];
        for index in self.held() {
            view.get_slice(index * PAGE, 1)
                .map_err(|_| DeltaError::Size)?
                .copy_to(&mut byte[..]);
        }
        Ok(view)
    }

    fn holds(&self, page: usize) -> bool {
        is_set(&self.pages, page)
    }

    /// The indices of the pages it holds.
    fn held(&self) -> impl Iterator<Item = usize> + '_ {
        self.pages.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |bit| word & (1u64 << bit) != 0)
                .map(move |bit| w * 64 + bit)
        })
    }

    /// Whether page `index`, whose bytes are at `now` (a page of guest memory), is the same
    /// in the copy. Compared in place: nothing is copied.
    fn unchanged(&self, index: usize, now: &devices::GuestSlice<'_>) -> Result<bool, DeltaError> {
        // Without a view (logged, a release build) a page whose log could not be read is
        // taken as changed: copied again.
        let Some(view) = self
            .view
            .as_ref()
            .filter(|_| self.holds(index) && now.len() == PAGE)
        else {
            return Ok(false);
        };
        let before = view
            .get_slice(index * PAGE, PAGE)
            .map_err(|_| DeltaError::Size)?;
        let (a, b) = (now.ptr_guard(), before.ptr_guard());
        // SAFETY: both pointers come from bounds-checked slices of PAGE bytes of live
        // mappings (the guest memory and this copy), readable for the whole call; memcmp
        // only reads them. A byte changing meanwhile could only make them differ, and the
        // caller compares frozen guest memory.
        let diff = unsafe { libc::memcmp(a.as_ptr().cast(), b.as_ptr().cast(), PAGE) };
        Ok(diff == 0)
    }
}

/// Copies the pages a frozen copy-on-write clone has written into a fresh sparse memfd, each
/// at its own offset, so another process can rebuild the clone on the template's memfd
/// ([`apply`]).
pub(crate) fn capture_delta(mem: &GuestMemoryMmap) -> Result<File, DeltaError> {
    capture(mem, None, None).map(|(delta, _)| delta)
}

/// The pages of a frozen clone that differ from `base` (written since it was taken, or
/// written first since), in a fresh sparse memfd: `base` then this delta, written in that
/// order on the template's memory, give the clone's memory. With `written` (the pages written
/// since before `base` was taken, one bit a page: [`crate::kvm::dirty::written`]) a page
/// `base` holds is copied again only if written; without, each is compared with its copy.
pub(crate) fn capture_since(
    mem: &GuestMemoryMmap,
    base: &Precopy,
    written: Option<&[u64]>,
) -> Result<File, DeltaError> {
    capture(mem, Some(base), written).map(|(delta, _)| delta)
}

/// Copies a clone's own pages (but those that `base` holds and are unchanged, when given)
/// into a fresh sparse memfd; returns it and which pages it holds.
fn capture(
    mem: &GuestMemoryMmap,
    base: Option<&Precopy>,
    written: Option<&[u64]>,
) -> Result<(File, Vec<u64>), DeltaError> {
    let delta = create_memfd(c"sandboxer-guest-delta").map_err(DeltaError::Memfd)?;
    let mem_bytes: u64 = mem.iter().map(|r| r.len()).sum();
    delta.set_len(mem_bytes).map_err(DeltaError::Io)?;
    let total_pages = usize::try_from(mem_bytes).map_err(|_| DeltaError::Size)? / PAGE;
    let mut out = Runs {
        file: &delta,
        copied: vec![0u64; total_pages.div_ceil(64)],
        start: 0,
        buf: Vec::new(),
    };
    let pagemap = File::open("/proc/self/pagemap").map_err(DeltaError::Pagemap)?;
    let mut page = vec![0u8; PAGE];
    let mut first_page = 0usize;
    for region in mem.iter() {
        for range in own_pages(&pagemap, region)? {
            for in_region in range {
                let at = MemoryRegionAddress((in_region * PAGE) as u64);
                let index = first_page + in_region;
                if let Some(base) = base.filter(|b| b.holds(index)) {
                    let now = region.get_slice(at, PAGE).map_err(|_| DeltaError::Size)?;
                    let unchanged = match written {
                        Some(written) => {
                            let clean = !is_set(written, index);
                            // Debug builds (every test) check the logs missed no write.
                            let checked =
                                !cfg!(debug_assertions) || !clean || base.unchanged(index, &now)?;
                            debug_assert!(checked, "page {index} changed and no log has it");
                            clean
                        }
                        None => base.unchanged(index, &now)?,
                    };
                    if unchanged {
                        continue;
                    }
                }
                region
                    .read_slice(&mut page, at)
                    .map_err(|_| DeltaError::Size)?;
                out.push(index, &page)?;
            }
        }
        first_page += usize::try_from(region.len()).map_err(|_| DeltaError::Size)? / PAGE;
    }
    out.flush()?;
    let copied = out.copied;
    Ok((delta, copied))
}

/// Whether bit `index` of `bits` is set.
fn is_set(bits: &[u64], index: usize) -> bool {
    bits.get(index / 64)
        .is_some_and(|word| word & (1 << (index % 64)) != 0)
}

/// Pages written to the delta memfd, contiguous ones in one write.
struct Runs<'a> {
    file: &'a File,
    /// One bit per page of guest memory: the pages written.
    copied: Vec<u64>,
    /// The first page of `buf`.
    start: usize,
    /// Pages not written yet, from `start` on.
    buf: Vec<u8>,
}

impl Runs<'_> {
    fn push(&mut self, index: usize, page: &[u8]) -> Result<(), DeltaError> {
        let pending = self.buf.len() / PAGE;
        if pending > 0 && (index != self.start + pending || pending == RUN_PAGES) {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.start = index;
        }
        self.buf.extend_from_slice(page);
        let word = self.copied.get_mut(index / 64).ok_or(DeltaError::Size)?;
        *word |= 1 << (index % 64);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DeltaError> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, (self.start * PAGE) as u64)
                .map_err(DeltaError::Io)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// The clone's own pages in `region`, as ranges of page indices within it.
fn own_pages(
    pagemap: &File,
    region: &devices::GuestRegionMmap,
) -> Result<Vec<std::ops::Range<usize>>, DeltaError> {
    let pages = usize::try_from(region.len()).map_err(|_| DeltaError::Size)? / PAGE;
    let host = region.as_ptr() as u64;
    match scan(pagemap, host, pages) {
        Some(ranges) => ranges,
        None => read_entries(pagemap, host, pages),
    }
}

/// `struct pm_scan_arg` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PAGE_IS_*` categories of `PAGEMAP_SCAN`.
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;

vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, u32::from(b'f'), 16, PmScanArg);

/// [`own_pages`] with `PAGEMAP_SCAN`: pages not of a file and present or swapped. `None`
/// when the kernel has no such ioctl (before 6.7).
fn scan(
    pagemap: &File,
    host: u64,
    pages: usize,
) -> Option<Result<Vec<std::ops::Range<usize>>, DeltaError>> {
    let end = host + (pages * PAGE) as u64;
    let mut found = Vec::new();
    let mut out = [PageRegion::default(); SCAN_BATCH];
    let mut from = host;
    while from < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: from,
            end,
            vec: out.as_mut_ptr() as u64,
            vec_len: SCAN_BATCH as u64,
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid `pm_scan_arg` of the size it states; `vec` points at
        // `out`, which has room for `vec_len` regions and outlives the call; the range is
        // this process's own mapping. The kernel writes only `arg.walk_end` and `out`.
        let n =
            unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(pagemap, PAGEMAP_SCAN(), &mut arg) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTTY | libc::EINVAL) if found.is_empty() && from == host => None,
                _ => Some(Err(DeltaError::Pagemap(e))),
            };
        }
        let n = usize::try_from(n).unwrap_or(0).min(SCAN_BATCH);
        for r in out.iter().take(n) {
            let first = usize::try_from((r.start.max(host) - host) / PAGE as u64).ok()?;
            let last = usize::try_from((r.end.min(end) - host) / PAGE as u64).ok()?;
            found.push(first..last.min(pages));
        }
        if arg.walk_end <= from {
            break;
        }
        from = arg.walk_end;
    }
    Some(Ok(found))
}

/// [`own_pages`] from each page's `/proc/self/pagemap` entry: present and not file-backed,
/// or swapped out.
fn read_entries(
    pagemap: &File,
    host: u64,
    pages: usize,
) -> Result<Vec<std::ops::Range<usize>>, DeltaError> {
    let mut found: Vec<std::ops::Range<usize>> = Vec::new();
    let mut entries = vec![0u8; PAGEMAP_BATCH * 8];
    let mut first = 0usize;
    while first < pages {
        let count = PAGEMAP_BATCH.min(pages - first);
        let buf = entries.get_mut(..count * 8).ok_or(DeltaError::Size)?;
        let at = (host / PAGE as u64 + first as u64) * 8;
        pagemap
            .read_exact_at(buf, at)
            .map_err(DeltaError::Pagemap)?;
        for (i, entry) in buf.chunks_exact(8).enumerate() {
            let bits = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            let present = bits & (1 << 63) != 0;
            let swapped = bits & (1 << 62) != 0;
            let file_page = bits & (1 << 61) != 0;
            if !((present && !file_page) || swapped) {
                continue;
            }
            let page = first + i;
            match found.last_mut() {
                Some(run) if run.end == page => run.end = page + 1,
                _ => found.push(page..page + 1),
            }
        }
        first += count;
    }
    Ok(found)
}

/// Writes the pages of `delta` into `mem`, each at its offset. Only the delta's data ranges
/// are read (`SEEK_DATA`/`SEEK_HOLE`). Returns the bytes written.
pub(crate) fn apply(mem: &GuestMemoryMmap, delta: &File) -> Result<u64, DeltaError> {
    let mem_bytes: u64 = mem.iter().map(|r| r.len()).sum();
    // Sized by the runs found (a handover's delta is often a few pages, or none: a large
    // buffer would be mapped and unmapped for nothing while the VM is frozen).
    let mut buf = Vec::new();
    let mut copied = 0u64;
    let mut at = 0u64;
    while at < mem_bytes {
        let Some(start) = seek(delta, at, nix::unistd::Whence::SeekData)? else {
            break;
        };
        let end = seek(delta, start, nix::unistd::Whence::SeekHole)?
            .unwrap_or(mem_bytes)
            .min(mem_bytes);
        let mut pos = start;
        while pos < end {
            let n = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(RUN_PAGES * PAGE);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let chunk = buf.get_mut(..n).ok_or(DeltaError::Size)?;
            delta.read_exact_at(chunk, pos).map_err(DeltaError::Io)?;
            let addr = guest_address(mem, pos).ok_or(DeltaError::Size)?;
            mem.write_slice(chunk, addr).map_err(|_| DeltaError::Size)?;
            pos += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    Ok(copied)
}

/// `lseek(fd, from, whence)` for `SEEK_DATA`/`SEEK_HOLE`: `None` past the last data.
fn seek(file: &File, from: u64, whence: nix::unistd::Whence) -> Result<Option<u64>, DeltaError> {
    let from = i64::try_from(from).map_err(|_| DeltaError::Size)?;
    match nix::unistd::lseek(file.as_raw_fd(), from, whence) {
        Ok(at) => Ok(u64::try_from(at).ok()),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(DeltaError::Io(e.into())),
    }
}

/// The guest address of byte `offset` of the memfd (RAM ranges are laid out in order).
fn guest_address(mem: &GuestMemoryMmap, offset: u64) -> Option<GuestAddress> {
    let mut base = 0u64;
    for region in mem.iter() {
        if offset < base + region.len() {
            return region.start_addr().checked_add(offset - base);
        }
        base += region.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::memory::GuestRam;

    fn held_bytes(file: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn the_scan_and_the_pagemap_entries_find_the_same_pages() {
        let template = GuestRam::new(8 << 20).unwrap();
        template.mem.write_obj(1u64, GuestAddress(0x2000)).unwrap();
        let clone = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        // Read only (the template's page), written (three in a row, one apart), and the last.
        assert_eq!(clone.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 1);
        for addr in [0x4000, 0x5000, 0x6000, 0x9000, 0x7f_f000] {
            clone.mem.write_obj(3u64, GuestAddress(addr)).unwrap();
        }
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let region = clone.mem.iter().next().unwrap();
        let pages = usize::try_from(region.len()).unwrap() / PAGE;
        let host = region.as_ptr() as u64;
        let read = read_entries(&pagemap, host, pages).unwrap();
        assert_eq!(read, vec![4..7, 9..10, 2047..2048]);
        // Linux 6.7 and later have the scan; older ones fall back to the entries.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release
            .split(['.', '-'])
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        match scan(&pagemap, host, pages) {
            Some(scanned) => assert_eq!(scanned.unwrap(), read),
            None => assert!(version < (6, 7), "Linux {release} has PAGEMAP_SCAN"),
        }
    }

    #[test]
    fn more_ranges_than_one_scan_returns_are_all_found() {
        let template = GuestRam::new(8 << 20).unwrap();
        let clone = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        // Every other page: as many separate ranges as pages written, over two batches.
        let written: Vec<usize> = (0..SCAN_BATCH * 2 + 10).map(|n| n * 2).collect();
        for &page in &written {
            let addr = GuestAddress((page * PAGE) as u64);
            clone.mem.write_obj(page as u64 + 1, addr).unwrap();
        }
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let region = clone.mem.iter().next().unwrap();
        let pages = usize::try_from(region.len()).unwrap() / PAGE;
        let host = region.as_ptr() as u64;
        let want: Vec<_> = written.iter().map(|&p| p..p + 1).collect();
        assert_eq!(read_entries(&pagemap, host, pages).unwrap(), want);
        if let Some(scanned) = scan(&pagemap, host, pages) {
            assert_eq!(scanned.unwrap(), want);
        }
    }

    #[test]
    fn a_copy_ahead_and_what_changed_since_rebuild_the_clone() {
        let template = GuestRam::new(8 << 20).unwrap();
        template.mem.write_obj(1u64, GuestAddress(0x2000)).unwrap();
        let clone = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        for (addr, value) in [(0x2000, 10u64), (0x3000, 11), (0x4000, 12)] {
            clone.mem.write_obj(value, GuestAddress(addr)).unwrap();
        }
        let base = Precopy::take(&clone.mem, false).unwrap();
        assert_eq!(held_bytes(&base.file), 3 * 4096);
        // Since: one page changed, one written back unchanged, one new.
        clone.mem.write_obj(21u64, GuestAddress(0x3000)).unwrap();
        clone.mem.write_obj(12u64, GuestAddress(0x4000)).unwrap();
        clone.mem.write_obj(22u64, GuestAddress(0x8000)).unwrap();
        let delta = capture_since(&clone.mem, &base, None).unwrap();
        assert_eq!(
            held_bytes(&delta),
            2 * 4096,
            "the changed page and the new one"
        );

        let rebuilt = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        assert_eq!(apply(&rebuilt.mem, &base.file).unwrap(), 3 * 4096);
        assert_eq!(apply(&rebuilt.mem, &delta).unwrap(), 2 * 4096);
        for (addr, value) in [
            (0x2000, 10u64),
            (0x3000, 21),
            (0x4000, 12),
            (0x8000, 22),
            (0x9000, 0),
        ] {
            let got = rebuilt.mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
            assert_eq!(got, value, "at {addr:#x}");
        }
        assert_eq!(
            template.mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(),
            1
        );
    }

    #[test]
    fn runs_of_pages_longer_than_one_write_are_copied_whole() {
        let template = GuestRam::new(8 << 20).unwrap();
        let clone = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        let pages = RUN_PAGES * 2 + 3;
        for n in 0..pages {
            let addr = GuestAddress((0x10_0000 + n * PAGE) as u64);
            clone.mem.write_obj(n as u64 + 1, addr).unwrap();
        }
        let delta = capture_delta(&clone.mem).unwrap();
        assert_eq!(held_bytes(&delta), (pages * PAGE) as u64);
        let rebuilt = GuestRam::copy_on_write(&template.file, 8 << 20).unwrap();
        apply(&rebuilt.mem, &delta).unwrap();
        for n in 0..pages {
            let addr = GuestAddress((0x10_0000 + n * PAGE) as u64);
            assert_eq!(rebuilt.mem.read_obj::<u64>(addr).unwrap(), n as u64 + 1);
        }
    }
}
