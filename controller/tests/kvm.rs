// SPDX-License-Identifier: Apache-2.0
//! KVM tests of the real backend: sandboxes whose VMs boot the project's test guests on
//! `/dev/kvm`, driven through the containerd 2.x API of the daemon.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::time::{Duration, Instant};

use common::V2Client;
use containerd_client::services::v1::sandbox::{
    ControllerCreateRequest, ControllerMetricsRequest, ControllerShutdownRequest,
    ControllerStartRequest, ControllerStatusRequest, ControllerStopRequest, ControllerWaitRequest,
};
use controller::KvmBackend;
use controller::config::Config;
use test_guests::{Guest, require_kvm};
use tokio::sync::oneshot;

struct KvmDaemon {
    dir: tempfile::TempDir,
    client: V2Client,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), controller::server::ServerError>>,
}

async fn daemon(guest: Guest) -> KvmDaemon {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        state_dir: dir.path().join("state"),
        stop_timeout_secs: 1,
        ..Config::default()
    };
    config.api.socket = dir.path().join("api.sock");
    config.api.seed_socket = "".into();
    config.vm.kernel = guest.elf().to_path_buf();
    config.vm.mem_mib = 32;
    let (tx, rx) = oneshot::channel::<()>();
    let run_config = config.clone();
    let task = tokio::spawn(async move {
        controller::server::run(&run_config, KvmBackend, async {
            let _ = rx.await;
        })
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&config.api.socket).is_err() {
        assert!(Instant::now() < deadline, "daemon never listened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let client = V2Client::new(
        containerd_client::connect(&config.api.socket)
            .await
            .unwrap(),
    );
    KvmDaemon {
        dir,
        client,
        stop: tx,
        task,
    }
}

impl KvmDaemon {
    async fn finish(self) {
        drop(self.client);
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
        drop(self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_vm_runs_until_stopped() {
    require_kvm!();
    let mut d = daemon(Guest::Spin).await;
    let c = &mut d.client;
    c.create(ControllerCreateRequest {
        sandbox_id: "spin".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let st = c
        .start(ControllerStartRequest {
            sandbox_id: "spin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.version, 3);
    let status = c
        .status(ControllerStatusRequest {
            sandbox_id: "spin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, "SANDBOX_READY");

    // The guest runs: it signals the boot timer and prints to the console log.
    let console = d.dir.path().join("state/spin/console.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = c
            .metrics(ControllerMetricsRequest {
                sandbox_id: "spin".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let data: serde_json::Value =
            serde_json::from_slice(&m.metrics.unwrap().data.unwrap().value).unwrap();
        let printed = std::fs::read(&console).unwrap_or_default();
        if data["boot_time_ns"].as_u64() > Some(0) && printed.contains(&b'.') {
            assert!(data["guest_resident_bytes"].as_u64() > Some(0), "{data}");
            break;
        }
        assert!(Instant::now() < deadline, "guest never booted: {data}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut waiter = c.clone();
    let w = tokio::spawn(async move {
        waiter
            .wait(ControllerWaitRequest {
                sandbox_id: "spin".into(),
                ..Default::default()
            })
            .await
    });
    c.stop(ControllerStopRequest {
        sandbox_id: "spin".into(),
        timeout_secs: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let exit = w.await.unwrap().unwrap().into_inner();
    // No agent yet, so Stop stops the VM at once: an orderly stop, status 0.
    assert_eq!(exit.exit_status, 0);
    c.shutdown(ControllerShutdownRequest {
        sandbox_id: "spin".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!d.dir.path().join("state/spin").exists());
    d.finish().await;
    assert!(
        vmm::wait_all_torn_down(Duration::from_secs(10)),
        "a VM leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ends_itself_ends_the_sandbox() {
    require_kvm!();
    let mut d = daemon(Guest::Quick).await;
    let c = &mut d.client;
    c.create(ControllerCreateRequest {
        sandbox_id: "quick".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.start(ControllerStartRequest {
        sandbox_id: "quick".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let exit = tokio::time::timeout(
        Duration::from_secs(30),
        c.wait(ControllerWaitRequest {
            sandbox_id: "quick".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("the guest did not end")
    .unwrap()
    .into_inner();
    // The guest's triple fault is how a firmware-less guest ends: a clean end.
    assert_eq!(exit.exit_status, 0);
    let status = c
        .status(ControllerStatusRequest {
            sandbox_id: "quick".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, "SANDBOX_NOTREADY");
    assert_eq!(status.exited_at, exit.exited_at);
    let console = std::fs::read_to_string(d.dir.path().join("state/quick/console.log")).unwrap();
    assert!(
        console.contains(test_guests::console::QUICK_BYE),
        "{console}"
    );
    d.finish().await;
}
