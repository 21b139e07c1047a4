// SPDX-License-Identifier: Apache-2.0
//! The sandbox service: the domain logic both Sandbox APIs share.
//!
//! Concurrency: the registry (id -> sandbox) is locked only to look up, insert or remove. Each
//! sandbox has its own async lock that serializes its lifecycle operations (Create, Start, Stop,
//! Shutdown, Update, Prepare, ...), so a Start racing a Stop on one sandbox is safe and sandboxes
//! never wait for each other. Status and Wait take no lifecycle lock: Status reads a snapshot and
//! Wait watches the sandbox's exit, so both answer while a Stop is in its grace period.
//!
//! Every mutating operation runs in its own task: a client that gives up (drops the gRPC call)
//! cannot interrupt a Start half-way and leave a VM nobody knows about.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backend::{
    BackendError, GuestSetup, NetDevices, ShutdownRequest, VmBackend, VmEnd, VmExitKind, VmHandle,
    VmSpec,
};
use crate::config::{Config, VmDefaults};
use crate::error::{SandboxError, error_chain};
use crate::network::{self, PodNetwork};
use crate::sandbox::{
    ContainerRecord, DnsConfig, ExitInfo, MountSpec, PodConfig, ProcessRecord, SandboxRecord,
    SandboxState, StoredAny, VmSize, validate_id,
};
use crate::store::{Store, StoreError};
use crate::task::{ImageCache, TaskOptions, TaskServer};

/// Task API version the sandboxer serves at a sandbox's address.
pub const TASK_API_VERSION: u32 = 3;
/// Exit status of a sandbox whose guest had to be stopped after the grace period.
pub const EXIT_FORCED: u32 = 137;
/// Exit status of a sandbox whose VM crashed, failed to start or was lost.
pub const EXIT_FAILED: u32 = 255;
/// Type URL of the JSON [`crate::backend::VmMetrics`] in a Metrics reply.
pub const VM_METRICS_TYPE_URL: &str = "sandboxer.dev/sandboxer.v1.VmMetrics";
/// Type URL of the JSON sandbox record in a verbose Status reply's `extra`.
pub const RECORD_TYPE_URL: &str = "sandboxer.dev/sandboxer.v1.SandboxRecord";
/// Name of the CRI pod configuration message carried in Create's `options`.
const POD_SANDBOX_CONFIG: &str = "runtime.v1.PodSandboxConfig";
/// Longest hostname Linux accepts.
const HOST_NAME_MAX: usize = 64;

/// Settings of the service (a subset of the daemon [`Config`]).
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Where sandbox directories live.
    pub state_dir: PathBuf,
    /// How VMs are built.
    pub vm: VmDefaults,
    /// Grace period of a Stop that names none (`timeout_secs = 0`).
    pub default_stop_timeout: Duration,
    /// Where container rootfs images are built.
    pub image_dir: PathBuf,
    /// containerd's socket, for OOM events.
    pub containerd_address: Option<PathBuf>,
}

impl ServiceConfig {
    /// Defaults with the given state dir (images under it, no containerd).
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let c = Config::default();
        let state_dir = state_dir.into();
        ServiceConfig {
            image_dir: state_dir.join("images"),
            state_dir,
            vm: c.vm,
            default_stop_timeout: Duration::from_secs(u64::from(c.stop_timeout_secs)),
            containerd_address: None,
        }
    }
}

impl From<&Config> for ServiceConfig {
    fn from(c: &Config) -> Self {
        ServiceConfig {
            state_dir: c.state_dir.clone(),
            vm: c.vm.clone(),
            default_stop_timeout: Duration::from_secs(u64::from(c.stop_timeout_secs)),
            image_dir: if c.image_dir.as_os_str().is_empty() {
                c.state_dir.join("images")
            } else {
                c.image_dir.clone()
            },
            containerd_address: Some(c.containerd_address.clone())
                .filter(|p| !p.as_os_str().is_empty()),
        }
    }
}

/// The engine's own record of the sandbox, as Create and Update carry it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxInfo {
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The sandbox spec.
    pub spec: Option<StoredAny>,
    /// Runtime name and options.
    pub runtime: Option<(String, Option<StoredAny>)>,
    /// Extensions.
    pub extensions: BTreeMap<String, StoredAny>,
}

/// A Create request, from either API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateRequest {
    /// Sandbox id.
    pub id: String,
    /// The `sandboxer` the engine named.
    pub sandboxer: String,
    /// Sandbox root filesystem.
    pub rootfs: Vec<MountSpec>,
    /// Pod configuration (`runtime.v1.PodSandboxConfig`) or other options.
    pub options: Option<StoredAny>,
    /// Network namespace (empty: none).
    pub netns_path: String,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// The engine's sandbox record (containerd 2.x).
    pub sandbox: Option<SandboxInfo>,
}

/// What Start returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    /// Sandbox id.
    pub id: String,
    /// The process that serves the sandbox (the sandboxer).
    pub pid: u32,
    /// When the sandbox was created.
    pub created_at: SystemTime,
    /// The sandbox's labels.
    pub labels: BTreeMap<String, String>,
    /// Task API address, `ttrpc+unix://<state>/<id>/task.sock`.
    pub address: String,
    /// Task API version.
    pub version: u32,
}

/// What Status returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusInfo {
    /// Sandbox id.
    pub id: String,
    /// The process that serves the sandbox (0 before Start).
    pub pid: u32,
    /// Internal state.
    pub state: SandboxState,
    /// Extra facts for people.
    pub info: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: SystemTime,
    /// Exit time, once ended.
    pub exited_at: Option<SystemTime>,
    /// Task API address (empty before Start).
    pub address: String,
    /// Task API version (0 before Start).
    pub version: u32,
    /// The full record as JSON (verbose only).
    pub extra: Option<StoredAny>,
}

/// What Metrics returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsInfo {
    /// Sandbox id.
    pub id: String,
    /// Sample time.
    pub at: SystemTime,
    /// The pod's cgroup statistics as the agent sent them (`io.containerd.cgroups.v2.Metrics`),
    /// or, when it sent none, the VM's (type URL [`VM_METRICS_TYPE_URL`], JSON).
    pub data: StoredAny,
}

/// A seed API Prepare request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrepareRequest {
    /// Container id.
    pub container_id: String,
    /// Exec id; empty to add the container itself.
    pub exec_id: String,
    /// OCI spec (container) or process spec (exec), JSON in an `Any`.
    pub spec: Option<StoredAny>,
    /// Container root filesystem.
    pub rootfs: Vec<MountSpec>,
    /// stdin path.
    pub stdin: String,
    /// stdout path.
    pub stdout: String,
    /// stderr path.
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

/// What [`SandboxService::recover`] did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Sandboxes known again.
    pub restored: usize,
    /// Sandboxes whose VM was lost with the previous process (now `Failed`).
    pub lost: Vec<String>,
    /// Sandboxes whose interrupted Shutdown was finished.
    pub removed: Vec<String>,
    /// Records that could not be read (left on disk).
    pub unreadable: Vec<StoreError>,
}

/// One sandbox in the registry.
#[derive(Debug)]
struct Entry {
    /// Serializes lifecycle operations of this sandbox.
    op: tokio::sync::Mutex<()>,
    /// Record and VM; locked only for short, non-async sections.
    data: Mutex<EntryData>,
    /// The exit, once the sandbox has ended (Wait watches it).
    end: watch::Sender<Option<ExitInfo>>,
}

#[derive(Debug)]
struct EntryData {
    record: SandboxRecord,
    vm: Option<Arc<dyn VmHandle>>,
    /// The pod network set up at Start (taps + tc in the pod netns), torn down at Shutdown.
    net: Option<PodNetwork>,
    /// The Task endpoint (`task.sock`), from Start until Shutdown.
    task: Option<TaskServer>,
}

