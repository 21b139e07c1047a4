// SPDX-License-Identifier: Apache-2.0
//! `[cgroup] charge_memory` (controller/src/memcg.rs) against the real `sandboxer` binary with
//! the KVM test guest: a sandbox's guest memory is charged to a memory cgroup of its own, not
//! to the daemon's, and a guest that does not fit its cgroup's limit fails Start with
//! `RESOURCE_EXHAUSTED` naming the cgroup.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::guest_daemon;
use common::{V2Client, expect_code};
use containerd_client::services::v1::sandbox::{
    ControllerCreateRequest, ControllerShutdownRequest, ControllerStartRequest,
    ControllerStopRequest,
};
use controller::memcg::MemoryCgroups;
use prost::Message;
use test_guests::{agent, require_kvm};

/// The guest memory of the test daemon's VMs (`guest_daemon::spawn`).
const GUEST_MIB: u64 = 32;

/// A pod config naming `cgroup_parent`, with no memory limit (the VM keeps the daemon's size).
fn pod_in(parent: &str) -> prost_types::Any {
    use proto::cri::v1 as cri;
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "charged".into(),
            uid: "uid-charged".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "charged".into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: parent.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    prost_types::Any {
        type_url: "runtime.v1.PodSandboxConfig".into(),
        value: config.encode_to_vec(),
    }
}

/// The daemon, killed on drop: a failing test leaves none behind.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the test's memory cgroups, deepest first, whatever happened.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[tokio::test]
async fn guest_memory_is_charged_to_the_sandboxs_memory_cgroup() {
    require_kvm!();
    let parent = format!("sandboxer-test-memcg-{}", std::process::id());
    let memcgs = MemoryCgroups::probe(Path::new(&parent))
        .expect("this host has a memory cgroup hierarchy (v1 memory or v2 with +memory)");
    let small = format!("{parent}/small");
    let _cleanup = Cleanup(vec![
        memcgs.dir(Path::new(&parent)),
        memcgs.dir(Path::new(&small)),
    ]);
    // A pod parent whose limit is half the guest's memory.
    std::fs::create_dir_all(memcgs.dir(Path::new(&small))).unwrap();
    let limit = ((GUEST_MIB / 2) << 20).to_string();
    let limit_file = ["memory.max", "memory.limit_in_bytes"]
        .map(|f| memcgs.dir(Path::new(&small)).join(f))
        .into_iter()
        .find(|f| f.exists())
        .unwrap();
    std::fs::write(&limit_file, &limit).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let config = dir.path().join("config.toml");
    // CPU cgroups off: the pod parent below exists in the memory hierarchy only (kubelet makes
    // it in every hierarchy).
    std::fs::write(
        &config,
        format!("[cgroup]\nenabled = false\ncharge_memory = true\nparent = \"{parent}\"\n"),
    )
    .unwrap();
    let args = [agent::QUIET, agent::EXIT_ON_SHUTDOWN];
    let extra = [OsStr::new("--config"), config.as_os_str()];
    let mut daemon = Daemon(guest_daemon::spawn_with(
        dir.path(),
        &socket,
        &args,
        "warn",
        &extra,
    ));
    let mut c = V2Client::new(containerd_client::connect(&socket).await.unwrap());

    // Charged: the sandbox's cgroup holds all of its guest memory from Start on.
    let id = "charged-1";
    c.create(ControllerCreateRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.start(ControllerStartRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let group = PathBuf::from(&parent).join(id);
    let charged = memcgs.usage(&group).unwrap();
    assert!(
        charged >= GUEST_MIB << 20,
        "{} holds {charged} bytes, less than the guest's {GUEST_MIB} MiB",
        memcgs.dir(&group).display()
    );
    c.stop(ControllerStopRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.shutdown(ControllerShutdownRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        !memcgs.dir(&group).exists(),
        "the sandbox's memory cgroup outlived it"
    );

    // Too small: Start fails naming the cgroup, and the daemon goes on.
    let id = "charged-2";
    c.create(ControllerCreateRequest {
        sandbox_id: id.into(),
        options: Some(pod_in(&format!("/{small}"))),
        ..Default::default()
    })
    .await
    .unwrap();
    let refused = expect_code(
        c.start(ControllerStartRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await,
        tonic::Code::ResourceExhausted,
    );
    assert!(refused.contains(&small), "{refused}");
    assert!(refused.contains("memory cgroup"), "{refused}");
    c.shutdown(ControllerShutdownRequest {
        sandbox_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!memcgs.dir(&Path::new(&small).join(id)).exists());
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon ended");
}
