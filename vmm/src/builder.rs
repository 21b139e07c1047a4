// SPDX-License-Identifier: Apache-2.0
//! Building a VM from its configuration: [`Vm::start`].
//!
//! Everything is built on the caller's thread (timing each phase); the VM's threads are
//! spawned first so their seccomp filters install while the VM is built. Then the VM is handed
//! to one VMM thread (`event_loop`) and one thread per vCPU (`Launch`; for a VM restored
//! paused, as it first runs), and the caller keeps the [`Vm`] handle.

use std::fs::File;
use std::io;
use std::mem::take;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{BootTimer, ConsoleSink, I8042, SerialConsole};
use devices::sync::Recover;
use devices::virtio::Line;
use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::api::{VmmAction, VmmActionError, VmmData};
use crate::arch::layout::{
    BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, I8042_DATA_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, ConsoleConfig, ValidatedConfig, VmConfig};
use crate::device_manager::{DeviceConfig, DeviceError, DeviceManager, VmmEventManager};
use crate::event_loop::{SnapshotSources, VmResources, VmmControl, VmmJob, vmm_thread};
use crate::host::Host;
use crate::kvm::state::{Reading, Registers, StateError, xsave_words};
use crate::kvm::{IrqLine, KvmContext, KvmError};
use crate::memory::{GuestRam, MemoryError};
use crate::pool::{PoolKey, ShellError, VmShell};
use crate::seccomp::SeccompPolicy;
use crate::seccomp::{PendingThread, SeccompError, ThreadRole, VmmRun};
use crate::snapshot::SnapshotError;
use crate::snapshot::{SavedMemory, VmSnapshot};
use crate::timings::StartupTimings;
use crate::vcpu::{PendingVcpus, ResetLine, VcpuContext, VcpuControl, VmThreads};
use crate::vm::{EndState, Unstarted, Vm};
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
    /// The template could not be cloned.
    #[error("Cloning the template failed")]
    Clone(#[from] CloneError),
}

/// How a clone differs from its template: its own console, confinement and device backends.
#[derive(Debug, Default)]
pub struct CloneConfig {
    /// Where the clone's console goes.
    pub console: ConsoleConfig,
    /// Seccomp filters of the clone's threads.
    pub seccomp: SeccompPolicy,
    /// The clone's devices: of the template's kinds, in the template's order (block slots
    /// empty as they were, its own vsock socket, its own network backends).
    pub devices: Vec<DeviceConfig>,
    /// Start frozen: neither the vCPUs nor the devices touch the guest's memory until
    /// [`Vm::resume`] or [`Vm::resume_now`]. A VM restored for a live handover starts so: the
    /// old VM on the same memory must be gone (or given up) before it runs. Its threads get
    /// their vCPUs and event loop then, or when it is first asked anything.
    pub paused: bool,
    /// The VM built ahead for this restore ([`PreparedShell`]), if any.
    pub shell: Option<PreparedShell>,
    /// For a VM rebuilt after a handover: the disks its block slots held, in slot order
    /// ([`crate::HandoverFiles::blocks`]). Each goes back into its slot without a
    /// configuration change for the guest; the restore fails unless every slot then holds
    /// what it held when the VM was saved, with a file of the same size. Empty for a clone.
    pub disks: Vec<Option<crate::BlockFile>>,
}

/// A VM built ahead for a live handover's restore: a KVM VM on the guest memory the old VM
/// still runs on (mapped, registered, irqchip and PIT made, vCPUs made with their CPUID) and
/// its threads started and confined. Building it is most of a restore's cost, and none of it
/// touches the guest memory, so a new process builds it before the old one freezes the VM;
/// the restore then only writes the saved state ([`CloneConfig::shell`]).
#[derive(Debug)]
pub struct PreparedShell {
    shell: VmShell,
    mem_bytes: u64,
    /// Whether the memory is a template's, mapped copy-on-write (a clone's).
    private: bool,
    /// Identifies the memfd the shell maps (device and inode).
    memory_id: (u64, u64),
    /// For a clone's: the id of the pages copied ahead written into it
    /// ([`PreparedShell::with_base`]).
    base: Option<u64>,
}

