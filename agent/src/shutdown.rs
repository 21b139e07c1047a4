// SPDX-License-Identifier: Apache-2.0
//! Orderly shutdown of the VM: stop the remaining processes, sync, and end the VM.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, sync};

use crate::cmdline::ShutdownMode;
use crate::reaper::Reaper;

/// How often the grace period checks for exits.
const POLL: Duration = Duration::from_millis(10);
/// How long to wait for processes to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_millis(500);

/// The `reboot(2)` command for a shutdown mode.
pub fn reboot_mode(mode: ShutdownMode) -> RebootMode {
    match mode {
        ShutdownMode::Reboot => RebootMode::RB_AUTOBOOT,
        ShutdownMode::PowerOff => RebootMode::RB_POWER_OFF,
    }
}

/// Reaps until no children are left or `deadline` passes; returns whether all are gone.
fn reap_until(reaper: &Reaper, deadline: Instant) -> bool {
    loop {
        let reaped = reaper.reap();
        for (pid, status) in &reaped.orphans {
            log::debug!("Reaped pid {pid}: {status}");
        }
        if !reaped.children_left {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `signal` to every process but PID 1. `Ok(false)` if there was none.
fn signal_all(signal: Signal) -> nix::Result<bool> {
    match kill(Pid::from_raw(-1), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// SIGTERM to all, up to `grace` for them to exit, SIGKILL to the rest, sync, then
/// `reboot(2)` with `mode`. Returns only if `reboot` fails.
pub fn shutdown(reaper: &Reaper, mode: ShutdownMode, grace: Duration) -> nix::Error {
    log::info!("Shutting down");
    match signal_all(Signal::SIGTERM) {
        Ok(true) => {
            if !reap_until(reaper, Instant::now() + grace) {
                log::warn!(
                    "Processes left after {} ms, killing them",
                    grace.as_millis()
                );
                if let Err(e) = signal_all(Signal::SIGKILL) {
                    log::error!("kill(-1, SIGKILL) failed: {e}");
                }
                reap_until(reaper, Instant::now() + KILL_WAIT);
            }
        }
        Ok(false) => {}
        Err(e) => log::error!("kill(-1, SIGTERM) failed: {e}"),
    }
    sync();
    log::info!("Ending the VM ({mode:?})");
    let Err(e) = reboot(reboot_mode(mode));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(reboot_mode(ShutdownMode::Reboot), RebootMode::RB_AUTOBOOT);
        assert_eq!(
            reboot_mode(ShutdownMode::PowerOff),
            RebootMode::RB_POWER_OFF
        );
    }
}
