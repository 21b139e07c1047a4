// SPDX-License-Identifier: Apache-2.0
//! The sandbox service's part in a live upgrade ([`crate::upgrade`]).
//!
//! The old process: [`SandboxService::hold_all`] waits for the operations in flight, then
//! refuses new ones (UNAVAILABLE: the engine tries again, and reaches the new process);
//! [`Hold::freeze`] freezes every running sandbox's VM for its handover. [`Freeze::thaw`]
//! undoes it when the upgrade fails; when it succeeds the old process ends with everything
//! still frozen.
//!
//! The new process: [`SandboxService::adopt`] rebuilds a handed-over VM, frozen, from its
//! record (read from the store: the records are the same files); once the old process has let
//! go, [`SandboxService::install`] lets it run and serves it as if this process had started it
//! (its Task endpoint on a freshly bound `task.sock`, its end watched).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::registry::{Entry, Locked};
use super::{EXIT_FAILED, SandboxService};
use crate::backend::{AdoptedVm, Begun, Handover, HandoverDone, MemoryLayout, VmBackend, VmHandle};
use crate::error::{SandboxError, error_chain};
use crate::sandbox::{ExitInfo, SandboxState};
use crate::task::{TaskCut, TaskCutter, TaskServer};

/// How an upgrade went, as the old process saw it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpgradeReport {
    /// The new process.
    pub new_pid: u32,
    /// Sandboxes handed over.
    pub sandboxes: usize,
    /// Each handed-over VM's pause (its vCPUs stopping here to running there), in
    /// microseconds.
    pub pauses_us: Vec<u64>,
    /// Sandboxes whose VM the new process could not run, with why.
    pub failed: Vec<(String, String)>,
    /// From the start of the upgrade to the new process's report that it runs them.
    pub total_us: u64,
    /// When each step of the handover ended, in microseconds from its start, in order.
    pub phases_us: Vec<(String, u64)>,
    /// Each handed-over VM's freeze (its vCPUs stopping to its state saved and back), in
    /// microseconds.
    pub freezes_us: Vec<u64>,
    /// The CPU time this process took from cutting the Task endpoints to its Commit, every
    /// thread (guests not frozen yet included), in microseconds.
    pub old_window_cpu_us: u64,
    /// The new process's, from waiting for the first frozen VM to every VM running.
    pub new_window_cpu_us: u64,
}

/// A request for a live upgrade (the admin API's Upgrade, or SIGUSR2), which the daemon's main
/// loop serves ([`crate::upgrade::give`]).
#[derive(Debug)]
pub struct UpgradeRequest {
    /// The new binary (`None`: the running one's path, which a package update replaced).
    pub binary: Option<std::path::PathBuf>,
    /// Where the outcome goes: the report, or why nothing moved.
    pub reply: Option<tokio::sync::oneshot::Sender<Result<UpgradeReport, String>>>,
}

/// What the new process has ready for a sandbox it will take over: the VM's spec (from its
/// record) and its VM built ahead.
#[derive(Debug)]
pub struct Adoption {
    spec: crate::backend::VmSpec,
    shell: vmm::PreparedShell,
}

/// The service held still for a handover, its VMs still running.
#[derive(Debug)]
pub struct Hold {
    gate: tokio::sync::OwnedRwLockWriteGuard<()>,
    locks: Vec<Locked>,
    running: Vec<(String, Arc<dyn VmHandle>)>,
    /// The running sandboxes' Task endpoints.
    tasks: Vec<(String, TaskCutter)>,
}

impl Hold {
    /// The running sandboxes and what a new process needs to build their VMs ahead.
    pub fn layouts(&self) -> Vec<(String, Option<MemoryLayout>)> {
        self.running
            .iter()
            .map(|(id, vm)| (id.clone(), vm.memory_layout()))
            .collect()
    }

