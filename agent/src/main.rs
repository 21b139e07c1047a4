// SPDX-License-Identifier: Apache-2.0
//! `sandboxer-agent`: PID 1 of the sandbox VM.
//!
//! Blocks the signals it handles (before any thread exists, so every thread inherits the
//! mask), mounts the boot file systems, reads its settings from `/proc/cmdline`, prints
//! `sandboxer-agent: ready` on the console, then serves signals from a signalfd: `SIGCHLD`
//! reaps children, `SIGTERM`/`SIGINT` (Ctrl-Alt-Del is turned into `SIGINT`) shut the VM down.
//! If setup fails the agent logs the error and ends the VM rather than letting the kernel panic
//! on a dead init.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use agent::cmdline::{self, AgentConfig};
use agent::console;
use agent::mounts;
use agent::reaper::Reaper;
use agent::shutdown::shutdown;
use anyhow::{Context, Result};
use nix::sys::reboot::set_cad_enabled;
use nix::sys::signal::{SigSet, Signal, raise};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::getpid;

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Everything up to `ready`; returns the settings and the signalfd to serve.
fn setup() -> Result<(AgentConfig, SignalFd)> {
    let signals = handled_signals();
    signals.thread_block().context("Failed to block signals")?;
    let sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC)
        .context("Failed to create the signalfd")?;
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

/// Serves signals until a shutdown is requested.
fn serve(sfd: &mut SignalFd, reaper: &Reaper) -> Result<()> {
    loop {
        let info = match sfd.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) | Err(nix::errno::Errno::EINTR) => continue,
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

fn main() -> ExitCode {
    if getpid().as_raw() != 1 {
        eprintln!("sandboxer-agent: must run as PID 1 (init) inside the sandbox VM");
        return ExitCode::from(2);
    }
    console::init(log::LevelFilter::Info);
    let reaper = Arc::new(Reaper::new());
    let config = match setup() {
        Ok((config, mut sfd)) => {
            if let Err(e) = console::announce_ready() {
                log::error!("Failed to print the ready line: {e}");
            }
            if config.oneshot {
                log::info!("oneshot: shutting down after ready");
                if let Err(e) = raise(Signal::SIGTERM) {
                    log::error!("Failed to raise SIGTERM: {e}");
                }
            }
            if let Err(e) = serve(&mut sfd, &reaper) {
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
