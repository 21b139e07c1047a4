// SPDX-License-Identifier: Apache-2.0
//! The real `sandboxer` binary as a daemon whose VMs boot the agent-mode KVM test guest.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_guests::{Guest, agent};

/// The daemon binary of this package.
pub const BIN: &str = env!("CARGO_BIN_EXE_sandboxer");

/// Starts the daemon with its API on `socket` and its state in `<dir>/state`, its VMs booting
/// the test guest with `guest_args` on its command line (32 MiB, 2 block slots, no shell
/// pool), and waits until it listens. Blocks the calling thread up to 30 s.
pub fn spawn(dir: &Path, socket: &Path, guest_args: &[&str], log_level: &str) -> Child {
    spawn_with(dir, socket, guest_args, log_level, &[])
}

/// [`spawn`] with `extra` arguments for `sandboxer serve` after the others.
pub fn spawn_with(
    dir: &Path,
    socket: &Path,
    guest_args: &[&str],
    log_level: &str,
    extra: &[&std::ffi::OsStr],
) -> Child {
    let _ = std::fs::remove_file(socket);
    let initramfs = dir.join("initramfs.img");
    std::fs::write(&initramfs, b"not an initramfs: the test guest ignores it").unwrap();
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .arg("--seed-socket=")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--kernel")
        .arg(Guest::Virtio.elf())
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--cmdline")
        .arg(agent::cmdline(vmm::config::DEFAULT_CMDLINE, guest_args))
        .args(["--mem-mib", "32", "--blk-slots", "2", "--pool-depth", "0"])
        .args(["--log-level", log_level])
        .arg("--containerd-address=")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the daemon exited: {status}");
        }
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
