// SPDX-License-Identifier: Apache-2.0
//! Tests of the seccomp filters.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuFd, VmFd};
use vm_memory::mmap::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::arch::layout::{SERIAL_IRQ, VIRTIO_MMIO_START};
use crate::kvm::KvmCell;
use crate::kvm::state::{Reading, Registers, StateError, VcpuState, VmState, settle, xsave_words};
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
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
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
/// its CPUID), and what a snapshot of it reads with (MSR list, XSAVE size, ...).
struct TestVm {
    vcpu: VcpuFd,
    vm: Arc<VmFd>,
    reading: Reading,
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
            reading: Reading {
                msr_list: kvm.msr_list().into(),
                xsave_words: xsave_words(&vm_fd),
                tsc_khz: None,
                registers: Registers {
                    sync: kvm.sync_regs(),
                },
            },
            vm: Arc::new(vm_fd),
            ram,
        }
    }

    /// Runs `f` with the vCPU and VM fds on a thread confined as `role` under `policy`;
    /// the fds are closed before the memory is unmapped.
    fn confined<T: Send + 'static>(
        self,
        role: ThreadRole,
        policy: SeccompPolicy,
        f: impl FnOnce(VcpuFd, Arc<VmFd>, Reading) -> T + Send + 'static,
    ) -> T {
        let TestVm {
            vcpu,
            vm,
            reading,
            ram,
        } = self;
        let result = confined(role, policy, move || f(vcpu, vm, reading));
        drop(ram);
        result
    }
}

/// How each of a few KVM calls went: `Ok` or its errno.
type Outcomes<const N: usize> = [Result<(), i32>; N];

/// What a vCPU thread does with KVM (enter the guest, save its state, with registers synced
/// through `kvm_run` or read by ioctl, pulse an interrupt line), the other XSAVE read
/// (whichever the host does not use), and what it never does (read the irqchips, create a
/// vCPU, write registers).
fn vcpu_kvm_ioctls(policy: SeccompPolicy) -> (Outcomes<4>, Result<(), i32>, Outcomes<3>) {
    TestVm::new().confined(ThreadRole::Vcpu, policy, |mut vcpu, vm, reading| {
        let fixed_words = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;
        let other_words = if reading.xsave_words > fixed_words {
            fixed_words
        } else {
            fixed_words + 1
        };
        let by_ioctl = Reading {
            registers: Registers { sync: false },
            ..reading.clone()
        };
        let needed = [
            state_errno(settle(&mut vcpu)),
            state_errno(VcpuState::save(&mut vcpu, &reading)),
            state_errno(VcpuState::save(&mut vcpu, &by_ioctl)),
            kvm_errno(vm.set_irq_line(SERIAL_IRQ, true))
                .and(kvm_errno(vm.set_irq_line(SERIAL_IRQ, false))),
        ];
        let other = Reading {
            xsave_words: other_words,
            ..reading
        };
        let other_xsave = state_errno(VcpuState::save(&mut vcpu, &other));
        let never = [
            state_errno(VmState::save(&vm)),
            kvm_errno(vm.create_vcpu(1)),
            kvm_errno(vcpu.set_regs(&kvm_bindings::kvm_regs::default())),
        ];
        (needed, other_xsave, never)
    })
}

/// What the VMM thread does with KVM (save the VM's state, pulse an interrupt line,
/// register an ioeventfd) and what it never does (enter the guest, read a vCPU's state).
fn vmm_kvm_ioctls(policy: SeccompPolicy) -> (Outcomes<3>, Outcomes<3>) {
    TestVm::new().confined(ThreadRole::Vmm, policy, |mut vcpu, vm, reading| {
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
            state_errno(VcpuState::save(&mut vcpu, &reading)),
            kvm_errno(vcpu.get_regs()),
        ];
        (needed, never)
    })
}

#[test]
fn vcpu_threads_issue_their_kvm_ioctls_only() {
    test_guests::require_kvm!();
    let eperm = Err(libc::EPERM);
    let (needed, other_xsave, never) = vcpu_kvm_ioctls(SeccompPolicy::Enforce);
    assert_eq!(needed, [Ok(()); 4]);
    assert_ne!(other_xsave, eperm);
    assert_eq!(never, [eperm; 3]);
    let (needed, other_xsave, never) = vcpu_kvm_ioctls(SeccompPolicy::Log);
    assert_eq!(needed, [Ok(()); 4]);
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
