// SPDX-License-Identifier: Apache-2.0
//! The Task service on the host socket: `Create` and `Delete` are intercepted (root
//! filesystem images, spec rewrite, guest bundle), every other call is forwarded to the agent
//! unchanged, with a timeout so a dead VM never hangs a caller (`Wait` has none unless the
//! caller sets one; it ends when the agent connection dies).

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, Mount, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim::shim::CheckpointTaskRequest;
use containerd_shim_protos::shim_async::{Task, TaskClient};
use devices::sync::Recover;
use proto::agent::control::{BundleFile, PrepareBundleRequest, RemoveBundleRequest};
use proto::agent::control_ttrpc::ControlClient;
use ttrpc::asynchronous::TtrpcContext;
use ttrpc::context::Context;

use super::error::TaskError;
use super::rootfs::{self, CachedImage, ImageCache, RootfsPlan};
use super::spec::{self, GuestSpec};
use super::stdio::{self, Bridges};
use super::{HostPaths, TaskOptions};
use crate::backend::TaskTarget;

/// ttrpc metadata key that carries containerd's namespace.
pub const NAMESPACE_KEY: &str = "containerd-namespace-ttrpc";
/// ttrpc's own message for an elapsed request deadline.
const TTRPC_DEADLINE: &str = "Request deadline elapsed";

/// What the endpoint holds for one container until it is deleted.
#[derive(Debug, Default)]
pub(crate) struct Resources {
    /// Block slots attached for the rootfs.
    pub(super) slots: Vec<u32>,
    /// References on shared lower-chain images.
    pub(super) cached: Vec<CachedImage>,
    /// Private work directory (per-container images).
    pub(super) work_dir: Option<PathBuf>,
}

#[derive(Debug)]
pub(super) struct Container {
    pub(super) host_bundle: String,
    pub(super) stdio: [String; 3],
    pub(super) namespace: Option<String>,
    pub(super) resources: Resources,
}

impl Container {
    /// The record of a container the agent created for `req` (its containerd namespace comes
    /// with the request's metadata).
    fn created(
        ctx: &TtrpcContext,
        req: &CreateTaskRequest,
        host_bundle: String,
        resources: Resources,
    ) -> Self {
        Self {
            host_bundle,
            stdio: [req.stdin.clone(), req.stdout.clone(), req.stderr.clone()],
            namespace: ctx
                .metadata
                .get(NAMESPACE_KEY)
                .and_then(|v| v.first())
                .cloned(),
            resources,
        }
    }
}

/// A container the seed API's Prepare readied: rootfs attached and guest bundle written; the
/// engine's Task.Create for it then only forwards.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) host_bundle: String,
    pub(super) guest_bundle: String,
    pub(super) mounts: Vec<Mount>,
    pub(super) resources: Resources,
}

#[derive(Debug)]
pub(super) enum Entry {
    /// Create (or Prepare) is running.
    Creating,
    /// Prepared through the seed API, not created in the agent yet.
    Prepared(Prepared),
    /// Created in the agent.
    Ready(Container),
}

/// The service behind the task socket.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(super) target: Arc<dyn TaskTarget>,
    images: Arc<ImageCache>,
    work_dir: PathBuf,
    call_timeout: Duration,
    /// Where the host paths of requests must lie.
    host_paths: HostPaths,
    pub(super) containers: Mutex<HashMap<String, Entry>>,
    /// The task socket (named in the stream URLs given to the agent).
    socket: PathBuf,
    /// Copies of FIFO stdio; stopped when the endpoint goes.
    pub(super) bridges: Mutex<Vec<Bridges>>,
    /// The engine's stdio streams proxied to the agent (`io_type = "streaming"`).
    pub(super) proxies: Arc<stdio::Proxies>,
}

/// Container ids become file names here and in the agent: the protocol's one rule
/// ([`proto::id`]).
fn validate_id(id: &str) -> Result<(), TaskError> {
    proto::id::validate(id).map_err(|e| TaskError::invalid("id", format!("{id:?} {e}")))
}

