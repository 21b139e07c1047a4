// SPDX-License-Identifier: Apache-2.0
//! One pass over a split virtqueue (virtio 1.2 §2.7): available heads in, used elements out, the
//! used index published per batch, and the used buffer notification decided once per pass
//! (§2.7.7, §2.7.10). Every device queue goes through it.
//!
//! `virtio-queue` re-reads the available index for every chain, goes through vm-memory's generic
//! accessors for every ring access and publishes the used index after every element. A
//! [`RingPass`] reads the rings through a [`GuestView`], fetches the available index only when
//! the heads it saw are used up, and writes the used index when the caller publishes a batch. The
//! checks and errors are those of `virtio-queue` (a not-ready queue, an available index more than
//! the queue size ahead, a used head outside the table), and the notification rule is its
//! `needs_notification` (the `EVENT_IDX` window since the previous decision). One difference,
//! about a hostile driver: an available ring entry that cannot be read is an error (the
//! iterator ends there, which made the caller spin on a ring that always looks non-empty).
//!
//! Request queues (blk, net TX, vsock TX) run [`drain_queue`]: every available chain is popped,
//! gathered and handed to the device, up to a budget per pass. Receive queues (net RX, vsock
//! RX) are driven by what the backend has, so they pop one chain at a time from a pass and
//! publish after every packet (the driver may be polling the used ring meanwhile).
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::GuestAddress;

use super::chain::{ChainBuffers, ChainError};
use super::view::GuestView;

/// Offset of `ring[0]` in the available and used rings (after `flags` and `idx`).
const RING_HEADER: u64 = 4;
/// Offset of `idx` in the available and used rings.
const IDX_OFFSET: u64 = 2;
/// Size of one available ring entry.
const AVAIL_ELEM: u64 = 2;
/// Size of one used ring element (`id`, `len`).
const USED_ELEM: u64 = 8;

/// A pass over one queue: borrow the queue, pop, add used, publish, and drop.
///
/// The positions live in the pass and are written back to the [`Queue`] by
/// [`RingPass::publish`] (and when the pass is dropped), so the queue's state (for
/// notifications, reset, snapshots) is current after every batch.
#[derive(Debug)]
pub struct RingPass<'q, 'a> {
    queue: &'q mut Queue,
    view: GuestView<'a>,
    desc_table: GuestAddress,
    avail_ring: u64,
    used_ring: u64,
    size: u16,
    /// `size - 1` when `size` is a power of two (always, for a queue the transport accepted):
    /// ring slots are then a mask away instead of a division.
    mask: Option<u16>,
    next_avail: Wrapping<u16>,
    /// The last available index read from the ring.
    avail_idx: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The used index the driver can see.
    published: Wrapping<u16>,
    /// `next_used` when the notification was last decided.
    notified_at: Wrapping<u16>,
}

impl<'q, 'a> RingPass<'q, 'a> {
    /// Starts a pass. Fails like `Queue::iter` on a queue that is not ready.
    pub fn new(queue: &'q mut Queue, view: GuestView<'a>) -> Result<Self, QueueError> {
        let avail_ring = queue.avail_ring();
        if !queue.ready() || avail_ring == 0 {
            return Err(QueueError::QueueNotReady);
        }
        let next_avail = Wrapping(queue.next_avail());
        let next_used = Wrapping(queue.next_used());
        Ok(RingPass {
            desc_table: GuestAddress(queue.desc_table()),
            avail_ring,
            used_ring: queue.used_ring(),
            size: queue.size(),
            mask: queue
                .size()
                .is_power_of_two()
                .then(|| queue.size().wrapping_sub(1)),
            next_avail,
            avail_idx: next_avail,
            next_used,
            published: next_used,
            notified_at: next_used,
            view,
            queue,
        })
    }

    /// The ring slot of free-running index `idx`.
    #[inline]
    fn slot(&self, idx: Wrapping<u16>) -> Result<u16, QueueError> {
        match self.mask {
            Some(mask) => Ok(idx.0 & mask),
            None => idx.0.checked_rem(self.size).ok_or(QueueError::InvalidSize),
        }
    }

