// SPDX-License-Identifier: Apache-2.0
//! KVM tests of the live handover (DESIGN.md section 8): a running VM is frozen and saved,
//! its state goes through the encoded form another process would receive (with its files
//! duplicated, as `SCM_RIGHTS` would), and a new VM rebuilt on the same memory goes on where
//! the old one stopped. The agent-mode test guest's counter (`agent.counter_port`) shows the
//! guest never restarted: its numbers go on increasing across the handover.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

mod common;

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use common::{TIMEOUT, accept_within, agent_devices, call, clone_of, counts, read_all, template};
use test_guests::{Guest, agent, require_kvm};
use vmm::snapshot::{DecodeError, SavedMemory};
use vmm::{CloneConfig, Vm, VmConfig, VmExit, VmSnapshot};

const COUNTER_PORT: u32 = 5005;

/// Boots the agent-mode guest with its counter and waits for its ready line.
fn boot(host: &vmm::Host) -> Vm {
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    let counter = agent::counter_port(COUNTER_PORT);
    c.cmdline = agent::cmdline(vmm::config::DEFAULT_CMDLINE, &[&counter, agent::QUIET]);
    c.devices = agent_devices();
    let vm = Vm::start(host, c).unwrap();
    let ready = vm.vsock().unwrap().listen(agent::READY_PORT).unwrap();
    let mut line = String::new();
    let mut stream = accept_within(&ready);
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.read_to_string(&mut line).unwrap();
    assert_eq!(line, format!("READY {}\n", agent::PORT));
    vm
}

/// What another process receives: the encoded state and its own descriptors of the files.
fn pass_on(snapshot: &VmSnapshot) -> VmSnapshot {
    let (bytes, files) = snapshot.encode();
    let files: Vec<File> = files.iter().map(|f| f.try_clone().unwrap()).collect();
    VmSnapshot::decode(&bytes, files).unwrap()
}

fn restore_on(
    host: &vmm::Host,
    saved: &VmSnapshot,
    paused: bool,
    shell: Option<vmm::PreparedShell>,
) -> Vm {
    Vm::restore(
        host,
        saved,
        CloneConfig {
            devices: agent_devices(),
            paused,
            shell,
            ..CloneConfig::default()
        },
    )
    .unwrap()
}

/// The shell a new process builds ahead for `vm`, while `vm` still runs.
fn prepared(host: &vmm::Host, vm: &Vm) -> vmm::PreparedShell {
    let (memory, private, mem_bytes, vcpus) = vm.memory_layout();
    vmm::PreparedShell::build(
        host,
        memory,
        private,
        mem_bytes,
        vcpus,
        vmm::SeccompPolicy::Enforce,
    )
    .unwrap()
}

/// The last counter value the VM sends within `lines` lines on a new connection.
fn count_on(vm: &Vm, lines: usize) -> Vec<u64> {
    let listener = vm.vsock().unwrap().listen(COUNTER_PORT).unwrap();
    counts(accept_within(&listener), lines)
}

#[test]
fn a_running_vm_handed_over_counts_on_where_it_was() {
    require_kvm!();
    let host = vmm::Host::new();
    let mut vm = boot(&host);
    let mut last = count_on(&vm, 5)[4];
    // Five handovers in a row, each with an agent connection open: the new VM resets it in the
    // guest (the test guest has 4 connection slots: leaked ones would refuse the calls).
    for round in 0..5 {
        let open = vm.vsock().unwrap().connect(agent::PORT).unwrap();
        // From the third round on, the new VM is built ahead, as an upgrade does.
        let shell = (round >= 2).then(|| prepared(&host, &vm));
        let saved = vm.handover().unwrap();
        assert!(matches!(saved.kind(), SavedMemory::Own));
        let received = pass_on(&saved);
        let new = restore_on(&host, &received, true, shell);
        assert_eq!(new.timings().pooled, round >= 2);
        // Restored paused: nothing touches the memory until the old VM is gone.
        let frozen = read_all(received.memory());
        std::thread::sleep(Duration::from_millis(50));
        assert!(read_all(received.memory()) == frozen, "round {round}");
        assert_eq!(vm.stop().exit, VmExit::Stopped);
        drop((saved, open));
        new.resume().unwrap();

        let after = count_on(&new, 5);
        assert!(after[0] > last, "round {round}: {last} then {after:?}");
        last = after[4];
        call(&new, "Health");
        // The guest did not boot again: no second ready line on the new console.
        let console = new.console();
        assert!(!console.contains(agent::READY), "round {round}: {console}");
        assert!(new.ended().is_none());
        vm = new;
    }
    drop(vm);
    assert!(host.wait_all_torn_down(TIMEOUT));
}

