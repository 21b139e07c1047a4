// SPDX-License-Identifier: Apache-2.0
//! KVM tests: boot the project's test guests on the real `/dev/kvm` and check what they print,
//! how they end and when they signalled the boot timer.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use test_guests::{Guest, require_kvm};
use vmm::{ResetKind, Vm, VmConfig, VmExit};

/// One VMM host for every test of this file.
fn host() -> &'static vmm::Host {
    static HOST: std::sync::OnceLock<vmm::Host> = std::sync::OnceLock::new();
    HOST.get_or_init(vmm::Host::new)
}

const TIMEOUT: Duration = Duration::from_secs(20);

fn config(kernel: &Path, vcpus: u8, mem_mib: u32, cmdline: &str) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.vcpus = vcpus;
    c.mem_mib = mem_mib;
    c.cmdline = cmdline.into();
    c
}

/// Boots and waits for the end; fails with the console on timeout.
fn boot(c: VmConfig) -> (Vm, VmExit) {
    let vm = Vm::start(host(), c).expect("VM starts");
    let Some(end) = vm.wait_timeout(TIMEOUT) else {
        let console = vm.console();
        vm.stop();
        panic!("guest did not end within {TIMEOUT:?}; console:\n{console}");
    };
    (vm, end.exit)
}

fn assert_lines(console: &str, expected: &[&str]) {
    for line in expected {
        assert!(
            console.lines().any(|l| l == *line),
            "missing line {line:?} in console:\n{console}"
        );
    }
}

#[test]
fn pvh32_guest_prints_signals_boot_and_triple_faults() {
    require_kvm!();
    let started = Instant::now();
    let (vm, exit) = boot(config(Guest::Pvh32.elf(), 1, 32, "hello world"));
    let console = vm.console();
    assert_eq!(
        exit,
        VmExit::Reset(ResetKind::TripleFault),
        "console:\n{console}"
    );
    assert_lines(
        &console,
        &[
            "pvh32: hello",
            "cmdline: hello world",
            "memmap: 3 entries",
            "pvh32: bye",
        ],
    );
    let boot = vm.boot_time().expect("boot timer signalled");
    assert!(boot > Duration::ZERO && boot < started.elapsed());
    // The guest may signal while `start` still spawns the VMM thread (its vCPU runs from the
    // moment its thread does), but not before the vCPU threads were started.
    let t = vm.timings();
    assert!(
        t.total.saturating_sub(t.vcpu_start) <= boot,
        "the guest signalled before its vCPU started? {t:?}, boot {boot:?}"
    );
}

#[test]
fn long64_guest_boots_as_pvh_elf() {
    require_kvm!();
    let (vm, exit) = boot(config(Guest::Long64.elf(), 1, 64, "console=ttyS0 x=1"));
    let console = vm.console();
    assert_eq!(
        exit,
        VmExit::Reset(ResetKind::TripleFault),
        "console:\n{console}"
    );
    assert_lines(
        &console,
        &[
            "long64: hello (pvh)",
            "cmdline: console=ttyS0 x=1",
            "memtest: ok",
            "long64: bye",
        ],
    );
    assert!(vm.boot_time().is_some());
}

#[test]
fn long64_guest_boots_as_bzimage() {
    require_kvm!();
    let (vm, exit) = boot(config(test_guests::long64_bzimage(), 1, 64, "via bzimage"));
    let console = vm.console();
    assert_eq!(
        exit,
        VmExit::Reset(ResetKind::TripleFault),
        "console:\n{console}"
    );
    assert_lines(
        &console,
        &[
            "long64: hello (linux64)",
            "cmdline: via bzimage",
            "memtest: ok",
            "long64: bye",
        ],
    );
    assert!(vm.boot_time().is_some());
}

#[test]
fn memory_above_the_mmio_gap_is_in_the_memory_map() {
    require_kvm!();
    // 4 GiB: 3.25 GiB below the gap, 0.75 GiB above 4 GiB. Mapping is lazy, so this is cheap.
    let (vm, exit) = boot(config(Guest::Long64.elf(), 1, 4096, "big"));
    let console = vm.console();
    assert_eq!(
        exit,
        VmExit::Reset(ResetKind::TripleFault),
        "console:\n{console}"
    );
    let expected_kib = (4096u64 << 10) - (0x10_0000 - 0x9_fc00) / 1024;
    assert_lines(
        &console,
        &[
            &format!("memmap: 4 entries, {expected_kib} KiB"),
            "memtest: ok",
        ],
    );
    // Only what the guest and the VMM touched is resident, not 4 GiB.
    assert!(vm.guest_resident_bytes().unwrap() < 64 << 20);
}

#[test]
fn smp_guest_starts_every_vcpu() {
    require_kvm!();
    for vcpus in [1u8, 2, 4] {
        let (vm, exit) = boot(config(Guest::Smp.elf(), vcpus, 32, "smp"));
        let console = vm.console();
        assert_eq!(
            exit,
            VmExit::Reset(ResetKind::TripleFault),
            "console:\n{console}"
        );
        assert_lines(&console, &[&format!("smp: {vcpus} cpus up")]);
    }
}

