// SPDX-License-Identifier: Apache-2.0
//! `upgrade`: live upgrades of the daemon (docs/restarts.md, "Upgrade") with sandboxes
//! running. `sandboxer serve` (the `--sandboxer` binary, in its own process: [`DaemonProcess`])
//! runs `--alive` sandboxes of the agent-mode test guest with `agent.counter_port`: each guest
//! counts in its own memory, one per `--counter-ms` tick (`agent.counter_ms`), and streams the
//! count to a unix socket this benchmark listens on (the hybrid vsock path `<sandbox
//! dir>/vsock.sock_<port>`); with `--dirty-kib N` each guest also writes N KiB at every agent
//! connection and leaves them alone (`agent.dirty_kib`): memory a clone keeps written, which a
//! handover must carry. The tick is coarse by default: each one costs the host a few VM
//! exits and a vsock packet, and a hundred guests at the guest's own default (10 ms) keep both
//! cores of the development machine busy, which is not the idle pod an upgrade meets. Then
//! `--rounds` upgrades in a row, each to a new process of the same binary through the admin
//! API (`sandboxer.admin.v1.Admin/Upgrade`, what `sandboxer upgrade` calls). After each, every
//! sandbox is checked in the new process: Status says `SANDBOX_READY`, and its guest's count
//! went on above the last number read before the upgrade and never went back (a guest booted
//! again starts over at 1). A sandbox that fails either check is lost and not checked again;
//! any loss fails the run.
//!
//! Figures, per round and over all rounds:
//! - pause: the daemon's `pauses_us`, one per VM: from the old process's VMM beginning to stop
//!   its vCPUs to the new process letting them run (the time the guest does not run, give or
//!   take the few microseconds a vCPU takes to stop and to start);
//! - total: the daemon's `total_us`, from the request to the new process running every VM;
//! - wall: Upgrade sent -> answered, at this benchmark (the old process answers once the new
//!   one has taken over);
//! - old exit: answered -> the old process gone (it exits once its answer is out; the kernel
//!   tears down its KVM VMs then);
//! - gap: per guest, the longest time between two counter lines across the upgrade, at this
//!   benchmark's listener: what a host-side peer of a guest's vsock stream sees. The pause,
//!   plus the time until the connection the old process carried ends (its host end closes
//!   when the old process exits) and the guest has dialled again, plus the host's scheduling;
//! - freeze: the daemon's `freezes_us`, one per VM: from its vCPUs beginning to stop to its
//!   state saved and back with the upgrade's task, in the old process;
//! - steps: the daemon's `phases`, when each step of the handover ended, from the request
//!   (held, prepared, cut, sent: every VM frozen and sent, restored: the new process wrote
//!   every VM's state, ready, committed, done: every VM runs in the new process);
//! - window CPU: the CPU time (user + system, every thread, the guests' vCPU threads
//!   included) the old process took from cutting the Task endpoints to its Commit
//!   (`old_window_cpu_us`) plus the new process's from waiting for the first frozen VM to
//!   every VM running (`new_window_cpu_us`), per VM handed over. With every VM's pause
//!   spanning most of that window on a host with fewer cores than VMs, the pause follows it
//!   (BENCHMARKS.md: round p99 and CPU per VM correlate at 0.9 at 100 VMs here): the figure
//!   to compare when a change moves the CPU a handover takes.
//!
//! The daemons after the first are not this process's children: the last one is stopped by
//! its pid (SIGTERM), and whichever one runs is killed if the run fails.

use std::io::BufRead;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use integration_tests::Summary;
use proto::admin::v1::UpgradeRequest;
use proto::admin::v1::admin_client::AdminClient;
use proto::v2::sandbox::ControllerStatusRequest;
use serde_json::json;

use crate::daemon::{Client, DaemonProcess, client_runtime, create_start, remove};
use crate::{Options, sandboxer_binary};

