// SPDX-License-Identifier: Apache-2.0
//! What one running VM of a sandbox's shape (the vsock device and 8 empty block slots) costs
//! the process in descriptors and threads, booted and cloned, and what its first disk adds: the
//! counts documented on `vmm::Vm`. (Its own test binary: nothing else opens descriptors or
//! runs VMs meanwhile.)
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use common::wait_console;
use devices::virtio::block::BlockConfig;
use test_guests::{Guest, agent, require_kvm};
use vmm::{CloneConfig, DeviceConfig, Vm, VmConfig, VmExit};

const TIMEOUT: Duration = Duration::from_secs(30);
const SLOTS: usize = 8;

fn devices() -> Vec<DeviceConfig> {
    let mut d = vec![DeviceConfig::Vsock {
        guest_cid: 3,
        uds_path: None,
        uds_listener: None,
    }];
    d.extend((0..SLOTS).map(|n| {
        DeviceConfig::Block(BlockConfig {
            id: format!("slot-{n}"),
            path: None,
            read_only: false,
        })
    }));
    d
}

/// Open descriptors by what they are (`anon_inode:[eventfd]`, `memfd:...`, `socket`, ...).
fn fd_kinds() -> BTreeMap<String, i64> {
    let mut kinds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with("/proc/") {
            continue; // the listing itself
        }
        let kind = match target.split_once(':') {
            Some(("anon_inode", inode)) => inode.split(':').next().unwrap_or(inode).to_owned(),
            Some((kind, _)) if !kind.starts_with('/') => kind.to_owned(),
            _ => target
                .trim_end_matches(" (deleted)")
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned(),
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// Threads by name, digits dropped (`vcpu0` -> `vcpu`).
fn thread_kinds() -> BTreeMap<String, i64> {
    let mut kinds = BTreeMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(name) = std::fs::read_to_string(t.path().join("comm")) {
            let name: String = name
                .trim()
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .collect();
            *kinds.entry(name).or_insert(0) += 1;
        }
    }
    kinds
}

/// `after - before`, kinds that did not change left out.
fn grown(before: &BTreeMap<String, i64>, after: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let mut d = after.clone();
    for (k, v) in before {
        *d.entry(k.clone()).or_insert(0) -= v;
    }
    d.retain(|_, v| *v != 0);
    d
}

fn map(entries: &[(&str, i64)]) -> BTreeMap<String, i64> {
    entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Threads by name once no VM thread is left: a VM's VMM thread uncounts the VM just before it
/// returns, and the kernel's worker goes with the VM fd, so right after `wait_all_torn_down`
/// they may still be there for a moment.
fn settled_threads() -> BTreeMap<String, i64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let threads = thread_kinds();
        let vm_threads = ["vmm", "vcpu", "kvm-nx-lpage-re"]
            .iter()
            .any(|name| threads.contains_key(*name));
        if !vm_threads {
            return threads;
        }
        assert!(Instant::now() < deadline, "VM threads left: {threads:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A VM's own threads: its VMM thread and one per vCPU. The kernel's per-VM
/// `kvm-nx-lpage-recovery` worker may show up among the process's threads too (unless the
/// host runs `kvm.nx_huge_pages=never`): that one is checked apart. A thread takes its name
/// only once it runs (until then it has its creator's), so the count is read until no thread
/// is left with an inherited name.
fn check_threads(before: &BTreeMap<String, i64>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let grown = loop {
        let grown = grown(before, &thread_kinds());
        let unnamed = grown.keys().any(|name| before.contains_key(name));
        if !unnamed || Instant::now() > deadline {
            break grown;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut own = grown.clone();
    let kernel = own.remove("kvm-nx-lpage-re").unwrap_or(0);
    assert_eq!(own, map(&[("vcpu", 1), ("vmm", 1)]), "{grown:?}");
    assert!(kernel <= 1, "{grown:?}");
}

#[test]
fn a_sandbox_shaped_vm_holds_nine_descriptors_and_two_threads() {
    require_kvm!();
    let host = vmm::Host::new();
    // Warm up: the host's KVM handle is opened once, on purpose.
    Vm::start(&host, {
        let mut c = VmConfig::new(Guest::Pvh32.elf());
        c.mem_mib = 16;
        c
    })
    .unwrap()
    .wait();
    assert!(host.wait_all_torn_down(TIMEOUT));
    let (fds0, threads0) = (fd_kinds(), settled_threads());

    // Booted: the agent-mode guest dials the host once, then idles.
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    c.cmdline = agent::cmdline(vmm::config::DEFAULT_CMDLINE, &[]);
    c.devices = devices();
    let vm = Vm::start(&host, c).unwrap();
    let listener = vm.vsock().unwrap().listen(agent::READY_PORT).unwrap();
    let (mut ready, _) = listener.accept().unwrap();
    ready.set_read_timeout(Some(TIMEOUT)).unwrap();
    ready.read_to_string(&mut String::new()).unwrap();
    drop((ready, listener));
    wait_console(&vm, agent::READY);
    // Snapshotting succeeds once the device has forgotten the ready connection: the VM then
    // holds only what it keeps while idle.
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
    let booted = grown(&fds0, &fd_kinds());
    assert_eq!(
        booted,
        map(&[
            ("kvm-vm", 1),
            ("kvm-vcpu", 1),
            ("memfd:sandboxer-guest-ram", 1),
            ("[eventpoll]", 2),
            ("[eventfd]", 3),
            ("[timerfd]", 1),
        ]),
        "a booted VM's descriptors"
    );
    check_threads(&threads0);
    assert_eq!(vm.stop().exit, VmExit::Stopped);
    drop(vm);
    assert!(host.wait_all_torn_down(TIMEOUT));
    // The snapshot keeps the template's memory: its memfd descriptor.
    assert_eq!(
        grown(&fds0, &fd_kinds()),
        map(&[("memfd:sandboxer-guest-ram", 1)])
    );
    let (fds1, threads1) = (fd_kinds(), settled_threads());

    // A clone maps the template's memory: no memfd descriptor of its own.
    let clone = Vm::clone_from(
        &host,
        &snapshot,
        CloneConfig {
            devices: devices(),
            ..CloneConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        grown(&fds1, &fd_kinds()),
        map(&[
            ("kvm-vm", 1),
            ("kvm-vcpu", 1),
            ("[eventpoll]", 2),
            ("[eventfd]", 3),
            ("[timerfd]", 1),
        ]),
        "a clone's descriptors"
    );
    check_threads(&threads1);

    // A slot's first disk: its notify EventFd and the disk's file; the next disk of the same
    // slot replaces the file and adds nothing.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let before = fd_kinds();
    clone.attach_disk(3, &image, true).unwrap();
    assert_eq!(
        grown(&before, &fd_kinds()),
        map(&[("[eventfd]", 1), ("disk.img", 1)])
    );
    clone.attach_disk(3, &image, false).unwrap();
    clone.detach_disk(3).unwrap();
    assert_eq!(grown(&before, &fd_kinds()), map(&[("[eventfd]", 1)]));

    assert_eq!(clone.stop().exit, VmExit::Stopped);
    drop(clone);
    assert!(host.wait_all_torn_down(TIMEOUT));
    drop(snapshot);
    assert_eq!(grown(&fds0, &fd_kinds()), BTreeMap::new(), "nothing left");
}
