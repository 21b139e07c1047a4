// SPDX-License-Identifier: Apache-2.0
//! Daemon configuration: a TOML file (every setting has a default) and CLI flags that override it.
//!
//! ```toml
//! state_dir = "/run/sandboxer"
//! log_level = "info"          # or a tracing filter, e.g. "info,controller=debug"
//! on_exit = "stop"            # SIGTERM: "stop" every sandbox, or "leave" them as recorded
//! stop_timeout_secs = 10      # grace period per sandbox when on_exit = "stop"
//! image_dir = ""              # container rootfs images; "" = <state_dir>/images (put it on disk)
//! containerd_address = "/run/containerd/containerd.sock"  # OOM events go to <it>.ttrpc; "" = off
//!
//! [api]
//! socket = "/run/sandboxer/sandboxer.sock"            # containerd 2.x / iSulad >= 2.1.6
//! seed_socket = "/run/sandboxer/sandboxer-seed.sock"  # seed API; "" disables it
//!
//! [vm]
//! kernel = ""                  # "" = the one embedded in this binary
//! initramfs = ""               # "" = the one embedded in this binary
//! cmdline = "console=ttyS0 reboot=t panic=-1 nomodule"
//! vcpus = 1                    # at least this many; more if the pod's CPU limit needs it
//! max_vcpus = 16
//! mem_mib = 256                # guest base memory; the pod's memory limit is added to it
//! blk_slots = 8
//! pool_depth = 1               # VM shells kept pre-built for mem_mib-sized sandboxes
//! agent_ready_timeout_ms = 10000  # Start fails if the guest agent is not ready by then
//! console_log_max_kib = 1024   # <state_dir>/sbs/<id>/console.log starts again past this (min 64)
//! seccomp = "enforce"          # vCPU and VMM threads: "enforce", "log" (allow, kernel logs) or "off"
//!
//! [template]
//! enabled = true               # Start clones a booted VM of the same shape instead of booting
//! max_templates = 4            # shapes kept (least recently used dropped)
//! build_timeout_ms = 30000     # a template whose agent is not ready by then is given up
//! pool_depth = 2               # VM shells kept pre-built per template (0: none)
//!
//! [metrics]
//! listen = ""                  # e.g. "127.0.0.1:9464": Prometheus text at /metrics; "" = off
//!
//! [limits]                     # 0: no limit
//! max_sandboxes = 0            # sandboxes created and not shut down
//! max_total_mem_mib = 0        # guest memory of all sandboxes together
//! max_sandbox_mem_mib = 0      # guest memory of one sandbox (base + the pod's limit)
//! max_sandbox_vcpus = 0        # vCPUs of one sandbox (also the CPUs of the pod's CPU limit)
//!
//! [cgroup]                     # a CPU cgroup per sandbox for its VM's vCPU and VMM threads
//! # enabled = true             # unset: on when a usable cpu controller exists; true: required
//! parent = "sandboxer"         # cgroup v1: <cpu mount>/<parent>/<id> (see below)
//!
//! [task]
//! # Directories whose files a container's Create and Exec may name (rootfs sources, bundle,
//! # stdio); the state and image dirs are always allowed. Default: containerd's and iSulad's.
//! host_paths = ["/var/lib/containerd", "/run/containerd", "/var/lib/isulad", "/run/isulad", "/var/run/isulad"]
//! ```
//!
//! `[cgroup]`: each sandbox's vCPU and VMM threads move into a cgroup of their own right
//! after its VM starts, with the pod's CPU limit (`cpu_quota` / `cpu_period`, `cpu_shares`) as
//! its bandwidth and weight ([`crate::cgroup`]). On cgroup v1 that is `<cpu mount>/<parent>/<id>`,
//! or `<cpu mount>/<pod's cgroup_parent>/<id>` when the pod names a parent (it must exist). On
//! cgroup v2 `parent` is not used: the threads of one process can only be split inside a
//! threaded subtree of its own cgroup, so the daemon's cgroup becomes the threaded root and the
//! sandboxes go to `<own cgroup>/sandboxer-sandboxes/<id>` (`cpu.max`, `cpu.weight`). Memory is
//! not charged per sandbox (the memory controller is not threaded): `[limits]` bounds it.
//!
//! An empty `kernel` or `initramfs` means the guest kernel or agent initramfs embedded in the
//! binary (`tools/devtool dist` builds one with both, see [`crate::embedded`]); a binary built
//! without one refuses Start with a configuration error that names the setting.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// The embedded artefacts a [`Config`] uses (see [`Config::use_embedded`]): each with the memfd
/// it was unpacked to, which must outlive every VM booted from it.
#[derive(Debug, Default)]
pub struct EmbeddedFiles {
    /// The guest kernel, if `vm.kernel` was empty and the binary has one.
    pub kernel: Option<(crate::embedded::Artifact, crate::embedded::Unpacked)>,
    /// The agent initramfs, if `vm.initramfs` was empty and the binary has one.
    pub initramfs: Option<(crate::embedded::Artifact, crate::embedded::Unpacked)>,
}

