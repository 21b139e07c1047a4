// SPDX-License-Identifier: Apache-2.0
//! The handle the caller keeps of a running VM ([`Vm`], built by [`crate::builder`]): requests
//! to its VMM thread, waiting for its end, and what it reports (console, boot time, memory).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use devices::legacy::{BootSignal, ConsoleTail};
use devices::sync::Recover;
use devices::virtio::block::FileDisk;
use devices::virtio::vsock::VsockHandle;
use vmm_sys_util::eventfd::EventFd;

use crate::VmExit;
use crate::api::{Answer, ApiRequest, REQUEST_TIMEOUT, Reply, VmmAction, VmmActionError, VmmData};
use crate::device_manager::DeviceError;
use crate::timings::StartupTimings;

/// How and when a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmEnd {
    /// Why it ended.
    pub exit: VmExit,
    /// When it ended.
    pub at: SystemTime,
}

/// Code to run when a VM ends ([`Vm::on_end`]).
type EndWatcher = Box<dyn FnOnce(&VmEnd) + Send>;

/// A VM's end, once it is known, and the waiters for it.
#[derive(Default)]
pub(crate) struct EndState {
    inner: Mutex<EndInner>,
    cv: Condvar,
}

#[derive(Default)]
struct EndInner {
    end: Option<VmEnd>,
    watchers: Vec<EndWatcher>,
}

impl std::fmt::Debug for EndState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().recover();
        f.debug_struct("EndState")
            .field("end", &inner.end)
            .field("watchers", &inner.watchers.len())
            .finish()
    }
}

impl EndState {
    /// Records the end, wakes every waiter and runs the watchers (on this thread).
    pub(crate) fn set(&self, end: VmEnd) {
        let watchers = {
            let mut inner = self.inner.lock().recover();
            if inner.end.is_some() {
                return; // The first end stands (one recorded from outside, see `Vm::stop`).
            }
            inner.end = Some(end.clone());
            std::mem::take(&mut inner.watchers)
        };
        self.cv.notify_all();
        for watcher in watchers {
            watcher(&end);
        }
    }

    fn get(&self) -> Option<VmEnd> {
        self.inner.lock().recover().end.clone()
    }

    /// Runs `watcher` with the end: now if it is known, else when [`EndState::set`] records it.
    fn watch(&self, watcher: EndWatcher) {
        let mut inner = self.inner.lock().recover();
        match inner.end.clone() {
            Some(end) => {
                drop(inner);
                watcher(&end);
            }
            None => inner.watchers.push(watcher),
        }
    }
}

/// How long [`Vm::stop`] waits for the end after the VMM thread's answer (or its silence).
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// A running (or ended) VM.
#[derive(Debug)]
pub struct Vm {
    pub(crate) api_tx: Sender<ApiRequest>,
    /// The VMM thread's wake-up EventFd.
    pub(crate) wake: Arc<EventFd>,
    pub(crate) end: Arc<EndState>,
    pub(crate) boot: Arc<BootSignal>,
    pub(crate) console: Arc<ConsoleTail>,
    pub(crate) ram_file: Arc<File>,
    /// Whether the memory is a template's memfd mapped copy-on-write (a clone's).
    pub(crate) private_memory: bool,
    pub(crate) mem_bytes: u64,
    pub(crate) vcpu_count: u8,
    pub(crate) timings: StartupTimings,
    pub(crate) blk_slots: usize,
    pub(crate) vsock: Option<VsockHandle>,
    /// The host thread ids and stacks of the VM's threads (vCPUs in id order, then the VMM
    /// thread), each set when its thread starts.
    pub(crate) thread_ids: Vec<Arc<crate::stack::ThreadSeen>>,
    /// Set once the VM is torn down, after its end.
    pub(crate) torn_down: Arc<crate::host::TornDown>,
    /// The vCPUs' run control, for a Stop the VMM thread does not answer ([`Vm::stop`]).
    pub(crate) vcpu_control: Arc<crate::vcpu::VcpuControl>,
    /// A clone's pages copied ahead ([`Vm::precopy`]).
    pub(crate) precopied: Mutex<Precopied>,
    /// A VM restored for a handover, its threads not started yet: they start when it first
    /// runs ([`Vm::resume_now`], [`Vm::resume`]) or is asked anything else.
    pub(crate) held: Mutex<Option<Box<dyn Unstarted>>>,
}

