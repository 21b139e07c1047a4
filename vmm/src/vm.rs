// SPDX-License-Identifier: Apache-2.0
//! A running VM: building it, its VMM thread, and the handle the caller keeps.
//!
//! `Vm::start` builds everything on the caller's thread (timing each phase), then hands the VM
//! to one VMM thread (an event-manager loop for API requests, vCPU exits and device events) and
//! one thread per vCPU. The caller keeps a [`Vm`] handle. When the VM ends (the guest shut down,
//! crashed, or the host stopped it) the VMM thread stops the vCPUs, records why, wakes waiters,
//! and then tears the VM down (closing the VM fd and unmapping memory is the expensive part of a
//! VM's life), so teardown is never on the caller's path.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use devices::legacy::{BootSignal, BootTimer, ConsoleSink, ConsoleTail, I8042, SerialConsole};
use devices::virtio::vsock::VsockHandle;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::api::{VmmAction, VmmActionError, VmmData};
use crate::arch::layout::{
    BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, I8042_DATA_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, Devices};
use crate::kvm::{KvmContext, KvmError};
use crate::memory::GuestRam;
use crate::pool::{self, ShellError, VmShell};
use crate::seccomp::{self, PendingThread, SeccompError, ThreadRole};
use crate::timings::StartupTimings;
use crate::vcpu::{PendingVcpus, VcpuContext, VcpuControl, VcpuSet};
use crate::{ResetKind, VmExit, arch, boot};

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("Invalid VM configuration")]
    Config(#[from] ConfigError),
    /// KVM setup failed.
    #[error("KVM setup failed")]
    Kvm(#[from] KvmError),
    /// The VM or its memory could not be created.
    #[error("VM creation failed")]
    Shell(#[from] ShellError),
    /// The guest could not be loaded.
    #[error("Loading the guest failed")]
    Boot(#[from] boot::BootError),
    /// Architecture setup (MP table, vCPU registers) failed.
    #[error("vCPU or platform setup failed")]
    Arch(#[from] arch::ArchError),
    /// A vCPU could not be created.
    #[error("Failed to create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    /// Device setup failed.
    #[error("Device setup failed")]
    Bus(#[from] BusError),
    /// A virtio device could not be set up.
    #[error("Virtio device setup failed")]
    Device(#[from] DeviceError),
    /// An EventFd, irqfd or the event loop could not be set up.
    #[error("Failed to set up {0}")]
    Setup(&'static str, #[source] io::Error),
    /// A thread could not be spawned.
    #[error("Failed to spawn a VM thread")]
    Spawn(#[source] io::Error),
    /// The threads' seccomp filters could not be built.
    #[error("Seccomp setup failed")]
    Seccomp(#[from] SeccompError),
}

/// How and when a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmEnd {
    /// Why it ended.
    pub exit: VmExit,
    /// When it ended.
    pub at: SystemTime,
}

#[derive(Debug, Default)]
struct EndState {
    end: Mutex<Option<VmEnd>>,
    cv: Condvar,
}

type ApiRequest = (VmmAction, Sender<Result<VmmData, VmmActionError>>);

/// VMM threads alive in this process (each frees its VM before it exits).
static LIVE_VMS: AtomicUsize = AtomicUsize::new(0);

/// How many VMs of this process still hold KVM resources (running or being torn down).
pub fn live_vms() -> usize {
    LIVE_VMS.load(Ordering::SeqCst)
}

/// Waits until every VM of this process is torn down, up to `timeout`.
pub fn wait_all_torn_down(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while live_vms() > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// A running (or ended) VM.
#[derive(Debug)]
pub struct Vm {
    api_tx: Sender<ApiRequest>,
    api_evt: EventFd,
    end: Arc<EndState>,
    boot: Arc<BootSignal>,
    console: Arc<ConsoleTail>,
    ram_file: File,
    timings: StartupTimings,
    devices: Devices,
}

impl Vm {
    /// Validates `config`, builds the VM and starts it.
    pub fn start(config: VmConfig) -> Result<Vm, VmError> {
        let start = Instant::now();
        let mut timings = StartupTimings::default();
        let mut lap = Lap(start);

        let kvm = KvmContext::global()?;
        timings.kvm_open = lap.next();

        let mut cfg = config.validate(kvm.max_vcpus())?;
        // The VM's threads start now and install their seccomp filters while the VM is built.
        let pending_vcpus =
            PendingVcpus::spawn(cfg.vcpus, seccomp::filter(ThreadRole::Vcpu, cfg.seccomp)?)
                .map_err(VmError::Spawn)?;
        let pending_vmm = PendingThread::spawn(
            "vmm".into(),
            seccomp::filter(ThreadRole::Vmm, cfg.seccomp)?,
            |(event_manager, done, resources): VmmJob, confined| {
                vmm_thread(event_manager, done, resources, confined);
            },
        )
        .map_err(VmError::Spawn)?;
        kvm::signal_setup()?;
        let VmShell { vm_fd, ram } = match pool::take(cfg.mem_bytes()) {
            Some(shell) => {
                timings.pooled = true;
                timings.vm_create = lap.next();
                shell
            }
            None => {
                let (shell, t) = VmShell::build(kvm, cfg.mem_bytes())?;
                timings.memory = t.memory;
                timings.vm_create = lap.next().saturating_sub(t.memory);
                shell
            }
        };

        // Virtio devices first: the kernel command line names them.
        let mut mmio = Bus::default();
        let mut device_manager = DeviceManager::new(&vm_fd, &ram.mem, &mut mmio);
        device_manager.add_all(std::mem::take(&mut cfg.devices))?;
        let cmdline = format!("{}{}", cfg.cmdline, device_manager.cmdline);
        let (subscribers, virtio) = (device_manager.subscribers, device_manager.devices);
        let virtio_time = lap.next();

        let entry = boot::load_guest(&ram.mem, &mut cfg, &cmdline)?;
        arch::configure_system(&ram.mem, cfg.vcpus)?;
        timings.kernel_load = lap.next();

        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup("exit eventfd", e))?;
        let reset_evt =
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup("reset eventfd", e))?;
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup("serial irq", e))?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| VmError::Setup("serial irqfd", io::Error::from_raw_os_error(e.errno())))?;
        let console_log = match &cfg.console.log_path {
            Some(path) => Some(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| VmError::Setup("console log", e))?,
            ),
            None => None,
        };
        let passthrough: Option<Box<dyn io::Write + Send>> =
            cfg.console.stdout.then(|| Box::new(io::stdout()) as _);
        let sink = ConsoleSink::new(console_log, passthrough);
        let console = sink.tail();
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, sink)));
        let i8042 = Arc::new(I8042::new(
            reset_evt
                .try_clone()
                .map_err(|e| VmError::Setup("reset eventfd", e))?,
        ));
        let boot_timer = Arc::new(BootTimer::new(start));
        let boot_signal = boot_timer.signal();
        let mut pio = Bus::default();
        pio.insert(serial, u64::from(SERIAL_PORT), 8)?;
        pio.insert(i8042, u64::from(I8042_DATA_PORT), 5)?;
        mmio.insert(boot_timer, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE)?;
        timings.devices = lap.next() + virtio_time;

        let mut vcpu_fds = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::CreateVcpu(id, e))?;
            let boot_entry = (id == 0).then_some(&entry);
            arch::configure_vcpu(
                &fd,
                &ram.mem,
                kvm.supported_cpuid(),
                id,
                cfg.vcpus,
                boot_entry,
            )?;
            vcpu_fds.push(fd);
        }
        timings.vcpu_create = lap.next();

        let (api_tx, api_rx) = channel();
        let api_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Setup("api eventfd", e))?;
        let control = Arc::new(VcpuControl::new(
            exit_evt
                .try_clone()
                .map_err(|e| VmError::Setup("exit eventfd", e))?,
        ));
        let ctx = VcpuContext {
            control: Arc::clone(&control),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
        };
        let end = Arc::new(EndState::default());
        let ram_file = ram
            .file
            .try_clone()
            .map_err(|e| VmError::Setup("memfd", e))?;
        let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| VmError::Setup("event manager", io::Error::other(e.to_string())))?;

        // From here on the vCPUs run: everything fallible is done.
        let vcpus = pending_vcpus.start(vcpu_fds, &ctx);
        let done = Arc::new(AtomicBool::new(false));
        let controller = Arc::new(Mutex::new(VmmControl {
            api_rx,
            api_evt: api_evt
                .try_clone()
                .map_err(|e| VmError::Setup("api eventfd", e))?,
            exit_evt,
            reset_evt,
            control,
            vcpus,
            end: Arc::clone(&end),
            boot: Arc::clone(&boot_signal),
            done: Arc::clone(&done),
        }));
        event_manager.add_subscriber(controller.clone());
        for subscriber in subscribers {
            event_manager.add_subscriber(subscriber);
        }
        let resources = VmResources {
            _vm_fd: vm_fd,
            _ram: ram,
            _ctx: ctx,
        };
        LIVE_VMS.fetch_add(1, Ordering::SeqCst);
        // Detached: the VM's end is reported through `EndState`, not by joining.
        if pending_vmm.start((event_manager, done, resources)).is_err() {
            LIVE_VMS.fetch_sub(1, Ordering::SeqCst);
            controller
                .lock()
                .expect("poisoned")
                .finish(VmExit::Crashed("VMM thread ended early".into()));
            return Err(VmError::Spawn(io::Error::other(
                "the VMM thread ended early",
            )));
        }
        timings.vcpu_start = lap.next();
        timings.total = start.elapsed();

        Ok(Vm {
            api_tx,
            api_evt,
            end,
            boot: boot_signal,
            console,
            ram_file,
            timings,
            devices: virtio,
        })
    }

    fn request(&self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        let (tx, rx) = channel();
        self.api_tx
            .send((action, tx))
            .map_err(|_| VmmActionError::NotRunning)?;
        self.api_evt
            .write(1)
            .map_err(|_| VmmActionError::NotRunning)?;
        rx.recv().map_err(|_| VmmActionError::NotRunning)?
    }

    /// Stops every vCPU outside the guest until [`Vm::resume`].
    pub fn pause(&self) -> Result<(), VmmActionError> {
        self.request(VmmAction::Pause).map(drop)
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), VmmActionError> {
        self.request(VmmAction::Resume).map(drop)
    }

    /// Stops the VM (if it still runs) and returns how it ended. Never hangs on the guest.
    pub fn stop(&self) -> VmEnd {
        // NotRunning means the VMM thread already finished: the end is recorded.
        let _ = self.request(VmmAction::Stop);
        self.wait()
    }

    /// Blocks until the VM has ended.
    pub fn wait(&self) -> VmEnd {
        let guard = self.end.end.lock().expect("poisoned");
        let guard = self
            .end
            .cv
            .wait_while(guard, |e| e.is_none())
            .expect("poisoned");
        guard.clone().expect("waited for Some")
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmEnd> {
        let guard = self.end.end.lock().expect("poisoned");
        let (guard, _) = self
            .end
            .cv
            .wait_timeout_while(guard, timeout, |e| e.is_none())
            .expect("poisoned");
        guard.clone()
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        self.end.end.lock().expect("poisoned").clone()
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
    /// gets a config-change interrupt and sees the new capacity.
    pub fn attach_disk(
        &self,
        index: usize,
        path: &std::path::Path,
        read_only: bool,
    ) -> Result<(), DeviceError> {
        self.devices.attach_disk(index, path, read_only)
    }

    /// Empties block slot `index` (capacity 0; I/O fails until the next attach).
    pub fn detach_disk(&self, index: usize) -> Result<(), DeviceError> {
        self.devices.detach_disk(index)
    }

    /// Number of block slots.
    pub fn block_slots(&self) -> usize {
        self.devices.blocks.len()
    }

    /// The host side of the vsock device: connect to guest ports, listen for guest connections.
    pub fn vsock(&self) -> Option<&VsockHandle> {
        self.devices.vsock.as_ref()
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

/// Measures consecutive phases.
struct Lap(Instant);

impl Lap {
    fn next(&mut self) -> Duration {
        let now = Instant::now();
        let d = now - self.0;
        self.0 = now;
        d
    }
}

mod kvm {
    use super::VmError;

    pub(super) fn signal_setup() -> Result<(), VmError> {
        crate::kvm::signal::install_kick_handler().map_err(|e| VmError::Setup("kick signal", e))
    }
}

/// What the VMM thread owns until the VM is torn down. Field order is drop order: the VM fd
/// goes before the guest memory it maps.
struct VmResources {
    _vm_fd: kvm_ioctls::VmFd,
    _ram: GuestRam,
    _ctx: VcpuContext,
}

/// What the VMM thread runs: the event loop, its stop flag and the VM it keeps alive.
type VmmJob = (
    EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    Arc<AtomicBool>,
    VmResources,
);

fn vmm_thread(
    mut event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    done: Arc<AtomicBool>,
    resources: VmResources,
    confined: Result<(), SeccompError>,
) {
    if let Err(e) = confined {
        // Without its filter the thread should not serve the guest: end the VM (the loop's
        // next pass sees the exit).
        log::error!("VMM thread: {e}");
        resources
            ._ctx
            .control
            .report_exit(VmExit::Crashed(e.to_string()));
    }
    while !done.load(Ordering::SeqCst) {
        if let Err(e) = event_manager.run() {
            log::error!("VMM event loop failed: {e:?}");
            break;
        }
    }
    drop(event_manager);
    drop(resources);
    LIVE_VMS.fetch_sub(1, Ordering::SeqCst);
}

/// The VMM thread's own subscriber: API requests, vCPU exits, guest resets.
struct VmmControl {
    api_rx: Receiver<ApiRequest>,
    api_evt: EventFd,
    exit_evt: EventFd,
    reset_evt: EventFd,
    control: Arc<VcpuControl>,
    vcpus: VcpuSet,
    end: Arc<EndState>,
    boot: Arc<BootSignal>,
    done: Arc<AtomicBool>,
}

impl VmmControl {
    const API: u32 = 1;
    const VCPU_EXIT: u32 = 2;
    const RESET: u32 = 3;

    /// Ends the VM: stops the vCPUs, records the end, wakes waiters. Idempotent.
    fn finish(&mut self, exit: VmExit) {
        if self.done.load(Ordering::SeqCst) {
            return;
        }
        self.vcpus.stop();
        self.boot.close();
        let mut end = self.end.end.lock().expect("poisoned");
        *end = Some(VmEnd {
            exit,
            at: SystemTime::now(),
        });
        self.end.cv.notify_all();
        self.done.store(true, Ordering::SeqCst);
    }

    fn handle_api(&mut self) {
        let _ = self.api_evt.read();
        while let Ok((action, reply)) = self.api_rx.try_recv() {
            let result = if self.done.load(Ordering::SeqCst) {
                Err(VmmActionError::NotRunning)
            } else {
                match action {
                    VmmAction::Pause => {
                        if self.vcpus.pause() {
                            Ok(VmmData::Empty)
                        } else {
                            Err(VmmActionError::PauseTimedOut)
                        }
                    }
                    VmmAction::Resume => {
                        self.vcpus.resume();
                        Ok(VmmData::Empty)
                    }
                    VmmAction::Stop => {
                        self.finish(VmExit::Stopped);
                        Ok(VmmData::Empty)
                    }
                }
            };
            let _ = reply.send(result);
        }
    }
}

impl MutEventSubscriber for VmmControl {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            Self::API => self.handle_api(),
            Self::VCPU_EXIT => {
                let _ = self.exit_evt.read();
                if let Some(exit) = self.control.take_pending_exit() {
                    self.finish(exit);
                }
            }
            Self::RESET => {
                let _ = self.reset_evt.read();
                self.finish(VmExit::Reset(ResetKind::I8042));
            }
            other => log::warn!("Unexpected VMM event {other}"),
        }
        if self.done.load(Ordering::SeqCst) {
            // Answer requests that raced with the end instead of leaving callers waiting.
            while let Ok((_, reply)) = self.api_rx.try_recv() {
                let _ = reply.send(Err(VmmActionError::NotRunning));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [
            (&self.api_evt, Self::API),
            (&self.exit_evt, Self::VCPU_EXIT),
            (&self.reset_evt, Self::RESET),
        ] {
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                log::error!("Failed to register VMM event {data}: {e:?}");
            }
        }
    }
}
