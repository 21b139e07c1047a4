// SPDX-License-Identifier: Apache-2.0
//! The host-side Task endpoint: `ttrpc+unix://<state dir>/<id>/task.sock`, served by the
//! sandboxer itself for each sandbox (DESIGN.md §2 "Task path").
//!
//! containerd and iSulad send the containerd Task API here (registered as
//! `containerd.task.v3.Task` and `containerd.task.v2.Task`; the messages are the same), with
//! host bundle paths and host rootfs mounts. [`TaskServer`] intercepts `Create`: reads the
//! host bundle's `config.json`, turns the rootfs into block images attached to the VM's slots
//! ([`rootfs`]), rewrites the spec for the guest ([`spec`]), has the agent make a guest bundle
//! (`Control.PrepareBundle`) and forwards `Create` with the guest bundle and the attached
//! layers. `Delete` is forwarded, then the container's slots are detached and its images
//! dropped. Every other call is forwarded to the agent unchanged, errors keep their ttrpc
//! codes, and every call but `Wait` has a timeout ([`TaskOptions::call_timeout`]).
//! A background task forwards the agent's OOM events to containerd ([`events`]).
//!
//! ```text
//! containerd ──ttrpc──> task.sock ──> service::Endpoint ──TaskTarget::agent()──> agent
//!                                        │ Create/Delete
//!                                        ├─> rootfs (erofs images, ImageCache) ─> attach_disk
//!                                        └─> spec (guest config.json, bundle files)
//! ```
//!
//! Stdio ([`stdio`]): containerd's `Streaming` service on the same socket is proxied to the
//! agent stream for stream, so `io_type = "streaming"` URLs go to the agent unchanged; FIFO
//! (or file) paths are opened here and bridged to agent streams.

pub mod conn;
pub mod error;
pub mod events;
pub mod handover;
pub mod paths;
pub mod rootfs;
pub mod service;
pub mod spec;
pub mod stdio;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api::Mount;
use containerd_shim_protos::shim_async::create_task;
use devices::sync::Recover;
use proto::agent::streaming_ttrpc::create_streaming;
use ttrpc::asynchronous::Service;

pub use self::error::TaskError;
pub use self::handover::{TaskCut, TaskCutter, TaskState};
pub use self::paths::HostPaths;
pub use self::rootfs::ImageCache;
use self::service::Endpoint;
use crate::backend::TaskTarget;

/// Service name containerd >= 2.1 uses.
pub const TASK_V3: &str = "containerd.task.v3.Task";
/// Service name of the v2 API (iSulad); same messages.
pub const TASK_V2: &str = "containerd.task.v2.Task";
/// Default bound on a forwarded call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of one sandbox's endpoint.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// Lower-chain images, shared by all sandboxes of the daemon (one cache per daemon; put
    /// its directory on disk, e.g. `/var/lib/sandboxer/images`, not on a tmpfs).
    pub images: Arc<ImageCache>,
    /// Per-container images of this sandbox go to `<work_dir>/<container id>/`.
    pub work_dir: PathBuf,
    /// containerd's socket (`/run/containerd/containerd.sock`): OOM events go to
    /// `<it>.ttrpc`. `None`: they are only logged.
    pub containerd_address: Option<PathBuf>,
    /// Bound on every forwarded call but `Wait` (the caller's own timeout wins when shorter).
    pub call_timeout: Duration,
    /// Where the host paths of Create and Exec (rootfs sources, bundle, stdio) must lie.
    pub host_paths: HostPaths,
}

impl TaskOptions {
    /// Options with the default timeout, no containerd address and the default host paths
    /// ([`paths::DEFAULT_ROOTS`]).
    pub fn new(images: Arc<ImageCache>, work_dir: impl Into<PathBuf>) -> Self {
        Self {
            images,
            work_dir: work_dir.into(),
            containerd_address: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            host_paths: HostPaths::defaults(),
        }
    }
}

/// Registers `endpoint` under both Task service names, and the stream proxy.
fn services(endpoint: Arc<Endpoint>, target: Arc<dyn TaskTarget>) -> HashMap<String, Service> {
    let proxies = Arc::clone(&endpoint.proxies);
    let mut all = create_task(endpoint.clone());
    let mut v2 = create_task(endpoint);
    if let Some(service) = v2.remove(TASK_V3) {
        all.insert(TASK_V2.to_owned(), service);
    }
    all.extend(create_streaming(Arc::new(stdio::StreamProxy::new(
        target, proxies,
    ))));
    all
}

/// One sandbox's Task endpoint, serving until [`TaskServer::shutdown`].
pub struct TaskServer {
    /// In a mutex only to make the endpoint `Sync` (the server is not); used once, at shutdown.
    server: std::sync::Mutex<ttrpc::asynchronous::Server>,
    socket: PathBuf,
    endpoint: Arc<Endpoint>,
    events: tokio::task::JoinHandle<()>,
    /// Its connections, which a live upgrade cuts.
    conns: Arc<conn::Connections>,
    /// A second descriptor of the listening socket, for a live upgrade.
    listener: Arc<std::os::fd::OwnedFd>,
    /// What a cut stopped of the stdio copies, for a thaw.
    held: handover::Held,
}

