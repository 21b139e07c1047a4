// SPDX-License-Identifier: Apache-2.0
//! The restart contract (docs/restarts.md) against the real `sandboxer` binary: a sandbox
//! runs (a KVM test guest speaking the agent protocol) with a pod network namespace that the
//! test makes as CNI would; the daemon is killed with SIGKILL, its VMs die with it; a new
//! daemon on the same state directory reports the sandbox `SANDBOX_NOTREADY` with an exit,
//! answers Wait (many at once), and Shutdown leaves nothing: no tap or ingress qdisc in the
//! netns, no file, socket or mount of the sandbox. Needs root, iproute2 and KVM.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::V2Client;
use common::netns::{Netns, can_make_netns};
use containerd_client::services::v1::sandbox::{
    ControllerCreateRequest, ControllerShutdownRequest, ControllerStartRequest,
    ControllerStatusRequest, ControllerWaitRequest,
};
use test_guests::require_kvm;

/// A daemon process, killed when dropped (a failing test must not leave it running).
struct Daemon(Child);

impl Daemon {
    fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the daemon on `dir` and connects to it.
async fn daemon(dir: &Path) -> (Daemon, V2Client) {
    let socket = dir.join("api.sock");
    let child = common::guest_daemon::spawn(dir, &socket, &[], "error");
    let child = Daemon(child);
    let client = V2Client::new(containerd_client::connect(&socket).await.unwrap());
    (child, client)
}

async fn status(c: &mut V2Client, id: &str) -> (String, bool) {
    let s = c
        .status(ControllerStatusRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (s.state, s.exited_at.is_some())
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_killed_daemon_leaves_nothing_after_restart_and_shutdown() {
    require_kvm!();
    if !can_make_netns() {
        return;
    }
    let net = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    let (mut first, mut c) = daemon(tmp.path()).await;
    c.create(ControllerCreateRequest {
        sandbox_id: "pod".into(),
        netns_path: net.path(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.start(ControllerStartRequest {
        sandbox_id: "pod".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(status(&mut c, "pod").await, ("SANDBOX_READY".into(), false));
    assert!(net.links().contains("tap"), "{}", net.links());
    assert!(net.has_ingress());
    let pod_dir = tmp.path().join("state/sbs/pod");
    assert!(pod_dir.join("task.sock").exists() && pod_dir.join("vsock.sock").exists());

    // The daemon dies without cleaning up: its VM goes with it, the tap with its fd; the
    // qdisc and filters on eth0 and the sandbox's files stay behind.
    drop(c);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(net.has_ingress(), "the redirect should outlive the process");

    let (mut second, mut c) = daemon(tmp.path()).await;
    assert_eq!(
        status(&mut c, "pod").await,
        ("SANDBOX_NOTREADY".into(), true)
    );
    let waits: Vec<_> = (0..2)
        .map(|_| {
            let mut w = c.clone();
            tokio::spawn(async move {
                w.wait(ControllerWaitRequest {
                    sandbox_id: "pod".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().exit_status)
            })
        })
        .collect();
    for w in waits {
        let exit = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("Wait after a restart must return")
            .unwrap()
            .unwrap();
        assert_ne!(exit, 0, "a VM lost with its daemon did not end cleanly");
    }
    c.shutdown(ControllerShutdownRequest {
        sandbox_id: "pod".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!pod_dir.exists(), "the sandbox's directory is left");
    assert!(!net.links().contains("tap"), "{}", net.links());
    assert!(!net.has_ingress(), "the ingress qdisc is left on eth0");
    assert!(net.links().contains("eth0"), "the pod's own eth0 must stay");
    assert_eq!(mounts_under(tmp.path()), Vec::<String>::new());
    let state = tmp.path().join("state");
    let left: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .chain(std::fs::read_dir(state.join(controller::store::SANDBOXES_DIR)).unwrap())
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        // Daemon-owned files, not the sandbox's.
        .filter(|n| n != "images" && n != "templates.json" && n != controller::store::SANDBOXES_DIR)
        .collect();
    assert!(left.is_empty(), "left in the state dir: {left:?}");
    drop(c);
    second.kill().unwrap();
    second.wait().unwrap();
}
