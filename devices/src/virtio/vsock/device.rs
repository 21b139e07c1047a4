// SPDX-License-Identifier: Apache-2.0
//! The virtio-vsock device (virtio 1.2 §5.10): feature bits, configuration space (`guest_cid`),
//! activation, and the queue processing that moves packets between the guest and a
//! [`VsockBackend`].
//!
//! Queues (§5.10.2): 0 = RX (device -> driver), 1 = TX (driver -> device), 2 = event. The one
//! event, `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (§5.10.6.7), is never sent, not even to a VM
//! cloned from a template: a template is saved only with no connection open (the VMM's
//! Snapshot refuses otherwise), so the clone's guest has no connected socket that the new host
//! side lacks, and a reset would only race with the host's first connection to the clone (Linux
//! resets every connected socket when it handles the event, the host's new one included: seen
//! as the clone's agent connection closing under the first call). A VM restored from a live
//! handover, whose guest does have connections the new host side lacks, gets one RST per such
//! connection instead ([`super::VsockMuxer::reset_stale`]), ahead of any other packet.
//!
//! Like virtio-blk and virtio-net, each call handles at most `BUDGET` chains per queue and
//! then kicks the device's notify EventFd, so a guest that keeps its rings full cannot hold the VMM
//! thread (other devices, the VMM API) for longer than one budget: the rest is handled on the
//! next turn of the event loop. A device whose queues turned out corrupt
//! (`DEVICE_NEEDS_RESET`) touches no queue until the driver resets it.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fmt;
use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::backend::VsockBackend;
use super::defs::{CONFIG_SPACE_SIZE, MAX_PKT_DATA_SIZE, NUM_QUEUES, QUEUE_SIZE};
use super::packet::{self, PacketError, RxBuffer, read_tx_packet};
use super::{LogLimiter, VsockError, VsockMetrics, validate_guest_cid};
use crate::GuestMemoryMmap;
use crate::virtio::base::{VirtioBase, delegate_virtio_base, read_config_bytes};
use crate::virtio::queue::{ChainBuffers, GuestView, RingPass, drain_queue};
use crate::virtio::{ActivateError, Interrupt, InterruptKind, VirtioDevice};

/// Queues and memory of an activated device.
struct ActiveState {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    evq: Queue,
    interrupt: Arc<dyn Interrupt>,
}

/// A virtio-vsock device over backend `B`.
pub struct Vsock<B: VsockBackend> {
    guest_cid: u64,
    backend: B,
    pub(super) base: VirtioBase,
    active: Option<ActiveState>,
    needs_reset: bool,
    /// Bounce buffer for one packet's data (the backend works on host memory), grown to the
    /// largest packet seen ([`packet::grow`], at most [`MAX_PKT_DATA_SIZE`]).
    scratch: Vec<u8>,
    /// Every chain is gathered into this one (its storage is reused).
    chain: ChainBuffers,
    metrics: Arc<VsockMetrics>,
    log: LogLimiter,
    /// Whether the queue and backend fds are registered with the event manager.
    pub(crate) runtime_events_registered: bool,
}

impl<B: VsockBackend> fmt::Debug for Vsock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("backend", &self.backend)
            .field("acked_features", &self.base.acked_features())
            .field("activated", &self.active.is_some())
            .field("needs_reset", &self.needs_reset)
            .finish_non_exhaustive()
    }
}

