// SPDX-License-Identifier: Apache-2.0
//! The host Task endpoint end to end: the real `sandboxer-agent` runs on this host as root
//! (`--listen unix:`), a test [`TaskTarget`] gives the endpoint that agent's connection and
//! loop devices as "block slots" (`losetup`, the device path is the mount source the agent
//! gets), and the test drives `task.sock` with containerd-shim-protos' `TaskClient` the way
//! containerd does: a host bundle with `config.json` and host rootfs mounts.
//!
//! Covers: an overlay snapshot (two lowerdirs, an upperdir with a whiteout and an opaque
//! directory) seen exactly as merged by the container, the lower-chain image shared by a
//! second container, an ext4 image file attached writable, bind-mounted host files,
//! Create/Start/Wait/Exec/Kill/State/Delete, slots detached and images dropped after Delete,
//! and bad input with precise codes.
//!
//! [`endpoint_logic_against_a_fake_agent`] needs nothing: an in-process fake agent checks what
//! the endpoint sends (guest bundle paths, bundle files, undo on failure, timeouts, OOM events
//! to a fake containerd, Wait ending with the agent connection).
//!
//! [`task_endpoint_end_to_end`] needs root, cgroup v2, /bin/busybox, mkfs.erofs, mkfs.ext4, losetup and the agent binary
//! (`cargo build -p agent`). Without them it prints a loud SKIP, or fails under CI (`CI=true` or
//! `SANDBOXER_REQUIRE_ROOT=1`).
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(clippy::tests_outside_test_module, reason = "integration test file")]

#[path = "task_endpoint/fake.rs"]
#[allow(dead_code, reason = "shared by two test crates, each uses part of it")]
mod fake;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, Mount, PidsRequest,
    StartRequest, StateRequest, Status, WaitRequest,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use controller::backend::{AttachedDisk, BackendError, TaskTarget};
use controller::task::{HostPaths, ImageCache, TaskOptions, TaskServer};
use proto::agent::stream_data::{Data, WindowUpdate};
use proto::agent::streaming::StreamInit;
use proto::agent::streaming_ttrpc::StreamingClient;
use proto::protobuf::Message as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use ttrpc::Code;

const BUSYBOX: &str = "/bin/busybox";

/// Skips with a loud message, or fails under CI (`CI=true` or SANDBOXER_REQUIRE_ROOT=1).
fn skip(why: &str) {
    if std::env::var("SANDBOXER_REQUIRE_ROOT").as_deref() == Ok("1")
        || std::env::var("CI").as_deref() == Ok("true")
    {
        panic!("{why} (required: CI=true or SANDBOXER_REQUIRE_ROOT=1)");
    }
    eprintln!("SKIP task_endpoint: {why}");
}

fn fs_type(path: &str) -> String {
    Command::new("stat")
        .args(["-fc", "%T", path])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `$SANDBOXER_AGENT_BIN`, or `target/<profile>/sandboxer-agent` next to this test's `deps/`
/// directory.
fn agent_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("SANDBOXER_AGENT_BIN") {
        return Some(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("sandboxer-agent");
    bin.is_file().then_some(bin)
}

/// Whether the agent has to run in a private mount namespace with cgroup2 mounted at
/// /sys/fs/cgroup (a hybrid cgroup host).
struct Env {
    agent: PathBuf,
    hybrid: bool,
}

fn preconditions() -> Option<Env> {
    if Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout != b"0\n")
        .unwrap_or(true)
    {
        skip("needs root");
        return None;
    }
    if !Path::new(BUSYBOX).exists() {
        skip("needs /bin/busybox (apt-get install busybox-static)");
        return None;
    }
    for tool in [
        "mkfs.erofs",
        "mkfs.ext4",
        "losetup",
        "mknod",
        "mkfifo",
        "debugfs",
    ] {
        if !have(tool) {
            skip(&format!(
                "needs {tool} (erofs-utils, e2fsprogs, util-linux)"
            ));
            return None;
        }
    }
    let Some(agent) = agent_binary() else {
        skip("needs the agent binary: cargo build -p agent");
        return None;
    };
    let hybrid = if fs_type("/sys/fs/cgroup") == "cgroup2fs" {
        false
    } else if fs_type("/sys/fs/cgroup/unified") == "cgroup2fs" {
        true
    } else {
        skip("needs cgroup v2");
        return None;
    };
    Some(Env { agent, hybrid })
}

/// The agent process: SIGTERM on drop (it kills its containers), then the cgroup goes.
struct Agent {
    child: Child,
    cgroup_parent: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let _ = std::fs::remove_dir(Path::new(root).join(&self.cgroup_parent));
        }
    }
}

