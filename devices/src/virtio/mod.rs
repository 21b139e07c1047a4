// SPDX-License-Identifier: Apache-2.0
//! Virtio device model shared by every device (virtio 1.x, modern only) and the MMIO transport.
//!
//! The contract between the pieces:
//! - A device implements [`VirtioDevice`] (feature bits, config space, activation) and, for the
//!   event loop, `event_manager::MutEventSubscriber` (it is shared as `Arc<Mutex<D>>` by the
//!   transport and the VMM's event manager).
//! - A device has one notify EventFd for all its queues ([`VirtioDevice::notify_event`]),
//!   created at construction so the VMM can register it as a KVM ioeventfd on the transport's
//!   `QueueNotify` register (any value) before the driver activates anything. A notification
//!   means "look at every queue": virtio-mmio tells the device which queue, but checking a
//!   queue with nothing new costs a read of its avail index, while an EventFd per queue costs
//!   a descriptor per queue of every device of every VM. The same EventFd wakes the event-loop
//!   half after activation and when a device that ran out of budget comes back. A device may
//!   have none (an empty block slot): its notifications then reach
//!   [`VirtioDevice::queue_notified`] on the vCPU thread.
//! - The transport owns the device status, feature paging and queue configuration; on
//!   `DRIVER_OK` it calls [`VirtioDevice::activate`] (on a vCPU thread) with the configured
//!   queues. The device then wakes its event-loop half through its notify EventFd.
//! - Interrupts go through [`Interrupt`]: the real implementation is [`IrqTrigger`], status
//!   bits plus a [`Line`] the VMM provides (a KVM interrupt line); tests use a recording one.

pub mod vsock;

use std::fmt::Debug;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Interrupt status bit: the device used a buffer in a queue (virtio 1.2 §4.2.2.1).
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Why a device raises an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// A used buffer notification.
    Queue,
    /// A configuration change notification.
    Config,
}

impl InterruptKind {
    /// The interrupt status bit this kind sets.
    pub fn status_bit(self) -> u32 {
        match self {
            InterruptKind::Queue => VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// The device's interrupt line plus the virtio-mmio `InterruptStatus` register behind it.
pub trait Interrupt: Send + Sync + Debug {
    /// Sets the status bit for `kind` and signals the interrupt.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
    /// Current `InterruptStatus` register value.
    fn status(&self) -> u32;
    /// Clears the given bits (`InterruptACK` register write).
    fn ack(&self, bits: u32);
    /// Sets status bits without signalling (a device restored from a snapshot whose interrupt
    /// was pending: the interrupt controller's own state already holds the line).
    fn restore_status(&self, bits: u32);
}

/// A line a device raises: an interrupt line, or the platform's reset line. How the edge
/// reaches the guest (or the VMM) is the VMM's business; tests and benchmarks use an
/// [`EventFd`] (each pulse adds one to its counter).
pub trait Line: Send + Sync + Debug {
    /// Raises the line once: one edge.
    fn pulse(&self) -> io::Result<()>;
}

impl Line for EventFd {
    fn pulse(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// The real interrupt: the `InterruptStatus` bits plus the device's interrupt [`Line`].
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    line: Arc<dyn Line>,
}

impl IrqTrigger {
    /// A trigger with no status bits set that pulses `line`.
    pub fn new(line: Arc<dyn Line>) -> Self {
        IrqTrigger {
            status: AtomicU32::new(0),
            line,
        }
    }
}

impl Interrupt for IrqTrigger {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        // The bit first: the driver's handler reads it when the edge arrives.
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        self.line.pulse()
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

/// Why activation or reset failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device needs.
    #[error("Expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver set up.
        got: usize,
    },
    /// A configured queue is not usable (size, alignment or addresses).
    #[error("Queue {0} is not valid")]
    InvalidQueue(usize),
    /// Waking the event loop (the notify EventFd) failed.
    #[error("Failed to wake the event loop")]
    WakeEventLoop(#[source] io::Error),
    /// The backend could not be prepared.
    #[error("Backend failed to activate: {0}")]
    Backend(String),
    /// The device does not support reset.
    #[error("Device does not support reset")]
    ResetUnsupported,
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send + Debug {
    /// Virtio device id (virtio 1.2 §5: 2 = block, 1 = net, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The EventFd every queue's notification signals (see the module docs); the VMM
    /// registers it as an ioeventfd on `QueueNotify`. `None` while the device has none: its
    /// notifications then come through [`VirtioDevice::queue_notified`].
    fn notify_event(&self) -> Option<&EventFd>;
    /// The driver wrote `queue` to `QueueNotify` and no ioeventfd took the write (the device
    /// has no notify EventFd, or the VMM has not registered it yet): called on the vCPU
    /// thread. By default the notify EventFd is signalled, as an ioeventfd would have done.
    fn queue_notified(&mut self, queue: u32) -> io::Result<()> {
        let _ = queue;
        match self.notify_event() {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver acknowledged.
    fn acked_features(&self) -> u64;
    /// Stores the driver's acknowledged features (already masked to the offered ones).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads device configuration space at `offset`; bytes out of range read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; writes out of range or to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues. Called once per `DRIVER_OK`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<virtio_queue::Queue>,
        interrupt: std::sync::Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Whether [`VirtioDevice::activate`] has succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// Returns the device to its initial state (driver wrote 0 to `Status`).
    fn reset(&mut self) -> Result<(), ActivateError>;
    /// True when the device found the driver's queues corrupt; the transport then reports
    /// `DEVICE_NEEDS_RESET` in `Status` (virtio 1.2 §2.1.2).
    fn needs_reset(&self) -> bool {
        false
    }
    /// Where each queue is (`next_avail`, `next_used`), in queue order, for a snapshot: empty
    /// when the device is not activated. Called between two passes of the event loop, so no
    /// chain is half done.
    fn queue_positions(&self) -> Vec<(u16, u16)>;
    /// Called once after [`VirtioDevice::activate`] gave the device the queues of a snapshot
    /// (a VM restored or cloned), for a device that must tell the driver what the restore
    /// changed. Nothing by default (virtio-vsock sends no transport reset: see its device).
    fn restored(&mut self) {}
}

/// Where `queue` is: (`next_avail`, `next_used`).
pub(crate) fn queue_position(queue: &virtio_queue::Queue) -> (u16, u16) {
    use virtio_queue::QueueT;
    (queue.next_avail(), queue.next_used())
}

pub(crate) mod base;
pub mod block;
pub mod net;
pub mod queue;
pub mod transport;

/// Feature bit: the device conforms to virtio 1.x (virtio 1.2 §6). Every device offers it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the `used_event`/`avail_event` notification suppression (virtio 1.2 §2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Decides whether a guest-triggered log line may be printed: the first 8 of each call site,
/// then every power of two. A guest can trigger them at will, so they must not flood the log.
#[doc(hidden)]
pub fn log_allowed(counter: &std::sync::atomic::AtomicU64) -> bool {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    n < 8 || n.is_power_of_two()
}

/// `log::warn!` for guest-triggered conditions, rate limited per call site (see [`log_allowed`]).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static COUNT: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        if $crate::virtio::log_allowed(&COUNT) {
            ::log::warn!($($arg)+);
        }
    }};
}
pub(crate) use guest_warn;
