// SPDX-License-Identifier: Apache-2.0
//! Test helpers for the vsock device (unit tests, fuzz targets): guest memory, a driver-side
//! view of the three queues built on `virtio_queue::mock::MockSplitQueue`, a recording
//! interrupt, [`TestVsockBackend`] and a temporary directory.
//!
//! These helpers panic on misuse (they are test code); they never panic on what the device
//! under test does.
#![expect(
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    reason = "test helper arithmetic on small, known values"
)]

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::backend::VsockBackend;
use super::defs::{PKT_HEADER_SIZE, QUEUE_SIZE, TYPE_STREAM, VSOCK_HOST_CID};
use super::packet::VsockHeader;
use crate::GuestMemoryMmap;
use crate::virtio::queue::{ChainBuffers, GuestView, RingPass};
use crate::virtio::{Interrupt, InterruptKind, VirtioDevice};

/// Size of the test guest memory.
pub const TEST_MEM_SIZE: usize = 32 << 20;
/// Where packet buffers start (below are the queues).
const BUF_START: u64 = 0x10_0000;

/// A single-region guest memory of [`TEST_MEM_SIZE`] bytes at address 0.
pub fn test_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE)]).expect("test memory")
}

/// A guest packet header: `src_cid` -> host, STREAM, 64 KiB `buf_alloc`.
pub fn hdr(src_cid: u64, src_port: u32, dst_port: u32, op: u16) -> VsockHeader {
    VsockHeader {
        src_cid,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// Descriptor `i` of an `n`-descriptor chain from `(addr, len, device_writable)`; all but the
/// last link to descriptor `next`.
fn chain_desc(
    i: usize,
    n: usize,
    (addr, len, writable): (u64, u32, bool),
    next: u16,
) -> RawDescriptor {
    let mut flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    let mut next_index = 0;
    if i + 1 < n {
        flags |= VRING_DESC_F_NEXT as u16;
        next_index = next;
    }
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next_index))
}

/// An interrupt that counts triggers.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    count: AtomicUsize,
    status: AtomicU32,
}

impl RecordingInterrupt {
    /// Number of triggers so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Interrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
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

/// A backend that records what the guest sent and replays queued packets.
#[derive(Debug)]
pub struct TestVsockBackend {
    evt: EventFd,
    /// Packets waiting for the guest.
    pub rx: VecDeque<(VsockHeader, Vec<u8>)>,
    /// Packets the guest sent.
    pub sent: Vec<(VsockHeader, Vec<u8>)>,
    /// `notify` calls.
    pub notified: usize,
    /// `reset` calls.
    pub resets: usize,
}

impl TestVsockBackend {
    /// An empty backend.
    pub fn new() -> Self {
        TestVsockBackend {
            evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            rx: VecDeque::new(),
            sent: Vec::new(),
            notified: 0,
            resets: 0,
        }
    }

    /// Queues a packet for the guest.
    pub fn queue_rx(&mut self, hdr: VsockHeader, data: Vec<u8>) {
        self.rx.push_back((hdr, data));
    }
}

impl Default for TestVsockBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl AsRawFd for TestVsockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl VsockBackend for TestVsockBackend {
    fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(VsockHeader, usize)> {
        let (mut hdr, payload) = self.rx.pop_front()?;
        let n = payload.len().min(data.len());
        data[..n].copy_from_slice(&payload[..n]);
        hdr.len = n as u32;
        Some((hdr, n))
    }

    fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) {
        self.sent.push((*hdr, data.to_vec()));
    }

    fn has_pending_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    fn notify(&mut self, _events: EventSet) {
        self.notified += 1;
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.rx.clear();
    }
}

/// Standalone chains for parser tests: each call builds one chain at descriptor index 0 and
/// gathers it the way the device does (a [`RingPass`] pops it, the queue layer walks it).
#[derive(Debug)]
pub struct TestMem {
    /// The guest memory.
    pub mem: GuestMemoryMmap,
    next: Cell<u64>,
}

