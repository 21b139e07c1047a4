// SPDX-License-Identifier: Apache-2.0
//! KVM test: a running VM's vCPU and VMM threads are confined by their seccomp filters, and
//! `SeccompPolicy::Off` leaves them unconfined. One test in its own binary, so no other VM's
//! threads run in the process while it looks at `/proc/self/task`.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

use std::time::Duration;

use test_guests::{Guest, require_kvm};
use vmm::{SeccompPolicy, Vm, VmConfig, VmExit};

/// One VMM host for every test of this file.
fn host() -> &'static vmm::Host {
    static HOST: std::sync::OnceLock<vmm::Host> = std::sync::OnceLock::new();
    HOST.get_or_init(vmm::Host::new)
}

const TIMEOUT: Duration = Duration::from_secs(20);

/// `(name, Seccomp mode, NoNewPrivs)` of every thread of this process whose name starts with
/// `vcpu` or is `vmm`.
fn vm_threads() -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        let name = name.trim().to_owned();
        if !(name.starts_with("vcpu") || name == "vmm") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        found.push((name, field("Seccomp:"), field("NoNewPrivs:")));
    }
    found.sort();
    found
}

/// The VM's threads as soon as they match `expected` (a new thread names itself, then installs
/// its filter), or as last seen after a few seconds.
fn run_spin(
    policy: SeccompPolicy,
    expected: &[(String, String, String)],
) -> Vec<(String, String, String)> {
    let mut c = VmConfig::new(Guest::Spin.elf());
    c.vcpus = 2;
    c.mem_mib = 32;
    c.cmdline = "spin".into();
    c.seccomp = policy;
    let vm = Vm::start(host(), c).expect("VM starts");
    vm.wait_boot(TIMEOUT).expect("the guest boots");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut threads = vm_threads();
    while threads != expected && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        threads = vm_threads();
    }
    assert_eq!(
        vm.stop().exit,
        VmExit::Stopped,
        "console:\n{}",
        vm.console()
    );
    drop(vm);
    assert!(host().wait_all_torn_down(TIMEOUT), "the VM's threads end");
    threads
}

#[test]
fn vm_threads_run_under_their_filters() {
    require_kvm!();
    let threads = |seccomp: &str, no_new_privs: &str| {
        ["vcpu0", "vcpu1", "vmm"]
            .map(|name| (name.to_owned(), seccomp.to_owned(), no_new_privs.to_owned()))
    };
    // Seccomp 2 is filter mode.
    for policy in [SeccompPolicy::Enforce, SeccompPolicy::Log] {
        let expected = threads("2", "1");
        assert_eq!(run_spin(policy, &expected), expected, "{policy:?}");
    }
    let expected = threads("0", "0");
    assert_eq!(run_spin(SeccompPolicy::Off, &expected), expected);
}
