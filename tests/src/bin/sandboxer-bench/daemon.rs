// SPDX-License-Identifier: Apache-2.0
//! `sandbox-start` and `density`: the daemon, in this process on a temporary socket, driven
//! through the containerd 2.x Sandbox API over gRPC (state dir on a tmpfs, like /run/sandboxer
//! on a standard host). The sandboxes boot the `virtio` test guest in agent mode (this host's
//! KVM cannot run Linux): Start returns after the guest's ready signal over vsock and the
//! agent's Setup (with the clock), and Stop's Control.Shutdown ends the VM, as the real agent
//! does.
//!
//! The daemon runs on its own tokio runtime (threads named `bench-daemon`), the gRPC client on
//! this process's main thread, so the CPU time of each can be told apart
//! (`/proc/self/task/*/schedstat`, exact to the ns): the host's own work during a Start is the
//! daemon's threads plus the VM's `vmm` (device emulation) thread. The vCPU
//! thread (`vcpu0`) runs the guest: its time is guest instructions, emulated on this host's
//! `kvm_pvm`, plus the VMM's handling of the guest's port and MMIO exits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::{Summary, procstat};
use proto::v2::sandbox::controller_client::ControllerClient;
use proto::v2::sandbox::{
    ControllerCreateRequest, ControllerShutdownRequest, ControllerStartRequest,
    ControllerStatusRequest, ControllerStopRequest,
};
use serde_json::json;
use test_guests::Guest;
use tonic::transport::Channel;

use controller::backend::template::Templates;

use crate::{NOFILE, Options, vmm_host};

/// The phases of Start the daemon reports in Status (`start_<phase>_us`), in order, and
/// whether they wait on the guest's own work. Those phases include host work too (vsock
/// emulation, the ttrpc client), so "total minus them" is only a lower bound on the host's
/// share of Start's wall time.
pub(crate) const PHASES: &[(&str, bool)] = &[
    ("vm", false),
    ("agent_ready", true),
    ("agent_connect", true),
    ("setup", true),
    ("task_server", false),
];

/// Whose work a thread does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// The daemon's runtime threads, and each VM's `vmm` thread.
    Host,
    /// vCPU threads: the guest.
    Vcpu,
    /// The shell pool's refill thread (off Start's path).
    Pool,
    /// The benchmark's gRPC client (this process's main thread).
    Client,
    /// Anything else (e.g. KVM's per-VM kernel worker threads).
    Other,
}

pub(crate) const ROLES: [(Role, &str); 5] = [
    (Role::Host, "host (daemon runtime, vmm)"),
    (Role::Vcpu, "vCPU (guest, emulated here, + exits)"),
    (Role::Pool, "shell pool refill"),
    (Role::Client, "gRPC client (the benchmark)"),
    (Role::Other, "other (KVM workers, ...)"),
];

/// A thread's role, by its name; the pool's threads started ahead for its ready shells
/// (named as the VM threads they become) by their ids, `pooled`.
fn role(t: &procstat::ThreadCpu, pooled: &[u32]) -> Role {
    let name = t.name.as_str();
    if t.tid == std::process::id() {
        Role::Client
    } else if name == "vm-shell-pool" || pooled.contains(&t.tid) {
        Role::Pool
    } else if name.starts_with("bench-daemon") || name == "vmm" {
        Role::Host
    } else if name.starts_with("vcpu") {
        Role::Vcpu
    } else {
        Role::Other
    }
}

/// Per-role CPU time between two snapshots (threads that started in between count from 0).
/// The threads the shell pool started ahead for its ready shells at the second snapshot count
/// as the pool's: a Start that takes a shell has the pool build another meanwhile, whose
/// threads install their seccomp filters under the VM threads' names. (One still being built
/// then counts as the host's: the host share is never under-counted.)
pub(crate) fn cpu_by_role(
    before: &[procstat::ThreadCpu],
    after: &[procstat::ThreadCpu],
) -> HashMap<Role, Duration> {
    let pooled = crate::vmm_host().pool_thread_ids();
    let was: HashMap<u32, u64> = before.iter().map(|t| (t.tid, t.cpu_ns)).collect();
    let mut out = HashMap::new();
    for t in after {
        let d = t
            .cpu_ns
            .saturating_sub(was.get(&t.tid).copied().unwrap_or(0));
        *out.entry(role(t, &pooled)).or_insert(Duration::ZERO) += Duration::from_nanos(d);
    }
    out
}

