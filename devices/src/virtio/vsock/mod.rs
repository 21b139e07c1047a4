// SPDX-License-Identifier: Apache-2.0
//! Virtio-vsock device (virtio 1.2 §5.10) with an in-process connection multiplexer.
//!
//! The pieces:
//! - [`packet`]: the 44-byte packet header and its transfer from TX chains / to RX chains
//!   (pure parsing, guest input is hostile).
//! - [`device`]: [`Vsock`], the virtio device (features, config space, queues) that moves
//!   packets between the guest and a [`VsockBackend`].
//! - [`backend`]: the backend trait and [`VsockMuxer`], the real backend: a per-VM connection
//!   table with credit-based flow control and two host interfaces, the in-process
//!   [`VsockHandle`] and the Firecracker/Cloud Hypervisor hybrid-vsock unix socket.
//! - `connection`: one connection's state machine and credit accounting.
//! - [`handle`]: [`VsockHandle`] and [`VsockListener`], the thread-safe host API.
//! - [`event_handler`]: event-manager glue.
//!
//! Memory bounds: a connection buffers at most [`MuxerLimits::conn_buf_size`] bytes of guest
//! data for a slow host reader (the credit it advertises), host data is read straight into the
//! guest's RX buffer only while the guest has credit, and the number of connections, queued
//! resets and half-open hybrid clients are all capped.

pub mod backend;
mod connection;
pub mod device;
pub mod event_handler;
pub mod handle;
#[cfg(test)]
mod muxer_tests;
pub mod packet;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use backend::{MuxerLimits, VsockBackend, VsockMuxer};
pub use device::Vsock;
pub use handle::{PendingConnect, VsockHandle, VsockListener};
pub use packet::{PacketError, VsockHeader};

/// Protocol constants (virtio 1.2 §5.10.6 and Linux `virtio_vsock.h`).
pub mod defs {
    /// The host's well-known CID.
    pub const VSOCK_HOST_CID: u64 = 2;
    /// Size of `struct virtio_vsock_hdr` on the wire.
    pub const PKT_HEADER_SIZE: usize = 44;
    /// Largest data payload of one packet, in either direction (Linux uses the same bound).
    pub const MAX_PKT_DATA_SIZE: usize = 64 * 1024;

    /// Index of the RX queue (device -> driver).
    pub const RXQ_INDEX: usize = 0;
    /// Index of the TX queue (driver -> device).
    pub const TXQ_INDEX: usize = 1;
    /// Index of the event queue.
    pub const EVQ_INDEX: usize = 2;
    /// Number of queues.
    pub const NUM_QUEUES: usize = 3;
    /// Event id of `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (§5.10.6.7).
    pub const EVENT_TRANSPORT_RESET: u32 = 0;
    /// Maximum size of each queue.
    pub const QUEUE_SIZE: u16 = 256;
    /// Size of the device configuration space (`le64 guest_cid`).
    pub const CONFIG_SPACE_SIZE: usize = 8;

    /// Stream socket type.
    pub const TYPE_STREAM: u16 = 1;

    /// Connection request.
    pub const OP_REQUEST: u16 = 1;
    /// Connection accepted.
    pub const OP_RESPONSE: u16 = 2;
    /// Connection reset (refused or aborted).
    pub const OP_RST: u16 = 3;
    /// Orderly shutdown of one or both directions.
    pub const OP_SHUTDOWN: u16 = 4;
    /// Data.
    pub const OP_RW: u16 = 5;
    /// Unsolicited credit information.
    pub const OP_CREDIT_UPDATE: u16 = 6;
    /// Request for credit information.
    pub const OP_CREDIT_REQUEST: u16 = 7;

    /// SHUTDOWN flag: the sender will receive no more data.
    pub const SHUTDOWN_RCV: u32 = 1;
    /// SHUTDOWN flag: the sender will send no more data.
    pub const SHUTDOWN_SEND: u32 = 2;

