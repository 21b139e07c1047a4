// SPDX-License-Identifier: Apache-2.0
//! Stock containerd 2.1 drives the sandboxer through CRI (issue 6).
//!
//! Each test starts a private containerd (Debian's 2.1 build, installed by
//! `tests/containerd/install`, configured by `tests/containerd/gen-config`) and a sandboxer
//! daemon in this process, then talks to containerd's CRI socket with the `runtime.v1` client
//! from `proto::cri`, as the kubelet would. Pods use the host network (no CNI).
//!
//! - Here (test guests on `/dev/kvm`): plugin registration, the pod lifecycle for both runtime
//!   handlers (`streaming` and `fifo` IO), errors surfacing through containerd, a containerd
//!   restart with a pod running, no shim process and no pause container, nothing left behind.
//! - Containers (create/start/exec/logs/exit codes/stop/remove, a second container, a restart
//!   in the middle) need a Linux guest: they run when `SANDBOXER_LINUX_GUEST_KERNEL` and
//!   `SANDBOXER_LINUX_GUEST_INITRAMFS` name the guest kernel and the agent initramfs and the
//!   host's KVM can run them, and skip loudly otherwise (under `CI=true` they fail instead).
//!   On this project's CI they run inside the emulated KVM host (`tests/emulated-host/run`,
//!   case `cri-containers`), which packs this test binary, containerd and the scripts, and
//!   names them with `SANDBOXER_CONTAINERD_CACHE`, `SANDBOXER_CONTAINERD_SCRIPTS` and
//!   `SANDBOXER_CRI_IMAGE_TAR` (a pre-built image).
//!
//! Needs root (containerd, overlayfs); under CI (`CI=true` or `SANDBOXER_REQUIRE_ROOT=1`) a
//! missing root is a failure. A missing containerd is a failure on CI (`CI=true`, where `tests/setup` installs
//! it) and with `SANDBOXER_REQUIRE_CONTAINERD=1`, a loud skip otherwise.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use controller::KvmBackend;
use controller::config::Config;
use integration_tests::dir_entries;
use proto::cri::v1 as cri;
use proto::v2::sandbox::{
    ControllerMetricsRequest, ControllerStatusRequest, ControllerStopRequest,
};
use test_guests::{Guest, agent, require_kvm};
use tokio::sync::oneshot;
use tonic::transport::Channel;

type Runtime = cri::runtime_service_client::RuntimeServiceClient<Channel>;
type Images = cri::image_service_client::ImageServiceClient<Channel>;

/// The scripts of `tests/containerd/` in this checkout.
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/containerd");
/// Where the scripts are when the test runs away from the checkout (the emulated host copies
/// them into its initramfs).
const SCRIPTS_ENV: &str = "SANDBOXER_CONTAINERD_SCRIPTS";
/// An OCI image tarball `build-image` made beforehand (the emulated host has no GNU tar).
const IMAGE_TAR_ENV: &str = "SANDBOXER_CRI_IMAGE_TAR";
/// The CRI runtime handlers `config.toml.in` defines (io_type streaming and fifo).
const HANDLERS: [&str; 2] = ["sandboxer", "sandboxer-fifo"];
/// The image `build-image` makes.
const IMAGE: &str = "docker.io/sandboxer/busybox:test";
/// The CRI plugin's namespace in containerd.
const K8S_NS: &str = "k8s.io";

/// One test at a time: each runs a containerd and VMs, and the leak checks count this
/// process's VMs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- prerequisites

/// The script `name` of `tests/containerd/`.
fn script(name: &str) -> PathBuf {
    std::env::var_os(SCRIPTS_ENV)
        .map_or_else(|| PathBuf::from(SCRIPTS), PathBuf::from)
        .join(name)
}

/// An installed containerd, as `tests/containerd/install --print` reports it.
#[derive(Clone, Debug)]
struct Containerd {
    version: String,
    containerd: PathBuf,
    ctr: PathBuf,
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == value)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn installed_containerd() -> Result<Containerd, String> {
    let out = Command::new(script("install"))
        .arg("--print")
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run tests/containerd/install: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| {
        kv.get(k)
            .map(|v| (*v).to_string())
            .ok_or_else(|| format!("install --print gave no {k}"))
    };
    Ok(Containerd {
        version: get("version")?,
        containerd: get("containerd")?.into(),
        ctr: get("ctr")?.into(),
    })
}

/// Root and containerd, or `None` after a loud skip (a panic where they are required).
fn prerequisites(test: &str) -> Option<Containerd> {
    if !is_root() {
        if env_is("SANDBOXER_REQUIRE_ROOT", "1") || env_is("CI", "true") {
            panic!("{test} is not running as root (required: CI=true or SANDBOXER_REQUIRE_ROOT=1)");
        }
        eprintln!("SKIP {test}: needs root (containerd, overlayfs)");
        return None;
    }
    match installed_containerd() {
        Ok(c) => Some(c),
        Err(why) if env_is("CI", "true") || env_is("SANDBOXER_REQUIRE_CONTAINERD", "1") => {
            panic!("containerd is not installed ({why}); tests/setup runs tests/containerd/install")
        }
        Err(why) => {
            eprintln!(
                "SKIP {test}: containerd is not installed ({why}); run tests/containerd/install"
            );
            None
        }
    }
}

/// The `sandboxer` binary: `SANDBOXER_BIN`, or the one cargo built beside this test
/// (`target/<profile>/sandboxer`). containerd finds it as `containerd-shim-sandboxer-v1`.
fn sandboxer_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SANDBOXER_BIN") {
        return Ok(bin.into());
    }
    // This test runs as target/<profile>/deps/cri-<hash>.
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("sandboxer"))
        .context("no directory above the test binary")?;
    if !beside.is_file() {
        bail!(
            "no sandboxer binary at {} (build it: cargo build -p controller --bin sandboxer, or \
             set SANDBOXER_BIN)",
            beside.display()
        );
    }
    Ok(beside)
}

/// A Linux guest kernel and the agent initramfs for the container tests, or `None` after a
/// loud skip. Under CI (`CI=true`) a missing guest is a failure: `tests/run` leaves this test
/// out of the host's run by name and runs it in the emulated host (case `cri-containers`).
fn linux_guest(test: &str) -> Option<(PathBuf, PathBuf)> {
    let kernel = std::env::var_os("SANDBOXER_LINUX_GUEST_KERNEL");
    let initramfs = std::env::var_os("SANDBOXER_LINUX_GUEST_INITRAMFS");
    let (Some(kernel), Some(initramfs)) = (kernel, initramfs) else {
        assert!(
            !env_is("CI", "true"),
            "{test} needs a Linux guest (SANDBOXER_LINUX_GUEST_KERNEL, \
             SANDBOXER_LINUX_GUEST_INITRAMFS); under CI it runs in tests/emulated-host"
        );
        eprintln!(
            "SKIP {test}: needs a Linux guest on a KVM host that can run one (set \
             SANDBOXER_LINUX_GUEST_KERNEL and SANDBOXER_LINUX_GUEST_INITRAMFS; this host's KVM \
             runs only test guests, DESIGN.md §5)"
        );
        return None;
    };
    Some((PathBuf::from(kernel), PathBuf::from(initramfs)))
}

// ---- the environment: a sandboxer daemon and a containerd