/// Queue sizes offered for RX, TX and event queues.
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Chains handled per call and queue before yielding to other devices on the event loop (the
/// same bound as virtio-net's).
const BUDGET: usize = 4 * QUEUE_SIZE as usize;

impl<B: VsockBackend> Vsock<B> {
    /// Creates the device for a guest with `guest_cid`, served by `backend`.
    pub fn new(guest_cid: u64, backend: B) -> Result<Self, VsockError> {
        validate_guest_cid(guest_cid)?;
        Ok(Vsock {
            guest_cid,
            backend,
            base: VirtioBase::new(1u64 << VIRTIO_F_VERSION_1, &QUEUE_SIZES)
                .map_err(VsockError::CreateEventFd)?,
            active: None,
            needs_reset: false,
            scratch: Vec::new(),
            chain: ChainBuffers::default(),
            metrics: Arc::new(VsockMetrics::default()),
            log: LogLimiter::default(),
            runtime_events_registered: false,
        })
    }

    /// The guest CID in the configuration space.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (tests and fuzzing drive it directly).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The device's counters (queue-level; the muxer keeps its own).
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// Takes the guest's TX packets and hands them to the backend. Returns whether the driver
    /// wants a used buffer notification.
    pub fn process_tx(&mut self) -> bool {
        if self.needs_reset {
            return false;
        }
        let Some(mut active) = self.active.take() else {
            return false;
        };
        let max_descs = usize::from(active.txq.size());
        let (backend, scratch, metrics, log) = (
            &mut self.backend,
            &mut self.scratch,
            &self.metrics,
            &mut self.log,
        );
        let drained = drain_queue(
            &mut active.txq,
            GuestView::new(&active.mem),
            BUDGET,
            max_descs,
            &mut self.chain,
            |chain, view| {
                let packet = chain
                    .map_err(PacketError::InvalidChain)
                    .and_then(|chain| read_tx_packet(view, chain, scratch));
                match packet {
                    Ok((hdr, len)) => {
                        VsockMetrics::inc(&metrics.tx_packets);
                        let data = scratch.get(..len).unwrap_or_default();
                        backend.send_pkt(&hdr, data);
                    }
                    Err(e) => {
                        VsockMetrics::inc(&metrics.tx_malformed);
                        if log.allow() {
                            warn!("vsock: dropping malformed TX packet: {e}");
                        }
                    }
                }
                0
            },
        );
        if drained.budget_spent {
            // Come back on the next turn of the event loop, through our own notify EventFd.
            self.base.kick();
        }
        if let Some(e) = drained.corrupt {
            self.queue_error(&active.interrupt, format_args!("TX queue is corrupt: {e}"));
        }
        self.active = Some(active);
        drained.notify
    }

    /// Fills the guest's RX buffers with packets from the backend. Returns whether the driver
    /// wants a used buffer notification.
    pub fn process_rx(&mut self) -> bool {
        if self.needs_reset || !self.backend.has_pending_rx() {
            return false;
        }
        let Some(mut active) = self.active.take() else {
            return false;
        };
        let notify = self.rx_pass(&mut active);
        self.active = Some(active);
        notify
    }

    /// The loop of [`Vsock::process_rx`], on one pass over the RX queue; returns whether the
    /// driver wants a used buffer notification. After `BUDGET` buffers it kicks the notify
    /// EventFd and stops.
    fn rx_pass(&mut self, active: &mut ActiveState) -> bool {
        let mut ring = match RingPass::new(&mut active.rxq, GuestView::new(&active.mem)) {
            Ok(ring) => ring,
            Err(e) => {
                self.queue_error(&active.interrupt, format_args!("RX queue is corrupt: {e}"));
                return false;
            }
        };
        let max_descs = usize::from(ring.queue_size());
        let mut corrupt = None;
        let mut budget = BUDGET;
        while self.backend.has_pending_rx() {
            if budget == 0 {
                // Come back on the next turn of the event loop, through our own notify EventFd.
                self.base.kick();
                break;
            }
            let head = match ring.pop() {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(e) => {
                    corrupt = Some(e);
                    break;
                }
            };
            let view = *ring.view();
            let buffer = ring
                .chain_into(head, max_descs, &mut self.chain)
                .map_err(PacketError::InvalidChain)
                .and_then(|()| RxBuffer::new(&view, &self.chain));
            let used_len = match buffer {
                Ok(buffer) => {
                    let capacity = buffer.data_capacity().min(MAX_PKT_DATA_SIZE);
                    packet::grow(&mut self.scratch, capacity);
                    let data = self.scratch.get_mut(..capacity).unwrap_or_default();
                    let Some((hdr, len)) = self.backend.recv_pkt(data) else {
                        // Nothing after all: give the buffer back for later.
                        ring.undo_pop();
                        break;
                    };
                    let data = data.get(..len).unwrap_or_default();
                    match buffer.write_packet(&hdr, data) {
                        Ok(n) => {
                            VsockMetrics::inc(&self.metrics.rx_packets);
                            n
                        }
                        Err(e) => {
                            // The packet is lost; only this guest's connection suffers.
                            VsockMetrics::inc(&self.metrics.rx_bad_buffers);
                            if self.log.allow() {
                                warn!("vsock: cannot write an RX packet: {e}");
                            }
                            0
                        }
                    }
                }
                Err(e) => {
                    VsockMetrics::inc(&self.metrics.rx_bad_buffers);
                    if self.log.allow() {
                        warn!("vsock: unusable RX buffer: {e}");
                    }
                    0
                }
            };
            if let Err(e) = ring.add_used(head, used_len) {
                corrupt = Some(e);
                break;
            }
            budget = budget.saturating_sub(1);
            // The driver may be polling the used ring: let it see every packet at once.
            if let Err(e) = ring.publish() {
                corrupt = Some(e);
                break;
            }
        }
        if let Err(e) = ring.publish() {
            corrupt.get_or_insert(e);
        }
        let notify = ring.used_any() && ring.needs_notification().unwrap_or(true);
        if let Some(e) = corrupt {
            self.queue_error(&active.interrupt, format_args!("RX queue is corrupt: {e}"));
        }
        notify
    }

    /// The driver's queue is unusable: count it, log it (rate limited), report
    /// `DEVICE_NEEDS_RESET` and tell the driver through a configuration change notification
    /// (virtio 1.2 §2.1.2: the device MUST send one after setting it), as blk and net do.
    fn queue_error(&mut self, interrupt: &Arc<dyn Interrupt>, what: fmt::Arguments<'_>) {
        self.needs_reset = true;
        VsockMetrics::inc(&self.metrics.queue_errors);
        if self.log.allow() {
            warn!("vsock: {what}");
        }
        match interrupt.trigger(InterruptKind::Config) {
            Err(e) if self.log.allow() => warn!("vsock: cannot signal the guest: {e}"),
            _ => {}
        }
    }

    fn signal_used(&mut self) {
        let Some(active) = &self.active else {
            return;
        };
        match active.interrupt.trigger(InterruptKind::Queue) {
            Err(e) if self.log.allow() => warn!("vsock: cannot signal the guest: {e}"),
            _ => {}
        }
    }

    /// The driver added TX buffers: forward them, then deliver whatever the backend has.
    pub fn handle_txq_event(&mut self) {
        let tx = self.process_tx();
        let rx = self.process_rx();
        if tx || rx {
            self.signal_used();
        }
    }

    /// The driver added RX buffers.
    pub fn handle_rxq_event(&mut self) {
        if self.process_rx() {
            self.signal_used();
        }
    }

    /// The backend's fd is ready.
    pub fn handle_backend_event(&mut self, events: EventSet) {
        self.backend.notify(events);
        if self.process_rx() {
            self.signal_used();
        }
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    delegate_virtio_base!(base);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config: [u8; CONFIG_SPACE_SIZE] = self.guest_cid.to_le_bytes();
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // `guest_cid` is read-only for the driver.
        if self.log.allow() {
            warn!(
                "vsock: ignoring a {}-byte config write at offset {offset}",
                data.len()
            );
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        for (index, queue) in queues.iter().enumerate() {
            if !queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(index));
            }
        }
        // Queue order is fixed by the spec: RX, TX, event.
        let mut queues = queues.into_iter();
        let (Some(rxq), Some(txq), Some(evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: 0,
            });
        };
        self.active = Some(ActiveState {
            mem,
            rxq,
            txq,
            evq,
            interrupt,
        });
        self.needs_reset = false;
        self.base.signal_activate()
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) -> Result<(), ActivateError> {
        self.active = None;
        self.base.reset_features();
        self.needs_reset = false;
        self.backend.reset();
        Ok(())
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active
            .iter()
            .flat_map(|a| [&a.rxq, &a.txq, &a.evq])
            .map(crate::virtio::queue_position)
            .collect()
    }
}

