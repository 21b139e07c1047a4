// SPDX-License-Identifier: Apache-2.0
//! Descriptor chains flattened into guest memory segments (virtio 1.2 §2.7.4, §2.7.5).
//!
//! No device assumes a particular framing of its messages (§2.7.4 "Message Framing"): a chain
//! is gathered once into a device-readable and a device-writable list of segments, each checked
//! against guest memory, and the devices then address bytes by their logical offset inside
//! those lists. Reading the descriptors happens exactly once, here, so a guest that rewrites its
//! descriptor table while the device works cannot change what was validated (TOCTOU).
//!
//! A chain is gathered by [`ChainBuffers::walk`], this module's own walk of the split descriptor
//! table (§2.7.5) with the exact semantics of `virtio-queue`'s descriptor iterator (the same
//! TTL, indirect table checks and 4 GiB cut-off), but reading through a [`GuestView`] and
//! storing up to [`INLINE_SEGMENTS`] segments without a heap allocation. That iterator remains
//! the reference (`ChainBuffers::collect` in `reference`, feature `test-utils`): both gatherers
//! end in the same checks, the unit tests and the `queue` fuzz target check they agree.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::mem::size_of;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_ALIGN_SIZE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryError};

use super::view::GuestView;
use crate::GuestMemoryMmap;

/// One guest buffer: a descriptor's address and length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

/// Segments a chain keeps without a heap allocation: a block request (header, data, status)
/// or a net frame fits many times over.
pub const INLINE_SEGMENTS: usize = 8;

/// A list of segments stored inline up to [`INLINE_SEGMENTS`], on the heap beyond.
#[derive(Clone, Debug)]
enum Segments {
    Inline {
        len: usize,
        segs: [Segment; INLINE_SEGMENTS],
    },
    Heap(Vec<Segment>),
}

impl Default for Segments {
    fn default() -> Self {
        Segments::Inline {
            len: 0,
            segs: [Segment::default(); INLINE_SEGMENTS],
        }
    }
}

impl Segments {
    #[inline]
    fn push(&mut self, seg: Segment) {
        match self {
            Segments::Inline { len, segs } => {
                if let Some(slot) = segs.get_mut(*len) {
                    *slot = seg;
                    *len = len.saturating_add(1);
                } else {
                    let mut v = Vec::with_capacity(INLINE_SEGMENTS.saturating_mul(2));
                    v.extend_from_slice(segs);
                    v.push(seg);
                    *self = Segments::Heap(v);
                }
            }
            Segments::Heap(v) => v.push(seg),
        }
    }

    #[inline]
    fn clear(&mut self) {
        match self {
            Segments::Inline { len, .. } => *len = 0,
            Segments::Heap(v) => v.clear(),
        }
    }

    #[inline]
    fn as_slice(&self) -> &[Segment] {
        match self {
            Segments::Inline { len, segs } => segs.get(..*len).unwrap_or(&[]),
            Segments::Heap(v) => v,
        }
    }
}

/// A descriptor chain gathered into readable and writable segment lists.
#[derive(Clone, Debug, Default)]
pub struct ChainBuffers {
    /// Non-empty segments in chain order: the readable ones, then the writable ones.
    segs: Segments,
    /// How many of `segs` are readable.
    readable_count: usize,
    readable_len: u32,
    writable_len: u32,
    /// The first readable and the first writable segment found outside guest memory, if any
    /// (kept so that the caller can still complete the request through a valid status byte, and
    /// so that a device that uses one direction only checks that one).
    invalid_readable: Option<Segment>,
    invalid_writable: Option<Segment>,
}

/// Accumulates descriptors into [`ChainBuffers`], applying the checks both gatherers share.
pub(super) struct Gather<'b, 'v, 'a> {
    view: &'v GuestView<'a>,
    bufs: &'b mut ChainBuffers,
    count: usize,
    max_descs: usize,
    seen_writable: bool,
}

