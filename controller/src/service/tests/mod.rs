// SPDX-License-Identifier: Apache-2.0
//! The sandbox service against the fake VM backend.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use proto::cri::v1 as cri;

use super::*;
use crate::backend::VmExitKind;
use crate::backend::fake::{FakeGuest, FakeVmBackend};
use crate::sandbox::VmSize;

struct Fixture {
    svc: Arc<SandboxService<FakeVmBackend>>,
    fake: FakeVmBackend,
    tmp: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeVmBackend::new();
    let svc = service_on(tmp.path(), fake.clone());
    Fixture { svc, fake, tmp }
}

fn service_on(dir: &Path, fake: FakeVmBackend) -> Arc<SandboxService<FakeVmBackend>> {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"fake kernel").unwrap();
    let mut config = ServiceConfig::new(dir.join("state"));
    config.vm.kernel = kernel;
    config.default_stop_timeout = Duration::from_millis(200);
    SandboxService::new(fake, config)
}

fn create_req(id: &str) -> CreateRequest {
    CreateRequest {
        id: id.to_string(),
        sandboxer: "sandboxer".into(),
        ..CreateRequest::default()
    }
}

fn pod_options(c: &cri::PodSandboxConfig) -> StoredAny {
    StoredAny {
        type_url: "type.googleapis.com/runtime.v1.PodSandboxConfig".into(),
        value: c.encode_to_vec(),
    }
}

async fn started(f: &Fixture, id: &str) -> Started {
    f.svc.create(create_req(id)).await.unwrap();
    f.svc.start(id).await.unwrap()
}

#[tokio::test]
async fn lifecycle() {
    let f = fixture();
    f.svc.create(create_req("pod")).await.unwrap();
    let st = f.svc.status("pod", false).unwrap();
    assert_eq!(st.state, SandboxState::Created);
    assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
    assert_eq!((st.pid, st.version, st.address.as_str()), (0, 0, ""));
    assert!(
        f.svc
            .store()
            .sandbox_dir("pod")
            .join("sandbox.json")
            .exists()
    );

    let s = f.svc.start("pod").await.unwrap();
    let sock = f.tmp.path().join("state/sbs/pod/task.sock");
    assert_eq!(s.address, format!("ttrpc+unix://{}", sock.display()));
    assert_eq!(s.version, 3);
    assert_eq!(s.pid, std::process::id());
    let st = f.svc.status("pod", false).unwrap();
    assert_eq!(st.state.api_state(), "SANDBOX_READY");
    assert_eq!((st.pid, st.version), (std::process::id(), 3));
    assert_eq!(st.exited_at, None);
    // Start's phases are in the info map, and the whole covers its parts.
    let us = |phase: &str| -> u64 {
        st.info
            .get(&format!("start_{phase}_us"))
            .unwrap_or_else(|| panic!("no start_{phase}_us in {:?}", st.info))
            .parse()
            .unwrap()
    };
    let parts: u64 = ["vm", "agent_ready", "agent_connect", "setup"]
        .iter()
        .map(|p| us(p))
        .sum::<u64>()
        + us("task_server");
    assert!(us("total") >= parts, "{:?}", st.info);
    // What was persisted says Ready too.
    assert_eq!(
        f.svc.store().load("pod").unwrap().state,
        SandboxState::Ready
    );
    let spec = &f.fake.specs()[0];
    assert_eq!((spec.vcpus, spec.mem_mib), (1, 256));
    assert_eq!(
        spec.console_log.as_deref(),
        Some(f.tmp.path().join("state/sbs/pod/console.log").as_path())
    );

    f.svc.stop("pod", Duration::from_secs(1)).await.unwrap();
    let exit = f.svc.wait("pod").await.unwrap();
    assert_eq!(exit.status, 0);
    let st = f.svc.status("pod", false).unwrap();
    assert_eq!(st.state, SandboxState::Stopped);
    assert_eq!(st.exited_at, Some(exit.at));
    assert_eq!(f.fake.running(), 0);
    // Stop is idempotent.
    f.svc.stop("pod", Duration::ZERO).await.unwrap();

    f.svc.shutdown("pod").await.unwrap();
    assert!(!f.svc.store().sandbox_dir("pod").exists());
    assert!(matches!(
        f.svc.status("pod", false),
        Err(SandboxError::NotFound(_))
    ));
    assert!(f.svc.ids().is_empty());
}

