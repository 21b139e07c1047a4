// SPDX-License-Identifier: Apache-2.0
//! The daemon: serves the containerd 2.x API and the seed API on unix sockets over one sandbox
//! service, tells systemd when both listen, and stops gracefully on request.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::api::admin::AdminApi;
use crate::api::seed::SeedApi;
use crate::api::v2::V2Api;
use crate::backend::VmBackend;
use crate::config::{Config, OnExit};
use crate::error::error_chain;
use crate::notify;
use crate::service::{SandboxService, ServiceConfig};
use crate::store::StoreError;

mod authority;

/// Idle time after which a thread of the daemon runtime's blocking pool exits. The pool runs
/// what waits on a VM's threads or the guest (VM creation, the guest's ready dial, Stop, the
/// teardown wait, record writes); a burst of starts grows it to the burst's concurrency, and
/// this gives those threads back soon after, so an idle daemon holds no thread per sandbox
/// it once ran. Creating a thread again costs tens of microseconds.
pub const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Most threads the blocking pool grows to; blocking work beyond it waits for a thread.
pub const MAX_BLOCKING_THREADS: usize = 256;

/// The daemon's multi-threaded runtime, its threads named `thread_name`.
pub fn runtime(thread_name: &str) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(thread_name)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
}

pub use authority::AuthorityFix;

