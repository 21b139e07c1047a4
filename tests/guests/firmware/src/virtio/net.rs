// SPDX-License-Identifier: Apache-2.0
//! virtio-net driver (virtio 1.2 §5.1): receive queue 0 filled with single-buffer chains big
//! enough for a full frame, transmit queue 1 with one frame at a time as a two-buffer chain
//! (`virtio_net_hdr_v1`, then the frame). No offloads, no control queue.

use crate::dma::{Arena, DmaBuf};
use crate::irq;
use crate::virtio::mmio::Transport;
use crate::virtio::queue::{Buf, Virtqueue};
use crate::virtio::{DEVICE_ID_NET, MmioDevice, REQUEST_TIMEOUT, VirtioError};

/// `mac` is valid (§5.1.3).
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// `status` is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `status` bit: link up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `virtio_net_hdr_v1` length (with `num_buffers`, always present in virtio 1.x).
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame sent or received (Ethernet header + 1500 bytes of payload).
pub const MAX_FRAME_LEN: usize = 1514;
/// Features the driver accepts when offered (plus `VERSION_1`, required).
pub const WANTED_FEATURES: u64 = VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS;
/// Names of the accepted feature bits, lowest bit first.
pub const FEATURE_NAMES: [(u64, &str); 4] = [
    (VIRTIO_NET_F_MAC, "MAC"),
    (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
    (VIRTIO_NET_F_STATUS, "STATUS"),
    (crate::virtio::VIRTIO_F_VERSION_1, "VERSION_1"),
];
/// Receive buffers posted.
const RX_BUFFERS: usize = 8;
/// Size of one receive buffer slot (at least header + largest frame, §5.1.6.3.1).
const RX_SLOT: usize = 2048;
const TX_FRAME_OFFSET: usize = 64;

/// A driven virtio-net device.
#[derive(Debug)]
pub struct Net {
    transport: Transport,
    /// Length of the frame last sent.
    tx_len: usize,
    rx: Virtqueue,
    tx: Virtqueue,
    features: u64,
    rx_bufs: DmaBuf,
    /// Which receive slot each descriptor head carries.
    rx_slot_of_head: [u8; 64],
    tx_buf: DmaBuf,
}

impl Net {
    /// Initialises the device (§3.1.1, §5.1.5) and fills the receive queue.
    pub fn new(dev: &MmioDevice, arena: &mut Arena) -> Result<Self, VirtioError> {
        let mut transport = Transport::probe(dev)?;
        if transport.device_id() != DEVICE_ID_NET {
            return Err(VirtioError::WrongDevice(transport.device_id()));
        }
        let features = transport.negotiate(WANTED_FEATURES)?;
        let rx = Virtqueue::new(&transport, 0, 16, arena)?;
        let tx = Virtqueue::new(&transport, 1, 8, arena)?;
        let rx_bufs = arena
            .alloc(RX_BUFFERS * RX_SLOT, 4096)
            .ok_or(VirtioError::OutOfMemory)?;
        let tx_buf = arena.pages(1).ok_or(VirtioError::OutOfMemory)?;
        transport.enable_interrupts()?;
        let mut net = Self {
            transport,
            tx_len: 0,
            rx,
            tx,
            features,
            rx_bufs,
            rx_slot_of_head: [0; 64],
            tx_buf,
        };
        for slot in 0..RX_BUFFERS {
            net.post_rx(slot)?;
        }
        net.transport.driver_ok()?;
        // Buffers added before DRIVER_OK are only looked at once notified (§3.1.1).
        net.rx.notify();
        Ok(net)
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The transport (interrupt counts, registers).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The device's MAC address, if it offered one.
    pub fn mac(&self) -> Option<[u8; 6]> {
        if self.features & VIRTIO_NET_F_MAC == 0 {
            return None;
        }
        let mut mac = [0u8; 6];
        for (i, b) in (0u64..).zip(mac.iter_mut()) {
            *b = self.transport.config_u8(i);
        }
        Some(mac)
    }

    /// Whether the link is up (`None` without `VIRTIO_NET_F_STATUS`).
    pub fn link_up(&self) -> Option<bool> {
        (self.features & VIRTIO_NET_F_STATUS != 0)
            .then(|| self.transport.config_u16(6) & VIRTIO_NET_S_LINK_UP != 0)
    }

    fn post_rx(&mut self, slot: usize) -> Result<(), VirtioError> {
        let addr = self
            .rx_bufs
            .addr_at(slot * RX_SLOT)
            .ok_or(VirtioError::OutOfMemory)?;
        let head = self.rx.add(&[Buf::write(addr, RX_SLOT)])?;
        if let Some(s) = self.rx_slot_of_head.get_mut(usize::from(head)) {
            *s = u8::try_from(slot).unwrap_or(0);
        }
        Ok(())
    }

    /// The frame to send next (up to [`MAX_FRAME_LEN`] bytes), to fill before [`Self::send`].
    pub fn tx_frame_mut(&mut self) -> &mut [u8] {
        let bytes = self.tx_buf.bytes_mut();
        bytes
            .get_mut(TX_FRAME_OFFSET..TX_FRAME_OFFSET + MAX_FRAME_LEN)
            .unwrap_or_default()
    }

    /// Sends the first `len` bytes of the frame behind a zeroed header and waits until the
    /// device has taken them and interrupted.
    pub fn send(&mut self, len: usize) -> Result<(), VirtioError> {
        if len > MAX_FRAME_LEN {
            return Err(VirtioError::TooLarge(len));
        }
        if let Some(hdr) = self.tx_buf.bytes_mut().get_mut(..NET_HDR_LEN) {
            hdr.fill(0);
        }
        let frame = self
            .tx_buf
            .addr_at(TX_FRAME_OFFSET)
            .ok_or(VirtioError::OutOfMemory)?;
        let head = self.tx.add(&[
            Buf::read(self.tx_buf.addr(), NET_HDR_LEN),
            Buf::read(frame, len),
        ])?;
        self.tx_len = len;
        self.tx.notify_and_wait(&self.transport)?;
        match self.tx.pop_used() {
            Some(Ok(used)) if used.head == head => Ok(()),
            Some(Ok(used)) => Err(VirtioError::BadUsed(u32::from(used.head))),
            Some(Err(e)) => Err(e),
            None => Err(VirtioError::Timeout),
        }
    }

    /// Waits for the next received buffer, hands it (header + frame) and the frame last sent
    /// (for loopback checks) to `inspect` and gives the buffer back to the device.
    pub fn recv<R>(&mut self, inspect: impl FnOnce(&[u8], &[u8]) -> R) -> Result<R, VirtioError> {
        let rx = &self.rx;
        if !irq::wait_until(REQUEST_TIMEOUT, || rx.has_used()) {
            self.transport.check()?;
            return Err(VirtioError::Timeout);
        }
        let used = match self.rx.pop_used() {
            Some(Ok(used)) => used,
            Some(Err(e)) => return Err(e),
            None => return Err(VirtioError::Timeout),
        };
        let slot = usize::from(
            self.rx_slot_of_head
                .get(usize::from(used.head))
                .copied()
                .unwrap_or(0),
        );
        let len = usize::try_from(used.len).unwrap_or(0).min(RX_SLOT);
        let start = slot * RX_SLOT;
        let sent_at = TX_FRAME_OFFSET;
        let result = inspect(
            self.rx_bufs
                .bytes()
                .get(start..start + len)
                .unwrap_or_default(),
            self.tx_buf
                .bytes()
                .get(sent_at..sent_at + self.tx_len)
                .unwrap_or_default(),
        );
        self.post_rx(slot)?;
        self.rx.notify();
        Ok(result)
    }
}
