// SPDX-License-Identifier: Apache-2.0
//! Helpers shared by the VMM's integration tests that run agent-mode test guests and count
//! what the process holds. Each test crate uses a part of them.
#![allow(
    dead_code,
    reason = "each test crate includes this module and uses a part of it"
)]

use std::io::Read;
use std::time::{Duration, Instant};

use test_guests::{Guest, agent};
use vmm::{DeviceConfig, Vm, VmConfig};

/// Bound of every wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// vCPU threads of this process.
pub fn vcpu_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|n| n.starts_with("vcpu"))
        })
        .count()
}

/// This process's anonymous resident memory in KiB (`RssAnon`): the heap and stacks, without
/// guest memory (a memfd, counted as `RssShmem`).
pub fn rss_anon_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/self/status")
}

/// Waits until the console contains `needle`; returns the console.
pub fn wait_console(vm: &Vm, needle: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let console = vm.console();
        if console.contains(needle) {
            return console;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in {console:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `host` counts `n` live VMs.
pub fn wait_live(host: &vmm::Host, n: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while host.live_vms() != n {
        assert!(Instant::now() < deadline, "live VMs: {}", host.live_vms());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An agent-mode VM (32 MiB, vsock `cid`) whose agent has sent its ready line and now idles.
pub fn agent_vm(host: &vmm::Host, cid: u64) -> Vm {
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    c.cmdline = agent::cmdline(vmm::config::DEFAULT_CMDLINE, &[]);
    c.devices = vec![DeviceConfig::Vsock {
        guest_cid: cid,
        uds_path: None,
    }];
    let vm = Vm::start(host, c).unwrap();
    let listener = vm.vsock().unwrap().listen(agent::READY_PORT).unwrap();
    let (mut ready, _) = listener.accept().unwrap();
    ready.set_read_timeout(Some(TIMEOUT)).unwrap();
    ready.read_to_string(&mut String::new()).unwrap();
    wait_console(&vm, agent::READY);
    vm
}

/// The VM still runs and its agent still takes a connection, through the VMM thread (vsock
/// device), the vCPU (the guest's driver and agent) and back.
pub fn answers(vm: &Vm) {
    assert_eq!(vm.ended(), None);
    vm.pause().unwrap();
    vm.resume().unwrap();
    let stream = vm.vsock().unwrap().connect(agent::PORT).unwrap();
    drop(stream);
}
