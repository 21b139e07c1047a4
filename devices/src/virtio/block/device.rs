// SPDX-License-Identifier: Apache-2.0
//! The virtio-blk device (virtio 1.2 §5.2): features, configuration space, activation, the
//! request queue, and run-time attach/detach of the backing ("slot").
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryError, GuestMemoryMmap, VolatileSlice};

use super::BlockError;
use super::backend::{DiskBackend, FileDisk};
use super::defs::{
    ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, QUEUE_SIZE, REQUEST_HEADER_SIZE,
    SECTOR_SHIFT, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use super::request::{BadRequest, DiscardSegment, Request, RequestType};
use crate::virtio::base::{VirtioBase, delegate_virtio_base, read_config_bytes};
use crate::virtio::queue::drain_queue;
use crate::virtio::queue::{ChainBuffers, ChainError, GuestView};
use crate::virtio::{
    ActivateError, Interrupt, InterruptKind, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice, guest_warn,
};

/// virtio device id of a block device (§5.2.1).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the configuration space we expose (up to `unused1`, §5.2.4).
const CONFIG_SIZE: usize = 60;
/// Largest bounce buffer between guest memory and the backend.
const BOUNCE_SIZE: usize = 128 * 1024;
/// Descriptors accepted in one request chain.
const MAX_DESCS: usize = QUEUE_SIZE as usize;
/// Requests handled per call before yielding to other devices on the event loop.
const BUDGET: usize = 4 * QUEUE_SIZE as usize;
/// `blk_size` in configuration space: the logical block size of every backing.
const BLK_SIZE: u32 = 512;
/// Length of the serial as a `u32`.
const ID_LEN: u32 = 20;
const _: () = assert!(ID_LEN as usize == ID_BYTES);

/// User configuration of one block slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Serial returned by `GET_ID` (at most 20 bytes are used).
    pub id: String,
    /// Initial backing (raw image or block device); `None` for an empty slot.
    pub path: Option<PathBuf>,
    /// The slot is read-only: `VIRTIO_BLK_F_RO` is offered and every backing is read-only.
    pub read_only: bool,
}

/// Counters of a block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockMetrics {
    /// Requests completed.
    pub requests: u64,
    /// Bytes read from the backing.
    pub read_bytes: u64,
    /// Bytes written to the backing.
    pub write_bytes: u64,
    /// Requests completed with `IOERR` or not completable.
    pub errors: u64,
    /// Requests completed with `UNSUPP`.
    pub unsupported: u64,
}

#[derive(Debug)]
struct Disk {
    backend: Box<dyn DiskBackend>,
    read_only: bool,
    /// Capacity in sectors, fixed when attached.
    sectors: u64,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn Interrupt>,
}