pub(crate) type Client = ControllerClient<Channel>;

/// A daemon's scratch directory on a tmpfs (as the daemon's default /run/sandboxer is on a
/// standard host; on this development machine /run is not one, so /dev/shm), and the guest
/// its sandboxes boot: the `virtio` test guest in agent mode, which stands in for the guest
/// agent. It ignores the initramfs, but the daemon needs one.
struct Scratch {
    dir: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    cmdline: String,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        test_guests::kvm_usable().map_err(anyhow::Error::msg)?;
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("sandboxer-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let initramfs = dir.join("initramfs.img");
        std::fs::write(&initramfs, b"not an initramfs: the test guest ignores it")?;
        Ok(Scratch {
            dir,
            kernel: Guest::Virtio.elf().to_path_buf(),
            initramfs,
            cmdline: test_guests::agent::cmdline(
                vmm::config::DEFAULT_CMDLINE,
                &[
                    test_guests::agent::QUIET,
                    test_guests::agent::EXIT_ON_SHUTDOWN,
                ],
            ),
        })
    }
}

/// `sandboxer serve` from a binary, in a process of its own: what a node runs (for the
/// shipped binary: static musl, its own allocator), measured from outside through `/proc`.
/// After a live upgrade the daemon is a process this one did not start
/// ([`handed_over`](Self::handed_over)); whichever process it is, it is killed on drop.
pub(crate) struct DaemonProcess {
    dir: PathBuf,
    child: Option<std::process::Child>,
    /// The daemon that took over by a live upgrade: not this process's child.
    successor: Option<nix::unistd::Pid>,
    /// The daemon's pid, as `/proc/<pid>` names it.
    pub(crate) pid: String,
    pub(crate) socket: PathBuf,
}