impl<'b, 'v, 'a> Gather<'b, 'v, 'a> {
    /// Starts gathering into `bufs`, emptied first.
    #[inline]
    pub(super) fn new(
        view: &'v GuestView<'a>,
        bufs: &'b mut ChainBuffers,
        max_descs: usize,
    ) -> Self {
        bufs.clear();
        Gather {
            view,
            bufs,
            count: 0,
            max_descs,
            seen_writable: false,
        }
    }

    #[inline]
    pub(super) fn push(
        &mut self,
        addr: GuestAddress,
        len: u32,
        write_only: bool,
    ) -> Result<(), ChainError> {
        if self.count >= self.max_descs {
            return Err(ChainError::TooManyDescriptors(self.max_descs));
        }
        self.count = self.count.saturating_add(1);
        let bufs = &mut *self.bufs;
        if write_only {
            self.seen_writable = true;
            bufs.writable_len = bufs
                .writable_len
                .checked_add(len)
                .ok_or(ChainError::TooLong)?;
        } else {
            if self.seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            bufs.readable_len = bufs
                .readable_len
                .checked_add(len)
                .ok_or(ChainError::TooLong)?;
        }
        if len != 0 {
            let seg = Segment { addr, len };
            bufs.segs.push(seg);
            let invalid = if write_only {
                &mut bufs.invalid_writable
            } else {
                bufs.readable_count = bufs.readable_count.saturating_add(1);
                &mut bufs.invalid_readable
            };
            if invalid.is_none() && !self.view.check_range(addr, len as usize) {
                *invalid = Some(seg);
            }
        }
        Ok(())
    }
}

/// Size of one split-ring descriptor (§2.7.5).
const DESC_SIZE: u64 = size_of::<Descriptor>() as u64;

impl ChainBuffers {
    /// Walks the chain starting at descriptor `head` of the split descriptor table at
    /// `desc_table` (`queue_size` entries) and gathers it like the reference gatherer
    /// (`ChainBuffers::collect`) does a `virtio-queue` `DescriptorChain` of the same head.
    ///
    /// The walk follows that iterator rule for rule, so a hostile chain ends the same way: it
    /// stops (the chain arrives shortened at the checks) on a head or `next` index outside the
    /// table, on a descriptor that cannot be read, when the TTL (the table size: at most that
    /// many `NEXT` links) runs out, when the bytes would pass 4 GiB, and on a bad indirect
    /// descriptor (§2.7.5.3.1: nested, or a table length that is not a multiple of 16 or has
    /// more than 65535 entries).
    pub fn walk(
        view: &GuestView<'_>,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
        max_descs: usize,
    ) -> Result<Self, ChainError> {
        let mut bufs = ChainBuffers::default();
        bufs.walk_into(view, desc_table, queue_size, head, max_descs)?;
        Ok(bufs)
    }

    /// [`ChainBuffers::walk`] into `self` (emptied first), reusing its storage: the device
    /// hot path keeps one and gathers every request into it.
    #[inline]
    pub fn walk_into(
        &mut self,
        view: &GuestView<'_>,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
        max_descs: usize,
    ) -> Result<(), ChainError> {
        let mut g = Gather::new(view, self, max_descs);
        let mut table = desc_table;
        let mut size = queue_size;
        let mut next = head;
        let mut ttl = queue_size;
        let mut indirect = false;
        let mut yielded = 0u32;
        loop {
            if ttl == 0 || next >= size {
                break;
            }
            let Some(addr) = table.0.checked_add(u64::from(next) * DESC_SIZE) else {
                break;
            };
            let Ok(desc) = view.read_obj::<Descriptor>(GuestAddress(addr)) else {
                break;
            };
            if desc.refers_to_indirect_table() {
                let len = desc.len();
                if indirect || len & (VRING_DESC_ALIGN_SIZE - 1) != 0 {
                    break;
                }
                let Ok(entries) = u16::try_from(len / VRING_DESC_ALIGN_SIZE) else {
                    break;
                };
                table = desc.addr();
                size = entries;
                next = 0;
                ttl = entries;
                indirect = true;
                continue;
            }
            let len = desc.len();
            let Some(total) = yielded.checked_add(len) else {
                break;
            };
            yielded = total;
            if desc.has_next() {
                next = desc.next();
                ttl = ttl.saturating_sub(1);
            } else {
                ttl = 0;
            }
            g.push(desc.addr(), len, desc.is_write_only())?;
        }
        Ok(())
    }

