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
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test code: offsets of test buffers of a few MiB"
)]

#[path = "task_endpoint/fake.rs"]
#[allow(dead_code, reason = "shared by two test crates, each uses part of it")]
mod fake;
#[path = "task_endpoint/fake_stream.rs"]
mod fake_stream;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim_protos::api::{CreateTaskRequest, Mount, StartRequest, WaitRequest};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use controller::task::{HostPaths, ImageCache, TaskOptions, TaskServer};
use fake_stream::FakeStreams;
use proto::agent::streaming_ttrpc::{StreamingClient, create_streaming};
use proto::protobuf::Message as _;
use proto::protobuf::well_known_types::any::Any;
use serde_json::json;
use tokio::sync::oneshot;
use ttrpc::asynchronous::{CSReceiver, CSSender};

/// One side of the handover: a fake agent and the target that reaches it (through a relay
/// whose connections die as the guest's connections to an old daemon do).
struct Side {
    agent: Arc<fake::FakeAgent>,
    target: Arc<fake::FakeSlots>,
    relay: Relay,
    _server: ttrpc::asynchronous::Server,
}

/// Forwards connections from one unix socket to another until cut.
struct Relay {
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    fn new(path: &Path, to: &Path) -> Self {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (to, kept) = (to.to_owned(), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            while let Ok((mut a, _)) = listener.accept().await {
                let mut b = tokio::net::UnixStream::connect(&to).await.unwrap();
                kept.lock().unwrap().push(tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }));
            }
        });
        Self {
            conns,
            _accept: accept,
        }
    }

    /// Ends every connection.
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

async fn side(dir: &Path, name: &str) -> Side {
    side_with(dir, name, HashMap::new()).await
}

/// A side whose agent serves `more` too.
async fn side_with(
    dir: &Path,
    name: &str,
    more: HashMap<String, ttrpc::asynchronous::Service>,
) -> Side {
    let agent = Arc::new(fake::FakeAgent::default());
    let sock = dir.join(format!("agent-{name}.sock"));
    let server = fake::serve_agent_with(agent.clone(), more, &sock).await;
    let relayed = dir.join(format!("relay-{name}.sock"));
    let relay = Relay::new(&relayed, &sock);
    let target = Arc::new(fake::FakeSlots {
        client: Client::connect(&format!("unix://{}", relayed.display()))
            .await
            .unwrap(),
        next: AtomicU32::new(0),
        slots: Mutex::new(BTreeMap::new()),
    });
    Side {
        agent,
        target,
        relay,
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

/// A Task endpoint on `<d>/task.sock` with a side of its own whose agent serves `agent`'s
/// streams.
async fn one_endpoint(d: &Path, agent: &Arc<FakeStreams>) -> (Side, PathBuf, TaskServer) {
    let side = side_with(d, "one", create_streaming(agent.clone())).await;
    let sock = d.join("task.sock");
    let cache = Arc::new(ImageCache::new(&d.join("images")).unwrap());
    let server = TaskServer::start(&sock, side.target.clone(), opts(d, cache))
        .await
        .unwrap();
    (side, sock, server)
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

/// Opens stdio stream `id` on the task socket as containerd does: `StreamInit`, then its
/// answer.
async fn open_stream(client: &Client, id: &str) -> (CSSender<Any>, CSReceiver<Any>) {
    let s = StreamingClient::new(client.clone())
        .stream(ttrpc::context::with_timeout(0))
        .await
        .unwrap();
    let (tx, mut rx) = s.split();
    tx.send(&fake_stream::init(id)).await.unwrap();
    let ack = rx.recv().await.unwrap();
    assert_eq!(ack.type_url, fake_stream::EMPTY);
    (tx, rx)
}

/// What containerd's side of the streams saw.
#[derive(Default)]
struct Engine {
    /// Output received, in order.
    out: Mutex<Vec<u8>>,
    /// Messages that should never have come (a second answer to an init, say).
    unexpected: Mutex<Vec<String>>,
}

/// containerd's output reader (its `ReceiveStream`): grants a window whenever less than one is
/// left, until the stream ends.
fn receive(
    e: Arc<Engine>,
    tx: CSSender<Any>,
    mut rx: CSReceiver<Any>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut window = 0i64;
        loop {
            if window < 65536 {
                let _ = tx.send(&fake_stream::grant(65536)).await;
                window += 65536;
            }
            match rx.recv().await {
                Ok(m) if m.type_url.is_empty() && m.value.is_empty() => return,
                Ok(m) if m.type_url == fake_stream::DATA => {
                    let d = proto::agent::stream_data::Data::parse_from_bytes(&m.value).unwrap();
                    window -= d.data.len() as i64;
                    e.out.lock().unwrap().extend_from_slice(&d.data);
                }
                Ok(m) => e.unexpected.lock().unwrap().push(m.type_url),
                Err(_) => return,
            }
        }
    })
}

/// containerd's stdin writer (its `SendStream`): sends `input` within the grants, a little
/// at a time; waits for `go` before the bytes from `split` on; then closes its side.
fn send_stdin(
    e: Arc<Engine>,
    tx: CSSender<Any>,
    mut rx: CSReceiver<Any>,
    input: Arc<Vec<u8>>,
    split: usize,
    go: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    let (grants_tx, mut grants) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(m) = rx.recv().await {
            if m.type_url.is_empty() && m.value.is_empty() {
                return;
            }
            if m.type_url != fake_stream::UPDATE {
                e.unexpected.lock().unwrap().push(m.type_url);
                continue;
            }
            let w = proto::agent::stream_data::WindowUpdate::parse_from_bytes(&m.value).unwrap();
            let _ = grants_tx.send(i64::from(w.update));
        }
    });
    tokio::spawn(async move {
        let mut go = Some(go);
        let (mut at, mut window) = (0usize, 0i64);
        while at < input.len() {
            if at >= split
                && let Some(go) = go.take()
            {
                go.await.unwrap();
            }
            while window <= 0 {
                window += grants.recv().await.expect("a grant");
            }
            let end = input.len().min(at + 5000).min(at + window as usize);
            let end = if at < split { end.min(split) } else { end };
            tx.send(&fake_stream::data(&input[at..end])).await.unwrap();
            window -= (end - at) as i64;
            at = end;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tx.close_send().await.unwrap();
    })
}