    /// Copies sandbox `id`'s clone pages ahead of its handover, while its VM runs
    /// ([`VmHandle::precopy`]): `None` when there is nothing to copy, or the copy failed (the
    /// handover then copies them all, frozen).
    pub async fn precopy(&self, id: &str) -> Option<(Arc<std::fs::File>, u64)> {
        let (_, vm) = self.running.iter().find(|(running, _)| running == id)?;
        match vm.precopy().await {
            Ok(copy) => copy,
            Err(e) => {
                warn!(sandbox = %id, error = %error_chain(&e), "upgrade: no copy ahead of the freeze");
                None
            }
        }
    }

    /// Cuts every running sandbox's Task endpoint (its connections stopped between frames,
    /// waiting up to `within` for calls that change something; [`TaskCutter::cut`]), the VMs
    /// still running. On an error every endpoint goes on as before.
    pub async fn cut_tasks(
        &self,
        within: Duration,
    ) -> Result<HashMap<String, TaskCut>, SandboxError> {
        let mut cuts = HashMap::with_capacity(self.tasks.len());
        for (id, cutter) in &self.tasks {
            match cutter.cut(within).await {
                Ok(cut) => {
                    cuts.insert(id.clone(), cut);
                }
                Err(e) => {
                    for (_, cutter) in &self.tasks {
                        cutter.thaw();
                    }
                    return Err(SandboxError::Endpoint(id.clone(), Box::new(e)));
                }
            }
        }
        Ok(cuts)
    }

    /// Starts freezing every running sandbox's VM and saving it for the handover, a few at a
    /// time (two per CPU): each comes on the returned channel as it is frozen, to be passed
    /// on at once ([`Freezing::finish`] completes it). Whatever the outcome, every one comes,
    /// and each that froze must go into the [`Freeze`] ([`Freeze::add`]) so that a thaw
    /// resumes it.
    ///
    /// No task or thread waits on a freeze: each VM's VMM thread, as it finishes one, starts
    /// the next VM's and passes its own on (on this host a thread woken on another CPU costs
    /// ~25 us, several per VM when a task and a blocking thread waited on each).
    pub fn freeze(self) -> (Freeze, tokio::sync::mpsc::UnboundedReceiver<Freezing>) {
        let Hold {
            gate,
            locks,
            running,
            tasks,
        } = self;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // A clone's pages are copied on the blocking pool, its turn held until then (so that
        // no more copy at once than VMs freeze); then it comes on `rx` like the others.
        let (finish_tx, mut finish_rx) =
            tokio::sync::mpsc::unbounded_channel::<(Freezing, Arc<Turns>)>();
        tokio::spawn(async move {
            while let Some((one, turns)) = finish_rx.recv().await {
                tokio::spawn(async move {
                    let _ = turns.tx.send(one.finished().await);
                    Turns::pass_on(&turns);
                });
            }
        });
        let given_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let turns = Arc::new(Turns {
            waiting: std::sync::Mutex::new(running.into()),
            tx,
            finish_tx,
            given_up: Arc::clone(&given_up),
            runtime: tokio::runtime::Handle::current(),
        });
        for _ in 0..freezes_at_once() {
            Turns::next(&turns);
        }
        let freeze = Freeze {
            _gate: gate,
            _locks: locks,
            frozen: Vec::new(),
            tasks,
            given_up,
        };
        (freeze, rx)
    }
}

/// The VMs of a [`Hold::freeze`] still waiting for their turn, and where each frozen one goes.
struct Turns {
    waiting: std::sync::Mutex<std::collections::VecDeque<(String, Arc<dyn VmHandle>)>>,
    tx: tokio::sync::mpsc::UnboundedSender<Freezing>,
    /// Where those with pages to copy go first, with the turn they hold.
    finish_tx: tokio::sync::mpsc::UnboundedSender<(Freezing, Arc<Turns>)>,
    given_up: Arc<std::sync::atomic::AtomicBool>,
    /// For backends that freeze in a task.
    runtime: tokio::runtime::Handle,
}

