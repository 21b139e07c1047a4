// SPDX-License-Identifier: Apache-2.0
//! Everything that talks to `/dev/kvm` beyond kvm-ioctls' safe wrappers: the process-wide KVM
//! handle, VM creation with the in-kernel irqchip, guest memory slots, interrupt lines and the
//! vCPU kick signal.
//!
//! This module and `memory.rs` are the only places in `vmm` with `unsafe` code.
#![allow(
    unsafe_code,
    reason = "memory slots and the kick signal have no safe kvm-ioctls wrapper; see SAFETY"
)]

pub(crate) mod dirty;
pub(crate) mod signal;
pub(crate) mod state;

use std::io;
use std::sync::{Arc, Mutex};

use devices::GuestMemoryMmap;
use devices::sync::Recover;
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS, kvm_pit_config,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Where KVM places the three-page TSS region Intel VMX needs (just below the 4 GiB boundary,
/// inside the MMIO gap, clear of the IOAPIC and LAPIC).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Identity map page for real-mode emulation on Intel (one page below the TSS).
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors from KVM setup.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("Failed to open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host KVM API version is not the stable one.
    #[error("Unsupported KVM API version {0}")]
    ApiVersion(i32),
    /// A capability the VMM relies on is missing.
    #[error("KVM lacks the required capability {0:?}")]
    MissingCap(Cap),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("Failed to read the supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("Failed to read the MSR index list")]
    MsrList(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("Failed to create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Setting the TSS or identity-map address failed.
    #[error("Failed to set the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// Setting the identity map address failed.
    #[error("Failed to set the identity map address")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    /// Creating the in-kernel PIC/IOAPIC failed.
    #[error("Failed to create the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// Creating the in-kernel PIT failed.
    #[error("Failed to create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// A memory slot's dirty log could not be read.
    #[error("Failed to read the dirty log of guest memory slot {slot}")]
    DirtyLog {
        /// The slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A guest memory region could not be registered.
    #[error("Failed to register guest memory slot {slot}")]
    SetMemoryRegion {
        /// The slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More memory regions than KVM slots.
    #[error("Guest memory has {0} regions, more than KVM offers slots")]
    TooManyRegions(usize),
}

/// A KVM handle and what the VMM learns from it once.
#[derive(Debug)]
pub(crate) struct KvmContext {
    kvm: Kvm,
    supported_cpuid: CpuId,
    max_vcpus: usize,
    /// The MSRs KVM can save and restore for a vCPU (`KVM_GET_MSR_INDEX_LIST`).
    msr_list: Vec<u32>,
    /// Whether KVM passes a vCPU's registers, system registers and events through `kvm_run`
    /// (`KVM_CAP_SYNC_REGS`): a save or restore then spends three ioctls fewer per vCPU.
    sync_regs: bool,
    /// The TSC frequency of a new VM's vCPUs (kHz), read once from the first vCPU asked.
    default_tsc_khz: std::sync::OnceLock<Option<u32>>,
    /// What KVM gives a new boot vCPU and a new other vCPU, read once from the first of each
    /// a restore writes ([`state::Fresh`]).
    fresh_vcpus: [std::sync::OnceLock<Option<state::Fresh>>; 2],
}

/// The KVM handle of a [`crate::Host`], opened on first use.
///
/// One handle serves every VM of the host: opening `/dev/kvm` and reading the supported CPUID
/// are then off every VM's start path. A failure is not kept, so a later call retries.
#[derive(Debug, Default)]
pub(crate) struct KvmCell(Mutex<Option<Arc<KvmContext>>>);

impl KvmCell {
    /// The context, opening `/dev/kvm` if no call has yet.
    pub(crate) fn get(&self) -> Result<Arc<KvmContext>, KvmError> {
        let mut slot = self.0.lock().recover();
        if let Some(ctx) = &*slot {
            return Ok(Arc::clone(ctx));
        }
        let ctx = Arc::new(KvmContext::open()?);
        *slot = Some(Arc::clone(&ctx));
        Ok(ctx)
    }
}

impl KvmContext {
    fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if i64::from(version) != i64::from(kvm_bindings::KVM_API_VERSION) {
            return Err(KvmError::ApiVersion(version));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::UserMemory,
            Cap::ImmediateExit,
            Cap::Pit2,
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(cap));
            }
        }
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        // KVM emulates the LAPIC's TSC-deadline mode but leaves it out of the supported list
        // (KVM_CAP_TSC_DEADLINE_TIMER says it is there), as QEMU and Firecracker know. A Linux
        // guest that sees it skips calibrating the LAPIC timer against the PIT at boot: a
        // busy wait on PIT ticks that hung nested guests in the emulated host.
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            for entry in supported_cpuid.as_mut_slice() {
                if entry.function == 1 && entry.index == 0 {
                    entry.ecx |= 1 << 24;
                }
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(KvmError::MsrList)?
            .as_slice()
            .to_vec();
        let all = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
        let sync_regs = u32::try_from(kvm.check_extension_int(Cap::SyncRegs))
            .is_ok_and(|fields| fields & all == all);
        Ok(KvmContext {
            kvm,
            supported_cpuid,
            max_vcpus,
            msr_list,
            sync_regs,
            default_tsc_khz: std::sync::OnceLock::new(),
            fresh_vcpus: Default::default(),
        })
    }

    /// CPUID entries KVM supports on this host (patched per vCPU by `arch::cpuid`).
    pub(crate) fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The MSRs a vCPU's saved state covers.
    pub(crate) fn msr_list(&self) -> &[u32] {
        &self.msr_list
    }

    /// Whether vCPU state goes through `kvm_run` (see [`state::Registers`]).
    pub(crate) fn sync_regs(&self) -> bool {
        self.sync_regs
    }

    /// The TSC frequency KVM gives a new VM's vCPUs, learnt from `vcpu` (any vCPU of a VM
    /// that did not set its own) on the first call; `None` if KVM does not tell.
    pub(crate) fn default_tsc_khz(&self, vcpu: &VcpuFd) -> Option<u32> {
        *self
            .default_tsc_khz
            .get_or_init(|| vcpu.get_tsc_khz().ok().filter(|&khz| khz > 0))
    }

    /// What KVM gives a new vCPU of `vcpu`'s role (`boot`: the boot vCPU, id 0), learnt from
    /// `vcpu` on the first call for the role: it must not have run or been written (its CPUID
    /// aside). `None` if KVM does not tell.
    pub(crate) fn fresh_vcpu(&self, vcpu: &VcpuFd, boot: bool) -> Option<&state::Fresh> {
        self.fresh_vcpus
            .get(usize::from(!boot))?
            .get_or_init(|| state::Fresh::read(vcpu).ok())
            .as_ref()
    }

    /// Most vCPUs KVM allows in one VM.
    pub(crate) fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// Creates an empty VM (no memory, no irqchip yet).
    pub(crate) fn create_vm(&self) -> Result<VmFd, KvmError> {
        self.kvm.create_vm().map_err(KvmError::CreateVm)
    }
}

/// Adds the in-kernel irqchip (PIC + IOAPIC + LAPICs), the PIT and the Intel TSS/identity-map
/// pages to a VM whose memory is already registered.
///
/// Order matters for start-up time: every change KVM makes to a VM's memslots or I/O bus waits
/// for an SRCU grace period once the VM has readers, and the irqchip and PIT add both readers
/// and I/O bus devices. Registering guest memory first (see `register_memory`) keeps that
/// registration at ~0.1 ms instead of several ms; the PIT (its own kernel thread plus I/O bus
/// devices) comes last.
pub(crate) fn add_platform_devices(vm: &VmFd) -> Result<(), KvmError> {
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(KvmError::SetTssAddress)?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(KvmError::SetIdentityMap)?;
    vm.create_irq_chip().map_err(KvmError::CreateIrqChip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(KvmError::CreatePit)?;
    Ok(())
}

/// A guest interrupt line (an input `gsi` of the in-kernel PIC and IOAPIC), raised with
/// `KVM_IRQ_LINE` from whichever thread has something to signal.
///
/// It takes the place of an irqfd (an EventFd per device and one for the serial port): the
/// same edge, one level change up and one down from the same user-space IRQ source as KVM's
/// irqfd injection, but no descriptor, and delivered on the calling thread instead of from a
/// kernel work item. The two changes of one pulse are serialised: pulses from two threads
/// (the VMM thread completing a queue, a vCPU thread writing the serial port) must each make
/// their own edge, so that the second status bit is never covered by the first edge.
#[derive(Debug)]
pub(crate) struct IrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
    edge: Mutex<()>,
}

impl IrqLine {
    /// The line `gsi` of `vm`.
    pub(crate) fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        IrqLine {
            vm,
            gsi,
            edge: Mutex::new(()),
        }
    }
}

impl devices::virtio::Line for IrqLine {
    fn pulse(&self) -> io::Result<()> {
        let _edge = self.edge.lock().recover();
        let errno = |e: kvm_ioctls::Error| io::Error::from_raw_os_error(e.errno());
        self.vm.set_irq_line(self.gsi, true).map_err(errno)?;
        self.vm.set_irq_line(self.gsi, false).map_err(errno)
    }
}

/// Registers every region of `mem` as a KVM memory slot, slot `i` for region `i`.
pub(crate) fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    set_slots(vm, mem, 0)
}

/// Registers every region of `mem` as slot `i` for region `i` with `flags` (again: the same
/// slots with other flags, as [`dirty::track`] does).
fn set_slots(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), KvmError> {
    for (index, region) in mem.iter().enumerate() {
        let slot = u32::try_from(index).map_err(|_| KvmError::TooManyRegions(index))?;
        let host_addr = region.as_ptr() as u64;
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr,
        };
        // SAFETY: `host_addr..host_addr + len` is a live mapping owned by `mem`'s region. Every
        // holder of the VM fd (vCPU threads, the VMM thread, the devices' interrupt lines) is
        // owned by the VM's threads, and the VMM thread drops all of them (the VM fd last)
        // before its own clone of the memory (`VmResources` field order), so KVM never sees
        // the mapping after it is unmapped. Slots do not overlap: vm-memory rejects
        // overlapping regions when building `mem`.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|source| KvmError::SetMemoryRegion { slot, source })?;
    }
    Ok(())
}
