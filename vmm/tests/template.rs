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

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::wait_console;
use devices::virtio::block::BlockConfig;
use test_guests::{Guest, agent, require_kvm};
use vmm::{CloneConfig, DeviceConfig, Vm, VmConfig, VmExit, VmSnapshot};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The template's devices, and so every clone's: the vsock device, then two empty block slots.
fn devices() -> Vec<DeviceConfig> {
    let mut d = vec![DeviceConfig::Vsock {
        guest_cid: 3,
        uds_path: None,
    }];
    for n in 0..2 {
        d.push(DeviceConfig::Block(BlockConfig {
            id: format!("slot-{n}"),
            path: None,
            read_only: false,
        }));
    }
    d
}

/// Boots the agent-mode guest, waits for its ready line (and for it to close that connection),
/// snapshots it and stops it.
fn template(host: &vmm::Host, extra: &[&str]) -> VmSnapshot {
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    c.cmdline = agent::cmdline(vmm::config::DEFAULT_CMDLINE, extra);
    c.devices = devices();
    let vm = Vm::start(host, c).unwrap();
    let listener = vm.vsock().unwrap().listen(agent::READY_PORT).unwrap();
    let (mut ready, _) = listener.accept().unwrap();
    ready.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut line = String::new();
    ready.read_to_string(&mut line).unwrap();
    assert_eq!(line, format!("READY {}\n", agent::PORT));
    drop(ready);
    // The guest prints its ready line after closing the connection: wait for it, so the
    // template is saved idle (a clone would print it otherwise).
    wait_console(&vm, agent::READY);
    // The guest closed its end; the device forgets the connection shortly after.
    let deadline = Instant::now() + TIMEOUT;
    let snapshot = loop {
        match vm.snapshot() {
            Ok(s) => break s,
            Err(vmm::VmmActionError::Snapshot(vmm::SnapshotError::Busy(_)))
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("snapshot: {e}"),
        }
    };
    assert_eq!(vm.stop().exit, VmExit::Stopped);
    snapshot
}

fn clone_of(host: &vmm::Host, snapshot: &VmSnapshot) -> Vm {
    Vm::clone_from(
        host,
        snapshot,
        CloneConfig {
            devices: devices(),
            ..CloneConfig::default()
        },
    )
    .unwrap()
}

/// One ttrpc request frame for `service/method` with stream id `stream`.
fn request(stream: u32, service: &str, method: &str) -> Vec<u8> {
    let mut payload = vec![0x0a, u8::try_from(service.len()).unwrap()];
    payload.extend(service.as_bytes());
    payload.push(0x12);
    payload.push(u8::try_from(method.len()).unwrap());
    payload.extend(method.as_bytes());
    let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    frame.extend(stream.to_be_bytes());
    frame.extend([1, 0]);
    frame.extend(payload);
    frame
}

/// Calls the agent on its port once and checks the answer is a ttrpc response to that stream.
fn call(vm: &Vm, method: &str) {
    let mut s: UnixStream = vm.vsock().unwrap().connect(agent::PORT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(&request(1, "sandboxer.agent.v1.Control", method))
        .unwrap();
    let mut header = [0u8; 10];
    s.read_exact(&mut header).unwrap();
    assert_eq!(u32::from_be_bytes(header[4..8].try_into().unwrap()), 1);
    assert_eq!(header[8], 2, "a response frame");
}

fn read_all(file: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; usize::try_from(file.metadata().unwrap().len()).unwrap()];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

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
    let mut swapped = devices();
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
        let vm = clone_of(&host, &snapshot);
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
