// SPDX-License-Identifier: Apache-2.0
//! What the sandbox service needs from a VM: the [`VmBackend`] / [`VmHandle`] traits, the real
//! [`KvmBackend`] on the in-process VMM, and for tests (feature `test-utils`)
//! `fake::FakeVmBackend`.
//!
//! Operations a backend cannot do yet return [`BackendError::Unsupported`]; the service turns that
//! into gRPC `Unimplemented`. No backend pretends to have done something it has not.
//!
//! A [`KvmBackend`] VM gets one vsock device (guest CID [`GUEST_CID`], hybrid socket
//! `<state>/<id>/vsock.sock`) and `blk_slots` empty virtio-blk slots (serials
//! `sbx-slot-<n>`). Start returns only once the guest agent is ready: the agent dials host port
//! [`READY_PORT`] and writes `READY <port>\n` (listened for before the vCPUs can reach their
//! driver: in-process, plus the hybrid `<uds>_1025` listener for a guest faster than that);
//! the host then connects to `<port>`, builds one shared ttrpc client and calls
//! `Control.SyncClock` and `Control.Setup`. No ready line within `agent_ready_timeout`:
//! [`BackendError::AgentNotReady`] (gRPC `DEADLINE_EXCEEDED`) and the VM is stopped. Every agent
//! call carries a ttrpc timeout, so a dead VM never hangs an RPC.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::sandbox::{DnsConfig, StoredAny};

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
    /// Every block slot holds a disk.
    #[error("All {0} block slots are in use")]
    NoFreeSlot(usize),
    /// The slot is not one that was attached.
    #[error("Block slot {0} is not attached")]
    SlotNotAttached(u32),
    /// Filling or emptying a block slot failed.
    #[error("Block slot {0} operation failed")]
    Slot(u32, #[source] vmm::DeviceError),
}

/// The guest's context id on its vsock device (the first one a guest may have).
pub const GUEST_CID: u64 = 3;
/// Host vsock port the guest agent sends its ready line to (`sandboxer.ready_port`).
pub const READY_PORT: u32 = 1025;
/// Longest ready line accepted (`READY ` and a u32 and `\n` are at most 17 bytes).
const MAX_READY_LINE: usize = 128;
/// Bound on each call to the agent, so a dead VM never hangs an RPC.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the statistics call of a Metrics RPC.
const AGENT_STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// The agent's own ttrpc service (for logs).
const CONTROL: &str = "sandboxer.agent.v1.Control";

/// Serial (virtio-blk `GET_ID`) of block slot `n`; the agent finds the slot's device by it.
pub fn slot_serial(n: u32) -> String {
    format!("sbx-slot-{n}")
}

/// Parses the agent's ready line: `Some(port)` for exactly `READY <decimal u32>\n`.
pub fn parse_ready_line(line: &str) -> Option<u32> {
    let rest = line.strip_suffix('\n')?.strip_prefix("READY ")?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// One IP address of a guest interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestIp {
    /// IPv4 or IPv6 address, without prefix.
    pub address: String,
    /// Prefix length.
    pub prefix_len: u32,
}

/// A guest NIC the agent configures, found by its MAC address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestInterface {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// New link name (e.g. `eth0`); empty keeps it.
    pub name: String,
    /// MTU; 0 keeps it.
    pub mtu: u32,
    /// Addresses to add.
    pub addresses: Vec<GuestIp>,
}

/// A route the agent adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestRoute {
    /// CIDR; empty for the default route of the gateway's family.
    pub destination: String,
    /// Gateway; empty for an on-link route.
    pub gateway: String,
    /// Interface name (after renames).
    pub device: String,
    /// Preferred source address; empty for none.
    pub source: String,
    /// Metric.
    pub metric: u32,
}

/// What the agent is told to set up once it is ready (`Control.Setup`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestSetup {
    /// Hostname; empty leaves it.
    pub hostname: String,
    /// resolv.conf settings; all empty leaves it.
    pub dns: DnsConfig,
    /// Guest NICs (from the pod's network; empty until pod networking fills it).
    pub interfaces: Vec<GuestInterface>,
    /// Routes (from the pod's network).
    pub routes: Vec<GuestRoute>,
}

/// The pod's virtio-net devices (open taps from [`crate::network`]), handed to the backend
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
    /// Hybrid vsock unix socket (`<state>/<id>/vsock.sock`) for debugging tools; `None` for
    /// the in-process vsock API only.
    pub vsock_uds: Option<PathBuf>,
    /// What the agent sets up before Start returns.
    pub setup: GuestSetup,
    /// How long Start waits for the agent's ready line.
    pub agent_ready_timeout: Duration,
    /// The pod's NICs (none without a pod network).
    pub nics: NetDevices,
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

