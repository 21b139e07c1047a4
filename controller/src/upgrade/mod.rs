// SPDX-License-Identifier: Apache-2.0
//! Live upgrade: the running daemon hands every running sandbox over to a new process started
//! from a new binary, and no VM restarts (docs/restarts.md, "Upgrade").
//!
//! KVM ties a VM to the process that made it, so the handover is a local live migration. The
//! old process ([`give`]) starts the new binary as `<binary> <its own serve flags> --takeover
//! <state_dir>/upgrade.sock` and talks to it over that socket ([`wire`]):
//!
//! ```text
//!  new                                   old
//!  Hello {protocol, vm format}  ───────>  checks both versions (else Refused: nothing moved)
//!                               <───────  Offer {n}: operations held off, the VMs still run
//!                               <───────  Prepare {id, layout} + memfd      (n times)
//!  builds each VM ahead          ───────>  Prepared {id}                     (n times)
//!                                          freezes the VMs a few at a time; as each is frozen:
//!                               <───────  Sandbox {id, ...} + VM state, memfd(s), vsock, taps,
//!                                          the Task socket, its connections and state
//!  writes its state, frozen
//!  (every VM's)                  ───────>  Restored {ids}                    (once)
//!                               <───────  Listeners + the API sockets
//!  Ready                         ───────>
//!                               <───────  Commit: from here the old process never runs a VM
//!  runs every VM, MAINPID=       ───────>  Done {resumed at}: the old process exits
//!  then its agents, Task sockets, APIs
//! ```
//!
//! A VM's pause lasts from its freeze to the new process running it, after every VM is rebuilt:
//! the building that needs no frozen guest (a KVM VM on the same memory, its vCPUs and
//! threads) is done before.
//!
//! Until `Commit` the old process can take everything back: any failure (a refusal, the new
//! process exiting, a VM that cannot be rebuilt) thaws every VM where it was and the old
//! process goes on serving. After it, the new process owns the VMs; the old one exits without
//! tearing anything down (its VMs' memory, sockets and TAP queues are the new one's now). A
//! new process that fails before `Commit` exits at once, also without tearing anything down.
//!
//! The engine's ttrpc connections to each Task socket go over as they are, with the calls
//! that only read or wait (Wait above all) left unanswered and asked again of the new process
//! ([`crate::task::conn`]); calls that change something are waited for first
//! ([`TASK_CALLS_TIMEOUT`]). The disks in the VMs' block slots go with them. What is not
//! handed over yet: the Sandbox API's gRPC connections (they end with the old process; the
//! engine connects again to the same path).

mod lane;
pub mod wire;

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::backend::{AdoptedVm, Handover, MemoryLayout, VmBackend};
use crate::error_chain;
use crate::service::SandboxService;
use crate::service::handover::{Adoption, Freeze};
use crate::task::{TaskCut, TaskState};

use wire::{Channel, WireError};

/// Version of this handover protocol; both processes must speak the same one. 3: a Task
/// endpoint's state carries its open streaming stdio streams (a binary of 2 would drop them).
/// 4: `Prepare` may carry a clone's pages copied ahead. 5: one `Restored` names every VM
/// rebuilt (a frame a VM cost both processes CPU inside every VM's pause).
pub const PROTOCOL_VERSION: u32 = 5;
/// The handover socket in the state directory.
pub const SOCKET: &str = "upgrade.sock";
/// How long the old process waits for the new one to connect, and each side for the other's
/// next message.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old process waits for the operations in flight before it freezes the VMs.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old process waits for the Task calls in flight that change something
/// (Create, Start, Exec, Kill, Delete, ...) before it cuts the Task endpoints.
pub const TASK_CALLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Heap a rebuilding thread of the new process faults in ahead, per VM handed over
/// ([`vmm::warm_heap`]): a VM's rebuilding allocates a few fresh pages on it.
const WARM_HEAP_PER_VM: usize = 32 * 1024;
/// The flag that makes `sandboxer serve` take over from a running daemon.
pub const TAKEOVER_FLAG: &str = "--takeover";
/// Test hook: the new process exits right after rebuilding this many VMs (an upgrade that
/// fails half way). Read from the new process's environment.
pub const FAIL_AFTER_ENV: &str = "SANDBOXER_TEST_UPGRADE_FAIL_AFTER";
/// Test hook: the new process claims this handover protocol version (a binary of another
/// version). Read from the new process's environment.
pub const PROTOCOL_ENV: &str = "SANDBOXER_TEST_UPGRADE_PROTOCOL";

/// Why an upgrade did not happen (the old process keeps every sandbox) or, for the new
/// process, why it cannot take over.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The handover socket failed.
    #[error("The handover connection failed")]
    Wire(#[from] WireError),
    /// Spawning, accepting or connecting failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// The other process did not answer in time.
    #[error("The other process did not {0} within {STEP_TIMEOUT:?}")]
    Timeout(&'static str),
    /// The new process ended before it took over.
    #[error("The new process exited before it took over: {0}")]
    Exited(String),
    /// The two binaries do not speak the same handover format.
    #[error("Incompatible handover: {0}")]
    Incompatible(String),
    /// The other side gave up.
    #[error("The other process gave up: {0}")]
    Refused(String),
    /// The other side broke the protocol.
    #[error("Unexpected handover message: {0}")]
    Protocol(String),
    /// The service could not be held still or a sandbox not be handed over or rebuilt.
    #[error("A sandbox cannot be handed over")]
    Sandbox(#[source] Box<crate::error::SandboxError>),
}

/// Ends this process at once, running no destructor: after a successful handover (the old
/// process) or a failed takeover (the new one), the VMs' memory, sockets and TAP queues that
/// this process holds are the other process's, and tearing them down would take them away.
#[expect(
    clippy::exit,
    reason = "the one way out that tears nothing down; see the doc comment"
)]
pub fn exit_without_teardown(code: i32) -> ! {
    std::process::exit(code)
}