/// The streams of one test: a stdout stream of `log` and a stdin stream of `input`, through
/// the endpoint on `sock`.
struct Streams {
    engine: Arc<Engine>,
    out: tokio::task::JoinHandle<()>,
    stdin: tokio::task::JoinHandle<()>,
    go: oneshot::Sender<()>,
    process: Arc<Mutex<Vec<u8>>>,
    closed: oneshot::Receiver<()>,
}

async fn streams(
    agent: &Arc<FakeStreams>,
    sock: &Path,
    log: &Arc<Vec<u8>>,
    input: &Arc<Vec<u8>>,
) -> Streams {
    agent.output("c1-stdout", Arc::clone(log));
    let process = Arc::new(Mutex::new(Vec::new()));
    let (closed_tx, closed) = oneshot::channel();
    agent.input("c1-stdin", Arc::clone(&process), closed_tx);
    let client = Client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let engine = Arc::new(Engine::default());
    let (otx, orx) = open_stream(&client, "c1-stdout").await;
    let (itx, irx) = open_stream(&client, "c1-stdin").await;
    let out = receive(Arc::clone(&engine), otx, orx);
    let (go, go_rx) = oneshot::channel();
    let stdin = send_stdin(
        Arc::clone(&engine),
        itx,
        irx,
        Arc::clone(input),
        input.len() / 2,
        go_rx,
    );
    Streams {
        engine,
        out,
        stdin,
        go,
        process,
        closed,
    }
}

impl Streams {
    /// Output received so far.
    fn got(&self) -> usize {
        self.engine.out.lock().unwrap().len()
    }

    /// Lets stdin go on and checks that everything arrived once, in order.
    async fn finish(self, log: &[u8], input: &[u8]) {
        self.go.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.out)
            .await
            .expect("the output stream ends")
            .unwrap();
        let got = self.engine.out.lock().unwrap().clone();
        assert_eq!(got.len(), log.len());
        assert!(got == log, "the output differs");
        tokio::time::timeout(Duration::from_secs(30), self.stdin)
            .await
            .expect("stdin is all sent")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.closed)
            .await
            .expect("the agent sees the end of stdin")
            .unwrap();
        let process = self.process.lock().unwrap().clone();
        assert_eq!(process.len(), input.len());
        assert!(process == input, "stdin differs");
        assert_eq!(
            *self.engine.unexpected.lock().unwrap(),
            Vec::<String>::new()
        );
    }
}

