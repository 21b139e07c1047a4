// SPDX-License-Identifier: Apache-2.0
//! The in-process VMM: creates, runs and destroys KVM microVMs inside the calling process.
//!
//! ```no_run
//! let host = vmm::Host::new();
//! let mut config = vmm::VmConfig::new("vmlinux");
//! config.mem_mib = 256;
//! let vm = vmm::Vm::start(&host, config)?;
//! println!("{:?}", vm.wait().exit);
//! # Ok::<(), vmm::VmError>(())
//! ```
//!
//! The owner of the VMs keeps one [`Host`] (KVM handle, shell pool, seccomp filters, live
//! count) and passes it to every start. Inside: [`builder`] builds a VM, `event_loop` runs its
//! VMM thread, [`vm`] is the handle, [`api`] the requests a running VM takes, and
//! `device_manager` wires its virtio devices to KVM.
#![warn(missing_docs)]

pub mod api;
mod arch;
mod boot;
pub mod builder;
mod bus;
pub mod config;
mod device_manager;
mod event_loop;
mod heap;
mod host;
mod kvm;
mod memory;
mod pool;
mod sched;
mod seccomp;
pub mod snapshot;
mod stack;
mod timings;
mod vcpu;
pub mod vm;

pub use api::{PanicSite, VmmAction, VmmActionError, VmmData};
pub use boot::BootError;
pub use builder::{CloneConfig, CloneError, CopyAhead, PreparedShell, VmError};
pub use config::{ConfigError, ConsoleConfig, VmConfig};
pub use device_manager::{DeviceConfig, DeviceError, HandoverFiles, NetBackendConfig};
pub use devices::virtio::block::{BlockFile, DiskInfo};
pub use heap::{grow_heap_in_large_steps, warm_heap};
pub use host::Host;
pub use kvm::KvmError;
pub use memory::{MemoryError, guest_memfd};
pub use sched::realtime;
pub use seccomp::{
    BASELINE_ENV, Confined, SeccompError, SeccompPolicy, confine_process, process_baseline,
};
pub use snapshot::{SnapshotError, VmSnapshot};
pub use timings::StartupTimings;
pub use vm::{Frozen, Vm, VmEnd};

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