    /// First local port handed out for host-initiated connections.
    pub const LOCAL_PORT_START: u32 = 1 << 30;
    /// Standalone resets (answers to packets for unknown connections) waiting for RX buffers;
    /// more are dropped so a guest that never posts RX buffers cannot grow host memory.
    pub const MAX_PENDING_RST: usize = 256;
    /// Hybrid-socket clients that have not yet sent their `CONNECT <port>` line.
    pub const MAX_PENDING_HYBRID: usize = 32;
    /// Longest accepted `CONNECT <port>\n` line.
    pub const MAX_CONNECT_LINE: usize = 64;
}

/// Errors creating or running the vsock device and its backend.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or does not fit the 32-bit address space.
    #[error("Invalid guest CID {0}")]
    InvalidGuestCid(u64),
    /// Creating an EventFd failed.
    #[error("Failed to create an EventFd")]
    CreateEventFd(#[source] io::Error),
    /// Creating the muxer's epoll instance failed.
    #[error("Failed to create the vsock epoll instance")]
    CreateEpoll(#[source] io::Error),
    /// Creating the muxer's timer failed.
    #[error("Failed to create the vsock timer")]
    CreateTimer(#[source] vmm_sys_util::errno::Error),
    /// Registering a descriptor with the muxer's epoll instance failed.
    #[error("Failed to register a descriptor with the vsock epoll instance")]
    EpollCtl(#[source] io::Error),
    /// Binding the hybrid-vsock unix socket failed.
    #[error("Failed to bind the hybrid vsock socket {0}")]
    BindUds(PathBuf, #[source] io::Error),
    /// The muxer limits are unusable.
    #[error("Invalid vsock limits: {0}")]
    InvalidLimits(&'static str),
}

/// Counters of the device and muxer. Each field counts events since creation.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Well-formed packets taken from the guest.
    pub tx_packets: AtomicU64,
    /// TX chains rejected by the parser.
    pub tx_malformed: AtomicU64,
    /// RX chains too small or not writable.
    pub rx_bad_buffers: AtomicU64,
    /// Queues found corrupt (device needs reset).
    pub queue_errors: AtomicU64,
    /// Packets dropped for a wrong source or destination CID.
    pub wrong_cid: AtomicU64,
    /// Resets sent for packets that matched no connection.
    pub rst_unknown: AtomicU64,
    /// Resets dropped because the reset queue was full.
    pub rst_dropped: AtomicU64,
    /// Connections created (either direction).
    pub conns_opened: AtomicU64,
    /// Connections refused because the table was full.
    pub conns_over_limit: AtomicU64,
    /// Connections killed because the guest overran its credit.
    pub credit_violations: AtomicU64,
    /// Connections killed for a protocol error by the guest.
    pub protocol_errors: AtomicU64,
}

impl VsockMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lets through at most a few log lines per second, so a hostile guest cannot flood the log.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    window_start: Option<Instant>,
    count: u32,
}

impl LogLimiter {
    const PER_SECOND: u32 = 10;

    /// Whether one more line may be logged now.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {
                self.count = self.count.saturating_add(1);
                self.count <= Self::PER_SECOND
            }
            _ => {
                self.window_start = Some(now);
                self.count = 1;
                true
            }
        }
    }
}

/// Checks that `cid` is usable as a guest CID: not one of the reserved 0, 1, 2 and not
/// `VMADDR_CID_ANY`, and within 32 bits (Linux uses only the low 32 bits).
pub fn validate_guest_cid(cid: u64) -> Result<(), VsockError> {
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidGuestCid(cid));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cid_validation() {
        for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(matches!(
                validate_guest_cid(bad),
                Err(VsockError::InvalidGuestCid(c)) if c == bad
            ));
        }
        for good in [3, 42, u64::from(u32::MAX) - 1] {
            validate_guest_cid(good).expect("valid cid");
        }
    }

    #[test]
    fn log_limiter_caps_lines_per_window() {
        let mut limiter = LogLimiter::default();
        let allowed = (0..100).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, LogLimiter::PER_SECOND as usize);
    }
}
