// SPDX-License-Identifier: Apache-2.0
//! The containerd 2.x sandbox API, driven through the real gRPC server on a unix socket with
//! containerd's own generated client (the `containerd-client` crate) and the fake VM backend.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use common::{Daemon, V2Client, expect_code, pod_options};
use containerd_client::services::v1::sandbox::{
    ControllerCreateRequest, ControllerMetricsRequest, ControllerPlatformRequest,
    ControllerShutdownRequest, ControllerStartRequest, ControllerStatusRequest,
    ControllerStopRequest, ControllerUpdateRequest, ControllerWaitRequest,
};
use containerd_client::types::{Mount, Sandbox};
use controller::backend::VmExitKind;
use controller::backend::fake::FakeGuest;
use tonic::Code;

const SANDBOXER: &str = "sandboxer";

fn create(id: &str) -> ControllerCreateRequest {
    ControllerCreateRequest {
        sandbox_id: id.into(),
        sandboxer: SANDBOXER.into(),
        ..Default::default()
    }
}

fn start(id: &str) -> ControllerStartRequest {
    ControllerStartRequest {
        sandbox_id: id.into(),
        sandboxer: SANDBOXER.into(),
    }
}

fn stop(id: &str, timeout_secs: u32) -> ControllerStopRequest {
    ControllerStopRequest {
        sandbox_id: id.into(),
        timeout_secs,
        sandboxer: SANDBOXER.into(),
    }
}

fn wait(id: &str) -> ControllerWaitRequest {
    ControllerWaitRequest {
        sandbox_id: id.into(),
        sandboxer: SANDBOXER.into(),
    }
}

fn status(id: &str, verbose: bool) -> ControllerStatusRequest {
    ControllerStatusRequest {
        sandbox_id: id.into(),
        verbose,
        sandboxer: SANDBOXER.into(),
    }
}

fn shutdown(id: &str) -> ControllerShutdownRequest {
    ControllerShutdownRequest {
        sandbox_id: id.into(),
        sandboxer: SANDBOXER.into(),
    }
}

fn platform(id: &str) -> ControllerPlatformRequest {
    ControllerPlatformRequest {
        sandbox_id: id.into(),
        sandboxer: SANDBOXER.into(),
    }
}

fn metrics(id: &str) -> ControllerMetricsRequest {
    ControllerMetricsRequest {
        sandbox_id: id.into(),
        sandboxer: SANDBOXER.into(),
    }
}

async fn state_of(c: &mut V2Client, id: &str) -> String {
    c.status(status(id, false))
        .await
        .unwrap()
        .into_inner()
        .state
}

