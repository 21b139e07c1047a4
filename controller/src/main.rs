// SPDX-License-Identifier: Apache-2.0
//! The `sandboxer` binary.
//!
//! `sandboxer vm run` boots one guest in this process and streams its console: the quickest way
//! for a person to see the VMM work. The Sandbox API daemon is added by the controller issue.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sandboxer",
    version,
    about = "Secure-container runtime with in-process KVM microVMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with a single VM directly.
    #[command(subcommand)]
    Vm(VmCommand),
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
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = vmm::VmConfig::new(args.kernel);
    config.initramfs = args.initrd;
    config.cmdline = args.cmdline;
    config.mem_mib = args.mem;
    config.vcpus = args.vcpus;
    config.console = vmm::ConsoleConfig {
        log_path: args.console_log,
        stdout: true,
    };
    let vm =
        vmm::Vm::start(config).map_err(|e| anyhow::Error::new(e).context("cannot start the VM"))?;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(VmCommand::Run(args)) => run(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("sandboxer: {e:#}");
        ExitCode::FAILURE
    })
}
