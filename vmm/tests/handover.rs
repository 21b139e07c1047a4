// SPDX-License-Identifier: Apache-2.0
//! KVM tests of the live handover (DESIGN.md section 8): a running VM is frozen and saved,
//! its state goes through the encoded form another process would receive (with its files
//! duplicated, as `SCM_RIGHTS` would), and a new VM rebuilt on the same memory goes on where
//! the old one stopped. The agent-mode test guest's counter (`agent.counter_port`) shows the
//! guest never restarted: its numbers go on increasing across the handover. The block-watch
//! test guest (`virtio.blk_watch=1`) shows a disk attached at run time goes over with the VM:
//! it answers the host through the disk before and after, and never hears of a change.
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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{
    TIMEOUT, accept_within, agent_devices, call, clone_of, counts, read_all, template, wait_console,
};
use devices::virtio::block::{BlockConfig, BlockError};
use test_guests::console::{
    VIRTIO_BLK_CONFIG_CHANGE, VIRTIO_BLK_WAITING_FOR_CONFIG_CHANGE, VIRTIO_DONE, VIRTIO_FAIL,
    VIRTIO_NO_FAILURES, virtio_blk_config_change, virtio_blk_mailbox_ack, virtio_blk_watching,
};
use test_guests::{Guest, agent, require_kvm, virtio};
use vmm::snapshot::{DecodeError, SavedMemory};
use vmm::{
    BlockFile, CloneConfig, DeviceConfig, DeviceError, DiskInfo, Vm, VmConfig, VmError, VmExit,
    VmSnapshot,
};

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
    prepared_in(host, vm, None)
}

/// [`prepared`], its VMM thread jailed in `jail` ahead.
fn prepared_in(host: &vmm::Host, vm: &Vm, jail: Option<&std::path::Path>) -> vmm::PreparedShell {
    let (memory, private, mem_bytes, vcpus) = vm.memory_layout();
    vmm::PreparedShell::build(
        host,
        memory,
        private,
        mem_bytes,
        vcpus,
        vmm::SeccompPolicy::Enforce,
        jail,
    )
    .unwrap()
}

/// A shell whose VMM thread was jailed ahead in another directory than the one its VM's vsock
/// serves under (here: none) is refused, and the VM handed over goes on where it was.
#[test]
fn a_shell_jailed_elsewhere_is_refused() {
    require_kvm!();
    let host = vmm::Host::new();
    let vm = boot(&host);
    let dir = tempfile::tempdir().unwrap();
    let shell = prepared_in(&host, &vm, Some(dir.path()));
    let saved = vm.handover().unwrap();
    let refused = Vm::restore(
        &host,
        &pass_on(&saved),
        CloneConfig {
            devices: agent_devices(),
            paused: true,
            shell: Some(shell),
            ..CloneConfig::default()
        },
    )
    .map(drop)
    .unwrap_err()
    .to_string();
    assert!(refused.contains("jail"), "{refused}");
    vm.resume().unwrap();
    call(&vm, "Health");
}

