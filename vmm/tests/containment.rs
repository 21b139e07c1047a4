// SPDX-License-Identifier: Apache-2.0
//! A panic in one VM's threads ends that VM only. Three agent-mode VMs run in one process; a
//! test hook (`VmmAction::InjectPanic`) makes the first one's VMM thread panic while it holds
//! a device's lock, and the second one's vCPU thread panic in its exit handling. Each of those
//! ends as crashed, with the panic as its reason, is torn down and gives back its descriptors;
//! the third keeps running and answering its agent, and a new VM starts beside it. A fourth
//! VM's VMM thread then hangs (`VmmAction::InjectHang`): Stop still returns, ending it from
//! outside that thread, and the thread frees the VM once it comes back. (Its own
//! test binary: the descriptor counts see no other test's VMs.)
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

use std::time::{Duration, Instant};

use test_guests::require_kvm;
use vmm::api::REQUEST_TIMEOUT;
use vmm::vm::STOP_WAIT;
use vmm::{PanicSite, Vm, VmExit, VmmAction, VmmActionError};

mod common;

use common::{TIMEOUT, agent_vm, answers, fd_count, vcpu_threads, wait_live};

fn crashed_with(vm: &Vm, needle: &str) {
    let end = vm.wait_timeout(TIMEOUT).expect("the VM did not end");
    match &end.exit {
        VmExit::Crashed(why) => assert!(why.contains(needle), "{why}"),
        other => panic!("ended as {other:?}, not crashed"),
    }
    // Ended means ended: requests fail at once and Stop returns the same end.
    assert!(matches!(vm.pause(), Err(VmmActionError::NotRunning)));
    assert_eq!(vm.stop(), end);
}

#[test]
fn a_fault_in_one_vms_threads_ends_that_vm_only() {
    require_kvm!();
    let host = vmm::Host::new();
    // Warm up the host's one-time descriptors (its KVM handle) before counting.
    drop(agent_vm(&host, 3).stop());
    assert!(host.wait_all_torn_down(TIMEOUT));
    let fds0 = fd_count();

    let device = agent_vm(&host, 3);
    let vcpu = agent_vm(&host, 4);
    let healthy = agent_vm(&host, 5);
    answers(&healthy);
    assert_eq!(host.live_vms(), 3);

    // The VMM thread panics while it handles the request: the caller gets no answer.
    let asked = device.request(VmmAction::InjectPanic(PanicSite::Device));
    assert!(asked.is_err(), "{asked:?}");
    crashed_with(&device, "VMM thread panicked: injected panic");
    answers(&healthy);

    vcpu.request(VmmAction::InjectPanic(PanicSite::VcpuExit))
        .unwrap();
    crashed_with(&vcpu, "vCPU thread 0 panicked: injected panic");
    answers(&healthy);

    // Both crashed VMs are torn down: the live count and the descriptors say so.
    drop((device, vcpu));
    wait_live(&host, 1);

    // A VMM thread that does not answer: Stop still returns, with the VM ended from outside
    // (its vCPU stopped from here); the thread tears the VM down once it comes back.
    let hung = std::sync::Arc::new(agent_vm(&host, 7));
    let hang = REQUEST_TIMEOUT + STOP_WAIT + Duration::from_secs(3);
    let asker = std::sync::Arc::clone(&hung);
    let hanging = std::thread::spawn(move || asker.request(VmmAction::InjectHang(hang)).map(drop));
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    let end = hung.stop();
    let took = asked.elapsed();
    assert!(
        took < REQUEST_TIMEOUT + STOP_WAIT + Duration::from_secs(2),
        "{took:?}"
    );
    match &end.exit {
        VmExit::Crashed(why) => assert!(why.contains("ended from outside"), "{why}"),
        other => panic!("ended as {other:?}"),
    }
    let deadline = Instant::now() + TIMEOUT;
    while vcpu_threads() != 1 {
        assert!(
            Instant::now() < deadline,
            "vCPU threads: {}",
            vcpu_threads()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    answers(&healthy);
    assert!(matches!(
        hanging.join().unwrap(),
        Err(VmmActionError::TimedOut(_))
    ));
    drop(hung);
    wait_live(&host, 1);

    // The host still starts VMs, beside the healthy one.
    let next = agent_vm(&host, 6);
    answers(&next);
    answers(&healthy);
    assert_eq!(next.stop().exit, VmExit::Stopped);
    assert_eq!(healthy.stop().exit, VmExit::Stopped);
    drop((next, healthy));
    assert!(host.wait_all_torn_down(TIMEOUT));
    assert_eq!(fd_count(), fds0, "descriptors left behind");
}
