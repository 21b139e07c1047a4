// SPDX-License-Identifier: Apache-2.0
//! Descriptor chains flattened into guest memory segments (virtio 1.2 §2.7.4, §2.7.5).
//!
//! The block and net devices never assume a particular framing of their messages (§2.7.4
//! "Message Framing"): a chain is gathered once into a device-readable and a device-writable list
//! of segments, each checked against guest memory, and the devices then address bytes by their
//! logical offset inside those lists. Reading the descriptors happens exactly once, here, so a
//! guest that rewrites its descriptor table while the device works cannot change what was
//! validated (TOCTOU).
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

/// One guest buffer: a descriptor's address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a descriptor chain cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain has more descriptors than the device accepts.
    #[error("Descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    /// A device-readable descriptor follows a device-writable one (§2.7.4.2).
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("Descriptor at {addr:#x} with length {len:#x} is outside guest memory")]
    OutOfRange {
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// The buffers of the chain add up to more than 4 GiB (§2.7.5.2 forbids it).
    #[error("Descriptor chain is longer than 4 GiB")]
    TooLong,
    /// An access past the end of the chain's buffers.
    #[error("Access of {len} bytes at offset {offset} is past the end of the buffers")]
    Short {
        /// Logical offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// Guest memory could not be accessed.
    #[error("Guest memory access failed")]
    Memory(#[source] GuestMemoryError),
}

/// A descriptor chain gathered into readable and writable segment lists.
#[derive(Clone, Debug, Default)]
pub struct ChainBuffers {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u32,
    writable_len: u32,
    /// The first segment found outside guest memory, if any (kept so that the caller can still
    /// complete the request through a valid status byte).
    invalid: Option<Segment>,
}

impl ChainBuffers {
    /// Gathers `chain` (consuming its descriptors). Fails on more than `max_descs` descriptors or
    /// on a readable descriptor after a writable one; segments outside guest memory are recorded
    /// and reported by [`ChainBuffers::check_in_memory`].
    ///
    /// The descriptor iterator of `virtio-queue` ends the chain on a broken `next` index, on a
    /// descriptor it cannot read, on loops (its TTL is the table size) and when the chain would
    /// exceed 4 GiB; such a chain arrives here shortened.
    pub fn collect(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        max_descs: usize,
    ) -> Result<Self, ChainError> {
        let mut bufs = ChainBuffers::default();
        let mut seen_writable = false;
        for (count, desc) in chain.enumerate() {
            if count >= max_descs {
                return Err(ChainError::TooManyDescriptors(max_descs));
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                seen_writable = true;
                bufs.writable_len = bufs
                    .writable_len
                    .checked_add(seg.len)
                    .ok_or(ChainError::TooLong)?;
                if seg.len != 0 {
                    bufs.writable.push(seg);
                }
            } else {
                if seen_writable {
                    return Err(ChainError::ReadableAfterWritable);
                }
                bufs.readable_len = bufs
                    .readable_len
                    .checked_add(seg.len)
                    .ok_or(ChainError::TooLong)?;
                if seg.len != 0 {
                    bufs.readable.push(seg);
                }
            }
            if bufs.invalid.is_none() && seg.len != 0 && !in_memory(mem, seg) {
                bufs.invalid = Some(seg);
            }
        }
        Ok(bufs)
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Fails if any segment lies outside guest memory.
    pub fn check_in_memory(&self) -> Result<(), ChainError> {
        match self.invalid {
            Some(seg) => Err(ChainError::OutOfRange {
                addr: seg.addr.0,
                len: seg.len,
            }),
            None => Ok(()),
        }
    }

    /// Guest address of the last writable byte, when it lies in guest memory. Block requests
    /// keep their status byte there (virtio 1.2 §5.2.6).
    pub fn last_writable_byte(&self, mem: &GuestMemoryMmap) -> Option<GuestAddress> {
        let last = self.writable.last()?;
        let addr = last.addr.checked_add(u64::from(last.len.checked_sub(1)?))?;
        mem.check_range(addr, 1).then_some(addr)
    }

    /// Copies readable bytes starting at logical `offset` into `buf`.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        for_each_range(&self.readable, offset, buf.len() as u64, |addr, len| {
            let end = done.checked_add(len).ok_or(ChainError::TooLong)?;
            let dst = buf.get_mut(done..end).ok_or(ChainError::TooLong)?;
            read_guest(mem, dst, addr).map_err(ChainError::Memory)?;
            done = end;
            Ok(())
        })
    }

    /// Copies `buf` into the writable bytes starting at logical `offset`.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        for_each_range(&self.writable, offset, buf.len() as u64, |addr, len| {
            let end = done.checked_add(len).ok_or(ChainError::TooLong)?;
            let src = buf.get(done..end).ok_or(ChainError::TooLong)?;
            write_guest(mem, src, addr).map_err(ChainError::Memory)?;
            done = end;
            Ok(())
        })
    }

    /// Calls `f` with the guest ranges that make up readable bytes `[offset, offset + len)`.
    pub fn for_each_readable<E, F>(&self, offset: u64, len: u64, f: F) -> Result<(), E>
    where
        E: From<ChainError>,
        F: FnMut(GuestAddress, usize) -> Result<(), E>,
    {
        for_each_range(&self.readable, offset, len, f)
    }

    /// Calls `f` with the guest ranges that make up writable bytes `[offset, offset + len)`.
    pub fn for_each_writable<E, F>(&self, offset: u64, len: u64, f: F) -> Result<(), E>
    where
        E: From<ChainError>,
        F: FnMut(GuestAddress, usize) -> Result<(), E>,
    {
        for_each_range(&self.writable, offset, len, f)
    }
}

