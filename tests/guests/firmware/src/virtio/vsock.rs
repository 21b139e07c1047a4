// SPDX-License-Identifier: Apache-2.0
//! virtio-vsock driver (virtio 1.2 §5.10): packet transport only. Queue 0 (rx) holds
//! single-buffer chains of [`RX_BUF_LEN`] bytes (header and data in one buffer), queue 1 (tx)
//! sends a header buffer followed, when there is data, by a data buffer, queue 2 (event) holds
//! a few `virtio_vsock_event` buffers. Connection state (credit, ports) is the caller's.

use crate::dma::{Arena, DmaBuf};
use crate::irq;
use crate::virtio::mmio::Transport;
use crate::virtio::queue::{Buf, Virtqueue};
use crate::virtio::{DEVICE_ID_VSOCK, MmioDevice, VirtioError};

/// `virtio_vsock_hdr` length.
pub const HDR_LEN: usize = 44;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Socket type: stream.
pub const TYPE_STREAM: u16 = 1;
/// Connect.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset (refused or closed).
pub const OP_RST: u16 = 3;
/// Half or full close (`flags`: [`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// The sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Event id: the transport was reset, every connection is gone (§5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of one receive buffer (header + up to [`MAX_DATA`] bytes).
pub const RX_BUF_LEN: usize = 4096;
/// Largest payload of one packet this driver sends or receives.
pub const MAX_DATA: usize = RX_BUF_LEN - HDR_LEN;
const RX_BUFFERS: usize = 8;
const TX_SLOTS: usize = 4;
const TX_DATA_OFFSET: usize = 64;
const EVENT_BUFFERS: usize = 4;
const EVENT_LEN: usize = 8;

/// A `virtio_vsock_hdr`, all fields little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size for the connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed, modulo 2^32.
    pub fwd_cnt: u32,
}

fn take<const N: usize>(rest: &mut &[u8]) -> [u8; N] {
    match rest.split_first_chunk::<N>() {
        Some((head, tail)) => {
            *rest = tail;
            *head
        }
        None => [0; N],
    }
}

impl Header {
    /// Decodes a header (missing bytes read as zero).
    pub fn from_bytes(raw: &[u8]) -> Self {
        let mut rest = raw;
        Self {
            src_cid: u64::from_le_bytes(take(&mut rest)),
            dst_cid: u64::from_le_bytes(take(&mut rest)),
            src_port: u32::from_le_bytes(take(&mut rest)),
            dst_port: u32::from_le_bytes(take(&mut rest)),
            len: u32::from_le_bytes(take(&mut rest)),
            kind: u16::from_le_bytes(take(&mut rest)),
            op: u16::from_le_bytes(take(&mut rest)),
            flags: u32::from_le_bytes(take(&mut rest)),
            buf_alloc: u32::from_le_bytes(take(&mut rest)),
            fwd_cnt: u32::from_le_bytes(take(&mut rest)),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        let fields: [&[u8]; 10] = [
            &self.src_cid.to_le_bytes(),
            &self.dst_cid.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.kind.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ];
        let mut at = 0;
        for field in fields {
            if let Some(dst) = out.get_mut(at..at + field.len()) {
                dst.copy_from_slice(field);
            }
            at += field.len();
        }
        out
    }
}

/// A driven virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    event: Virtqueue,
    rx_bufs: DmaBuf,
    rx_slot_of_head: [u8; 64],
    /// One page per TX slot: header at 0, data at [`TX_DATA_OFFSET`].
    tx_bufs: DmaBuf,
    tx_slot_of_head: [u8; 64],
    /// Bit n: TX slot n is with the device.
    tx_busy: u32,
    event_bufs: DmaBuf,
    event_slot_of_head: [u8; 64],
    events: u32,
    last_event: u32,
    guest_cid: u64,
}

