// SPDX-License-Identifier: Apache-2.0
//! KVM tests of VM templates: the `virtio` test guest in agent mode boots to "agent ready",
//! is snapshotted and stopped, and clones of it continue from there on copy-on-write memory,
//! each with its own devices, answering the agent protocol on their own.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{
    TIMEOUT, accept_within, agent_devices, call, clone_of, counts, read_all, template, wait_console,
};
use test_guests::{Guest, agent, require_kvm};
use vmm::{CloneConfig, Vm, VmConfig, VmExit};

#[test]
fn clones_continue_from_the_template_each_on_its_own() {
    require_kvm!();
    let host = vmm::Host::new();
    let snapshot = template(&host, &[]);
    assert_eq!(snapshot.vcpus(), 1);
    assert_eq!(snapshot.device_types(), [19, 2, 2]);
    let template_memory = read_all(snapshot.memory());

    let clones: Vec<Vm> = (0..3).map(|_| clone_of(&host, &snapshot)).collect();
    for (i, vm) in clones.iter().enumerate() {
        // Each clone answers on its own, and its console has only its own requests.
        let method = format!("Clone{i}");
        call(vm, &method);
        let console = wait_console(vm, &agent::request("sandboxer.agent.v1.Control", &method));
        assert!(!console.contains(agent::READY), "{console}");
        assert_eq!(console.matches("agent: request").count(), 1, "{console}");
        assert!(vm.ended().is_none());
    }
    // A clone is no template: its memory is a private copy.
    assert!(matches!(
        clones[0].snapshot(),
        Err(vmm::VmmActionError::Snapshot(
            vmm::SnapshotError::CloneMemory
        ))
    ));
    // What the clones wrote stayed theirs: the template's memory did not change. (Its memfd
    // may have gained zero pages: a read fault on a hole of a shared-memory file fills it.)
    assert!(read_all(snapshot.memory()) == template_memory);
    drop(clones);
    assert!(host.wait_all_torn_down(TIMEOUT));
}

#[test]
fn a_clone_that_ends_leaves_the_others_running() {
    require_kvm!();
    let host = vmm::Host::new();
    let snapshot = template(&host, &[agent::EXIT_ON_SHUTDOWN]);
    let a = clone_of(&host, &snapshot);
    let b = clone_of(&host, &snapshot);
    call(&a, "Shutdown");
    wait_console(&a, agent::EXITING);
    let end = a.wait_timeout(TIMEOUT).expect("the clone ends");
    assert!(matches!(end.exit, VmExit::Reset(_)), "{end:?}");
    call(&b, "Health");
    assert!(b.ended().is_none());
    // A clone of the same snapshot still starts after one of them crashed.
    let c = clone_of(&host, &snapshot);
    call(&c, "Health");
}

#[test]
fn a_hundred_clones_are_alive_at_once() {
    require_kvm!();
    let host = vmm::Host::new();
    let snapshot = template(&host, &[agent::QUIET]);
    let t = Instant::now();
    let clones: Vec<Vm> = (0..100).map(|_| clone_of(&host, &snapshot)).collect();
    let took = t.elapsed();
    for vm in &clones {
        call(vm, "Health");
    }
    assert!(clones.iter().all(|vm| vm.ended().is_none()));
    eprintln!("100 clones started in {took:?}");
    drop(clones);
    assert!(host.wait_all_torn_down(TIMEOUT));
}

#[test]
fn clones_need_the_template_device_layout() {
    require_kvm!();
    let host = vmm::Host::new();
    let snapshot = template(&host, &[agent::QUIET]);
    let err = Vm::clone_from(&host, &snapshot, CloneConfig::default()).unwrap_err();
    assert!(matches!(
        err,
        vmm::VmError::Clone(vmm::builder::CloneError::DeviceCount {
            template: 3,
            clone: 0
        })
    ));
    let mut swapped = agent_devices();
    swapped.swap(0, 1);
    let err = Vm::clone_from(
        &host,
        &snapshot,
        CloneConfig {
            devices: swapped,
            ..CloneConfig::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            vmm::VmError::Device(vmm::DeviceError::Restore { slot: 0, .. })
        ),
        "{err:?}"
    );
}