/// containerd's stdio streams (`io_type = "streaming"`), stdout and stdin on one connection,
/// live through a handover: every output byte reaches the client once and in order, stdin
/// written before, during and after it reaches the process once and in order, the new
/// process resumes the agent streams and the client never sees a second answer to its
/// `StreamInit`. While cut, nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_stdio_streams_live_through_a_handover() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let agent = Arc::new(FakeStreams::default());
    let (old, new) = (
        side_with(d, "old", create_streaming(agent.clone())).await,
        side_with(d, "new", create_streaming(agent.clone())).await,
    );
    let images = d.join("images");
    let sock = d.join("task.sock");
    let cache = Arc::new(ImageCache::new(&images).unwrap());
    let old_server = TaskServer::start(&sock, old.target.clone(), opts(d, cache))
        .await
        .unwrap();
    let (log, input) = (Arc::new(pattern(3 << 20, 1)), Arc::new(pattern(400_000, 5)));
    let s = streams(&agent, &sock, &log, &input).await;
    tokio::time::sleep(Duration::from_millis(150)).await;

    let cut = old_server
        .cutter()
        .cut(Duration::from_secs(5))
        .await
        .expect("cut");
    let mut ids = cut.state.stream_ids();
    ids.sort_unstable();
    assert_eq!(ids, ["c1-stdin", "c1-stdout"]);
    // What was written before the cut may still be on its way to the client.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let frozen = s.got();
    assert!(frozen > 0 && frozen < log.len(), "{frozen}");
    // The old process's agent connection dies, with what was on its way.
    old.relay.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.got(), frozen, "output moved while cut");

    let cache = Arc::new(ImageCache::keeping(&images, &cut.state.image_paths()).unwrap());
    let new_server = TaskServer::adopt(&sock, new.target.clone(), opts(d, cache), cut)
        .await
        .expect("adopt");
    s.finish(&log, &input).await;
    assert_eq!(agent.inits.load(Ordering::Relaxed), 2);
    assert_eq!(agent.resumes.load(Ordering::Relaxed), 2);
    assert_eq!(agent.gaps.load(Ordering::Relaxed), 0);
    drop(old_server);
    new_server.shutdown().await;
}

/// A cut that is thawed (the upgrade failed) leaves the streams going on here, with nothing
/// lost or repeated and no resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_cut_leaves_stdio_streams_going() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let agent = Arc::new(FakeStreams::default());
    let (_old, sock, server) = one_endpoint(d, &agent).await;
    let (log, input) = (Arc::new(pattern(3 << 20, 2)), Arc::new(pattern(300_000, 9)));
    let s = streams(&agent, &sock, &log, &input).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let cutter = server.cutter();
    let cut = cutter.cut(Duration::from_secs(5)).await.expect("cut");
    assert_eq!(cut.state.stream_ids().len(), 2);
    drop(cut);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let frozen = s.got();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.got(), frozen, "output moved while cut");
    cutter.thaw();
    s.finish(&log, &input).await;
    assert_eq!(agent.inits.load(Ordering::Relaxed), 2);
    assert_eq!(agent.resumes.load(Ordering::Relaxed), 0);
    server.shutdown().await;
}

/// An engine that sends stdin beyond the window it was granted has the stream ended with an
/// error: the proxy keeps the stdin bytes the agent has not confirmed, and only the window
/// bounds them (containerd's sender waits for its grants).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_beyond_the_window_granted_ends_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let agent = Arc::new(FakeStreams::default());
    let (_only, sock, server) = one_endpoint(d, &agent).await;
    let process = Arc::new(Mutex::new(Vec::new()));
    let (closed_tx, _closed) = oneshot::channel();
    agent.input("c1-stdin", Arc::clone(&process), closed_tx);
    let client = Client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let (tx, mut rx) = open_stream(&client, "c1-stdin").await;
    // Twenty windows at once, every grant ignored.
    let (chunk, messages) = (pattern(32 * 1024, 3), 40);
    let flood = tokio::spawn(async move {
        for _ in 0..messages {
            if tx.send(&fake_stream::data(&chunk)).await.is_err() {
                break;
            }
        }
        tx
    });
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Ok(m) if m.type_url == fake_stream::UPDATE => {}
                other => break other,
            }
        }
    })
    .await
    .expect("the stream ends");
    assert!(end.is_err(), "the stream went on: {end:?}");
    drop(flood.await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let written = process.lock().unwrap().len();
    assert!(
        written < messages * 32 * 1024,
        "{written} bytes reached the process"
    );
    server.shutdown().await;
}