impl Vsock {
    /// Initialises the device (§3.1.1, §5.10.5) and fills the rx and event queues.
    pub fn new(dev: &MmioDevice, arena: &mut Arena) -> Result<Self, VirtioError> {
        let mut transport = Transport::probe(dev)?;
        if transport.device_id() != DEVICE_ID_VSOCK {
            return Err(VirtioError::WrongDevice(transport.device_id()));
        }
        transport.negotiate(0)?;
        let rx = Virtqueue::new(&transport, 0, 16, arena)?;
        let tx = Virtqueue::new(&transport, 1, 16, arena)?;
        let event = Virtqueue::new(&transport, 2, 8, arena)?;
        let rx_bufs = arena
            .alloc(RX_BUFFERS * RX_BUF_LEN, 4096)
            .ok_or(VirtioError::OutOfMemory)?;
        let tx_bufs = arena.pages(TX_SLOTS).ok_or(VirtioError::OutOfMemory)?;
        let event_bufs = arena
            .alloc(EVENT_BUFFERS * EVENT_LEN, 64)
            .ok_or(VirtioError::OutOfMemory)?;
        let guest_cid = transport.config_u64(0);
        transport.enable_interrupts()?;
        let mut vsock = Self {
            transport,
            rx,
            tx,
            event,
            rx_bufs,
            rx_slot_of_head: [0; 64],
            tx_bufs,
            tx_slot_of_head: [0; 64],
            tx_busy: 0,
            event_bufs,
            event_slot_of_head: [0; 64],
            events: 0,
            last_event: 0,
            guest_cid,
        };
        for slot in 0..RX_BUFFERS {
            vsock.post_rx(slot)?;
        }
        for slot in 0..EVENT_BUFFERS {
            vsock.post_event(slot)?;
        }
        vsock.transport.driver_ok()?;
        vsock.rx.notify();
        vsock.event.notify();
        Ok(vsock)
    }

    /// The transport (interrupt counts, registers).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// `guest_cid` from the configuration space (§5.10.4), read at initialisation and again
    /// on each transport-reset event.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Events received on the event queue, and the id of the last one.
    pub fn events(&self) -> (u32, u32) {
        (self.events, self.last_event)
    }

    fn post_rx(&mut self, slot: usize) -> Result<(), VirtioError> {
        let addr = self
            .rx_bufs
            .addr_at(slot * RX_BUF_LEN)
            .ok_or(VirtioError::OutOfMemory)?;
        let head = self.rx.add(&[Buf::write(addr, RX_BUF_LEN)])?;
        if let Some(s) = self.rx_slot_of_head.get_mut(usize::from(head)) {
            *s = u8::try_from(slot).unwrap_or(0);
        }
        Ok(())
    }

    fn post_event(&mut self, slot: usize) -> Result<(), VirtioError> {
        let addr = self
            .event_bufs
            .addr_at(slot * EVENT_LEN)
            .ok_or(VirtioError::OutOfMemory)?;
        let head = self.event.add(&[Buf::write(addr, EVENT_LEN)])?;
        if let Some(s) = self.event_slot_of_head.get_mut(usize::from(head)) {
            *s = u8::try_from(slot).unwrap_or(0);
        }
        Ok(())
    }

    /// Takes completed TX chains and events off their used rings.
    fn reap(&mut self) -> Result<(), VirtioError> {
        while let Some(used) = self.tx.pop_used() {
            let used = used?;
            let slot = self
                .tx_slot_of_head
                .get(usize::from(used.head))
                .copied()
                .unwrap_or(0);
            self.tx_busy &= !(1u32 << slot);
        }
        let mut reposted = false;
        while let Some(used) = self.event.pop_used() {
            let used = used?;
            let slot = usize::from(
                self.event_slot_of_head
                    .get(usize::from(used.head))
                    .copied()
                    .unwrap_or(0),
            );
            let at = slot * EVENT_LEN;
            let id = self
                .event_bufs
                .bytes()
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(u32::MAX, u32::from_le_bytes);
            self.events = self.events.wrapping_add(1);
            self.last_event = id;
            if id == EVENT_TRANSPORT_RESET {
                // §5.10.6.7: the driver re-reads `guest_cid`, which may have changed.
                self.guest_cid = self.transport.config_u64(0);
            }
            self.post_event(slot)?;
            reposted = true;
        }
        if reposted {
            self.event.notify();
        }
        Ok(())
    }

