// SPDX-License-Identifier: Apache-2.0
//! Start-up phase timings, reported by every start-up benchmark.

use std::time::Duration;

/// How long each phase of `Vm::start` took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartupTimings {
    /// Opening `/dev/kvm` and reading its capabilities (zero after the first VM of a process).
    pub kvm_open: Duration,
    /// Config validation, then `KVM_CREATE_VM` with irqchip and PIT (or taking a pre-built
    /// shell from the pool).
    pub vm_create: Duration,
    /// Creating and registering guest memory (zero with a pooled shell).
    pub memory: Duration,
    /// Loading kernel, command line, initramfs and boot structures.
    pub kernel_load: Duration,
    /// Creating devices and their interrupts.
    pub devices: Duration,
    /// Creating and configuring vCPUs.
    pub vcpu_create: Duration,
    /// Spawning vCPU threads and the VMM thread.
    pub vcpu_start: Duration,
    /// The whole of `Vm::start`.
    pub total: Duration,
    /// Whether the VM came from the pre-built shell pool (`vmm::pool`).
    pub pooled: bool,
    /// Whether its threads came with the pooled shell, started and confined ahead (a clone
    /// shell's): the Start spawned no thread and installed no filter.
    pub threads_pooled: bool,
}