#[cfg(test)]
#[expect(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "test code"
)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};

    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::virtio::VIRTIO_MMIO_INT_CONFIG;
    use crate::virtio::vsock::defs::{OP_REQUEST, OP_RW, RXQ_INDEX, TXQ_INDEX};
    use crate::virtio::vsock::packet::VsockHeader;
    use crate::virtio::vsock::test_utils::{Driver, TestVsockBackend, hdr, test_mem};

    fn device() -> Vsock<TestVsockBackend> {
        Vsock::new(3, TestVsockBackend::new()).unwrap()
    }

    /// A guest that never lets a ring run dry: each time the device takes a TX packet, and
    /// each time it fills an RX buffer, the same chain (head 0, the first one the `Driver`
    /// posted) is offered again at once. With `endless_rx` the host always has a packet.
    #[derive(Debug)]
    struct Refilling {
        inner: TestVsockBackend,
        mem: GuestMemoryMmap,
        tx_avail: GuestAddress,
        rx_avail: GuestAddress,
        endless_rx: bool,
    }

    impl Refilling {
        fn new(mem: &GuestMemoryMmap, drv: &Driver<'_>, endless_rx: bool) -> Self {
            Refilling {
                inner: TestVsockBackend::new(),
                mem: mem.clone(),
                tx_avail: drv.avail_addr(TXQ_INDEX),
                rx_avail: drv.avail_addr(RXQ_INDEX),
                endless_rx,
            }
        }

        /// Makes descriptor chain 0 available once more on the ring at `avail`.
        fn offer_again(&self, avail: GuestAddress) {
            let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
            let slot = 4 + 2 * u64::from(idx % QUEUE_SIZE);
            self.mem.write_obj(0u16, avail.unchecked_add(slot)).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
                .unwrap();
        }
    }

    impl AsRawFd for Refilling {
        fn as_raw_fd(&self) -> RawFd {
            self.inner.as_raw_fd()
        }
    }

    impl VsockBackend for Refilling {
        fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(VsockHeader, usize)> {
            if self.endless_rx {
                self.offer_again(self.rx_avail);
                return Some((hdr(2, 52, 1000, OP_RW), 0));
            }
            self.inner.recv_pkt(data)
        }

        fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) {
            self.inner.send_pkt(hdr, data);
            self.offer_again(self.tx_avail);
        }

        fn has_pending_rx(&self) -> bool {
            self.endless_rx || self.inner.has_pending_rx()
        }

        fn notify(&mut self, events: EventSet) {
            self.inner.notify(events);
        }

        fn reset(&mut self) {
            self.inner.reset();
        }
    }

    #[test]
    fn identity_features_and_config() {
        let mut dev = device();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
        assert!(
            dev.notify_event().is_some(),
            "one notify EventFd for the three queues"
        );
        assert_eq!(dev.avail_features(), 1 << 32);
        dev.set_acked_features(u64::MAX);
        assert_eq!(dev.acked_features(), 1 << 32);

        let mut cid = [0xffu8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);
        let mut tail = [0xffu8; 4];
        dev.read_config(6, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
        dev.write_config(0, &[9; 8]);
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);
        assert!(matches!(
            Vsock::new(1, TestVsockBackend::new()),
            Err(VsockError::InvalidGuestCid(1))
        ));
    }

    #[test]
    fn activate_checks_queues() {
        let mem = test_mem();
        let drv = Driver::new(&mem);
        let mut dev = device();
        let (queues, irq) = drv.queues();
        let two: Vec<Queue> = queues.into_iter().take(2).collect();
        assert!(matches!(
            dev.activate(mem.clone(), two, irq),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 2
            })
        ));
        let (mut queues, irq) = drv.queues();
        queues[1].set_ready(false);
        queues[1].set_size(3);
        assert!(matches!(
            dev.activate(mem.clone(), queues, irq),
            Err(ActivateError::InvalidQueue(1))
        ));
        assert!(!dev.is_activated());
        let irq = drv.activate(&mut dev);
        assert!(dev.is_activated());
        assert_eq!(dev.notify_event().unwrap().read().unwrap(), 1);
        assert_eq!(irq.count(), 0);
        dev.reset().unwrap();
        assert!(!dev.is_activated());
        assert_eq!(dev.backend().resets, 1);
    }

    #[test]
    fn tx_packets_reach_backend_and_buffers_are_returned() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = device();
        let irq = drv.activate(&mut dev);
        let mut h = hdr(3, 1000, 52, OP_RW);
        h.len = 4;
        drv.send(&h, b"ping");
        drv.send_split(&hdr(3, 1001, 52, OP_REQUEST), &[]);
        dev.handle_txq_event();
        let sent = &dev.backend().sent;
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0], (h, b"ping".to_vec()));
        assert_eq!(sent[1].0.op, OP_REQUEST);
        assert_eq!(drv.tx_used().len(), 2);
        assert_eq!(irq.count(), 1);
        assert_eq!(
            dev.metrics()
                .tx_packets
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn the_packet_buffer_grows_with_the_packets_and_no_further() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = device();
        assert!(dev.scratch.is_empty(), "no buffer before a packet");
        let _irq = drv.activate(&mut dev);
        let mut h = hdr(3, 1000, 52, OP_RW);
        h.len = 100;
        drv.send(&h, &[7u8; 100]);
        dev.handle_txq_event();
        assert_eq!(dev.scratch.len(), 128);
        h.len = 5000;
        drv.send(&h, &[8u8; 5000]);
        dev.handle_txq_event();
        assert_eq!(dev.scratch.len(), 8192);
        h.len = 10;
        drv.send(&h, &[9u8; 10]);
        dev.handle_txq_event();
        assert_eq!(dev.scratch.len(), 8192, "it never shrinks");
        let sent = &dev.backend().sent;
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[1].1, vec![8u8; 5000]);
        assert_eq!(sent[2].1, vec![9u8; 10]);
    }

    #[test]
    fn malformed_tx_chains_are_dropped_and_returned() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = device();
        let _irq = drv.activate(&mut dev);
        // Short header, zero-length descriptor, len beyond the chain, write-only chain.
        drv.send_raw(&[(vec![0u8; 20], false)]);
        drv.send_raw(&[(Vec::new(), false)]);
        let mut h = hdr(3, 1, 2, OP_RW);
        h.len = 100;
        drv.send_raw(&[(h.to_bytes().to_vec(), false), (vec![1u8; 50], false)]);
        drv.send_raw(&[(vec![0u8; 64], true)]);
        dev.handle_txq_event();
        assert!(dev.backend().sent.is_empty());
        let used = drv.tx_used();
        assert_eq!(used.len(), 4);
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!(
            dev.metrics()
                .tx_malformed
                .load(std::sync::atomic::Ordering::Relaxed),
            4
        );
        assert!(!dev.needs_reset());
    }

    #[test]
    fn rx_waits_for_buffers_and_skips_bad_ones() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = device();
        let irq = drv.activate(&mut dev);
        let mut h = hdr(2, 52, 1000, OP_RW);
        h.dst_cid = 3;
        dev.backend_mut().queue_rx(h, b"pong".to_vec());
        // No RX buffers yet: nothing happens.
        dev.handle_backend_event(EventSet::IN);
        assert_eq!(irq.count(), 0);
        assert_eq!(dev.backend().rx.len(), 1);
        // One useless buffer (too small), then a good one.
        drv.add_rx_raw(&[43]);
        drv.add_rx(1, 4096);
        dev.handle_rxq_event();
        let got = drv.recv();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, VsockHeader { len: 4, ..h });
        assert_eq!(got[0].1, b"pong");
        assert_eq!(irq.count(), 1);
        // The good buffer is consumed, the bad one returned empty; no buffers left over.
        assert_eq!(drv.rx_used_total(), 2);
        // With nothing pending, a spare buffer stays available.
        drv.add_rx(1, 4096);
        dev.handle_rxq_event();
        assert_eq!(drv.rx_used_total(), 2);
    }

    #[test]
    fn corrupt_avail_index_needs_reset() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = device();
        let _irq = drv.activate(&mut dev);
        drv.corrupt_tx_avail_idx();
        dev.handle_txq_event();
        assert!(dev.needs_reset());
        dev.reset().unwrap();
        assert!(!dev.needs_reset());
    }

    #[test]
    fn a_guest_that_keeps_refilling_tx_gets_one_budget_per_pass() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = Vsock::new(3, Refilling::new(&mem, &drv, false)).unwrap();
        let irq = drv.activate(&mut dev);
        let kick = dev.notify_event().unwrap().try_clone().unwrap();
        assert_eq!(kick.read().unwrap(), 1, "the activation's wake-up");
        drv.send(&hdr(3, 1000, 52, OP_RW), &[]);
        dev.handle_txq_event();
        // The ring never ran dry, yet the pass stopped at the budget and signalled the guest.
        assert_eq!(dev.backend().inner.sent.len(), BUDGET);
        assert_eq!(irq.count(), 1);
        // It re-armed itself through its notify EventFd: the event loop comes back to it on
        // its next turn without a guest notification, and that pass takes one budget more.
        assert_eq!(kick.read().unwrap(), 1);
        dev.handle_txq_event();
        assert_eq!(dev.backend().inner.sent.len(), 2 * BUDGET);
        assert_eq!(kick.read().unwrap(), 1);
        assert!(!dev.needs_reset());
    }

    #[test]
    fn a_guest_that_keeps_refilling_rx_gets_one_budget_per_pass() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = Vsock::new(3, Refilling::new(&mem, &drv, true)).unwrap();
        let irq = drv.activate(&mut dev);
        let kick = dev.notify_event().unwrap().try_clone().unwrap();
        assert_eq!(kick.read().unwrap(), 1, "the activation's wake-up");
        drv.add_rx(1, 4096);
        dev.handle_backend_event(EventSet::IN);
        assert_eq!(usize::from(drv.rx_used_total()), BUDGET);
        assert_eq!(irq.count(), 1);
        assert_eq!(kick.read().unwrap(), 1);
        dev.handle_rxq_event();
        assert_eq!(usize::from(drv.rx_used_total()), 2 * BUDGET);
        assert!(!dev.needs_reset());
    }

    #[test]
    fn a_device_that_needs_reset_processes_nothing() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = device();
        let irq = drv.activate(&mut dev);
        drv.corrupt_tx_avail_idx();
        dev.handle_txq_event();
        assert!(dev.needs_reset());
        // The driver is told (§2.1.2), with a configuration change notification only.
        assert_eq!(irq.count(), 1);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        let irqs = irq.count();

        // The driver (or a hostile one) keeps posting valid work on both queues.
        let mut h = hdr(3, 1000, 52, OP_RW);
        h.len = 4;
        drv.send(&h, b"ping");
        drv.add_rx(2, 4096);
        dev.backend_mut()
            .queue_rx(hdr(2, 52, 1000, OP_RW), b"pong".to_vec());
        assert!(!dev.process_tx());
        assert!(!dev.process_rx());
        dev.handle_txq_event();
        dev.handle_rxq_event();
        dev.handle_backend_event(EventSet::IN);
        assert!(dev.backend().sent.is_empty());
        assert!(drv.tx_used().is_empty());
        assert_eq!(drv.rx_used_total(), 0);
        assert_eq!(dev.backend().rx.len(), 1);
        assert_eq!(irq.count(), irqs);
        assert!(dev.needs_reset());
        // The backend fd is still drained, so it cannot keep the event loop busy.
        assert_eq!(dev.backend().notified, 1);

        // After the driver's reset and a new activation, the device works again.
        dev.reset().unwrap();
        let mut drv = Driver::new(&mem);
        let _irq = drv.activate(&mut dev);
        drv.send(&h, b"ping");
        dev.handle_txq_event();
        assert_eq!(dev.backend().sent.len(), 1);
    }

    #[test]
    fn a_restored_device_sends_no_transport_reset() {
        let mem = test_mem();
        let mut drv = Driver::new(&mem);
        let mut dev = device();
        let irq = drv.activate(&mut dev);
        drv.add_event_buffer(8);
        dev.restored();
        assert!(drv.event_used().is_empty());
        assert_eq!(irq.count(), 0);
        assert_eq!(dev.queue_positions(), [(0, 0), (0, 0), (0, 0)]);
    }

    #[test]
    fn queues_are_ignored_before_activation() {
        let mut dev = device();
        dev.backend_mut().queue_rx(hdr(2, 1, 2, OP_RW), Vec::new());
        assert!(!dev.process_rx());
        assert!(!dev.process_tx());
        dev.handle_backend_event(EventSet::IN);
        assert_eq!(dev.backend().notified, 1);
    }
}