/// The device and inode of a memfd.
fn file_id(file: &File) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map_or((0, 0), |m| (m.dev(), m.ino()))
}

impl PreparedShell {
    /// Builds the shell of a VM of `vcpus` vCPUs on `memory` (`mem_bytes` long): the VM's own
    /// memfd (`private` false), or for a clone its template's (`private` true). Its threads run
    /// under `seccomp`; with `jail` (the directory of the VM's hybrid vsock socket) and a
    /// policy other than off, its VMM thread is jailed there now, not as the VM starts.
    pub fn build(
        host: &Host,
        memory: &Arc<File>,
        private: bool,
        mem_bytes: u64,
        vcpus: u8,
        seccomp: SeccompPolicy,
        jail: Option<&std::path::Path>,
    ) -> Result<PreparedShell, VmError> {
        let kvm = host.kvm()?;
        let ram = if private {
            GuestRam::copy_on_write(memory, mem_bytes)
        } else {
            GuestRam::shared(memory, mem_bytes)
        }
        .map_err(|e| VmError::Shell(ShellError::Memory(e)))?;
        let (mut shell, _) = VmShell::build_on(&kvm, ram, vcpus)?;
        let filters = host.filters();
        let role_filters = (
            filters.get(ThreadRole::Vcpu, seccomp)?,
            filters.get(ThreadRole::Vmm, seccomp)?,
        );
        let mut threads = match jail {
            // As `DeviceManager::jailing` does: a VM under a filter is jailed.
            Some(root) if seccomp != SeccompPolicy::Off => VmThreads::spawn_jailed(
                vcpus,
                seccomp,
                role_filters,
                root.to_path_buf(),
                filters.lock(seccomp)?,
            ),
            _ => VmThreads::spawn(vcpus, seccomp, role_filters.0, role_filters.1),
        }
        .map_err(VmError::Spawn)?;
        // Built ahead of a freeze: the filter compiles (and the VMM thread's jail) are done
        // before it, not beside it.
        if !threads.wait_installed(Duration::from_secs(5)) {
            log::warn!("A prepared shell's threads took over 5 s to install their filters");
        }
        shell.threads = Some(threads);
        Ok(PreparedShell {
            shell,
            mem_bytes,
            private,
            memory_id: file_id(memory),
            base: None,
        })
    }

    /// Writes a clone's pages copied ahead while it ran ([`Vm::precopy`]'s memfd, `id` its
    /// id) into the shell's memory: the handover then carries only the pages that differ
    /// from them, and only a shell that has them fits it.
    pub fn with_base(mut self, pages: &File, id: u64) -> Result<PreparedShell, VmError> {
        if !self.private {
            return Err(CloneError::ShellMismatch.into());
        }
        self.shell
            .ram
            .apply_delta(pages)
            .map_err(CloneError::Delta)?;
        self.base = Some(id);
        Ok(self)
    }

    /// Whether it fits `snapshot`: the same memory, size and kind.
    fn fits(&self, snapshot: &VmSnapshot) -> bool {
        let (private, base) = match &snapshot.kind {
            SavedMemory::Clone { base, .. } => (true, *base),
            _ => (false, None),
        };
        self.base == base
            && self.mem_bytes == snapshot.mem_bytes
            && self.private == private
            && self.memory_id == file_id(&snapshot.memory)
            && self.shell.vcpus.len() == snapshot.vcpus.len()
    }
}

/// What the common part of building a VM starts from.
enum Source<'a> {
    /// A guest to boot: the validated configuration.
    Boot(Box<ValidatedConfig>),
    /// A template to clone, or a handed-over VM to rebuild.
    Clone(&'a VmSnapshot, Box<CloneConfig>),
}

impl Vm {
    /// Validates `config`, builds the VM on `host` and starts it.
    pub fn start(host: &Host, config: VmConfig) -> Result<Vm, VmError> {
        let start = Instant::now();
        let kvm = host.kvm()?;
        let kvm_open = start.elapsed();
        let cfg = config.validate(kvm.max_vcpus())?;
        Self::build(host, &kvm, Source::Boot(Box::new(cfg)), start, kvm_open)
    }

