// SPDX-License-Identifier: Apache-2.0
//! The `sandboxer` binary.
//!
//! `sandboxer` (or `sandboxer serve`) runs the daemon: the Sandbox APIs for containerd 2.x and
//! for seed-API engines, with one KVM microVM per sandbox inside this process.
//!
//! `sandboxer vm run` boots one guest in this process and streams its console: the quickest way
//! for a person to see the VMM work.
//!
//! `sandboxer ps`, `inspect ID` and `console ID` ask a running daemon (its admin API on the
//! API socket); `sandboxer install containerd` registers it in containerd's config.
//!
//! Called as `containerd-shim-sandboxer-v1` (a link), it answers the few shim calls containerd
//! makes for the runtime type `io.containerd.sandboxer.v1` (see `controller::shim`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use controller::config::{Config, Seccomp, ServeArgs};
use controller::shim;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "sandboxer",
    version,
    long_version = controller::embedded::LONG_VERSION.as_str(),
    about = "Secure-container runtime with in-process KVM microVMs",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, run the daemon with these flags.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Serve(Box<ServeArgs>),
    /// Work with a single VM directly.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Set up this node's container engine to use the sandboxer.
    #[command(subcommand)]
    Install(InstallCommand),
    /// List the daemon's sandboxes: state, age, VM size, VM threads, start phases.
    Ps(PsArgs),
    /// Print one sandbox's whole record (JSON).
    Inspect(InspectArgs),
    /// Print a sandbox's guest console log.
    Console(ConsoleArgs),
    /// Replace the running daemon with a new binary; every running sandbox is handed over
    /// without restarting its VM (the same as SIGUSR2 or `systemctl reload`).
    Upgrade(UpgradeArgs),
}

#[derive(Debug, Args)]
struct UpgradeArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The new binary [default: the running daemon's own path].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Print JSON instead of a line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SocketArg {
    /// The daemon's API socket (its `api.socket`).
    #[arg(long, value_name = "PATH", default_value = controller::config::DEFAULT_API_SOCKET)]
    socket: PathBuf,
}

#[derive(Debug, Args)]
struct PsArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct InspectArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The sandbox.
    id: String,
}

#[derive(Debug, Args)]
struct ConsoleArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Keep printing what the guest writes until its VM ends (Ctrl-C to stop).
    #[arg(short, long)]
    follow: bool,
    /// Start this many bytes before the end of the log.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    tail: u64,
    /// The sandbox.
    id: String,
}

