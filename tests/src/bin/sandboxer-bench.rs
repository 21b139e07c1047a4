// SPDX-License-Identifier: Apache-2.0
//! `sandboxer-bench <scenario>`: the project's benchmarks.
//!
//! Each scenario prints a short table and, as its last line, one JSON object with its figures.
//! Figures come from runs on the real `/dev/kvm` with the project's test guests. Every figure
//! says what starts and stops its clock, and whether it is taken inside one process (what the
//! daemon pays) or over a whole process (what a new user sees); a figure that is only a bound
//! says so. `sandboxer-bench <scenario> --help` lists a scenario's options.
//!
//! Scenarios:
//! - `vmm-start` ([`vmm_start`]): in-process `Vm::start` phases (KVM open included) and start ->
//!   boot-timer signal / guest ended, cold and from the shell pool; `sandboxer vm run` as a
//!   whole process against QEMU microvm on the same guest (spawn -> exit, both checked to print
//!   the guest's line; wall, CPU, peak RSS); host memory per VM measured in a fresh child
//!   process (RSS and the kernel's share from the child's own memory cgroup).
//! - `blk`, `net`, `vsock` ([`devices`]): the device paths without KVM against the plain system
//!   calls that move the same bytes.
//! - `sandbox-start` ([`daemon`]): the daemon (in this process) driven over gRPC: Create+Start
//!   until Start returns, the CPU time of the host's own threads during each Start, and RSS per
//!   running sandbox.
//! - `density` ([`daemon`]): fills the daemon with sandboxes level by level (`--alive
//!   10,100,1000`) and reports Start while filling, fds, threads, RSS and idle CPU per sandbox;
//!   `--templates true` fills it with clones of a VM template.
//! - `soak` ([`soak`]): Create/Start/Stop/Shutdown cycles from concurrent clients: errors,
//!   the daemon's fd/thread/RSS growth from the first to the last tenth, leftovers.
//! - `template-start` ([`template`]): the daemon with VM templates: Start of a clone against a
//!   cold Start (a pod that opts out) in the same run, the host's CPU time, RSS per idle clone
//!   and Starts per second from concurrent clients.
//! - `upgrade` ([`upgrade`]): live upgrades in a row of `sandboxer serve` (its own process)
//!   with `--alive` sandboxes running: sandboxes lost (each guest's counter must go on), the
//!   guest-visible pause per VM, the upgrade's total and wall time.
//!
//! At start the process raises its own `RLIMIT_NOFILE` soft limit to the hard limit (the
//! daemon it hosts holds ~50 fds per sandbox).

#[path = "sandboxer-bench/daemon.rs"]
mod daemon;
#[path = "sandboxer-bench/devices.rs"]
mod devices;
#[path = "sandboxer-bench/plot.rs"]
mod plot;
#[path = "sandboxer-bench/soak.rs"]
mod soak;
#[path = "sandboxer-bench/template.rs"]
mod template;
#[path = "sandboxer-bench/upgrade.rs"]
mod upgrade;
#[path = "sandboxer-bench/vmm_start.rs"]
mod vmm_start;

use std::process::ExitCode;

use anyhow::{Context, bail};

