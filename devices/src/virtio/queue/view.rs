// SPDX-License-Identifier: Apache-2.0
//! The guest-memory view every queue access goes through: ring entries, descriptors and the
//! buffers they point to (virtio 1.2 §2.7).
//!
//! Almost all of a small VM's memory is one region. [`GuestView`] keeps that region's mapping at
//! hand and serves accesses inside it with a plain bounds check; everything else (other regions,
//! accesses spanning regions, addresses outside guest memory) goes through vm-memory's generic
//! lookup, so results and errors are always those of [`GuestMemoryMmap`].
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::mem::size_of;
use std::sync::atomic::Ordering;

use vm_memory::{
    AtomicAccess, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, VolatileMemory,
};

use crate::{GuestMemoryMmap, GuestSlice};

/// Guest memory with the mapping of its first region at hand.
///
/// Every access first tries that one mapping with a plain bounds check, and falls back to
/// vm-memory's generic lookup (region search, accesses spanning regions) otherwise, so results
/// and errors are those of [`GuestMemoryMmap`]; only the common case is cheaper. It is built per
/// queue pass (it borrows the memory), never stored.
#[derive(Clone, Copy, Debug)]
pub struct GuestView<'a> {
    mem: &'a GuestMemoryMmap,
    /// Guest address of the first byte of `fast`.
    start: u64,
    /// Length of `fast` (0 without one).
    fast_len: u64,
    /// The first region's mapping.
    fast: Option<GuestSlice<'a>>,
}

impl<'a> GuestView<'a> {
    /// A view of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let first = mem.iter().next();
        let fast = first.and_then(|r| r.as_volatile_slice().ok());
        GuestView {
            mem,
            start: first.map_or(0, |r| r.start_addr().0),
            fast_len: fast.map_or(0, |f| f.len() as u64),
            fast,
        }
    }

    /// The memory behind the view.
    pub fn memory(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// The offset of `[addr, addr + len)` in the first region, if it lies there.
    #[inline(always)]
    fn fast_offset(&self, addr: GuestAddress, len: usize) -> Option<usize> {
        let offset = addr.0.checked_sub(self.start)?;
        let end = offset.checked_add(len as u64)?;
        if end > self.fast_len {
            return None;
        }
        usize::try_from(offset).ok()
    }

    /// `[addr, addr + len)` in the first region, if it lies there.
    #[inline]
    fn fast_slice(&self, addr: GuestAddress, len: usize) -> Option<GuestSlice<'a>> {
        let offset = self.fast_offset(addr, len)?;
        self.fast?.subslice(offset, len).ok()
    }

    /// The mapping of `[addr, addr + len)`; fails if the range is not inside one region.
    #[inline]
    pub fn slice(
        &self,
        addr: GuestAddress,
        len: usize,
    ) -> Result<GuestSlice<'a>, GuestMemoryError> {
        match self.fast_slice(addr, len) {
            Some(s) => Ok(s),
            None => self.mem.get_slice(addr, len),
        }
    }

    /// Calls `f` with the mappings that together make up `[addr, addr + len)` (one, unless the
    /// range spans regions). Fails, possibly after some calls, if part of it is not guest memory.
    #[inline]
    pub fn for_each_slice<E, F>(&self, addr: GuestAddress, len: usize, mut f: F) -> Result<(), E>
    where
        E: From<GuestMemoryError>,
        F: FnMut(GuestSlice<'a>) -> Result<(), E>,
    {
        if let Some(s) = self.fast_slice(addr, len) {
            return f(s);
        }
        for s in self.mem.get_slices(addr, len) {
            f(s?)?;
        }
        Ok(())
    }

    /// Whether `[addr, addr + len)` is guest memory.
    #[inline]
    pub fn check_range(&self, addr: GuestAddress, len: usize) -> bool {
        self.fast_offset(addr, len).is_some() || self.mem.check_range(addr, len)
    }

    /// Fills `buf` from guest memory at `addr`.
    #[inline]
    pub fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<(), GuestMemoryError> {
        match self.fast_slice(addr, buf.len()) {
            Some(s) => {
                s.copy_to(buf);
                Ok(())
            }
            None => self.mem.read_slice(buf, addr),
        }
    }

    /// Writes `buf` to guest memory at `addr`.
    #[inline]
    pub fn write_slice(&self, buf: &[u8], addr: GuestAddress) -> Result<(), GuestMemoryError> {
        match self.fast_slice(addr, buf.len()) {
            Some(s) => {
                s.copy_from(buf);
                Ok(())
            }
            None => self.mem.write_slice(buf, addr),
        }
    }

    /// Reads a `T` at `addr` (any alignment).
    #[inline]
    pub fn read_obj<T: ByteValued>(&self, addr: GuestAddress) -> Result<T, GuestMemoryError> {
        if let (Some(offset), Some(fast)) = (self.fast_offset(addr, size_of::<T>()), &self.fast) {
            return Ok(fast.get_ref::<T>(offset)?.load());
        }
        self.mem.read_obj(addr)
    }

    /// Writes a `T` at `addr` (any alignment).
    #[inline]
    pub fn write_obj<T: ByteValued>(
        &self,
        val: T,
        addr: GuestAddress,
    ) -> Result<(), GuestMemoryError> {
        if let (Some(offset), Some(fast)) = (self.fast_offset(addr, size_of::<T>()), &self.fast) {
            fast.get_ref::<T>(offset)?.store(val);
            return Ok(());
        }
        self.mem.write_obj(val, addr)
    }

    /// Atomically loads a naturally aligned `T` at `addr`.
    #[inline]
    pub fn load<T: AtomicAccess>(
        &self,
        addr: GuestAddress,
        order: Ordering,
    ) -> Result<T, GuestMemoryError> {
        match self.fast_slice(addr, size_of::<T>()) {
            Some(s) => Ok(s.load(0, order)?),
            None => self.mem.load(addr, order),
        }
    }

    /// Atomically stores a naturally aligned `T` at `addr`.
    #[inline]
    pub fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: GuestAddress,
        order: Ordering,
    ) -> Result<(), GuestMemoryError> {
        match self.fast_slice(addr, size_of::<T>()) {
            Some(s) => Ok(s.store(val, 0, order)?),
            None => self.mem.store(val, addr, order),
        }
    }
}
