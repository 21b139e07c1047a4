// SPDX-License-Identifier: Apache-2.0
//! `sandboxer-bench <scenario>`: the project's start-up benchmarks.
//!
//! Each scenario prints a short table and, as its last line, one JSON object with its figures.
//! Figures come from runs on the real `/dev/kvm` with the project's test guests.
//!
//! Scenarios:
//! - `vmm-start`: per-phase times of `Vm::start` and start -> boot-timer signal (p50/p99 over many
//!   boots), cold and from the pre-built shell pool (`vmm::Host`); host memory the VMM adds per VM
//!   with 1 and with N VMs alive; QEMU microvm on the same guest for comparison. `p50_ms`/`p99_ms`
//!   in the JSON are the pooled figures (the daemon keeps a pool for its default VM size); the
//!   cold ones are `cold_p50_ms`/`cold_p99_ms`.
//! - `blk`: the virtio-blk device path's cost per 4 KiB read and its IOPS (request parsing,
//!   guest-memory copies, used-ring updates, the used-buffer interrupt through the production
//!   `IrqTrigger`) on a tmpfs file, against plain `pread` of the same offsets from the same file
//!   into a page-aligned buffer. No KVM: the queue is driven in memory exactly as a guest would.
//! - `net`: the virtio-net device path's cost per frame, both ways, over a backend that does real
//!   I/O without root: one end of an AF_UNIX datagram socketpair (one frame per datagram, as a
//!   tap carries them). TX: frames the guest posted go through `VirtioNet::process_tx` into the
//!   socket; the baseline writes the same frames to the same kind of socket with `send`. RX:
//!   frames waiting in the socket go through `VirtioNet::process_rx` into the guest's buffers;
//!   the baseline `recv`s them into one buffer. Frames/s, us/frame and ratio (device/raw).
//! - `vsock`: a byte stream through the virtio-vsock device and its muxer to the host end of an
//!   in-process `VsockHandle` connection (a unix stream, what the daemon's agent connection
//!   uses), and back. TX: the guest's RW packets go through `Vsock::handle_txq_event` into the
//!   host stream; RX: bytes the host wrote come through `Vsock::handle_backend_event` into the
//!   guest's RX buffers. The guest keeps to the credit protocol. The baseline moves the same
//!   bytes, in the same chunks, through a plain unix stream socketpair. MB/s and ratio.
//! - `sandbox-start`: the daemon (in this process, on a temporary socket) driven through the
//!   containerd 2.x Sandbox API over gRPC (state dir on a tmpfs, like /run/sandboxer on a
//!   standard host): Create+Start until Start returns, p50/p99, with the daemon's default VM
//!   shell pool, and process RSS growth per running sandbox with 1 and N alive. The sandboxes
//!   boot the `virtio` test guest in agent mode (this host's KVM cannot run Linux): Start
//!   returns after the guest's ready signal over vsock and the agent's SyncClock and Setup.

#[path = "sandboxer-bench/devices.rs"]
mod devices;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::{Summary, procstat};
use serde_json::json;
use test_guests::Guest;
use vmm::{Vm, VmConfig};

/// Each scenario, what it measures and the options it reads.
const SCENARIOS: &[(&str, &str, &str)] = &[
    (
        "vmm-start",
        "per-phase Vm::start times, cold and pooled; host memory per VM; QEMU microvm (needs KVM)",
        "--iterations N (200) --alive N (100) --qemu-iterations N (20) --mem-mib N (128)",
    ),
    (
        "blk",
        "random 4 KiB reads through VirtioBlock::process_queue vs pread of the same offsets",
        "--iterations N (200): max(N, 1000) * 100 requests",
    ),
    (
        "net",
        "frames through VirtioNet TX and RX into/out of an AF_UNIX datagram socketpair vs \
         send/recv of the same frames on the same kind of socket",
        "--iterations N (200): max(N, 1000) * 500 frames each way; --frame-bytes N (1514)",
    ),
    (
        "vsock",
        "a byte stream through the vsock device and muxer to an in-process host stream and back \
         vs the same chunks through a unix stream socketpair",
        "--iterations N (200): max(N, 1000) * 100 packets each way; --packet-bytes N (4096)",
    ),
    (
        "sandbox-start",
        "Create+Start through the daemon's gRPC API, RSS per running sandbox (needs KVM)",
        "--iterations N (200) --alive N (100) --mem-mib N (128)",
    ),
];

