// SPDX-License-Identifier: Apache-2.0
//! Split virtqueues, driver side (virtio 1.2 §2.7): descriptor table, available ring and used
//! ring in one zeroed page, a free list threaded through the descriptors' `next` fields, and
//! no notification suppression (no `VIRTIO_F_EVENT_IDX`, `flags` 0): the device interrupts
//! for every used buffer.
//!
//! Page layout for at most [`MAX_QUEUE_SIZE`] entries: descriptors at 0 (16 bytes each),
//! available ring at 1024 (`flags`, `idx`, `ring[size]`), used ring at 2048 (`flags`, `idx`,
//! `ring[size]` of `{id: u32, len: u32}`).

use core::sync::atomic::{Ordering, fence};

use crate::dma::{Arena, DmaBuf};
use crate::irq;
use crate::phys;
use crate::virtio::mmio::Transport;
use crate::virtio::{REQUEST_TIMEOUT, VirtioError};

/// Largest queue the driver sets up (the in-flight bitmap is a `u64`).
pub const MAX_QUEUE_SIZE: u16 = 64;
/// Descriptor flag: the chain continues in `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
const AVAIL_OFFSET: u64 = 1024;
const USED_OFFSET: u64 = 2048;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (otherwise it reads it).
    pub writable: bool,
}

impl Buf {
    /// A buffer of `len` bytes (at most `u32::MAX`, the descriptor's limit) the device reads.
    pub fn read(addr: u64, len: usize) -> Self {
        Self {
            addr,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            writable: false,
        }
    }

    /// A buffer of `len` bytes (at most `u32::MAX`) the device writes.
    pub fn write(addr: u64, len: usize) -> Self {
        Self {
            addr,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            writable: true,
        }
    }
}

/// A completed chain from the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor of the chain (what [`Virtqueue::add`] returned).
    pub head: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

/// A split virtqueue.
#[derive(Debug)]
pub struct Virtqueue {
    index: u16,
    size: u16,
    ring: DmaBuf,
    notify_addr: u64,
    free_head: u16,
    num_free: u16,
    next_avail: u16,
    last_used: u16,
    /// Bit n: a chain headed by descriptor n is with the device.
    in_flight: u64,
}

impl Virtqueue {
    /// Sets up queue `index` of `transport` with at most `want` entries (rounded down to a power
    /// of two, capped by the device and [`MAX_QUEUE_SIZE`]).
    pub fn new(
        transport: &Transport,
        index: u16,
        want: u16,
        arena: &mut Arena,
    ) -> Result<Self, VirtioError> {
        let max = transport.queue_max(index);
        if max == 0 {
            return Err(VirtioError::NoQueue(index));
        }
        let limit = want.min(max).clamp(1, MAX_QUEUE_SIZE);
        // Largest power of two <= limit.
        let size = 1u16 << (15 - limit.leading_zeros());
        let mut ring = arena.pages(1).ok_or(VirtioError::OutOfMemory)?;
        ring.zero();
        let mut q = Self {
            index,
            size,
            ring,
            notify_addr: transport.notify_addr(),
            free_head: 0,
            num_free: size,
            next_avail: 0,
            last_used: 0,
            in_flight: 0,
        };
        for i in 0..size {
            q.set_desc_next(i, i.wrapping_add(1));
        }
        let base = q.ring.addr();
        transport.setup_queue(index, size, base, base + AVAIL_OFFSET, base + USED_OFFSET);
        Ok(q)
    }

