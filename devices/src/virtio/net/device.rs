// SPDX-License-Identifier: Apache-2.0
//! The virtio-net device (virtio 1.2 §5.1): features, configuration space (MAC, link status,
//! MTU), activation, and the RX/TX queues over a [`NetBackend`].
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::NetError;
use super::backend::NetBackend;
use super::defs::{
    MAX_BUFFER_LEN, NET_HDR_LEN, QUEUE_SIZE, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use super::packet::{RxChains, RxOutcome, TxError, deliver_rx_frame, read_tx_frame};
use crate::GuestMemoryMmap;
use crate::virtio::base::{VirtioBase, delegate_virtio_base, read_config_bytes};
use crate::virtio::queue::{ChainBuffers, GuestView, RingPass, drain_queue};
use crate::virtio::{
    ActivateError, Interrupt, InterruptKind, VIRTIO_F_VERSION_1, VirtioDevice, guest_warn,
};

/// virtio device id of a network device (§5.1.1).
pub const VIRTIO_ID_NET: u32 = 1;
/// Frames handled per call and direction before yielding to other devices.
const BUDGET: usize = 4 * QUEUE_SIZE as usize;
/// Size of the configuration space: mac, status, max_virtqueue_pairs, mtu (§5.1.4).
const CONFIG_SIZE: usize = 12;

/// User configuration of a network device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// MTU advertised to the guest (`VIRTIO_NET_F_MTU`), if any.
    pub mtu: Option<u16>,
}

/// Counters of a network device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (including virtio headers).
    pub rx_bytes: u64,
    /// Frames from the backend that were dropped.
    pub rx_dropped: u64,
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Bytes sent to the backend.
    pub tx_bytes: u64,
    /// TX chains that were malformed or failed to send.
    pub tx_dropped: u64,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn Interrupt>,
}

/// A virtio-net device.
#[derive(Debug)]
pub struct VirtioNet {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    mtu: Option<u16>,
    link_up: bool,
    pub(super) base: VirtioBase,
    active: Option<Active>,
    needs_reset: bool,
    /// The one RX frame buffer: header + frame, `rx_len` bytes valid when non-zero.
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// The chains of the RX frame being delivered (kept to reuse their storage).
    rx_chains: RxChains,
    tx_buf: Vec<u8>,
    metrics: NetMetrics,
    /// Whether the queue and backend fds are registered with the event loop.
    pub(super) fds_registered: bool,
}

impl VirtioNet {
    /// Creates the device. Offloads are offered only if the backend carries virtio headers.
    pub fn new(config: NetConfig, backend: Box<dyn NetBackend>) -> Result<Self, NetError> {
        let mut avail_features =
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF;
        if let Some(mtu) = config.mtu {
            if mtu < 68 {
                return Err(NetError::Mtu(mtu));
            }
            avail_features |= VIRTIO_NET_F_MTU;
        }
        if backend.has_vnet_hdr() {
            avail_features |= VIRTIO_NET_F_CSUM
                | VIRTIO_NET_F_GUEST_CSUM
                | VIRTIO_NET_F_GUEST_TSO4
                | VIRTIO_NET_F_GUEST_TSO6
                | VIRTIO_NET_F_GUEST_ECN
                | VIRTIO_NET_F_HOST_TSO4
                | VIRTIO_NET_F_HOST_TSO6
                | VIRTIO_NET_F_HOST_ECN;
        }
        Ok(VirtioNet {
            backend,
            mac: config.mac,
            mtu: config.mtu,
            link_up: true,
            base: VirtioBase::new(avail_features, &[QUEUE_SIZE, QUEUE_SIZE])
                .map_err(NetError::EventFd)?,
            active: None,
            needs_reset: false,
            rx_buf: Vec::new(),
            rx_len: 0,
            rx_chains: RxChains::default(),
            tx_buf: Vec::new(),
            metrics: NetMetrics::default(),
            fds_registered: false,
        })
    }

    /// The MAC and MTU it was created with (a VM rebuilt after a handover gets the same).
    pub fn config(&self) -> NetConfig {
        NetConfig {
            mac: self.mac,
            mtu: self.mtu,
        }
    }

