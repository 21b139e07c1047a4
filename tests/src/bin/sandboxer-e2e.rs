// SPDX-License-Identifier: Apache-2.0
//! `sandboxer-e2e`: the end-to-end flows of a pod, driven from outside through the public
//! interfaces only: the real `sandboxer` daemon (a child process), its containerd 2.x Sandbox
//! API socket (gRPC) and the Task API address that `Start` returns (ttrpc), with a real Linux
//! guest kernel and the agent initramfs. It needs a KVM that can run Linux: a real KVM host, or
//! the emulated host (tests/emulated-host), whose cases run it inside L1.
//!
//! ```text
//! sandboxer-e2e --sandboxer BIN [--kernel VMLINUX --initramfs INITRAMFS] --image ROOTFS.ext4
//!               [--busybox BIN] [--work DIR] [--keep] CASE...
//! ```
//!
//! Without `--kernel` / `--initramfs` the daemon boots the guest kernel and agent built into
//! it (`tools/devtool dist`).
//!
//! ```text
//! ```
//!
//! Cases: `pod` (Create, Start, Status, Platform, Stop, Wait, Shutdown), `container` (a
//! container from an ext4 image runs to its exit; exit code and stdout through FIFOs),
//! `exec` (a long-running container, an exec process with output, State, Pids, Kill, Delete),
//! `cgroups` (Pause/Resume, Stats and Update on the guest's cgroup v2 memory controller, and an
//! OOM kill whose `/tasks/oom` event reaches a stand-in for containerd's event service),
//! `stdin` (stdio both ways through FIFOs, end of input, an exec with stdin), `overlay`
//! (overlayfs-snapshotter mounts of layers built from `--busybox`: the merged view, whiteouts,
//! opaque directories, the cached lower image and an upperdir layer), `net` (a pod netns with a
//! veth made here: ping, TCP into and out of the pod, no tap left), `clones` (two pods cloned
//! from one VM template differ in hostname, MAC, address and random numbers), `all`.
//! Every step prints `E2E-STEP <case> <step> <ms>` (a container's output:
//! `E2E-OUTPUT <case> <container>: <line>`); each case ends with
//! `E2E-PASS <case>` or `E2E-FAIL <case>: <why>`. The exit status is 0 when every case passed.
//! Times are whatever the machine gives (inside the emulated host they are not performance
//! figures).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, Mount, PauseRequest,
    PidsRequest, ResumeRequest, StartRequest, StateRequest, StatsRequest, Status,
    UpdateTaskRequest, WaitRequest,
};
use containerd_shim_protos::cgroups_v2::metrics::Metrics as CgroupMetrics;
use containerd_shim_protos::events::task::TaskOOM;
use containerd_shim_protos::protobuf::Message as _;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::protobuf::well_known_types::any::Any as PbAny;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client as TtrpcClient, TaskClient};
use containerd_shim_protos::shim_async::{Events, create_events};
use containerd_shim_protos::ttrpc::asynchronous::{Server as TtrpcServer, TtrpcContext};
use proto::v2::sandbox as v2;

// A crate root finds its modules beside it, and tests/src/bin holds other programs.
#[path = "sandboxer-e2e/agent_faults.rs"]
mod agent_faults;
#[path = "sandboxer-e2e/clones.rs"]
mod clones;
#[path = "sandboxer-e2e/faults.rs"]
mod faults;
#[path = "sandboxer-e2e/net.rs"]
mod net;
#[path = "sandboxer-e2e/overlay.rs"]
mod overlay;
#[path = "sandboxer-e2e/stdin.rs"]
mod stdin;

/// How long the daemon may take to open its socket.
const DAEMON_UP: Duration = Duration::from_secs(20);
/// Bound of every ttrpc call that is not a Wait (a nested guest is slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of a Wait.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// The `pod` case's hostname, which containers must see.
const POD_HOSTNAME: &str = "e2e-pod";

#[derive(Debug, Clone)]
struct Args {
    sandboxer: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    image: PathBuf,
    busybox: PathBuf,
    work: PathBuf,
    keep: bool,
    /// `sandboxer serve` with no flag and no config file: every path, socket and size is the
    /// daemon's default (the work dir must then be under a default Task API root such as
    /// /run/containerd, and the containerd event socket is the default one's).
    defaults: bool,
    cases: Vec<String>,
}