impl Entry {
    fn new(record: SandboxRecord) -> Arc<Self> {
        let (end, _) = watch::channel(record.exit.clone());
        Arc::new(Entry {
            op: tokio::sync::Mutex::new(()),
            data: Mutex::new(EntryData {
                record,
                vm: None,
                net: None,
                task: None,
            }),
            end,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut EntryData) -> R) -> R {
        f(&mut self.data.lock().expect("poisoned"))
    }

    fn snapshot(&self) -> (SandboxRecord, Option<Arc<dyn VmHandle>>) {
        self.with(|d| (d.record.clone(), d.vm.clone()))
    }

    /// Records the end (state and exit), drops the VM handle and returns the record to persist.
    /// A no-op returning `None` when the end is recorded already.
    fn finish(&self, state: SandboxState, exit: ExitInfo) -> Option<SandboxRecord> {
        self.with(|d| {
            if d.record.exit.is_some() {
                return None;
            }
            if !d.record.state.can_transition_to(state) {
                return None;
            }
            d.record.state = state;
            d.record.exit = Some(exit);
            d.vm = None;
            Some(d.record.clone())
        })
    }

    /// Wakes every Wait.
    fn notify(&self) {
        let exit = self.with(|d| d.record.exit.clone());
        if exit.is_some() {
            self.end.send_replace(exit);
        }
    }
}

/// Removes a pod network's taps and tc redirects; failures are logged (nothing to return them to).
async fn teardown_network(id: &str, net: Option<PodNetwork>) {
    if let Some(net) = net
        && let Err(e) = net.teardown().await
    {
        warn!(sandbox_id = %id, error = %error_chain(&e), "cannot tear down the pod network");
    }
}

/// The containerd form of a mount the seed API gave.
fn shim_mount(m: &MountSpec) -> containerd_shim_protos::api::Mount {
    containerd_shim_protos::api::Mount {
        type_: m.kind.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        options: m.options.clone(),
        ..Default::default()
    }
}

/// Whole microseconds of `d` (saturating).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The state and exit a VM end means; `forced` when Stop had to cut a grace period short.
fn exit_of(end: &VmEnd, forced: bool) -> (SandboxState, ExitInfo) {
    let (state, status, reason) = match &end.kind {
        VmExitKind::GuestShutdown => (SandboxState::Stopped, 0, "the guest shut down".to_string()),
        VmExitKind::HostStopped if forced => (
            SandboxState::Stopped,
            EXIT_FORCED,
            "stopped by force after the grace period".to_string(),
        ),
        VmExitKind::HostStopped => (SandboxState::Stopped, 0, "stopped".to_string()),
        VmExitKind::Crashed(why) => (SandboxState::Failed, EXIT_FAILED, why.clone()),
    };
    (
        state,
        ExitInfo {
            status,
            at: end.at,
            reason,
        },
    )
}

/// Stops `vm`: asks the guest, waits up to `grace`, then forces it. Returns the end and whether
/// it had to be forced.
async fn stop_vm(vm: &dyn VmHandle, grace: Duration) -> (VmEnd, bool) {
    if let Some(end) = vm.ended() {
        return (end, false);
    }
    match vm.request_shutdown(grace).await {
        Ok(ShutdownRequest::Requested) => match tokio::time::timeout(grace, vm.wait()).await {
            Ok(end) => (end, false),
            Err(_) => (vm.kill().await, true),
        },
        Ok(ShutdownRequest::Unsupported) => (vm.kill().await, false),
        Err(e) => {
            warn!(error = %error_chain(&e), "shutdown request failed; stopping the VM");
            (vm.kill().await, false)
        }
    }
}

/// The sandbox service over a VM backend.
#[derive(Debug)]
pub struct SandboxService<B: VmBackend> {
    backend: B,
    store: Store,
    config: ServiceConfig,
    sandboxes: Mutex<HashMap<String, Arc<Entry>>>,
    /// Rootfs images shared by every sandbox's Task endpoint (made at the first Start).
    images: Mutex<Option<Arc<ImageCache>>>,
}

impl<B: VmBackend> SandboxService<B> {
    /// A service with no sandboxes. Call [`SandboxService::recover`] to load persisted ones.
    pub fn new(backend: B, config: ServiceConfig) -> Arc<Self> {
        Arc::new(SandboxService {
            backend,
            store: Store::new(&config.state_dir),
            config,
            sandboxes: Mutex::new(HashMap::new()),
            images: Mutex::new(None),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Ids of all known sandboxes, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .sandboxes
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// The record of a sandbox, as it is now.
    pub fn record(&self, id: &str) -> Result<SandboxRecord, SandboxError> {
        Ok(self.get(id)?.snapshot().0)
    }

    /// Loads the persisted records (see the restart contract in [`crate::store`]).
    ///
    /// Call once, before serving. Sandboxes already known are left alone.
    pub fn recover(&self) -> Result<Recovery, StoreError> {
        let loaded = self.store.load_all()?;
        let mut report = Recovery {
            unreadable: loaded.errors,
            ..Recovery::default()
        };
        let now = SystemTime::now();
        for mut record in loaded.records {
            let id = record.id.clone();
            if self.sandboxes.lock().expect("poisoned").contains_key(&id) {
                continue;
            }
            match record.state {
                SandboxState::Deleted => {
                    self.store.remove(&id)?;
                    report.removed.push(id);
                    continue;
                }
                SandboxState::Starting | SandboxState::Ready | SandboxState::Stopping => {
                    record.state = SandboxState::Failed;
                    record.exit = Some(ExitInfo {
                        status: EXIT_FAILED,
                        at: now,
                        reason: "the VM ended with the previous sandboxer process".into(),
                    });
                    self.store.save(&record)?;
                    report.lost.push(id.clone());
                }
                SandboxState::Created | SandboxState::Stopped | SandboxState::Failed => {}
            }
            self.sandboxes
                .lock()
                .expect("poisoned")
                .insert(id, Entry::new(record));
            report.restored += 1;
        }
        Ok(report)
    }

    fn get(&self, id: &str) -> Result<Arc<Entry>, SandboxError> {
        validate_id("sandbox_id", id)?;
        self.sandboxes
            .lock()
            .expect("poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    async fn save(&self, record: SandboxRecord) -> Result<(), SandboxError> {
        let store = self.store.clone();
        let id = record.id.clone();
        tokio::task::spawn_blocking(move || store.save(&record))
            .await
            .map_err(|e| SandboxError::Task(id.clone(), e))?
            .map_err(|e| SandboxError::Store(id, e))
    }

    /// Runs `f` as its own task so that a caller going away cannot cut it short.
    async fn detached<T, F>(self: &Arc<Self>, id: &str, f: F) -> Result<T, SandboxError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, SandboxError>> + Send + 'static,
    {
        tokio::spawn(f)
            .await
            .map_err(|e| SandboxError::Task(id.to_string(), e))?
    }

    /// Creates a sandbox: validates, reads the pod config, persists the record. Nothing boots.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let id = req.id.clone();
        self.detached(&id, async move { this.do_create(req).await })
            .await
    }

    async fn do_create(self: Arc<Self>, req: CreateRequest) -> Result<(), SandboxError> {
        validate_id("sandbox_id", &req.id)?;
        let pod = match &req.options {
            Some(options) => parse_pod_config(options)?,
            None => None,
        };
        if !req.netns_path.is_empty() {
            let p = Path::new(&req.netns_path);
            if !p.is_absolute() {
                return Err(SandboxError::InvalidArgument {
                    field: "netns_path",
                    reason: format!("{} is not an absolute path", req.netns_path),
                });
            }
            if !p.exists() {
                return Err(SandboxError::InvalidArgument {
                    field: "netns_path",
                    reason: format!("{} does not exist", req.netns_path),
                });
            }
        }
        let vm = vm_size(&self.config.vm, pod.as_ref())?;

        let mut record = SandboxRecord::new(req.id.clone(), SystemTime::now());
        record.sandboxer = req.sandboxer;
        record.rootfs = req.rootfs;
        record.netns_path = req.netns_path;
        record.annotations = req.annotations;
        record.options = req.options;
        record.vm = vm;
        if let Some(p) = &pod {
            record.labels.extend(p.1.clone());
        }
        record.pod = pod.map(|p| p.0);
        if let Some(info) = req.sandbox {
            record.labels.extend(info.labels);
            record.spec = info.spec;
            record.runtime = info.runtime;
            for (key, value) in info.extensions {
                set_extension(&mut record, &key, Some(value))?;
            }
        }

        let entry = Entry::new(record.clone());
        // Hold the sandbox's lock until it is on disk: nobody can Start it before that.
        let _op = entry.op.lock().await;
        {
            let mut map = self.sandboxes.lock().expect("poisoned");
            if map.contains_key(&record.id) {
                return Err(SandboxError::AlreadyExists {
                    what: "Sandbox",
                    id: record.id,
                });
            }
            map.insert(record.id.clone(), Arc::clone(&entry));
        }
        let id = record.id.clone();
        let store = self.store.clone();
        let persisted = tokio::task::spawn_blocking(move || {
            store.create_dir(&record.id)?;
            store.save(&record)
        })
        .await
        .map_err(|e| SandboxError::Task(id.clone(), e))
        .and_then(|r| r.map_err(|e| SandboxError::Store(id.clone(), e)));
        if let Err(e) = persisted {
            self.sandboxes.lock().expect("poisoned").remove(&id);
            let _ = self.store.remove(&id);
            return Err(e);
        }
        info!(sandbox_id = %id, vcpus = vm.vcpus, mem_mib = vm.mem_mib, "sandbox created");
        Ok(())
    }

    /// Starts a created sandbox's VM and returns the Task API address.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Started, SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_start(owned).await })
            .await
    }

    async fn do_start(self: Arc<Self>, id: String) -> Result<Started, SandboxError> {
        let t_start = Instant::now();
        let entry = self.get(&id)?;
        let _op = entry.op.lock().await;
        let record = entry.with(|d| {
            d.record.transition(SandboxState::Starting, "start")?;
            Ok::<_, SandboxError>(d.record.clone())
        })?;
        if let Err(e) = self.save(record.clone()).await {
            entry.with(|d| d.record.state = SandboxState::Created);
            return Err(e);
        }

        let dir = self.store.sandbox_dir(&id);
        let mut net = match self.attach_network(&record).await {
            Ok(net) => net,
            Err(e) => {
                let exit = ExitInfo {
                    status: EXIT_FAILED,
                    at: SystemTime::now(),
                    reason: format!("start failed: {}", error_chain(&e)),
                };
                warn!(sandbox_id = %id, error = %error_chain(&e), "sandbox network failed");
                if let Some(r) = entry.finish(SandboxState::Failed, exit) {
                    let _ = self.save(r).await;
                }
                entry.notify();
                return Err(e);
            }
        };
        let nics = NetDevices::new(
            net.as_mut()
                .map(PodNetwork::take_device_configs)
                .unwrap_or_default(),
        );
        let (interfaces, routes) = net
            .as_ref()
            .map(|n| (n.guest_interfaces(), n.guest_routes()))
            .unwrap_or_default();
        let spec = VmSpec {
            sandbox_id: id.clone(),
            vcpus: record.vm.vcpus,
            mem_mib: record.vm.mem_mib,
            kernel: self.config.vm.kernel.clone(),
            initramfs: Some(self.config.vm.initramfs.clone()).filter(|p| !p.as_os_str().is_empty()),
            cmdline: self.config.vm.cmdline.clone(),
            blk_slots: self.config.vm.blk_slots,
            seccomp: self.config.vm.seccomp.into(),
            console_log: Some(dir.join("console.log")),
            vsock_uds: Some(dir.join("vsock.sock")),
            setup: GuestSetup {
                hostname: record
                    .pod
                    .as_ref()
                    .map(|p| p.hostname.clone())
                    .unwrap_or_default(),
                dns: record
                    .pod
                    .as_ref()
                    .map(|p| p.dns.clone())
                    .unwrap_or_default(),
                interfaces,
                routes,
            },
            agent_ready_timeout: Duration::from_millis(self.config.vm.agent_ready_timeout_ms),
            nics,
        };
        let vm: Arc<dyn VmHandle> = match self.backend.start(spec).await {
            Ok(vm) => Arc::from(vm),
            Err(e) => {
                let exit = ExitInfo {
                    status: EXIT_FAILED,
                    at: SystemTime::now(),
                    reason: format!("start failed: {}", error_chain(&e)),
                };
                warn!(sandbox_id = %id, error = %error_chain(&e), "sandbox failed to start");
                teardown_network(&id, net).await;
                if let Some(r) = entry.finish(SandboxState::Failed, exit) {
                    // The error being returned matters more than a failed save of it.
                    let _ = self.save(r).await;
                }
                entry.notify();
                return Err(SandboxError::Backend(id, e));
            }
        };

        let t_task = Instant::now();
        let task = match self.start_task_server(&dir, &vm).await {
            Ok(task) => task,
            Err(e) => {
                let end = vm.kill().await;
                teardown_network(&id, net).await;
                let (_, mut exit) = exit_of(&end, false);
                exit.status = EXIT_FAILED;
                exit.reason = format!("start failed: {}", error_chain(&e));
                if let Some(r) = entry.finish(SandboxState::Failed, exit) {
                    let _ = self.save(r).await;
                }
                entry.notify();
                return Err(e);
            }
        };
        let mut start_us: BTreeMap<String, u64> = vm
            .start_phases()
            .named()
            .iter()
            .map(|(name, d)| ((*name).to_string(), micros(*d)))
            .collect();
        start_us.insert("task_server".into(), micros(t_task.elapsed()));
        start_us.insert("total".into(), micros(t_start.elapsed()));
        let started_at = SystemTime::now();
        let address = task.address();
        let record = entry.with(|d| {
            d.record.state = SandboxState::Ready;
            d.record.start_us = start_us;
            d.record.started_at = Some(started_at);
            d.record.pid = vm.pid();
            d.record.address.clone_from(&address);
            d.vm = Some(Arc::clone(&vm));
            d.net = net;
            d.task = Some(task);
            d.record.clone()
        });
        if let Err(e) = self.save(record.clone()).await {
            // Nobody could find this VM after a restart: do not keep it.
            let end = vm.kill().await;
            let (_, mut exit) = exit_of(&end, false);
            exit.status = EXIT_FAILED;
            exit.reason = format!("start failed: {}", error_chain(&e));
            if let Some(r) = entry.finish(SandboxState::Failed, exit) {
                let _ = self.save(r).await;
            }
            entry.notify();
            return Err(e);
        }
        tokio::spawn(Arc::clone(&self).monitor(Arc::clone(&entry), Arc::clone(&vm)));
        info!(sandbox_id = %id, %address, "sandbox started");
        Ok(Started {
            id,
            pid: record.pid,
            created_at: record.created_at,
            labels: record.labels,
            address,
            version: TASK_API_VERSION,
        })
    }

    /// Records a VM's end when it ends by itself (guest shutdown, crash).
    async fn monitor(self: Arc<Self>, entry: Arc<Entry>, vm: Arc<dyn VmHandle>) {
        let end = vm.wait().await;
        drop(vm);
        let _op = entry.op.lock().await;
        let (state, exit) = exit_of(&end, false);
        if let Some(record) = entry.finish(state, exit) {
            info!(sandbox_id = %record.id, state = %record.state, "sandbox VM ended");
            if let Err(e) = self.save(record).await {
                warn!(error = %error_chain(&e), "cannot persist a sandbox's end");
            }
        }
        entry.notify();
    }

    /// Stops a sandbox: asks the guest, waits up to `timeout` (0: the configured default), then
    /// forces it. Stopping an ended sandbox succeeds.
    pub async fn stop(self: &Arc<Self>, id: &str, timeout: Duration) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_stop(owned, timeout).await })
            .await
    }