/// The handover's messages (JSON), with their blob and descriptors described per variant.
#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    /// new -> old: what the new binary speaks.
    Hello {
        protocol: u32,
        vm_format: u32,
        version: String,
        pid: u32,
    },
    /// old -> new: `sandboxes` follow.
    Offer { sandboxes: usize },
    /// old -> new, once per sandbox, its VM still running: build its VM ahead. Descriptors:
    /// the guest memory's memfd (for a clone: its template's), then with `base` (the id of a
    /// clone's pages copied ahead, [`MemoryLayout::base`]) that copy.
    Prepare {
        id: String,
        private: bool,
        mem_bytes: u64,
        vcpus: u8,
        base: Option<u64>,
    },
    /// new -> old: a sandbox's VM is built ahead.
    Prepared { id: String },
    /// Either way: giving up (before `Commit`).
    Refused { reason: String },
    /// old -> new: one frozen sandbox. Blob: the encoded VM. Descriptors: `vm_files` of the
    /// VM ([`vmm::VmSnapshot::encode`]), then the vsock listener if `vsock`, then one per NIC,
    /// then one per block slot that holds a disk (`disks`: every slot, in slot order), then
    /// those of its Task endpoint's cut if `task` ([`TaskCut::into_parts`]); those beyond a
    /// frame's [`wire::MAX_FDS`] follow in `Fds` frames (a pod of many containers).
    Sandbox {
        id: String,
        agent_port: u32,
        vm_files: usize,
        vsock: bool,
        nics: Vec<Nic>,
        #[serde(default)]
        disks: Vec<Option<Disk>>,
        frozen_at_ns: u64,
        task: Option<TaskState>,
    },
    /// old -> new: more descriptors of the `Sandbox` frame just before (a frame carries at
    /// most [`wire::MAX_FDS`]), in order, at least one a frame.
    Fds,
    /// new -> old: every sandbox's VM is rebuilt (frozen), once all are.
    Restored { ids: Vec<String> },
    /// old -> new: the API sockets, one descriptor each, in `paths` order.
    Listeners { paths: Vec<PathBuf> },
    /// new -> old: everything is rebuilt.
    Ready,
    /// old -> new: the old process lets go; run them.
    Commit,
    /// new -> old: when each VM ran again (`CLOCK_MONOTONIC` ns), what could not run, and the
    /// CPU time the new process took from waiting for the first frozen VM to then (us; absent
    /// from an older binary).
    Done {
        resumed: Vec<(String, u64)>,
        failed: Vec<(String, String)>,
        #[serde(default)]
        cpu_us: u64,
    },
}

/// A NIC's MAC and MTU (its TAP queue is a descriptor of the frame).
#[derive(Debug, Serialize, Deserialize)]
struct Nic {
    mac: [u8; 6],
    mtu: Option<u16>,
}

/// A block slot's disk as the guest knows it (its file is a descriptor of the frame).
#[derive(Debug, Serialize, Deserialize)]
struct Disk {
    read_only: bool,
    sectors: u64,
}

impl Disk {
    fn of(file: &vmm::BlockFile) -> Self {
        Disk {
            read_only: file.read_only,
            sectors: file.sectors,
        }
    }
}

/// How many descriptors a `Sandbox` message comes with (none for any other message).
fn wanted_fds(message: &Msg) -> usize {
    match message {
        Msg::Sandbox {
            vm_files,
            vsock,
            nics,
            disks,
            task,
            ..
        } => {
            vm_files
                + usize::from(*vsock)
                + nics.len()
                + disks.iter().flatten().count()
                + task.as_ref().map_or(0, TaskState::fd_count)
        }
        _ => 0,
    }
}

/// Sends `message` with `blob` and `fds`, the descriptors beyond a frame's
/// [`wire::MAX_FDS`] in `Fds` frames right after it.
async fn send_with_fds(
    chan: &mut Channel,
    message: &Msg,
    blob: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    let (first, rest) = fds.split_at(fds.len().min(wire::MAX_FDS));
    chan.send(message, blob, first).await?;
    for more in rest.chunks(wire::MAX_FDS) {
        chan.send(&Msg::Fds, &[], more).await?;
    }
    Ok(())
}

/// Reads the `Fds` frames that follow `frame` until it holds the descriptors its message
/// comes with ([`wanted_fds`]).
async fn collect_fds(chan: &mut Channel, frame: &mut wire::Frame<Msg>) -> Result<(), UpgradeError> {
    let want = wanted_fds(&frame.message);
    while frame.fds.len() < want {
        let more = recv(chan, "send more descriptors").await?;
        if !matches!(more.message, Msg::Fds) || more.fds.is_empty() {
            return Err(UpgradeError::Protocol(format!(
                "{:?} with {} descriptors while {} more were due",
                more.message,
                more.fds.len(),
                want - frame.fds.len()
            )));
        }
        frame.fds.extend(more.fds);
    }
    Ok(())
}