/// A directory removed on drop (no `tempfile` in this crate).
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        // Short: unix socket paths must stay under 108 bytes.
        let path = std::env::temp_dir().join(format!(
            "sbx-cri-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sandboxer daemon, served by this process.
struct Daemon {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), controller::server::ServerError>>,
}

/// The sandboxer running as `sandboxer serve`; after an upgrade, the process that took over
/// (not a child of this one).
struct DaemonProcess {
    pid: u32,
    child: Option<Child>,
    log: PathBuf,
}

impl DaemonProcess {
    /// SIGTERM, then waits for the process to end.
    fn stop(&mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid)?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if let Some(mut c) = self.child.take() {
            c.wait()?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{}", self.pid)).exists() {
            if Instant::now() > deadline {
                bail!("the sandboxer {} did not stop on SIGTERM", self.pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// What the sandboxes boot.
#[derive(Clone, Debug)]
enum VmKind {
    /// The project's test guest that runs until it is stopped.
    TestGuest,
    /// A Linux guest kernel and the agent initramfs.
    Linux(PathBuf, PathBuf),
}

/// Samples the process table for the whole test, so that a shim or a containerd child that
/// lived only briefly is caught too ("no shim process ever exists").
struct ShimWatch {
    stop: Arc<AtomicBool>,
    /// The running containerd's pid, 0 while none runs.
    containerd: Arc<AtomicU32>,
    seen: Arc<Mutex<Vec<(u32, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShimWatch {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let containerd = Arc::new(AtomicU32::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, c, v) = (stop.clone(), containerd.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut bad = shim_processes();
                let pid = c.load(Ordering::Relaxed);
                if pid != 0 {
                    bad.extend(children_of(pid));
                }
                if !bad.is_empty() {
                    v.lock().expect("poisoned").extend(bad);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        ShimWatch {
            stop,
            containerd,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops sampling; what was seen.
    fn finish(&mut self) -> Vec<(u32, String)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut seen = std::mem::take(&mut *self.seen.lock().expect("poisoned"));
        seen.sort();
        seen.dedup();
        seen
    }
}

impl Drop for ShimWatch {
    fn drop(&mut self) {
        self.finish();
    }
}

struct Env {
    dir: TempDir,
    tools: Containerd,
    config: Config,
    containerd: Option<Child>,
    /// The sandboxer as its own process (`sandboxer serve`), when a test upgrades it.
    process: Option<DaemonProcess>,
    daemon: Option<Daemon>,
    watch: ShimWatch,
    /// The VMs of every sandboxer this test starts (one after another).
    host: vmm::Host,
}

impl Env {
    /// A sandboxer (when `with_daemon`) and a containerd configured for it.
    async fn new(tools: Containerd, vm: VmKind, with_daemon: bool) -> anyhow::Result<Env> {
        let dir = TempDir::new()?;
        let mut config = Config {
            state_dir: dir.0.join("sbx"),
            stop_timeout_secs: 1,
            ..Config::default()
        };
        config.api.socket = dir.0.join("sandboxer.sock");
        config.api.seed_socket = "".into();
        // containerd's root and state (snapshots, bundles, FIFOs) are in this directory.
        config.task.host_paths.push(dir.0.clone());
        match vm {
            VmKind::TestGuest => {
                // The virtio test guest's agent mode speaks the agent's wire protocol (READY
                // line, ttrpc answers) and ends the VM on Shutdown, as the real agent does.
                config.vm.kernel = Guest::Virtio.elf().to_path_buf();
                config.vm.cmdline = agent::cmdline(
                    vmm::config::DEFAULT_CMDLINE,
                    &[agent::EXIT_ON_SHUTDOWN, agent::QUIET],
                );
                // The test guest ignores it, but the daemon starts no sandbox without one.
                let initramfs = dir.0.join("initramfs.img");
                std::fs::write(&initramfs, b"not an initramfs: the test guest ignores it")?;
                config.vm.initramfs = initramfs;
                config.vm.mem_mib = 32;
                // The guest's driver looks for the vsock among the first 8 virtio devices.
                config.vm.blk_slots = 4;
            }
            VmKind::Linux(kernel, initramfs) => {
                config.vm.kernel = kernel;
                config.vm.initramfs = initramfs;
            }
        }
        let ctrd_dir = dir.0.join("ctrd");
        // containerd resolves the shim name of the runtime type when it reloads tasks after a
        // restart (controller::shim): the sandboxer binary under that name, as deployed.
        std::fs::create_dir_all(ctrd_dir.join("bin"))?;
        std::os::unix::fs::symlink(
            sandboxer_binary()?,
            ctrd_dir.join("bin").join(controller::shim::SHIM_NAME),
        )?;
        // containerd's config as a node has it, then the sandboxer's part added by the
        // packaged installer (`sandboxer install containerd`), as an operator would.
        let ctrd_config = run(Command::new(script("gen-config"))
            .args(["--base", "--test"])
            .arg(&ctrd_dir)
            .arg(&config.api.socket))?;
        run(Command::new(sandboxer_binary()?)
            .args(["install", "containerd", "--config"])
            .arg(ctrd_config.trim())
            .arg("--socket")
            .arg(&config.api.socket))?;
        let mut env = Env {
            dir,
            tools,
            config,
            containerd: None,
            process: None,
            daemon: None,
            watch: ShimWatch::start(),
            host: vmm::Host::new(),
        };
        if with_daemon {
            env.start_daemon().await?;
        }
        env.start_containerd().await?;
        Ok(env)
    }

    fn ctrd_dir(&self) -> PathBuf {
        self.dir.0.join("ctrd")
    }

    fn cri_socket(&self) -> PathBuf {
        self.ctrd_dir().join("containerd.sock")
    }

    async fn start_daemon(&mut self) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel::<()>();
        let config = self.config.clone();
        // As `sandboxer serve` runs: templates on by default.
        let backend = KvmBackend::from_config(self.host.clone(), &config);
        let task = tokio::spawn(async move {
            controller::server::run(&config, backend, async {
                let _ = rx.await;
            })
            .await
        });
        self.daemon = Some(Daemon { stop: tx, task });
        wait_for_socket(&self.config.api.socket, None).await
    }

    async fn stop_daemon(&mut self) -> anyhow::Result<()> {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop.send(());
            d.task.await?.context("the sandboxer daemon failed")?;
        }
        if let Some(mut p) = self.process.take() {
            p.stop()?;
        }
        Ok(())
    }

    /// Runs the sandboxer as `sandboxer serve --config <this test's config>`, as a node does
    /// (a process of its own: an upgrade replaces it).
    async fn start_daemon_process(&mut self) -> anyhow::Result<()> {
        let config = self.dir.0.join("sandboxer.toml");
        std::fs::write(&config, toml::to_string(&self.config)?)?;
        let log = self.dir.0.join("sandboxer.log");
        let child = Command::new(sandboxer_binary()?)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()?;
        let mut process = DaemonProcess {
            pid: child.id(),
            child: Some(child),
            log,
        };
        let listening = wait_for_socket(&self.config.api.socket, process.child.as_mut()).await;
        self.process = Some(process);
        listening
    }

    /// `sandboxer upgrade` to the same binary: the report, once the old process is gone.
    fn upgrade_daemon(&mut self) -> anyhow::Result<serde_json::Value> {
        let p = self
            .process
            .as_mut()
            .context("no sandboxer process to upgrade")?;
        let report: serde_json::Value =
            serde_json::from_str(&run(Command::new(sandboxer_binary()?)
                .arg("upgrade")
                .arg("--socket")
                .arg(&self.config.api.socket)
                .arg("--json"))?)?;
        let new_pid = report["new_pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .context("no new_pid in the report")?;
        if let Some(mut old) = p.child.take() {
            old.wait()?;
        }
        p.pid = new_pid;
        if !Path::new(&format!("/proc/{new_pid}")).exists() {
            bail!("the new sandboxer {new_pid} is not running: {report}");
        }
        Ok(report)
    }

    /// The sandboxer process's log (stderr), if it runs as one.
    fn daemon_log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .unwrap_or_default()
    }

    async fn start_containerd(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.ctrd_dir().join("containerd.log"))?;
        let path = std::env::var("PATH").unwrap_or_default();
        let mut child = Command::new(&self.tools.containerd)
            .env(
                "PATH",
                format!("{}:{path}", self.ctrd_dir().join("bin").display()),
            )
            .arg("--config")
            .arg(self.ctrd_dir().join("config.toml"))
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning containerd")?;
        self.watch.containerd.store(child.id(), Ordering::Relaxed);
        let up = wait_for_socket(&self.cri_socket(), Some(&mut child)).await;
        self.containerd = Some(child);
        up?;
        // The CRI service answers once its plugin has initialised.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut rt = self.runtime().await?;
            match rt.version(cri::VersionRequest::default()).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "containerd's CRI never answered: {e}\n{}",
                        self.containerd_log()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// SIGTERM, as systemd stops containerd; SIGKILL after 30 s.
    async fn stop_containerd(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.containerd.take() else {
            return Ok(());
        };
        self.watch.containerd.store(0, Ordering::Relaxed);
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("containerd did not stop on SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(Child::id)
    }

    /// containerd's errors and warnings, then the last 40 lines of its log.
    fn containerd_log(&self) -> String {
        let text =
            std::fs::read_to_string(self.ctrd_dir().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let problems: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("level=error") || l.contains("level=warning"))
            .collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- containerd errors and warnings\n{}\n--- containerd log (tail)\n{}",
            problems.join("\n"),
            lines[start..].join("\n")
        )
    }

    async fn runtime(&self) -> anyhow::Result<Runtime> {
        Ok(Runtime::new(
            controller::client::connect(self.cri_socket()).await?,
        ))
    }

    async fn images(&self) -> anyhow::Result<Images> {
        Ok(Images::new(
            controller::client::connect(self.cri_socket()).await?,
        ))
    }

    /// `ctr` against this containerd, in the CRI namespace.
    fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(&self.tools.ctr)
            .arg("--address")
            .arg(self.cri_socket())
            .args(["--namespace", K8S_NS])
            .args(args))
    }

    /// Builds the busybox OCI image (or takes the one `SANDBOXER_CRI_IMAGE_TAR` names) and
    /// imports it.
    fn import_image(&self) -> anyhow::Result<()> {
        let tar = match std::env::var_os(IMAGE_TAR_ENV) {
            Some(tar) => PathBuf::from(tar),
            None => {
                let tar = self.dir.0.join("busybox-oci.tar");
                run(Command::new(script("build-image")).arg(&tar).arg(IMAGE))?;
                tar
            }
        };
        let tar = tar.to_string_lossy().into_owned();
        self.ctr(&["images", "import", "--snapshotter", "overlayfs", &tar])?;
        Ok(())
    }

    /// The sandboxer's own view of a sandbox (its containerd 2.x API).
    async fn sandboxer_state(&self, id: &str) -> anyhow::Result<String> {
        let mut c = controller::client::v2_client(&self.config.api.socket).await?;
        let s = c
            .status(ControllerStatusRequest {
                sandbox_id: id.into(),
                verbose: false,
                sandboxer: "sandboxer".into(),
            })
            .await?
            .into_inner();
        Ok(s.state)
    }

    /// Whether the sandboxer started sandbox `id` from a VM template (its Status info's start
    /// phases: a clone waits for no ready line and runs a Setup).
    async fn cloned(&self, id: &str) -> anyhow::Result<(bool, BTreeMap<String, u64>)> {
        let mut c = controller::client::v2_client(&self.config.api.socket).await?;
        let info = c
            .status(ControllerStatusRequest {
                sandbox_id: id.into(),
                verbose: false,
                sandboxer: "sandboxer".into(),
            })
            .await?
            .into_inner()
            .info;
        let phases = controller::sandbox::start_phases(&info);
        Ok((controller::sandbox::from_template(&phases), phases))
    }

    /// The sandboxes in containerd's sandbox store (`ctr sandboxes list` minus its header).
    fn containerd_sandboxes(&self) -> anyhow::Result<Vec<String>> {
        let out = self.ctr(&["sandboxes", "list"])?;
        Ok(out.lines().skip(1).map(str::to_string).collect())
    }

    /// The sandbox's state and metrics type through containerd's own sandbox Controller
    /// service (namespace k8s.io), which forwards to the sandbox controller named `sandboxer`.
    async fn status_through_containerd(&self, id: &str) -> anyhow::Result<(String, String)> {
        let mut c = controller::client::v2_client(self.cri_socket()).await?;
        let mut req = tonic::Request::new(ControllerStatusRequest {
            sandbox_id: id.into(),
            verbose: false,
            sandboxer: "sandboxer".into(),
        });
        req.metadata_mut()
            .insert("containerd-namespace", K8S_NS.parse()?);
        let state = c.status(req).await?.into_inner().state;
        let mut req = tonic::Request::new(ControllerMetricsRequest {
            sandbox_id: id.into(),
            sandboxer: "sandboxer".into(),
        });
        req.metadata_mut()
            .insert("containerd-namespace", K8S_NS.parse()?);
        let metrics = c.metrics(req).await?.into_inner().metrics;
        let type_url = metrics
            .and_then(|m| m.data)
            .map(|d| d.type_url)
            .unwrap_or_default();
        Ok((state, type_url))
    }

    /// Sandbox directories in the sandboxer's state dir (`<state_dir>/sandboxes`).
    fn sandboxer_dirs(&self) -> Vec<String> {
        dir_entries(&self.config.state_dir.join(controller::store::SANDBOXES_DIR))
    }

    /// Container rootfs images in the sandboxer's image directory (`<state_dir>/images`).
    fn sandboxer_images(&self) -> Vec<String> {
        dir_entries(&self.config.state_dir.join("images"))
    }

    fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        pod_config(name, &self.dir.0.join("logs").join(name))
    }

    /// No shim process and no pause container: the sandboxer is the pod's runtime.
    fn assert_no_shim_or_pause(&self) -> anyhow::Result<()> {
        if let Some(pid) = self.containerd_pid() {
            let children = children_of(pid);
            if !children.is_empty() {
                bail!("containerd has child processes (a shim?): {children:?}");
            }
        }
        let shims = shim_processes();
        if !shims.is_empty() {
            bail!("shim processes exist: {shims:?}");
        }
        // containerd's own pod controller keeps a pause container per pod, labelled
        // io.cri-containerd.kind=sandbox.
        let pauses = self.ctr(&[
            "containers",
            "list",
            "--quiet",
            r#"labels."io.cri-containerd.kind"==sandbox"#,
        ])?;
        if !pauses.trim().is_empty() {
            bail!("containerd has pause containers: {pauses:?}");
        }
        Ok(())
    }

    /// No container records and no tasks at all in containerd (pods without containers).
    fn assert_no_containers(&self) -> anyhow::Result<()> {
        let containers = self.ctr(&["containers", "list", "--quiet"])?;
        let tasks = self.ctr(&["tasks", "list", "--quiet"])?;
        if !containers.trim().is_empty() || !tasks.trim().is_empty() {
            bail!("containerd has containers {containers:?} / tasks {tasks:?}");
        }
        Ok(())
    }

    /// Stops everything and checks that nothing is left: no sandbox directory, socket, mount
    /// or process of this test, and no VM.
    async fn finish(mut self) -> anyhow::Result<()> {
        self.stop_containerd().await?;
        self.stop_daemon().await?;
        let shims = self.watch.finish();
        if !shims.is_empty() {
            bail!("shim processes or containerd children existed during the test: {shims:?}");
        }
        let left = self.sandboxer_dirs();
        if !left.is_empty() {
            bail!("sandbox state left in the sandboxer's state dir: {left:?}");
        }
        let images = self.sandboxer_images();
        if !images.is_empty() {
            bail!("rootfs images left in the sandboxer's image dir: {images:?}");
        }
        if self.config.api.socket.exists() {
            bail!("the sandboxer socket is left");
        }
        let prefix = self.dir.0.to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .filter(|l| l.contains(&prefix))
            .map(str::to_string)
            .collect();
        if !mounts.is_empty() {
            bail!("mounts left: {mounts:?}");
        }
        let procs = processes_matching(&prefix);
        if !procs.is_empty() {
            bail!("processes left: {procs:?}");
        }
        if !self.host.wait_all_torn_down(Duration::from_secs(10)) {
            bail!("a VM was not torn down");
        }
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A failed test: do not leave a containerd running.
        if let Some(mut c) = self.containerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.daemon.take() {
            let _ = d.stop.send(());
        }
    }
}

// ---- helpers

/// Runs a command; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_for_socket(path: &Path, mut child: Option<&mut Child>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Some(c) = child.as_deref_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("exited ({status}) before listening on {}", path.display());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// (pid, cmdline) of every process.
fn processes() -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            Some((pid, cmdline.trim().to_string()))
        })
        .collect()
}

/// Whether `cmd` runs a containerd shim binary (named containerd-shim-<runtime>-<version>).
fn is_shim(cmd: &str) -> bool {
    cmd.split_whitespace()
        .next()
        .and_then(|argv0| Path::new(argv0).file_name())
        .is_some_and(|name| name.to_string_lossy().starts_with("containerd-shim"))
}

/// A one-shot call of a shim binary that serves no pod, which is not a shim process in the
/// sense checked here:
/// - containerd's CRI plugin runs `containerd-shim-runc-v2 -info` once at start-up to learn the
///   features of its built-in `runc` handler (only runc-type handlers are probed);
/// - when the endpoint of a task that containerd reloaded after a restart goes away, it runs
///   `containerd-shim-sandboxer-v1 ... delete`, which the sandboxer binary answers at once
///   (controller::shim).
fn is_one_shot_call(cmd: &str) -> bool {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let sandboxer_delete = args.first().is_some_and(|argv0| {
        Path::new(argv0).file_name() == Some(std::ffi::OsStr::new(controller::shim::SHIM_NAME))
    }) && args.last() == Some(&"delete");
    is_shim(cmd) && (args.get(1..) == Some(&["-info"][..]) || sandboxer_delete)
}

/// Shim processes (one-shot calls aside).
fn shim_processes() -> Vec<(u32, String)> {
    processes()
        .into_iter()
        .filter(|(_, cmd)| is_shim(cmd) && !is_one_shot_call(cmd))
        .collect()
}

fn processes_matching(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    processes()
        .into_iter()
        .filter(|(pid, cmd)| *pid != me && cmd.contains(needle))
        .collect()
}

/// Child processes of `parent`: one-shot calls aside, and so are a child between fork
/// and exec (it still shows the parent's command line) and one that has exited (a zombie shows
/// none). A shim serving a pod lives long and shows its own command line.
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let parent_cmd = std::fs::read(format!("/proc/{parent}/cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    processes()
        .into_iter()
        .filter(|(_, cmd)| !is_one_shot_call(cmd) && !cmd.is_empty() && *cmd != parent_cmd)
        .filter(|(pid, _)| {
            // The parent pid is the second field after the `(comm)` field.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// A host-network pod (no CNI) called `name`.
fn pod_config(name: &str, log_directory: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "sandboxer-test".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        labels: [("test".to_string(), "cri".to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_pod(
    rt: &mut Runtime,
    config: &cri::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    Ok(rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id)
}

async fn pod_status(rt: &mut Runtime, id: &str) -> anyhow::Result<cri::PodSandboxStatus> {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .context("PodSandboxStatus without a status")
}

async fn pod_ids(rt: &mut Runtime) -> anyhow::Result<Vec<String>> {
    Ok(rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect())
}

/// The pod's state as ListPodSandbox (CRI's in-memory store) has it.
async fn listed_state(rt: &mut Runtime, id: &str) -> anyhow::Result<Option<cri::PodSandboxState>> {
    Ok(rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items
        .into_iter()
        .find(|p| p.id == id)
        .map(|p| p.state()))
}

async fn stop_and_remove_pod(rt: &mut Runtime, id: &str) -> anyhow::Result<()> {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .context("StopPodSandbox")?;
    let st = pod_status(rt, id).await?;
    if st.state() != cri::PodSandboxState::SandboxNotready {
        bail!("after StopPodSandbox the pod is {:?}", st.state());
    }
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .context("RemovePodSandbox")?;
    if pod_ids(rt).await?.contains(&id.to_string()) {
        bail!("RemovePodSandbox left {id} listed");
    }
    Ok(())
}

// ---- tests that run with the project's test guests

/// containerd loaded the sandboxer as a sandbox controller, CRI lists both runtime handlers,
/// and the locally built image is usable by CRI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_registers_the_sandboxer() {
    let Some(tools) = prerequisites("containerd_registers_the_sandboxer") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let env = Env::new(tools, VmKind::TestGuest, true).await.unwrap();

    let plugins = env.ctr(&["plugins", "list"]).unwrap();
    let line = plugins
        .lines()
        .find(|l| l.contains("io.containerd.sandbox.controller.v1") && l.contains(" sandboxer "))
        .unwrap_or_else(|| panic!("no sandboxer sandbox controller in:\n{plugins}"));
    assert!(line.trim_end().ends_with("ok"), "{line}");
    assert!(line.contains("linux/amd64"), "{line}");

    let mut rt = env.runtime().await.unwrap();
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "containerd");
    assert_eq!(v.runtime_api_version, "v1");
    assert!(
        v.runtime_version.starts_with(&env.tools.version) || v.runtime_version.starts_with("2.1"),
        "{v:?}"
    );

    let status = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let handlers: Vec<&str> = status
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    for h in HANDLERS {
        assert!(
            handlers.contains(&h),
            "handler {h} missing from {handlers:?}"
        );
    }
    let runtime_ready = status
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "RuntimeReady")
        .expect("no RuntimeReady condition");
    assert!(runtime_ready.status, "{runtime_ready:?}");
    let config: serde_json::Value =
        serde_json::from_str(status.info.get("config").expect("no config in Status info")).unwrap();
    let runtimes = &config["containerd"]["runtimes"];
    assert_eq!(runtimes["sandboxer"]["sandboxer"], "sandboxer");
    assert_eq!(runtimes["sandboxer"]["io_type"], "streaming");
    assert_eq!(runtimes["sandboxer-fifo"]["io_type"], "fifo");
    assert_eq!(runtimes["sandboxer"]["snapshotter"], "overlayfs");

    env.import_image().unwrap();
    let mut images = env.images().await.unwrap();
    // CRI learns about imported images from containerd's events: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    let img = loop {
        let found = images
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image;
        match found {
            Some(img) => break img,
            None if Instant::now() > deadline => panic!("the imported image is unknown to CRI"),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(img.repo_tags.iter().any(|t| t == IMAGE), "{img:?}");
    assert!(img.size > 1_000_000, "busybox is about 2 MB: {img:?}");

    env.assert_no_shim_or_pause().unwrap();
    env.finish().await.unwrap();
}

/// RunPodSandbox -> READY -> StopPodSandbox -> RemovePodSandbox for both handlers, with the
/// sandboxer's own view agreeing at each step, no shim and no pause container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_through_cri() {
    let Some(tools) = prerequisites("pod_lifecycle_through_cri") else {
        return;
    };
    require_kvm!();
    let _serial = SERIAL.lock().await;
    let env = Env::new(tools, VmKind::TestGuest, true).await.unwrap();
    let mut rt = env.runtime().await.unwrap();

    for handler in HANDLERS {
        let name = format!("pod-{handler}");
        let mut config = env.pod_config(&name);
        // The fifo pod also asks for 2 CPUs and 64 MiB: the VM is sized from them.
        let sized = handler == "sandboxer-fifo";
        if sized && let Some(linux) = config.linux.as_mut() {
            linux.resources = Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 200_000,
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            });
        }
        let id = run_pod(&mut rt, &config, handler)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", env.containerd_log()));
        let st = pod_status(&mut rt, &id).await.unwrap();
        assert_eq!(st.state(), cri::PodSandboxState::SandboxReady, "{st:?}");
        assert_eq!(st.runtime_handler, handler);
        assert_eq!(
            st.metadata.as_ref().map(|m| m.name.as_str()),
            Some(name.as_str())
        );
        assert!(st.created_at > 0);
        // containerd handed the pod config to the sandboxer (Create's options) and shows the
        // sandboxer's own Status info.
        let verbose = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            verbose.info.get("hostname").map(String::as_str),
            Some(name.as_str()),
            "{:?}",
            verbose.info
        );
        let (vcpus, mem_mib) = if sized {
            ("2", env.config.vm.mem_mib + 64)
        } else {
            ("1", env.config.vm.mem_mib)
        };
        assert_eq!(verbose.info.get("vcpus").map(String::as_str), Some(vcpus));
        assert_eq!(
            verbose.info.get("mem_mib"),
            Some(&mem_mib.to_string()),
            "{:?}",
            verbose.info
        );
        // The same sandbox id is the sandboxer's, and its VM runs.
        assert_eq!(env.sandboxer_state(&id).await.unwrap(), "SANDBOX_READY");
        assert!(
            env.sandboxer_dirs().contains(&id),
            "{:?}",
            env.sandboxer_dirs()
        );
        env.assert_no_shim_or_pause().unwrap();
        env.assert_no_containers().unwrap();
        // containerd's own sandbox Controller service routes to the sandboxer by name.
        let (state, metrics) = env.status_through_containerd(&id).await.unwrap();
        assert_eq!(state, "SANDBOX_READY");
        assert!(
            !metrics.is_empty(),
            "Metrics through containerd carried no data"
        );
        assert_eq!(pod_ids(&mut rt).await.unwrap(), vec![id.clone()]);
        let listed = env.containerd_sandboxes().unwrap();
        assert!(listed.iter().any(|l| l.starts_with(&id)), "{listed:?}");

        stop_and_remove_pod(&mut rt, &id).await.unwrap();
        // RemovePodSandbox shut the sandbox down in the sandboxer too.
        assert!(
            env.sandboxer_dirs().is_empty(),
            "{:?}",
            env.sandboxer_dirs()
        );
        let gone = env.sandboxer_state(&id).await.unwrap_err();
        assert!(
            format!("{gone:#}").contains("not found") || format!("{gone:#}").contains("NotFound"),
            "{gone:#}"
        );
        env.assert_no_shim_or_pause().unwrap();
    }
    let sandboxes = env.containerd_sandboxes().unwrap();
    assert!(sandboxes.is_empty(), "containerd still lists {sandboxes:?}");
    env.finish().await.unwrap();
}

/// An unknown runtime handler and a sandboxer that is down fail RunPodSandbox with a clear
/// error and leave no sandbox behind; the same pod runs once the sandboxer is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_surface_through_containerd() {
    let Some(tools) = prerequisites("errors_surface_through_containerd") else {
        return;
    };
    require_kvm!();
    let _serial = SERIAL.lock().await;
    // containerd first, with the sandboxer down.
    let mut env = Env::new(tools, VmKind::TestGuest, false).await.unwrap();
    let mut rt = env.runtime().await.unwrap();

    let config = env.pod_config("bad-handler");
    let err = run_pod(&mut rt, &config, "no-such-handler")
        .await
        .unwrap_err();
    assert!(err.message().contains("no-such-handler"), "{err:?}");
    assert!(pod_ids(&mut rt).await.unwrap().is_empty());

    // containerd dials the proxy plugin lazily: it is loaded even while the sandboxer is down.
    let plugins = env.ctr(&["plugins", "list"]).unwrap();
    assert!(
        plugins.lines().any(|l| l.contains("sandbox.controller.v1")
            && l.contains(" sandboxer ")
            && l.trim_end().ends_with("ok")),
        "{plugins}"
    );

    let config = env.pod_config("daemon-down");
    let err = run_pod(&mut rt, &config, "sandboxer").await.unwrap_err();
    eprintln!("RunPodSandbox with the sandboxer down: {err:?}");
    let msg = err.message();
    assert!(msg.contains("failed to create sandbox"), "{err:?}");
    assert!(
        msg.contains(&*env.config.api.socket.to_string_lossy())
            || msg.contains("connection refused")
            || msg.contains("no such file"),
        "the error does not say the sandboxer is unreachable: {err:?}"
    );
    assert!(
        pod_ids(&mut rt).await.unwrap().is_empty(),
        "a failed pod is listed"
    );
    let sandboxes = env.containerd_sandboxes().unwrap();
    assert!(sandboxes.is_empty(), "containerd keeps {sandboxes:?}");
    env.assert_no_shim_or_pause().unwrap();

    // The sandboxer comes up: the same pod now runs, without restarting containerd.
    env.start_daemon().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        match run_pod(&mut rt, &config, "sandboxer").await {
            Ok(id) => break id,
            Err(e) if Instant::now() > deadline => {
                panic!("RunPodSandbox after the sandboxer came up: {e:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(
        pod_status(&mut rt, &id).await.unwrap().state(),
        cri::PodSandboxState::SandboxReady
    );
    stop_and_remove_pod(&mut rt, &id).await.unwrap();
    env.finish().await.unwrap();
}

/// containerd restarts while a pod runs: CRI recovers it from the sandboxer (Status, Wait),
/// the VM carried on, and the pod can still be stopped and removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restart_recovers_a_running_pod() {
    let Some(tools) = prerequisites("containerd_restart_recovers_a_running_pod") else {
        return;
    };
    require_kvm!();
    let _serial = SERIAL.lock().await;
    let mut env = Env::new(tools, VmKind::TestGuest, true).await.unwrap();
    let mut rt = env.runtime().await.unwrap();
    let config = env.pod_config("survivor");
    let id = run_pod(&mut rt, &config, "sandboxer").await.unwrap();
    let before = pod_status(&mut rt, &id).await.unwrap();

    env.stop_containerd().await.unwrap();
    // containerd is gone; the sandbox is not.
    assert_eq!(env.sandboxer_state(&id).await.unwrap(), "SANDBOX_READY");
    env.start_containerd().await.unwrap();

    let mut rt = env.runtime().await.unwrap();
    let after = pod_status(&mut rt, &id).await.unwrap();
    assert_eq!(
        after.state(),
        cri::PodSandboxState::SandboxReady,
        "{after:?}"
    );
    assert_eq!(after.created_at, before.created_at);
    assert_eq!(after.runtime_handler, "sandboxer");
    assert_eq!(pod_ids(&mut rt).await.unwrap(), vec![id.clone()]);
    // ListPodSandbox reads CRI's own store: recovered as ready.
    assert_eq!(
        listed_state(&mut rt, &id).await.unwrap(),
        Some(cri::PodSandboxState::SandboxReady)
    );
    env.assert_no_shim_or_pause().unwrap();

    // The VM ends behind containerd's back: the new containerd's Wait sees it, and CRI's store
    // turns the pod not ready (only the exit monitor fed by Wait updates that state).
    let mut sbx = controller::client::v2_client(&env.config.api.socket)
        .await
        .unwrap();
    sbx.stop(ControllerStopRequest {
        sandbox_id: id.clone(),
        timeout_secs: 1,
        sandboxer: "sandboxer".into(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while listed_state(&mut rt, &id).await.unwrap() != Some(cri::PodSandboxState::SandboxNotready) {
        assert!(
            Instant::now() < deadline,
            "containerd never saw the sandbox end: its Wait was not re-issued after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop_and_remove_pod(&mut rt, &id).await.unwrap();
    env.finish().await.unwrap();
}

// ---- containers: need a Linux guest

async fn create_container(
    rt: &mut Runtime,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    name: &str,
    script: &str,
) -> anyhow::Result<String> {
    create_linux_container(rt, pod, pod_config, name, script, None).await
}

/// [`create_container`] with the container's Linux settings (resources, security context).
async fn create_linux_container(
    rt: &mut Runtime,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    name: &str,
    script: &str,
    linux: Option<cri::LinuxContainerConfig>,
) -> anyhow::Result<String> {
    let config = cri::ContainerConfig {
        linux,
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    };
    Ok(rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await?
        .into_inner()
        .container_id)
}

async fn container_status(rt: &mut Runtime, id: &str) -> anyhow::Result<cri::ContainerStatus> {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .context("ContainerStatus without a status")
}

async fn wait_container_state(
    rt: &mut Runtime,
    id: &str,
    want: cri::ContainerState,
) -> anyhow::Result<cri::ContainerStatus> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = container_status(rt, id).await?;
        if st.state() == want {
            return Ok(st);
        }
        if st.state() == cri::ContainerState::ContainerExited {
            bail!("container {id} exited while waiting for {want:?}: {st:?}");
        }
        if Instant::now() > deadline {
            bail!("container {id} never reached {want:?}: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the CRI log file of a container contains `text`.
async fn wait_log(path: &Path, text: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        // CRI log lines: "<time> stdout|stderr F|P <text>".
        if log
            .lines()
            .any(|l| l.contains(" stdout ") && l.ends_with(text))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} never showed {text:?}: {log:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole CRI container flow in a sandboxer pod, for one runtime handler.
async fn containers_in_a_pod(env: &mut Env, handler: &str) -> anyhow::Result<()> {
    let mut rt = env.runtime().await?;
    let name = format!("linux-{handler}");
    let pod_cfg = env.pod_config(&name);
    std::fs::create_dir_all(&pod_cfg.log_directory)?;
    let pod = run_pod(&mut rt, &pod_cfg, handler).await?;
    let step = |what: &str| eprintln!("cri {handler}: {what}");
    step(&format!("pod {pod} ready"));
    // Templates are on by default: the CRI pod is a clone of the template VM, not a boot.
    let (cloned, phases) = env.cloned(&pod).await?;
    if !cloned {
        bail!("pod {pod} was booted, not cloned from a template: start phases {phases:?}");
    }
    step(&format!(
        "pod {pod} is a template clone (start phases {phases:?})"
    ));

    // A long-running container that greets on stdout.
    let c1 = create_container(
        &mut rt,
        &pod,
        &pod_cfg,
        "greeter",
        "echo hello from a sandboxer pod; exec sleep 3600",
    )
    .await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: c1.clone(),
    })
    .await?;
    let st = wait_container_state(&mut rt, &c1, cri::ContainerState::ContainerRunning).await?;
    if st.image.map(|i| i.image).as_deref() != Some(IMAGE) && st.image_ref.is_empty() {
        bail!("ContainerStatus has no image");
    }
    let log = Path::new(&pod_cfg.log_directory).join("greeter.log");
    wait_log(&log, "hello from a sandboxer pod").await?;
    step("greeter running; its CRI log has the greeting");

    // ExecSync: stdout, stderr and the exit code come back.
    let exec = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: c1.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            timeout: 60,
        })
        .await?
        .into_inner();
    if exec.stdout != b"out\n" || exec.stderr != b"err\n" || exec.exit_code != 3 {
        bail!("ExecSync gave {exec:?}");
    }
    step("ExecSync: stdout, stderr and exit code 3 came back");
    env.assert_no_shim_or_pause()?;

    // containerd's default seccomp profile (RuntimeDefault), which the agent compiles and
    // applies in the guest. `dmesg` (syslog(2)) runs without a profile (the guest kernel does
    // not restrict dmesg) and is refused under containerd's profile, which allows syslog only
    // to CAP_SYSLOG.
    let unconfined = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: c1.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "grep -q '^Seccomp:.0$' /proc/self/status && dmesg >/dev/null".into(),
            ],
            timeout: 60,
        })
        .await?
        .into_inner();
    if unconfined.exit_code != 0 {
        bail!("dmesg in a container without a seccomp profile: {unconfined:?}");
    }
    let runtime_default = cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault.into(),
                localhost_ref: String::new(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let c3 = create_linux_container(
        &mut rt,
        &pod,
        &pod_cfg,
        "confined",
        "grep -q '^Seccomp:.2$' /proc/self/status || exit 20; dmesg >/dev/null 2>&1 && exit 21; \
         exit 9",
        Some(runtime_default),
    )
    .await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: c3.clone(),
    })
    .await?;
    let st = wait_container_state(&mut rt, &c3, cri::ContainerState::ContainerExited).await?;
    match st.exit_code {
        9 => {}
        20 => bail!("the RuntimeDefault container runs without a seccomp filter"),
        21 => bail!("dmesg ran under containerd's default seccomp profile"),
        other => bail!("the RuntimeDefault container exited with {other}"),
    }
    step("RuntimeDefault seccomp: the container is filtered and dmesg is refused");

    // A second container in the same pod, which exits with a code.
    let c2 = create_container(&mut rt, &pod, &pod_cfg, "exiter", "echo bye; exit 7").await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: c2.clone(),
    })
    .await?;
    let st = wait_container_state(&mut rt, &c2, cri::ContainerState::ContainerExited).await?;
    if st.exit_code != 7 {
        bail!(
            "the second container exited with {} instead of 7",
            st.exit_code
        );
    }
    step("a second container exited with 7");

    // containerd restarts in the middle: the running container is still running afterwards.
    env.stop_containerd().await?;
    env.start_containerd().await?;
    let mut rt = env.runtime().await?;
    wait_container_state(&mut rt, &c1, cri::ContainerState::ContainerRunning).await?;
    step("containerd restarted: the greeter is still running");

    rt.stop_container(cri::StopContainerRequest {
        container_id: c1.clone(),
        timeout: 2,
    })
    .await?;
    let st = container_status(&mut rt, &c1).await?;
    if st.state() != cri::ContainerState::ContainerExited {
        bail!("after StopContainer: {st:?}");
    }
    step(&format!("StopContainer: exited with {}", st.exit_code));
    for c in [&c1, &c2, &c3] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.to_string(),
        })
        .await?;
    }
    let left = rt
        .list_containers(cri::ListContainersRequest::default())
        .await?
        .into_inner()
        .containers;
    if !left.is_empty() {
        bail!("containers left: {left:?}");
    }
    // containerd's own container records of the CRI containers are gone too, and a pause
    // container never existed.
    let ctrs = env.ctr(&["containers", "list", "--quiet"])?;
    if !ctrs.trim().is_empty() {
        bail!("containerd keeps containers {ctrs}");
    }
    stop_and_remove_pod(&mut rt, &pod).await?;
    step("containers removed, pod stopped and removed");
    Ok(())
}

