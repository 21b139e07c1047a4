// SPDX-License-Identifier: Apache-2.0
//! What the sandbox service needs from a VM: the [`VmBackend`] / [`VmHandle`] traits and the
//! types they speak ([`VmSpec`], [`VmEnd`], [`StartPhases`], ...). The implementations live in
//! the children: [`kvm`] (the in-process VMM), [`agent`] (the guest agent's ready line and
//! setup, which [`kvm`] uses) and, for tests (feature `test-utils`), `fake`.
//!
//! Operations a backend cannot do yet return [`BackendError::Unsupported`]; the service turns that
//! into gRPC `Unimplemented`. No backend pretends to have done something it has not.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;

use crate::cgroup::{CgroupError, CpuCgroups, CpuLimit};
use crate::pod::GuestSetup;
use crate::sandbox::StoredAny;

pub mod agent;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod handover;
pub mod kvm;
pub mod layout;
pub mod template;

pub use handover::{AdoptedVm, Handover, MemoryLayout};
pub use kvm::KvmBackend;

/// A boxed error from below the backend (vmm, I/O).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VM cannot be built from this configuration (e.g. the kernel is missing).
    #[error("Invalid VM configuration")]
    Config(#[source] BoxError),
    /// The VM could not be started.
    #[error("Failed to start the VM")]
    Start(#[source] BoxError),
    /// The backend cannot do this (yet).
    #[error("Not supported by this VM backend yet: {0}")]
    Unsupported(&'static str),
    /// The VM has ended.
    #[error("The VM is not running")]
    NotRunning,
    /// Reading the VM's statistics failed.
    #[error("Failed to read VM statistics")]
    Metrics(#[source] std::io::Error),
    /// The guest memory could not be charged to the sandbox's memory cgroup.
    #[error("Failed to charge the guest memory to the sandbox's memory cgroup")]
    Memory(#[source] crate::memcg::ChargeError),
    /// Moving the VM's threads into their CPU cgroup failed.
    #[error("Failed to place the VM's threads in their CPU cgroup")]
    Cgroup(#[source] CgroupError),
    /// A blocking helper task failed.
    #[error("VM helper task failed")]
    Join(#[source] tokio::task::JoinError),
    /// The guest agent did not send its ready line in time.
    #[error("The guest agent did not report ready within {timeout_ms} ms (console log: {console})")]
    AgentNotReady {
        /// The bound that passed.
        timeout_ms: u128,
        /// Where the guest's console went.
        console: String,
    },
    /// The VM ended before its agent was ready.
    #[error("The VM ended before its agent was ready: {reason} (console log: {console})")]
    EndedBeforeReady {
        /// How the VM ended.
        reason: String,
        /// Where the guest's console went.
        console: String,
    },
    /// The agent's ready line was not `READY <port>\n`.
    #[error("Invalid ready line from the guest agent: {0:?}")]
    BadReadyLine(String),
    /// Waiting for or reading the agent's ready connection failed.
    #[error("Failed to receive the guest agent's ready signal")]
    Ready(#[source] io::Error),
    /// Connecting to the agent's ttrpc port failed.
    #[error("Failed to connect to the guest agent on vsock port {0}")]
    AgentConnect(u32, #[source] io::Error),
    /// A call to the agent failed.
    #[error("Agent call {0} failed")]
    Agent(&'static str, #[source] ttrpc::Error),
    /// The host's random source failed.
    #[error("Failed to read host entropy for the guest: {0}")]
    HostEntropy(String),
    /// Every block slot holds a disk.
    #[error("All {0} block slots are in use")]
    NoFreeSlot(usize),
    /// The VM cannot be handed over (yet): the reason.
    #[error("The VM cannot be handed over: {0}")]
    Handover(String),
    /// The slot is not one that was attached.
    #[error("Block slot {0} is not attached")]
    SlotNotAttached(u32),
    /// Filling or emptying a block slot failed.
    #[error("Block slot {0} operation failed")]
    Slot(u32, #[source] vmm::VmmActionError),
}

/// The pod's virtio-net devices (open taps from `crate::network`), handed to the backend
/// once: clones share them and [`NetDevices::take`] empties them for all.
#[derive(Clone, Default)]
pub struct NetDevices(Arc<std::sync::Mutex<Vec<vmm::DeviceConfig>>>);

impl NetDevices {
    /// Devices for the VM, in guest NIC order.
    pub fn new(devices: Vec<vmm::DeviceConfig>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(devices)))
    }

    /// Takes the devices (a second call gets none).
    pub fn take(&self) -> Vec<vmm::DeviceConfig> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Devices not taken yet.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for NetDevices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetDevices({})", self.len())
    }
}

impl PartialEq for NetDevices {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || (self.is_empty() && other.is_empty())
    }
}

impl Eq for NetDevices {}

/// What to build and boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// The sandbox the VM serves (for names and logs).
    pub sandbox_id: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Guest kernel (ELF vmlinux with a PVH note, or bzImage).
    pub kernel: PathBuf,
    /// Initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of empty virtio-blk slots for container root filesystems.
    pub blk_slots: u32,
    /// Seccomp filters of the VM's vCPU and VMM threads.
    pub seccomp: vmm::SeccompPolicy,
    /// File that receives the guest console.
    pub console_log: Option<PathBuf>,
    /// Bytes the console log may hold (it starts again past them); `None`: no limit.
    pub console_log_max_bytes: Option<u64>,
    /// Hybrid vsock unix socket (`<state>/sbs/<id>/vsock.sock`) for debugging tools; `None` for
    /// the in-process vsock API only.
    pub vsock_uds: Option<PathBuf>,
    /// What the agent sets up before Start returns.
    pub setup: GuestSetup,
    /// How long Start waits for the agent's ready line.
    pub agent_ready_timeout: Duration,
    /// The pod's NICs (none without a pod network).
    pub nics: NetDevices,
    /// Whether the VM may be cloned from a template of its shape (templates on, and the pod
    /// did not opt out).
    pub template: bool,
    /// The CPU cgroup the VM's threads move into right after it starts, if any.
    pub cgroup: Option<CgroupPlacement>,
    /// The memory cgroup its guest memory is charged to, if any (the VM then boots on memory
    /// allocated there: [`crate::memcg`]).
    pub memory: Option<MemoryPlacement>,
}

#[cfg(test)]
impl VmSpec {
    /// A one-vCPU, 64 MiB VM of `kernel` for sandbox `id`, with nothing else: for tests.
    pub(crate) fn for_test(id: &str, kernel: PathBuf) -> Self {
        VmSpec {
            sandbox_id: id.into(),
            vcpus: 1,
            mem_mib: 64,
            kernel,
            initramfs: None,
            cmdline: String::new(),
            blk_slots: 0,
            seccomp: vmm::SeccompPolicy::default(),
            console_log: None,
            console_log_max_bytes: None,
            vsock_uds: None,
            setup: crate::pod::GuestSetup::default(),
            agent_ready_timeout: Duration::from_secs(1),
            nics: NetDevices::default(),
            template: false,
            cgroup: None,
            memory: None,
        }
    }
}

/// Where a VM's guest memory is charged ([`crate::memcg`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlacement {
    /// The daemon's sandbox memory cgroups.
    pub cgroups: crate::memcg::MemoryCgroups,
    /// The sandbox's memory cgroup, relative to the hierarchy's root.
    pub group: PathBuf,
}

/// Where a VM's threads go and the limit they get ([`crate::cgroup`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupPlacement {
    /// The daemon's sandbox cgroups.
    pub cgroups: CpuCgroups,
    /// The sandbox's cgroup, relative to the hierarchy's root.
    pub group: PathBuf,
    /// Its CPU limit.
    pub limit: CpuLimit,
}

impl CgroupPlacement {
    /// Moves the threads of a VM that just started (`tids`, `vcpus` vCPUs then the VMM
    /// thread) into the cgroup. A thread records its id as it starts: wait briefly for ids
    /// not there yet. A VM that has `ended` meanwhile has nothing left to place (its start
    /// reports the end): that is no error.
    pub fn attach(
        &self,
        vcpus: u8,
        ended: impl Fn() -> bool,
        tids: impl Fn() -> Vec<u32>,
    ) -> Result<(), BackendError> {
        let want = usize::from(vcpus) + 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut ids = tids();
        while ids.len() < want && !ended() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            ids = tids();
        }
        let placed = if ids.len() < want {
            Err(CgroupError::Unusable(format!(
                "the VM has {} of its {want} threads",
                ids.len()
            )))
        } else {
            self.cgroups.attach(&self.group, &self.limit, &ids)
        };
        match placed {
            Err(_) if ended() => Ok(()),
            other => other.map_err(BackendError::Cgroup),
        }
    }
}

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum VmExitKind {
    /// The guest shut itself down (power-off or reset, the end of a firmware-less guest).
    GuestShutdown,
    /// The host stopped it.
    HostStopped,
    /// The guest or KVM failed.
    Crashed(String),
}

/// How and when a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmEnd {
    /// Why.
    pub kind: VmExitKind,
    /// When.
    pub at: SystemTime,
}

/// Answer to [`VmHandle::request_shutdown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownRequest {
    /// The guest was asked to shut down; it may take a while.
    Requested,
    /// The VM has no way to ask its guest (no agent yet): the caller must stop it.
    Unsupported,
}