#[tokio::test]
async fn every_rpc_round_trip() {
    let d = Daemon::start().await;
    let mut c = d.v2().await;
    let before = SystemTime::now() - Duration::from_secs(1);

    let mut req = create("pod-1");
    req.options = Some(pod_options("web-0", 2, 512));
    req.rootfs = vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options: vec!["lowerdir=/l".into(), "upperdir=/u".into()],
    }];
    req.annotations = HashMap::from([("io.kubernetes.cri.sandbox-id".into(), "pod-1".into())]);
    req.sandbox = Some(Sandbox {
        sandbox_id: "pod-1".into(),
        labels: HashMap::from([("tier".into(), "front".into())]),
        sandboxer: SANDBOXER.into(),
        ..Default::default()
    });
    let r = c.create(req).await.unwrap().into_inner();
    assert_eq!(r.sandbox_id, "pod-1");

    let p = c.platform(platform("pod-1")).await.unwrap().into_inner();
    let p = p.platform.unwrap();
    assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "amd64"));

    let s = c.status(status("pod-1", false)).await.unwrap().into_inner();
    assert_eq!(s.state, "SANDBOX_NOTREADY");
    assert_eq!((s.pid, s.version, s.address.as_str()), (0, 0, ""));
    assert!(s.exited_at.is_none());
    let created: SystemTime = s.created_at.unwrap().try_into().unwrap();
    assert!(created >= before);

    let st = c.start(start("pod-1")).await.unwrap().into_inner();
    let sock = d.sandbox_dir("pod-1").join("task.sock");
    assert_eq!(st.sandbox_id, "pod-1");
    assert_eq!(st.address, format!("ttrpc+unix://{}", sock.display()));
    assert_eq!(st.version, 3);
    assert_eq!(st.pid, std::process::id());
    assert_eq!(
        SystemTime::try_from(st.created_at.unwrap()).unwrap(),
        created
    );
    assert_eq!(st.labels.get("app").map(String::as_str), Some("web-0"));
    assert_eq!(st.labels.get("tier").map(String::as_str), Some("front"));
    // The pod's resources sized the VM: 2 CPUs, base memory + 512 MiB.
    let spec = &d.fake.specs()[0];
    assert_eq!((spec.vcpus, spec.mem_mib), (2, 256 + 512));

    let s = c.status(status("pod-1", true)).await.unwrap().into_inner();
    assert_eq!(s.state, "SANDBOX_READY");
    assert_eq!((s.pid, s.version), (std::process::id(), 3));
    assert_eq!(s.address, st.address);
    assert_eq!(s.info.get("hostname").map(String::as_str), Some("web-0"));
    assert_eq!(s.info.get("vcpus").map(String::as_str), Some("2"));
    let extra = s.extra.unwrap();
    let record: serde_json::Value = serde_json::from_slice(&extra.value).unwrap();
    assert_eq!(record["pod"]["dns"]["servers"][0], "10.96.0.10");
    assert_eq!(record["rootfs"][0]["options"][1], "upperdir=/u");

    let m = c.metrics(metrics("pod-1")).await.unwrap().into_inner();
    let m = m.metrics.unwrap();
    assert_eq!(m.id, "pod-1");
    assert!(m.timestamp.is_some());
    let data: serde_json::Value = serde_json::from_slice(&m.data.unwrap().value).unwrap();
    assert_eq!(data["vcpus"], 2);

    // iSulad >= 2.1.6 hands containers over this way.
    let tasks = prost_types::Any {
        type_url: "github.com/containerd/containerd/Tasks".into(),
        value: br#"{"containers":[{"id":"c1"}]}"#.to_vec(),
    };
    c.update(ControllerUpdateRequest {
        sandbox_id: "pod-1".into(),
        sandboxer: String::new(),
        sandbox: Some(Sandbox {
            sandbox_id: "pod-1".into(),
            extensions: HashMap::from([("tasks".into(), tasks)]),
            ..Default::default()
        }),
        fields: vec!["extensions.tasks".into()],
    })
    .await
    .unwrap();
    let s = c.status(status("pod-1", true)).await.unwrap().into_inner();
    let record: serde_json::Value = serde_json::from_slice(&s.extra.unwrap().value).unwrap();
    assert_eq!(record["tasks"]["containers"][0]["id"], "c1");

    // Wait blocks until the sandbox ends; Stop ends it.
    let mut waiter = c.clone();
    let w = tokio::spawn(async move { waiter.wait(wait("pod-1")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!w.is_finished(), "Wait returned before the sandbox ended");
    c.stop(stop("pod-1", 1)).await.unwrap();
    let exit = w.await.unwrap().unwrap().into_inner();
    assert_eq!(exit.exit_status, 0);
    let exited: SystemTime = exit.exited_at.unwrap().try_into().unwrap();
    let s = c.status(status("pod-1", false)).await.unwrap().into_inner();
    assert_eq!(s.state, "SANDBOX_NOTREADY");
    assert_eq!(SystemTime::try_from(s.exited_at.unwrap()).unwrap(), exited);
    // Wait again after the end: same answer at once.
    let again = c.wait(wait("pod-1")).await.unwrap().into_inner();
    assert_eq!(again, exit);

    c.shutdown(shutdown("pod-1")).await.unwrap();
    expect_code(c.status(status("pod-1", false)).await, Code::NotFound);
    assert!(!d.sandbox_dir("pod-1").exists());
    assert_eq!(d.fake.running(), 0);
    d.stop().await;
}

#[tokio::test]
async fn unknown_sandbox_is_not_found_on_every_rpc() {
    let d = Daemon::start().await;
    let mut c = d.v2().await;
    let nf = Code::NotFound;
    let msg = expect_code(c.start(start("ghost")).await, nf);
    assert!(msg.contains("ghost"), "{msg}");
    expect_code(c.platform(platform("ghost")).await, nf);
    expect_code(c.stop(stop("ghost", 0)).await, nf);
    expect_code(c.wait(wait("ghost")).await, nf);
    expect_code(c.status(status("ghost", true)).await, nf);
    expect_code(c.shutdown(shutdown("ghost")).await, nf);
    expect_code(c.metrics(metrics("ghost")).await, nf);
    expect_code(
        c.update(ControllerUpdateRequest {
            sandbox_id: "ghost".into(),
            ..Default::default()
        })
        .await,
        nf,
    );
    d.stop().await;
}

#[tokio::test]
async fn bad_input_gets_precise_codes_and_disturbs_nobody() {
    let d = Daemon::start().await;
    let mut c = d.v2().await;
    c.create(create("bystander")).await.unwrap();
    c.start(start("bystander")).await.unwrap();

    let inv = Code::InvalidArgument;
    let msg = expect_code(c.create(create("")).await, inv);
    assert!(msg.contains("sandbox_id"), "{msg}");
    for bad in ["a/b", "../x", "-x", ".hidden", "a b", &"x".repeat(129)] {
        let msg = expect_code(c.create(create(bad)).await, inv);
        assert!(msg.contains("sandbox_id"), "{bad}: {msg}");
    }
    expect_code(c.start(start("")).await, inv);
    expect_code(c.stop(stop("", 0)).await, inv);
    expect_code(c.wait(wait("")).await, inv);
    expect_code(c.status(status("", false)).await, inv);
    expect_code(c.shutdown(shutdown("a/b")).await, inv);
    expect_code(c.platform(platform("")).await, inv);
    expect_code(c.metrics(metrics("")).await, inv);

    let msg = expect_code(c.create(create("bystander")).await, Code::AlreadyExists);
    assert!(msg.contains("bystander"), "{msg}");
    let msg = expect_code(c.start(start("bystander")).await, Code::FailedPrecondition);
    assert!(msg.contains("ready"), "{msg}");

    let mut req = create("netns");
    req.netns_path = "/nonexistent/netns/pod".into();
    let msg = expect_code(c.create(req).await, inv);
    assert!(msg.contains("netns_path"), "{msg}");
    let mut req = create("opts");
    req.options = Some(prost_types::Any {
        type_url: "runtime.v1.PodSandboxConfig".into(),
        value: vec![0xff; 8],
    });
    let msg = expect_code(c.create(req).await, inv);
    assert!(msg.contains("options"), "{msg}");

    c.create(create("fresh")).await.unwrap();
    expect_code(c.metrics(metrics("fresh")).await, Code::FailedPrecondition);
    let msg = expect_code(
        c.update(ControllerUpdateRequest {
            sandbox_id: "fresh".into(),
            fields: vec!["no-such-field".into()],
            ..Default::default()
        })
        .await,
        inv,
    );
    assert!(msg.contains("no-such-field"), "{msg}");

    // Nothing else was created, and the bystander still runs.
    let mut dirs: Vec<_> = std::fs::read_dir(d.state().join(controller::store::SANDBOXES_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["bystander", "fresh"]);
    assert_eq!(state_of(&mut c, "bystander").await, "SANDBOX_READY");
    assert_eq!(d.fake.running(), 1);
    d.stop().await;
}

#[tokio::test]
async fn missing_kernel_is_failed_precondition() {
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), |c| {
        c.vm.kernel = "/nonexistent/vmlinux".into();
    })
    .await;
    let mut c = d.v2().await;
    c.create(create("pod")).await.unwrap();
    let msg = expect_code(c.start(start("pod")).await, Code::FailedPrecondition);
    assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
    let exit = c.wait(wait("pod")).await.unwrap().into_inner();
    assert_eq!(exit.exit_status, 255);
    assert_eq!(state_of(&mut c, "pod").await, "SANDBOX_NOTREADY");
    c.shutdown(shutdown("pod")).await.unwrap();
    assert!(!d.sandbox_dir("pod").exists());
    d.stop().await;
}