/// How long a daemon gets to exit (after SIGTERM, or after handing over).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether process `pid` still runs (a zombie does not: its parent may never reap it).
fn running(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Waits up to `timeout` for process `pid`, not a child of this one, to end.
fn wait_gone(pid: nix::unistd::Pid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while running(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl DaemonProcess {
    /// Starts `bin serve` with the options' guest size and seccomp policy, templates as
    /// `templates` says, and waits until it listens.
    pub(crate) fn spawn(
        o: &Options,
        bin: &std::path::Path,
        templates: bool,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(o, bin, templates, &[])
    }

    /// [`spawn`](Self::spawn), the guest's command line with `guest_words` added (e.g.
    /// `agent.counter_port=<port>`).
    pub(crate) fn spawn_with(
        o: &Options,
        bin: &std::path::Path,
        templates: bool,
        guest_words: &[&str],
    ) -> anyhow::Result<Self> {
        let mut scratch = Scratch::new()?;
        for w in guest_words {
            scratch.cmdline.push(' ');
            scratch.cmdline.push_str(w);
        }
        let dir = scratch.dir;
        let socket = dir.join("api.sock");
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let seccomp = match o.seccomp {
            vmm::SeccompPolicy::Enforce => "enforce",
            vmm::SeccompPolicy::Log => "log",
            vmm::SeccompPolicy::Off => "off",
        };
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--seed-socket=")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--image-dir")
            .arg(dir.join("images"))
            .arg("--kernel")
            .arg(&scratch.kernel)
            .arg("--initramfs")
            .arg(&scratch.initramfs)
            .arg("--cmdline")
            .arg(&scratch.cmdline)
            .arg("--mem-mib")
            .arg(o.mem_mib.to_string())
            .args(["--stop-timeout-secs", "1", "--seccomp", seccomp])
            .args(["--templates", if templates { "true" } else { "false" }])
            .args(["--log-level", "warn"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut daemon = DaemonProcess {
            pid: child.id().to_string(),
            child: Some(child),
            successor: None,
            dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Some(child) = daemon.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} serve exited with {status} before it listened: {}",
                    bin.display(),
                    daemon.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} serve never listened: {}",
                    bin.display(),
                    daemon.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }

    /// The daemon's state directory.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The last lines the daemon logged.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The daemon handed over to process `new_pid` by a live upgrade: from now on that one is
    /// the daemon (killed on drop from here on). Waits up to `timeout` for the old process to
    /// exit, as it does once it answered the upgrade, and checks that it exited cleanly where
    /// it can (when it is this process's child).
    pub(crate) fn handed_over(&mut self, new_pid: u32, timeout: Duration) -> anyhow::Result<()> {
        let old = self
            .successor
            .replace(nix::unistd::Pid::from_raw(i32::try_from(new_pid)?));
        let old_pid = std::mem::replace(&mut self.pid, new_pid.to_string());
        if let Some(child) = self.child.as_mut() {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    if !status.success() {
                        bail!(
                            "the old daemon (pid {old_pid}) exited with {status} after handing \
                             over: {}",
                            self.log_tail()
                        );
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    // Drop kills it.
                    bail!(
                        "the old daemon (pid {old_pid}) did not exit within {} s of handing over",
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(old) = old
            && !wait_gone(old, timeout)
        {
            let _ = nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGKILL);
            bail!(
                "the old daemon (pid {old_pid}) did not exit within {} s of handing over",
                timeout.as_secs()
            );
        }
        Ok(())
    }

    /// Stops the daemon with SIGTERM, as systemd does, and checks that it exited cleanly (for
    /// a daemon that took over by a live upgrade, which is not this process's child: that it
    /// exited).
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.successor.take() {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
            if !wait_gone(pid, EXIT_TIMEOUT) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                bail!("the daemon did not exit within 30 s of SIGTERM");
            }
            return Ok(());
        }
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("the daemon exited with {status}: {}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the daemon did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.successor.take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            wait_gone(pid, EXIT_TIMEOUT);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The daemon under test, on its own runtime.
pub(crate) struct Daemon {
    dir: PathBuf,
    runtime: tokio::runtime::Runtime,
    /// The VM templates, when the daemon starts sandboxes from them.
    pub(crate) templates: Option<std::sync::Arc<Templates>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub(crate) socket: PathBuf,
    pool_depth: usize,
    mem_mib: u32,
}

impl Daemon {
    /// The daemon with templates as `--templates` says.
    fn start(o: &Options) -> anyhow::Result<Self> {
        Self::start_with(o, o.templates)
    }

    /// The daemon, starting sandboxes from VM templates when `templates` is set (and then only
    /// once the default shape's template is ready).
    pub(crate) fn start_with(o: &Options, templates: bool) -> anyhow::Result<Self> {
        let scratch = Scratch::new()?;
        let dir = scratch.dir.clone();
        let mut config = controller::config::Config {
            state_dir: dir.join("state"),
            stop_timeout_secs: 1,
            ..controller::config::Config::default()
        };
        config.api.socket = dir.join("api.sock");
        config.api.seed_socket = "".into();
        config.vm.kernel = scratch.kernel;
        config.vm.cmdline = scratch.cmdline;
        config.vm.initramfs = scratch.initramfs;
        config.vm.mem_mib = o.mem_mib;
        config.vm.seccomp = match o.seccomp {
            vmm::SeccompPolicy::Enforce => controller::config::Seccomp::Enforce,
            vmm::SeccompPolicy::Log => controller::config::Seccomp::Log,
            vmm::SeccompPolicy::Off => controller::config::Seccomp::Off,
        };
        let pool_depth = usize::try_from(config.vm.pool_depth)?;

        let runtime = controller::server::runtime("bench-daemon")?;
        // The daemon keeps a pool for its default VM size, as `sandboxer serve` does.
        vmm_host().set_pool_target(o.mem_mib, pool_depth)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run_config = config.clone();
        let templates = templates.then(|| {
            Templates::new(
                vmm_host().clone(),
                2,
                o.template_pool,
                Duration::from_secs(30),
                None,
            )
        });
        let mut backend = controller::KvmBackend::new(vmm_host().clone());
        if let Some(t) = &templates {
            backend = backend.with_templates(std::sync::Arc::clone(t));
        }
        let handle = runtime.spawn(async move {
            controller::server::run(&run_config, backend, async {
                let _ = stop_rx.await;
            })
            .await
            .map_err(anyhow::Error::from)
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&config.api.socket).is_err() {
            if Instant::now() > deadline {
                bail!("the daemon never listened");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(t) = &templates {
            // The daemon builds the default shape's template at start.
            if !runtime.block_on(t.settle(Duration::from_secs(60))) || t.ready() == 0 {
                bail!(
                    "the default shape's VM template did not come up: {:?}",
                    t.stats()
                );
            }
            vmm_host().wait_pool_full(Duration::from_secs(30));
        }
        Ok(Daemon {
            dir,
            runtime,
            templates,
            stop: Some(stop_tx),
            handle: Some(handle),
            socket: config.api.socket,
            pool_depth,
            mem_mib: o.mem_mib,
        })
    }

    /// The daemon's state directory.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Stops the daemon and waits for it.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            self.runtime.block_on(handle)??;
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = vmm_host().set_pool_target(self.mem_mib, 0);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One Create+Start: wall time Create sent -> Start returned, the daemon's phases, and the
/// CPU time per role over the same window.
pub(crate) struct Started {
    pub(crate) took: Duration,
    pub(crate) phases: Vec<Duration>,
    pub(crate) cpu: HashMap<Role, Duration>,
}

impl Started {
    /// Whether the sandbox's VM was cloned from a template (it waited for no ready line).
    pub(crate) fn cloned(&self) -> bool {
        cloned(&self.phases)
    }

    /// How long the VM took to build, boot or clone (`vm` phase).
    pub(crate) fn vm(&self) -> Duration {
        self.phases.first().copied().unwrap_or_default()
    }
}

/// Whether a Start with these phases cloned a template (it waited for no ready line).
pub(crate) fn cloned(phases: &[Duration]) -> bool {
    PHASES
        .iter()
        .zip(phases)
        .any(|((name, _), d)| *name == "agent_ready" && d.is_zero())
}

pub(crate) async fn create_start(client: &mut Client, id: &str) -> anyhow::Result<Started> {
    create_start_with(client, id, Default::default()).await
}

/// Create (with `annotations`) and Start, with the daemon's phases and the CPU time per role
/// over the same window.
pub(crate) async fn create_start_with(
    client: &mut Client,
    id: &str,
    annotations: HashMap<String, String>,
) -> anyhow::Result<Started> {
    let before = procstat::threads_cpu();
    let took = create_and_start(client, id, annotations).await?;
    let cpu = cpu_by_role(&before, &procstat::threads_cpu());
    let phases = start_phases(client, id).await?;
    Ok(Started { took, phases, cpu })
}

/// Create (with `annotations`) and Start, and nothing else: the wall time from Create sent to
/// Start returned.
pub(crate) async fn create_and_start(
    client: &mut Client,
    id: &str,
    annotations: HashMap<String, String>,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    client
        .create(ControllerCreateRequest {
            sandbox_id: id.into(),
            sandboxer: "sandboxer".into(),
            annotations,
            ..Default::default()
        })
        .await
        .with_context(|| format!("Create {id}"))?;
    client
        .start(ControllerStartRequest {
            sandbox_id: id.into(),
            sandboxer: "sandboxer".into(),
        })
        .await
        .with_context(|| format!("Start {id}"))?;
    Ok(t0.elapsed())
}

/// The phases of a started sandbox's Start, as its Status reports them ([`PHASES`] order).
pub(crate) async fn start_phases(client: &mut Client, id: &str) -> anyhow::Result<Vec<Duration>> {
    let info = client
        .status(ControllerStatusRequest {
            sandbox_id: id.into(),
            verbose: false,
            sandboxer: "sandboxer".into(),
        })
        .await
        .with_context(|| format!("Status {id}"))?
        .into_inner()
        .info;
    PHASES
        .iter()
        .map(|(name, _)| {
            let key = format!("start_{name}_us");
            info.get(&key)
                .and_then(|v| v.parse().ok())
                .map(Duration::from_micros)
                .with_context(|| format!("Status has no {key}"))
        })
        .collect()
}

pub(crate) async fn remove(client: &mut Client, id: &str) -> anyhow::Result<()> {
    client
        .stop(ControllerStopRequest {
            sandbox_id: id.into(),
            timeout_secs: 1,
            sandboxer: "sandboxer".into(),
        })
        .await
        .with_context(|| format!("Stop {id}"))?;
    client
        .shutdown(ControllerShutdownRequest {
            sandbox_id: id.into(),
            sandboxer: "sandboxer".into(),
        })
        .await
        .with_context(|| format!("Shutdown {id}"))?;
    Ok(())
}

/// CPU time the pool's refill thread has used so far.
fn pool_thread_cpu() -> u64 {
    procstat::threads_cpu()
        .iter()
        .filter(|t| t.name == "vm-shell-pool")
        .map(|t| t.cpu_ns)
        .sum()
}

pub(crate) fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Create+Start through the daemon's gRPC API; the host's CPU time during Start; RSS per
/// running sandbox.
pub(crate) fn sandbox_start(o: &Options) -> anyhow::Result<()> {
    let alive = o.alive_one(100)?;
    let daemon = Daemon::start(o)?;
    let rt = client_runtime()?;
    let mut client = rt.block_on(controller::client::v2_client(&daemon.socket))?;

    // Warm-up.
    for i in 0..3 {
        let id = format!("warm-{i}");
        rt.block_on(create_start(&mut client, &id))?;
        rt.block_on(remove(&mut client, &id))?;
    }
    vmm_host().wait_all_torn_down(Duration::from_secs(30));

    // One sandbox at a time, the pool refilled in between: a steady stream of pod starts.
    let mut samples = Vec::with_capacity(o.iterations);
    let mut phases = vec![Vec::with_capacity(o.iterations); PHASES.len()];
    let mut outside_guest_phases = Vec::with_capacity(o.iterations);
    let mut cpu: HashMap<Role, Vec<Duration>> = HashMap::new();
    let mut pooled = 0usize;
    for i in 0..o.iterations {
        if !vmm_host().wait_pool_full(Duration::from_secs(10)) {
            bail!("sample {i}: the shell pool did not refill within 10 s");
        }
        let refills_before = pool_thread_cpu();
        let id = format!("bench-{i}");
        let s = rt.block_on(create_start(&mut client, &id))?;
        samples.push(s.took);
        let guest: Duration = PHASES
            .iter()
            .zip(&s.phases)
            .filter(|((_, in_guest), _)| *in_guest)
            .map(|(_, d)| *d)
            .sum();
        outside_guest_phases.push(s.took.saturating_sub(guest));
        for (all, d) in phases.iter_mut().zip(s.phases) {
            all.push(d);
        }
        for (r, _) in ROLES {
            cpu.entry(r)
                .or_default()
                .push(s.cpu.get(&r).copied().unwrap_or_default());
        }
        rt.block_on(remove(&mut client, &id))?;
        vmm_host().wait_all_torn_down(Duration::from_secs(30));
        // The pool thread builds a shell only after one was taken: work there means this
        // Start got a pre-built one.
        if !vmm_host().wait_pool_full(Duration::from_secs(10)) {
            bail!("sample {i}: the shell pool did not refill within 10 s after Start");
        }
        if pool_thread_cpu() > refills_before {
            pooled += 1;
        }
    }

    // RSS per running sandbox, 1 and N alive.
    let mut per_sandbox = Vec::new();
    for count in [1, alive] {
        vmm_host().wait_all_torn_down(Duration::from_secs(30));
        vmm_host().wait_pool_full(Duration::from_secs(10));
        let before = procstat::rss_kib();
        for i in 0..count {
            rt.block_on(create_start(&mut client, &format!("alive-{count}-{i}")))?;
        }
        // Every guest is up (Start returned after its agent's Setup) and waits in hlt.
        std::thread::sleep(Duration::from_millis(200));
        let after = procstat::rss_kib();
        per_sandbox.push((i64::try_from(after)? - i64::try_from(before)?) as f64 / count as f64);
        for i in 0..count {
            rt.block_on(remove(&mut client, &format!("alive-{count}-{i}")))?;
        }
    }
    vmm_host().wait_all_torn_down(Duration::from_secs(30));
    drop(client);
    let pool_depth = daemon.pool_depth;
    daemon.stop()?;

    let s = Summary::of(&samples);
    let bound = Summary::of(&outside_guest_phases);
    let phase_summaries: Vec<Summary> = phases.iter().map(|p| Summary::of(p)).collect();
    println!(
        "sandbox-start: {} Create+Start calls over gRPC (containerd 2.x API), test guest \
         \"virtio\" in agent mode (Start includes READY, Setup), {} MiB, pool depth \
         {pool_depth} (refilled before every Start; {pooled} of {} Starts took a pre-built \
         shell), seccomp {}",
        o.iterations,
        o.mem_mib,
        o.iterations,
        o.seccomp.name()
    );
    println!("{:<48} {:>10} {:>10}", "wall time", "p50 ms", "p99 ms");
    println!(
        "{:<48} {:>10.3} {:>10.3}",
        "Create sent -> Start returned", s.p50_ms, s.p99_ms
    );
    for ((name, in_guest), p) in PHASES.iter().zip(&phase_summaries) {
        let label = format!(
            "  phase {name}{}",
            if *in_guest {
                " (waits on the guest)"
            } else {
                ""
            }
        );
        println!("{label:<48} {:>10.3} {:>10.3}", p.p50_ms, p.p99_ms);
    }
    println!(
        "{:<48} {:>10.3} {:>10.3}",
        "  outside guest-wait phases (a LOWER BOUND)", bound.p50_ms, bound.p99_ms
    );
    println!(
        "{:<48} {:>10} {:>10}",
        "CPU time during Create+Start, by thread", "p50 ms", "p99 ms"
    );
    let mut cpu_json = serde_json::Map::new();
    for (r, label) in ROLES {
        let v = Summary::of(cpu.get(&r).map_or(&[][..], Vec::as_slice));
        println!("  {label:<46} {:>10.3} {:>10.3}", v.p50_ms, v.p99_ms);
        cpu_json.insert(
            format!("{r:?}").to_lowercase(),
            json!({"p50_ms": v.p50_ms, "p99_ms": v.p99_ms}),
        );
    }
    let host = Summary::of(cpu.get(&Role::Host).map_or(&[][..], Vec::as_slice));
    println!(
        "process RSS growth per running sandbox: {:.1} KiB with 1 alive, {:.1} KiB with {alive} \
         alive (includes guest pages the guest touched)",
        per_sandbox.first().copied().unwrap_or_default(),
        per_sandbox.get(1).copied().unwrap_or_default(),
    );
    let out = json!({
        "scenario": "sandbox-start",
        "iterations": o.iterations,
        "mem_mib": o.mem_mib,
        "pool_depth": pool_depth,
        "pooled_starts": pooled,
        "seccomp": o.seccomp.name(),
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "host_cpu_p50_ms": host.p50_ms,
        "host_cpu_p99_ms": host.p99_ms,
        "cpu": cpu_json,
        "outside_guest_phases_lower_bound_p50_ms": bound.p50_ms,
        "outside_guest_phases_lower_bound_p99_ms": bound.p99_ms,
        "phases": PHASES
            .iter()
            .zip(&phase_summaries)
            .map(|((name, _), p)| ((*name).to_string(), json!({"p50_ms": p.p50_ms, "p99_ms": p.p99_ms})))
            .collect::<serde_json::Map<_, _>>(),
        "rss_kib_per_sandbox": per_sandbox.get(1),
        "rss_kib_per_sandbox_1": per_sandbox.first(),
        "alive": alive,
    });
    println!("{out}");
    Ok(())
}

/// What a density level reached.
struct Level {
    alive: usize,
    start: Summary,
    fds_per_sandbox: f64,
    threads_per_sandbox: f64,
    rss_kib_per_sandbox: f64,
    rss_anon_kib_per_sandbox: f64,
    /// Every thread but the benchmark's own client thread (which reads /proc to measure).
    idle_cpu_pct_per_sandbox: f64,
    /// The whole process (`getrusage`), the client thread included.
    idle_cpu_pct_process_per_sandbox: f64,
    idle_cpu_pct_by_role: Vec<(Role, f64)>,
    pool_misses: usize,
    /// fds per sandbox by kind ([`procstat::fd_kinds`]), over the baseline.
    fds_by_kind: Vec<(String, f64)>,
    /// Threads per sandbox by name ([`procstat::thread_kinds`]), over the baseline.
    threads_by_name: Vec<(String, f64)>,
}

/// `now` minus `base`, per sandbox of `n`, for every key that changed.
fn per_kind(
    now: &std::collections::BTreeMap<String, usize>,
    base: &std::collections::BTreeMap<String, usize>,
    n: usize,
) -> Vec<(String, f64)> {
    let mut keys: Vec<&String> = now.keys().chain(base.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out: Vec<(String, f64)> = keys
        .into_iter()
        .map(|k| {
            let get = |m: &std::collections::BTreeMap<String, usize>| {
                m.get(k).copied().unwrap_or(0) as u64
            };
            (k.clone(), per(get(now), get(base), n))
        })
        .filter(|(_, v)| *v != 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// `kind 1.00, kind 2.00`.
fn kinds_line(kinds: &[(String, f64)]) -> String {
    kinds
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The process's counts: (fds, threads, RSS KiB, anonymous RSS KiB).
fn counts() -> (usize, usize, u64, u64) {
    (
        procstat::fd_count(),
        procstat::thread_count(),
        procstat::rss_kib(),
        procstat::rss_anon_kib(),
    )
}

fn per(after: u64, before: u64, n: usize) -> f64 {
    (after as f64 - before as f64) / n as f64
}

/// Sandboxes started through the daemon up to each `--alive` level, then idle.
pub(crate) fn density(o: &Options) -> anyhow::Result<()> {
    let mut levels = if o.alive.is_empty() {
        vec![10, 100, 1000]
    } else {
        o.alive.clone()
    };
    levels.sort_unstable();
    levels.dedup();
    let limits = NOFILE
        .get()
        .context("RLIMIT_NOFILE could not be read or raised")?;
    let (soft_was, hard_was, soft, hard) =
        (limits.soft_was, limits.hard_was, limits.soft, limits.hard);
    let daemon = Daemon::start(o)?;
    let rt = client_runtime()?;
    let mut client = rt.block_on(controller::client::v2_client(&daemon.socket))?;
    for i in 0..3 {
        let id = format!("warm-{i}");
        rt.block_on(create_start(&mut client, &id))?;
        rt.block_on(remove(&mut client, &id))?;
    }
    vmm_host().wait_all_torn_down(Duration::from_secs(30));
    vmm_host().wait_pool_full(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let base = counts();
    let (base_fds, base_threads) = (procstat::fd_kinds(), procstat::thread_kinds());

    println!(
        "density: sandboxes started one after another through the daemon (gRPC, containerd 2.x \
         API), test guest \"virtio\" in agent mode, {} MiB each, seccomp {}; per level: Start \
         (Create sent -> Start returned) while filling up to it, then counts per sandbox over \
         the daemon's baseline, and CPU over {} s of idle; RLIMIT_NOFILE soft {soft} (was \
         {soft_was}), hard {hard} (was {hard_was}), raised as the daemon raises it",
        o.mem_mib,
        o.seccomp.name(),
        o.idle_secs
    );
    println!(
        "{:>6} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "alive",
        "start p50",
        "start p99",
        "fds/sbx",
        "thr/sbx",
        "RSS KiB",
        "anon KiB",
        "idle %core"
    );
    let mut ids: Vec<String> = Vec::new();
    let mut done: Vec<Level> = Vec::new();
    let mut failure: Option<(usize, usize, String)> = None;
    'levels: for &level in &levels {
        let mut starts = Vec::new();
        let mut pool_misses = 0usize;
        while ids.len() < level {
            if !vmm_host().wait_pool_full(Duration::from_secs(10)) {
                pool_misses += 1;
            }
            let id = format!("d-{}", ids.len());
            match rt.block_on(create_start(&mut client, &id)) {
                Ok(s) => {
                    starts.push(s.took);
                    ids.push(id);
                }
                Err(e) => {
                    // The sandbox may exist (Create worked, Start failed): remove it too.
                    let _ = rt.block_on(remove(&mut client, &id));
                    failure = Some((level, ids.len(), format!("{e:#}")));
                    break 'levels;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        let now = counts();
        let n = ids.len();
        let fds_by_kind = per_kind(&procstat::fd_kinds(), &base_fds, n);
        let threads_by_name = per_kind(&procstat::thread_kinds(), &base_threads, n);
        let t0 = procstat::threads_cpu();
        let c0 = procstat::process_cpu_ns();
        let w0 = Instant::now();
        std::thread::sleep(Duration::from_secs(o.idle_secs));
        let c1 = procstat::process_cpu_ns();
        let window = w0.elapsed().as_secs_f64();
        let by_role = cpu_by_role(&t0, &procstat::threads_cpu());
        let pct = |ns: f64| ns / 1e9 / window * 100.0 / n as f64;
        let not_client: f64 = by_role
            .iter()
            .filter(|(r, _)| **r != Role::Client)
            .map(|(_, d)| d.as_nanos() as f64)
            .sum();
        let l = Level {
            alive: n,
            start: Summary::of(&starts),
            fds_per_sandbox: per(now.0 as u64, base.0 as u64, n),
            threads_per_sandbox: per(now.1 as u64, base.1 as u64, n),
            rss_kib_per_sandbox: per(now.2, base.2, n),
            rss_anon_kib_per_sandbox: per(now.3, base.3, n),
            idle_cpu_pct_per_sandbox: pct(not_client),
            idle_cpu_pct_process_per_sandbox: pct(c1.saturating_sub(c0) as f64),
            idle_cpu_pct_by_role: ROLES
                .iter()
                .map(|(r, _)| (*r, pct(by_role.get(r).map_or(0.0, |d| d.as_nanos() as f64))))
                .collect(),
            pool_misses,
            fds_by_kind,
            threads_by_name,
        };
        println!(
            "{:>6} {:>10.3} {:>10.3} {:>8.1} {:>8.2} {:>10.1} {:>10.1} {:>12.4}",
            l.alive,
            l.start.p50_ms,
            l.start.p99_ms,
            l.fds_per_sandbox,
            l.threads_per_sandbox,
            l.rss_kib_per_sandbox,
            l.rss_anon_kib_per_sandbox,
            l.idle_cpu_pct_per_sandbox
        );
        done.push(l);
    }
    if let Some((level, reached, why)) = &failure {
        println!("level {level} FAILED after {reached} sandboxes alive: {why}");
    }
    if let Some(l) = done.last() {
        let parts: Vec<String> = ROLES
            .iter()
            .zip(&l.idle_cpu_pct_by_role)
            .map(|((_, label), (_, p))| format!("{label} {p:.4}"))
            .collect();
        println!(
            "idle CPU per sandbox at {} alive, % of a core, by thread: {} (the table's figure is \
             every thread but the client's; the whole process, client included: {:.4})",
            l.alive,
            parts.join("; "),
            l.idle_cpu_pct_process_per_sandbox
        );
        println!(
            "fds per sandbox at {} alive, by kind: {}",
            l.alive,
            kinds_line(&l.fds_by_kind)
        );
        println!(
            "threads per sandbox at {} alive, by name: {}",
            l.alive,
            kinds_line(&l.threads_by_name)
        );
        if l.pool_misses > 0 {
            println!(
                "{} Starts at the last level found the pool not refilled within 10 s (cold \
                 builds)",
                l.pool_misses
            );
        }
    }

    // Tear everything down, then stop the daemon.
    for id in &ids {
        rt.block_on(remove(&mut client, id))?;
    }
    vmm_host().wait_all_torn_down(Duration::from_secs(120));
    drop(client);
    daemon.stop()?;

    let last = done.last();
    let level_json: Vec<serde_json::Value> = done
        .iter()
        .map(|l| {
            json!({
                "alive": l.alive,
                "start_p50_ms": l.start.p50_ms,
                "start_p99_ms": l.start.p99_ms,
                "fds_per_sandbox": l.fds_per_sandbox,
                "threads_per_sandbox": l.threads_per_sandbox,
                "rss_kib_per_sandbox": l.rss_kib_per_sandbox,
                "rss_anon_kib_per_sandbox": l.rss_anon_kib_per_sandbox,
                "idle_cpu_pct_per_sandbox": l.idle_cpu_pct_per_sandbox,
                "idle_cpu_pct_process_per_sandbox": l.idle_cpu_pct_process_per_sandbox,
                "idle_cpu_pct_per_sandbox_by_thread": l.idle_cpu_pct_by_role.iter()
                    .map(|(r, p)| (format!("{r:?}").to_lowercase(), json!(p)))
                    .collect::<serde_json::Map<_, _>>(),
                "pool_misses": l.pool_misses,
                "fds_per_sandbox_by_kind": l.fds_by_kind.iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
                "threads_per_sandbox_by_name": l.threads_by_name.iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let out = json!({
        "scenario": "density",
        "levels_asked": levels,
        "mem_mib": o.mem_mib,
        "seccomp": o.seccomp.name(),
        "idle_secs": o.idle_secs,
        "nofile_soft": soft,
        "nofile_hard": hard,
        "nofile_soft_was": soft_was,
        "nofile_hard_was": hard_was,
        "alive_max": last.map_or(0, |l| l.alive),
        "fds_per_sandbox": last.map(|l| l.fds_per_sandbox),
        "threads_per_sandbox": last.map(|l| l.threads_per_sandbox),
        "idle_cpu_pct_per_sandbox": last.map(|l| l.idle_cpu_pct_per_sandbox),
        "rss_kib_per_sandbox": last.map(|l| l.rss_kib_per_sandbox),
        "start_p50_ms_at_max": last.map(|l| l.start.p50_ms),
        "levels": level_json,
        "failed": failure.as_ref().map(|(level, reached, why)| json!({
            "level": level, "alive_when_it_failed": reached, "error": why,
        })),
    });
    println!("{out}");
    Ok(())
}