    /// Notifies the queue, then waits until it has a used entry and the device's line has
    /// (of `transport`) interrupted since the notification: without `VIRTIO_F_EVENT_IDX` and with the
    /// available ring's flags 0 the device must notify every used buffer (§2.7.10), so a
    /// completion without an interrupt is an error. For one request in flight at a time.
    pub fn notify_and_wait(&self, transport: &Transport) -> Result<(), VirtioError> {
        let before = transport.interrupt_count();
        self.notify();
        let done = irq::wait_until(REQUEST_TIMEOUT, || {
            self.has_used() && transport.interrupt_count() != before
        });
        if done {
            return Ok(());
        }
        transport.check()?;
        Err(if self.has_used() {
            VirtioError::NoInterrupt
        } else {
            VirtioError::Timeout
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    fn desc_addr(&self, i: u16) -> u64 {
        self.ring.addr() + 16 * u64::from(i % self.size)
    }

    fn desc_next(&self, i: u16) -> u16 {
        phys::read_volatile(self.desc_addr(i) + 14).unwrap_or(0)
    }

    fn set_desc_next(&mut self, i: u16, next: u16) {
        phys::write_volatile(self.desc_addr(i) + 14, next);
    }

    fn desc_flags(&self, i: u16) -> u16 {
        phys::read_volatile(self.desc_addr(i) + 12).unwrap_or(0)
    }

    /// Puts a chain of `bufs` on the available ring (without notifying); returns its head.
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16, VirtioError> {
        let count = u16::try_from(bufs.len()).map_err(|_| VirtioError::QueueFull)?;
        if count == 0 || count > self.num_free {
            return Err(VirtioError::QueueFull);
        }
        let head = self.free_head;
        let mut i = head;
        for (n, buf) in bufs.iter().enumerate() {
            let d = self.desc_addr(i);
            let last = n + 1 == bufs.len();
            let mut flags = if buf.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            phys::write_volatile(d, buf.addr);
            phys::write_volatile(d + 8, buf.len);
            phys::write_volatile(d + 12, flags);
            // `next` already links to the following free descriptor: the chain is the front
            // of the free list.
            let next = self.desc_next(i);
            if last {
                self.free_head = next;
            } else {
                i = next;
            }
        }
        self.num_free -= count;
        self.in_flight |= 1u64 << (head % MAX_QUEUE_SIZE);
        let avail = self.ring.addr() + AVAIL_OFFSET;
        let slot = avail + 4 + 2 * u64::from(self.next_avail % self.size);
        phys::write_volatile(slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        // The ring entry must be visible before the index that publishes it (§2.7.13).
        fence(Ordering::Release);
        phys::write_volatile(avail + 2, self.next_avail);
        Ok(head)
    }

    /// Tells the device the queue has new buffers: writes the queue index to `QueueNotify`.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        phys::mmio_write_u32(self.notify_addr, u32::from(self.index));
    }

    /// Whether the used ring has entries the driver has not taken yet.
    pub fn has_used(&self) -> bool {
        let idx: u16 = phys::read_volatile(self.ring.addr() + USED_OFFSET + 2).unwrap_or(0);
        idx != self.last_used
    }

    /// Takes the next used entry and frees its descriptors; `None` if there is none.
    pub fn pop_used(&mut self) -> Option<Result<Used, VirtioError>> {
        if !self.has_used() {
            return None;
        }
        // Read the entry only after seeing the index that published it.
        fence(Ordering::Acquire);
        let used = self.ring.addr() + USED_OFFSET;
        let elem = used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = phys::read_volatile(elem).unwrap_or(u32::MAX);
        let len: u32 = phys::read_volatile(elem + 4).unwrap_or(0);
        self.last_used = self.last_used.wrapping_add(1);
        let head = match u16::try_from(id) {
            Ok(h) if h < self.size && self.in_flight & (1u64 << h) != 0 => h,
            _ => return Some(Err(VirtioError::BadUsed(id))),
        };
        self.in_flight &= !(1u64 << head);
        // Walk our own chain (the device does not write descriptors) to its end, then put the
        // whole chain back at the front of the free list.
        let mut last = head;
        let mut count = 1u16;
        while self.desc_flags(last) & VIRTQ_DESC_F_NEXT != 0 && count < self.size {
            last = self.desc_next(last) % self.size;
            count += 1;
        }
        let old_head = self.free_head;
        self.set_desc_next(last, old_head);
        self.free_head = head;
        self.num_free = self.num_free.saturating_add(count).min(self.size);
        Some(Ok(Used { head, len }))
    }
}