#[tokio::test]
async fn twenty_sandboxes_created_and_started_at_once() {
    const N: usize = 20;
    let d = Daemon::start().await;
    // Each start waits until all N are in flight: if the server serialized them, this would hang.
    d.fake.set_start_gate(N);
    let c = d.v2().await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("pod-{i}");
            let mut req = create(&id);
            req.options = Some(pod_options(&id, 1, 64));
            c.create(req).await?;
            c.start(start(&id)).await.map(|r| r.into_inner())
        }));
    }
    let all = async {
        let mut addresses = Vec::new();
        for t in tasks {
            addresses.push(t.await.unwrap().unwrap().address);
        }
        addresses
    };
    let addresses = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("concurrent starts did not all finish");
    addresses
        .iter()
        .enumerate()
        .for_each(|(i, a)| assert!(a.ends_with(&format!("/pod-{i}/task.sock")), "{a}"));
    assert_eq!(d.fake.running(), N);

    // And all torn down at once.
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("pod-{i}");
            c.stop(stop(&id, 0)).await?;
            c.shutdown(shutdown(&id)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(d.fake.running(), 0);
    assert_eq!(
        std::fs::read_dir(d.state().join(controller::store::SANDBOXES_DIR))
            .unwrap()
            .count(),
        0
    );
    d.stop().await;
}