/// The threads of a VM built but not started yet (the builder's `Launch`).
pub(crate) trait Unstarted: Send + std::fmt::Debug {
    /// Hands them the VM: it runs, unless `frozen` (its vCPUs wait paused and its devices
    /// touch nothing until Resume). Fails only if the VMM thread is gone, with the VM ended.
    fn start(self: Box<Self>, frozen: bool) -> io::Result<()>;
}

/// A clone's pages copied ahead of a live handover.
#[derive(Debug, Default)]
pub(crate) struct Precopied {
    /// The copy the next handover builds on.
    pub(crate) ready: Option<crate::memory::Precopy>,
    /// The copy the last handover built on, kept until the VM runs here again, the next copy
    /// or the VM's end: unmapping it and freeing its pages inside the freeze would lengthen
    /// the pause (a TLB shootdown across the process, a truncated memfd).
    pub(crate) spent: Option<crate::memory::Precopy>,
}

/// A VM frozen for a live handover by [`Vm::handover_then`], its saved state not complete
/// yet: [`Vm::finish_handover`] completes it (for a clone, it copies the pages written since
/// the copy ahead).
pub struct Frozen {
    pub(crate) answer: Answer,
    pub(crate) base: Option<crate::memory::Precopy>,
}

impl Frozen {
    /// Whether [`Vm::finish_handover`] copies pages (a clone's): work that may take a while
    /// and block, for a thread that can wait. Otherwise finishing is only bookkeeping.
    pub fn copies_pages(&self) -> bool {
        matches!(&self.answer, Ok(VmmData::Handover(_, Some(_))))
    }
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen")
            .field("ok", &self.answer.is_ok())
            .field("copies_pages", &self.copies_pages())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Gets the running VM ready for a [`Vm::handover`] soon: faults in, from this thread and
    /// while the guest runs, the stack its threads' save will reach (deeper than they ever
    /// went: a vCPU's whole state in locals, the kick signal's frame), which the freeze would
    /// otherwise fault in a page at a time.
    pub fn ready_for_handover(&self) {
        for thread in &self.thread_ids {
            if let Err(e) = thread.populate_stack(crate::stack::HANDOVER_DEPTH) {
                log::debug!("Cannot fault a VM thread's stack in ahead: {e}");
            }
        }
    }

    /// The host thread ids of the running VM: its vCPU threads in id order, then its VMM
    /// thread (what a pid is to a process-per-VM VMM: for `top -H`, `perf`, `/proc/*/task`).
    /// Empty once the VM has ended (the ids may belong to other threads by then).
    pub fn thread_ids(&self) -> Vec<u32> {
        if self.ended().is_some() {
            return Vec::new();
        }
        self.thread_ids
            .iter()
            .map(|t| t.tid())
            .filter(|&t| t != 0)
            .collect()
    }

    /// Starts the threads of a VM restored for a handover that has not run yet, `frozen`
    /// (as it was restored) or not; a VMM thread that is gone ends the VM.
    fn start_held(&self, frozen: bool) {
        let held = self.held.lock().recover().take();
        if let Some(held) = held
            && let Err(e) = held.start(frozen)
        {
            log::error!("A restored VM's threads could not start: {e}");
        }
    }

    /// Sends `action` to the VMM thread and waits for its answer (at most [`REQUEST_TIMEOUT`]).
    pub fn request(&self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        self.start_held(true);
        let name = action.name();
        let (tx, rx) = channel();
        self.api_tx
            .send((action, Reply::Channel(tx)))
            .map_err(|_| VmmActionError::NotRunning)?;
        self.wake.write(1).map_err(|_| VmmActionError::NotRunning)?;
        match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(answer) => answer,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(VmmActionError::TimedOut(name)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(VmmActionError::NotRunning),
        }
    }

    /// Sends `action` to the VMM thread without waiting: `done` is called once with the
    /// answer, on the VMM thread (it must only pass it on), or on this one if the VM has ended.
    pub(crate) fn request_then(
        &self,
        action: VmmAction,
        done: impl FnOnce(Answer) + Send + 'static,
    ) {
        self.start_held(true);
        let reply = Reply::Call(Some(Box::new(done)));
        // A request that cannot be sent is answered as its reply drops.
        if self.api_tx.send((action, reply)).is_ok() {
            // A failed wake-up leaves the request to the thread's next one (or to its end).
            let _ = self.wake.write(1);
        }
    }

