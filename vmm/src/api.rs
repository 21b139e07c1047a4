// SPDX-License-Identifier: Apache-2.0
//! Requests the VM handle sends to its VMM thread: the one way into a running VM.
//!
//! A request travels over a channel and wakes the VMM thread through its API EventFd; the reply
//! comes back on a per-request channel, within [`REQUEST_TIMEOUT`]. Every runtime change of a
//! VM (pause, resume, stop, a block slot's disk) goes through here and runs on the VMM thread,
//! between two passes of its event loop, as in Firecracker and Cloud Hypervisor. Each variant
//! says which VM states allow it.

use std::fmt;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use devices::virtio::block::DiskBackend;

use crate::device_manager::DeviceError;
use crate::snapshot::{SnapshotError, VmSnapshot};

/// How long a caller waits for the VMM thread's answer. The thread answers between two
/// passes of its event loop, and every device bounds its work per pass, so only a thread that
/// is stuck (a bug) makes a request time out.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An action for the VMM thread.
pub enum VmmAction {
    /// Parks every vCPU outside the guest. Allowed while running (a no-op when paused).
    Pause,
    /// Lets paused vCPUs run again. Allowed while running or paused.
    Resume,
    /// Ends the VM. Allowed in every state; the VM then reports [`crate::VmExit::Stopped`].
    Stop,
    /// Puts `disk` into block slot `index` (the guest gets a config-change interrupt and sees
    /// the new capacity). Allowed while running or paused. The caller opens the disk: the VMM
    /// thread opens no files.
    AttachDisk {
        /// The slot.
        index: usize,
        /// The opened image or block device.
        disk: Box<dyn DiskBackend>,
        /// Whether the guest may only read it.
        read_only: bool,
    },
    /// Empties block slot `index` (capacity 0; I/O fails until the next attach). Allowed while
    /// running or paused.
    DetachDisk {
        /// The slot.
        index: usize,
    },
    /// Pauses the VM (it stays paused) and saves its state for clones
    /// ([`crate::snapshot::VmSnapshot`]). Allowed while running or paused, for a VM that has its
    /// own memory (not a clone).
    Snapshot,
    /// Pauses the VM and saves its state for a live handover to another process
    /// ([`crate::Vm::handover`]): allowed for every running or paused VM, clones and VMs
    /// with open vsock connections included (the rebuilt VM resets its guest's vsock
    /// transport). From then on the VM is frozen: its devices stop too (no guest memory
    /// changes), until [`VmmAction::Resume`] (the handover failed: the VM goes on) or
    /// [`VmmAction::Stop`] (it succeeded).
    Handover,
    /// Lends a clone's memory mapping (copy-on-write on its template's memfd) and the VM's
    /// fd, to log the writes to it (the guest's in KVM's dirty log, the host's in the regions'
    /// bitmaps) and copy the pages it wrote while it runs ([`crate::Vm::precopy`]). The
    /// logging ioctls are the caller's (the VM's own threads are not allowed them). Allowed
    /// while running or paused; refused for a VM with its own memory.
    Mapping,
    /// Closes the host end of every vsock connection of a VM handed over ([`Self::Handover`])
    /// to a process that took it: their host peers see them end now. Allowed in every state.
    ReleaseHostEnds,
    /// Test hook: makes the VM's own threads panic (see [`PanicSite`]), so that a test can
    /// check a panic ends that VM only. Nothing a guest or an API client does reaches it.
    #[doc(hidden)]
    InjectPanic(PanicSite),
    /// Test hook: the VMM thread sleeps this long before it answers (a hung VMM thread, for
    /// [`crate::Vm::stop`]'s escalation). Nothing a guest or an API client does reaches it.
    #[doc(hidden)]
    InjectHang(std::time::Duration),
}

/// Where [`VmmAction::InjectPanic`] panics.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanicSite {
    /// On the VMM thread, holding a device's lock, as a device handler would.
    Device,
    /// On a vCPU thread, in its exit handling (the vCPUs are kicked to get there).
    VcpuExit,
}