    /// Starts a clone of the VM `snapshot` saved, on a copy-on-write mapping of its memory:
    /// the guest continues where the template was paused, with the clone's own devices.
    /// The vsock device tells the guest its transport was reset.
    pub fn clone_from(
        host: &Host,
        snapshot: &VmSnapshot,
        config: CloneConfig,
    ) -> Result<Vm, VmError> {
        let start = Instant::now();
        let kvm = host.kvm()?;
        let kvm_open = start.elapsed();
        let source = Source::Clone(snapshot, Box::new(config));
        Self::build(host, &kvm, source, start, kvm_open)
    }

    fn build(
        host: &Host,
        kvm: &KvmContext,
        mut source: Source<'_>,
        start: Instant,
        kvm_open: Duration,
    ) -> Result<Vm, VmError> {
        let mut timings = StartupTimings {
            kvm_open,
            ..StartupTimings::default()
        };
        let mut lap = Lap(start + kvm_open);
        let (vcpu_count, seccomp, mem_bytes) = match &source {
            Source::Boot(cfg) => (cfg.vcpus, cfg.seccomp, cfg.mem_bytes()),
            Source::Clone(snap, cfg) => (
                u8::try_from(snap.vcpus.len()).map_err(|_| CloneError::VcpuCount)?,
                cfg.seccomp,
                snap.mem_bytes,
            ),
        };
        let filters = host.filters();
        crate::kvm::signal::install_kick_handler().map_err(|e| VmError::Setup("kick signal", e))?;
        let VmShell {
            vm_fd,
            vcpus: mut ready_vcpus,
            ram,
            threads,
        } = match &mut source {
            Source::Boot(cfg) if cfg.memory.is_some() => {
                let memory = cfg.memory.take().ok_or(VmError::Setup(
                    "guest memory",
                    io::Error::other("taken twice"),
                ))?;
                let ram = GuestRam::shared(&memory, mem_bytes)
                    .map_err(|e| VmError::Shell(ShellError::Memory(e)))?;
                let (shell, t) = VmShell::build_on(kvm, ram, vcpu_count)?;
                timings.memory = t.memory;
                timings.vm_create = lap.next().saturating_sub(t.memory);
                shell
            }
            Source::Boot(_) => match host.pool().take(PoolKey {
                mem_bytes,
                template: None,
            }) {
                Some(shell) => {
                    timings.pooled = true;
                    timings.vm_create = lap.next();
                    shell
                }
                None => {
                    let (shell, t) = VmShell::build(kvm, mem_bytes)?;
                    timings.memory = t.memory;
                    timings.vm_create = lap.next().saturating_sub(t.memory);
                    shell
                }
            },
            Source::Clone(snap, cfg) => {
                let pooled = match (cfg.shell.take(), &snap.kind) {
                    (Some(prepared), _) if prepared.fits(snap) => {
                        if let SavedMemory::Clone { delta, .. } = &snap.kind {
                            prepared
                                .shell
                                .ram
                                .apply_delta(delta)
                                .map_err(CloneError::Delta)?;
                        }
                        Some(prepared.shell)
                    }
                    (Some(_), _) => return Err(CloneError::ShellMismatch.into()),
                    (None, SavedMemory::Template) => host.pool().take(snap.pool_key()),
                    (None, SavedMemory::Own | SavedMemory::Clone { .. }) => None,
                };
                match pooled {
                    Some(shell) => {
                        timings.pooled = true;
                        timings.vm_create = lap.next();
                        shell
                    }
                    None => {
                        let ram = restored_memory(snap)?;
                        let (shell, t) = VmShell::build_on(kvm, ram, vcpu_count)?;
                        timings.memory = t.memory;
                        timings.vm_create = lap.next().saturating_sub(t.memory);
                        shell
                    }
                }
            }
        };
        // The VM's threads: the pooled shell's, started and confined ahead, or started now
        // (they install their seccomp filters while the VM is built).
        let threads = match threads {
            Some(threads) if threads.fit(vcpu_count, seccomp) => {
                timings.threads_pooled = true;
                threads
            }
            _ => VmThreads::spawn(
                vcpu_count,
                seccomp,
                filters.get(ThreadRole::Vcpu, seccomp)?,
                filters.get(ThreadRole::Vmm, seccomp)?,
            )
            .map_err(VmError::Spawn)?,
        };
        let thread_ids = threads.seen();
        let VmThreads {
            vcpus: pending_vcpus,
            vmm: pending_vmm,
            jailed,
            ..
        } = threads;
        let vm_fd = Arc::new(vm_fd);
        // The devices' event-loop halves subscribe as they are built.
        let mut event_manager: VmmEventManager = EventManager::new()
            .map_err(|e| VmError::Setup("event manager", io::Error::other(e.to_string())))?;

        // Virtio devices first: the kernel command line names them.
        let mut mmio = Bus::default();
        let paused = matches!(&source, Source::Clone(_, cfg) if cfg.paused);
        let (device_configs, console_cfg, disks) = match &mut source {
            Source::Boot(cfg) => (take(&mut cfg.devices), take(&mut cfg.console), Vec::new()),
            Source::Clone(_, cfg) => (
                take(&mut cfg.devices),
                take(&mut cfg.console),
                take(&mut cfg.disks),
            ),
        };
        let mut device_manager =
            DeviceManager::new(&vm_fd, &ram.mem, &mut mmio, &mut event_manager)
                .jailing(seccomp != SeccompPolicy::Off);
        if let Source::Clone(snap, _) = &source {
            let wanted = snap.device_types();
            if wanted.len() != device_configs.len() {
                return Err(CloneError::DeviceCount {
                    template: wanted.len(),
                    clone: device_configs.len(),
                }
                .into());
            }
            // A handed-over VM's slots must show its guest what they showed it (a template's
            // clones get their own disks later, with a configuration change).
            let saved_disks = match snap.kind {
                SavedMemory::Template => None,
                SavedMemory::Own | SavedMemory::Clone { .. } => Some(snap.disks.as_slice()),
            };
            device_manager = device_manager
                .restoring(&snap.devices)
                .restoring_disks(disks, saved_disks);
        }
        device_manager.add_all(device_configs)?;
        if let Source::Clone(snap, _) = &source {
            device_manager.devices.reset_stale_vsock(&snap.vsock_stale);
        }
        let device_cmdline = take(&mut device_manager.cmdline);
        let mut devices = device_manager.devices;
        // The VMM thread's jail: made by the thread as it starts, or ahead (a prepared
        // shell's), then in the very directory the vsock device serves under.
        let jail = match (devices.jail.take(), jailed) {
            (Some(root), Some(ahead)) if root == ahead => None,
            (Some(root), None) => Some((root, filters.lock(seccomp)?)),
            (None, None) => None,
            (root, Some(ahead)) => {
                return Err(VmError::Setup(
                    "jail",
                    io::Error::other(format!(
                        "the VMM thread was jailed in {} ahead; the VM's vsock serves under {:?}",
                        ahead.display(),
                        root
                    )),
                ));
            }
        };
        let virtio_time = lap.next();

        let boot_entry = match &mut source {
            Source::Boot(cfg) => {
                let cmdline = format!("{}{}", cfg.cmdline, device_cmdline);
                let entry = boot::load_guest(&ram.mem, cfg, &cmdline)?;
                arch::configure_system(&ram.mem, cfg.vcpus)?;
                Some(entry)
            }
            Source::Clone(snap, _) => {
                snap.vm.restore(&vm_fd).map_err(CloneError::State)?;
                None
            }
        };
        timings.kernel_load = lap.next();

        // One EventFd wakes the VMM thread: requests, vCPU exits, the i8042 reset.
        let wake = Arc::new(
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
                .map_err(|e| VmError::Setup("wake eventfd", e))?,
        );
        let control = Arc::new(VcpuControl::new(Arc::clone(&wake)));
        if paused {
            control.start_paused();
        }
        let serial_irq: Arc<dyn Line> = Arc::new(IrqLine::new(Arc::clone(&vm_fd), SERIAL_IRQ));
        let console_log = match &console_cfg.log_path {
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
            console_cfg.stdout.then(|| Box::new(io::stdout()) as _);
        let mut sink = ConsoleSink::new(console_log, passthrough);
        if let Some(max) = console_cfg.log_max_bytes {
            sink = sink.with_log_limit(max);
        }
        let console = sink.tail();
        let serial = match &source {
            Source::Boot(_) => SerialConsole::new(serial_irq, sink),
            Source::Clone(snap, _) => SerialConsole::restore(serial_irq, sink, &snap.serial)
                .map_err(|e| VmError::Setup("serial console", e))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let i8042 = Arc::new(I8042::new(Arc::new(ResetLine(Arc::clone(&control)))));
        let boot_timer = Arc::new(BootTimer::new(start));
        let boot_signal = boot_timer.signal();
        let mut pio = Bus::default();
        pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
        pio.insert(i8042, u64::from(I8042_DATA_PORT), 5)?;
        mmio.insert(boot_timer, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE)?;
        timings.devices = lap.next() + virtio_time;

        let mut vcpu_fds = Vec::with_capacity(usize::from(vcpu_count));
        let registers = Registers {
            sync: kvm.sync_regs(),
        };
        // The TSC frequency the vCPUs run at: KVM's default, or the saved one.
        let mut tsc_khz = None;
        // A clone shell comes with its vCPUs made and their CPUID set.
        ready_vcpus.reverse();
        for id in 0..vcpu_count {
            let (mut fd, made) = match ready_vcpus.pop() {
                Some(fd) => (fd, true),
                None => (
                    vm_fd
                        .create_vcpu(u64::from(id))
                        .map_err(|e| VmError::CreateVcpu(id, e))?,
                    false,
                ),
            };
            match &source {
                Source::Boot(_) => {
                    let boot = (id == 0).then_some(()).and(boot_entry.as_ref());
                    arch::configure_vcpu(
                        &fd,
                        &ram.mem,
                        kvm.supported_cpuid(),
                        id,
                        vcpu_count,
                        boot,
                    )?;
                }
                Source::Clone(snap, _) => {
                    if !made {
                        arch::set_cpuid(&fd, kvm.supported_cpuid(), id, vcpu_count)?;
                    }
                    let state = snap
                        .vcpus
                        .get(usize::from(id))
                        .ok_or(CloneError::VcpuCount)?;
                    let default = kvm.default_tsc_khz(&fd);
                    let fresh = kvm.fresh_vcpu(&fd, id == 0);
                    state
                        .restore(&mut fd, default, registers, fresh)
                        .map_err(CloneError::State)?;
                    tsc_khz = tsc_khz.or(state.tsc_khz()).or(default);
                }
            }
            if tsc_khz.is_none() {
                tsc_khz = kvm.default_tsc_khz(&fd);
            }
            vcpu_fds.push(fd);
        }
        timings.vcpu_create = lap.next();

        let (api_tx, api_rx) = channel();
        let ctx = VcpuContext {
            control: Arc::clone(&control),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
        };
        let ram_file = Arc::clone(&ram.file);
        let private_memory = ram.private;
        let saved = SnapshotSources {
            vm_fd: Arc::clone(&vm_fd),
            serial,
            memory: Arc::clone(&ram.file),
            mem_bytes,
            private_memory: ram.private,
            mapping: ram.mem.clone(),
            vcpu_reading: Arc::new(Reading {
                msr_list: kvm.msr_list().into(),
                xsave_words: xsave_words(&vm_fd),
                tsc_khz,
                registers,
            }),
        };
        let blk_slots = devices.blocks.len();
        let vsock = devices.vsock.take();
        let vcpu_control = Arc::clone(&control);
        let end = Arc::new(EndState::default());
        let live = host.live_guard();
        let torn_down = live.torn_down();
        let launch = Launch {
            vcpus: pending_vcpus,
            vcpu_fds,
            vmm: pending_vmm,
            event_manager,
            control,
            api_rx,
            wake: Arc::clone(&wake),
            devices,
            saved,
            end: Arc::clone(&end),
            boot: Arc::clone(&boot_signal),
            resources: VmResources {
                jail,
                ctx,
                _vm_fd: vm_fd,
                _ram: ram,
                _live: live,
            },
        };
        // A VM restored for a handover starts its threads when it first runs or is asked
        // anything: waking them now, only for them to wait frozen, would cost two wake-ups
        // inside every VM's pause.
        let held: Option<Box<dyn Unstarted>> = if paused {
            Some(Box::new(launch))
        } else {
            Box::new(launch).start(false).map_err(VmError::Spawn)?;
            None
        };
        timings.vcpu_start = lap.next();
        timings.total = start.elapsed();

        Ok(Vm {
            api_tx,
            wake,
            end,
            boot: boot_signal,
            console,
            ram_file,
            private_memory,
            mem_bytes,
            vcpu_count,
            timings,
            blk_slots,
            vsock,
            thread_ids,
            torn_down,
            vcpu_control,
            precopied: Mutex::default(),
            held: Mutex::new(held),
        })
    }

    /// Rebuilds a VM saved by [`Vm::handover`] (possibly in another process, see
    /// [`VmSnapshot::decode`]) on the same guest memory, with `config`'s backends (the same
    /// taps, disks and vsock socket, passed along), and runs it: the guest goes on where it was
    /// paused. Its vsock device tells the guest its transport was reset (its connections
    /// ended with the old VM).
    pub fn restore(host: &Host, saved: &VmSnapshot, config: CloneConfig) -> Result<Vm, VmError> {
        if matches!(saved.kind, SavedMemory::Template) {
            return Err(CloneError::NotHandedOver.into());
        }
        Self::clone_from(host, saved, config)
    }

    /// Pauses the VM and saves its state for a live handover: the VM stays frozen (vCPUs
    /// and devices) until [`Vm::resume`] (the handover failed: it goes on) or [`Vm::stop`]
    /// (another VM took over with [`Vm::restore`]). Works for every running VM, clones
    /// included (their written pages are copied into the snapshot's delta).
    pub fn handover(&self) -> Result<VmSnapshot, VmmActionError> {
        let base = self.take_precopy();
        let answer = self.request(VmmAction::Handover);
        self.finish_handover(crate::vm::Frozen { answer, base })
    }

    /// [`Vm::handover`] without waiting: `done` is called once with the frozen VM, on the
    /// VMM thread (confined: `done` may only pass it on) or, if the VM has ended, on this
    /// one. [`Vm::finish_handover`] then completes the saved state, on a thread that may
    /// block if [`crate::vm::Frozen::copies_pages`]. Many VMs freeze this way with no
    /// thread waiting on each.
    pub fn handover_then(&self, done: impl FnOnce(crate::vm::Frozen) + Send + 'static) {
        let base = self.take_precopy();
        self.request_then(VmmAction::Handover, move |answer| {
            done(crate::vm::Frozen { answer, base });
        });
    }

    /// A copy taken ahead serves the next handover only (the new process got it beside the
    /// shell it built): taken for it, whatever the outcome.
    fn take_precopy(&self) -> Option<crate::memory::Precopy> {
        self.precopied.lock().recover().ready.take()
    }

    /// Completes the saved state of a VM frozen by [`Vm::handover_then`]: for a clone,
    /// copies the pages it wrote since the copy ahead (or all it wrote). If that fails, the
    /// VM runs again.
    pub fn finish_handover(&self, frozen: crate::vm::Frozen) -> Result<VmSnapshot, VmmActionError> {
        let crate::vm::Frozen { answer, base } = frozen;
        let (mut snapshot, memory) = match answer? {
            VmmData::Handover(s, m) => (*s, m),
            _ => return Err(VmmActionError::NotRunning),
        };
        // The VM fd (`vm`) is dropped before the mapping.
        if let Some((mapping, vm)) = memory {
            // Frozen: the logs hold every write since the copy ahead.
            let written = match &base {
                Some(base) if base.logged => match crate::kvm::dirty::written(&vm, &mapping) {
                    Ok(written) => Some(written),
                    Err(e) => {
                        log::warn!("Cannot read the writes logged since the copy ahead: {e}");
                        None
                    }
                },
                _ => None,
            };
            let captured = match &base {
                Some(base) => crate::memory::capture_since(&mapping, base, written.as_deref()),
                None => crate::memory::capture_delta(&mapping),
            };
            let id = base.as_ref().map(|b| b.id);
            self.precopied.lock().recover().spent = base;
            match captured {
                Ok(delta) => snapshot.kind = SavedMemory::Clone { delta, base: id },
                Err(e) => {
                    let _ = self.resume();
                    return Err(SnapshotError::Delta(e).into());
                }
            }
        }
        Ok(snapshot)
    }

    /// Copies, while it runs, the pages a clone has written so far, ahead of a live handover:
    /// the handover ([`Vm::handover`], the next one only) then copies, frozen, just the
    /// pages that differ from these, and the new process writes these into the VM it builds
    /// ahead ([`PreparedShell::with_base`]) before the freeze. Returns the copy; `None` for
    /// a VM with its own memory (a handover moves none of its pages). A failure leaves no
    /// copy behind.
    pub fn precopy(&self) -> Result<Option<CopyAhead>, VmmActionError> {
        *self.precopied.lock().recover() = crate::vm::Precopied::default();
        if !self.private_memory {
            return Ok(None);
        }
        // The VM fd (`vm`) is dropped before the mapping.
        let (mapping, vm) = match self.request(VmmAction::Mapping)? {
            VmmData::Mapping(m, vm) => (m, vm),
            _ => return Err(VmmActionError::NotRunning),
        };
        // The writes are logged from before the copy, so that the handover copies again only
        // the pages written since (a page written during the copy included); without a log,
        // it compares each page with its copy. Logging goes on until the VM ends here or the
        // next copy starts it anew.
        let logged = match crate::kvm::dirty::track(&vm, &mapping, true) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("Cannot log guest memory writes (the handover compares pages): {e}");
                let _ = crate::kvm::dirty::track(&vm, &mapping, false);
                false
            }
        };
        let copy = crate::memory::Precopy::take(&mapping, logged).map_err(SnapshotError::Delta)?;
        let taken = CopyAhead {
            pages: Arc::clone(&copy.file),
            id: copy.id,
            logged,
        };
        self.precopied.lock().recover().ready = Some(copy);
        Ok(Some(taken))
    }

