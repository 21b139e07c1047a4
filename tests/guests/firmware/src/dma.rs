// SPDX-License-Identifier: Apache-2.0
//! Memory shared with devices: a bump allocator over the free RAM right after the guest image.
//!
//! The guest runs identity mapped, so a buffer's address is both what the CPU uses and what a
//! device is given. Nothing is ever freed: a test guest sets its devices up once. Buffers are
//! not zeroed on allocation (every instruction counts on the project's nested `kvm_pvm` host);
//! virtqueue rings zero themselves.

use crate::boot::{E820_RAM, MemMap, image_end};
use crate::phys::MAPPED_END;

/// Page size, the alignment of every region handed out by [`Arena::pages`].
pub const PAGE: u64 = 4096;
/// [`PAGE`] as a length.
pub const PAGE_LEN: usize = 4096;

/// A bump allocator over one range of free RAM.
#[derive(Debug)]
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    /// The RAM from the first page after the guest image, at most `max` bytes of it, within the
    /// memory-map RAM region holding that page; `None` without such a region.
    pub fn after_image(memmap: &MemMap, max: u64) -> Option<Self> {
        let start = image_end().checked_next_multiple_of(PAGE)?;
        let region = memmap
            .iter()
            .find(|r| r.kind == E820_RAM && r.addr <= start && start < r.end())?;
        let end = region.end().min(start.checked_add(max)?).min(MAPPED_END);
        (end > start).then_some(Self { next: start, end })
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.next)
    }

    /// A buffer of `len` bytes aligned to `align` (a power of two), or `None` when the arena is
    /// exhausted.
    pub fn alloc(&mut self, len: usize, align: u64) -> Option<DmaBuf> {
        if !align.is_power_of_two() || len == 0 {
            return None;
        }
        let addr = self.next.checked_next_multiple_of(align)?;
        let end = addr.checked_add(u64::try_from(len).ok()?)?;
        if end > self.end {
            return None;
        }
        let ptr = usize::try_from(addr).ok()?;
        self.next = end;
        Some(DmaBuf { addr, ptr, len })
    }

    /// `count` whole pages, page aligned.
    pub fn pages(&mut self, count: usize) -> Option<DmaBuf> {
        self.alloc(count.checked_mul(PAGE_LEN)?, PAGE)
    }
}

/// A buffer owned by the driver and lent to devices: the arena never hands the same bytes out
/// twice and a `DmaBuf` cannot be cloned, so the driver's accesses through it are exclusive.
/// Drivers only look at a buffer while no device owns it (before posting it, or after the
/// device returned it through the used ring).
#[derive(Debug)]
pub struct DmaBuf {
    addr: u64,
    /// `addr` as a pointer-sized integer.
    ptr: usize,
    len: usize,
}

impl DmaBuf {
    /// Physical (= virtual) address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: the arena refuses empty buffers).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of byte `offset`, or `None` past the end.
    pub fn addr_at(&self, offset: usize) -> Option<u64> {
        if offset > self.len {
            return None;
        }
        self.addr.checked_add(u64::try_from(offset).ok()?)
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        let p = core::ptr::with_exposed_provenance::<u8>(self.ptr);
        // SAFETY: `addr..addr + len` is RAM inside the identity map, after the guest image and
        // handed out once by the arena (see `Arena::alloc`), so it is valid, initialised (RAM
        // holds some bytes, any byte is a valid `u8`) and aliased by no Rust reference but the
        // ones made from this `DmaBuf`, whose borrow rules cover them. Devices only write it
        // while they own it, and the driver does not look at it then (type docs).
        unsafe { core::slice::from_raw_parts(p, self.len) }
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let p = core::ptr::with_exposed_provenance_mut::<u8>(self.ptr);
        // SAFETY: as for `bytes`; `&mut self` makes this the only live reference.
        unsafe { core::slice::from_raw_parts_mut(p, self.len) }
    }

    /// Fills the buffer with zeros.
    pub fn zero(&mut self) {
        self.bytes_mut().fill(0);
    }
}
