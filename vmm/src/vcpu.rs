// SPDX-License-Identifier: Apache-2.0
//! vCPU threads: one per vCPU, each running `KVM_RUN` and dispatching exits to the buses.
//!
//! Run control is a small state machine shared with the VMM thread: `Running`, `Paused`,
//! `Stopping`. The VMM thread changes the state, then kicks every vCPU thread out of `KVM_RUN`
//! (see `kvm::signal`); each thread re-reads the state before re-entering the guest, parks while
//! paused and leaves its loop when stopping. Nothing a guest does can keep a vCPU thread from
//! seeing a kick: the only blocking points are `KVM_RUN` and short device locks.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::sync::Recover;
use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::kvm::signal::{ThreadVcpu, kick_thread};
use crate::seccomp::{PendingThread, SeccompPolicy, VmmRun};
use crate::stack::ThreadSeen;
use crate::{ResetKind, VmExit};

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const STOPPING: u8 = 2;

/// KVM system event types (`KVM_SYSTEM_EVENT_*`).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Work for one parked vCPU thread: it runs with the thread's vCPU fd.
type VcpuWork = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// State shared by the vCPU threads of one VM and its VMM thread.
pub(crate) struct VcpuControl {
    state: AtomicU8,
    counts: Mutex<Counts>,
    cv: Condvar,
    /// Work for vCPU threads to run in their park, by vCPU id (see [`VcpuSet::pause_with`]).
    work: Mutex<Vec<Option<VcpuWork>>>,
    /// The first terminal exit a vCPU saw; the VMM thread ends the VM with it.
    pending_exit: Mutex<Option<VmExit>>,
    /// The VMM thread's wake-up EventFd (shared with API requests).
    wake: Arc<EventFd>,
    /// Test hook ([`crate::PanicSite::VcpuExit`]): the next kicked vCPU exit panics.
    panic_on_exit: AtomicBool,
}

#[derive(Debug, Default)]
struct Counts {
    parked: usize,
    exited: usize,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("state", &self.state)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl VcpuControl {
    /// Run control whose terminal exits wake the VMM thread through `wake`.
    pub(crate) fn new(wake: Arc<EventFd>) -> Self {
        VcpuControl {
            state: AtomicU8::new(RUNNING),
            counts: Mutex::new(Counts::default()),
            cv: Condvar::new(),
            work: Mutex::new(Vec::new()),
            pending_exit: Mutex::new(None),
            wake,
            panic_on_exit: AtomicBool::new(false),
        }
    }

    /// Called by vCPU thread `id` before re-entering the guest when the state is not
    /// `Running`: parks it, running any work given to it with its `fd` meanwhile. Returns false
    /// when the thread must leave its loop.
    fn park(&self, id: usize, fd: &mut VcpuFd) -> bool {
        let mut counts = self.counts.lock().recover();
        loop {
            match self.state.load(Ordering::Acquire) {
                RUNNING => return true,
                STOPPING => return false,
                _ => {
                    let work = self
                        .work
                        .lock()
                        .recover()
                        .get_mut(id)
                        .and_then(Option::take);
                    if let Some(work) = work {
                        // Out of the guest while it works; counted as parked once it waits.
                        drop(counts);
                        work(fd);
                        counts = self.counts.lock().recover();
                        continue;
                    }
                    counts.parked += 1;
                    self.cv.notify_all();
                    counts = self.cv.wait(counts).recover();
                    counts.parked -= 1;
                }
            }
        }
    }

    fn mark_exited(&self) {
        let mut counts = self.counts.lock().recover();
        counts.exited += 1;
        self.cv.notify_all();
    }

    /// Tells every vCPU thread to leave its loop at its next look at the state (the caller
    /// kicks them out of the guest).
    pub(crate) fn set_stopping(&self) {
        self.set_state(STOPPING);
    }

    /// Records a terminal exit (the first one wins) and wakes the VMM thread.
    pub(crate) fn report_exit(&self, exit: VmExit) {
        let mut pending = self.pending_exit.lock().recover();
        if pending.is_none() {
            *pending = Some(exit);
        }
        drop(pending);
        if let Err(e) = self.wake.write(1) {
            log::error!("Failed to signal a vCPU exit: {e}");
        }
    }

    pub(crate) fn take_pending_exit(&self) -> Option<VmExit> {
        self.pending_exit.lock().recover().take()
    }

    /// Keeps the vCPUs out of the guest from their start until [`VcpuSet::resume`] (a VM
    /// restored for a handover runs only once the old one is gone).
    pub(crate) fn start_paused(&self) {
        self.set_state(PAUSED);
    }

    /// Lets paused vCPUs run again, from any thread (what [`VcpuSet::resume`] does).
    pub(crate) fn resume(&self) {
        if self.state.load(Ordering::Acquire) == PAUSED {
            self.set_state(RUNNING);
        }
    }

    fn set_state(&self, state: u8) {
        // Taking the lock orders the store against a thread that is about to wait in `park`.
        let _counts = self.counts.lock().recover();
        self.state.store(state, Ordering::Release);
        self.cv.notify_all();
    }

    /// Waits until `done(counts)` or the timeout; returns whether it became true.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&Counts) -> bool) -> bool {
        let counts = self.counts.lock().recover();
        let (counts, _) = self
            .cv
            .wait_timeout_while(counts, timeout, |c| !done(c))
            .recover();
        done(&counts)
    }
}