/// Default of `api.socket`: the containerd 2.x Sandbox API.
pub const DEFAULT_API_SOCKET: &str = "/run/sandboxer/sandboxer.sock";

/// Where the config file is read from when `--config` is not given (a missing file is fine).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sandboxer/config.toml";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the config file failed.
    #[error("Failed to read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The config file is not valid.
    #[error("Invalid config file {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    /// A setting is out of range.
    #[error("Invalid setting {0}: {1}")]
    Invalid(&'static str, String),
}

/// What SIGTERM/SIGINT does to running sandboxes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Stop every running sandbox (grace period `stop_timeout_secs`) and record its exit.
    #[default]
    Stop,
    /// Exit at once; the VMs end with the process and are reported as failed after a restart.
    Leave,
}

/// How each VM's vCPU and VMM threads are confined (`vmm::seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// System calls outside a thread's list fail with EPERM.
    #[default]
    Enforce,
    /// System calls outside the list run, and the kernel logs each one (for finding gaps).
    Log,
    /// No filter.
    Off,
}

impl From<Seccomp> for vmm::SeccompPolicy {
    fn from(s: Seccomp) -> Self {
        match s {
            Seccomp::Enforce => vmm::SeccompPolicy::Enforce,
            Seccomp::Log => vmm::SeccompPolicy::Log,
            Seccomp::Off => vmm::SeccompPolicy::Off,
        }
    }
}

/// The sockets the Sandbox APIs are served on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// containerd 2.x sandbox API socket.
    pub socket: PathBuf,
    /// Seed (iSulad <= 2.1.5, Kuasar < 1.0) sandbox API socket; empty disables it.
    pub seed_socket: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: DEFAULT_API_SOCKET.into(),
            seed_socket: "/run/sandboxer/sandboxer-seed.sock".into(),
        }
    }
}

/// How sandbox VMs are built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmDefaults {
    /// Guest kernel; empty for the embedded one.
    pub kernel: PathBuf,
    /// Agent initramfs; empty for the embedded one.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Minimum (and default) vCPUs per sandbox.
    pub vcpus: u8,
    /// Upper bound for vCPUs derived from a pod's CPU limit.
    pub max_vcpus: u8,
    /// Guest base memory in MiB; a pod's memory limit is added to it.
    pub mem_mib: u32,
    /// Empty block slots per VM for container root filesystems.
    pub blk_slots: u32,
    /// VM shells (VM + memory + irqchip) kept pre-built for sandboxes of `mem_mib`, so their
    /// Start skips KVM's slowest setup steps (`vmm::pool`); 0 turns the pool off.
    pub pool_depth: u32,
    /// How long Start waits for the guest agent's ready signal.
    pub agent_ready_timeout_ms: u64,
    /// Seccomp filters of the VMs' vCPU and VMM threads.
    pub seccomp: Seccomp,
    /// KiB a sandbox's console log may hold; past them it starts again with the newest
    /// output. The state dir is usually tmpfs, so this bounds what a guest can take of it.
    pub console_log_max_kib: u64,
}