/// Host port each guest streams its count to.
const COUNTER_PORT: u32 = 5005;
/// How long every guest gets to count (after Start, and again after each upgrade), beyond
/// three of its ticks.
const COUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a counter's thread looks whether it should end, while its guest streams.
const POLL: Duration = Duration::from_millis(100);
/// How long the old process gets to exit after answering the upgrade.
const OLD_EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Lost sandboxes printed in full.
const SHOWN_LOST: usize = 5;

/// What one guest's counter stream has shown.
#[derive(Clone, Debug, Default)]
struct Seen {
    lines: u64,
    last: u64,
    last_at: Option<Instant>,
    connections: usize,
    /// Since the window began: the first number not above the one before (before, after).
    went_back: Option<(u64, u64)>,
    /// Since the window began: the longest time between two lines.
    max_gap: Duration,
}

impl Seen {
    fn record(&mut self, n: u64, at: Instant) {
        if self.lines > 0 && n <= self.last && self.went_back.is_none() {
            self.went_back = Some((self.last, n));
        }
        if let Some(prev) = self.last_at {
            self.max_gap = self.max_gap.max(at.saturating_duration_since(prev));
        }
        self.lines += 1;
        self.last = n;
        self.last_at = Some(at);
    }
}

/// Listens on a sandbox's counter port and records what its guest sends, on a thread of its
/// own (the guest dials again whenever its connection ends).
struct Counter {
    path: PathBuf,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Counter {
    fn listen(sandbox_dir: &Path) -> anyhow::Result<Self> {
        let path = sandbox_dir.join(format!("vsock.sock_{COUNTER_PORT}"));
        let listener =
            UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("bench-counter".into())
            .spawn({
                let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
                move || serve_counter(&listener, &seen, &stop)
            })?;
        Ok(Counter {
            path,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn seen(&self) -> Seen {
        self.seen.lock().expect("poisoned").clone()
    }

    /// Starts a window (for [`Seen::went_back`] and [`Seen::max_gap`]); the last number so far.
    fn begin_window(&self) -> u64 {
        let mut s = self.seen.lock().expect("poisoned");
        s.went_back = None;
        s.max_gap = Duration::ZERO;
        s.last
    }

    /// Ends the thread: it sees the flag at its next line or [`POLL`], or, waiting for a
    /// connection, at the one this makes (while the socket is there: before the sandbox's
    /// Shutdown removes its directory; otherwise the thread is left to the process's end).
    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Relaxed);
        if UnixStream::connect(&self.path).is_ok() {
            let _ = thread.join();
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_counter(listener: &UnixListener, seen: &Mutex<Seen>, stop: &AtomicBool) {
    while let Ok((stream, _)) = listener.accept() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        seen.lock().expect("poisoned").connections += 1;
        if stream.set_read_timeout(Some(POLL)).is_err() {
            continue;
        }
        let mut reader = std::io::BufReader::new(stream);
        let mut line = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match reader.read_until(b'\n', &mut line) {
                Ok(_) if line.last() == Some(&b'\n') => {
                    let n = std::str::from_utf8(&line)
                        .ok()
                        .and_then(|s| s.trim_end().parse::<u64>().ok());
                    line.clear();
                    if let Some(n) = n {
                        seen.lock().expect("poisoned").record(n, Instant::now());
                    }
                }
                // The connection ended (inside a line or not).
                Ok(_) => break,
                // A partial line stays in `line` for the next read.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// One upgrade's figures.
struct Round {
    /// Sandboxes running going in.
    alive: usize,
    /// Sandboxes the daemon says it handed over.
    handed_over: u32,
    lost: usize,
    old_pid: u32,
    new_pid: u32,
    pauses: Vec<Duration>,
    total: Duration,
    wall: Duration,
    /// Upgrade answered -> the old process gone.
    old_exit: Duration,
    gaps: Vec<Duration>,
    /// The daemon's steps: when each ended, from the request.
    phases: Vec<(String, Duration)>,
    /// Each VM's freeze (vCPUs paused, state saved), in the old process.
    freezes: Vec<Duration>,
    /// CPU time over the handover window: the old process's, the new one's.
    window_cpu: (Duration, Duration),
}

impl Round {
    /// Both processes' CPU time over the window per VM handed over, in ms.
    fn cpu_ms_per_vm(&self) -> f64 {
        let (old, new) = self.window_cpu;
        ms(old + new) / f64::from(self.handed_over.max(1))
    }
}

/// A sandbox's Status: the API state, and the daemon's own state and exit reason when it is
/// not `SANDBOX_READY`.
async fn state(client: &mut Client, id: &str) -> anyhow::Result<(String, String)> {
    let s = client
        .status(ControllerStatusRequest {
            sandbox_id: id.into(),
            verbose: false,
            sandboxer: "sandboxer".into(),
        })
        .await?
        .into_inner();
    let get = |k: &str| s.info.get(k).map_or("?", String::as_str).to_owned();
    let why = format!("{}: {}", get("state"), get("exit_reason"));
    Ok((s.state, why))
}

/// The last line of a sandbox's guest console, if it has one.
fn console_tail(sandbox_dir: &Path) -> Option<String> {
    let log = std::fs::read(sandbox_dir.join(controller::service::admin::CONSOLE_LOG)).ok()?;
    let text = String::from_utf8_lossy(&log);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_owned)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn upgrade(o: &Options) -> anyhow::Result<()> {
    let alive = o.alive_one(100)?;
    let rounds = o.rounds;
    let bin = std::path::absolute(sandboxer_binary(o)?)?;
    let tick = Duration::from_millis(o.counter_ms);
    let count_timeout = COUNT_TIMEOUT + tick * 3;
    let mut counter_words = vec![
        test_guests::agent::counter_port(COUNTER_PORT),
        test_guests::agent::counter_ms(o.counter_ms),
    ];
    if o.dirty_kib > 0 {
        counter_words.push(test_guests::agent::dirty_kib(o.dirty_kib));
    }
    let counter_words: Vec<&str> = counter_words.iter().map(String::as_str).collect();
    let mut daemon = DaemonProcess::spawn_with(o, &bin, o.templates, &counter_words)?;
    let sandboxes_dir = daemon.state_dir().join(controller::store::SANDBOXES_DIR);
    let rt = client_runtime()?;
    let ids: Vec<String> = (0..alive).map(|i| format!("upgrade-{i}")).collect();
    // Declared after the daemon: on an early return they end first, while their sockets exist.
    let mut counters: Vec<Counter> = Vec::with_capacity(alive);
    let mut client = rt.block_on(controller::client::v2_client(&daemon.socket))?;
    if o.templates {
        // The daemon builds its template in the background and Start never waits for it:
        // probe until a Start is a clone.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = rt.block_on(create_start(&mut client, "upgrade-probe"))?;
            rt.block_on(remove(&mut client, "upgrade-probe"))?;
            if probe.cloned() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the daemon's VM template did not come up within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut clones = 0usize;
    for id in &ids {
        let started = rt.block_on(create_start(&mut client, id))?;
        clones += usize::from(started.cloned());
        counters.push(Counter::listen(&sandboxes_dir.join(id))?);
    }
    drop(client);
    let deadline = Instant::now() + count_timeout;
    for (id, c) in ids.iter().zip(&counters) {
        while c.seen().lines < 3 {
            if Instant::now() > deadline {
                bail!(
                    "{id}: its guest sent {} counter lines in {} s after Start",
                    c.seen().lines,
                    count_timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // How fast the guests count before the first upgrade (over 1 s, at least 5 ticks): fewer
    // lines than ticks means the host cannot run every guest as often as it asks (under
    // `kvm_pvm` every guest instruction is emulated).
    let lines0: Vec<u64> = counters.iter().map(|c| c.seen().lines).collect();
    let t0 = Instant::now();
    std::thread::sleep((tick * 5).max(Duration::from_secs(1)));
    let window = t0.elapsed().as_secs_f64();
    let mut rates: Vec<f64> = counters
        .iter()
        .zip(&lines0)
        .map(|(c, l0)| (c.seen().lines - l0) as f64 / window)
        .collect();
    rates.sort_by(f64::total_cmp);
    let rate_min = rates.first().copied().unwrap_or_default();
    let rate_p50 = rates.get(rates.len() / 2).copied().unwrap_or_default();

    // Indices of the sandboxes not lost so far.
    let mut live: Vec<usize> = (0..alive).collect();
    let mut lost_why: Vec<String> = Vec::new();
    let mut done: Vec<Round> = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let before: Vec<u64> = live.iter().map(|&i| counters[i].begin_window()).collect();
        let socket = daemon.socket.clone();
        let binary = bin.to_string_lossy().into_owned();
        let (wall, r) = rt
            .block_on(async move {
                let mut admin = AdminClient::new(controller::client::connect(&socket).await?);
                let t0 = Instant::now();
                let r = admin.upgrade(UpgradeRequest { binary }).await?.into_inner();
                Ok::<_, anyhow::Error>((t0.elapsed(), r))
            })
            .with_context(|| format!("round {round}: Upgrade"))?;
        ensure!(
            r.old_pid.to_string() == daemon.pid,
            "round {round}: the upgrade answered from pid {}, the daemon was {}",
            r.old_pid,
            daemon.pid
        );
        let answered = Instant::now();
        daemon
            .handed_over(r.new_pid, OLD_EXIT_TIMEOUT)
            .with_context(|| format!("round {round}"))?;
        let old_exit = answered.elapsed();

        // Every guest goes on counting from where it was.
        let deadline = Instant::now() + count_timeout;
        let mut pending: Vec<usize> = (0..live.len()).collect();
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&k| {
                let s = counters[live[k]].seen();
                s.went_back.is_none() && s.last <= before[k]
            });
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut client = rt.block_on(controller::client::v2_client(&daemon.socket))?;
        let mut lost = vec![false; live.len()];
        let mut gaps = Vec::with_capacity(live.len());
        for (k, &i) in live.iter().enumerate() {
            let s = counters[i].seen();
            let id = &ids[i];
            let mut why = Vec::new();
            if let Some((was, then)) = s.went_back {
                why.push(format!("its counter went back from {was} to {then}"));
            } else if s.last <= before[k] {
                why.push(format!(
                    "its counter stopped at {} ({} before the upgrade)",
                    s.last, before[k]
                ));
            }
            match rt.block_on(state(&mut client, id)) {
                Ok((st, _)) if st == "SANDBOX_READY" => {}
                Ok((st, detail)) => why.push(format!("Status {st} ({detail})")),
                Err(e) => why.push(format!("Status: {e:#}")),
            }
            if why.is_empty() {
                gaps.push(s.max_gap);
                continue;
            }
            if let Some(last) = console_tail(&sandboxes_dir.join(id)) {
                why.push(format!("its console ends {last:?}"));
            }
            lost_why.push(format!("round {round}: {id}: {}", why.join("; ")));
            lost[k] = true;
        }
        for f in &r.failed {
            lost_why.push(format!("round {round}: the daemon reports {f}"));
        }
        let lost_now = lost.iter().filter(|l| **l).count();
        let going_in = live.len();
        let mut flags = lost.iter();
        live.retain(|_| !flags.next().copied().unwrap_or(false));
        let x = Round {
            alive: going_in,
            handed_over: r.sandboxes,
            lost: lost_now,
            old_pid: r.old_pid,
            new_pid: r.new_pid,
            pauses: r
                .pauses_us
                .iter()
                .map(|us| Duration::from_micros(*us))
                .collect(),
            total: Duration::from_micros(r.total_us),
            wall,
            old_exit,
            gaps,
            phases: r
                .phases
                .iter()
                .map(|ph| (ph.name.clone(), Duration::from_micros(ph.at_us)))
                .collect(),
            freezes: r
                .freezes_us
                .iter()
                .map(|us| Duration::from_micros(*us))
                .collect(),
            window_cpu: (
                Duration::from_micros(r.old_window_cpu_us),
                Duration::from_micros(r.new_window_cpu_us),
            ),
        };
        let (p, g) = (Summary::of(&x.pauses), Summary::of(&x.gaps));
        eprintln!(
            "upgrade: round {round}/{rounds}: pid {} -> {}, {} of {} handed over, {} lost, pause \
             p50 {:.3} ms p99 {:.3} ms, total {:.3} ms, wall {:.3} ms, old process gone {:.3} ms \
             after answering, gap p99 {:.3} ms",
            x.old_pid,
            x.new_pid,
            x.handed_over,
            x.alive,
            x.lost,
            p.p50_ms,
            p.p99_ms,
            ms(x.total),
            ms(x.wall),
            ms(x.old_exit),
            g.p99_ms
        );
        let f = Summary::of(&x.freezes);
        let steps: Vec<String> = x
            .phases
            .iter()
            .map(|(name, at)| format!("{name} {:.1}", ms(*at)))
            .collect();
        eprintln!(
            "upgrade: round {round}/{rounds}: freeze per VM p50 {:.3} ms p99 {:.3} ms; steps \
             ended at (ms from the request): {}; window CPU old {:.1} ms + new {:.1} ms = {:.3} \
             ms per VM",
            f.p50_ms,
            f.p99_ms,
            steps.join(", "),
            ms(x.window_cpu.0),
            ms(x.window_cpu.1),
            x.cpu_ms_per_vm()
        );
        done.push(x);
    }

    // Every sandbox goes, through the last daemon; then the daemon.
    for c in &mut counters {
        c.stop();
    }
    let mut client = rt.block_on(controller::client::v2_client(&daemon.socket))?;
    let mut teardown: Vec<String> = Vec::new();
    for id in &ids {
        if let Err(e) = rt.block_on(remove(&mut client, id)) {
            teardown.push(format!("{e:#}"));
        }
    }
    drop(client);
    let last_pid = daemon.pid.clone();
    let lost: usize = done.iter().map(|x| x.lost).sum();
    if lost > 0 {
        eprintln!(
            "upgrade: the daemon's last log lines:\n{}",
            daemon.log_tail()
        );
    }
    daemon.stop()?;

    println!(
        "upgrade: {rounds} live upgrades in a row of `{} serve` in its own process, each to a \
         new process of the same binary (admin API Upgrade), with {alive} sandboxes running: \
         test guest \"virtio\" in agent mode counting in its memory every {} ms and \
         streaming the count over vsock, {} MiB, seccomp {}, {clones} of them clones of a VM \
         template (their written pages go over as a delta), the rest booted. pause: per VM, the old VMM begins \
         stopping its vCPUs -> the new process lets them run (the daemon's pauses_us); total: the \
         daemon's total_us, request -> every VM running in the new process; wall: Upgrade sent \
         -> answered, at the benchmark; gap: per guest, the longest time between two counter \
         lines across the upgrade, at the benchmark's listener. Before the first upgrade each \
         guest sent {rate_p50:.2} counter lines a second (p50; min {rate_min:.2}; {:.2}: it \
         keeps its tick)",
        bin.display(),
        o.counter_ms,
        o.mem_mib,
        o.seccomp.name(),
        1000.0 / o.counter_ms as f64
    );
    println!(
        "{:>6} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "round",
        "alive",
        "lost",
        "pause p50",
        "pause p99",
        "pause max",
        "total ms",
        "wall ms",
        "old exit",
        "gap p50",
        "gap p99",
        "CPU ms/VM"
    );
    let row = |label: &str,
               alive: usize,
               lost: usize,
               p: &Summary,
               t: [Duration; 3],
               g: &Summary,
               cpu: f64| {
        let [total, wall, exit] = t.map(ms);
        println!(
            "{label:>6} {alive:>6} {lost:>6} {:>10.3} {:>10.3} {:>10.3} {total:>10.3} \
             {wall:>10.3} {exit:>10.3} {:>10.3} {:>10.3} {cpu:>10.3}",
            p.p50_ms, p.p99_ms, p.max_ms, g.p50_ms, g.p99_ms
        );
    };
    let mut all_pauses = Vec::new();
    let mut all_gaps = Vec::new();
    let mut per_round = Vec::new();
    for (n, x) in done.iter().enumerate() {
        let (p, g) = (Summary::of(&x.pauses), Summary::of(&x.gaps));
        row(
            &(n + 1).to_string(),
            x.alive,
            x.lost,
            &p,
            [x.total, x.wall, x.old_exit],
            &g,
            x.cpu_ms_per_vm(),
        );
        all_pauses.extend_from_slice(&x.pauses);
        all_gaps.extend_from_slice(&x.gaps);
        per_round.push(json!({
            "round": n + 1,
            "alive": x.alive,
            "handed_over": x.handed_over,
            "lost": x.lost,
            "old_pid": x.old_pid,
            "new_pid": x.new_pid,
            "pause_p50_ms": p.p50_ms,
            "pause_p99_ms": p.p99_ms,
            "pause_max_ms": p.max_ms,
            "total_ms": ms(x.total),
            "wall_ms": ms(x.wall),
            "old_exit_ms": ms(x.old_exit),
            "gap_p50_ms": g.p50_ms,
            "gap_p99_ms": g.p99_ms,
            "freeze_p50_ms": Summary::of(&x.freezes).p50_ms,
            "freeze_p99_ms": Summary::of(&x.freezes).p99_ms,
            "steps_ms": x.phases.iter().map(|(n, at)| (n.clone(), ms(*at))).collect::<Vec<_>>(),
            "window_cpu_old_ms": ms(x.window_cpu.0),
            "window_cpu_new_ms": ms(x.window_cpu.1),
            "window_cpu_ms_per_vm": x.cpu_ms_per_vm(),
        }));
    }
    let (p, g) = (Summary::of(&all_pauses), Summary::of(&all_gaps));
    let total = done.iter().map(|x| x.total).max().unwrap_or_default();
    let wall = done.iter().map(|x| x.wall).max().unwrap_or_default();
    let old_exit = done.iter().map(|x| x.old_exit).max().unwrap_or_default();
    let mut cpus: Vec<f64> = done.iter().map(Round::cpu_ms_per_vm).collect();
    cpus.sort_by(f64::total_cmp);
    let cpu_median = cpus.get(cpus.len() / 2).copied().unwrap_or(0.0);
    row(
        "all",
        alive,
        lost,
        &p,
        [total, wall, old_exit],
        &g,
        cpu_median,
    );
    println!(
        "all: pause and gap over every VM of every round; total, wall and old exit: the longest \
         round; CPU ms/VM: both daemon processes' CPU time over the handover window per VM \
         handed over (all: the rounds' median); old exit: Upgrade answered -> the old process gone; \
         the last daemon (pid {last_pid}) stopped with SIGTERM after every sandbox's \
         Stop+Shutdown"
    );
    println!("lost: {lost}");
    for why in lost_why.iter().take(SHOWN_LOST) {
        println!("  {why}");
    }
    if !teardown.is_empty() {
        println!("teardown failed for {} sandboxes:", teardown.len());
        for e in teardown.iter().take(SHOWN_LOST) {
            println!("  {e}");
        }
    }
    let out = json!({
        "scenario": "upgrade",
        "daemon": "process",
        "alive": alive,
        "rounds": rounds,
        "counter_ms": o.counter_ms,
        "dirty_kib": o.dirty_kib,
        "mem_mib": o.mem_mib,
        "seccomp": o.seccomp.name(),
        "templates": o.templates,
        "clones": clones,
        "lost": lost,
        "pause_p50_ms": p.p50_ms,
        "pause_p99_ms": p.p99_ms,
        "pause_max_ms": p.max_ms,
        "window_cpu_ms_per_vm": cpu_median,
        "total_ms": ms(total),
        "wall_ms": ms(wall),
        "old_exit_ms": ms(old_exit),
        "gap_p50_ms": g.p50_ms,
        "gap_p99_ms": g.p99_ms,
        "count_hz_p50": rate_p50,
        "count_hz_min": rate_min,
        "teardown_errors": teardown.len(),
        "per_round": per_round,
    });
    println!("{out}");
    ensure!(
        lost == 0,
        "{lost} sandboxes lost (the first are listed above)"
    );
    ensure!(
        teardown.is_empty(),
        "Stop+Shutdown failed after the upgrades: {}",
        teardown.join("; ")
    );
    Ok(())
}
