// SPDX-License-Identifier: Apache-2.0
//! The agent booted for real as PID 1 of the guest kernel under QEMU (`-M microvm`, TCG), with
//! virtio-vsock through `vhost-user-vsock-device` and the `vhost-device-vsock` daemon, driven
//! over vsock with real ttrpc clients, the way the sandboxer drives it:
//!
//! 1. listen on `<uds>_1025` (hybrid vsock: a guest connection to CID 2 port P goes to
//!    `<uds>_P`), boot, read `READY 1024\n`;
//! 2. connect to `<uds>`, write `CONNECT 1024\n`, read `OK ...\n`, and speak ttrpc on that
//!    stream: Control.Health, Task.State of an unknown id (NOT_FOUND), Control.Setup,
//!    Control.SyncClock (which sets the guest clock for real);
//! 3. Control.Shutdown: the answer arrives, then the VM ends by itself (`reboot=t` triple
//!    fault, QEMU `-no-reboot` exits 0).
//!
//! The static agent is built and packed here by `tools/devtool initramfs` (quick when up to
//! date). Needs QEMU, `vhost-device-vsock` (tests/setup installs both) and the cached guest
//! kernel (`guest/build-kernel`). Missing pieces make a loud SKIP; the test fails instead under
//! CI (`CI=true`, or `SANDBOXER_REQUIRE_GUEST=1`), and with `SANDBOXER_REQUIRE_KVM=1` when QEMU
//! or vhost-device-vsock is missing (tests/run builds the kernel before the workspace's tests).
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(clippy::tests_outside_test_module, reason = "integration test file")]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::StateRequest;
use containerd_shim_protos::shim_async::TaskClient;
use proto::agent::control::{Dns, HealthRequest, SetupRequest, ShutdownRequest, SyncClockRequest};
use proto::agent::control_ttrpc::ControlClient;
use ttrpc::Code;
use ttrpc::asynchronous::Client;
use ttrpc::asynchronous::transport::Socket;

/// How long the guest gets to boot and announce itself (TCG on a shared machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The agent's vsock ports (cmdline defaults).
const AGENT_PORT: u32 = 1024;
const READY_PORT: u32 = 1025;

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).as_deref() == Ok(value)
}

/// Skips loudly, or fails when `required`.
fn skip(why: &str, required: bool) {
    if required {
        panic!("{why} (required: SANDBOXER_REQUIRE_GUEST=1, or CI / SANDBOXER_REQUIRE_KVM=1)");
    }
    eprintln!("SKIP qemu_vsock: {why}");
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate is in the workspace")
        .to_owned()
}

/// `<target>/debug/deps/qemu_vsock-<hash>` -> `<target>`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .expect("test binary under <target>/<profile>/deps")
        .to_owned()
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    std::env::split_paths(&path)
        .chain(cargo_home.map(|h| h.join("bin")))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[derive(Debug)]
struct Tools {
    qemu: PathBuf,
    vhost: PathBuf,
    vmlinux: PathBuf,
}

fn preconditions() -> Option<Tools> {
    let require_guest = env_is("SANDBOXER_REQUIRE_GUEST", "1") || env_is("CI", "true");
    let require_tools =
        require_guest || env_is("CI", "true") || env_is("SANDBOXER_REQUIRE_KVM", "1");
    let Some(qemu) = find_program("qemu-system-x86_64") else {
        skip(
            "needs qemu-system-x86_64 (tests/setup installs it)",
            require_tools,
        );
        return None;
    };
    let Some(vhost) = find_program("vhost-device-vsock") else {
        skip(
            "needs vhost-device-vsock (tests/setup: cargo install --locked vhost-device-vsock)",
            require_tools,
        );
        return None;
    };
    let out = Command::new(workspace().join("guest/build-kernel"))
        .arg("--cached-only")
        .stderr(Stdio::null())
        .output()
        .expect("run guest/build-kernel --cached-only");
    if !out.status.success() {
        skip(
            "guest kernel not built (guest/build-kernel, or guest/boot-qemu-test --build-kernel)",
            require_guest,
        );
        return None;
    }
    let vmlinux = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("vmlinux="))
        .map(PathBuf::from)
        .expect("build-kernel prints vmlinux=");
    Some(Tools {
        qemu,
        vhost,
        vmlinux,
    })
}

/// Builds the static agent and packs it (stripped) as `/init` of an initramfs in `dir`, the
/// way every build of the product does: `tools/devtool initramfs`.
fn build_initramfs(dir: &Path) -> PathBuf {
    let path = dir.join("initramfs.cpio");
    let status = Command::new(workspace().join("tools/devtool"))
        .args(["initramfs", "--output"])
        .arg(&path)
        .env("CARGO_TARGET_DIR", target_dir())
        .stdout(Stdio::null())
        .status()
        .expect("run tools/devtool initramfs");
    assert!(status.success(), "tools/devtool initramfs failed");
    path
}

/// Child processes killed on drop (QEMU, vhost-device-vsock).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_path(path: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads one `\n`-terminated line (at most 128 bytes) from a blocking stream.
fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            Err(e) => panic!("reading a line: {e}"),
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

struct Vm {
    procs: Procs,
    dir: PathBuf,
    console: PathBuf,
}

impl Vm {
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn qemu(&mut self) -> &mut Child {
        &mut self.procs.0[1]
    }