#[tokio::test]
async fn start_and_stop_racing_on_one_sandbox() {
    let d = Daemon::start().await;
    d.fake.set_start_delay(Duration::from_millis(5));
    let c = d.v2().await;
    let (mut won_start, mut won_stop) = (0, 0);
    for i in 0..20u64 {
        let id = format!("race-{i}");
        let mut c1 = c.clone();
        c1.create(create(&id)).await.unwrap();
        let mut c2 = c.clone();
        let (ia, ib) = (id.clone(), id.clone());
        let a = tokio::spawn(async move { c1.start(start(&ia)).await });
        tokio::time::sleep(Duration::from_millis(i % 8)).await;
        let b = tokio::spawn(async move { c2.stop(stop(&ib, 0)).await });
        let (ra, rb) = (a.await.unwrap(), b.await.unwrap());
        rb.unwrap();
        match ra {
            Ok(_) => won_start += 1,
            Err(s) if s.code() == Code::FailedPrecondition => won_stop += 1,
            Err(s) => panic!("{s:?}"),
        }
        let mut c = c.clone();
        assert_eq!(state_of(&mut c, &id).await, "SANDBOX_NOTREADY");
        assert_eq!(c.wait(wait(&id)).await.unwrap().into_inner().exit_status, 0);
        assert_eq!(d.fake.running(), 0, "a VM outlived Stop");
        c.shutdown(shutdown(&id)).await.unwrap();
    }
    assert_eq!(won_start + won_stop, 20);
    d.stop().await;
}

#[tokio::test]
async fn many_concurrent_waits_see_a_crash() {
    let d = Daemon::start().await;
    let mut c = d.v2().await;
    c.create(create("pod")).await.unwrap();
    c.start(start("pod")).await.unwrap();
    let waits: Vec<_> = (0..16)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { c.wait(wait("pod")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    d.fake
        .handle("pod")
        .unwrap()
        .end_with(VmExitKind::Crashed("guest panic".into()));
    for w in waits {
        assert_eq!(w.await.unwrap().unwrap().into_inner().exit_status, 255);
    }
    let s = c.status(status("pod", false)).await.unwrap().into_inner();
    assert_eq!(s.state, "SANDBOX_NOTREADY");
    assert_eq!(
        s.info.get("exit_reason").map(String::as_str),
        Some("guest panic")
    );
    expect_code(c.metrics(metrics("pod")).await, Code::FailedPrecondition);
    d.stop().await;
}

#[tokio::test]
async fn stop_timeout_is_honoured_then_forced() {
    let d = Daemon::start().await;
    d.fake.set_guest(FakeGuest::Ignores);
    let mut c = d.v2().await;
    c.create(create("pod")).await.unwrap();
    c.start(start("pod")).await.unwrap();
    let t = std::time::Instant::now();
    c.stop(stop("pod", 1)).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        c.wait(wait("pod")).await.unwrap().into_inner().exit_status,
        137
    );
    d.stop().await;
}

#[tokio::test]
async fn restart_reports_lost_vms_and_keeps_created_sandboxes() {
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), |c| {
        c.on_exit = controller::config::OnExit::Leave;
    })
    .await;
    let mut c = d.v2().await;
    c.create(create("running")).await.unwrap();
    c.start(start("running")).await.unwrap();
    c.create(create("created")).await.unwrap();
    drop(c);
    let dir = d.stop().await;

    let d = Daemon::start_in(dir, |_| {}).await;
    let mut c = d.v2().await;
    let s = c
        .status(status("running", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, "SANDBOX_NOTREADY");
    assert!(s.exited_at.is_some());
    let exit = c.wait(wait("running")).await.unwrap().into_inner();
    assert_eq!(exit.exit_status, 255);
    assert_eq!(exit.exited_at, s.exited_at);
    c.shutdown(shutdown("running")).await.unwrap();
    assert!(!d.sandbox_dir("running").exists());

    assert_eq!(state_of(&mut c, "created").await, "SANDBOX_NOTREADY");
    c.start(start("created")).await.unwrap();
    assert_eq!(state_of(&mut c, "created").await, "SANDBOX_READY");
    drop(c);
    // on_exit = stop (the default): the sandbox is stopped cleanly and recorded so.
    let dir = d.stop().await;
    let d = Daemon::start_in(dir, |_| {}).await;
    let mut c = d.v2().await;
    assert_eq!(
        c.wait(wait("created"))
            .await
            .unwrap()
            .into_inner()
            .exit_status,
        0
    );
    d.stop().await;
}