/// A VM restored for a handover and never run (the handover failed after it was rebuilt)
/// stops, ends and is torn down, its threads never having run the guest; the old VM goes on.
#[test]
fn a_restored_vm_that_never_ran_stops_and_leaves_the_old_one_running() {
    require_kvm!();
    let host = vmm::Host::new();
    let vm = boot(&host);
    let shell = prepared(&host, &vm);
    let saved = vm.handover().unwrap();
    let new = restore_on(&host, &pass_on(&saved), true, Some(shell));
    assert!(new.ended().is_none());
    assert_eq!(new.stop().exit, VmExit::Stopped);
    // One never asked anything is dropped as it is.
    let again = restore_on(&host, &pass_on(&saved), true, None);
    drop(again);
    vm.resume().unwrap();
    call(&vm, "Health");
    drop((new, vm));
    assert!(host.wait_all_torn_down(TIMEOUT));
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
        // Its threads start as it first runs: at once (as an upgrade resumes), or through the
        // VMM thread's Resume.
        if round % 2 == 0 {
            new.resume_now().unwrap();
        } else {
            new.resume().unwrap();
        }

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
    let SavedMemory::Clone { delta, base: None } = saved.kind() else {
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

/// Blocks a memfd holds, in bytes.
fn held_bytes(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().unwrap().blocks() * 512
}

#[test]
fn a_clone_copied_ahead_hands_over_only_what_changed_since() {
    require_kvm!();
    let host = vmm::Host::new();
    let counter = agent::counter_port(COUNTER_PORT);
    // Each clone writes 1 MiB at its first agent connection and leaves it alone.
    let dirty = agent::dirty_kib(1024);
    let snapshot = template(&host, &[&counter, &dirty, agent::QUIET]);
    // A VM with its own memory has nothing to copy ahead.
    let own = boot(&host);
    assert!(own.precopy().unwrap().is_none());
    drop(own);

    // A copy taken ahead serves the next handover only: one given up leaves none behind.
    let clone = clone_of(&host, &snapshot);
    call(&clone, "Health");
    count_on(&clone, 5);
    assert!(clone.precopy().unwrap().is_some());
    let saved = clone.handover().unwrap();
    assert!(matches!(
        saved.kind(),
        SavedMemory::Clone { base: Some(_), .. }
    ));
    clone.resume().unwrap();
    let saved = clone.handover().unwrap();
    assert!(matches!(
        saved.kind(),
        SavedMemory::Clone { base: None, .. }
    ));
    clone.resume().unwrap();

    // Copied while the guest runs; the guest writes on (its counter), then freezes.
    let copy = clone.precopy().unwrap().unwrap();
    // This KVM logs a VM's writes: frozen, only the pages written since are copied (debug
    // builds check each page skipped is unchanged).
    assert!(copy.logged);
    let (pages, id) = (copy.pages, copy.id);
    let plain = prepared(&host, &clone);
    let shell = prepared(&host, &clone).with_base(&pages, id).unwrap();
    let before = count_on(&clone, 10);
    let saved = clone.handover().unwrap();
    let SavedMemory::Clone { delta, base } = saved.kind() else {
        panic!("a clone's handover carries its pages: {:?}", saved.kind());
    };
    assert_eq!(*base, Some(id));
    // Only the pages that changed since travel frozen: some (the counter), not the 1 MiB.
    let (ahead, frozen) = (held_bytes(&pages), held_bytes(delta));
    assert!(ahead > 1 << 20, "{ahead} bytes ahead");
    assert!(frozen > 0 && frozen < 256 << 10, "{frozen} bytes frozen");
    let received = pass_on(&saved);
    clone.stop();
    drop(saved);

    // The delta needs the copy beneath it: neither a VM of its own nor a shell without it.
    for shell in [None, Some(plain)] {
        let err = Vm::restore(
            &host,
            &received,
            CloneConfig {
                devices: agent_devices(),
                shell,
                ..CloneConfig::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                VmError::Clone(
                    vmm::builder::CloneError::BaseMissing | vmm::builder::CloneError::ShellMismatch
                )
            ),
            "{err:?}"
        );
    }
    let new = restore_on(&host, &received, false, Some(shell));
    let after = count_on(&new, 10);
    assert!(after[0] > before[9], "{before:?} then {after:?}");
    call(&new, "Health");
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

/// `handover_then` calls back once with the frozen VM, on the VMM thread (confined: the
/// callback here starts the next VM's freeze from it, as the daemon chains an upgrade's
/// freezes); `finish_handover` completes the state, which restores as `handover`'s does. An
/// ended VM calls back at once with `NotRunning`.
/// Freezes `vms[n]` without waiting; its callback sends it on `tx` and freezes the next.
fn freeze_from(
    vms: Arc<Vec<Arc<Vm>>>,
    n: usize,
    tx: std::sync::mpsc::Sender<(usize, vmm::Frozen)>,
) {
    let vm = Arc::clone(&vms[n]);
    vm.handover_then(move |frozen| {
        tx.send((n, frozen)).unwrap();
        if n + 1 < vms.len() {
            freeze_from(vms, n + 1, tx);
        }
    });
}

#[test]
fn handovers_begun_without_waiting_chain_from_each_vmm_thread() {
    require_kvm!();
    let host = vmm::Host::new();
    let vms: Vec<Arc<Vm>> = (0..3).map(|_| Arc::new(boot(&host))).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    // VM 0's callback passes it on and starts VM 1's freeze, and so on.
    freeze_from(Arc::new(vms.clone()), 0, tx);
    for want in 0..vms.len() {
        let (n, frozen) = rx.recv_timeout(TIMEOUT).unwrap();
        assert_eq!(n, want);
        assert!(!frozen.copies_pages(), "{frozen:?}");
        let vm = &vms[n];
        let saved = vm.finish_handover(frozen).unwrap();
        assert!(matches!(saved.kind(), SavedMemory::Own));
        let new = restore_on(&host, &pass_on(&saved), false, None);
        vm.stop();
        drop(saved);
        assert!(count_on(&new, 2)[1] > 0);
        call(&new, "Health");
    }
    // Each callback ran once: every sender is gone with it.
    assert!(matches!(
        rx.recv_timeout(Duration::from_millis(100)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    vms[0].handover_then(move |frozen| tx.send(frozen).unwrap());
    let frozen = rx.recv_timeout(TIMEOUT).unwrap();
    let err = vms[0].finish_handover(frozen).unwrap_err();
    assert!(matches!(err, vmm::VmmActionError::NotRunning), "{err}");
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

/// Sectors of the watched disk.
const DISK_SECTORS: u64 = 2048;

/// A fresh directory for this test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-handover-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A raw disk image of [`DISK_SECTORS`] sectors whose mailbox (sector 0) says `text`.
fn mailbox_disk(dir: &Path, text: &[u8]) -> PathBuf {
    let path = dir.join("disk.img");
    let file = File::create(&path).unwrap();
    file.set_len(DISK_SECTORS * 512).unwrap();
    post(&path, text);
    path
}

/// Writes `text` into the disk's mailbox (sector 0), as another host process would.
fn post(image: &Path, text: &[u8]) {
    let mut sector0 = [0u8; virtio::BLK_SECTOR0_TEXT_LEN];
    sector0[..text.len()].copy_from_slice(text);
    let file = File::options().write(true).open(image).unwrap();
    file.write_all_at(&sector0, 0).unwrap();
}

/// Sector `n` of the disk image, read on the host.
fn sector(image: &Path, n: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, n * 512)
        .unwrap();
    buf
}

/// The block-watch guest's devices: one empty block slot.
fn watch_devices() -> Vec<DeviceConfig> {
    vec![DeviceConfig::Block(BlockConfig {
        id: "slot-0".into(),
        path: None,
        read_only: false,
    })]
}

/// Boots the block-watch guest on an empty slot and waits until it waits for its disk.
fn watching(host: &vmm::Host) -> Vm {
    let mut c = VmConfig::new(Guest::Virtio.elf());
    c.mem_mib = 32;
    c.cmdline = format!("{} {}", virtio::TEST_BLK, virtio::BLK_WATCH);
    c.devices = watch_devices();
    let vm = Vm::start(host, c).unwrap();
    wait_console(&vm, VIRTIO_BLK_WAITING_FOR_CONFIG_CHANGE);
    vm
}

/// Posts `text` and waits for the guest's answer, on its console and in the file.
fn exchange(vm: &Vm, image: &Path, text: &[u8]) -> String {
    post(image, text);
    let console = wait_console(vm, &virtio_blk_mailbox_ack(text));
    assert_eq!(
        sector(image, virtio::BLK_ACK_SECTOR),
        virtio::blk_ack(text),
        "the answer to {text:?} is not in the file"
    );
    assert!(!console.contains(VIRTIO_FAIL), "{console}");
    console
}

/// Second descriptors of the disks, as `SCM_RIGHTS` would give another process.
fn dup_disks(blocks: &[Option<BlockFile>]) -> Vec<Option<BlockFile>> {
    blocks
        .iter()
        .map(|b| {
            b.as_ref().map(|b| BlockFile {
                file: b.file.try_clone().unwrap(),
                read_only: b.read_only,
                sectors: b.sectors,
            })
        })
        .collect()
}

/// An error and its sources, as the daemon prints them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text = format!("{text}: {e}");
        source = e.source();
    }
    text
}

/// Waits for the block-watch guest's end after its disk was detached.
fn finish(vm: &Vm) -> String {
    let end = vm
        .wait_timeout(TIMEOUT)
        .expect("the guest ends after the detach");
    let console = vm.console();
    assert!(matches!(end.exit, VmExit::Reset(_)), "{end:?}: {console}");
    for line in [
        virtio_blk_config_change(0).as_str(),
        VIRTIO_NO_FAILURES,
        VIRTIO_DONE,
    ] {
        assert!(console.contains(line), "no {line:?} in {console}");
    }
    console
}

#[test]
fn a_disk_attached_at_run_time_goes_over_with_the_vm_unseen_by_its_guest() {
    require_kvm!();
    let host = vmm::Host::new();
    let dir = temp_dir("disk");
    let image = mailbox_disk(&dir, b"mail-0");
    let vm = watching(&host);
    // As a container's disk comes: hot-plugged into the running guest's empty slot.
    vm.attach_disk(0, &image, false).unwrap();
    wait_console(&vm, &virtio_blk_watching(DISK_SECTORS));
    exchange(&vm, &image, b"mail-0");
    let pattern = sector(&image, virtio::BLK_PATTERN_SECTOR);
    assert_eq!(pattern, virtio::blk_pattern()[..512]);
    exchange(&vm, &image, b"mail-1");

    let shell = prepared(&host, &vm);
    let mut saved = vm.handover().unwrap();
    let disk = DiskInfo {
        read_only: false,
        sectors: DISK_SECTORS,
    };
    assert_eq!(saved.disks(), [Some(disk)]);
    let files = saved.take_files();
    let [Some(block)] = files.blocks.as_slice() else {
        panic!("one slot with its disk: {:?}", files.blocks);
    };
    assert_eq!((block.read_only, block.sectors), (false, DISK_SECTORS));
    let received = pass_on(&saved);
    assert_eq!(received.disks(), [Some(disk)]);
    let new = Vm::restore(
        &host,
        &received,
        CloneConfig {
            devices: watch_devices(),
            disks: dup_disks(&files.blocks),
            paused: true,
            shell: Some(shell),
            ..CloneConfig::default()
        },
    )
    .unwrap();
    assert_eq!(vm.stop().exit, VmExit::Stopped);
    drop((vm, saved, files));
    new.resume().unwrap();

    // The guest reads the pattern it wrote before the handover and what the host posts, and
    // its answer lands in the file; it was told of no change.
    exchange(&new, &image, b"mail-2");
    let console = exchange(&new, &image, b"mail-3");
    assert!(
        !console.contains(VIRTIO_BLK_WAITING_FOR_CONFIG_CHANGE),
        "a new boot: {console}"
    );
    assert_eq!(sector(&image, virtio::BLK_PATTERN_SECTOR), pattern);
    // The slot is the new VM's: a detach reaches the guest (it then ends its watch).
    new.detach_disk(0).unwrap();
    let console = finish(&new);
    // The detach was the one configuration change the guest heard of after the handover.
    let changes: Vec<_> = console
        .lines()
        .filter(|l| l.starts_with(VIRTIO_BLK_CONFIG_CHANGE))
        .collect();
    assert_eq!(
        changes,
        [virtio_blk_config_change(0).trim_end()],
        "{console}"
    );
    drop(new);
    assert!(host.wait_all_torn_down(TIMEOUT));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_restore_refuses_a_disk_that_is_not_the_one_its_guest_knew() {
    require_kvm!();
    let host = vmm::Host::new();
    let dir = temp_dir("size");
    let image = mailbox_disk(&dir, b"mail-0");
    let vm = watching(&host);
    vm.attach_disk(0, &image, false).unwrap();
    exchange(&vm, &image, b"mail-0");
    let mut saved = vm.handover().unwrap();
    let files = saved.take_files();
    let received = pass_on(&saved);
    let restore = |disks: Vec<Option<BlockFile>>| {
        let config = CloneConfig {
            devices: watch_devices(),
            disks,
            paused: true,
            ..CloneConfig::default()
        };
        Vm::restore(&host, &received, config).map(drop).unwrap_err()
    };

    // The file grew after the handover: the guest would see another capacity unannounced.
    let file = File::options().write(true).open(&image).unwrap();
    file.set_len(2 * DISK_SECTORS * 512).unwrap();
    let err = restore(dup_disks(&files.blocks));
    assert!(
        matches!(
            &err,
            VmError::Device(DeviceError::RestoreDisk {
                index: 0,
                source: BlockError::CapacityChanged {
                    recorded: DISK_SECTORS,
                    found: 4096
                }
            })
        ),
        "{err:?}"
    );
    let text = chain(&err);
    assert!(text.contains("block slot 0"), "{text}");
    assert!(text.contains("4096 sectors"), "{text}");
    file.set_len(DISK_SECTORS * 512).unwrap();
    // Without its disk, or with one the guest did not see, the slot would change unannounced.
    let err = restore(Vec::new());
    assert!(
        matches!(
            &err,
            VmError::Device(DeviceError::DiskMismatch {
                index: 0,
                saved: Some(_),
                restored: None
            })
        ),
        "{err:?}"
    );
    assert!(
        chain(&err).contains(
            "held a disk of 2048 sectors when the VM was saved, rebuilt it would hold no disk"
        ),
        "{err:?}"
    );
    let mut read_only = dup_disks(&files.blocks);
    read_only[0].as_mut().unwrap().read_only = true;
    let err = restore(read_only);
    assert!(
        matches!(&err, VmError::Device(DeviceError::DiskMismatch { .. })),
        "{err:?}"
    );
    // A disk for a slot the VM does not have.
    let mut extra = dup_disks(&files.blocks);
    extra.extend(dup_disks(&files.blocks));
    let err = restore(extra);
    assert!(
        matches!(&err, VmError::Device(DeviceError::NoSuchSlot(1))),
        "{err:?}"
    );

    // Nothing moved: the old VM goes on with its disk.
    drop((saved, files, received));
    vm.resume().unwrap();
    exchange(&vm, &image, b"mail-1");
    vm.detach_disk(0).unwrap();
    finish(&vm);
    drop(vm);
    assert!(host.wait_all_torn_down(TIMEOUT));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_disk_without_a_file_refuses_the_handover_and_the_vm_runs_on() {
    require_kvm!();
    let host = vmm::Host::new();
    let vm = watching(&host);
    // A backend that lives in this process only.
    let disk = devices::test_utils::MemDisk::new(usize::try_from(DISK_SECTORS * 512).unwrap());
    vm.request(vmm::VmmAction::AttachDisk {
        index: 0,
        disk: Box::new(disk),
        read_only: false,
    })
    .unwrap();
    wait_console(&vm, &virtio_blk_watching(DISK_SECTORS));
    wait_console(&vm, "virtio: blk: readback ok\n");
    let err = vm.handover().unwrap_err();
    let chain = chain(&err);
    assert!(
        matches!(
            err,
            vmm::VmmActionError::Snapshot(vmm::SnapshotError::Files(_))
        ),
        "{err:?}"
    );
    assert!(
        chain.contains("block slot 0 cannot be handed over"),
        "{chain}"
    );
    // Refused before anything froze: the guest still runs and takes the detach.
    vm.detach_disk(0).unwrap();
    finish(&vm);
}