    /// Empties the lists, keeping any heap storage for the next chain.
    #[inline]
    fn clear(&mut self) {
        self.segs.clear();
        self.readable_count = 0;
        self.readable_len = 0;
        self.writable_len = 0;
        self.invalid_readable = None;
        self.invalid_writable = None;
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// The non-empty readable segments, in chain order.
    pub fn readable(&self) -> &[Segment] {
        self.segs
            .as_slice()
            .get(..self.readable_count)
            .unwrap_or(&[])
    }

    /// The non-empty writable segments, in chain order.
    pub fn writable(&self) -> &[Segment] {
        self.segs
            .as_slice()
            .get(self.readable_count..)
            .unwrap_or(&[])
    }

    /// Fails if any segment lies outside guest memory (the first such segment: readable ones
    /// come first).
    #[inline]
    pub fn check_in_memory(&self) -> Result<(), ChainError> {
        out_of_range(self.invalid_readable.or(self.invalid_writable))
    }

    /// Fails if a readable segment lies outside guest memory: for a device that only reads the
    /// chain and ignores its writable part.
    #[inline]
    pub fn check_readable_in_memory(&self) -> Result<(), ChainError> {
        out_of_range(self.invalid_readable)
    }

    /// Fails if a writable segment lies outside guest memory: for a device that only writes the
    /// chain and ignores its readable part.
    #[inline]
    pub fn check_writable_in_memory(&self) -> Result<(), ChainError> {
        out_of_range(self.invalid_writable)
    }

    /// Guest address of the last writable byte, when it lies in guest memory. Block requests
    /// keep their status byte there (virtio 1.2 §5.2.6).
    pub fn last_writable_byte(&self, mem: &GuestMemoryMmap) -> Option<GuestAddress> {
        self.last_writable_byte_in(&GuestView::new(mem))
    }

    /// [`ChainBuffers::last_writable_byte`] through a [`GuestView`].
    #[inline]
    pub fn last_writable_byte_in(&self, view: &GuestView<'_>) -> Option<GuestAddress> {
        let last = self.writable().last()?;
        let addr = GuestAddress(
            last.addr
                .0
                .checked_add(u64::from(last.len.checked_sub(1)?))?,
        );
        // With no writable segment outside memory recorded, the last one is known to be in
        // memory.
        (self.invalid_writable.is_none() || view.check_range(addr, 1)).then_some(addr)
    }

    /// Copies readable bytes starting at logical `offset` into `buf`.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        self.read_at_in(&GuestView::new(mem), offset, buf)
    }

    /// [`ChainBuffers::read_at`] through a [`GuestView`].
    #[inline]
    pub fn read_at_in(
        &self,
        view: &GuestView<'_>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        let len = buf.len() as u64;
        for_each_range(
            self.readable(),
            self.readable_len,
            offset,
            len,
            |addr, len| {
                let end = done.checked_add(len).ok_or(ChainError::TooLong)?;
                let dst = buf.get_mut(done..end).ok_or(ChainError::TooLong)?;
                view.read_slice(dst, addr).map_err(ChainError::Memory)?;
                done = end;
                Ok(())
            },
        )
    }