    /// Reads the available index, rejecting one more than the queue size ahead of the device
    /// (§2.7.6: the driver never offers more than the queue size).
    fn fetch_avail_idx(&mut self) -> Result<(), QueueError> {
        let addr = self
            .avail_ring
            .checked_add(IDX_OFFSET)
            .ok_or(QueueError::AddressOverflow)?;
        let idx = Wrapping(u16::from_le(
            self.view
                .load::<u16>(GuestAddress(addr), Ordering::Acquire)
                .map_err(QueueError::GuestMemory)?,
        ));
        if (idx - self.next_avail).0 > self.size {
            return Err(QueueError::InvalidAvailRingIndex);
        }
        self.avail_idx = idx;
        Ok(())
    }

    /// The head of the next available chain, `None` when the ring is empty.
    pub fn pop(&mut self) -> Result<Option<u16>, QueueError> {
        if self.next_avail == self.avail_idx {
            self.fetch_avail_idx()?;
            if self.next_avail == self.avail_idx {
                return Ok(None);
            }
        }
        let slot = self.slot(self.next_avail)?;
        let addr = RING_HEADER
            .checked_add(u64::from(slot).saturating_mul(AVAIL_ELEM))
            .and_then(|off| self.avail_ring.checked_add(off))
            .ok_or(QueueError::AddressOverflow)?;
        let head = self
            .view
            .load::<u16>(GuestAddress(addr), Ordering::Acquire)
            .map_err(QueueError::GuestMemory)?;
        self.next_avail += Wrapping(1);
        Ok(Some(u16::from_le(head)))
    }

    /// Gives the chain this pass popped last back: the next [`RingPass::pop`] returns it again.
    /// For a device that popped a buffer it cannot use yet (`virtio-queue`'s
    /// `go_to_previous_position`); call it only after a pop of the same pass.
    pub fn undo_pop(&mut self) {
        self.next_avail -= Wrapping(1);
    }