const CASES: &[&str] = &[
    "pod",
    "container",
    "exec",
    "cgroups",
    "stdin",
    "overlay",
    "net",
    "clones",
    "faults",
    "agent-faults",
    "ignore-shutdown",
];

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        sandboxer: PathBuf::new(),
        kernel: PathBuf::new(),
        initramfs: PathBuf::new(),
        image: PathBuf::new(),
        busybox: PathBuf::from("/bin/busybox"),
        work: std::env::temp_dir().join(format!("sandboxer-e2e-{}", std::process::id())),
        keep: false,
        defaults: false,
        cases: Vec::new(),
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--sandboxer" => a.sandboxer = value()?.into(),
            "--kernel" => a.kernel = value()?.into(),
            "--initramfs" => a.initramfs = value()?.into(),
            "--image" => a.image = value()?.into(),
            "--busybox" => a.busybox = value()?.into(),
            "--work" => a.work = value()?.into(),
            "--keep" => a.keep = true,
            "--defaults" => a.defaults = true,
            "all" => a.cases.extend(CASES.iter().map(|c| (*c).to_owned())),
            c if CASES.contains(&c) => a.cases.push(c.to_owned()),
            other => bail!("unknown argument {other:?} (cases: {CASES:?} or all)"),
        }
    }
    for (name, p) in [
        ("--sandboxer", &a.sandboxer),
        ("--kernel", &a.kernel),
        ("--initramfs", &a.initramfs),
        ("--image", &a.image),
    ] {
        // No --kernel / --initramfs: the daemon boots the ones built into it.
        let optional = matches!(name, "--kernel" | "--initramfs");
        if optional && p.as_os_str().is_empty() {
            continue;
        }
        ensure!(p.is_file(), "{name} {} is not a file", p.display());
    }
    ensure!(
        !a.cases.is_empty(),
        "no case given (cases: {CASES:?} or all)"
    );
    ensure!(
        !a.defaults || (a.kernel.as_os_str().is_empty() && a.initramfs.as_os_str().is_empty()),
        "--defaults runs the daemon with no flags: no --kernel or --initramfs"
    );
    // Absolute: the image is a rootfs mount source, which the daemon takes only absolute
    // (and under a directory it may open, its parent here).
    a.image = a.image.canonicalize()?;
    Ok(a)
}

/// The daemon under test; killed and reaped on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    state: PathBuf,
}

impl Daemon {
    fn start(a: &Args) -> Result<Self> {
        if a.defaults {
            return Self::start_bare(a);
        }
        // A Start waits for its shape's template being built up to the agent readiness
        // bound. Under the emulated host's one TCG CPU, the clones case boots two templates
        // and a Linux guest side by side, ~10 s each: the default 10 s bound is that close.
        let more = if a.cases.iter().any(|c| c == "clones") {
            vec!["--agent-ready-timeout-ms=30000".to_string()]
        } else {
            Vec::new()
        };
        Self::start_named(a, "sandboxer", &more)
    }

    /// A daemon whose sockets, state and log are named `name` in the work dir, with `more`
    /// flags.
    fn start_named(a: &Args, name: &str, more: &[String]) -> Result<Self> {
        let socket = a.work.join(format!("{name}.sock"));
        let state = a.work.join(format!("{name}-state"));
        let log = fs::File::create(a.work.join(format!("{name}.log")))?;
        let child = Command::new(&a.sandboxer)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--seed-socket")
            .arg(a.work.join(format!("{name}-seed.sock")))
            .arg("--state-dir")
            .arg(&state)
            .arg(format!("--kernel={}", a.kernel.display()))
            .arg(format!("--initramfs={}", a.initramfs.display()))
            .arg("--containerd-address")
            .arg(a.work.join("containerd.sock"))
            .args(["--mem-mib", "256", "--log-level", "info"])
            // The cases' bundles, FIFOs and layers are under the work dir, their root
            // filesystem image beside the image given.
            .arg("--task-host-path")
            .arg(&a.work)
            .arg("--task-host-path")
            .arg(a.image.parent().unwrap_or(Path::new("/")))
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", a.sandboxer.display()))?;
        let mut d = Daemon {
            child,
            socket,
            state,
        };
        d.wait_up(&a.work.join(format!("{name}.log")))?;
        Ok(d)
    }
}

