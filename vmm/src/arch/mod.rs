// SPDX-License-Identifier: Apache-2.0
//! x86_64 architecture support: the guest physical layout, MP table, CPUID, boot registers.
//!
//! Everything here is safe code over kvm-ioctls' safe wrappers and vm-memory's `Bytes`.
//!
//! The VMM calls [`configure_system`] once per VM (after guest memory exists) and
//! [`configure_vcpu`] once per vCPU (after the in-kernel irqchip and the vCPU exist, before the
//! first `KVM_RUN`).

pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

pub use devices::GuestMemoryMmap;
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
pub use mptable::MAX_VCPUS;
use vm_memory::{GuestAddress, GuestMemoryError};

/// How the boot vCPU enters the guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH (Xen HVM direct boot ABI): 32-bit protected mode, paging off, flat 4 GiB CS/DS/ES/SS,
    /// EFLAGS=0x2, ebx = start_info address, eip = entry.
    Pvh {
        /// The kernel's 32-bit PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
        entry: GuestAddress,
        /// Guest address of the `hvm_start_info` structure (normally
        /// [`layout::PVH_INFO_START`]).
        start_info: GuestAddress,
    },
    /// Linux x86_64 64-bit boot protocol: long mode, identity map of the first 1 GiB (2 MiB
    /// pages, tables at layout::PML4_START/PDPTE_START/PDE_START), 64-bit flat CS, rsi =
    /// boot_params, rip = entry, rsp = rbp = layout::BOOT_STACK_POINTER.
    Linux64 {
        /// The kernel's 64-bit entry point.
        entry: GuestAddress,
        /// Guest address of `boot_params` (normally [`layout::ZERO_PAGE_START`]).
        boot_params: GuestAddress,
    },
}