thread_local! {
    /// While [`Turns::next`] runs on this thread: how many of the freezes it began ended at
    /// once, their callbacks run inside its own `begin_handover` call (a VM that had ended
    /// answers at once). It goes on with those turns itself: a callback calling `next` a level
    /// deeper each time could, after many ended VMs, overflow a VMM thread's 256 KiB stack.
    static ENDED_AT_ONCE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl Turns {
    /// Starts the next waiting VM's freeze, whose end starts the one after it; once the
    /// handover was given up, every VM still waiting comes on the channel as not frozen.
    /// Runs on a VM's VMM thread: it only takes locks, sends and wakes.
    fn next(this: &Arc<Self>) {
        use devices::sync::Recover;
        let mut turns = 1usize;
        while turns > 0 {
            let Some((id, vm)) = this.waiting.lock().recover().pop_front() else {
                return;
            };
            let asked = std::time::Instant::now();
            if this.given_up.load(std::sync::atomic::Ordering::Acquire) {
                let why = "not frozen: the upgrade was given up first";
                let begun = Begun::Done(Box::new(Err(crate::backend::BackendError::Handover(
                    why.into(),
                ))));
                let _ = this.tx.send(Freezing {
                    id,
                    vm,
                    asked,
                    begun,
                });
                continue;
            }
            turns -= 1;
            let owner = Arc::clone(this);
            let (sid, svm) = (id.clone(), Arc::clone(&vm));
            let done: HandoverDone = Box::new(move |begun| {
                let one = Freezing {
                    id: sid,
                    vm: svm,
                    asked,
                    begun,
                };
                let one = if matches!(one.begun, Begun::Finish(_)) {
                    match owner.finish_tx.send((one, Arc::clone(&owner))) {
                        Ok(()) => return,
                        // No copier (the runtime is ending): `Freezing::finish` copies.
                        Err(back) => back.0.0,
                    }
                } else {
                    one
                };
                let _ = owner.tx.send(one);
                Turns::pass_on(&owner);
            });
            let outer = ENDED_AT_ONCE.replace(Some(0));
            let begun = Arc::clone(&vm).begin_handover(done);
            let at_once = ENDED_AT_ONCE.replace(outer).unwrap_or(0);
            turns += at_once;
            if let Err(done) = begun {
                this.runtime.spawn(async move {
                    done(Begun::Done(Box::new(vm.handover().await)));
                });
            }
        }
    }

    /// A freeze's turn ended: the next VM's begins (in the loop of [`Turns::next`] if that
    /// is what this runs inside).
    fn pass_on(this: &Arc<Self>) {
        let inside = ENDED_AT_ONCE.with(|c| match c.get() {
            Some(n) => {
                c.set(Some(n + 1));
                true
            }
            None => false,
        });
        if !inside {
            Turns::next(this);
        }
    }
}

/// A VM's freeze as [`Hold::freeze`] passes it on.
#[derive(Debug)]
pub struct Freezing {
    id: String,
    vm: Arc<dyn VmHandle>,
    asked: std::time::Instant,
    begun: Begun,
}

impl Freezing {
    /// This freeze with its saved VM complete (a clone's pages copied on the blocking pool).
    async fn finished(self) -> Freezing {
        let begun = Begun::Done(Box::new(completed(self.begun).await));
        Freezing { begun, ..self }
    }

    /// The frozen VM, its saved state complete.
    pub async fn finish(self) -> Frozen {
        let Freezing {
            id,
            vm,
            asked,
            begun,
        } = self;
        let handover = completed(begun).await;
        // The pause begins when the VMM stops the vCPUs, which may be a while after the ask
        // on a busy host: the guest runs until then.
        let frozen_at = handover
            .as_ref()
            .ok()
            .and_then(|h| h.snapshot.paused_at())
            .unwrap_or(asked);
        Frozen {
            id,
            vm,
            frozen_at,
            took: frozen_at.elapsed(),
            handover,
        }
    }
}

/// A begun handover's saved VM, its work done on the blocking pool if it has any.
async fn completed(begun: Begun) -> Result<Handover, crate::backend::BackendError> {
    match begun {
        Begun::Done(handover) => *handover,
        Begun::Finish(work) => tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Err(crate::backend::BackendError::Join(e))),
    }
}

