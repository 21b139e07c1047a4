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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
        kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_irq_level, kvm_irqchip,
        kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
        kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // include/uapi/linux/kvm.h
    const KVMIO: c_uint = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
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
    // A snapshot reads every vCPU's state on the vCPU's own thread (`VcpuState::save`). The
    // registers also give the guest's rip when KVM fails to emulate an instruction.
    defs::KVM_GET_REGS,
    defs::KVM_GET_SREGS,
    defs::KVM_GET_FPU,
    defs::KVM_GET_XSAVE,
    // Instead of KVM_GET_XSAVE where the XSAVE area exceeds 4 KiB (`KVM_CAP_XSAVE2`, e.g. AMX).
    defs::KVM_GET_XSAVE2,
    defs::KVM_GET_XCRS,
    defs::KVM_GET_DEBUGREGS,
    defs::KVM_GET_LAPIC,
    defs::KVM_GET_MSRS,
    defs::KVM_GET_MP_STATE,
    defs::KVM_GET_VCPU_EVENTS,
    defs::KVM_GET_TSC_KHZ,
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
    /// The thread's host thread id, once it runs (0 before).
    tid: Arc<AtomicU32>,
}

impl<J: Send + 'static> PendingThread<J> {
    /// Spawns thread `name`, confined by `filter`; `run` gets the job and whether the filter
    /// went in.
    pub(crate) fn spawn(
        name: String,
        filter: Option<Arc<BpfProgram>>,
        run: impl FnOnce(J, Result<(), SeccompError>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel::<J>();
        let tid = Arc::new(AtomicU32::new(0));
        let own_tid = Arc::clone(&tid);
        let thread = std::thread::Builder::new()
            .name(name)
            .stack_size(256 * 1024)
            .spawn(move || {
                let id = rustix::thread::gettid().as_raw_nonzero().get();
                own_tid.store(id.unsigned_abs(), Ordering::Relaxed);
                let confined = install(filter.as_deref());
                if let Ok(job) = rx.recv() {
                    run(job, confined);
                }
            })?;
        Ok(PendingThread {
            job: Some(tx),
            thread: Some(thread),
            tid,
        })
    }

    /// Where the thread's host thread id appears once it runs (0 until then).
    pub(crate) fn tid(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.tid)
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
mod tests {
    use std::io::{Read, Seek, Write};
    use std::os::fd::{AsFd, AsRawFd};

    use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuFd, VmFd};
    use vm_memory::mmap::MmapRegion;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::arch::layout::{SERIAL_IRQ, VIRTIO_MMIO_START};
    use crate::kvm::KvmCell;
    use crate::kvm::state::{StateError, VcpuState, VmState, settle, xsave_words};
    use crate::memory::GuestRam;
    use crate::pool::VmShell;

    fn filter(
        role: ThreadRole,
        policy: SeccompPolicy,
    ) -> Result<Option<Arc<BpfProgram>>, SeccompError> {
        static FILTERS: OnceLock<Filters> = OnceLock::new();
        FILTERS.get_or_init(Filters::default).get(role, policy)
    }

    fn filter_lock(policy: SeccompPolicy) -> Option<Arc<BpfProgram>> {
        static FILTERS: OnceLock<Filters> = OnceLock::new();
        FILTERS.get_or_init(Filters::default).lock(policy).unwrap()
    }

    /// Runs `f` on a fresh thread confined as `role` under `policy`.
    fn confined<T: Send + 'static>(
        role: ThreadRole,
        policy: SeccompPolicy,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            install(filter(role, policy).unwrap().as_deref()).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn errno<T>(r: std::io::Result<T>) -> Result<(), Option<i32>> {
        r.map(drop).map_err(|e| e.raw_os_error())
    }

    /// Set in the child process [`the_process_baseline_denies_its_list`] starts.
    const BASELINE_CHILD: &str = "SANDBOXER_SECCOMP_BASELINE_CHILD";

    /// `call(nr)` with all-zero arguments: its errno, or 0.
    fn raw_errno(nr: i64) -> i32 {
        #[allow(
            unsafe_code,
            reason = "a raw system call with null arguments, for its errno"
        )]
        // SAFETY: every argument is 0 (null pointers, fd 0, flags 0): the calls tried either
        // fail on them or only query; none writes memory through them.
        let r = unsafe { libc::syscall(nr, 0, 0, 0, 0, 0, 0) };
        if r == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    /// The baseline goes on every thread of the process (TSYNC), so it runs in a child
    /// process: this test binary again, running only this test with [`BASELINE_CHILD`] set.
    #[test]
    fn the_process_baseline_denies_its_list() {
        // Calls that fail on null arguments with an errno other than EPERM for root without
        // the filter, and so tell the filter's EPERM apart.
        let probes = [
            libc::SYS_init_module,       // EFAULT
            libc::SYS_bpf,               // EINVAL / EFAULT
            libc::SYS_open_by_handle_at, // EBADF / EFAULT
            libc::SYS_process_vm_readv,  // ESRCH (pid 0)
            libc::SYS_perf_event_open,   // EFAULT
        ];
        if std::env::var_os(BASELINE_CHILD).is_some() {
            let before: Vec<i32> = probes.iter().map(|&n| raw_errno(n)).collect();
            assert!(!before.contains(&libc::EPERM), "{before:?}");
            // A thread that exists before the filter gets it too (TSYNC).
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let older = std::thread::spawn(move || {
                wait.recv().unwrap();
                raw_errno(libc::SYS_init_module)
            });
            assert_eq!(
                confine_process(SeccompPolicy::Enforce, None).unwrap(),
                Confined::Installed
            );
            go.send(()).unwrap();
            assert_eq!(older.join().unwrap(), libc::EPERM);
            // This thread, and one created after.
            for &nr in &probes {
                assert_eq!(raw_errno(nr), libc::EPERM, "call {nr}");
            }
            let later = std::thread::spawn(move || probes.map(raw_errno))
                .join()
                .unwrap();
            assert_eq!(later, [libc::EPERM; 5]);
            // A process started under this very baseline adds none (an upgrade's new process).
            let print = process_baseline().unwrap().to_owned();
            let filters = || {
                std::fs::read_to_string("/proc/self/status")
                    .unwrap()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("Seccomp_filters:")
                            .map(|v| v.trim().to_owned())
                    })
            };
            let before = filters();
            let again = deny_list(PROCESS_DENIED, SeccompPolicy::Enforce)
                .unwrap()
                .unwrap();
            assert_eq!(fingerprint(&again), print);
            let mut other = again.clone();
            other.pop();
            assert_ne!(fingerprint(&other), print);
            assert_eq!(
                confine_process(SeccompPolicy::Enforce, Some(&print)).unwrap(),
                Confined::Inherited
            );
            assert_eq!(filters(), before, "a filter added under the same baseline");
            assert_eq!(
                confine_process(SeccompPolicy::Enforce, Some("0-0")).unwrap(),
                Confined::Installed
            );
            assert_ne!(
                filters(),
                before,
                "another baseline's fingerprint adds ours"
            );
            // What a daemon thread does is untouched: files, sockets of any family, processes.
            assert!(
                std::fs::read_to_string("/proc/self/status")
                    .unwrap()
                    .contains("Seccomp:\t2")
            );
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            assert!(
                std::process::Command::new("true")
                    .status()
                    .unwrap()
                    .success()
            );
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::the_process_baseline_denies_its_list",
            ])
            .args(["--nocapture", "--test-threads", "1"])
            .env(BASELINE_CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran no test: {text}");
    }

    #[test]
    fn policies_parse_and_print() {
        for p in [
            SeccompPolicy::Enforce,
            SeccompPolicy::Log,
            SeccompPolicy::Off,
        ] {
            assert_eq!(p.name().parse::<SeccompPolicy>().unwrap(), p);
        }
        let err = "strict".parse::<SeccompPolicy>().unwrap_err();
        assert!(err.contains("strict") && err.contains("enforce"), "{err}");
        assert_eq!(SeccompPolicy::default(), SeccompPolicy::Enforce);
    }

    #[test]
    fn every_filter_builds_and_off_has_none() {
        for role in [ThreadRole::Vcpu, ThreadRole::Vmm] {
            assert!(filter(role, SeccompPolicy::Enforce).unwrap().is_some());
            assert!(filter(role, SeccompPolicy::Log).unwrap().is_some());
            assert!(filter(role, SeccompPolicy::Off).unwrap().is_none());
        }
    }

    #[test]
    fn vcpu_threads_keep_their_work_and_lose_the_rest() {
        let mut file = tempfile::tempfile().unwrap();
        let (io, opened, socket, spawned) =
            confined(ThreadRole::Vcpu, SeccompPolicy::Enforce, move || {
                // Descriptors it was given, eventfds, memory and time keep working.
                let mut back = String::new();
                file.write_all(b"guest bytes").unwrap();
                file.rewind().unwrap();
                file.read_to_string(&mut back).unwrap();
                let evt = EventFd::new(0).unwrap();
                evt.write(1).unwrap();
                assert_eq!(evt.read().unwrap(), 1);
                assert_eq!(
                    vec![7u8; 4 << 20]
                        .iter()
                        .map(|&b| usize::from(b))
                        .sum::<usize>(),
                    7 << 22
                );
                assert!(std::time::Instant::now().elapsed().as_secs() < 60);
                drop(file);
                (
                    back,
                    errno(std::fs::File::open("/proc/self/status")),
                    errno(std::os::unix::net::UnixDatagram::unbound()),
                    errno(std::thread::Builder::new().spawn(|| ())),
                )
            });
        assert_eq!(io, "guest bytes");
        assert_eq!(opened, Err(Some(libc::EPERM)));
        assert_eq!(socket, Err(Some(libc::EPERM)));
        assert_eq!(spawned, Err(Some(libc::EPERM)));
    }

    #[test]
    fn the_vmm_thread_gets_unix_sockets_only() {
        let (unix, inet) = confined(ThreadRole::Vmm, SeccompPolicy::Enforce, || {
            (
                errno(std::os::unix::net::UnixDatagram::unbound())
                    .and(errno(std::os::unix::net::UnixStream::pair())),
                errno(std::net::UdpSocket::bind("127.0.0.1:0")),
            )
        });
        assert_eq!(unix, Ok(()));
        assert_eq!(inet, Err(Some(libc::EPERM)));
    }

    #[test]
    fn a_jailed_vmm_thread_reaches_only_its_directory() {
        let base = std::env::temp_dir().join(format!("sandboxer-jail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let sandbox = base.join("sandbox");
        std::fs::create_dir_all(&sandbox).unwrap();
        let _own = std::os::unix::net::UnixListener::bind(sandbox.join("v.sock_52")).unwrap();
        let outside = base.join("api.sock");
        let _api = std::os::unix::net::UnixListener::bind(&outside).unwrap();
        let victim = base.join("victim");
        std::fs::write(&victim, b"x").unwrap();
        // A directory descriptor in the shared table, as another VM's or the daemon's could be.
        let dir = std::fs::File::open(&base).unwrap();
        let lock = filter_lock(SeccompPolicy::Enforce);
        let (root, api) = (sandbox.clone(), outside.clone());
        let seen = confined(ThreadRole::Vmm, SeccompPolicy::Enforce, move || {
            jail(&root, lock.as_deref()).unwrap();
            let errno = |r: nix::Result<()>| r.map_err(|e| Some(e as i32));
            [
                super::tests::errno(std::os::unix::net::UnixStream::connect("/v.sock_52")),
                // Resolved inside the jail, where it does not exist.
                super::tests::errno(std::os::unix::net::UnixStream::connect(&api)),
                super::tests::errno(std::fs::remove_file("/gone")),
                errno(nix::unistd::unlinkat(
                    Some(dir.as_raw_fd()),
                    "victim",
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )),
                errno(nix::unistd::chroot("/")),
                errno(nix::unistd::chdir("/")),
                errno(nix::unistd::fchdir(dir.as_raw_fd())),
            ]
        });
        assert_eq!(
            seen,
            [
                Ok(()),
                Err(Some(libc::ENOENT)),
                Err(Some(libc::ENOENT)),
                Err(Some(libc::EPERM)),
                Err(Some(libc::EPERM)),
                Err(Some(libc::EPERM)),
                Err(Some(libc::EPERM)),
            ]
        );
        // The jail was the thread's own: this one still sees the host's paths.
        assert!(victim.exists() && outside.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// What musl's libc makes where glibc makes another call: `lstat`/`stat` for the stat
    /// family. Kicks go out with `tgkill` (`kick_thread`), never `pthread_kill`, which is
    /// `tkill` under musl: no list allows it (it reaches any thread of the host by id).
    #[test]
    fn the_calls_musl_makes_are_listed() {
        for role in [ThreadRole::Vcpu, ThreadRole::Vmm] {
            let seen = confined(role, SeccompPolicy::Enforce, || {
                [
                    libc::SYS_stat,
                    libc::SYS_lstat,
                    libc::SYS_tgkill,
                    libc::SYS_tkill,
                ]
                .map(raw_errno)
            });
            // Null paths give EFAULT and thread id 0 EINVAL when the filter lets a call
            // through; EPERM is the filter's.
            assert_eq!(
                seen,
                [libc::EFAULT, libc::EFAULT, libc::EINVAL, libc::EPERM],
                "{role:?}"
            );
        }
    }

    #[test]
    fn executable_mappings_are_refused() {
        let (data, exec) = confined(ThreadRole::Vmm, SeccompPolicy::Enforce, || {
            let map = |prot| {
                MmapRegion::<()>::build(None, 4096, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            (
                map(libc::PROT_READ | libc::PROT_WRITE),
                map(libc::PROT_READ | libc::PROT_EXEC),
            )
        });
        assert_eq!(data, Ok(()));
        let err = exec.unwrap_err();
        assert!(err.contains("Operation not permitted"), "{err}");
    }

    #[test]
    fn log_lets_unlisted_calls_through() {
        let opened = confined(ThreadRole::Vcpu, SeccompPolicy::Log, || {
            errno(std::fs::File::open("/proc/self/status"))
        });
        assert_eq!(opened, Ok(()));
    }

    #[test]
    fn request_numbers_match_libc() {
        assert_eq!(defs::FIONBIO(), libc::FIONBIO);
        assert_eq!(defs::TUNSETOFFLOAD(), libc::TUNSETOFFLOAD);
    }

    /// `FIONBIO` and `FIONREAD` on a unix socket, `FIONREAD` on a regular file, under `role`
    /// and `policy`.
    fn generic_ioctls(role: ThreadRole, policy: SeccompPolicy) -> [Result<(), Option<i32>>; 3] {
        let (socket, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        confined(role, policy, move || {
            let fionread = |fd: std::os::fd::BorrowedFd<'_>| {
                errno(rustix::io::ioctl_fionread(fd).map_err(std::io::Error::from))
            };
            let result = [
                errno(socket.set_nonblocking(true)),
                fionread(socket.as_fd()),
                fionread(file.as_fd()),
            ];
            drop((socket, peer, file));
            result
        })
    }

    #[test]
    fn ioctls_outside_the_role_list_are_refused_or_logged() {
        let eperm = Err(Some(libc::EPERM));
        // The event loop sets its vsock sockets non-blocking; a vCPU thread never does.
        assert_eq!(
            generic_ioctls(ThreadRole::Vmm, SeccompPolicy::Enforce),
            [Ok(()), eperm, eperm]
        );
        assert_eq!(
            generic_ioctls(ThreadRole::Vcpu, SeccompPolicy::Enforce),
            [eperm, eperm, eperm]
        );
        for role in [ThreadRole::Vcpu, ThreadRole::Vmm] {
            assert_eq!(
                generic_ioctls(role, SeccompPolicy::Log),
                [Ok(()), Ok(()), Ok(())]
            );
        }
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun (like the TAP's own test): skips loudly without
    /// them, and fails instead under CI (`CI=true`) or with `SANDBOXER_REQUIRE_TAP=1`.
    #[test]
    fn tap_offloads_are_set_by_vcpu_threads_only() {
        use devices::virtio::net::{NetBackend, Tap};

        let tap = match Tap::open("sbxsec%d") {
            Ok(tap) => tap,
            Err(e) => {
                let required = std::env::var("CI").is_ok_and(|v| v == "true")
                    || std::env::var("SANDBOXER_REQUIRE_TAP").is_ok_and(|v| v == "1");
                assert!(
                    !required,
                    "cannot create a tap: {e} (required: CI=true or SANDBOXER_REQUIRE_TAP=1)"
                );
                eprintln!("SKIP tap_offloads_are_set_by_vcpu_threads_only: no tap: {e}");
                return;
            }
        };
        let (tap, vcpu) = confined(ThreadRole::Vcpu, SeccompPolicy::Enforce, move || {
            let mut tap = tap;
            let result = [
                errno(tap.set_offload(libc::TUN_F_CSUM)),
                errno(tap.set_offload(0)),
                // Only the thread that opens the TAP asks for its header size.
                errno(tap.vnet_hdr_size()),
            ];
            (tap, result)
        });
        assert_eq!(vcpu, [Ok(()), Ok(()), Err(Some(libc::EPERM))]);
        let vmm = confined(ThreadRole::Vmm, SeccompPolicy::Enforce, move || {
            let mut tap = tap;
            errno(tap.set_offload(0))
        });
        assert_eq!(vmm, Err(Some(libc::EPERM)));
    }

    fn kvm_errno<T>(r: Result<T, kvm_ioctls::Error>) -> Result<(), i32> {
        r.map(drop).map_err(|e| e.errno())
    }

    fn state_errno<T>(r: Result<T, StateError>) -> Result<(), i32> {
        r.map(drop).map_err(|e| e.source.errno())
    }

    /// A VM as the building thread hands it to its threads (memory, irqchip, PIT, one vCPU with
    /// its CPUID), and the MSR list and XSAVE size a snapshot of it reads with.
    struct TestVm {
        vcpu: VcpuFd,
        vm: Arc<VmFd>,
        msr_list: Arc<[u32]>,
        xsave_words: usize,
        /// The guest memory, to drop once the VM fd is gone.
        ram: GuestRam,
    }

    impl TestVm {
        fn new() -> Self {
            let kvm = KvmCell::default().get().unwrap();
            let (VmShell { vm_fd, ram, .. }, _) = VmShell::build(&kvm, 32 << 20).unwrap();
            let vcpu = vm_fd.create_vcpu(0).unwrap();
            crate::arch::set_cpuid(&vcpu, kvm.supported_cpuid(), 0, 1).unwrap();
            TestVm {
                vcpu,
                xsave_words: xsave_words(&vm_fd),
                vm: Arc::new(vm_fd),
                msr_list: kvm.msr_list().into(),
                ram,
            }
        }

        /// Runs `f` with the vCPU and VM fds on a thread confined as `role` under `policy`;
        /// the fds are closed before the memory is unmapped.
        fn confined<T: Send + 'static>(
            self,
            role: ThreadRole,
            policy: SeccompPolicy,
            f: impl FnOnce(VcpuFd, Arc<VmFd>, Arc<[u32]>, usize) -> T + Send + 'static,
        ) -> T {
            let TestVm {
                vcpu,
                vm,
                msr_list,
                xsave_words,
                ram,
            } = self;
            let result = confined(role, policy, move || f(vcpu, vm, msr_list, xsave_words));
            drop(ram);
            result
        }
    }

    /// How each of a few KVM calls went: `Ok` or its errno.
    type Outcomes<const N: usize> = [Result<(), i32>; N];

    /// What a vCPU thread does with KVM (enter the guest, save its state, pulse an interrupt
    /// line), the other XSAVE read (whichever the host does not use), and what it never does
    /// (read the irqchips, create a vCPU, write registers).
    fn vcpu_kvm_ioctls(policy: SeccompPolicy) -> (Outcomes<3>, Result<(), i32>, Outcomes<3>) {
        TestVm::new().confined(
            ThreadRole::Vcpu,
            policy,
            |mut vcpu, vm, msr_list, xsave_words| {
                let fixed_words = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;
                let other_words = if xsave_words > fixed_words {
                    fixed_words
                } else {
                    fixed_words + 1
                };
                let needed = [
                    state_errno(settle(&mut vcpu)),
                    state_errno(VcpuState::save(&vcpu, &msr_list, xsave_words)),
                    kvm_errno(vm.set_irq_line(SERIAL_IRQ, true))
                        .and(kvm_errno(vm.set_irq_line(SERIAL_IRQ, false))),
                ];
                let other_xsave = state_errno(VcpuState::save(&vcpu, &msr_list, other_words));
                let never = [
                    state_errno(VmState::save(&vm)),
                    kvm_errno(vm.create_vcpu(1)),
                    kvm_errno(vcpu.set_regs(&kvm_bindings::kvm_regs::default())),
                ];
                (needed, other_xsave, never)
            },
        )
    }

    /// What the VMM thread does with KVM (save the VM's state, pulse an interrupt line,
    /// register an ioeventfd) and what it never does (enter the guest, read a vCPU's state).
    fn vmm_kvm_ioctls(policy: SeccompPolicy) -> (Outcomes<3>, Outcomes<3>) {
        TestVm::new().confined(
            ThreadRole::Vmm,
            policy,
            |mut vcpu, vm, msr_list, xsave_words| {
                let evt = EventFd::new(0).unwrap();
                let needed = [
                    state_errno(VmState::save(&vm)),
                    kvm_errno(vm.set_irq_line(SERIAL_IRQ, true))
                        .and(kvm_errno(vm.set_irq_line(SERIAL_IRQ, false))),
                    kvm_errno(vm.register_ioevent(
                        &evt,
                        &IoEventAddress::Mmio(VIRTIO_MMIO_START),
                        NoDatamatch,
                    )),
                ];
                let never = [
                    state_errno(settle(&mut vcpu)),
                    state_errno(VcpuState::save(&vcpu, &msr_list, xsave_words)),
                    kvm_errno(vcpu.get_regs()),
                ];
                (needed, never)
            },
        )
    }

    #[test]
    fn vcpu_threads_issue_their_kvm_ioctls_only() {
        test_guests::require_kvm!();
        let eperm = Err(libc::EPERM);
        let (needed, other_xsave, never) = vcpu_kvm_ioctls(SeccompPolicy::Enforce);
        assert_eq!(needed, [Ok(()); 3]);
        assert_ne!(other_xsave, eperm);
        assert_eq!(never, [eperm; 3]);
        let (needed, other_xsave, never) = vcpu_kvm_ioctls(SeccompPolicy::Log);
        assert_eq!(needed, [Ok(()); 3]);
        assert_ne!(other_xsave, eperm);
        assert_eq!(never, [Ok(()); 3]);
    }

    #[test]
    fn the_vmm_thread_issues_its_kvm_ioctls_only() {
        test_guests::require_kvm!();
        let eperm = Err(libc::EPERM);
        assert_eq!(
            vmm_kvm_ioctls(SeccompPolicy::Enforce),
            ([Ok(()); 3], [eperm; 3])
        );
        assert_eq!(
            vmm_kvm_ioctls(SeccompPolicy::Log),
            ([Ok(()); 3], [Ok(()); 3])
        );
    }
}
