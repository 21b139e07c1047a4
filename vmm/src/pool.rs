// SPDX-License-Identifier: Apache-2.0
//! Pre-built VM shells: the part of a VM that does not depend on what it will run.
//!
//! A shell is a KVM VM with its guest memory (a fresh memfd, mapped and registered), the in-kernel
//! irqchip and the PIT. Building one costs a few milliseconds, almost all of it spent inside KVM
//! waiting for SRCU grace periods (memslot and I/O bus updates), not computing. A background
//! thread keeps a few shells ready for the memory sizes the caller expects ([`crate::Host`]), so `Vm::start` takes
//! one in microseconds; a size with no ready shell is built on the spot, exactly as the refill
//! thread would build it.
//!
//! A shell is used once. Its memory has never been mapped into a guest, so nothing leaks from one
//! sandbox to the next; an idle shell holds no guest pages (the memfd is sparse).
//!
//! A template's clones have shells of their own kind: memory that is a copy-on-write mapping
//! of the template's memfd, and the vCPUs already created with their CPUID, so a clone only
//! writes saved state into them ([`crate::Host::set_clone_pool_target`]).

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::sync::Recover;
use kvm_ioctls::{VcpuFd, VmFd};
use seccompiler::BpfProgram;

use crate::arch::set_cpuid;
use crate::kvm::{KvmCell, KvmContext, KvmError, add_platform_devices, register_memory};
use crate::memory::{GuestRam, MemoryError};
use crate::seccomp::SeccompPolicy;
use crate::vcpu::VmThreads;

/// How long the pool waits for a clone shell's threads to install their seccomp filters.
const THREADS_INSTALL_WAIT: Duration = Duration::from_secs(5);

/// Errors building a shell.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// KVM refused a step.
    #[error("KVM setup failed")]
    Kvm(#[from] KvmError),
    /// Guest memory could not be created.
    #[error("Guest memory setup failed")]
    Memory(#[from] MemoryError),
    /// A clone shell's vCPU could not be created.
    #[error("Failed to create vCPU {0}: {1}")]
    Vcpu(u8, String),
}

/// A VM with memory, irqchip and PIT, not yet running anything.
#[derive(Debug)]
pub(crate) struct VmShell {
    /// The VM. Declared before `ram`: it is dropped first.
    pub(crate) vm_fd: VmFd,
    /// vCPUs created ahead (a clone shell's, with their CPUID set); empty for a boot shell.
    pub(crate) vcpus: Vec<VcpuFd>,
    /// Its guest memory.
    pub(crate) ram: GuestRam,
    /// Its threads, started and confined ahead (a clone shell's, when its template's clones
    /// run under a seccomp policy the pool knows): a Start pays neither thread creation nor a
    /// filter install.
    pub(crate) threads: Option<VmThreads>,
}

/// How long building a shell took, by part.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ShellTimings {
    /// memfd, mapping and memslot registration.
    pub(crate) memory: Duration,
}

impl VmShell {
    /// Builds a shell for `mem_bytes` of guest memory.
    pub(crate) fn build(
        kvm: &KvmContext,
        mem_bytes: u64,
    ) -> Result<(VmShell, ShellTimings), ShellError> {
        let vm_fd = kvm.create_vm()?;
        let t1 = Instant::now();
        let ram = GuestRam::new(mem_bytes)?;
        register_memory(&vm_fd, &ram.mem)?;
        let t2 = Instant::now();
        add_platform_devices(&vm_fd)?;
        let timings = ShellTimings { memory: t2 - t1 };
        Ok((
            VmShell {
                vm_fd,
                vcpus: Vec::new(),
                ram,
                threads: None,
            },
            timings,
        ))
    }

    /// Builds a shell whose memory is a copy-on-write mapping of a template's `memory`
    /// (`mem_bytes` long): registered before the irqchip, as for every shell (a memory slot
    /// added after it waits for an SRCU grace period). With `vcpus`, that many vCPUs are
    /// created too, with their CPUID.
    pub(crate) fn build_clone(
        kvm: &KvmContext,
        memory: &Arc<File>,
        mem_bytes: u64,
        vcpus: u8,
    ) -> Result<(VmShell, ShellTimings), ShellError> {
        let ram = GuestRam::copy_on_write(memory, mem_bytes)?;
        Self::build_on(kvm, ram, vcpus)
    }

