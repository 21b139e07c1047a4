// SPDX-License-Identifier: Apache-2.0
//! KVM tests of the virtio devices through real ioeventfds and interrupt lines: the `virtio` test guest
//! carries a minimal virtio-mmio driver, takes real interrupts (IOAPIC + LAPIC) and reports
//! every step on its console.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::test_utils::LoopbackNet;
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use test_guests::console::{self, VIRTIO_DONE, VIRTIO_FAIL, VIRTIO_NO_FAILURES};
use test_guests::{Guest, require_kvm, virtio};
use vmm::{DeviceConfig, NetBackendConfig, Vm, VmConfig, VmExit};

/// One VMM host for every test of this file.
fn host() -> &'static vmm::Host {
    static HOST: std::sync::OnceLock<vmm::Host> = std::sync::OnceLock::new();
    HOST.get_or_init(vmm::Host::new)
}

const TIMEOUT: Duration = Duration::from_secs(60);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-virtio-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A raw disk image of `sectors` sectors whose sector 0 starts with `label`.
fn disk_image(dir: &Path, name: &str, sectors: u64, label: &str) -> PathBuf {
    let path = dir.join(name);
    let mut data = vec![0u8; usize::try_from(sectors * 512).unwrap()];
    data[..label.len()].copy_from_slice(label.as_bytes());
    std::fs::write(&path, data).unwrap();
    path
}

fn config(cmdline: &str, devices: Vec<DeviceConfig>) -> VmConfig {
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 64;
    c.cmdline = cmdline.into();
    c.devices = devices;
    c
}