/// The block slots' files of a `Sandbox` frame, in slot order: the next descriptor of `fds`
/// for every slot of `disks` that holds a disk. `None` if `fds` runs out first.
fn block_files(
    fds: &mut impl Iterator<Item = OwnedFd>,
    disks: Vec<Option<Disk>>,
) -> Option<Vec<Option<vmm::BlockFile>>> {
    disks
        .into_iter()
        .map(|disk| match disk {
            None => Some(None),
            Some(disk) => fds.next().map(|fd| {
                Some(vmm::BlockFile {
                    file: File::from(fd),
                    read_only: disk.read_only,
                    sectors: disk.sectors,
                })
            }),
        })
        .collect()
}

/// When each step of a handover ended, from its start (the report's `phases_us`).
struct Phases(Vec<(String, u64)>, Instant);

impl Phases {
    fn new(start: Instant) -> Self {
        Phases(Vec::new(), start)
    }

    fn mark(&mut self, name: &str) {
        let at = u64::try_from(self.1.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.0.push((name.to_owned(), at));
    }
}

/// The CPU time this process has taken so far (user and system, every thread), in us.
fn process_cpu_us() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let us = |t: nix::sys::time::TimeVal| {
        u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000)
            .saturating_add(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    getrusage(UsageWho::RUSAGE_SELF)
        .map_or(0, |r| us(r.user_time()).saturating_add(us(r.system_time())))
}

/// `CLOCK_MONOTONIC` in ns: one clock for both processes.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        .unwrap_or(0)
}

/// The same clock at `at` (an `Instant` of this process).
fn monotonic_ns_at(at: Instant) -> u64 {
    let ago = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
    monotonic_ns().saturating_sub(ago)
}

async fn recv(chan: &mut Channel, what: &'static str) -> Result<wire::Frame<Msg>, UpgradeError> {
    let frame = tokio::time::timeout(STEP_TIMEOUT, chan.recv::<Msg>())
        .await
        .map_err(|_| UpgradeError::Timeout(what))??;
    if let Msg::Refused { reason } = frame.message {
        return Err(UpgradeError::Refused(reason));
    }
    Ok(frame)
}

/// Checks the other binary's versions against this one's.
fn compatible(protocol: u32, vm_format: u32) -> Result<(), UpgradeError> {
    if protocol != PROTOCOL_VERSION {
        return Err(UpgradeError::Incompatible(format!(
            "handover protocol {protocol}, this binary speaks {PROTOCOL_VERSION}"
        )));
    }
    if vm_format != vmm::snapshot::FORMAT_VERSION {
        return Err(UpgradeError::Incompatible(format!(
            "saved VM format {vm_format}, this binary reads {}",
            vmm::snapshot::FORMAT_VERSION
        )));
    }
    Ok(())
}

/// What the old process needs to start the new one.
#[derive(Debug)]
pub struct Plan {
    /// The new binary.
    pub binary: PathBuf,
    /// Its arguments before [`TAKEOVER_FLAG`]: this process's own serve flags.
    pub args: Vec<OsString>,
    /// The handover socket's path, and the socket bound there ([`crate::server::bind`]).
    pub socket: (PathBuf, UnixListener),
    /// The API sockets to pass on, with their paths.
    pub listeners: Vec<(PathBuf, UnixListener)>,
}

/// This process's arguments for a new process of the same serve flags: its own, without a
/// `--takeover` it was itself started with.
pub fn own_serve_args() -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == TAKEOVER_FLAG {
            args.next();
        } else if !a.to_string_lossy().starts_with("--takeover=") {
            out.push(a);
        }
    }
    out
}

pub use crate::service::handover::{UpgradeReport as Report, UpgradeRequest};

/// The old process's side: hands every running sandbox of `service` over to a new process
/// per `plan`. `Ok` means the new process owns them: the caller must end this process without
/// tearing anything down (the returned [`Freeze`] must not be thawed; [`Freeze::release`]
/// lets go of the VMs' host connections first). `Err` means nothing
/// moved: every VM runs here again.
pub async fn give<B: VmBackend>(
    service: &Arc<SandboxService<B>>,
    plan: Plan,
) -> Result<(Report, Freeze), UpgradeError> {
    let start = Instant::now();
    let (path, listener) = &plan.socket;
    let listener = listener
        .try_clone()
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .map_err(|e| UpgradeError::Io("handover socket".into(), e))?;
    let result = give_over(service, &plan, &listener, start).await;
    let _ = std::fs::remove_file(path);
    result
}

