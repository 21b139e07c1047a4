// SPDX-License-Identifier: Apache-2.0
//! A hostile guest stays in its VM. Beside a healthy agent-mode VM, each attack of the test
//! guest's hostile mode (`test_guests::hostile::CASES`: vsock TX flood with nowhere for the
//! replies to go, descriptor loops, 4 GiB lengths, addresses outside memory, invalid status
//! transitions, configuration space out of bounds, notify and serial floods, a vCPU that
//! never exits) runs in its own VM with a virtio-blk, a virtio-net and the vsock device. For
//! each: the attack runs (its first round done, then for a while), the healthy VM's agent
//! keeps answering, this process's anonymous memory and descriptors stay within bounds, and
//! Stop returns in time with the VM stopped. (Its own test binary: the counts see no other
//! test's VMs.)
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its top level is the test module"
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{agent_vm, answers, fd_count, rss_anon_kib, wait_console, wait_live};
use devices::test_utils::LoopbackNet;
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use test_guests::{Guest, hostile, require_kvm};
use vmm::api::REQUEST_TIMEOUT;
use vmm::vm::STOP_WAIT;
use vmm::{DeviceConfig, NetBackendConfig, Vm, VmConfig, VmExit};

/// How long each attack runs after its first round, the healthy VM checked in between.
const ATTACK: Duration = Duration::from_millis(1500);
/// Growth of this process's anonymous memory any attack may cause: guest memory is not in it,
/// so this is room for allocator noise, not for buffers a guest fills.
const RSS_ANON_BOUND_KIB: u64 = 16 * 1024;
/// Descriptors one VM with these devices holds (`footprint.rs` counts 9 for the sandbox
/// layout), with room to spare; a device that leaked one per packet would pass it quickly.
const FDS_PER_VM: usize = 16;

fn hostile_vm(host: &vmm::Host, case: &str, image: &Path, cid: u64) -> Vm {
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    c.cmdline = hostile::cmdline(vmm::config::DEFAULT_CMDLINE, case);
    c.devices = vec![
        DeviceConfig::Vsock {
            guest_cid: cid,
            uds_path: None,
            uds_listener: None,
        },
        DeviceConfig::Block(BlockConfig {
            id: "hostile".into(),
            path: Some(image.to_path_buf()),
            read_only: false,
        }),
        DeviceConfig::Net {
            config: NetConfig {
                mac: [0x02, 0x5a, 0x00, 0x00, 0x00, 0x02],
                mtu: None,
            },
            backend: NetBackendConfig::Custom(Box::new(LoopbackNet::new(64, true))),
        },
    ];
    Vm::start(host, c).unwrap()
}

#[test]
fn hostile_guests_stay_in_their_vm() {
    require_kvm!();
    let host = vmm::Host::new();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();

    let healthy = agent_vm(&host, 3);
    answers(&healthy);
    let fds0 = fd_count();
    let anon0 = rss_anon_kib();

    for (case, cid) in hostile::CASES.into_iter().zip(4u64..) {
        let vm = hostile_vm(&host, case, &image, cid);
        let console = wait_console(&vm, &hostile::attacking(case));
        let wait_line = Instant::now() + common::TIMEOUT;
        let mut reactions = hostile::reactions(&console, case);
        while reactions.is_none() && Instant::now() < wait_line {
            std::thread::sleep(Duration::from_millis(5));
            reactions = hostile::reactions(&vm.console(), case);
        }
        let Some((reacted, attacked)) = reactions else {
            panic!("{case}: no first round's line in {:?}", vm.console());
        };
        if hostile::RING_CASES.contains(&case) {
            // The attack reached every device it aimed at: a test that attacked nothing
            // would prove nothing.
            assert!(attacked >= 1, "{case}: no device attacked");
            assert_eq!(reacted, attacked, "{case}: devices that took the attack in");
        }
        let since = Instant::now();
        let (mut anon_max, mut fds_max) = (0, 0);
        while since.elapsed() < ATTACK {
            answers(&healthy);
            anon_max = anon_max.max(rss_anon_kib());
            fds_max = fds_max.max(fd_count());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(vm.ended(), None, "{case}: the attack ended its VM");
        assert!(
            anon_max < anon0 + RSS_ANON_BOUND_KIB,
            "{case}: RssAnon grew from {anon0} to {anon_max} KiB"
        );
        assert!(
            fds_max <= fds0 + FDS_PER_VM,
            "{case}: descriptors grew from {fds0} to {fds_max}"
        );

        let asked = Instant::now();
        let end = vm.stop();
        let took = asked.elapsed();
        assert!(
            took < REQUEST_TIMEOUT + STOP_WAIT + Duration::from_secs(2),
            "{case}: Stop took {took:?}"
        );
        assert_eq!(end.exit, VmExit::Stopped, "{case}");
        println!(
            "hostile {case}: {reacted} of {attacked} devices reacted; stopped in {took:?}; \
             RssAnon max +{} KiB, descriptors max +{}, {} console bytes",
            anon_max.saturating_sub(anon0),
            fds_max.saturating_sub(fds0),
            vm.console_bytes()
        );
        drop(vm);
        wait_live(&host, 1);
        answers(&healthy);
    }

    assert_eq!(healthy.stop().exit, VmExit::Stopped);
    drop(healthy);
    assert!(host.wait_all_torn_down(common::TIMEOUT));
    assert!(
        fd_count() < fds0,
        "descriptors left behind: {} (with the healthy VM: {fds0})",
        fd_count()
    );
}