/// How many VMs freeze at once in a handover: two per CPU keeps every CPU busy while a VM's
/// threads wait on one another, and no more. A VM runs until its turn, so its pause (frozen
/// here until it runs in the new process) covers the freezes after its own only; all at once,
/// each VM's pause covered all of them, and a hundred VMs' threads woken together on two
/// CPUs froze no faster than in turns.
fn freezes_at_once() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().saturating_mul(2))
}

/// One running sandbox's VM, frozen for the handover (or why it could not be).
#[derive(Debug)]
pub struct Frozen {
    /// The sandbox.
    pub id: String,
    /// Its VM.
    pub vm: Arc<dyn VmHandle>,
    /// When its VMM began stopping its vCPUs (its pause began).
    pub frozen_at: std::time::Instant,
    /// From then to its state saved and back here.
    pub took: Duration,
    /// Its saved VM.
    pub handover: Result<Handover, crate::backend::BackendError>,
}

/// The service held still for a handover: no operation runs, the running sandboxes' VMs are
/// frozen. Dropping it without [`Freeze::thaw`] keeps the operations refused (the old
/// process of a successful upgrade only waits to end).
#[derive(Debug)]
pub struct Freeze {
    _gate: tokio::sync::OwnedRwLockWriteGuard<()>,
    _locks: Vec<Locked>,
    frozen: Vec<(String, Arc<dyn VmHandle>)>,
    /// The Task endpoints, cut or not: a thaw lets them go on.
    tasks: Vec<(String, TaskCutter)>,
    /// Set once the handover failed: VMs still waiting for their turn are not frozen.
    given_up: Arc<std::sync::atomic::AtomicBool>,
}

impl Freeze {
    /// The handover failed: the VMs still waiting for their turn to freeze are left running
    /// (each still comes on the channel, as not frozen); those frozen already wait for
    /// [`Freeze::thaw`].
    pub fn give_up(&self) {
        self.given_up
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Counts `vm` of sandbox `id` as frozen (a thaw resumes it).
    pub fn add(&mut self, id: String, vm: Arc<dyn VmHandle>) {
        self.frozen.push((id, vm));
    }

    /// The handover failed: every frozen VM runs again here, the Task endpoints serve on and
    /// operations are taken again.
    pub async fn thaw(self) {
        for (id, vm) in &self.frozen {
            if let Err(e) = vm.resume_after_handover().await {
                warn!(sandbox_id = %id, error = %error_chain(&e), "cannot resume a sandbox's VM");
            }
        }
        for (_, cutter) in &self.tasks {
            cutter.thaw();
        }
        info!(
            sandboxes = self.frozen.len(),
            "upgrade given up: sandboxes resumed"
        );
    }

    /// The upgrade succeeded: closes this process's ends of the frozen VMs' host connections
    /// (all at once), so their peers see them end now, not when this process exits.
    pub async fn release(&self) {
        let mut releasing = tokio::task::JoinSet::new();
        for (_, vm) in &self.frozen {
            let vm = Arc::clone(vm);
            releasing.spawn(async move { vm.release_after_handover().await });
        }
        while releasing.join_next().await.is_some() {}
    }

    /// How many VMs are frozen.
    pub fn len(&self) -> usize {
        self.frozen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.frozen.is_empty()
    }
}

impl<B: VmBackend> SandboxService<B> {
    /// Lets [`SandboxService::upgrade`] reach the daemon's main loop through `requests`.
    pub fn accept_upgrades(&self, requests: tokio::sync::mpsc::Sender<UpgradeRequest>) {
        let _ = self.upgrades.set(requests);
    }