async fn give_over<B: VmBackend>(
    service: &Arc<SandboxService<B>>,
    plan: &Plan,
    listener: &tokio::net::UnixListener,
    start: Instant,
) -> Result<(Report, Freeze), UpgradeError> {
    let mut child = tokio::process::Command::new(&plan.binary)
        .args(&plan.args)
        .arg(TAKEOVER_FLAG)
        .arg(&plan.socket.0)
        .env(
            vmm::BASELINE_ENV,
            vmm::process_baseline().unwrap_or_default(),
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| UpgradeError::Io(format!("cannot start {}", plan.binary.display()), e))?;
    let new_pid = child.id().unwrap_or(0);
    info!(binary = %plan.binary.display(), pid = new_pid, "upgrade: new process started");
    let stream = tokio::select! {
        accepted = tokio::time::timeout(STEP_TIMEOUT, listener.accept()) => match accepted {
            Ok(Ok((stream, _))) => stream,
            Ok(Err(e)) => return Err(fail(&mut child, UpgradeError::Io("accept".into(), e))),
            Err(_) => return Err(fail(&mut child, UpgradeError::Timeout("connect"))),
        },
        status = child.wait() => {
            let why = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            return Err(UpgradeError::Exited(why));
        }
    };
    let mut chan = Channel::new(stream);
    match hand_over(service, plan, &mut chan, start, new_pid).await {
        Ok(done) => Ok(done),
        Err((e, freeze)) => {
            let _ = chan
                .send(
                    &Msg::Refused {
                        reason: error_chain(&e),
                    },
                    &[],
                    &[],
                )
                .await;
            if let Some(freeze) = freeze {
                freeze.thaw().await;
            }
            // A new process that went away says more than the broken connection.
            match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                Ok(Ok(status)) => Err(UpgradeError::Exited(format!(
                    "{status} ({})",
                    error_chain(&e)
                ))),
                _ => Err(fail(&mut child, e)),
            }
        }
    }
}

/// Ends a new process that will not take over (it exits by itself on a broken handover; this
/// is for one that hangs) and passes `e` on.
fn fail(child: &mut tokio::process::Child, e: UpgradeError) -> UpgradeError {
    let _ = child.start_kill();
    e
}

type Failure = (UpgradeError, Option<Freeze>);

async fn hand_over<B: VmBackend>(
    service: &Arc<SandboxService<B>>,
    plan: &Plan,
    chan: &mut Channel,
    start: Instant,
    new_pid: u32,
) -> Result<(Report, Freeze), Failure> {
    let hello = recv(chan, "say hello").await.map_err(|e| (e, None))?;
    let Msg::Hello {
        protocol,
        vm_format,
        version,
        pid,
    } = hello.message
    else {
        return Err((UpgradeError::Protocol("expected Hello".into()), None));
    };
    compatible(protocol, vm_format).map_err(|e| (e, None))?;
    info!(%version, pid, "upgrade: the new process is compatible");
    let mut phases = Phases::new(start);
    let hold = service
        .hold_all(DRAIN_TIMEOUT)
        .await
        .map_err(|e| (UpgradeError::Sandbox(Box::new(e)), None))?;
    phases.mark("held");
    // While the VMs still run, the new process builds theirs ahead on the same memory.
    let layouts = hold.layouts();
    let count = layouts.len();
    chan.send(&Msg::Offer { sandboxes: count }, &[], &[])
        .await
        .map_err(|e| (e.into(), None))?;
    for (id, layout) in layouts {
        let Some(layout) = layout else {
            let why = format!("sandbox {id}: its VM cannot be handed over");
            return Err((UpgradeError::Incompatible(why), None));
        };
        // A clone's written pages are copied now, while it runs: frozen, only what changes
        // after this is copied again.
        let base = hold.precopy(&id).await;
        let msg = Msg::Prepare {
            id,
            private: layout.private,
            mem_bytes: layout.mem_bytes,
            vcpus: layout.vcpus,
            base: base.as_ref().map(|(_, id)| *id),
        };
        let mut fds = vec![layout.memory.as_fd()];
        fds.extend(base.as_ref().map(|(pages, _)| pages.as_fd()));
        chan.send(&msg, &[], &fds)
            .await
            .map_err(|e| (e.into(), None))?;
    }
    for _ in 0..count {
        match recv(chan, "build a VM ahead").await {
            Ok(wire::Frame {
                message: Msg::Prepared { .. },
                ..
            }) => {}
            Ok(f) => {
                let e = UpgradeError::Protocol(format!("{:?} instead of Prepared", f.message));
                return Err((e, None));
            }
            Err(e) => return Err((e, None)),
        }
    }
    // The Task endpoints stop between frames (their connections go over as they are), then
    // each VM goes out as soon as it is frozen; the new process writes its state into the VM
    // it built ahead while the others are still freezing.
    phases.mark("prepared");
    let mut cuts = hold
        .cut_tasks(TASK_CALLS_TIMEOUT)
        .await
        .map_err(|e| (UpgradeError::Sandbox(Box::new(e)), None))?;
    phases.mark("cut");
    let cpu_at_cut = process_cpu_us();
    let (freeze, mut frozen) = hold.freeze();
    let mut freeze = Some(freeze);
    let fail = |e: UpgradeError, freeze: &mut Option<Freeze>| (e, freeze.take());
    let mut frozen_at = std::collections::HashMap::new();
    let mut freezes_us = Vec::with_capacity(count);
    let mut failure = None;
    for _ in 0..count {
        let Some(one) = frozen.recv().await else {
            failure.get_or_insert(UpgradeError::Protocol("a freeze task vanished".into()));
            break;
        };
        let one = one.finish().await;
        let handover = match one.handover {
            Ok(h) => h,
            Err(e) => {
                let e = crate::error::SandboxError::Backend(one.id, e);
                failure.get_or_insert(UpgradeError::Sandbox(Box::new(e)));
                if let Some(f) = &freeze {
                    f.give_up();
                }
                continue;
            }
        };
        if let Some(f) = freeze.as_mut() {
            f.add(one.id.clone(), one.vm);
        }
        if failure.is_some() {
            continue;
        }
        let at = monotonic_ns_at(one.frozen_at);
        frozen_at.insert(one.id.clone(), at);
        freezes_us.push(u64::try_from(one.took.as_micros()).unwrap_or(u64::MAX));
        let task = cuts.remove(&one.id);
        if let Err(e) = send_sandbox(chan, one.id, handover, task, at).await {
            failure = Some(e);
            if let Some(f) = &freeze {
                f.give_up();
            }
        }
    }
    if let Some(e) = failure {
        return Err(fail(e, &mut freeze));
    }
    phases.mark("sent");
    match recv(chan, "rebuild the VMs").await {
        Ok(wire::Frame {
            message: Msg::Restored { ids },
            ..
        }) if ids.iter().collect::<std::collections::HashSet<_>>()
            == frozen_at.keys().collect() => {}
        Ok(f) => {
            let e = UpgradeError::Protocol(format!(
                "{:?} instead of Restored with the {count} sandboxes sent",
                f.message
            ));
            return Err(fail(e, &mut freeze));
        }
        Err(e) => return Err(fail(e, &mut freeze)),
    }
    phases.mark("restored");
    let paths: Vec<PathBuf> = plan.listeners.iter().map(|(p, _)| p.clone()).collect();
    let fds: Vec<BorrowedFd<'_>> = plan.listeners.iter().map(|(_, l)| l.as_fd()).collect();
    chan.send(&Msg::Listeners { paths }, &[], &fds)
        .await
        .map_err(|e| fail(e.into(), &mut freeze))?;
    match recv(chan, "get ready").await {
        Ok(f) if matches!(f.message, Msg::Ready) => {}
        Ok(f) => {
            let e = UpgradeError::Protocol(format!("{:?} instead of Ready", f.message));
            return Err(fail(e, &mut freeze));
        }
        Err(e) => return Err(fail(e, &mut freeze)),
    }
    phases.mark("ready");
    // The point of no return: from here the new process may run the VMs.
    let freeze = freeze.ok_or_else(|| (UpgradeError::Protocol("no freeze".into()), None))?;
    if let Err(e) = chan.send(&Msg::Commit, &[], &[]).await {
        // Whether the new process saw it is unknown: it may be running them already, so
        // they must not run here too. It exits without Commit (dropping nothing).
        warn!(error = %error_chain(&e), "upgrade: Commit not delivered; giving the VMs up");
    }
    phases.mark("committed");
    let mut report = Report {
        new_pid,
        sandboxes: count,
        freezes_us,
        old_window_cpu_us: process_cpu_us().saturating_sub(cpu_at_cut),
        ..Report::default()
    };
    match recv(chan, "report Done").await {
        Ok(wire::Frame {
            message:
                Msg::Done {
                    resumed,
                    failed,
                    cpu_us,
                },
            ..
        }) => {
            report.new_window_cpu_us = cpu_us;
            for (id, at) in resumed {
                if let Some(frozen) = frozen_at.get(&id) {
                    report.pauses_us.push(at.saturating_sub(*frozen) / 1000);
                }
            }
            report.failed = failed;
        }
        Ok(f) => warn!(message = ?f.message, "upgrade: unexpected answer to Commit"),
        Err(e) => warn!(error = %error_chain(&e), "upgrade: no Done from the new process"),
    }
    phases.mark("done");
    report.total_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    report.phases_us = phases.0;
    Ok((report, freeze))
}