/// Default of [`VmDefaults::console_log_max_kib`].
pub const DEFAULT_CONSOLE_LOG_MAX_KIB: u64 = 1024;
/// Smallest [`VmDefaults::console_log_max_kib`] accepted.
pub const MIN_CONSOLE_LOG_MAX_KIB: u64 = 64;

/// Default of [`VmDefaults::agent_ready_timeout_ms`].
pub const DEFAULT_AGENT_READY_TIMEOUT_MS: u64 = 10_000;

impl Default for VmDefaults {
    fn default() -> Self {
        VmDefaults {
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            cmdline: vmm::config::DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            max_vcpus: 16,
            mem_mib: 256,
            blk_slots: 8,
            pool_depth: 1,
            agent_ready_timeout_ms: DEFAULT_AGENT_READY_TIMEOUT_MS,
            console_log_max_kib: DEFAULT_CONSOLE_LOG_MAX_KIB,
            seccomp: Seccomp::Enforce,
        }
    }
}

/// VM templates: Start of a sandbox clones an agent-ready VM of its shape (kernel,
/// initramfs, command line, vCPUs, memory, device layout) instead of booting one. Clones share
/// the template's memory pages until they write them: see docs/templates.md for the trade-off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateConfig {
    /// Whether sandboxes start from templates (a pod can still opt out with the annotation
    /// `io.sandboxer.template: "false"`).
    pub enabled: bool,
    /// Most templates kept at once; the least recently used is dropped for a new shape.
    pub max_templates: u32,
    /// How long a template's guest may take to report its agent ready.
    pub build_timeout_ms: u64,
    /// Shells (VM, copy-on-write memory, irqchip, vCPUs) kept pre-built per template, so a
    /// clone only writes the saved state; 0 builds each clone's shell on the spot.
    pub pool_depth: u32,
}

impl Default for TemplateConfig {
    fn default() -> Self {
        TemplateConfig {
            enabled: true,
            max_templates: 4,
            build_timeout_ms: 30_000,
            pool_depth: 2,
        }
    }
}

/// The whole daemon configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Sandbox records, per-sandbox sockets and files live under `<state_dir>/sbs/<id>/`.
    pub state_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it.
    pub log_level: String,
    /// What SIGTERM/SIGINT does to running sandboxes.
    pub on_exit: OnExit,
    /// Grace period for each sandbox when stopping on exit.
    pub stop_timeout_secs: u32,
    /// Where container root filesystem images (erofs from overlay snapshots) are built; empty
    /// means `<state_dir>/images`.
    pub image_dir: PathBuf,
    /// containerd's socket: OOM events are forwarded to `<it>.ttrpc`; empty turns that off.
    pub containerd_address: PathBuf,
    /// API sockets.
    pub api: ApiConfig,
    /// VM defaults.
    pub vm: VmDefaults,
    /// VM templates.
    pub template: TemplateConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The Task API.
    pub task: TaskConfig,
    /// Node-wide budget of sandboxes and guest memory.
    pub limits: LimitsConfig,
    /// Per-sandbox CPU cgroups.
    pub cgroup: CgroupConfig,
}

/// Default of `cgroup.parent`.
pub const DEFAULT_CGROUP_PARENT: &str = "sandboxer";

/// Per-sandbox CPU cgroups ([`crate::cgroup`]): where the VMs' threads go and whether they must.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    /// `None` (unset): on when a usable cpu controller exists, else the daemon logs it once
    /// and runs without; `true`: the daemon does not start without one; `false`: off.
    pub enabled: Option<bool>,
    /// cgroup v1: the sandboxes' cgroups are `<cpu mount>/<parent>/<id>` (a relative path).
    /// Not used on cgroup v2 (the layout is fixed there, see [`crate::cgroup`]). Also where
    /// the sandboxes' memory cgroups go (`charge_memory`), on either version.
    pub parent: PathBuf,
    /// Charge each sandbox's guest memory to a memory cgroup of its own
    /// (`<memory root>/<parent or the pod's cgroup_parent>/<id>`, [`crate::memcg`]): Start
    /// allocates the guest's memory whole, in that cgroup, and such sandboxes never start from
    /// a template. Off: guest memory is charged to the daemon's cgroup, as the guests touch it.
    pub charge_memory: bool,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            enabled: None,
            parent: DEFAULT_CGROUP_PARENT.into(),
            charge_memory: false,
        }
    }
}