fn usage() -> String {
    let mut s = String::from(
        "usage: sandboxer-bench <scenario> [--option N ...]\n       \
         sandboxer-bench [<scenario>] --help\n\nEach scenario prints a short table and, as its \
         last line, one JSON object.\n\nscenarios:\n",
    );
    for (name, what, opts) in SCENARIOS {
        s.push_str(&format!(
            "  {name:<14} {what}\n  {:<14} options: {opts}\n",
            ""
        ));
    }
    s
}

/// The VMM host every scenario of this process uses (KVM handle, shell pool, live count).
fn vmm_host() -> &'static vmm::Host {
    static HOST: std::sync::OnceLock<vmm::Host> = std::sync::OnceLock::new();
    HOST.get_or_init(vmm::Host::new)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        match args
            .first()
            .and_then(|a| SCENARIOS.iter().find(|(n, _, _)| n == a))
        {
            Some((name, what, opts)) => {
                println!("sandboxer-bench {name}: {what}\noptions: {opts}");
            }
            None => print!("{}", usage()),
        }
        return Ok(());
    }
    let Some(scenario) = args.first() else {
        bail!("{}", usage());
    };
    let opts = Options::parse(&args[1..])?;
    match scenario.as_str() {
        "vmm-start" => vmm_start(&opts),
        "blk" => devices::blk(&opts),
        "net" => devices::net(&opts),
        "vsock" => devices::vsock(&opts),
        "sandbox-start" => sandbox_start(&opts),
        other => bail!("unknown scenario {other:?}\n{}", usage()),
    }
}

#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) iterations: usize,
    pub(crate) alive: usize,
    pub(crate) qemu_iterations: usize,
    pub(crate) mem_mib: u32,
    pub(crate) frame_bytes: usize,
    pub(crate) packet_bytes: usize,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut o = Options {
            iterations: 200,
            alive: 100,
            qemu_iterations: 20,
            mem_mib: 128,
            frame_bytes: 1514,
            packet_bytes: 4096,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            let n: usize = value
                .parse()
                .with_context(|| format!("{flag}: {value:?} is not a number"))?;
            match flag.as_str() {
                "--iterations" => o.iterations = n.max(1),
                "--alive" => o.alive = n.max(1),
                "--qemu-iterations" => o.qemu_iterations = n,
                "--mem-mib" => o.mem_mib = u32::try_from(n).context("--mem-mib too large")?,
                "--frame-bytes" => o.frame_bytes = n,
                "--packet-bytes" => o.packet_bytes = n,
                _ => bail!("unknown option {flag}\n{}", usage()),
            }
        }
        Ok(o)
    }
}

fn config(guest: Guest, mem_mib: u32) -> VmConfig {
    let mut c = VmConfig::new(guest.elf());
    c.mem_mib = mem_mib;
    c.cmdline = "bench".into();
    c
}