/// Whether a segment lies entirely inside guest memory.
fn in_memory(mem: &GuestMemoryMmap, seg: Segment) -> bool {
    // Fast path: the segment lies in one region (the common case; the generic check walks
    // vm-memory's slice iterator, which costs hundreds of instructions per call).
    if in_one_region(mem, seg.addr, u64::from(seg.len)).is_some() {
        return true;
    }
    usize::try_from(seg.len).is_ok_and(|len| mem.check_range(seg.addr, len))
}

/// The region holding all of `[addr, addr + len)` and the offset of `addr` in it.
fn in_one_region(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Option<(&GuestRegionMmap, MemoryRegionAddress)> {
    let region = mem.find_region(addr)?;
    let offset = addr.0.checked_sub(region.start_addr().0)?;
    (offset.checked_add(len)? <= region.len()).then_some((region, MemoryRegionAddress(offset)))
}

/// Reads `buf` from guest memory at `addr`, through the region directly when it fits in one.
pub fn read_guest(
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    addr: GuestAddress,
) -> Result<(), GuestMemoryError> {
    match in_one_region(mem, addr, buf.len() as u64) {
        Some((region, offset)) => region.read_slice(buf, offset),
        None => mem.read_slice(buf, addr),
    }
}

/// Writes `buf` to guest memory at `addr`, through the region directly when it fits in one.
pub fn write_guest(
    mem: &GuestMemoryMmap,
    buf: &[u8],
    addr: GuestAddress,
) -> Result<(), GuestMemoryError> {
    match in_one_region(mem, addr, buf.len() as u64) {
        Some((region, offset)) => region.write_slice(buf, offset),
        None => mem.write_slice(buf, addr),
    }
}

/// Walks the logical byte range `[offset, offset + len)` over `segs`, calling `f` with each
/// contiguous guest piece. Fails without calling `f` if the range is not fully covered.
fn for_each_range<E, F>(segs: &[Segment], offset: u64, len: u64, mut f: F) -> Result<(), E>
where
    E: From<ChainError>,
    F: FnMut(GuestAddress, usize) -> Result<(), E>,
{
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    let end = offset.checked_add(len).ok_or(ChainError::TooLong)?;
    if end > total {
        return Err(ChainError::Short { offset, len }.into());
    }
    let mut skip = offset;
    let mut left = len;
    for seg in segs {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip = skip.saturating_sub(seg_len);
            continue;
        }
        let n = left.min(seg_len.saturating_sub(skip));
        let addr = seg.addr.checked_add(skip).ok_or(ChainError::TooLong)?;
        let n_usize = usize::try_from(n).map_err(|_| ChainError::TooLong)?;
        f(addr, n_usize)?;
        left = left.saturating_sub(n);
        skip = 0;
    }
    Ok(())
}

