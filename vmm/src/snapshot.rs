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
use devices::virtio::block::DiskInfo;
use devices::virtio::transport::MmioState;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::device_manager::HandoverFiles;
use crate::kvm::state::{StateError, VcpuState, VmState};
use crate::pool::PoolKey;

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM's memory is itself a copy-on-write clone of another VM's: only a VM with its
    /// own memory can be a template.
    #[error("A VM cloned from a template cannot be snapshotted")]
    CloneMemory,
    /// The VM has its own memory (not a clone's): no pages to copy ahead of a handover.
    #[error("The VM has its own memory: nothing to copy ahead")]
    OwnMemory,
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
    /// The devices' host files could not be duplicated for a handover.
    #[error("Failed to pass on the devices' host files")]
    Files(#[source] std::io::Error),
    /// A clone's written pages could not be copied.
    #[error("Failed to save a clone's memory")]
    Delta(#[source] crate::memory::DeltaError),
}

/// What a saved VM's memory is, and so how a VM is rebuilt on it.
#[derive(Debug)]
pub enum SavedMemory {
    /// A template's ([`crate::Vm::snapshot`]): clones map the memfd copy-on-write.
    Template,
    /// A VM's own memory, saved for a live handover ([`crate::Vm::handover`]): the VM rebuilt
    /// from it maps the same memfd shared (no copy).
    Own,
    /// A clone's, saved for a live handover: the memfd is its template's and `delta` holds the
    /// pages the clone wrote, at their offsets (a sparse memfd). The rebuilt VM maps the
    /// template's memfd copy-on-write and writes the delta back into it.
    Clone {
        /// The clone's written pages.
        delta: File,
        /// With pages copied ahead ([`crate::Vm::precopy`]): that copy's id. `delta` then
        /// holds only the pages that differ from it, and the VM must be rebuilt on a shell
        /// the copy was written into ([`crate::PreparedShell::with_base`]).
        base: Option<u64>,
    },
}

/// A paused VM's state: enough to start clones of it (a template) or to rebuild it in another
/// process (a live handover).
#[derive(Debug)]
pub struct VmSnapshot {
    /// Tells snapshots apart (clone shells are kept per snapshot).
    pub(crate) id: u64,
    /// What the memory is.
    pub(crate) kind: SavedMemory,
    /// The template's memfd, shared with the template VM and the clones (not duplicated); for a
    /// handover, the VM's own memfd or its template's.
    pub(crate) memory: Arc<File>,
    pub(crate) mem_bytes: u64,
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) vm: VmState,
    pub(crate) serial: SerialState,
    pub(crate) devices: Vec<MmioState>,
    /// What each block slot held, in slot order, as the guest saw it: a VM rebuilt after a
    /// handover must hold the same ([`crate::CloneConfig::disks`]).
    pub(crate) disks: Vec<Option<DiskInfo>>,
    /// The vsock connections (host port, guest port) open when a VM was handed over: the
    /// restored VM resets them in its guest. Empty for a template.
    pub(crate) vsock_stale: Vec<(u32, u32)>,
    /// For a handover: the host files its devices use (not encoded: they travel as
    /// descriptors next to it).
    pub(crate) files: HandoverFiles,
    /// When the VMM began stopping the VM's vCPUs for this save (the guest's pause began
    /// then or a few microseconds later); `None` for a snapshot decoded from bytes.
    pub(crate) paused_at: Option<std::time::Instant>,
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

    /// What each block slot held when the VM was saved, in slot order (`None`: empty).
    pub fn disks(&self) -> &[Option<DiskInfo>] {
        &self.disks
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

/// The version of [`VmSnapshot::encode`]'s format. A process refuses a saved VM of another
/// version ([`DecodeError::Version`]): a live handover between binaries that disagree fails
/// before any VM moves. Version 2 added the block slots' disks, version 3 a clone's
/// pre-copied base, version 4 writes a vCPU's XSAVE area as bytes.
pub const FORMAT_VERSION: u32 = 4;
/// Leads every encoded VM (`SBXVM` and a format byte).
const MAGIC: [u8; 6] = *b"SBXVM\x01";

/// Why a saved VM could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a saved VM.
    #[error("Not a saved VM (bad magic)")]
    Magic,
    /// The saved VM is of another format version.
    #[error("Saved VM format version {found}, this binary reads version {FORMAT_VERSION}")]
    Version {
        /// The version in the bytes.
        found: u32,
    },
    /// The body is malformed.
    #[error("Malformed saved VM: {0}")]
    Body(String),
    /// The files do not match what the record says (memory, delta).
    #[error("A saved VM of kind {kind} needs {want} files, {got} were given")]
    Files {
        /// The memory kind.
        kind: &'static str,
        /// Files it needs.
        want: usize,
        /// Files given.
        got: usize,
    },
}

/// vm-superio's UART state, field by field, for serde (it has no serde implementation).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The encoded body: everything but the files.
#[derive(Serialize, Deserialize)]
struct Record {
    /// 0 template, 1 own, 2 clone.
    kind: u8,
    mem_bytes: u64,
    vcpus: Vec<VcpuState>,
    vm: VmState,
    #[serde(with = "SerialDef")]
    serial: SerialState,
    devices: Vec<MmioState>,
    disks: Vec<Option<DiskInfo>>,
    vsock_stale: Vec<(u32, u32)>,
    /// A clone's: the id of the pages copied ahead its delta builds on.
    base: Option<u64>,
}

/// [`Record`] as [`VmSnapshot::encode`] writes it, borrowing the snapshot's parts (the same
/// fields in the same order: the same bytes).
#[derive(Serialize)]
struct RecordRef<'a> {
    kind: u8,
    mem_bytes: u64,
    vcpus: &'a [VcpuState],
    vm: &'a VmState,
    #[serde(serialize_with = "serial_ref")]
    serial: &'a SerialState,
    devices: &'a [MmioState],
    disks: &'a [Option<DiskInfo>],
    vsock_stale: &'a [(u32, u32)],
    base: Option<u64>,
}

