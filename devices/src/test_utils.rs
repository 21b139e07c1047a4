// SPDX-License-Identifier: Apache-2.0
//! Helpers for unit tests, fuzz targets and benches (feature `test-utils`): guest memory, a
//! recording interrupt, a dummy device for the transport, in-memory disk and loopback network
//! backends, and a driver-side view of a split queue for building descriptor chains.
#![allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "test helpers on values the tests choose"
)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::GuestMemoryMmap;
use crate::sync::Recover;
use crate::virtio::block::{DiskBackend, DiskCapabilities};
use crate::virtio::net::NetBackend;
use crate::virtio::{ActivateError, Interrupt, InterruptKind, VIRTIO_F_VERSION_1, VirtioDevice};

/// Guest memory of `size` bytes at guest address 0.
pub fn single_region_mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("cannot create guest memory")
}

/// An [`Interrupt`] that counts what was triggered and keeps the status bits.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    status: AtomicU32,
    queue: AtomicU64,
    config: AtomicU64,
}

impl RecordingInterrupt {
    /// A fresh interrupt with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times `kind` was triggered.
    pub fn count(&self, kind: InterruptKind) -> u64 {
        match kind {
            InterruptKind::Queue => self.queue.load(Ordering::SeqCst),
            InterruptKind::Config => self.config.load(Ordering::SeqCst),
        }
    }
}

impl Interrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        match kind {
            InterruptKind::Queue => self.queue.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn restore_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }
}

/// A configurable device for transport tests: records what the transport does to it.
#[derive(Debug)]
pub struct DummyDevice {
    /// Device id.
    pub device_type: u32,
    /// Queue sizes (one per queue).
    pub queue_max_sizes: Vec<u16>,
    /// The notify EventFd (`None`: a device that has none).
    pub notify_evt: Option<EventFd>,
    /// The queues whose notifications reached [`VirtioDevice::queue_notified`], in order.
    pub notified: Vec<u32>,
    /// Offered features.
    pub avail_features: u64,
    /// Features set by the transport.
    pub acked_features: u64,
    /// Configuration space (writable).
    pub config: Vec<u8>,
    /// Activated and not reset since.
    pub activated: bool,
    /// Number of successful activations.
    pub activations: usize,
    /// Number of resets.
    pub resets: usize,
    /// Make the next activations fail.
    pub fail_activate: bool,
    /// Make the next resets fail.
    pub fail_reset: bool,
    /// Reported by [`VirtioDevice::needs_reset`].
    pub needs_reset: bool,
    /// How often [`VirtioDevice::restored`] was called.
    pub restores: usize,
    /// Queues handed over at the last activation.
    pub queues: Vec<Queue>,
    /// Interrupt handed over at the last activation.
    pub interrupt: Option<Arc<dyn Interrupt>>,
}

impl DummyDevice {
    /// A device of type `device_type` with the given queue sizes, offering `VERSION_1`.
    pub fn new(device_type: u32, queue_max_sizes: &[u16]) -> Self {
        DummyDevice {
            device_type,
            queue_max_sizes: queue_max_sizes.to_vec(),
            notify_evt: Some(EventFd::new(EFD_NONBLOCK).expect("cannot create EventFd")),
            notified: Vec::new(),
            avail_features: VIRTIO_F_VERSION_1,
            acked_features: 0,
            config: vec![0; 16],
            activated: false,
            activations: 0,
            resets: 0,
            restores: 0,
            fail_activate: false,
            fail_reset: false,
            needs_reset: false,
            queues: Vec::new(),
            interrupt: None,
        }
    }
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn notify_event(&self) -> Option<&EventFd> {
        self.notify_evt.as_ref()
    }

    fn queue_notified(&mut self, queue: u32) -> io::Result<()> {
        self.notified.push(queue);
        match &self.notify_evt {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::base::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        if let Some(dst) = self.config.get_mut(offset..) {
            for (d, s) in dst.iter_mut().zip(data) {
                *d = *s;
            }
        }
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Backend("dummy failure".into()));
        }
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        self.activated = true;
        self.activations += 1;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.activated
    }

    fn reset(&mut self) -> Result<(), ActivateError> {
        if self.fail_reset {
            return Err(ActivateError::ResetUnsupported);
        }
        self.activated = false;
        self.acked_features = 0;
        self.needs_reset = false;
        self.queues.clear();
        self.interrupt = None;
        self.resets += 1;
        Ok(())
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.queues
            .iter()
            .map(crate::virtio::queue_position)
            .collect()
    }

    fn restored(&mut self) {
        self.restores += 1;
    }
}