    /// The backend (its fd is registered with the event loop on activation).
    pub fn backend(&self) -> &dyn NetBackend {
        self.backend.as_ref()
    }

    /// Counters.
    pub fn metrics(&self) -> NetMetrics {
        self.metrics
    }

    /// Whether the link is reported up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Changes the link status in configuration space and tells the driver.
    pub fn set_link_up(&mut self, up: bool) {
        if self.link_up == up {
            return;
        }
        self.link_up = up;
        if let Some(active) = &self.active
            && let Err(e) = active.interrupt.trigger(InterruptKind::Config)
        {
            log::error!("virtio-net: config interrupt failed: {e}");
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        let [m0, m1, m2, m3, m4, m5] = self.mac;
        let [s0, s1] = status.to_le_bytes();
        // max_virtqueue_pairs only matters with VIRTIO_NET_F_MQ; report the one pair anyway.
        let [p0, p1] = 1u16.to_le_bytes();
        let [u0, u1] = self.mtu.unwrap_or(0).to_le_bytes();
        [m0, m1, m2, m3, m4, m5, s0, s1, p0, p1, u0, u1]
    }

    /// `TUN_F_*` flags for the receive offloads the driver accepted. The kernel refuses TSO
    /// without checksum offload, and so does the spec (§5.1.3.1).
    fn tun_offload_flags(acked: u64) -> u32 {
        let mut flags = 0;
        if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
            flags |= libc::TUN_F_CSUM;
            if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                flags |= libc::TUN_F_TSO4;
            }
            if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                flags |= libc::TUN_F_TSO6;
            }
            if acked & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6) != 0
                && acked & VIRTIO_NET_F_GUEST_ECN != 0
            {
                flags |= libc::TUN_F_TSO_ECN;
            }
        }
        flags
    }

    fn set_needs_reset(&mut self, interrupt: &Arc<dyn Interrupt>, why: &dyn std::fmt::Display) {
        guest_warn!("virtio-net: queue corrupt, device needs reset: {why}");
        self.needs_reset = true;
        if let Err(e) = interrupt.trigger(InterruptKind::Config) {
            log::error!("virtio-net: config interrupt failed: {e}");
        }
    }

    /// Sends a used-buffer interrupt.
    pub fn signal_used_queue(&self) {
        if let Some(active) = &self.active
            && let Err(e) = active.interrupt.trigger(InterruptKind::Queue)
        {
            log::error!("virtio-net: queue interrupt failed: {e}");
        }
    }

    /// Moves frames from the backend into the RX queue until the backend is empty or the
    /// guest has no room (then the frame waits in the single RX buffer and the backend is not
    /// read again until the driver posts buffers). Returns whether to interrupt the driver.
    pub fn process_rx(&mut self) -> bool {
        if self.needs_reset {
            return false;
        }
        let Some(mut active) = self.active.take() else {
            return false;
        };
        if self.rx_buf.is_empty() {
            self.rx_buf.resize(MAX_BUFFER_LEN, 0);
        }
        let (needs_irq, corrupt) = self.rx_pass(&mut active);
        if let Some(e) = corrupt {
            self.set_needs_reset(&active.interrupt, &e);
        }
        self.active = Some(active);
        needs_irq
    }

    /// The loop of [`VirtioNet::process_rx`]: whether to interrupt, and the queue corruption
    /// that stopped it, if any. The RX ring is not touched unless a frame waits.
    fn rx_pass(&mut self, active: &mut Active) -> (bool, Option<virtio_queue::Error>) {
        let mergeable = self.base.acked_features() & VIRTIO_NET_F_MRG_RXBUF != 0;
        let mut budget = BUDGET;
        if !self.next_rx_frame(&mut budget) {
            return (false, None);
        }
        let mut ring = match RingPass::new(&mut active.rx, GuestView::new(&active.mem)) {
            Ok(ring) => ring,
            Err(e) => return (false, Some(e)),
        };
        let mut corrupt = None;
        loop {
            let frame = self.rx_buf.get(..self.rx_len).unwrap_or(&[]);
            match deliver_rx_frame(&mut ring, &mut self.rx_chains, frame, mergeable) {
                Ok(RxOutcome::Delivered(_)) => {
                    self.metrics.rx_frames = self.metrics.rx_frames.wrapping_add(1);
                    self.metrics.rx_bytes = self.metrics.rx_bytes.wrapping_add(self.rx_len as u64);
                    self.rx_len = 0;
                }
                Ok(RxOutcome::NoBuffers) => {
                    // Keep the frame; the driver's next RX notification resumes here.
                    break;
                }
                Ok(RxOutcome::TooLarge) => {
                    guest_warn!("virtio-net: RX frame of {} bytes does not fit", self.rx_len);
                    self.metrics.rx_dropped = self.metrics.rx_dropped.wrapping_add(1);
                    self.rx_len = 0;
                }
                Ok(RxOutcome::BadChain) => {
                    guest_warn!("virtio-net: malformed RX chain, frame dropped");
                    self.metrics.rx_dropped = self.metrics.rx_dropped.wrapping_add(1);
                    self.rx_len = 0;
                }
                Err(e) => {
                    corrupt = Some(e);
                    break;
                }
            }
            // The driver may be polling the used ring: let it see every frame at once.
            if let Err(e) = ring.publish() {
                corrupt = Some(e);
                break;
            }
            if !self.next_rx_frame(&mut budget) {
                break;
            }
        }
        if let Err(e) = ring.publish() {
            corrupt.get_or_insert(e);
        }
        let needs_irq = ring.used_any() && ring.needs_notification().unwrap_or(true);
        (needs_irq, corrupt)
    }

    /// Makes sure a frame waits in the RX buffer, reading the backend if needed; `false` when
    /// there is none, or when the pass's budget is spent (the notify EventFd is then kicked:
    /// the backend fd is edge-triggered, so the device must come back on its own).
    fn next_rx_frame(&mut self, budget: &mut usize) -> bool {
        // Without backend headers, leave room for one and hand the guest a zeroed header (no
        // offload information).
        let start = if self.backend.has_vnet_hdr() {
            0
        } else {
            NET_HDR_LEN
        };
        loop {
            if *budget == 0 {
                self.base.kick();
                return false;
            }
            *budget = budget.saturating_sub(1);
            if self.rx_len != 0 {
                return true;
            }
            let Some(buf) = self.rx_buf.get_mut(start..) else {
                return false;
            };
            match self.backend.recv(buf) {
                Ok(n) if n.saturating_add(start) >= NET_HDR_LEN => {
                    if let Some(hdr) = self.rx_buf.get_mut(..start) {
                        hdr.fill(0);
                    }
                    self.rx_len = n.saturating_add(start);
                    return true;
                }
                Ok(_) => {
                    self.metrics.rx_dropped = self.metrics.rx_dropped.wrapping_add(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("virtio-net: backend receive failed: {e}");
                    return false;
                }
            }
        }
    }

    /// Sends every frame in the TX queue to the backend. Returns whether to interrupt the
    /// driver.
    pub fn process_tx(&mut self) -> bool {
        if self.needs_reset {
            return false;
        }
        let Some(mut active) = self.active.take() else {
            return false;
        };
        if self.tx_buf.is_empty() {
            self.tx_buf.resize(MAX_BUFFER_LEN, 0);
        }
        let start = if self.backend.has_vnet_hdr() {
            0
        } else {
            NET_HDR_LEN
        };
        let max_descs = usize::from(active.tx.size());
        let (backend, tx_buf, metrics) = (&mut self.backend, &mut self.tx_buf, &mut self.metrics);
        let mut bufs = ChainBuffers::default();
        let drained = drain_queue(
            &mut active.tx,
            GuestView::new(&active.mem),
            BUDGET,
            max_descs,
            &mut bufs,
            |chain, view| {
                let read = chain
                    .map_err(TxError::Chain)
                    .and_then(|chain| read_tx_frame(chain, view, tx_buf));
                match read {
                    Ok(len) => {
                        let frame = tx_buf.get(start..len).unwrap_or(&[]);
                        match backend.send(frame) {
                            Ok(()) => {
                                metrics.tx_frames = metrics.tx_frames.wrapping_add(1);
                                metrics.tx_bytes =
                                    metrics.tx_bytes.wrapping_add(frame.len() as u64);
                            }
                            Err(e) => {
                                // The frame is lost, as on a congested wire; nothing is queued.
                                guest_warn!("virtio-net: backend send failed: {e}");
                                metrics.tx_dropped = metrics.tx_dropped.wrapping_add(1);
                            }
                        }
                    }
                    Err(e) => {
                        guest_warn!("virtio-net: bad TX chain: {e}");
                        metrics.tx_dropped = metrics.tx_dropped.wrapping_add(1);
                    }
                }
                0
            },
        );
        if drained.budget_spent {
            self.base.kick();
        }
        if let Some(e) = drained.corrupt {
            self.set_needs_reset(&active.interrupt, &e);
        }
        self.active = Some(active);
        drained.notify
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    delegate_virtio_base!(base);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only in legacy mode; virtio 1.x config is read-only here.
        guest_warn!(
            "virtio-net: ignored config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        if self.backend.has_vnet_hdr() {
            let flags = Self::tun_offload_flags(self.base.acked_features());
            self.backend
                .set_offload(flags)
                .map_err(|e| ActivateError::Backend(format!("TUNSETOFFLOAD failed: {e}")))?;
        }
        self.base.signal_activate()?;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        self.needs_reset = false;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) -> Result<(), ActivateError> {
        self.active = None;
        self.base.reset_features();
        self.needs_reset = false;
        self.rx_len = 0;
        if self.backend.has_vnet_hdr()
            && let Err(e) = self.backend.set_offload(0)
        {
            log::warn!("virtio-net: clearing offloads failed: {e}");
        }
        Ok(())
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active
            .iter()
            .flat_map(|a| [&a.rx, &a.tx])
            .map(crate::virtio::queue_position)
            .collect()
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    reason = "test code on known values"
)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::{LoopbackNet, RecordingInterrupt, TestQueue, single_region_mem};

    const W: bool = true;
    const R: bool = false;
    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    struct Env<'a> {
        mem: &'a GuestMemoryMmap,
        rxq: TestQueue<'a>,
        txq: TestQueue<'a>,
        net: VirtioNet,
        lo: crate::test_utils::LoopbackHandle,
        irq: Arc<RecordingInterrupt>,
    }

    fn env(mem: &GuestMemoryMmap, vnet: bool, features: u64) -> Env<'_> {
        let lo = LoopbackNet::new(4, vnet);
        let handle = lo.handle();
        let mut net = VirtioNet::new(
            NetConfig {
                mac: MAC,
                mtu: Some(1500),
            },
            Box::new(lo),
        )
        .unwrap();
        let rxq = TestQueue::new(mem, GuestAddress(0), 16);
        let txq = TestQueue::new(mem, GuestAddress(0x1_0000), 16);
        let irq = Arc::new(RecordingInterrupt::new());
        net.set_acked_features(features);
        net.activate(mem.clone(), vec![rxq.queue(), txq.queue()], irq.clone())
            .unwrap();
        Env {
            mem,
            rxq,
            txq,
            net,
            lo: handle,
            irq,
        }
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..NET_HDR_LEN].fill(0);
        f
    }

    #[test]
    fn features_and_config_space() {
        let net = VirtioNet::new(
            NetConfig {
                mac: MAC,
                mtu: Some(9000),
            },
            Box::new(LoopbackNet::new(4, false)),
        )
        .unwrap();
        let f = net.avail_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
        ] {
            assert_ne!(f & bit, 0);
        }
        // No offloads without virtio headers on the backend.
        assert_eq!(f & (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM), 0);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        let mut v = [0u8; 2];
        net.read_config(6, &mut v);
        assert_eq!(u16::from_le_bytes(v), VIRTIO_NET_S_LINK_UP);
        net.read_config(10, &mut v);
        assert_eq!(u16::from_le_bytes(v), 9000);
        let mut past = [0xffu8; 4];
        net.read_config(12, &mut past);
        assert_eq!(past, [0; 4]);

        let vnet =
            VirtioNet::new(NetConfig::default(), Box::new(LoopbackNet::new(4, true))).unwrap();
        assert_ne!(vnet.avail_features() & VIRTIO_NET_F_HOST_TSO4, 0);
        assert_eq!(vnet.avail_features() & VIRTIO_NET_F_MTU, 0);
        assert!(matches!(
            VirtioNet::new(
                NetConfig {
                    mac: MAC,
                    mtu: Some(10)
                },
                Box::new(LoopbackNet::new(4, false))
            ),
            Err(NetError::Mtu(10))
        ));
    }

    #[test]
    fn offload_flags() {
        assert_eq!(VirtioNet::tun_offload_flags(0), 0);
        assert_eq!(VirtioNet::tun_offload_flags(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(
            VirtioNet::tun_offload_flags(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
        assert_eq!(
            VirtioNet::tun_offload_flags(
                VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
    }

    #[test]
    fn activation_applies_offloads_and_reset_clears_them() {
        let m = single_region_mem(0x40_0000);
        let e = env(
            &m,
            true,
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4,
        );
        assert_eq!(e.lo.offload(), libc::TUN_F_CSUM | libc::TUN_F_TSO4);
        let mut net = e.net;
        net.reset().unwrap();
        assert_eq!(e.lo.offload(), 0);
        assert!(!net.is_activated());
        let err = net.activate(m.clone(), vec![], e.irq.clone()).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 0
            }
        ));
    }

    #[test]
    fn tx_strips_header_without_vnet_backend() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1);
        let f = frame(100, 0xaa);
        m.write_slice(&f, GuestAddress(0x10_0000)).unwrap();
        e.txq.add_chain(&[(0x10_0000, 12, R), (0x10_000c, 88, R)]);
        assert!(e.net.process_tx());
        assert_eq!(e.txq.used_idx(), 1);
        assert_eq!(e.lo.queued(), vec![vec![0xaa; 88]]);
        assert_eq!(e.net.metrics().tx_frames, 1);
        let _ = e.mem;
    }

    #[test]
    fn tx_keeps_header_with_vnet_backend() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, true, VIRTIO_F_VERSION_1);
        let mut f = frame(60, 0xbb);
        f[0] = 1; // NEEDS_CSUM
        m.write_slice(&f, GuestAddress(0x10_0000)).unwrap();
        e.txq.add_chain(&[(0x10_0000, 60, R)]);
        assert!(e.net.process_tx());
        assert_eq!(e.lo.queued(), vec![f]);
    }

    #[test]
    fn tx_malformed_chains_are_completed_and_dropped() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1);
        e.txq.add_chain(&[(0x10_0000, 8, R)]);
        e.txq.add_chain(&[(0x10_0000, 100, R), (0x10_1000, 10, W)]);
        e.txq.add_chain(&[(0x10_0000, 70_000, R)]);
        e.txq.add_chain(&[(0x3f_ffff, 100, R)]);
        assert!(e.net.process_tx());
        assert_eq!(e.txq.used_idx(), 4);
        assert!(e.lo.queued().is_empty());
        assert_eq!(e.net.metrics().tx_dropped, 4);
    }

    #[test]
    fn tx_backend_full_drops_without_buffering() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1);
        m.write_slice(&frame(64, 1), GuestAddress(0x10_0000))
            .unwrap();
        for _ in 0..10 {
            e.txq.add_chain(&[(0x10_0000, 64, R)]);
        }
        e.net.process_tx();
        assert_eq!(e.txq.used_idx(), 10);
        // The loopback holds 4 frames; the rest were dropped.
        assert_eq!(e.lo.queued().len(), 4);
        assert_eq!(e.net.metrics().tx_dropped, 6);
    }

    #[test]
    fn loopback_roundtrip_with_pending_frame() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
        // Two frames arrive while the guest has no RX buffers.
        e.lo.inject(&[0x11; 60]);
        e.lo.inject(&[0x22; 70]);
        assert!(!e.net.process_rx());
        assert_eq!(
            e.lo.queued().len(),
            1,
            "only one frame is taken from the backend"
        );
        // One buffer posted: one frame delivered, the next waits in the device.
        e.rxq.add_chain(&[(0x20_0000, 2048, W)]);
        assert!(e.net.process_rx());
        assert_eq!(e.rxq.used_elem(0), (0, 72));
        let mut got = [0u8; 72];
        m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(&got[12..], &[0x11; 60]);
        assert!(e.lo.queued().is_empty());
        e.rxq.add_chain(&[(0x20_1000, 2048, W)]);
        assert!(e.net.process_rx());
        assert_eq!(e.rxq.used_elem(1), (1, 82));
        assert_eq!(e.net.metrics().rx_frames, 2);
    }

    #[test]
    fn rx_with_vnet_backend_passes_header() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, true, VIRTIO_F_VERSION_1);
        let mut f = frame(80, 0x33);
        f[0] = 2; // DATA_VALID
        e.lo.inject(&f);
        e.rxq.add_chain(&[(0x20_0000, 2048, W)]);
        assert!(e.net.process_rx());
        let mut got = vec![0u8; 80];
        m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got[0], 2);
        assert_eq!(&got[12..], &f[12..]);
    }

    #[test]
    fn rx_too_large_without_merge_is_dropped() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1);
        e.rxq.add_chain(&[(0x20_0000, 100, W)]);
        e.lo.inject(&[1; 500]);
        e.lo.inject(&[2; 50]);
        assert!(e.net.process_rx());
        assert_eq!(e.net.metrics().rx_dropped, 1);
        assert_eq!(e.rxq.used_elem(0), (0, 62));
    }

    #[test]
    fn tx_to_rx_through_loopback() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
        m.write_slice(&frame(100, 0x5a), GuestAddress(0x10_0000))
            .unwrap();
        e.txq.add_chain(&[(0x10_0000, 100, R)]);
        e.rxq.add_chain(&[(0x20_0000, 64, W)]);
        e.rxq.add_chain(&[(0x20_1000, 64, W)]);
        e.net.process_tx();
        assert!(e.net.process_rx());
        assert_eq!(e.rxq.used_idx(), 2);
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x20_000a)).unwrap(), 2);
    }

    #[test]
    fn corrupt_queues_need_reset() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1);
        e.txq.set_avail_idx(500);
        assert!(!e.net.process_tx());
        assert!(e.net.needs_reset());
        assert_eq!(e.irq.count(InterruptKind::Config), 1);
        assert!(!e.net.process_rx());
        e.net.reset().unwrap();
        assert!(!e.net.needs_reset());

        let mut e = env(&m, false, VIRTIO_F_VERSION_1);
        e.lo.inject(&[0; 60]);
        e.rxq.set_avail_idx(500);
        e.net.process_rx();
        assert!(e.net.needs_reset());
    }

    #[test]
    fn link_status_change_signals_config() {
        let m = single_region_mem(0x40_0000);
        let mut e = env(&m, false, VIRTIO_F_VERSION_1);
        e.net.set_link_up(false);
        e.net.set_link_up(false);
        assert!(!e.net.link_up());
        assert_eq!(e.irq.count(InterruptKind::Config), 1);
        let mut v = [0u8; 2];
        e.net.read_config(6, &mut v);
        assert_eq!(v, [0, 0]);
        e.net.write_config(0, &[0xff; 6]);
        let mut mac = [0u8; 6];
        e.net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
    }

    #[test]
    fn not_activated_does_nothing() {
        let lo = LoopbackNet::new(4, false);
        let h = lo.handle();
        let mut net = VirtioNet::new(NetConfig::default(), Box::new(lo)).unwrap();
        h.inject(&[1; 60]);
        assert!(!net.process_rx());
        assert!(!net.process_tx());
        assert_eq!(h.queued().len(), 1);
        net.signal_used_queue();
    }
}