    /// The guest memory the pass reads and writes through.
    #[inline]
    pub fn view(&self) -> &GuestView<'a> {
        &self.view
    }

    /// The queue size (entries of the descriptor table and of both rings).
    #[inline]
    pub fn queue_size(&self) -> u16 {
        self.size
    }

    /// Gathers the chain at `head` into `bufs` (see [`ChainBuffers::walk_into`]).
    pub fn chain_into(
        &self,
        head: u16,
        max_descs: usize,
        bufs: &mut ChainBuffers,
    ) -> Result<(), ChainError> {
        bufs.walk_into(&self.view, self.desc_table, self.size, head, max_descs)
    }

    /// Writes a used element; the driver sees it after the next [`RingPass::publish`].
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        if head >= self.size {
            return Err(QueueError::InvalidDescriptorIndex);
        }
        let slot = self.slot(self.next_used)?;
        let addr = RING_HEADER
            .checked_add(u64::from(slot).saturating_mul(USED_ELEM))
            .and_then(|off| self.used_ring.checked_add(off))
            .ok_or(QueueError::AddressOverflow)?;
        // struct virtq_used_elem { le32 id; le32 len; } as one little-endian u64.
        let elem = u64::from(head) | (u64::from(len) << 32);
        self.view
            .write_obj(elem.to_le(), GuestAddress(addr))
            .map_err(QueueError::GuestMemory)?;
        self.next_used += Wrapping(1);
        Ok(())
    }

    /// Makes every used element written so far visible to the driver (one release store of the
    /// used index) and writes the positions back to the queue.
    pub fn publish(&mut self) -> Result<(), QueueError> {
        self.sync_queue();
        if self.published == self.next_used {
            return Ok(());
        }
        let addr = self
            .used_ring
            .checked_add(IDX_OFFSET)
            .ok_or(QueueError::AddressOverflow)?;
        self.view
            .store(
                self.next_used.0.to_le(),
                GuestAddress(addr),
                Ordering::Release,
            )
            .map_err(QueueError::GuestMemory)?;
        self.published = self.next_used;
        Ok(())
    }

    fn sync_queue(&mut self) {
        self.queue.set_next_avail(self.next_avail.0);
        self.queue.set_next_used(self.next_used.0);
    }

    /// Asks the driver not to notify (`Queue::disable_notification`).
    pub fn disable_notification(&mut self) -> Result<(), QueueError> {
        self.sync_queue();
        self.queue.disable_notification(self.view.memory())
    }

    /// Asks the driver to notify again; `true` if chains arrived meanwhile
    /// (`Queue::enable_notification`).
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        self.sync_queue();
        self.queue.enable_notification(self.view.memory())
    }

    /// Whether any used element was added in this pass.
    pub fn used_any(&self) -> bool {
        self.next_used != self.notified_at
    }

    /// Whether the driver wants a used buffer notification for the elements added since the
    /// last decision: always without `VIRTIO_F_EVENT_IDX`, else when `used_event` lies in that
    /// window (§2.7.10; the inequality of `virtio-queue` and Linux, `vring_need_event`).
    pub fn needs_notification(&mut self) -> Result<bool, QueueError> {
        let new = self.next_used;
        let old = std::mem::replace(&mut self.notified_at, new);
        // The used elements and index must be visible before `used_event` is read.
        fence(Ordering::SeqCst);
        if !self.queue.event_idx_enabled() {
            return Ok(true);
        }
        let offset = u64::from(self.size)
            .saturating_mul(AVAIL_ELEM)
            .checked_add(RING_HEADER)
            .ok_or(QueueError::AddressOverflow)?;
        let addr = self
            .avail_ring
            .checked_add(offset)
            .ok_or(QueueError::AddressOverflow)?;
        let used_event = Wrapping(u16::from_le(
            self.view
                .load::<u16>(GuestAddress(addr), Ordering::Relaxed)
                .map_err(QueueError::GuestMemory)?,
        ));
        Ok(new - used_event - Wrapping(1) < new - old)
    }
}

impl<'a> RingPass<'_, 'a> {
    /// Completes every available chain, at most `budget` of them: each one is popped, gathered
    /// into `bufs` (at most `max_descs` descriptors; a chain that cannot be gathered reaches
    /// `handle` as the error) and handed to `handle`, which returns the chain's used length.
    ///
    /// The driver's notifications are suppressed while the batch runs and re-enabled after it,
    /// then the ring is checked again for chains that arrived meanwhile (§2.7.10). Each batch
    /// is published with one used-index store. Whatever stops the pass, the driver gets every
    /// completed chain, and the notification is decided once, at the end.
    #[inline]
    pub fn drain<F>(
        &mut self,
        budget: usize,
        max_descs: usize,
        bufs: &mut ChainBuffers,
        mut handle: F,
    ) -> Drained
    where
        F: FnMut(Result<&ChainBuffers, ChainError>, &GuestView<'a>) -> u32,
    {
        let mut budget = budget;
        let mut budget_spent = false;
        let mut corrupt: Option<QueueError> = None;
        'outer: loop {
            if let Err(e) = self.disable_notification() {
                corrupt = Some(e);
                break;
            }
            loop {
                let head = match self.pop() {
                    Ok(Some(head)) => head,
                    Ok(None) => break,
                    Err(e) => {
                        corrupt = Some(e);
                        break 'outer;
                    }
                };
                let gathered = self.chain_into(head, max_descs, bufs);
                let len = handle(gathered.map(|()| &*bufs), &self.view);
                if let Err(e) = self.add_used(head, len) {
                    corrupt = Some(e);
                    break 'outer;
                }
                budget = budget.saturating_sub(1);
                if budget == 0 {
                    budget_spent = true;
                    break 'outer;
                }
            }
            if let Err(e) = self.publish() {
                corrupt = Some(e);
                break;
            }
            match self.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    corrupt = Some(e);
                    break;
                }
            }
        }
        if let Err(e) = self.publish() {
            corrupt.get_or_insert(e);
        }
        Drained {
            notify: self.used_any() && self.needs_notification().unwrap_or(true),
            budget_spent,
            corrupt,
        }
    }
}

