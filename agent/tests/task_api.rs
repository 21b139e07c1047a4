// SPDX-License-Identifier: Apache-2.0
//! The agent's Task API end to end on the host: the `sandboxer-agent` binary serves ttrpc on a
//! unix socket in a temp dir and runs real containers (a busybox rootfs from Debian's
//! `busybox-static`) through libcontainer; the test drives it with containerd-shim-protos'
//! ttrpc client.
//!
//! Needs root and cgroup v2. On a hybrid cgroup host (cgroup2 only at
//! `/sys/fs/cgroup/unified`) the agent runs in a private mount namespace with cgroup2 mounted
//! on `/sys/fs/cgroup`, as in the guest. Without root, cgroup v2 or busybox the test prints a
//! loud SKIP, or fails under `SANDBOXER_REQUIRE_ROOT=1`.

#![cfg(feature = "containers")]
#![expect(clippy::tests_outside_test_module, reason = "integration test file")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::{
    CloseIORequest, CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, PidsRequest,
    ResizePtyRequest, StartRequest, StateRequest, StateResponse, StatsRequest, Status, WaitRequest,
};
use containerd_shim_protos::cgroups_v2::metrics::Metrics;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::Pid;
use serde_json::json;
use ttrpc::Code;

const BUSYBOX: &str = "/bin/busybox";

/// Skips (or fails under SANDBOXER_REQUIRE_ROOT=1) with a loud message.
fn skip(why: &str) {
    if std::env::var("SANDBOXER_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{why} (SANDBOXER_REQUIRE_ROOT=1)");
    }
    eprintln!("SKIP task_api: {why}");
}

/// How to give the agent cgroup v2 at /sys/fs/cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupSetup {
    /// /sys/fs/cgroup is cgroup2 already.
    Unified,
    /// cgroup2 is at /sys/fs/cgroup/unified: mount it at /sys/fs/cgroup in a private mount
    /// namespace.
    Hybrid,
}

fn is_cgroup2(path: &str) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

fn preconditions() -> Option<CgroupSetup> {
    if !nix::unistd::geteuid().is_root() {
        skip("needs root");
        return None;
    }
    if !Path::new(BUSYBOX).exists() {
        skip("needs /bin/busybox (apt-get install busybox-static; tests/setup does)");
        return None;
    }
    if is_cgroup2("/sys/fs/cgroup") {
        Some(CgroupSetup::Unified)
    } else if is_cgroup2("/sys/fs/cgroup/unified") {
        Some(CgroupSetup::Hybrid)
    } else {
        skip("needs cgroup v2");
        None
    }
}

/// The agent process; SIGTERM and the test cgroup's removal on drop.
struct Agent {
    child: Child,
    cgroup_parent: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
            let _ = kill(pid, Signal::SIGTERM);
            let _ = self.child.wait();
        }
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let _ = std::fs::remove_dir(Path::new(root).join(&self.cgroup_parent));
        }
    }
}

fn start_agent(dir: &Path, setup: CgroupSetup, cgroup_parent: &str) -> (Agent, PathBuf) {
    let sock = dir.join("agent.sock");
    let agent = env!("CARGO_BIN_EXE_sandboxer-agent");
    let listen = format!("unix:{}", sock.display());
    let state = dir.join("state");
    let agent_args = [
        "--listen",
        &listen,
        "--ready-fd",
        "1",
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let mut cmd = match setup {
        CgroupSetup::Unified => {
            let mut c = Command::new(agent);
            c.args(agent_args);
            c
        }
        CgroupSetup::Hybrid => {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg("mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\"")
                .arg(agent)
                .args(agent_args);
            c
        }
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
        .expect("ready line within 30 s");
    assert_eq!(line, format!("READY unix:{}\n", sock.display()));
    (agent, sock)
}

/// Writes a busybox bundle: rootfs with /bin/busybox and applet links, and config.json.
fn write_bundle(dir: &Path, id: &str, args: &[&str], cgroup_parent: &str) -> PathBuf {
    let bundle = dir.join(format!("bundle-{id}"));
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "proc", "dev", "tmp", "sys"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "sleep", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let config = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": false},
        "hostname": id,
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "cgroupsPath": format!("/{cgroup_parent}/{id}"),
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    });
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    bundle
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos().try_into().unwrap())
}

fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

fn create_req(id: &str, bundle: &Path, stdout: &Path) -> CreateTaskRequest {
    let mut r = CreateTaskRequest::new();
    r.id = id.to_owned();
    r.bundle = bundle.to_str().unwrap().to_owned();
    r.stdout = stdout.to_str().unwrap().to_owned();
    r.stderr = stdout.to_str().unwrap().to_owned();
    r
}

fn id_req<T: Default>(set: impl FnOnce(&mut T)) -> T {
    let mut r = T::default();
    set(&mut r);
    r
}

async fn state(c: &TaskClient, id: &str, exec_id: &str) -> ttrpc::Result<StateResponse> {
    c.state(
        ctx(),
        &id_req(|r: &mut StateRequest| {
            r.id = id.into();
            r.exec_id = exec_id.into();
        }),
    )
    .await
}

