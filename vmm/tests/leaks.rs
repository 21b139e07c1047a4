// SPDX-License-Identifier: Apache-2.0
//! Dropping a VM frees every fd, thread and mapping: start and stop 200 VMs and compare the
//! process's counts with the baseline. (Its own test binary: nothing else runs VMs meanwhile.)
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

use std::path::Path;
use std::time::Duration;

use test_guests::{Guest, require_kvm};
use vmm::{Vm, VmConfig, VmExit};

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Threads of VMs (`vmm`, `vcpuN`): a VM's VMM thread uncounts the VM just before it returns,
/// so right after `wait_all_torn_down` the last one may still be there for a moment.
fn vm_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim() == "vmm" || name.starts_with("vcpu"))
        .count()
}

/// Waits (up to 5 s) until no VM thread is left, then returns the thread count.
fn settled_threads() -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while vm_threads() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vm_threads(), 0, "VM threads left");
    threads()
}

/// Mappings a VM makes: guest memory (the VMM names its memfd `sandboxer-guest-ram`) and each
/// vCPU's `kvm_run` page. Other mappings are the allocator's and glibc's thread-stack caches,
/// which grow and shrink with thread and allocation patterns, not with VMs.
fn vm_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("sandboxer-guest-ram") || l.contains("kvm-vcpu"))
        .count()
}

fn config(kernel: &Path, vcpus: u8) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.vcpus = vcpus;
    c.mem_mib = 16;
    c.cmdline = "leak".into();
    c
}

#[test]
fn two_hundred_vms_leave_nothing_behind() {
    require_kvm!();
    let host = vmm::Host::new();
    // Warm up: the host's KVM handle and the signal handler are created once, on purpose.
    run_vms(&host, 40);
    assert!(host.wait_all_torn_down(Duration::from_secs(10)));
    let (fd0, th0) = (fds(), settled_threads());
    assert_eq!(vm_mappings(), 0);

    run_vms(&host, 200);

    assert!(
        host.wait_all_torn_down(Duration::from_secs(30)),
        "VMs still tearing down"
    );
    assert_eq!(host.live_vms(), 0);
    assert_eq!(
        vm_mappings(),
        0,
        "guest memory or a kvm_run page is still mapped"
    );
    assert_eq!(fds(), fd0, "fd count changed");
    assert_eq!(settled_threads(), th0, "thread count changed");
}

/// Starts and ends `n` VMs in every way a VM can end.
fn run_vms(host: &vmm::Host, n: usize) {
    for i in 0..n {
        match i % 4 {
            // Guest ends itself.
            0 | 1 => {
                let vcpus = if i % 2 == 0 { 1 } else { 2 };
                let vm = Vm::start(host, config(Guest::Pvh32.elf(), vcpus)).unwrap();
                assert!(matches!(vm.wait().exit, VmExit::Reset(_)));
            }
            // Host stops a running guest.
            2 => {
                let vm = Vm::start(host, config(Guest::Spin.elf(), 2)).unwrap();
                vm.wait_boot(Duration::from_secs(10)).expect("boot");
                // The check below sees a live VM's memory and both kvm_run pages.
                assert!(vm_mappings() >= 3, "maps show no VM: {}", vm_mappings());
                assert_eq!(vm.stop().exit, VmExit::Stopped);
            }
            // Dropped while running, without stop.
            _ => {
                let vm = Vm::start(host, config(Guest::Spin.elf(), 1)).unwrap();
                vm.wait_boot(Duration::from_secs(10)).expect("boot");
                drop(vm);
            }
        }
        // Failed starts leak nothing either.
        Vm::start(host, config(Path::new("/nonexistent"), 1)).expect_err("no kernel");
    }
}