    /// Copies `buf` into the writable bytes starting at logical `offset`.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        self.write_at_in(&GuestView::new(mem), offset, buf)
    }

    /// [`ChainBuffers::write_at`] through a [`GuestView`].
    pub fn write_at_in(
        &self,
        view: &GuestView<'_>,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        let len = buf.len() as u64;
        for_each_range(
            self.writable(),
            self.writable_len,
            offset,
            len,
            |addr, len| {
                let end = done.checked_add(len).ok_or(ChainError::TooLong)?;
                let src = buf.get(done..end).ok_or(ChainError::TooLong)?;
                view.write_slice(src, addr).map_err(ChainError::Memory)?;
                done = end;
                Ok(())
            },
        )
    }

    /// Calls `f` with the guest ranges that make up readable bytes `[offset, offset + len)`.
    #[inline]
    pub fn for_each_readable<E, F>(&self, offset: u64, len: u64, f: F) -> Result<(), E>
    where
        E: From<ChainError>,
        F: FnMut(GuestAddress, usize) -> Result<(), E>,
    {
        for_each_range(self.readable(), self.readable_len, offset, len, f)
    }

    /// Calls `f` with the guest ranges that make up writable bytes `[offset, offset + len)`.
    #[inline]
    pub fn for_each_writable<E, F>(&self, offset: u64, len: u64, f: F) -> Result<(), E>
    where
        E: From<ChainError>,
        F: FnMut(GuestAddress, usize) -> Result<(), E>,
    {
        for_each_range(self.writable(), self.writable_len, offset, len, f)
    }
}

/// `OutOfRange` for `invalid`, if any.
#[inline]
fn out_of_range(invalid: Option<Segment>) -> Result<(), ChainError> {
    match invalid {
        Some(seg) => Err(ChainError::OutOfRange {
            addr: seg.addr.0,
            len: seg.len,
        }),
        None => Ok(()),
    }
}

/// Walks the logical byte range `[offset, offset + len)` over `segs` (of `total` bytes), calling
/// `f` with each contiguous guest piece. Fails without calling `f` if the range is not fully
/// covered.
#[inline]
fn for_each_range<E, F>(
    segs: &[Segment],
    total: u32,
    offset: u64,
    len: u64,
    mut f: F,
) -> Result<(), E>
where
    E: From<ChainError>,
    F: FnMut(GuestAddress, usize) -> Result<(), E>,
{
    let end = offset.checked_add(len).ok_or(ChainError::TooLong)?;
    if end > u64::from(total) {
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
        let addr = seg.addr.0.checked_add(skip).ok_or(ChainError::TooLong)?;
        let n_usize = usize::try_from(n).map_err(|_| ChainError::TooLong)?;
        f(GuestAddress(addr), n_usize)?;
        left = left.saturating_sub(n);
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    reason = "test code on known values"
)]
mod tests {
    use proptest::prelude::*;
    use std::sync::atomic::Ordering;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    use virtio_queue::QueueT;
    use vm_memory::Bytes;

    use super::*;
    use crate::test_utils::{TestQueue, single_region_mem};
    use crate::virtio::queue::reference::next_chain;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    /// Where the tests put indirect descriptor tables.
    const ITABLE: u64 = 0x8000;

    fn write_indirect(mem: &GuestMemoryMmap, at: u64, i: u64, desc: (u64, u32, u16, u16)) {
        let (addr, len, flags, next) = desc;
        mem.write_obj(
            Descriptor::new(addr, len, flags, next),
            GuestAddress(at + 16 * i),
        )
        .unwrap();
    }

    const MEM: usize = 0x10_0000;

    fn gather(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
        max: usize,
    ) -> Result<ChainBuffers, ChainError> {
        let q = TestQueue::new(mem, GuestAddress(0), 16);
        let head = q.add_chain(descs);
        both(&q, head, max)
    }

    /// What a chain gathers to, compared between its two gatherers.
    fn summary(r: &Result<ChainBuffers, ChainError>) -> String {
        match r {
            Ok(b) => format!(
                "ok r={:?} w={:?} rl={} wl={} invalid={:?} {:?}",
                b.readable(),
                b.writable(),
                b.readable_len(),
                b.writable_len(),
                b.invalid_readable,
                b.invalid_writable
            ),
            Err(e) => format!("err {e:?}"),
        }
    }