async fn wait(c: &TaskClient, id: &str, exec_id: &str) -> (u32, SystemTime) {
    let r = c
        .wait(
            ctx(),
            &id_req(|r: &mut WaitRequest| {
                r.id = id.into();
                r.exec_id = exec_id.into();
            }),
        )
        .await
        .expect("wait");
    let at = r.exited_at.as_ref().expect("exited_at");
    let t = UNIX_EPOCH
        + Duration::new(
            u64::try_from(at.seconds).unwrap(),
            u32::try_from(at.nanos).unwrap(),
        );
    (r.exit_status, t)
}

fn assert_recent(t: SystemTime) {
    let age = SystemTime::now()
        .duration_since(t)
        .expect("exit time not in the future");
    assert!(age < Duration::from_secs(60), "exit time {age:?} ago");
}

async fn start(c: &TaskClient, id: &str, exec_id: &str) -> u32 {
    c.start(
        ctx(),
        &id_req(|r: &mut StartRequest| {
            r.id = id.into();
            r.exec_id = exec_id.into();
        }),
    )
    .await
    .expect("start")
    .pid
}

async fn delete(
    c: &TaskClient,
    id: &str,
) -> ttrpc::Result<containerd_shim_protos::api::DeleteResponse> {
    c.delete(ctx(), &id_req(|r: &mut DeleteRequest| r.id = id.into()))
        .await
}

