// SPDX-License-Identifier: Apache-2.0
//! Seccomp filters for the threads that run guest-facing code.
//!
//! Every VM has vCPU threads (`vcpuN`: KVM_RUN and the PIO/MMIO exits, including the virtio
//! transport's register writes) and one `vmm` thread (the event loop: virtio queues, the TAP,
//! the vsock unix sockets, API requests). Both handle bytes a hostile guest chose, so each
//! installs, as its first act, a filter that lists the system calls it needs; everything else
//! fails with `EPERM` ([`SeccompPolicy::Enforce`]). The filter is per thread, installed without
//! `SECCOMP_FILTER_FLAG_TSYNC`. Under it, the whole process (the daemon's other threads: gRPC,
//! the Task endpoint, image building) has a baseline ([`confine_process`]): a list of calls no
//! thread of the daemon makes, each denied.
//!
//! One process runs many VMs, so a call a filter misses must not kill the process (and with it
//! every sandbox): `Enforce` returns `EPERM`, which the calling code handles as any I/O error.
//! [`SeccompPolicy::Log`] lets unlisted calls through and has the kernel log each one (audit
//! type 1326, `comm="vcpu0"` or `comm="vmm"`): the way to find what a list lacks.
//!
//! What no list allows: creating processes or threads (`clone`, `fork`, `execve`), opening
//! files by path, sockets other than `AF_UNIX`, memory that is both mapped and executable,
//! `ptrace`, `mount`, `bpf` and the like, and any `ioctl` request but the few the role issues
//! ([`VCPU_IOCTLS`], [`VMM_IOCTLS`]): no creating VMs, vCPUs or devices, no memory slots, no
//! writing vCPU or VM state, nothing on terminals. Those are done by the thread that builds
//! the VM, before it hands the VM to these threads.

use std::collections::BTreeMap;
use std::os::raw::c_ulong;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::stack::ThreadSeen;

/// How the VMM confines its vCPU and VMM threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompPolicy {
    /// System calls outside the thread's list fail with `EPERM`.
    #[default]
    Enforce,
    /// System calls outside the list run, and the kernel logs each one.
    Log,
    /// No filter.
    Off,
}

impl SeccompPolicy {
    /// The policy's name in configs: `enforce`, `log` or `off`.
    pub fn name(self) -> &'static str {
        match self {
            SeccompPolicy::Enforce => "enforce",
            SeccompPolicy::Log => "log",
            SeccompPolicy::Off => "off",
        }
    }
}

impl std::str::FromStr for SeccompPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(SeccompPolicy::Enforce),
            "log" => Ok(SeccompPolicy::Log),
            "off" => Ok(SeccompPolicy::Off),
            other => Err(format!(
                "unknown seccomp policy {other:?} (expected enforce, log or off)"
            )),
        }
    }
}

/// Which list a thread gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ThreadRole {
    /// A vCPU thread.
    Vcpu,
    /// The VM's event-loop thread.
    Vmm,
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not compile (a bug in this module).
    #[error("Building the seccomp filter failed: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error("Installing the seccomp filter failed: {0}")]
    Install(String),
}

/// System calls both kinds of thread make: memory, time, futexes, signals (the vCPU kick),
/// reads and writes on descriptors the thread was given, eventfds and timerfds (a vsock queue
/// notification re-arms the device's timer), and thread exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    // The console log starting again at its limit (vCPU threads write the serial port).
    libc::SYS_ftruncate,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    // musl's `stat`/`lstat` (the shipped static binary) are these, not `newfstatat`.
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_eventfd2,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
];

/// What only the event loop needs: waiting, and the vsock device's unix sockets (a guest's
/// connection to host port P connects to `<uds>_P`; an in-process connection is one end of a
/// socket pair).
const VMM_ONLY: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_timerfd_create,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Removing the hybrid vsock socket (`unlinkat` only from the working directory, below).
    libc::SYS_unlink,
    // Confining the thread's paths to its sandbox's directory ([`jail`]), once, before the
    // lock filter forbids both; `unshare` only for `CLONE_FS`, below.
    libc::SYS_chroot,
    libc::SYS_chdir,
];