impl Daemon {
    /// Waits until the daemon opened its socket, or failed.
    fn wait_up(&mut self, log: &Path) -> Result<()> {
        let until = Instant::now() + DAEMON_UP;
        let tail = || {
            let text = fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        // Up means accepting: a socket file alone may be a daemon that is already failing.
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited early ({status}):\n{}", tail());
            }
            ensure!(
                Instant::now() < until,
                "the daemon did not open its socket:\n{}",
                tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `sandboxer serve` and nothing else: no flag, no config file, no environment; its
    /// sockets and state where a fresh host has them by default.
    fn start_bare(a: &Args) -> Result<Self> {
        let config = Path::new(controller::config::DEFAULT_CONFIG_PATH);
        ensure!(
            !config.exists(),
            "{} exists: not a fresh host",
            config.display()
        );
        let socket = PathBuf::from(controller::config::DEFAULT_API_SOCKET);
        let log = fs::File::create(a.work.join("sandboxer.log"))?;
        let child = Command::new(&a.sandboxer)
            .arg("serve")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", a.sandboxer.display()))?;
        let mut d = Daemon {
            child,
            state: PathBuf::from("/run/sandboxer"),
            socket,
        };
        d.wait_up(&a.work.join("sandboxer.log"))?;
        Ok(d)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first, so the daemon can clean up the way it does in production.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prints one step's time.
struct Steps {
    case: &'static str,
    t: Instant,
}

impl Steps {
    fn new(case: &'static str) -> Self {
        Steps {
            case,
            t: Instant::now(),
        }
    }

    fn done(&mut self, step: &str) {
        println!(
            "E2E-STEP {} {step} {}",
            self.case,
            self.t.elapsed().as_millis()
        );
        self.t = Instant::now();
    }
}

type Controller = v2::controller_client::ControllerClient<tonic::transport::Channel>;

/// A started sandbox: its id, its Task address and a Task client on it.
struct Pod {
    id: String,
    task: TaskClient,
}

fn ctx() -> containerd_shim_protos::ttrpc::context::Context {
    containerd_shim_protos::ttrpc::context::with_duration(CALL_TIMEOUT)
}

/// The Task calls the cases make, with the request boilerplate in one place.
impl Pod {
    /// Task.Create of container `id` from the host bundle `bundle` with `rootfs`; `stdio` are
    /// the stdin, stdout and stderr paths ("" for none). Returns the guest pid.
    async fn create(
        &self,
        id: &str,
        bundle: &Path,
        rootfs: Mount,
        stdio: [&str; 3],
    ) -> Result<u32> {
        let [stdin, stdout, stderr] = stdio.map(str::to_owned);
        let created = self
            .task
            .create(
                ctx(),
                &CreateTaskRequest {
                    id: id.into(),
                    bundle: bundle.to_string_lossy().into_owned(),
                    rootfs: vec![rootfs],
                    stdin,
                    stdout,
                    stderr,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("Task.Create {id}"))?;
        Ok(created.pid)
    }

    /// Writes a bundle in `dir` for `sh -c script`, creates container `id` from it on `rootfs`
    /// with stdout and stderr into one FIFO, and starts it; returns the FIFO.
    async fn run_script(
        &self,
        dir: &Path,
        id: &str,
        rootfs: Mount,
        script: &str,
    ) -> Result<OutFifo> {
        let bundle = dir.join(id);
        write_bundle(&bundle, &["/bin/sh", "-c", script])?;
        let out = OutFifo::new(dir, &format!("{id}.out"))?;
        self.create(id, &bundle, rootfs, ["", &out.path(), &out.path()])
            .await?;
        self.start(id, "").await?;
        Ok(out)
    }

    /// Task.Start of container `id` or of its exec process `exec_id`.
    async fn start(&self, id: &str, exec_id: &str) -> Result<()> {
        self.task
            .start(
                ctx(),
                &StartRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("Task.Start {id}/{exec_id}"))?;
        Ok(())
    }

    /// Task.Exec of `args` as process `exec_id` in container `id` with stdin and stdout paths.
    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
        stdin: &str,
        stdout: &str,
    ) -> Result<()> {
        let process = serde_json::json!({
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/"
        });
        let spec = PbAny {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: serde_json::to_vec(&process)?,
            ..Default::default()
        };
        self.task
            .exec(
                ctx(),
                &ExecProcessRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    stdin: stdin.into(),
                    stdout: stdout.into(),
                    spec: MessageField::some(spec),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("Task.Exec {id}/{exec_id}"))?;
        Ok(())
    }

    /// Task.Kill of container `id`'s init process with `signal`.
    async fn kill(&self, id: &str, signal: u32) -> Result<()> {
        self.task
            .kill(
                ctx(),
                &KillRequest {
                    id: id.into(),
                    signal,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("Task.Kill {id}"))?;
        Ok(())
    }

    /// Task.Delete of container `id`; returns its exit status.
    async fn delete(&self, id: &str) -> Result<u32> {
        let deleted = self
            .task
            .delete(
                ctx(),
                &DeleteRequest {
                    id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("Task.Delete {id}"))?;
        Ok(deleted.exit_status)
    }
}

fn pod_options(hostname: &str) -> prost_types::Any {
    use proto::cri::v1::{DnsConfig, PodSandboxConfig, PodSandboxMetadata};
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "e2e".into(),
            uid: "e2e-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: hostname.into(),
        dns_config: Some(DnsConfig {
            servers: vec!["192.0.2.53".into()],
            searches: vec!["e2e.test".into()],
            options: vec![],
        }),
        ..Default::default()
    };
    prost_types::Any::from_msg(&config).expect("PodSandboxConfig encodes")
}

async fn start_pod(api: &mut Controller, id: &str, steps: &mut Steps) -> Result<Pod> {
    start_pod_in(api, id, "", steps).await
}

/// [`start_pod`] with the pod network namespace `netns_path` (empty: none).
async fn start_pod_in(
    api: &mut Controller,
    id: &str,
    netns_path: &str,
    steps: &mut Steps,
) -> Result<Pod> {
    start_pod_as(api, id, POD_HOSTNAME, netns_path, steps).await
}

/// [`start_pod_in`] with the pod's hostname.
async fn start_pod_as(
    api: &mut Controller,
    id: &str,
    hostname: &str,
    netns_path: &str,
    steps: &mut Steps,
) -> Result<Pod> {
    api.create(v2::ControllerCreateRequest {
        sandbox_id: id.into(),
        options: Some(pod_options(hostname)),
        netns_path: netns_path.into(),
        sandboxer: "sandboxer".into(),
        ..Default::default()
    })
    .await
    .context("Create")?;
    steps.done("create");
    let started = api
        .start(v2::ControllerStartRequest {
            sandbox_id: id.into(),
            sandboxer: "sandboxer".into(),
        })
        .await
        .context("Start")?
        .into_inner();
    steps.done("start");
    ensure!(started.version == 3, "Start: version {}", started.version);
    let sock = started
        .address
        .strip_prefix("ttrpc+unix://")
        .with_context(|| format!("Start: address {:?}", started.address))?;
    ensure!(Path::new(sock).exists(), "Start: {sock} does not exist");
    let client = TtrpcClient::connect(&format!("unix://{sock}"))
        .await
        .with_context(|| format!("connect to {sock}"))?;
    Ok(Pod {
        id: id.into(),
        task: TaskClient::new(client),
    })
}

async fn end_pod(api: &mut Controller, pod: &Pod, steps: &mut Steps) -> Result<()> {
    api.stop(v2::ControllerStopRequest {
        sandbox_id: pod.id.clone(),
        timeout_secs: 10,
        sandboxer: "sandboxer".into(),
    })
    .await
    .context("Stop")?;
    steps.done("stop");
    let waited = tokio::time::timeout(
        WAIT_TIMEOUT,
        api.wait(v2::ControllerWaitRequest {
            sandbox_id: pod.id.clone(),
            sandboxer: "sandboxer".into(),
        }),
    )
    .await
    .context("Wait did not return")?
    .context("Wait")?
    .into_inner();
    ensure!(waited.exited_at.is_some(), "Wait: no exit time");
    steps.done("wait");
    api.shutdown(v2::ControllerShutdownRequest {
        sandbox_id: pod.id.clone(),
        sandboxer: "sandboxer".into(),
    })
    .await
    .context("Shutdown")?;
    steps.done("shutdown");
    Ok(())
}

/// A FIFO this program reads, standing in for the engine's end of a container's stdout.
struct OutFifo {
    path: PathBuf,
    buf: Arc<Mutex<Vec<u8>>>,
}

impl OutFifo {
    fn new(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("mkfifo {}", path.display()))?;
        // Read-write, like containerd's fifo package: the open does not wait for a writer and
        // a writer that closes does not end the reader before the test has read everything.
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = f.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("poisoned")
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Ok(OutFifo { path, buf })
    }

    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Waits until the output contains `want` (the bridge may lag the exit a little).
    async fn wait_for(&self, want: &str) -> Result<String> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let text = String::from_utf8_lossy(&self.buf.lock().expect("poisoned")).into_owned();
            if text.contains(want) {
                return Ok(text);
            }
            ensure!(
                Instant::now() < until,
                "output {:?} does not contain {want:?}",
                text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An OCI bundle on the host, the way containerd writes one: `config.json` and an (empty)
/// `rootfs` directory; the root filesystem itself comes as a mount in Task.Create.
fn write_bundle(dir: &Path, args: &[&str]) -> Result<()> {
    write_bundle_with(dir, args, None)
}

/// [`write_bundle`] with a cgroup memory limit in bytes.
fn write_bundle_with(dir: &Path, args: &[&str], memory_limit: Option<i64>) -> Result<()> {
    use oci_spec::runtime::{LinuxMemoryBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Spec};
    fs::create_dir_all(dir.join("rootfs"))?;
    let mut spec = Spec::default();
    if let Some(p) = spec.process_mut() {
        p.set_args(Some(args.iter().map(|s| (*s).to_owned()).collect()));
        p.set_terminal(Some(false));
    }
    // Containers of a pod share the pod's network namespace (the VM's).
    if let Some(linux) = spec.linux_mut()
        && let Some(ns) = linux.namespaces_mut()
    {
        ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
    }
    spec.set_hostname(None);
    // A writable root, as containerd gives by default (CRI `readonly_rootfs` false); the
    // oci-spec default is read-only.
    if let Some(root) = spec.root_mut() {
        root.set_readonly(Some(false));
    }
    if let (Some(limit), Some(linux)) = (memory_limit, spec.linux_mut()) {
        let memory = LinuxMemoryBuilder::default()
            .limit(limit)
            .swap(limit)
            .build()?;
        linux.set_resources(Some(
            LinuxResourcesBuilder::default().memory(memory).build()?,
        ));
    }
    spec.save(dir.join("config.json"))
        .context("write config.json")?;
    Ok(())
}

fn rootfs_mount(image: &Path) -> Mount {
    Mount {
        type_: "ext4".into(),
        source: image.to_string_lossy().into_owned(),
        options: vec!["ro".into()],
        ..Default::default()
    }
}

async fn wait_exit(task: &TaskClient, id: &str, exec_id: &str) -> Result<u32> {
    let req = WaitRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    let w = task
        .wait(
            containerd_shim_protos::ttrpc::context::with_duration(WAIT_TIMEOUT),
            &req,
        )
        .await
        .with_context(|| format!("Wait {id}/{exec_id}"))?;
    ensure!(w.exited_at.is_some(), "Wait {id}: no exit time");
    Ok(w.exit_status)
}

/// The cgroup v2 directory of each thread of process `pid` whose cgroup path ends in
/// `suffix`, by thread name.
fn threads_in_cgroup(pid: u32, suffix: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let (Ok(name), Ok(cgroup)) = (
            fs::read_to_string(task.join("comm")),
            fs::read_to_string(task.join("cgroup")),
        ) else {
            continue; // the thread ended
        };
        // cgroup v2: one line, `0::<path>`.
        let Some(path) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        if path.ends_with(suffix) {
            let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            found.push((name.trim().to_owned(), dir));
        }
    }
    Ok(found)
}

async fn case_pod(api: &mut Controller, daemon_pid: u32) -> Result<()> {
    let mut steps = Steps::new("pod");
    let pod = start_pod(api, "e2e-pod", &mut steps).await?;
    // The pod's VM threads (its vCPU and its VMM thread) run in the sandbox's own threaded
    // cgroup v2 under the daemon's, with the cpu controller: no pod CPU limit, so no quota.
    // A clone's threads move beside its agent's setup: shortly after Start returned.
    let placed = {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let placed = threads_in_cgroup(daemon_pid, "/sandboxer-sandboxes/e2e-pod")?;
            let whole = placed.iter().any(|(n, _)| n == "vmm")
                && placed.iter().any(|(n, _)| n.starts_with("vcpu"));
            if whole || Instant::now() > until {
                break placed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let names: Vec<&str> = placed.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        names.contains(&"vmm") && names.iter().any(|n| n.starts_with("vcpu")),
        "threads in the pod's cgroup: {names:?}"
    );
    let group = placed[0].1.clone();
    let cpu_max = fs::read_to_string(group.join("cpu.max"))
        .with_context(|| format!("{}/cpu.max", group.display()))?;
    ensure!(cpu_max.trim() == "max 100000", "cpu.max {cpu_max:?}");
    let kind = fs::read_to_string(group.join("cgroup.type"))?;
    ensure!(kind.trim() == "threaded", "cgroup.type {kind:?}");
    steps.done("cgroup");
    let st = api
        .status(v2::ControllerStatusRequest {
            sandbox_id: pod.id.clone(),
            verbose: true,
            sandboxer: "sandboxer".into(),
        })
        .await
        .context("Status")?
        .into_inner();
    ensure!(st.state == "SANDBOX_READY", "Status: state {}", st.state);
    let platform = api
        .platform(v2::ControllerPlatformRequest {
            sandbox_id: pod.id.clone(),
            sandboxer: "sandboxer".into(),
        })
        .await
        .context("Platform")?
        .into_inner()
        .platform
        .context("Platform: empty")?;
    ensure!(
        (platform.os.as_str(), platform.architecture.as_str()) == ("linux", "amd64"),
        "Platform: {platform:?}"
    );
    steps.done("status");
    end_pod(api, &pod, &mut steps).await?;
    ensure!(
        !group.exists(),
        "the pod's cgroup {} outlived it",
        group.display()
    );
    let gone = api
        .status(v2::ControllerStatusRequest {
            sandbox_id: pod.id.clone(),
            verbose: false,
            sandboxer: "sandboxer".into(),
        })
        .await;
    ensure!(
        matches!(&gone, Err(s) if s.code() == tonic::Code::NotFound),
        "Status after Shutdown: {gone:?}"
    );
    Ok(())
}

async fn case_container(api: &mut Controller, a: &Args) -> Result<()> {
    let mut steps = Steps::new("container");
    let pod = start_pod(api, "e2e-ctr", &mut steps).await?;
    let dir = a.work.join("ctr");
    fs::create_dir_all(&dir)?;
    let bundle = dir.join("c1");
    write_bundle(
        &bundle,
        &[
            "/bin/sh",
            "-c",
            "echo hello-from-sandboxer; echo host=$(hostname); exit 3",
        ],
    )?;
    let out = OutFifo::new(&dir, "c1.stdout")?;
    let pid = pod
        .create("c1", &bundle, rootfs_mount(&a.image), ["", &out.path(), ""])
        .await?;
    ensure!(pid > 0, "Task.Create: pid 0");
    steps.done("task-create");
    pod.start("c1", "").await?;
    steps.done("task-start");
    let status = wait_exit(&pod.task, "c1", "").await?;
    ensure!(status == 3, "exit status {status}, want 3");
    steps.done("task-wait");
    // The exit may be known before the last output arrives (as with containerd's shims: a
    // client reads its stdout to the end), so wait for the last line.
    let text = out.wait_for(&format!("host={POD_HOSTNAME}")).await?;
    for line in text.lines() {
        println!("E2E-OUTPUT container c1: {line}");
    }
    ensure!(
        text.starts_with("hello-from-sandboxer\n"),
        "stdout {text:?} does not start with the first line"
    );
    steps.done("stdout");
    let exit = pod.delete("c1").await?;
    ensure!(exit == 3, "Delete: exit {exit}");
    steps.done("task-delete");
    end_pod(api, &pod, &mut steps).await
}

async fn case_exec(api: &mut Controller, a: &Args) -> Result<()> {
    let mut steps = Steps::new("exec");
    let pod = start_pod(api, "e2e-exec", &mut steps).await?;
    let dir = a.work.join("exec");
    fs::create_dir_all(&dir)?;
    let bundle = dir.join("c2");
    write_bundle(&bundle, &["/bin/sleep", "600"])?;
    pod.create("c2", &bundle, rootfs_mount(&a.image), ["", "", ""])
        .await?;
    pod.start("c2", "").await?;
    steps.done("task-start");

    let out = OutFifo::new(&dir, "e1.stdout")?;
    let script = "echo exec-ok; ls /proc | grep -c '^[0-9]'";
    pod.exec("c2", "e1", &["/bin/sh", "-c", script], "", &out.path())
        .await?;
    pod.start("c2", "e1").await?;
    let status = wait_exit(&pod.task, "c2", "e1").await?;
    ensure!(status == 0, "exec exit status {status}");
    out.wait_for("exec-ok").await?;
    steps.done("exec");

    let state = pod
        .task
        .state(
            ctx(),
            &StateRequest {
                id: "c2".into(),
                ..Default::default()
            },
        )
        .await
        .context("Task.State")?;
    ensure!(
        state.status.value() == containerd_shim_protos::api::Status::RUNNING as i32,
        "State: {:?}",
        state.status
    );
    let pids = pod
        .task
        .pids(
            ctx(),
            &PidsRequest {
                id: "c2".into(),
                ..Default::default()
            },
        )
        .await
        .context("Task.Pids")?;
    ensure!(!pids.processes.is_empty(), "Pids: none");
    steps.done("state-pids");
    pod.kill("c2", 9).await?;
    let status = wait_exit(&pod.task, "c2", "").await?;
    ensure!(status == 137, "killed: exit status {status}, want 137");
    steps.done("kill-wait");
    pod.delete("c2").await?;
    let again = pod
        .task
        .state(
            ctx(),
            &StateRequest {
                id: "c2".into(),
                ..Default::default()
            },
        )
        .await;
    ensure!(again.is_err(), "State after Delete: {again:?}");
    steps.done("delete");
    end_pod(api, &pod, &mut steps).await
}

/// Stands in for containerd's ttrpc event service (`<containerd.sock>.ttrpc`): keeps the
/// container ids of the OOM events forwarded to it.
#[derive(Debug, Default)]
struct FakeContainerd {
    ooms: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Events for FakeContainerd {
    async fn forward(
        &self,
        _ctx: &TtrpcContext,
        req: ForwardRequest,
    ) -> containerd_shim_protos::ttrpc::Result<
        containerd_shim_protos::protobuf::well_known_types::empty::Empty,
    > {
        if let Some(env) = req.envelope.as_ref()
            && env.topic == "/tasks/oom"
            && let Some(any) = env.event.as_ref()
            && let Ok(oom) = TaskOOM::parse_from_bytes(&any.value)
        {
            self.ooms.lock().expect("poisoned").push(oom.container_id);
        }
        Ok(Default::default())
    }
}

async fn task_state(task: &TaskClient, id: &str) -> Result<Status> {
    let st = task
        .state(
            ctx(),
            &StateRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("Task.State {id}"))?;
    Ok(st.status.enum_value_or_default())
}

async fn memory_stats(task: &TaskClient, id: &str) -> Result<(u64, u64)> {
    let stats = task
        .stats(
            ctx(),
            &StatsRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
        .context("Task.Stats")?;
    let any = stats.stats.as_ref().context("Stats: empty")?;
    ensure!(
        any.type_url.ends_with("io.containerd.cgroups.v2.Metrics"),
        "Stats: type {}",
        any.type_url
    );
    let m = CgroupMetrics::parse_from_bytes(&any.value).context("Stats: decode")?;
    let mem = m.memory.as_ref().context("Stats: no memory")?;
    Ok((mem.usage, mem.usage_limit))
}

async fn case_cgroups(api: &mut Controller, a: &Args, containerd: &FakeContainerd) -> Result<()> {
    const MIB: i64 = 1 << 20;
    let mut steps = Steps::new("cgroups");
    let pod = start_pod(api, "e2e-cg", &mut steps).await?;
    let dir = a.work.join("cgroups");
    fs::create_dir_all(&dir)?;

    // A running container: pause, resume, statistics, a new memory limit.
    let bundle = dir.join("c3");
    write_bundle_with(&bundle, &["/bin/sleep", "600"], Some(64 * MIB))?;
    let create = |id: &str, bundle: &Path| CreateTaskRequest {
        id: id.into(),
        bundle: bundle.to_string_lossy().into_owned(),
        rootfs: vec![rootfs_mount(&a.image)],
        ..Default::default()
    };
    let start = |id: &str| StartRequest {
        id: id.into(),
        ..Default::default()
    };
    pod.task
        .create(ctx(), &create("c3", &bundle))
        .await
        .context("Task.Create c3")?;
    pod.task
        .start(ctx(), &start("c3"))
        .await
        .context("Task.Start c3")?;
    steps.done("task-start");
    pod.task
        .pause(
            ctx(),
            &PauseRequest {
                id: "c3".into(),
                ..Default::default()
            },
        )
        .await
        .context("Task.Pause")?;
    ensure!(
        task_state(&pod.task, "c3").await? == Status::PAUSED,
        "not PAUSED after Pause"
    );
    pod.task
        .resume(
            ctx(),
            &ResumeRequest {
                id: "c3".into(),
                ..Default::default()
            },
        )
        .await
        .context("Task.Resume")?;
    ensure!(
        task_state(&pod.task, "c3").await? == Status::RUNNING,
        "not RUNNING after Resume"
    );
    steps.done("pause-resume");
    let (usage, limit) = memory_stats(&pod.task, "c3").await?;
    ensure!(usage > 0, "Stats: memory usage 0");
    ensure!(
        limit == 64 << 20,
        "Stats: memory limit {limit}, want 64 MiB"
    );
    let resources = PbAny {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
        value: serde_json::to_vec(
            &serde_json::json!({"memory": {"limit": 96 * MIB, "swap": 96 * MIB}}),
        )?,
        ..Default::default()
    };
    pod.task
        .update(
            ctx(),
            &UpdateTaskRequest {
                id: "c3".into(),
                resources: MessageField::some(resources),
                ..Default::default()
            },
        )
        .await
        .context("Task.Update")?;
    let (_, limit) = memory_stats(&pod.task, "c3").await?;
    ensure!(
        limit == 96 << 20,
        "after Update: memory limit {limit}, want 96 MiB"
    );
    steps.done("stats-update");

    // A container that outgrows its 16 MiB: the kernel kills it, the agent sees the OOM kill
    // and the sandboxer forwards it to containerd.
    let hog = dir.join("c4");
    write_bundle_with(
        &hog,
        &[
            "/bin/sh",
            "-c",
            "x=0123456789abcdef; while true; do x=$x$x; done",
        ],
        Some(16 * MIB),
    )?;
    pod.task
        .create(ctx(), &create("c4", &hog))
        .await
        .context("Task.Create c4")?;
    pod.task
        .start(ctx(), &start("c4"))
        .await
        .context("Task.Start c4")?;
    let status = wait_exit(&pod.task, "c4", "").await?;
    ensure!(
        status == 137,
        "OOM-killed container: exit status {status}, want 137"
    );
    steps.done("oom-kill");
    let until = Instant::now() + Duration::from_secs(30);
    while !containerd
        .ooms
        .lock()
        .expect("poisoned")
        .iter()
        .any(|c| c == "c4")
    {
        ensure!(
            Instant::now() < until,
            "no /tasks/oom event for c4 reached containerd"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    steps.done("oom-event");
    pod.kill("c3", 9).await?;
    wait_exit(&pod.task, "c3", "").await?;
    for id in ["c4", "c3"] {
        pod.delete(id).await?;
    }
    steps.done("delete");
    end_pod(api, &pod, &mut steps).await
}

async fn run(a: &Args) -> Result<Vec<(String, Result<()>)>> {
    fs::create_dir_all(&a.work)?;
    let mut a = a.clone();
    let events_socket = if a.defaults {
        // The daemon's defaults: events go to containerd's default address + ".ttrpc", and
        // the Task API opens files only under containerd's and iSulad's directories, so the
        // work dir is there (checked) and the rootfs image is copied into it.
        let under_default_root = controller::config::DEFAULT_TASK_HOST_PATHS
            .iter()
            .any(|root| a.work.starts_with(root));
        ensure!(
            under_default_root,
            "--defaults needs --work under one of {:?}",
            controller::config::DEFAULT_TASK_HOST_PATHS
        );
        let image = a
            .work
            .join(a.image.file_name().context("--image has no file name")?);
        fs::copy(&a.image, &image)?;
        a.image = image;
        PathBuf::from("/run/containerd/containerd.sock.ttrpc")
    } else {
        a.work.join("containerd.sock.ttrpc")
    };
    let a = &a;
    let containerd = Arc::new(FakeContainerd::default());
    let mut events = TtrpcServer::new()
        .bind(&format!("unix://{}", events_socket.display()))
        .context("bind the containerd event socket")?
        .register_service(create_events(Arc::clone(&containerd) as _));
    events
        .start()
        .await
        .context("serve the containerd event socket")?;
    let daemon = Daemon::start(a)?;
    let mut api = controller::client::v2_client(&daemon.socket)
        .await
        .context("connect to the daemon")?;
    let mut results = Vec::new();
    for case in &a.cases {
        println!("E2E-CASE {case}");
        let r = match case.as_str() {
            "pod" => case_pod(&mut api, daemon.child.id()).await,
            "container" => case_container(&mut api, a).await,
            "exec" => case_exec(&mut api, a).await,
            "cgroups" => case_cgroups(&mut api, a, &containerd).await,
            "stdin" => stdin::case_stdin(&mut api, &a.image, &a.work).await,
            "net" => net::case_net(&mut api, &a.image, &a.busybox, &a.work).await,
            "clones" => clones::case_clones(&mut api, &a.image, &a.busybox, &a.work).await,
            "faults" => faults::case_faults(&mut api, &a.image, &a.work, daemon.child.id()).await,
            "agent-faults" => agent_faults::case_agent_faults(&mut api, &a.image, &a.work).await,
            "ignore-shutdown" => agent_faults::case_ignore_shutdown(a).await,
            "overlay" => overlay::case_overlay(&mut api, &a.busybox, &a.work, &daemon.state).await,
            other => Err(anyhow::anyhow!("no case {other}")),
        };
        match &r {
            Ok(()) => println!("E2E-PASS {case}"),
            Err(e) => {
                println!("E2E-FAIL {case}: {e:#}");
                // Free what the failed case left, so the cleanup check judges only the daemon.
                let ids: &[&str] = match case.as_str() {
                    "pod" => &["e2e-pod"],
                    "container" => &["e2e-ctr"],
                    "cgroups" => &["e2e-cg"],
                    "stdin" => &["e2e-stdin"],
                    "overlay" => &["e2e-ovl"],
                    "net" => &["e2e-net"],
                    "clones" => &["e2e-clone-a", "e2e-clone-b"],
                    "faults" => &["e2e-flood", "e2e-calm"],
                    "agent-faults" => &["e2e-signalled", "e2e-bystander"],
                    _ => &["e2e-exec"],
                };
                for id in ids {
                    let _ = api
                        .shutdown(v2::ControllerShutdownRequest {
                            sandbox_id: (*id).into(),
                            sandboxer: "sandboxer".into(),
                        })
                        .await;
                }
            }
        }
        results.push((case.clone(), r));
    }
    let state = daemon.state.clone();
    drop(daemon);
    let _ = events.shutdown().await;
    // Nothing a finished pod owned may be left in the state dir.
    let state = state.join(controller::store::SANDBOXES_DIR);
    let left: HashMap<String, ()> = fs::read_dir(&state)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), ()))
                .filter(|(n, _)| n.starts_with("e2e-"))
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        results.push((
            "cleanup".into(),
            Err(anyhow::anyhow!(
                "left in {}: {:?}",
                state.display(),
                left.keys()
            )),
        ));
        println!("E2E-FAIL cleanup: state left behind");
    }
    Ok(results)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sandboxer-e2e: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandboxer-e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    let results = rt.block_on(run(&a));
    if !a.keep {
        let _ = fs::remove_dir_all(&a.work);
    }
    match results {
        Ok(r) if r.iter().all(|(_, r)| r.is_ok()) => {
            println!("E2E-DONE {} passed", r.len());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let failed = r.iter().filter(|(_, r)| r.is_err()).count();
            println!("E2E-DONE {failed} of {} failed", r.len());
            if a.keep {
                println!("E2E-LOGS {}", a.work.display());
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("E2E-FAIL setup: {e:#}");
            ExitCode::FAILURE
        }
    }
}
