// SPDX-License-Identifier: Apache-2.0
//! The virtio-blk device (virtio 1.2 §5.2): features, configuration space, activation, the
//! request queue, and run-time attach/detach of the backing ("slot").
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryError};

use super::BlockError;
use super::backend::{BlockFile, DiskBackend, FileDisk};
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
use crate::{GuestMemoryMmap, GuestSlice};

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

/// What the guest sees of a slot's disk: its capacity and whether its writes fail. A live
/// handover saves it with the VM, so the rebuilt slot is checked to show the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskInfo {
    /// Writes fail (the disk's or the slot's read-only flag).
    pub read_only: bool,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
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

    /// What the guest sees of the attached disk (`None` for an empty slot).
    pub fn disk_info(&self) -> Option<DiskInfo> {
        self.disk.as_ref().map(|d| DiskInfo {
            read_only: d.read_only,
            sectors: d.sectors,
        })
    }

    /// The attached disk for a live handover: a second descriptor of its file and what the
    /// guest knows of it. `None` for an empty slot; an `Unsupported` error for a backend that
    /// has no file (a test double, a custom backend).
    ///
    /// No request of this slot is half done when this runs between two passes of the VMM
    /// thread's event loop: every request is executed synchronously, from pop to used
    /// element, inside one [`VirtioBlock::process_queue`] call (on the VMM thread, or for an
    /// empty slot on the notifying vCPU thread, under the device's lock), so the file holds
    /// every completed write and nothing is in flight.
    pub fn handover_file(&self) -> Option<io::Result<BlockFile>> {
        let disk = self.disk.as_ref()?;
        let file = match disk.backend.try_clone_file() {
            Some(Ok(file)) => file,
            Some(Err(e)) => return Some(Err(e)),
            None => {
                return Some(Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "its backend has no file to pass on",
                )));
            }
        };
        Some(Ok(BlockFile {
            file,
            read_only: disk.read_only,
            sectors: disk.sectors,
        }))
    }

    /// Puts back the disk a handed-over VM's slot held, before the slot's transport is
    /// restored: unlike [`VirtioBlock::attach`] the driver is not told (it knows the capacity
    /// already), and the slot gets its notify EventFd as a first disk gives it. Fails, leaving
    /// the slot as it was, if the backend's capacity is not `disk.sectors` or the driver is
    /// already running the slot.
    pub fn restore_disk(
        &mut self,
        backend: Box<dyn DiskBackend>,
        disk: DiskInfo,
    ) -> Result<(), BlockError> {
        if self.active.is_some() {
            return Err(BlockError::RestoreActive);
        }
        let found = backend.len() >> SECTOR_SHIFT;
        if found != disk.sectors {
            return Err(BlockError::CapacityChanged {
                recorded: disk.sectors,
                found,
            });
        }
        self.base
            .ensure_notify_event()
            .map_err(BlockError::EventFd)?;
        self.set_disk(backend, disk.read_only || self.slot_read_only);
        Ok(())
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
    let mut copy_slice = |slice: GuestSlice<'_>| -> Result<(), ExecError> {
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
mod tests;
