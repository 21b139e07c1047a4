// SPDX-License-Identifier: Apache-2.0
//! VM templates: per VM shape, one VM booted to "agent ready, not set up", saved and stopped;
//! Start of a sandbox of that shape clones it ([`vmm::Vm::clone_from`]) instead of booting.
//!
//! A shape is everything that makes two VMs' boots identical: kernel, initramfs (and the files'
//! identity: a changed file is a new shape), command line, vCPUs, memory, block slots, number
//! of NICs and the seccomp policy. Templates are built in the background (a Start that misses
//! starts one and boots; a Start whose template is being built waits for it, see
//! [`Templates::lookup_or_wait`]) and kept up to
//! `max_templates`, the least recently used dropped first. A template's NICs have a backend
//! connected to nothing and MACs [`template_mac`]; a clone gets the pod's TAPs and the agent
//! gives each NIC the pod's MAC.
//!
//! The shapes built are recorded in `<state_dir>/templates.json`, so a daemon that starts again
//! builds them again (a template lives in memory only: it is never trusted across a restart).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::agent::{self, READY_PORT};
use super::layout::vm_config;
use super::{BackendError, VmSpec};
use crate::error_chain;

/// How long a failed build keeps its shape from being tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long the template's guest may keep its ready connection before it counts as stuck.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// The MAC of a template's NIC `index` (locally administered; a clone's agent replaces it).
pub fn template_mac(index: usize) -> [u8; 6] {
    [
        0x02,
        0x5b,
        0x00,
        0x00,
        0x00,
        u8::try_from(index).unwrap_or(u8::MAX),
    ]
}

/// A file's identity: a rebuilt kernel or initramfs is a new shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileStamp {
    path: PathBuf,
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Self {
        let meta = std::fs::metadata(path).ok();
        FileStamp {
            path: path.to_path_buf(),
            len: meta.as_ref().map_or(0, MetadataExt::size),
            mtime_ns: meta.as_ref().map_or(0, |m| {
                i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
            }),
            ino: meta.as_ref().map_or(0, MetadataExt::ino),
        }
    }
}

/// What makes two VMs' boots the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    kernel: FileStamp,
    initramfs: Option<FileStamp>,
    cmdline: String,
    vcpus: u8,
    mem_mib: u32,
    blk_slots: u32,
    nics: usize,
    seccomp: String,
}

impl Shape {
    /// A spec of this shape for a template build (the files as they are now: a recorded shape
    /// whose files changed builds a template of the new shape).
    pub fn spec(&self, agent_ready_timeout: Duration) -> VmSpec {
        VmSpec {
            sandbox_id: "template".into(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            kernel: self.kernel.path.clone(),
            initramfs: self.initramfs.as_ref().map(|f| f.path.clone()),
            cmdline: self.cmdline.clone(),
            blk_slots: self.blk_slots,
            seccomp: self.policy(),
            console_log: None,
            console_log_max_bytes: None,
            vsock_uds: None,
            setup: Default::default(),
            agent_ready_timeout,
            nics: super::NetDevices::new(Vec::new()),
            template: true,
            cgroup: None,
            memory: None,
        }
    }

    /// The seccomp policy of its VMs' threads.
    pub fn policy(&self) -> vmm::SeccompPolicy {
        self.seccomp.parse().unwrap_or_default()
    }

    /// Number of NICs.
    pub fn nics(&self) -> usize {
        self.nics
    }

    /// The shape of `spec` (its files as they are now).
    pub fn of(spec: &VmSpec) -> Self {
        Shape {
            kernel: FileStamp::of(&spec.kernel),
            initramfs: spec.initramfs.as_deref().map(FileStamp::of),
            cmdline: spec.cmdline.clone(),
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
            blk_slots: spec.blk_slots,
            nics: spec.nics.len(),
            seccomp: spec.seccomp.name().to_string(),
        }
    }
}

/// A saved, stopped VM that sandboxes of its shape are cloned from.
#[derive(Debug)]
pub struct Template {
    /// The VM's saved state and memory.
    pub snapshot: vmm::VmSnapshot,
    /// The agent's ttrpc port (from its ready line).
    pub agent_port: u32,
    /// Its NICs' MACs, in device order.
    pub nic_macs: Vec<[u8; 6]>,
    /// How long building it took.
    pub build_time: Duration,
}

/// What a lookup found.
enum Lookup {
    Ready(Arc<Template>),
    Building,
    Absent,
}

#[derive(Debug)]
enum Slot {
    Building,
    Ready { template: Arc<Template>, used: u64 },
    Failed { at: Instant },
}

/// Counters of the templates, for Status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TemplateStats {
    /// Starts that cloned a template.
    pub hits: u64,
    /// Starts that booted (no template ready, or templates off for them).
    pub misses: u64,
    /// Templates built.
    pub built: u64,
    /// Builds that failed.
    pub failed: u64,
    /// Templates ready now.
    pub ready: u64,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Shape, Slot>,
    /// Advances on every use: the least recently used ready template has the smallest `used`.
    clock: u64,
    stats: TemplateStats,
}

