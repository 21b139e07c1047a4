// SPDX-License-Identifier: Apache-2.0
//! The containerd Task API (`containerd.task.v3.Task`, also registered as
//! `containerd.task.v2.Task`: the messages are the same).
//!
//! Containers come from OCI bundles on the agent's file system and run through youki's
//! `libcontainer` ([`runtime`]). Every process the service starts goes through the agent's
//! [`Reaper`], which delivers its exit status and time to a `watch` channel that `Wait`,
//! `State` and `Delete` read; nothing else calls `waitpid`.
//!
//! Calls run on the agent's single thread; the blocking parts (fork, libcontainer) are short,
//! and the waits (stdio streams, rootfs devices) are async and hold no lock.
//!
//! - Stdio ([`stdio`]): paths of plain files or FIFOs (opened without blocking: a FIFO for
//!   output needs a reader already), empty for `/dev/null`, or containerd stream URLs
//!   (`<address>?streaming_id=<id>`) served by the `Streaming` service registered next to the
//!   Task service ([`crate::streaming`]); `Create`/`Exec` wait up to [`STREAM_WAIT`] for a
//!   named stream. `CloseIO` ends a stdin the agent feeds.
//! - TTYs ([`tty`]): `terminal: true` gets a pty from libcontainer through a console socket;
//!   the agent copies between its master and the stdio, and `ResizePty` sets its size.
//! - Root file systems ([`rootfs`]): `Create`'s `rootfs` mounts of ext4/erofs block devices
//!   (a path or `blk:<serial>`) are mounted under the bundle (overlay for read-only layers) and
//!   the spec's root points there; `Delete` unmounts them.
//! - cgroups ([`cgroup`]): a container without `linux.cgroupsPath` goes to `/<pod>/<id>`
//!   ([`TaskService::pod_cgroup`]); `Pause`/`Resume` freeze it, `Update` writes its cgroup v2
//!   files, and an OOM kill in it is published as [`crate::events::TOPIC_OOM`].
//! - Bundles under `<state_dir>/bundles` ([`bundle_dir`]) are the agent's: `Delete` removes
//!   them. `Shutdown` answers OK and ends nothing (the VM belongs to the host's controller).
//!
//! Not implemented, with `UNIMPLEMENTED`: checkpoints (`Checkpoint`, `Create` from one).

mod api;
pub mod cgroup;
pub mod error;
pub mod rootfs;
#[cfg(feature = "containers")]
pub mod runtime;
#[cfg(not(feature = "containers"))]
#[path = "runtime_stub.rs"]
pub mod runtime;
pub mod seccomp;
pub mod stats;
pub mod stdio;
pub mod tty;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PidsRequest,
    PidsResponse, ProcessInfo, StartRequest, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status, UpdateTaskRequest, WaitRequest,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;

pub use self::api::services;
use self::cgroup::OomWatcher;
pub use self::error::TaskError;
use self::rootfs::{LayerMount, RootfsMounts};
use self::runtime::{Handle, Runtime};
use self::seccomp::{ProcessSeccomp, SeccompProgram};
use self::stdio::{Bound, StdinCloser, StdioPaths};
use crate::events::Events;
use crate::reaper::{ExitStatus, Reaper};
use crate::streaming::StreamRegistry;