/// Why one request failed, mapped to a status code.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("No backing attached")]
    NoBacking,
    #[error("Write to a read-only disk")]
    ReadOnly,
    #[error("Sectors {sector}+{len} bytes are past the capacity")]
    OutOfRange { sector: u64, len: u64 },
    #[error("Operation not supported")]
    Unsupported,
    #[error("Guest buffers")]
    Chain(#[from] ChainError),
    #[error("Guest memory")]
    Memory(#[from] GuestMemoryError),
    #[error("Backend I/O")]
    Backend(#[source] io::Error),
}

impl ExecError {
    fn status(&self) -> u8 {
        match self {
            ExecError::Unsupported => VIRTIO_BLK_S_UNSUPP,
            ExecError::Backend(e) if e.kind() == io::ErrorKind::Unsupported => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A virtio-blk device whose backing can be swapped while the guest runs.
#[derive(Debug)]
pub struct VirtioBlock {
    id: [u8; ID_BYTES],
    pub(super) base: VirtioBase,
    slot_read_only: bool,
    disk: Option<Disk>,
    active: Option<Active>,
    needs_reset: bool,
    /// The configuration changed while no interrupt could tell the driver; it is told on
    /// activation.
    config_dirty: bool,
    bounce: Vec<u8>,
    metrics: BlockMetrics,
    /// Whether the notify EventFd is registered with the event loop.
    pub(super) notify_registered: bool,
}

impl VirtioBlock {
    /// Creates the device from its configuration, opening the backing if one is given.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let backend = match &config.path {
            Some(path) => Some(Box::new(FileDisk::open(path, config.read_only)?) as _),
            None => None,
        };
        Self::with_backend(&config.id, config.read_only, backend)
    }

    /// Creates the device with an already open backing (or none).
    pub fn with_backend(
        id: &str,
        read_only: bool,
        backend: Option<Box<dyn DiskBackend>>,
    ) -> Result<Self, BlockError> {
        let mut serial = [0u8; ID_BYTES];
        for (dst, src) in serial.iter_mut().zip(id.as_bytes()) {
            *dst = *src;
        }
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE;
        if read_only {
            avail_features |= VIRTIO_BLK_F_RO;
        } else {
            // Features are negotiated once but the backing may change: an empty slot offers
            // discard/write-zeroes (FileDisk has them), a slot created with a backing offers
            // what that backing can do. A later backing without them answers UNSUPP.
            let caps = backend.as_ref().map(|b| b.capabilities());
            if caps.is_none_or(|c| c.discard) {
                avail_features |= VIRTIO_BLK_F_DISCARD;
            }
            if caps.is_none_or(|c| c.write_zeroes) {
                avail_features |= VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        // An empty slot has no notify EventFd until its first disk ([`VirtioBlock::attach`]).
        let mut base = VirtioBase::without_notify(avail_features, &[QUEUE_SIZE]);
        if backend.is_some() {
            base.ensure_notify_event().map_err(BlockError::EventFd)?;
        }
        let mut dev = VirtioBlock {
            id: serial,
            base,
            slot_read_only: read_only,
            disk: None,
            active: None,
            needs_reset: false,
            config_dirty: false,
            bounce: Vec::new(),
            metrics: BlockMetrics::default(),
            notify_registered: false,
        };
        if let Some(backend) = backend {
            dev.set_disk(backend, read_only);
        }
        dev.config_dirty = false;
        Ok(dev)
    }

    /// Attaches `backend` to the slot (replacing any current one) and tells the driver about
    /// the new capacity. A read-only slot makes every backing read-only. The slot's first disk
    /// gives it its notify EventFd ([`VirtioDevice::notify_event`]): the VMM then registers it
    /// with KVM and the event loop.
    pub fn attach(
        &mut self,
        backend: Box<dyn DiskBackend>,
        read_only: bool,
    ) -> Result<(), BlockError> {
        self.base
            .ensure_notify_event()
            .map_err(BlockError::EventFd)?;
        self.set_disk(backend, read_only || self.slot_read_only);
        self.config_changed();
        Ok(())
    }

    /// Empties the slot: capacity 0, every I/O fails with `IOERR`.
    pub fn detach(&mut self) {
        if self.disk.take().is_some() {
            self.config_changed();
        }
    }

    /// Capacity in 512-byte sectors (0 for an empty slot).
    pub fn capacity(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.sectors)
    }

    /// Whether a backing is attached.
    pub fn is_attached(&self) -> bool {
        self.disk.is_some()
    }

    /// Counters.
    pub fn metrics(&self) -> BlockMetrics {
        self.metrics
    }

    fn set_disk(&mut self, backend: Box<dyn DiskBackend>, read_only: bool) {
        let sectors = backend.len() >> SECTOR_SHIFT;
        self.disk = Some(Disk {
            backend,
            read_only,
            sectors,
        });
    }

    /// Signals a configuration change (§4.2.3.3 / §2.5), or remembers it until activation.
    fn config_changed(&mut self) {
        match &self.active {
            Some(active) => {
                if let Err(e) = active.interrupt.trigger(InterruptKind::Config) {
                    log::error!("virtio-blk: config interrupt failed: {e}");
                }
            }
            None => self.config_dirty = true,
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let put = |c: &mut [u8; CONFIG_SIZE], off: usize, bytes: &[u8]| {
            if let Some(dst) = off
                .checked_add(bytes.len())
                .and_then(|end| c.get_mut(off..end))
            {
                dst.copy_from_slice(bytes);
            }
        };
        let seg_max = u32::from(QUEUE_SIZE).saturating_sub(2);
        put(&mut c, 0, &self.capacity().to_le_bytes());
        put(&mut c, 12, &seg_max.to_le_bytes());
        put(&mut c, 20, &BLK_SIZE.to_le_bytes());
        put(&mut c, 34, &1u16.to_le_bytes());
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(&mut c, 44, &1u32.to_le_bytes());
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(&mut c, 56, &[1]);
        c
    }

    /// Marks the queue corrupt: the device stops using it until the driver resets it
    /// (§2.1.2), and the driver is told through a configuration change interrupt.
    fn set_needs_reset(&mut self, interrupt: &Arc<dyn Interrupt>, why: &dyn std::fmt::Display) {
        guest_warn!("virtio-blk: queue corrupt, device needs reset: {why}");
        self.needs_reset = true;
        if let Err(e) = interrupt.trigger(InterruptKind::Config) {
            log::error!("virtio-blk: config interrupt failed: {e}");
        }
    }

    /// Sends a used-buffer interrupt.
    pub fn signal_used_queue(&self) {
        if let Some(active) = &self.active
            && let Err(e) = active.interrupt.trigger(InterruptKind::Queue)
        {
            log::error!("virtio-blk: queue interrupt failed: {e}");
        }
    }

    /// Completes the available requests and interrupts the driver if it wants that.
    pub(super) fn run_queue(&mut self) {
        if self.process_queue() {
            self.signal_used_queue();
        }
    }

    /// Completes every available request. Returns whether the driver must be interrupted.
    ///
    /// Requests are handled in batches ([`RingPass::drain`](crate::virtio::queue::RingPass::drain)):
    /// every available chain is popped, executed and given a used element, then the used index
    /// is published once for the batch and notifications are re-enabled (§2.7.10); the
    /// notification decision is taken once per batch. After `BUDGET` requests the device
    /// yields to the other devices on the event loop and comes back through its notify
    /// EventFd; a slot without one (empty, served on the vCPU thread) goes on instead.
    pub fn process_queue(&mut self) -> bool {
        let mut notify = false;
        loop {
            let (batch_notify, more) = self.process_batch();
            notify |= batch_notify;
            if !more || self.base.kick() {
                return notify;
            }
        }
    }

    /// One batch of at most `BUDGET` requests: (interrupt wanted, requests left).
    fn process_batch(&mut self) -> (bool, bool) {
        if self.needs_reset {
            return (false, false);
        }
        let Some(mut active) = self.active.take() else {
            return (false, false);
        };
        // Every chain of the pass is gathered into this one (no allocation per request).
        let mut bufs = ChainBuffers::default();
        let drained = drain_queue(
            &mut active.queue,
            GuestView::new(&active.mem),
            BUDGET,
            MAX_DESCS,
            &mut bufs,
            |chain, view| self.handle_chain(chain, view),
        );
        let corrupt = drained.corrupt.is_some();
        if let Some(e) = drained.corrupt {
            self.set_needs_reset(&active.interrupt, &e);
        }
        self.active = Some(active);
        (drained.notify, drained.budget_spent && !corrupt)
    }

    /// Parses and executes one gathered chain, writes its status, returns the used length.
    #[inline]
    fn handle_chain(
        &mut self,
        chain: Result<&ChainBuffers, ChainError>,
        view: &GuestView<'_>,
    ) -> u32 {
        self.metrics.requests = self.metrics.requests.wrapping_add(1);
        let parsed = chain
            .map_err(BadRequest::chain)
            .and_then(|bufs| Request::parse_buffers(bufs, view));
        let (status_addr, status, len) = match parsed {
            Err(bad) => {
                guest_warn!("virtio-blk: bad request: {}", bad.error);
                let Some(addr) = bad.status else {
                    self.metrics.errors = self.metrics.errors.wrapping_add(1);
                    return 0;
                };
                (addr, bad.status_code(), 1)
            }
            Ok(req) => match self.execute(&req, view) {
                Ok(len) => (req.status, VIRTIO_BLK_S_OK, len.saturating_add(1)),
                Err(e) => {
                    guest_warn!("virtio-blk: {:?} request failed: {e}", req.request_type);
                    (req.status, e.status(), 1)
                }
            },
        };
        match status {
            VIRTIO_BLK_S_OK => {}
            VIRTIO_BLK_S_UNSUPP => {
                self.metrics.unsupported = self.metrics.unsupported.wrapping_add(1);
            }
            _ => self.metrics.errors = self.metrics.errors.wrapping_add(1),
        }
        if let Err(e) = view.write_obj(status, status_addr) {
            guest_warn!("virtio-blk: cannot write status: {e}");
            return 0;
        }
        len
    }

    /// Executes a parsed request; returns the bytes written to guest data buffers.
    #[inline]
    fn execute(
        &mut self,
        req: &Request<&ChainBuffers>,
        view: &GuestView<'_>,
    ) -> Result<u32, ExecError> {
        if let RequestType::GetId = req.request_type {
            let n = req.data_len.min(ID_LEN);
            let id = self.id.get(..n as usize).unwrap_or(&[]);
            req.buffers().write_at_in(view, 0, id)?;
            return Ok(n);
        }
        let disk = self.disk.as_mut().ok_or(ExecError::NoBacking)?;
        let acked = self.base.acked_features();
        match req.request_type {
            RequestType::In => {
                let offset = byte_range(req.sector, u64::from(req.data_len), disk.sectors)?;
                copy_data::<TO_GUEST>(disk, &mut self.bounce, req, view, offset)?;
                self.metrics.read_bytes = self
                    .metrics
                    .read_bytes
                    .wrapping_add(u64::from(req.data_len));
                Ok(req.data_len)
            }
            RequestType::Out => {
                if disk.read_only {
                    return Err(ExecError::ReadOnly);
                }
                let offset = byte_range(req.sector, u64::from(req.data_len), disk.sectors)?;
                copy_data::<FROM_GUEST>(disk, &mut self.bounce, req, view, offset)?;
                self.metrics.write_bytes = self
                    .metrics
                    .write_bytes
                    .wrapping_add(u64::from(req.data_len));
                Ok(0)
            }
            RequestType::Flush => {
                disk.backend.flush().map_err(ExecError::Backend)?;
                Ok(0)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let discard = req.request_type == RequestType::Discard;
                let feature = if discard {
                    VIRTIO_BLK_F_DISCARD
                } else {
                    VIRTIO_BLK_F_WRITE_ZEROES
                };
                if acked & feature == 0 {
                    return Err(ExecError::Unsupported);
                }
                if disk.read_only {
                    return Err(ExecError::ReadOnly);
                }
                let caps = disk.backend.capabilities();
                if (discard && !caps.discard) || (!discard && !caps.write_zeroes) {
                    return Err(ExecError::Unsupported);
                }
                for seg in &req.segments {
                    discard_or_zero(disk, seg, discard)?;
                }
                Ok(0)
            }
            RequestType::GetId | RequestType::Unsupported(_) => Err(ExecError::Unsupported),
        }
    }
}

/// Executes one discard / write-zeroes segment (§5.2.6.2).
fn discard_or_zero(disk: &mut Disk, seg: &DiscardSegment, discard: bool) -> Result<(), ExecError> {
    // Discard takes no flags at all; write zeroes only the unmap flag.
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    if seg.flags & !allowed_flags != 0 {
        return Err(ExecError::Unsupported);
    }
    if seg.num_sectors > MAX_DISCARD_SECTORS {
        return Err(ExecError::OutOfRange {
            sector: seg.sector,
            len: u64::from(seg.num_sectors),
        });
    }
    let len = u64::from(seg.num_sectors) << SECTOR_SHIFT;
    let offset = byte_range(seg.sector, len, disk.sectors)?;
    if discard {
        disk.backend.discard(offset, len)
    } else {
        let unmap = seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        disk.backend.write_zeroes(offset, len, unmap)
    }
    .map_err(ExecError::Backend)
}

/// Byte offset of `[sector * 512, + len)` if it lies within `sectors`.
fn byte_range(sector: u64, len: u64, sectors: u64) -> Result<u64, ExecError> {
    let err = || ExecError::OutOfRange { sector, len };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(err)?;
    let end = offset.checked_add(len).ok_or_else(err)?;
    let capacity = sectors.checked_mul(SECTOR_SIZE).ok_or_else(err)?;
    if end > capacity {
        return Err(err());
    }
    Ok(offset)
}

/// Ensures the bounce buffer exists (allocated on first use, then reused).
fn bounce_buffer(bounce: &mut Vec<u8>) -> &mut [u8] {
    if bounce.is_empty() {
        bounce.resize(BOUNCE_SIZE, 0);
    }
    bounce.as_mut_slice()
}

/// [`copy_data`] direction of an `IN` request: backend -> the writable (guest) data buffers.
const TO_GUEST: bool = true;
/// [`copy_data`] direction of an `OUT` request: the readable (guest) data buffers after the
/// header -> backend.
const FROM_GUEST: bool = false;

/// Moves `req.data_len` bytes between the guest data buffers and the backend at
/// `disk_offset`: in place when the backend can, else in bounce-buffer sized pieces.
///
/// The direction is a const parameter so that each direction compiles to its own straight-line
/// copy loop, as two hand-written functions would (this is the block hot path).
#[inline]
fn copy_data<const IN: bool>(
    disk: &mut Disk,
    bounce: &mut Vec<u8>,
    req: &Request<&ChainBuffers>,
    view: &GuestView<'_>,
    mut disk_offset: u64,
) -> Result<(), ExecError> {
    let mut copy_slice = |slice: VolatileSlice<'_>| -> Result<(), ExecError> {
        let len = slice.len();
        let in_place = if IN {
            disk.backend.read_into_guest(disk_offset, slice)
        } else {
            disk.backend.write_from_guest(disk_offset, slice)
        }
        .map_err(ExecError::Backend)?;
        if in_place {
            disk_offset = disk_offset.saturating_add(len as u64);
            return Ok(());
        }
        let bounce = bounce_buffer(bounce);
        let mut done = 0usize;
        while done < len {
            let n = len.saturating_sub(done).min(bounce.len());
            let buf = bounce.get_mut(..n).ok_or(ExecError::Unsupported)?;
            let guest = slice.subslice(done, n).map_err(GuestMemoryError::from)?;
            if IN {
                disk.backend
                    .read_at(disk_offset, buf)
                    .map_err(ExecError::Backend)?;
                guest.copy_from(buf);
            } else {
                guest.copy_to(buf);
                disk.backend
                    .write_at(disk_offset, buf)
                    .map_err(ExecError::Backend)?;
            }
            done = done.saturating_add(n);
            disk_offset = disk_offset.saturating_add(n as u64);
        }
        Ok(())
    };
    let copy = |addr: GuestAddress, len: usize| view.for_each_slice(addr, len, &mut copy_slice);
    let len = u64::from(req.data_len);
    if IN {
        req.buffers().for_each_writable(0, len, copy)
    } else {
        req.buffers()
            .for_each_readable(u64::from(REQUEST_HEADER_SIZE), len, copy)
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    delegate_virtio_base!(base);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        guest_warn!(
            "virtio-blk: ignored config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.pop().ok_or(ActivateError::InvalidQueue(0))?;
        self.base.signal_activate()?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.needs_reset = false;
        if std::mem::take(&mut self.config_dirty) {
            // The capacity changed during driver initialization: make it re-read.
            self.config_changed();
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// An empty slot has no notify EventFd: its requests (each fails, or reads the serial)
    /// are completed here, on the vCPU thread, so it costs no descriptor until a disk comes.
    fn queue_notified(&mut self, _queue: u32) -> io::Result<()> {
        match self.base.notify_event() {
            Some(evt) => evt.write(1),
            None => {
                self.run_queue();
                Ok(())
            }
        }
    }

    fn reset(&mut self) -> Result<(), ActivateError> {
        self.active = None;
        self.base.reset_features();
        self.needs_reset = false;
        self.config_dirty = false;
        Ok(())
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active
            .iter()
            .map(|a| crate::virtio::queue_position(&a.queue))
            .collect()
    }
}

impl Drop for VirtioBlock {
    fn drop(&mut self) {
        if let Some(disk) = &mut self.disk
            && !disk.read_only
        {
            let _ = disk.backend.flush();
        }
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
    use crate::test_utils::{MemDisk, RecordingInterrupt, TestQueue, single_region_mem};
    use crate::virtio::block::defs::*;

    const W: bool = true;
    const R: bool = false;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM: usize = 0x40_0000;

    struct Env<'a> {
        mem: &'a GuestMemoryMmap,
        q: TestQueue<'a>,
        blk: VirtioBlock,
        irq: Arc<RecordingInterrupt>,
    }

    fn env<'a>(mem: &'a GuestMemoryMmap, disk: Option<MemDisk>, ro: bool) -> Env<'a> {
        let backend = disk.map(|d| Box::new(d) as Box<dyn DiskBackend>);
        let mut blk = VirtioBlock::with_backend("serial-0123456789abcdef", ro, backend).unwrap();
        let q = TestQueue::new(mem, GuestAddress(0), 256);
        let irq = Arc::new(RecordingInterrupt::new());
        blk.set_acked_features(blk.avail_features());
        blk.activate(mem.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        Env { mem, q, blk, irq }
    }

    fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        mem.write_obj(t, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// Submits one request and returns (status byte, used len).
    fn submit(e: &mut Env, descs: &[(u64, u32, bool)]) -> (u8, u32) {
        e.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let before = e.q.used_idx();
        e.q.add_chain(descs);
        e.blk.process_queue();
        assert_eq!(
            e.q.used_idx(),
            before.wrapping_add(1),
            "request not completed"
        );
        let (_, len) = e.q.used_elem(before);
        (e.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), len)
    }

    fn disk_with_pattern(sectors: usize) -> MemDisk {
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        MemDisk::from_vec(data)
    }

    #[test]
    fn features_and_config() {
        let blk =
            VirtioBlock::with_backend("abc", false, Some(Box::new(MemDisk::new(4096)))).unwrap();
        let f = blk.avail_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & bit, 0, "{bit:#x}");
        }
        assert_eq!(f & VIRTIO_BLK_F_RO, 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut v = [0u8; 4];
        blk.read_config(12, &mut v);
        assert_eq!(u32::from_le_bytes(v), 254);
        blk.read_config(20, &mut v);
        assert_eq!(u32::from_le_bytes(v), 512);
        blk.read_config(40, &mut v);
        assert_eq!(u32::from_le_bytes(v), MAX_DISCARD_SEGMENTS);
        // Past the end reads zero.
        let mut v = [0xffu8; 8];
        blk.read_config(58, &mut v);
        assert_eq!(v, [0; 8]);
        blk.read_config(u64::MAX, &mut v);
        assert_eq!(v, [0; 8]);

        let ro = VirtioBlock::with_backend("abc", true, None).unwrap();
        assert_ne!(ro.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro.avail_features() & VIRTIO_BLK_F_DISCARD, 0);
        // A backing without discard support does not offer it.
        let plain = VirtioBlock::with_backend(
            "abc",
            false,
            Some(Box::new(MemDisk::new(512).without_discard())),
        )
        .unwrap();
        assert_eq!(plain.avail_features() & VIRTIO_BLK_F_DISCARD, 0);
    }

    #[test]
    fn read_write_roundtrip() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(16)), false);
        header(&m, VIRTIO_BLK_T_IN, 2);
        let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1025));
        let mut buf = vec![0u8; 1024];
        m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 2));
        assert!(buf[512..].iter().all(|&b| b == 3));

        m.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 15);
        let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));
        header(&m, VIRTIO_BLK_T_IN, 15);
        // Split across odd-sized descriptors.
        let (s, _) = submit(
            &mut e,
            &[
                (HDR, 16, R),
                (DATA + 0x1000, 100, W),
                (DATA + 0x2000, 412, W),
                (STATUS, 1, W),
            ],
        );
        assert_eq!(s, VIRTIO_BLK_S_OK);
        let mut a = [0u8; 100];
        m.read_slice(&mut a, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(a, [0xee; 100]);
        let metrics = e.blk.metrics();
        assert_eq!(metrics.requests, 3);
        assert_eq!(metrics.read_bytes, 1536);
        assert_eq!(metrics.write_bytes, 512);
        assert!(
            e.irq.count(InterruptKind::Queue) == 0,
            "irq is raised by the caller"
        );
    }

    #[test]
    fn large_read_uses_chunks() {
        let m = single_region_mem(MEM);
        let sectors = 2 * BOUNCE_SIZE / 512 + 3;
        let mut e = env(&m, Some(disk_with_pattern(sectors)), false);
        header(&m, VIRTIO_BLK_T_IN, 0);
        let len = u32::try_from(sectors * 512).unwrap();
        let (s, used) = submit(&mut e, &[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)]);
        assert_eq!((s, used), (VIRTIO_BLK_S_OK, len + 1));
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(DATA + (sectors as u64 - 1) * 512))
            .unwrap();
        assert_eq!(b[0], (sectors - 1) as u8);
    }

    #[test]
    fn sector_bounds() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), false);
        header(&m, VIRTIO_BLK_T_IN, 7);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        header(&m, VIRTIO_BLK_T_IN, 7);
        let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_IOERR, 1));
        header(&m, VIRTIO_BLK_T_IN, 8);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        // sector * 512 overflows u64.
        header(&m, VIRTIO_BLK_T_OUT, u64::MAX / 256);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        // A zero-length read at the end is fine.
        header(&m, VIRTIO_BLK_T_IN, 8);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn partial_trailing_sector_is_hidden() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(MemDisk::new(1000)), false);
        assert_eq!(e.blk.capacity(), 1);
        header(&m, VIRTIO_BLK_T_IN, 1);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn write_to_read_only() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), true);
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);

        // A read-only backing in a writable slot.
        let mut e = env(&m, None, false);
        e.blk.attach(Box::new(disk_with_pattern(8)), true).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        // A read-only slot keeps any backing read-only.
        let mut e = env(&m, None, true);
        e.blk.attach(Box::new(disk_with_pattern(8)), false).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn flush_and_get_id() {
        let m = single_region_mem(MEM);
        let disk = MemDisk::new(4096);
        let flushes = disk.flush_counter();
        let mut e = env(&m, Some(disk), false);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        assert_eq!(flushes.load(std::sync::atomic::Ordering::SeqCst), 1);

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"serial-0123456789abc");
        // A short buffer gets a prefix.
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA + 100, 4, W), (STATUS, 1, W)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 5));
    }

    #[test]
    fn short_serial_is_nul_padded() {
        let m = single_region_mem(MEM);
        let q = TestQueue::new(&m, GuestAddress(0), 256);
        let mut blk = VirtioBlock::new(BlockConfig {
            id: "ab".into(),
            ..Default::default()
        })
        .unwrap();
        blk.activate(
            m.clone(),
            vec![q.queue()],
            Arc::new(RecordingInterrupt::new()),
        )
        .unwrap();
        let mut e = Env {
            mem: &m,
            q,
            blk,
            irq: Arc::new(RecordingInterrupt::new()),
        };
        m.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..3], b"ab\0");
    }

    fn discard_req(m: &GuestMemoryMmap, t: u32, segs: &[(u64, u32, u32)]) -> u32 {
        header(m, t, 0);
        for (i, (sector, n, flags)) in segs.iter().enumerate() {
            let a = DATA + 16 * i as u64;
            m.write_obj(*sector, GuestAddress(a)).unwrap();
            m.write_obj(*n, GuestAddress(a + 8)).unwrap();
            m.write_obj(*flags, GuestAddress(a + 12)).unwrap();
        }
        16 * segs.len() as u32
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(MemDisk::from_vec(vec![0xab; 8 * 512])), false);
        let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(1, 2, 0), (6, 1, 1)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        let mut buf = vec![0u8; 4096];
        m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        for (i, sector) in buf.chunks(512).enumerate() {
            let expect = if matches!(i, 1 | 2 | 6) { 0 } else { 0xab };
            assert!(sector.iter().all(|&b| b == expect), "sector {i}");
        }

        let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);
        // Unmap flag on discard and unknown flags: UNSUPP (§5.2.6.2).
        let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(0, 1, 1)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
        let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
        // Out of range, and sector overflow.
        let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(7, 2, 0)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX, u32::MAX, 0)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn discard_unsupported_by_backing_or_not_negotiated() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, None, false);
        e.blk
            .attach(Box::new(MemDisk::new(4096).without_discard()), false)
            .unwrap();
        let len = discard_req(&m, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_UNSUPP);

        let mut e = env(&m, Some(MemDisk::new(4096)), false);
        e.blk.set_acked_features(VIRTIO_F_VERSION_1);
        let len = discard_req(&m, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn malformed_requests_complete_with_errors() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), false);
        header(&m, 42, 0);
        let (s, len) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!((s, len), (VIRTIO_BLK_S_UNSUPP, 1));
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (s, _) = submit(&mut e, &[(HDR, 8, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        let (s, _) = submit(
            &mut e,
            &[(HDR, 16, R), (MEM as u64 - 256, 512, W), (STATUS, 1, W)],
        );
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        // No status byte: completed with length 0, status untouched.
        let (s, len) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, R)]);
        assert_eq!((s, len), (0xff, 0));
        let metrics = e.blk.metrics();
        assert_eq!(metrics.unsupported, 1);
        assert_eq!(metrics.errors, 4);
        assert!(!e.blk.needs_reset());
    }

    #[test]
    fn empty_slot_fails_io_and_attach_signals() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, None, false);
        assert_eq!(e.blk.capacity(), 0);
        assert!(!e.blk.is_attached());
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);

        e.blk
            .attach(Box::new(disk_with_pattern(32)), false)
            .unwrap();
        assert_eq!(e.irq.count(InterruptKind::Config), 1);
        let mut cap = [0u8; 8];
        e.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 32);
        header(&m, VIRTIO_BLK_T_IN, 31);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_OK);

        // Swap for a smaller disk: old sectors are now out of range.
        e.blk.attach(Box::new(disk_with_pattern(4)), false).unwrap();
        assert_eq!(e.irq.count(InterruptKind::Config), 2);
        let (s, _) = submit(&mut e, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(s, VIRTIO_BLK_S_IOERR);

        e.blk.detach();
        assert_eq!(e.irq.count(InterruptKind::Config), 3);
        e.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        // Detaching an empty slot changes nothing.
        e.blk.detach();
        assert_eq!(e.irq.count(InterruptKind::Config), 3);
    }

    #[test]
    fn attach_before_activation_signals_on_activation() {
        let m = single_region_mem(MEM);
        let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
        blk.attach(Box::new(MemDisk::new(4096)), false).unwrap();
        let q = TestQueue::new(&m, GuestAddress(0), 256);
        let irq = Arc::new(RecordingInterrupt::new());
        blk.activate(m.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        assert_eq!(irq.count(InterruptKind::Config), 1);
        // A plain activation does not.
        blk.reset().unwrap();
        let irq = Arc::new(RecordingInterrupt::new());
        blk.activate(m.clone(), vec![q.queue()], irq.clone())
            .unwrap();
        assert_eq!(irq.count(InterruptKind::Config), 0);
        assert_eq!(blk.notify_event().unwrap().read().unwrap(), 2);
    }

    #[test]
    fn an_empty_slot_has_no_notify_eventfd_and_serves_notifications_itself() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, None, false);
        assert!(e.blk.notify_event().is_none());
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        e.q.add_chain(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        e.blk.queue_notified(0).unwrap();
        assert_eq!(e.q.used_idx(), 1, "completed on the notifying thread");
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(e.irq.count(InterruptKind::Queue), 1);

        // Many at once: all of them are done on this call (nothing would come back later).
        header(&m, VIRTIO_BLK_T_IN, 0);
        for _ in 0..200 {
            e.q.add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        }
        e.blk.queue_notified(0).unwrap();
        assert_eq!(e.q.used_idx(), 201);

        // The first disk brings the EventFd: notifications go to the event loop from now on.
        e.blk.attach(Box::new(MemDisk::new(4096)), false).unwrap();
        let evt = e.blk.notify_event().expect("created by the attach");
        assert!(evt.read().is_err(), "nothing signalled yet");
        e.q.add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        e.blk.queue_notified(0).unwrap();
        assert_eq!(e.q.used_idx(), 201, "left to the event loop");
        assert_eq!(e.blk.notify_event().unwrap().read().unwrap(), 1);
        e.blk.detach();
        assert!(e.blk.notify_event().is_some(), "kept after a detach");
    }

    #[test]
    fn activation_checks_queue_count() {
        let m = single_region_mem(MEM);
        let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
        let irq = Arc::new(RecordingInterrupt::new());
        let err = blk.activate(m.clone(), vec![], irq.clone()).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        assert!(!blk.is_activated());
    }

    #[test]
    fn corrupt_avail_index_needs_reset() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), false);
        // The driver claims 1000 new entries in a 256-entry ring.
        e.q.set_avail_idx(1000);
        assert!(!e.blk.process_queue());
        assert!(e.blk.needs_reset());
        assert_eq!(e.irq.count(InterruptKind::Config), 1);
        // Nothing more happens until reset.
        assert!(!e.blk.process_queue());
        e.blk.reset().unwrap();
        assert!(!e.blk.needs_reset());
        assert!(!e.blk.is_activated());
        assert_eq!(e.blk.acked_features(), 0);
    }

    #[test]
    fn out_of_range_head_index_needs_reset() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), false);
        e.q.push_avail(300);
        e.blk.process_queue();
        assert!(e.blk.needs_reset());
    }

    #[test]
    fn unreadable_avail_entry_needs_reset() {
        // The available index is readable but its ring entries lie past the end of guest memory.
        // This used to look like an empty ring that always had work (an endless loop).
        use virtio_queue::QueueT;
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut queue = Queue::new(256).unwrap();
        queue.set_desc_table_address(Some(0), Some(0));
        queue.set_avail_ring_address(Some(0xffc), Some(0));
        queue.set_used_ring_address(Some(0x800), Some(0));
        queue.set_ready(true);
        m.write_obj(1u16, GuestAddress(0xffe)).unwrap();
        let mut blk =
            VirtioBlock::with_backend("x", false, Some(Box::new(MemDisk::new(4096)))).unwrap();
        let irq = Arc::new(RecordingInterrupt::new());
        blk.activate(m.clone(), vec![queue], irq.clone()).unwrap();
        assert!(!blk.process_queue());
        assert!(blk.needs_reset());
        assert_eq!(irq.count(InterruptKind::Config), 1);
    }

    #[test]
    fn completions_before_a_corrupt_entry_are_published() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), false);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
        e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
        e.q.push_avail(300);
        assert!(e.blk.process_queue());
        assert!(e.blk.needs_reset());
        assert_eq!(e.q.used_idx(), 2);
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        use virtio_queue::QueueT;
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), false);
        e.blk.reset().unwrap();
        let mut queue = e.q.queue();
        queue.set_event_idx(true);
        e.blk.set_acked_features(e.blk.avail_features());
        e.blk
            .activate(m.clone(), vec![queue], e.irq.clone())
            .unwrap();
        let used_event = |v: u16| {
            m.write_obj(v, GuestAddress(e.q.avail_addr().0 + 4 + 2 * 256))
                .unwrap()
        };
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        // The driver wants an interrupt once the used index passes 5.
        used_event(5);
        for _ in 0..3 {
            e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
        }
        assert!(!e.blk.process_queue());
        for _ in 0..3 {
            e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
        }
        assert!(e.blk.process_queue());
        assert_eq!(e.q.used_idx(), 6);
        // The device asked to be notified from the next available entry on.
        let avail_event: u16 = m
            .read_obj(GuestAddress(e.q.used_addr().0 + 4 + 8 * 256))
            .unwrap();
        assert_eq!(avail_event, 6);
    }

    #[test]
    fn many_requests_in_one_pass() {
        let m = single_region_mem(MEM);
        let mut e = env(&m, Some(disk_with_pattern(8)), false);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        for _ in 0..200 {
            e.q.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
        }
        assert!(e.blk.process_queue());
        assert_eq!(e.q.used_idx(), 200);
        assert_eq!(e.blk.metrics().requests, 200);
    }

    #[test]
    fn not_activated_does_nothing() {
        let mut blk = VirtioBlock::with_backend("x", false, None).unwrap();
        assert!(!blk.process_queue());
        blk.signal_used_queue();
    }

    #[test]
    fn config_writes_are_ignored() {
        let mut blk =
            VirtioBlock::with_backend("x", false, Some(Box::new(MemDisk::new(4096)))).unwrap();
        blk.write_config(0, &[0xff; 8]);
        assert_eq!(blk.capacity(), 8);
    }

    #[test]
    fn file_backed_slot() {
        use std::io::Write;
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().write_all(&[5u8; 2048]).unwrap();
        let blk = VirtioBlock::new(BlockConfig {
            id: "f".into(),
            path: Some(t.as_path().to_path_buf()),
            read_only: false,
        })
        .unwrap();
        assert_eq!(blk.capacity(), 4);
        let err = VirtioBlock::new(BlockConfig {
            id: "f".into(),
            path: Some("/nonexistent".into()),
            read_only: true,
        })
        .unwrap_err();
        assert!(matches!(err, BlockError::OpenBackingFile(..)));
    }
}