async fn send_sandbox(
    chan: &mut Channel,
    id: String,
    mut handover: Handover,
    task: Option<TaskCut>,
    frozen_at_ns: u64,
) -> Result<(), UpgradeError> {
    let files = handover.snapshot.take_files();
    let (bytes, vm_files) = handover.snapshot.encode();
    let mut fds: Vec<BorrowedFd<'_>> = vm_files.iter().map(|f| f.as_fd()).collect();
    let vm_count = fds.len();
    if let Some(l) = &files.vsock {
        fds.push(l.as_fd());
    }
    let nics = files
        .nets
        .iter()
        .map(|(_, c)| Nic {
            mac: c.mac,
            mtu: c.mtu,
        })
        .collect();
    fds.extend(files.nets.iter().map(|(f, _)| f.as_fd()));
    let disks = files
        .blocks
        .iter()
        .map(|b| b.as_ref().map(Disk::of))
        .collect();
    fds.extend(files.blocks.iter().flatten().map(|b| b.file.as_fd()));
    let (task, task_fds) = match task.map(TaskCut::into_parts) {
        Some((state, fds)) => (Some(state), fds),
        None => (None, Vec::new()),
    };
    fds.extend(task_fds.iter().map(AsFd::as_fd));
    let msg = Msg::Sandbox {
        id,
        agent_port: handover.agent_port,
        vm_files: vm_count,
        vsock: files.vsock.is_some(),
        nics,
        disks,
        frozen_at_ns,
        task,
    };
    send_with_fds(chan, &msg, &bytes, &fds).await?;
    Ok(())
}

/// What the new process took over: the API sockets to serve.
#[derive(Debug)]
pub struct Taken {
    /// The API sockets, bound and listening, with their paths.
    pub listeners: Vec<(PathBuf, UnixListener)>,
    /// Sandboxes taken over.
    pub sandboxes: usize,
}

