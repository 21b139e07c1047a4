// SPDX-License-Identifier: Apache-2.0
//! `sandboxer-agent`: PID 1 of the sandbox VM, serving the containerd Task API over ttrpc.
//!
//! In the VM (no arguments) it blocks the signals it handles (before any thread exists, so
//! every thread inherits the mask), mounts the boot file systems, reads its settings from
//! `/proc/cmdline`, starts the ttrpc server on vsock port `sandboxer.port`, prints
//! `sandboxer-agent: ready` on the console, dials the host's ready port (see
//! [`agent::transport`]) and then serves signals from a signalfd: `SIGCHLD` reaps children,
//! `SIGTERM`/`SIGINT` (Ctrl-Alt-Del is turned into `SIGINT`) shut the VM down, and so does the
//! host's `Control.Shutdown` (with its own grace time). If setup fails
//! the agent logs the error and ends the VM rather than letting the kernel panic on a dead init.
//!
//! On a host (tests), `--listen unix:<path>` runs it as an ordinary root process: no mounts,
//! no reboot; it becomes a child subreaper, serves until `SIGTERM`/`SIGINT` or
//! `Control.Shutdown`, then kills and deletes its containers and exits.
//!
//! One ttrpc server carries the Task services (v3 and v2) and the sandboxer's Control service
//! ([`agent::control`]); both share one [`Events`] queue.
//!
//! ```text
//! sandboxer-agent [--listen vsock:<port>|unix:<path>] [--ready-fd <fd>] [--state-dir <dir>]
//!                 [--cgroup-parent <name>]
//! ```
//!
//! The agent runs on one thread (a current-thread tokio runtime that also reads the
//! signalfd): libcontainer forks, and a fork while another thread holds the allocator's lock
//! would deadlock the child.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::cmdline::{self, AgentConfig};
use agent::console;
use agent::control::{self, ControlConfig, ControlService, ShutdownOrder};
use agent::events::Events;
use agent::mounts;
use agent::reaper::Reaper;
use agent::shutdown::shutdown;
use agent::task::{self, TaskService};
use agent::transport::{self, ListenAddr};
use anyhow::{Context, Result, bail};
use nix::sys::reboot::set_cad_enabled;
use nix::sys::signal::{SigSet, Signal, raise};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::getpid;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// Where the agent keeps container state unless `--state-dir` says otherwise.
const DEFAULT_STATE_DIR: &str = "/run/sandboxer-agent";
/// After `Control.Shutdown` answered, how long the server keeps running so the answer reaches
/// the host before the VM ends (the reply is written by another task of this runtime).
const SHUTDOWN_REPLY_FLUSH: Duration = Duration::from_millis(100);

/// Command-line arguments.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    /// Host mode: serve here instead of on vsock.
    listen: Option<ListenAddr>,
    /// Host mode: write the ready line to this inherited fd.
    ready_fd: Option<u32>,
    /// Container state directory.
    state_dir: Option<PathBuf>,
    /// The pod cgroup's name under the cgroup v2 root (host tests pick a unique one).
    cgroup_parent: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut out = Args::default();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => out.listen = Some(value()?.parse()?),
            "--ready-fd" => {
                let v = value()?;
                out.ready_fd = Some(v.parse().with_context(|| format!("Invalid fd {v:?}"))?);
            }
            "--state-dir" => out.state_dir = Some(PathBuf::from(value()?)),
            "--cgroup-parent" => {
                let v = value()?;
                let ok = !v.is_empty()
                    && std::path::Path::new(&v)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !ok {
                    bail!("Invalid --cgroup-parent {v:?}: must be a relative path without ..");
                }
                out.cgroup_parent = Some(v);
            }
            other => bail!("Unknown argument {other:?}"),
        }
    }
    if out.ready_fd.is_some() && !matches!(out.listen, Some(ListenAddr::Unix(_))) {
        bail!("--ready-fd needs --listen unix:<path>");
    }
    Ok(out)
}

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