fn exec_spec(args: &[&str]) -> Any {
    let mut any = Any::new();
    any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
    any.value = serde_json::to_vec(&json!({
        "args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    }))
    .unwrap();
    any
}

#[tokio::test(flavor = "current_thread")]
async fn task_api_runs_real_containers() {
    let Some(setup) = preconditions() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cg = format!("sandboxer-agent-test-{}", std::process::id());
    let (mut agent, sock) = start_agent(d, setup, &cg);
    let client = Client::connect(&format!("unix://{}", sock.display()))
        .await
        .expect("connect");
    let c = TaskClient::new(client.clone());

    // --- A container that prints and exits 3. ---
    let out = d.join("echo.out");
    let bundle = write_bundle(d, "echo", &["sh", "-c", "echo hello; exit 3"], &cg);
    let pid = c
        .create(ctx(), &create_req("echo", &bundle, &out))
        .await
        .expect("create")
        .pid;
    assert!(pid > 0);
    let s = state(&c, "echo", "").await.unwrap();
    assert_eq!(s.status.enum_value(), Ok(Status::CREATED));
    assert_eq!(s.pid, pid);
    assert_eq!(start(&c, "echo", "").await, pid);
    let (code, at) = wait(&c, "echo", "").await;
    assert_eq!(code, 3);
    assert_recent(at);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello\n");
    let s = state(&c, "echo", "").await.unwrap();
    assert_eq!(s.status.enum_value(), Ok(Status::STOPPED));
    assert_eq!(s.exit_status, 3);
    assert_eq!(s.bundle, bundle.to_str().unwrap());
    // Exec into a stopped container.
    let (code, msg) = code_of(
        c.exec(
            ctx(),
            &id_req(|r: &mut ExecProcessRequest| {
                r.id = "echo".into();
                r.exec_id = "late".into();
                r.spec = Some(exec_spec(&["true"])).into();
            }),
        )
        .await,
    );
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("\"echo\" is stopped"), "{msg}");
    let del = delete(&c, "echo").await.expect("delete");
    assert_eq!((del.pid, del.exit_status), (pid, 3));
    let (code, _) = code_of(state(&c, "echo", "").await);
    assert_eq!(code, Code::NOT_FOUND);

    // --- A long-running container: exec, pids, stats, kill. ---
    let out = d.join("sleep.out");
    let bundle = write_bundle(d, "sleeper", &["sleep", "30"], &cg);
    let init = c
        .create(ctx(), &create_req("sleeper", &bundle, &out))
        .await
        .expect("create sleeper")
        .pid;
    let (code, msg) = code_of(c.create(ctx(), &create_req("sleeper", &bundle, &out)).await);
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");
    start(&c, "sleeper", "").await;
    let s = state(&c, "sleeper", "").await.unwrap();
    assert_eq!(s.status.enum_value(), Ok(Status::RUNNING));

    // The v2 service name reaches the same handlers.
    let mut req = ttrpc::Request::new();
    req.service = "containerd.task.v2.Task".into();
    req.method = "State".into();
    req.timeout_nano = 10_000_000_000;
    req.payload = id_req(|r: &mut StateRequest| r.id = "sleeper".into())
        .write_to_bytes()
        .unwrap();
    let resp = client.request(req).await.expect("v2 State");
    let s2 = StateResponse::parse_from_bytes(&resp.payload).unwrap();
    assert_eq!(
        (s2.pid, s2.status.enum_value()),
        (init, Ok(Status::RUNNING))
    );

    let exec_out = d.join("exec.out");
    c.exec(
        ctx(),
        &id_req(|r: &mut ExecProcessRequest| {
            r.id = "sleeper".into();
            r.exec_id = "e1".into();
            r.stdout = exec_out.to_str().unwrap().into();
            r.spec = Some(exec_spec(&["echo", "from-exec"])).into();
        }),
    )
    .await
    .expect("exec");
    let s = state(&c, "sleeper", "e1").await.unwrap();
    assert_eq!(s.status.enum_value(), Ok(Status::CREATED));
    let exec_pid = start(&c, "sleeper", "e1").await;
    assert!(exec_pid > 0 && exec_pid != init);
    let (code, at) = wait(&c, "sleeper", "e1").await;
    assert_eq!(code, 0);
    assert_recent(at);
    assert_eq!(std::fs::read_to_string(&exec_out).unwrap(), "from-exec\n");
    let del = c
        .delete(
            ctx(),
            &id_req(|r: &mut DeleteRequest| {
                r.id = "sleeper".into();
                r.exec_id = "e1".into();
            }),
        )
        .await
        .expect("delete exec");
    assert_eq!((del.pid, del.exit_status), (exec_pid, 0));
    let (code, _) = code_of(state(&c, "sleeper", "e1").await);
    assert_eq!(code, Code::NOT_FOUND);

    let pids = c
        .pids(
            ctx(),
            &id_req(|r: &mut PidsRequest| r.id = "sleeper".into()),
        )
        .await
        .expect("pids");
    let pids: Vec<u32> = pids.processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, [init]);

    let stats = c
        .stats(
            ctx(),
            &id_req(|r: &mut StatsRequest| r.id = "sleeper".into()),
        )
        .await
        .expect("stats");
    assert_eq!(stats.stats.type_url, "io.containerd.cgroups.v2.Metrics");
    let m = Metrics::parse_from_bytes(&stats.stats.value).unwrap();
    assert!(m.cpu.is_some(), "cpu.stat always exists in cgroup v2");
    if m.memory.is_some() {
        assert!(m.memory.usage > 0);
    }
    if m.pids.is_some() {
        assert_eq!(m.pids.current, 1);
    }

    let (code, msg) = code_of(
        c.resize_pty(
            ctx(),
            &id_req(|r: &mut ResizePtyRequest| r.id = "sleeper".into()),
        )
        .await,
    );
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    c.close_io(
        ctx(),
        &id_req(|r: &mut CloseIORequest| r.id = "sleeper".into()),
    )
    .await
    .expect("close_io");

    let (code, msg) = code_of(delete(&c, "sleeper").await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    c.kill(
        ctx(),
        &id_req(|r: &mut KillRequest| {
            r.id = "sleeper".into();
            r.signal = 9;
        }),
    )
    .await
    .expect("kill");
    let (code, at) = wait(&c, "sleeper", "").await;
    assert_eq!(code, 128 + 9);
    assert_recent(at);
    let (code, msg) = code_of(
        c.kill(
            ctx(),
            &id_req(|r: &mut KillRequest| {
                r.id = "sleeper".into();
                r.signal = 9;
            }),
        )
        .await,
    );
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert_eq!(
        delete(&c, "sleeper").await.expect("delete").exit_status,
        137
    );

    // --- Bad input; the agent keeps serving. ---
    let (code, msg) = code_of(state(&c, "nope", "").await);
    assert_eq!(code, Code::NOT_FOUND);
    assert!(msg.contains("\"nope\""), "{msg}");
    let (code, _) = code_of(
        c.wait(ctx(), &id_req(|r: &mut WaitRequest| r.id = "nope".into()))
            .await,
    );
    assert_eq!(code, Code::NOT_FOUND);
    let bad = write_bundle(d, "bad", &["true"], &cg);
    std::fs::write(bad.join("config.json"), "{\"ociVersion\": 1,").unwrap();
    let (code, msg) = code_of(
        c.create(ctx(), &create_req("bad", &bad, &d.join("bad.out")))
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
    let (code, msg) = code_of(
        c.create(ctx(), &create_req("bad/id", &bad, &d.join("bad.out")))
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");

    // A created container that is never started can be deleted (its init is killed).
    let bundle = write_bundle(d, "unstarted", &["true"], &cg);
    let pid = c
        .create(ctx(), &create_req("unstarted", &bundle, &d.join("u.out")))
        .await
        .expect("create unstarted")
        .pid;
    let del = delete(&c, "unstarted").await.expect("delete unstarted");
    assert_eq!((del.pid, del.exit_status), (pid, 137));

    // Still serving: a fresh container runs to completion.
    let out = d.join("after.out");
    let bundle = write_bundle(d, "after", &["sh", "-c", "echo still-serving"], &cg);
    c.create(ctx(), &create_req("after", &bundle, &out))
        .await
        .expect("create after");
    start(&c, "after", "").await;
    assert_eq!(wait(&c, "after", "").await.0, 0);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "still-serving\n");
    delete(&c, "after").await.expect("delete after");

    // Orderly exit on SIGTERM.
    let pid = Pid::from_raw(i32::try_from(agent.child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
}