/// The templates of one backend.
#[derive(Debug)]
pub struct Templates {
    host: vmm::Host,
    max: usize,
    /// Clone shells kept pre-built per template.
    pool_depth: usize,
    build_timeout: Duration,
    /// `<state_dir>/templates.json`, if recorded.
    record: Option<PathBuf>,
    /// Whether the shapes a previous daemon recorded were queued for building.
    recorded_queued: std::sync::atomic::AtomicBool,
    inner: Mutex<Inner>,
    /// Woken whenever a build ends (ready or failed).
    built: tokio::sync::Notify,
}

impl Templates {
    /// Templates on `host`: at most `max`, each given `build_timeout` to come up, with
    /// `pool_depth` clone shells kept ready; the shapes built are recorded in `record`.
    pub fn new(
        host: vmm::Host,
        max: usize,
        pool_depth: usize,
        build_timeout: Duration,
        record: Option<PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Templates {
            host,
            max: max.max(1),
            pool_depth,
            build_timeout,
            record,
            recorded_queued: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
            built: tokio::sync::Notify::new(),
        })
    }

    /// The ready template for `spec`'s shape, if there is one: on a miss a build starts in
    /// the background (at most one per shape, not again within a minute of a failure) and
    /// Start boots.
    pub fn lookup(self: &Arc<Self>, spec: &VmSpec) -> Option<Arc<Template>> {
        let shape = Shape::of(spec);
        match self.try_lookup(&shape, spec, true) {
            Lookup::Ready(t) => Some(t),
            Lookup::Building | Lookup::Absent => None,
        }
    }

    /// As [`Templates::lookup`], but while the shape's template is being built (as right
    /// after the daemon starts) waits up to `wait` for it rather than booting a second VM of
    /// the same shape beside the build: the build is itself a boot, so the clone that follows
    /// is not later than a boot would be, and the two do not share the CPUs.
    pub async fn lookup_or_wait(
        self: &Arc<Self>,
        spec: &VmSpec,
        wait: Duration,
    ) -> Option<Arc<Template>> {
        let shape = Shape::of(spec);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a build that ends in between still wakes us.
            let built = self.built.notified();
            tokio::pin!(built);
            built.as_mut().enable();
            match self.try_lookup(&shape, spec, false) {
                Lookup::Ready(t) => return Some(t),
                Lookup::Absent => break,
                Lookup::Building => {}
            }
            if tokio::time::timeout_at(deadline, built).await.is_err() {
                break;
            }
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.stats.misses = inner.stats.misses.saturating_add(1);
        None
    }

    /// Looks `shape` up, starting its build if it has none (or an old failure); counts a miss
    /// when `count_miss` (a hit always counts).
    fn try_lookup(self: &Arc<Self>, shape: &Shape, spec: &VmSpec, count_miss: bool) -> Lookup {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock = inner.clock.wrapping_add(1);
        let now = inner.clock;
        let found = match inner.slots.get_mut(shape) {
            Some(Slot::Ready { template, used }) => {
                *used = now;
                let template = Arc::clone(template);
                inner.stats.hits = inner.stats.hits.saturating_add(1);
                return Lookup::Ready(template);
            }
            Some(Slot::Building) => Lookup::Building,
            Some(Slot::Failed { at }) if at.elapsed() < RETRY_AFTER => Lookup::Absent,
            Some(Slot::Failed { .. }) | None => {
                inner.slots.insert(shape.clone(), Slot::Building);
                self.spawn_build(shape.clone(), spec);
                Lookup::Building
            }
        };
        if count_miss {
            inner.stats.misses = inner.stats.misses.saturating_add(1);
        }
        found
    }

    /// Starts building the template of `spec`'s shape unless it exists or is being built; the
    /// first call also queues the shapes a previous daemon recorded.
    pub fn prepare(self: &Arc<Self>, spec: &VmSpec) {
        use std::sync::atomic::Ordering;
        if !self.recorded_queued.swap(true, Ordering::SeqCst)
            && let Some(path) = &self.record
        {
            for shape in recorded_shapes(path) {
                self.prepare_one(&shape.spec(self.build_timeout));
            }
        }
        self.prepare_one(spec);
    }

    fn prepare_one(self: &Arc<Self>, spec: &VmSpec) {
        let shape = Shape::of(spec);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.slots.contains_key(&shape) {
            return;
        }
        inner.slots.insert(shape.clone(), Slot::Building);
        self.spawn_build(shape, spec);
    }

    /// The counters so far, and the templates ready now.
    pub fn stats(&self) -> TemplateStats {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let ready = inner
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count();
        TemplateStats {
            ready: u64::try_from(ready).unwrap_or(u64::MAX),
            ..inner.stats
        }
    }

    /// Templates ready now.
    pub fn ready(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count()
    }

    /// Waits up to `timeout` until no build is running (tests and benchmarks).
    pub async fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let building = {
                let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.slots.values().any(|s| matches!(s, Slot::Building))
            };
            if !building {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn spawn_build(self: &Arc<Self>, shape: Shape, spec: &VmSpec) {
        let this = Arc::clone(self);
        let spec = template_spec(spec);
        tokio::spawn(async move {
            let t = Instant::now();
            let built = this.build(&spec, shape.nics).await;
            this.finish(shape, built, t.elapsed());
        });
    }

    fn finish(&self, shape: Shape, built: Result<Template, BackendError>, took: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match built {
            Ok(mut template) => {
                template.build_time = took;
                info!(
                    vcpus = shape.vcpus,
                    mem_mib = shape.mem_mib,
                    nics = shape.nics,
                    ms = took.as_millis(),
                    "VM template ready"
                );
                inner.clock = inner.clock.wrapping_add(1);
                let used = inner.clock;
                if self.pool_depth > 0
                    && let Err(e) = self.host.set_clone_pool_target(
                        &template.snapshot,
                        self.pool_depth,
                        shape.policy(),
                    )
                {
                    warn!(error = %e, "no pre-built shells for the template's clones");
                }
                inner.slots.insert(
                    shape,
                    Slot::Ready {
                        template: Arc::new(template),
                        used,
                    },
                );
                inner.stats.built = inner.stats.built.saturating_add(1);
                for dropped in evict(&mut inner, self.max) {
                    // Its clones keep their own mapping of its memory; the idle shells go.
                    let _ = self.host.set_clone_pool_target(
                        &dropped.snapshot,
                        0,
                        vmm::SeccompPolicy::Off,
                    );
                }
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot build a VM template; sandboxes of its shape boot");
                inner
                    .slots
                    .insert(shape, Slot::Failed { at: Instant::now() });
                inner.stats.failed = inner.stats.failed.saturating_add(1);
            }
        }
        // Recorded before the lock goes: whoever sees the template sees it recorded.
        if let Some(path) = &self.record {
            let shapes: Vec<&Shape> = inner
                .slots
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Ready { .. }))
                .map(|(shape, _)| shape)
                .collect();
            record_shapes(path, &shapes);
        }
        drop(inner);
        self.built.notify_waiters();
    }

    /// Boots the template's VM, waits for its agent's ready line and for the guest to close
    /// that connection, saves it and stops it.
    async fn build(&self, spec: &VmSpec, nics: usize) -> Result<Template, BackendError> {
        let mut config = vm_config(spec)?;
        let nic_macs: Vec<[u8; 6]> = (0..nics).map(template_mac).collect();
        for mac in &nic_macs {
            let backend = devices::virtio::net::NullNet::new()
                .map_err(|e| BackendError::Start(Box::new(e)))?;
            config.devices.push(vmm::DeviceConfig::Net {
                config: devices::virtio::net::NetConfig {
                    mac: *mac,
                    mtu: None,
                },
                backend: vmm::NetBackendConfig::Custom(Box::new(backend)),
            });
        }
        let host = self.host.clone();
        let (vm, listener) = tokio::task::spawn_blocking(move || {
            let vm = vmm::Vm::start(&host, config)?;
            let listener = vm
                .vsock()
                .map(|v| v.listen(READY_PORT))
                .unwrap_or_else(|| Err(std::io::Error::other("the VM has no vsock device")));
            Ok::<_, vmm::VmError>((vm, listener))
        })
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| BackendError::Start(Box::new(e)))?;
        let vm = Arc::new(vm);
        let mut ready_spec = template_spec(spec);
        ready_spec.agent_ready_timeout = self.build_timeout;
        let (_tx, end) = tokio::sync::watch::channel(None);
        let port = agent::wait_ready(&ready_spec, listener, None, end).await;
        let port = match port {
            Ok(port) => port,
            Err(e) => {
                let vm2 = Arc::clone(&vm);
                let _ = tokio::task::spawn_blocking(move || vm2.stop()).await;
                return Err(e);
            }
        };
        let snapshotting = Arc::clone(&vm);
        let snapshot = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + QUIESCE_TIMEOUT;
            let result = loop {
                match snapshotting.snapshot() {
                    Err(vmm::VmmActionError::Snapshot(vmm::SnapshotError::Busy(_)))
                        if Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    other => break other,
                }
            };
            // The template never runs again: clones read its memory.
            snapshotting.stop();
            result
        })
        .await
        .map_err(BackendError::Join)?
        .map_err(|e| BackendError::Start(Box::new(e)))?;
        Ok(Template {
            snapshot,
            agent_port: port,
            nic_macs,
            build_time: Duration::ZERO,
        })
    }
}

