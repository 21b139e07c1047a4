// SPDX-License-Identifier: Apache-2.0
//! Model-specific registers set on every vCPU before it first runs.
//!
//! The list follows what Firecracker sets for a direct kernel boot: the syscall/sysenter MSRs
//! cleared (the guest kernel programs them), the TSC at 0, fast strings on, and MTRRs on with
//! write-back as the default memory type (without it a guest that reads MTRRs would treat all
//! RAM as uncacheable).
//!
//! Checked on this project's `/dev/kvm` (`kvm_pvm`, AMD host): `KVM_SET_MSRS` accepts every
//! entry of [`boot_msr_entries`], each read back with `KVM_GET_MSRS` as written, except the TSC:
//! KVM treats a host write of 0 to `IA32_TSC` as "synchronise with the VM's other vCPUs" rather
//! than a literal 0, which is what a multi-vCPU guest wants. `IA32_MTRR_DEF_TYPE` is not in
//! `KVM_GET_MSR_INDEX_LIST` there but is still accepted (KVM emulates MTRRs itself).

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

use super::ArchError;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `STAR`: legacy-mode SYSCALL target and segment bases.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`: 64-bit SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`: compatibility-mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SYSCALL_MASK` (`FMASK`): RFLAGS bits cleared on SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`: the value SWAPGS exchanges with GS.base.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE` bit 0: fast-string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE` bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 6;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSRs (and values) set on every vCPU.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Sets the boot MSRs on `vcpu`; KVM stops at the first MSR it rejects, so a short count is an
/// error naming how far it got.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(ArchError::BuildMsrs)?;
    let written = vcpu.set_msrs(&msrs).map_err(ArchError::SetMsrs)?;
    if written != entries.len() {
        return Err(ArchError::MsrsNotAllWritten {
            written,
            expected: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;

    use super::*;

    #[test]
    fn boot_list_is_unique_and_has_the_expected_values() {
        let entries = boot_msr_entries();
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), entries.len(), "no MSR listed twice");
        let value = |index| entries.iter().find(|e| e.index == index).map(|e| e.data);
        assert_eq!(value(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(value(MSR_IA32_MISC_ENABLE), Some(1));
        for index in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(value(index), Some(0), "MSR {index:#x}");
        }
    }

    #[test]
    fn kvm_accepts_every_boot_msr() {
        test_guests::require_kvm!();
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid2(&supported).unwrap();
        // Dirty the MSRs first so the read-back proves the write.
        let dirty: Vec<_> = boot_msr_entries()
            .into_iter()
            .filter(|e| e.index != MSR_IA32_TSC)
            .map(|e| {
                entry(
                    e.index,
                    if e.index == MSR_MTRR_DEF_TYPE {
                        0
                    } else {
                        0x1000
                    },
                )
            })
            .filter(|e| e.index != MSR_IA32_MISC_ENABLE)
            .collect();
        let dirty_msrs = Msrs::from_entries(&dirty).unwrap();
        assert_eq!(vcpu.set_msrs(&dirty_msrs).unwrap(), dirty.len());

        setup_msrs(&vcpu).unwrap();

        let wanted = boot_msr_entries();
        let mut read = Msrs::from_entries(
            &wanted
                .iter()
                .map(|e| entry(e.index, u64::MAX))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut read).unwrap(), wanted.len());
        for (got, want) in read.as_slice().iter().zip(&wanted) {
            assert_eq!(got.index, want.index);
            if want.index != MSR_IA32_TSC {
                assert_eq!(got.data, want.data, "MSR {:#x}", want.index);
            }
        }
    }
}