/// What a pass over a request queue did ([`RingPass::drain`], [`drain_queue`]).
#[derive(Debug)]
#[must_use]
pub struct Drained {
    /// The driver wants a used buffer notification.
    pub notify: bool,
    /// The budget ran out, possibly with chains left: the device must come back to the queue
    /// (it kicks the queue's EventFd, so the event loop serves other devices first).
    pub budget_spent: bool,
    /// The queue is corrupt: the device must stop using it and report `DEVICE_NEEDS_RESET`.
    pub corrupt: Option<QueueError>,
}

/// [`RingPass::drain`] over a fresh pass on `queue`; a queue that is not ready is corrupt.
#[inline]
pub fn drain_queue<'a, F>(
    queue: &mut Queue,
    view: GuestView<'a>,
    budget: usize,
    max_descs: usize,
    bufs: &mut ChainBuffers,
    handle: F,
) -> Drained
where
    F: FnMut(Result<&ChainBuffers, ChainError>, &GuestView<'a>) -> u32,
{
    match RingPass::new(queue, view) {
        Ok(mut ring) => ring.drain(budget, max_descs, bufs, handle),
        Err(e) => Drained {
            notify: false,
            budget_spent: false,
            corrupt: Some(e),
        },
    }
}

impl Drop for RingPass<'_, '_> {
    fn drop(&mut self) {
        self.sync_queue();
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "test code on known values"
)]
mod tests {
    use crate::GuestMemoryMmap;
    use virtio_queue::QueueOwnedT;
    use vm_memory::Bytes;

    use super::*;
    use crate::test_utils::{TestQueue, single_region_mem};

    const MEM: usize = 0x10_0000;

    /// Offers `n` one-descriptor chains.
    fn offer(q: &TestQueue, n: usize) {
        for i in 0..n {
            q.add_chain(&[(0x8000 + 0x10 * i as u64, 16, false)]);
        }
    }

    fn set_used_event(q: &TestQueue, size: u16, v: u16) {
        q.memory()
            .write_obj(v, GuestAddress(q.avail_addr().0 + 4 + 2 * u64::from(size)))
            .unwrap();
    }

    /// Used ring index and elements.
    fn used_ring(q: &TestQueue, size: u16) -> (u16, Vec<(u16, u32)>) {
        (q.used_idx(), (0..size).map(|i| q.used_elem(i)).collect())
    }

    #[test]
    fn pass_matches_virtio_queue() {
        // The same driver activity against a virtio-queue `Queue` and against passes: the same
        // heads, used rings and notification decisions, with and without EVENT_IDX, across
        // index wrap-around.
        for event_idx in [false, true] {
            for used_event in [0u16, 3, 5, 9, 200] {
                let (ma, mb) = (single_region_mem(MEM), single_region_mem(MEM));
                let (qa, qb) = (
                    TestQueue::new(&ma, GuestAddress(0), 8),
                    TestQueue::new(&mb, GuestAddress(0), 8),
                );
                let (mut a, mut b) = (qa.queue(), qb.queue());
                a.set_event_idx(event_idx);
                b.set_event_idx(event_idx);
                for round in 0..40u16 {
                    let n = usize::from(round % 7 + 1);
                    offer(&qa, n);
                    offer(&qb, n);
                    set_used_event(&qa, 8, used_event.wrapping_add(round * 3));
                    set_used_event(&qb, 8, used_event.wrapping_add(round * 3));

                    let mut heads_a = Vec::new();
                    while let Some(chain) = a.iter(&ma).unwrap().next() {
                        heads_a.push(chain.head_index());
                        a.add_used(&ma, chain.head_index(), u32::from(round))
                            .unwrap();
                    }
                    let notify_a = a.needs_notification(&ma).unwrap();

                    let mut pass = RingPass::new(&mut b, GuestView::new(&mb)).unwrap();
                    let mut heads_b = Vec::new();
                    while let Some(head) = pass.pop().unwrap() {
                        heads_b.push(head);
                        pass.add_used(head, u32::from(round)).unwrap();
                    }
                    pass.publish().unwrap();
                    assert!(pass.used_any());
                    let notify_b = pass.needs_notification().unwrap();
                    drop(pass);

                    assert_eq!(heads_a, heads_b);
                    assert_eq!(used_ring(&qa, 8), used_ring(&qb, 8));
                    assert_eq!(notify_a, notify_b, "round {round} event_idx {event_idx}");
                    assert_eq!(a.next_avail(), b.next_avail());
                    assert_eq!(a.next_used(), b.next_used());
                }
            }
        }
    }

    #[test]
    fn used_index_is_published_per_batch() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        offer(&q, 3);
        let mut queue = q.queue();
        let mut pass = RingPass::new(&mut queue, GuestView::new(&m)).unwrap();
        while let Some(head) = pass.pop().unwrap() {
            pass.add_used(head, 7).unwrap();
        }
        assert_eq!(q.used_idx(), 0);
        pass.publish().unwrap();
        assert_eq!(q.used_idx(), 3);
        assert_eq!(q.used_elem(2), (2, 7));
        // Chains offered during a pass are seen by the same pass.
        offer(&q, 1);
        assert_eq!(pass.pop().unwrap(), Some(3));
        assert_eq!(pass.pop().unwrap(), None);
        drop(pass);
        assert_eq!(queue.next_avail(), 4);
        assert_eq!(queue.next_used(), 3);
    }

    #[test]
    fn corrupt_rings_are_errors() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 16);
        let mut queue = q.queue();
        queue.set_ready(false);
        assert!(matches!(
            RingPass::new(&mut queue, GuestView::new(&m)),
            Err(QueueError::QueueNotReady)
        ));
        let mut queue = q.queue();
        q.set_avail_idx(17);
        let mut pass = RingPass::new(&mut queue, GuestView::new(&m)).unwrap();
        assert!(matches!(pass.pop(), Err(QueueError::InvalidAvailRingIndex)));
        // A used head outside the table.
        assert!(matches!(
            pass.add_used(16, 0),
            Err(QueueError::InvalidDescriptorIndex)
        ));
        drop(pass);

        // Rings partly outside guest memory: the available index reads, its entries do not.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut queue = Queue::new(256).unwrap();
        queue.set_size(256);
        queue.set_desc_table_address(Some(0), Some(0));
        queue.set_avail_ring_address(Some(0xffc), Some(0));
        queue.set_used_ring_address(Some(0x800), Some(0));
        queue.set_ready(true);
        mem.write_obj(1u16, GuestAddress(0xffe)).unwrap();
        let mut pass = RingPass::new(&mut queue, GuestView::new(&mem)).unwrap();
        assert!(matches!(pass.pop(), Err(QueueError::GuestMemory(_))));
        // The used ring outside memory.
        let mut queue = Queue::new(256).unwrap();
        queue.set_avail_ring_address(Some(0x100), Some(0));
        queue.set_used_ring_address(Some(0xff0), Some(0));
        queue.set_ready(true);
        let mut pass = RingPass::new(&mut queue, GuestView::new(&mem)).unwrap();
        pass.add_used(0, 0).unwrap();
        assert!(matches!(
            pass.add_used(1, 0),
            Err(QueueError::GuestMemory(_))
        ));
        let mut queue = Queue::new(256).unwrap();
        queue.set_avail_ring_address(Some(0x100), Some(0));
        queue.set_used_ring_address(Some(0x1000), Some(0));
        queue.set_ready(true);
        let mut pass = RingPass::new(&mut queue, GuestView::new(&mem)).unwrap();
        pass.next_used += Wrapping(1);
        assert!(matches!(pass.publish(), Err(QueueError::GuestMemory(_))));
    }
}
