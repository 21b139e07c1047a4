// SPDX-License-Identifier: Apache-2.0
//! The `sandboxer` binary itself: the daemon with the real KVM backend (no VM is booted: the
//! kernel is missing on purpose), systemd notification, SIGTERM, config file and CLI.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{V2Client, expect_code};
use containerd_client::services::v1::sandbox::{
    ControllerCreateRequest, ControllerPlatformRequest, ControllerShutdownRequest,
    ControllerStartRequest, ControllerWaitRequest,
};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_sandboxer");

/// Reads one datagram, waiting up to 60 s (the binary may be slow to start on a busy machine).
fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 256];
    // A signal to this test process (another test's child ending) interrupts the wait.
    let n = loop {
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r.expect("no notification from the daemon"),
        }
    };
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM failed");
}

async fn client(socket: &Path) -> V2Client {
    V2Client::new(containerd_client::connect(socket).await.unwrap())
}

#[tokio::test]
async fn daemon_serves_notifies_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let socket = tmp.path().join("api.sock");
    let seed = tmp.path().join("seed.sock");
    let state = tmp.path().join("state");
    let kernel = tmp.path().join("missing-vmlinux");
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .arg("--seed-socket")
        .arg(&seed)
        .arg("--state-dir")
        .arg(&state)
        .arg("--kernel")
        .arg(&kernel)
        .args(["--log-level", "debug"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    assert_eq!(recv(&notify), "READY=1");
    // READY means both sockets accept.
    assert!(socket.exists() && seed.exists());
    // Every thread of the daemon (main, runtime workers, API) runs under the seccomp baseline.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    let mut threads = 0;
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(status.contains("Seccomp:\t2\n"), "{status}");
        threads += 1;
    }
    assert!(threads > 1, "{threads} threads");
    let mut c = client(&socket).await;
    c.create(ControllerCreateRequest {
        sandbox_id: "pod".into(),
        sandboxer: "sandboxer".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = c
        .platform(ControllerPlatformRequest {
            sandbox_id: "pod".into(),
            sandboxer: "sandboxer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.platform.unwrap().architecture, "amd64");
    // The real KVM backend refuses a missing kernel before touching KVM.
    let msg = expect_code(
        c.start(ControllerStartRequest {
            sandbox_id: "pod".into(),
            sandboxer: "sandboxer".into(),
        })
        .await,
        Code::FailedPrecondition,
    );
    assert!(msg.contains("missing-vmlinux"), "{msg}");
    let exit = c
        .wait(ControllerWaitRequest {
            sandbox_id: "pod".into(),
            sandboxer: "sandboxer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exit.exit_status, 255);
    let mut seed_client = controller::client::seed_client(&seed).await.unwrap();
    let s = seed_client
        .status(proto::seed::sandbox::ControllerStatusRequest {
            sandboxer: "vmm".into(),
            sandbox_id: "pod".into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "SANDBOX_NOTREADY");
    c.shutdown(ControllerShutdownRequest {
        sandbox_id: "pod".into(),
        sandboxer: "sandboxer".into(),
    })
    .await
    .unwrap();
    assert!(
        !state
            .join(controller::store::SANDBOXES_DIR)
            .join("pod")
            .exists()
    );
    drop((c, seed_client));

    sigterm(&child);
    assert_eq!(recv(&notify), "STOPPING=1");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(!socket.exists() && !seed.exists(), "sockets left behind");
}

#[tokio::test]
async fn serve_subcommand_reads_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("from-config.sock");
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[api]\nsocket = \"{}\"\nseed_socket = \"\"\n[vm]\nvcpus = 2\n",
            tmp.path().join("state").display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon never listened");
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = client(&socket).await;
    c.create(ControllerCreateRequest {
        sandbox_id: "pod".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = c
        .status(
            containerd_client::services::v1::sandbox::ControllerStatusRequest {
                sandbox_id: "pod".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.info.get("vcpus").map(String::as_str), Some("2"));
    drop(c);
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    // The record survives the daemon.
    assert!(tmp.path().join("state/sbs/pod/sandbox.json").exists());
}

#[test]
fn bad_config_and_bad_flags_fail_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, "[vm]\nmemory = 1\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");

    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/sandboxer.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let out = Command::new(BIN).args(["--vcpus", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vm.vcpus"));
}

#[test]
fn vm_run_subcommand_is_still_there() {
    let out = Command::new(BIN)
        .args(["vm", "run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--kernel"));
    let out = Command::new(BIN)
        .args(["vm", "run", "--kernel", "/nonexistent/vmlinux"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start the VM"));
}

/// Linked as `containerd-shim-sandboxer-v1` (what containerd resolves for the runtime type
/// `io.containerd.sandboxer.v1` when it reloads tasks after a restart), the binary answers
/// containerd's `delete` with a `DeleteResponse` and refuses to start a shim.
#[test]
fn shim_name_link_answers_delete_and_refuses_start() {
    use containerd_shim_protos::api::DeleteResponse;
    use containerd_shim_protos::protobuf::Message;

    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join(controller::shim::SHIM_NAME);
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let shim_args = |action: &'static str| {
        [
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c1",
            "-bundle",
            "/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1",
            action,
        ]
    };
    let out = Command::new(&link)
        .args(shim_args("delete"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let resp = DeleteResponse::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(resp.exit_status, controller::shim::KILLED_STATUS);
    assert!(resp.exited_at.seconds > 0);

    let out = Command::new(&link)
        .args(shim_args("start"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a shim") && err.contains("\"start\""),
        "{err}"
    );
}

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A client that opens connections without end runs the daemon out of descriptors: its accept
/// loop must then pause instead of retrying at once (which spun a core), and serve again once
/// descriptors are free.
#[tokio::test]
async fn a_connection_flood_past_the_fd_limit_does_not_spin_the_daemon() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};

    // This process opens the connections: its own limit must not stop it first.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let socket_path = tmp.path().join("api.sock");
    // 64 descriptors in all (soft and hard): the daemon cannot raise it.
    let mut child = Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg(BIN)
        .arg("--socket")
        .arg(&socket_path)
        .args(["--seed-socket", ""])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--kernel")
        .arg(tmp.path().join("missing-vmlinux"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(recv(&notify), "READY=1");

    // Up to 2,000 connections. tokio connects without blocking: once the daemon stops
    // accepting and the listen backlog is full, a connect fails (EAGAIN) instead of waiting.
    let mut conns = Vec::new();
    for _ in 0..2000 {
        match tokio::net::UnixStream::connect(&socket_path).await {
            Ok(conn) => conns.push(conn),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connect: {e}"),
        }
    }
    assert!(conns.len() > 64, "only {} connections", conns.len());

    // Out of descriptors, with connections waiting: the daemon idles.
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(child.id()) - before;
    // 3 s are 300 ticks at 100 Hz; a spinning accept loop takes all of them.
    assert!(
        used < 30,
        "the daemon used {used} ticks of CPU in 3 s with {} connections open",
        conns.len()
    );

    // The flood ends: the daemon serves again (its pause is at most a second).
    drop(conns);
    let mut c = client(&socket_path).await;
    let msg = expect_code(
        c.platform(ControllerPlatformRequest {
            sandbox_id: "no-such-pod".into(),
            sandboxer: "sandboxer".into(),
        })
        .await,
        Code::NotFound,
    );
    assert!(msg.contains("no-such-pod"), "{msg}");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}