    /// Asks the daemon to replace itself with a new process of `binary`, handing every
    /// sandbox over; answers with the report (this process then ends) or why nothing moved.
    pub async fn upgrade(
        &self,
        binary: Option<std::path::PathBuf>,
    ) -> Result<UpgradeReport, String> {
        let Some(requests) = self.upgrades.get() else {
            return Err("this sandboxer cannot be upgraded in place (not the daemon)".into());
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = UpgradeRequest {
            binary,
            reply: Some(reply),
        };
        if requests.try_send(request).is_err() {
            return Err("an upgrade is in progress already".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the upgrade ended without an answer".into()))
    }

    /// Holds every operation off (after those in flight finish, up to `wait`): the running
    /// sandboxes stay as they are until the [`Hold`] freezes their VMs or is dropped.
    pub async fn hold_all(self: &Arc<Self>, wait: Duration) -> Result<Hold, SandboxError> {
        let gate = tokio::time::timeout(wait, Arc::clone(&self.gate).write_owned())
            .await
            .map_err(|_| SandboxError::Upgrading)?;
        let mut locks = Vec::new();
        let mut running = Vec::new();
        let mut tasks = Vec::new();
        for entry in self.sandboxes_now() {
            // Only a VM's end (its monitor) can still hold one: it is short.
            let op = Locked::new(entry).await;
            let (record, vm) = op.snapshot();
            if let Some(vm) = vm.filter(|_| record.state == SandboxState::Ready) {
                let cutter = op.entry().with(|d| d.task.as_ref().map(TaskServer::cutter));
                tasks.extend(cutter.map(|c| (record.id.clone(), c)));
                running.push((record.id, vm));
            }
            locks.push(op);
        }
        Ok(Hold {
            gate,
            locks,
            running,
            tasks,
        })
    }

    /// The sandboxes in the registry now.
    fn sandboxes_now(&self) -> Vec<Arc<Entry>> {
        use devices::sync::Recover;
        self.sandboxes.lock().recover().values().cloned().collect()
    }

    /// Gets ready to take sandbox `id`'s VM over (it still runs in the old process): reads its
    /// record (the same file), and builds ahead the VM it will be rebuilt on.
    pub async fn prepare_adoption(
        &self,
        id: &str,
        layout: MemoryLayout,
    ) -> Result<Adoption, SandboxError> {
        let record = self
            .store
            .load(id)
            .map_err(|e| SandboxError::Store(id.to_string(), e))?;
        if record.state != SandboxState::Ready {
            return Err(SandboxError::FailedPrecondition {
                id: id.to_string(),
                state: record.state,
                op: "adopt",
            });
        }
        let spec = self.vm_spec(&record, &self.store.sandbox_dir(id), None);
        let shell = self
            .backend
            .prepare_adoption(layout, &spec)
            .await
            .map_err(|e| SandboxError::Backend(id.to_string(), e))?;
        Ok(Adoption { spec, shell })
    }

    /// Rebuilds the VM of sandbox `id` that the old process handed over, frozen, as
    /// [`SandboxService::prepare_adoption`] got ready for.
    pub async fn adopt(
        &self,
        id: &str,
        mut handover: Handover,
        ready: Adoption,
    ) -> Result<Box<dyn AdoptedVm>, SandboxError> {
        handover.shell = Some(ready.shell);
        self.backend
            .adopt(ready.spec, handover)
            .await
            .map_err(|e| SandboxError::Backend(id.to_string(), e))
    }

    /// Makes the image cache before any Task endpoint is taken over, keeping the images in
    /// `keep` (those the handed-over containers hold; any other is an earlier process's).
    pub fn keep_images(&self, keep: &[std::path::PathBuf]) -> Result<(), SandboxError> {
        self.image_cache(keep)
            .map(drop)
            .map_err(|e| SandboxError::Endpoint(String::new(), Box::new(e)))
    }

    /// Lets sandbox `id`'s adopted VM run and serves the sandbox: it is in the registry when
    /// this returns, its agent connection and Task endpoint (on `task`, what the old process
    /// cut, if it had one) follow in the background. A VM that cannot be taken over ends the
    /// sandbox (failed, with the reason), as a crash would.
    pub async fn install(
        self: &Arc<Self>,
        id: &str,
        adopted: Box<dyn AdoptedVm>,
        task: Option<TaskCut>,
    ) {
        let record = match self.store.load(id) {
            Ok(record) => record,
            Err(e) => {
                warn!(sandbox_id = %id, error = %error_chain(&e), "cannot read a handed-over sandbox's record");
                return;
            }
        };
        let entry = Entry::new(record);
        let op = Locked::new(Arc::clone(&entry)).await;
        {
            use devices::sync::Recover;
            self.sandboxes
                .lock()
                .recover()
                .insert(id.to_string(), Arc::clone(&entry));
        }
        // The rest (the guest agent's connection above all, slow on a busy host) goes on in
        // the background: the sandbox is known now, and its operations wait for its lock.
        let (this, id) = (Arc::clone(self), id.to_string());
        tokio::spawn(async move { this.take_over(&id, entry, op, adopted, task).await });
    }

    /// The rest of [`SandboxService::install`], holding the sandbox's lock.
    async fn take_over(
        self: Arc<Self>,
        id: &str,
        entry: Arc<Entry>,
        op: Locked,
        adopted: Box<dyn AdoptedVm>,
        task: Option<TaskCut>,
    ) {
        let dir = self.store.sandbox_dir(id);
        let began = std::time::Instant::now();
        let vm: Arc<dyn VmHandle> = match adopted.resume().await {
            Ok(vm) => Arc::from(vm),
            Err(e) => return self.lost(&entry, &e.to_string()).await,
        };
        let resumed = began.elapsed();
        let task = match self.start_task_server(&dir, &vm, task).await {
            Ok(task) => task,
            Err(e) => {
                vm.kill().await;
                return self.lost(&entry, &error_chain(&e)).await;
            }
        };
        info!(
            sandbox_id = %id,
            agent_ms = resumed.as_millis(),
            task_ms = began.elapsed().saturating_sub(resumed).as_millis(),
            "Task endpoint serving in the new process"
        );
        let record = entry.with(|d| {
            d.vm = Some(Arc::clone(&vm));
            d.task = Some(task);
            d.record.pid = vm.pid();
            d.record.clone()
        });
        if let Err(e) = self.save(record).await {
            warn!(sandbox_id = %id, error = %error_chain(&e), "cannot record the new pid");
        }
        drop(op);
        tokio::spawn(Arc::clone(&self).monitor(entry, vm));
        info!(sandbox_id = %id, "sandbox taken over");
    }

    /// Ends a handed-over sandbox whose VM could not be taken over.
    async fn lost(&self, entry: &Entry, why: &str) {
        let id = entry.with(|d| d.record.id.clone());
        warn!(sandbox_id = %id, reason = %why, "a handed-over sandbox is lost");
        let exit = ExitInfo {
            status: EXIT_FAILED,
            at: SystemTime::now(),
            reason: format!("the VM could not be taken over from the previous sandboxer: {why}"),
        };
        if let Err(e) = self.end(entry, SandboxState::Failed, exit).await {
            warn!(sandbox_id = %id, error = %error_chain(&e), "cannot persist a sandbox's end");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, VmSpec};

    /// Freezes that end at once (a VM that had ended answers on the caller's thread) go on in
    /// `Turns::next`'s loop, not a call deeper each: 5,000 of them in one turn, on a thread
    /// with a VMM thread's 256 KiB stack, all come out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn freezes_ending_at_once_take_no_stack() {
        const VMS: usize = 5000;
        let backend = crate::backend::fake::FakeVmBackend::new();
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let mut waiting = std::collections::VecDeque::new();
        for n in 0..VMS {
            let spec = VmSpec::for_test(&format!("s{n}"), kernel.clone());
            let vm: Arc<dyn VmHandle> = Arc::from(backend.start(spec).await.unwrap());
            waiting.push_back((format!("s{n}"), vm));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (finish_tx, _finish_rx) = tokio::sync::mpsc::unbounded_channel();
        let turns = Arc::new(Turns {
            waiting: std::sync::Mutex::new(waiting),
            tx,
            finish_tx,
            given_up: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            runtime: tokio::runtime::Handle::current(),
        });
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || Turns::next(&turns))
            .unwrap()
            .join()
            .unwrap();
        for _ in 0..VMS {
            let one = rx.recv().await.unwrap().finish().await;
            assert!(
                matches!(one.handover, Err(BackendError::Unsupported(_))),
                "{:?}",
                one.handover.map(drop)
            );
        }
    }
}