/// Waits until the console contains `needle` (or the VM ends).
fn wait_for(vm: &Vm, needle: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !vm.console().contains(needle) {
        if vm.ended().is_some() || Instant::now() > deadline {
            panic!("no {needle:?} on the console:\n{}", vm.console());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the guest to finish and checks it reported no failure.
fn finish(vm: &Vm) -> String {
    let Some(end) = vm.wait_timeout(TIMEOUT) else {
        let console = vm.console();
        vm.stop();
        panic!("guest did not finish:\n{console}");
    };
    let console = vm.console();
    assert!(
        matches!(end.exit, VmExit::Reset(_)),
        "{:?}\n{console}",
        end.exit
    );
    assert!(console.contains(VIRTIO_DONE), "{console}");
    assert!(!console.contains(VIRTIO_FAIL), "{console}");
    assert!(console.contains(VIRTIO_NO_FAILURES), "{console}");
    console
}

fn assert_has(console: &str, line: &str) {
    assert!(console.contains(line), "missing {line:?} in:\n{console}");
}

#[test]
fn blk_write_read_flush_bounds_and_id() {
    require_kvm!();
    let dir = temp_dir("blk");
    let image = disk_image(&dir, "disk.img", 2048, "sandboxer-disk0");
    let vm = Vm::start(
        host(),
        config(
            virtio::TEST_BLK,
            vec![DeviceConfig::Block(BlockConfig {
                id: "test-serial".into(),
                path: Some(image.clone()),
                read_only: false,
            })],
        ),
    )
    .unwrap();
    let console = finish(&vm);
    for line in [
        console::VIRTIO_BLK_WRITE_OK,
        console::VIRTIO_BLK_FLUSH_OK,
        console::VIRTIO_BLK_READBACK_OK,
        console::VIRTIO_BLK_BOUNDS_OK,
        "virtio: blk: capacity 2048\n",
        "virtio: blk: id test-serial\n",
        "virtio: blk: sector0 sandboxer-disk0\n",
    ] {
        assert_has(&console, line);
    }
    // What the guest wrote reached the host file.
    let data = std::fs::read(&image).unwrap();
    let at = usize::try_from(virtio::BLK_PATTERN_SECTOR * 512).unwrap();
    assert_eq!(
        &data[at..at + virtio::BLK_PATTERN_LEN],
        virtio::blk_pattern().as_slice()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn blk_read_only_slot_refuses_writes() {
    require_kvm!();
    let dir = temp_dir("blk-ro");
    let image = disk_image(&dir, "ro.img", 64, "read-only");
    let before = std::fs::read(&image).unwrap();
    let vm = Vm::start(
        host(),
        config(
            virtio::TEST_BLK,
            vec![DeviceConfig::Block(BlockConfig {
                id: "ro".into(),
                path: Some(image.clone()),
                read_only: true,
            })],
        ),
    )
    .unwrap();
    let console = finish(&vm);
    assert_has(&console, console::VIRTIO_BLK_WRITE_SKIPPED);
    assert_has(&console, "virtio: blk: sector0 read-only\n");
    assert_eq!(std::fs::read(&image).unwrap(), before);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn blk_slot_swap_while_the_guest_runs() {
    require_kvm!();
    let dir = temp_dir("swap");
    let first = disk_image(&dir, "first.img", 64, "first-disk");
    let second = disk_image(&dir, "second.img", 4096, "second-disk");
    let vm = Vm::start(
        host(),
        config(
            &format!("{} {}", virtio::TEST_BLK, virtio::BLK_SWAP),
            vec![DeviceConfig::Block(BlockConfig {
                id: "slot0".into(),
                path: Some(first),
                read_only: false,
            })],
        ),
    )
    .unwrap();
    wait_for(&vm, console::VIRTIO_BLK_WAITING_FOR_CONFIG_CHANGE);
    assert_eq!(vm.block_slots(), 1);
    vm.attach_disk(0, &second, false).unwrap();
    let console = finish(&vm);
    assert_has(&console, "virtio: blk: sector0 first-disk\n");
    assert_has(
        &console,
        "virtio: blk: swapped capacity 4096 sector0 second-disk\n",
    );
    // Bad slot indexes and missing images are precise errors.
    assert!(matches!(
        vm.attach_disk(1, &second, false),
        Err(vmm::VmmActionError::Device(vmm::DeviceError::NoSuchSlot(1)))
    ));
    assert!(matches!(
        vm.attach_disk(0, Path::new("/nonexistent.img"), false),
        Err(vmm::VmmActionError::Device(
            vmm::DeviceError::OpenDisk { .. }
        ))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn blk_empty_slot_gets_its_first_disk_while_the_guest_runs() {
    require_kvm!();
    // The slot starts with no descriptor at all: the guest's GET_ID and the failing read reach
    // the device through the MMIO exit. The attach gives it its notify EventFd (registered with
    // KVM and the event loop on the VMM thread), which serves the reads after the swap.
    let dir = temp_dir("first-disk");
    let disk = disk_image(&dir, "disk.img", 2048, "first-of-slot");
    let vm = Vm::start(
        host(),
        config(
            &format!("{} {}", virtio::TEST_BLK, virtio::BLK_SWAP),
            vec![DeviceConfig::Block(BlockConfig {
                id: "empty0".into(),
                path: None,
                read_only: false,
            })],
        ),
    )
    .unwrap();
    wait_for(&vm, console::VIRTIO_BLK_WAITING_FOR_CONFIG_CHANGE);
    vm.attach_disk(0, &disk, false).unwrap();
    let console = finish(&vm);
    assert_has(&console, &console::virtio_blk_capacity(0));
    assert_has(&console, console::VIRTIO_BLK_EMPTY_SLOT);
    assert_has(&console, &console::virtio_blk_id("empty0"));
    assert_has(&console, "virtio: blk: bounds ok\n");
    assert_has(
        &console,
        &console::virtio_blk_swapped(2048, b"first-of-slot"),
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn net_frames_go_out_and_come_back_through_loopback() {
    require_kvm!();
    let backend = LoopbackNet::new(64, true);
    let vm = Vm::start(
        host(),
        config(
            virtio::TEST_NET,
            vec![DeviceConfig::Net {
                config: NetConfig {
                    mac: [0x02, 0x5a, 0x00, 0x00, 0x00, 0x01],
                    mtu: None,
                },
                backend: NetBackendConfig::Custom(Box::new(backend)),
            }],
        ),
    )
    .unwrap();
    let console = finish(&vm);
    assert_has(&console, "virtio: net: mac 02:5a:00:00:00:01\n");
    assert_has(&console, console::VIRTIO_NET_LINK_UP);
    assert_has(&console, console::VIRTIO_NET_LOOPBACK_OK);
}

/// Echoes one connection's bytes back until EOF.
fn echo(mut stream: UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends `msg` on a host->guest connection and reads the guest's upper-case echo.
fn exchange(stream: &mut UnixStream, msg: &[u8]) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(msg).unwrap();
    let expected = virtio::vsock_echo_reply(msg);
    let mut got = vec![0u8; expected.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(got, expected);
}

#[test]
fn vsock_both_directions_through_both_host_interfaces() {
    require_kvm!();
    let dir = temp_dir("vsock");
    let uds = dir.join("vsock.sock");
    let vm = Vm::start(
        host(),
        config(
            virtio::TEST_VSOCK,
            vec![DeviceConfig::Vsock {
                guest_cid: 3,
                uds_path: Some(uds.clone()),
                uds_listener: None,
            }],
        ),
    )
    .unwrap();
    let handle = vm.vsock().expect("vsock device").clone();

    // Guest -> host: an echo server on the in-process listener.
    let listener = handle.listen(virtio::VSOCK_HOST_PORT).unwrap();
    let server = std::thread::spawn(move || {
        let stream = listener.accept().expect("guest connects");
        echo(stream.0);
    });

    // Host -> guest, first through the in-process API...
    wait_for(&vm, console::VIRTIO_VSOCK_LISTENING);
    let mut stream = handle
        .connect(virtio::VSOCK_LISTEN_PORT)
        .expect("connect to guest");
    exchange(&mut stream, b"hello through the in-process api");
    drop(stream);

    // ...then through the hybrid-vsock unix socket.
    let mut stream = UnixStream::connect(&uds).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    writeln!(stream, "CONNECT {}", virtio::VSOCK_LISTEN_PORT).unwrap();
    let mut reply = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut reply)
        .unwrap();
    assert!(reply.starts_with("OK "), "hybrid reply {reply:?}");
    exchange(&mut stream, b"hello through the unix socket");
    drop(stream);

    let console = finish(&vm);
    server.join().unwrap();
    assert_has(&console, "virtio: vsock: cid 3\n");
    assert_has(&console, console::VIRTIO_VSOCK_ECHO_OK);
    assert_has(&console, console::VIRTIO_VSOCK_SERVED);
    drop(vm);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn guest_connection_to_a_hybrid_listener() {
    require_kvm!();
    let dir = temp_dir("vsock-hybrid");
    let uds = dir.join("v.sock");
    // Guest connections to CID 2 port P go to `<uds>_P`.
    let host_listener =
        UnixListener::bind(format!("{}_{}", uds.display(), virtio::VSOCK_HOST_PORT)).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = host_listener.accept().unwrap();
        echo(stream);
    });
    let vsock = |uds: &Path| {
        config(
            virtio::TEST_VSOCK,
            vec![DeviceConfig::Vsock {
                guest_cid: 42,
                uds_path: Some(uds.to_path_buf()),
                uds_listener: None,
            }],
        )
    };
    let vm = Vm::start(host(), vsock(&uds)).unwrap();
    wait_for(&vm, console::VIRTIO_VSOCK_ECHO_OK);
    assert_has(&vm.console(), "virtio: vsock: cid 42\n");
    // The VMM thread made that connection jailed in the socket's directory (its root there,
    // every other thread's still the host's).
    let vmm_tid = *vm.thread_ids().last().unwrap();
    let root = |task: &str| std::fs::read_link(format!("/proc/self/task/{task}/root")).unwrap();
    assert_eq!(root(&vmm_tid.to_string()), dir.canonicalize().unwrap());
    assert_eq!(
        root(&rustix::thread::gettid().as_raw_nonzero().to_string()),
        Path::new("/")
    );
    // Once a stopped VM is torn down its socket path is free: a VM that follows at once on
    // the same path (a sandbox booting after its clone failed) binds it.
    vm.stop();
    assert!(vm.wait_torn_down(Duration::from_secs(10)));
    assert!(!uds.exists(), "the torn-down VM left its socket");
    let next = Vm::start(host(), vsock(&uds)).unwrap();
    assert!(uds.exists());
    next.stop();
    server.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn all_devices_together_and_device_limits() {
    require_kvm!();
    let dir = temp_dir("all");
    let image = disk_image(&dir, "d.img", 256, "all-devices");
    let vm = Vm::start(
        host(),
        config(
            virtio::TEST_ALL,
            vec![
                DeviceConfig::Block(BlockConfig {
                    id: "a".into(),
                    path: Some(image),
                    read_only: false,
                }),
                DeviceConfig::Block(BlockConfig::default()),
                DeviceConfig::Net {
                    config: NetConfig {
                        mac: [2, 0, 0, 0, 0, 9],
                        mtu: Some(1500),
                    },
                    backend: NetBackendConfig::Custom(Box::new(LoopbackNet::new(64, true))),
                },
            ],
        ),
    )
    .unwrap();
    let console = finish(&vm);
    assert_has(&console, console::VIRTIO_NET_LOOPBACK_OK);
    assert_has(&console, "virtio: blk: sector0 all-devices\n");
    assert_eq!(vm.block_slots(), 2);

    // Too many devices, a second vsock and a reserved CID are refused before the VM runs.
    let many = (0..20)
        .map(|_| DeviceConfig::Block(BlockConfig::default()))
        .collect();
    assert!(matches!(
        Vm::start(host(), config("", many)),
        Err(vmm::VmError::Device(vmm::DeviceError::TooManyDevices))
    ));
    let two = vec![
        DeviceConfig::Vsock {
            guest_cid: 3,
            uds_path: None,
            uds_listener: None,
        },
        DeviceConfig::Vsock {
            guest_cid: 4,
            uds_path: None,
            uds_listener: None,
        },
    ];
    assert!(matches!(
        Vm::start(host(), config("", two)),
        Err(vmm::VmError::Device(vmm::DeviceError::DuplicateVsock))
    ));
    let reserved = vec![DeviceConfig::Vsock {
        guest_cid: 2,
        uds_path: None,
        uds_listener: None,
    }];
    assert!(matches!(
        Vm::start(host(), config("", reserved)),
        Err(vmm::VmError::Device(vmm::DeviceError::InvalidCid(2)))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}