#[test]
fn a_clone_handed_over_keeps_what_it_wrote_and_the_template_is_untouched() {
    require_kvm!();
    let host = vmm::Host::new();
    let counter = agent::counter_port(COUNTER_PORT);
    let snapshot = template(&host, &[&counter, agent::QUIET]);
    let template_memory = read_all(snapshot.memory());
    // A template's snapshot is for clones, not for a restore.
    let err = Vm::restore(&host, &snapshot, CloneConfig::default()).unwrap_err();
    assert!(
        matches!(
            err,
            vmm::VmError::Clone(vmm::builder::CloneError::NotHandedOver)
        ),
        "{err:?}"
    );
    let clone = clone_of(&host, &snapshot);
    let before = count_on(&clone, 10);
    let shell = prepared(&host, &clone);
    // A shell built for another VM's memory does not fit.
    let other = boot(&host);
    let wrong = prepared(&host, &other);
    let saved = clone.handover().unwrap();
    let SavedMemory::Clone { delta } = saved.kind() else {
        panic!("a clone's handover carries its pages: {:?}", saved.kind());
    };
    // Only what the clone wrote travels, not its template's memory.
    use std::os::unix::fs::MetadataExt;
    let delta_bytes = delta.metadata().unwrap().blocks() * 512;
    assert!(delta_bytes > 0 && delta_bytes < 8 << 20, "{delta_bytes}");
    let received = pass_on(&saved);
    clone.stop();
    drop(saved);

    let err = Vm::restore(
        &host,
        &received,
        CloneConfig {
            devices: agent_devices(),
            shell: Some(wrong),
            ..CloneConfig::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            vmm::VmError::Clone(vmm::builder::CloneError::ShellMismatch)
        ),
        "{err:?}"
    );
    drop(other);
    let new = restore_on(&host, &received, false, Some(shell));
    let after = count_on(&new, 10);
    assert!(after[0] > before[9], "{before:?} then {after:?}");
    call(&new, "Health");
    assert!(read_all(snapshot.memory()) == template_memory);
    drop(new);
    assert!(host.wait_all_torn_down(TIMEOUT));
}

#[test]
fn a_handover_given_up_resumes_the_vm_and_nothing_moved_meanwhile() {
    require_kvm!();
    let host = vmm::Host::new();
    let vm = boot(&host);
    let listener = vm.vsock().unwrap().listen(COUNTER_PORT).unwrap();
    let stream = accept_within(&listener);
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let saved = vm.handover().unwrap();
    // Frozen: neither the vCPUs nor the devices change the guest's memory.
    let frozen = read_all(saved.memory());
    std::thread::sleep(Duration::from_millis(100));
    assert!(read_all(saved.memory()) == frozen, "the memory changed");
    drop(saved);
    vm.resume().unwrap();
    // The same connection goes on counting.
    let lines = counts(stream, 30);
    assert!(lines[29] > lines[0]);
    call(&vm, "Health");
    assert!(vm.ended().is_none());
}

#[test]
fn a_saved_vm_of_another_format_is_refused() {
    require_kvm!();
    let host = vmm::Host::new();
    let vm = boot(&host);
    let saved = vm.handover().unwrap();
    let (bytes, files) = saved.encode();
    let dup = || -> Vec<File> { files.iter().map(|f| f.try_clone().unwrap()).collect() };

    let mut newer = bytes.clone();
    newer[6..10].copy_from_slice(&(vmm::snapshot::FORMAT_VERSION + 1).to_le_bytes());
    let err = VmSnapshot::decode(&newer, dup()).unwrap_err();
    assert!(matches!(err, DecodeError::Version { .. }), "{err}");
    assert!(err.to_string().contains("version"), "{err}");

    let err = VmSnapshot::decode(&bytes[..bytes.len() / 2], dup()).unwrap_err();
    assert!(matches!(err, DecodeError::Body(_)), "{err}");
    let err = VmSnapshot::decode(b"not a VM", dup()).unwrap_err();
    assert!(matches!(err, DecodeError::Magic), "{err}");
    let err = VmSnapshot::decode(&bytes, Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Files {
                want: 1,
                got: 0,
                ..
            }
        ),
        "{err}"
    );
    // The bytes as they were still decode.
    VmSnapshot::decode(&bytes, dup()).unwrap();
    vm.resume().unwrap();
    call(&vm, "Health");
}

#[test]
fn a_handed_over_vm_releases_its_host_ends_when_asked() {
    require_kvm!();
    let host = vmm::Host::new();
    let vm = boot(&host);
    let listener = vm.vsock().unwrap().listen(COUNTER_PORT).unwrap();
    let mut stream = accept_within(&listener);
    let saved = vm.handover().unwrap();
    // Frozen, the old VM still holds the host end: nothing comes, nothing ends.
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let ended_early = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    assert!(!ended_early, "the host end closed before it was released");
    vm.release_host_ends().unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(stream.read(&mut buf).unwrap(), 0, "the host end is closed");
    drop(saved);
    assert_eq!(vm.stop().exit, VmExit::Stopped);
}
