// SPDX-License-Identifier: Apache-2.0
//! The pre-built VM shell pool: pooled VMs boot like cold ones, a shell serves one VM only,
//! and lowering the target frees the idle shells. (The test owns its `vmm::Host`, so the pool is its own.)
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
use vmm::{Host, ResetKind, Vm, VmConfig, VmExit};

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn config(mem_mib: u32) -> VmConfig {
    let mut c = VmConfig::new(Guest::Long64.elf());
    c.mem_mib = mem_mib;
    c.cmdline = "pooled".into();
    c
}

#[test]
fn pooled_vms_boot_and_shells_are_used_once() {
    require_kvm!();
    let host = Host::new();
    // Cold boot first: opens the host's KVM handle for the baseline.
    let vm = Vm::start(&host, config(48)).unwrap();
    assert!(!vm.timings().pooled);
    assert_eq!(vm.wait().exit, VmExit::Reset(ResetKind::TripleFault));
    drop(vm);
    assert!(host.wait_all_torn_down(Duration::from_secs(10)));
    let fd0 = fds();

    host.set_pool_target(48, 2).unwrap();
    assert!(
        host.wait_pool_full(Duration::from_secs(10)),
        "pool did not fill"
    );
    assert_eq!(host.pool_ready(48), 2);
    assert!(fds() > fd0, "ready shells hold their VM fds");

    for round in 0..6 {
        assert!(
            host.wait_pool_full(Duration::from_secs(10)),
            "pool did not refill"
        );
        let vm = Vm::start(&host, config(48)).unwrap();
        assert!(vm.timings().pooled, "round {round} was not pooled");
        let end = vm.wait();
        let console = vm.console();
        assert_eq!(end.exit, VmExit::Reset(ResetKind::TripleFault), "{console}");
        // A fresh shell: the guest sees its own command line and clean memory.
        assert!(console.contains("cmdline: pooled\n"), "{console}");
        assert!(console.contains("memtest: ok\n"), "{console}");
    }

    // Another size is not served from this pool.
    let vm = Vm::start(&host, config(64)).unwrap();
    assert!(!vm.timings().pooled);
    vm.wait();
    drop(vm);

    host.set_pool_target(48, 0).unwrap();
    assert_eq!(host.pool_ready(48), 0);
    assert!(host.wait_all_torn_down(Duration::from_secs(10)));
    // The refill thread may have been building one more shell; it drops it once built.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fds() != fd0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fds(), fd0, "idle shells were not freed");
}
