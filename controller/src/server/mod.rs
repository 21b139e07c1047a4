// SPDX-License-Identifier: Apache-2.0
//! The daemon: serves the containerd 2.x API and the seed API on unix sockets over one sandbox
//! service, tells systemd when both listen, and stops gracefully on request.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::net::UnixListener;
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
    /// `[cgroup] charge_memory = true` and no memory cgroup hierarchy to charge to.
    #[error("[cgroup] charge_memory needs a cgroup hierarchy with the memory controller")]
    MemoryCgroup(#[source] crate::cgroup::CgroupError),
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
    /// A second descriptor of each listening socket, in `sockets` order: what a live upgrade
    /// passes on to the new process.
    listeners: Vec<UnixListener>,
}

impl Servers {
    /// Binds `socket` (containerd 2.x API) and `seed_socket` (seed API, if any) and serves them.
    pub fn start<B: VmBackend>(
        service: &Arc<SandboxService<B>>,
        socket: &Path,
        seed_socket: Option<&Path>,
    ) -> Result<Self, ServerError> {
        let v2 = (socket.to_path_buf(), bind(socket)?);
        let seed = match seed_socket {
            Some(p) => match bind(p) {
                Ok(l) => Some((p.to_path_buf(), l)),
                Err(e) => {
                    let _ = std::fs::remove_file(socket);
                    return Err(e);
                }
            },
            None => None,
        };
        Self::start_on(service, v2, seed)
    }

    /// Serves the containerd 2.x API on `v2` and the seed API on `seed`, sockets bound already
    /// (by this process, or by the process it took over from).
    pub fn start_on<B: VmBackend>(
        service: &Arc<SandboxService<B>>,
        v2: (PathBuf, UnixListener),
        seed: Option<(PathBuf, UnixListener)>,
    ) -> Result<Self, ServerError> {
        let (stop, _) = watch::channel(false);
        let mut servers = Servers {
            stop,
            tasks: JoinSet::new(),
            sockets: Vec::new(),
            listeners: Vec::new(),
        };
        // The operator's API (`sandboxer ps`, ...) shares the engine's socket and its access.
        let router = tonic::transport::Server::builder()
            .add_service(V2Api::new(Arc::clone(service)).into_server())
            .add_service(AdminApi::new(Arc::clone(service)).into_server());
        servers.spawn(v2, router)?;
        if let Some(seed) = seed {
            let router = tonic::transport::Server::builder()
                .add_service(SeedApi::new(Arc::clone(service)).into_server());
            if let Err(e) = servers.spawn(seed, router) {
                servers.remove_sockets();
                return Err(e);
            }
        }
        Ok(servers)
    }

    /// The listening sockets with their paths (second descriptors), for a live upgrade.
    pub fn listeners(&self) -> std::io::Result<Vec<(PathBuf, UnixListener)>> {
        self.sockets
            .iter()
            .zip(&self.listeners)
            .map(|(p, l)| Ok((p.clone(), l.try_clone()?)))
            .collect()
    }