    /// Gathers the chain at `head` with both [`ChainBuffers::collect`] (over virtio-queue's
    /// iterator) and [`ChainBuffers::walk`], checks they agree and returns the walk's result.
    fn both(q: &TestQueue, head: u16, max: usize) -> Result<ChainBuffers, ChainError> {
        let mem = q.memory();
        q.push_avail(head);
        let mut queue = q.queue();
        queue.set_next_avail(q.avail_idx().wrapping_sub(1));
        let chain = next_chain(&mut queue, mem).unwrap().unwrap();
        assert_eq!(chain.head_index(), head);
        let collected = ChainBuffers::collect(chain, mem, max);
        let view = GuestView::new(mem);
        let walked = ChainBuffers::walk(&view, q.desc_table_addr(), 16, head, max);
        assert_eq!(summary(&walked), summary(&collected));
        walked
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
    fn walk_cuts_loops_like_the_iterator() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        // 0 -> 1 -> 0 -> ...: cut after 16 descriptors (the TTL is the table size).
        q.write_desc(0, 0x1000, 16, NEXT, 1);
        q.write_desc(1, 0x2000, 512, NEXT, 0);
        let b = both(&q, 0, 1024).unwrap();
        assert_eq!(b.readable().len(), 16);
        assert_eq!(b.writable_len(), 0);
        // The same loop against a smaller descriptor limit.
        assert!(matches!(
            both(&q, 0, 8),
            Err(ChainError::TooManyDescriptors(8))
        ));
        // A self-loop through writable descriptors.
        q.write_desc(2, 0x3000, 1, NEXT | WRITE, 2);
        let b = both(&q, 2, 1024).unwrap();
        assert_eq!(b.writable_len(), 16);
    }