fn mount(fs_type: &str, source: &str, read_only: bool) -> Mount {
    let mut m = Mount::new();
    m.type_ = fs_type.to_owned();
    m.source = source.to_owned();
    if read_only {
        m.options.push("ro".to_owned());
    }
    m
}

/// The caller's metadata, and the shorter of the caller's and our timeout.
fn out_ctx(ctx: &TtrpcContext, ours: Option<Duration>) -> (Context, Option<Duration>) {
    let theirs = u64::try_from(ctx.timeout_nano)
        .ok()
        .filter(|&n| n > 0)
        .map(Duration::from_nanos);
    let timeout = match (theirs, ours) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let c = Context {
        metadata: ctx.metadata.clone(),
        timeout_nano: timeout.map_or(0, |t| i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)),
    };
    (c, timeout)
}

fn plain_ctx(timeout: Duration) -> Context {
    ttrpc::context::with_duration(timeout)
}

/// Awaits a call to the agent, bounded by `timeout`.
async fn bounded<T>(
    call: &'static str,
    timeout: Option<Duration>,
    fut: impl Future<Output = ttrpc::Result<T>>,
) -> Result<T, TaskError> {
    let timed_out = |t: Duration| TaskError::AgentTimeout {
        call,
        secs: t.as_secs(),
    };
    let result = match timeout {
        None => fut.await,
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => return Err(timed_out(t)),
        },
    };
    result.map_err(|e| match (e, timeout) {
        (ttrpc::Error::Others(m), Some(t)) if m == TTRPC_DEADLINE => timed_out(t),
        (e, _) => TaskError::from_agent(call, e),
    })
}

impl Endpoint {
    pub(crate) fn new(target: Arc<dyn TaskTarget>, opts: &TaskOptions, socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            bridges: Mutex::new(Vec::new()),
            proxies: Arc::default(),
            target,
            images: opts.images.clone(),
            work_dir: opts.work_dir.clone(),
            call_timeout: opts.call_timeout,
            host_paths: opts.host_paths.clone(),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn agent(&self) -> Result<ttrpc::asynchronous::Client, TaskError> {
        self.target.agent().map_err(TaskError::NoAgent)
    }

    fn task(&self) -> Result<TaskClient, TaskError> {
        self.agent().map(TaskClient::new)
    }

    pub(crate) fn control(&self) -> Result<ControlClient, TaskError> {
        self.agent().map(ControlClient::new)
    }

    /// Ids of the containers the endpoint holds resources for.
    pub(crate) fn container_ids(&self) -> Vec<String> {
        self.containers.lock().recover().keys().cloned().collect()
    }

    /// Whether the endpoint holds container `id` (created, not deleted).
    pub(crate) fn has_container(&self, id: &str) -> bool {
        matches!(
            self.containers.lock().recover().get(id),
            Some(Entry::Ready(_))
        )
    }

    /// The containerd namespace a container was created in.
    pub(crate) fn namespace_of(&self, id: &str) -> Option<String> {
        match self.containers.lock().recover().get(id) {
            Some(Entry::Ready(c)) => c.namespace.clone(),
            _ => None,
        }
    }

    /// Detaches slots, drops image references and removes the work directory.
    async fn release(&self, id: &str, res: Resources) {
        for slot in res.slots.into_iter().rev() {
            if let Err(e) = self.target.detach_disk(slot).await {
                tracing::warn!("Container {id}: detaching slot {slot}: {e}");
            }
        }
        for image in res.cached {
            self.images.release(image);
        }
        if let Some(dir) = res.work_dir
            && let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("Container {id}: removing {}: {e}", dir.display());
        }
    }

    /// Bridges the stdio of a process (see [`stdio::bridge`]); keeps the copies running.
    async fn bridge_stdio(
        &self,
        what: &str,
        paths: [&str; 3],
    ) -> Result<([String; 3], Bridges), TaskError> {
        for (path, field) in paths.iter().zip(["stdin", "stdout", "stderr"]) {
            if !path.is_empty() && !stdio::is_stream_url(path) {
                self.host_paths.check(field, Path::new(path))?;
            }
        }
        stdio::bridge(&*self.target, &self.socket, what, paths).await
    }

