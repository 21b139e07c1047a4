// SPDX-License-Identifier: Apache-2.0
//! What the sandbox service needs from a VM: the [`VmBackend`] / [`VmHandle`] traits, the real
//! [`KvmBackend`] on the in-process VMM, and for tests (feature `test-utils`)
//! `fake::FakeVmBackend`.
//!
//! Operations a backend cannot do yet return [`BackendError::Unsupported`]; the service turns that
//! into gRPC `Unimplemented`. No backend pretends to have done something it has not.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;

use crate::sandbox::{MountSpec, StoredAny};

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
}

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
    /// File that receives the guest console.
    pub console_log: Option<PathBuf>,
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
    /// Asks the guest to shut down cleanly, without waiting for it.
    async fn request_shutdown(&self) -> Result<ShutdownRequest, BackendError>;
    /// Stops the VM now (if it still runs) and returns how it ended.
    async fn kill(&self) -> VmEnd;
    /// Current statistics.
    async fn metrics(&self) -> Result<VmMetrics, BackendError>;
    /// Attaches a container's root filesystem to a free block slot.
    async fn attach_rootfs(
        &self,
        container_id: &str,
        rootfs: &[MountSpec],
    ) -> Result<(), BackendError>;
    /// Detaches what [`VmHandle::attach_rootfs`] attached.
    async fn detach_rootfs(&self, container_id: &str) -> Result<(), BackendError>;
    /// Applies new resources to a container inside the guest.
    async fn update_resources(
        &self,
        container_id: &str,
        resources: &StoredAny,
    ) -> Result<(), BackendError>;
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

/// The real backend: KVM microVMs inside this process ([`vmm::Vm`]).
#[derive(Clone, Debug, Default)]
pub struct KvmBackend;

/// A VM of the [`KvmBackend`].
#[derive(Debug)]
pub struct KvmHandle {
    vm: Arc<vmm::Vm>,
    spec: VmSpec,
    end: watch::Receiver<Option<VmEnd>>,
}

/// Stack size of the thread that waits for a VM's end: it only blocks on a condvar.
const WAITER_STACK: usize = 64 * 1024;

#[async_trait]
impl VmBackend for KvmBackend {
    async fn start(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>, BackendError> {
        // Checked here so a missing file is a configuration error even where KVM is unusable.
        for file in std::iter::once(&spec.kernel).chain(spec.initramfs.as_ref()) {
            if !file.is_file() {
                return Err(BackendError::Config(
                    format!("{} is not a file", file.display()).into(),
                ));
            }
        }
        let mut config = vmm::VmConfig::new(&spec.kernel);
        config.initramfs.clone_from(&spec.initramfs);
        config.cmdline.clone_from(&spec.cmdline);
        config.vcpus = spec.vcpus;
        config.mem_mib = spec.mem_mib;
        config.console = vmm::ConsoleConfig {
            log_path: spec.console_log.clone(),
            stdout: false,
        };
        // blk_slots: the VMM has no virtio-blk yet; slots are added with rootfs attach.
        let vm = tokio::task::spawn_blocking(move || vmm::Vm::start(config))
            .await
            .map_err(BackendError::Join)?
            .map_err(|e| match e {
                vmm::VmError::Config(c) => BackendError::Config(Box::new(c)),
                other => BackendError::Start(Box::new(other)),
            })?;
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
            let vm = Arc::clone(&vm);
            // Without a waiter nobody would see the end: do not leave the VM running.
            let _ = tokio::task::spawn_blocking(move || vm.stop()).await;
            return Err(BackendError::Start(Box::new(e)));
        }
        Ok(Box::new(KvmHandle { vm, spec, end: rx }))
    }
}

/// Thread names are limited to 15 bytes by Linux.
fn short(id: &str) -> &str {
    id.get(..6).unwrap_or(id)
}

#[async_trait]
impl TaskTarget for KvmHandle {
    fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError> {
        Err(BackendError::Unsupported(
            "the agent connection (not wired yet)",
        ))
    }

    async fn attach_disk(
        &self,
        _: &std::path::Path,
        _: bool,
    ) -> Result<AttachedDisk, BackendError> {
        Err(BackendError::Unsupported("block slots (not wired yet)"))
    }

    async fn detach_disk(&self, _: u32) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("block slots (not wired yet)"))
    }
}

#[async_trait]
impl VmHandle for KvmHandle {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn ended(&self) -> Option<VmEnd> {
        self.end.borrow().clone()
    }

    async fn wait(&self) -> VmEnd {
        wait_end(self.end.clone()).await
    }

    async fn request_shutdown(&self) -> Result<ShutdownRequest, BackendError> {
        // The guest agent (which would end the pod cleanly) is not wired in yet, and a guest
        // without ACPI has no power button: the VM can only be stopped.
        Ok(ShutdownRequest::Unsupported)
    }

    async fn kill(&self) -> VmEnd {
        let vm = Arc::clone(&self.vm);
        match tokio::task::spawn_blocking(move || vm.stop()).await {
            Ok(end) => end.into(),
            // The blocking pool is gone (runtime shutting down): stop on this thread.
            Err(_) => self.vm.stop().into(),
        }
    }

    async fn metrics(&self) -> Result<VmMetrics, BackendError> {
        if self.ended().is_some() {
            return Err(BackendError::NotRunning);
        }
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
        })
    }

    async fn attach_rootfs(&self, _: &str, _: &[MountSpec]) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(
            "attaching a container root filesystem (the VMM has no block slots yet)",
        ))
    }

    async fn detach_rootfs(&self, _: &str) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(
            "detaching a container root filesystem (the VMM has no block slots yet)",
        ))
    }

    async fn update_resources(&self, _: &str, _: &StoredAny) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(
            "applying container resources (needs the guest agent)",
        ))
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod fake {
    //! A VM backend for tests: no KVM, fully scriptable.

    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;

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
                attached: Mutex::default(),
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
        attached: Mutex<BTreeMap<String, Vec<MountSpec>>>,
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

        /// Root filesystems attached, by container id.
        pub fn attached(&self) -> BTreeMap<String, Vec<MountSpec>> {
            self.attached.lock().expect("poisoned").clone()
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

        async fn request_shutdown(&self) -> Result<ShutdownRequest, BackendError> {
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
            })
        }

        async fn attach_rootfs(
            &self,
            container_id: &str,
            rootfs: &[MountSpec],
        ) -> Result<(), BackendError> {
            if self.0.ended().is_some() {
                return Err(BackendError::NotRunning);
            }
            self.0
                .attached
                .lock()
                .expect("poisoned")
                .insert(container_id.to_string(), rootfs.to_vec());
            Ok(())
        }

        async fn detach_rootfs(&self, container_id: &str) -> Result<(), BackendError> {
            self.0
                .attached
                .lock()
                .expect("poisoned")
                .remove(container_id);
            Ok(())
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
            console_log: None,
        };
        match KvmBackend.start(spec).await {
            Err(BackendError::Config(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}