/// What a test with containers needs: containerd and a Linux guest, or `None` after a loud
/// skip (a failure under CI).
fn linux_test(test: &str) -> Option<(Containerd, VmKind)> {
    let tools = prerequisites(test)?;
    let (kernel, initramfs) = linux_guest(test)?;
    Some((tools, VmKind::Linux(kernel, initramfs)))
}

/// Containers through CRI in a Linux guest, for both IO types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_in_a_linux_guest() {
    let Some((tools, vm)) = linux_test("containers_run_in_a_linux_guest") else {
        return;
    };
    require_kvm!();
    let _serial = SERIAL.lock().await;
    let mut env = Env::new(tools, vm, true).await.unwrap();
    env.import_image().unwrap();
    for handler in HANDLERS {
        if let Err(e) = containers_in_a_pod(&mut env, handler).await {
            panic!("{handler}: {e:#}\n{}", env.containerd_log());
        }
    }
    env.finish().await.unwrap();
}

/// The ticks of a CRI log (`<time> stdout F tick <n>`): each one's number and time.
fn ticks(log: &str) -> anyhow::Result<Vec<(u64, chrono_free::Instant)>> {
    let mut out = Vec::new();
    for line in log.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(time), Some(_), Some(_), Some(text)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if let Some(n) = text.strip_prefix("tick ") {
            out.push((n.trim().parse()?, chrono_free::parse(time)?));
        }
    }
    Ok(out)
}