    fn keep_bridges(&self, bridges: Bridges) {
        let mut all = self.bridges.lock().recover();
        all.retain(|b| !b.finished());
        all.push(bridges);
    }

    /// Frees what every container holds (the endpoint is going away).
    pub(crate) async fn release_all(&self) {
        self.bridges.lock().recover().clear();
        let all: Vec<(String, Entry)> = self.containers.lock().recover().drain().collect();
        for (id, entry) in all {
            match entry {
                Entry::Ready(c) => self.release(&id, c.resources).await,
                Entry::Prepared(p) => self.release(&id, p.resources).await,
                Entry::Creating => {}
            }
        }
    }

    async fn attach(
        &self,
        res: &mut Resources,
        image: &Path,
        read_only: bool,
    ) -> Result<String, TaskError> {
        let disk = self
            .target
            .attach_disk(image, read_only)
            .await
            .map_err(|source| TaskError::Disk {
                op: "attach",
                source,
            })?;
        res.slots.push(disk.slot);
        Ok(disk.source)
    }

    fn private_dir(&self, id: &str, res: &mut Resources) -> Result<PathBuf, TaskError> {
        let dir = self.work_dir.join(id);
        // A leftover of a crashed earlier attempt holds nothing anyone uses.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|source| TaskError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        res.work_dir = Some(dir.clone());
        Ok(dir)
    }

    /// Builds private images off the async threads.
    async fn build_private(dir: PathBuf, image: PathBuf) -> Result<PathBuf, TaskError> {
        let out = image.clone();
        tokio::task::spawn_blocking(move || rootfs::mkfs_erofs(&dir, &image))
            .await
            .map_err(|e| TaskError::BuildImage {
                path: out.clone(),
                source: std::io::Error::other(e),
            })??;
        Ok(out)
    }

    /// Turns the rootfs plan into attached slots; returns the guest mounts, top layer first.
    async fn attach_rootfs(
        &self,
        id: &str,
        plan: RootfsPlan,
        res: &mut Resources,
    ) -> Result<Vec<Mount>, TaskError> {
        match plan {
            RootfsPlan::Block {
                path,
                fs_type,
                read_only,
            } => {
                let source = self.attach(res, &path, read_only).await?;
                Ok(vec![mount(&fs_type, &source, read_only)])
            }
            RootfsPlan::Directory(dir) => {
                let work = self.private_dir(id, res)?;
                let image = Self::build_private(dir, work.join("rootfs.erofs")).await?;
                let source = self.attach(res, &image, true).await?;
                Ok(vec![mount("erofs", &source, true)])
            }
            RootfsPlan::Layers { lowers, upper } => {
                let lower = self.images.acquire(&lowers).await?;
                let lower_path = lower.path.clone();
                res.cached.push(lower);
                let mut mounts = Vec::new();
                if let Some(upper) = upper
                    && !rootfs::dir_is_empty(&upper)?
                {
                    let work = self.private_dir(id, res)?;
                    let image = Self::build_private(upper, work.join("upper.erofs")).await?;
                    let source = self.attach(res, &image, true).await?;
                    mounts.push(mount("erofs", &source, true));
                }
                let source = self.attach(res, &lower_path, true).await?;
                mounts.push(mount("erofs", &source, true));
                Ok(mounts)
            }
        }
    }

    /// Control.PrepareBundle: the spec (bundle files named `files/...`, which the agent
    /// resolves under the bundle it chooses) and the files. Returns the guest bundle.
    async fn prepare_bundle(&self, id: &str, spec: &GuestSpec) -> Result<String, TaskError> {
        let control = self.control()?;
        let files: Vec<BundleFile> = spec
            .files
            .iter()
            .map(|f| {
                let mut b = BundleFile::new();
                b.path.clone_from(&f.name);
                b.data.clone_from(&f.data);
                b.mode = f.mode;
                b
            })
            .collect();
        let mut req = PrepareBundleRequest::new();
        req.container_id = id.to_owned();
        req.config_json = spec.render()?;
        req.files = files;
        let resp = bounded(
            "PrepareBundle",
            Some(self.call_timeout),
            control.prepare_bundle(plain_ctx(self.call_timeout), &req),
        )
        .await?;
        Ok(resp.bundle)
    }