#[tokio::test]
async fn ids_are_validated_everywhere() {
    let f = fixture();
    let invalid = |r: Result<(), SandboxError>| {
        assert!(
            matches!(
                r,
                Err(SandboxError::InvalidArgument {
                    field: "sandbox_id",
                    ..
                })
            ),
            "{r:?}"
        )
    };
    invalid(f.svc.create(create_req("")).await);
    invalid(f.svc.create(create_req("../etc")).await);
    invalid(f.svc.start("").await.map(drop));
    invalid(f.svc.stop("a/b", Duration::ZERO).await);
    invalid(f.svc.wait("").await.map(drop));
    invalid(f.svc.status("", false).map(drop));
    invalid(f.svc.shutdown("").await);
    invalid(f.svc.platform("").map(drop));
    invalid(f.svc.metrics("").await.map(drop));
    assert!(f.svc.ids().is_empty());
    // Nothing was created on disk for the invalid ids.
    assert!(!f.tmp.path().join("etc").exists());
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let f = fixture();
    let nf = |r: Result<(), SandboxError>| {
        assert!(
            matches!(r, Err(SandboxError::NotFound(ref id)) if id == "nope"),
            "{r:?}"
        )
    };
    nf(f.svc.start("nope").await.map(drop));
    nf(f.svc.stop("nope", Duration::ZERO).await);
    nf(f.svc.wait("nope").await.map(drop));
    nf(f.svc.status("nope", true).map(drop));
    nf(f.svc.shutdown("nope").await);
    nf(f.svc.platform("nope").map(drop));
    nf(f.svc.metrics("nope").await.map(drop));
    nf(f.svc.update("nope", SandboxInfo::default(), vec![]).await);
    nf(f.svc
        .prepare(
            "nope",
            PrepareRequest {
                container_id: "c".into(),
                ..PrepareRequest::default()
            },
        )
        .await
        .map(drop));
    nf(f.svc.purge("nope", "c", "").await);
    nf(f.svc
        .update_resources("nope", "c", None, BTreeMap::new())
        .await);
}

