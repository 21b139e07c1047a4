// SPDX-License-Identifier: Apache-2.0
//! A VM's VMM thread: one event-manager loop for API requests ([`crate::api`]), vCPU exits
//! (guest resets included) and the devices' queues. When the VM ends it stops the vCPUs,
//! records why, wakes the waiters and runs the end watchers ([`crate::Vm::on_end`]), and then
//! tears the VM down on this thread (closing the VM fd and unmapping memory is the expensive
//! part of a VM's life), so teardown is never on a caller's path.
//!
//! One EventFd wakes the thread for everything that is not a device's: an API request, a
//! vCPU's terminal exit, the i8042 reset (reported as a vCPU exit). What woke it is read from
//! the request channel and [`VcpuControl`]'s pending exit.

use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use devices::legacy::{BootSignal, SerialConsole};
use devices::sync::Recover;
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::VmExit;
use crate::api::{ApiRequest, PanicSite, VmmAction, VmmActionError, VmmData};
use crate::device_manager::{Devices, VmmEventManager};
use crate::host::LiveGuard;
use crate::kvm::state::{Reading, VcpuState, VmState};
use crate::memory::GuestRam;
use crate::seccomp::SeccompError;
use crate::snapshot::{SavedMemory, SnapshotError, VmSnapshot};
use crate::vcpu::{VcpuContext, VcpuControl, VcpuSet};
use crate::vm::{EndState, VmEnd};
use seccompiler::BpfProgram;

/// What the VMM thread owns until the VM is torn down. Field order is drop order: the buses
/// (whose devices' interrupt lines hold the VM fd too), then the VM fd, go before the guest
/// memory it maps, and the VM counts as live until all of it is gone.
pub(crate) struct VmResources {
    /// The directory the VMM thread confines itself to and the filter that locks it in
    /// ([`crate::seccomp::jail`]), when the VM has a hybrid vsock socket.
    pub(crate) jail: Option<(PathBuf, Option<Arc<BpfProgram>>)>,
    pub(crate) ctx: VcpuContext,
    pub(crate) _vm_fd: Arc<kvm_ioctls::VmFd>,
    pub(crate) _ram: GuestRam,
    pub(crate) _live: LiveGuard,
}

/// What the VMM thread runs: the event loop, its own subscriber, its stop flag and the VM it
/// keeps alive.
pub(crate) type VmmJob = (
    VmmEventManager,
    Arc<Mutex<VmmControl>>,
    Arc<AtomicBool>,
    VmResources,
);

/// The VMM thread's body: runs the loop until the VM ends, then tears the VM down.
pub(crate) fn vmm_thread(
    (mut event_manager, controller, done, resources): VmmJob,
    confined: Result<(), SeccompError>,
) {
    if let Err(e) = confined {
        // Without its filter the thread should not serve the guest: end the VM (the loop's
        // next pass sees the exit).
        log::error!("VMM thread: {e}");
        resources
            .ctx
            .control
            .report_exit(VmExit::Crashed(e.to_string()));
    } else if let Some((root, lock)) = &resources.jail
        && let Err(e) = crate::seccomp::jail(root, lock.as_deref())
    {
        // Unjailed, the vsock device's paths (rebased under the jail) would not resolve, and
        // the thread could reach every socket on the host: end the VM.
        log::error!("VMM thread: {e}");
        resources
            .ctx
            .control
            .report_exit(VmExit::Crashed(e.to_string()));
    }
    // A panic in any handler (a device's, the VMM's own) or a failed loop ends this VM only:
    // it is recorded as crashed, its vCPUs are stopped and its resources freed below, as for
    // any other end. The locks it leaves poisoned are taken as they are (`Recover`).
    let failure = match catch_unwind(AssertUnwindSafe(|| {
        run_loop(&mut event_manager, &controller, &done)
    })) {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("VMM event loop failed: {e:?}")),
        Err(panic) => Some(format!(
            "VMM thread panicked: {}",
            crate::seccomp::panic_message(&*panic)
        )),
    };
    if let Some(why) = failure {
        log::error!("{why}");
        let ended = catch_unwind(AssertUnwindSafe(|| {
            controller.lock().recover().finish(VmExit::Crashed(why));
        }));
        if ended.is_err() {
            log::error!("VMM thread: ending the VM after a failure panicked too");
        }
    }
    drop(controller);
    drop(event_manager);
    drop(resources);
}

/// The VMM thread's loop, until the VM has ended.
fn run_loop(
    event_manager: &mut VmmEventManager,
    controller: &Arc<Mutex<VmmControl>>,
    done: &AtomicBool,
) -> Result<(), event_manager::Error> {
    while !done.load(Ordering::SeqCst) {
        // One look at the controller per pass, as before handovers existed.
        let reinit = {
            let mut control = controller.lock().recover();
            if control.frozen {
                // Handed over: only requests, no device work (the guest memory must stay
                // as it was saved).
                control.serve_frozen();
                continue;
            }
            std::mem::take(&mut control.reinit)
        };
        for id in reinit {
            reinit_subscriber(event_manager, id);
        }
        event_manager.run()?;
    }
    Ok(())
}