    async fn remove_bundle(&self, id: &str) {
        let Ok(control) = self.control() else { return };
        let mut req = RemoveBundleRequest::new();
        req.container_id = id.to_owned();
        if let Err(e) = bounded(
            "RemoveBundle",
            Some(self.call_timeout),
            control.remove_bundle(plain_ctx(self.call_timeout), &req),
        )
        .await
        {
            tracing::warn!("Container {id}: RemoveBundle: {}", e.chain());
        }
    }

    /// Seed API Prepare: reads `config.json` from `host_bundle`, attaches the root filesystem
    /// (`rootfs`, or the bundle's `root.path` when empty) and writes the guest bundle, as
    /// Create would; the engine's Create for `id` then finds it ready. Returns the guest bundle.
    pub(crate) async fn prepare(
        &self,
        id: &str,
        host_bundle: &Path,
        rootfs: &[Mount],
    ) -> Result<String, TaskError> {
        validate_id(id)?;
        self.reserve(id)?;
        let mut res = Resources::default();
        let mut bundle_written = false;
        let result = self
            .stage(id, host_bundle, rootfs, &mut res, &mut bundle_written)
            .await;
        match result {
            Ok((mounts, guest_bundle)) => {
                let prepared = Prepared {
                    host_bundle: host_bundle.display().to_string(),
                    guest_bundle: guest_bundle.clone(),
                    mounts,
                    resources: res,
                };
                self.containers
                    .lock()
                    .recover()
                    .insert(id.to_owned(), Entry::Prepared(prepared));
                tracing::info!("Prepared container {id} (guest bundle {guest_bundle})");
                Ok(guest_bundle)
            }
            Err(e) => {
                self.undo(id, res, bundle_written).await;
                Err(e)
            }
        }
    }

    /// What Create and Prepare share: reads `config.json` from `host_bundle`, attaches the
    /// root filesystem and writes the guest bundle; returns the guest mounts and bundle. Fills
    /// `res` and sets `bundle_written` as it goes, so that the caller can [`Self::undo`] it.
    async fn stage(
        &self,
        id: &str,
        host_bundle: &Path,
        rootfs: &[Mount],
        res: &mut Resources,
        bundle_written: &mut bool,
    ) -> Result<(Vec<Mount>, String), TaskError> {
        self.host_paths.check("bundle", host_bundle)?;
        let config = spec::read_config(host_bundle)?;
        let plan = rootfs::plan(rootfs, spec::root_dir(&config, host_bundle).as_deref())?;
        for path in plan.host_paths() {
            self.host_paths.check("rootfs", path)?;
        }
        let guest_spec = spec::prepare(config)?;
        let mounts = self.attach_rootfs(id, plan, res).await?;
        let guest_bundle = self.prepare_bundle(id, &guest_spec).await?;
        *bundle_written = true;
        Ok((mounts, guest_bundle))
    }

    /// Frees what a failed [`Self::stage`] (and what followed) took, and forgets `id`.
    async fn undo(&self, id: &str, res: Resources, bundle_written: bool) {
        if bundle_written {
            self.remove_bundle(id).await;
        }
        self.release(id, res).await;
        self.containers.lock().recover().remove(id);
    }

    /// Seed API Purge: frees what Prepare (and Create) took for `id`: its slots, images and
    /// guest bundle. `false` when the endpoint holds nothing for it.
    pub(crate) async fn purge(&self, id: &str) -> bool {
        let entry = {
            let mut containers = self.containers.lock().recover();
            match containers.get(id) {
                Some(Entry::Creating) | None => None,
                Some(_) => containers.remove(id),
            }
        };
        let res = match entry {
            Some(Entry::Prepared(p)) => p.resources,
            Some(Entry::Ready(c)) => c.resources,
            _ => return false,
        };
        self.remove_bundle(id).await;
        self.release(id, res).await;
        tracing::info!("Purged container {id}");
        true
    }