/// The `ioctl` requests the lists name, from the kernel's UAPI headers and named as there
/// (kvm-ioctls keeps its own definitions private).
mod defs {
    use std::os::raw::c_uint;

    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_ioeventfd, kvm_irq_level, kvm_irqchip, kvm_lapic_state,
        kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
        kvm_xsave,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // include/uapi/linux/kvm.h
    const KVMIO: c_uint = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
    ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

    // include/uapi/linux/if_tun.h
    ioctl_iow_nr!(TUNSETOFFLOAD, c_uint::from(b'T'), 208, c_uint);

    // include/uapi/asm-generic/ioctls.h: 0x5421, which is `_IO('T', 0x21)`.
    ioctl_io_nr!(FIONBIO, c_uint::from(b'T'), 0x21);
}

/// An `ioctl` request number (`defs`).
type Request = fn() -> c_ulong;

/// The `ioctl` requests a vCPU thread issues. Only the request (argument 1) is checked: the
/// descriptor is one the thread was given (its vCPU, the VM, a TAP).
const VCPU_IOCTLS: &[Request] = &[
    // Running the guest; with `immediate_exit` set, finishing a half-done exit before a
    // snapshot (`kvm::state::settle`).
    defs::KVM_RUN,
    // On the VM fd: the serial port's interrupt, and a virtio device's, raised by the guest's
    // port or register write (`kvm::IrqLine`).
    defs::KVM_IRQ_LINE,
    // virtio-net's activation and reset (the driver's status write) set the TAP's offloads.
    defs::TUNSETOFFLOAD,
    // A snapshot reads every vCPU's state on the vCPU's own thread (`VcpuState::save`); the
    // registers, system registers and events by ioctl only where KVM does not sync them
    // through `kvm_run`. The registers also give the guest's rip when KVM fails to emulate
    // an instruction.
    defs::KVM_GET_REGS,
    defs::KVM_GET_SREGS,
    defs::KVM_GET_XSAVE,
    // Instead of KVM_GET_XSAVE where the XSAVE area exceeds 4 KiB (`KVM_CAP_XSAVE2`, e.g. AMX).
    defs::KVM_GET_XSAVE2,
    defs::KVM_GET_XCRS,
    defs::KVM_GET_DEBUGREGS,
    defs::KVM_GET_LAPIC,
    defs::KVM_GET_MSRS,
    defs::KVM_GET_MP_STATE,
    defs::KVM_GET_VCPU_EVENTS,
];

/// The `ioctl` requests the event loop issues.
const VMM_IOCTLS: &[Request] = &[
    // On the VM fd: device interrupts (used buffers, a block slot's configuration change).
    defs::KVM_IRQ_LINE,
    // A block slot's first disk registers the slot's notify EventFd (`Devices::attach_disk`).
    defs::KVM_IOEVENTFD,
    // A snapshot reads the PIC pair and IOAPIC, the PIT and the clock (`VmState::save`).
    defs::KVM_GET_IRQCHIP,
    defs::KVM_GET_PIT2,
    defs::KVM_GET_CLOCK,
    // std's `set_nonblocking` (an ioctl on Linux) on the vsock muxer's unix sockets.
    defs::FIONBIO,
];