/// Initialises subscriber `id` again, so it registers descriptors it did not have before (a
/// block slot's notify EventFd, made by its first disk). A subscriber can only add its own
/// descriptors, inside its own callbacks: this is how another one's request reaches it.
fn reinit_subscriber(event_manager: &mut VmmEventManager, id: SubscriberId) {
    let subscriber = match event_manager.subscriber_mut(id) {
        Ok(subscriber) => Arc::clone(subscriber),
        Err(e) => {
            log::error!("No VMM event subscriber {id:?}: {e:?}");
            return;
        }
    };
    match event_manager.event_ops(id) {
        Ok(mut ops) => subscriber.lock().recover().init(&mut ops),
        Err(e) => log::error!("No event ops for VMM event subscriber {id:?}: {e:?}"),
    }
}

/// What the VMM thread reads for a snapshot, besides its vCPUs and devices.
pub(crate) struct SnapshotSources {
    pub(crate) vm_fd: Arc<kvm_ioctls::VmFd>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    /// The guest memory's memfd and size, and whether the mapping is a private clone.
    pub(crate) memory: Arc<File>,
    pub(crate) mem_bytes: u64,
    pub(crate) private_memory: bool,
    /// The guest memory's mapping (a clone's private pages are read from it at a handover).
    pub(crate) mapping: devices::GuestMemoryMmap,
    /// What reading a vCPU's state needs (the host's MSR list, the XSAVE area size, ...).
    pub(crate) vcpu_reading: Arc<Reading>,
}

/// The VMM thread's own subscriber: API requests and vCPU exits (guest resets included).
pub(crate) struct VmmControl {
    pub(crate) api_rx: Receiver<ApiRequest>,
    /// Written by [`crate::Vm::request`] and [`VcpuControl::report_exit`].
    pub(crate) wake: Arc<EventFd>,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) vcpus: VcpuSet,
    pub(crate) devices: Devices,
    /// What a snapshot reads besides the vCPUs and devices.
    pub(crate) saved: SnapshotSources,
    pub(crate) end: Arc<EndState>,
    pub(crate) boot: Arc<BootSignal>,
    pub(crate) done: Arc<AtomicBool>,
    /// Subscribers to initialise again after this pass of the loop (see `reinit_subscriber`).
    pub(crate) reinit: Vec<SubscriberId>,
    /// Saved for a handover: the loop serves requests only, until Resume or Stop.
    pub(crate) frozen: bool,
}

impl VmmControl {
    const WAKE: u32 = 1;

    /// Ends the VM: stops the vCPUs, records the end, wakes waiters. Idempotent.
    pub(crate) fn finish(&mut self, exit: VmExit) {
        if self.done.load(Ordering::SeqCst) {
            return;
        }
        self.vcpus.stop();
        self.boot.close();
        self.end.set(VmEnd {
            exit,
            at: SystemTime::now(),
        });
        self.done.store(true, Ordering::SeqCst);
    }

    fn handle(&mut self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        if self.done.load(Ordering::SeqCst) {
            return Err(VmmActionError::NotRunning);
        }
        match action {
            VmmAction::Pause => {
                if self.vcpus.pause() {
                    Ok(VmmData::Empty)
                } else {
                    Err(VmmActionError::PauseTimedOut)
                }
            }
            VmmAction::Resume => {
                self.frozen = false;
                self.vcpus.resume();
                Ok(VmmData::Empty)
            }
            VmmAction::Stop => {
                self.finish(VmExit::Stopped);
                Ok(VmmData::Empty)
            }
            VmmAction::AttachDisk {
                index,
                disk,
                read_only,
            } => {
                let vm = &self.saved.vm_fd;
                if let Some(id) = self.devices.attach_disk(vm, index, disk, read_only)? {
                    self.reinit.push(id);
                }
                Ok(VmmData::Empty)
            }
            VmmAction::DetachDisk { index } => {
                self.devices.detach_disk(index)?;
                Ok(VmmData::Empty)
            }
            VmmAction::Snapshot => self.snapshot().map(|s| VmmData::Snapshot(Box::new(s))),
            VmmAction::Handover => {
                // No block request is in flight once the vCPUs are paused (`save`): block I/O
                // is synchronous, each request executed from pop to used element inside one
                // `VirtioBlock::process_queue` call, on this thread (a slot with a disk) or on
                // the notifying vCPU thread (an empty slot, under the device's lock; it is out
                // of it once paused), and this request runs between two of those calls.
                // Requests the guest made available but no one popped yet stay in the ring:
                // the rebuilt slot's activation wakes its event-loop half, which serves them.
                // So the disks' files, passed on here, hold every completed write.
                let files = self
                    .devices
                    .handover_files()
                    .map_err(|e| VmmActionError::Snapshot(SnapshotError::Files(e)))?;
                let mut snapshot = self.save()?;
                snapshot.files = files;
                self.frozen = true;
                let memory = self.saved.private_memory.then(|| {
                    let saved = &self.saved;
                    (saved.mapping.clone(), Arc::clone(&saved.vm_fd))
                });
                Ok(VmmData::Handover(Box::new(snapshot), memory))
            }
            VmmAction::Mapping if self.saved.private_memory => {
                let saved = &self.saved;
                Ok(VmmData::Mapping(
                    saved.mapping.clone(),
                    Arc::clone(&saved.vm_fd),
                ))
            }
            VmmAction::Mapping => Err(SnapshotError::OwnMemory.into()),
            VmmAction::ReleaseHostEnds => {
                self.devices.release_vsock_host_ends();
                Ok(VmmData::Empty)
            }
            VmmAction::InjectPanic(PanicSite::Device) => {
                let _held = self
                    .devices
                    .vsock_device
                    .as_ref()
                    .map(|d| d.lock().recover());
                panic!("injected panic (test hook) on the VMM thread, holding a device's lock");
            }
            VmmAction::InjectHang(how_long) => {
                std::thread::sleep(how_long);
                Ok(VmmData::Empty)
            }
            VmmAction::InjectPanic(PanicSite::VcpuExit) => {
                self.vcpus.panic_on_next_exit();
                Ok(VmmData::Empty)
            }
        }
    }