    /// Builds a shell on `ram` (a template's copy-on-write mapping, or the memory of a VM
    /// rebuilt after a handover), with `vcpus` vCPUs made and their CPUID set.
    pub(crate) fn build_on(
        kvm: &KvmContext,
        ram: GuestRam,
        vcpus: u8,
    ) -> Result<(VmShell, ShellTimings), ShellError> {
        let vm_fd = kvm.create_vm()?;
        let t1 = Instant::now();
        register_memory(&vm_fd, &ram.mem)?;
        let t2 = Instant::now();
        add_platform_devices(&vm_fd)?;
        let mut fds = Vec::with_capacity(usize::from(vcpus));
        for id in 0..vcpus {
            let mut fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(|e| ShellError::Vcpu(id, e.to_string()))?;
            set_cpuid(&fd, kvm.supported_cpuid(), id, vcpus)
                .map_err(|e| ShellError::Vcpu(id, e.to_string()))?;
            // The vCPU's `kvm_run` page faults in here, ahead, not at the restore's first
            // write to it (a clone's Start, a handover's freeze).
            fd.set_kvm_immediate_exit(0);
            fds.push(fd);
        }
        let timings = ShellTimings { memory: t2 - t1 };
        Ok((
            VmShell {
                vm_fd,
                vcpus: fds,
                ram,
                threads: None,
            },
            timings,
        ))
    }
}

/// Which shells: those for booting `mem_bytes` of memory, or those for clones of template
/// `template` ([`crate::snapshot::VmSnapshot::id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) mem_bytes: u64,
    pub(crate) template: Option<u64>,
}

/// A template whose clones get shells: its memory and vCPU count, and the seccomp policy of
/// its clones' threads with that policy's filters (vCPU, VMM), which each shell's threads
/// are started under.
#[derive(Debug)]
pub(crate) struct CloneSource {
    pub(crate) memory: Arc<File>,
    pub(crate) vcpus: u8,
    pub(crate) threads: (
        SeccompPolicy,
        Option<Arc<BpfProgram>>,
        Option<Arc<BpfProgram>>,
    ),
}

#[derive(Debug)]
struct Target {
    depth: usize,
    source: Option<Arc<CloneSource>>,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Ready shells by kind.
    ready: HashMap<PoolKey, Vec<VmShell>>,
    /// How many shells to keep ready, by kind.
    targets: HashMap<PoolKey, Target>,
    refill_running: bool,
    /// The host is gone: the refill thread ends.
    closed: bool,
}

/// The shells one [`crate::Host`] keeps ready, and its refill thread.
#[derive(Debug, Default)]
pub(crate) struct ShellPool {
    state: Mutex<PoolState>,
    cv: Condvar,
}

impl ShellPool {
    /// Keeps `depth` shells of kind `key` ready from now on (0 stops keeping them and frees the
    /// idle ones); clone shells are built from `source`. Starts the refill thread, which builds
    /// with `kvm`, on first use.
    pub(crate) fn set_target(
        self: &Arc<Self>,
        kvm: &Arc<KvmCell>,
        key: PoolKey,
        depth: usize,
        source: Option<CloneSource>,
    ) -> std::io::Result<()> {
        let mut state = self.state.lock().recover();
        if depth == 0 {
            state.targets.remove(&key);
            let idle = state.ready.remove(&key);
            drop(state);
            drop(idle);
            return Ok(());
        }
        state.targets.insert(
            key,
            Target {
                depth,
                source: source.map(Arc::new),
            },
        );
        if !state.refill_running {
            let (pool, kvm) = (Arc::clone(self), Arc::clone(kvm));
            std::thread::Builder::new()
                .name("vm-shell-pool".into())
                .stack_size(256 * 1024)
                .spawn(move || pool.refill_loop(&kvm))?;
            state.refill_running = true;
        }
        self.cv.notify_all();
        Ok(())
    }

    /// Takes a ready shell of kind `key`, if one is there.
    pub(crate) fn take(&self, key: PoolKey) -> Option<VmShell> {
        let mut state = self.state.lock().recover();
        let shell = state.ready.get_mut(&key)?.pop();
        if shell.is_some() {
            self.cv.notify_all();
        }
        shell
    }

