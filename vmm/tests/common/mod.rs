// SPDX-License-Identifier: Apache-2.0
//! Helpers shared by the VMM's integration tests that run agent-mode test guests and count
//! what the process holds. Each test crate uses a part of them.
#![allow(
    dead_code,
    reason = "each test crate includes this module and uses a part of it"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use devices::virtio::block::BlockConfig;
use devices::virtio::vsock::VsockListener;
use test_guests::{Guest, agent};
use vmm::{CloneConfig, DeviceConfig, Vm, VmConfig, VmExit, VmSnapshot};

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
        uds_listener: None,
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

/// The template's devices, and so every clone's: the vsock device, then two empty block slots.
pub fn agent_devices() -> Vec<DeviceConfig> {
    let mut d = vec![DeviceConfig::Vsock {
        guest_cid: 3,
        uds_path: None,
        uds_listener: None,
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
pub fn template(host: &vmm::Host, extra: &[&str]) -> VmSnapshot {
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    c.cmdline = agent::cmdline(vmm::config::DEFAULT_CMDLINE, extra);
    c.devices = agent_devices();
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

/// One ttrpc request frame for `service/method` with stream id `stream`.
pub fn request(stream: u32, service: &str, method: &str) -> Vec<u8> {
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
pub fn call(vm: &Vm, method: &str) {
    let mut s: UnixStream = vm.vsock().unwrap().connect(agent::PORT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(&request(1, "sandboxer.agent.v1.Control", method))
        .unwrap();
    let mut header = [0u8; 10];
    s.read_exact(&mut header).unwrap();
    assert_eq!(u32::from_be_bytes(header[4..8].try_into().unwrap()), 1);
    assert_eq!(header[8], 2, "a response frame");
}

pub fn read_all(file: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; usize::try_from(file.metadata().unwrap().len()).unwrap()];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// The next guest connection to `listener`, within [`TIMEOUT`].
pub fn accept_within(listener: &VsockListener) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match listener.try_accept() {
            Ok((stream, _)) => return stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept on port {}: {e}", listener.port()),
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not dial port {}",
            listener.port()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads `n` counter lines from `stream` (each within [`TIMEOUT`]); checks they parse and
/// strictly increase.
pub fn counts(stream: UnixStream, n: usize) -> Vec<u64> {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut lines = BufReader::new(stream).lines();
    let counts: Vec<u64> = (0..n)
        .map(|i| {
            let line = lines.next().unwrap_or_else(|| panic!("line {i}: closed"));
            let line = line.unwrap_or_else(|e| panic!("line {i}: {e}"));
            line.parse()
                .unwrap_or_else(|e| panic!("line {i} {line:?}: {e}"))
        })
        .collect();
    assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
    counts
}

/// A clone of `snapshot` with the agent guest's devices.
pub fn clone_of(host: &vmm::Host, snapshot: &VmSnapshot) -> Vm {
    Vm::clone_from(
        host,
        snapshot,
        CloneConfig {
            devices: agent_devices(),
            ..CloneConfig::default()
        },
    )
    .unwrap()
}