/// One scenario: name, what it measures, the options it reads, and its entry point.
struct Scenario {
    name: &'static str,
    what: &'static str,
    options: &'static [&'static str],
    run: fn(&Options) -> anyhow::Result<()>,
    /// Started by this benchmark itself (a child process), not by a person.
    internal: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "vmm-start",
        what: "in-process Vm::start phases (KVM open included), cold and pooled; `sandboxer vm \
               run` and QEMU microvm as whole processes on the same guest; host memory per VM \
               in a fresh process (needs KVM, the `sandboxer` binary and qemu-system-x86_64)",
        options: &[
            "--iterations",
            "--alive",
            "--qemu-iterations",
            "--mem-mib",
            "--seccomp",
            "--sandboxer",
            "--plot",
        ],
        run: vmm_start::vmm_start,
        internal: false,
    },
    Scenario {
        name: "blk",
        what: "random 4 KiB reads through VirtioBlock::process_queue vs pread of the same offsets",
        options: &["--iterations"],
        run: devices::blk,
        internal: false,
    },
    Scenario {
        name: "net",
        what: "frames through VirtioNet TX and RX into/out of an AF_UNIX datagram socketpair vs \
               send/recv of the same frames on the same kind of socket",
        options: &["--iterations", "--frame-bytes"],
        run: devices::net,
        internal: false,
    },
    Scenario {
        name: "vsock",
        what: "a byte stream through the vsock device and muxer to an in-process host stream and \
               back vs the same chunks through a unix stream socketpair",
        options: &["--iterations", "--packet-bytes"],
        run: devices::vsock,
        internal: false,
    },
    Scenario {
        name: "sandbox-start",
        what: "Create+Start through the daemon's gRPC API; CPU time of the host's threads during \
               Start; RSS per running sandbox (needs KVM)",
        options: &["--iterations", "--alive", "--mem-mib", "--seccomp"],
        run: daemon::sandbox_start,
        internal: false,
    },
    Scenario {
        name: "density",
        what: "sandboxes started through the daemon up to each level, then idle: Start p50/p99 \
               while filling, RSS, fds, threads and idle CPU per sandbox (needs KVM)",
        options: &[
            "--alive",
            "--idle-secs",
            "--mem-mib",
            "--seccomp",
            "--templates",
            "--template-pool",
        ],
        run: daemon::density,
        internal: false,
    },
    Scenario {
        name: "template-start",
        what: "the daemon with VM templates: Create+Start of clones and of cold boots (pods that \
               opt out) in the same run, the host's CPU time during Start, RSS per idle clone, \
               Starts per second from concurrent clients (needs KVM)",
        options: &[
            "--iterations",
            "--alive",
            "--concurrency",
            "--mem-mib",
            "--seccomp",
            "--template-pool",
            "--plot",
        ],
        run: template::template_start,
        internal: false,
    },
    Scenario {
        name: "vm-memory",
        what: "(internal: the child process of vmm-start's memory figure) boots --alive spin \
               guests in this fresh process and prints its memory growth as JSON",
        options: &["--alive", "--mem-mib", "--seccomp", "--cgroup"],
        run: vmm_start::vm_memory_child,
        internal: true,
    },
    Scenario {
        name: "soak",
        what: "Create/Start/Stop/Shutdown cycles from concurrent clients against the daemon: \
               errors, the daemon's fd, thread and RSS growth from the first to the last tenth \
               of the cycles, and what is left behind",
        options: &[
            "--cycles",
            "--concurrency",
            "--mem-mib",
            "--seccomp",
            "--templates",
            "--template-pool",
            "--daemon",
            "--sandboxer",
        ],
        run: soak::soak,
        internal: false,
    },
    Scenario {
        name: "upgrade",
        what: "live upgrades in a row of `sandboxer serve` (--sandboxer, its own process) with \
               sandboxes running, each to a new process of the same binary: sandboxes lost \
               (Status READY in the new process and the guest's counter going on, or lost), the \
               guest-visible pause per VM (p50/p99), the upgrade's total and wall time (needs \
               KVM and the `sandboxer` binary)",
        options: &[
            "--alive",
            "--rounds",
            "--counter-ms",
            "--dirty-kib",
            "--mem-mib",
            "--seccomp",
            "--templates",
            "--sandboxer",
        ],
        run: upgrade::upgrade,
        internal: false,
    },
];

/// Every option: flag, value, default, meaning.
const OPTIONS: &[(&str, &str, &str, &str)] = &[
    (
        "--iterations",
        "N",
        "200",
        "samples (vmm-start: boots of each kind; blk/net/vsock: max(N, 1000) * 100 requests, \
         500 frames, 100 packets)",
    ),
    (
        "--alive",
        "N[,N...]",
        "100; density: 10,100,1000",
        "sandboxes or VMs alive at once (density: one level per value, in ascending order)",
    ),
    (
        "--qemu-iterations",
        "N",
        "30",
        "paired whole-process runs of `sandboxer vm run` and QEMU (0: leave them out)",
    ),
    ("--mem-mib", "N", "128", "guest memory per VM"),
    (
        "--seccomp",
        "enforce|log|off",
        "enforce",
        "seccomp filters of the VMs' vCPU and VMM threads (in process, in `sandboxer vm run` and \
         in the daemon)",
    ),
    (
        "--sandboxer",
        "PATH",
        "$SANDBOXER_BIN, else `sandboxer` beside this binary",
        "the `sandboxer` binary whose `vm run` is timed, that soak's `--daemon process` serves, \
         or that upgrade runs and upgrades to (cargo build --release --bin sandboxer, or \
         tools/devtool dist)",
    ),
    (
        "--idle-secs",
        "N",
        "10",
        "density: the idle window over which CPU per sandbox is measured",
    ),
    ("--frame-bytes", "N", "1514", "net: bytes per frame"),
    (
        "--templates",
        "true|false",
        "false",
        "density, soak, upgrade: start the sandboxes as clones of a VM template",
    ),
    (
        "--template-pool",
        "N",
        "2",
        "VM shells kept pre-built per template ([template] pool_depth)",
    ),
    (
        "--concurrency",
        "N",
        "8",
        "template-start: clients starting sandboxes at once for the Starts-per-second figure; soak: clients running cycles at once",
    ),
    ("--packet-bytes", "N", "4096", "vsock: bytes per packet"),
    (
        "--daemon",
        "in-process|process",
        "in-process",
        "soak: the daemon on a runtime of this process, or `sandboxer serve` (--sandboxer) in \
         its own process, measured through /proc",
    ),
    (
        "--cycles",
        "N",
        "10000",
        "soak: Create/Start/Stop/Shutdown cycles in all",
    ),
    ("--rounds", "N", "3", "upgrade: live upgrades in a row"),
    (
        "--counter-ms",
        "N",
        "1000",
        "upgrade: every guest's counter tick (agent.counter_ms, 1 to 60000); each tick costs \
         the host a few VM exits and a vsock packet, and the gap figure is only as fine as it",
    ),
    (
        "--dirty-kib",
        "N",
        "0",
        "upgrade: every guest writes N KiB at each agent connection (agent.dirty_kib, at most \
         65536) and leaves them: memory a clone wrote and keeps, as a real guest's page cache",
    ),
    (
        "--plot",
        "FILE.svg",
        "none",
        "also draw the start-latency CDF of each kind of start and the per-phase breakdown",
    ),
    (
        "--cgroup",
        "DIR",
        "none",
        "vm-memory: a fresh memory cgroup this process moves into first",
    ),
];