/// What the node gives all sandboxes together, and one at most; 0 is no limit. Create refuses
/// a sandbox beyond them (`RESOURCE_EXHAUSTED` for the node's budget, `INVALID_ARGUMENT` for one
/// sandbox's size), naming the limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sandboxes known at once (created and not yet shut down).
    pub max_sandboxes: u32,
    /// Guest memory of all sandboxes together, in MiB (guest memory is populated as the guests
    /// touch it: a budget over the host's RAM is overcommitment).
    pub max_total_mem_mib: u64,
    /// Guest memory of one sandbox, in MiB (the VM's base memory plus the pod's limit).
    pub max_sandbox_mem_mib: u32,
    /// vCPUs of one sandbox; also the most CPUs a pod's CPU limit (quota / period, rounded up)
    /// may ask for, at Create and at Update.
    pub max_sandbox_vcpus: u32,
}

/// Where containerd and iSulad keep what a container's Create names: snapshots and content
/// (`/var/lib/...`), bundles and stdio FIFOs (`/run/...`). The default of `[task] host_paths`.
pub const DEFAULT_TASK_HOST_PATHS: [&str; 5] = [
    "/var/lib/containerd",
    "/run/containerd",
    "/var/lib/isulad",
    "/run/isulad",
    "/var/run/isulad",
];

/// The Task API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// The directories whose files a container's Create and Exec may name (rootfs sources,
    /// bundle, stdio): where the engines keep snapshots, bundles and FIFOs. The daemon's
    /// state and image directories are always allowed (the Task API's `paths` module).
    pub host_paths: Vec<PathBuf>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            host_paths: DEFAULT_TASK_HOST_PATHS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// The Prometheus endpoint ([`crate::metrics`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `HOST:PORT` to serve `GET /metrics` on; empty (the default) serves nothing.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to serve on, if any (checked by [`Config::validate`]).
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: "/run/sandboxer".into(),
            log_level: "info".into(),
            on_exit: OnExit::Stop,
            stop_timeout_secs: 10,
            image_dir: PathBuf::new(),
            containerd_address: "/run/containerd/containerd.sock".into(),
            api: ApiConfig::default(),
            vm: VmDefaults::default(),
            template: TemplateConfig::default(),
            metrics: MetricsConfig::default(),
            task: TaskConfig::default(),
            limits: LimitsConfig::default(),
            cgroup: CgroupConfig::default(),
        }
    }
}