/// RFC 3339 times of CRI logs, to the nanosecond, without a date crate.
mod chrono_free {
    /// Nanoseconds since the day began, and the day (`YYYY-MM-DD`).
    pub type Instant = (String, u64);

    pub fn parse(t: &str) -> anyhow::Result<Instant> {
        let (day, rest) = t
            .split_once('T')
            .ok_or_else(|| anyhow::anyhow!("time {t:?}"))?;
        let clock = rest.trim_end_matches('Z');
        let clock = clock.split(['+', '-']).next().unwrap_or(clock);
        let mut hms = clock.split(':');
        let (Some(h), Some(m), Some(sec)) = (hms.next(), hms.next(), hms.next()) else {
            anyhow::bail!("time {t:?}");
        };
        let (s, frac) = sec.split_once('.').unwrap_or((sec, "0"));
        let frac = format!("{frac:0<9}");
        let ns = (h.parse::<u64>()? * 3600 + m.parse::<u64>()? * 60 + s.parse::<u64>()?)
            * 1_000_000_000
            + frac.get(..9).unwrap_or("0").parse::<u64>()?;
        Ok((day.to_string(), ns))
    }

    /// `b - a` in milliseconds (same day; across midnight, 24 h are added).
    pub fn millis(a: &Instant, b: &Instant) -> u64 {
        let day = 86_400_000_000_000;
        let b_ns = if b.0 == a.0 { b.1 } else { b.1 + day };
        b_ns.saturating_sub(a.1) / 1_000_000
    }
}