/// The i8042's reset line: a guest reset (Linux `reboot=k`) ends the VM like a vCPU's
/// terminal exit, through the VMM thread's one wake-up EventFd, with no descriptor of its own.
#[derive(Debug)]
pub(crate) struct ResetLine(pub(crate) Arc<VcpuControl>);

impl devices::virtio::Line for ResetLine {
    fn pulse(&self) -> std::io::Result<()> {
        self.0.report_exit(VmExit::Reset(ResetKind::I8042));
        Ok(())
    }
}

/// What a vCPU thread needs besides its fd.
#[derive(Clone, Debug)]
pub(crate) struct VcpuContext {
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
}

/// The vCPU threads of one VM.
#[derive(Debug)]
pub(crate) struct VcpuSet {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    /// Each thread's host thread id (0 until it runs), for kicks, and its stack.
    seen: Vec<Arc<ThreadSeen>>,
}

/// How long stop and pause wait for vCPU threads before giving up on them.
const VCPU_WAIT: Duration = Duration::from_secs(5);

/// The vCPU threads of a VM being built ([`PendingThread`]): confined before they get a vCPU.
#[derive(Debug)]
pub(crate) struct PendingVcpus(Vec<PendingThread<(VcpuFd, VcpuContext)>>);

impl PendingVcpus {
    /// Spawns `count` threads named `vcpu<id>`, confined by `filter`.
    pub(crate) fn spawn(count: u8, filter: Option<Arc<BpfProgram>>) -> std::io::Result<Self> {
        let mut threads = Vec::with_capacity(usize::from(count));
        for id in 0..usize::from(count) {
            threads.push(PendingThread::spawn(
                format!("vcpu{id}"),
                filter.clone(),
                move |(fd, ctx): (VcpuFd, VcpuContext), confined| match confined {
                    Ok(()) => run_vcpu(fd, id, &ctx),
                    Err(e) => {
                        // Never run the guest unconfined: the VM ends instead.
                        log::error!("vcpu{id}: {e}");
                        ctx.control.report_exit(VmExit::Crashed(e.to_string()));
                        drop(fd);
                        ctx.control.mark_exited();
                    }
                },
            )?);
        }
        Ok(PendingVcpus(threads))
    }

    /// Where each thread's host thread id and stack appear once it runs, in vCPU id order.
    pub(crate) fn seen(&self) -> Vec<Arc<ThreadSeen>> {
        self.0.iter().map(PendingThread::seen).collect()
    }