fn signalfd() -> Result<SignalFd> {
    let signals = handled_signals();
    signals.thread_block().context("Failed to block signals")?;
    SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("Failed to create the signalfd")
}

/// Everything up to serving in the VM; returns the settings and the signalfd.
fn setup_vm() -> Result<(AgentConfig, SignalFd)> {
    let sfd = signalfd()?;
    mounts::mount_all().context("Failed to mount the boot file systems")?;
    let line = std::fs::read_to_string("/proc/cmdline").context("Failed to read /proc/cmdline")?;
    let (config, warnings) = cmdline::parse(&line);
    log::set_max_level(config.log_level.to_filter());
    for w in warnings {
        log::warn!("{w}");
    }
    log::debug!("Settings: {config:?}");
    // Ctrl-Alt-Del sends SIGINT to init instead of rebooting at once.
    if let Err(e) = set_cad_enabled(false) {
        log::warn!("Failed to route Ctrl-Alt-Del to init: {e}");
    }
    Ok((config, sfd))
}

/// How the agent announces readiness.
#[derive(Debug, Clone, Copy)]
enum Ready {
    /// In the VM: the console line, then the vsock dial to the host.
    Vm {
        ready_port: u32,
        oneshot: bool,
        /// `sandboxer.test_ignore_shutdown`: Control.Shutdown orders are answered and dropped.
        ignore_shutdown: bool,
    },
    /// On a host: optionally a line on an inherited fd.
    Host { fd: Option<u32> },
}

/// Why the agent stops serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// `SIGTERM`/`SIGINT`.
    Signal,
    /// `Control.Shutdown` with this grace time.
    Requested(ShutdownOrder),
}

/// Serves signals until a shutdown is requested by a signal or through `orders`.
async fn serve_signals(
    sfd: SignalFd,
    reaper: &Reaper,
    orders: &mut mpsc::Receiver<ShutdownOrder>,
    ignore_orders: bool,
) -> Result<Stop> {
    // `AsyncFd::new` is deprecated because a `T` might not own its fd; `SignalFd` owns it for
    // the `AsyncFd`'s whole life, and the replacement (`AsyncFd::register`) is `unsafe`.
    #[expect(deprecated, reason = "SignalFd owns its fd; the replacement is unsafe")]
    let mut afd = AsyncFd::new(sfd).context("Failed to register the signalfd")?;
    loop {
        let mut guard = tokio::select! {
            guard = afd.readable_mut() => guard.context("Failed to poll the signalfd")?,
            Some(grace) = orders.recv() => {
                if ignore_orders {
                    log::warn!("Ignoring a Shutdown request (sandboxer.test_ignore_shutdown)");
                    continue;
                }
                return Ok(Stop::Requested(grace));
            }
        };
        let info = match guard.get_inner_mut().read_signal() {
            Ok(Some(info)) => info,
            Ok(None) => {
                guard.clear_ready();
                continue;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("Failed to read the signalfd"),
        };
        match i32::try_from(info.ssi_signo)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())
        {
            Some(Signal::SIGCHLD) => {
                for (pid, status) in reaper.reap().orphans {
                    log::debug!("Reaped orphan pid {pid}: {status}");
                }
            }
            Some(signal @ (Signal::SIGTERM | Signal::SIGINT)) => {
                log::info!("Received {signal}");
                return Ok(Stop::Signal);
            }
            other => log::debug!("Ignoring signal {other:?}"),
        }
    }
}

/// What [`run`] serves, where, and how it announces it.
#[derive(Debug)]
struct Serve {
    listen: ListenAddr,
    state_dir: PathBuf,
    cgroup_parent: Option<String>,
    ready: Ready,
    /// When the agent started (Control.Health's uptime).
    started: Instant,
}

impl Serve {
    fn new(args: Args, listen: ListenAddr, ready: Ready, started: Instant) -> Self {
        Self {
            listen,
            state_dir: args
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            cgroup_parent: args.cgroup_parent,
            ready,
            started,
        }
    }
}