    /// Marks `id` as being created; fails if the endpoint knows it already.
    fn reserve(&self, id: &str) -> Result<(), TaskError> {
        let mut containers = self.containers.lock().recover();
        if containers.contains_key(id) {
            return Err(TaskError::ContainerExists(id.to_owned()));
        }
        containers.insert(id.to_owned(), Entry::Creating);
        Ok(())
    }

    /// Create of a container Prepare readied: the rootfs and bundle are in place.
    async fn create_prepared(
        &self,
        ctx: &TtrpcContext,
        req: &CreateTaskRequest,
        prepared: &Prepared,
    ) -> Result<CreateTaskResponse, TaskError> {
        if !req.bundle.is_empty()
            && req.bundle != prepared.host_bundle
            && req.bundle != prepared.guest_bundle
        {
            return Err(TaskError::invalid(
                "bundle",
                format!(
                    "{:?} is not the bundle Prepare returned for {:?} ({:?})",
                    req.bundle, req.id, prepared.host_bundle
                ),
            ));
        }
        self.forward_create(
            ctx,
            req,
            prepared.mounts.clone(),
            prepared.guest_bundle.clone(),
        )
        .await
    }

    /// Bridges the stdio of `req` and forwards it to the agent with the guest `mounts` and
    /// `guest_bundle`.
    async fn forward_create(
        &self,
        ctx: &TtrpcContext,
        req: &CreateTaskRequest,
        mounts: Vec<Mount>,
        guest_bundle: String,
    ) -> Result<CreateTaskResponse, TaskError> {
        let ([stdin, stdout, stderr], bridges) = self
            .bridge_stdio(&req.id, [&req.stdin, &req.stdout, &req.stderr])
            .await?;
        let mut fwd = req.clone();
        fwd.bundle = guest_bundle;
        fwd.rootfs = mounts;
        (fwd.stdin, fwd.stdout, fwd.stderr) = (stdin, stdout, stderr);
        let (c, timeout) = out_ctx(ctx, Some(self.call_timeout));
        let resp = bounded("Create", timeout, self.task()?.create(c, &fwd)).await?;
        self.keep_bridges(bridges);
        Ok(resp)
    }