/// Statistics of a running VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VmMetrics {
    /// vCPUs.
    pub vcpus: u8,
    /// Configured guest memory in MiB.
    pub mem_mib: u32,
    /// Guest memory that holds data, in bytes.
    pub guest_resident_bytes: u64,
    /// Console bytes printed so far.
    pub console_bytes: u64,
    /// Time from start to the guest's boot signal, in nanoseconds (0: not yet).
    pub boot_time_ns: u64,
    /// CPU time the VM's threads used on the host, from the sandbox's CPU cgroup (`None`
    /// without one, or where the hierarchy does not count it), in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_cpu_usage_us: Option<u64>,
    /// The pod's cgroup statistics from the agent (`Control.Stats`), if it had any.
    #[serde(skip)]
    pub pod: Option<StoredAny>,
}

/// A block device slot that holds an image for a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedDisk {
    /// Slot index (0-based) in the VM.
    pub slot: u32,
    /// Mount source the agent resolves to the guest device: `blk:<serial>` in a VM (serials are
    /// `sbx-slot-<n>`), a device path (e.g. a loop device) for an agent on the host.
    pub source: String,
}

/// What the host Task endpoint (`crate::task`) needs from a sandbox: the agent connection and
/// the block slots. Implemented by every [`VmHandle`]; tests implement it over an agent
/// running on the host (unix socket) with loop devices as "slots".
#[async_trait]
pub trait TaskTarget: Send + Sync + fmt::Debug {
    /// The ttrpc client connected to the agent (shared: ttrpc multiplexes calls on one
    /// connection; clone it freely). Fails if the VM has ended or has no agent.
    fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError>;
    /// Puts `path` (an image file or a block device) into a free block slot.
    async fn attach_disk(
        &self,
        path: &std::path::Path,
        read_only: bool,
    ) -> Result<AttachedDisk, BackendError>;
    /// Empties a slot filled by [`TaskTarget::attach_disk`].
    async fn detach_disk(&self, slot: u32) -> Result<(), BackendError>;
}