impl fmt::Debug for VmmAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmAction::Pause => f.write_str("Pause"),
            VmmAction::Resume => f.write_str("Resume"),
            VmmAction::Stop => f.write_str("Stop"),
            VmmAction::AttachDisk {
                index, read_only, ..
            } => f
                .debug_struct("AttachDisk")
                .field("index", index)
                .field("read_only", read_only)
                .finish_non_exhaustive(),
            VmmAction::DetachDisk { index } => {
                f.debug_struct("DetachDisk").field("index", index).finish()
            }
            VmmAction::Snapshot => f.write_str("Snapshot"),
            VmmAction::Handover => f.write_str("Handover"),
            VmmAction::Mapping => f.write_str("Mapping"),
            VmmAction::ReleaseHostEnds => f.write_str("ReleaseHostEnds"),
            VmmAction::InjectPanic(site) => f.debug_tuple("InjectPanic").field(site).finish(),
            VmmAction::InjectHang(d) => f.debug_tuple("InjectHang").field(d).finish(),
        }
    }
}

/// A successful reply.
#[derive(Debug)]
pub enum VmmData {
    /// Nothing to return.
    Empty,
    /// The VM's saved state ([`VmmAction::Snapshot`]).
    Snapshot(Box<VmSnapshot>),
    /// The VM's saved state for a handover ([`VmmAction::Handover`]); for a clone, also its
    /// memory mapping, from which [`crate::Vm::handover`] copies the pages it wrote, and the
    /// VM's fd, to read the writes logged since [`crate::Vm::precopy`].
    Handover(
        Box<VmSnapshot>,
        Option<(devices::GuestMemoryMmap, Arc<kvm_ioctls::VmFd>)>,
    ),
    /// A clone's memory mapping and the VM's fd ([`VmmAction::Mapping`]). The fd is held only
    /// while the mapping is (dropped first): KVM must not outlive the mapping it was given.
    Mapping(devices::GuestMemoryMmap, Arc<kvm_ioctls::VmFd>),
}

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// The VM has ended.
    #[error("The VM is not running")]
    NotRunning,
    /// Some vCPU did not leave the guest in time.
    #[error("Timed out waiting for the vCPUs to pause")]
    PauseTimedOut,
    /// The VMM thread did not answer within [`REQUEST_TIMEOUT`].
    #[error("The VMM thread did not answer {0} within {REQUEST_TIMEOUT:?}")]
    TimedOut(&'static str),
    /// A device operation failed.
    #[error("Device operation failed")]
    Device(#[from] DeviceError),
    /// The snapshot failed (the VM stays paused).
    #[error("Snapshot failed")]
    Snapshot(#[from] SnapshotError),
}

/// A request and where its answer goes.
pub(crate) type ApiRequest = (VmmAction, Reply);

/// A request's answer.
pub(crate) type Answer = Result<VmmData, VmmActionError>;

/// Where a request's answer goes: to a caller waiting on a channel, or into a function the
/// VMM thread calls with it (which only passes it on: it runs confined, on the VM's thread).
/// A request never taken (the VM ended first) is answered [`VmmActionError::NotRunning`].
pub(crate) enum Reply {
    /// A waiting caller's channel.
    Channel(Sender<Answer>),
    /// Called with the answer.
    Call(Option<Box<dyn FnOnce(Answer) + Send>>),
}

impl Reply {
    /// Answers the request.
    pub(crate) fn send(mut self, answer: Answer) {
        match &mut self {
            Reply::Channel(tx) => {
                let _ = tx.send(answer);
            }
            Reply::Call(call) => {
                if let Some(call) = call.take() {
                    call(answer);
                }
            }
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Reply::Call(call) = self
            && let Some(call) = call.take()
        {
            call(Err(VmmActionError::NotRunning));
        }
    }
}

impl VmmAction {
    /// The action's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            VmmAction::Pause => "Pause",
            VmmAction::Resume => "Resume",
            VmmAction::Stop => "Stop",
            VmmAction::AttachDisk { .. } => "AttachDisk",
            VmmAction::DetachDisk { .. } => "DetachDisk",
            VmmAction::Snapshot => "Snapshot",
            VmmAction::Handover => "Handover",
            VmmAction::Mapping => "Mapping",
            VmmAction::ReleaseHostEnds => "ReleaseHostEnds",
            VmmAction::InjectPanic(_) => "InjectPanic",
            VmmAction::InjectHang(_) => "InjectHang",
        }
    }
}