fn condition(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// The rules of one role: each listed call unconditionally, `mmap`/`mprotect` only without
/// `PROT_EXEC`, `ioctl` only with the role's requests (compared as 32 bits, as the kernel
/// takes them), `socket` and `socketpair` only for `AF_UNIX` (event loop).
fn rules(role: ThreadRole) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|&n| (n, vec![])).collect();
    let prot_exec = u64::from(libc::PROT_EXEC.unsigned_abs());
    let no_exec = || SeccompRule::new(vec![condition(2, SeccompCmpOp::MaskedEq(prot_exec), 0)?]);
    rules.insert(libc::SYS_mmap, vec![no_exec()?]);
    rules.insert(libc::SYS_mprotect, vec![no_exec()?]);
    let requests = match role {
        ThreadRole::Vcpu => VCPU_IOCTLS,
        ThreadRole::Vmm => VMM_IOCTLS,
    };
    let ioctl = requests
        .iter()
        .map(|request| SeccompRule::new(vec![condition(1, SeccompCmpOp::Eq, request())?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctl);
    if role == ThreadRole::Vmm {
        rules.extend(VMM_ONLY.iter().map(|&n| (n, vec![])));
        // Path calls resolve from the thread's root or working directory, never from a
        // descriptor: the descriptor table holds every VM's, and a directory among them would
        // lead out of the jail.
        let at_fdcwd = u64::from(libc::AT_FDCWD.cast_unsigned());
        rules.insert(
            libc::SYS_unlinkat,
            vec![SeccompRule::new(vec![condition(
                0,
                SeccompCmpOp::Eq,
                at_fdcwd,
            )?])?],
        );
        // [`jail`]: a file-system context of its own, then the lock filter on top (its
        // `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)`; another filter
        // can only take away).
        let only = |arg0: u64| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
            Ok(vec![SeccompRule::new(vec![condition(
                0,
                SeccompCmpOp::Eq,
                arg0,
            )?])?])
        };
        rules.insert(
            libc::SYS_unshare,
            only(u64::from(libc::CLONE_FS.cast_unsigned()))?,
        );
        rules.insert(
            libc::SYS_prctl,
            only(u64::from(libc::PR_SET_NO_NEW_PRIVS.cast_unsigned()))?,
        );
        rules.insert(
            libc::SYS_seccomp,
            only(u64::from(libc::SECCOMP_SET_MODE_FILTER))?,
        );
        let af_unix = u64::from(libc::AF_UNIX.unsigned_abs());
        for call in [libc::SYS_socket, libc::SYS_socketpair] {
            let unix_only = SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, af_unix)?])?;
            rules.insert(call, vec![unix_only]);
        }
    }
    Ok(rules)
}

/// Compiles the filter of `role` under `policy` (`None` for [`SeccompPolicy::Off`]).
fn build(role: ThreadRole, policy: SeccompPolicy) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match policy {
        SeccompPolicy::Off => return Ok(None),
        SeccompPolicy::Enforce => SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        SeccompPolicy::Log => SeccompAction::Log,
    };
    let build = || -> Result<BpfProgram, seccompiler::Error> {
        let filter = SeccompFilter::new(
            rules(role)?,
            mismatch,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?;
        Ok(filter.try_into()?)
    };
    build()
        .map(Some)
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// What no thread of the daemon, nor a program it runs (`mount`, `umount`, `mkfs.erofs`),
/// needs, and what code running as root could use to reach past the daemon: other processes'
/// memory (`ptrace`, `process_vm_*`), the kernel itself (modules, `kexec`, `bpf`,
/// `perf_event_open`, `userfaultfd`, port I/O, the keyrings, the kernel log), files by handle
/// past any mount or chroot (`open_by_handle_at`, the classic container escape), the root
/// file system (`pivot_root`), the clocks, swap, quotas, accounting and reboot.
const PROCESS_DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    libc::SYS_syslog,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_pivot_root,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_quotactl,
    libc::SYS_acct,
    libc::SYS_reboot,
    libc::SYS_lookup_dcookie,
    libc::SYS_uselib,
    libc::SYS_vhangup,
    libc::SYS_fanotify_init,
];

/// The environment variable through which a daemon handing over to a new process (a live
/// upgrade) names the baseline it runs under ([`process_baseline`]): the new process, which
/// inherits that filter, adds its own only if it differs ([`confine_process`]).
pub const BASELINE_ENV: &str = "SANDBOXER_SECCOMP_BASELINE";