#[test]
fn pooled_clone_shells_skip_the_vm_setup() {
    require_kvm!();
    let host = vmm::Host::new();
    let snapshot = template(&host, &[agent::QUIET]);
    host.set_clone_pool_target(&snapshot, 2, vmm::SeccompPolicy::Enforce)
        .unwrap();
    assert!(host.wait_pool_full(TIMEOUT));
    assert_eq!(host.clone_pool_ready(&snapshot), 2);
    for round in 0..4 {
        assert!(host.wait_pool_full(TIMEOUT));
        let pooled = host.pool_thread_ids();
        // Two shells' threads (their vCPUs' and VMM's), all running.
        let per_shell = snapshot.vcpus() + 1;
        assert_eq!(pooled.len(), 2 * per_shell, "round {round}: {pooled:?}");
        let vm = clone_of(&host, &snapshot);
        // The clone's threads are a pooled shell's, and the pool no longer counts them.
        let still = host.pool_thread_ids();
        for tid in vm.thread_ids() {
            assert!(
                pooled.contains(&tid),
                "round {round}: thread {tid} was not pooled"
            );
            assert!(
                !still.contains(&tid),
                "round {round}: thread {tid} still pooled"
            );
        }
        let t = vm.timings().clone();
        assert!(t.pooled, "round {round}: {t:?}");
        // Its threads came with the shell, already confined: every one runs under a filter.
        assert!(t.threads_pooled, "round {round}: {t:?}");
        for tid in vm.thread_ids() {
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
            assert!(status.contains("Seccomp:\t2\n"), "thread {tid}: {status}");
        }
        if std::env::var_os("SHOW_TIMINGS").is_some() {
            eprintln!("pooled clone: {t:?}");
        }
        call(&vm, "Health");
    }
    host.set_clone_pool_target(&snapshot, 0, vmm::SeccompPolicy::Off)
        .unwrap();
    assert_eq!(host.clone_pool_ready(&snapshot), 0);
    assert!(host.wait_all_torn_down(TIMEOUT));
}

#[test]
fn the_agent_counter_goes_on_across_host_reconnects() {
    require_kvm!();
    const COUNTER_PORT: u32 = 5005;
    const LINES: usize = 20;
    let host = vmm::Host::new();
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    let counter_port = agent::counter_port(COUNTER_PORT);
    c.cmdline = agent::cmdline(vmm::config::DEFAULT_CMDLINE, &[&counter_port]);
    c.devices = agent_devices();
    let vm = Vm::start(&host, c).unwrap();
    let vsock = vm.vsock().unwrap();
    let ready_listener = vsock.listen(agent::READY_PORT).unwrap();
    let listener = vsock.listen(COUNTER_PORT).unwrap();
    let mut line = String::new();
    let mut ready = accept_within(&ready_listener);
    ready.set_read_timeout(Some(TIMEOUT)).unwrap();
    ready.read_to_string(&mut line).unwrap();
    assert_eq!(line, format!("READY {}\n", agent::PORT));

    let first = counts(accept_within(&listener), LINES);
    assert!(first[0] >= 1, "{first:?}");
    // The agent serves ttrpc meanwhile.
    call(&vm, "Health");
    // The first stream is closed (host end dropped): the guest dials again and counts on.
    let second = counts(accept_within(&listener), LINES);
    assert!(second[0] > first[LINES - 1], "{first:?} then {second:?}");
    // Nobody listens for a while: the guest's dials are refused, it keeps dialling.
    drop(listener);
    std::thread::sleep(Duration::from_millis(100));
    let listener = vsock.listen(COUNTER_PORT).unwrap();
    let third = counts(accept_within(&listener), LINES);
    assert!(third[0] > second[LINES - 1], "{second:?} then {third:?}");
    call(&vm, "Health");
    let console = vm.console();
    assert!(console.contains(agent::READY), "{console}");
    assert!(!console.contains(agent::FAIL), "{console}");
    assert!(vm.ended().is_none());
    drop(vm);
    assert!(host.wait_all_torn_down(TIMEOUT));
}

#[test]
fn the_agent_counter_ticks_as_slowly_as_asked() {
    require_kvm!();
    const COUNTER_PORT: u32 = 5006;
    let host = vmm::Host::new();
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    let (port, ms) = (agent::counter_port(COUNTER_PORT), agent::counter_ms(50));
    c.cmdline = agent::cmdline(vmm::config::DEFAULT_CMDLINE, &[&port, &ms, agent::QUIET]);
    c.devices = agent_devices();
    let vm = Vm::start(&host, c).unwrap();
    let ready = vm.vsock().unwrap().listen(agent::READY_PORT).unwrap();
    let listener = vm.vsock().unwrap().listen(COUNTER_PORT).unwrap();
    drop(accept_within(&ready));
    let stream = accept_within(&listener);
    let t = Instant::now();
    let lines = counts(stream, 6);
    // Five ticks of at least 50 ms each (a tick is never shorter than asked).
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(lines[5] - lines[0] == 5, "{lines:?}");
    drop(vm);
    assert!(host.wait_all_torn_down(TIMEOUT));
}
