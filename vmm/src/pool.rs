// SPDX-License-Identifier: Apache-2.0
//! Pre-built VM shells: the part of a VM that does not depend on what it will run.
//!
//! A shell is a KVM VM with its guest memory (a fresh memfd, mapped and registered), the in-kernel
//! irqchip and the PIT. Building one costs a few milliseconds, almost all of it spent inside KVM
//! waiting for SRCU grace periods (memslot and I/O bus updates), not computing. A background
//! thread keeps a few shells ready for the memory sizes the caller expects, so `Vm::start` takes
//! one in microseconds; a size with no ready shell is built on the spot, exactly as the refill
//! thread would build it.
//!
//! A shell is used once. Its memory has never been mapped into a guest, so nothing leaks from one
//! sandbox to the next; an idle shell holds no guest pages (the memfd is sparse).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::kvm::{KvmContext, KvmError, add_platform_devices, register_memory};
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
pub struct VmShell {
    /// The VM. Declared before `ram`: it is dropped first.
    pub vm_fd: VmFd,
    /// Its guest memory.
    pub ram: GuestRam,
}

/// How long building a shell took, by part.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShellTimings {
    /// `KVM_CREATE_VM` plus irqchip, PIT and TSS.
    pub vm_create: Duration,
    /// memfd, mapping and memslot registration.
    pub memory: Duration,
}

impl VmShell {
    /// Builds a shell for `mem_bytes` of guest memory.
    pub fn build(kvm: &KvmContext, mem_bytes: u64) -> Result<(VmShell, ShellTimings), ShellError> {
        let t0 = Instant::now();
        let vm_fd = kvm.create_vm()?;
        let t1 = Instant::now();
        let ram = GuestRam::new(mem_bytes)?;
        register_memory(&vm_fd, &ram.mem)?;
        let t2 = Instant::now();
        add_platform_devices(&vm_fd)?;
        let timings = ShellTimings {
            vm_create: (t1 - t0) + t2.elapsed(),
            memory: t2 - t1,
        };
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
}

#[derive(Debug, Default)]
struct Pool {
    state: Mutex<PoolState>,
    cv: Condvar,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(Pool::default)
}

/// Keeps `depth` shells of `mem_mib` MiB ready from now on (0 stops keeping them and frees the
/// idle ones). Starts the refill thread on first use.
pub fn set_target(mem_mib: u32, depth: usize) -> std::io::Result<()> {
    let bytes = u64::from(mem_mib) << 20;
    let pool = pool();
    let mut state = pool.state.lock().expect("poisoned");
    if depth == 0 {
        state.targets.remove(&bytes);
        let idle = state.ready.remove(&bytes);
        drop(state);
        drop(idle);
        return Ok(());
    }
    state.targets.insert(bytes, depth);
    if !state.refill_running {
        std::thread::Builder::new()
            .name("vm-shell-pool".into())
            .stack_size(256 * 1024)
            .spawn(refill_loop)?;
        state.refill_running = true;
    }
    pool.cv.notify_all();
    Ok(())
}

/// Takes a ready shell of exactly `mem_bytes`, if one is there.
pub fn take(mem_bytes: u64) -> Option<VmShell> {
    let pool = pool();
    let mut state = pool.state.lock().expect("poisoned");
    let shell = state.ready.get_mut(&mem_bytes)?.pop();
    if shell.is_some() {
        pool.cv.notify_all();
    }
    shell
}

/// Shells ready now for `mem_mib`.
pub fn ready(mem_mib: u32) -> usize {
    let state = pool().state.lock().expect("poisoned");
    state
        .ready
        .get(&(u64::from(mem_mib) << 20))
        .map_or(0, Vec::len)
}

/// Waits until every target is met (for benchmarks and tests), up to `timeout`.
pub fn wait_full(timeout: Duration) -> bool {
    let pool = pool();
    let state = pool.state.lock().expect("poisoned");
    let (state, _) = pool
        .cv
        .wait_timeout_while(state, timeout, |s| missing(s).is_some())
        .expect("poisoned");
    missing(&state).is_none()
}

fn missing(state: &PoolState) -> Option<u64> {
    state
        .targets
        .iter()
        .find(|(size, target)| state.ready.get(size).map_or(0, Vec::len) < **target)
        .map(|(size, _)| *size)
}

fn refill_loop() {
    let pool = pool();
    loop {
        let size = {
            let mut state = pool.state.lock().expect("poisoned");
            loop {
                if let Some(size) = missing(&state) {
                    break size;
                }
                state = pool.cv.wait(state).expect("poisoned");
            }
        };
        let built = KvmContext::global()
            .map_err(ShellError::from)
            .and_then(|kvm| VmShell::build(kvm, size));
        match built {
            Ok((shell, _)) => {
                let mut state = pool.state.lock().expect("poisoned");
                // The target may have been lowered while building: then the shell just drops.
                if state
                    .targets
                    .get(&size)
                    .is_some_and(|t| state.ready.get(&size).map_or(0, Vec::len) < *t)
                {
                    state.ready.entry(size).or_default().push(shell);
                }
                pool.cv.notify_all();
            }
            Err(e) => {
                log::error!("Cannot pre-build a VM shell of {} MiB: {e}", size >> 20);
                // Do not spin on a persistent failure (no /dev/kvm, no memory).
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