/// The fingerprint of the baseline this process runs under, once [`confine_process`] ran.
static BASELINE: OnceLock<Option<String>> = OnceLock::new();

/// How [`confine_process`] confined the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confined {
    /// The baseline was installed.
    Installed,
    /// The process runs under the same baseline already (inherited from the daemon that
    /// started it): none was added, so filters do not pile up upgrade after upgrade.
    Inherited,
    /// [`SeccompPolicy::Off`]: none.
    Off,
}

/// Confines the whole process, as the daemon's first act: every thread it has (all threads,
/// `SECCOMP_FILTER_FLAG_TSYNC`), every thread it will create (the runtime's workers, the API,
/// each VM's threads, which add their own lists on top) and every program it runs (filters are
/// inherited across `fork` and `execve`) fail the calls of `PROCESS_DENIED` with `EPERM`
/// ([`SeccompPolicy::Enforce`]), or make them and have the kernel log each one
/// ([`SeccompPolicy::Log`]). The daemon's own threads do everything else a root daemon does
/// (files, netlink, namespaces, mounts by its helper programs), so theirs is a list of what is
/// denied, not of what is allowed.
///
/// `inherited` is the fingerprint the process that started this one said it runs under
/// ([`BASELINE_ENV`]): when it is this very baseline and the process is under a filter, the
/// inherited filter is the baseline and none is added.
pub fn confine_process(
    policy: SeccompPolicy,
    inherited: Option<&str>,
) -> Result<Confined, SeccompError> {
    let Some(program) = deny_list(PROCESS_DENIED, policy)? else {
        let _ = BASELINE.set(None);
        return Ok(Confined::Off);
    };
    let print = fingerprint(&program);
    if inherited == Some(print.as_str()) && under_filter() {
        let _ = BASELINE.set(Some(print));
        return Ok(Confined::Inherited);
    }
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| SeccompError::Install(e.to_string()))?;
    let _ = BASELINE.set(Some(print));
    Ok(Confined::Installed)
}

/// The fingerprint of the baseline the process runs under ([`confine_process`]), for the
/// process a live upgrade starts ([`BASELINE_ENV`]).
pub fn process_baseline() -> Option<&'static str> {
    BASELINE.get().and_then(|b| b.as_deref())
}

/// Whether a seccomp filter confines this thread (`Seccomp: 2`).
fn under_filter() -> bool {
    std::fs::read_to_string("/proc/thread-self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.strip_prefix("Seccomp:").is_some_and(|v| v.trim() == "2"))
    })
}

/// FNV-1a of a program's instructions, and their count.
fn fingerprint(program: &BpfProgram) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for insn in program {
        let bytes = insn
            .code
            .to_le_bytes()
            .into_iter()
            .chain([insn.jt, insn.jf])
            .chain(insn.k.to_le_bytes());
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}-{}", program.len())
}