impl From<vmm::VmEnd> for VmEnd {
    fn from(e: vmm::VmEnd) -> Self {
        let kind = match e.exit {
            vmm::VmExit::Reset(_) | vmm::VmExit::PowerOff => VmExitKind::GuestShutdown,
            vmm::VmExit::Stopped => VmExitKind::HostStopped,
            vmm::VmExit::Crashed(why) => VmExitKind::Crashed(why),
        };
        VmEnd { kind, at: e.at }
    }
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
}

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
    /// How long the phases of this VM's start took (none for backends that do not measure).
    fn start_phases(&self) -> StartPhases {
        StartPhases::default()
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
    /// `Control.SyncClock` round trip.
    pub sync_clock: Duration,
    /// `Control.Setup` round trip.
    pub setup: Duration,
}

impl StartPhases {
    /// Each phase with its name, in order.
    pub fn named(&self) -> [(&'static str, Duration); 5] {
        [
            ("vm", self.vm),
            ("agent_ready", self.agent_ready),
            ("agent_connect", self.agent_connect),
            ("sync_clock", self.sync_clock),
            ("setup", self.setup),
        ]
    }
}

/// Converts a watch of "ended yet?" into a future that resolves with the end.
async fn wait_end(mut rx: watch::Receiver<Option<VmEnd>>) -> VmEnd {
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

/// The real backend: KVM microVMs inside this process ([`vmm::Vm`]), each with a vsock device
/// for its guest agent and empty block slots for container root filesystems.
#[derive(Clone, Debug, Default)]
pub struct KvmBackend;

/// A VM of the [`KvmBackend`] whose agent is ready.
pub struct KvmHandle {
    vm: Arc<vmm::Vm>,
    spec: VmSpec,
    end: watch::Receiver<Option<VmEnd>>,
    /// One ttrpc connection to the agent, shared by every caller.
    agent: ttrpc::asynchronous::Client,
    /// Which block slots hold a disk.
    slots: Mutex<Vec<bool>>,
    /// How long the start took, by phase.
    phases: StartPhases,
}

impl fmt::Debug for KvmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmHandle")
            .field("sandbox_id", &self.spec.sandbox_id)
            .field("ended", &self.end.borrow().is_some())
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

/// Stack size of the thread that waits for a VM's end: it only blocks on a condvar.
const WAITER_STACK: usize = 64 * 1024;

/// The hybrid-vsock path a guest connection to host port `port` falls back to.
fn hybrid_listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// The hybrid-vsock listener for the ready port, bound before the VM boots, so a guest that
/// dials before the in-process listener exists is still heard (the VMM's muxer falls back to
/// `<uds>_<port>`). Removed once the agent is ready or Start failed.
struct ReadyFallback {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ReadyFallback {
    fn bind(uds: &Path) -> Option<Self> {
        let path = hybrid_listener_path(uds, READY_PORT);
        // A stale socket from an earlier Start of this sandbox.
        let _ = std::fs::remove_file(&path);
        match tokio::net::UnixListener::bind(&path) {
            Ok(listener) => Some(ReadyFallback { listener, path }),
            Err(e) => {
                debug!(path = %path.display(), error = %e, "no hybrid ready listener");
                None
            }
        }
    }
}

impl Drop for ReadyFallback {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts one guest connection on an in-process vsock listener, blocking the calling thread
/// (its readiness is an eventfd, which the async side cannot register without `unsafe`) until
/// a connection arrives or `cancel` is written.
fn accept_vsock_blocking(
    listener: &devices::virtio::vsock::VsockListener,
    cancel: &EventFd,
) -> io::Result<std::os::unix::net::UnixStream> {
    const LISTENER: u64 = 0;
    const CANCEL: u64 = 1;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        cancel.as_raw_fd(),
        EpollEvent::new(EventSet::IN, CANCEL),
    )?;
    let mut events = [EpollEvent::default(); 2];
    loop {
        match listener.try_accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if events
            .get(..n)
            .unwrap_or_default()
            .iter()
            .any(|e| e.data() == CANCEL)
        {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "wait cancelled"));
        }
    }
}

/// Ends a blocking accept when dropped.
struct CancelOnDrop(EventFd);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let _ = self.0.write(1);
    }
}

/// Waits for a guest connection on an in-process vsock listener; dropping the future ends the
/// helper thread's wait.
async fn accept_vsock(
    listener: devices::virtio::vsock::VsockListener,
) -> io::Result<std::os::unix::net::UnixStream> {
    let cancel = EventFd::new(EFD_NONBLOCK)?;
    let guard = CancelOnDrop(cancel.try_clone()?);
    let accepted = tokio::task::spawn_blocking(move || accept_vsock_blocking(&listener, &cancel))
        .await
        .map_err(io::Error::other)?;
    drop(guard);
    accepted
}