    /// Everything of Create after the id is reserved; fills `res` as it goes so the caller
    /// can undo it.
    async fn create_inner(
        &self,
        ctx: &TtrpcContext,
        req: &CreateTaskRequest,
        res: &mut Resources,
        prepared: &mut bool,
    ) -> Result<CreateTaskResponse, TaskError> {
        let host_bundle = Path::new(&req.bundle);
        if req.bundle.is_empty() || !host_bundle.is_absolute() {
            return Err(TaskError::invalid(
                "bundle",
                format!("{:?} is not an absolute path", req.bundle),
            ));
        }
        let (mounts, guest_bundle) = self
            .stage(&req.id, host_bundle, &req.rootfs, res, prepared)
            .await?;
        self.forward_create(ctx, req, mounts, guest_bundle).await
    }

    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse, TaskError> {
        validate_id(&req.id)?;
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("Create from a checkpoint".into()));
        }
        let readied = {
            let mut containers = self.containers.lock().recover();
            match containers.get(&req.id) {
                Some(Entry::Prepared(_)) => {
                    match containers.insert(req.id.clone(), Entry::Creating) {
                        Some(Entry::Prepared(p)) => Some(p),
                        _ => None,
                    }
                }
                Some(_) => return Err(TaskError::ContainerExists(req.id.clone())),
                None => {
                    containers.insert(req.id.clone(), Entry::Creating);
                    None
                }
            }
        };
        if let Some(p) = readied {
            let result = self.create_prepared(ctx, &req, &p).await;
            let mut containers = self.containers.lock().recover();
            match result {
                Ok(resp) => {
                    let container = Container::created(ctx, &req, p.host_bundle, p.resources);
                    containers.insert(req.id.clone(), Entry::Ready(container));
                    tracing::info!(
                        "Created prepared container {} (guest pid {})",
                        req.id,
                        resp.pid
                    );
                    return Ok(resp);
                }
                Err(e) => {
                    // Still prepared: Purge frees it.
                    containers.insert(req.id.clone(), Entry::Prepared(p));
                    return Err(e);
                }
            }
        }
        let mut res = Resources::default();
        let mut prepared = false;
        let result = self.create_inner(ctx, &req, &mut res, &mut prepared).await;
        match result {
            Ok(resp) => {
                let container = Container::created(ctx, &req, req.bundle.clone(), res);
                self.containers
                    .lock()
                    .recover()
                    .insert(req.id.clone(), Entry::Ready(container));
                tracing::info!("Created container {} (guest pid {})", req.id, resp.pid);
                Ok(resp)
            }
            Err(e) => {
                tracing::info!("Create of {} failed: {}", req.id, e.chain());
                self.undo(&req.id, res, prepared).await;
                Err(e)
            }
        }
    }

    async fn delete(
        &self,
        ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> Result<DeleteResponse, TaskError> {
        let (c, timeout) = out_ctx(ctx, Some(self.call_timeout));
        let result = match self.task() {
            Ok(task) => bounded("Delete", timeout, task.delete(c, &req)).await,
            Err(e) => Err(e),
        };
        if !req.exec_id.is_empty() {
            return result;
        }
        let gone = match &result {
            Ok(_) => true,
            // The agent does not know it (any more): nothing in the VM uses the slots.
            Err(TaskError::Agent(s)) => s.code() == ttrpc::Code::NOT_FOUND,
            // The VM (or its agent connection) is gone, and the container with it.
            Err(TaskError::NoAgent(_) | TaskError::AgentUnreachable { .. }) => true,
            Err(_) => false,
        };
        if !gone {
            return result;
        }
        let entry = {
            let mut containers = self.containers.lock().recover();
            match containers.get(&req.id) {
                Some(Entry::Ready(_)) => containers.remove(&req.id),
                _ => None,
            }
        };
        let Some(Entry::Ready(c)) = entry else {
            return result;
        };
        self.release(&req.id, c.resources).await;
        tracing::info!("Deleted container {}", req.id);
        match result {
            Err(e @ (TaskError::NoAgent(_) | TaskError::AgentUnreachable { .. })) => {
                // NOT_FOUND tells the engine there is nothing left to delete.
                Err(TaskError::Agent(ttrpc::get_status(
                    ttrpc::Code::NOT_FOUND,
                    format!("Container {:?} is gone with its VM: {}", req.id, e.chain()),
                )))
            }
            other => other,
        }
    }

    async fn state(
        &self,
        ctx: &TtrpcContext,
        req: StateRequest,
    ) -> Result<StateResponse, TaskError> {
        let (c, timeout) = out_ctx(ctx, Some(self.call_timeout));
        let mut resp = bounded("State", timeout, self.task()?.state(c, &req)).await?;
        // The caller knows the container by its host bundle and stdio.
        if let Some(Entry::Ready(c)) = self.containers.lock().recover().get(&req.id) {
            resp.bundle.clone_from(&c.host_bundle);
            if req.exec_id.is_empty() {
                [resp.stdin, resp.stdout, resp.stderr] = c.stdio.clone();
            }
        }
        Ok(resp)
    }
}

/// Forwards one call to the agent with the default timeout (or none for `Wait`).
macro_rules! forward {
    ($self:ident, $ctx:ident, $req:ident, $method:ident, $name:literal) => {
        forward!($self, $ctx, $req, $method, $name, Some($self.call_timeout))
    };
    ($self:ident, $ctx:ident, $req:ident, $method:ident, $name:literal, $timeout:expr) => {{
        let (c, timeout) = out_ctx($ctx, $timeout);
        let client = $self.task()?;
        Ok(bounded($name, timeout, client.$method(c, &$req)).await?)
    }};
}

