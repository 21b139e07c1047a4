// SPDX-License-Identifier: Apache-2.0
//! `vmm-start`: what starting a VM costs, measured three ways that must not be confused.
//!
//! 1. In process (what the daemon pays): `Vm::start` phase by phase, then start -> the guest's
//!    boot-timer write and start -> guest ended, cold and from the pre-built shell pool. The
//!    clock starts at the call to `Vm::start` and stops at the signal or when `Vm::wait`
//!    returns (the guest's triple fault seen; teardown runs later, off the clock). `/dev/kvm`
//!    is opened once per process: its phase (`kvm_open`) is non-zero only for the first VM.
//! 2. Whole process (what a new user sees), paired with QEMU: `sandboxer vm run` and
//!    `qemu-system-x86_64 -M microvm` on the same guest, each spawned -> exited (exec, setup,
//!    the guest, shutdown and teardown inside the clock), each checked to have printed the
//!    guest's line; wall time, CPU time (user + system) and peak RSS from `wait4`.
//! 3. Host memory per VM in a fresh child process of this benchmark (no allocator state from
//!    earlier boots): RSS growth minus the guest pages the guests touched, signed, and the
//!    kernel's share (the child's own memory cgroup: kernel memory charged to it) beside it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::{Summary, procstat};
use serde_json::json;
use test_guests::Guest;
use vmm::{Vm, VmConfig};

use crate::{Options, plot, sandboxer_binary, vmm_host};

/// What the `quick` guest prints (then it triple faults).
const QUICK_LINE: &str = "quick: bye";

fn config(guest: Guest, o: &Options) -> VmConfig {
    let mut c = VmConfig::new(guest.elf());
    c.mem_mib = o.mem_mib;
    c.cmdline = "bench".into();
    c.seccomp = o.seccomp;
    c
}

/// The phases of `vmm::StartupTimings`, in order.
const PHASES: [&str; 8] = [
    "kvm_open",
    "vm_create",
    "memory",
    "kernel_load",
    "devices",
    "vcpu_create",
    "vcpu_start",
    "start_total",
];

