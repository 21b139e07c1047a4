// SPDX-License-Identifier: Apache-2.0
//! A Task endpoint cut for a live upgrade and served on by its successor
//! (`controller::task::handover`, `controller::task::conn`): two endpoints on one socket path in
//! one process stand for the old and the new daemon, each with its own in-process fake agent,
//! and a ttrpc client holds its connections across the cut the way containerd does.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(clippy::tests_outside_test_module, reason = "integration test file")]

#[path = "task_endpoint/fake.rs"]
#[allow(dead_code, reason = "shared by two test crates, each uses part of it")]
mod fake;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim_protos::api::{CreateTaskRequest, Mount, StartRequest, WaitRequest};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use controller::task::{HostPaths, ImageCache, TaskOptions, TaskServer};
use serde_json::json;

/// One side of the handover: a fake agent and the target that reaches it.
struct Side {
    agent: Arc<fake::FakeAgent>,
    target: Arc<fake::FakeSlots>,
    _server: ttrpc::asynchronous::Server,
}

async fn side(dir: &Path, name: &str) -> Side {
    let agent = Arc::new(fake::FakeAgent::default());
    let sock = dir.join(format!("agent-{name}.sock"));
    let server = fake::serve_agent(agent.clone(), &sock).await;
    let target = Arc::new(fake::FakeSlots {
        client: Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap(),
        next: AtomicU32::new(0),
        slots: Mutex::new(BTreeMap::new()),
    });
    Side {
        agent,
        target,
        _server: server,
    }
}

fn opts(dir: &Path, images: Arc<ImageCache>) -> TaskOptions {
    let mut opts = TaskOptions::new(images, dir.join("work"));
    opts.host_paths = HostPaths::new([dir.to_path_buf()]);
    opts.call_timeout = Duration::from_secs(60);
    opts
}

fn bundle(dir: &Path, id: &str) -> PathBuf {
    let bundle = dir.join(format!("bundle-{id}"));
    std::fs::create_dir_all(&bundle).unwrap();
    let config = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "mounts": [],
        "linux": {}
    });
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    bundle
}

fn create_req(dir: &Path, id: &str) -> CreateTaskRequest {
    let img = dir.join(format!("{id}.img"));
    std::fs::write(&img, b"not really ext4").unwrap();
    let mut m = Mount::new();
    m.type_ = "ext4".into();
    m.source = img.to_str().unwrap().into();
    let mut r = CreateTaskRequest::new();
    r.id = id.into();
    r.bundle = bundle(dir, id).to_str().unwrap().into();
    r.rootfs = vec![m];
    r
}

fn ctx() -> ttrpc::context::Context {
    let mut c = ttrpc::context::with_duration(Duration::from_secs(60));
    c.add("containerd-namespace-ttrpc".into(), "k8s.io".into());
    c
}

async fn connect(sock: &Path) -> TaskClient {
    TaskClient::new(
        Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap(),
    )
}

/// Waits for `id` on `c` in the background: its exit status.
fn wait_in_background(c: &TaskClient, id: &str) -> tokio::task::JoinHandle<u32> {
    let (c, mut r) = (c.clone(), WaitRequest::new());
    r.id = id.into();
    tokio::spawn(async move {
        c.wait(ttrpc::context::Context::default(), &r)
            .await
            .expect("wait")
            .exit_status
    })
}