#[async_trait]
impl Task for Endpoint {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        Ok(Endpoint::create(self, ctx, req).await?)
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        forward!(self, ctx, req, start, "Start")
    }

    async fn state(&self, ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        Ok(Endpoint::state(self, ctx, req).await?)
    }

    async fn delete(
        &self,
        ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        Ok(Endpoint::delete(self, ctx, req).await?)
    }

    async fn pids(&self, ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        forward!(self, ctx, req, pids, "Pids")
    }

    async fn pause(&self, ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        forward!(self, ctx, req, pause, "Pause")
    }

    async fn resume(&self, ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        forward!(self, ctx, req, resume, "Resume")
    }

    async fn checkpoint(
        &self,
        ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        forward!(self, ctx, req, checkpoint, "Checkpoint")
    }

    async fn kill(&self, ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        forward!(self, ctx, req, kill, "Kill")
    }

    async fn exec(&self, ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let ([stdin, stdout, stderr], bridges) = self
            .bridge_stdio(
                &format!("{}-{}", req.id, req.exec_id),
                [&req.stdin, &req.stdout, &req.stderr],
            )
            .await?;
        let mut fwd = req;
        (fwd.stdin, fwd.stdout, fwd.stderr) = (stdin, stdout, stderr);
        let (c, timeout) = out_ctx(ctx, Some(self.call_timeout));
        bounded("Exec", timeout, self.task()?.exec(c, &fwd)).await?;
        self.keep_bridges(bridges);
        Ok(Empty::new())
    }

    async fn resize_pty(&self, ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        forward!(self, ctx, req, resize_pty, "ResizePty")
    }

    async fn close_io(&self, ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        forward!(self, ctx, req, close_io, "CloseIO")
    }

    async fn update(&self, ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        forward!(self, ctx, req, update, "Update")
    }

    async fn wait(&self, ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        forward!(self, ctx, req, wait, "Wait", None)
    }

    async fn stats(&self, ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        forward!(self, ctx, req, stats, "Stats")
    }

    async fn connect(
        &self,
        ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let (c, timeout) = out_ctx(ctx, Some(self.call_timeout));
        let mut resp = bounded("Connect", timeout, self.task()?.connect(c, &req)).await?;
        // The "shim" is this process; the agent's pid means nothing on the host.
        resp.shim_pid = std::process::id();
        Ok(resp)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        // The VM's end belongs to Controller.Stop/Shutdown, never to the Task API.
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "c-1_x.y", &"x".repeat(proto::id::MAX_ID_LEN)] {
            validate_id(good).unwrap();
        }
        // The same rule as the Sandbox APIs' (a 129-255 byte id used to pass here only).
        for bad in ["", ".x", "-x", "a/b", "../x", "a b", &"x".repeat(129)] {
            let e = validate_id(bad).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{bad}");
        }
    }

    #[test]
    fn timeouts_take_the_shorter() {
        let mut ctx = TtrpcContext {
            mh: Default::default(),
            metadata: HashMap::from([(NAMESPACE_KEY.to_owned(), vec!["k8s.io".to_owned()])]),
            timeout_nano: 0,
            connection_data: Default::default(),
        };
        let (c, t) = out_ctx(&ctx, Some(Duration::from_secs(5)));
        assert_eq!(t, Some(Duration::from_secs(5)));
        assert_eq!(c.timeout_nano, 5_000_000_000);
        assert_eq!(c.metadata[NAMESPACE_KEY], vec!["k8s.io".to_owned()]);
        let (c, t) = out_ctx(&ctx, None);
        assert_eq!((c.timeout_nano, t), (0, None));
        ctx.timeout_nano = 1_000_000_000;
        let (_, t) = out_ctx(&ctx, Some(Duration::from_secs(5)));
        assert_eq!(t, Some(Duration::from_secs(1)));
        let (_, t) = out_ctx(&ctx, None);
        assert_eq!(t, Some(Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn bounded_calls() {
        let e = bounded("Start", Some(Duration::from_millis(10)), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .await
        .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::DEADLINE_EXCEEDED);
        assert_eq!(e.to_string(), "The agent did not answer Start within 0 s");
        let e = bounded::<()>("Kill", Some(Duration::from_secs(1)), async {
            Err(ttrpc::Error::Others(TTRPC_DEADLINE.into()))
        })
        .await
        .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::DEADLINE_EXCEEDED);
        let e = bounded::<()>("Wait", None, async { Err(ttrpc::Error::RemoteClosed) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::UNAVAILABLE);
        assert_eq!(bounded("Pids", None, async { Ok(3) }).await.unwrap(), 3);
    }
}
