// SPDX-License-Identifier: Apache-2.0
//! The sandbox service: the domain logic both Sandbox APIs share.
//!
//! - this module: the service, its settings and the request/answer types, and the read-only
//!   operations (Status, Wait, Platform, Metrics);
//! - [`lifecycle`]: Create, Start, Stop, Shutdown and the VM's own end;
//! - [`containers`]: the seed API's container operations (Prepare, Purge, UpdateResources);
//! - [`update`]: Update of the engine's record (labels, spec, runtime, extensions);
//! - `registry`: the sandboxes in memory and the one way an operation changes one.
//!
//! Concurrency: the registry (id -> sandbox) is locked only to look up, insert or remove. Each
//! sandbox has its own async lock that serializes its lifecycle operations (Create, Start, Stop,
//! Shutdown, Update, Prepare, ...), so a Start racing a Stop on one sandbox is safe and sandboxes
//! never wait for each other. Status and Wait take no lifecycle lock: Status reads a snapshot and
//! Wait watches the sandbox's exit, so both answer while a Stop is in its grace period.
//!
//! Every mutating operation runs in its own task: a client that gives up (drops the gRPC call)
//! cannot interrupt a Start half-way and leave a VM nobody knows about.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use devices::sync::Recover;

use crate::backend::{BackendError, VmBackend};
use crate::cgroup::CpuCgroups;
use crate::config::{Config, LimitsConfig, VmDefaults};
use crate::error::SandboxError;
use crate::nofile::FdBudget;
use crate::sandbox::{ExitInfo, MountSpec, SandboxRecord, SandboxState, StoredAny};
use crate::store::{Store, StoreError};
use crate::task::ImageCache;

pub mod admin;
pub mod containers;
pub mod handover;
pub mod lifecycle;
mod registry;
#[cfg(test)]
mod tests;
pub mod update;

use registry::{Entry, Locked};

/// Task API version the sandboxer serves at a sandbox's address.
pub const TASK_API_VERSION: u32 = 3;
pub use crate::sandbox::{EXIT_FAILED, EXIT_FORCED};
/// Type URL of the JSON [`crate::backend::VmMetrics`] in a Metrics reply.
pub const VM_METRICS_TYPE_URL: &str = "sandboxer.dev/sandboxer.v1.VmMetrics";
/// Type URL of the JSON sandbox record in a verbose Status reply's `extra`.
pub const RECORD_TYPE_URL: &str = "sandboxer.dev/sandboxer.v1.SandboxRecord";

