// SPDX-License-Identifier: Apache-2.0
//! A paused VM saved for cloning: [`VmSnapshot`] (DESIGN.md section 8).
//!
//! [`crate::Vm::snapshot`] pauses the VM and saves, on its VMM thread, every vCPU's state (on
//! each vCPU's own thread, after KVM finished the exit it was in), the in-kernel irqchips, PIT
//! and clock, the serial UART and every virtio-mmio device's transport and queue positions. The
//! guest memory is not copied: the snapshot keeps the VM's memfd. [`crate::Vm::clone_from`]
//! starts a new VM on a copy-on-write mapping of it.
//!
//! A VM must not run again after its snapshot is taken (a clone reads every page it has not
//! written itself from the memfd, also later writes): the owner stops it.

use std::fs::File;
use std::sync::Arc;

use devices::legacy::SerialState;
use devices::virtio::transport::MmioState;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::kvm::state::{StateError, VcpuState, VmState};
use crate::pool::PoolKey;

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM's memory is itself a copy-on-write clone of another VM's: only a VM with its
    /// own memory can be a template.
    #[error("A VM cloned from a template cannot be snapshotted")]
    CloneMemory,
    /// The VM still has open vsock connections (their host ends would not exist for a clone):
    /// the VM keeps running; try again once they are closed.
    #[error("The VM has {0} open vsock connections")]
    Busy(usize),
    /// A vCPU thread did not do its part in time.
    #[error("A vCPU thread did not save its state in time")]
    VcpuTimeout,
    /// Reading KVM state failed.
    #[error("Failed to read the VM's state")]
    State(#[from] StateError),
}

/// A paused VM's state, enough to start clones of it.
#[derive(Debug)]
pub struct VmSnapshot {
    /// Tells snapshots apart (clone shells are kept per snapshot).
    pub(crate) id: u64,
    /// The template's memfd, shared with the template VM and the clones (not duplicated).
    pub(crate) memory: Arc<File>,
    pub(crate) mem_bytes: u64,
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) vm: VmState,
    pub(crate) serial: SerialState,
    pub(crate) devices: Vec<MmioState>,
}

/// Ids of snapshots: unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh snapshot id.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl VmSnapshot {
    /// The kind of shell its clones use.
    pub(crate) fn pool_key(&self) -> PoolKey {
        PoolKey {
            mem_bytes: self.mem_bytes,
            template: Some(self.id),
        }
    }

    /// Guest memory size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// The virtio device types in MMIO slot order (a clone's devices must match them).
    pub fn device_types(&self) -> Vec<u32> {
        self.devices.iter().map(|d| d.device_type).collect()
    }

    /// The template's guest memory (its memfd), for reading: clones map it copy-on-write.
    pub fn memory(&self) -> &File {
        &self.memory
    }

    /// The same, shared (clone shells map it).
    pub(crate) fn memory_arc(&self) -> &Arc<File> {
        &self.memory
    }

    /// Bytes of the template's memory that hold data (pages its guest wrote): what its clones
    /// share until they write them.
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.memory.metadata()?.blocks() * 512)
    }
}