/// Starts VMs.
#[async_trait]
pub trait VmBackend: Send + Sync + 'static {
    /// Builds and boots a VM. Returns once it runs.
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>, BackendError>;
    /// Gets ready for VMs like `spec` (e.g. builds their template in the background); returns
    /// at once. Nothing by default.
    async fn prepare(&self, _spec: &VmSpec) {}

    /// The counters of its VM templates, if it keeps any.
    fn template_stats(&self) -> Option<template::TemplateStats> {
        None
    }

    /// Builds ahead the VM a running VM of another process will be rebuilt on for `spec` (its
    /// memory mapped, KVM's part made, its threads confined), so that its handover's pause
    /// does not include it.
    async fn prepare_adoption(
        &self,
        _layout: MemoryLayout,
        _spec: &VmSpec,
    ) -> Result<vmm::PreparedShell, BackendError> {
        Err(BackendError::Unsupported("live handover"))
    }

    /// Rebuilds a VM another process handed over ([`VmHandle::handover`]) for `spec`, frozen
    /// until [`AdoptedVm::resume`] (a live upgrade's new process).
    async fn adopt(
        &self,
        _spec: VmSpec,
        _handover: Handover,
    ) -> Result<Box<dyn AdoptedVm>, BackendError> {
        Err(BackendError::Unsupported("live handover"))
    }
}

/// A handover begun by [`VmHandle::begin_handover`], as its VM froze.
pub enum Begun {
    /// Its saved VM, or why it could not be saved (boxed: a VM's state is kilobytes).
    Done(Box<Result<Handover, BackendError>>),
    /// Work that completes it and may block (a clone's written pages to copy), to run where
    /// that is fine.
    Finish(Box<dyn FnOnce() -> Result<Handover, BackendError> + Send>),
}

impl std::fmt::Debug for Begun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Begun::Done(r) => f.debug_tuple("Done").field(&r.is_ok()).finish(),
            Begun::Finish(_) => f.write_str("Finish"),
        }
    }
}

/// What a begun handover calls with its outcome.
pub type HandoverDone = Box<dyn FnOnce(Begun) + Send>;

