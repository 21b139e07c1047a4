// SPDX-License-Identifier: Apache-2.0
//! `sandboxer-agent`: PID 1 of the sandbox VM, serving the containerd Task API over ttrpc.
//!
//! In the VM (no arguments) it blocks the signals it handles (before any thread exists, so
//! every thread inherits the mask), mounts the boot file systems, reads its settings from
//! `/proc/cmdline`, starts the ttrpc server on vsock port `sandboxer.port`, prints
//! `sandboxer-agent: ready` on the console, dials the host's ready port (see
//! [`agent::transport`]) and then serves signals from a signalfd: `SIGCHLD` reaps children,
//! `SIGTERM`/`SIGINT` (Ctrl-Alt-Del is turned into `SIGINT`) shut the VM down. If setup fails
//! the agent logs the error and ends the VM rather than letting the kernel panic on a dead init.
//!
//! On a host (tests), `--listen unix:<path>` runs it as an ordinary root process: no mounts,
//! no reboot; it becomes a child subreaper, serves until `SIGTERM`/`SIGINT`, then kills and
//! deletes its containers and exits.
//!
//! ```text
//! sandboxer-agent [--listen vsock:<port>|unix:<path>] [--ready-fd <fd>] [--state-dir <dir>]
//! ```
//!
//! The agent runs on one thread (a current-thread tokio runtime that also reads the
//! signalfd): libcontainer forks, and a fork while another thread holds the allocator's lock
//! would deadlock the child.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use agent::cmdline::{self, AgentConfig};
use agent::console;
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

/// Where the agent keeps container state unless `--state-dir` says otherwise.
const DEFAULT_STATE_DIR: &str = "/run/sandboxer-agent";

/// Command-line arguments.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    /// Host mode: serve here instead of on vsock.
    listen: Option<ListenAddr>,
    /// Host mode: write the ready line to this inherited fd.
    ready_fd: Option<u32>,
    /// Container state directory.
    state_dir: Option<PathBuf>,
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
    Vm { ready_port: u32, oneshot: bool },
    /// On a host: optionally a line on an inherited fd.
    Host { fd: Option<u32> },
}

/// Serves signals until a shutdown is requested.
async fn serve_signals(sfd: SignalFd, reaper: &Reaper) -> Result<()> {
    // `AsyncFd::new` is deprecated because a `T` might not own its fd; `SignalFd` owns it for
    // the `AsyncFd`'s whole life, and the replacement (`AsyncFd::register`) is `unsafe`.
    #[expect(deprecated, reason = "SignalFd owns its fd; the replacement is unsafe")]
    let mut afd = AsyncFd::new(sfd).context("Failed to register the signalfd")?;
    loop {
        let mut guard = afd
            .readable_mut()
            .await
            .context("Failed to poll the signalfd")?;
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
                return Ok(());
            }
            other => log::debug!("Ignoring signal {other:?}"),
        }
    }
}

/// Starts the Task server on `listen`, announces readiness, serves signals until shutdown.
async fn run(
    sfd: SignalFd,
    reaper: Arc<Reaper>,
    listen: ListenAddr,
    state_dir: PathBuf,
    ready: Ready,
) -> Result<()> {
    let started = async {
        let service = Arc::new(
            TaskService::new(reaper.clone(), &state_dir)
                .with_context(|| format!("Failed to set up {}", state_dir.display()))?,
        );
        let listener = listen.bind()?;
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(listener)
            .register_service(task::services(service.clone()));
        server
            .start()
            .await
            .context("Failed to start the ttrpc server")?;
        log::info!("Serving the Task API on {listen}");
        anyhow::Ok((server, service))
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
    let result = serve_signals(sfd, &reaper).await;
    if let Some((mut server, service)) = serving {
        if let Err(e) = server.shutdown().await {
            log::warn!("Stopping the ttrpc server: {e}");
        }
        if matches!(ready, Ready::Host { .. }) {
            service.kill_all();
        }
    }
    result
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to build the tokio runtime")
}

fn vm_main(args: Args) -> ExitCode {
    if getpid().as_raw() != 1 {
        eprintln!(
            "sandboxer-agent: must run as PID 1 (init) inside the sandbox VM, \
             or with --listen unix:<path> on a host"
        );
        return ExitCode::from(2);
    }
    let reaper = Arc::new(Reaper::new());
    let config = match setup_vm() {
        Ok((config, sfd)) => {
            let listen = args.listen.unwrap_or(ListenAddr::Vsock(config.port));
            let state_dir = args
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
            let ready = Ready::Vm {
                ready_port: config.ready_port,
                oneshot: config.oneshot,
            };
            let result = runtime()
                .and_then(|rt| rt.block_on(run(sfd, reaper.clone(), listen, state_dir, ready)));
            if let Err(e) = result {
                log::error!("{e:#}");
            }
            config
        }
        Err(e) => {
            log::error!("Setup failed: {e:#}");
            AgentConfig::default()
        }
    };
    let err = shutdown(&reaper, config.shutdown, config.shutdown_grace);
    log::error!("reboot failed: {err}");
    // Exiting makes the kernel panic ("Attempted to kill init"); with panic=-1 that ends the VM.
    ExitCode::FAILURE
}

fn host_main(listen: ListenAddr, args: Args) -> Result<()> {
    let sfd = signalfd()?;
    // Orphans of container processes come to the agent, as they would to PID 1.
    nix::sys::prctl::set_child_subreaper(true).context("Failed to become a child subreaper")?;
    let reaper = Arc::new(Reaper::new());
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let ready = Ready::Host { fd: args.ready_fd };
    runtime()?.block_on(run(sfd, reaper, listen, state_dir, ready))
}

fn main() -> ExitCode {
    console::init(log::LevelFilter::Info);
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sandboxer-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    match args.listen.clone() {
        Some(listen) if getpid().as_raw() != 1 => match host_main(listen, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
        _ => vm_main(args),
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
        ])
        .unwrap();
        assert_eq!(a.listen, Some(ListenAddr::Unix("/x.sock".into())));
        assert_eq!(a.ready_fd, Some(3));
        assert_eq!(a.state_dir, Some(PathBuf::from("/s")));
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
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
