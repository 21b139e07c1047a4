// SPDX-License-Identifier: Apache-2.0
//! `soak`: `--cycles` Create/Start/Stop/Shutdown cycles of the test guest against the daemon
//! from `--concurrency` clients at once, run in ten rounds. The daemon runs on a runtime of
//! this process (`--daemon in-process`, the default) or as `sandboxer serve` in its own process
//! (`--daemon process`: the binary a node runs, e.g. the static musl one of `tools/devtool
//! dist`, with its own allocator and nothing of the benchmark's client in its RSS). After each
//! round (every VM torn down, the pools refilled, the runtime's idle blocking threads gone) the
//! daemon process's fds, threads and RSS are sampled: growth is the last round's sample minus
//! the first's, so what one-time warm-up allocates does not count and what every cycle leaks
//! does. Then what is left on the host: entries under the state dir besides the daemon's own,
//! mounts under it, live VMs.
//!
//! Every cycle's calls are checked; a failed call counts as an error (the first few are
//! printed) and the cycle's sandbox is shut down.

use std::time::{Duration, Instant};

use integration_tests::{dir_entries, procstat};
use serde_json::json;

use crate::daemon::{Daemon, DaemonProcess, client_runtime, create_start, remove};
use crate::{Options, sandboxer_binary, vmm_host};

/// Rounds the cycles are split into (growth is measured from the first to the last).
const ROUNDS: usize = 10;
/// Errors printed in full.
const SHOWN_ERRORS: usize = 5;

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

/// The least-squares slope of `samples`' RSS, in KiB per round.
fn rss_trend_kib(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let xs = (0..samples.len()).map(|i| i as f64);
    let mean_x = xs.clone().sum::<f64>() / n;
    let mean_y = samples.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (x, s) in xs.zip(samples) {
        num += (x - mean_x) * (s.rss_kib as f64 - mean_y);
        den += (x - mean_x) * (x - mean_x);
    }
    num / den
}

/// The daemon under soak: in this process, or in its own.
enum Target {
    InProcess(Daemon),
    Process(DaemonProcess),
}

impl Target {
    fn start(o: &Options) -> anyhow::Result<Self> {
        Ok(if o.daemon_process {
            Target::Process(DaemonProcess::spawn(o, &sandboxer_binary(o)?, o.templates)?)
        } else {
            Target::InProcess(Daemon::start_with(o, o.templates)?)
        })
    }