/// Service name containerd >= 2.1 uses.
pub const TASK_V3: &str = "containerd.task.v3.Task";
/// Service name of the v2 API (iSulad); same messages.
pub const TASK_V2: &str = "containerd.task.v2.Task";
/// How long `Delete` of a created (never started) container waits for its killed init.
const KILL_CREATED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Create`/`Exec` wait for a stdio stream named in the request.
pub const STREAM_WAIT: Duration = Duration::from_secs(10);
/// The pod cgroup (under the cgroup v2 root) unless the agent is told otherwise.
pub const DEFAULT_POD_CGROUP: &str = "sandboxer";
/// Where agent-owned bundles live under the state directory (see [`bundle_dir`]).
const BUNDLES: &str = "bundles";

/// The bundle directory the agent owns for container `id`: `<state_dir>/bundles/<id>`.
/// `Task.Delete` of a container whose bundle is there removes the directory.
pub fn bundle_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(BUNDLES).join(id)
}

/// How a process ended and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The status.
    pub status: ExitStatus,
    /// When the reaper collected it.
    pub at: SystemTime,
}

type ExitRx = watch::Receiver<Option<Exit>>;
type ExitTx = watch::Sender<Option<Exit>>;

/// One process: the init of a container or an exec process.
#[derive(Debug)]
struct Process {
    /// 0 until started.
    pid: u32,
    stdio: StdioPaths,
    exit: ExitRx,
    /// Handed to the reaper when the process starts.
    exit_tx: Option<ExitTx>,
    /// Whether the program runs (for the init: `Start` was called).
    started: bool,
    /// Ends a stdin the agent feeds (a stream, or a TTY's input); `CloseIO` uses it.
    stdin: StdinCloser,
    /// The pty master of a TTY process.
    console: Option<tty::Console>,
}

impl Process {
    fn new(stdio: StdioPaths) -> Self {
        let (tx, rx) = watch::channel(None);
        Self {
            pid: 0,
            stdio,
            exit: rx,
            exit_tx: Some(tx),
            started: false,
            stdin: StdinCloser::default(),
            console: None,
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn status(&self) -> Status {
        if self.exited().is_some() {
            Status::STOPPED
        } else if self.started {
            Status::RUNNING
        } else {
            Status::CREATED
        }
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::CREATED => "created",
        Status::RUNNING => "running",
        Status::STOPPED => "stopped",
        Status::PAUSED => "paused",
        Status::PAUSING => "pausing",
        Status::UNKNOWN => "unknown",
    }
}

#[derive(Debug)]
struct ExecProcess {
    process: Process,
    /// OCI process JSON for libcontainer.
    spec_file: PathBuf,
    /// Stdio streams taken at `Exec`, wired at `Start`.
    bound: Option<Bound>,
    /// Runs on a pty.
    terminal: bool,
    /// The container's seccomp profile, applied before `execve`.
    seccomp: Option<ProcessSeccomp>,
}

/// Exec needs a running container and a new exec id.
fn check_exec(req: &ExecProcessRequest, c: &ContainerEntry) -> Result<(), TaskError> {
    let status = c.init.status();
    if status != Status::RUNNING {
        return Err(TaskError::FailedPrecondition {
            what: format!("container {:?}", req.id),
            state: status_name(status),
            call: "Exec",
            wanted: "running",
        });
    }
    if c.execs.contains_key(&req.exec_id) {
        return Err(TaskError::ExecExists {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
    }
    Ok(())
}

#[derive(Debug)]
struct ContainerEntry {
    bundle: String,
    init: Process,
    handle: Handle,
    /// The container's cgroup v2 directory, found when it was created.
    cgroup: Option<PathBuf>,
    execs: HashMap<String, ExecProcess>,
    /// Frozen by `Pause`.
    paused: bool,
    /// Block-device layers mounted for the rootfs.
    rootfs: Option<RootfsMounts>,
    /// The bundle is agent-owned (under `<state_dir>/bundles`): Delete removes it.
    owned_bundle: bool,
    /// The compiled `linux.seccomp` profile, for exec processes.
    seccomp: Option<Arc<SeccompProgram>>,
}

/// The Task service.
#[derive(Debug)]
pub struct TaskService {
    reaper: Arc<Reaper>,
    runtime: Runtime,
    /// Agent-owned files (exec process specs, bundles).
    state_dir: PathBuf,
    containers: Mutex<HashMap<String, ContainerEntry>>,
    /// Where OOM kills go.
    events: Arc<Events>,
    /// Stdio streams that arrived through the Streaming service.
    streams: Arc<StreamRegistry>,
    /// Started with the first container (it needs the runtime); `None` if inotify failed.
    oom: OnceLock<Option<OomWatcher>>,
    /// Pod cgroup name: containers without `linux.cgroupsPath` go to `/<pod>/<id>`.
    pod: String,
}

/// Ids and exec ids become file names: the protocol's one rule ([`proto::id`]), the same the
/// sandboxer applies before it forwards a call.
fn validate_id(field: &'static str, id: &str) -> Result<(), TaskError> {
    proto::id::validate(id).map_err(|e| TaskError::invalid(field, format!("{id:?} {e}")))
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    MessageField::some(ts)
}

fn exit_fields(exit: Option<Exit>) -> (u32, MessageField<Timestamp>) {
    match exit {
        Some(e) => (e.status.code(), timestamp(e.at)),
        None => (0, MessageField::none()),
    }
}

fn pid_u32(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(0)
}

/// Reads and checks a bundle's `config.json`; returns the spec. With `rootfs_mounts` the
/// rootfs comes from `Create`'s mounts, so the spec's root directory need not exist yet.
fn load_bundle_spec(
    bundle: &Path,
    rootfs_mounts: bool,
) -> Result<oci_spec::runtime::Spec, TaskError> {
    let config = bundle.join("config.json");
    let text = std::fs::read_to_string(&config).map_err(|e| {
        TaskError::invalid("bundle", format!("cannot read {}: {e}", config.display()))
    })?;
    let spec: oci_spec::runtime::Spec = serde_json::from_str(&text).map_err(|e| {
        TaskError::invalid(
            "bundle/config.json",
            format!("{} is not a valid OCI spec: {e}", config.display()),
        )
    })?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| TaskError::invalid("bundle/config.json", "root is missing"))?;
    let rootfs = bundle.join(root.path());
    if !rootfs_mounts && !rootfs.is_dir() {
        return Err(TaskError::invalid(
            "bundle/config.json",
            format!("root.path {} is not a directory", rootfs.display()),
        ));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| TaskError::invalid("bundle/config.json", "process is missing"))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(TaskError::invalid(
            "bundle/config.json",
            "process.args is empty",
        ));
    }
    Ok(spec)
}

impl TaskService {
    /// A service with no containers; libcontainer keeps its state in `state_dir/containers`,
    /// the agent its own files in `state_dir/execs` and `state_dir/bundles`. OOM kills are
    /// published to `events`.
    pub fn new(
        reaper: Arc<Reaper>,
        state_dir: &Path,
        events: Arc<Events>,
    ) -> std::io::Result<Self> {
        let runtime = Runtime::new(&state_dir.join("containers"))?;
        std::fs::create_dir_all(state_dir.join("execs"))?;
        std::fs::create_dir_all(state_dir.join(BUNDLES))?;
        Ok(Self {
            reaper,
            runtime,
            state_dir: state_dir.to_owned(),
            containers: Mutex::new(HashMap::new()),
            events,
            streams: Arc::new(StreamRegistry::new()),
            oom: OnceLock::new(),
            pod: DEFAULT_POD_CGROUP.to_owned(),
        })
    }

    /// Sets the pod cgroup name (default [`DEFAULT_POD_CGROUP`]): containers whose spec has
    /// no `linux.cgroupsPath` get `/<pod>/<container id>`.
    #[must_use]
    pub fn with_pod_cgroup(mut self, pod: &str) -> Self {
        pod.clone_into(&mut self.pod);
        self
    }

    /// The pod's cgroup v2 directory (`/sys/fs/cgroup/<pod>`), parent of the containers'
    /// default cgroups.
    pub fn pod_cgroup(&self) -> PathBuf {
        Path::new(stats::CGROUP_ROOT).join(&self.pod)
    }

    /// The registry the Streaming service fills.
    pub fn streams(&self) -> &Arc<StreamRegistry> {
        &self.streams
    }

    fn oom_watcher(&self) -> Option<&OomWatcher> {
        self.oom
            .get_or_init(|| match OomWatcher::start(Arc::clone(&self.events)) {
                Ok(w) => Some(w),
                Err(e) => {
                    log::warn!("No OOM events: {e}");
                    None
                }
            })
            .as_ref()
    }

    /// Ids of the containers the service knows.
    pub fn container_ids(&self) -> Vec<String> {
        self.containers
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Kills and deletes every container (agent shutdown in host mode), and ends the stdio
    /// streams nobody took.
    pub fn kill_all(&self) {
        self.streams.close_all();
        let mut containers = self.containers.lock().expect("poisoned");
        for (id, mut c) in containers.drain() {
            if c.init.pid != 0 && c.init.exited().is_none() {
                let _ = kill(Pid::from_raw(c.init.pid.cast_signed()), Signal::SIGKILL);
            }
            if let Err(e) = self.runtime.delete(&mut c.handle) {
                log::warn!("Deleting container {id} at shutdown: {e}");
            }
            if let Some(mut m) = c.rootfs.take()
                && let Err(e) = m.unmount()
            {
                log::warn!("Unmounting the rootfs of {id} at shutdown: {e}");
            }
        }
    }

    fn spawn_watched<T>(
        &self,
        tx: ExitTx,
        start: impl FnOnce() -> Result<(T, Pid), TaskError>,
    ) -> Result<T, TaskError> {
        self.reaper.spawn(start, move |status| {
            // Nobody may be waiting; the value stays in the channel for later readers.
            tx.send_replace(Some(Exit {
                status,
                at: SystemTime::now(),
            }));
        })
    }

    async fn do_create(&self, req: &CreateTaskRequest) -> Result<u32, TaskError> {
        validate_id("id", &req.id)?;
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("Create from a checkpoint".into()));
        }
        if req.bundle.is_empty() || !Path::new(&req.bundle).is_absolute() {
            return Err(TaskError::invalid(
                "bundle",
                format!("{:?} is not an absolute path", req.bundle),
            ));
        }
        self.check_new_id(&req.id)?;
        let bundle = Path::new(&req.bundle);
        let layers: Vec<LayerMount> = req
            .rootfs
            .iter()
            .map(|m| LayerMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let mut spec = load_bundle_spec(bundle, !layers.is_empty())?;
        // The waits (devices, streams) hold no lock.
        let devices = if layers.is_empty() {
            Vec::new()
        } else {
            rootfs::resolve_devices(&layers, rootfs::DEVICE_WAIT).await?
        };
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        let bound = stdio::bind(&self.streams, &stdio, STREAM_WAIT).await?;

        let mut containers = self.containers.lock().expect("poisoned");
        if containers.contains_key(&req.id) {
            return Err(TaskError::ContainerExists(req.id.clone()));
        }
        let mut mounts = if layers.is_empty() {
            None
        } else {
            let readonly = spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false);
            Some(rootfs::mount_layers(bundle, &layers, &devices, readonly)?)
        };
        let created = self.create_locked(req, bundle, &mut spec, mounts.as_ref(), stdio, bound);
        let (init, handle, seccomp) = match created {
            Ok(v) => v,
            Err(e) => {
                if let Some(m) = mounts.as_mut()
                    && let Err(u) = m.unmount()
                {
                    log::warn!("Container {}: {u}", req.id);
                }
                return Err(e);
            }
        };
        let cgroup = match stats::cgroup_dir_of(init.pid, Path::new(stats::CGROUP_ROOT)) {
            Ok(dir) => Some(dir),
            Err(e) => {
                log::warn!("Container {}: {e}", req.id);
                None
            }
        };
        if let (Some(dir), Some(w)) = (&cgroup, self.oom_watcher()) {
            w.watch(&req.id, dir);
        }
        log::info!("Created container {} (pid {})", req.id, init.pid);
        let pid = init.pid;
        let owned_bundle = bundle.starts_with(self.state_dir.join(BUNDLES));
        containers.insert(
            req.id.clone(),
            ContainerEntry {
                bundle: req.bundle.clone(),
                init,
                handle,
                cgroup,
                execs: HashMap::new(),
                paused: false,
                rootfs: mounts,
                owned_bundle,
                seccomp,
            },
        );
        Ok(pid)
    }

    fn check_new_id(&self, id: &str) -> Result<(), TaskError> {
        if self.containers.lock().expect("poisoned").contains_key(id) {
            return Err(TaskError::ContainerExists(id.to_owned()));
        }
        Ok(())
    }

    /// Rewrites the spec where the agent decides (rootfs, default cgroup), wires stdio and
    /// creates the container.
    fn create_locked(
        &self,
        req: &CreateTaskRequest,
        bundle: &Path,
        spec: &mut oci_spec::runtime::Spec,
        mounts: Option<&RootfsMounts>,
        stdio: StdioPaths,
        bound: Bound,
    ) -> Result<(Process, Handle, Option<Arc<SeccompProgram>>), TaskError> {
        // `terminal` in the request wins over the spec (containerd sets both alike).
        let terminal = req.terminal;
        let mut changed = self.adjust_spec(&req.id, spec, mounts, terminal)?;
        let (program, seccomp) = init_seccomp(spec)?.unzip();
        changed |= seccomp
            .as_ref()
            .is_some_and(|s| s.drop_admin_effective || s.drop_admin_permitted);
        if changed {
            let config = bundle.join("config.json");
            let json = serde_json::to_vec_pretty(&*spec)
                .map_err(|e| TaskError::internal("Failed to encode the spec", &e))?;
            let tmp = bundle.join(".config.json.agent");
            std::fs::write(&tmp, json)
                .and_then(|()| std::fs::rename(&tmp, &config))
                .map_err(|e| {
                    TaskError::internal(&format!("Failed to write {}", config.display()), &e)
                })?;
        }
        let console = if terminal {
            Some(tty::ConsoleSocket::bind(
                &self.state_dir.join("console"),
                &req.id,
            )?)
        } else {
            None
        };
        let (files, closer, bound) = if terminal {
            (Default::default(), StdinCloser::default(), Some(bound))
        } else {
            let (f, c) = stdio::wire(&stdio, bound)?;
            (f, c, None)
        };
        let mut init = Process::new(stdio);
        init.stdin = closer;
        let tx = init.exit_tx.take().expect("new process has a sender");
        let socket = console.as_ref().map(tty::ConsoleSocket::path);
        let (mut handle, pid) = self.spawn_watched(tx, || {
            self.runtime
                .create(&req.id, bundle, files, socket, seccomp)
                .map(|(h, pid)| ((h, pid), pid))
        })?;
        init.pid = pid_u32(pid);
        if let (Some(sock), Some(bound)) = (console, bound) {
            let bridged = sock
                .receive_master()
                .and_then(|m| tty::bridge(m, &init.stdio, bound));
            match bridged {
                Ok((c, closer)) => {
                    init.console = Some(c);
                    init.stdin = closer;
                }
                Err(e) => {
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = self.runtime.delete(&mut handle);
                    return Err(e);
                }
            }
        }
        Ok((init, handle, program))
    }

    /// Points the spec's root at the mounted rootfs and gives a container without a cgroup
    /// path `/<pod>/<id>`. Returns whether anything changed.
    fn adjust_spec(
        &self,
        id: &str,
        spec: &mut oci_spec::runtime::Spec,
        mounts: Option<&RootfsMounts>,
        terminal: bool,
    ) -> Result<bool, TaskError> {
        let mut changed = false;
        if let Some(mut process) = spec.process().clone()
            && process.terminal().unwrap_or(false) != terminal
        {
            process.set_terminal(Some(terminal));
            spec.set_process(Some(process));
            changed = true;
        }
        if let Some(m) = mounts {
            let mut root = spec.root().clone().unwrap_or_default();
            root.set_path(m.rootfs.clone());
            spec.set_root(Some(root));
            changed = true;
        }
        let mut linux = spec.linux().clone().unwrap_or_default();
        if linux.cgroups_path().is_none() {
            linux.set_cgroups_path(Some(PathBuf::from(format!("/{}/{id}", self.pod))));
            spec.set_linux(Some(linux));
            changed = true;
        }
        Ok(changed)
    }

    fn do_start(&self, req: &StartRequest) -> Result<u32, TaskError> {
        let mut containers = self.containers.lock().expect("poisoned");
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| TaskError::ContainerNotFound(req.id.clone()))?;
        if req.exec_id.is_empty() {
            let status = c.init.status();
            if status != Status::CREATED {
                return Err(TaskError::FailedPrecondition {
                    what: format!("container {:?}", req.id),
                    state: status_name(status),
                    call: "Start",
                    wanted: "created",
                });
            }
            self.runtime.start(&mut c.handle)?;
            c.init.started = true;
            log::info!("Started container {}", req.id);
            return Ok(c.init.pid);
        }
        let status = c.init.status();
        if status != Status::RUNNING {
            return Err(TaskError::FailedPrecondition {
                what: format!("container {:?}", req.id),
                state: status_name(status),
                call: "Start of an exec process",
                wanted: "running",
            });
        }
        let exec = c
            .execs
            .get_mut(&req.exec_id)
            .ok_or_else(|| TaskError::ExecNotFound {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            })?;
        let Some(tx) = exec.process.exit_tx.take() else {
            return Err(TaskError::FailedPrecondition {
                what: format!("exec process {:?} of {:?}", req.exec_id, req.id),
                state: status_name(exec.process.status()),
                call: "Start",
                wanted: "created",
            });
        };
        let bound = exec.bound.take().unwrap_or_default();
        let wired = if exec.terminal {
            tty::ConsoleSocket::bind(
                &self.state_dir.join("console"),
                &format!("{}-{}", req.id, req.exec_id),
            )
            .map(|s| (Default::default(), StdinCloser::default(), Some((s, bound))))
        } else {
            stdio::wire(&exec.process.stdio, bound).map(|(f, c)| (f, c, None))
        };
        let (files, closer, console) = match wired {
            Ok(f) => f,
            Err(e) => {
                exec.process.exit_tx = Some(tx);
                return Err(e);
            }
        };
        exec.process.stdin = closer;
        let spec_file = exec.spec_file.clone();
        let seccomp = exec.seccomp.clone();
        let socket = console.as_ref().map(|(s, _)| s.path());
        let pid = self.spawn_watched(tx, || {
            self.runtime
                .exec(&req.id, &spec_file, files, socket, seccomp)
                .map(|pid| (pid, pid))
        })?;
        if let Some((sock, bound)) = console {
            let bridged = sock
                .receive_master()
                .and_then(|m| tty::bridge(m, &exec.process.stdio, bound));
            match bridged {
                Ok((c, closer)) => {
                    exec.process.console = Some(c);
                    exec.process.stdin = closer;
                }
                Err(e) => {
                    let _ = kill(pid, Signal::SIGKILL);
                    exec.process.pid = pid_u32(pid);
                    exec.process.started = true;
                    return Err(e);
                }
            }
        }
        exec.process.pid = pid_u32(pid);
        exec.process.started = true;
        log::info!(
            "Started exec {} in container {} (pid {pid})",
            req.exec_id,
            req.id
        );
        Ok(exec.process.pid)
    }

    /// Finds a process; returns a clone of what callers need without holding the lock.
    fn with_process<R>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&ContainerEntry, &Process) -> Result<R, TaskError>,
    ) -> Result<R, TaskError> {
        let containers = self.containers.lock().expect("poisoned");
        let c = containers
            .get(id)
            .ok_or_else(|| TaskError::ContainerNotFound(id.to_owned()))?;
        if exec_id.is_empty() {
            return f(c, &c.init);
        }
        let exec = c
            .execs
            .get(exec_id)
            .ok_or_else(|| TaskError::ExecNotFound {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })?;
        f(c, &exec.process)
    }

    fn do_kill(&self, req: &KillRequest) -> Result<(), TaskError> {
        let signal = i32::try_from(req.signal)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
            .ok_or_else(|| TaskError::invalid("signal", format!("{} is no signal", req.signal)))?;
        let (pids, what) = self.with_process(&req.id, &req.exec_id, |c, p| {
            let what = if req.exec_id.is_empty() {
                format!("container {:?}", req.id)
            } else {
                format!("exec process {:?} of {:?}", req.exec_id, req.id)
            };
            if p.exited().is_some() {
                return Err(TaskError::ProcessFinished(what));
            }
            if p.pid == 0 {
                return Err(TaskError::FailedPrecondition {
                    what,
                    state: "created",
                    call: "Kill",
                    wanted: "started",
                });
            }
            let mut pids = vec![p.pid];
            if req.all
                && req.exec_id.is_empty()
                && let Some(dir) = &c.cgroup
            {
                match stats::cgroup_pids(dir) {
                    Ok(all) => pids.extend(all.into_iter().filter(|&q| q != p.pid)),
                    Err(e) => log::warn!("Kill all in {:?}: {e}", req.id),
                }
            }
            Ok((pids, what))
        })?;
        let mut delivered = false;
        for pid in pids {
            match kill(Pid::from_raw(pid.cast_signed()), signal) {
                Ok(()) => delivered = true,
                Err(Errno::ESRCH) => {}
                Err(e) => return Err(TaskError::internal("kill", &e)),
            }
        }
        if delivered {
            Ok(())
        } else {
            Err(TaskError::ProcessFinished(what))
        }
    }

    async fn do_wait(&self, req: &WaitRequest) -> Result<Exit, TaskError> {
        let mut rx = self.with_process(&req.id, &req.exec_id, |_, p| Ok(p.exit.clone()))?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| TaskError::Internal("exit channel closed".into()))?;
        Ok((*exit).expect("waited for Some"))
    }

    fn state(&self, req: &StateRequest) -> Result<StateResponse, TaskError> {
        self.with_process(&req.id, &req.exec_id, |c, p| {
            let (exit_status, exited_at) = exit_fields(p.exited());
            let mut r = StateResponse::new();
            r.id = req.id.clone();
            r.exec_id = req.exec_id.clone();
            r.bundle = c.bundle.clone();
            r.pid = p.pid;
            r.status = if c.paused && p.status() == Status::RUNNING {
                Status::PAUSED
            } else {
                p.status()
            }
            .into();
            r.stdin = p.stdio.stdin.clone();
            r.stdout = p.stdio.stdout.clone();
            r.stderr = p.stdio.stderr.clone();
            r.terminal = p.console.is_some();
            r.exit_status = exit_status;
            r.exited_at = exited_at;
            Ok(r)
        })
    }

    async fn do_exec(&self, req: &ExecProcessRequest) -> Result<(), TaskError> {
        validate_id("exec_id", &req.exec_id)?;
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| TaskError::invalid("spec", "is missing"))?;
        let mut process: oci_spec::runtime::Process = serde_json::from_slice(&spec.value)
            .map_err(|e| TaskError::invalid("spec", format!("not an OCI process: {e}")))?;
        // `terminal` in the request wins over the spec (containerd sets both alike).
        process.set_terminal(Some(req.terminal));
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(TaskError::invalid("spec.args", "is empty"));
        }
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        // Check before waiting for streams, and again after.
        self.exec_allowed(req)?;
        let bound = stdio::bind(&self.streams, &paths, STREAM_WAIT).await?;
        let mut containers = self.containers.lock().expect("poisoned");
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| TaskError::ContainerNotFound(req.id.clone()))?;
        check_exec(req, c)?;
        // runc applies the container's profile to exec processes too.
        let seccomp = c
            .seccomp
            .as_ref()
            .map(|program| ProcessSeccomp::prepare(program.clone(), &mut process));
        let dir = self.state_dir.join("execs").join(&req.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| TaskError::internal("Failed to create the exec directory", &e))?;
        let spec_file = dir.join(format!("{}.json", req.exec_id));
        let json = serde_json::to_vec(&process)
            .map_err(|e| TaskError::internal("Failed to encode the process", &e))?;
        std::fs::write(&spec_file, json)
            .map_err(|e| TaskError::internal("Failed to write the process spec", &e))?;
        c.execs.insert(
            req.exec_id.clone(),
            ExecProcess {
                process: Process::new(paths),
                spec_file,
                bound: Some(bound),
                terminal: req.terminal,
                seccomp,
            },
        );
        Ok(())
    }

    fn exec_allowed(&self, req: &ExecProcessRequest) -> Result<(), TaskError> {
        self.with_process(&req.id, "", |c, _| check_exec(req, c))
    }

    async fn do_delete(&self, req: &DeleteRequest) -> Result<DeleteResponse, TaskError> {
        if !req.exec_id.is_empty() {
            let mut containers = self.containers.lock().expect("poisoned");
            let c = containers
                .get_mut(&req.id)
                .ok_or_else(|| TaskError::ContainerNotFound(req.id.clone()))?;
            let exec = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| TaskError::ExecNotFound {
                    id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                })?;
            if exec.process.status() == Status::RUNNING {
                return Err(TaskError::FailedPrecondition {
                    what: format!("exec process {:?} of {:?}", req.exec_id, req.id),
                    state: "running",
                    call: "Delete",
                    wanted: "stopped",
                });
            }
            let exec = c.execs.remove(&req.exec_id).expect("checked above");
            let _ = std::fs::remove_file(&exec.spec_file);
            return Ok(delete_response(&exec.process));
        }

        // A created container's init waits for Start; kill it and wait for the reaper.
        let created = self.with_process(&req.id, "", |_, p| {
            Ok((p.status() == Status::CREATED).then(|| (p.pid, p.exit.clone())))
        })?;
        if let Some((pid, mut rx)) = created {
            match kill(Pid::from_raw(pid.cast_signed()), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(TaskError::internal("kill", &e)),
            }
            if tokio::time::timeout(KILL_CREATED_TIMEOUT, rx.wait_for(Option::is_some))
                .await
                .is_err()
            {
                return Err(TaskError::Internal(format!(
                    "Init pid {pid} of created container {:?} did not exit after SIGKILL",
                    req.id
                )));
            }
        }

        let mut containers = self.containers.lock().expect("poisoned");
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| TaskError::ContainerNotFound(req.id.clone()))?;
        let status = c.init.status();
        if status != Status::STOPPED {
            return Err(TaskError::FailedPrecondition {
                what: format!("container {:?}", req.id),
                state: status_name(status),
                call: "Delete",
                wanted: "stopped",
            });
        }
        self.runtime.delete(&mut c.handle)?;
        let mut c = containers.remove(&req.id).expect("checked above");
        drop(containers);
        let _ = std::fs::remove_dir_all(self.state_dir.join("execs").join(&req.id));
        if let Some(w) = self.oom.get().and_then(Option::as_ref) {
            w.unwatch(&req.id);
        }
        if let Some(m) = c.rootfs.as_mut() {
            m.unmount()?;
        }
        if c.owned_bundle
            && let Err(e) = std::fs::remove_dir_all(&c.bundle)
        {
            log::warn!("Removing bundle {}: {e}", c.bundle);
        }
        log::info!("Deleted container {}", req.id);
        Ok(delete_response(&c.init))
    }

    fn set_paused(&self, id: &str, paused: bool) -> Result<(), TaskError> {
        let call = if paused { "Pause" } else { "Resume" };
        let mut containers = self.containers.lock().expect("poisoned");
        let c = containers
            .get_mut(id)
            .ok_or_else(|| TaskError::ContainerNotFound(id.to_owned()))?;
        let status = c.init.status();
        let state = if c.paused && status == Status::RUNNING {
            Status::PAUSED
        } else {
            status
        };
        let wanted = if paused {
            Status::RUNNING
        } else {
            Status::PAUSED
        };
        if state != wanted {
            return Err(TaskError::FailedPrecondition {
                what: format!("container {id:?}"),
                state: status_name(state),
                call,
                wanted: status_name(wanted),
            });
        }
        if paused {
            self.runtime.pause(&mut c.handle)?;
        } else {
            self.runtime.resume(&mut c.handle)?;
        }
        c.paused = paused;
        log::info!("{call}d container {id}");
        Ok(())
    }

    fn do_update(&self, req: &UpdateTaskRequest) -> Result<(), TaskError> {
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| TaskError::invalid("resources", "is missing"))?;
        let resources = cgroup::decode_resources(&any.type_url, &any.value)?;
        let dir = self.with_process(&req.id, "", |c, p| {
            if p.exited().is_some() {
                return Err(TaskError::FailedPrecondition {
                    what: format!("container {:?}", req.id),
                    state: "stopped",
                    call: "Update",
                    wanted: "created or running",
                });
            }
            c.cgroup
                .clone()
                .ok_or_else(|| TaskError::FailedPrecondition {
                    what: format!("container {:?}", req.id),
                    state: "without a cgroup v2 directory",
                    call: "Update",
                    wanted: "in cgroup v2",
                })
        })?;
        cgroup::apply_resources(&dir, &resources)?;
        log::info!("Updated the resources of container {}", req.id);
        Ok(())
    }

    fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let mut containers = self.containers.lock().expect("poisoned");
        let c = containers
            .get_mut(id)
            .ok_or_else(|| TaskError::ContainerNotFound(id.to_owned()))?;
        let p = if exec_id.is_empty() {
            &mut c.init
        } else {
            &mut c
                .execs
                .get_mut(exec_id)
                .ok_or_else(|| TaskError::ExecNotFound {
                    id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                })?
                .process
        };
        p.stdin.close();
        Ok(())
    }

    fn do_pids(&self, req: &PidsRequest) -> Result<PidsResponse, TaskError> {
        let (dir, init) = self.with_process(&req.id, "", |c, p| Ok((c.cgroup.clone(), p.pid)))?;
        let pids = match dir {
            Some(dir) => stats::cgroup_pids(&dir)
                .map_err(|e| TaskError::internal("Failed to list the container's pids", &e))?,
            None => vec![init],
        };
        let mut r = PidsResponse::new();
        r.processes = pids
            .into_iter()
            .map(|pid| {
                let mut info = ProcessInfo::new();
                info.pid = pid;
                info
            })
            .collect();
        Ok(r)
    }

    fn do_stats(&self, req: &StatsRequest) -> Result<StatsResponse, TaskError> {
        let dir = self.with_process(&req.id, "", |c, _| {
            c.cgroup
                .clone()
                .ok_or_else(|| TaskError::FailedPrecondition {
                    what: format!("container {:?}", req.id),
                    state: "without a cgroup v2 directory",
                    call: "Stats",
                    wanted: "in cgroup v2",
                })
        })?;
        let metrics = stats::read_metrics(&dir)
            .map_err(|e| TaskError::internal("Failed to read cgroup statistics", &e))?;
        let mut any = Any::new();
        any.type_url = stats::METRICS_TYPE_URL.to_owned();
        any.value = metrics
            .write_to_bytes()
            .map_err(|e| TaskError::internal("Failed to encode the metrics", &e))?;
        let mut r = StatsResponse::new();
        r.stats = MessageField::some(any);
        Ok(r)
    }
}

/// Compiles the spec's `linux.seccomp` profile (kept for the container's exec processes) and
/// readies the init process for it ([`ProcessSeccomp::prepare`]: the spec libcontainer reads
/// may get `CAP_SYS_ADMIN` in its effective and permitted sets). libcontainer, built without
/// libseccomp, ignores `linux.seccomp` itself, so the profile stays in the spec.
fn init_seccomp(
    spec: &mut oci_spec::runtime::Spec,
) -> Result<Option<(Arc<SeccompProgram>, ProcessSeccomp)>, TaskError> {
    let Some(profile) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) else {
        return Ok(None);
    };
    let program = SeccompProgram::compile(profile)
        .map_err(|e| TaskError::invalid("bundle/config.json", format!("linux.seccomp: {e}")))?;
    let program = Arc::new(program);
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| TaskError::invalid("bundle/config.json", "has no process"))?;
    let seccomp = ProcessSeccomp::prepare(program.clone(), &mut process);
    spec.set_process(Some(process));
    Ok(Some((program, seccomp)))
}

fn delete_response(p: &Process) -> DeleteResponse {
    let (exit_status, exited_at) = exit_fields(p.exited());
    let mut r = DeleteResponse::new();
    r.pid = p.pid;
    r.exit_status = exit_status;
    r.exited_at = exited_at;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_owned_bundles() {
        assert_eq!(
            bundle_dir(Path::new("/run/sandboxer-agent"), "c1"),
            Path::new("/run/sandboxer-agent/bundles/c1")
        );
    }

    #[test]
    fn ids() {
        for good in ["a", "c-1_x.y", "A9"] {
            validate_id("id", good).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "ä", &"x".repeat(129)] {
            let e = validate_id("id", bad).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{bad}");
            assert!(e.to_string().starts_with("Invalid id"), "{e}");
        }
    }

    #[test]
    fn timestamps_and_exits() {
        let t = UNIX_EPOCH + Duration::new(5, 7);
        let ts = timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (5, 7));
        let (code, at) = exit_fields(Some(Exit {
            status: ExitStatus::Signaled {
                signal: 9,
                core_dumped: false,
            },
            at: t,
        }));
        assert_eq!(code, 137);
        assert_eq!(at.seconds, 5);
        let (code, at) = exit_fields(None);
        assert_eq!(code, 0);
        assert!(at.is_none());
    }

    #[test]
    fn process_states() {
        let mut p = Process::new(StdioPaths::default());
        assert_eq!(p.status(), Status::CREATED);
        p.started = true;
        assert_eq!(p.status(), Status::RUNNING);
        let tx = p.exit_tx.take().unwrap();
        tx.send_replace(Some(Exit {
            status: ExitStatus::Exited(3),
            at: UNIX_EPOCH,
        }));
        assert_eq!(p.status(), Status::STOPPED);
        assert_eq!(delete_response(&p).exit_status, 3);
    }

    #[test]
    fn bundle_checks() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        let e = load_bundle_spec(b, false).unwrap_err();
        assert!(
            e.to_string().starts_with("Invalid bundle: cannot read"),
            "{e}"
        );
        std::fs::write(b.join("config.json"), "{not json").unwrap();
        let e = load_bundle_spec(b, false).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(
            e.to_string().starts_with("Invalid bundle/config.json"),
            "{e}"
        );
        let spec = |root: &str, args: &str, terminal: bool| {
            format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"{root}"}},
                    "process":{{"terminal":{terminal},"cwd":"/","args":{args},
                    "user":{{"uid":0,"gid":0}}}}}}"#
            )
        };
        std::fs::write(b.join("config.json"), spec("rootfs", r#"["sh"]"#, false)).unwrap();
        let e = load_bundle_spec(b, false).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        // With rootfs mounts the directory is made by the agent.
        load_bundle_spec(b, true).unwrap();
        std::fs::create_dir(b.join("rootfs")).unwrap();
        load_bundle_spec(b, false).unwrap();
        std::fs::write(b.join("config.json"), spec("rootfs", "[]", false)).unwrap();
        let e = load_bundle_spec(b, false).unwrap_err();
        assert!(e.to_string().contains("process.args is empty"), "{e}");
        // A TTY spec is accepted (the console comes from libcontainer).
        std::fs::write(b.join("config.json"), spec("rootfs", r#"["sh"]"#, true)).unwrap();
        load_bundle_spec(b, false).unwrap();
    }
}