/// A running (or ended) VM.
#[async_trait]
pub trait VmHandle: TaskTarget {
    /// PID of the process that runs the VM.
    fn pid(&self) -> u32;
    /// How the VM ended, if it has.
    fn ended(&self) -> Option<VmEnd>;
    /// Waits until the VM has ended. Many callers may wait at once.
    async fn wait(&self) -> VmEnd;
    /// Asks the guest to shut down cleanly (its containers get `grace` between SIGTERM and
    /// SIGKILL), without waiting for it.
    async fn request_shutdown(&self, grace: Duration) -> Result<ShutdownRequest, BackendError>;
    /// Stops the VM now (if it still runs) and returns how it ended.
    async fn kill(&self) -> VmEnd;
    /// Current statistics.
    async fn metrics(&self) -> Result<VmMetrics, BackendError>;
    /// Applies new resources to a container inside the guest.
    async fn update_resources(
        &self,
        container_id: &str,
        resources: &StoredAny,
    ) -> Result<(), BackendError>;
    /// Host thread ids of the running VM (vCPUs, then the VMM thread): what a pid is to a
    /// runtime with a process per VM. None for backends without threads of their own.
    fn thread_ids(&self) -> Vec<u32> {
        Vec::new()
    }
    /// How long the phases of this VM's start took (none for backends that do not measure).
    fn start_phases(&self) -> StartPhases {
        StartPhases::default()
    }
    /// What another process needs to build this VM's shell ahead of a live handover (`None`:
    /// a backend without live handover).
    fn memory_layout(&self) -> Option<MemoryLayout> {
        None
    }
    /// Does, while the VM runs, what of a live handover need not wait for its freeze: copies
    /// what of its memory the handover would otherwise copy frozen (a template clone's written
    /// pages), so that its handover copies only what changes after this, and faults in the
    /// memory its save will touch. Returns the copy and its id, for [`MemoryLayout::base`];
    /// `None`: nothing to copy (a VM with its own memory, or a backend without live handover).
    async fn precopy(&self) -> Result<Option<(Arc<std::fs::File>, u64)>, BackendError> {
        Ok(None)
    }
    /// Freezes the VM (vCPUs and devices) and saves it for a live handover to another process
    /// ([`VmBackend::adopt`]). It stays frozen until [`VmHandle::resume_after_handover`] (the
    /// handover failed) or the end of this process (it succeeded).
    async fn handover(&self) -> Result<Handover, BackendError> {
        Err(BackendError::Unsupported("live handover"))
    }
    /// [`VmHandle::handover`] with no task or thread waiting on it: `done` is called once
    /// with the outcome, on whichever thread finished the freeze (a VM's confined thread:
    /// `done` may only pass it on). `Err(done)`: this backend cannot, use `handover`.
    fn begin_handover(self: Arc<Self>, done: HandoverDone) -> Result<(), HandoverDone> {
        Err(done)
    }
    /// After a successful handover: closes this process's ends of the frozen VM's host
    /// connections, so their peers see them end now rather than when this process exits.
    async fn release_after_handover(&self) {}
    /// Lets a VM frozen by [`VmHandle::handover`] run again here.
    async fn resume_after_handover(&self) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("live handover"))
    }
}

/// Durations of the phases of a VM's start, in the order they ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartPhases {
    /// Building and booting the VM (`vmm::Vm::start`, with the ready listener).
    pub vm: Duration,
    /// From the vCPUs running to the agent's ready line read: the guest's boot.
    pub agent_ready: Duration,
    /// Connecting to the agent's ttrpc port over vsock.
    pub agent_connect: Duration,
    /// `Control.Setup` round trip (it sets the guest's clock too).
    pub setup: Duration,
}

impl StartPhases {
    /// Each phase with its name, in order.
    pub fn named(&self) -> [(&'static str, Duration); 4] {
        [
            ("vm", self.vm),
            ("agent_ready", self.agent_ready),
            ("agent_connect", self.agent_connect),
            ("setup", self.setup),
        ]
    }
}

/// Converts a watch of "ended yet?" into a future that resolves with the end.
pub(crate) async fn wait_end(mut rx: watch::Receiver<Option<VmEnd>>) -> VmEnd {
    loop {
        if let Some(end) = rx.borrow_and_update().clone() {
            return end;
        }
        if rx.changed().await.is_err() {
            // The sender lives as long as the handle; a closed channel means the value is final.
            if let Some(end) = rx.borrow().clone() {
                return end;
            }
            return VmEnd {
                kind: VmExitKind::Crashed("VM monitor vanished".into()),
                at: SystemTime::now(),
            };
        }
    }
}