/// Prepare and Purge on a sandbox's Task endpoint (the seed API's way of adding containers).
#[derive(Clone, Debug)]
pub struct TaskHandle(Arc<Endpoint>);

impl TaskHandle {
    /// Prepares container `id`: attaches its root filesystem (`rootfs`, or the bundle's
    /// `root.path`) and writes its guest bundle from `host_bundle`'s `config.json`; a later
    /// Task.Create of `id` on the socket only forwards. Returns the guest bundle.
    pub async fn prepare(
        &self,
        id: &str,
        host_bundle: &Path,
        rootfs: &[Mount],
    ) -> Result<String, TaskError> {
        self.0.prepare(id, host_bundle, rootfs).await
    }

    /// Frees what container `id` holds: its slots, images and guest bundle. `false` when
    /// nothing was held for it.
    pub async fn purge(&self, id: &str) -> bool {
        self.0.purge(id).await
    }
}

impl fmt::Debug for TaskServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskServer")
            .field("socket", &self.socket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Most connections one sandbox's Task API socket keeps open at once (containerd holds a few:
/// the task client, the streaming client, a shim-style health check).
pub const MAX_TASK_CONNECTIONS: usize = 128;

impl TaskServer {
    /// Serves the Task API on `socket` (a stale file there is replaced) for the sandbox VM
    /// behind `target`. Call it once the agent is ready.
    pub async fn start(
        socket: &Path,
        target: Arc<dyn TaskTarget>,
        opts: TaskOptions,
    ) -> Result<Self, TaskError> {
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(TaskError::Io {
                    op: "remove",
                    path: socket.to_owned(),
                    source: e,
                });
            }
            _ => {}
        }
        let listener =
            std::os::unix::net::UnixListener::bind(socket).map_err(|e| TaskError::Io {
                op: "bind",
                path: socket.to_owned(),
                source: e,
            })?;
        let endpoint = Arc::new(Endpoint::new(target.clone(), &opts, socket));
        Self::serve(socket, listener.into(), endpoint, target, opts, Vec::new()).await
    }

    /// Serves on what a live upgrade cut in the previous process ([`TaskCutter::cut`]): the
    /// same socket and connections (the calls left unanswered go to the server first), and
    /// the same containers.
    pub async fn adopt(
        socket: &Path,
        target: Arc<dyn TaskTarget>,
        opts: TaskOptions,
        cut: TaskCut,
    ) -> Result<Self, TaskError> {
        let parts = cut.adopt(&opts.images);
        let endpoint = Endpoint::new(target.clone(), &opts, socket);
        endpoint
            .containers
            .lock()
            .recover()
            .extend(parts.containers);
        endpoint.proxies.expect(parts.streams);
        let endpoint = Arc::new(endpoint);
        handover::resume_bridges(&endpoint, parts.bridges).await;
        Self::serve(
            socket,
            parts.listener,
            endpoint,
            target,
            opts,
            parts.connections,
        )
        .await
    }

    async fn serve(
        socket: &Path,
        listener: std::os::fd::OwnedFd,
        endpoint: Arc<Endpoint>,
        target: Arc<dyn TaskTarget>,
        opts: TaskOptions,
        adopted: Vec<(std::os::fd::OwnedFd, Vec<u8>)>,
    ) -> Result<Self, TaskError> {
        let io = |op| {
            let path = socket.to_owned();
            move |source| TaskError::Io { op, path, source }
        };
        let second = listener.try_clone().map_err(io("duplicate"))?;
        let listener = std::os::unix::net::UnixListener::from(listener);
        listener.set_nonblocking(true).map_err(io("listen on"))?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(io("listen on"))?;
        let conns = conn::Connections::new();
        let mut first: Vec<crate::accept::Adopted<conn::Tracked>> = Vec::new();
        for (fd, unanswered) in adopted {
            let stream = std::os::unix::net::UnixStream::from(fd);
            stream
                .set_nonblocking(true)
                .map_err(io("take over a connection of"))?;
            let stream = tokio::net::UnixStream::from_std(stream)
                .map_err(io("take over a connection of"))?;
            let conns = Arc::clone(&conns);
            first.push(Box::new(move |slot| conns.track(stream, slot, unanswered)));
        }
        let serve_err = |e| TaskError::Serve(socket.to_owned(), e);
        // ttrpc's own accept loop retries a failed accept at once (a spinning core while the
        // daemon is out of descriptors): the daemon's accepts for it (`crate::accept`), and
        // follows the frames of each connection (`conn`) so that an upgrade can pass it on.
        let tracker = Arc::clone(&conns);
        let incoming = crate::accept::incoming_with(
            listener,
            socket.to_owned(),
            MAX_TASK_CONNECTIONS,
            move |stream, slot| tracker.track(stream, slot, Vec::new()),
            Some(conns.pause()),
            first,
        );
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(ttrpc::asynchronous::transport::Listener::new(incoming))
            .register_service(services(endpoint.clone(), target));
        server.start().await.map_err(serve_err)?;
        let events = tokio::spawn(events::run(
            endpoint.clone(),
            opts.containerd_address.clone(),
        ));
        tracing::info!("Serving the Task API on {}", socket.display());
        Ok(Self {
            server: std::sync::Mutex::new(server),
            socket: socket.to_owned(),
            endpoint,
            events,
            conns,
            listener: Arc::new(second),
            held: handover::Held::default(),
        })
    }

    /// What cuts this endpoint for a live upgrade.
    pub fn cutter(&self) -> TaskCutter {
        TaskCutter {
            endpoint: Arc::clone(&self.endpoint),
            conns: Arc::clone(&self.conns),
            listener: Arc::clone(&self.listener),
            held: Arc::clone(&self.held),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The address for the engine: `ttrpc+unix://<socket>`.
    pub fn address(&self) -> String {
        format!("ttrpc+unix://{}", self.socket.display())
    }

    /// Ids of the containers whose root filesystems the endpoint holds.
    pub fn container_ids(&self) -> Vec<String> {
        self.endpoint.container_ids()
    }

    /// A handle for the seed API's Prepare and Purge, usable while the server runs.
    pub fn handle(&self) -> TaskHandle {
        TaskHandle(self.endpoint.clone())
    }

    /// Stops serving, removes the socket, detaches every slot it attached and drops its
    /// images. Containers in the VM are not touched (the VM's end is the caller's).
    pub async fn shutdown(self) {
        self.events.abort();
        let mut server = self
            .server
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = server.shutdown().await {
            tracing::warn!("Stopping the Task server: {e}");
        }
        if let Err(e) = std::fs::remove_file(&self.socket)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("Removing {}: {e}", self.socket.display());
        }
        self.endpoint.release_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_service_names() {
        let tmp = tempfile::tempdir().unwrap();
        let images = Arc::new(ImageCache::new(&tmp.path().join("images")).unwrap());
        let target: Arc<dyn TaskTarget> = Arc::new(NoAgent);
        let ep = Arc::new(Endpoint::new(
            target.clone(),
            &TaskOptions::new(images, tmp.path()),
            &tmp.path().join("task.sock"),
        ));
        let s = services(ep, target);
        assert_eq!(s.len(), 3);
        assert!(s.contains_key(TASK_V3) && s.contains_key(TASK_V2));
        assert!(s.contains_key(stdio::STREAMING));
    }

    /// A target whose VM has no agent.
    #[derive(Debug)]
    struct NoAgent;

    #[async_trait::async_trait]
    impl TaskTarget for NoAgent {
        fn agent(&self) -> Result<ttrpc::asynchronous::Client, crate::backend::BackendError> {
            Err(crate::backend::BackendError::NotRunning)
        }
        async fn attach_disk(
            &self,
            _: &Path,
            _: bool,
        ) -> Result<crate::backend::AttachedDisk, crate::backend::BackendError> {
            Err(crate::backend::BackendError::NotRunning)
        }
        async fn detach_disk(&self, _: u32) -> Result<(), crate::backend::BackendError> {
            Err(crate::backend::BackendError::NotRunning)
        }
    }

    #[tokio::test]
    async fn calls_without_an_agent_are_unavailable() {
        use containerd_shim_protos::api::StateRequest;
        use containerd_shim_protos::shim_async::{Client, TaskClient};

        let tmp = tempfile::tempdir().unwrap();
        let images = Arc::new(ImageCache::new(&tmp.path().join("images")).unwrap());
        let sock = tmp.path().join("task.sock");
        std::fs::write(&sock, b"stale").unwrap();
        let server = TaskServer::start(
            &sock,
            Arc::new(NoAgent),
            TaskOptions::new(images, tmp.path().join("work")),
        )
        .await
        .unwrap();
        assert_eq!(server.address(), format!("ttrpc+unix://{}", sock.display()));
        let client = Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let task = TaskClient::new(client);
        let mut req = StateRequest::new();
        req.id = "c1".into();
        match task
            .state(ttrpc::context::with_duration(Duration::from_secs(5)), &req)
            .await
        {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::UNAVAILABLE, "{}", s.message());
                assert!(
                    s.message().contains("no agent connection"),
                    "{}",
                    s.message()
                );
            }
            other => panic!("{other:?}"),
        }
        server.shutdown().await;
        assert!(!sock.exists());
    }
}

#[cfg(test)]
mod send_sync {
    #[test]
    fn task_server_can_live_in_shared_state() {
        fn check<T: Send + Sync>() {}
        check::<super::TaskServer>();
        check::<super::TaskOptions>();
    }
}