/// Starts the Task and Control server on `listen`, announces readiness, serves signals until
/// shutdown; says why it stopped.
async fn run(sfd: SignalFd, reaper: Arc<Reaper>, serve: Serve) -> Result<Stop> {
    let Serve {
        listen,
        state_dir,
        cgroup_parent,
        ready,
        started: agent_started,
    } = serve;
    let (order_tx, mut orders) = mpsc::channel(1);
    let events = Arc::new(Events::new());
    let control_config = match ready {
        Ready::Vm { .. } => ControlConfig::vm(&state_dir),
        Ready::Host { .. } => ControlConfig::host(&state_dir),
    };
    let started = async {
        let mut service = TaskService::new(reaper.clone(), &state_dir, events.clone())
            .with_context(|| format!("Failed to set up {}", state_dir.display()))?;
        if let Some(pod) = &cgroup_parent {
            service = service.with_pod_cgroup(pod);
        }
        let service = Arc::new(service);
        let control = Arc::new(ControlService::new(
            control_config,
            service.clone(),
            events.clone(),
            agent_started,
            order_tx,
        ));
        let listener = listen.bind()?;
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(listener)
            .register_service(task::services(service.clone()))
            .register_service(control::services(control.clone()));
        server
            .start()
            .await
            .context("Failed to start the ttrpc server")?;
        log::info!("Serving the Task and Control APIs on {listen}");
        anyhow::Ok((server, service, control))
    }
    .await;
    let line = listen.ready_line();
    let serving = match started {
        Ok(s) => Some(s),
        // In the VM, PID 1 must stay up (and keep reaping) even without a server.
        Err(e) if matches!(ready, Ready::Vm { .. }) => {
            log::error!("{e:#}");
            None
        }
        Err(e) => return Err(e),
    };
    match ready {
        Ready::Vm {
            ready_port,
            oneshot,
            ..
        } => {
            if let Err(e) = console::announce_ready() {
                log::error!("Failed to print the ready line: {e}");
            }
            if serving.is_some() {
                tokio::spawn(async move {
                    match transport::announce_ready_vsock(ready_port, &line).await {
                        Ok(()) => log::info!("Told the host on port {ready_port}: ready"),
                        Err(e) => log::warn!("{:#}", anyhow::Error::from(e)),
                    }
                });
            }
            if oneshot {
                log::info!("oneshot: shutting down after ready");
                raise(Signal::SIGTERM).context("Failed to raise SIGTERM")?;
            }
        }
        Ready::Host { fd: Some(fd) } => transport::announce_ready_fd(fd, &line)?,
        Ready::Host { fd: None } => {}
    }
    let ignore_orders = matches!(
        ready,
        Ready::Vm {
            ignore_shutdown: true,
            ..
        }
    );
    let stop = serve_signals(sfd, &reaper, &mut orders, ignore_orders).await;
    let Some((mut server, service, control)) = serving else {
        return stop;
    };
    match (&stop, ready) {
        (Ok(Stop::Requested(grace)), Ready::Host { .. }) => {
            tokio::time::sleep(SHUTDOWN_REPLY_FLUSH).await;
            if !control.terminate_pod(*grace).await {
                log::warn!(
                    "Pod processes left after {} ms, killing them",
                    grace.as_millis()
                );
            }
            // No `server.shutdown()`: it would wait for pending long polls (WaitEvent).
            service.kill_all();
        }
        (Ok(Stop::Requested(_)), Ready::Vm { .. }) => {
            // The VM ends next (vm_main): let the answer reach the host first.
            tokio::time::sleep(SHUTDOWN_REPLY_FLUSH).await;
        }
        _ => {
            if let Err(e) = server.shutdown().await {
                log::warn!("Stopping the ttrpc server: {e}");
            }
            if matches!(ready, Ready::Host { .. }) {
                service.kill_all();
            }
        }
    }
    stop
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to build the tokio runtime")
}