    /// The host thread ids of the threads started ahead for the shells ready now (those that
    /// have run): pool work, not any VM's, until a VM takes the shell. A shell still being
    /// built is not in the list.
    pub(crate) fn thread_ids(&self) -> Vec<u32> {
        let state = self.state.lock().recover();
        state
            .ready
            .values()
            .flatten()
            .filter_map(|shell| shell.threads.as_ref())
            .flat_map(VmThreads::seen)
            .map(|thread| thread.tid())
            .filter(|&tid| tid != 0)
            .collect()
    }

    /// Shells of kind `key` ready now.
    pub(crate) fn ready(&self, key: PoolKey) -> usize {
        let state = self.state.lock().recover();
        state.ready.get(&key).map_or(0, Vec::len)
    }

    /// Waits until every target is met, up to `timeout`.
    pub(crate) fn wait_full(&self, timeout: Duration) -> bool {
        let state = self.state.lock().recover();
        let (state, _) = self
            .cv
            .wait_timeout_while(state, timeout, |s| missing(s).is_some())
            .recover();
        missing(&state).is_none()
    }

    /// Frees the idle shells and ends the refill thread (the host is dropped).
    pub(crate) fn close(&self) {
        let mut state = self.state.lock().recover();
        state.closed = true;
        state.targets.clear();
        let idle = std::mem::take(&mut state.ready);
        drop(state);
        self.cv.notify_all();
        drop(idle);
    }

    fn refill_loop(&self, kvm: &KvmCell) {
        loop {
            let (key, source) = {
                let mut state = self.state.lock().recover();
                loop {
                    if state.closed {
                        return;
                    }
                    if let Some(found) = missing(&state) {
                        break found;
                    }
                    state = self.cv.wait(state).recover();
                }
            };
            let built = kvm
                .get()
                .map_err(ShellError::from)
                .and_then(|kvm| match &source {
                    None => VmShell::build(&kvm, key.mem_bytes),
                    Some(src) => {
                        let (mut shell, t) =
                            VmShell::build_clone(&kvm, &src.memory, key.mem_bytes, src.vcpus)?;
                        let (policy, vcpu, vmm) = &src.threads;
                        match VmThreads::spawn(src.vcpus, *policy, vcpu.clone(), vmm.clone()) {
                            // Ready once confined: a Start that takes it starts no filter
                            // install (the pool thread waits, off every Start's path).
                            Ok(mut threads) => {
                                if !threads.wait_installed(THREADS_INSTALL_WAIT) {
                                    log::warn!(
                                        "A pooled clone shell's threads took over {THREADS_INSTALL_WAIT:?} to install their filters"
                                    );
                                }
                                shell.threads = Some(threads);
                            }
                            // The Start that takes the shell starts its own.
                            Err(e) => {
                                log::warn!("Cannot start a pooled clone shell's threads: {e}")
                            }
                        }
                        Ok((shell, t))
                    }
                });
            match built {
                Ok((shell, _)) => {
                    let mut state = self.state.lock().recover();
                    // The target may have been lowered while building: then the shell just
                    // drops.
                    let wanted = state.targets.get(&key).map_or(0, |t| t.depth);
                    if state.ready.get(&key).map_or(0, Vec::len) < wanted {
                        state.ready.entry(key).or_default().push(shell);
                    }
                    self.cv.notify_all();
                }
                Err(e) => {
                    log::error!(
                        "Cannot pre-build a VM shell of {} MiB: {e}",
                        key.mem_bytes >> 20
                    );
                    // Do not spin on a persistent failure (no /dev/kvm, no memory).
                    let state = self.state.lock().recover();
                    let _ = self
                        .cv
                        .wait_timeout_while(state, Duration::from_secs(1), |s| !s.closed)
                        .recover();
                }
            }
        }
    }
}

/// A kind of shell below its target, and what to build it from.
fn missing(state: &PoolState) -> Option<(PoolKey, Option<Arc<CloneSource>>)> {
    state
        .targets
        .iter()
        .find(|(key, target)| state.ready.get(key).map_or(0, Vec::len) < target.depth)
        .map(|(key, target)| (*key, target.source.clone()))
}
