// SPDX-License-Identifier: Apache-2.0
//! `template-start`: the daemon (in this process) with VM templates, driven over gRPC like
//! `sandbox-start`, the same test guest. In one run:
//! - Create+Start of clones (one at a time, the template's shell pool refilled in between),
//!   each checked to be a clone (it waited for no ready line), with the VM phase (building the
//!   clone, `Vm::clone_from`) and the CPU time of the host's own threads during Start;
//! - Create+Start of cold boots: pods that opt out with `io.sandboxer.template: "false"`;
//! - RSS per idle clone with `--alive` clones running (process RSS growth, which includes the
//!   pages each clone dirtied; the template's pages are shared and counted once);
//! - Starts per second: `--concurrency` clients start `--iterations` clones at once (the
//!   shell pool is not waited for: what it cannot supply is built on the spot).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use integration_tests::{Summary, procstat};
use serde_json::json;

use crate::daemon::{
    Daemon, PHASES, ROLES, Role, client_runtime, cloned, cpu_by_role, create_and_start,
    create_start, create_start_with, remove, start_phases,
};
use crate::{Options, plot, vmm_host};

pub(crate) fn template_start(o: &Options) -> anyhow::Result<()> {
    let alive = o.alive_one(100)?;
    let daemon = Daemon::start_with(o, true)?;
    let rt = client_runtime()?;
    let mut client = rt.block_on(controller::client::v2_client(&daemon.socket))?;
    let templates = daemon
        .templates
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the daemon has no templates"))?;
    for i in 0..3 {
        let id = format!("warm-{i}");
        rt.block_on(create_start(&mut client, &id))?;
        rt.block_on(remove(&mut client, &id))?;
    }

    // Clones, one at a time.
    let mut took = Vec::with_capacity(o.iterations);
    let mut vm = Vec::with_capacity(o.iterations);
    let mut phases: Vec<Vec<Duration>> = vec![Vec::new(); PHASES.len()];
    let mut host = Vec::with_capacity(o.iterations);
    for i in 0..o.iterations {
        vmm_host().wait_all_torn_down(Duration::from_secs(30));
        if !vmm_host().wait_pool_full(Duration::from_secs(10)) {
            bail!("sample {i}: the template's shell pool did not refill within 10 s");
        }
        let id = format!("clone-{i}");
        let s = rt.block_on(create_start(&mut client, &id))?;
        ensure!(
            s.cloned(),
            "sample {i} booted instead of cloning the template"
        );
        took.push(s.took);
        vm.push(s.vm());
        for (all, d) in phases.iter_mut().zip(&s.phases) {
            all.push(*d);
        }
        host.push(s.cpu.get(&Role::Host).copied().unwrap_or_default());
        rt.block_on(remove(&mut client, &id))?;
    }

    // Cold boots in the same daemon: pods that opt out.
    let opt_out = HashMap::from([(
        controller::pod::TEMPLATE_ANNOTATION.to_string(),
        "false".to_string(),
    )]);
    let mut cold = Vec::with_capacity(o.iterations);
    let mut cold_host = Vec::with_capacity(o.iterations);
    for i in 0..o.iterations {
        vmm_host().wait_all_torn_down(Duration::from_secs(30));
        vmm_host().wait_pool_full(Duration::from_secs(10));
        let id = format!("cold-{i}");
        let s = rt.block_on(create_start_with(&mut client, &id, opt_out.clone()))?;
        ensure!(!s.cloned(), "cold sample {i} was a clone");
        cold.push(s.took);
        cold_host.push(s.cpu.get(&Role::Host).copied().unwrap_or_default());
        rt.block_on(remove(&mut client, &id))?;
    }

    // RSS per idle clone.
    vmm_host().wait_all_torn_down(Duration::from_secs(30));
    vmm_host().wait_pool_full(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let (rss0, anon0) = (procstat::rss_kib(), procstat::rss_anon_kib());
    for i in 0..alive {
        rt.block_on(create_start(&mut client, &format!("alive-{i}")))?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, anon1) = (procstat::rss_kib(), procstat::rss_anon_kib());
    for i in 0..alive {
        rt.block_on(remove(&mut client, &format!("alive-{i}")))?;
    }
    let per = |a: u64, b: u64| (a as f64 - b as f64) / alive as f64;
    let (rss_per, anon_per) = (per(rss1, rss0), per(anon1, anon0));

    // Starts per second from concurrent clients: Create+Start only (no per-thread CPU reading,
    // no Status: reading every thread's schedstat took a quarter of the CPU with 200 clones
    // alive); each is checked to be a clone afterwards.
    vmm_host().wait_all_torn_down(Duration::from_secs(30));
    vmm_host().wait_pool_full(Duration::from_secs(10));
    let total = o.iterations;
    let (socket, clients) = (daemon.socket.clone(), o.concurrency);
    eprintln!("template-start: {total} Starts from {clients} clients at once");
    let cpu_before = procstat::threads_cpu();
    let wall = rt.block_on(async move {
        let mut connected = Vec::with_capacity(clients);
        for _ in 0..clients {
            connected.push(controller::client::v2_client(&socket).await?);
        }
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (c, mut client) in connected.into_iter().enumerate() {
            set.spawn(async move {
                for i in (c..total).step_by(clients) {
                    create_and_start(&mut client, &format!("rate-{i}"), HashMap::new()).await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        Ok::<_, anyhow::Error>(t0.elapsed())
    })?;
    // Where the burst's CPU went, per Start (one reading before and one after the burst).
    let burst_cpu = cpu_by_role(&cpu_before, &procstat::threads_cpu());
    let per_start =
        |r: Role| burst_cpu.get(&r).map_or(0.0, |d| d.as_secs_f64() * 1e3) / total.max(1) as f64;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut fallbacks = 0;
    for i in 0..total {
        if !cloned(&rt.block_on(start_phases(&mut client, &format!("rate-{i}")))?) {
            fallbacks += 1;
        }
    }
    let starts_per_s = total as f64 / wall.as_secs_f64();
    for i in 0..total {
        rt.block_on(remove(&mut client, &format!("rate-{i}")))?;
    }
    vmm_host().wait_all_torn_down(Duration::from_secs(60));
    let stats = templates.stats();
    drop(client);
    daemon.stop()?;

    let (s, c, v) = (Summary::of(&took), Summary::of(&cold), Summary::of(&vm));
    let (h, ch) = (Summary::of(&host), Summary::of(&cold_host));
    println!(
        "template-start: {} clone and {} cold Create+Start calls over gRPC (containerd 2.x API), \
         one at a time, test guest \"virtio\" in agent mode (a clone: the host connects to the \
         agent at once, Setup with the clock; a boot: READY first), {} MiB, template shell pool \
         {}, seccomp {}",
        o.iterations,
        o.iterations,
        o.mem_mib,
        o.template_pool,
        o.seccomp.name()
    );
    println!("{:<52} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    let row = |label: &str, x: &Summary| {
        println!("{label:<52} {:>10.3} {:>10.3}", x.p50_ms, x.p99_ms);
    };
    row("clone: Create sent -> Start returned", &s);
    row("  phase vm (Vm::clone_from: the clone runs)", &v);
    for ((name, _), p) in PHASES.iter().zip(&phases).skip(1) {
        row(&format!("  phase {name}"), &Summary::of(p));
    }
    row("  CPU time of the host's threads during Start", &h);
    row("cold boot: Create sent -> Start returned", &c);
    row("  CPU time of the host's threads during Start", &ch);
    println!(
        "RSS growth per idle clone with {alive} alive: {rss_per:.1} KiB (anonymous: {anon_per:.1} \
         KiB: the pages the clones dirtied)"
    );
    println!(
        "{starts_per_s:.0} Starts/s: {total} clones started by {clients} concurrent clients in \
         {:.3} s ({fallbacks} of them booted)",
        wall.as_secs_f64()
    );
    let burst: Vec<String> = ROLES
        .iter()
        .map(|(r, label)| format!("{label} {:.3}", per_start(*r)))
        .collect();
    println!("  CPU ms per Start over the burst: {}", burst.join(", "));
    let host_bound = cpus as f64 * 1e3 / per_start(Role::Host).max(f64::EPSILON);
    println!(
        "  {cpus} CPUs / the host's CPU per Start (daemon + vmm threads): at most {host_bound:.0} \
         Starts/s if the guests cost nothing (a bound, not a measurement)"
    );
    if let Some(path) = &o.plot {
        // A clone waits for no ready line: its agent_ready phase is 0 and left out.
        let clone_phases: Vec<plot::Phase<'_>> = PHASES
            .iter()
            .zip(&phases)
            .filter(|((name, _), _)| *name != "agent_ready")
            .map(|((name, _), samples)| plot::Phase { name, samples })
            .collect();
        plot::write(
            path,
            &format!(
                "template-start: Create sent -> Start returned, test guest, {} MiB ({} each)",
                o.mem_mib, o.iterations
            ),
            &[
                plot::Series {
                    name: "template clone",
                    samples: &took,
                },
                plot::Series {
                    name: "boot (pooled VM shell)",
                    samples: &cold,
                },
            ],
            "clone's Start",
            &clone_phases,
        )?;
    }
    let out = json!({
        "scenario": "template-start",
        "iterations": o.iterations,
        "mem_mib": o.mem_mib,
        "template_pool": o.template_pool,
        "seccomp": o.seccomp.name(),
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "clone_phases": PHASES
            .iter()
            .zip(&phases)
            .map(|((name, _), p)| {
                let p = Summary::of(p);
                ((*name).to_string(), json!({"p50_ms": p.p50_ms, "p99_ms": p.p99_ms}))
            })
            .collect::<serde_json::Map<_, _>>(),
        "clone_vm_p50_ms": v.p50_ms,
        "clone_vm_p99_ms": v.p99_ms,
        "host_p50_ms": h.p50_ms,
        "host_p99_ms": h.p99_ms,
        "cold_p50_ms": c.p50_ms,
        "cold_p99_ms": c.p99_ms,
        "cold_host_p50_ms": ch.p50_ms,
        "alive": alive,
        "rss_kib_per_sandbox": rss_per,
        "rss_anon_kib_per_sandbox": anon_per,
        "concurrency": clients,
        "starts_per_s": starts_per_s,
        "rate_starts_that_booted": fallbacks,
        "rate_cpu_ms_per_start": ROLES
            .iter()
            .map(|(r, _)| (format!("{r:?}").to_lowercase(), json!(per_start(*r))))
            .collect::<serde_json::Map<_, _>>(),
        "rate_host_bound_starts_per_s": host_bound,
        "template_hits": stats.hits,
        "template_misses": stats.misses,
    });
    println!("{out}");
    Ok(())
}