    fn pid(&self) -> &str {
        match self {
            Target::InProcess(_) => "self",
            Target::Process(d) => &d.pid,
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        match self {
            Target::InProcess(d) => d.socket.clone(),
            Target::Process(d) => d.socket.clone(),
        }
    }

    fn state_dir(&self) -> std::path::PathBuf {
        match self {
            Target::InProcess(d) => d.state_dir(),
            Target::Process(d) => d.state_dir(),
        }
    }

    fn sample(&self) -> Sample {
        let pid = self.pid();
        Sample {
            fds: procstat::fd_count_of(pid),
            threads: procstat::thread_count_of(pid),
            rss_kib: procstat::rss_kib_of(pid),
        }
    }

    /// Waits until every VM of the round is torn down and the pools are refilled, then for
    /// the runtime's idle blocking threads to exit (after BLOCKING_KEEP_ALIVE). In process the
    /// VMM host says when; from outside, the daemon's fd and thread counts must hold still for
    /// a second (up to a minute).
    fn settle(&self) {
        let keep_alive = controller::server::BLOCKING_KEEP_ALIVE + Duration::from_millis(500);
        match self {
            Target::InProcess(_) => {
                vmm_host().wait_all_torn_down(Duration::from_secs(60));
                vmm_host().wait_pool_full(Duration::from_secs(30));
                std::thread::sleep(keep_alive);
            }
            Target::Process(_) => {
                std::thread::sleep(keep_alive);
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut last = (0, 0);
                let mut still = 0;
                while still < 4 && Instant::now() < deadline {
                    let s = self.sample();
                    if (s.fds, s.threads) == last {
                        still += 1;
                    } else {
                        (last, still) = ((s.fds, s.threads), 0);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    /// VMs alive: in process, the VMM host's count; from outside, the daemon's KVM VM fds
    /// beyond `baseline` (what it held, pooled shells included, once settled at the start).
    fn live_vms(&self, baseline: usize) -> usize {
        match self {
            Target::InProcess(_) => vmm_host().live_vms(),
            Target::Process(d) => kvm_vm_fds(&d.pid).saturating_sub(baseline),
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        match self {
            Target::InProcess(d) => d.stop(),
            Target::Process(d) => d.stop(),
        }
    }
}

/// The KVM VM fds process `pid` holds.
fn kvm_vm_fds(pid: &str) -> usize {
    procstat::fd_kinds_of(pid)
        .get("anon_inode:kvm-vm")
        .copied()
        .unwrap_or(0)
}

/// What the daemon keeps in its state dir besides the sandboxes' directories.
fn own_entry(name: &str) -> bool {
    matches!(name, "templates.json" | "images") || name == controller::store::SANDBOXES_DIR
}

pub(crate) fn soak(o: &Options) -> anyhow::Result<()> {
    let cycles = o.cycles.max(ROUNDS);
    let clients = o.concurrency;
    let daemon = Target::start(o)?;
    let rt = client_runtime()?;
    let socket = daemon.socket();
    let state = daemon.state_dir();
    daemon.settle();
    let vm_fds_at_start = match &daemon {
        Target::InProcess(_) => 0,
        Target::Process(d) => kvm_vm_fds(&d.pid),
    };

    let t0 = Instant::now();
    let mut samples = Vec::with_capacity(ROUNDS);
    let mut errors = 0usize;
    let mut shown = Vec::new();
    let per_round = cycles / ROUNDS;
    for round in 0..ROUNDS {
        let socket = socket.clone();
        let failed: Vec<String> = rt.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for c in 0..clients {
                let socket = socket.clone();
                set.spawn(async move {
                    let mut failed = Vec::new();
                    let mut client = match controller::client::v2_client(&socket).await {
                        Ok(c) => c,
                        Err(e) => return vec![format!("connect: {e}")],
                    };
                    for i in (c..per_round).step_by(clients) {
                        let id = format!("soak-{round}-{i}");
                        let started = create_start(&mut client, &id).await;
                        let removed = remove(&mut client, &id).await;
                        if let Err(e) = started.map(drop).and(removed) {
                            failed.push(format!("{id}: {e:#}"));
                            // Whatever state it is in, it must not stay.
                            let _ = client
                                .shutdown(proto::v2::sandbox::ControllerShutdownRequest {
                                    sandbox_id: id,
                                    sandboxer: "sandboxer".into(),
                                })
                                .await;
                        }
                    }
                    failed
                });
            }
            let mut all = Vec::new();
            while let Some(r) = set.join_next().await {
                all.extend(r.unwrap_or_else(|e| vec![format!("client task: {e}")]));
            }
            all
        });
        errors += failed.len();
        for f in failed {
            if shown.len() < SHOWN_ERRORS {
                shown.push(f);
            }
        }
        daemon.settle();
        samples.push(daemon.sample());
        eprintln!(
            "soak: round {}/{ROUNDS}: {} cycles, {errors} errors so far, {} fds, {} threads, {} KiB RSS",
            round + 1,
            per_round * (round + 1),
            samples.last().map_or(0, |s| s.fds),
            samples.last().map_or(0, |s| s.threads),
            samples.last().map_or(0, |s| s.rss_kib),
        );
    }
    let wall = t0.elapsed();

    // Leftovers, with the daemon still up (its own files are expected).
    let left: Vec<String> = dir_entries(&state)
        .into_iter()
        .filter(|n| !own_entry(n))
        .chain(dir_entries(&state.join(controller::store::SANDBOXES_DIR)))
        .collect();
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", daemon.pid()))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*state.to_string_lossy()))
        .count();
    let live_vms = daemon.live_vms(vm_fds_at_start);
    let daemon_kind = match &daemon {
        Target::InProcess(_) => "in this process (glibc, the client beside it)".to_owned(),
        Target::Process(_) => format!(
            "`{} serve` in its own process",
            sandboxer_binary(o)?.display()
        ),
    };
    daemon.stop()?;

    let (first, last) = (samples[0], samples[ROUNDS - 1]);
    let growth = |a: usize, b: usize| b.cast_signed() - a.cast_signed();
    let fd_growth = growth(first.fds, last.fds);
    let thread_growth = growth(first.threads, last.threads);
    let rss_growth = last.rss_kib.cast_signed() - first.rss_kib.cast_signed();
    let done = per_round * ROUNDS;
    // A leak grows RSS every round; the allocator's warm-up and its noise do not. The
    // least-squares slope of rounds 2..10 tells them apart.
    let trend = rss_trend_kib(&samples[1..]) * 1000.0 / per_round.max(1) as f64;
    println!(
        "soak: {done} Create/Start/Stop/Shutdown cycles of test guest \"virtio\" (agent mode, {} \
         MiB, templates {}) from {clients} concurrent clients in {:.1} s ({:.0} cycles/s); the \
         daemon: {daemon_kind}",
        o.mem_mib,
        o.templates,
        wall.as_secs_f64(),
        done as f64 / wall.as_secs_f64()
    );
    println!("errors: {errors}");
    for e in &shown {
        println!("  {e}");
    }
    println!(
        "daemon growth from round 1 to round {ROUNDS} (all VMs torn down): fds {fd_growth:+}, \
         threads {thread_growth:+}, RSS {rss_growth:+} KiB; RSS trend over rounds 2-{ROUNDS} \
         {trend:+.1} KiB per 1,000 cycles"
    );
    println!(
        "left behind: {} entries under the state dir {:?}, {mounts} mounts under it, {live_vms} \
         live VMs",
        left.len(),
        left.iter().take(5).collect::<Vec<_>>()
    );
    let out = json!({
        "scenario": "soak",
        "cycles": done,
        "concurrency": clients,
        "templates": o.templates,
        "daemon": if o.daemon_process { "process" } else { "in-process" },
        "mem_mib": o.mem_mib,
        "wall_s": wall.as_secs_f64(),
        "errors": errors,
        "fd_growth": fd_growth,
        "thread_growth": thread_growth,
        "rss_growth_kib": rss_growth,
        "rss_trend_kib_per_1000_cycles": trend,
        "left_state_entries": left.len(),
        "left_mounts": mounts,
        "left_live_vms": live_vms,
    });
    println!("{out}");
    Ok(())
}