fn start_agent(env: &Env, dir: &Path, cgroup_parent: &str) -> (Agent, PathBuf) {
    let sock = dir.join("agent.sock");
    let listen = format!("unix:{}", sock.display());
    let state = dir.join("agent-state");
    let args = [
        "--listen",
        &listen,
        "--ready-fd",
        "1",
        "--state-dir",
        state.to_str().unwrap(),
        "--cgroup-parent",
        cgroup_parent,
    ];
    let mut cmd = if env.hybrid {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\"")
            .arg(&env.agent)
            .args(args);
        c
    } else {
        let mut c = Command::new(&env.agent);
        c.args(args);
        c
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the agent");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let agent = Agent {
        child,
        cgroup_parent: cgroup_parent.to_owned(),
    };
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("agent ready line within 30 s");
    assert_eq!(line, format!("READY unix:{}\n", sock.display()));
    (agent, sock)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A sandbox "VM" made of an agent on this host and loop devices as block slots.
struct LoopTarget {
    client: Client,
    next_slot: AtomicU32,
    /// slot -> (loop device, backing file, read-only)
    slots: Mutex<BTreeMap<u32, (String, PathBuf, bool)>>,
}

impl std::fmt::Debug for LoopTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopTarget")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl LoopTarget {
    fn attached(&self) -> Vec<(PathBuf, bool)> {
        self.slots
            .lock()
            .unwrap()
            .values()
            .map(|(_, f, ro)| (f.clone(), *ro))
            .collect()
    }
}