/// The new process's side: connects to the old process at `socket`, rebuilds every sandbox
/// it hands over in `service` (frozen), and once the old one has let go runs them and serves
/// them. An `Err` before the handover's `Commit` leaves everything to the old process: the
/// caller must exit at once, dropping nothing (a VM rebuilt here shares the old one's memory
/// and sockets).
pub async fn take<B: VmBackend>(
    service: &Arc<SandboxService<B>>,
    socket: &Path,
) -> Result<Taken, UpgradeError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| UpgradeError::Io(format!("cannot connect to {}", socket.display()), e))?;
    let mut chan = Channel::new(stream);
    let protocol = std::env::var(PROTOCOL_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROTOCOL_VERSION);
    let hello = Msg::Hello {
        protocol,
        vm_format: vmm::snapshot::FORMAT_VERSION,
        version: crate::embedded::LONG_VERSION.clone(),
        pid: std::process::id(),
    };
    chan.send(&hello, &[], &[]).await?;
    let offer = recv(&mut chan, "offer the sandboxes").await?;
    let Msg::Offer { sandboxes } = offer.message else {
        return Err(UpgradeError::Protocol(format!("{:?}", offer.message)));
    };
    let fail_after: Option<usize> = std::env::var(FAIL_AFTER_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    // The heap of the two threads that will write the frozen VMs' state (this one and the
    // lane's) is faulted in now, well before the first freeze.
    let warm = sandboxes.saturating_mul(WARM_HEAP_PER_VM);
    let mut lane = lane::Lane::start(service, warm);
    vmm::warm_heap(warm);
    // Every VM built ahead, side by side (most of it is waiting inside KVM), while the old
    // process still runs them.
    let mut preparing = tokio::task::JoinSet::new();
    for _ in 0..sandboxes {
        let frame = recv(&mut chan, "send a VM's layout").await?;
        let service = Arc::clone(service);
        preparing.spawn(async move { prepare(&service, frame).await });
    }
    let mut shells = std::collections::HashMap::with_capacity(sandboxes);
    while let Some(done) = preparing.join_next().await {
        let prepared = done.unwrap_or_else(|e| {
            Err(UpgradeError::Io(
                "a prepare task failed".into(),
                std::io::Error::other(e.to_string()),
            ))
        });
        match prepared {
            Ok((id, shell)) => {
                chan.send(&Msg::Prepared { id: id.clone() }, &[], &[])
                    .await?;
                shells.insert(id, shell);
            }
            Err(e) => {
                let reason = error_chain(&e);
                let _ = chan.send(&Msg::Refused { reason }, &[], &[]).await;
                return Err(e);
            }
        }
    }
    // Then, frozen in the old process, each one's state: written into its shell as it comes,
    // here (no task or thread hop per VM: on this host each costs more than the writing), or
    // by a second thread beside this one when it is free (`lane`).
    let mut adopted: Vec<Rebuilt> = Vec::with_capacity(sandboxes);
    let cpu_at_start = process_cpu_us();
    for n in 0..sandboxes {
        if fail_after == Some(n) {
            warn!("upgrade: test hook {FAIL_AFTER_ENV}={n}: exiting half way");
            exit_without_teardown(3);
        }
        let mut frame = recv(&mut chan, "send a sandbox").await?;
        collect_fds(&mut chan, &mut frame).await?;
        let ready = match &frame.message {
            Msg::Sandbox { id, .. } => shells.remove(id),
            _ => None,
        };
        // To the lane if it has nothing to do, else here: whichever is free takes the next.
        while let Some(rebuilt) = lane.try_done() {
            restored(&mut chan, rebuilt, &mut adopted).await?;
        }
        let here = if lane.idle() {
            lane.give(Box::new((frame, ready))).err().map(|job| *job)
        } else {
            Some((frame, ready))
        };
        if let Some((frame, ready)) = here {
            let rebuilt = rebuild(service, frame, ready).await;
            restored(&mut chan, rebuilt, &mut adopted).await?;
        }
        while let Some(rebuilt) = lane.try_done() {
            restored(&mut chan, rebuilt, &mut adopted).await?;
        }
    }
    while let Some(rebuilt) = lane.done().await {
        restored(&mut chan, rebuilt, &mut adopted).await?;
    }
    drop(lane);
    let ids = adopted.iter().map(|(id, ..)| id.clone()).collect();
    chan.send(&Msg::Restored { ids }, &[], &[]).await?;
    let frame = recv(&mut chan, "pass the API sockets").await?;
    let Msg::Listeners { paths } = frame.message else {
        return Err(UpgradeError::Protocol(format!("{:?}", frame.message)));
    };
    if paths.len() != frame.fds.len() {
        return Err(UpgradeError::Protocol(format!(
            "{} API socket paths, {} descriptors",
            paths.len(),
            frame.fds.len()
        )));
    }
    let listeners: Vec<(PathBuf, UnixListener)> = paths
        .into_iter()
        .zip(frame.fds)
        .map(|(p, fd)| (p, UnixListener::from(fd)))
        .collect();
    chan.send(&Msg::Ready, &[], &[]).await?;
    let commit = recv(&mut chan, "commit").await?;
    if !matches!(commit.message, Msg::Commit) {
        return Err(UpgradeError::Protocol(format!("{:?}", commit.message)));
    }
    // Ours now. Every guest runs again first (the pause ends here), then the rest.
    // At real-time priority: each VM it resumes wakes threads that would otherwise preempt
    // the loop, and the last VMs' pauses would grow by the first ones' catch-up work.
    let mut resumed = Vec::with_capacity(adopted.len());
    let mut failed = Vec::new();
    let running: Vec<_> = vmm::realtime(|| {
        adopted
            .into_iter()
            .map(|(id, vm, task)| {
                match vm.run() {
                    Ok(()) => resumed.push((id.clone(), monotonic_ns())),
                    Err(e) => failed.push((id.clone(), error_chain(&e))),
                }
                (id, vm, task)
            })
            .collect()
    });
    let cpu_us = process_cpu_us().saturating_sub(cpu_at_start);
    let pid = std::process::id();
    if let Err(e) = crate::notify::notify(&format!("MAINPID={pid}\nREADY=1")) {
        warn!(error = %e, "cannot tell systemd the new main pid");
    }
    let count = running.len();
    let done = Msg::Done {
        resumed,
        failed,
        cpu_us,
    };
    if let Err(e) = chan.send(&done, &[], &[]).await {
        warn!(error = %error_chain(&e), "upgrade: cannot report Done (the old process exits anyway)");
    }
    // The handed-over containers' images stay; any other in the cache is an earlier one's.
    let images: Vec<PathBuf> = running
        .iter()
        .filter_map(|(_, _, task)| task.as_ref())
        .flat_map(|t| t.state.image_paths())
        .collect();
    if let Err(e) = service.keep_images(&images) {
        warn!(error = %error_chain(&e), "upgrade: cannot open the image cache");
    }
    // Each is short (a vsock connect, a socket bind), and the guests run meanwhile.
    for (id, vm, task) in running {
        service.install(&id, vm, task).await;
    }
    info!(sandboxes = count, "upgrade: took over");
    Ok(Taken {
        listeners,
        sandboxes: count,
    })
}