/// A path flag whose empty value has a meaning (`--seed-socket=` disables the socket): clap's
/// own path parser refuses empty values.
fn path_or_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// Flags of `sandboxer serve`; each overrides the config file.
#[derive(Clone, Debug, Default, Args)]
pub struct ServeArgs {
    /// Config file [default: /etc/sandboxer/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Take over from the daemon handing its sandboxes over on this socket (a live upgrade
    /// starts the new binary so; not for people).
    #[arg(long, value_name = "SOCKET", hide = true)]
    pub takeover: Option<PathBuf>,
    /// containerd 2.x sandbox API socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Seed sandbox API socket ("" disables it).
    #[arg(long, value_name = "PATH", value_parser = path_or_empty)]
    pub seed_socket: Option<PathBuf>,
    /// State directory.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory for container rootfs images ("" = <state_dir>/images).
    #[arg(long, value_name = "DIR", value_parser = path_or_empty)]
    pub image_dir: Option<PathBuf>,
    /// containerd socket for OOM events ("" = do not forward).
    #[arg(long, value_name = "PATH", value_parser = path_or_empty)]
    pub containerd_address: Option<PathBuf>,
    /// Guest kernel ("" for the embedded one).
    #[arg(long, value_name = "FILE", value_parser = path_or_empty)]
    pub kernel: Option<PathBuf>,
    /// Agent initramfs ("" for the embedded one).
    #[arg(long, value_name = "FILE", value_parser = path_or_empty)]
    pub initramfs: Option<PathBuf>,
    /// Guest kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Default (minimum) vCPUs per sandbox.
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// Maximum vCPUs per sandbox.
    #[arg(long)]
    pub max_vcpus: Option<u8>,
    /// Guest base memory in MiB.
    #[arg(long)]
    pub mem_mib: Option<u32>,
    /// Empty block slots per VM.
    #[arg(long)]
    pub blk_slots: Option<u32>,
    /// Pre-built VM shells kept for default-sized sandboxes (0: none).
    #[arg(long)]
    pub pool_depth: Option<u32>,
    /// How long Start waits for the guest agent's ready signal, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub agent_ready_timeout_ms: Option<u64>,
    /// KiB a sandbox's console log may hold before it starts again.
    #[arg(long, value_name = "KIB")]
    pub console_log_max_kib: Option<u64>,
    /// Seccomp filters of the VMs' vCPU and VMM threads.
    #[arg(long, value_enum)]
    pub seccomp: Option<Seccomp>,
    /// Start sandboxes from VM templates ("true") or always boot them ("false").
    #[arg(long, value_name = "BOOL")]
    pub templates: Option<bool>,
    /// Log filter, e.g. "debug" or "info,controller=trace".
    #[arg(long)]
    pub log_level: Option<String>,
    /// What SIGTERM does to running sandboxes.
    #[arg(long, value_enum)]
    pub on_exit: Option<OnExit>,
    /// Grace period per sandbox when stopping on exit.
    #[arg(long)]
    pub stop_timeout_secs: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics ("" = off).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// One more directory whose files the Task API may open (repeatable; adds to
    /// `[task] host_paths`).
    #[arg(long, value_name = "DIR")]
    pub task_host_path: Vec<PathBuf>,
}