fn vm_main(args: Args, started: Instant) -> ExitCode {
    if getpid().as_raw() != 1 {
        eprintln!(
            "sandboxer-agent: must run as PID 1 (init) inside the sandbox VM, \
             or with --listen unix:<path> on a host"
        );
        return ExitCode::from(2);
    }
    let reaper = Arc::new(Reaper::new());
    let (config, grace) = match setup_vm() {
        Ok((config, sfd)) => {
            let listen = args
                .listen
                .clone()
                .unwrap_or(ListenAddr::Vsock(config.port));
            let ready = Ready::Vm {
                ready_port: config.ready_port,
                oneshot: config.oneshot,
                ignore_shutdown: config.ignore_shutdown,
            };
            let serve = Serve::new(args, listen, ready, started);
            let result = runtime().and_then(|rt| rt.block_on(run(sfd, reaper.clone(), serve)));
            let grace = match result {
                Ok(Stop::Requested(grace)) => grace,
                Ok(Stop::Signal) => config.shutdown_grace,
                Err(e) => {
                    log::error!("{e:#}");
                    config.shutdown_grace
                }
            };
            (config, grace)
        }
        Err(e) => {
            log::error!("Setup failed: {e:#}");
            let config = AgentConfig::default();
            let grace = config.shutdown_grace;
            (config, grace)
        }
    };
    let err = shutdown(&reaper, config.shutdown, grace);
    log::error!("reboot failed: {err}");
    // Exiting makes the kernel panic ("Attempted to kill init"); with panic=-1 that ends the VM.
    ExitCode::FAILURE
}

fn host_main(listen: ListenAddr, args: Args, started: Instant) -> Result<()> {
    let sfd = signalfd()?;
    // Orphans of container processes come to the agent, as they would to PID 1.
    nix::sys::prctl::set_child_subreaper(true).context("Failed to become a child subreaper")?;
    let reaper = Arc::new(Reaper::new());
    let ready = Ready::Host { fd: args.ready_fd };
    let serve = Serve::new(args, listen, ready, started);
    runtime()?.block_on(run(sfd, reaper, serve)).map(|_| ())
}

fn main() -> ExitCode {
    let started = Instant::now();
    console::init(log::LevelFilter::Info);
    // As PID 1 the kernel hands init every command-line word it does not know (e.g.
    // `nomodule`): the agent takes its settings from /proc/cmdline and ignores its arguments.
    let args = if getpid().as_raw() == 1 {
        Args::default()
    } else {
        match parse_args(std::env::args().skip(1)) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("sandboxer-agent: {e:#}");
                return ExitCode::from(2);
            }
        }
    };
    match args.listen.clone() {
        Some(listen) if getpid().as_raw() != 1 => match host_main(listen, args, started) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
        _ => vm_main(args, started),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&[]).unwrap(), Args::default());
        let a = parse(&[
            "--listen",
            "unix:/x.sock",
            "--ready-fd",
            "3",
            "--state-dir",
            "/s",
            "--cgroup-parent",
            "pod-1",
        ])
        .unwrap();
        assert_eq!(a.listen, Some(ListenAddr::Unix("/x.sock".into())));
        assert_eq!(a.ready_fd, Some(3));
        assert_eq!(a.state_dir, Some(PathBuf::from("/s")));
        assert_eq!(a.cgroup_parent.as_deref(), Some("pod-1"));
        assert_eq!(
            parse(&["--listen", "vsock:5"]).unwrap().listen,
            Some(ListenAddr::Vsock(5))
        );
        for bad in [
            &["--listen"][..],
            &["--listen", "tcp:1"],
            &["--ready-fd", "x", "--listen", "unix:/a"],
            &["--ready-fd", "3"],
            &["--frob"],
            &["--cgroup-parent", ""],
            &["--cgroup-parent", "/abs"],
            &["--cgroup-parent", "a/../b"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