    /// Hands every thread its vCPU (`fds` in id order): the guest runs from here on.
    pub(crate) fn start(self, fds: Vec<VcpuFd>, ctx: &VcpuContext) -> VcpuSet {
        let mut threads = Vec::with_capacity(fds.len());
        let mut seen = Vec::with_capacity(fds.len());
        for (pending, fd) in self.0.into_iter().zip(fds) {
            let thread = pending.seen();
            match pending.start((fd, ctx.clone())) {
                Ok(handle) => {
                    threads.push(handle);
                    seen.push(thread);
                }
                Err(_) => {
                    // The thread is gone (it cannot be: it only waits); count it as ended.
                    ctx.control
                        .report_exit(VmExit::Crashed("a vCPU thread ended early".into()));
                    ctx.control.mark_exited();
                }
            }
        }
        VcpuSet {
            control: Arc::clone(&ctx.control),
            threads,
            seen,
        }
    }
}

/// A VM's threads, started (and confined, each installing its filter) ahead of the VM: its
/// vCPU threads and its VMM thread, each waiting for its job.
pub(crate) struct VmThreads {
    /// The seccomp policy the threads were confined under.
    pub(crate) policy: SeccompPolicy,
    pub(crate) vcpus: PendingVcpus,
    pub(crate) vmm: PendingThread<VmmRun>,
    /// The directory the VMM thread was jailed in ahead ([`VmThreads::spawn_jailed`]).
    pub(crate) jailed: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for VmThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmThreads")
            .field("policy", &self.policy)
            .field("vcpus", &self.vcpus.0.len())
            .finish_non_exhaustive()
    }
}

impl VmThreads {
    /// Waits up to `within` until every thread is past its filter's install
    /// ([`PendingThread::wait_installed`]). False if one took longer.
    pub(crate) fn wait_installed(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let left = || deadline.saturating_duration_since(Instant::now());
        let vcpus = self.vcpus.0.iter_mut().all(|t| t.wait_installed(left()));
        vcpus && self.vmm.wait_installed(left())
    }

    /// Starts `vcpus` vCPU threads confined by `vcpu_filter` and a VMM thread confined by
    /// `vmm_filter` (the filters of `policy`).
    pub(crate) fn spawn(
        vcpus: u8,
        policy: SeccompPolicy,
        vcpu_filter: Option<Arc<BpfProgram>>,
        vmm_filter: Option<Arc<BpfProgram>>,
    ) -> std::io::Result<Self> {
        Ok(VmThreads {
            policy,
            vcpus: PendingVcpus::spawn(vcpus, vcpu_filter)?,
            vmm: PendingThread::spawn("vmm".into(), vmm_filter, |run: VmmRun, confined| {
                run(confined);
            })?,
            jailed: None,
        })
    }

    /// [`VmThreads::spawn`], the VMM thread also jailed in `root` under `lock` right after
    /// its filter ([`crate::seccomp::jail`]): what its VM's vsock device will need, done
    /// before the VM is (a live handover's shell, built while the old process still runs it).
    pub(crate) fn spawn_jailed(
        vcpus: u8,
        policy: SeccompPolicy,
        (vcpu_filter, vmm_filter): (Option<Arc<BpfProgram>>, Option<Arc<BpfProgram>>),
        root: std::path::PathBuf,
        lock: Option<Arc<BpfProgram>>,
    ) -> std::io::Result<Self> {
        let dir = root.clone();
        Ok(VmThreads {
            policy,
            vcpus: PendingVcpus::spawn(vcpus, vcpu_filter)?,
            vmm: PendingThread::spawn_then(
                "vmm".into(),
                vmm_filter,
                move || crate::seccomp::jail(&dir, lock.as_deref()),
                |run: VmmRun, confined| run(confined),
            )?,
            jailed: Some(root),
        })
    }

    /// Whether these threads serve a VM of `vcpus` vCPUs under `policy`.
    pub(crate) fn fit(&self, vcpus: u8, policy: SeccompPolicy) -> bool {
        self.policy == policy && self.vcpus.0.len() == usize::from(vcpus)
    }