/// A filter that lets every call through but those of `denied`, which fail with `EPERM`
/// under [`SeccompPolicy::Enforce`] and are logged under [`SeccompPolicy::Log`] (`None` for
/// [`SeccompPolicy::Off`]).
fn deny_list(denied: &[i64], policy: SeccompPolicy) -> Result<Option<BpfProgram>, SeccompError> {
    let matched = match policy {
        SeccompPolicy::Off => return Ok(None),
        SeccompPolicy::Enforce => SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        SeccompPolicy::Log => SeccompAction::Log,
    };
    let rules = denied.iter().map(|&n| (n, vec![])).collect();
    SeccompFilter::new(rules, SeccompAction::Allow, matched, TargetArch::x86_64)
        .and_then(TryInto::try_into)
        .map(Some)
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// What the lock filter of a jailed VMM thread forbids: leaving or changing the jail.
const JAIL_LOCKED: &[i64] = &[
    libc::SYS_chroot,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    libc::SYS_unshare,
];

/// Confines the calling VMM thread's paths to `root` (its sandbox's directory, which holds the
/// hybrid vsock socket): a file-system context of its own (`unshare(CLONE_FS)`: root and
/// working directory are per thread from then on), `chroot(root)`, `chdir("/")`, then `lock`
/// on top of the thread's filter so none of it can be undone. Its `connect`s and `unlink`s
/// then reach only that directory, not another sandbox's sockets, the daemon's API socket or
/// containerd's. Needs `CAP_SYS_CHROOT`.
pub(crate) fn jail(root: &std::path::Path, lock: Option<&BpfProgram>) -> Result<(), SeccompError> {
    let fail = |what: &str, e: nix::Error| {
        SeccompError::Install(format!("{what} for the jail in {}: {e}", root.display()))
    };
    // Only CLONE_FS: the thread gets its own root and working directory; its descriptor
    // table stays shared, so every descriptor stays valid on every thread.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
        .map_err(|e| fail("unshare(CLONE_FS)", e))?;
    nix::unistd::chroot(root).map_err(|e| fail("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| fail("chdir", e))?;
    install(lock)
}

/// The compiled filters of one [`crate::Host`], each built on first use.
#[derive(Debug, Default)]
pub(crate) struct Filters {
    vcpu_enforce: Slot,
    vcpu_log: Slot,
    vmm_enforce: Slot,
    vmm_log: Slot,
    lock_enforce: Slot,
    lock_log: Slot,
}

type Slot = OnceLock<Result<Arc<BpfProgram>, String>>;

impl Filters {
    /// The filter of `role` under `policy` (`None` for [`SeccompPolicy::Off`]).
    pub(crate) fn get(
        &self,
        role: ThreadRole,
        policy: SeccompPolicy,
    ) -> Result<Option<Arc<BpfProgram>>, SeccompError> {
        let slot = match (role, policy) {
            (_, SeccompPolicy::Off) => return Ok(None),
            (ThreadRole::Vcpu, SeccompPolicy::Enforce) => &self.vcpu_enforce,
            (ThreadRole::Vcpu, SeccompPolicy::Log) => &self.vcpu_log,
            (ThreadRole::Vmm, SeccompPolicy::Enforce) => &self.vmm_enforce,
            (ThreadRole::Vmm, SeccompPolicy::Log) => &self.vmm_log,
        };
        cached(slot, || build(role, policy))
    }

    /// The lock filter of a jailed VMM thread ([`jail`]) under `policy`.
    pub(crate) fn lock(
        &self,
        policy: SeccompPolicy,
    ) -> Result<Option<Arc<BpfProgram>>, SeccompError> {
        let slot = match policy {
            SeccompPolicy::Off => return Ok(None),
            SeccompPolicy::Enforce => &self.lock_enforce,
            SeccompPolicy::Log => &self.lock_log,
        };
        cached(slot, || deny_list(JAIL_LOCKED, policy))
    }
}

/// The program in `slot`, built by `build` on first use.
fn cached(
    slot: &Slot,
    build: impl FnOnce() -> Result<Option<BpfProgram>, SeccompError>,
) -> Result<Option<Arc<BpfProgram>>, SeccompError> {
    slot.get_or_init(|| match build() {
        Ok(Some(program)) => Ok(Arc::new(program)),
        Ok(None) => Err("no program for an enforcing policy".into()),
        Err(e) => Err(e.to_string()),
    })
    .as_ref()
    .map(|p| Some(Arc::clone(p)))
    .map_err(|e| SeccompError::Build(e.clone()))
}

/// Installs `filter` on the calling thread (and on the threads it will create, of which there
/// are none). `None` installs nothing.
pub(crate) fn install(filter: Option<&BpfProgram>) -> Result<(), SeccompError> {
    match filter {
        Some(program) => {
            seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(e.to_string()))
        }
        None => Ok(()),
    }
}

/// What a caught panic said (its `&str` or `String` payload), for the VM's end reason.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// The job of a VMM thread started ahead of its VM: the rest of its life (the VM's event loop),
/// told whether the thread's filter went in. Boxed, so a thread can be started before its VM
/// exists (in a pooled shell, `crate::pool`).
pub(crate) type VmmRun = Box<dyn FnOnce(Result<(), SeccompError>) + Send>;

/// A thread started ahead of its work: it installs its filter at once (the kernel compiles the
/// program: about 180 us for the vCPU list on the development host), then waits for its one
/// job. A VM starts its threads first, so the compiles overlap the VM's build. Dropped without
/// a job, the thread ends and is joined.
#[derive(Debug)]
pub(crate) struct PendingThread<J: Send + 'static> {
    job: Option<Sender<J>>,
    thread: Option<JoinHandle<()>>,
    /// The thread's host thread id and stack, once it runs.
    seen: Arc<ThreadSeen>,
    /// Says when the thread is past its filter's install (`None` once heard).
    installed: Option<std::sync::mpsc::Receiver<()>>,
}

impl<J: Send + 'static> PendingThread<J> {
    /// Spawns thread `name`, confined by `filter`; `run` gets the job and whether the filter
    /// went in.
    pub(crate) fn spawn(
        name: String,
        filter: Option<Arc<BpfProgram>>,
        run: impl FnOnce(J, Result<(), SeccompError>) + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_then(name, filter, || Ok(()), run)
    }

    /// [`PendingThread::spawn`], the thread running `then` right after its filter's install
    /// (only if it went in), before it waits for its job; `run` is told whether both went
    /// well. A VMM thread is jailed ahead so ([`jail`]).
    pub(crate) fn spawn_then(
        name: String,
        filter: Option<Arc<BpfProgram>>,
        then: impl FnOnce() -> Result<(), SeccompError> + Send + 'static,
        run: impl FnOnce(J, Result<(), SeccompError>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel::<J>();
        let (installed_tx, installed) = std::sync::mpsc::sync_channel::<()>(1);
        let seen = Arc::new(ThreadSeen::default());
        let own = Arc::clone(&seen);
        let thread = std::thread::Builder::new()
            .name(name)
            .stack_size(256 * 1024)
            .spawn(move || {
                own.record();
                let confined = install(filter.as_deref()).and_then(|()| then());
                let _ = installed_tx.send(());
                if let Ok(job) = rx.recv() {
                    run(job, confined);
                }
            })?;
        Ok(PendingThread {
            job: Some(tx),
            thread: Some(thread),
            seen,
            installed: Some(installed),
        })
    }

    /// Waits up to `within` until the thread is past its filter's install (it installs it
    /// before it takes a job, so it never does a job unconfined: this only says the install
    /// is done, e.g. before a shell counts as ready). False if it took longer.
    pub(crate) fn wait_installed(&mut self, within: std::time::Duration) -> bool {
        match self.installed.take() {
            None => true,
            Some(rx) => match rx.recv_timeout(within) {
                // Heard, or the thread ended (it installs first, so it got past it).
                Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.installed = Some(rx);
                    false
                }
            },
        }
    }

    /// Where the thread's host thread id and stack appear once it runs.
    pub(crate) fn seen(&self) -> Arc<ThreadSeen> {
        Arc::clone(&self.seen)
    }

    /// Hands the thread its job; gives the job back if the thread is gone.
    pub(crate) fn start(mut self, job: J) -> Result<JoinHandle<()>, J> {
        let tx = self.job.take().expect("the channel is kept until start");
        // On failure the thread has ended; dropping `self` joins it.
        tx.send(job).map_err(|e| e.0)?;
        Ok(self.thread.take().expect("the handle is kept until start"))
    }
}

impl<J: Send + 'static> Drop for PendingThread<J> {
    fn drop(&mut self) {
        // Closing the channel ends a thread that never got its job.
        self.job = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