#[tokio::test]
async fn duplicate_create_is_already_exists_and_keeps_the_first() {
    let f = fixture();
    started(&f, "pod").await;
    let err = f.svc.create(create_req("pod")).await.unwrap_err();
    assert!(matches!(err, SandboxError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(
        f.svc.status("pod", false).unwrap().state,
        SandboxState::Ready
    );
    assert!(
        f.svc
            .store()
            .sandbox_dir("pod")
            .join("sandbox.json")
            .exists()
    );
}

#[tokio::test]
async fn start_twice_and_start_after_stop_are_failed_precondition() {
    let f = fixture();
    started(&f, "pod").await;
    let err = f.svc.start("pod").await.unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::FailedPrecondition {
                state: SandboxState::Ready,
                op: "start",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(f.fake.starts(), 1);
    f.svc.stop("pod", Duration::ZERO).await.unwrap();
    assert!(matches!(
        f.svc.start("pod").await,
        Err(SandboxError::FailedPrecondition {
            state: SandboxState::Stopped,
            ..
        })
    ));
}

/// A network namespace of the test's own, alive while the value lives: a thread that
/// unshared one and waits (`/proc/<pid>/task/<tid>/ns/net`). `None` (with a loud SKIP) where
/// that is not allowed, outside CI.
struct PrivateNetns {
    path: String,
    _stop: std::sync::mpsc::Sender<()>,
}

fn private_netns(test: &str) -> Option<PrivateNetns> {
    let (made, made_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let r = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map(|()| nix::unistd::gettid());
        let _ = made.send(r);
        // Until the value is dropped (its sender with it).
        let _ = stop_rx.recv();
    });
    match made_rx.recv().unwrap() {
        Ok(tid) => Some(PrivateNetns {
            path: format!("/proc/{}/task/{tid}/ns/net", std::process::id()),
            _stop: stop,
        }),
        Err(e) => {
            assert!(
                std::env::var("SANDBOXER_REQUIRE_ROOT").as_deref() != Ok("1")
                    && std::env::var("CI").as_deref() != Ok("true"),
                "{test}: cannot make a network namespace: {e}"
            );
            eprintln!("SKIP {test}: cannot make a network namespace (needs root): {e}");
            None
        }
    }
}

fn netns_refused(r: Result<(), SandboxError>, needle: &str) {
    match r {
        Err(SandboxError::InvalidArgument {
            field: "netns_path",
            reason,
        }) => assert!(reason.contains(needle), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn netns_path_is_checked() {
    let f = fixture();
    let create = |id: &str, netns: &str| {
        let mut r = create_req(id);
        r.netns_path = netns.into();
        f.svc.create(r)
    };
    netns_refused(create("a", "relative/ns").await, "not an absolute path");
    netns_refused(create("a", "/nonexistent/netns/x").await, "does not exist");
    let dir = f.tmp.path().display().to_string();
    netns_refused(create("a", &dir).await, "not a namespace file");
    // The daemon's own netns is the host's: its taps and tc redirects are nobody's to take.
    netns_refused(
        create("a", "/proc/self/ns/net").await,
        "the sandboxer's own network namespace",
    );
    netns_refused(
        create("a", &format!("/proc/{}/ns/net", std::process::id())).await,
        "the sandboxer's own network namespace",
    );

    let Some(ns) = private_netns("netns_path_is_checked") else {
        return;
    };
    create("a", &ns.path).await.unwrap();
    let st = f.svc.status("a", false).unwrap();
    assert_eq!(
        st.info.get("netns_path").map(String::as_str),
        Some(ns.path.as_str())
    );
    // One pod per netns, by any path to it.
    netns_refused(
        create("b", &ns.path).await,
        "the network namespace of sandbox a",
    );
    let tid = ns.path.split('/').nth(4).unwrap();
    netns_refused(
        create("b", &format!("/proc/self/task/{tid}/ns/net")).await,
        "the network namespace of sandbox a",
    );
    // Free again once that sandbox is gone.
    f.svc.shutdown("a").await.unwrap();
    create("b", &ns.path).await.unwrap();
}

#[tokio::test]
async fn pod_config_sets_hostname_dns_labels_and_vm_size() {
    let f = fixture();
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "web".into(),
            uid: "u-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web-0".into(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: [("app".to_string(), "web".to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_quota: 250_000,
                cpu_period: 100_000,
                memory_limit_in_bytes: 512 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut r = create_req("web");
    r.options = Some(pod_options(&pod));
    r.sandbox = Some(SandboxInfo {
        labels: [("tier".to_string(), "front".to_string())].into(),
        ..SandboxInfo::default()
    });
    f.svc.create(r).await.unwrap();
    let rec = f.svc.record("web").unwrap();
    let p = rec.pod.as_ref().unwrap();
    assert_eq!((p.name.as_str(), p.namespace.as_str()), ("web", "default"));
    assert_eq!(p.hostname, "web-0");
    assert_eq!(p.dns.servers, ["10.0.0.10"]);
    assert_eq!(p.dns.searches, ["svc.cluster.local"]);
    assert_eq!(p.dns.options, ["ndots:5"]);
    assert_eq!(rec.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(rec.labels.get("tier").map(String::as_str), Some("front"));
    assert_eq!(
        rec.vm,
        VmSize {
            vcpus: 3,
            mem_mib: 256 + 512
        }
    );
    let s = f.svc.start("web").await.unwrap();
    assert_eq!(s.labels.len(), 2);
    let spec = &f.fake.specs()[0];
    assert_eq!((spec.vcpus, spec.mem_mib), (3, 768));
    // What the agent is told to set up, and where its vsock lives.
    assert_eq!(spec.setup.hostname, "web-0");
    assert_eq!(spec.setup.dns, p.dns);
    assert!(spec.setup.interfaces.is_empty() && spec.setup.routes.is_empty());
    assert_eq!(
        spec.vsock_uds.as_deref(),
        Some(f.tmp.path().join("state/sbs/web/vsock.sock").as_path())
    );
    assert_eq!(
        spec.agent_ready_timeout,
        Duration::from_millis(crate::config::DEFAULT_AGENT_READY_TIMEOUT_MS)
    );
    assert_eq!(
        f.svc
            .status("web", false)
            .unwrap()
            .info
            .get("hostname")
            .map(String::as_str),
        Some("web-0")
    );
}

#[tokio::test]
async fn bad_options_are_rejected_and_other_types_kept() {
    let f = fixture();
    let mut r = create_req("a");
    r.options = Some(StoredAny {
        type_url: "runtime.v1.PodSandboxConfig".into(),
        value: vec![0xff, 0xff, 0xff],
    });
    assert!(matches!(
        f.svc.create(r).await,
        Err(SandboxError::InvalidArgument {
            field: "options",
            ..
        })
    ));
    let mut r = create_req("a");
    r.options = Some(pod_options(&cri::PodSandboxConfig {
        hostname: "bad/host".into(),
        ..Default::default()
    }));
    assert!(matches!(
        f.svc.create(r).await,
        Err(SandboxError::InvalidArgument {
            field: "options.hostname",
            ..
        })
    ));
    let mut r = create_req("a");
    let other = StoredAny {
        type_url: "example.com/Other".into(),
        value: vec![1, 2, 3],
    };
    r.options = Some(other.clone());
    f.svc.create(r).await.unwrap();
    let rec = f.svc.record("a").unwrap();
    assert_eq!(rec.options, Some(other));
    assert_eq!(rec.pod, None);
}

#[tokio::test]
async fn start_failure_ends_the_sandbox() {
    let f = fixture();
    f.fake.fail_next_starts(1);
    f.svc.create(create_req("pod")).await.unwrap();
    let err = f.svc.start("pod").await.unwrap_err();
    assert!(matches!(
        err,
        SandboxError::Backend(_, BackendError::Start(_))
    ));
    let exit = f.svc.wait("pod").await.unwrap();
    assert_eq!(exit.status, EXIT_FAILED);
    assert!(exit.reason.contains("refused"), "{}", exit.reason);
    let st = f.svc.status("pod", false).unwrap();
    assert_eq!(st.state, SandboxState::Failed);
    assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
    f.svc.shutdown("pod").await.unwrap();
}

#[tokio::test]
async fn missing_kernel_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = ServiceConfig::new(tmp.path());
    config.vm.kernel = tmp.path().join("no-such-vmlinux");
    let svc = SandboxService::new(FakeVmBackend::new(), config);
    svc.create(create_req("pod")).await.unwrap();
    let err = svc.start("pod").await.unwrap_err();
    assert!(matches!(
        err,
        SandboxError::Backend(_, BackendError::Config(_))
    ));
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );
}

#[tokio::test]
async fn stop_asks_the_guest_first() {
    let f = fixture();
    f.fake
        .set_guest(FakeGuest::ShutsDownAfter(Duration::from_millis(20)));
    started(&f, "pod").await;
    let t = Instant::now();
    f.svc.stop("pod", Duration::from_secs(30)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    let h = f.fake.handle("pod").unwrap();
    assert_eq!(h.shutdown_requests(), 1);
    assert_eq!(h.ended().unwrap().kind, VmExitKind::GuestShutdown);
    assert_eq!(f.svc.wait("pod").await.unwrap().status, 0);
}

#[tokio::test]
async fn stop_forces_a_guest_that_ignores_it_after_the_timeout() {
    let f = fixture();
    f.fake.set_guest(FakeGuest::Ignores);
    started(&f, "pod").await;
    let t = Instant::now();
    f.svc.stop("pod", Duration::from_millis(150)).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(150));
    let h = f.fake.handle("pod").unwrap();
    assert_eq!(h.ended().unwrap().kind, VmExitKind::HostStopped);
    let exit = f.svc.wait("pod").await.unwrap();
    assert_eq!(exit.status, EXIT_FORCED);
    // Timeout 0 uses the configured default grace period (200 ms here).
    started(&f, "pod2").await;
    let t = Instant::now();
    f.svc.stop("pod2", Duration::ZERO).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn status_answers_during_a_long_stop() {
    let f = fixture();
    f.fake.set_guest(FakeGuest::Ignores);
    started(&f, "pod").await;
    let svc = Arc::clone(&f.svc);
    let stop = tokio::spawn(async move { svc.stop("pod", Duration::from_secs(2)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let st = f.svc.status("pod", false).unwrap();
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(st.state, SandboxState::Stopping);
    assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
    stop.await.unwrap().unwrap();
}

#[tokio::test]
async fn vm_ending_by_itself_is_seen_by_wait_and_status() {
    let f = fixture();
    // "clean": a guest that powers off with nobody asking (a kernel panic reboots it).
    started(&f, "clean").await;
    started(&f, "crash").await;
    let waiters: Vec<_> = (0..10)
        .map(|i| {
            let svc = Arc::clone(&f.svc);
            let id = if i % 2 == 0 { "clean" } else { "crash" };
            tokio::spawn(async move { svc.wait(id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    f.fake
        .handle("clean")
        .unwrap()
        .end_with(VmExitKind::GuestShutdown);
    f.fake
        .handle("crash")
        .unwrap()
        .end_with(VmExitKind::Crashed("triple fault".into()));
    for (i, w) in waiters.into_iter().enumerate() {
        let exit = w.await.unwrap().unwrap();
        if i % 2 == 0 {
            assert_eq!(
                (exit.status, exit.reason.as_str()),
                (EXIT_FAILED, crate::metrics::GUEST_ENDED_UNASKED_REASON)
            );
        } else {
            assert_eq!(
                (exit.status, exit.reason.as_str()),
                (EXIT_FAILED, "triple fault")
            );
        }
    }
    // The monitor records the end under the lifecycle lock: a Stop afterwards sees it.
    f.svc.stop("crash", Duration::ZERO).await.unwrap();
    assert_eq!(
        f.svc.status("clean", false).unwrap().state,
        SandboxState::Failed
    );
    assert_eq!(
        f.svc.status("crash", false).unwrap().state,
        SandboxState::Failed
    );
    assert_eq!(
        f.svc.store().load("crash").unwrap().exit.unwrap().reason,
        "triple fault"
    );
    assert!(matches!(
        f.svc.metrics("crash").await,
        Err(SandboxError::FailedPrecondition { .. })
    ));
}

#[tokio::test]
async fn metrics_and_platform() {
    let f = fixture();
    f.svc.create(create_req("pod")).await.unwrap();
    assert_eq!(f.svc.platform("pod").unwrap(), ("linux", "amd64"));
    assert!(matches!(
        f.svc.metrics("pod").await,
        Err(SandboxError::FailedPrecondition {
            state: SandboxState::Created,
            ..
        })
    ));
    f.svc.start("pod").await.unwrap();
    let m = f.svc.metrics("pod").await.unwrap();
    assert_eq!(m.data.type_url, VM_METRICS_TYPE_URL);
    let v: serde_json::Value = serde_json::from_slice(&m.data.value).unwrap();
    assert_eq!(v["vcpus"], 1);
    assert_eq!(v["mem_mib"], 256);
}

#[tokio::test]
async fn verbose_status_carries_the_record() {
    let f = fixture();
    started(&f, "pod").await;
    assert!(f.svc.status("pod", false).unwrap().extra.is_none());
    let st = f.svc.status("pod", true).unwrap();
    let extra = st.extra.unwrap();
    assert_eq!(extra.type_url, RECORD_TYPE_URL);
    let rec: SandboxRecord = serde_json::from_slice(&extra.value).unwrap();
    assert_eq!(rec.id, "pod");
    assert!(st.info.contains_key("record"));
}

#[tokio::test]
async fn update_fields() {
    let f = fixture();
    f.svc.create(create_req("pod")).await.unwrap();
    let tasks = StoredAny {
        type_url: "github.com/containerd/containerd/Tasks".into(),
        value: br#"{"containers":[{"id":"c1"}]}"#.to_vec(),
    };
    let res = StoredAny {
        type_url: "io.containerd.cri.v1.UpdatedResources".into(),
        value: br#"{"Resources":{"memory_limit_in_bytes":1024}}"#.to_vec(),
    };
    let info = SandboxInfo {
        labels: [("a".to_string(), "1".to_string())].into(),
        extensions: [
            ("tasks".to_string(), tasks.clone()),
            ("updated-resources".to_string(), res),
        ]
        .into(),
        ..SandboxInfo::default()
    };
    f.svc
        .update("pod", info.clone(), vec!["extensions.tasks".into()])
        .await
        .unwrap();
    let rec = f.svc.record("pod").unwrap();
    assert_eq!(rec.extensions.get("tasks"), Some(&tasks));
    assert_eq!(rec.tasks.as_ref().unwrap()["containers"][0]["id"], "c1");
    // Only the named field changed.
    assert!(rec.labels.is_empty() && rec.updated_resources.is_none());
    assert_eq!(f.svc.store().load("pod").unwrap(), rec);

    f.svc
        .update(
            "pod",
            info.clone(),
            vec!["extensions.updated-resources".into(), "labels.a".into()],
        )
        .await
        .unwrap();
    let rec = f.svc.record("pod").unwrap();
    assert_eq!(
        rec.updated_resources.as_ref().unwrap()["Resources"]["memory_limit_in_bytes"],
        1024
    );
    assert_eq!(rec.labels.get("a").map(String::as_str), Some("1"));

    // Removing: the field is named but absent from the sandbox.
    f.svc
        .update(
            "pod",
            SandboxInfo::default(),
            vec!["extensions.tasks".into()],
        )
        .await
        .unwrap();
    let rec = f.svc.record("pod").unwrap();
    assert!(rec.tasks.is_none() && !rec.extensions.contains_key("tasks"));

    let bad = SandboxInfo {
        extensions: [(
            "tasks".to_string(),
            StoredAny {
                type_url: "x".into(),
                value: b"not json".to_vec(),
            },
        )]
        .into(),
        ..SandboxInfo::default()
    };
    assert!(matches!(
        f.svc
            .update("pod", bad, vec!["extensions.tasks".into()])
            .await,
        Err(SandboxError::InvalidArgument { .. })
    ));
    assert!(matches!(
        f.svc.update("pod", info, vec!["status".into()]).await,
        Err(SandboxError::InvalidArgument {
            field: "fields",
            ..
        })
    ));
    // A failed update changes nothing.
    assert_eq!(f.svc.record("pod").unwrap(), rec);
}

#[tokio::test]
async fn prepare_purge_and_update_resources() {
    let f = fixture();
    f.svc.create(create_req("pod")).await.unwrap();
    let req = PrepareRequest {
        container_id: "c1".into(),
        spec: Some(StoredAny {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
            value: br#"{"ociVersion":"1.1.0"}"#.to_vec(),
        }),
        rootfs: vec![MountSpec {
            kind: "ext4".into(),
            source: "/dev/vdb".into(),
            ..MountSpec::default()
        }],
        stdout: "/tmp/out".into(),
        ..PrepareRequest::default()
    };
    // Not ready yet.
    assert!(matches!(
        f.svc.prepare("pod", req.clone()).await,
        Err(SandboxError::FailedPrecondition { .. })
    ));
    f.svc.start("pod").await.unwrap();
    // The Task endpoint attaches the rootfs; this fake VM has no block slots (the KVM
    // tests attach for real), so it fails, and leaves nothing behind.
    let err = f.svc.prepare("pod", req.clone()).await.unwrap_err();
    assert!(matches!(err, SandboxError::Endpoint(..)), "{err:?}");
    let bundle_dir = f.tmp.path().join("state/sbs/pod/containers/c1");
    assert!(!bundle_dir.exists());
    assert!(f.svc.record("pod").unwrap().containers.is_empty());
    // A rootfs needs the spec that says how to run on it.
    let no_spec = PrepareRequest {
        spec: None,
        ..req.clone()
    };
    assert!(matches!(
        f.svc.prepare("pod", no_spec).await,
        Err(SandboxError::InvalidArgument { field: "spec", .. })
    ));
    // Without a spec, Prepare records the container (its stdio) and its bundle dir.
    let plain = PrepareRequest {
        container_id: "c1".into(),
        stdout: "/tmp/out".into(),
        ..PrepareRequest::default()
    };
    let bundle = f.svc.prepare("pod", plain.clone()).await.unwrap();
    assert_eq!(bundle, bundle_dir.display().to_string());
    assert!(bundle_dir.is_dir());
    assert_eq!(
        f.svc.record("pod").unwrap().containers["c1"].process.stdout,
        "/tmp/out"
    );
    let h = f.fake.handle("pod").unwrap();
    assert!(matches!(
        f.svc.prepare("pod", plain).await,
        Err(SandboxError::AlreadyExists { .. })
    ));
    // An exec process joins an existing container and shares its bundle.
    let exec = PrepareRequest {
        container_id: "c1".into(),
        exec_id: "e1".into(),
        ..PrepareRequest::default()
    };
    assert_eq!(f.svc.prepare("pod", exec.clone()).await.unwrap(), bundle);
    let orphan = PrepareRequest {
        container_id: "c9".into(),
        exec_id: "e1".into(),
        ..PrepareRequest::default()
    };
    assert!(matches!(
        f.svc.prepare("pod", orphan).await,
        Err(SandboxError::ChildNotFound {
            what: "container",
            ..
        })
    ));
    let bad_spec = PrepareRequest {
        container_id: "c2".into(),
        spec: Some(StoredAny {
            type_url: "x".into(),
            value: b"\x01\x02".to_vec(),
        }),
        ..PrepareRequest::default()
    };
    assert!(matches!(
        f.svc.prepare("pod", bad_spec).await,
        Err(SandboxError::InvalidArgument { field: "spec", .. })
    ));
    assert!(matches!(
        f.svc
            .prepare(
                "pod",
                PrepareRequest {
                    container_id: "-bad".into(),
                    ..PrepareRequest::default()
                }
            )
            .await,
        Err(SandboxError::InvalidArgument {
            field: "container_id",
            ..
        })
    ));

    let res = StoredAny {
        type_url: "x".into(),
        value: vec![1],
    };
    f.svc
        .update_resources("pod", "c1", Some(res.clone()), BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(h.resources().get("c1"), Some(&res));
    assert_eq!(
        f.svc.record("pod").unwrap().containers["c1"].resources,
        Some(res)
    );
    assert!(matches!(
        f.svc
            .update_resources("pod", "c9", None, BTreeMap::new())
            .await,
        Err(SandboxError::ChildNotFound { .. })
    ));

    f.svc.purge("pod", "c1", "e1").await.unwrap();
    assert!(matches!(
        f.svc.purge("pod", "c1", "e1").await,
        Err(SandboxError::ChildNotFound {
            what: "exec process",
            ..
        })
    ));
    f.svc.purge("pod", "c1", "").await.unwrap();
    assert!(!Path::new(&bundle).exists());
    assert!(f.svc.record("pod").unwrap().containers.is_empty());
    assert!(matches!(
        f.svc.purge("pod", "c1", "").await,
        Err(SandboxError::ChildNotFound { .. })
    ));
}

#[tokio::test]
async fn restart_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let old = service_on(tmp.path(), FakeVmBackend::new());
    old.create(create_req("created")).await.unwrap();
    old.create(create_req("running")).await.unwrap();
    old.start("running").await.unwrap();
    old.create(create_req("stopped")).await.unwrap();
    old.start("stopped").await.unwrap();
    old.stop("stopped", Duration::ZERO).await.unwrap();
    let stopped_exit = old.wait("stopped").await.unwrap();
    old.create(create_req("deleting")).await.unwrap();
    // A Shutdown interrupted after persisting Deleted.
    let mut rec = old.record("deleting").unwrap();
    rec.state = SandboxState::Deleted;
    old.store().save(&rec).unwrap();
    // An unreadable record stays on disk.
    let state = tmp.path().join("state/sbs");
    std::fs::create_dir(state.join("broken")).unwrap();
    std::fs::write(state.join("broken/sandbox.json"), b"{").unwrap();
    drop(old);

    // The old process is gone (its VMs with it); a new one loads the records.
    let fake = FakeVmBackend::new();
    let new = service_on(tmp.path(), fake.clone());
    let before = SystemTime::now();
    let report = new.recover().unwrap();
    assert_eq!(report.restored, 3);
    assert_eq!(report.lost, ["running"]);
    assert_eq!(report.removed, ["deleting"]);
    assert_eq!(report.unreadable.len(), 1);
    assert!(!state.join("deleting").exists());
    assert!(state.join("broken/sandbox.json").exists());
    assert_eq!(new.ids(), ["created", "running", "stopped"]);

    let st = new.status("running", false).unwrap();
    assert_eq!(st.state, SandboxState::Failed);
    assert_eq!(st.state.api_state(), "SANDBOX_NOTREADY");
    assert!(st.exited_at.unwrap() >= before);
    let exit = new.wait("running").await.unwrap();
    assert_eq!(exit.status, EXIT_FAILED);
    assert!(
        exit.reason.contains("previous sandboxer"),
        "{}",
        exit.reason
    );
    // Persisted as such: a second restart reports the same.
    assert_eq!(new.store().load("running").unwrap().exit, Some(exit));
    assert_eq!(new.wait("stopped").await.unwrap(), stopped_exit);
    assert_eq!(
        new.status("created", false).unwrap().state,
        SandboxState::Created
    );

    new.shutdown("running").await.unwrap();
    assert!(!state.join("running").exists());
    new.start("created").await.unwrap();
    assert_eq!(fake.starts(), 1);
    // Recovering again does not duplicate anything.
    assert_eq!(new.recover().unwrap().restored, 0);
}

#[tokio::test]
async fn sandboxes_start_concurrently() {
    let f = fixture();
    const N: usize = 20;
    // Every start waits until all N are in flight: serialized starts would never finish.
    f.fake.set_start_gate(N);
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let svc = Arc::clone(&f.svc);
            tokio::spawn(async move {
                let id = format!("pod-{i}");
                svc.create(create_req(&id)).await?;
                svc.start(&id).await
            })
        })
        .collect();
    let all = async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("starts were serialized");
    assert_eq!(f.fake.running(), N);
    assert_eq!(f.svc.ids().len(), N);
}

#[tokio::test]
async fn start_and_stop_racing_on_one_sandbox_never_leak_a_vm() {
    let f = fixture();
    f.fake.set_start_delay(Duration::from_millis(5));
    for i in 0..20u64 {
        let id = format!("race-{i}");
        f.svc.create(create_req(&id)).await.unwrap();
        let (a, b) = (Arc::clone(&f.svc), Arc::clone(&f.svc));
        let (ia, ib) = (id.clone(), id.clone());
        let start = tokio::spawn(async move { a.start(&ia).await });
        tokio::time::sleep(Duration::from_millis(i % 8)).await;
        let stop = tokio::spawn(async move { b.stop(&ib, Duration::ZERO).await });
        let (start, stop) = (start.await.unwrap(), stop.await.unwrap());
        stop.unwrap();
        match start {
            // Start won: Stop stopped the VM it made.
            Ok(_) => assert_eq!(
                f.fake.handle(&id).unwrap().ended().unwrap().kind,
                VmExitKind::HostStopped
            ),
            // Stop won: the sandbox ended before it started.
            Err(SandboxError::FailedPrecondition { state, .. }) => {
                assert_eq!(state, SandboxState::Stopped);
                assert!(f.fake.handle(&id).is_none());
            }
            Err(e) => panic!("{e:?}"),
        }
        assert_eq!(
            f.svc.status(&id, false).unwrap().state,
            SandboxState::Stopped
        );
        assert_eq!(f.svc.wait(&id).await.unwrap().status, 0);
        assert_eq!(f.fake.running(), 0);
    }
}

#[tokio::test]
async fn shutdown_racing_start_frees_everything() {
    let f = fixture();
    f.fake.set_start_delay(Duration::from_millis(20));
    f.svc.create(create_req("pod")).await.unwrap();
    let (a, b) = (Arc::clone(&f.svc), Arc::clone(&f.svc));
    let waiter = {
        let svc = Arc::clone(&f.svc);
        tokio::spawn(async move { svc.wait("pod").await })
    };
    let start = tokio::spawn(async move { a.start("pod").await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let shut = tokio::spawn(async move { b.shutdown("pod").await });
    let _ = start.await.unwrap();
    shut.await.unwrap().unwrap();
    assert_eq!(f.fake.running(), 0);
    assert!(f.svc.ids().is_empty());
    assert!(!f.svc.store().sandbox_dir("pod").exists());
    // The waiter got the exit before the sandbox was forgotten.
    waiter.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_dropped_start_call_still_completes() {
    let f = fixture();
    f.fake.set_start_delay(Duration::from_millis(50));
    f.svc.create(create_req("pod")).await.unwrap();
    // The caller gives up half-way (as a gRPC client disconnecting would).
    let _ = tokio::time::timeout(Duration::from_millis(10), f.svc.start("pod")).await;
    // The start finishes anyway, and the sandbox is in a consistent, known state.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        f.svc.status("pod", false).unwrap().state,
        SandboxState::Ready
    );
    f.svc.shutdown("pod").await.unwrap();
    assert_eq!(f.fake.running(), 0);
}

#[tokio::test]
async fn stop_all_stops_every_running_sandbox() {
    let f = fixture();
    for i in 0..5 {
        started(&f, &format!("p{i}")).await;
    }
    f.svc.create(create_req("never")).await.unwrap();
    f.svc.stop_all(Duration::from_millis(100)).await;
    assert_eq!(f.fake.running(), 0);
    for id in f.svc.ids() {
        assert_eq!(
            f.svc.status(&id, false).unwrap().state,
            SandboxState::Stopped
        );
    }
}

// Node limits, socket-path limits and the CPU cgroup limits.
mod limits;
