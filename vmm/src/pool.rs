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

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::kvm::{KvmCell, KvmContext, KvmError, add_platform_devices, register_memory};
use crate::memory::{GuestRam, MemoryError};

/// Errors building a shell.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// KVM refused a step.
    #[error("KVM setup failed")]
    Kvm(#[from] KvmError),
    /// Guest memory could not be created.
    #[error("Guest memory setup failed")]
    Memory(#[from] MemoryError),
}

/// A VM with memory, irqchip and PIT, not yet running anything.
#[derive(Debug)]
pub(crate) struct VmShell {
    /// The VM. Declared before `ram`: it is dropped first.
    pub(crate) vm_fd: VmFd,
    /// Its guest memory.
    pub(crate) ram: GuestRam,
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
        Ok((VmShell { vm_fd, ram }, timings))
    }

    /// Builds a shell whose memory is a copy-on-write mapping of a template's `memory`
    /// (`mem_bytes` long): registered before the irqchip, as for every shell (a memory slot
    /// added after it waits for an SRCU grace period).
    pub(crate) fn build_clone(
        kvm: &KvmContext,
        memory: &File,
        mem_bytes: u64,
    ) -> Result<(VmShell, ShellTimings), ShellError> {
        let vm_fd = kvm.create_vm()?;
        let t1 = Instant::now();
        let ram = GuestRam::copy_on_write(memory, mem_bytes)?;
        register_memory(&vm_fd, &ram.mem)?;
        let t2 = Instant::now();
        add_platform_devices(&vm_fd)?;
        let timings = ShellTimings { memory: t2 - t1 };
        Ok((VmShell { vm_fd, ram }, timings))
    }
}

#[derive(Debug, Default)]
struct PoolState {
    /// Ready shells by memory size.
    ready: HashMap<u64, Vec<VmShell>>,
    /// How many shells to keep ready, by memory size.
    targets: HashMap<u64, usize>,
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
    /// Keeps `depth` shells of `mem_mib` MiB ready from now on (0 stops keeping them and frees
    /// the idle ones). Starts the refill thread, which builds with `kvm`, on first use.
    pub(crate) fn set_target(
        self: &Arc<Self>,
        kvm: &Arc<KvmCell>,
        mem_mib: u32,
        depth: usize,
    ) -> std::io::Result<()> {
        let bytes = u64::from(mem_mib) << 20;
        let mut state = self.state.lock().expect("poisoned");
        if depth == 0 {
            state.targets.remove(&bytes);
            let idle = state.ready.remove(&bytes);
            drop(state);
            drop(idle);
            return Ok(());
        }
        state.targets.insert(bytes, depth);
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

    /// Takes a ready shell of exactly `mem_bytes`, if one is there.
    pub(crate) fn take(&self, mem_bytes: u64) -> Option<VmShell> {
        let mut state = self.state.lock().expect("poisoned");
        let shell = state.ready.get_mut(&mem_bytes)?.pop();
        if shell.is_some() {
            self.cv.notify_all();
        }
        shell
    }

    /// Shells ready now for `mem_mib`.
    pub(crate) fn ready(&self, mem_mib: u32) -> usize {
        let state = self.state.lock().expect("poisoned");
        state
            .ready
            .get(&(u64::from(mem_mib) << 20))
            .map_or(0, Vec::len)
    }

    /// Waits until every target is met, up to `timeout`.
    pub(crate) fn wait_full(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("poisoned");
        let (state, _) = self
            .cv
            .wait_timeout_while(state, timeout, |s| missing(s).is_some())
            .expect("poisoned");
        missing(&state).is_none()
    }

    /// Frees the idle shells and ends the refill thread (the host is dropped).
    pub(crate) fn close(&self) {
        let mut state = self.state.lock().expect("poisoned");
        state.closed = true;
        state.targets.clear();
        let idle = std::mem::take(&mut state.ready);
        drop(state);
        self.cv.notify_all();
        drop(idle);
    }

    fn refill_loop(&self, kvm: &KvmCell) {
        loop {
            let size = {
                let mut state = self.state.lock().expect("poisoned");
                loop {
                    if state.closed {
                        return;
                    }
                    if let Some(size) = missing(&state) {
                        break size;
                    }
                    state = self.cv.wait(state).expect("poisoned");
                }
            };
            let built = kvm
                .get()
                .map_err(ShellError::from)
                .and_then(|kvm| VmShell::build(&kvm, size));
            match built {
                Ok((shell, _)) => {
                    let mut state = self.state.lock().expect("poisoned");
                    // The target may have been lowered while building: then the shell just
                    // drops.
                    if state
                        .targets
                        .get(&size)
                        .is_some_and(|t| state.ready.get(&size).map_or(0, Vec::len) < *t)
                    {
                        state.ready.entry(size).or_default().push(shell);
                    }
                    self.cv.notify_all();
                }
                Err(e) => {
                    log::error!("Cannot pre-build a VM shell of {} MiB: {e}", size >> 20);
                    // Do not spin on a persistent failure (no /dev/kvm, no memory).
                    let state = self.state.lock().expect("poisoned");
                    let _ = self
                        .cv
                        .wait_timeout_while(state, Duration::from_secs(1), |s| !s.closed)
                        .expect("poisoned");
                }
            }
        }
    }
}

fn missing(state: &PoolState) -> Option<u64> {
    state
        .targets
        .iter()
        .find(|(size, target)| state.ready.get(size).map_or(0, Vec::len) < **target)
        .map(|(size, _)| *size)
}