    /// Pauses the VM and saves its state for clones (see [`VmSnapshot`]). The VM stays paused;
    /// it must not run again once clones exist: stop it.
    pub fn snapshot(&self) -> Result<VmSnapshot, VmmActionError> {
        match self.request(VmmAction::Snapshot)? {
            VmmData::Snapshot(s) => Ok(*s),
            _ => Err(VmmActionError::NotRunning),
        }
    }
}

/// A built VM whose threads have not started: everything they run with, ready.
struct Launch {
    vcpus: PendingVcpus,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    vmm: PendingThread<VmmRun>,
    event_manager: VmmEventManager,
    control: Arc<VcpuControl>,
    api_rx: std::sync::mpsc::Receiver<crate::api::ApiRequest>,
    wake: Arc<EventFd>,
    devices: crate::device_manager::Devices,
    saved: SnapshotSources,
    end: Arc<EndState>,
    boot: Arc<devices::legacy::BootSignal>,
    resources: VmResources,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("vcpus", &self.vcpu_fds.len())
            .finish_non_exhaustive()
    }
}

impl Unstarted for Launch {
    /// Hands the vCPU threads their vCPUs and the VMM thread its loop.
    fn start(self: Box<Self>, frozen: bool) -> io::Result<()> {
        let Launch {
            vcpus,
            vcpu_fds,
            vmm,
            mut event_manager,
            control,
            api_rx,
            wake,
            devices,
            saved,
            end,
            boot,
            resources,
        } = *self;
        let vcpus = vcpus.start(vcpu_fds, &resources.ctx);
        let done = Arc::new(AtomicBool::new(false));
        let controller = Arc::new(Mutex::new(VmmControl {
            api_rx,
            wake,
            control,
            vcpus,
            devices,
            saved,
            end,
            boot,
            done: Arc::clone(&done),
            reinit: Vec::new(),
            frozen,
        }));
        event_manager.add_subscriber(controller.clone());
        // Detached: the VM's end is reported through `EndState`, not by joining.
        let job: VmmJob = (event_manager, Arc::clone(&controller), done, resources);
        if vmm
            .start(Box::new(move |confined| vmm_thread(job, confined)))
            .is_err()
        {
            controller
                .lock()
                .recover()
                .finish(VmExit::Crashed("VMM thread ended early".into()));
            return Err(io::Error::other("the VMM thread ended early"));
        }
        Ok(())
    }
}