    /// Stops every vCPU outside the guest until [`Vm::resume`].
    pub fn pause(&self) -> Result<(), VmmActionError> {
        self.request(VmmAction::Pause).map(drop)
    }

    /// What a new process needs to build this VM's shell ahead of a live handover
    /// ([`crate::PreparedShell::build`]): the guest memory's memfd (for a clone, its
    /// template's), whether it is mapped copy-on-write, its size and the vCPU count.
    pub fn memory_layout(&self) -> (&Arc<File>, bool, u64, u8) {
        (
            &self.ram_file,
            self.private_memory,
            self.mem_bytes,
            self.vcpu_count,
        )
    }

    /// After a successful handover: closes the host ends of the VM's vsock connections
    /// (frozen here, the VM runs in the process that took it over).
    pub fn release_host_ends(&self) -> Result<(), VmmActionError> {
        self.request(VmmAction::ReleaseHostEnds).map(drop)
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), VmmActionError> {
        self.forget_precopy();
        self.request(VmmAction::Resume).map(drop)
    }

    /// Drops the pages copied ahead of a handover and the copy a handover used: the VM runs
    /// here again (a handover given up), a later one copies anew.
    fn forget_precopy(&self) {
        *self.precopied.lock().recover() = Precopied::default();
    }

    /// Resumes a paused or frozen VM without waiting for its VMM thread: the vCPUs run again
    /// at once (from this thread), the devices as soon as the VMM thread takes the request.
    /// Ending many VMs' pauses together this way does not wait on each VMM thread's turn on
    /// a busy host. Fails only for a VM that has ended.
    pub fn resume_now(&self) -> Result<(), VmmActionError> {
        if self.ended().is_some() {
            return Err(VmmActionError::NotRunning);
        }
        self.forget_precopy();
        // Threads not started yet start running: two wake-ups, as below.
        let held = self.held.lock().recover().take();
        if let Some(held) = held {
            self.vcpu_control.resume();
            return held.start(false).map_err(|_| VmmActionError::NotRunning);
        }
        self.vcpu_control.resume();
        let (tx, _) = channel();
        self.api_tx
            .send((VmmAction::Resume, Reply::Channel(tx)))
            .map_err(|_| VmmActionError::NotRunning)?;
        self.wake.write(1).map_err(|_| VmmActionError::NotRunning)
    }

    /// Stops the VM (if it still runs) and returns how it ended. Always returns: on neither
    /// the guest nor the VMM thread does it wait longer than [`REQUEST_TIMEOUT`] and
    /// [`STOP_WAIT`]. A VMM thread that does not answer has the VM ended from outside it: its
    /// vCPUs are stopped and kicked out of the guest from here and the end is recorded as a
    /// crash that says so; what that thread owns (guest memory, devices) is freed only when it
    /// returns, if ever.
    pub fn stop(&self) -> VmEnd {
        // NotRunning means the VMM thread already finished: the end is recorded.
        if let Err(e) = self.request(VmmAction::Stop)
            && !matches!(e, VmmActionError::NotRunning)
        {
            log::error!("Stop: {e}");
        }
        if let Some(end) = self.wait_timeout(STOP_WAIT) {
            return end;
        }
        log::error!("The VMM thread did not end the VM: stopping its vCPUs from outside");
        self.vcpu_control.set_stopping();
        let vcpus = self.thread_ids.len().saturating_sub(1); // the VMM thread is last
        for thread in self.thread_ids.iter().take(vcpus) {
            let tid = thread.tid();
            if tid != 0 {
                crate::kvm::signal::kick_thread(tid);
            }
        }
        self.end.set(VmEnd {
            exit: VmExit::Crashed(format!(
                "the VMM thread did not end the VM within {:?} of Stop: ended from outside it",
                REQUEST_TIMEOUT + STOP_WAIT
            )),
            at: SystemTime::now(),
        });
        self.wait()
    }

    /// Blocks until the ended VM is also torn down, up to `timeout`: its devices and the host
    /// endpoints they held (a hybrid vsock socket path, block files) are released, so a new
    /// VM may take them. [`Vm::wait`] returns before that (teardown runs after the waiters are
    /// woken). Returns whether it was torn down in time.
    pub fn wait_torn_down(&self, timeout: Duration) -> bool {
        self.torn_down.wait(timeout)
    }

