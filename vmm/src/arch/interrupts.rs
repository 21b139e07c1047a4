// SPDX-License-Identifier: Apache-2.0
//! Local APIC wiring of every vCPU: LINT0 delivers the 8259 PIC's interrupts (ExtINT) and
//! LINT1 delivers NMIs, as the MP table says and as a PC's firmware leaves them.
//!
//! Only the delivery-mode field (bits 8-10) of each LVT register is changed; KVM's reset state
//! of the other bits (mask, trigger mode) is kept, so an application processor's LVTs stay
//! masked until its kernel sets them up.

use std::os::raw::c_char;

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use super::ArchError;

/// Offset of the LVT LINT0 register in the APIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode: ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// Delivery mode field of an LVT register.
const DELIVERY_MODE_MASK: u32 = 0x700;

/// Register `offset` of the APIC page `regs`, or `None` past its end.
pub fn lapic_reg(regs: &[c_char], offset: usize) -> Option<u32> {
    let bytes = regs.get(offset..offset.checked_add(4)?)?;
    let mut value = [0u8; 4];
    for (dst, src) in value.iter_mut().zip(bytes) {
        *dst = src.to_ne_bytes()[0];
    }
    Some(u32::from_le_bytes(value))
}

/// Stores `value` in register `offset` of the APIC page `regs`; `false` past its end.
pub fn set_lapic_reg(regs: &mut [c_char], offset: usize, value: u32) -> bool {
    let Some(bytes) = offset
        .checked_add(4)
        .and_then(|end| regs.get_mut(offset..end))
    else {
        return false;
    };
    for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
        *dst = c_char::from_ne_bytes([src]);
    }
    true
}

/// `lvt` with its delivery mode replaced by `mode`.
pub fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !DELIVERY_MODE_MASK) | ((mode << 8) & DELIVERY_MODE_MASK)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC state.
pub fn apply_lint(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        // Both offsets are constants well inside the 1 KiB register page.
        if let Some(lvt) = lapic_reg(&lapic.regs, offset) {
            set_lapic_reg(&mut lapic.regs, offset, with_delivery_mode(lvt, mode));
        }
    }
}

/// Programs LINT0 = ExtINT and LINT1 = NMI on `vcpu` (needs the in-kernel irqchip).
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let mut lapic = vcpu.get_lapic().map_err(ArchError::GetLapic)?;
    apply_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(ArchError::SetLapic)
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;

    use super::*;

    #[test]
    fn register_round_trip_and_bounds() {
        let mut lapic = kvm_lapic_state::default();
        assert!(set_lapic_reg(&mut lapic.regs, APIC_LVT0, 0x8001_0700));
        assert_eq!(lapic_reg(&lapic.regs, APIC_LVT0), Some(0x8001_0700));
        // Little-endian in the page, high byte has the sign bit set.
        assert_eq!(lapic.regs[APIC_LVT0], 0x00);
        assert_eq!(lapic.regs[APIC_LVT0 + 1], 0x07);
        assert_eq!(lapic.regs[APIC_LVT0 + 3].to_ne_bytes(), [0x80]);
        assert_eq!(lapic_reg(&lapic.regs, 1021), None);
        assert_eq!(lapic_reg(&lapic.regs, usize::MAX), None);
        assert!(!set_lapic_reg(&mut lapic.regs, 1021, 1));
        assert!(!set_lapic_reg(&mut lapic.regs, usize::MAX, 1));
        assert_eq!(lapic_reg(&lapic.regs, 1020), Some(0));
    }

    #[test]
    fn delivery_mode_keeps_other_bits() {
        assert_eq!(with_delivery_mode(0x1_0000, APIC_MODE_NMI), 0x1_0400);
        assert_eq!(with_delivery_mode(0x1_0700, APIC_MODE_NMI), 0x1_0400);
        assert_eq!(with_delivery_mode(0x0, APIC_MODE_EXTINT), 0x700);
        assert_eq!(with_delivery_mode(0xa0ff, APIC_MODE_EXTINT), 0xa7ff);

        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic.regs, APIC_LVT0, 0x1_0000);
        set_lapic_reg(&mut lapic.regs, APIC_LVT1, 0x1_0000);
        set_lapic_reg(&mut lapic.regs, 0x20, 0x0300_0000);
        apply_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic.regs, APIC_LVT0), Some(0x1_0700));
        assert_eq!(lapic_reg(&lapic.regs, APIC_LVT1), Some(0x1_0400));
        assert_eq!(
            lapic_reg(&lapic.regs, 0x20),
            Some(0x0300_0000),
            "APIC id untouched"
        );
    }

    #[test]
    fn kvm_lint_modes_are_set() {
        test_guests::require_kvm!();
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        for id in 0..2u8 {
            let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
            set_lint(&vcpu).unwrap();
            let lapic = vcpu.get_lapic().unwrap();
            let lint0 = lapic_reg(&lapic.regs, APIC_LVT0).unwrap();
            let lint1 = lapic_reg(&lapic.regs, APIC_LVT1).unwrap();
            assert_eq!(
                (lint0 >> 8) & 7,
                APIC_MODE_EXTINT,
                "vCPU {id} LINT0 {lint0:#x}"
            );
            assert_eq!(
                (lint1 >> 8) & 7,
                APIC_MODE_NMI,
                "vCPU {id} LINT1 {lint1:#x}"
            );
            // KVM numbers APIC ids by vCPU id, which the MP table and CPUID rely on.
            let apic_id = lapic_reg(&lapic.regs, 0x20).unwrap() >> 24;
            assert_eq!(apic_id, u32::from(id));
        }
    }
}
