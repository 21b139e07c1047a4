// SPDX-License-Identifier: Apache-2.0
//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! The VMM thread sends a real-time signal to the vCPU thread. Its handler sets
//! `kvm_run.immediate_exit` for the vCPU that thread runs, so a signal that lands just before
//! `KVM_RUN` is entered still makes it return `EINTR` at once instead of being lost; a signal that
//! lands inside `KVM_RUN` interrupts it directly. The vCPU loop clears the flag after each `EINTR`
//! and re-reads its run state, which the sender updates before signalling.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::null_mut;
use std::sync::Once;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

thread_local! {
    // `const` initialisation: a plain TLS slot with no lazy init and no destructor, so reading it
    // from a signal handler is async-signal-safe.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

/// Offset from `SIGRTMIN` of the kick signal.
const KICK_SIGNAL_OFFSET: c_int = 0;

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` was stored by `ThreadVcpu::new` on this very thread and points into the
        // `kvm_run` mapping of the VcpuFd that the `ThreadVcpu` owns; its Drop clears the slot
        // before the fd (and the mapping) goes away, so the mapping is live. A volatile byte store is async-signal-safe.
        let flag = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        // SAFETY: `flag` points at a live `u8` in that mapping (see above).
        unsafe { flag.write_volatile(1) };
    }
}

/// Kicks the thread with host thread id `tid` of this process: for a caller that has no
/// handle of the thread ([`crate::Vm::stop`] when the VMM thread, which owns the vCPU threads'
/// handles, does not answer). A thread that has ended is fine to miss.
pub fn kick_thread(tid: u32) {
    let Ok(tid) = libc::pid_t::try_from(tid) else {
        return;
    };
    let pid = std::process::id().cast_signed();
    // SAFETY: tgkill takes plain integers and only sends the kick signal to a thread of this
    // process (its handler is above); a thread id that is gone fails with ESRCH, ignored.
    unsafe {
        libc::syscall(libc::SYS_tgkill, pid, tid, kick_signal());
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// A vCPU owned by the thread that runs it, reachable by that thread's kick handler.
///
/// Created on the vCPU thread itself; it is neither `Send` nor `Sync`, so it cannot leave the
/// thread whose thread-local slot points at its `kvm_run`.
#[derive(Debug)]
pub struct ThreadVcpu {
    fd: VcpuFd,
    _not_send: PhantomData<*const ()>,
}

impl ThreadVcpu {
    /// Takes `fd` and points this thread's kick handler at its `kvm_run` mapping (which stays at
    /// the same address for the fd's life, wherever the `VcpuFd` value itself moves).
    pub fn new(mut fd: VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|slot| slot.set(run));
        ThreadVcpu {
            fd,
            _not_send: PhantomData,
        }
    }

    /// The vCPU fd.
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }
}

impl Drop for ThreadVcpu {
    fn drop(&mut self) {
        // Runs before `fd` is dropped (and its kvm_run unmapped).
        KVM_RUN.with(|slot| slot.set(null_mut()));
    }
}