/// A sandbox rebuilt here from its frame: its id, its VM (frozen), its Task endpoint.
type Rebuilt = (String, Box<dyn AdoptedVm>, Option<TaskCut>);

/// Keeps a rebuilt VM (the old process hears of them all at once, `Restored`), or tells the
/// old process why one could not be rebuilt (and fails: the caller exits, the old process
/// thaws them all).
async fn restored(
    chan: &mut Channel,
    rebuilt: Result<Rebuilt, UpgradeError>,
    adopted: &mut Vec<Rebuilt>,
) -> Result<(), UpgradeError> {
    match rebuilt {
        Ok(rebuilt) => {
            adopted.push(rebuilt);
            Ok(())
        }
        Err(e) => {
            let reason = error_chain(&e);
            let _ = chan.send(&Msg::Refused { reason }, &[], &[]).await;
            Err(e)
        }
    }
}

/// Builds ahead the VM of one sandbox from its `Prepare` frame.
async fn prepare<B: VmBackend>(
    service: &Arc<SandboxService<B>>,
    frame: wire::Frame<Msg>,
) -> Result<(String, Adoption), UpgradeError> {
    let Msg::Prepare {
        id,
        private,
        mem_bytes,
        vcpus,
        base,
    } = frame.message
    else {
        return Err(UpgradeError::Protocol(format!("{:?}", frame.message)));
    };
    let mut fds = frame.fds.into_iter();
    let (memory, pages, rest) = (fds.next(), fds.next(), fds.next());
    let (Some(memory), true, None) = (memory, pages.is_some() == base.is_some(), rest) else {
        let want = if base.is_some() { "two" } else { "one" };
        return Err(UpgradeError::Protocol(format!(
            "sandbox {id}: Prepare needs {want} descriptor(s)"
        )));
    };
    let layout = MemoryLayout {
        memory: Arc::new(File::from(memory)),
        private,
        mem_bytes,
        vcpus,
        base: base
            .zip(pages)
            .map(|(id, pages)| (Arc::new(File::from(pages)), id)),
    };
    let ready = service
        .prepare_adoption(&id, layout)
        .await
        .map_err(|e| UpgradeError::Sandbox(Box::new(e)))?;
    Ok((id, ready))
}