/// Samples of one series of boots.
struct Boots {
    phases: Vec<(&'static str, Vec<Duration>)>,
    to_signal: Vec<Duration>,
    to_end: Vec<Duration>,
}

/// Boots `guest` `n` times, one at a time; with `pooled`, from a refilled shell pool.
fn run_boots(guest: Guest, n: usize, mem_mib: u32, pooled: bool) -> anyhow::Result<Boots> {
    let mut b = Boots {
        phases: [
            "vm_create",
            "memory",
            "kernel_load",
            "devices",
            "vcpu_create",
            "vcpu_start",
            "start_total",
        ]
        .into_iter()
        .map(|name| (name, Vec::with_capacity(n)))
        .collect(),
        to_signal: Vec::with_capacity(n),
        to_end: Vec::with_capacity(n),
    };
    if pooled {
        vmm_host().set_pool_target(mem_mib, 1)?;
    }
    for i in 0..n {
        if pooled && !vmm_host().wait_pool_full(Duration::from_secs(10)) {
            bail!("the shell pool did not refill");
        }
        let t0 = Instant::now();
        let vm = Vm::start(vmm_host(), config(guest, mem_mib))?;
        let end = vm.wait();
        let ended = t0.elapsed();
        let signal = vm.boot_time().with_context(|| {
            format!(
                "boot {i}: no boot-timer signal; exit {:?}; console {:?}",
                end.exit,
                vm.console()
            )
        })?;
        let t = vm.timings();
        if t.pooled != pooled {
            bail!("boot {i}: pooled is {} (expected {pooled})", t.pooled);
        }
        for (slot, d) in b.phases.iter_mut().zip([
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
        vmm_host().set_pool_target(mem_mib, 0)?;
    }
    Ok(b)
}

fn vmm_start(o: &Options) -> anyhow::Result<()> {
    test_guests::kvm_usable().map_err(anyhow::Error::msg)?;
    let guest = Guest::Quick;

    // Warm-up: opens /dev/kvm once for the process, faults in the binary's code.
    run_boots(guest, 3, o.mem_mib, false)?;
    let cold = run_boots(guest, o.iterations, o.mem_mib, false)?;
    let pooled = run_boots(guest, o.iterations, o.mem_mib, true)?;

    let (overhead_1, overhead_n) = (
        memory_overhead(1, o.mem_mib)?,
        memory_overhead(o.alive, o.mem_mib)?,
    );
    let qemu = qemu_runs(guest, o.qemu_iterations, o.mem_mib);

    println!(
        "vmm-start: {} boots each, cold and from the shell pool, of test guest {:?} ({} MiB, 1 vCPU)",
        o.iterations,
        guest.name(),
        o.mem_mib
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>12}",
        "phase", "cold p50", "cold p99", "pooled p50", "pooled p99"
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
        "host overhead per VM: {overhead_1:.1} KiB with 1 alive, {overhead_n:.1} KiB with {} alive",
        o.alive
    );
    let cold_signal = Summary::of(&cold.to_signal);
    let pooled_signal = Summary::of(&pooled.to_signal);
    let cold_end = Summary::of(&cold.to_end);
    let (qemu_p50, qemu_p99, ratio) = match &qemu {
        Ok(s) => {
            println!(
                "qemu microvm (spawn -> exit): p50 {:.3} ms, p99 {:.3} ms; {:.1}x our cold start -> guest ended",
                s.p50_ms,
                s.p99_ms,
                s.p50_ms / cold_end.p50_ms
            );
            (
                json!(s.p50_ms),
                json!(s.p99_ms),
                json!(s.p50_ms / cold_end.p50_ms),
            )
        }
        Err(e) => {
            println!("qemu microvm: not measured: {e:#}");
            (
                serde_json::Value::Null,
                serde_json::Value::Null,
                serde_json::Value::Null,
            )
        }
    };
    let out = json!({
        "scenario": "vmm-start",
        "guest": guest.name(),
        "iterations": o.iterations,
        "mem_mib": o.mem_mib,
        "p50_ms": pooled_signal.p50_ms,
        "p99_ms": pooled_signal.p99_ms,
        "cold_p50_ms": cold_signal.p50_ms,
        "cold_p99_ms": cold_signal.p99_ms,
        "cold_end_p50_ms": cold_end.p50_ms,
        "phases": phase_json,
        "overhead_kib_per_vm": overhead_n,
        "overhead_kib_per_vm_1": overhead_1,
        "alive": o.alive,
        "qemu_p50_ms": qemu_p50,
        "qemu_p99_ms": qemu_p99,
        "qemu_ratio": ratio,
    });
    println!("{out}");
    Ok(())
}

/// Create+Start through the daemon's gRPC API, and RSS per running sandbox.
fn sandbox_start(o: &Options) -> anyhow::Result<()> {
    use proto::v2::sandbox::{
        ControllerCreateRequest, ControllerShutdownRequest, ControllerStartRequest,
        ControllerStatusRequest, ControllerStopRequest,
    };

    /// The phases of Start the daemon reports in Status (`start_<phase>_us`), in order, and
    /// whether the guest's own work dominates them (the rest is the host's). Connecting to the
    /// agent waits for the guest to answer the vsock connection request.
    const PHASES: &[(&str, bool)] = &[
        ("vm", false),
        ("agent_ready", true),
        ("agent_connect", true),
        ("sync_clock", true),
        ("setup", true),
        ("task_server", false),
    ];

    test_guests::kvm_usable().map_err(anyhow::Error::msg)?;
    // State on a tmpfs, as the daemon's default /run/sandboxer is on a standard host (/run is a
    // tmpfs under systemd; on this development machine it is not, so use /dev/shm).
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("sandboxer-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut config = controller::config::Config {
        state_dir: dir.join("state"),
        stop_timeout_secs: 1,
        ..controller::config::Config::default()
    };
    config.api.socket = dir.join("api.sock");
    config.api.seed_socket = "".into();
    // The `virtio` guest's agent mode stands in for the guest agent: Start includes its ready
    // signal over vsock, the ttrpc connection, SyncClock and Setup; Stop's Control.Shutdown
    // ends the VM, as the real agent does. The guest ignores the initramfs, but the daemon
    // needs one.
    config.vm.kernel = Guest::Virtio.elf().to_path_buf();
    config.vm.cmdline = test_guests::agent::cmdline(
        vmm::config::DEFAULT_CMDLINE,
        &[
            test_guests::agent::QUIET,
            test_guests::agent::EXIT_ON_SHUTDOWN,
        ],
    );
    let initramfs = dir.join("initramfs.img");
    std::fs::write(&initramfs, b"not an initramfs: the test guest ignores it")?;
    config.vm.initramfs = initramfs;
    config.vm.mem_mib = o.mem_mib;
    let pool_depth = usize::try_from(config.vm.pool_depth)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        // The daemon keeps a pool for its default VM size, as `sandboxer serve` does.
        vmm_host().set_pool_target(o.mem_mib, pool_depth)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run_config = config.clone();
        let daemon = tokio::spawn(async move {
            controller::server::run(
                &run_config,
                controller::KvmBackend::new(vmm_host().clone()),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&config.api.socket).is_err() {
            if Instant::now() > deadline {
                bail!("the daemon never listened");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut client = controller::client::v2_client(&config.api.socket).await?;

        async fn create_start(
            client: &mut proto::v2::sandbox::controller_client::ControllerClient<
                tonic::transport::Channel,
            >,
            id: &str,
        ) -> anyhow::Result<(Duration, Vec<Duration>)> {
            let t0 = Instant::now();
            client
                .create(ControllerCreateRequest {
                    sandbox_id: id.into(),
                    sandboxer: "sandboxer".into(),
                    ..Default::default()
                })
                .await?;
            client
                .start(ControllerStartRequest {
                    sandbox_id: id.into(),
                    sandboxer: "sandboxer".into(),
                })
                .await?;
            let took = t0.elapsed();
            let info = client
                .status(ControllerStatusRequest {
                    sandbox_id: id.into(),
                    verbose: false,
                    sandboxer: "sandboxer".into(),
                })
                .await?
                .into_inner()
                .info;
            let phases = PHASES
                .iter()
                .map(|(name, _)| {
                    let key = format!("start_{name}_us");
                    info.get(&key)
                        .and_then(|v| v.parse().ok())
                        .map(Duration::from_micros)
                        .with_context(|| format!("Status has no {key}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((took, phases))
        }
        async fn remove(
            client: &mut proto::v2::sandbox::controller_client::ControllerClient<
                tonic::transport::Channel,
            >,
            id: &str,
        ) -> anyhow::Result<()> {
            client
                .stop(ControllerStopRequest {
                    sandbox_id: id.into(),
                    timeout_secs: 1,
                    sandboxer: "sandboxer".into(),
                })
                .await?;
            client
                .shutdown(ControllerShutdownRequest {
                    sandbox_id: id.into(),
                    sandboxer: "sandboxer".into(),
                })
                .await?;
            Ok(())
        }

        // Warm-up, then one sandbox at a time with the pool refilled in between (a steady
        // stream of pod starts).
        for i in 0..3 {
            let id = format!("warm-{i}");
            create_start(&mut client, &id).await?;
            remove(&mut client, &id).await?;
        }
        let mut samples = Vec::with_capacity(o.iterations);
        let mut phases = vec![Vec::with_capacity(o.iterations); PHASES.len()];
        let mut host = Vec::with_capacity(o.iterations);
        for i in 0..o.iterations {
            vmm_host().wait_pool_full(Duration::from_secs(10));
            let id = format!("bench-{i}");
            let (took, by_phase) = create_start(&mut client, &id).await?;
            samples.push(took);
            // The host's share: everything but the phases that wait on the guest's own work.
            let guest: Duration = PHASES
                .iter()
                .zip(&by_phase)
                .filter(|((_, in_guest), _)| *in_guest)
                .map(|(_, d)| *d)
                .sum();
            host.push(took.saturating_sub(guest));
            for (all, d) in phases.iter_mut().zip(by_phase) {
                all.push(d);
            }
            remove(&mut client, &id).await?;
        }
        vmm_host().wait_all_torn_down(Duration::from_secs(30));

        // RSS per running sandbox, 1 and N alive.
        let mut per_sandbox = Vec::new();
        for count in [1, o.alive] {
            vmm_host().wait_all_torn_down(Duration::from_secs(30));
            vmm_host().wait_pool_full(Duration::from_secs(10));
            let before = procstat::rss_kib();
            for i in 0..count {
                create_start(&mut client, &format!("alive-{count}-{i}")).await?;
            }
            // Every guest is up (Start returned after its agent's Setup) and waits in hlt.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let after = procstat::rss_kib();
            per_sandbox.push(after.saturating_sub(before) as f64 / count as f64);
            for i in 0..count {
                remove(&mut client, &format!("alive-{count}-{i}")).await?;
            }
        }
        let _ = stop_tx.send(());
        daemon.await??;
        Ok::<_, anyhow::Error>((samples, phases, host, per_sandbox))
    });
    vmm_host().set_pool_target(o.mem_mib, 0)?;
    let _ = std::fs::remove_dir_all(&dir);
    let (samples, phases, host, per_sandbox) = result?;
    let s = Summary::of(&samples);
    let h = Summary::of(&host);
    let phase_summaries: Vec<Summary> = phases.iter().map(|p| Summary::of(p)).collect();
    println!(
        "sandbox-start: {} Create+Start calls over gRPC (containerd 2.x API), test guest \"virtio\" in agent mode (Start includes READY, SyncClock, Setup), {} MiB, pool depth {pool_depth}",
        o.iterations, o.mem_mib
    );
    println!("{:<40} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!(
        "{:<40} {:>10.3} {:>10.3}",
        "Create+Start -> Start returned", s.p50_ms, s.p99_ms
    );
    for ((name, in_guest), p) in PHASES.iter().zip(&phase_summaries) {
        let label = format!(
            "  start phase {name}{}",
            if *in_guest { " (guest work)" } else { "" }
        );
        println!("{label:<40} {:>10.3} {:>10.3}", p.p50_ms, p.p99_ms);
    }
    println!(
        "{:<40} {:>10.3} {:>10.3}",
        "host share (total - guest work)", h.p50_ms, h.p99_ms
    );
    println!(
        "process RSS growth per running sandbox: {:.1} KiB with 1 alive, {:.1} KiB with {} alive (includes guest pages the guest touched)",
        per_sandbox[0], per_sandbox[1], o.alive
    );
    let out = json!({
        "scenario": "sandbox-start",
        "iterations": o.iterations,
        "mem_mib": o.mem_mib,
        "pool_depth": pool_depth,
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "host_p50_ms": h.p50_ms,
        "host_p99_ms": h.p99_ms,
        "phases": PHASES
            .iter()
            .zip(&phase_summaries)
            .map(|((name, _), p)| ((*name).to_string(), json!({"p50_ms": p.p50_ms, "p99_ms": p.p99_ms})))
            .collect::<serde_json::Map<_, _>>(),
        "rss_kib_per_sandbox": per_sandbox[1],
        "rss_kib_per_sandbox_1": per_sandbox[0],
        "alive": o.alive,
    });
    println!("{out}");
    Ok(())
}

/// Host memory the VMM adds per VM: process RSS growth minus guest memory the guest touched.
fn memory_overhead(count: usize, mem_mib: u32) -> anyhow::Result<f64> {
    vmm_host().wait_all_torn_down(Duration::from_secs(30));
    let before = procstat::rss_kib();
    let mut vms = Vec::with_capacity(count);
    for _ in 0..count {
        let vm = Vm::start(vmm_host(), config(Guest::Spin, mem_mib))?;
        vms.push(vm);
    }
    for vm in &vms {
        if vm.wait_boot(Duration::from_secs(10)).is_none() {
            bail!("a spinning guest never signalled boot: {:?}", vm.console());
        }
    }
    let after = procstat::rss_kib();
    let mut guest_kib = 0u64;
    for vm in &vms {
        guest_kib += vm.guest_resident_bytes()? / 1024;
    }
    drop(vms);
    vmm_host().wait_all_torn_down(Duration::from_secs(30));
    let growth = after.saturating_sub(before).saturating_sub(guest_kib);
    Ok(growth as f64 / count as f64)
}

/// QEMU microvm with KVM on the same guest, process spawn to exit. (`-cpu host` alone aborts on
/// this host: KVM refuses QEMU's IA32_ARCH_CAPABILITIES write.)
fn qemu_runs(guest: Guest, iterations: usize, mem_mib: u32) -> anyhow::Result<Summary> {
    if iterations == 0 {
        bail!("--qemu-iterations 0");
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t0 = Instant::now();
        let status = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,acpi=off",
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
            ])
            .args([
                "-m",
                &format!("{mem_mib}M"),
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
            .args(["-append", "bench"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        let elapsed = t0.elapsed();
        if !status.success() {
            bail!("qemu exited with {status}");
        }
        samples.push(elapsed);
    }
    Ok(Summary::of(&samples))
}