/// Containerd's connections and the Wait it left waiting go on in the new endpoint: the Wait is
/// answered by the new side's agent and not by the old one's (whose late answer is never
/// written), later calls on the old connections and on new ones reach the new side, and the
/// new endpoint knows the containers and their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_endpoint_serves_on_in_its_successor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (old, new) = (side(d, "old").await, side(d, "new").await);
    let images = d.join("images");
    let sock = d.join("task.sock");
    let cache = Arc::new(ImageCache::new(&images).unwrap());
    let old_server = TaskServer::start(&sock, old.target.clone(), opts(d, cache))
        .await
        .unwrap();
    let c = connect(&sock).await;
    let idle = connect(&sock).await;
    c.create(ctx(), &create_req(d, "c1"))
        .await
        .expect("create c1");
    let waiting = wait_in_background(&c, "c1");
    // The Wait reaches the old agent's connection before the cut.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let cut = old_server
        .cutter()
        .cut(Duration::from_secs(5))
        .await
        .expect("cut");
    assert_eq!(cut.state.container_ids(), ["c1"]);
    assert_eq!(cut.connections.len(), 2, "both connections are cut");
    assert_eq!(cut.state.fd_count(), 3);
    // The old side's Wait ends now: its answer must never reach the client.
    old.agent.exit(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "the old endpoint answered after the cut"
    );

    let cache = Arc::new(ImageCache::keeping(&images, &cut.state.image_paths()).unwrap());
    let new_server = TaskServer::adopt(&sock, new.target.clone(), opts(d, cache), cut)
        .await
        .expect("adopt");
    assert_eq!(new_server.container_ids(), ["c1"]);
    new.agent.exit(7);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the Wait left unanswered is answered by the new endpoint")
        .unwrap();
    assert_eq!(status, 7);

    // Later calls, on both old connections and on a new one, reach the new side.
    c.create(ctx(), &create_req(d, "c2"))
        .await
        .expect("create c2");
    idle.create(ctx(), &create_req(d, "c3"))
        .await
        .expect("create c3");
    connect(&sock)
        .await
        .create(ctx(), &create_req(d, "c4"))
        .await
        .expect("create c4 on a new connection");
    let ids = |a: &fake::FakeAgent| -> Vec<String> {
        let seen = a.seen.lock().unwrap();
        seen.creates.iter().map(|r| r.id.clone()).collect()
    };
    assert_eq!(ids(&old.agent), ["c1"]);
    assert_eq!(ids(&new.agent), ["c2", "c3", "c4"]);
    let mut held = new_server.container_ids();
    held.sort();
    assert_eq!(held, ["c1", "c2", "c3", "c4"]);
    drop(old_server);
    // The connections live on in the new endpoint after the old one is gone.
    let again = wait_in_background(&c, "c2");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), again)
            .await
            .unwrap()
            .unwrap(),
        7
    );
    new_server.shutdown().await;
}

/// A call that changes something holds the cut up; a cut that times out, or one that is
/// thawed, leaves the endpoint serving as before on the same connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_holds_the_cut_and_a_thaw_undoes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let old = side(d, "old").await;
    let sock = d.join("task.sock");
    let cache = Arc::new(ImageCache::new(&d.join("images")).unwrap());
    let server = TaskServer::start(&sock, old.target.clone(), opts(d, cache))
        .await
        .unwrap();
    let c = connect(&sock).await;
    c.create(ctx(), &create_req(d, "c1"))
        .await
        .expect("create c1");

    // The fake agent's Start of "slow" takes a minute (on a connection of its own, which ends
    // with the client).
    let slow = {
        let c = connect(&sock).await;
        tokio::spawn(async move {
            let mut r = StartRequest::new();
            r.id = "slow".into();
            c.start(ctx(), &r).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cutter = server.cutter();
    let e = cutter
        .cut(Duration::from_millis(300))
        .await
        .expect_err("a Start in flight cannot be cut");
    let msg = controller::error_chain(&e);
    assert!(msg.contains("Task/Start call in flight"), "{msg}");
    // Thawed: the same connection and new ones work.
    c.create(ctx(), &create_req(d, "c2"))
        .await
        .expect("create after a failed cut");
    connect(&sock)
        .await
        .create(ctx(), &create_req(d, "c3"))
        .await
        .expect("a new connection after a failed cut");
    slow.abort();
    let _ = slow.await;

    // A cut that succeeds and is thawed: the Wait it left is answered here after all.
    let waiting = wait_in_background(&c, "c1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = cutter.cut(Duration::from_secs(5)).await.expect("cut");
    drop(cut);
    old.agent.exit(3);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "answered while cut");
    cutter.thaw();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("answered after the thaw")
            .unwrap(),
        3
    );
    c.create(ctx(), &create_req(d, "c4"))
        .await
        .expect("create after a thaw");
    server.shutdown().await;
}