/// Runs an operator command (a client of the daemon) on a small runtime of its own.
fn ops<F: std::future::Future<Output = Result<(), controller::ops::OpsError>>>(
    run: impl FnOnce(std::io::StdoutLock<'static>) -> F,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(std::io::stdout().lock()))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
enum InstallCommand {
    /// Add the sandboxer's proxy plugin and runtime handlers (`sandboxer`, `sandboxer-fifo`)
    /// to containerd's config, keeping everything else; running it again changes nothing.
    Containerd(InstallContainerdArgs),
}

#[derive(Debug, Args)]
struct InstallContainerdArgs {
    /// containerd's config file (created if missing; must be config version 3).
    #[arg(long, value_name = "PATH", default_value = controller::install::DEFAULT_CONTAINERD_CONFIG)]
    config: PathBuf,
    /// The sandboxer's API socket (its `api.socket`).
    #[arg(long, value_name = "PATH", default_value = controller::config::DEFAULT_API_SOCKET)]
    socket: PathBuf,
    /// Print the resulting config instead of writing it.
    #[arg(long)]
    dry_run: bool,
}

fn install_containerd(args: &InstallContainerdArgs) -> anyhow::Result<ExitCode> {
    let report = controller::install::install_containerd(&args.config, &args.socket, args.dry_run)?;
    let path = args.config.display();
    if args.dry_run {
        print!("{}", report.text);
    }
    if report.changed.is_empty() {
        eprintln!("sandboxer: {path} already registers the sandboxer");
    } else {
        let verb = if args.dry_run { "would set" } else { "set" };
        eprintln!("sandboxer: {path}: {verb} {}", report.changed.join(", "));
        if !args.dry_run {
            eprintln!("sandboxer: restart containerd to apply it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Boot a guest kernel and stream its serial console until it ends.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH) or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs to hand to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = vmm::config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Also append the console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Stop the VM after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Seccomp filters of the vCPU and VMM threads.
    #[arg(long, value_enum, default_value_t = Seccomp::Enforce)]
    seccomp: Seccomp,
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = vmm::VmConfig::new(args.kernel);
    config.initramfs = args.initrd;
    config.cmdline = args.cmdline;
    config.mem_mib = args.mem;
    config.vcpus = args.vcpus;
    config.seccomp = args.seccomp.into();
    config.console = vmm::ConsoleConfig {
        log_path: args.console_log,
        log_max_bytes: None,
        stdout: true,
    };
    let host = vmm::Host::new();
    let vm = vmm::Vm::start(&host, config)
        .map_err(|e| anyhow::Error::new(e).context("cannot start the VM"))?;
    let end = if args.timeout == 0 {
        vm.wait()
    } else {
        match vm.wait_timeout(std::time::Duration::from_secs(args.timeout)) {
            Some(end) => end,
            None => {
                eprintln!(
                    "sandboxer: timeout after {} s, stopping the VM",
                    args.timeout
                );
                vm.stop()
            }
        }
    };
    let t = vm.timings();
    eprintln!(
        "sandboxer: VM ended: {:?}; start-up {:.3} ms (kvm {:.3}, vm {:.3}, memory {:.3}, kernel {:.3}, devices {:.3}, vcpus {:.3}+{:.3}); guest signalled boot after {}",
        end.exit,
        ms(t.total),
        ms(t.kvm_open),
        ms(t.vm_create),
        ms(t.memory),
        ms(t.kernel_load),
        ms(t.devices),
        ms(t.vcpu_create),
        ms(t.vcpu_start),
        vm.boot_time()
            .map_or("never".to_string(), |d| format!("{:.3} ms", ms(d))),
    );
    Ok(match end.exit {
        vmm::VmExit::Crashed(_) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Installs the log subscriber: `RUST_LOG` if set, else the configured level. The vmm crate's
/// `log` records are forwarded too.
fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(_) => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("invalid log_level {level:?}: {e}"))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (term, int) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot watch for signals; running until killed");
            std::future::pending::<()>().await;
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    // Before any thread exists: every VM's MMU notifier sees each heap growth step.
    vmm::grow_heap_in_large_steps();
    let config = Config::load(args)?;
    init_logging(&config.log_level)?;
    raise_nofile();
    // Before any other thread exists: every thread and helper program inherits it. The new
    // process of a live upgrade runs under its predecessor's already: it adds its own only
    // if that differs (filters cannot be removed; they would pile up upgrade after upgrade).
    let inherited = args
        .takeover
        .as_ref()
        .and_then(|_| std::env::var(vmm::BASELINE_ENV).ok());
    let confined =
        vmm::confine_process(config.vm.seccomp.into(), inherited.as_deref()).map_err(|e| {
            anyhow::Error::new(e).context("cannot confine the daemon with its seccomp baseline")
        })?;
    tracing::debug!(?confined, "seccomp baseline");
    let host = vmm::Host::new();
    start_shell_pool(&host, &config);
    let runtime = controller::server::runtime("sandboxer")?;
    let backend = controller::KvmBackend::from_config(host, &config);
    runtime.block_on(controller::server::run_with(
        &config,
        backend,
        shutdown_signal(),
        args.takeover.as_deref(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Every sandbox's descriptors are this process's: take all the process may have
/// ([`controller::nofile`]). Create refuses sandboxes beyond what it allows.
fn raise_nofile() {
    use controller::nofile::{FDS_PER_SANDBOX, raise_nofile};
    match raise_nofile() {
        Ok(l) => tracing::info!(
            soft = l.soft,
            hard = l.hard,
            soft_was = l.soft_was,
            hard_was = l.hard_was,
            fds_per_sandbox = FDS_PER_SANDBOX,
            "RLIMIT_NOFILE raised"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
}

/// Keeps VM shells pre-built for default-sized sandboxes (their Start then skips KVM's
/// slowest setup). Only where /dev/kvm works: the pool's refill thread would only log errors.
fn start_shell_pool(host: &vmm::Host, config: &Config) {
    let depth = usize::try_from(config.vm.pool_depth).unwrap_or(usize::MAX);
    if depth == 0 {
        return;
    }
    if let Err(e) = host.open_kvm() {
        tracing::warn!(error = %e, "no VM shell pool: KVM is not usable");
        return;
    }
    match host.set_pool_target(config.vm.mem_mib, depth) {
        Ok(()) => tracing::info!(mem_mib = config.vm.mem_mib, depth, "VM shell pool on"),
        Err(e) => tracing::warn!(error = %e, "cannot start the VM shell pool"),
    }
}

fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw
        .get(1)
        .is_some_and(|c| c == controller::memcg::HELPER_COMMAND)
    {
        let code = controller::memcg::helper_main(raw.get(2..).unwrap_or_default());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let mut args = std::env::args();
    if args.next().is_some_and(|argv0| shim::is_shim_name(&argv0)) {
        let rest: Vec<String> = args.collect();
        let code = shim::run(&rest, &mut std::io::stdout(), &mut std::io::stderr());
        return ExitCode::from(code);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(args)) => serve(&args),
        Some(Command::Vm(VmCommand::Run(args))) => run(args),
        Some(Command::Install(InstallCommand::Containerd(args))) => install_containerd(&args),
        Some(Command::Ps(a)) => {
            ops(
                |mut out| async move { controller::ops::ps(&a.socket.socket, a.json, &mut out).await },
            )
        }
        Some(Command::Inspect(a)) => ops(|mut out| async move {
            controller::ops::inspect(&a.socket.socket, &a.id, &mut out).await
        }),
        Some(Command::Upgrade(a)) => ops(|mut out| async move {
            controller::ops::upgrade(&a.socket.socket, a.binary.as_deref(), a.json, &mut out).await
        }),
        Some(Command::Console(a)) => ops(|mut out| async move {
            controller::ops::console(&a.socket.socket, &a.id, a.follow, a.tail, &mut out).await
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("sandboxer: {e:#}");
        ExitCode::FAILURE
    })
}