    /// Where each thread's host thread id and stack appear once it runs: the vCPUs' in id
    /// order, then the VMM thread's.
    pub(crate) fn seen(&self) -> Vec<Arc<ThreadSeen>> {
        let mut seen = self.vcpus.seen();
        seen.push(self.vmm.seen());
        seen
    }
}

impl VcpuSet {
    /// Kicks every vCPU thread out of `KVM_RUN`, with `tgkill` (`kick_thread`): what the VMM
    /// thread's seccomp filter allows. `pthread_kill` is `tkill` under musl (the shipped static
    /// binary), which the filter refuses: kicks then never arrived, and a forced Stop waited
    /// out `VCPU_WAIT` and left the vCPU thread running. A thread that has not run yet (tid 0)
    /// is kicked on the next round; one that already left its loop is fine to miss.
    fn kick_all(&self) {
        for thread in &self.seen {
            let tid = thread.tid();
            if tid != 0 {
                kick_thread(tid);
            }
        }
    }

    /// Parks every vCPU outside the guest. Returns false if some did not park in time.
    pub(crate) fn pause(&self) -> bool {
        self.control.set_state(PAUSED);
        self.kick_all();
        let n = self.threads.len();
        self.control
            .wait_for(VCPU_WAIT, |c| c.parked + c.exited >= n)
    }