#[test]
fn i8042_reset_ends_the_vm() {
    require_kvm!();
    let (vm, exit) = boot(config(Guest::Reset.elf(), 1, 32, "reset"));
    assert_eq!(
        exit,
        VmExit::Reset(ResetKind::I8042),
        "console:\n{}",
        vm.console()
    );
    assert_lines(&vm.console(), &["reset: hello"]);
}

#[test]
fn pause_resume_and_stop_a_spinning_guest() {
    require_kvm!();
    let vm = Vm::start(host(), config(Guest::Spin.elf(), 2, 32, "spin")).unwrap();
    vm.wait_boot(TIMEOUT).expect("spin guest signals boot");
    // It keeps printing while it runs.
    let deadline = Instant::now() + TIMEOUT;
    let printed = vm.console_bytes();
    while vm.console_bytes() == printed {
        assert!(Instant::now() < deadline, "spin guest prints nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Its threads, by host thread id: two vCPUs and the VMM thread, all of this process.
    let tids = vm.thread_ids();
    assert_eq!(tids.len(), 3, "{tids:?}");
    for (tid, name) in tids.iter().zip(["vcpu0", "vcpu1", "vmm"]) {
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), name, "thread {tid}");
    }

    vm.pause().unwrap();
    let paused_at = vm.console_bytes();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.console_bytes(), paused_at, "guest ran while paused");
    vm.pause().unwrap();

    vm.resume().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while vm.console_bytes() == paused_at {
        assert!(Instant::now() < deadline, "guest did not run after resume");
        std::thread::sleep(Duration::from_millis(5));
    }

    let t0 = Instant::now();
    let end = vm.stop();
    assert_eq!(end.exit, VmExit::Stopped);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t0.elapsed()
    );
    assert_eq!(vm.stop().exit, VmExit::Stopped, "stop is idempotent");
    assert!(matches!(vm.pause(), Err(vmm::VmmActionError::NotRunning)));
    assert!(vm.thread_ids().is_empty(), "an ended VM names no threads");
}

#[test]
fn stop_while_paused_does_not_hang() {
    require_kvm!();
    let vm = Vm::start(host(), config(Guest::Spin.elf(), 1, 32, "spin")).unwrap();
    vm.wait_boot(TIMEOUT).expect("boot");
    vm.pause().unwrap();
    assert_eq!(vm.stop().exit, VmExit::Stopped);
}

#[test]
fn a_console_log_past_its_limit_starts_again_under_the_seccomp_filter() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("console-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("console.log");
    let mut c = config(Guest::Spin.elf(), 1, 32, "spin");
    c.seccomp = vmm::SeccompPolicy::Enforce;
    c.console.log_path = Some(log.clone());
    c.console.log_max_bytes = Some(64);
    let vm = Vm::start(host(), c).unwrap();
    vm.wait_boot(TIMEOUT).expect("boot");
    // The spin guest prints a dot about every 7 ms: well past 64 bytes in a second.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while vm.console_bytes() < 200 {
        assert!(std::time::Instant::now() < deadline, "{}", vm.console());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(vm.stop().exit, VmExit::Stopped);
    // The vCPU thread truncated the file (ftruncate is on its list) and kept writing.
    let text = std::fs::read_to_string(&log).unwrap();
    let (_, after) = text
        .split_once("[sandboxer: console log limit of 64 bytes reached")
        .unwrap_or_else(|| panic!("no restart note in {text:?}"));
    assert!(after.ends_with('.'), "{text:?}");
    assert!(text.len() < 512, "{} bytes: {text:?}", text.len());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn many_vms_run_concurrently() {
    require_kvm!();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let (vm, exit) = boot(config(Guest::Pvh32.elf(), 1, 16, &format!("vm {i}")));
                assert_eq!(exit, VmExit::Reset(ResetKind::TripleFault));
                assert_lines(&vm.console(), &[&format!("cmdline: vm {i}")]);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn bad_configs_fail_with_precise_errors() {
    require_kvm!();
    let kernel = Guest::Pvh32.elf();
    let cases: Vec<(VmConfig, &str)> = vec![
        (
            config(Path::new("/nonexistent/vmlinux"), 1, 32, ""),
            "Cannot open kernel",
        ),
        (
            config(Path::new("/etc/hostname"), 1, 32, ""),
            "neither an ELF vmlinux nor a bzImage",
        ),
        (config(kernel, 0, 32, ""), "vcpus must be at least 1"),
        (config(kernel, 255, 32, ""), "at most"),
        (config(kernel, 1, 1, ""), "at least 8 MiB"),
        (config(kernel, 1, u32::MAX, ""), "more than the host"),
    ];
    for (c, expected) in cases {
        let err = Vm::start(host(), c).expect_err("config must be rejected");
        let chain = format!("{:#}", anyhow_chain(&err));
        assert!(
            chain.contains(expected),
            "{chain:?} does not mention {expected:?}"
        );
    }
}

fn anyhow_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(next) = cur {
        s.push_str(": ");
        s.push_str(&next.to_string());
        cur = next.source();
    }
    s
}
