// SPDX-License-Identifier: Apache-2.0
//! `soak`: `--cycles` Create/Start/Stop/Shutdown cycles of the test guest against the daemon
//! (in this process) from `--concurrency` clients at once, run in ten rounds. After each round
//! (every VM torn down, the pools refilled, the runtime's idle blocking threads gone) the
//! daemon process's fds, threads and RSS are sampled: growth is the last round's sample minus the first's, so what one-time warm-up
//! allocates does not count and what every cycle leaks does. Then what is left on the host:
//! entries under the state dir besides the daemon's own, mounts under it, live VMs.
//!
//! Every cycle's calls are checked; a failed call counts as an error (the first few are
//! printed) and the cycle's sandbox is shut down.

use std::time::{Duration, Instant};

use integration_tests::{dir_entries, procstat};
use serde_json::json;

use crate::daemon::{Daemon, client_runtime, create_start, remove};
use crate::{Options, vmm_host};

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

fn sample() -> Sample {
    Sample {
        fds: procstat::fd_count(),
        threads: procstat::thread_count(),
        rss_kib: procstat::rss_kib(),
    }
}

/// What the daemon keeps in its state dir besides the sandboxes' directories.
fn own_entry(name: &str) -> bool {
    matches!(name, "templates.json" | "images") || name == controller::store::SANDBOXES_DIR
}

pub(crate) fn soak(o: &Options) -> anyhow::Result<()> {
    let cycles = o.cycles.max(ROUNDS);
    let clients = o.concurrency;
    let daemon = Daemon::start_with(o, o.templates)?;
    let rt = client_runtime()?;
    let socket = daemon.socket.clone();
    let state = daemon.state_dir();

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
        vmm_host().wait_all_torn_down(Duration::from_secs(60));
        vmm_host().wait_pool_full(Duration::from_secs(30));
        // Idle blocking-pool threads exit after BLOCKING_KEEP_ALIVE: what is left after it is
        // what the daemon keeps.
        std::thread::sleep(controller::server::BLOCKING_KEEP_ALIVE + Duration::from_millis(500));
        samples.push(sample());
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
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*state.to_string_lossy()))
        .count();
    let live_vms = vmm_host().live_vms();
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
         MiB, templates {}) from {clients} concurrent clients in {:.1} s ({:.0} cycles/s)",
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