/// An in-memory disk.
#[derive(Debug)]
pub struct MemDisk {
    data: Vec<u8>,
    caps: DiskCapabilities,
    flushes: Arc<AtomicU64>,
}

impl MemDisk {
    /// A zeroed disk of `len` bytes supporting discard and write zeroes.
    pub fn new(len: usize) -> Self {
        Self::from_vec(vec![0; len])
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemDisk {
            data,
            caps: DiskCapabilities {
                discard: true,
                write_zeroes: true,
            },
            flushes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Removes discard and write-zeroes support.
    pub fn without_discard(mut self) -> Self {
        self.caps = DiskCapabilities::default();
        self
    }

    /// A counter of flushes that stays readable after the disk moved into a device.
    pub fn flush_counter(&self) -> Arc<AtomicU64> {
        self.flushes.clone()
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.data.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(start..end)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let r = self.range(offset, len)?;
        self.data[r].fill(0);
        Ok(())
    }
}

impl DiskBackend for MemDisk {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn capabilities(&self) -> DiskCapabilities {
        self.caps
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.caps.discard {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.zero(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        if !self.caps.write_zeroes {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.zero(offset, len)
    }
}

#[derive(Debug)]
struct LoopbackState {
    frames: VecDeque<Vec<u8>>,
    capacity: usize,
    offload: u32,
}

/// A network backend whose sent frames come back on receive, holding at most `capacity`
/// frames (more are dropped). Its fd is an EventFd that is signalled when a frame is queued.
#[derive(Debug)]
pub struct LoopbackNet {
    state: Arc<Mutex<LoopbackState>>,
    evt: Arc<EventFd>,
    vnet: bool,
}

/// A handle on a [`LoopbackNet`] that stays usable after the backend moved into a device.
#[derive(Clone, Debug)]
pub struct LoopbackHandle {
    state: Arc<Mutex<LoopbackState>>,
    evt: Arc<EventFd>,
}

impl LoopbackNet {
    /// A loopback holding up to `capacity` frames; `vnet` makes frames carry virtio headers.
    pub fn new(capacity: usize, vnet: bool) -> Self {
        LoopbackNet {
            state: Arc::new(Mutex::new(LoopbackState {
                frames: VecDeque::new(),
                capacity,
                offload: 0,
            })),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK).expect("cannot create EventFd")),
            vnet,
        }
    }

    /// A handle to inject and inspect frames.
    pub fn handle(&self) -> LoopbackHandle {
        LoopbackHandle {
            state: self.state.clone(),
            evt: self.evt.clone(),
        }
    }
}

impl LoopbackHandle {
    /// Queues a frame as if it arrived from the host network (dropped when full).
    pub fn inject(&self, frame: &[u8]) {
        let mut s = self.state.lock().recover();
        if s.frames.len() < s.capacity {
            s.frames.push_back(frame.to_vec());
            let _ = self.evt.write(1);
        }
    }

    /// The frames waiting to be received.
    pub fn queued(&self) -> Vec<Vec<u8>> {
        self.state.lock().recover().frames.iter().cloned().collect()
    }

    /// The last `TUN_F_*` flags set.
    pub fn offload(&self) -> u32 {
        self.state.lock().recover().offload
    }
}

impl AsRawFd for LoopbackNet {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl NetBackend for LoopbackNet {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.state.lock().recover();
        let Some(frame) = s.frames.pop_front() else {
            // Reset the EventFd so its counter cannot saturate.
            let _ = self.evt.read();
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().recover();
        if s.frames.len() >= s.capacity {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        s.frames.push_back(frame.to_vec());
        self.evt.write(1)
    }

    fn has_vnet_hdr(&self) -> bool {
        self.vnet
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.state.lock().recover().offload = flags;
        Ok(())
    }
}

/// The driver's side of a split virtqueue in guest memory, for building requests.
///
/// It lays the rings out itself: `virtio_queue::mock::MockSplitQueue` (0.18) computes the end
/// of its available ring in elements instead of bytes, so its used ring overlaps the available
/// ring for any queue larger than 2 entries.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: std::cell::Cell<u16>,
}

impl std::fmt::Debug for TestQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestQueue")
            .field("desc", &self.desc)
            .field("avail", &self.avail)
            .field("used", &self.used)
            .field("size", &self.size)
            .finish()
    }
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries (a power of two) with its rings laid out from `start` (16-byte
    /// aligned): descriptor table, available ring, used ring, zeroed.
    pub fn new(mem: &'a GuestMemoryMmap, start: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = start;
        let avail = GuestAddress(desc.0 + 16 * n);
        let used = GuestAddress((avail.0 + 6 + 2 * n + 3) & !3);
        let end = used.0 + 6 + 8 * n;
        let zeroes = vec![0u8; usize::try_from(end - start.0).expect("queue too large")];
        mem.write_slice(&zeroes, start)
            .expect("queue outside guest memory");
        TestQueue {
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: std::cell::Cell::new(0),
        }
    }

    /// A device-side `Queue` configured on these rings, as the transport would build it.
    pub fn queue(&self) -> Queue {
        use virtio_queue::QueueT;
        let mut q = Queue::new(self.size).expect("bad queue size");
        q.try_set_size(self.size).expect("bad queue size");
        q.try_set_desc_table_address(self.desc)
            .expect("bad alignment");
        q.try_set_avail_ring_address(self.avail)
            .expect("bad alignment");
        q.try_set_used_ring_address(self.used)
            .expect("bad alignment");
        q.set_ready(true);
        q
    }

    /// Descriptor table address.
    pub fn desc_table_addr(&self) -> GuestAddress {
        self.desc
    }

    /// Available ring address.
    pub fn avail_addr(&self) -> GuestAddress {
        self.avail
    }

    /// Used ring address.
    pub fn used_addr(&self) -> GuestAddress {
        self.used
    }

    /// First guest address after the rings.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.used.0 + 6 + 8 * u64::from(self.size))
    }

    /// Writes descriptor `index` as is.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let at = GuestAddress(self.desc.0 + 16 * u64::from(index % self.size));
        self.mem
            .write_obj(desc, at)
            .expect("bad descriptor address");
    }

    /// Publishes `head` in the available ring.
    pub fn push_avail(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = u64::from(idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * slot))
            .expect("bad ring address");
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// The available ring index.
    pub fn avail_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.avail.0 + 2))
            .expect("bad ring address")
    }

    /// Overwrites the available ring index (to fake a corrupt ring).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail.0 + 2))
            .expect("bad ring address");
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers at the next free descriptor
    /// slots and makes it available. Returns its head index.
    pub fn add_chain(&self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc.get();
        let n = u16::try_from(bufs.len()).expect("chain too long");
        let write_flag = u16::try_from(VRING_DESC_F_WRITE).expect("flag fits u16");
        let next_flag = u16::try_from(VRING_DESC_F_NEXT).expect("flag fits u16");
        for (i, (addr, len, write)) in (0u16..).zip(bufs) {
            let index = (head + i) % self.size;
            let mut flags = if *write { write_flag } else { 0 };
            if i + 1 != n {
                flags |= next_flag;
            }
            self.write_desc(index, *addr, *len, flags, (index + 1) % self.size);
        }
        self.next_desc.set((head + n) % self.size);
        self.push_avail(head);
        head
    }

    /// The used ring index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used.0 + 2))
            .expect("bad ring address")
    }

    /// Used ring element `i` as (descriptor id, length).
    pub fn used_elem(&self, i: u16) -> (u16, u32) {
        let at = self.used.0 + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(at))
            .expect("bad ring address");
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(at + 4))
            .expect("bad ring address");
        (u16::try_from(id).unwrap_or(u16::MAX), len)
    }

    /// The guest memory the queue lives in.
    pub fn memory(&self) -> &'a GuestMemoryMmap {
        self.mem
    }
}
