// SPDX-License-Identifier: Apache-2.0
//! virtio-blk driver (virtio 1.2 §5.2): one request queue, one request at a time, each a
//! chain of a 16-byte header (`type`, `reserved`, `sector`), an optional data buffer and a
//! one-byte status.

use crate::dma::{Arena, DmaBuf};
use crate::virtio::mmio::{INT_CONFIG, Transport};
use crate::virtio::queue::{Buf, Virtqueue};
use crate::virtio::{DEVICE_ID_BLK, MmioDevice, VirtioError};

/// Maximum segment count in `seg_max` (§5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// The device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// The device supports `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string (20 bytes). Not behind a feature bit: drivers just ask.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O error (also for out-of-range sectors).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Sector size of `sector` and `capacity`.
pub const SECTOR_SIZE: usize = 512;
/// Length of the `GET_ID` answer.
pub const ID_LEN: usize = 20;
/// Size of the data buffer: the largest request this driver makes.
pub const DATA_LEN: usize = 4096;
/// Features the driver accepts when offered (plus `VERSION_1`, required).
pub const WANTED_FEATURES: u64 =
    VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
/// Names of the accepted feature bits, lowest bit first.
pub const FEATURE_NAMES: [(u64, &str); 5] = [
    (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
    (VIRTIO_BLK_F_RO, "RO"),
    (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
    (VIRTIO_BLK_F_FLUSH, "FLUSH"),
    (crate::virtio::VIRTIO_F_VERSION_1, "VERSION_1"),
];
/// Status byte before the device writes it.
const STATUS_UNSET: u8 = 0xff;
const STATUS_OFFSET: usize = 64;

/// A driven virtio-blk device.
#[derive(Debug)]
pub struct Blk {
    transport: Transport,
    queue: Virtqueue,
    features: u64,
    /// Header at 0, status byte at [`STATUS_OFFSET`].
    req: DmaBuf,
    /// Data of the current request: filled before a write, read after a read.
    pub data: DmaBuf,
    config_changed: bool,
}

impl Blk {
    /// Initialises the device (§3.1.1, §5.2.5): features, queue 0, interrupts, `DRIVER_OK`.
    pub fn new(dev: &MmioDevice, arena: &mut Arena) -> Result<Self, VirtioError> {
        let mut transport = Transport::probe(dev)?;
        if transport.device_id() != DEVICE_ID_BLK {
            return Err(VirtioError::WrongDevice(transport.device_id()));
        }
        let features = transport.negotiate(WANTED_FEATURES)?;
        let queue = Virtqueue::new(&transport, 0, 8, arena)?;
        let req = arena.alloc(128, 64).ok_or(VirtioError::OutOfMemory)?;
        let data = arena.pages(1).ok_or(VirtioError::OutOfMemory)?;
        transport.enable_interrupts()?;
        transport.driver_ok()?;
        Ok(Self {
            transport,
            queue,
            features,
            req,
            data,
            config_changed: false,
        })
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The transport (interrupt counts, registers).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// `capacity`: size in 512-byte sectors (§5.2.4, config offset 0).
    pub fn capacity(&self) -> u64 {
        self.transport.config_u64(0)
    }

    /// Whether a configuration-change interrupt arrived since the last
    /// [`Self::clear_config_changed`].
    pub fn config_changed(&mut self) -> bool {
        if self.transport.take_interrupts() & INT_CONFIG != 0 {
            self.config_changed = true;
        }
        self.config_changed
    }

    /// Forgets earlier configuration-change interrupts.
    pub fn clear_config_changed(&mut self) {
        self.transport.take_interrupts();
        self.config_changed = false;
    }

    /// Sends one request with `len` bytes of [`Self::data`] (`device_writes`: the device
    /// fills them) and waits for its completion and interrupt; returns the status byte.
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        len: usize,
        device_writes: bool,
    ) -> Result<u8, VirtioError> {
        if len > self.data.len() {
            return Err(VirtioError::TooLarge(len));
        }
        let hdr = self.req.bytes_mut();
        if let Some(h) = hdr.get_mut(..16) {
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[4..8].copy_from_slice(&0u32.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
        }
        if let Some(s) = hdr.get_mut(STATUS_OFFSET) {
            *s = STATUS_UNSET;
        }
        let status_addr = self
            .req
            .addr_at(STATUS_OFFSET)
            .ok_or(VirtioError::OutOfMemory)?;
        let header = Buf::read(self.req.addr(), 16);
        let status = Buf::write(status_addr, 1);
        let data = if device_writes {
            Buf::write(self.data.addr(), len)
        } else {
            Buf::read(self.data.addr(), len)
        };
        let head = if len == 0 {
            self.queue.add(&[header, status])?
        } else {
            self.queue.add(&[header, data, status])?
        };
        self.queue.notify_and_wait(&self.transport)?;
        match self.queue.pop_used() {
            Some(Ok(used)) if used.head == head => {}
            Some(Ok(used)) => return Err(VirtioError::BadUsed(u32::from(used.head))),
            Some(Err(e)) => return Err(e),
            None => return Err(VirtioError::Timeout),
        }
        Ok(self
            .req
            .bytes()
            .get(STATUS_OFFSET)
            .copied()
            .unwrap_or(STATUS_UNSET))
    }

    /// Reads `len` bytes from `sector` into [`Self::data`].
    pub fn read(&mut self, sector: u64, len: usize) -> Result<u8, VirtioError> {
        self.request(VIRTIO_BLK_T_IN, sector, len, true)
    }

    /// Writes `len` bytes of [`Self::data`] at `sector`.
    pub fn write(&mut self, sector: u64, len: usize) -> Result<u8, VirtioError> {
        self.request(VIRTIO_BLK_T_OUT, sector, len, false)
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<u8, VirtioError> {
        self.request(VIRTIO_BLK_T_FLUSH, 0, 0, false)
    }

    /// Reads the 20-byte device id into [`Self::data`].
    pub fn get_id(&mut self) -> Result<u8, VirtioError> {
        self.request(VIRTIO_BLK_T_GET_ID, 0, ID_LEN, true)
    }
}