/// The parts of `spec` a template is built from (no console log, hybrid socket, NIC backends
/// or setup: those are each clone's own).
fn template_spec(spec: &VmSpec) -> VmSpec {
    VmSpec {
        sandbox_id: "template".into(),
        console_log: None,
        console_log_max_bytes: None,
        vsock_uds: None,
        setup: Default::default(),
        nics: super::NetDevices::new(Vec::new()),
        template: false,
        // A template is no sandbox: its VM stays in the daemon's cgroup.
        cgroup: None,
        memory: None,
        ..spec.clone()
    }
}

/// Drops the least recently used ready templates beyond `max` and returns them.
fn evict(inner: &mut Inner, max: usize) -> Vec<Arc<Template>> {
    let mut dropped = Vec::new();
    loop {
        let ready: Vec<(&Shape, u64)> = inner
            .slots
            .iter()
            .filter_map(|(shape, slot)| match slot {
                Slot::Ready { used, .. } => Some((shape, *used)),
                _ => None,
            })
            .collect();
        if ready.len() <= max {
            return dropped;
        }
        let Some(oldest) = ready
            .iter()
            .min_by_key(|(_, used)| *used)
            .map(|(s, _)| (*s).clone())
        else {
            return dropped;
        };
        if let Some(Slot::Ready { template, .. }) = inner.slots.remove(&oldest) {
            dropped.push(template);
        }
    }
}

fn record_shapes(path: &Path, shapes: &[&Shape]) {
    let written = serde_json::to_vec_pretty(shapes)
        .map_err(std::io::Error::other)
        .and_then(|json| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, json)?;
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot record the template shapes");
    }
}

/// The shapes a previous daemon recorded (none if the file is missing or unreadable).
pub fn recorded_shapes(path: &Path) -> Vec<Shape> {
    std::fs::read(path)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .unwrap_or_default()
}