fn usage() -> String {
    let mut s = String::from(
        "usage: sandboxer-bench <scenario> [--option VALUE ...]\n       \
         sandboxer-bench [<scenario>] --help\n\nEach scenario prints a short table and, as its \
         last line, one JSON object.\n\nscenarios:\n",
    );
    for sc in SCENARIOS.iter().filter(|s| !s.internal) {
        s.push_str(&format!("  {:<14} {}\n", sc.name, sc.what));
    }
    s.push_str("\n`sandboxer-bench <scenario> --help` lists its options.\n");
    s
}

fn scenario_help(sc: &Scenario) -> String {
    let mut s = format!(
        "usage: sandboxer-bench {} [--option VALUE ...]\n\n{}\n\noptions:\n",
        sc.name, sc.what
    );
    for flag in sc.options {
        if let Some((f, value, default, meaning)) = OPTIONS.iter().find(|o| o.0 == *flag) {
            s.push_str(&format!(
                "  {f} {value}\n      {meaning} (default: {default})\n"
            ));
        }
    }
    s
}

/// Options of every scenario; each scenario reads its own.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) iterations: usize,
    /// `--alive` as given, or empty for the scenario's default.
    pub(crate) alive: Vec<usize>,
    pub(crate) qemu_iterations: usize,
    pub(crate) mem_mib: u32,
    pub(crate) frame_bytes: usize,
    pub(crate) packet_bytes: usize,
    pub(crate) seccomp: vmm::SeccompPolicy,
    pub(crate) sandboxer: Option<std::path::PathBuf>,
    pub(crate) idle_secs: u64,
    pub(crate) cgroup: Option<std::path::PathBuf>,
    pub(crate) templates: bool,
    pub(crate) template_pool: usize,
    pub(crate) concurrency: usize,
    pub(crate) plot: Option<std::path::PathBuf>,
    pub(crate) cycles: usize,
    /// soak: run `sandboxer serve` in its own process instead of in this one.
    pub(crate) daemon_process: bool,
    /// upgrade: live upgrades in a row.
    pub(crate) rounds: usize,
    /// upgrade: the guests' counter tick, ms.
    pub(crate) counter_ms: u64,
    /// upgrade: KiB each guest writes at each agent connection.
    pub(crate) dirty_kib: u64,
}