/// A pod with running containers lives through `sandboxer upgrade` (issue 18): containerd's
/// connections and its Wait on each container go on in the new process, the ticker's output
/// reaches its CRI log with no line lost and no gap beyond the pause, ExecSync works after,
/// and a container that ends after the upgrade has its exit code reported.
async fn a_pod_through_an_upgrade(env: &mut Env, handler: &str) -> anyhow::Result<()> {
    let mut rt = env.runtime().await?;
    let pod_cfg = env.pod_config(&format!("upgrade-{handler}"));
    std::fs::create_dir_all(&pod_cfg.log_directory)?;
    let pod = run_pod(&mut rt, &pod_cfg, handler).await?;
    let step = |what: &str| eprintln!("cri upgrade ({handler}): {what}");
    step(&format!("pod {pod} ready"));
    let ticker = create_container(
        &mut rt,
        &pod,
        &pod_cfg,
        "ticker",
        "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done",
    )
    .await?;
    let ender = create_container(
        &mut rt,
        &pod,
        &pod_cfg,
        "ender",
        "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo ending; exit 5",
    )
    .await?;
    for c in [&ticker, &ender] {
        rt.start_container(cri::StartContainerRequest {
            container_id: c.to_string(),
        })
        .await?;
        wait_container_state(&mut rt, c, cri::ContainerState::ContainerRunning).await?;
    }
    let log = Path::new(&pod_cfg.log_directory).join("ticker.log");
    wait_log(&log, "tick 20").await?;
    step("ticker and ender running, 20 ticks logged");

    let report = env.upgrade_daemon()?;
    let before = ticks(&std::fs::read_to_string(&log)?)?.len();
    step(&format!("upgraded: {report}"));
    if report["sandboxes"] != 1 || !report["failed"].as_array().is_some_and(Vec::is_empty) {
        bail!("upgrade report {report}");
    }
    let pause_ms = report["pauses_us"][0].as_u64().unwrap_or(0) / 1000;
    // ExecSync through the same pod (the new process's Task endpoint and agent connection).
    let exec = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: ticker.clone(),
            cmd: vec!["/bin/sh".into(), "-c".into(), "echo out; exit 4".into()],
            timeout: 60,
        })
        .await?
        .into_inner();
    if exec.stdout != b"out\n" || exec.exit_code != 4 {
        bail!("ExecSync after the upgrade gave {exec:?}");
    }
    step("ExecSync after the upgrade: stdout and exit code 4");
    if handler == "sandboxer" {
        // containerd's stdio streams of both containers were open: the new process resumes
        // them as it takes the Task connections (controller/src/task/stdio/proxy.rs logs
        // each).
        let deadline = Instant::now() + Duration::from_secs(30);
        let resumed = loop {
            let n = env
                .daemon_log()
                .lines()
                .filter(|l| l.contains("stdio stream") && l.contains("resumed at"))
                .count();
            if n >= 2 || Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if resumed < 2 {
            bail!("{resumed} streaming stdio streams resumed by the new process");
        }
        step(&format!(
            "{resumed} stdio streams resumed by the new process"
        ));
    }
    // When each step of the take-over ended, from the new process's log.
    for line in env.daemon_log().lines().filter(|l| {
        [
            "agent answered",
            "Task endpoint serving",
            "resumed at",
            "flows again",
            "bridge",
            "took over",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        step(&format!("daemon: {line}"));
    }
    let last = before as u64 + 30;
    wait_log(&log, &format!("tick {last}")).await?;

    // containerd's Wait on `ender`, sent to the old process, is answered by the new one.
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: ender.clone(),
        cmd: vec!["/bin/touch".into(), "/tmp/go".into()],
        timeout: 60,
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = container_status(&mut rt, &ender).await?;
        if st.state() == cri::ContainerState::ContainerExited {
            break st;
        }
        if Instant::now() > deadline {
            bail!("ender never exited after the upgrade: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if st.exit_code != 5 {
        bail!("ender exited with {} instead of 5", st.exit_code);
    }
    step("a container that ended after the upgrade reported exit code 5");

    // Every tick reached the log, in order, with no gap beyond the pause.
    let all = ticks(&std::fs::read_to_string(&log)?)?;
    for (i, (n, _)) in all.iter().enumerate() {
        if *n != i as u64 + 1 {
            bail!("tick {} where {} was due: lines lost or repeated", n, i + 1);
        }
    }
    let (gap, at) = all
        .windows(2)
        .map(|w| (chrono_free::millis(&w[0].1, &w[1].1), w[0].0))
        .max()
        .unwrap_or((0, 0));
    let text = std::fs::read_to_string(&log)?;
    for n in [at, at + 1] {
        let tick = format!(" tick {n}");
        if let Some(line) = text.lines().find(|l| l.ends_with(&tick)) {
            step(&format!("around the longest gap: {line}"));
        }
    }
    step(&format!(
        "{} ticks, none lost; longest gap between two {gap} ms (pause {pause_ms} ms)",
        all.len()
    ));
    // The ticker writes every 100 ms; the emulated host's clock and scheduling are slow, so
    // the bound leaves room for them beside the pause.
    if gap > pause_ms + 3000 {
        bail!("a {gap} ms gap in the ticker's log (pause {pause_ms} ms)");
    }

    rt.stop_container(cri::StopContainerRequest {
        container_id: ticker.clone(),
        timeout: 2,
    })
    .await?;
    for c in [&ticker, &ender] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.to_string(),
        })
        .await?;
    }
    stop_and_remove_pod(&mut rt, &pod).await?;
    step("containers removed, pod stopped and removed");
    Ok(())
}