    /// Pauses the VM and saves it (see [`crate::snapshot`]). Runs between two passes of the
    /// event loop, so no device is in the middle of a chain.
    fn snapshot(&mut self) -> Result<VmSnapshot, VmmActionError> {
        let saved = &self.saved;
        if saved.private_memory {
            return Err(SnapshotError::CloneMemory.into());
        }
        if !self.vcpus.pause() {
            return Err(VmmActionError::PauseTimedOut);
        }
        // Checked with the vCPUs paused: no new connection can start now.
        let open = self.devices.vsock_connections();
        if open > 0 {
            self.vcpus.resume();
            return Err(SnapshotError::Busy(open).into());
        }
        let mut snapshot = self.save()?;
        snapshot.kind = SavedMemory::Template;
        Ok(snapshot)
    }

    /// Pauses the vCPUs and reads the VM's state (its memory is named, not copied; a clone's
    /// is marked own here and completed by the caller).
    fn save(&mut self) -> Result<VmSnapshot, VmmActionError> {
        // Taken before the vCPUs are stopped, not after: a pause measured from here is never
        // shorter than the guest's.
        let paused_at = Some(std::time::Instant::now());
        let saved = &self.saved;
        let reading = Arc::clone(&saved.vcpu_reading);
        // Each vCPU thread saves itself on its way into the park.
        let vcpus = self
            .vcpus
            .pause_with(move |_, fd| VcpuState::save(fd, &reading))
            .ok_or(SnapshotError::VcpuTimeout)?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(SnapshotError::from)?;
        let vm = VmState::save(&saved.vm_fd).map_err(SnapshotError::from)?;
        let serial = saved.serial.lock().recover().state();
        Ok(VmSnapshot {
            id: crate::snapshot::next_id(),
            kind: SavedMemory::Own,
            memory: Arc::clone(&saved.memory),
            mem_bytes: saved.mem_bytes,
            vcpus,
            vm,
            serial,
            devices: self.devices.states(),
            disks: self.devices.disks(),
            vsock_stale: self.devices.vsock_connection_ports(),
            files: Default::default(),
            paused_at,
        })
    }

    /// Answers the requests that come within a short wait, while frozen.
    fn serve_frozen(&mut self) {
        match self
            .api_rx
            .recv_timeout(std::time::Duration::from_millis(20))
        {
            Ok((action, reply)) => {
                let result = self.handle(action);
                reply.send(result);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The handle is gone: nobody can resume the VM.
                self.finish(VmExit::Stopped);
            }
        }
    }

    /// Whatever woke the thread: a vCPU's terminal exit first (a crash is not overtaken by a
    /// request that came later), then the requests.
    fn wake_up(&mut self) {
        let _ = self.wake.read();
        if let Some(exit) = self.control.take_pending_exit() {
            self.finish(exit);
        }
        while let Ok((action, reply)) = self.api_rx.try_recv() {
            let result = self.handle(action);
            reply.send(result);
        }
    }
}

impl MutEventSubscriber for VmmControl {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            Self::WAKE => self.wake_up(),
            other => log::warn!("Unexpected VMM event {other}"),
        }
        if self.done.load(Ordering::SeqCst) {
            // Answer requests that raced with the end instead of leaving callers waiting.
            while let Ok((_, reply)) = self.api_rx.try_recv() {
                reply.send(Err(VmmActionError::NotRunning));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&*self.wake, Self::WAKE, EventSet::IN)) {
            log::error!("Failed to register the VMM wake-up event: {e:?}");
        }
    }
}