impl Options {
    fn parse(scenario: &Scenario, args: &[String]) -> anyhow::Result<Self> {
        let mut o = Options {
            iterations: 200,
            alive: Vec::new(),
            qemu_iterations: 30,
            mem_mib: 128,
            frame_bytes: 1514,
            packet_bytes: 4096,
            seccomp: vmm::SeccompPolicy::Enforce,
            sandboxer: None,
            idle_secs: 10,
            cgroup: None,
            templates: false,
            template_pool: 2,
            concurrency: 8,
            plot: None,
            cycles: 10_000,
            daemon_process: false,
            rounds: 3,
            counter_ms: 1000,
            dirty_kib: 0,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if !scenario.options.contains(&flag.as_str()) {
                bail!(
                    "{} takes no option {flag:?}\n\n{}",
                    scenario.name,
                    scenario_help(scenario)
                );
            }
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            let number = || -> anyhow::Result<usize> {
                value
                    .parse()
                    .with_context(|| format!("{flag}: {value:?} is not a number"))
            };
            match flag.as_str() {
                "--iterations" => o.iterations = number()?.max(1),
                "--alive" => {
                    o.alive = value
                        .split(',')
                        .map(|v| {
                            v.trim()
                                .parse::<usize>()
                                .ok()
                                .filter(|n| *n > 0)
                                .with_context(|| format!("--alive: {v:?} is not a positive number"))
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                "--qemu-iterations" => o.qemu_iterations = number()?,
                "--mem-mib" => {
                    o.mem_mib = u32::try_from(number()?).context("--mem-mib too large")?
                }
                "--frame-bytes" => o.frame_bytes = number()?,
                "--packet-bytes" => o.packet_bytes = number()?,
                "--idle-secs" => o.idle_secs = u64::try_from(number()?.max(1))?,
                "--seccomp" => {
                    o.seccomp = value.parse().map_err(|e: String| anyhow::anyhow!(e))?;
                }
                "--sandboxer" => o.sandboxer = Some(value.into()),
                "--cgroup" => o.cgroup = Some(value.into()),
                "--templates" => {
                    o.templates = value
                        .parse()
                        .with_context(|| format!("--templates: {value:?} is not true or false"))?;
                }
                "--template-pool" => o.template_pool = number()?,
                "--concurrency" => o.concurrency = number()?.max(1),
                "--plot" => o.plot = Some(value.into()),
                "--cycles" => o.cycles = number()?.max(1),
                "--rounds" => o.rounds = number()?.max(1),
                "--counter-ms" => o.counter_ms = u64::try_from(number()?.clamp(1, 60_000))?,
                "--dirty-kib" => o.dirty_kib = u64::try_from(number()?.min(65_536))?,
                "--daemon" => {
                    o.daemon_process = match value.as_str() {
                        "in-process" => false,
                        "process" => true,
                        _ => bail!("--daemon: {value:?} is not in-process or process"),
                    }
                }
                _ => bail!("unknown option {flag}"),
            }
        }
        Ok(o)
    }

    /// `--alive` for scenarios that take one count.
    pub(crate) fn alive_one(&self, default: usize) -> anyhow::Result<usize> {
        match self.alive.as_slice() {
            [] => Ok(default),
            [n] => Ok(*n),
            _ => bail!("--alive takes one number here"),
        }
    }
}

/// The `sandboxer` binary to run: `--sandboxer`, `$SANDBOXER_BIN`, or beside this binary.
pub(crate) fn sandboxer_binary(o: &Options) -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = &o.sandboxer {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("SANDBOXER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .map(|d| d.join("sandboxer"))
        .context("no directory above this binary")?;
    if !beside.is_file() {
        bail!(
            "no sandboxer binary at {} (cargo build --release --bin sandboxer, or --sandboxer PATH)",
            beside.display()
        );
    }
    Ok(beside)
}

/// The VMM host every scenario of this process uses (KVM handle, shell pool, live count).
pub(crate) fn vmm_host() -> &'static vmm::Host {
    static HOST: std::sync::OnceLock<vmm::Host> = std::sync::OnceLock::new();
    HOST.get_or_init(vmm::Host::new)
}

/// `RLIMIT_NOFILE` as the process started and as [`main`] raised it, the way the daemon does
/// (`controller::nofile::raise_nofile`: the hard limit toward `fs.nr_open` where allowed, the
/// soft one to the hard one).
pub(crate) static NOFILE: std::sync::OnceLock<controller::nofile::NofileLimits> =
    std::sync::OnceLock::new();

fn main() -> ExitCode {
    // The daemon runs in this process in most scenarios: its heap behaves as `sandboxer
    // serve`'s does (set before any other thread exists).
    vmm::grow_heap_in_large_steps();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args
        .first()
        .and_then(|a| SCENARIOS.iter().find(|s| s.name == a));
    if args.iter().any(|a| a == "--help" || a == "-h") {
        match scenario {
            Some(sc) => print!("{}", scenario_help(sc)),
            None => print!("{}", usage()),
        }
        return ExitCode::SUCCESS;
    }
    let Some(sc) = scenario else {
        match args.first() {
            Some(other) => eprintln!("sandboxer-bench: unknown scenario {other:?}\n\n{}", usage()),
            None => eprint!("{}", usage()),
        }
        return ExitCode::from(2);
    };
    let opts = match Options::parse(sc, args.get(1..).unwrap_or_default()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sandboxer-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match controller::nofile::raise_nofile() {
        Ok(limits) => {
            let _ = NOFILE.set(limits);
        }
        Err(e) => eprintln!("sandboxer-bench: cannot raise RLIMIT_NOFILE: {e:#}"),
    }
    match (sc.run)(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandboxer-bench {}: {e:#}", sc.name);
            ExitCode::FAILURE
        }
    }
}