    #[test]
    fn walk_stops_at_bad_indices_and_memory() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        // A head outside the table: an empty chain.
        let b = both(&q, 16, 16).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (0, 0));
        // A `next` outside the table ends the chain after the descriptor that points there.
        q.write_desc(0, 0x1000, 16, NEXT, 40);
        let b = both(&q, 0, 16).unwrap();
        assert_eq!(
            b.readable(),
            &[Segment {
                addr: GuestAddress(0x1000),
                len: 16
            }]
        );
        // A descriptor table outside guest memory: nothing can be read.
        let view = GuestView::new(&m);
        let b = ChainBuffers::walk(&view, GuestAddress(MEM as u64 - 8), 16, 0, 16).unwrap();
        assert_eq!(b.readable_len() + b.writable_len(), 0);
        let b = ChainBuffers::walk(&view, GuestAddress(u64::MAX - 15), 16, 1, 16).unwrap();
        assert_eq!(b.readable_len() + b.writable_len(), 0);
    }

    #[test]
    fn walk_zero_length_and_out_of_memory_buffers() {
        let m = single_region_mem(MEM);
        // Zero-length descriptors count against the limit but add no segment.
        let b = gather(
            &m,
            &[(0x1000, 0, false), (0x2000, 16, false), (0x3000, 0, true)],
            16,
        )
        .unwrap();
        assert_eq!(
            b.readable(),
            &[Segment {
                addr: GuestAddress(0x2000),
                len: 16
            }]
        );
        assert!(b.writable().is_empty());
        assert_eq!(b.last_writable_byte(&m), None);
        assert!(matches!(
            gather(&m, &[(0x1000, 0, false), (0x2000, 0, false)], 1),
            Err(ChainError::TooManyDescriptors(1))
        ));
        // A zero-length descriptor outside memory is harmless; a non-empty one is recorded.
        let b = gather(&m, &[(u64::MAX, 0, false), (0x1000, 1, true)], 16).unwrap();
        b.check_in_memory().unwrap();
        let b = gather(&m, &[(MEM as u64, 1, false), (0x1000, 1, true)], 16).unwrap();
        assert!(matches!(
            b.check_in_memory(),
            Err(ChainError::OutOfRange { addr, len: 1 }) if addr == MEM as u64
        ));
        // Wrapping around the address space.
        let b = gather(&m, &[(u64::MAX - 1, 4, true)], 16).unwrap();
        assert!(b.check_in_memory().is_err());
        // More than 4 GiB in total: the iterator stops before the descriptor that overflows.
        let b = gather(&m, &[(0x1000, u32::MAX, false), (0x2000, 1, true)], 16).unwrap();
        assert_eq!(b.writable_len(), 0);
    }

    #[test]
    fn walk_write_only_where_read_expected() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        q.write_desc(0, 0x1000, 16, NEXT | WRITE, 1);
        q.write_desc(1, 0x2000, 16, NEXT, 2);
        q.write_desc(2, 0x3000, 1, WRITE, 0);
        assert!(matches!(
            both(&q, 0, 16),
            Err(ChainError::ReadableAfterWritable)
        ));
    }

    #[test]
    fn walk_indirect_tables() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        write_indirect(&m, ITABLE, 0, (0x1000, 16, NEXT, 1));
        write_indirect(&m, ITABLE, 1, (0x2000, 512, NEXT | WRITE, 2));
        write_indirect(&m, ITABLE, 2, (0x3000, 1, WRITE, 0));
        q.write_desc(0, ITABLE, 48, INDIRECT, 0);
        let b = both(&q, 0, 16).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (16, 513));
        // The descriptors of an indirect table count against the limit.
        assert!(matches!(
            both(&q, 0, 2),
            Err(ChainError::TooManyDescriptors(2))
        ));
        // A table length that is not a multiple of 16: the chain ends there.
        q.write_desc(1, ITABLE, 47, INDIRECT, 0);
        let b = both(&q, 1, 16).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (0, 0));
        // An empty table, and one outside memory.
        q.write_desc(2, ITABLE, 0, INDIRECT, 0);
        assert_eq!(both(&q, 2, 16).unwrap().readable().len(), 0);
        q.write_desc(3, MEM as u64 - 16, 64, INDIRECT, 0);
        assert_eq!(both(&q, 3, 16).unwrap().readable().len(), 0);
        // Nested indirection (§2.7.5.3.1) ends the chain at the nested descriptor.
        write_indirect(&m, ITABLE + 0x100, 0, (0x1000, 16, NEXT, 1));
        write_indirect(&m, ITABLE + 0x100, 1, (ITABLE, 48, INDIRECT, 0));
        q.write_desc(4, ITABLE + 0x100, 32, INDIRECT, 0);
        let b = both(&q, 4, 16).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (16, 0));
        // A loop inside an indirect table is cut by the table's own size.
        write_indirect(&m, ITABLE + 0x200, 0, (0x1000, 1, NEXT, 1));
        write_indirect(&m, ITABLE + 0x200, 1, (0x1000, 1, NEXT, 0));
        q.write_desc(5, ITABLE + 0x200, 32, INDIRECT, 0);
        assert_eq!(both(&q, 5, 64).unwrap().readable().len(), 2);
        // Descriptors chained after an indirect one in the main table are not followed.
        q.write_desc(6, ITABLE, 48, INDIRECT | NEXT, 7);
        q.write_desc(7, 0x4000, 8, WRITE, 0);
        let b = both(&q, 6, 16).unwrap();
        assert_eq!((b.readable_len(), b.writable_len()), (16, 513));
    }

    #[test]
    fn long_chains_spill_to_the_heap() {
        let m = single_region_mem(MEM);
        let descs: Vec<(u64, u32, bool)> = (0..12u64)
            .map(|i| (0x1000 + 0x100 * i, 0x10, i >= 5))
            .collect();
        let b = gather(&m, &descs, 16).unwrap();
        assert_eq!((b.readable().len(), b.writable().len()), (5, 7));
        assert_eq!(b.writable()[6].addr, GuestAddress(0x1b00));
        let mut all = [0u8; 0x50];
        m.write_slice(&[7u8; 0x10], GuestAddress(0x1400)).unwrap();
        b.read_at(&m, 0, &mut all).unwrap();
        assert_eq!(&all[0x40..], &[7u8; 0x10]);
    }

    #[test]
    fn view_falls_back_to_other_regions() {
        // Two regions with a hole: the fast path covers the first, the rest goes through
        // vm-memory with the same results and errors.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap();
        let view = GuestView::new(&m);
        view.write_slice(&[1, 2, 3], GuestAddress(0x20010)).unwrap();
        let mut b = [0u8; 3];
        view.read_slice(&mut b, GuestAddress(0x20010)).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(view.check_range(GuestAddress(0xfff0), 0x10));
        assert!(!view.check_range(GuestAddress(0xfff0), 0x11));
        assert!(view.check_range(GuestAddress(0x2fff0), 0x10));
        assert!(!view.check_range(GuestAddress(0x18000), 1));
        view.read_slice(&mut b, GuestAddress(0x18000)).unwrap_err();
        view.store(7u16, GuestAddress(0x20000), Ordering::Release)
            .unwrap();
        assert_eq!(
            view.load::<u16>(GuestAddress(0x20000), Ordering::Acquire)
                .unwrap(),
            7
        );
        // Misaligned atomics fail on both paths.
        view.load::<u16>(GuestAddress(0x1001), Ordering::Acquire)
            .unwrap_err();
        view.load::<u16>(GuestAddress(0x20001), Ordering::Acquire)
            .unwrap_err();
        assert_eq!(view.read_obj::<u32>(GuestAddress(0x1001)).unwrap(), 0);
        let mut n = 0;
        view.for_each_slice(
            GuestAddress(0x100),
            0x20,
            |s| -> Result<(), GuestMemoryError> {
                n += s.len();
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(n, 0x20);
        view.for_each_slice(
            GuestAddress(0xff00),
            0x200,
            |_| -> Result<(), GuestMemoryError> { Ok(()) },
        )
        .unwrap_err();
        // A chain in the second region, and one that leaves it.
        let q = TestQueue::new(&m, GuestAddress(0x20000), 16);
        q.write_desc(0, 0x2_1000, 16, NEXT, 1);
        q.write_desc(1, 0xfff0, 0x20, WRITE, 0);
        let b = ChainBuffers::walk(&view, q.desc_table_addr(), 16, 0, 16).unwrap();
        assert_eq!(b.readable_len(), 16);
        b.check_in_memory().unwrap_err();
        let empty = GuestMemoryMmap::from_ranges(&[]).unwrap_or_default();
        let view = GuestView::new(&empty);
        assert!(!view.check_range(GuestAddress(0), 1));
    }

    /// One descriptor of a random table.
    fn arb_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        (
            prop_oneof![
                Just(0x1000u64),
                Just(0x2000),
                Just(ITABLE),
                Just(MEM as u64 - 8),
                any::<u64>()
            ],
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(16),
                Just(48),
                Just(512),
                Just(u32::MAX / 2 + 1),
                any::<u32>()
            ],
            prop_oneof![
                4 => (0u16..4).prop_map(|f| f & (NEXT | WRITE)),
                2 => Just(INDIRECT),
                1 => 0u16..8,
                1 => any::<u16>(),
            ],
            prop_oneof![4 => 0u16..16, 1 => any::<u16>()],
        )
    }

    proptest! {
        /// On any descriptor table, with any indirect table, head and limit, the walk gathers
        /// exactly what the virtio-queue iterator plus `collect` gathers (or fails the same way).
        #[test]
        fn walk_matches_the_iterator(
            table in prop::collection::vec(arb_desc(), 16),
            itable in prop::collection::vec(arb_desc(), 8),
            head in prop_oneof![4 => 0u16..16, 1 => any::<u16>()],
            max in 1usize..40,
        ) {
            let m = single_region_mem(MEM);
            let q = TestQueue::new(&m, GuestAddress(0), 16);
            for (i, (addr, len, flags, next)) in (0u16..).zip(&table) {
                q.write_desc(i, *addr, *len, *flags, *next);
            }
            for (i, d) in (0u64..).zip(&itable) {
                write_indirect(&m, ITABLE, i, *d);
            }
            let _ = both(&q, head, max);
        }
    }
}