    async fn do_stop(self: Arc<Self>, id: String, timeout: Duration) -> Result<(), SandboxError> {
        let entry = self.get(&id)?;
        let _op = entry.op.lock().await;
        let (record, vm) = entry.snapshot();
        match record.state {
            SandboxState::Created => {
                let exit = ExitInfo {
                    status: 0,
                    at: SystemTime::now(),
                    reason: "stopped before it started".into(),
                };
                if let Some(r) = entry.finish(SandboxState::Stopped, exit) {
                    self.save(r).await?;
                }
                entry.notify();
                Ok(())
            }
            SandboxState::Stopped | SandboxState::Failed => Ok(()),
            SandboxState::Deleted => Err(SandboxError::NotFound(id)),
            SandboxState::Ready => {
                let r = entry.with(|d| {
                    d.record.transition(SandboxState::Stopping, "stop")?;
                    Ok::<_, SandboxError>(d.record.clone())
                })?;
                if let Err(e) = self.save(r).await {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "cannot persist Stopping");
                }
                let grace = if timeout.is_zero() {
                    self.config.default_stop_timeout
                } else {
                    timeout
                };
                let (end, forced) = match vm {
                    Some(vm) => stop_vm(vm.as_ref(), grace).await,
                    None => (
                        VmEnd {
                            kind: VmExitKind::HostStopped,
                            at: SystemTime::now(),
                        },
                        false,
                    ),
                };
                let (state, exit) = exit_of(&end, forced);
                if let Some(r) = entry.finish(state, exit) {
                    self.save(r).await?;
                }
                entry.notify();
                info!(sandbox_id = %id, forced, "sandbox stopped");
                Ok(())
            }
            // Start and Stop hold the lifecycle lock for their whole run: not observable here.
            SandboxState::Starting | SandboxState::Stopping => {
                Err(SandboxError::FailedPrecondition {
                    id,
                    state: record.state,
                    op: "stop",
                })
            }
        }
    }

    /// Waits until the sandbox has ended and returns its exit. Many may wait at once.
    pub async fn wait(&self, id: &str) -> Result<ExitInfo, SandboxError> {
        let entry = self.get(id)?;
        let mut rx = entry.end.subscribe();
        drop(entry);
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| SandboxError::NotFound(id.to_string()))?
            .clone();
        exit.ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    /// The sandbox's state and facts.
    pub fn status(&self, id: &str, verbose: bool) -> Result<StatusInfo, SandboxError> {
        let (record, _) = self.get(id)?.snapshot();
        let mut info = BTreeMap::new();
        info.insert("state".to_string(), record.state.name().to_string());
        info.insert("vcpus".to_string(), record.vm.vcpus.to_string());
        info.insert("mem_mib".to_string(), record.vm.mem_mib.to_string());
        if !record.netns_path.is_empty() {
            info.insert("netns_path".to_string(), record.netns_path.clone());
        }
        if let Some(pod) = record.pod.as_ref().filter(|p| !p.hostname.is_empty()) {
            info.insert("hostname".to_string(), pod.hostname.clone());
        }
        if let Some(exit) = &record.exit {
            info.insert("exit_reason".to_string(), exit.reason.clone());
        }
        for (phase, us) in &record.start_us {
            info.insert(format!("start_{phase}_us"), us.to_string());
        }
        let extra = if verbose {
            let json = serde_json::to_vec(&record).unwrap_or_default();
            if let Ok(s) = std::str::from_utf8(&json) {
                info.insert("record".to_string(), s.to_string());
            }
            Some(StoredAny {
                type_url: RECORD_TYPE_URL.to_string(),
                value: json,
            })
        } else {
            None
        };
        let started = !record.address.is_empty();
        Ok(StatusInfo {
            id: record.id,
            pid: record.pid,
            state: record.state,
            info,
            created_at: record.created_at,
            exited_at: record.exit.map(|e| e.at),
            address: record.address,
            version: if started { TASK_API_VERSION } else { 0 },
            extra,
        })
    }

    /// Frees everything the sandbox holds (its VM, directory, sockets, files) and forgets it.
    pub async fn shutdown(self: &Arc<Self>, id: &str) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_shutdown(owned).await })
            .await
    }

    async fn do_shutdown(self: Arc<Self>, id: String) -> Result<(), SandboxError> {
        let entry = self.get(&id)?;
        let _op = entry.op.lock().await;
        let (record, vm) = entry.snapshot();
        match (record.state, vm) {
            (SandboxState::Ready | SandboxState::Starting | SandboxState::Stopping, vm) => {
                let end = match vm {
                    Some(vm) => vm.kill().await,
                    None => VmEnd {
                        kind: VmExitKind::HostStopped,
                        at: SystemTime::now(),
                    },
                };
                let (state, exit) = exit_of(&end, false);
                entry.finish(state, exit);
            }
            (SandboxState::Created, _) => {
                let exit = ExitInfo {
                    status: 0,
                    at: SystemTime::now(),
                    reason: "shut down before it started".into(),
                };
                entry.finish(SandboxState::Stopped, exit);
            }
            (SandboxState::Stopped | SandboxState::Failed | SandboxState::Deleted, _) => {}
        }
        entry.notify();
        // The Task endpoint goes first: it detaches its slots and drops its images.
        let task = entry.with(|d| d.task.take());
        if let Some(task) = task {
            task.shutdown().await;
        }
        // The VM (which held the taps) is gone: remove the tc redirects. A record from before a
        // restart has no PodNetwork: clean whatever the lost process left in its netns.
        let net = entry.with(|d| d.net.take());
        if net.is_some() {
            teardown_network(&id, net).await;
        } else if !record.netns_path.is_empty()
            && let Err(e) = network::cleanup_leftovers(Path::new(&record.netns_path), &id).await
        {
            warn!(sandbox_id = %id, error = %error_chain(&e), "cannot clean the pod network");
        }
        let record = entry.with(|d| {
            if d.record.state != SandboxState::Deleted {
                d.record.state = SandboxState::Deleted;
            }
            d.record.clone()
        });
        // Persist Deleted first: a crash during the cleanup is finished by the next recover().
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            match store.save(&record) {
                // The directory may be gone already (an earlier, interrupted Shutdown).
                Ok(()) | Err(StoreError::Write(..)) => {}
                Err(e) => return Err(e),
            }
            store.remove(&record.id)
        })
        .await
        .map_err(|e| SandboxError::Task(id.clone(), e))?
        .map_err(|e| SandboxError::Store(id.clone(), e))?;
        let mut map = self.sandboxes.lock().expect("poisoned");
        if map.get(&id).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
            map.remove(&id);
        }
        drop(map);
        info!(sandbox_id = %id, "sandbox shut down");
        Ok(())
    }

    /// Serves the sandbox's Task endpoint on `<dir>/task.sock`, forwarding to `vm`'s agent.
    async fn start_task_server(
        &self,
        dir: &Path,
        vm: &Arc<dyn VmHandle>,
    ) -> Result<TaskServer, SandboxError> {
        let id = || {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let images = {
            let mut slot = self.images.lock().expect("poisoned");
            match &*slot {
                Some(images) => Arc::clone(images),
                None => {
                    let images = Arc::new(
                        ImageCache::new(&self.config.image_dir)
                            .map_err(|e| SandboxError::Endpoint(id(), Box::new(e)))?,
                    );
                    *slot = Some(Arc::clone(&images));
                    images
                }
            }
        };
        let mut opts = TaskOptions::new(images, dir.join("containers"));
        opts.containerd_address
            .clone_from(&self.config.containerd_address);
        let target: Arc<dyn crate::backend::TaskTarget> = Arc::clone(vm) as _;
        TaskServer::start(&dir.join("task.sock"), target, opts)
            .await
            .map_err(|e| SandboxError::Endpoint(id(), Box::new(e)))
    }

    /// Connects the pod netns's veths to taps for the VM (none without a netns). A netns that
    /// an earlier sandboxer process used is cleaned first.
    async fn attach_network(
        &self,
        record: &SandboxRecord,
    ) -> Result<Option<PodNetwork>, SandboxError> {
        if record.netns_path.is_empty() {
            return Ok(None);
        }
        let path = Path::new(&record.netns_path);
        let err = |e| SandboxError::Network(record.id.clone(), e);
        network::cleanup_leftovers(path, &record.id)
            .await
            .map_err(err)?;
        network::attach(path, &record.id)
            .await
            .map(Some)
            .map_err(err)
    }

    /// The platform every sandbox runs.
    pub fn platform(&self, id: &str) -> Result<(&'static str, &'static str), SandboxError> {
        self.get(id)?;
        Ok(("linux", "amd64"))
    }

    /// The VM's statistics. Fails with `FailedPrecondition` unless the sandbox is ready.
    pub async fn metrics(&self, id: &str) -> Result<MetricsInfo, SandboxError> {
        let (record, vm) = self.get(id)?.snapshot();
        let not_ready = || SandboxError::FailedPrecondition {
            id: id.to_string(),
            state: record.state,
            op: "read metrics of",
        };
        let vm = vm.ok_or_else(not_ready)?;
        let metrics = match vm.metrics().await {
            Ok(m) => m,
            Err(BackendError::NotRunning) => return Err(not_ready()),
            Err(e) => return Err(SandboxError::Backend(id.to_string(), e)),
        };
        // The pod's cgroup statistics when the agent has them (what engines expect), else the
        // VM's own figures.
        let data = match metrics.pod.clone() {
            Some(pod) => pod,
            None => StoredAny {
                type_url: VM_METRICS_TYPE_URL.to_string(),
                value: serde_json::to_vec(&metrics).unwrap_or_default(),
            },
        };
        Ok(MetricsInfo {
            id: id.to_string(),
            at: SystemTime::now(),
            data,
        })
    }

    /// Updates the sandbox's record from the engine's (containerd 2.x / iSulad `Update`).
    ///
    /// `fields` names what changed: `labels`, `labels.<key>`, `extensions`, `extensions.<key>`
    /// (e.g. iSulad's `extensions.tasks`, containerd's `extensions.updated-resources`), `spec`,
    /// `runtime`. No fields means all of them.
    pub async fn update(
        self: &Arc<Self>,
        id: &str,
        sandbox: SandboxInfo,
        fields: Vec<String>,
    ) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(
            id,
            async move { this.do_update(owned, sandbox, fields).await },
        )
        .await
    }

    async fn do_update(
        self: Arc<Self>,
        id: String,
        sandbox: SandboxInfo,
        fields: Vec<String>,
    ) -> Result<(), SandboxError> {
        let entry = self.get(&id)?;
        let _op = entry.op.lock().await;
        let mut record = entry.snapshot().0;
        if record.state == SandboxState::Deleted {
            return Err(SandboxError::NotFound(id));
        }
        let all = [
            "labels".to_string(),
            "extensions".to_string(),
            "spec".to_string(),
            "runtime".to_string(),
        ];
        let fields = if fields.is_empty() {
            all.to_vec()
        } else {
            fields
        };
        for field in &fields {
            apply_update_field(&mut record, &sandbox, field)?;
        }
        record.updated_at = SystemTime::now();
        self.save(record.clone()).await?;
        entry.with(|d| d.record = record);
        info!(sandbox_id = %id, ?fields, "sandbox updated");
        Ok(())
    }

    /// Seed API: adds a container (empty `exec_id`) or a process to a ready sandbox and returns
    /// the bundle directory.
    pub async fn prepare(
        self: &Arc<Self>,
        id: &str,
        req: PrepareRequest,
    ) -> Result<String, SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_prepare(owned, req).await })
            .await
    }

    async fn do_prepare(
        self: Arc<Self>,
        id: String,
        req: PrepareRequest,
    ) -> Result<String, SandboxError> {
        validate_id("container_id", &req.container_id)?;
        if !req.exec_id.is_empty() {
            validate_id("exec_id", &req.exec_id)?;
        }
        let entry = self.get(&id)?;
        let _op = entry.op.lock().await;
        let (mut record, vm) = entry.snapshot();
        let task = entry.with(|d| d.task.as_ref().map(TaskServer::handle));
        let task = match (record.state, vm, task) {
            (SandboxState::Ready, Some(_), Some(task)) => task,
            (state, _, _) => {
                return Err(SandboxError::FailedPrecondition {
                    id,
                    state,
                    op: "prepare a container in",
                });
            }
        };
        let process = ProcessRecord {
            spec: req.spec.clone(),
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };

        if !req.exec_id.is_empty() {
            let container = record
                .containers
                .get_mut(&req.container_id)
                .ok_or_else(|| SandboxError::ChildNotFound {
                    sandbox: id.clone(),
                    what: "container",
                    id: req.container_id.clone(),
                })?;
            if container.execs.contains_key(&req.exec_id) {
                return Err(SandboxError::AlreadyExists {
                    what: "Exec process",
                    id: req.exec_id,
                });
            }
            container.execs.insert(req.exec_id, process);
            let bundle = container.bundle.clone();
            self.save(record.clone()).await?;
            entry.with(|d| d.record = record);
            return Ok(bundle);
        }

        if record.containers.contains_key(&req.container_id) {
            return Err(SandboxError::AlreadyExists {
                what: "Container",
                id: req.container_id,
            });
        }
        let config_json = match &req.spec {
            Some(spec) if !spec.value.is_empty() => {
                serde_json::from_slice::<serde_json::Value>(&spec.value).map_err(|e| {
                    SandboxError::InvalidArgument {
                        field: "spec",
                        reason: format!("not an OCI spec in JSON: {e}"),
                    }
                })?;
                Some(spec.value.clone())
            }
            _ => None,
        };
        if config_json.is_none() && !req.rootfs.is_empty() {
            return Err(SandboxError::InvalidArgument {
                field: "spec",
                reason: "a container with a rootfs needs its OCI spec".into(),
            });
        }
        let bundle = self
            .store
            .sandbox_dir(&id)
            .join("containers")
            .join(&req.container_id);
        write_bundle(&bundle, config_json.as_deref())
            .map_err(|e| SandboxError::Store(id.clone(), e))?;
        if config_json.is_some() {
            // The rootfs attached and the guest bundle written, as the Task endpoint's Create
            // does; the engine's Task.Create of this container then only forwards.
            let mounts: Vec<_> = req.rootfs.iter().map(shim_mount).collect();
            if let Err(e) = task.prepare(&req.container_id, &bundle, &mounts).await {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(SandboxError::Endpoint(id, Box::new(e)));
            }
        }
        let bundle_str = bundle.display().to_string();
        record.containers.insert(
            req.container_id.clone(),
            ContainerRecord {
                bundle: bundle_str.clone(),
                rootfs: req.rootfs,
                process,
                ..ContainerRecord::default()
            },
        );
        if let Err(e) = self.save(record.clone()).await {
            // Unrecorded, the engine could never Purge it: free it now.
            task.purge(&req.container_id).await;
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(e);
        }
        entry.with(|d| d.record = record);
        info!(sandbox_id = %id, container_id = %req.container_id, "container prepared");
        Ok(bundle_str)
    }

    /// Seed API: removes a container (empty `exec_id`) or a process added by Prepare.
    pub async fn purge(
        self: &Arc<Self>,
        id: &str,
        container_id: &str,
        exec_id: &str,
    ) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let (owned, cid, eid) = (
            id.to_string(),
            container_id.to_string(),
            exec_id.to_string(),
        );
        self.detached(id, async move { this.do_purge(owned, cid, eid).await })
            .await
    }

    async fn do_purge(
        self: Arc<Self>,
        id: String,
        container_id: String,
        exec_id: String,
    ) -> Result<(), SandboxError> {
        validate_id("container_id", &container_id)?;
        if !exec_id.is_empty() {
            validate_id("exec_id", &exec_id)?;
        }
        let entry = self.get(&id)?;
        let _op = entry.op.lock().await;
        let (mut record, _) = entry.snapshot();
        let task = entry.with(|d| d.task.as_ref().map(TaskServer::handle));
        let missing = |what, child: &str| SandboxError::ChildNotFound {
            sandbox: id.clone(),
            what,
            id: child.to_string(),
        };
        let container = record
            .containers
            .get_mut(&container_id)
            .ok_or_else(|| missing("container", &container_id))?;
        if !exec_id.is_empty() {
            container
                .execs
                .remove(&exec_id)
                .ok_or_else(|| missing("exec process", &exec_id))?;
        } else {
            // Its slots, images and guest bundle (nothing, if Prepare had no spec).
            if let Some(task) = task {
                task.purge(&container_id).await;
            }
            let bundle = PathBuf::from(&container.bundle);
            record.containers.remove(&container_id);
            match std::fs::remove_dir_all(&bundle) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SandboxError::Store(id, StoreError::Remove(bundle, e))),
            }
        }
        self.save(record.clone()).await?;
        entry.with(|d| d.record = record);
        Ok(())
    }

    /// Seed API: applies new resources to a container and records them.
    pub async fn update_resources(
        self: &Arc<Self>,
        id: &str,
        container_id: &str,
        resources: Option<StoredAny>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let (owned, cid) = (id.to_string(), container_id.to_string());
        self.detached(id, async move {
            this.do_update_resources(owned, cid, resources, annotations)
                .await
        })
        .await
    }

    async fn do_update_resources(
        self: Arc<Self>,
        id: String,
        container_id: String,
        resources: Option<StoredAny>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), SandboxError> {
        validate_id("container_id", &container_id)?;
        let entry = self.get(&id)?;
        let _op = entry.op.lock().await;
        let (mut record, vm) = entry.snapshot();
        let state = record.state;
        let container = record.containers.get_mut(&container_id).ok_or_else(|| {
            SandboxError::ChildNotFound {
                sandbox: id.clone(),
                what: "container",
                id: container_id.clone(),
            }
        })?;
        if let Some(res) = &resources {
            let vm = vm.ok_or_else(|| SandboxError::FailedPrecondition {
                id: id.clone(),
                state,
                op: "update container resources in",
            })?;
            vm.update_resources(&container_id, res)
                .await
                .map_err(|e| SandboxError::Backend(id.clone(), e))?;
        }
        container.resources = resources;
        container.annotations = annotations;
        self.save(record.clone()).await?;
        entry.with(|d| d.record = record);
        Ok(())
    }

    /// Stops every running sandbox (each with `grace`), e.g. when the daemon exits.
    pub async fn stop_all(self: &Arc<Self>, grace: Duration) {
        let mut set = tokio::task::JoinSet::new();
        for id in self.ids() {
            let this = Arc::clone(self);
            set.spawn(async move {
                if let Err(e) = this.stop(&id, grace).await {
                    warn!(sandbox_id = %id, error = %error_chain(&e), "cannot stop sandbox");
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
}

/// A pod config and the pod's labels.
type ParsedPod = (PodConfig, BTreeMap<String, String>);

/// Decodes Create's `options` when it is a CRI `PodSandboxConfig`. Returns the pod config and
/// the pod's labels; other option types are kept in the record but not read.
fn parse_pod_config(options: &StoredAny) -> Result<Option<ParsedPod>, SandboxError> {
    let name = options.type_url.rsplit('/').next().unwrap_or_default();
    if name != POD_SANDBOX_CONFIG {
        return Ok(None);
    }
    let c = proto::cri::v1::PodSandboxConfig::decode(options.value.as_slice()).map_err(|e| {
        SandboxError::InvalidArgument {
            field: "options",
            reason: format!("not a valid {POD_SANDBOX_CONFIG}: {e}"),
        }
    })?;
    validate_hostname(&c.hostname)?;
    let meta = c.metadata.unwrap_or_default();
    let dns = c.dns_config.unwrap_or_default();
    let res = c.linux.and_then(|l| l.resources).unwrap_or_default();
    let pod = PodConfig {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        hostname: c.hostname,
        dns: DnsConfig {
            servers: dns.servers,
            searches: dns.searches,
            options: dns.options,
        },
        cpu_quota: res.cpu_quota,
        cpu_period: res.cpu_period,
        memory_limit_bytes: res.memory_limit_in_bytes,
    };
    Ok(Some((pod, c.labels.into_iter().collect())))
}

fn validate_hostname(h: &str) -> Result<(), SandboxError> {
    let bad = |reason: String| SandboxError::InvalidArgument {
        field: "options.hostname",
        reason,
    };
    if h.len() > HOST_NAME_MAX {
        return Err(bad(format!("longer than {HOST_NAME_MAX} bytes")));
    }
    if let Some(c) = h
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(bad(format!("contains {c:?}")));
    }
    Ok(())
}

/// The VM size for a pod: at least the default vCPUs, more if the pod's CPU limit needs them
/// (capped at `max_vcpus`); the base memory plus the pod's memory limit.
fn vm_size(d: &VmDefaults, pod: Option<&ParsedPod>) -> Result<VmSize, SandboxError> {
    let mut size = VmSize {
        vcpus: d.vcpus,
        mem_mib: d.mem_mib,
    };
    let Some((pod, _)) = pod else {
        return Ok(size);
    };
    // Negative values mean "unlimited" in CRI: treat them as unset.
    let quota = u64::try_from(pod.cpu_quota).unwrap_or(0);
    let period = u64::try_from(pod.cpu_period).unwrap_or(0);
    if quota > 0 && period > 0 {
        let want = u8::try_from(quota.div_ceil(period)).unwrap_or(u8::MAX);
        size.vcpus = size.vcpus.max(want.min(d.max_vcpus));
    }
    let limit = u64::try_from(pod.memory_limit_bytes).unwrap_or(0);
    if limit > 0 {
        let extra = u32::try_from(limit.div_ceil(1 << 20)).ok();
        size.mem_mib = extra
            .and_then(|m| size.mem_mib.checked_add(m))
            .ok_or_else(|| SandboxError::InvalidArgument {
                field: "options.linux.resources.memory_limit_in_bytes",
                reason: format!("{limit} is too large"),
            })?;
    }
    Ok(size)
}

/// Sets (or with `None` removes) one extension, parsing the ones the sandboxer understands.
fn set_extension(
    record: &mut SandboxRecord,
    key: &str,
    value: Option<StoredAny>,
) -> Result<(), SandboxError> {
    let parse = |v: &StoredAny, field: &'static str| {
        serde_json::from_slice::<serde_json::Value>(&v.value).map_err(|e| {
            SandboxError::InvalidArgument {
                field,
                reason: format!("not JSON: {e}"),
            }
        })
    };
    match key {
        "tasks" => {
            record.tasks = value
                .as_ref()
                .map(|v| parse(v, "sandbox.extensions[tasks]"))
                .transpose()?;
        }
        "updated-resources" => {
            record.updated_resources = value
                .as_ref()
                .map(|v| parse(v, "sandbox.extensions[updated-resources]"))
                .transpose()?;
        }
        _ => {}
    }
    match value {
        Some(v) => record.extensions.insert(key.to_string(), v),
        None => record.extensions.remove(key),
    };
    Ok(())
}

fn apply_update_field(
    record: &mut SandboxRecord,
    sandbox: &SandboxInfo,
    field: &str,
) -> Result<(), SandboxError> {
    match field {
        "labels" => record.labels.clone_from(&sandbox.labels),
        "spec" => record.spec.clone_from(&sandbox.spec),
        "runtime" => record.runtime.clone_from(&sandbox.runtime),
        "extensions" => {
            let old: Vec<String> = record.extensions.keys().cloned().collect();
            for key in old {
                set_extension(record, &key, None)?;
            }
            for (key, value) in &sandbox.extensions {
                set_extension(record, key, Some(value.clone()))?;
            }
        }
        f => {
            if let Some(key) = f.strip_prefix("labels.") {
                match sandbox.labels.get(key) {
                    Some(v) => record.labels.insert(key.to_string(), v.clone()),
                    None => record.labels.remove(key),
                };
            } else if let Some(key) = f.strip_prefix("extensions.") {
                set_extension(record, key, sandbox.extensions.get(key).cloned())?;
            } else {
                return Err(SandboxError::InvalidArgument {
                    field: "fields",
                    reason: format!("cannot update {f:?}"),
                });
            }
        }
    }
    Ok(())
}

fn write_bundle(bundle: &Path, config_json: Option<&[u8]>) -> Result<(), StoreError> {
    std::fs::create_dir_all(bundle).map_err(|e| StoreError::CreateDir(bundle.to_path_buf(), e))?;
    if let Some(json) = config_json {
        let path = bundle.join("config.json");
        std::fs::write(&path, json).map_err(|e| StoreError::Write(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proto::cri::v1 as cri;

    use super::*;
    use crate::backend::fake::{FakeGuest, FakeVmBackend};

    struct Fixture {
        svc: Arc<SandboxService<FakeVmBackend>>,
        fake: FakeVmBackend,
        tmp: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeVmBackend::new();
        let svc = service_on(tmp.path(), fake.clone());
        Fixture { svc, fake, tmp }
    }

    fn service_on(dir: &Path, fake: FakeVmBackend) -> Arc<SandboxService<FakeVmBackend>> {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"fake kernel").unwrap();
        let mut config = ServiceConfig::new(dir.join("state"));
        config.vm.kernel = kernel;
        config.default_stop_timeout = Duration::from_millis(200);
        SandboxService::new(fake, config)
    }

    fn create_req(id: &str) -> CreateRequest {
        CreateRequest {
            id: id.to_string(),
            sandboxer: "sandboxer".into(),
            ..CreateRequest::default()
        }
    }

    fn pod_options(c: &cri::PodSandboxConfig) -> StoredAny {
        StoredAny {
            type_url: "type.googleapis.com/runtime.v1.PodSandboxConfig".into(),
            value: c.encode_to_vec(),
        }
    }

    async fn started(f: &Fixture, id: &str) -> Started {
        f.svc.create(create_req(id)).await.unwrap();
        f.svc.start(id).await.unwrap()
    }

    #[tokio::test]
    async fn lifecycle() {
        let f = fixture();
        f.svc.create(create_req("pod")).await.unwrap();
        let st = f.svc.status("pod", false).unwrap();
        assert_eq!(st.state, SandboxState::Created);
        assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
        assert_eq!((st.pid, st.version, st.address.as_str()), (0, 0, ""));
        assert!(
            f.svc
                .store()
                .sandbox_dir("pod")
                .join("sandbox.json")
                .exists()
        );

        let s = f.svc.start("pod").await.unwrap();
        let sock = f.tmp.path().join("state/pod/task.sock");
        assert_eq!(s.address, format!("ttrpc+unix://{}", sock.display()));
        assert_eq!(s.version, 3);
        assert_eq!(s.pid, std::process::id());
        let st = f.svc.status("pod", false).unwrap();
        assert_eq!(st.state.api_state(), "SANDBOX_READY");
        assert_eq!((st.pid, st.version), (std::process::id(), 3));
        assert_eq!(st.exited_at, None);
        // Start's phases are in the info map, and the whole covers its parts.
        let us = |phase: &str| -> u64 {
            st.info
                .get(&format!("start_{phase}_us"))
                .unwrap_or_else(|| panic!("no start_{phase}_us in {:?}", st.info))
                .parse()
                .unwrap()
        };
        let parts: u64 = ["vm", "agent_ready", "agent_connect", "sync_clock", "setup"]
            .iter()
            .map(|p| us(p))
            .sum::<u64>()
            + us("task_server");
        assert!(us("total") >= parts, "{:?}", st.info);
        // What was persisted says Ready too.
        assert_eq!(
            f.svc.store().load("pod").unwrap().state,
            SandboxState::Ready
        );
        let spec = &f.fake.specs()[0];
        assert_eq!((spec.vcpus, spec.mem_mib), (1, 256));
        assert_eq!(
            spec.console_log.as_deref(),
            Some(f.tmp.path().join("state/pod/console.log").as_path())
        );

        f.svc.stop("pod", Duration::from_secs(1)).await.unwrap();
        let exit = f.svc.wait("pod").await.unwrap();
        assert_eq!(exit.status, 0);
        let st = f.svc.status("pod", false).unwrap();
        assert_eq!(st.state, SandboxState::Stopped);
        assert_eq!(st.exited_at, Some(exit.at));
        assert_eq!(f.fake.running(), 0);
        // Stop is idempotent.
        f.svc.stop("pod", Duration::ZERO).await.unwrap();

        f.svc.shutdown("pod").await.unwrap();
        assert!(!f.svc.store().sandbox_dir("pod").exists());
        assert!(matches!(
            f.svc.status("pod", false),
            Err(SandboxError::NotFound(_))
        ));
        assert!(f.svc.ids().is_empty());
    }

    #[tokio::test]
    async fn ids_are_validated_everywhere() {
        let f = fixture();
        let invalid = |r: Result<(), SandboxError>| {
            assert!(
                matches!(
                    r,
                    Err(SandboxError::InvalidArgument {
                        field: "sandbox_id",
                        ..
                    })
                ),
                "{r:?}"
            )
        };
        invalid(f.svc.create(create_req("")).await);
        invalid(f.svc.create(create_req("../etc")).await);
        invalid(f.svc.start("").await.map(drop));
        invalid(f.svc.stop("a/b", Duration::ZERO).await);
        invalid(f.svc.wait("").await.map(drop));
        invalid(f.svc.status("", false).map(drop));
        invalid(f.svc.shutdown("").await);
        invalid(f.svc.platform("").map(drop));
        invalid(f.svc.metrics("").await.map(drop));
        assert!(f.svc.ids().is_empty());
        // Nothing was created on disk for the invalid ids.
        assert!(!f.tmp.path().join("etc").exists());
    }

    #[tokio::test]
    async fn unknown_ids_are_not_found() {
        let f = fixture();
        let nf = |r: Result<(), SandboxError>| {
            assert!(
                matches!(r, Err(SandboxError::NotFound(ref id)) if id == "nope"),
                "{r:?}"
            )
        };
        nf(f.svc.start("nope").await.map(drop));
        nf(f.svc.stop("nope", Duration::ZERO).await);
        nf(f.svc.wait("nope").await.map(drop));
        nf(f.svc.status("nope", true).map(drop));
        nf(f.svc.shutdown("nope").await);
        nf(f.svc.platform("nope").map(drop));
        nf(f.svc.metrics("nope").await.map(drop));
        nf(f.svc.update("nope", SandboxInfo::default(), vec![]).await);
        nf(f.svc
            .prepare(
                "nope",
                PrepareRequest {
                    container_id: "c".into(),
                    ..PrepareRequest::default()
                },
            )
            .await
            .map(drop));
        nf(f.svc.purge("nope", "c", "").await);
        nf(f.svc
            .update_resources("nope", "c", None, BTreeMap::new())
            .await);
    }

    #[tokio::test]
    async fn duplicate_create_is_already_exists_and_keeps_the_first() {
        let f = fixture();
        started(&f, "pod").await;
        let err = f.svc.create(create_req("pod")).await.unwrap_err();
        assert!(matches!(err, SandboxError::AlreadyExists { .. }), "{err:?}");
        assert_eq!(
            f.svc.status("pod", false).unwrap().state,
            SandboxState::Ready
        );
        assert!(
            f.svc
                .store()
                .sandbox_dir("pod")
                .join("sandbox.json")
                .exists()
        );
    }

    #[tokio::test]
    async fn start_twice_and_start_after_stop_are_failed_precondition() {
        let f = fixture();
        started(&f, "pod").await;
        let err = f.svc.start("pod").await.unwrap_err();
        assert!(
            matches!(
                err,
                SandboxError::FailedPrecondition {
                    state: SandboxState::Ready,
                    op: "start",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(f.fake.starts(), 1);
        f.svc.stop("pod", Duration::ZERO).await.unwrap();
        assert!(matches!(
            f.svc.start("pod").await,
            Err(SandboxError::FailedPrecondition {
                state: SandboxState::Stopped,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn netns_path_is_checked() {
        let f = fixture();
        let mut r = create_req("a");
        r.netns_path = "relative/ns".into();
        assert!(matches!(
            f.svc.create(r).await,
            Err(SandboxError::InvalidArgument {
                field: "netns_path",
                ..
            })
        ));
        let mut r = create_req("a");
        r.netns_path = "/nonexistent/netns/x".into();
        assert!(matches!(
            f.svc.create(r).await,
            Err(SandboxError::InvalidArgument {
                field: "netns_path",
                ..
            })
        ));
        let mut r = create_req("a");
        r.netns_path = f.tmp.path().display().to_string();
        f.svc.create(r).await.unwrap();
        let st = f.svc.status("a", false).unwrap();
        assert_eq!(
            st.info.get("netns_path").map(String::as_str),
            Some(f.tmp.path().to_str().unwrap())
        );
    }

    #[tokio::test]
    async fn pod_config_sets_hostname_dns_labels_and_vm_size() {
        let f = fixture();
        let pod = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "u-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "web-0".into(),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            labels: [("app".to_string(), "web".to_string())].into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_quota: 250_000,
                    cpu_period: 100_000,
                    memory_limit_in_bytes: 512 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut r = create_req("web");
        r.options = Some(pod_options(&pod));
        r.sandbox = Some(SandboxInfo {
            labels: [("tier".to_string(), "front".to_string())].into(),
            ..SandboxInfo::default()
        });
        f.svc.create(r).await.unwrap();
        let rec = f.svc.record("web").unwrap();
        let p = rec.pod.as_ref().unwrap();
        assert_eq!((p.name.as_str(), p.namespace.as_str()), ("web", "default"));
        assert_eq!(p.hostname, "web-0");
        assert_eq!(p.dns.servers, ["10.0.0.10"]);
        assert_eq!(p.dns.searches, ["svc.cluster.local"]);
        assert_eq!(p.dns.options, ["ndots:5"]);
        assert_eq!(rec.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(rec.labels.get("tier").map(String::as_str), Some("front"));
        assert_eq!(
            rec.vm,
            VmSize {
                vcpus: 3,
                mem_mib: 256 + 512
            }
        );
        let s = f.svc.start("web").await.unwrap();
        assert_eq!(s.labels.len(), 2);
        let spec = &f.fake.specs()[0];
        assert_eq!((spec.vcpus, spec.mem_mib), (3, 768));
        // What the agent is told to set up, and where its vsock lives.
        assert_eq!(spec.setup.hostname, "web-0");
        assert_eq!(spec.setup.dns, p.dns);
        assert!(spec.setup.interfaces.is_empty() && spec.setup.routes.is_empty());
        assert_eq!(
            spec.vsock_uds.as_deref(),
            Some(f.tmp.path().join("state/web/vsock.sock").as_path())
        );
        assert_eq!(
            spec.agent_ready_timeout,
            Duration::from_millis(crate::config::DEFAULT_AGENT_READY_TIMEOUT_MS)
        );
        assert_eq!(
            f.svc
                .status("web", false)
                .unwrap()
                .info
                .get("hostname")
                .map(String::as_str),
            Some("web-0")
        );
    }

    #[test]
    fn vm_size_rules() {
        let d = VmDefaults::default();
        let pod = |quota, period, mem| {
            (
                PodConfig {
                    cpu_quota: quota,
                    cpu_period: period,
                    memory_limit_bytes: mem,
                    ..PodConfig::default()
                },
                BTreeMap::new(),
            )
        };
        let size = |p: &ParsedPod| vm_size(&d, Some(p)).unwrap();
        assert_eq!(
            vm_size(&d, None).unwrap(),
            VmSize {
                vcpus: 1,
                mem_mib: 256
            }
        );
        // Unlimited (-1) and unset (0) keep the defaults.
        assert_eq!(
            size(&pod(-1, 100_000, -1)),
            VmSize {
                vcpus: 1,
                mem_mib: 256
            }
        );
        assert_eq!(
            size(&pod(50_000, 0, 0)),
            VmSize {
                vcpus: 1,
                mem_mib: 256
            }
        );
        // Half a CPU rounds up to one; 1 byte rounds up to 1 MiB.
        assert_eq!(
            size(&pod(50_000, 100_000, 1)),
            VmSize {
                vcpus: 1,
                mem_mib: 257
            }
        );
        // Capped at max_vcpus, also for absurd quotas.
        assert_eq!(size(&pod(i64::MAX, 1, 0)).vcpus, d.max_vcpus);
        assert!(matches!(
            vm_size(&d, Some(&pod(0, 0, i64::MAX))),
            Err(SandboxError::InvalidArgument { .. })
        ));
    }

    #[tokio::test]
    async fn bad_options_are_rejected_and_other_types_kept() {
        let f = fixture();
        let mut r = create_req("a");
        r.options = Some(StoredAny {
            type_url: "runtime.v1.PodSandboxConfig".into(),
            value: vec![0xff, 0xff, 0xff],
        });
        assert!(matches!(
            f.svc.create(r).await,
            Err(SandboxError::InvalidArgument {
                field: "options",
                ..
            })
        ));
        let mut r = create_req("a");
        r.options = Some(pod_options(&cri::PodSandboxConfig {
            hostname: "bad/host".into(),
            ..Default::default()
        }));
        assert!(matches!(
            f.svc.create(r).await,
            Err(SandboxError::InvalidArgument {
                field: "options.hostname",
                ..
            })
        ));
        let mut r = create_req("a");
        let other = StoredAny {
            type_url: "example.com/Other".into(),
            value: vec![1, 2, 3],
        };
        r.options = Some(other.clone());
        f.svc.create(r).await.unwrap();
        let rec = f.svc.record("a").unwrap();
        assert_eq!(rec.options, Some(other));
        assert_eq!(rec.pod, None);
    }

    #[tokio::test]
    async fn start_failure_ends_the_sandbox() {
        let f = fixture();
        f.fake.fail_next_starts(1);
        f.svc.create(create_req("pod")).await.unwrap();
        let err = f.svc.start("pod").await.unwrap_err();
        assert!(matches!(
            err,
            SandboxError::Backend(_, BackendError::Start(_))
        ));
        let exit = f.svc.wait("pod").await.unwrap();
        assert_eq!(exit.status, EXIT_FAILED);
        assert!(exit.reason.contains("refused"), "{}", exit.reason);
        let st = f.svc.status("pod", false).unwrap();
        assert_eq!(st.state, SandboxState::Failed);
        assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
        f.svc.shutdown("pod").await.unwrap();
    }

    #[tokio::test]
    async fn missing_kernel_is_a_config_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = ServiceConfig::new(tmp.path());
        config.vm.kernel = tmp.path().join("no-such-vmlinux");
        let svc = SandboxService::new(FakeVmBackend::new(), config);
        svc.create(create_req("pod")).await.unwrap();
        let err = svc.start("pod").await.unwrap_err();
        assert!(matches!(
            err,
            SandboxError::Backend(_, BackendError::Config(_))
        ));
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn stop_asks_the_guest_first() {
        let f = fixture();
        f.fake
            .set_guest(FakeGuest::ShutsDownAfter(Duration::from_millis(20)));
        started(&f, "pod").await;
        let t = Instant::now();
        f.svc.stop("pod", Duration::from_secs(30)).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(10));
        let h = f.fake.handle("pod").unwrap();
        assert_eq!(h.shutdown_requests(), 1);
        assert_eq!(h.ended().unwrap().kind, VmExitKind::GuestShutdown);
        assert_eq!(f.svc.wait("pod").await.unwrap().status, 0);
    }

    #[tokio::test]
    async fn stop_forces_a_guest_that_ignores_it_after_the_timeout() {
        let f = fixture();
        f.fake.set_guest(FakeGuest::Ignores);
        started(&f, "pod").await;
        let t = Instant::now();
        f.svc.stop("pod", Duration::from_millis(150)).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(150));
        let h = f.fake.handle("pod").unwrap();
        assert_eq!(h.ended().unwrap().kind, VmExitKind::HostStopped);
        let exit = f.svc.wait("pod").await.unwrap();
        assert_eq!(exit.status, EXIT_FORCED);
        // Timeout 0 uses the configured default grace period (200 ms here).
        started(&f, "pod2").await;
        let t = Instant::now();
        f.svc.stop("pod2", Duration::ZERO).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn status_answers_during_a_long_stop() {
        let f = fixture();
        f.fake.set_guest(FakeGuest::Ignores);
        started(&f, "pod").await;
        let svc = Arc::clone(&f.svc);
        let stop = tokio::spawn(async move { svc.stop("pod", Duration::from_secs(2)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let st = f.svc.status("pod", false).unwrap();
        assert!(t.elapsed() < Duration::from_millis(500));
        assert_eq!(st.state, SandboxState::Stopping);
        assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
        stop.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn vm_ending_by_itself_is_seen_by_wait_and_status() {
        let f = fixture();
        started(&f, "clean").await;
        started(&f, "crash").await;
        let waiters: Vec<_> = (0..10)
            .map(|i| {
                let svc = Arc::clone(&f.svc);
                let id = if i % 2 == 0 { "clean" } else { "crash" };
                tokio::spawn(async move { svc.wait(id).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        f.fake
            .handle("clean")
            .unwrap()
            .end_with(VmExitKind::GuestShutdown);
        f.fake
            .handle("crash")
            .unwrap()
            .end_with(VmExitKind::Crashed("triple fault".into()));
        for (i, w) in waiters.into_iter().enumerate() {
            let exit = w.await.unwrap().unwrap();
            if i % 2 == 0 {
                assert_eq!(exit.status, 0);
            } else {
                assert_eq!(
                    (exit.status, exit.reason.as_str()),
                    (EXIT_FAILED, "triple fault")
                );
            }
        }
        // The monitor records the end under the lifecycle lock: a Stop afterwards sees it.
        f.svc.stop("crash", Duration::ZERO).await.unwrap();
        assert_eq!(
            f.svc.status("clean", false).unwrap().state,
            SandboxState::Stopped
        );
        assert_eq!(
            f.svc.status("crash", false).unwrap().state,
            SandboxState::Failed
        );
        assert_eq!(
            f.svc.store().load("crash").unwrap().exit.unwrap().reason,
            "triple fault"
        );
        assert!(matches!(
            f.svc.metrics("crash").await,
            Err(SandboxError::FailedPrecondition { .. })
        ));
    }

    #[tokio::test]
    async fn metrics_and_platform() {
        let f = fixture();
        f.svc.create(create_req("pod")).await.unwrap();
        assert_eq!(f.svc.platform("pod").unwrap(), ("linux", "amd64"));
        assert!(matches!(
            f.svc.metrics("pod").await,
            Err(SandboxError::FailedPrecondition {
                state: SandboxState::Created,
                ..
            })
        ));
        f.svc.start("pod").await.unwrap();
        let m = f.svc.metrics("pod").await.unwrap();
        assert_eq!(m.data.type_url, VM_METRICS_TYPE_URL);
        let v: serde_json::Value = serde_json::from_slice(&m.data.value).unwrap();
        assert_eq!(v["vcpus"], 1);
        assert_eq!(v["mem_mib"], 256);
    }

    #[tokio::test]
    async fn verbose_status_carries_the_record() {
        let f = fixture();
        started(&f, "pod").await;
        assert!(f.svc.status("pod", false).unwrap().extra.is_none());
        let st = f.svc.status("pod", true).unwrap();
        let extra = st.extra.unwrap();
        assert_eq!(extra.type_url, RECORD_TYPE_URL);
        let rec: SandboxRecord = serde_json::from_slice(&extra.value).unwrap();
        assert_eq!(rec.id, "pod");
        assert!(st.info.contains_key("record"));
    }

    #[tokio::test]
    async fn update_fields() {
        let f = fixture();
        f.svc.create(create_req("pod")).await.unwrap();
        let tasks = StoredAny {
            type_url: "github.com/containerd/containerd/Tasks".into(),
            value: br#"{"containers":[{"id":"c1"}]}"#.to_vec(),
        };
        let res = StoredAny {
            type_url: "io.containerd.cri.v1.UpdatedResources".into(),
            value: br#"{"Resources":{"memory_limit_in_bytes":1024}}"#.to_vec(),
        };
        let info = SandboxInfo {
            labels: [("a".to_string(), "1".to_string())].into(),
            extensions: [
                ("tasks".to_string(), tasks.clone()),
                ("updated-resources".to_string(), res),
            ]
            .into(),
            ..SandboxInfo::default()
        };
        f.svc
            .update("pod", info.clone(), vec!["extensions.tasks".into()])
            .await
            .unwrap();
        let rec = f.svc.record("pod").unwrap();
        assert_eq!(rec.extensions.get("tasks"), Some(&tasks));
        assert_eq!(rec.tasks.as_ref().unwrap()["containers"][0]["id"], "c1");
        // Only the named field changed.
        assert!(rec.labels.is_empty() && rec.updated_resources.is_none());
        assert_eq!(f.svc.store().load("pod").unwrap(), rec);

        f.svc
            .update(
                "pod",
                info.clone(),
                vec!["extensions.updated-resources".into(), "labels.a".into()],
            )
            .await
            .unwrap();
        let rec = f.svc.record("pod").unwrap();
        assert_eq!(
            rec.updated_resources.as_ref().unwrap()["Resources"]["memory_limit_in_bytes"],
            1024
        );
        assert_eq!(rec.labels.get("a").map(String::as_str), Some("1"));

        // Removing: the field is named but absent from the sandbox.
        f.svc
            .update(
                "pod",
                SandboxInfo::default(),
                vec!["extensions.tasks".into()],
            )
            .await
            .unwrap();
        let rec = f.svc.record("pod").unwrap();
        assert!(rec.tasks.is_none() && !rec.extensions.contains_key("tasks"));

        let bad = SandboxInfo {
            extensions: [(
                "tasks".to_string(),
                StoredAny {
                    type_url: "x".into(),
                    value: b"not json".to_vec(),
                },
            )]
            .into(),
            ..SandboxInfo::default()
        };
        assert!(matches!(
            f.svc
                .update("pod", bad, vec!["extensions.tasks".into()])
                .await,
            Err(SandboxError::InvalidArgument { .. })
        ));
        assert!(matches!(
            f.svc.update("pod", info, vec!["status".into()]).await,
            Err(SandboxError::InvalidArgument {
                field: "fields",
                ..
            })
        ));
        // A failed update changes nothing.
        assert_eq!(f.svc.record("pod").unwrap(), rec);
    }

    #[tokio::test]
    async fn prepare_purge_and_update_resources() {
        let f = fixture();
        f.svc.create(create_req("pod")).await.unwrap();
        let req = PrepareRequest {
            container_id: "c1".into(),
            spec: Some(StoredAny {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
                value: br#"{"ociVersion":"1.1.0"}"#.to_vec(),
            }),
            rootfs: vec![MountSpec {
                kind: "ext4".into(),
                source: "/dev/vdb".into(),
                ..MountSpec::default()
            }],
            stdout: "/tmp/out".into(),
            ..PrepareRequest::default()
        };
        // Not ready yet.
        assert!(matches!(
            f.svc.prepare("pod", req.clone()).await,
            Err(SandboxError::FailedPrecondition { .. })
        ));
        f.svc.start("pod").await.unwrap();
        // The Task endpoint attaches the rootfs; this fake VM has no block slots (the KVM
        // tests attach for real), so it fails, and leaves nothing behind.
        let err = f.svc.prepare("pod", req.clone()).await.unwrap_err();
        assert!(matches!(err, SandboxError::Endpoint(..)), "{err:?}");
        let bundle_dir = f.tmp.path().join("state/pod/containers/c1");
        assert!(!bundle_dir.exists());
        assert!(f.svc.record("pod").unwrap().containers.is_empty());
        // A rootfs needs the spec that says how to run on it.
        let no_spec = PrepareRequest {
            spec: None,
            ..req.clone()
        };
        assert!(matches!(
            f.svc.prepare("pod", no_spec).await,
            Err(SandboxError::InvalidArgument { field: "spec", .. })
        ));
        // Without a spec, Prepare records the container (its stdio) and its bundle dir.
        let plain = PrepareRequest {
            container_id: "c1".into(),
            stdout: "/tmp/out".into(),
            ..PrepareRequest::default()
        };
        let bundle = f.svc.prepare("pod", plain.clone()).await.unwrap();
        assert_eq!(bundle, bundle_dir.display().to_string());
        assert!(bundle_dir.is_dir());
        assert_eq!(
            f.svc.record("pod").unwrap().containers["c1"].process.stdout,
            "/tmp/out"
        );
        let h = f.fake.handle("pod").unwrap();
        assert!(matches!(
            f.svc.prepare("pod", plain).await,
            Err(SandboxError::AlreadyExists { .. })
        ));
        // An exec process joins an existing container and shares its bundle.
        let exec = PrepareRequest {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            ..PrepareRequest::default()
        };
        assert_eq!(f.svc.prepare("pod", exec.clone()).await.unwrap(), bundle);
        let orphan = PrepareRequest {
            container_id: "c9".into(),
            exec_id: "e1".into(),
            ..PrepareRequest::default()
        };
        assert!(matches!(
            f.svc.prepare("pod", orphan).await,
            Err(SandboxError::ChildNotFound {
                what: "container",
                ..
            })
        ));
        let bad_spec = PrepareRequest {
            container_id: "c2".into(),
            spec: Some(StoredAny {
                type_url: "x".into(),
                value: b"\x01\x02".to_vec(),
            }),
            ..PrepareRequest::default()
        };
        assert!(matches!(
            f.svc.prepare("pod", bad_spec).await,
            Err(SandboxError::InvalidArgument { field: "spec", .. })
        ));
        assert!(matches!(
            f.svc
                .prepare(
                    "pod",
                    PrepareRequest {
                        container_id: "-bad".into(),
                        ..PrepareRequest::default()
                    }
                )
                .await,
            Err(SandboxError::InvalidArgument {
                field: "container_id",
                ..
            })
        ));

        let res = StoredAny {
            type_url: "x".into(),
            value: vec![1],
        };
        f.svc
            .update_resources("pod", "c1", Some(res.clone()), BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(h.resources().get("c1"), Some(&res));
        assert_eq!(
            f.svc.record("pod").unwrap().containers["c1"].resources,
            Some(res)
        );
        assert!(matches!(
            f.svc
                .update_resources("pod", "c9", None, BTreeMap::new())
                .await,
            Err(SandboxError::ChildNotFound { .. })
        ));

        f.svc.purge("pod", "c1", "e1").await.unwrap();
        assert!(matches!(
            f.svc.purge("pod", "c1", "e1").await,
            Err(SandboxError::ChildNotFound {
                what: "exec process",
                ..
            })
        ));
        f.svc.purge("pod", "c1", "").await.unwrap();
        assert!(!Path::new(&bundle).exists());
        assert!(f.svc.record("pod").unwrap().containers.is_empty());
        assert!(matches!(
            f.svc.purge("pod", "c1", "").await,
            Err(SandboxError::ChildNotFound { .. })
        ));
    }

    #[tokio::test]
    async fn restart_recovery() {
        let tmp = tempfile::tempdir().unwrap();
        let old = service_on(tmp.path(), FakeVmBackend::new());
        old.create(create_req("created")).await.unwrap();
        old.create(create_req("running")).await.unwrap();
        old.start("running").await.unwrap();
        old.create(create_req("stopped")).await.unwrap();
        old.start("stopped").await.unwrap();
        old.stop("stopped", Duration::ZERO).await.unwrap();
        let stopped_exit = old.wait("stopped").await.unwrap();
        old.create(create_req("deleting")).await.unwrap();
        // A Shutdown interrupted after persisting Deleted.
        let mut rec = old.record("deleting").unwrap();
        rec.state = SandboxState::Deleted;
        old.store().save(&rec).unwrap();
        // An unreadable record stays on disk.
        let state = tmp.path().join("state");
        std::fs::create_dir(state.join("broken")).unwrap();
        std::fs::write(state.join("broken/sandbox.json"), b"{").unwrap();
        drop(old);

        // The old process is gone (its VMs with it); a new one loads the records.
        let fake = FakeVmBackend::new();
        let new = service_on(tmp.path(), fake.clone());
        let before = SystemTime::now();
        let report = new.recover().unwrap();
        assert_eq!(report.restored, 3);
        assert_eq!(report.lost, ["running"]);
        assert_eq!(report.removed, ["deleting"]);
        assert_eq!(report.unreadable.len(), 1);
        assert!(!state.join("deleting").exists());
        assert!(state.join("broken/sandbox.json").exists());
        assert_eq!(new.ids(), ["created", "running", "stopped"]);

        let st = new.status("running", false).unwrap();
        assert_eq!(st.state, SandboxState::Failed);
        assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
        assert!(st.exited_at.unwrap() >= before);
        let exit = new.wait("running").await.unwrap();
        assert_eq!(exit.status, EXIT_FAILED);
        assert!(
            exit.reason.contains("previous sandboxer"),
            "{}",
            exit.reason
        );
        // Persisted as such: a second restart reports the same.
        assert_eq!(new.store().load("running").unwrap().exit, Some(exit));
        assert_eq!(new.wait("stopped").await.unwrap(), stopped_exit);
        assert_eq!(
            new.status("created", false).unwrap().state,
            SandboxState::Created
        );

        new.shutdown("running").await.unwrap();
        assert!(!state.join("running").exists());
        new.start("created").await.unwrap();
        assert_eq!(fake.starts(), 1);
        // Recovering again does not duplicate anything.
        assert_eq!(new.recover().unwrap().restored, 0);
    }

    #[tokio::test]
    async fn sandboxes_start_concurrently() {
        let f = fixture();
        const N: usize = 20;
        // Every start waits until all N are in flight: serialized starts would never finish.
        f.fake.set_start_gate(N);
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let svc = Arc::clone(&f.svc);
                tokio::spawn(async move {
                    let id = format!("pod-{i}");
                    svc.create(create_req(&id)).await?;
                    svc.start(&id).await
                })
            })
            .collect();
        let all = async {
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("starts were serialized");
        assert_eq!(f.fake.running(), N);
        assert_eq!(f.svc.ids().len(), N);
    }

    #[tokio::test]
    async fn start_and_stop_racing_on_one_sandbox_never_leak_a_vm() {
        let f = fixture();
        f.fake.set_start_delay(Duration::from_millis(5));
        for i in 0..20u64 {
            let id = format!("race-{i}");
            f.svc.create(create_req(&id)).await.unwrap();
            let (a, b) = (Arc::clone(&f.svc), Arc::clone(&f.svc));
            let (ia, ib) = (id.clone(), id.clone());
            let start = tokio::spawn(async move { a.start(&ia).await });
            tokio::time::sleep(Duration::from_millis(i % 8)).await;
            let stop = tokio::spawn(async move { b.stop(&ib, Duration::ZERO).await });
            let (start, stop) = (start.await.unwrap(), stop.await.unwrap());
            stop.unwrap();
            match start {
                // Start won: Stop stopped the VM it made.
                Ok(_) => assert_eq!(
                    f.fake.handle(&id).unwrap().ended().unwrap().kind,
                    VmExitKind::HostStopped
                ),
                // Stop won: the sandbox ended before it started.
                Err(SandboxError::FailedPrecondition { state, .. }) => {
                    assert_eq!(state, SandboxState::Stopped);
                    assert!(f.fake.handle(&id).is_none());
                }
                Err(e) => panic!("{e:?}"),
            }
            assert_eq!(
                f.svc.status(&id, false).unwrap().state,
                SandboxState::Stopped
            );
            assert_eq!(f.svc.wait(&id).await.unwrap().status, 0);
            assert_eq!(f.fake.running(), 0);
        }
    }

    #[tokio::test]
    async fn shutdown_racing_start_frees_everything() {
        let f = fixture();
        f.fake.set_start_delay(Duration::from_millis(20));
        f.svc.create(create_req("pod")).await.unwrap();
        let (a, b) = (Arc::clone(&f.svc), Arc::clone(&f.svc));
        let waiter = {
            let svc = Arc::clone(&f.svc);
            tokio::spawn(async move { svc.wait("pod").await })
        };
        let start = tokio::spawn(async move { a.start("pod").await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let shut = tokio::spawn(async move { b.shutdown("pod").await });
        let _ = start.await.unwrap();
        shut.await.unwrap().unwrap();
        assert_eq!(f.fake.running(), 0);
        assert!(f.svc.ids().is_empty());
        assert!(!f.svc.store().sandbox_dir("pod").exists());
        // The waiter got the exit before the sandbox was forgotten.
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_dropped_start_call_still_completes() {
        let f = fixture();
        f.fake.set_start_delay(Duration::from_millis(50));
        f.svc.create(create_req("pod")).await.unwrap();
        // The caller gives up half-way (as a gRPC client disconnecting would).
        let _ = tokio::time::timeout(Duration::from_millis(10), f.svc.start("pod")).await;
        // The start finishes anyway, and the sandbox is in a consistent, known state.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            f.svc.status("pod", false).unwrap().state,
            SandboxState::Ready
        );
        f.svc.shutdown("pod").await.unwrap();
        assert_eq!(f.fake.running(), 0);
    }

    #[tokio::test]
    async fn stop_all_stops_every_running_sandbox() {
        let f = fixture();
        for i in 0..5 {
            started(&f, &format!("p{i}")).await;
        }
        f.svc.create(create_req("never")).await.unwrap();
        f.svc.stop_all(Duration::from_millis(100)).await;
        assert_eq!(f.fake.running(), 0);
        for id in f.svc.ids() {
            assert_eq!(
                f.svc.status(&id, false).unwrap().state,
                SandboxState::Stopped
            );
        }
    }
}