    fn spawn(
        &mut self,
        (path, listener): (PathBuf, UnixListener),
        router: tonic::transport::server::Router,
    ) -> Result<(), ServerError> {
        let err = |e| ServerError::Bind(path.clone(), e);
        listener.set_nonblocking(true).map_err(err)?;
        self.listeners.push(listener.try_clone().map_err(err)?);
        let listener = tokio::net::UnixListener::from_std(listener).map_err(err)?;
        self.sockets.push(path.clone());
        let mut stop = self.stop.subscribe();
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
        Ok(())
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

/// Serves one upgrade request: hands everything over to a new process and ends this one, or
/// says why nothing moved (and goes on serving).
async fn upgrade<B: VmBackend>(
    service: &Arc<SandboxService<B>>,
    config: &Config,
    servers: &Servers,
    request: crate::service::handover::UpgradeRequest,
) {
    let reply = |r: Result<crate::upgrade::Report, String>| {
        if let Some(tx) = request.reply {
            let _ = tx.send(r);
        }
    };
    let listeners = match servers.listeners() {
        Ok(l) => l,
        Err(e) => return reply(Err(format!("cannot pass the API sockets on: {e}"))),
    };
    let binary = match request.binary.clone().map_or_else(running_binary, Ok) {
        Ok(b) => b,
        Err(e) => return reply(Err(format!("cannot find the running binary: {e}"))),
    };
    let path = config.state_dir.join(crate::upgrade::SOCKET);
    let socket = match bind(&path) {
        Ok(l) => (path, l),
        Err(e) => return reply(Err(error_chain(&e))),
    };
    let plan = crate::upgrade::Plan {
        binary,
        args: crate::upgrade::own_serve_args(),
        socket,
        listeners,
    };
    match crate::upgrade::give(service, plan).await {
        Ok((report, freeze)) => {
            info!(
                new_pid = report.new_pid,
                sandboxes = report.sandboxes,
                total_us = report.total_us,
                "upgrade done: the new process took over; exiting"
            );
            reply(Ok(report));
            // The VMs' host connections end now, not when this process is gone.
            freeze.release().await;
            // Time for the answer to reach the caller; nothing is served meanwhile.
            tokio::time::sleep(Duration::from_millis(200)).await;
            // The VMs, sockets and files are the new process's: tear nothing down.
            std::mem::forget(freeze);
            crate::upgrade::exit_without_teardown(0);
        }
        Err(e) => {
            let why = error_chain(&e);
            warn!(error = %why, "upgrade failed; every sandbox stays here");
            reply(Err(why));
        }
    }
}

/// The path of the running binary: where a package update put the new one (a replaced file
/// shows as `<path> (deleted)`).
fn running_binary() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// The sandboxes' CPU cgroups per `[cgroup]`, with what a previous daemon left under them
/// removed when `clean` (no VM of this process runs yet; a takeover keeps them: the VMs it
/// takes over are in them). Logged once.
fn sandbox_cgroups(
    config: &Config,
    clean: bool,
) -> Result<Option<crate::cgroup::CpuCgroups>, ServerError> {
    let cgroups =
        crate::cgroup::CpuCgroups::from_config(&config.cgroup).map_err(ServerError::Cgroup)?;
    if let Some(cgroups) = &cgroups {
        let left = if clean {
            cgroups.remove_leftovers()
        } else {
            Vec::new()
        };
        for e in left {
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
    run_with(config, backend, shutdown, None).await
}

/// [`run`], first taking over the sandboxes and API sockets of the daemon that listens for a
/// handover on `takeover` (a live upgrade, [`crate::upgrade::take`]), if given. A takeover
/// that fails ends this process at once, dropping nothing: the old daemon keeps everything.
pub async fn run_with<B: VmBackend>(
    config: &Config,
    backend: B,
    shutdown: impl Future<Output = ()>,
    takeover: Option<&Path>,
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
    service_config.cgroups = sandbox_cgroups(config, takeover.is_none())?;
    service_config.memory_cgroups = if config.cgroup.charge_memory {
        let found = crate::memcg::MemoryCgroups::probe(&config.cgroup.parent)
            .map_err(ServerError::MemoryCgroup)?;
        info!(dir = %found.dir(std::path::Path::new("")).display(), "guest memory charged per sandbox");
        Some(found)
    } else {
        None
    };
    let service = SandboxService::new(backend, service_config);
    let taken = match takeover {
        Some(socket) => match crate::upgrade::take(&service, socket).await {
            Ok(taken) => Some(taken),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot take over; the running sandboxer keeps its sandboxes");
                // Nothing here may be torn down: it is the old daemon's.
                crate::upgrade::exit_without_teardown(1);
            }
        },
        None => None,
    };
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
    let mut servers = match taken {
        Some(taken) => {
            let mut listeners = taken.listeners.into_iter();
            let v2 = listeners.next().ok_or_else(|| {
                ServerError::Bind(config.api.socket.clone(), io::Error::other("not passed on"))
            })?;
            Servers::start_on(&service, v2, listeners.next())?
        }
        None => Servers::start(&service, &config.api.socket, config.seed_socket())?,
    };
    let (upgrades, mut upgrade_requests) = tokio::sync::mpsc::channel(1);
    service.accept_upgrades(upgrades);
    let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
        .map_err(|e| ServerError::Bind(config.api.socket.clone(), e))?;
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

    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let request = tokio::select! {
            () = &mut shutdown => break Ok(()),
            e = servers.failed() => break Err(e),
            Some(request) = upgrade_requests.recv() => request,
            Some(()) = usr2.recv() => {
                info!("SIGUSR2 received: upgrading");
                crate::service::handover::UpgradeRequest { binary: None, reply: None }
            }
        };
        upgrade(&service, config, &servers, request).await;
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