/// Errors from the x86_64 guest setup.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// The vCPU count is zero or larger than the MP table can describe.
    #[error("Invalid vCPU count {0} (must be 1..={MAX_VCPUS})")]
    InvalidCpuCount(u8),
    /// The vCPU id is not below the vCPU count.
    #[error("Invalid vCPU id {id} for {num_cpus} vCPUs")]
    InvalidVcpuId {
        /// The id passed in.
        id: u8,
        /// The VM's vCPU count.
        num_cpus: u8,
    },
    /// The MP table does not fit between its start and the end of low RAM.
    #[error("MP table of {0} bytes does not fit in the EBDA")]
    MpTableTooLarge(usize),
    /// Writing the MP table into guest memory failed.
    #[error("Failed to write the MP table to guest memory")]
    WriteMpTable(#[source] GuestMemoryError),
    /// Adding CPUID entries failed (the list is full).
    #[error("Failed to add CPUID entries")]
    CpuidEntries(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("Failed to set the vCPU's CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// Building the MSR list failed.
    #[error("Failed to build the boot MSR list")]
    BuildMsrs(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("Failed to set the boot MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` stopped early: the entry at index `written` was rejected.
    #[error("KVM accepted only {written} of {expected} boot MSRs")]
    MsrsNotAllWritten {
        /// How many MSRs KVM wrote.
        written: usize,
        /// How many were asked for.
        expected: usize,
    },
    /// `KVM_SET_FPU` failed.
    #[error("Failed to set the vCPU's FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// `KVM_GET_LAPIC` failed.
    #[error("Failed to get the vCPU's local APIC state")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("Failed to set the vCPU's local APIC state")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// Writing the GDT into guest memory failed.
    #[error("Failed to write the GDT to guest memory")]
    WriteGdt(#[source] GuestMemoryError),
    /// Writing the IDT into guest memory failed.
    #[error("Failed to write the IDT to guest memory")]
    WriteIdt(#[source] GuestMemoryError),
    /// Writing the long-mode page tables into guest memory failed.
    #[error("Failed to write the page tables to guest memory")]
    WritePageTables(#[source] GuestMemoryError),
    /// A PVH entry point or start_info address is not a 32-bit address.
    #[error("PVH address {0:#x} is above 4 GiB")]
    PvhAddressAbove4G(u64),
    /// `KVM_GET_SREGS` failed.
    #[error("Failed to get the vCPU's special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("Failed to set the vCPU's special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("Failed to set the vCPU's general registers")]
    SetRegs(#[source] kvm_ioctls::Error),
}

/// Checks that `num_cpus` is a vCPU count this module can set up.
fn check_cpu_count(num_cpus: u8) -> Result<(), ArchError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(ArchError::InvalidCpuCount(num_cpus));
    }
    Ok(())
}

/// VM-wide guest setup: writes the MP table (Intel MP spec 1.4) for `num_cpus` CPUs.
pub fn configure_system(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), ArchError> {
    mptable::setup_mptable(mem, num_cpus)
}

/// Gives vCPU `vcpu_id` of `num_cpus` its CPUID (the host's supported set, patched for the
/// topology): the first step for a booting vCPU and the only one for a restored vCPU, whose
/// registers then come from a snapshot.
pub fn set_cpuid(
    vcpu: &VcpuFd,
    supported: &CpuId,
    vcpu_id: u8,
    num_cpus: u8,
) -> Result<(), ArchError> {
    let mut cpuid = supported.clone();
    cpuid::patch_cpuid(&mut cpuid, vcpu_id, num_cpus)?;
    vcpu.set_cpuid2(&cpuid).map_err(ArchError::SetCpuid)
}

/// Per-vCPU setup: CPUID (from the `KVM_GET_SUPPORTED_CPUID` result `supported`, patched per
/// vCPU), boot MSRs, FPU, LAPIC LINT0=ExtINT / LINT1=NMI. For the boot vCPU (`boot = Some`),
/// also GDT/IDT in guest memory (layout::GDT_ADDR/IDT_ADDR), page tables for Linux64, sregs and
/// regs.
///
/// Application processors get `boot = None` and are left waiting for INIT/SIPI (KVM puts
/// non-BSP vCPUs in `KVM_MP_STATE_UNINITIALIZED` itself when the in-kernel irqchip exists).
/// The in-kernel irqchip must exist before this is called (the LAPIC calls need it).
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    supported: &CpuId,
    vcpu_id: u8,
    num_cpus: u8,
    boot: Option<&BootEntry>,
) -> Result<(), ArchError> {
    check_cpu_count(num_cpus)?;
    if vcpu_id >= num_cpus {
        return Err(ArchError::InvalidVcpuId {
            id: vcpu_id,
            num_cpus,
        });
    }
    // CPUID first: KVM decides which MSRs and xsave features exist from it.
    set_cpuid(vcpu, supported, vcpu_id, num_cpus)?;
    msr::setup_msrs(vcpu)?;
    regs::setup_fpu(vcpu)?;
    interrupts::set_lint(vcpu)?;
    if let Some(boot) = boot {
        regs::setup_boot_state(vcpu, mem, boot)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{
        KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
        KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    };
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};
    use vm_memory::Bytes;

    use super::*;

    const MEM_SIZE: usize = 64 << 20;
    /// Where the test code is placed (guest-free low memory).
    const CODE_ADDR: u64 = layout::GUEST_FREE_LOW_START;
    /// A byte far from the code, to prove the long-mode identity map reaches past 2 MiB.
    const FAR_ADDR: u64 = 0x3f0_0000;

    /// A VM like the lead's builder makes it: irqchip and PIT before any vCPU, 64 MiB of RAM.
    /// Field order matters: the VM is dropped before the memory backing its memslot.
    struct TestVm {
        vm: VmFd,
        supported: CpuId,
        mem: GuestMemoryMmap,
        _kvm: Kvm,
    }

    fn test_vm() -> TestVm {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        vm.create_irq_chip().expect("create irqchip");
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .expect("create PIT");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mmap");
        // `mem` is a field of the returned TestVm declared after `vm`, so it outlives the memslot.
        crate::kvm::register_memory(&vm, &mem).expect("set memslot");
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("supported CPUID");
        TestVm {
            vm,
            supported,
            mem,
            _kvm: kvm,
        }
    }

    /// Runs the vCPU until `n` port writes have happened; any other exit fails the test.
    fn run_io_outs(vcpu: &mut VcpuFd, n: usize) -> Vec<(u16, Vec<u8>)> {
        let mut outs = Vec::new();
        while outs.len() < n {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => outs.push((port, data.to_vec())),
                Ok(other) => panic!("unexpected exit {other:?} after {outs:x?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => panic!("KVM_RUN failed: {e} after {outs:x?}"),
            }
        }
        outs
    }

    #[test]
    fn configure_system_rejects_bad_counts() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            configure_system(&mem, 0),
            Err(ArchError::InvalidCpuCount(0))
        ));
        assert!(matches!(
            configure_system(&mem, MAX_VCPUS + 1),
            Err(ArchError::InvalidCpuCount(_))
        ));
        configure_system(&mem, MAX_VCPUS).unwrap();
    }

    #[test]
    fn configure_system_needs_the_ebda_in_memory() {
        // Only 512 KiB of RAM: the EBDA at 639 KiB is not backed.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 512 << 10)]).unwrap();
        assert!(matches!(
            configure_system(&mem, 1),
            Err(ArchError::WriteMpTable(_))
        ));
    }

    #[test]
    fn kvm_pvh_entry_runs_32bit_code() {
        test_guests::require_kvm!();
        let t = test_vm();
        configure_system(&t.mem, 1).unwrap();
        // 32-bit protected mode code. `66 BA imm16` is `mov dx, imm16` only with a 32-bit
        // default operand size, and `B8 imm32` + `EF` makes a 4-byte port write only then.
        #[rustfmt::skip]
        let code: &[u8] = &[
            0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
            0xb0, b'P',                         // mov al, 'P'
            0xee,                               // out dx, al
            0x8a, 0x03,                         // mov al, [ebx]      (start_info marker)
            0x66, 0xba, 0x01, 0x05,             // mov dx, 0x501
            0xee,                               // out dx, al
            0xb8, 0x78, 0x56, 0x34, 0x12,       // mov eax, 0x12345678
            0x66, 0xba, 0x02, 0x05,             // mov dx, 0x502
            0xef,                               // out dx, eax
            0xeb, 0xfe,                         // jmp $
        ];
        t.mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
        t.mem
            .write_obj(0xa5u8, GuestAddress(layout::PVH_INFO_START))
            .unwrap();
        let mut vcpu = t.vm.create_vcpu(0).unwrap();
        let boot = BootEntry::Pvh {
            entry: GuestAddress(CODE_ADDR),
            start_info: GuestAddress(layout::PVH_INFO_START),
        };
        configure_vcpu(&vcpu, &t.mem, &t.supported, 0, 1, Some(&boot)).unwrap();

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & regs::X86_CR0_PG, 0, "paging must be off");
        assert_ne!(sregs.cr0 & regs::X86_CR0_PE, 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(vcpu.get_regs().unwrap().rflags, 0x2);

        let outs = run_io_outs(&mut vcpu, 3);
        assert_eq!(
            outs,
            vec![
                (layout::SERIAL_PORT, vec![b'P']),
                (0x501, vec![0xa5]),
                (0x502, 0x1234_5678u32.to_le_bytes().to_vec()),
            ]
        );
    }

    /// 64-bit code: REX.W prefixes (`48`) would decode as `dec eax` in 32-bit mode.
    #[rustfmt::skip]
    fn linux64_code() -> Vec<u8> {
        let far = u32::try_from(FAR_ADDR).unwrap().to_le_bytes();
        let mut code = vec![
            0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
            0xb0, b'L',                         // mov al, 'L'
            0xee,                               // out dx, al
            0x8a, 0x06,                         // mov al, [rsi]      (boot_params marker)
            0x66, 0xba, 0x01, 0x05,             // mov dx, 0x501
            0xee,                               // out dx, al
            0x8a, 0x04, 0x25,                   // mov al, [FAR_ADDR] (through the 1 GiB map)
        ];
        code.extend_from_slice(&far);
        code.extend_from_slice(&[
            0x66, 0xba, 0x02, 0x05,             // mov dx, 0x502
            0xee,                               // out dx, al
            0x48, 0x89, 0xe0,                   // mov rax, rsp
            0x48, 0x31, 0xe8,                   // xor rax, rbp       (0 if rsp == rbp)
            0x48, 0x01, 0xe0,                   // add rax, rsp
            0x66, 0xba, 0x03, 0x05,             // mov dx, 0x503
            0xef,                               // out dx, eax
            0x48, 0xb8,                         // mov rax, 0xcafebabe_00000000
            0x00, 0x00, 0x00, 0x00, 0xbe, 0xba, 0xfe, 0xca,
            0x48, 0xc1, 0xe8, 0x20,             // shr rax, 32
            0x66, 0xba, 0x04, 0x05,             // mov dx, 0x504
            0xef,                               // out dx, eax
            0xb8, 0x01, 0x00, 0x00, 0x00,       // mov eax, 1
            0x31, 0xc9,                         // xor ecx, ecx
            0x0f, 0xa2,                         // cpuid
            0x89, 0xd8,                         // mov eax, ebx
            0x66, 0xba, 0x05, 0x05,             // mov dx, 0x505
            0xef,                               // out dx, eax
            0xb8, 0x0b, 0x00, 0x00, 0x00,       // mov eax, 0xb
            0xb9, 0x01, 0x00, 0x00, 0x00,       // mov ecx, 1
            0x0f, 0xa2,                         // cpuid
            0x89, 0xd8,                         // mov eax, ebx      (logical CPUs at core level)
            0x66, 0xba, 0x06, 0x05,             // mov dx, 0x506
            0xef,                               // out dx, eax
            0xeb, 0xfe,                         // jmp $
        ]);
        code
    }

    fn expected_linux64_outs(num_cpus: u8) -> Vec<(u16, Vec<u8>)> {
        let sp = u32::try_from(layout::BOOT_STACK_POINTER).unwrap();
        vec![
            (layout::SERIAL_PORT, vec![b'L']),
            (0x501, vec![0x5a]),
            (0x502, vec![0xc3]),
            (0x503, sp.to_le_bytes().to_vec()),
            (0x504, 0xcafe_babeu32.to_le_bytes().to_vec()),
            // Leaf 1 EBX: APIC id 0, `num_cpus` logical processors, 64-byte CLFLUSH lines.
            (
                0x505,
                (u32::from(num_cpus) << 16 | 8 << 8).to_le_bytes().to_vec(),
            ),
            (0x506, u32::from(num_cpus).to_le_bytes().to_vec()),
        ]
    }

    fn setup_linux64(t: &TestVm, vcpu: &VcpuFd, num_cpus: u8) {
        t.mem
            .write_slice(&linux64_code(), GuestAddress(CODE_ADDR))
            .unwrap();
        t.mem
            .write_obj(0x5au8, GuestAddress(layout::ZERO_PAGE_START))
            .unwrap();
        t.mem.write_obj(0xc3u8, GuestAddress(FAR_ADDR)).unwrap();
        let boot = BootEntry::Linux64 {
            entry: GuestAddress(CODE_ADDR),
            boot_params: GuestAddress(layout::ZERO_PAGE_START),
        };
        configure_vcpu(vcpu, &t.mem, &t.supported, 0, num_cpus, Some(&boot)).unwrap();
    }

    #[test]
    fn kvm_linux64_entry_runs_64bit_code() {
        test_guests::require_kvm!();
        let t = test_vm();
        configure_system(&t.mem, 1).unwrap();
        let mut vcpu = t.vm.create_vcpu(0).unwrap();
        setup_linux64(&t, &vcpu, 1);

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_eq!(sregs.cs.l, 1);
        assert_ne!(sregs.efer & regs::EFER_LMA, 0);
        let r = vcpu.get_regs().unwrap();
        assert_eq!(r.rsi, layout::ZERO_PAGE_START);
        assert_eq!(r.rip, CODE_ADDR);

        assert_eq!(run_io_outs(&mut vcpu, 7), expected_linux64_outs(1));
    }

    #[test]
    fn kvm_two_vcpus_ap_waits_for_sipi() {
        test_guests::require_kvm!();
        let t = test_vm();
        configure_system(&t.mem, 2).unwrap();
        let mut bsp = t.vm.create_vcpu(0).unwrap();
        let ap = t.vm.create_vcpu(1).unwrap();
        setup_linux64(&t, &bsp, 2);
        configure_vcpu(&ap, &t.mem, &t.supported, 1, 2, None).unwrap();

        assert_eq!(bsp.get_mp_state().unwrap().mp_state, KVM_MP_STATE_RUNNABLE);
        assert_eq!(
            ap.get_mp_state().unwrap().mp_state,
            KVM_MP_STATE_UNINITIALIZED
        );
        // The AP's CPUID carries its own APIC id.
        let ap_cpuid = ap.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = ap_cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .unwrap();
        assert_eq!(leaf1.ebx >> 24, 1);
        assert_eq!(
            configure_vcpu(&ap, &t.mem, &t.supported, 2, 2, None)
                .unwrap_err()
                .to_string(),
            "Invalid vCPU id 2 for 2 vCPUs"
        );

        assert_eq!(run_io_outs(&mut bsp, 7), expected_linux64_outs(2));
    }
}