impl Config {
    /// Parses a config file's text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))
    }

    /// Loads the config file named by `args` (or the default one, if present), applies the
    /// flags and validates the result.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let (path, required) = match &args.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_toml(&text, &path)?,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(ConfigError::Read(path, e)),
        };
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, args: &ServeArgs) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                dst.clone_from(v);
            }
        }
        set(&mut self.api.socket, &args.socket);
        set(&mut self.api.seed_socket, &args.seed_socket);
        set(&mut self.state_dir, &args.state_dir);
        set(&mut self.image_dir, &args.image_dir);
        set(&mut self.containerd_address, &args.containerd_address);
        set(&mut self.vm.kernel, &args.kernel);
        set(&mut self.vm.initramfs, &args.initramfs);
        set(&mut self.vm.cmdline, &args.cmdline);
        set(&mut self.vm.vcpus, &args.vcpus);
        set(&mut self.vm.max_vcpus, &args.max_vcpus);
        set(&mut self.vm.mem_mib, &args.mem_mib);
        set(&mut self.vm.blk_slots, &args.blk_slots);
        set(&mut self.vm.pool_depth, &args.pool_depth);
        set(
            &mut self.vm.agent_ready_timeout_ms,
            &args.agent_ready_timeout_ms,
        );
        set(&mut self.vm.console_log_max_kib, &args.console_log_max_kib);
        set(&mut self.vm.seccomp, &args.seccomp);
        set(&mut self.template.enabled, &args.templates);
        set(&mut self.log_level, &args.log_level);
        set(&mut self.on_exit, &args.on_exit);
        set(&mut self.stop_timeout_secs, &args.stop_timeout_secs);
        set(&mut self.metrics.listen, &args.metrics_listen);
        self.task
            .host_paths
            .extend(args.task_host_path.iter().cloned());
    }

    /// Checks ranges and required settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.metrics.listen.is_empty() && self.metrics.address().is_none() {
            return Err(ConfigError::Invalid(
                "metrics.listen",
                format!(
                    "{:?} is not an address with a port (e.g. \"127.0.0.1:9464\")",
                    self.metrics.listen
                ),
            ));
        }
        if self.api.socket.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "api.socket",
                "must not be empty".into(),
            ));
        }
        if self.api.socket == self.api.seed_socket {
            return Err(ConfigError::Invalid(
                "api.seed_socket",
                "must differ from api.socket".into(),
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid(
                "state_dir",
                format!("{} is not an absolute path", self.state_dir.display()),
            ));
        }
        if self.vm.vcpus == 0 {
            return Err(ConfigError::Invalid(
                "vm.vcpus",
                "must be at least 1".into(),
            ));
        }
        if self.vm.max_vcpus < self.vm.vcpus {
            return Err(ConfigError::Invalid(
                "vm.max_vcpus",
                format!(
                    "{} is below vm.vcpus ({})",
                    self.vm.max_vcpus, self.vm.vcpus
                ),
            ));
        }
        if self.vm.agent_ready_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "vm.agent_ready_timeout_ms",
                "must be at least 1".into(),
            ));
        }
        if self.vm.console_log_max_kib < MIN_CONSOLE_LOG_MAX_KIB {
            return Err(ConfigError::Invalid(
                "vm.console_log_max_kib",
                format!("must be at least {MIN_CONSOLE_LOG_MAX_KIB}"),
            ));
        }
        if self.vm.mem_mib < vmm::config::MIN_MEM_MIB {
            return Err(ConfigError::Invalid(
                "vm.mem_mib",
                format!("must be at least {}", vmm::config::MIN_MEM_MIB),
            ));
        }
        if self.template.enabled && self.template.max_templates == 0 {
            return Err(ConfigError::Invalid(
                "template.max_templates",
                "must be at least 1 while templates are enabled".into(),
            ));
        }
        let parent = self.cgroup.parent.as_path();
        if parent.as_os_str().is_empty()
            || !parent
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(ConfigError::Invalid(
                "cgroup.parent",
                format!("{} is not a relative path of plain names", parent.display()),
            ));
        }
        if self.template.build_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "template.build_timeout_ms",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The seed API socket, unless disabled.
    pub fn seed_socket(&self) -> Option<&Path> {
        let p = self.api.seed_socket.as_path();
        (!p.as_os_str().is_empty()).then_some(p)
    }

    /// Points an empty `vm.kernel` / `vm.initramfs` at the artefact this binary embeds,
    /// unpacked once into a sealed memfd. The files live as long as the returned value.
    pub fn use_embedded(&mut self) -> std::io::Result<EmbeddedFiles> {
        self.use_embedded_from(crate::embedded::kernel(), crate::embedded::initramfs())
    }

    fn use_embedded_from(
        &mut self,
        kernel: Option<crate::embedded::Artifact>,
        initramfs: Option<crate::embedded::Artifact>,
    ) -> std::io::Result<EmbeddedFiles> {
        let kernel = kernel.filter(|_| self.kernel().is_none());
        let initramfs = initramfs.filter(|_| self.initramfs().is_none());
        // Both at once: unpacking is most of the daemon's start-up time.
        let (k, i) = std::thread::scope(|s| {
            let k = s.spawn(|| {
                kernel
                    .map(|a| a.unpack("sandboxer-guest-kernel"))
                    .transpose()
            });
            let i = initramfs
                .map(|a| a.unpack("sandboxer-agent-initramfs"))
                .transpose();
            (k.join(), i)
        });
        let k = k.map_err(|_| std::io::Error::other("unpacking the guest kernel panicked"))??;
        let files = EmbeddedFiles {
            kernel: kernel.zip(k),
            initramfs: initramfs.zip(i?),
        };
        if let Some((_, u)) = &files.kernel {
            self.vm.kernel = u.path();
        }
        if let Some((_, u)) = &files.initramfs {
            self.vm.initramfs = u.path();
        }
        Ok(files)
    }

    /// The guest kernel, unless none is configured.
    pub fn kernel(&self) -> Option<&Path> {
        let p = self.vm.kernel.as_path();
        (!p.as_os_str().is_empty()).then_some(p)
    }

    /// The initramfs, unless none is configured.
    pub fn initramfs(&self) -> Option<&Path> {
        let p = self.vm.initramfs.as_path();
        (!p.as_os_str().is_empty()).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.api.socket, Path::new("/run/sandboxer/sandboxer.sock"));
        assert_eq!(
            c.api.seed_socket,
            Path::new("/run/sandboxer/sandboxer-seed.sock")
        );
        assert_eq!(c.state_dir, Path::new("/run/sandboxer"));
        assert_eq!(c.on_exit, OnExit::Stop);
        assert_eq!(c.vm.seccomp, Seccomp::Enforce);
        assert!(c.initramfs().is_none());
        assert!(c.kernel().is_none());
        c.validate().unwrap();
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            Config::from_toml("", Path::new("x")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn file_values_then_flags_override() {
        let text = r#"
            state_dir = "/var/run/sbx"
            log_level = "debug"
            on_exit = "leave"
            [api]
            socket = "/tmp/a.sock"
            seed_socket = ""
            [vm]
            kernel = "/k"
            initramfs = "/i"
            vcpus = 2
            mem_mib = 512
            blk_slots = 4
            seccomp = "log"
        "#;
        let mut c = Config::from_toml(text, Path::new("x")).unwrap();
        assert_eq!(c.state_dir, Path::new("/var/run/sbx"));
        assert_eq!(c.on_exit, OnExit::Leave);
        assert!(c.seed_socket().is_none());
        assert_eq!(c.initramfs(), Some(Path::new("/i")));
        assert_eq!((c.vm.vcpus, c.vm.mem_mib, c.vm.blk_slots), (2, 512, 4));
        assert_eq!(c.vm.seccomp, Seccomp::Log);
        // Unset sections keep their defaults.
        assert_eq!(c.vm.max_vcpus, 16);

        c.apply(&ServeArgs {
            socket: Some("/tmp/b.sock".into()),
            seed_socket: Some("/tmp/seed.sock".into()),
            mem_mib: Some(1024),
            on_exit: Some(OnExit::Stop),
            seccomp: Some(Seccomp::Off),
            ..ServeArgs::default()
        });
        assert_eq!(
            vmm::SeccompPolicy::from(c.vm.seccomp),
            vmm::SeccompPolicy::Off
        );
        assert_eq!(c.api.socket, Path::new("/tmp/b.sock"));
        assert_eq!(c.seed_socket(), Some(Path::new("/tmp/seed.sock")));
        assert_eq!(c.vm.mem_mib, 1024);
        assert_eq!(c.on_exit, OnExit::Stop);
        assert_eq!(c.vm.vcpus, 2);
        c.validate().unwrap();
    }

    #[test]
    fn embedded_pieces_are_used_only_when_none_is_configured() {
        let kernel = crate::embedded::Artifact::for_test("guest kernel", b"\x7fELF kernel");
        let initramfs = crate::embedded::Artifact::for_test("agent initramfs", b"070701 cpio");
        let mut c = Config::default();
        let files = c.use_embedded_from(None, None).unwrap();
        assert!(files.kernel.is_none() && files.initramfs.is_none());
        assert!(c.kernel().is_none() && c.initramfs().is_none());

        let files = c.use_embedded_from(Some(kernel), Some(initramfs)).unwrap();
        assert_eq!(
            std::fs::read(c.vm.kernel.as_path()).unwrap(),
            b"\x7fELF kernel"
        );
        assert_eq!(
            std::fs::read(c.vm.initramfs.as_path()).unwrap(),
            b"070701 cpio"
        );
        assert!(c.vm.kernel.starts_with("/proc/self/fd"));
        drop(files);
        // Dropped: the paths no longer open them.
        assert!(std::fs::read(c.vm.initramfs.as_path()).map_or(true, |d| d != b"070701 cpio"));

        // A configured one wins.
        let mut c = Config::default();
        c.vm.kernel = "/k".into();
        c.vm.initramfs = "/i".into();
        let files = c.use_embedded_from(Some(kernel), Some(initramfs)).unwrap();
        assert!(files.kernel.is_none() && files.initramfs.is_none());
        assert_eq!(c.kernel(), Some(Path::new("/k")));
        assert_eq!(c.initramfs(), Some(Path::new("/i")));
        assert_eq!(c.vm.agent_ready_timeout_ms, DEFAULT_AGENT_READY_TIMEOUT_MS);
    }

    #[test]
    fn empty_path_flags_mean_none() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "sandboxer",
            "--seed-socket=",
            "--initramfs=",
            "--containerd-address=",
            "--image-dir=",
        ])
        .unwrap();
        let mut c = Config::default();
        c.apply(&cli.serve);
        assert!(c.seed_socket().is_none());
        assert!(c.initramfs().is_none());
        assert_eq!(c.containerd_address, Path::new(""));
        assert_eq!(c.image_dir, Path::new(""));
        // The other path flags still refuse an empty value.
        assert!(<Cli as clap::Parser>::try_parse_from(["sandboxer", "--state-dir="]).is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml("[vm]\nmemory = 5\n", Path::new("/etc/x.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse(..)), "{err:?}");
        let err = Config::from_toml("[vm]\nseccomp = \"strict\"\n", Path::new("/etc/x.toml"))
            .unwrap_err();
        let why = std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(why.contains("seccomp") && why.contains("enforce"), "{why}");
    }

    #[test]
    fn invalid_settings() {
        let mut c = Config::default();
        c.metrics.listen = "localhost".into();
        let err = c.validate().unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid("metrics.listen", why) if why.contains("localhost")),
            "{err:?}"
        );
        c.metrics.listen = "127.0.0.1:9464".into();
        c.validate().unwrap();
        let mut c = Config::default();
        c.vm.vcpus = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid("vm.vcpus", _))
        ));
        let c = Config {
            state_dir: "relative".into(),
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid("state_dir", _))
        ));
        let mut c = Config::default();
        c.api.seed_socket = c.api.socket.clone();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid("api.seed_socket", _))
        ));
        let mut c = Config::default();
        c.vm.mem_mib = 1;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid("vm.mem_mib", _))
        ));
        let mut c = Config::default();
        c.apply(&ServeArgs {
            console_log_max_kib: Some(8),
            ..ServeArgs::default()
        });
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid("vm.console_log_max_kib", why)) if why.contains("64")
        ));
        let mut c = Config::default();
        c.apply(&ServeArgs {
            agent_ready_timeout_ms: Some(0),
            ..ServeArgs::default()
        });
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid("vm.agent_ready_timeout_ms", _))
        ));
        c.apply(&ServeArgs {
            agent_ready_timeout_ms: Some(250),
            ..ServeArgs::default()
        });
        assert_eq!(c.vm.agent_ready_timeout_ms, 250);
        c.validate().unwrap();
    }

    #[test]
    fn cgroup_section() {
        let c = Config::default();
        assert_eq!(c.cgroup.enabled, None);
        assert_eq!(c.cgroup.parent, Path::new(DEFAULT_CGROUP_PARENT));
        let c = Config::from_toml(
            "[cgroup]\nenabled = true\nparent = \"pods/sbx\"\n[limits]\nmax_sandbox_vcpus = 4\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.cgroup.enabled, Some(true));
        assert_eq!(c.limits.max_sandbox_vcpus, 4);
        c.validate().unwrap();
        for bad in ["/abs", "a/../b", ""] {
            let mut c = Config::default();
            c.cgroup.parent = bad.into();
            assert!(
                matches!(c.validate(), Err(ConfigError::Invalid("cgroup.parent", _))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn load_requires_an_explicit_file_but_not_the_default_one() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = ServeArgs {
            config: Some(tmp.path().join("none.toml")),
            ..ServeArgs::default()
        };
        assert!(matches!(Config::load(&missing), Err(ConfigError::Read(..))));
        let file = tmp.path().join("c.toml");
        std::fs::write(&file, "[vm]\nvcpus = 3\nmax_vcpus = 4\n").unwrap();
        let c = Config::load(&ServeArgs {
            config: Some(file),
            vcpus: Some(4),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.vm.vcpus, 4);
    }
}