    /// [`VcpuSet::pause`], with each vCPU thread running `f` with its fd on its way into the
    /// park (outside the guest, before it counts as parked), and the results in vCPU order:
    /// one wake-up per thread, where a pause and then work for the parked threads took two.
    /// `None` if some thread did not answer or park within the wait bound (it has exited, or
    /// is stuck).
    pub(crate) fn pause_with<T: Send + 'static>(
        &self,
        f: impl Fn(usize, &mut VcpuFd) -> T + Send + Sync + 'static,
    ) -> Option<Vec<T>> {
        let n = self.threads.len();
        let f = Arc::new(f);
        // Bounded: its slots are allocated once, as they are (an unbounded channel zeroes a
        // block of 31 slots of `T`, a vCPU's whole state each: 60 KiB of fresh pages faulted
        // in on every save). Each thread sends once, so no send ever waits.
        let (tx, rx) = std::sync::mpsc::sync_channel(n.max(1));
        {
            // Taken only in a park: a running thread finds it once it sees the pause.
            let mut work = self.control.work.lock().recover();
            work.clear();
            for id in 0..n {
                let (f, tx) = (Arc::clone(&f), tx.clone());
                work.push(Some(Box::new(move |fd: &mut VcpuFd| {
                    let _ = tx.send((id, f(id, fd)));
                }) as VcpuWork));
            }
        }
        drop(tx);
        self.control.set_state(PAUSED);
        self.kick_all();
        let deadline = Instant::now() + VCPU_WAIT;
        let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((id, value)) => {
                    if let Some(slot) = results.get_mut(id) {
                        *slot = Some(value);
                    }
                }
                Err(_) => break,
            }
        }
        // Work a thread did not take must not run later.
        self.control.work.lock().recover().clear();
        let left = deadline.saturating_duration_since(Instant::now());
        let parked = self.control.wait_for(left, |c| c.parked + c.exited >= n);
        results
            .into_iter()
            .collect::<Option<Vec<T>>>()
            .filter(|_| parked)
    }

    /// Test hook: the next exit of a vCPU panics; the vCPUs are kicked out of the guest.
    pub(crate) fn panic_on_next_exit(&self) {
        self.control.panic_on_exit.store(true, Ordering::Relaxed);
        self.kick_all();
    }

    /// Lets parked vCPUs run again.
    pub(crate) fn resume(&self) {
        self.control.set_state(RUNNING);
    }

    /// Stops every vCPU thread and joins those that stopped in time. Never blocks longer than
    /// [`VCPU_WAIT`]: a thread that does not stop is detached and reported.
    pub(crate) fn stop(&mut self) {
        self.control.set_state(STOPPING);
        let n = self.threads.len();
        let deadline = Instant::now() + VCPU_WAIT;
        // Kick repeatedly: a thread between its state check and KVM_RUN is covered by
        // immediate_exit, but one inside a device call must be kicked again once it re-enters.
        loop {
            self.kick_all();
            let left = deadline.saturating_duration_since(Instant::now());
            if self
                .control
                .wait_for(left.min(Duration::from_millis(50)), |c| c.exited >= n)
            {
                break;
            }
            if left.is_zero() {
                log::error!("vCPU threads did not stop within {VCPU_WAIT:?}; detaching them");
                self.threads.clear();
                return;
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run_vcpu(fd: VcpuFd, id: usize, ctx: &VcpuContext) {
    let mut vcpu = ThreadVcpu::new(fd);
    // A panic in exit handling (a device's MMIO or port handler, say) ends this VM only, as a
    // crash: the VMM thread stops the other vCPUs and tears the VM down.
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| vcpu_loop(&mut vcpu, id, ctx))) {
        let why = format!(
            "vCPU thread {id} panicked: {}",
            crate::seccomp::panic_message(&*panic)
        );
        log::error!("{why}");
        ctx.control.report_exit(VmExit::Crashed(why));
    }
    drop(vcpu);
    ctx.control.mark_exited();
}

fn vcpu_loop(vcpu: &mut ThreadVcpu, id: usize, ctx: &VcpuContext) {
    loop {
        if ctx.control.state.load(Ordering::Acquire) != RUNNING && !ctx.control.park(id, vcpu.fd())
        {
            break;
        }
        match handle_exit(vcpu.fd(), ctx) {
            Ok(None) => {}
            Ok(Some(exit)) => {
                log::debug!("vcpu{id}: VM ends: {exit:?}");
                ctx.control.report_exit(exit);
                break;
            }
            Err(()) => {
                // The test hook kicks the vCPUs: it is looked at here, off the exit path.
                if ctx.control.panic_on_exit.swap(false, Ordering::Relaxed) {
                    panic!("injected panic (test hook) in vCPU {id}'s exit handling");
                }
                // EINTR from a kick: clear the flag the handler set, then re-read the state.
                vcpu.fd().set_kvm_immediate_exit(0);
            }
        }
    }
}

/// Runs the vCPU once. `Ok(Some)` ends the VM, `Err` means interrupted by a kick.
fn handle_exit(fd: &mut VcpuFd, ctx: &VcpuContext) -> Result<Option<VmExit>, ()> {
    match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            Ok(None)
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            ctx.pio.write(u64::from(port), data);
            Ok(None)
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0);
            }
            Ok(None)
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            ctx.mmio.write(addr, data);
            Ok(None)
        }
        Ok(VcpuExit::Intr) => Err(()),
        Ok(VcpuExit::Shutdown) => Ok(Some(VmExit::Reset(ResetKind::TripleFault))),
        Ok(VcpuExit::Hlt) => Ok(Some(VmExit::PowerOff)),
        Ok(VcpuExit::SystemEvent(kind, _)) => Ok(Some(match kind {
            SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
            SYSTEM_EVENT_RESET => VmExit::Reset(ResetKind::SystemEvent),
            SYSTEM_EVENT_CRASH => VmExit::Crashed("guest reported a crash".into()),
            other => VmExit::Crashed(format!("unknown KVM system event {other}")),
        })),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Ok(Some(VmExit::Crashed(format!(
            "KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
        )))),
        Ok(VcpuExit::InternalError) => {
            let rip = fd.get_regs().map(|r| r.rip).unwrap_or_default();
            Ok(Some(VmExit::Crashed(format!(
                "KVM internal error (emulation failure) at rip {rip:#x}"
            ))))
        }
        Ok(other) => Ok(Some(VmExit::Crashed(format!(
            "unexpected vCPU exit {other:?}"
        )))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Err(()),
        Err(e) => Ok(Some(VmExit::Crashed(format!("KVM_RUN failed: {e}")))),
    }
}