    /// Fails with the console's tail.
    fn fail(&self, why: &str) -> ! {
        let console = self.console();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{why}\n--- console (last 40 lines) ---\n{}",
            tail.join("\n")
        );
    }

    /// Waits until the console shows `needle`.
    fn wait_console(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.console().contains(needle) {
            if Instant::now() >= deadline {
                self.fail(&format!("console never showed {needle:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn boot(tools: &Tools, dir: &Path, initramfs: &Path) -> (Vm, UnixListener) {
    let vhost_sock = dir.join("vhost.sock");
    let uds = dir.join("vm.sock");
    let vhost = Command::new(&tools.vhost)
        .args(["--guest-cid", "3", "--socket"])
        .arg(&vhost_sock)
        .arg("--uds-path")
        .arg(&uds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vhost-device-vsock");
    let mut procs = Procs(vec![vhost]);
    wait_for_path(&vhost_sock, Duration::from_secs(10));
    // Listen before the guest can dial.
    let ready = UnixListener::bind(format!("{}_{READY_PORT}", uds.display())).unwrap();
    let console = dir.join("console.log");
    let qemu = Command::new(&tools.qemu)
        .args([
            "-M",
            "microvm,acpi=off,memory-backend=mem",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-chardev",
        ])
        .arg(format!("socket,id=vsock0,path={}", vhost_sock.display()))
        .args([
            "-device",
            "vhost-user-vsock-device,chardev=vsock0",
            "-kernel",
        ])
        .arg(&tools.vmlinux)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 reboot=t panic=-1"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu");
    procs.0.push(qemu);
    (
        Vm {
            procs,
            dir: dir.to_owned(),
            console,
        },
        ready,
    )
}

/// Accepts the guest's ready connection and reads its line.
fn read_ready(vm: &mut Vm, listener: &UnixListener) -> String {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Ok(Some(status)) = vm.qemu().try_wait() {
            vm.fail(&format!(
                "QEMU exited ({status}) before the agent was ready"
            ));
        }
        if Instant::now() >= deadline {
            vm.fail("no ready connection from the guest");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    read_line(&mut stream)
}

/// Connects to guest port `port` through the hybrid vsock socket.
async fn dial(vm: &Vm, port: u32) -> Client {
    let mut stream = UnixStream::connect(vm.dir.join("vm.sock")).expect("connect vm.sock");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let reply = read_line(&mut stream);
    assert!(
        reply.starts_with("OK ") && reply.ends_with('\n'),
        "CONNECT {port}: {reply:?}"
    );
    stream.set_read_timeout(None).unwrap();
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(stream).unwrap();
    Client::new(Socket::from(stream))
}

#[tokio::test(flavor = "current_thread")]
async fn agent_in_qemu_answers_over_vsock() {
    let Some(tools) = preconditions() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let initramfs = build_initramfs(dir.path());
    let started = Instant::now();
    let (mut vm, ready) = boot(&tools, dir.path(), &initramfs);

    let line = read_ready(&mut vm, &ready);
    assert_eq!(line, format!("READY {AGENT_PORT}\n"));
    eprintln!("qemu_vsock: READY after {:?}", started.elapsed());

    let client = dial(&vm, AGENT_PORT).await;
    let control = ControlClient::new(client.clone());
    let task = TaskClient::new(client.clone());

    let health = control
        .health(ctx(), &HealthRequest::new())
        .await
        .expect("Control.Health");
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(health.containers, 0);
    assert!(health.uptime_ns > 0);

    let mut state = StateRequest::new();
    state.id = "no-such-container".into();
    match task.state(ctx(), &state).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), Code::NOT_FOUND, "{}", s.message());
            assert!(s.message().contains("no-such-container"), "{}", s.message());
        }
        other => panic!("Task.State of an unknown id: {other:?}"),
    }

    // Setup in the guest: hostname, DNS (/etc/resolv.conf), a sysctl, lo up, and host entropy
    // credited to a real guest kernel's pool (RNDADDENTROPY, RNDRESEEDCRNG).
    let mut setup = SetupRequest::new();
    setup.hostname = "vm-h3".into();
    setup.entropy = (0..64u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
    setup
        .sysctls
        .insert("net.ipv4.ip_forward".into(), "1".into());
    let mut dns = Dns::new();
    dns.servers = vec!["10.0.2.3".into()];
    setup.dns = Some(dns).into();
    control.setup(ctx(), &setup).await.expect("Control.Setup");
    vm.wait_console(
        "Setup done: hostname \"vm-h3\", 64 entropy bytes, 0 interfaces, 0 routes, 1 sysctls",
        Duration::from_secs(10),
    );

    // SyncClock an hour ahead: the guest sets its clock (CLOCK_REALTIME, for real).
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut clock = SyncClockRequest::new();
    clock.unix_nanos = i64::try_from((now + Duration::from_secs(3600)).as_nanos()).unwrap();
    control
        .sync_clock(ctx(), &clock)
        .await
        .expect("Control.SyncClock");
    vm.wait_console("Clock skew 36", Duration::from_secs(10));

    // Shutdown: answered, then the VM ends by itself.
    let mut shutdown = ShutdownRequest::new();
    shutdown.timeout_secs = 1;
    control
        .shutdown(ctx(), &shutdown)
        .await
        .expect("Control.Shutdown");
    let Some(status) = wait_child(vm.qemu(), Duration::from_secs(60)) else {
        vm.fail("QEMU did not exit after Control.Shutdown");
    };
    assert!(status.success(), "QEMU exited with {status}");
    let console = vm.console();
    assert!(
        console.contains("Shutdown requested (grace 1 s)"),
        "{console}"
    );
    assert!(console.contains("reboot: Restarting system"), "{console}");
    eprintln!("qemu_vsock: VM ended {:?} after start", started.elapsed());
}