    /// Sends one packet: `hdr` (its `len` is set to `data.len()`) and `data`. Waits only when
    /// every TX slot is still with the device.
    pub fn send(&mut self, hdr: &Header, data: &[u8]) -> Result<(), VirtioError> {
        if data.len() > MAX_DATA {
            return Err(VirtioError::TooLarge(data.len()));
        }
        self.reap()?;
        if self.tx_busy.count_ones() as usize >= TX_SLOTS {
            let tx = &self.tx;
            if !irq::wait_until(crate::virtio::REQUEST_TIMEOUT, || tx.has_used()) {
                self.transport.check()?;
                return Err(VirtioError::Timeout);
            }
            self.reap()?;
        }
        let slot = (0..TX_SLOTS)
            .find(|s| self.tx_busy & (1u32 << s) == 0)
            .ok_or(VirtioError::QueueFull)?;
        let page = slot * 4096;
        let mut hdr = *hdr;
        hdr.len = u32::try_from(data.len()).map_err(|_| VirtioError::TooLarge(data.len()))?;
        let bytes = self.tx_bufs.bytes_mut();
        if let Some(h) = bytes.get_mut(page..page + HDR_LEN) {
            h.copy_from_slice(&hdr.to_bytes());
        }
        let data_at = page + TX_DATA_OFFSET;
        if let Some(d) = bytes.get_mut(data_at..data_at + data.len()) {
            d.copy_from_slice(data);
        }
        let hdr_addr = self.tx_bufs.addr_at(page).ok_or(VirtioError::OutOfMemory)?;
        let data_addr = self
            .tx_bufs
            .addr_at(data_at)
            .ok_or(VirtioError::OutOfMemory)?;
        let header = Buf::read(hdr_addr, HDR_LEN);
        let head = if data.is_empty() {
            self.tx.add(&[header])?
        } else {
            self.tx.add(&[header, Buf::read(data_addr, data.len())])?
        };
        if let Some(s) = self.tx_slot_of_head.get_mut(usize::from(head)) {
            *s = u8::try_from(slot).unwrap_or(0);
        }
        self.tx_busy |= 1u32 << slot;
        self.tx.notify();
        Ok(())
    }

    /// Waits up to `timeout` for the next received packet; copies its payload (at most
    /// `data.len()` bytes) into `data` and returns the header and the payload length copied.
    pub fn recv(
        &mut self,
        timeout: core::time::Duration,
        data: &mut [u8],
    ) -> Result<(Header, usize), VirtioError> {
        let mut deadline = irq::Deadline::after(timeout);
        match self.recv_within(&mut deadline, data) {
            Err(VirtioError::Timeout) => {
                self.transport.check()?;
                Err(VirtioError::Timeout)
            }
            other => other,
        }
    }

    /// [`Vsock::recv`] bounded by a deadline the caller keeps across calls (a periodic tick
    /// that packets must not postpone). A `Timeout` means `deadline` has expired; unlike
    /// [`Vsock::recv`] it does not read the device status (one VM exit per call).
    pub fn recv_within(
        &mut self,
        deadline: &mut irq::Deadline,
        data: &mut [u8],
    ) -> Result<(Header, usize), VirtioError> {
        loop {
            // TX completions and events wake the wait too: take them, then wait on.
            self.reap()?;
            if self.rx.has_used() {
                break;
            }
            if deadline.expired() {
                return Err(VirtioError::Timeout);
            }
            let (rx, tx, event) = (&self.rx, &self.tx, &self.event);
            deadline.wait_until(|| rx.has_used() || tx.has_used() || event.has_used());
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
        let at = slot * RX_BUF_LEN;
        let len = usize::try_from(used.len).unwrap_or(0).min(RX_BUF_LEN);
        let buf = self.rx_bufs.bytes().get(at..at + len).unwrap_or_default();
        let hdr = Header::from_bytes(buf);
        let payload = buf.get(HDR_LEN..).unwrap_or_default();
        let payload_len = usize::try_from(hdr.len)
            .unwrap_or(usize::MAX)
            .min(payload.len());
        let copied = payload_len.min(data.len());
        if let (Some(dst), Some(src)) = (data.get_mut(..copied), payload.get(..copied)) {
            dst.copy_from_slice(src);
        }
        self.post_rx(slot)?;
        self.rx.notify();
        Ok((hdr, copied))
    }
}
