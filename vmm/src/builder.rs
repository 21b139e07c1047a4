// SPDX-License-Identifier: Apache-2.0
//! Building a VM from its configuration: [`Vm::start`].
//!
//! Everything is built on the caller's thread (timing each phase); the VM's threads are
//! spawned first so their seccomp filters install while the VM is built. Then the VM is handed
//! to one VMM thread ([`crate::event_loop`]) and one thread per vCPU, and the caller keeps the
//! [`Vm`] handle.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{BootTimer, ConsoleSink, I8042, SerialConsole};
use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::arch::layout::{
    BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, I8042_DATA_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{VmResources, VmmControl, VmmEventManager, VmmJob, vmm_thread};
use crate::host::Host;
use crate::kvm::KvmError;
use crate::pool::{ShellError, VmShell};
use crate::seccomp::{PendingThread, SeccompError, ThreadRole};
use crate::timings::StartupTimings;
use crate::vcpu::{PendingVcpus, VcpuContext, VcpuControl};
use crate::vm::{EndState, Vm};
use crate::{VmExit, arch, boot};

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

impl Vm {
    /// Validates `config`, builds the VM on `host` and starts it.
    pub fn start(host: &Host, config: VmConfig) -> Result<Vm, VmError> {
        let start = Instant::now();
        let mut timings = StartupTimings::default();
        let mut lap = Lap(start);

        let kvm = host.kvm()?;
        timings.kvm_open = lap.next();

        let mut cfg = config.validate(kvm.max_vcpus())?;
        // The VM's threads start now and install their seccomp filters while the VM is built.
        let filters = host.filters();
        let pending_vcpus =
            PendingVcpus::spawn(cfg.vcpus, filters.get(ThreadRole::Vcpu, cfg.seccomp)?)
                .map_err(VmError::Spawn)?;
        let pending_vmm = PendingThread::spawn(
            "vmm".into(),
            filters.get(ThreadRole::Vmm, cfg.seccomp)?,
            |(event_manager, done, resources): VmmJob, confined| {
                vmm_thread(event_manager, done, resources, confined);
            },
        )
        .map_err(VmError::Spawn)?;
        crate::kvm::signal::install_kick_handler().map_err(|e| VmError::Setup("kick signal", e))?;
        let VmShell { vm_fd, ram } = match host.pool().take(cfg.mem_bytes()) {
            Some(shell) => {
                timings.pooled = true;
                timings.vm_create = lap.next();
                shell
            }
            None => {
                let (shell, t) = VmShell::build(&kvm, cfg.mem_bytes())?;
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
        let (subscribers, mut devices) = (device_manager.subscribers, device_manager.devices);
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
        let mut event_manager: VmmEventManager = EventManager::new()
            .map_err(|e| VmError::Setup("event manager", io::Error::other(e.to_string())))?;
        let blk_slots = devices.blocks.len();
        let vsock = devices.vsock.take();

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
            devices,
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
            ctx,
            _live: host.live_guard(),
        };
        // Detached: the VM's end is reported through `EndState`, not by joining.
        if pending_vmm.start((event_manager, done, resources)).is_err() {
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
            blk_slots,
            vsock,
        })
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