/// Samples of one series of boots.
struct Boots {
    phases: Vec<(&'static str, Vec<Duration>)>,
    to_signal: Vec<Duration>,
    to_end: Vec<Duration>,
}

/// Boots `guest` `n` times, one at a time; with `pooled`, from a refilled shell pool.
fn run_boots(guest: Guest, n: usize, o: &Options, pooled: bool) -> anyhow::Result<Boots> {
    let mut b = Boots {
        phases: PHASES
            .into_iter()
            .map(|name| (name, Vec::with_capacity(n)))
            .collect(),
        to_signal: Vec::with_capacity(n),
        to_end: Vec::with_capacity(n),
    };
    if pooled {
        vmm_host().set_pool_target(o.mem_mib, 1)?;
    }
    for i in 0..n {
        if pooled && !vmm_host().wait_pool_full(Duration::from_secs(10)) {
            bail!("boot {i}: the shell pool did not refill within 10 s");
        }
        let t0 = Instant::now();
        let vm = Vm::start(vmm_host(), config(guest, o))?;
        let end = vm.wait();
        let ended = t0.elapsed();
        let signal = vm.boot_time().with_context(|| {
            format!(
                "boot {i}: no boot-timer signal; exit {:?}; console {:?}",
                end.exit,
                vm.console()
            )
        })?;
        if !vm.console().contains(QUICK_LINE) {
            bail!(
                "boot {i}: the guest did not print {QUICK_LINE:?}: {:?}",
                vm.console()
            );
        }
        let t = vm.timings();
        if t.pooled != pooled {
            bail!("boot {i}: pooled is {} (expected {pooled})", t.pooled);
        }
        for (slot, d) in b.phases.iter_mut().zip([
            t.kvm_open,
            t.vm_create,
            t.memory,
            t.kernel_load,
            t.devices,
            t.vcpu_create,
            t.vcpu_start,
            t.total,
        ]) {
            slot.1.push(d);
        }
        b.to_signal.push(signal);
        b.to_end.push(ended);
        drop(vm);
        // Teardown runs on the VMM thread; let it finish so boots do not overlap it.
        vmm_host().wait_all_torn_down(Duration::from_secs(10));
    }
    if pooled {
        vmm_host().set_pool_target(o.mem_mib, 0)?;
    }
    Ok(b)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn vmm_start(o: &Options) -> anyhow::Result<()> {
    test_guests::kvm_usable().map_err(anyhow::Error::msg)?;
    let guest = Guest::Quick;
    let alive = o.alive_one(100)?;

    // Warm-up: the first boot opens /dev/kvm for the process (its kvm_open is the figure for
    // that phase), and the binary's code gets faulted in.
    let warm = run_boots(guest, 3, o, false)?;
    let first_kvm_open = warm
        .phases
        .first()
        .and_then(|(_, v)| v.first().copied())
        .unwrap_or_default();
    let cold = run_boots(guest, o.iterations, o, false)?;
    let pooled = run_boots(guest, o.iterations, o, true)?;

    let mem_1 = memory_in_child(1, o)?;
    let mem_n = memory_in_child(alive, o)?;
    let procs = if o.qemu_iterations == 0 {
        Err(anyhow::anyhow!("--qemu-iterations 0"))
    } else {
        process_runs(guest, o.qemu_iterations, o)
    };
    // Under CI every figure this scenario prints is measured, or the run fails: "not measured"
    // is for a developer's machine without QEMU or a memory cgroup, never a green CI run.
    if std::env::var("CI").as_deref() == Ok("true") {
        if let (Err(e), true) = (&procs, o.qemu_iterations > 0) {
            bail!("under CI the whole-process comparison must be measured: {e:#}");
        }
        if mem_1.kernel_kib_per_vm.is_none() || mem_n.kernel_kib_per_vm.is_none() {
            bail!("under CI the kernel's share of VM memory must be measured (no memory cgroup)");
        }
    }

    println!(
        "vmm-start: in process, {} boots each, cold and from the shell pool, of test guest {:?} \
         ({} MiB, 1 vCPU, seccomp {}); clock from the call to Vm::start",
        o.iterations,
        guest.name(),
        o.mem_mib,
        o.seccomp.name()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>12}",
        "phase (ms)", "cold p50", "cold p99", "pooled p50", "pooled p99"
    );
    let mut phase_json = serde_json::Map::new();
    let rows = cold
        .phases
        .iter()
        .zip(&pooled.phases)
        .map(|((name, c), (_, p))| (*name, Summary::of(c), Summary::of(p)))
        .chain([
            (
                "start -> boot-timer signal",
                Summary::of(&cold.to_signal),
                Summary::of(&pooled.to_signal),
            ),
            (
                "start -> guest ended",
                Summary::of(&cold.to_end),
                Summary::of(&pooled.to_end),
            ),
        ]);
    for (name, c, p) in rows {
        println!(
            "{name:<28} {:>10.3} {:>10.3} {:>12.3} {:>12.3}",
            c.p50_ms, c.p99_ms, p.p50_ms, p.p99_ms
        );
        phase_json.insert(
            name.into(),
            json!({"cold_p50_ms": c.p50_ms, "cold_p99_ms": c.p99_ms,
                   "pooled_p50_ms": p.p50_ms, "pooled_p99_ms": p.p99_ms}),
        );
    }
    println!(
        "kvm_open is paid once per process: {:.3} ms for this process's first VM (0 for every \
         VM after it, as in the rows above)",
        ms(first_kvm_open)
    );
    if let Some(path) = &o.plot {
        // The pooled VM's phases: what Start costs with the shell pool (start_total is the sum).
        let phases: Vec<plot::Phase<'_>> = pooled
            .phases
            .iter()
            .filter(|(name, _)| !matches!(*name, "start_total" | "kvm_open"))
            .map(|(name, samples)| plot::Phase { name, samples })
            .collect();
        plot::write(
            path,
            &format!(
                "vmm-start: Vm::start called -> guest's boot-timer signal, test guest {:?}, {} MiB",
                guest.name(),
                o.mem_mib
            ),
            &[
                plot::Series {
                    name: "pooled VM shell",
                    samples: &pooled.to_signal,
                },
                plot::Series {
                    name: "cold",
                    samples: &cold.to_signal,
                },
            ],
            "pooled Vm::start",
            &phases,
        )?;
    }
    let cold_signal = Summary::of(&cold.to_signal);
    let pooled_signal = Summary::of(&pooled.to_signal);
    let cold_end = Summary::of(&cold.to_end);

    println!(
        "host memory per VM, each count in a fresh child process ({} spin guests alive; RSS \
         growth minus the guest pages they touched; negative values as measured):",
        alive
    );
    for m in [&mem_1, &mem_n] {
        println!("  {}", m.line());
    }

    let mut out = json!({
        "scenario": "vmm-start",
        "guest": guest.name(),
        "iterations": o.iterations,
        "mem_mib": o.mem_mib,
        "seccomp": o.seccomp.name(),
        "p50_ms": pooled_signal.p50_ms,
        "p99_ms": pooled_signal.p99_ms,
        "cold_p50_ms": cold_signal.p50_ms,
        "cold_p99_ms": cold_signal.p99_ms,
        "cold_end_p50_ms": cold_end.p50_ms,
        "kvm_open_first_vm_ms": ms(first_kvm_open),
        "phases": phase_json,
        "alive": alive,
        "overhead_kib_per_vm": mem_n.overhead_kib_per_vm,
        "overhead_kib_per_vm_1": mem_1.overhead_kib_per_vm,
        "kernel_kib_per_vm": mem_n.kernel_kib_per_vm,
        "kernel_kib_per_vm_1": mem_1.kernel_kib_per_vm,
    });
    if let Some(map) = out.as_object_mut() {
        let mut memory = serde_json::Map::new();
        memory.insert(mem_1.count.to_string(), mem_1.json.clone());
        memory.insert(mem_n.count.to_string(), mem_n.json.clone());
        map.insert("memory".into(), memory.into());
    }
    match &procs {
        Ok(p) => {
            p.print(cold_end.p50_ms);
            if let Some(map) = out.as_object_mut() {
                for (k, v) in p.json(cold_end.p50_ms) {
                    map.insert(k, v);
                }
            }
        }
        Err(e) => {
            println!("whole-process comparison: not measured: {e:#}");
            if let Some(map) = out.as_object_mut() {
                map.insert("qemu_p50_ms".into(), serde_json::Value::Null);
                map.insert("ours_process_p50_ms".into(), serde_json::Value::Null);
                map.insert("qemu_process_ratio".into(), serde_json::Value::Null);
                map.insert("qemu_in_process_ratio".into(), serde_json::Value::Null);
            }
        }
    }
    println!("{out}");
    Ok(())
}

// ---- whole processes: `sandboxer vm run` against QEMU ---------------------------------------

/// One process run from spawn to exit.
#[derive(Debug, Clone, Copy)]
struct ProcRun {
    /// Spawn -> reaped.
    wall: Duration,
    /// Spawn -> the guest's line read from the process's stdout.
    to_line: Duration,
    /// User + system CPU time.
    cpu: Duration,
    /// Peak RSS (`ru_maxrss`), KiB.
    maxrss_kib: u64,
    /// `sandboxer vm run` only: its own KVM-open and `Vm::start` times (stderr).
    kvm_open: Option<Duration>,
    startup: Option<Duration>,
}

/// A child's exit status and resource use, from `wait4(2)`.
#[allow(
    unsafe_code,
    reason = "wait4(2) is the one call that returns one child's peak RSS and CPU time; neither \
              std nor nix wraps it"
)]
fn wait4(pid: u32) -> anyhow::Result<(i32, Duration, u64)> {
    let pid = libc::pid_t::try_from(pid)?;
    let mut status: libc::c_int = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    loop {
        // SAFETY: `status` and `usage` are live, writable and of the types wait4 fills; the pid
        // is our own unreaped child (std's `Child` never waited on it).
        let rc = unsafe { libc::wait4(pid, &raw mut status, 0, usage.as_mut_ptr()) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
    // SAFETY: wait4 returned the child, so the kernel filled `usage`; it was zeroed before,
    // and every bit pattern is a valid `rusage` (plain integers).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    let maxrss = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    Ok((status, cpu, maxrss))
}

/// Spawns `cmd`, records when `line` appears on its stdout, reaps it with `wait4`. Fails
/// unless it exits with 0 and printed `line`. Returns the run and its stderr.
fn run_process(mut cmd: Command, line: &str) -> anyhow::Result<(ProcRun, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let want = line.as_bytes().to_vec();
    let out_reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut seen = None;
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if seen.is_none() && all.windows(want.len()).any(|w| w == want.as_slice()) {
                seen = Some(Instant::now());
            }
        }
        (all, seen)
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (status, cpu, maxrss_kib) = wait4(child.id())?;
    let wall = t0.elapsed();
    let (out, seen) = out_reader
        .join()
        .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
    let err = err_reader
        .join()
        .map_err(|_| anyhow::anyhow!("stderr reader panicked"))?;
    let out = String::from_utf8_lossy(&out);
    if status != 0 {
        bail!("{cmd:?} exited with status {status:#x}; stdout {out:?}; stderr {err:?}");
    }
    let Some(seen) = seen else {
        bail!("{cmd:?} never printed {line:?}; stdout {out:?}; stderr {err:?}");
    };
    Ok((
        ProcRun {
            wall,
            to_line: seen.saturating_duration_since(t0),
            cpu,
            maxrss_kib,
            kvm_open: None,
            startup: None,
        },
        err,
    ))
}

/// A number in milliseconds that follows `key` in `text` (`... key 1.234 ...`).
fn ms_after(text: &str, key: &str) -> Option<Duration> {
    let rest = text.get(text.find(key)? + key.len()..)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let v: f64 = rest.get(..end)?.parse().ok()?;
    Some(Duration::from_secs_f64(v / 1e3))
}

fn ours(bin: &Path, guest: Guest, o: &Options) -> anyhow::Result<ProcRun> {
    let mut cmd = Command::new(bin);
    cmd.args(["vm", "run", "--kernel"])
        .arg(guest.elf())
        .args(["--cmdline", "bench", "--mem"])
        .arg(o.mem_mib.to_string())
        .args(["--seccomp", o.seccomp.name()]);
    let (mut run, err) = run_process(cmd, QUICK_LINE)?;
    // `sandboxer: VM ended: ...; start-up T ms (kvm K, vm ...`
    run.startup = ms_after(&err, "start-up ");
    run.kvm_open = ms_after(&err, "(kvm ");
    if run.startup.is_none() {
        bail!("sandboxer vm run printed no start-up timings: {err:?}");
    }
    Ok(run)
}

/// QEMU microvm with KVM on the same guest. (`-cpu host` alone aborts on this host: KVM refuses
/// QEMU's IA32_ARCH_CAPABILITIES write.)
fn qemu(guest: Guest, o: &Options) -> anyhow::Result<ProcRun> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args([
        "-m",
        &format!("{}M", o.mem_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
    ])
    .args([
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(guest.elf())
    .args(["-append", "bench"]);
    run_process(cmd, QUICK_LINE)
        .map(|(run, _)| run)
        .context("running qemu-system-x86_64 (apt-get install qemu-system-x86)")
}

/// Paired whole-process runs: each iteration runs both, in alternating order.
struct ProcRuns {
    n: usize,
    ours: Vec<ProcRun>,
    qemu: Vec<ProcRun>,
    seccomp: &'static str,
}

fn process_runs(guest: Guest, n: usize, o: &Options) -> anyhow::Result<ProcRuns> {
    let bin = sandboxer_binary(o)?;
    // One untimed run of each: page cache, QEMU's first-run costs.
    ours(&bin, guest, o)?;
    qemu(guest, o)?;
    let mut r = ProcRuns {
        n,
        ours: Vec::with_capacity(n),
        qemu: Vec::with_capacity(n),
        seccomp: o.seccomp.name(),
    };
    for i in 0..n {
        if i % 2 == 0 {
            r.ours.push(ours(&bin, guest, o)?);
            r.qemu.push(qemu(guest, o)?);
        } else {
            r.qemu.push(qemu(guest, o)?);
            r.ours.push(ours(&bin, guest, o)?);
        }
    }
    Ok(r)
}

fn median_u64(v: impl Iterator<Item = u64>) -> u64 {
    let mut v: Vec<u64> = v.collect();
    v.sort_unstable();
    // Nearest rank, as `Summary`.
    v.get(v.len().div_ceil(2).saturating_sub(1))
        .copied()
        .unwrap_or(0)
}

/// p50 summaries of a set of runs.
struct ProcSummary {
    wall: Summary,
    to_line: Summary,
    after_line: Summary,
    cpu: Summary,
    maxrss_kib: u64,
}

fn summarize(runs: &[ProcRun]) -> ProcSummary {
    let col = |f: fn(&ProcRun) -> Duration| runs.iter().map(f).collect::<Vec<_>>();
    ProcSummary {
        wall: Summary::of(&col(|r| r.wall)),
        to_line: Summary::of(&col(|r| r.to_line)),
        after_line: Summary::of(&col(|r| r.wall.saturating_sub(r.to_line))),
        cpu: Summary::of(&col(|r| r.cpu)),
        maxrss_kib: median_u64(runs.iter().map(|r| r.maxrss_kib)),
    }
}

impl ProcRuns {
    fn print(&self, in_process_end_ms: f64) {
        let (ours, qemu) = (summarize(&self.ours), summarize(&self.qemu));
        println!(
            "whole process, spawn -> exit (wait4), {} paired runs in alternating order, same \
             guest, each checked to print {QUICK_LINE:?}; `sandboxer vm run --seccomp {}` vs \
             `qemu-system-x86_64 -M microvm -enable-kvm`",
            self.n, self.seccomp
        );
        println!(
            "{:<18} {:>9} {:>9} {:>13} {:>14} {:>9} {:>13}",
            "(p50, ms)", "wall", "wall p99", "spawn->line", "line->exit", "CPU", "peak RSS KiB"
        );
        for (name, s) in [("sandboxer vm run", &ours), ("qemu microvm", &qemu)] {
            println!(
                "{name:<18} {:>9.3} {:>9.3} {:>13.3} {:>14.3} {:>9.3} {:>13}",
                s.wall.p50_ms,
                s.wall.p99_ms,
                s.to_line.p50_ms,
                s.after_line.p50_ms,
                s.cpu.p50_ms,
                s.maxrss_kib
            );
        }
        let kvm = Summary::of(
            &self
                .ours
                .iter()
                .filter_map(|r| r.kvm_open)
                .collect::<Vec<_>>(),
        );
        let start = Summary::of(
            &self
                .ours
                .iter()
                .filter_map(|r| r.startup)
                .collect::<Vec<_>>(),
        );
        println!(
            "inside `sandboxer vm run` (its stderr): kvm_open p50 {:.3} ms, Vm::start (kvm_open \
             included) p50 {:.3} ms",
            kvm.p50_ms, start.p50_ms
        );
        println!(
            "ratios, QEMU / ours: whole process wall {:.2}x, CPU {:.2}x, peak RSS {:.2}x; \
             in-process ratio (QEMU whole process / our in-process cold start -> guest ended, \
             {:.3} ms; not like for like) {:.1}x",
            qemu.wall.p50_ms / ours.wall.p50_ms,
            qemu.cpu.p50_ms / ours.cpu.p50_ms,
            qemu.maxrss_kib as f64 / ours.maxrss_kib.max(1) as f64,
            in_process_end_ms,
            qemu.wall.p50_ms / in_process_end_ms
        );
    }

    fn json(&self, in_process_end_ms: f64) -> Vec<(String, serde_json::Value)> {
        let (ours, qemu) = (summarize(&self.ours), summarize(&self.qemu));
        let kvm = Summary::of(
            &self
                .ours
                .iter()
                .filter_map(|r| r.kvm_open)
                .collect::<Vec<_>>(),
        );
        let start = Summary::of(
            &self
                .ours
                .iter()
                .filter_map(|r| r.startup)
                .collect::<Vec<_>>(),
        );
        [
            ("process_runs", json!(self.n)),
            ("ours_process_p50_ms", json!(ours.wall.p50_ms)),
            ("ours_process_p99_ms", json!(ours.wall.p99_ms)),
            ("ours_process_to_line_p50_ms", json!(ours.to_line.p50_ms)),
            (
                "ours_process_line_to_exit_p50_ms",
                json!(ours.after_line.p50_ms),
            ),
            ("ours_process_cpu_p50_ms", json!(ours.cpu.p50_ms)),
            ("ours_process_maxrss_kib_p50", json!(ours.maxrss_kib)),
            ("ours_process_kvm_open_p50_ms", json!(kvm.p50_ms)),
            ("ours_process_vm_start_p50_ms", json!(start.p50_ms)),
            ("qemu_p50_ms", json!(qemu.wall.p50_ms)),
            ("qemu_p99_ms", json!(qemu.wall.p99_ms)),
            ("qemu_to_line_p50_ms", json!(qemu.to_line.p50_ms)),
            ("qemu_line_to_exit_p50_ms", json!(qemu.after_line.p50_ms)),
            ("qemu_cpu_p50_ms", json!(qemu.cpu.p50_ms)),
            ("qemu_maxrss_kib_p50", json!(qemu.maxrss_kib)),
            (
                "qemu_process_ratio",
                json!(qemu.wall.p50_ms / ours.wall.p50_ms),
            ),
            (
                "qemu_process_cpu_ratio",
                json!(qemu.cpu.p50_ms / ours.cpu.p50_ms),
            ),
            (
                "qemu_in_process_ratio",
                json!(qemu.wall.p50_ms / in_process_end_ms),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

// ---- host memory per VM, in a fresh child process -------------------------------------------

/// Which cgroup version a memory cgroup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupKind {
    V1,
    V2,
}

/// A memory cgroup directory a fresh child cgroup can be made in: this process's own (v1), or on
/// v2 its own or its parent's, whichever has the memory controller on for its children (a v2
/// cgroup that holds processes cannot, so it is usually the parent).
fn own_memory_cgroup() -> Option<(PathBuf, CgroupKind)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some((Path::new("/sys/fs/cgroup/memory").join(rel), CgroupKind::V1));
        }
        if controllers.is_empty() {
            let dir = Path::new("/sys/fs/cgroup").join(rel);
            let has_memory = |d: &Path| {
                std::fs::read_to_string(d.join("cgroup.subtree_control"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
            };
            if has_memory(&dir) {
                return Some((dir, CgroupKind::V2));
            }
            if let Some(parent) = dir.parent().filter(|p| has_memory(p)) {
                return Some((parent.to_path_buf(), CgroupKind::V2));
            }
        }
    }
    None
}

/// Reads the memory cgroup `dir`'s counters, in bytes: (charged in total, kernel, shmem, anon).
fn cgroup_counters(dir: &Path, kind: CgroupKind) -> Option<(u64, u64, u64, u64)> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    let field = |name: &str| -> Option<u64> {
        stat.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    match kind {
        CgroupKind::V1 => Some((
            read("memory.usage_in_bytes")?,
            read("memory.kmem.usage_in_bytes")?,
            field("shmem")?,
            field("rss")?,
        )),
        CgroupKind::V2 => Some((
            read("memory.current")?,
            // `kernel` since Linux 5.18; before, its parts.
            field("kernel").or_else(|| {
                ["kernel_stack", "pagetables", "percpu", "sock", "slab"]
                    .iter()
                    .map(|f| field(f))
                    .sum()
            })?,
            field("shmem")?,
            field("anon")?,
        )),
    }
}

/// The child's figures, as it printed them.
struct MemoryFigures {
    count: usize,
    overhead_kib_per_vm: f64,
    kernel_kib_per_vm: Option<f64>,
    json: serde_json::Value,
}

impl MemoryFigures {
    fn line(&self) -> String {
        let kernel = self.kernel_kib_per_vm.map_or_else(
            || "kernel share not measured (no memory cgroup of its own)".to_owned(),
            |k| format!("{k:.1} KiB per VM charged to the kernel (its memory cgroup)"),
        );
        let avail = self
            .json
            .get("mem_available_drop_kib_per_vm")
            .and_then(serde_json::Value::as_f64)
            .map_or_else(String::new, |a| {
                format!("; MemAvailable fell {a:.1} KiB per VM (system-wide, noisy)")
            });
        format!(
            "{} alive: {:.1} KiB RSS per VM; {kernel}{avail}",
            self.count, self.overhead_kib_per_vm
        )
    }
}

/// Runs `sandboxer-bench vm-memory` in a fresh child process (in a fresh memory cgroup when
/// one can be made) and reads its figures.
fn memory_in_child(count: usize, o: &Options) -> anyhow::Result<MemoryFigures> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let cgroup = own_memory_cgroup().and_then(|(dir, _)| {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let child = dir.join(format!("sandboxer-bench-mem-{}-{n}", std::process::id()));
        std::fs::create_dir(&child).ok().map(|()| child)
    });
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["vm-memory", "--alive", &count.to_string()])
        .args(["--mem-mib", &o.mem_mib.to_string()])
        .args(["--seccomp", o.seccomp.name()]);
    if let Some(dir) = &cgroup {
        cmd.arg("--cgroup").arg(dir);
    }
    let out = cmd.stderr(Stdio::inherit()).output();
    if let Some(dir) = &cgroup {
        // Empty now (the child exited); its charges move to the parent.
        let _ = std::fs::remove_dir(dir);
    }
    let out = out.context("running the vm-memory child")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the vm-memory child failed ({}): {text}", out.status);
    }
    let last = text
        .lines()
        .last()
        .context("the vm-memory child printed nothing")?;
    let json: serde_json::Value =
        serde_json::from_str(last).with_context(|| format!("vm-memory output {last:?}"))?;
    Ok(MemoryFigures {
        count,
        overhead_kib_per_vm: json
            .get("overhead_kib_per_vm")
            .and_then(serde_json::Value::as_f64)
            .context("no overhead_kib_per_vm")?,
        kernel_kib_per_vm: json
            .pointer("/cgroup/kernel_kib_per_vm")
            .and_then(serde_json::Value::as_f64),
        json,
    })
}

fn kib_per(delta_bytes: i64, count: usize) -> f64 {
    delta_bytes as f64 / 1024.0 / count as f64
}

fn signed(after: u64, before: u64) -> i64 {
    i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX)
}

/// `vm-memory` (a child of `vmm-start`): moves into `--cgroup` if given, boots one VM and tears
/// it down (opening /dev/kvm and compiling the seccomp filters, costs of the process, not of a
/// VM), then boots `--alive` spin guests and prints what they added, as JSON.
pub(crate) fn vm_memory_child(o: &Options) -> anyhow::Result<()> {
    let count = o.alive_one(1)?;
    let cgroup = match &o.cgroup {
        Some(dir) => {
            std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
                .with_context(|| format!("moving into {}", dir.display()))?;
            let kind = if dir.join("memory.kmem.usage_in_bytes").exists() {
                CgroupKind::V1
            } else {
                CgroupKind::V2
            };
            Some((dir.clone(), kind))
        }
        None => None,
    };
    test_guests::kvm_usable().map_err(anyhow::Error::msg)?;
    let warm = Vm::start(vmm_host(), config(Guest::Spin, o))?;
    if warm.wait_boot(Duration::from_secs(10)).is_none() {
        bail!("the warm-up guest never signalled boot");
    }
    drop(warm);
    vmm_host().wait_all_torn_down(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(100));

    let counters = || cgroup.as_ref().and_then(|(d, k)| cgroup_counters(d, *k));
    let rss0 = (
        procstat::rss_kib(),
        procstat::rss_anon_kib(),
        procstat::rss_shmem_kib(),
    );
    let cg0 = counters();
    let avail0 = procstat::mem_available_kib();
    let mut vms = Vec::with_capacity(count);
    for _ in 0..count {
        vms.push(Vm::start(vmm_host(), config(Guest::Spin, o))?);
    }
    for vm in &vms {
        if vm.wait_boot(Duration::from_secs(30)).is_none() {
            bail!("a spinning guest never signalled boot: {:?}", vm.console());
        }
    }
    let rss1 = (
        procstat::rss_kib(),
        procstat::rss_anon_kib(),
        procstat::rss_shmem_kib(),
    );
    let cg1 = counters();
    let avail1 = procstat::mem_available_kib();
    let mut guest_kib = 0u64;
    for vm in &vms {
        guest_kib += vm.guest_resident_bytes()? / 1024;
    }
    drop(vms);
    vmm_host().wait_all_torn_down(Duration::from_secs(30));

    let rss_growth = signed(rss1.0, rss0.0);
    let overhead = rss_growth - i64::try_from(guest_kib)?;
    let cg = match (cg0, cg1) {
        (Some(a), Some(b)) => json!({
            "kind": if cgroup.as_ref().is_some_and(|c| c.1 == CgroupKind::V1) { "v1" } else { "v2" },
            "charged_growth_kib": kib_per(signed(b.0, a.0), 1),
            "kernel_growth_kib": kib_per(signed(b.1, a.1), 1),
            "kernel_kib_per_vm": kib_per(signed(b.1, a.1), count),
            "shmem_growth_kib": kib_per(signed(b.2, a.2), 1),
            "anon_growth_kib": kib_per(signed(b.3, a.3), 1),
        }),
        _ => serde_json::Value::Null,
    };
    let avail_drop = match (avail0, avail1) {
        (Some(a), Some(b)) => json!(signed(a, b) as f64 / count as f64),
        _ => serde_json::Value::Null,
    };
    println!(
        "{}",
        json!({
            "count": count,
            "rss_growth_kib": rss_growth,
            "rss_anon_growth_kib": signed(rss1.1, rss0.1),
            "rss_shmem_growth_kib": signed(rss1.2, rss0.2),
            "guest_kib": guest_kib,
            "overhead_kib_per_vm": overhead as f64 / count as f64,
            "cgroup": cg,
            "mem_available_drop_kib_per_vm": avail_drop,
        })
    );
    Ok(())
}