fn serial_ref<S: serde::Serializer>(serial: &&SerialState, out: S) -> Result<S::Ok, S::Error> {
    SerialDef::serialize(serial, out)
}

impl VmSnapshot {
    /// The state as bytes (magic, [`FORMAT_VERSION`], body) and the files that go with it, in
    /// order: the memory memfd, then a clone's delta. Another process rebuilds the snapshot
    /// with [`VmSnapshot::decode`] (the files pass as descriptors, e.g. `SCM_RIGHTS`).
    pub fn encode(&self) -> (Vec<u8>, Vec<&File>) {
        let (kind, mut files) = match &self.kind {
            SavedMemory::Template => (0, vec![]),
            SavedMemory::Own => (1, vec![]),
            SavedMemory::Clone { delta, .. } => (2, vec![delta]),
        };
        let base = match &self.kind {
            SavedMemory::Clone { base, .. } => *base,
            _ => None,
        };
        files.insert(0, &*self.memory);
        let record = RecordRef {
            kind,
            mem_bytes: self.mem_bytes,
            vcpus: &self.vcpus,
            vm: &self.vm,
            serial: &self.serial,
            devices: &self.devices,
            disks: &self.disks,
            vsock_stale: &self.vsock_stale,
            base,
        };
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // Plain data into a Vec: serializing cannot fail.
        out.extend(postcard::to_stdvec(&record).unwrap_or_default());
        (out, files)
    }

    /// Rebuilds a snapshot from [`VmSnapshot::encode`]'s bytes and files (in the same order).
    pub fn decode(bytes: &[u8], files: Vec<File>) -> Result<VmSnapshot, DecodeError> {
        let rest = bytes.strip_prefix(&MAGIC[..]).ok_or(DecodeError::Magic)?;
        let (version, body) = rest.split_at_checked(4).ok_or(DecodeError::Magic)?;
        let found = u32::from_le_bytes(version.try_into().map_err(|_| DecodeError::Magic)?);
        if found != FORMAT_VERSION {
            return Err(DecodeError::Version { found });
        }
        let record: Record =
            postcard::from_bytes(body).map_err(|e| DecodeError::Body(e.to_string()))?;
        let (name, want) = match record.kind {
            0 => ("template", 1),
            1 => ("own", 1),
            2 => ("clone", 2),
            other => return Err(DecodeError::Body(format!("memory kind {other}"))),
        };
        if files.len() != want {
            return Err(DecodeError::Files {
                kind: name,
                want,
                got: files.len(),
            });
        }
        let mut files = files.into_iter();
        let memory = Arc::new(files.next().ok_or(DecodeError::Magic)?);
        let kind = match (record.kind, files.next()) {
            (0, _) => SavedMemory::Template,
            (1, _) => SavedMemory::Own,
            (_, Some(delta)) => SavedMemory::Clone {
                delta,
                base: record.base,
            },
            (_, None) => return Err(DecodeError::Magic),
        };
        if record.vcpus.is_empty() || record.vcpus.len() > usize::from(u8::MAX) {
            return Err(DecodeError::Body(format!("{} vCPUs", record.vcpus.len())));
        }
        Ok(VmSnapshot {
            id: next_id(),
            kind,
            memory,
            mem_bytes: record.mem_bytes,
            vcpus: record.vcpus,
            vm: record.vm,
            serial: record.serial,
            devices: record.devices,
            disks: record.disks,
            vsock_stale: record.vsock_stale,
            files: HandoverFiles::default(),
            paused_at: None,
        })
    }

    /// When the VMM began stopping the VM's vCPUs for this save, in the process that saved
    /// it (`None` once decoded in another).
    pub fn paused_at(&self) -> Option<std::time::Instant> {
        self.paused_at
    }

    /// What the memory is.
    pub fn kind(&self) -> &SavedMemory {
        &self.kind
    }

    /// Takes the host files of a handed-over VM's devices (the hybrid vsock listener, the
    /// network devices' files, the block slots' disks): they go to the new process beside [`VmSnapshot::encode`]'s
    /// files, and come back in its devices' configuration.
    pub fn take_files(&mut self) -> HandoverFiles {
        std::mem::take(&mut self.files)
    }

    /// Gives a decoded snapshot the host files that came with it ([`VmSnapshot::take_files`]
    /// on the other side).
    pub fn set_files(&mut self, files: HandoverFiles) {
        self.files = files;
    }
}
