// SPDX-License-Identifier: Apache-2.0
//! Child reaping for PID 1.
//!
//! As init, the agent inherits every orphan in the VM and must `wait` for them, or they stay
//! zombies. It also starts processes itself (later: container init and exec processes) whose
//! exit status must reach whoever asked (the Task service's `Wait`). Both go through one
//! [`Reaper`]: it is the only caller of `waitpid` in the agent.
//!
//! No status may be lost between `fork` and the caller registering interest: a child can exit
//! before `spawn` even returns. So [`Reaper::spawn`] runs the caller's start function while
//! holding the reaper lock and registers the returned pid before the lock is released, and
//! [`Reaper::reap`] holds the same lock around `waitpid`. A watched pid therefore cannot be
//! reaped before its callback is in place. Callbacks run after the lock is dropped, so they may
//! start processes themselves.
//!
//! Do not call `wait` on a `std::process::Child` started through the reaper: the reaper owns
//! the exit status.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::mpsc;

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by `signal`.
    Signaled {
        /// Signal number.
        signal: i32,
        /// Whether a core dump was written.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// The status as containerd reports it: the exit code, or 128 + the signal number.
    pub fn code(&self) -> u32 {
        match *self {
            // Exit codes are 0..=255 (the kernel keeps the low 8 bits).
            Self::Exited(code) => u32::try_from(code & 0xff).unwrap_or(0),
            Self::Signaled { signal, .. } => u32::try_from(signal).unwrap_or(0).saturating_add(128),
        }
    }

    /// The pid and exit status of a terminated child, or `None` for other wait events.
    pub fn from_wait_status(status: WaitStatus) -> Option<(Pid, Self)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, Self::Exited(code))),
            WaitStatus::Signaled(pid, signal, core_dumped) => Some((
                pid,
                Self::Signaled {
                    signal: signal as i32,
                    core_dumped,
                },
            )),
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "exited with {code}"),
            Self::Signaled {
                signal,
                core_dumped,
            } => {
                write!(f, "killed by signal {signal}")?;
                if *core_dumped {
                    write!(f, " (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// Called once with the exit status of a watched process.
pub type ExitCallback = Box<dyn FnOnce(ExitStatus) + Send>;

/// Receives the exit status of a process started with [`Reaper::spawn_watched`].
pub type ExitReceiver = mpsc::Receiver<ExitStatus>;

/// Pids someone is waiting for. Kept apart from `waitpid` so the bookkeeping is testable.
#[derive(Default)]
struct Watches {
    by_pid: HashMap<i32, ExitCallback>,
}

impl Watches {
    fn insert(&mut self, pid: Pid, callback: ExitCallback) {
        self.by_pid.insert(pid.as_raw(), callback);
    }

    fn take(&mut self, pid: Pid) -> Option<ExitCallback> {
        self.by_pid.remove(&pid.as_raw())
    }

    fn len(&self) -> usize {
        self.by_pid.len()
    }
}

/// The single owner of `waitpid` in the agent. Share it with `Arc`.
pub struct Reaper {
    watches: Mutex<Watches>,
}

impl fmt::Debug for Reaper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let watched = self.watches.lock().map(|w| w.len()).unwrap_or(0);
        f.debug_struct("Reaper").field("watched", &watched).finish()
    }
}

impl Default for Reaper {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of one [`Reaper::reap`] pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Exits nobody was watching (orphans inherited by init).
    pub orphans: Vec<(Pid, ExitStatus)>,
    /// Number of watched exits whose callbacks ran.
    pub delivered: usize,
    /// Whether any children are left (`false` once `waitpid` says `ECHILD`).
    pub children_left: bool,
}

impl Reaper {
    /// A reaper with nothing watched.
    pub fn new() -> Self {
        Self {
            watches: Mutex::new(Watches::default()),
        }
    }

    /// Starts a process with `start` (which returns its result and the child's pid) and calls
    /// `on_exit` with the child's exit status once it has been reaped. The status cannot be
    /// lost, however fast the child exits.
    pub fn spawn<T, E>(
        &self,
        start: impl FnOnce() -> Result<(T, Pid), E>,
        on_exit: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> Result<T, E> {
        let mut watches = self.watches.lock().expect("poisoned");
        let (value, pid) = start()?;
        watches.insert(pid, Box::new(on_exit));
        Ok(value)
    }

    /// Like [`Reaper::spawn`], with the exit status delivered on a channel.
    pub fn spawn_watched<T, E>(
        &self,
        start: impl FnOnce() -> Result<(T, Pid), E>,
    ) -> Result<(T, ExitReceiver), E> {
        let (tx, rx) = mpsc::channel();
        let value = self.spawn(start, move |status| {
            // The receiver may be gone: then nobody cares any more.
            let _ = tx.send(status);
        })?;
        Ok((value, rx))
    }

    /// Number of processes being watched.
    pub fn watched(&self) -> usize {
        self.watches.lock().expect("poisoned").len()
    }

    /// Reaps every child that has terminated (call it on `SIGCHLD`), runs the callbacks of
    /// watched ones and returns the rest. Never blocks.
    pub fn reap(&self) -> Reaped {
        let mut ready = Vec::new();
        let mut reaped = Reaped {
            children_left: true,
            ..Reaped::default()
        };
        {
            let mut watches = self.watches.lock().expect("poisoned");
            loop {
                match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(status) => {
                        let Some((pid, exit)) = ExitStatus::from_wait_status(status) else {
                            // Stop/continue events are not asked for; ignore anything else.
                            continue;
                        };
                        match watches.take(pid) {
                            Some(callback) => ready.push((callback, exit)),
                            None => reaped.orphans.push((pid, exit)),
                        }
                    }
                    Err(Errno::EINTR) => continue,
                    Err(Errno::ECHILD) => {
                        reaped.children_left = false;
                        break;
                    }
                    Err(e) => {
                        log::error!("waitpid failed: {e}");
                        break;
                    }
                }
            }
        }
        reaped.delivered = ready.len();
        for (callback, exit) in ready {
            callback(exit);
        }
        reaped
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex as StdMutex};
    use std::time::{Duration, Instant};

    use super::*;

    /// `waitpid(-1)` reaps any child of the test process: tests that fork run one at a time.
    static FORK_LOCK: StdMutex<()> = StdMutex::new(());

    fn start(cmd: &mut Command) -> std::io::Result<(std::process::Child, Pid)> {
        let child = cmd.stdin(Stdio::null()).spawn()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        Ok((child, pid))
    }

    /// Reaps until `done` holds or 10 s pass.
    fn reap_until(reaper: &Reaper, mut done: impl FnMut(&Reaped) -> bool) -> Vec<Reaped> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut passes = Vec::new();
        loop {
            let r = reaper.reap();
            let stop = done(&r);
            passes.push(r);
            if stop {
                return passes;
            }
            assert!(Instant::now() < deadline, "timed out: {passes:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn exit_status_codes() {
        assert_eq!(ExitStatus::Exited(0).code(), 0);
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Exited(256 + 7).code(), 7);
        let killed = ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        };
        assert_eq!(killed.code(), 137);
        assert_eq!(killed.to_string(), "killed by signal 9");
        let dumped = ExitStatus::Signaled {
            signal: 11,
            core_dumped: true,
        };
        assert_eq!(dumped.to_string(), "killed by signal 11 (core dumped)");
        assert_eq!(ExitStatus::Exited(2).to_string(), "exited with 2");
        let pid = Pid::from_raw(42);
        assert_eq!(
            ExitStatus::from_wait_status(WaitStatus::Exited(pid, 1)),
            Some((pid, ExitStatus::Exited(1)))
        );
        assert_eq!(
            ExitStatus::from_wait_status(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGTERM,
                false
            )),
            Some((
                pid,
                ExitStatus::Signaled {
                    signal: 15,
                    core_dumped: false
                }
            ))
        );
        assert_eq!(ExitStatus::from_wait_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn watches_bookkeeping() {
        let mut w = Watches::default();
        let hits = Arc::new(StdMutex::new(Vec::new()));
        let h = hits.clone();
        w.insert(
            Pid::from_raw(10),
            Box::new(move |s| h.lock().unwrap().push(s)),
        );
        assert_eq!(w.len(), 1);
        assert!(w.take(Pid::from_raw(11)).is_none());
        let cb = w.take(Pid::from_raw(10)).unwrap();
        cb(ExitStatus::Exited(5));
        assert!(w.take(Pid::from_raw(10)).is_none());
        assert_eq!(*hits.lock().unwrap(), [ExitStatus::Exited(5)]);
    }

    #[test]
    fn watched_children_get_their_status_and_orphans_are_reported() {
        let _guard = FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let reaper = Reaper::new();

        // Exits at once: the status must still arrive (registered before the lock is freed).
        let (_child, fast) = reaper
            .spawn_watched(|| start(Command::new("sh").args(["-c", "exit 3"])))
            .unwrap();
        let (_child, killed) = reaper
            .spawn_watched(|| start(Command::new("sh").args(["-c", "kill -9 $$"])))
            .unwrap();
        // Not watched: reported as an orphan.
        let (_orphan, orphan_pid) = start(Command::new("true").stdout(Stdio::null())).unwrap();
        assert_eq!(reaper.watched(), 2);

        let mut orphans = Vec::new();
        let mut delivered = 0;
        reap_until(&reaper, |r| {
            orphans.extend(r.orphans.iter().copied());
            delivered += r.delivered;
            !r.children_left
        });
        assert_eq!(delivered, 2);
        assert_eq!(reaper.watched(), 0);
        assert_eq!(fast.try_recv().unwrap(), ExitStatus::Exited(3));
        assert_eq!(
            killed.try_recv().unwrap(),
            ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
        assert_eq!(orphans, [(orphan_pid, ExitStatus::Exited(0))]);
        // Nothing left: reap is a no-op that reports no children.
        assert_eq!(
            reaper.reap(),
            Reaped {
                orphans: vec![],
                delivered: 0,
                children_left: false
            }
        );
    }

    #[test]
    fn failed_start_registers_nothing_and_callbacks_may_spawn() {
        let _guard = FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let reaper = Arc::new(Reaper::new());
        let err = reaper
            .spawn_watched(|| start(&mut Command::new("/nonexistent/binary")))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(reaper.watched(), 0);

        // A callback that starts another watched process must not deadlock.
        let (tx, rx) = mpsc::channel();
        let r2 = reaper.clone();
        // The Child handle is dropped at once: the reaper owns the exit status.
        reaper
            .spawn(
                || start(&mut Command::new("true")).map(|(_child, pid)| ((), pid)),
                move |first| {
                    let (_c, second) = r2
                        .spawn_watched(|| start(Command::new("sh").args(["-c", "exit 4"])))
                        .unwrap();
                    tx.send((first, second)).unwrap();
                },
            )
            .unwrap();
        let mut second = None;
        reap_until(&reaper, |_| {
            if second.is_none()
                && let Ok((first, rx2)) = rx.try_recv()
            {
                assert_eq!(first, ExitStatus::Exited(0));
                second = Some(rx2);
            }
            second
                .as_ref()
                .is_some_and(|rx2: &ExitReceiver| match rx2.try_recv() {
                    Ok(s) => {
                        assert_eq!(s, ExitStatus::Exited(4));
                        true
                    }
                    Err(_) => false,
                })
        });
    }
}
