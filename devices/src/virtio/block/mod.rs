// SPDX-License-Identifier: Apache-2.0
//! virtio-blk (virtio 1.2 §5.2) with a swappable backing: a "slot".
//!
//! A [`VirtioBlock`] always exists from VM start; its backing ([`DiskBackend`]) can be attached
//! and detached while the guest runs. Each swap changes the capacity in configuration space and
//! raises a configuration change interrupt, so the guest driver re-reads the capacity (no hotplug
//! bus needed). An empty slot has capacity 0 and fails every I/O request with `IOERR`.
//!
//! - [`request`]: pure request parsing (§5.2.6), the part fuzzed and property-tested.
//! - [`device`]: features, configuration space, activation, queue processing.
//! - [`backend`]: the [`DiskBackend`] trait and [`FileDisk`] (raw image file or block device).
//! - `event_handler`: event-manager glue.

pub mod backend;
pub mod device;
mod event_handler;
mod positioned;
pub mod request;

pub use backend::{BlockFile, DiskBackend, DiskCapabilities, FileDisk};
pub use device::{BlockConfig, BlockMetrics, DiskInfo, VirtioBlock};
pub use request::{BadRequest, Request, RequestError, RequestType};

/// Feature bits and protocol constants (virtio 1.2 §5.2.3, §5.2.6).
pub mod defs {
    /// Maximum number of segments in a request is in `seg_max`.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    /// Block size of the disk is in `blk_size`.
    pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
    /// Discard command support.
    pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
    /// Write zeroes command support.
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

    /// Read.
    pub const VIRTIO_BLK_T_IN: u32 = 0;
    /// Write.
    pub const VIRTIO_BLK_T_OUT: u32 = 1;
    /// Flush the write cache.
    pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
    /// Read the device id string (serial).
    pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
    /// Discard sectors.
    pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
    /// Write zeroes to sectors.
    pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

    /// Success.
    pub const VIRTIO_BLK_S_OK: u8 = 0;
    /// Device or driver error.
    pub const VIRTIO_BLK_S_IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

    /// `flags` bit of a write-zeroes segment: the device may deallocate the range.
    pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

    /// Sector size used by every virtio-blk address (§5.2.6), independent of `blk_size`.
    pub const SECTOR_SIZE: u64 = 512;
    /// log2 of [`SECTOR_SIZE`].
    pub const SECTOR_SHIFT: u32 = 9;
    /// Length of the `GET_ID` answer.
    pub const ID_BYTES: usize = 20;
    /// Size of the request header (type, reserved, sector).
    pub const REQUEST_HEADER_SIZE: u32 = 16;
    /// Size of one discard / write-zeroes segment.
    pub const DISCARD_SEGMENT_SIZE: u32 = 16;
    /// Segments accepted in one discard / write-zeroes request (`max_discard_seg`).
    pub const MAX_DISCARD_SEGMENTS: u32 = 32;
    /// Sectors accepted in one discard / write-zeroes segment (4 GiB - 512).
    pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
    /// Default (and maximum) queue size.
    pub const QUEUE_SIZE: u16 = 256;
}

/// Errors creating a block device or changing its backing.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file or device could not be opened.
    #[error("Failed to open backing file {0}")]
    OpenBackingFile(String, #[source] std::io::Error),
    /// The size of the backing could not be determined.
    #[error("Failed to get the size of the backing")]
    BackingSize(#[source] std::io::Error),
    /// The device's EventFds could not be created.
    #[error("Failed to create an EventFd")]
    EventFd(#[source] std::io::Error),
    /// The configured queue size is not a power of two in 2..=32768.
    #[error("Invalid queue size {0}")]
    QueueSize(u16),
    /// A handed-over disk's file no longer has the capacity the guest knows
    /// ([`VirtioBlock::restore_disk`]).
    #[error("The disk has {found} sectors, the guest knows it with {recorded}")]
    CapacityChanged {
        /// The capacity recorded when the VM was handed over.
        recorded: u64,
        /// The capacity of the file now.
        found: u64,
    },
    /// A disk cannot be restored into a slot whose driver is already running.
    #[error("The slot is already in use by its driver")]
    RestoreActive,
}