/// A CRI pod with containers through a live upgrade of the sandboxer (a Linux guest), for
/// each IO type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_lives_through_an_upgrade() {
    let Some((tools, vm)) = linux_test("a_pod_lives_through_an_upgrade") else {
        return;
    };
    require_kvm!();
    let _serial = SERIAL.lock().await;
    let mut env = Env::new(tools, vm, false).await.unwrap();
    // The pod boots: no template. With templates on, the new process builds the default
    // template at its start, and that Linux guest booting beside the running pod froze the
    // emulated host's L1 (QEMU TCG's SVM, tests/emulated-host/README.md) in each of the 8 L1s
    // tried, after the upgrade had worked; with them off it passes.
    env.config.template.enabled = false;
    env.start_daemon_process().await.unwrap();
    env.import_image().unwrap();
    // Streaming stdio (the engine's streams through the task socket) first, then FIFO stdio
    // (the daemon's copies): one pod each, one upgrade each.
    for handler in ["sandboxer", "sandboxer-fifo"] {
        if let Err(e) = a_pod_through_an_upgrade(&mut env, handler).await {
            panic!(
                "{handler}: {e:#}\n--- sandboxer:\n{}\n--- containerd:\n{}",
                env.daemon_log(),
                env.containerd_log()
            );
        }
    }
    env.finish().await.unwrap();
}