impl Drop for LoopTarget {
    fn drop(&mut self) {
        for (dev, _, _) in self.slots.lock().unwrap().values() {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

#[async_trait]
impl TaskTarget for LoopTarget {
    fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError> {
        Ok(self.client.clone())
    }

    async fn attach_disk(
        &self,
        path: &Path,
        read_only: bool,
    ) -> Result<AttachedDisk, BackendError> {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if read_only {
            cmd.arg("-r");
        }
        let out = cmd
            .arg(path)
            .output()
            .map_err(|e| BackendError::Start(Box::new(e)))?;
        if !out.status.success() {
            return Err(BackendError::Start(
                String::from_utf8_lossy(&out.stderr).into_owned().into(),
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        self.slots
            .lock()
            .unwrap()
            .insert(slot, (dev.clone(), path.to_owned(), read_only));
        Ok(AttachedDisk { slot, source: dev })
    }

    async fn detach_disk(&self, slot: u32) -> Result<(), BackendError> {
        let (dev, _, _) = self
            .slots
            .lock()
            .unwrap()
            .remove(&slot)
            .ok_or(BackendError::Unsupported("unknown slot"))?;
        let status = Command::new("losetup")
            .args(["-d", &dev])
            .status()
            .map_err(|e| BackendError::Start(Box::new(e)))?;
        assert!(status.success(), "losetup -d {dev}");
        Ok(())
    }
}

/// Writes a busybox root file system into `dir`.
fn busybox_tree(dir: &Path) {
    for d in ["bin", "proc", "dev", "tmp", "sys", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "sleep", "cat", "test", "ls", "grep", "tr", "true",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A host bundle as containerd writes it: config.json only (the rootfs comes as mounts).
fn host_bundle(dir: &Path, id: &str, args: &[&str], extra_mounts: &[serde_json::Value]) -> PathBuf {
    let bundle = dir.join(format!("bundle-{id}"));
    std::fs::create_dir_all(&bundle).unwrap();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
    ];
    mounts.extend_from_slice(extra_mounts);
    let config = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": id,
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "apparmorProfile": "cri-containerd.apparmor.d"
        },
        "mounts": mounts,
        "linux": {
            "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:x",
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "network", "path": "/var/run/netns/cni-none"}],
            "maskedPaths": ["/proc/kcore"]
        }
    });
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    bundle
}

fn mount(ty: &str, source: &str, options: &[String]) -> Mount {
    let mut m = Mount::new();
    m.type_ = ty.to_owned();
    m.source = source.to_owned();
    m.options = options.to_vec();
    m
}

fn create_req(id: &str, bundle: &Path, rootfs: Vec<Mount>) -> CreateTaskRequest {
    let mut r = CreateTaskRequest::new();
    r.id = id.to_owned();
    r.bundle = bundle.to_str().unwrap().to_owned();
    r.rootfs = rootfs;
    r
}

fn ctx() -> ttrpc::context::Context {
    let mut c = ttrpc::context::with_duration(Duration::from_secs(60));
    c.add("containerd-namespace-ttrpc".into(), "k8s.io".into());
    c
}

fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

async fn start(c: &TaskClient, id: &str, exec_id: &str) -> u32 {
    let mut r = StartRequest::new();
    r.id = id.into();
    r.exec_id = exec_id.into();
    c.start(ctx(), &r).await.expect("start").pid
}

async fn wait(c: &TaskClient, id: &str, exec_id: &str) -> u32 {
    let mut r = WaitRequest::new();
    r.id = id.into();
    r.exec_id = exec_id.into();
    c.wait(ttrpc::context::Context::default(), &r)
        .await
        .expect("wait")
        .exit_status
}

async fn state(
    c: &TaskClient,
    id: &str,
) -> ttrpc::Result<containerd_shim_protos::api::StateResponse> {
    let mut r = StateRequest::new();
    r.id = id.into();
    c.state(ctx(), &r).await
}

async fn delete(
    c: &TaskClient,
    id: &str,
) -> ttrpc::Result<containerd_shim_protos::api::DeleteResponse> {
    let mut r = DeleteRequest::new();
    r.id = id.into();
    c.delete(ctx(), &r).await
}

fn pack(
    type_url: &str,
    msg: &impl proto::protobuf::Message,
) -> proto::protobuf::well_known_types::any::Any {
    let mut any = proto::protobuf::well_known_types::any::Any::new();
    any.type_url = type_url.to_owned();
    any.value = msg.write_to_bytes().unwrap();
    any
}

async fn read_to_end(mut r: pipe::Receiver) -> String {
    let mut out = String::new();
    r.read_to_string(&mut out).await.unwrap();
    out
}

/// Reads `path` until it holds `want` (output is copied a little after the process exits),
/// for at most 10 s; returns what it holds then.
async fn eventually_read(path: &Path, want: &str) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(path).unwrap_or_default();
        if text == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    text
}

/// The container's checks: each failing test exits with its own code.
const MERGED_VIEW_CHECKS: &str = r#"
test "$(cat /data/keep)" = from-l2 || exit 11
test -f /data/l2file || exit 12
test "$(cat /data/upper-file)" = upper || exit 13
test -e /data/remove-me && exit 14
test "$(ls /data | tr '\n' ' ')" = "keep l2file upper-file " || exit 15
grep -q sandboxer-hosts-marker /etc/hosts || exit 16
test -d /dev/shm || exit 17
echo written > /data/written || exit 18
test "$(cat /data/written)" = written || exit 19
if test -d /opq; then
  test -e /opq/old && exit 20
  test -f /opq/new || exit 21
fi
exit 0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_endpoint_end_to_end() {
    let Some(env) = preconditions() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cg = format!("sandboxer-task-endpoint-{}", std::process::id());
    let (_agent, agent_sock) = start_agent(&env, d, &cg);
    let agent_client = Client::connect(&format!("unix://{}", agent_sock.display()))
        .await
        .expect("connect to the agent");
    let target = Arc::new(LoopTarget {
        client: agent_client,
        next_slot: AtomicU32::new(0),
        slots: Mutex::new(BTreeMap::new()),
    });
    let images = Arc::new(ImageCache::new(&d.join("images")).unwrap());
    let work = d.join("work");
    let sock = d.join("task.sock");
    let mut opts = TaskOptions::new(images.clone(), &work);
    // The tests' bundles, layers and FIFOs are in their temporary directory.
    opts.host_paths = HostPaths::new([d.to_path_buf()]);
    let server = TaskServer::start(&sock, target.clone(), opts)
        .await
        .expect("start the endpoint");
    let c = TaskClient::new(
        Client::connect(&format!("unix://{}", sock.display()))
            .await
            .expect("connect to task.sock"),
    );

    // --- Overlay snapshot: base (busybox + data) <- l2 <- upper (whiteout, opaque dir). ---
    let l1 = d.join("snapshots/1/fs");
    busybox_tree(&l1);
    write(&l1.join("data/keep"), "from-l1");
    write(&l1.join("data/remove-me"), "x");
    write(&l1.join("opq/old"), "old");
    let l2 = d.join("snapshots/2/fs");
    write(&l2.join("data/keep"), "from-l2");
    write(&l2.join("data/l2file"), "l2");
    let upper = d.join("snapshots/3/fs");
    write(&upper.join("data/upper-file"), "upper");
    run(Command::new("mknod")
        .arg(upper.join("data/remove-me"))
        .args(["c", "0", "0"]));
    let opaque = have("python3") && {
        write(&upper.join("opq/new"), "new");
        run(Command::new("python3").args([
            "-c",
            "import os,sys; os.setxattr(sys.argv[1], 'trusted.overlay.opaque', b'y')",
            upper.join("opq").to_str().unwrap(),
        ]));
        true
    };
    if !opaque {
        // Under CI (tests/setup installs python3) leaving a check out is a failure.
        let required = std::env::var("CI").is_ok_and(|v| v == "true")
            || std::env::var("SANDBOXER_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "no python3 for the opaque-directory check (required: CI=true or \
             SANDBOXER_REQUIRE_TOOLS=1)"
        );
        eprintln!("SKIP part of task_endpoint: no python3, the opaque-directory check is left out");
    }
    std::fs::create_dir_all(d.join("snapshots/3/work")).unwrap();
    let lowers = vec![l2.clone(), l1.clone()];
    let overlay_opts = vec![
        "index=off".to_owned(),
        format!("workdir={}", d.join("snapshots/3/work").display()),
        format!("upperdir={}", upper.display()),
        format!("lowerdir={}:{}", l2.display(), l1.display()),
    ];
    let hosts = d.join("hosts");
    write(&hosts, "127.0.0.1 localhost sandboxer-hosts-marker\n");
    let shm = d.join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let file_binds = [
        json!({"destination": "/etc/hosts", "type": "bind", "source": hosts,
               "options": ["rbind", "rprivate", "ro"]}),
        json!({"destination": "/dev/shm", "type": "bind", "source": shm,
               "options": ["rbind", "rprivate", "rw"]}),
    ];
    let bundle_a = host_bundle(d, "merged", &["sh", "-c", MERGED_VIEW_CHECKS], &file_binds);
    let pid = c
        .create(
            ctx(),
            &create_req(
                "merged",
                &bundle_a,
                vec![mount("overlay", "overlay", &overlay_opts)],
            ),
        )
        .await
        .expect("create from an overlay snapshot")
        .pid;
    assert!(pid > 0);
    // Two read-only erofs layers: the upper's and the shared lower chain's.
    let attached = target.attached();
    assert_eq!(attached.len(), 2, "{attached:?}");
    assert!(attached.iter().all(|(_, ro)| *ro));
    assert_eq!(images.len(), 1);
    assert_eq!(images.refs(&lowers), 1);
    let s = state(&c, "merged").await.unwrap();
    assert_eq!(s.status.enum_value(), Ok(Status::CREATED));
    assert_eq!(
        s.bundle,
        bundle_a.to_str().unwrap(),
        "State shows the host bundle"
    );
    assert_eq!(start(&c, "merged", "").await, pid);
    assert_eq!(
        wait(&c, "merged", "").await,
        0,
        "the container sees the merged view"
    );
    assert!(
        !upper.join("data/written").exists(),
        "writes stay in the VM, not in the host upperdir"
    );

    // --- A second container on the same lower chain reuses its image. ---
    let bundle_b = host_bundle(
        d,
        "second",
        &[
            "sh",
            "-c",
            "test -f /data/upper-file && exit 30; test -f /data/keep || exit 31; exec sleep 100",
        ],
        &[],
    );
    let empty_upper = d.join("snapshots/4/fs");
    std::fs::create_dir_all(&empty_upper).unwrap();
    let opts_b = vec![
        format!("upperdir={}", empty_upper.display()),
        format!("lowerdir={}:{}", l2.display(), l1.display()),
    ];
    c.create(
        ctx(),
        &create_req(
            "second",
            &bundle_b,
            vec![mount("overlay", "overlay", &opts_b)],
        ),
    )
    .await
    .expect("create a second container on the same chain");
    assert_eq!(images.len(), 1, "one image for both");
    assert_eq!(images.refs(&lowers), 2);
    assert_eq!(
        target.attached().len(),
        3,
        "an empty upperdir needs no layer"
    );
    start(&c, "second", "").await;
    // Exec in it, and Pids.
    let mut exec = ExecProcessRequest::new();
    exec.id = "second".into();
    exec.exec_id = "x1".into();
    let mut spec = Any::new();
    spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
    spec.value = serde_json::to_vec(&json!({
        "args": ["sh", "-c", "test -f /data/l2file && exit 7; exit 8"],
        "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    }))
    .unwrap();
    exec.spec = Some(spec).into();
    c.exec(ctx(), &exec).await.expect("exec");
    start(&c, "second", "x1").await;
    assert_eq!(wait(&c, "second", "x1").await, 7);
    // An exec process whose stdout is a plain host file.
    let exec_log = d.join("exec.log");
    let mut exec2 = exec.clone();
    exec2.exec_id = "x2".into();
    exec2.stdout = exec_log.display().to_string();
    let mut spec2 = exec2.spec.clone().unwrap();
    spec2.value = serde_json::to_vec(&json!({
        "args": ["echo", "exec-out"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    }))
    .unwrap();
    exec2.spec = Some(spec2).into();
    c.exec(ctx(), &exec2).await.expect("exec with stdout");
    start(&c, "second", "x2").await;
    assert_eq!(wait(&c, "second", "x2").await, 0);
    assert_eq!(eventually_read(&exec_log, "exec-out\n").await, "exec-out\n");
    let mut pids = PidsRequest::new();
    pids.id = "second".into();
    assert!(
        !c.pids(ctx(), &pids)
            .await
            .expect("pids")
            .processes
            .is_empty()
    );
    // Delete while running: the agent refuses, the endpoint keeps the slots.
    let (code, _) = code_of(delete(&c, "second").await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert_eq!(target.attached().len(), 3);
    let mut kill = KillRequest::new();
    kill.id = "second".into();
    kill.signal = 9;
    c.kill(ctx(), &kill).await.expect("kill");
    assert_eq!(wait(&c, "second", "").await, 137);

    // --- FIFO stdio (io_type = "fifo"): stdin and stdout FIFOs, stderr a plain file. ---
    let fifo_in = d.join("fifo-in");
    let fifo_out = d.join("fifo-out");
    let err_log = d.join("err.log");
    run(Command::new("mkfifo").arg(&fifo_in).arg(&fifo_out));
    let bundle_f = host_bundle(
        d,
        "fifo",
        &["sh", "-c", "echo out-line; echo err-line >&2; cat; exit 4"],
        &[],
    );
    let mut req = create_req(
        "fifo",
        &bundle_f,
        vec![mount("overlay", "overlay", &opts_b)],
    );
    req.stdin = fifo_in.display().to_string();
    req.stdout = fifo_out.display().to_string();
    req.stderr = err_log.display().to_string();
    c.create(ctx(), &req).await.expect("create with FIFO stdio");
    // The engine's reader may come after the Create that names the FIFO (containerd's ExecSync
    // opens it from a goroutine).
    let out_reader = pipe::OpenOptions::new().open_receiver(&fifo_out).unwrap();
    let reading = tokio::spawn(read_to_end(out_reader));
    let mut stdin = pipe::OpenOptions::new().open_sender(&fifo_in).unwrap();
    stdin.write_all(b"ping\n").await.unwrap();
    drop(stdin);
    start(&c, "fifo", "").await;
    assert_eq!(wait(&c, "fifo", "").await, 4);
    let out = tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("stdout FIFO reaches EOF")
        .unwrap();
    assert_eq!(out, "out-line\nping\n");
    assert_eq!(eventually_read(&err_log, "err-line\n").await, "err-line\n");
    delete(&c, "fifo").await.expect("delete fifo");

    // --- Streaming stdio (io_type = "streaming"): containerd opens the stream here. ---
    let streaming = StreamingClient::new(
        Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap(),
    );
    let stream = streaming
        .stream(ttrpc::context::Context::default())
        .await
        .expect("open a stream on task.sock");
    let (stx, mut srx) = stream.split();
    // What ttrpc-rust's server makes of containerd's Go client opening a stream: a blank first
    // message before the StreamInit.
    stx.send(&proto::protobuf::well_known_types::any::Any::new())
        .await
        .unwrap();
    let mut init = StreamInit::new();
    init.id = "streamed-stdout".into();
    stx.send(&pack("containerd.services.streaming.v1.StreamInit", &init))
        .await
        .unwrap();
    let ack = srx.recv().await.expect("StreamInit answered");
    assert_eq!(ack.type_url, "google.protobuf.Empty");
    let bundle_s = host_bundle(d, "streamed", &["sh", "-c", "echo via-stream"], &[]);
    let mut req = create_req(
        "streamed",
        &bundle_s,
        vec![mount("overlay", "overlay", &opts_b)],
    );
    req.stdout = format!(
        "ttrpc+unix://{}?streaming_id=streamed-stdout",
        sock.display()
    );
    c.create(ctx(), &req)
        .await
        .expect("create with a stdout stream");
    let mut grant = WindowUpdate::new();
    grant.update = 65536;
    stx.send(&pack("containerd.types.transfer.WindowUpdate", &grant))
        .await
        .unwrap();
    start(&c, "streamed", "").await;
    let received = tokio::time::timeout(Duration::from_secs(20), async {
        let mut got = Vec::new();
        while let Ok(any) = srx.recv().await {
            if any.type_url == "containerd.types.transfer.Data" {
                got.extend(Data::parse_from_bytes(&any.value).unwrap().data);
            }
        }
        String::from_utf8(got).unwrap()
    })
    .await
    .expect("the stream ends after the output");
    assert_eq!(received, "via-stream\n");
    assert_eq!(wait(&c, "streamed", "").await, 0);
    delete(&c, "streamed").await.expect("delete streamed");

    // --- Delete frees slots and images. ---
    assert_eq!(
        delete(&c, "merged")
            .await
            .expect("delete merged")
            .exit_status,
        0
    );
    assert_eq!(
        images.refs(&lowers),
        1,
        "the second container still holds the chain"
    );
    assert_eq!(target.attached().len(), 1);
    assert!(
        !work.join("merged").exists(),
        "the private upper image is gone"
    );
    assert_eq!(
        delete(&c, "second")
            .await
            .expect("delete second")
            .exit_status,
        137
    );
    assert!(target.attached().is_empty(), "every slot detached");
    assert!(images.is_empty(), "the unused chain image is dropped");
    assert_eq!(std::fs::read_dir(images.dir()).unwrap().count(), 0);
    assert!(server.container_ids().is_empty());

    // --- An ext4 image file, attached writable as it is. ---
    let img = d.join("rootfs.ext4");
    let tree = d.join("ext4-tree");
    busybox_tree(&tree);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("32M"));
    let bundle_e = host_bundle(
        d,
        "ext4",
        &["sh", "-c", "echo persisted > /etc/mark; exit 5"],
        &[],
    );
    c.create(
        ctx(),
        &create_req(
            "ext4",
            &bundle_e,
            vec![mount("ext4", img.to_str().unwrap(), &["loop".into()])],
        ),
    )
    .await
    .expect("create from an ext4 image");
    assert_eq!(target.attached(), vec![(img.clone(), false)]);
    start(&c, "ext4", "").await;
    assert_eq!(wait(&c, "ext4", "").await, 5);
    delete(&c, "ext4").await.expect("delete ext4");
    assert!(target.attached().is_empty());
    let cat = run(Command::new("debugfs")
        .args(["-R", "cat /etc/mark"])
        .arg(&img));
    assert_eq!(cat, "persisted\n", "the write landed in the image");

    // --- Bad input. ---
    let overlay = vec![mount("overlay", "overlay", &opts_b)];
    let empty_bundle = d.join("bundle-empty");
    std::fs::create_dir_all(&empty_bundle).unwrap();
    let (code, msg) = code_of(
        c.create(ctx(), &create_req("nocfg", &empty_bundle, overlay.clone()))
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
    let data = d.join("data-dir");
    std::fs::create_dir_all(&data).unwrap();
    let bundle_dir = host_bundle(
        d,
        "dirbind",
        &["true"],
        &[json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind"]})],
    );
    let (code, msg) = code_of(
        c.create(ctx(), &create_req("dirbind", &bundle_dir, overlay.clone()))
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("mounts[2] (/data)") && msg.contains("host director"),
        "{msg}"
    );
    let (code, msg) = code_of(
        c.create(ctx(), &create_req("a/b", &bundle_b, overlay.clone()))
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    let (code, msg) = code_of(
        c.create(
            ctx(),
            &create_req("badfs", &bundle_b, vec![mount("nfs", "host:/x", &[])]),
        )
        .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("rootfs[0]"), "{msg}");
    let mut with_stdio = create_req("stdio", &bundle_b, overlay.clone());
    with_stdio.stderr = "relative/err.log".into();
    let (code, msg) = code_of(c.create(ctx(), &with_stdio).await);
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("stderr") && msg.contains("not absolute"),
        "{msg}"
    );
    // Host paths outside the allowed roots (here the test's directory): the daemon, root,
    // opens none of them.
    let outside = tempfile::tempdir().unwrap();
    let stray = host_bundle(outside.path(), "stray", &["true"], &[]);
    let image = outside.path().join("disk.ext4");
    std::fs::write(&image, b"").unwrap();
    for (req, field) in [
        (create_req("out-bundle", &stray, overlay.clone()), "bundle"),
        (
            create_req(
                "out-rootfs",
                &bundle_b,
                vec![mount("ext4", image.to_str().unwrap(), &[])],
            ),
            "rootfs",
        ),
        (
            create_req(
                "out-layer",
                &bundle_b,
                vec![mount(
                    "overlay",
                    "overlay",
                    &[format!("lowerdir={}", outside.path().display())],
                )],
            ),
            "rootfs",
        ),
        (
            CreateTaskRequest {
                stdout: "/etc/sandboxer-task-test.out".into(),
                ..create_req("out-stdout", &bundle_b, overlay.clone())
            },
            "stdout",
        ),
    ] {
        let (code, msg) = code_of(c.create(ctx(), &req).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{field}: {msg}");
        assert!(
            msg.contains(field) && msg.contains("outside the directories"),
            "{msg}"
        );
    }
    assert!(!Path::new("/etc/sandboxer-task-test.out").exists());
    let (code, msg) = code_of(state(&c, "nosuch").await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    let (code, msg) = code_of(delete(&c, "nosuch").await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    // Duplicate ids.
    let bundle_dup = host_bundle(d, "dup", &["sleep", "100"], &[]);
    c.create(ctx(), &create_req("dup", &bundle_dup, overlay.clone()))
        .await
        .expect("create dup");
    let (code, msg) = code_of(
        c.create(ctx(), &create_req("dup", &bundle_dup, overlay.clone()))
            .await,
    );
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");
    assert_eq!(
        target.attached().len(),
        1,
        "the failed duplicate attached nothing"
    );
    delete(&c, "dup")
        .await
        .expect("delete a created, never started container");
    // Nothing leaked by the failures.
    assert!(target.attached().is_empty());
    assert!(images.is_empty());

    // --- Shutdown removes the socket and frees what is left. ---
    let bundle_left = host_bundle(d, "left", &["sleep", "100"], &[]);
    c.create(ctx(), &create_req("left", &bundle_left, overlay))
        .await
        .expect("create left");
    assert_eq!(target.attached().len(), 1);
    server.shutdown().await;
    assert!(!sock.exists());
    assert!(target.attached().is_empty());
    assert!(images.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_logic_against_a_fake_agent() {
    use proto::agent::control::Event;

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let agent = Arc::new(fake::FakeAgent::default());
    let agent_sock = d.join("fake-agent.sock");
    let mut agent_server = fake::serve_agent(agent.clone(), &agent_sock).await;
    let containerd = Arc::new(fake::FakeContainerd::default());
    let ctrd_addr = d.join("containerd.sock");
    let mut ctrd_server = fake::serve_containerd(containerd.clone(), &ctrd_addr).await;
    let target = Arc::new(fake::FakeSlots {
        client: Client::connect(&format!("unix://{}", agent_sock.display()))
            .await
            .unwrap(),
        next: AtomicU32::new(0),
        slots: Mutex::new(BTreeMap::new()),
    });
    let images = Arc::new(ImageCache::new(&d.join("images")).unwrap());
    let mut opts = TaskOptions::new(images, d.join("work"));
    opts.host_paths = HostPaths::new([d.to_path_buf()]);
    opts.containerd_address = Some(ctrd_addr);
    opts.call_timeout = Duration::from_millis(300);
    let sock = d.join("task.sock");
    let server = TaskServer::start(&sock, target.clone(), opts)
        .await
        .unwrap();
    let c = TaskClient::new(
        Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap(),
    );

    let img = d.join("rootfs.img");
    std::fs::write(&img, b"not really ext4").unwrap();
    let hosts = d.join("hosts");
    write(&hosts, "127.0.0.1 localhost\n");
    let binds = [
        json!({"destination": "/etc/hosts", "type": "bind", "source": hosts,
                        "options": ["rbind", "ro"]}),
    ];
    let rootfs = || vec![mount("ext4", img.to_str().unwrap(), &["ro".to_owned()])];

    // First container: one PrepareBundle, the file mount's source bundle-relative (the agent
    // resolves it under the bundle it chooses), the file copied.
    let b1 = host_bundle(d, "c1", &["true"], &binds);
    let pid = c
        .create(ctx(), &create_req("c1", &b1, rootfs()))
        .await
        .expect("create c1")
        .pid;
    assert_eq!(pid, 42);
    {
        let seen = agent.seen.lock().unwrap();
        assert_eq!(seen.prepares.len(), 1);
        assert!(seen.removes.is_empty());
        let prep = &seen.prepares[0];
        assert_eq!(prep.files.len(), 1);
        assert_eq!(prep.files[0].path, "2-hosts");
        assert_eq!(prep.files[0].data, b"127.0.0.1 localhost\n");
        let spec: serde_json::Value = serde_json::from_slice(&prep.config_json).unwrap();
        assert_eq!(spec["root"]["path"], "rootfs");
        assert_eq!(spec["mounts"][2]["source"], "files/2-hosts");
        assert!(spec["linux"].get("cgroupsPath").is_none());
        assert!(spec["process"].get("apparmorProfile").is_none());
        let create = &seen.creates[0];
        assert_eq!(create.bundle, "/agent/bundles/c1");
        assert_eq!(create.rootfs.len(), 1);
        assert_eq!(create.rootfs[0].type_, "ext4");
        assert_eq!(create.rootfs[0].source, "blk:sbx-slot-0");
        assert_eq!(create.rootfs[0].options, vec!["ro".to_owned()]);
        assert_eq!(
            seen.create_metadata[0].get("containerd-namespace-ttrpc"),
            Some(&vec!["k8s.io".to_owned()])
        );
    }
    assert_eq!(
        target
            .slots
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect::<Vec<_>>(),
        vec![(img.clone(), true)]
    );
    let (code, msg) = code_of(state(&c, "c1").await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(
        msg.contains("/containerd.task.v3.Task/State is not supported"),
        "{msg}"
    );

    // Second container: one PrepareBundle as well.
    let b2 = host_bundle(d, "c2", &["true"], &binds);
    c.create(ctx(), &create_req("c2", &b2, rootfs()))
        .await
        .expect("create c2");
    assert_eq!(agent.seen.lock().unwrap().prepares.len(), 2);
    assert!(agent.seen.lock().unwrap().removes.is_empty());

    // The agent's Create fails: its status passes through, everything is undone.
    let bf = host_bundle(d, "fail", &["true"], &binds);
    let (code, msg) = code_of(c.create(ctx(), &create_req("fail", &bf, rootfs())).await);
    assert_eq!(
        (code, msg.as_str()),
        (Code::FAILED_PRECONDITION, "fake create failure")
    );
    assert_eq!(agent.seen.lock().unwrap().removes.last().unwrap(), "fail");
    assert_eq!(target.slots.lock().unwrap().len(), 2);
    assert_eq!(server.container_ids().len(), 2);

    // A call the agent does not answer in time.
    let t0 = std::time::Instant::now();
    let mut start = StartRequest::new();
    start.id = "slow".into();
    let (code, msg) = code_of(c.start(ctx(), &start).await);
    assert_eq!(code, Code::DEADLINE_EXCEEDED, "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    // An OOM event goes to containerd in the container's namespace; one for a container this
    // sandbox does not have (another sandbox's, say), sent first, goes nowhere.
    let mut forged = Event::new();
    forged.topic = "/tasks/oom".into();
    forged.container_id = "another-pods-container\nforged log line".into();
    forged.unix_nanos = 1;
    let mut ev = Event::new();
    ev.topic = "/tasks/oom".into();
    ev.container_id = "c1".into();
    ev.unix_nanos = 1;
    // The fake agent hands them out last first: the forged one goes first.
    agent.events.lock().unwrap().extend([ev, forged]);
    agent.event_ready.notify_one();
    tokio::time::timeout(Duration::from_secs(10), containerd.got.notified())
        .await
        .expect("the OOM event reaches containerd");
    assert_eq!(
        containerd.forwarded.lock().unwrap().clone(),
        vec![(
            "k8s.io".to_owned(),
            "/tasks/oom".to_owned(),
            "c1".to_owned()
        )]
    );

    // Wait has no timeout, but ends when the agent connection dies.
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut r = WaitRequest::new();
            r.id = "c1".into();
            c.wait(ttrpc::context::Context::default(), &r).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "Wait must not time out");
    agent_server.shutdown().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("Wait ends with the agent connection")
        .unwrap();
    let (code, msg) = code_of(r);
    assert_eq!(code, Code::UNAVAILABLE, "{msg}");
    // With the VM gone, Delete frees the container's slots and says there is nothing left.
    let (code, msg) = code_of(delete(&c, "c1").await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(msg.contains("is gone with its VM"), "{msg}");
    assert_eq!(target.slots.lock().unwrap().len(), 1);
    assert_eq!(server.container_ids(), vec!["c2".to_owned()]);

    server.shutdown().await;
    assert!(target.slots.lock().unwrap().is_empty());
    assert!(!sock.exists());
    ctrd_server.shutdown().await.unwrap();
}
