// SPDX-License-Identifier: Apache-2.0
//! The in-process VMM: creates, runs and destroys KVM microVMs inside the calling process.
//!
//! ```no_run
//! let mut config = vmm::VmConfig::new("vmlinux");
//! config.mem_mib = 256;
//! let vm = vmm::Vm::start(config)?;
//! println!("{:?}", vm.wait().exit);
//! # Ok::<(), vmm::VmError>(())
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod arch;
pub mod boot;
pub mod bus;
pub mod config;
pub mod device_manager;
pub mod kvm;
pub mod memory;
pub mod pool;
pub mod seccomp;
pub mod timings;
mod vcpu;
mod vm;

pub use api::{VmmAction, VmmActionError, VmmData};
pub use config::{ConfigError, ConsoleConfig, VmConfig};
pub use device_manager::{DeviceConfig, DeviceError, NetBackendConfig};
pub use seccomp::SeccompPolicy;
pub use timings::StartupTimings;
pub use vm::{Vm, VmEnd, VmError, live_vms, wait_all_torn_down};

/// How a guest reset itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// A triple fault (`KVM_EXIT_SHUTDOWN`): Linux `reboot=t`, or a crash.
    TripleFault,
    /// The i8042 reset line (Linux `reboot=k`).
    I8042,
    /// A KVM reset system event.
    SystemEvent,
}

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset; a VM without firmware treats that as its end.
    Reset(ResetKind),
    /// The guest powered off or halted for good.
    PowerOff,
    /// The guest or KVM failed; the reason is for people.
    Crashed(String),
    /// The host stopped the VM.
    Stopped,
}