/// How long in-flight calls may run after the daemon stopped accepting.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves the socket.
    #[error("Socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// The socket path holds something that is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding or preparing the socket failed.
    #[error("Failed to listen on {0}")]
    Bind(PathBuf, #[source] io::Error),
    /// A gRPC server failed.
    #[error("gRPC server on {0} failed")]
    Serve(PathBuf, #[source] tonic::transport::Error),
    /// Loading the persisted sandboxes failed.
    #[error("Failed to load sandbox records")]
    Recover(#[source] StoreError),
    /// A server task panicked or was cancelled.
    #[error("Server task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The metrics endpoint could not listen.
    #[error("Cannot serve metrics on {0}")]
    Metrics(String, #[source] io::Error),
    /// The guest kernel or agent initramfs embedded in the binary could not be unpacked.
    #[error("Failed to unpack the embedded guest kernel or agent initramfs")]
    Embedded(#[source] io::Error),
    /// `[cgroup] enabled = true` and no usable cpu controller.
    #[error("Per-sandbox CPU cgroups are required ([cgroup] enabled = true) and unusable")]
    Cgroup(#[source] crate::cgroup::CgroupError),
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds a unix socket at `path`, replacing a stale socket left by a previous process.
///
/// Refuses to touch a path that is not a socket, or a socket another process still serves.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let err = |e| ServerError::Bind(path.to_path_buf(), e);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Most connections one API socket keeps open at once. Past it the socket is not accepted
/// from until a connection closes (new clients wait in the listen backlog): a client that
/// opens connections without end takes slots, not the daemon's descriptors.
pub const MAX_API_CONNECTIONS: usize = 1024;
/// Both API servers, running.
#[derive(Debug)]
pub struct Servers {
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<(), ServerError>>,
    sockets: Vec<PathBuf>,
}

impl Servers {
    /// Binds `socket` (containerd 2.x API) and `seed_socket` (seed API, if any) and serves them.
    pub fn start<B: VmBackend>(
        service: &Arc<SandboxService<B>>,
        socket: &Path,
        seed_socket: Option<&Path>,
    ) -> Result<Self, ServerError> {
        let (stop, _) = watch::channel(false);
        let mut servers = Servers {
            stop,
            tasks: JoinSet::new(),
            sockets: Vec::new(),
        };
        let v2 = bind(socket)?;
        servers.sockets.push(socket.to_path_buf());
        let seed = match seed_socket {
            Some(p) => match bind(p) {
                Ok(l) => {
                    servers.sockets.push(p.to_path_buf());
                    Some((p, l))
                }
                Err(e) => {
                    servers.remove_sockets();
                    return Err(e);
                }
            },
            None => None,
        };

        // The operator's API (`sandboxer ps`, ...) shares the engine's socket and its access.
        let router = tonic::transport::Server::builder()
            .add_service(V2Api::new(Arc::clone(service)).into_server())
            .add_service(AdminApi::new(Arc::clone(service)).into_server());
        servers.spawn(socket, v2, router);
        if let Some((path, listener)) = seed {
            let router = tonic::transport::Server::builder()
                .add_service(SeedApi::new(Arc::clone(service)).into_server());
            servers.spawn(path, listener, router);
        }
        Ok(servers)
    }

    fn spawn(
        &mut self,
        path: &Path,
        listener: UnixListener,
        router: tonic::transport::server::Router,
    ) {
        let mut stop = self.stop.subscribe();
        let path = path.to_path_buf();
        info!(socket = %path.display(), "listening");
        self.tasks.spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    crate::accept::incoming(
                        listener,
                        path.clone(),
                        MAX_API_CONNECTIONS,
                        |s, slot| AuthorityFix::new(s).holding(slot),
                    ),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await
                .map_err(|e| ServerError::Serve(path, e))
        });
    }

    /// The socket paths served.
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// Resolves when a server ends by itself (an error: servers run until told to stop).
    pub async fn failed(&mut self) -> ServerError {
        match self.tasks.join_next().await {
            Some(Ok(Err(e))) => e,
            Some(Err(e)) => ServerError::Task(e),
            // Ended without error or no servers at all: still not what a daemon wants.
            Some(Ok(Ok(()))) | None => ServerError::Bind(
                self.sockets.first().cloned().unwrap_or_default(),
                io::Error::other("server ended"),
            ),
        }
    }

    /// Stops accepting new connections; in-flight calls go on.
    pub fn stop_accepting(&self) {
        self.stop.send_replace(true);
    }

    /// Waits up to `drain` for in-flight calls, then drops what is left and removes the sockets.
    pub async fn finish(mut self, drain: Duration) {
        self.stop_accepting();
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(drain, all).await.is_err() {
            warn!("in-flight calls did not finish in time; dropping them");
            self.tasks.abort_all();
        }
        self.remove_sockets();
    }

    fn remove_sockets(&mut self) {
        for s in self.sockets.drain(..) {
            let _ = std::fs::remove_file(&s);
        }
    }
}

/// The sandboxes' CPU cgroups per `[cgroup]`, with what a previous daemon left under them
/// removed (no VM of this process runs yet). Logged once.
fn sandbox_cgroups(config: &Config) -> Result<Option<crate::cgroup::CpuCgroups>, ServerError> {
    let cgroups =
        crate::cgroup::CpuCgroups::from_config(&config.cgroup).map_err(ServerError::Cgroup)?;
    if let Some(cgroups) = &cgroups {
        for e in cgroups.remove_leftovers() {
            warn!(error = %error_chain(&e), "a sandbox CPU cgroup is still in use; leaving it");
        }
        info!(
            version = if cgroups.is_v2() { 2 } else { 1 },
            dir = %cgroups.base_dir().display(),
            "per-sandbox CPU cgroups on"
        );
    }
    Ok(cgroups)
}

/// Runs the daemon until `shutdown` resolves: recovers persisted sandboxes, serves both APIs,
/// notifies systemd, then stops accepting, applies `on_exit` and drains.
pub async fn run<B: VmBackend>(
    config: &Config,
    backend: B,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let mut config = config.clone();
    // Held until the daemon ends: VMs boot from these memfds.
    let embedded = config.use_embedded().map_err(ServerError::Embedded)?;
    for (artifact, file) in [&embedded.kernel, &embedded.initramfs]
        .into_iter()
        .flatten()
    {
        info!(
            version = artifact.version,
            bytes = file.len(),
            "using the embedded {}",
            artifact.what
        );
    }
    if config.kernel().is_none() {
        warn!("no guest kernel: vm.kernel is empty and none is embedded; Start will fail");
    }
    if config.initramfs().is_none() {
        warn!("no agent initramfs: vm.initramfs is empty and none is embedded; Start will fail");
    }
    let config = &config;
    let mut service_config = ServiceConfig::from(config);
    service_config.cgroups = sandbox_cgroups(config)?;
    let service = SandboxService::new(backend, service_config);
    let recovery = service.recover().map_err(ServerError::Recover)?;
    for e in &recovery.unreadable {
        warn!(error = %error_chain(e), "skipping unreadable sandbox record");
    }
    info!(
        restored = recovery.restored,
        lost = recovery.lost.len(),
        removed = recovery.removed.len(),
        migrated = recovery.migrated.len(),
        "sandbox records loaded"
    );
    let mut servers = Servers::start(&service, &config.api.socket, config.seed_socket())?;
    // Served until the daemon ends (dropping it stops the endpoint).
    let _metrics = match config.metrics.address() {
        Some(addr) => {
            let source: Arc<dyn crate::metrics::Source> = service.clone();
            let (_, task) = crate::metrics::serve(addr, source)
                .await
                .map_err(|e| ServerError::Metrics(config.metrics.listen.clone(), e))?;
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    service.warm_up().await;
    match notify::notify("READY=1") {
        Ok(true) => info!("notified systemd"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "cannot notify systemd"),
    }
    info!(state_dir = %config.state_dir.display(), "sandboxer ready");

    let result = tokio::select! {
        () = shutdown => Ok(()),
        e = servers.failed() => Err(e),
    };
    let _ = notify::notify("STOPPING=1");
    servers.stop_accepting();
    match config.on_exit {
        OnExit::Stop => {
            info!("stopping all sandboxes");
            service
                .stop_all(Duration::from_secs(u64::from(config.stop_timeout_secs)))
                .await;
        }
        OnExit::Leave => info!("leaving sandboxes as recorded"),
    }
    servers.finish(DRAIN_TIMEOUT).await;
    info!("sandboxer stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/api.sock");
        // Stale: bound, then the listener is gone.
        drop(bind(&path).unwrap());
        assert!(path.exists());
        let live = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ServerError::SocketInUse(_))));
        drop(live);
        let file = tmp.path().join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(bind(&file), Err(ServerError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