/// Waits for a guest connection on the hybrid fallback listener (forever without one).
async fn accept_fallback(fallback: Option<&ReadyFallback>) -> io::Result<tokio::net::UnixStream> {
    match fallback {
        Some(f) => f.listener.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Reads the ready line (up to `\n`, at most [`MAX_READY_LINE`] bytes) and returns the port.
async fn read_ready_line(stream: tokio::net::UnixStream) -> Result<u32, BackendError> {
    let mut line = Vec::with_capacity(32);
    let mut buf = [0u8; MAX_READY_LINE];
    while !line.ends_with(b"\n") && line.len() < MAX_READY_LINE {
        stream.readable().await.map_err(BackendError::Ready)?;
        let room = MAX_READY_LINE.saturating_sub(line.len());
        let chunk = buf.get_mut(..room).unwrap_or_default();
        match stream.try_read(chunk) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(BackendError::Ready(e)),
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    parse_ready_line(&text).ok_or(BackendError::BadReadyLine(text))
}

fn control(client: &ttrpc::asynchronous::Client) -> proto::agent::control_ttrpc::ControlClient {
    proto::agent::control_ttrpc::ControlClient::new(client.clone())
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

/// The agent's `SetupRequest` for `setup`.
fn setup_request(setup: &GuestSetup) -> proto::agent::control::SetupRequest {
    use proto::agent::control as c;
    let dns = &setup.dns;
    let has_dns = !(dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty());
    c::SetupRequest {
        hostname: setup.hostname.clone(),
        dns: if has_dns {
            proto::protobuf::MessageField::some(c::Dns {
                servers: dns.servers.clone(),
                searches: dns.searches.clone(),
                options: dns.options.clone(),
                ..Default::default()
            })
        } else {
            proto::protobuf::MessageField::none()
        },
        interfaces: setup
            .interfaces
            .iter()
            .map(|i| c::Interface {
                mac: i.mac.clone(),
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| c::IpAddress {
                        address: a.address.clone(),
                        prefix_len: a.prefix_len,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        routes: setup
            .routes
            .iter()
            .map(|r| c::Route {
                destination: r.destination.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
                source: r.source.clone(),
                metric: r.metric,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Nanoseconds since the Unix epoch, now.
fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Waits for the agent's ready line, connects to its port, syncs its clock and sends Setup;
/// fills in the phases it ran in `phases`.
async fn connect_agent(
    vm: &Arc<vmm::Vm>,
    spec: &VmSpec,
    listener: io::Result<devices::virtio::vsock::VsockListener>,
    fallback: Option<&ReadyFallback>,
    end: watch::Receiver<Option<VmEnd>>,
    phases: &mut StartPhases,
) -> Result<ttrpc::asynchronous::Client, BackendError> {
    let t = Instant::now();
    let console = spec
        .console_log
        .as_ref()
        .map_or_else(|| "none".to_string(), |p| p.display().to_string());
    let listener = listener.map_err(BackendError::Ready)?;
    // A configured timeout too large for the clock means no practical bound.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(spec.agent_ready_timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
    let ready = async {
        let stream = tokio::select! {
            s = accept_vsock(listener) => {
                let s = s.map_err(BackendError::Ready)?;
                s.set_nonblocking(true).map_err(BackendError::Ready)?;
                tokio::net::UnixStream::from_std(s).map_err(BackendError::Ready)?
            }
            s = accept_fallback(fallback) => s.map_err(BackendError::Ready)?,
            e = wait_end(end) => {
                return Err(BackendError::EndedBeforeReady {
                    reason: format!("{:?}", e.kind),
                    console: console.clone(),
                });
            }
        };
        read_ready_line(stream).await
    };
    let port = match tokio::time::timeout_at(deadline, ready).await {
        Ok(port) => port?,
        Err(_) => {
            return Err(BackendError::AgentNotReady {
                timeout_ms: spec.agent_ready_timeout.as_millis(),
                console,
            });
        }
    };
    phases.agent_ready = t.elapsed();
    let t = Instant::now();
    let handle = vm
        .vsock()
        .cloned()
        .ok_or_else(|| BackendError::AgentConnect(port, io::Error::other("no vsock device")))?;
    let stream = tokio::task::spawn_blocking(move || handle.connect(port))
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| BackendError::AgentConnect(port, e))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| BackendError::AgentConnect(port, e))?;
    let stream = tokio::net::UnixStream::from_std(stream)
        .map_err(|e| BackendError::AgentConnect(port, e))?;
    let client = ttrpc::asynchronous::Client::new(stream.into());
    phases.agent_connect = t.elapsed();
    let t = Instant::now();
    let ctl = control(&client);
    let clock = proto::agent::control::SyncClockRequest {
        unix_nanos: unix_nanos(),
        ..Default::default()
    };
    ctl.sync_clock(ctx(AGENT_CALL_TIMEOUT), &clock)
        .await
        .map_err(|e| BackendError::Agent("Control.SyncClock", e))?;
    phases.sync_clock = t.elapsed();
    let t = Instant::now();
    ctl.setup(ctx(AGENT_CALL_TIMEOUT), &setup_request(&spec.setup))
        .await
        .map_err(|e| BackendError::Agent("Control.Setup", e))?;
    phases.setup = t.elapsed();
    Ok(client)
}

#[async_trait]
impl VmBackend for KvmBackend {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        // Checked here so a missing file is a configuration error even where KVM is unusable.
        let missing =
            |file: &Path| BackendError::Config(format!("{} is not a file", file.display()).into());
        if !spec.kernel.is_file() {
            return Err(missing(&spec.kernel));
        }
        let Some(initramfs) = spec.initramfs.as_ref() else {
            return Err(BackendError::Config(
                "no agent initramfs: set vm.initramfs (this sandboxer was built without an \
                 embedded one, see SANDBOXER_EMBED_INITRAMFS)"
                    .into(),
            ));
        };
        if !initramfs.is_file() {
            return Err(missing(initramfs));
        }
        let mut config = vmm::VmConfig::new(&spec.kernel);
        config.initramfs.clone_from(&spec.initramfs);
        config.cmdline = format!("{} sandboxer.ready_port={READY_PORT}", spec.cmdline);
        config.vcpus = spec.vcpus;
        config.mem_mib = spec.mem_mib;
        config.seccomp = spec.seccomp;
        config.console = vmm::ConsoleConfig {
            log_path: spec.console_log.clone(),
            stdout: false,
        };
        // The vsock device first: small guests only look at the first few devices.
        config.devices.push(vmm::DeviceConfig::Vsock {
            guest_cid: GUEST_CID,
            uds_path: spec.vsock_uds.clone(),
        });
        for n in 0..spec.blk_slots {
            config.devices.push(vmm::DeviceConfig::Block(
                devices::virtio::block::BlockConfig {
                    id: slot_serial(n),
                    path: None,
                    read_only: false,
                },
            ));
        }
        // The pod's NICs, after the slots (their taps are open in the pod's netns already).
        config.devices.extend(spec.nics.take());
        let slots = usize::try_from(spec.blk_slots).unwrap_or(usize::MAX);
        let fallback = spec.vsock_uds.as_deref().and_then(ReadyFallback::bind);
        let mut phases = StartPhases::default();
        let t = Instant::now();
        let (vm, listener) = tokio::task::spawn_blocking(move || {
            let vm = vmm::Vm::start(config)?;
            // Right after the vCPUs started: the guest has not reached its driver yet (and if
            // it had, the hybrid fallback listener takes the connection).
            let listener = vm
                .vsock()
                .map(|v| v.listen(READY_PORT))
                .unwrap_or_else(|| Err(io::Error::other("the VM has no vsock device")));
            Ok::<_, vmm::VmError>((vm, listener))
        })
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| match e {
            vmm::VmError::Config(c) => BackendError::Config(Box::new(c)),
            other => BackendError::Start(Box::new(other)),
        })?;
        phases.vm = t.elapsed();
        let vm = Arc::new(vm);
        let (tx, rx) = watch::channel(None);
        let waiter = Arc::clone(&vm);
        let spawned = std::thread::Builder::new()
            .name(format!("vm-wait-{}", short(&spec.sandbox_id)))
            .stack_size(WAITER_STACK)
            .spawn(move || {
                let end = waiter.wait();
                tx.send_replace(Some(VmEnd::from(end)));
            });
        if let Err(e) = spawned {
            stop_now(&vm).await;
            return Err(BackendError::Start(Box::new(e)));
        }
        let agent = connect_agent(
            &vm,
            &spec,
            listener,
            fallback.as_ref(),
            rx.clone(),
            &mut phases,
        )
        .await;
        drop(fallback);
        let agent = match agent {
            Ok(agent) => agent,
            Err(e) => {
                // Nothing of a VM whose agent never came up may stay behind.
                stop_now(&vm).await;
                return Err(e);
            }
        };
        Ok(Box::new(KvmHandle {
            vm,
            spec,
            end: rx,
            agent,
            slots: Mutex::new(vec![false; slots]),
            phases,
        }))
    }
}

/// Stops `vm` and waits for its end (off the async workers).
async fn stop_now(vm: &Arc<vmm::Vm>) -> vmm::VmEnd {
    let stopping = Arc::clone(vm);
    match tokio::task::spawn_blocking(move || stopping.stop()).await {
        Ok(end) => end,
        // The blocking pool is gone (runtime shutting down): stop on this thread.
        Err(_) => vm.stop(),
    }
}

/// Thread names are limited to 15 bytes by Linux.
fn short(id: &str) -> &str {
    id.get(..6).unwrap_or(id)
}

impl KvmHandle {
    /// Fails once the VM has ended (read from the VM itself: the waiter thread's watch may
    /// lag behind a `kill`).
    fn running(&self) -> Result<(), BackendError> {
        match self.vm.ended() {
            Some(_) => Err(BackendError::NotRunning),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl TaskTarget for KvmHandle {
    fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError> {
        self.running()?;
        Ok(self.agent.clone())
    }

    async fn attach_disk(
        &self,
        path: &Path,
        read_only: bool,
    ) -> Result<AttachedDisk, BackendError> {
        self.running()?;
        let index = {
            let mut slots = self.slots.lock().expect("poisoned");
            let total = slots.len();
            let (index, used) = slots
                .iter_mut()
                .enumerate()
                .find(|(_, used)| !**used)
                .ok_or(BackendError::NoFreeSlot(total))?;
            *used = true;
            index
        };
        let slot = u32::try_from(index).expect("slot indexes come from a u32 count");
        let (vm, path) = (Arc::clone(&self.vm), path.to_path_buf());
        let attached = tokio::task::spawn_blocking(move || vm.attach_disk(index, &path, read_only))
            .await
            .map_err(BackendError::Join)
            .and_then(|r| r.map_err(|e| BackendError::Slot(slot, e)));
        if let Err(e) = attached {
            self.release(index);
            return Err(e);
        }
        Ok(AttachedDisk {
            slot,
            source: format!("blk:{}", slot_serial(slot)),
        })
    }

    async fn detach_disk(&self, slot: u32) -> Result<(), BackendError> {
        let index = usize::try_from(slot).map_err(|_| BackendError::SlotNotAttached(slot))?;
        let used = self
            .slots
            .lock()
            .expect("poisoned")
            .get(index)
            .copied()
            .unwrap_or(false);
        if !used {
            return Err(BackendError::SlotNotAttached(slot));
        }
        let vm = Arc::clone(&self.vm);
        tokio::task::spawn_blocking(move || vm.detach_disk(index))
            .await
            .map_err(BackendError::Join)?
            .map_err(|e| BackendError::Slot(slot, e))?;
        self.release(index);
        Ok(())
    }
}

impl KvmHandle {
    fn release(&self, index: usize) {
        if let Some(used) = self.slots.lock().expect("poisoned").get_mut(index) {
            *used = false;
        }
    }
}

#[async_trait]
impl VmHandle for KvmHandle {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn start_phases(&self) -> StartPhases {
        self.phases
    }

    fn ended(&self) -> Option<VmEnd> {
        self.vm.ended().map(VmEnd::from)
    }

    async fn wait(&self) -> VmEnd {
        wait_end(self.end.clone()).await
    }

    async fn request_shutdown(&self, grace: Duration) -> Result<ShutdownRequest, BackendError> {
        self.running()?;
        let req = proto::agent::control::ShutdownRequest {
            timeout_secs: u32::try_from(grace.as_secs()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        control(&self.agent)
            .shutdown(
                ctx(AGENT_CALL_TIMEOUT.min(grace.max(Duration::from_secs(1)))),
                &req,
            )
            .await
            .map_err(|e| BackendError::Agent("Control.Shutdown", e))?;
        Ok(ShutdownRequest::Requested)
    }

    async fn kill(&self) -> VmEnd {
        stop_now(&self.vm).await.into()
    }

    async fn metrics(&self) -> Result<VmMetrics, BackendError> {
        self.running()?;
        let stats = control(&self.agent)
            .stats(
                ctx(AGENT_STATS_TIMEOUT),
                &proto::agent::control::StatsRequest::new(),
            )
            .await;
        let pod = match stats {
            Ok(s) => s.metrics.into_option().map(|a| StoredAny {
                type_url: a.type_url,
                value: a.value,
            }),
            Err(e) => {
                warn!(sandbox_id = %self.spec.sandbox_id, error = %e, "{CONTROL}.Stats failed");
                None
            }
        };
        Ok(VmMetrics {
            vcpus: self.spec.vcpus,
            mem_mib: self.spec.mem_mib,
            guest_resident_bytes: self
                .vm
                .guest_resident_bytes()
                .map_err(BackendError::Metrics)?,
            console_bytes: self.vm.console_bytes(),
            boot_time_ns: self
                .vm
                .boot_time()
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            pod,
        })
    }

    async fn update_resources(
        &self,
        container_id: &str,
        resources: &StoredAny,
    ) -> Result<(), BackendError> {
        self.running()?;
        let req = containerd_shim_protos::api::UpdateTaskRequest {
            id: container_id.to_string(),
            resources: proto::protobuf::MessageField::some(
                proto::protobuf::well_known_types::any::Any {
                    type_url: resources.type_url.clone(),
                    value: resources.value.clone(),
                    ..Default::default()
                },
            ),
            ..Default::default()
        };
        containerd_shim_protos::shim_async::TaskClient::new(self.agent.clone())
            .update(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map_err(|e| BackendError::Agent("Task.Update", e))?;
        Ok(())
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod fake {
    //! A VM backend for tests: no KVM, fully scriptable.

    use std::collections::BTreeMap;

    use super::*;

    /// How a fake guest answers a shutdown request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum FakeGuest {
        /// No graceful path (like today's [`KvmBackend`]).
        NoAgent,
        /// Shuts down cleanly this long after being asked.
        ShutsDownAfter(Duration),
        /// Ignores the request (the caller must force it).
        Ignores,
    }

    #[derive(Debug)]
    struct Settings {
        start_delay: Duration,
        fail_starts: u32,
        guest: FakeGuest,
        gate: Option<Arc<tokio::sync::Barrier>>,
    }

    #[derive(Debug, Default)]
    struct State {
        handles: BTreeMap<String, Arc<FakeVmHandle>>,
        starts: u64,
        specs: Vec<VmSpec>,
    }

    /// A fake VM backend. Clones share state, so a test keeps one and gives one to the service.
    #[derive(Clone, Debug)]
    pub struct FakeVmBackend {
        settings: Arc<Mutex<Settings>>,
        state: Arc<Mutex<State>>,
    }

    impl Default for FakeVmBackend {
        fn default() -> Self {
            FakeVmBackend {
                settings: Arc::new(Mutex::new(Settings {
                    start_delay: Duration::ZERO,
                    fail_starts: 0,
                    guest: FakeGuest::NoAgent,
                    gate: None,
                })),
                state: Arc::default(),
            }
        }
    }

    impl FakeVmBackend {
        /// A backend whose VMs start at once and have no agent.
        pub fn new() -> Self {
            Self::default()
        }

        /// Makes every start take `d`.
        pub fn set_start_delay(&self, d: Duration) {
            self.settings.lock().expect("poisoned").start_delay = d;
        }

        /// Makes every start wait until `n` starts are in flight at once: a test of concurrency
        /// that hangs (and so times out) if starts are serialized.
        pub fn set_start_gate(&self, n: usize) {
            self.settings.lock().expect("poisoned").gate =
                Some(Arc::new(tokio::sync::Barrier::new(n)));
        }

        /// Makes the next `n` starts fail.
        pub fn fail_next_starts(&self, n: u32) {
            self.settings.lock().expect("poisoned").fail_starts = n;
        }

        /// How guests of VMs started from now on answer shutdown requests.
        pub fn set_guest(&self, g: FakeGuest) {
            self.settings.lock().expect("poisoned").guest = g;
        }

        /// The latest VM started for `sandbox_id`.
        pub fn handle(&self, sandbox_id: &str) -> Option<Arc<FakeVmHandle>> {
            self.state
                .lock()
                .expect("poisoned")
                .handles
                .get(sandbox_id)
                .cloned()
        }

        /// Number of successful starts so far.
        pub fn starts(&self) -> u64 {
            self.state.lock().expect("poisoned").starts
        }

        /// Specs of every successful start, in order.
        pub fn specs(&self) -> Vec<VmSpec> {
            self.state.lock().expect("poisoned").specs.clone()
        }

        /// Number of VMs that have not ended.
        pub fn running(&self) -> usize {
            self.state
                .lock()
                .expect("poisoned")
                .handles
                .values()
                .filter(|h| h.ended().is_none())
                .count()
        }
    }

    #[async_trait]
    impl VmBackend for FakeVmBackend {
        async fn start(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
            let (delay, fail, guest, gate) = {
                let mut s = self.settings.lock().expect("poisoned");
                let fail = s.fail_starts > 0;
                s.fail_starts = s.fail_starts.saturating_sub(1);
                (s.start_delay, fail, s.guest, s.gate.clone())
            };
            if let Some(gate) = gate {
                gate.wait().await;
            }
            tokio::time::sleep(delay).await;
            if fail {
                return Err(BackendError::Start("fake VM refused to start".into()));
            }
            if !spec.kernel.exists() {
                return Err(BackendError::Config(
                    format!("kernel {} does not exist", spec.kernel.display()).into(),
                ));
            }
            let (tx, _) = watch::channel(None);
            let handle = Arc::new(FakeVmHandle {
                spec: spec.clone(),
                guest,
                end: tx,
                resources: Mutex::default(),
                shutdown_requests: Mutex::new(0),
            });
            let mut st = self.state.lock().expect("poisoned");
            st.starts += 1;
            st.specs.push(spec.clone());
            st.handles
                .insert(spec.sandbox_id.clone(), Arc::clone(&handle));
            Ok(Box::new(SharedFake(handle)))
        }
    }

    /// A fake VM. It "runs" until a test ends it or the service stops it.
    #[derive(Debug)]
    pub struct FakeVmHandle {
        spec: VmSpec,
        guest: FakeGuest,
        end: watch::Sender<Option<VmEnd>>,
        resources: Mutex<BTreeMap<String, StoredAny>>,
        shutdown_requests: Mutex<u32>,
    }

    impl FakeVmHandle {
        /// Ends the VM as if it had `kind` (no-op if it has ended already).
        pub fn end_with(&self, kind: VmExitKind) {
            self.end.send_if_modified(|e| {
                if e.is_some() {
                    return false;
                }
                *e = Some(VmEnd {
                    kind,
                    at: SystemTime::now(),
                });
                true
            });
        }

        /// How the VM ended, if it has.
        pub fn ended(&self) -> Option<VmEnd> {
            self.end.borrow().clone()
        }

        /// The spec it was started with.
        pub fn spec(&self) -> &VmSpec {
            &self.spec
        }

        /// Resources applied, by container id.
        pub fn resources(&self) -> BTreeMap<String, StoredAny> {
            self.resources.lock().expect("poisoned").clone()
        }

        /// How often the guest was asked to shut down.
        pub fn shutdown_requests(&self) -> u32 {
            *self.shutdown_requests.lock().expect("poisoned")
        }
    }

    /// The boxed handle given to the service; shares the [`FakeVmHandle`] with the test.
    #[derive(Debug)]
    struct SharedFake(Arc<FakeVmHandle>);

    #[async_trait]
    impl TaskTarget for SharedFake {
        fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError> {
            Err(BackendError::Unsupported("a fake VM has no agent"))
        }

        async fn attach_disk(
            &self,
            _: &std::path::Path,
            _: bool,
        ) -> Result<AttachedDisk, BackendError> {
            Err(BackendError::Unsupported("a fake VM has no block slots"))
        }

        async fn detach_disk(&self, _: u32) -> Result<(), BackendError> {
            Err(BackendError::Unsupported("a fake VM has no block slots"))
        }
    }

    #[async_trait]
    impl VmHandle for SharedFake {
        fn pid(&self) -> u32 {
            std::process::id()
        }

        fn ended(&self) -> Option<VmEnd> {
            self.0.ended()
        }

        async fn wait(&self) -> VmEnd {
            wait_end(self.0.end.subscribe()).await
        }

        async fn request_shutdown(&self, _: Duration) -> Result<ShutdownRequest, BackendError> {
            if self.0.ended().is_some() {
                return Err(BackendError::NotRunning);
            }
            *self.0.shutdown_requests.lock().expect("poisoned") += 1;
            match self.0.guest {
                FakeGuest::NoAgent => Ok(ShutdownRequest::Unsupported),
                FakeGuest::Ignores => Ok(ShutdownRequest::Requested),
                FakeGuest::ShutsDownAfter(d) => {
                    let h = Arc::clone(&self.0);
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        h.end_with(VmExitKind::GuestShutdown);
                    });
                    Ok(ShutdownRequest::Requested)
                }
            }
        }

        async fn kill(&self) -> VmEnd {
            self.0.end_with(VmExitKind::HostStopped);
            self.wait().await
        }

        async fn metrics(&self) -> Result<VmMetrics, BackendError> {
            if self.0.ended().is_some() {
                return Err(BackendError::NotRunning);
            }
            Ok(VmMetrics {
                vcpus: self.0.spec.vcpus,
                mem_mib: self.0.spec.mem_mib,
                guest_resident_bytes: 4096,
                console_bytes: 0,
                boot_time_ns: 1,
                pod: None,
            })
        }

        async fn update_resources(
            &self,
            container_id: &str,
            resources: &StoredAny,
        ) -> Result<(), BackendError> {
            if self.0.ended().is_some() {
                return Err(BackendError::NotRunning);
            }
            self.0
                .resources
                .lock()
                .expect("poisoned")
                .insert(container_id.to_string(), resources.clone());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::error_chain;

    #[test]
    fn vm_exit_mapping() {
        let at = SystemTime::UNIX_EPOCH;
        let map = |exit| VmEnd::from(vmm::VmEnd { exit, at }).kind;
        assert_eq!(map(vmm::VmExit::PowerOff), VmExitKind::GuestShutdown);
        assert_eq!(
            map(vmm::VmExit::Reset(vmm::ResetKind::TripleFault)),
            VmExitKind::GuestShutdown
        );
        assert_eq!(map(vmm::VmExit::Stopped), VmExitKind::HostStopped);
        assert_eq!(
            map(vmm::VmExit::Crashed("boom".into())),
            VmExitKind::Crashed("boom".into())
        );
    }

    #[test]
    fn thread_name_fits() {
        assert_eq!(short("0123456789abcdef"), "012345");
        assert_eq!(short("ab"), "ab");
    }

    #[tokio::test]
    async fn kvm_backend_reports_a_missing_kernel_as_config_error() {
        let spec = VmSpec {
            sandbox_id: "x".into(),
            vcpus: 1,
            mem_mib: 64,
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: None,
            cmdline: String::new(),
            blk_slots: 0,
            seccomp: vmm::SeccompPolicy::default(),
            console_log: None,
            vsock_uds: None,
            setup: GuestSetup::default(),
            agent_ready_timeout: Duration::from_secs(1),
            nics: NetDevices::default(),
        };
        match KvmBackend.start(spec).await {
            Err(BackendError::Config(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn kvm_backend_requires_an_initramfs() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let mut spec = VmSpec {
            sandbox_id: "x".into(),
            vcpus: 1,
            mem_mib: 64,
            kernel,
            initramfs: None,
            cmdline: String::new(),
            blk_slots: 0,
            seccomp: vmm::SeccompPolicy::default(),
            console_log: None,
            vsock_uds: None,
            setup: GuestSetup::default(),
            agent_ready_timeout: Duration::from_secs(1),
            nics: NetDevices::default(),
        };
        match KvmBackend.start(spec.clone()).await {
            Err(e @ BackendError::Config(_)) => {
                assert!(error_chain(&e).contains("no agent initramfs"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        spec.initramfs = Some(tmp.path().join("missing.cpio"));
        match KvmBackend.start(spec).await {
            Err(e @ BackendError::Config(_)) => {
                assert!(error_chain(&e).contains("missing.cpio"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ready_lines() {
        assert_eq!(parse_ready_line("READY 1024\n"), Some(1024));
        assert_eq!(parse_ready_line("READY 4294967295\n"), Some(u32::MAX));
        for bad in [
            "READY 1024",
            "READY \n",
            "READY +1\n",
            "READY -1\n",
            "READY 4294967296\n",
            "ready 1\n",
            "READY 1 \n",
            "READY unix:/a\n",
            "",
        ] {
            assert_eq!(parse_ready_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn slot_serials_fit_get_id() {
        assert_eq!(slot_serial(0), "sbx-slot-0");
        // virtio-blk GET_ID carries at most 20 bytes.
        assert!(slot_serial(u32::MAX).len() <= 20);
    }

    #[test]
    fn setup_request_carries_the_pod_settings() {
        let setup = GuestSetup {
            hostname: "web-0".into(),
            dns: DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.local".into()],
                options: vec!["ndots:5".into()],
            },
            interfaces: vec![GuestInterface {
                mac: "02:00:00:00:00:01".into(),
                name: "eth0".into(),
                mtu: 1500,
                addresses: vec![GuestIp {
                    address: "10.0.0.2".into(),
                    prefix_len: 24,
                }],
            }],
            routes: vec![GuestRoute {
                gateway: "10.0.0.1".into(),
                device: "eth0".into(),
                ..GuestRoute::default()
            }],
        };
        let req = setup_request(&setup);
        assert_eq!(req.hostname, "web-0");
        let dns = req.dns.as_ref().unwrap();
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(dns.searches, ["svc.local"]);
        assert_eq!(dns.options, ["ndots:5"]);
        let nic = &req.interfaces[0];
        assert_eq!(
            (nic.mac.as_str(), nic.name.as_str(), nic.mtu),
            ("02:00:00:00:00:01", "eth0", 1500)
        );
        assert_eq!(nic.addresses[0].address, "10.0.0.2");
        assert_eq!(nic.addresses[0].prefix_len, 24);
        assert_eq!(req.routes[0].gateway, "10.0.0.1");
        assert_eq!(req.routes[0].destination, "");
        // No DNS settings: the message has none, so the agent leaves resolv.conf alone.
        assert!(setup_request(&GuestSetup::default()).dns.is_none());
    }

    #[tokio::test]
    async fn the_hybrid_fallback_takes_a_ready_line_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let uds = tmp.path().join("vsock.sock");
        let fallback = ReadyFallback::bind(&uds).unwrap();
        let path = tmp.path().join("vsock.sock_1025");
        assert!(path.exists());
        // What the VMM's muxer does for a guest connection nobody listens to in-process.
        let mut guest = std::os::unix::net::UnixStream::connect(&path).unwrap();
        std::io::Write::write_all(&mut guest, b"READY 4321\n").unwrap();
        let stream = accept_fallback(Some(&fallback)).await.unwrap();
        assert_eq!(read_ready_line(stream).await.unwrap(), 4321);
        drop(fallback);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_bad_or_cut_ready_line_is_an_error() {
        for (sent, want) in [(&b"READY x\n"[..], "READY x\n"), (b"READY 12", "READY 12")] {
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            std::io::Write::write_all(&mut b, sent).unwrap();
            drop(b);
            a.set_nonblocking(true).unwrap();
            let a = tokio::net::UnixStream::from_std(a).unwrap();
            match read_ready_line(a).await {
                Err(BackendError::BadReadyLine(line)) => assert_eq!(line, want),
                other => panic!("{other:?}"),
            }
        }
        // A peer that never stops talking is cut off at the line limit.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut b, &[b'x'; 4 * MAX_READY_LINE]).unwrap();
        a.set_nonblocking(true).unwrap();
        let a = tokio::net::UnixStream::from_std(a).unwrap();
        match read_ready_line(a).await {
            Err(BackendError::BadReadyLine(line)) => assert_eq!(line.len(), MAX_READY_LINE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hybrid_listener_path_appends_the_port() {
        assert_eq!(
            hybrid_listener_path(Path::new("/run/s/pod/vsock.sock"), 1025),
            Path::new("/run/s/pod/vsock.sock_1025")
        );
    }
}