    /// Blocks until the VM has ended.
    pub fn wait(&self) -> VmEnd {
        let guard = self.end.inner.lock().recover();
        let guard = self.end.cv.wait_while(guard, |e| e.end.is_none()).recover();
        guard.end.clone().expect("waited for Some")
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmEnd> {
        let guard = self.end.inner.lock().recover();
        let (guard, _) = self
            .end
            .cv
            .wait_timeout_while(guard, timeout, |e| e.end.is_none())
            .recover();
        guard.end.clone()
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        self.end.get()
    }

    /// Runs `watcher` once the VM has ended: on the VMM thread as it records the end (before
    /// the VM is torn down), or right here if it already has. The way to learn of a VM's end
    /// without a thread blocked in [`Vm::wait`]. On the VMM thread it runs under that
    /// thread's seccomp filter and holds up the VM's end: it must only hand the news on
    /// (set a flag, send on a channel, wake a task), never block or open anything.
    pub fn on_end(&self, watcher: impl FnOnce(&VmEnd) + Send + 'static) {
        self.end.watch(Box::new(watcher));
    }

    /// Time from `Vm::start` to the guest's boot-timer write, if it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot.get()
    }

    /// Waits up to `timeout` for the guest's boot-timer write (returns early if the VM ends).
    pub fn wait_boot(&self, timeout: Duration) -> Option<Duration> {
        self.boot.wait(timeout)
    }

    /// The last bytes of console output.
    pub fn console(&self) -> String {
        self.console.text()
    }

    /// Total console bytes printed so far.
    pub fn console_bytes(&self) -> u64 {
        self.console.total_bytes()
    }

    /// Puts the disk image at `path` into block slot `index` while the guest runs; the guest
    /// gets a config-change interrupt and sees the new capacity. The file is opened here, on
    /// the caller's thread; the VMM thread swaps it in ([`VmmAction::AttachDisk`]).
    pub fn attach_disk(
        &self,
        index: usize,
        path: &Path,
        read_only: bool,
    ) -> Result<(), VmmActionError> {
        if index >= self.blk_slots {
            return Err(DeviceError::NoSuchSlot(index).into());
        }
        let disk = FileDisk::open(path, read_only).map_err(|source| DeviceError::OpenDisk {
            path: path.to_path_buf(),
            source,
        })?;
        self.request(VmmAction::AttachDisk {
            index,
            disk: Box::new(disk),
            read_only,
        })
        .map(drop)
    }

    /// Empties block slot `index` (capacity 0; I/O fails until the next attach).
    pub fn detach_disk(&self, index: usize) -> Result<(), VmmActionError> {
        self.request(VmmAction::DetachDisk { index }).map(drop)
    }

    /// Number of block slots.
    pub fn block_slots(&self) -> usize {
        self.blk_slots
    }

    /// The host side of the vsock device: connect to guest ports, listen for guest connections.
    pub fn vsock(&self) -> Option<&VsockHandle> {
        self.vsock.as_ref()
    }

    /// Per-phase start-up times.
    pub fn timings(&self) -> &StartupTimings {
        &self.timings
    }

    /// Bytes of guest memory that hold data (touched by the guest or the VMM).
    pub fn guest_resident_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.ram_file.metadata()?.blocks() * 512)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.ended().is_none() {
            let _ = self.request(VmmAction::Stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn watchers_run_once_with_the_end_whenever_they_came() {
        let state = Arc::new(EndState::default());
        let (tx, rx) = mpsc::channel();
        let early = tx.clone();
        state.watch(Box::new(move |end| {
            early.send(("early", end.clone())).unwrap()
        }));
        assert!(rx.try_recv().is_err(), "no end yet");
        let end = VmEnd {
            exit: VmExit::Stopped,
            at: SystemTime::UNIX_EPOCH,
        };
        let setter = {
            let (state, end) = (Arc::clone(&state), end.clone());
            std::thread::spawn(move || state.set(end))
        };
        setter.join().unwrap();
        assert_eq!(rx.recv().unwrap(), ("early", end.clone()));
        state.watch(Box::new(move |end| tx.send(("late", end.clone())).unwrap()));
        assert_eq!(rx.recv().unwrap(), ("late", end.clone()));
        assert!(rx.try_recv().is_err(), "each watcher ran once");
        assert_eq!(state.get(), Some(end));
    }
}