/// A clone's pages copied ahead of a live handover ([`Vm::precopy`]).
#[derive(Debug, Clone)]
pub struct CopyAhead {
    /// The pages, each at its offset (a sparse memfd), for [`PreparedShell::with_base`].
    pub pages: Arc<File>,
    /// The copy's id, for [`PreparedShell::with_base`].
    pub id: u64,
    /// Whether the writes since are logged (KVM's dirty log and the host's bitmaps): the
    /// handover then copies the pages written since; else it compares each with its copy.
    pub logged: bool,
}

/// Why a clone could not be made of a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The clone's devices do not match the template's.
    #[error("The template has {template} devices, the clone {clone}")]
    DeviceCount {
        /// Devices in the snapshot.
        template: usize,
        /// Devices configured for the clone.
        clone: usize,
    },
    /// The snapshot's vCPU count is unusable.
    #[error("The snapshot's vCPU count is not one a VM can have")]
    VcpuCount,
    /// Writing the saved KVM state failed.
    #[error("Failed to restore the template's state")]
    State(#[source] StateError),
    /// The shell built ahead is for another VM (memory, size or vCPUs differ).
    #[error("The prepared shell does not fit the saved VM")]
    ShellMismatch,
    /// A template's snapshot was given where a handed-over VM was expected.
    #[error("The snapshot is a template's, not a handed-over VM's")]
    NotHandedOver,
    /// A clone's written pages could not be brought back.
    #[error("Failed to restore a clone's memory")]
    Delta(#[source] crate::memory::DeltaError),
    /// The handed-over clone's pages build on a copy taken ahead, which only the shell built
    /// for it holds, and no such shell was given.
    #[error("The clone's pages build on a copy taken ahead that no prepared shell holds")]
    BaseMissing,
}

/// The memory of a VM built from `snapshot`: a template's clone maps it copy-on-write; a VM
/// rebuilt after a handover maps its own memfd shared or, for a clone, its template's
/// copy-on-write with the pages it wrote copied back.
fn restored_memory(snapshot: &VmSnapshot) -> Result<GuestRam, VmError> {
    let (memory, mem_bytes) = (&snapshot.memory, snapshot.mem_bytes);
    let shell = |e: MemoryError| VmError::Shell(ShellError::Memory(e));
    Ok(match &snapshot.kind {
        SavedMemory::Template => GuestRam::copy_on_write(memory, mem_bytes).map_err(shell)?,
        SavedMemory::Own => GuestRam::shared(memory, mem_bytes).map_err(shell)?,
        SavedMemory::Clone { base: Some(_), .. } => return Err(CloneError::BaseMissing.into()),
        SavedMemory::Clone { delta, base: None } => {
            let ram = GuestRam::copy_on_write(memory, mem_bytes).map_err(shell)?;
            ram.apply_delta(delta).map_err(CloneError::Delta)?;
            ram
        }
    })
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