/// Checks an id a request carries in `field` against the protocol's rule ([`proto::id`]).
pub fn validate_id(field: &'static str, id: &str) -> Result<(), SandboxError> {
    proto::id::validate(id).map_err(|e| SandboxError::InvalidArgument {
        field,
        reason: e.to_string(),
    })
}

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
    /// Whether sandboxes may start from VM templates.
    pub templates: bool,
    /// Where the Task API's host paths must lie, besides the state and image dirs
    /// (`[task] host_paths`).
    pub task_host_paths: Vec<PathBuf>,
    /// The node's budget.
    pub limits: LimitsConfig,
    /// The sandboxes' CPU cgroups; `None` runs every VM in the daemon's cgroup. Not read from
    /// [`Config`]: finding and preparing them touches the host ([`CpuCgroups::from_config`]).
    pub cgroups: Option<CpuCgroups>,
    /// The sandboxes' memory cgroups (`[cgroup] charge_memory`); `None`: guest memory is the
    /// daemon's. Found at start like `cgroups`.
    pub memory_cgroups: Option<crate::memcg::MemoryCgroups>,
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
            templates: c.template.enabled,
            task_host_paths: c.task.host_paths,
            limits: c.limits,
            cgroups: None,
            memory_cgroups: None,
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
            templates: c.template.enabled,
            task_host_paths: c.task.host_paths.clone(),
            limits: c.limits.clone(),
            cgroups: None,
            memory_cgroups: None,
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
    /// Task API address, `ttrpc+unix://<state>/sbs/<id>/task.sock`.
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
    /// Sandboxes whose directories were moved from an older sandboxer's layout.
    pub migrated: Vec<String>,
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
    /// The descriptors the daemon may give sandboxes, measured at the first Create (the
    /// daemon's own are open by then: sockets, runtime, KVM, pools).
    fd_budget: OnceLock<FdBudget>,
    /// Held shared by every mutating operation and exclusively by a live upgrade
    /// ([`handover`]): operations that come during an upgrade are refused (UNAVAILABLE).
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Where upgrade requests go (the daemon's main loop), once it takes them.
    upgrades: OnceLock<tokio::sync::mpsc::Sender<handover::UpgradeRequest>>,
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
            fd_budget: OnceLock::new(),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            upgrades: OnceLock::new(),
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
        let mut ids: Vec<_> = self.sandboxes.lock().recover().keys().cloned().collect();
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
            migrated: loaded.migrated,
            ..Recovery::default()
        };
        let now = SystemTime::now();
        for mut record in loaded.records {
            let id = record.id.clone();
            if self.sandboxes.lock().recover().contains_key(&id) {
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
                    self.remove_cgroup_now(&record);
                    report.lost.push(id.clone());
                }
                SandboxState::Created | SandboxState::Stopped | SandboxState::Failed => {}
            }
            self.sandboxes
                .lock()
                .recover()
                .insert(id, Entry::new(record));
            report.restored += 1;
        }
        Ok(report)
    }

    /// Removes the CPU cgroup of a sandbox whose VM is gone, without waiting: a cgroup still
    /// in use is logged and left.
    fn remove_cgroup_now(&self, record: &SandboxRecord) {
        if let (Some(memcgs), Some(group)) = (&self.config.memory_cgroups, &record.memory_cgroup)
            && let Err(e) = memcgs.remove(group)
        {
            tracing::warn!(
                sandbox_id = %record.id,
                error = %crate::error_chain(&e),
                "cannot remove the sandbox's memory cgroup"
            );
        }
        if let (Some(cgroups), Some(group)) = (&self.config.cgroups, &record.cgroup)
            && let Err(e) = cgroups.remove(group, Duration::ZERO)
        {
            tracing::warn!(
                sandbox_id = %record.id,
                error = %crate::error_chain(&e),
                "cannot remove the sandbox's CPU cgroup"
            );
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Entry>, SandboxError> {
        validate_id("sandbox_id", id)?;
        self.sandboxes
            .lock()
            .recover()
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    /// Gets the backend ready for default-sized sandboxes (it builds their VM template in the
    /// background when templates are on). Returns at once.
    pub async fn warm_up(&self) {
        if !self.config.templates {
            return;
        }
        let record = SandboxRecord::new("warm-up".into(), SystemTime::now());
        let mut record = record;
        record.vm = crate::sandbox::VmSize {
            vcpus: self.config.vm.vcpus,
            mem_mib: self.config.vm.mem_mib,
        };
        let dir = self.store.sandbox_dir("warm-up");
        let spec = self.vm_spec(&record, &dir, None);
        self.backend.prepare(&spec).await;
    }

    /// Takes the sandbox's lifecycle lock for one operation (see [`Locked`]).
    async fn lock(&self, id: &str) -> Result<Locked, SandboxError> {
        Ok(Locked::new(self.get(id)?).await)
    }

    /// Persists `record` as the sandbox's new record, then makes it the one in memory: the
    /// end of every operation that changes a record (nothing changes if the save fails).
    async fn commit(&self, op: &Locked, record: SandboxRecord) -> Result<(), SandboxError> {
        self.save(record.clone()).await?;
        op.entry().with(|d| d.record = record);
        Ok(())
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
        let gate = Arc::clone(&self.gate)
            .try_read_owned()
            .map_err(|_| SandboxError::Upgrading)?;
        tokio::spawn(async move {
            let result = f.await;
            drop(gate);
            result
        })
        .await
        .map_err(|e| SandboxError::Task(id.to_string(), e))?
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
        let mut metrics = match vm.metrics().await {
            Ok(m) => m,
            Err(BackendError::NotRunning) => return Err(not_ready()),
            Err(e) => return Err(SandboxError::Backend(id.to_string(), e)),
        };
        if let (Some(cgroups), Some(group)) = (&self.config.cgroups, &record.cgroup) {
            metrics.host_cpu_usage_us = cgroups
                .usage(group)
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        }
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
}