impl Default for TestMem {
    fn default() -> Self {
        Self::new()
    }
}

impl TestMem {
    /// Fresh memory.
    pub fn new() -> Self {
        TestMem {
            mem: test_mem(),
            next: Cell::new(BUF_START),
        }
    }

    fn alloc(&self, len: usize) -> u64 {
        let addr = self.next.get();
        self.next.set(addr + len as u64 + 64);
        addr
    }

    /// The memory as the device sees it.
    pub fn view(&self) -> GuestView<'_> {
        GuestView::new(&self.mem)
    }

    /// A chain of `(addr, len, writable)` descriptors as given.
    pub fn raw_chain(&self, descs: &[(u64, u32, bool)]) -> ChainBuffers {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &desc)| chain_desc(i, descs.len(), desc, i as u16 + 1))
            .collect();
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), 16);
        mock.add_desc_chains(&raw, 0).expect("chain");
        let mut queue: Queue = mock.create_queue().expect("queue");
        let mut ring = RingPass::new(&mut queue, self.view()).expect("queue");
        let head = ring.pop().expect("ring").expect("chain");
        let mut chain = ChainBuffers::default();
        ring.chain_into(head, usize::from(QUEUE_SIZE), &mut chain)
            .expect("chain");
        chain
    }

    /// A chain of readable descriptors holding `parts`.
    pub fn readable_chain(&self, parts: &[&[u8]]) -> ChainBuffers {
        let descs: Vec<(u64, u32, bool)> = parts
            .iter()
            .map(|part| {
                let addr = self.alloc(part.len());
                self.mem
                    .write_slice(part, GuestAddress(addr))
                    .expect("write");
                (addr, part.len() as u32, false)
            })
            .collect();
        self.raw_chain(&descs)
    }

    /// A chain of writable descriptors of `lens` bytes; also returns their addresses.
    pub fn writable_chain(&self, lens: &[usize]) -> (ChainBuffers, Vec<(u64, usize)>) {
        let addrs: Vec<(u64, usize)> = lens.iter().map(|&l| (self.alloc(l), l)).collect();
        let descs: Vec<(u64, u32, bool)> =
            addrs.iter().map(|&(a, l)| (a, l as u32, true)).collect();
        (self.raw_chain(&descs), addrs)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct RingState {
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// The driver's side of the device's three queues.
///
/// Descriptor tables are written through `MockSplitQueue`; the avail and used rings are placed
/// and driven here, because the mock lays the used ring over the second half of the avail ring
/// (it sizes the avail ring in entries, not bytes), which breaks queues with many entries.
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    queues: [MockSplitQueue<'a, GuestMemoryMmap>; 3],
    avail: [GuestAddress; 3],
    used: [GuestAddress; 3],
    rings: [RingState; 3],
    next_buf: u64,
    /// Descriptors of each RX chain head, to read back what the device wrote.
    rx_bufs: HashMap<u16, Vec<(u64, u32)>>,
}

impl std::fmt::Debug for Driver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

const RX: usize = 0;
const TX: usize = 1;
const EV: usize = 2;

impl<'a> Driver<'a> {
    /// Lays out the three queues at the bottom of `mem` and resets their rings.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let base = |i: u64| GuestAddress(i * 0x1_0000);
        let queue = |i: u64| MockSplitQueue::create(mem, base(i), QUEUE_SIZE);
        let avail = [0, 1, 2].map(|i| base(i).unchecked_add(0x2000));
        let used = [0, 1, 2].map(|i| base(i).unchecked_add(0x3000));
        for addr in avail.iter().chain(used.iter()) {
            // flags and idx
            mem.write_obj(0u32, *addr).expect("ring header");
        }
        Driver {
            mem,
            queues: [queue(0), queue(1), queue(2)],
            avail,
            used,
            rings: [RingState::default(); 3],
            next_buf: BUF_START,
            rx_bufs: HashMap::new(),
        }
    }

    /// The available ring of queue `q` (0 = RX, 1 = TX, 2 = event), for tests that play a
    /// driver re-offering buffers behind the `Driver`'s back.
    pub fn avail_addr(&self, q: usize) -> GuestAddress {
        self.avail[q]
    }

    /// Fresh `Queue`s for the three rings plus a recording interrupt.
    pub fn queues(&self) -> (Vec<Queue>, Arc<RecordingInterrupt>) {
        let queues = (0..3)
            .map(|i| {
                let mut q = Queue::new(QUEUE_SIZE).expect("queue");
                q.try_set_desc_table_address(self.queues[i].desc_table_addr())
                    .expect("desc table");
                q.try_set_avail_ring_address(self.avail[i]).expect("avail");
                q.try_set_used_ring_address(self.used[i]).expect("used");
                q.set_ready(true);
                q
            })
            .collect();
        (queues, Arc::new(RecordingInterrupt::default()))
    }

    /// Activates `dev` with the three queues; returns its interrupt.
    pub fn activate<D: VirtioDevice + ?Sized>(&self, dev: &mut D) -> Arc<RecordingInterrupt> {
        let (queues, irq) = self.queues();
        dev.activate(self.mem.clone(), queues, irq.clone())
            .expect("activate");
        irq
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).max(1);
        if self.next_buf + len > TEST_MEM_SIZE as u64 {
            self.next_buf = BUF_START;
        }
        let addr = self.next_buf;
        self.next_buf = (addr + len + 15) & !15;
        addr
    }

    /// Makes a chain of `(addr, len, writable)` descriptors available on queue `q`.
    fn add_chain(&mut self, q: usize, descs: &[(u64, u32, bool)]) -> u16 {
        let n = descs.len() as u16;
        assert!(n > 0 && n <= QUEUE_SIZE);
        let ring = &mut self.rings[q];
        if ring.next_desc + n > QUEUE_SIZE {
            ring.next_desc = 0;
        }
        let head = ring.next_desc;
        for (i, &desc) in descs.iter().enumerate() {
            let index = head + i as u16;
            self.queues[q]
                .desc_table()
                .store(index, chain_desc(i, descs.len(), desc, index + 1))
                .expect("descriptor");
        }
        ring.next_desc = (head + n) % QUEUE_SIZE;
        let avail = self.avail[q];
        let slot = 4 + 2 * u64::from(ring.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head.to_le(), avail.unchecked_add(slot))
            .expect("avail ring");
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(ring.avail_idx.to_le(), avail.unchecked_add(2))
            .expect("avail idx");
        head
    }

    /// Sends a TX packet with header and data in one descriptor. `hdr.len` is sent as is.
    pub fn send(&mut self, hdr: &VsockHeader, data: &[u8]) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.send_raw(&[(bytes, false)]);
    }

    /// Sends a TX packet with header and data in separate descriptors.
    pub fn send_split(&mut self, hdr: &VsockHeader, data: &[u8]) {
        let mut parts = vec![(hdr.to_bytes().to_vec(), false)];
        if !data.is_empty() {
            parts.push((data.to_vec(), false));
        }
        self.send_raw(&parts);
    }

    /// Sends a TX chain of descriptors with the given contents and writability.
    pub fn send_raw(&mut self, parts: &[(Vec<u8>, bool)]) {
        let descs: Vec<(u64, u32, bool)> = parts
            .iter()
            .map(|(bytes, writable)| {
                let len = bytes.len() as u32;
                let addr = self.alloc(len);
                self.mem
                    .write_slice(bytes, GuestAddress(addr))
                    .expect("write");
                (addr, len, *writable)
            })
            .collect();
        self.add_chain(TX, &descs);
    }

    /// Sends a TX chain of raw `(addr, len, writable)` descriptors (may point anywhere).
    pub fn send_descs(&mut self, descs: &[(u64, u32, bool)]) {
        self.add_chain(TX, descs);
    }

    /// Posts `count` RX buffers of `size` bytes each (one descriptor per chain).
    pub fn add_rx(&mut self, count: usize, size: u32) {
        for _ in 0..count {
            self.add_rx_raw(&[size]);
        }
    }

    /// Posts one RX chain of writable descriptors of `lens` bytes.
    pub fn add_rx_raw(&mut self, lens: &[u32]) {
        let descs: Vec<(u64, u32, bool)> = lens
            .iter()
            .map(|&len| (self.alloc(len), len, true))
            .collect();
        let head = self.add_chain(RX, &descs);
        self.rx_bufs
            .insert(head, descs.iter().map(|&(a, l, _)| (a, l)).collect());
    }

    fn used_idx(&self, q: usize) -> u16 {
        let used = self.used[q];
        u16::from_le(self.mem.read_obj(used.unchecked_add(2)).expect("used idx"))
    }

    /// New used entries `(id, len)` of queue `q`.
    fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = self.used[q];
        let idx = self.used_idx(q);
        let mut out = Vec::new();
        while self.rings[q].used_seen != idx {
            let slot = 4 + 8 * u64::from(self.rings[q].used_seen % QUEUE_SIZE);
            let id: u32 = self.mem.read_obj(used.unchecked_add(slot)).expect("id");
            let len: u32 = self
                .mem
                .read_obj(used.unchecked_add(slot + 4))
                .expect("len");
            out.push((u32::from_le(id), u32::from_le(len)));
            self.rings[q].used_seen = self.rings[q].used_seen.wrapping_add(1);
        }
        out
    }

    /// Posts one event buffer of `len` bytes on the event queue and returns its address.
    pub fn add_event_buffer(&mut self, len: u32) -> u64 {
        let addr = self.alloc(len);
        self.add_chain(EV, &[(addr, len, true)]);
        addr
    }

    /// New used entries of the event queue.
    pub fn event_used(&mut self) -> Vec<(u32, u32)> {
        self.take_used(EV)
    }

    /// New used entries of the TX queue.
    pub fn tx_used(&mut self) -> Vec<(u32, u32)> {
        self.take_used(TX)
    }

    /// Total RX buffers the device has used so far.
    pub fn rx_used_total(&self) -> u16 {
        self.used_idx(RX)
    }

    /// RX buffers posted and not used yet.
    pub fn rx_outstanding(&self) -> u16 {
        self.rings[RX].avail_idx.wrapping_sub(self.used_idx(RX))
    }

    /// Packets the device wrote into RX buffers since the last call (empty used buffers
    /// are skipped).
    pub fn recv(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        let mut out = Vec::new();
        for (id, len) in self.take_used(RX) {
            let Some(descs) = self.rx_bufs.remove(&(id as u16)) else {
                continue;
            };
            let mut bytes = Vec::new();
            let mut left = len as usize;
            for (addr, dlen) in descs {
                let take = left.min(dlen as usize);
                let mut chunk = vec![0u8; take];
                self.mem
                    .read_slice(&mut chunk, GuestAddress(addr))
                    .expect("read");
                bytes.extend_from_slice(&chunk);
                left -= take;
            }
            if bytes.len() < PKT_HEADER_SIZE {
                continue;
            }
            let raw: [u8; PKT_HEADER_SIZE] = bytes[..PKT_HEADER_SIZE].try_into().expect("size");
            out.push((
                VsockHeader::from_bytes(&raw),
                bytes.split_off(PKT_HEADER_SIZE),
            ));
        }
        out
    }

    /// Makes the TX avail index jump past the ring size (a corrupt queue).
    pub fn corrupt_tx_avail_idx(&mut self) {
        let avail = self.avail[TX];
        let bad = self.rings[TX].avail_idx.wrapping_add(QUEUE_SIZE + 1);
        self.mem
            .write_obj(bad.to_le(), avail.unchecked_add(2))
            .expect("avail idx");
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("sbx-vsock-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