/// Pops the next available chain; an error means the driver corrupted the available ring.
pub(crate) fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    let mut iter = queue.iter(mem)?;
    Ok(iter.next())
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "test code on known values"
)]
mod tests {
    use virtio_queue::QueueT;

    use super::*;
    use crate::test_utils::{TestQueue, single_region_mem};

    const MEM: usize = 0x10_0000;

    fn gather(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
        max: usize,
    ) -> Result<ChainBuffers, ChainError> {
        let q = TestQueue::new(mem, GuestAddress(0), 16);
        q.add_chain(descs);
        let mut queue = q.queue();
        let chain = pop_chain(&mut queue, mem).unwrap().unwrap();
        ChainBuffers::collect(chain, mem, max)
    }

    #[test]
    fn gathers_and_addresses_by_logical_offset() {
        let m = single_region_mem(MEM);
        m.write_slice(&[1, 2, 3], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[4, 5], GuestAddress(0x2000)).unwrap();
        let b = gather(
            &m,
            &[
                (0x1000, 3, false),
                (0x3000, 0, false),
                (0x2000, 2, false),
                (0x4000, 4, true),
                (0x5000, 2, true),
            ],
            16,
        )
        .unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (5, 6));
        b.check_in_memory().unwrap();
        let mut all = [0u8; 5];
        b.read_at(&m, 0, &mut all).unwrap();
        assert_eq!(all, [1, 2, 3, 4, 5]);
        let mut mid = [0u8; 2];
        b.read_at(&m, 2, &mut mid).unwrap();
        assert_eq!(mid, [3, 4]);
        assert!(matches!(
            b.read_at(&m, 4, &mut mid),
            Err(ChainError::Short { offset: 4, len: 2 })
        ));
        b.write_at(&m, 3, &[9, 8, 7]).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x4003)).unwrap(), 9);
        assert_eq!(
            m.read_obj::<u16>(GuestAddress(0x5000)).unwrap(),
            u16::from_le_bytes([8, 7])
        );
        assert!(b.write_at(&m, 5, &[1, 2]).is_err());
        assert_eq!(b.last_writable_byte(&m), Some(GuestAddress(0x5001)));
        let mut pieces = Vec::new();
        b.for_each_writable(2, 3, |a, n| -> Result<(), ChainError> {
            pieces.push((a.0, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(pieces, vec![(0x4002, 2), (0x5000, 1)]);
        // Offsets that overflow are errors, not panics.
        assert!(
            b.for_each_readable(u64::MAX, 2, |_, _| -> Result<(), ChainError> { Ok(()) })
                .is_err()
        );
    }

    #[test]
    fn rejects_order_and_count_violations() {
        let m = single_region_mem(MEM);
        assert!(matches!(
            gather(&m, &[(0x1000, 4, true), (0x2000, 4, false)], 16),
            Err(ChainError::ReadableAfterWritable)
        ));
        // A zero-length writable descriptor still counts as "writable seen".
        assert!(matches!(
            gather(&m, &[(0x1000, 0, true), (0x2000, 4, false)], 16),
            Err(ChainError::ReadableAfterWritable)
        ));
        assert!(matches!(
            gather(
                &m,
                &[(0x1000, 4, false), (0x2000, 4, false), (0x3000, 4, true)],
                2
            ),
            Err(ChainError::TooManyDescriptors(2))
        ));
    }

    #[test]
    fn records_out_of_range_segments() {
        let m = single_region_mem(MEM);
        let b = gather(&m, &[(MEM as u64 - 2, 4, false), (0x1000, 1, true)], 16).unwrap();
        assert!(matches!(
            b.check_in_memory(),
            Err(ChainError::OutOfRange { .. })
        ));
        assert_eq!(b.last_writable_byte(&m), Some(GuestAddress(0x1000)));
        let b = gather(&m, &[(0x1000, 4, false), (u64::MAX - 1, 4, true)], 16).unwrap();
        assert!(b.check_in_memory().is_err());
        assert_eq!(b.last_writable_byte(&m), None);
    }

    #[test]
    fn pop_reports_corrupt_avail_index() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        let mut queue = q.queue();
        assert!(pop_chain(&mut queue, &m).unwrap().is_none());
        q.set_avail_idx(17);
        pop_chain(&mut queue, &m).unwrap_err();
        queue.set_ready(false);
        pop_chain(&mut queue, &m).unwrap_err();
    }
}