/// Rebuilds one handed-over sandbox's VM from its frame, as `ready` got ready for.
async fn rebuild<B: VmBackend>(
    service: &Arc<SandboxService<B>>,
    frame: wire::Frame<Msg>,
    ready: Option<Adoption>,
) -> Result<Rebuilt, UpgradeError> {
    let want = wanted_fds(&frame.message);
    let Msg::Sandbox {
        id,
        agent_port,
        vm_files,
        vsock,
        nics,
        disks,
        task,
        ..
    } = frame.message
    else {
        return Err(UpgradeError::Protocol(format!("{:?}", frame.message)));
    };
    if frame.fds.len() != want {
        return Err(UpgradeError::Protocol(format!(
            "sandbox {id}: {} descriptors, {want} expected",
            frame.fds.len()
        )));
    }
    let mut fds = frame.fds.into_iter();
    let vm_fds: Vec<File> = fds.by_ref().take(vm_files).map(File::from).collect();
    let mut snapshot = vmm::VmSnapshot::decode(&frame.blob, vm_fds)
        .map_err(|e| UpgradeError::Incompatible(format!("sandbox {id}: {e}")))?;
    let vsock_listener = if vsock {
        fds.next().map(|fd: OwnedFd| UnixListener::from(fd))
    } else {
        None
    };
    let nets = nics
        .into_iter()
        .zip(fds.by_ref())
        .map(|(nic, fd)| {
            let config = devices::virtio::net::NetConfig {
                mac: nic.mac,
                mtu: nic.mtu,
            };
            (File::from(fd), config)
        })
        .collect();
    let blocks = block_files(&mut fds, disks).ok_or_else(|| {
        UpgradeError::Protocol(format!("sandbox {id}: a disk without its descriptor"))
    })?;
    snapshot.set_files(vmm::HandoverFiles {
        vsock: vsock_listener,
        nets,
        blocks,
    });
    let task = match task {
        Some(state) => Some(
            TaskCut::from_parts(state, fds.collect())
                .map_err(|e| UpgradeError::Protocol(format!("sandbox {id}: {e}")))?,
        ),
        None => None,
    };
    let Some(ready) = ready else {
        return Err(UpgradeError::Protocol(format!(
            "sandbox {id} was not prepared"
        )));
    };
    let handover = Handover {
        snapshot,
        agent_port,
        shell: None,
    };
    let vm = service
        .adopt(&id, handover, ready)
        .await
        .map_err(|e| UpgradeError::Sandbox(Box::new(e)))?;
    Ok((id, vm, task))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};

    use super::*;

    /// A file holding `text`.
    fn file(text: &str) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn text(mut f: &File) -> String {
        let mut s = String::new();
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn each_slot_gets_back_its_own_disk() {
        // What the old process sends: slots 0 and 2 hold disks, 1 and 3 are empty.
        let sent = [
            Some(vmm::BlockFile {
                file: file("slot 0"),
                read_only: false,
                sectors: 8,
            }),
            None,
            Some(vmm::BlockFile {
                file: file("slot 2"),
                read_only: true,
                sectors: 16,
            }),
            None,
        ];
        let disks: Vec<_> = sent.iter().map(|b| b.as_ref().map(Disk::of)).collect();
        let wire = serde_json::to_string(&disks).unwrap();
        let fds: Vec<OwnedFd> = sent
            .iter()
            .flatten()
            .map(|b| OwnedFd::from(b.file.try_clone().unwrap()))
            .collect();
        let mut fds = fds.into_iter();
        let got = block_files(&mut fds, serde_json::from_str(&wire).unwrap()).unwrap();
        assert!(fds.next().is_none(), "every descriptor taken");
        assert_eq!(got.len(), 4);
        assert!(got[1].is_none() && got[3].is_none());
        let (zero, two) = (got[0].as_ref().unwrap(), got[2].as_ref().unwrap());
        assert_eq!(
            (text(&zero.file).as_str(), zero.read_only, zero.sectors),
            ("slot 0", false, 8)
        );
        assert_eq!(
            (text(&two.file).as_str(), two.read_only, two.sectors),
            ("slot 2", true, 16)
        );

        // A descriptor short: refused, not shifted onto another slot.
        let mut one = std::iter::once(OwnedFd::from(file("only")));
        let disks = serde_json::from_str(&wire).unwrap();
        assert!(block_files(&mut one, disks).is_none());
    }

    /// A `Sandbox` message of `n` VM files.
    fn sandbox(n: usize) -> Msg {
        Msg::Sandbox {
            id: "many".into(),
            agent_port: 1024,
            vm_files: n,
            vsock: false,
            nics: Vec::new(),
            disks: Vec::new(),
            frozen_at_ns: 0,
            task: None,
        }
    }

    #[tokio::test]
    async fn a_sandbox_with_more_descriptors_than_a_frame_takes_gets_them_all_in_order() {
        let n = 2 * wire::MAX_FDS + 3;
        let files: Vec<File> = (0..n).map(|i| file(&format!("fd {i}"))).collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        let (mut old, mut new) = wire::pair().unwrap();
        send_with_fds(&mut old, &sandbox(n), b"state", &fds)
            .await
            .unwrap();
        old.send(&Msg::Commit, &[], &[]).await.unwrap();
        let mut frame = recv(&mut new, "send a sandbox").await.unwrap();
        assert_eq!(frame.fds.len(), wire::MAX_FDS);
        collect_fds(&mut new, &mut frame).await.unwrap();
        assert_eq!(frame.blob, b"state");
        let got: Vec<String> = frame
            .fds
            .into_iter()
            .map(|fd| text(&File::from(fd)))
            .collect();
        let sent: Vec<String> = (0..n).map(|i| format!("fd {i}")).collect();
        assert_eq!(got, sent);
        // The frame after them is the next message.
        let next = recv(&mut new, "commit").await.unwrap();
        assert!(matches!(next.message, Msg::Commit));

        // A message where descriptors were due: refused.
        let (mut old, mut new) = wire::pair().unwrap();
        old.send(&sandbox(2), &[], &fds[..1]).await.unwrap();
        old.send(&Msg::Commit, &[], &[]).await.unwrap();
        let mut frame = recv(&mut new, "send a sandbox").await.unwrap();
        let err = collect_fds(&mut new, &mut frame).await.unwrap_err();
        assert!(err.to_string().contains("1 more were due"), "{err}");
    }
}