#[test]
fn one_shot_shim_calls_are_told_from_shims() {
    assert!(is_one_shot_call("/usr/bin/containerd-shim-runc-v2 -info"));
    assert!(is_one_shot_call(
        "/usr/local/bin/containerd-shim-sandboxer-v1 -namespace k8s.io -address /a \
         -publish-binary /usr/bin/containerd -id c1 -bundle /b -debug delete"
    ));
    // A shim serving a pod, a sandboxer link asked to start one, and other programs.
    assert!(!is_one_shot_call(
        "/usr/bin/containerd-shim-runc-v2 -namespace k8s.io -id c1 -address /a"
    ));
    assert!(!is_one_shot_call(
        "/usr/local/bin/containerd-shim-sandboxer-v1 -namespace k8s.io -id c1 start"
    ));
    assert!(!is_one_shot_call(
        "/usr/bin/containerd-shim-runc-v2 -id c1 delete"
    ));
    assert!(!is_one_shot_call("/usr/bin/sleep delete"));
}

// ---- the deployment docs show what the tests run

/// `docs/` relative to the workspace.
fn docs(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn docs_show_the_tested_containerd_config() {
    let rendered = run(Command::new(format!("{SCRIPTS}/gen-config")).arg("--host")).unwrap();
    assert!(rendered.contains("[proxy_plugins.sandboxer]"), "{rendered}");
    let page = docs("containerd.md");
    assert!(
        page.contains(&format!("```toml\n{rendered}```")),
        "docs/containerd.md does not show `tests/containerd/gen-config --host` verbatim"
    );
    for h in HANDLERS {
        assert!(
            rendered.contains(&format!("containerd.runtimes.{h}]")),
            "handler {h} missing"
        );
    }
}

/// `sandboxer install containerd` on the base config makes the documented one (the same
/// tables and values), and a second run changes nothing.
#[test]
fn installer_makes_the_documented_containerd_config() {
    let Ok(sandboxer) = sandboxer_binary() else {
        assert!(!env_is("CI", "true"), "no sandboxer binary beside the test");
        eprintln!("SKIP installer_makes_the_documented_containerd_config: no sandboxer binary");
        return;
    };
    let dir = TempDir::new().unwrap();
    let path = dir.0.join("config.toml");
    let base =
        run(Command::new(format!("{SCRIPTS}/gen-config")).args(["--base", "--host"])).unwrap();
    assert!(!base.contains("sandboxer]"), "{base}");
    std::fs::write(&path, &base).unwrap();
    let install = || {
        let out = Command::new(&sandboxer)
            .args(["install", "containerd", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = install();
    assert!(said.contains("proxy_plugins.sandboxer.address"), "{said}");
    let made = std::fs::read_to_string(&path).unwrap();
    let documented = run(Command::new(format!("{SCRIPTS}/gen-config")).arg("--host")).unwrap();
    let parse = |t: &str| t.parse::<toml::Table>().unwrap();
    assert_eq!(parse(&made), parse(&documented), "{made}");
    let said = install();
    assert!(said.contains("already registers the sandboxer"), "{said}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), made);
}

#[test]
fn docs_runtime_classes_name_tested_handlers() {
    let page = docs("kubernetes.md");
    let handlers: Vec<&str> = page
        .lines()
        .filter_map(|l| l.trim().strip_prefix("handler: "))
        .map(|h| h.split_whitespace().next().unwrap_or_default())
        .collect();
    assert!(!handlers.is_empty());
    for h in handlers {
        assert!(
            HANDLERS.contains(&h),
            "RuntimeClass handler {h} is not a tested handler"
        );
    }
}

#[test]
fn docs_daemon_config_is_the_default_config() {
    let text = docs("sandboxer.toml");
    let config = Config::from_toml(&text, Path::new("docs/sandboxer.toml")).unwrap();
    config.validate().unwrap();
    // The page says every value in it is the default.
    assert_eq!(config, Config::default());
}

#[test]
fn docs_systemd_unit_matches_the_daemon() {
    let unit = docs("sandboxer.service");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    // The daemon sd_notifies READY=1 (controller/src/notify.rs).
    assert!(lines.contains(&"Type=notify"), "{unit}");
    let exec = lines
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("no ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        args.first().is_some_and(|a| a.ends_with("/sandboxer")),
        "{exec}"
    );
    assert_eq!(
        args.get(1..),
        Some(&["serve", "--config", controller::config::DEFAULT_CONFIG_PATH][..])
    );
    assert!(
        lines.contains(&"RuntimeDirectoryPreserve=yes"),
        "records must survive restarts"
    );
}

/// The iSulad `daemon.json` on docs/isulad.md is valid JSON and points at the daemon's default
/// sockets (no iSulad package exists for Debian, so no test runs iSulad itself).
#[test]
fn docs_isulad_config_points_at_the_default_sockets() {
    let page = docs("isulad.md");
    let json = page
        .split("```json\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("no json block in docs/isulad.md");
    let config: serde_json::Value = serde_json::from_str(json).unwrap();
    let defaults = Config::default();
    let sandboxer = &config["cri-sandboxers"]["sandboxer"];
    assert_eq!(sandboxer["name"], "sandboxer");
    assert_eq!(
        sandboxer["address"].as_str(),
        defaults.api.socket.to_str(),
        "{json}"
    );
    assert_eq!(
        config["cri-runtimes"]["sandboxer"],
        "io.containerd.sandboxer.v1"
    );
    // The seed-API address the page gives for older iSulad.
    let seed = defaults.api.seed_socket.to_string_lossy();
    assert!(
        page.contains(&format!("\"address\": \"{seed}\"")),
        "docs/isulad.md does not name the seed socket {seed}"
    );
}
