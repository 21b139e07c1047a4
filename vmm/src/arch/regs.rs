// SPDX-License-Identifier: Apache-2.0
//! Boot vCPU state: general and special registers, FPU, the boot GDT/IDT and the long-mode
//! page tables.
//!
//! The boot GDT at [`layout::GDT_ADDR`] has four 8-byte entries:
//!
//! | selector | descriptor |
//! |---|---|
//! | 0x00 | null |
//! | 0x08 | TSS (only loaded through `KVM_SET_SREGS`; a guest never `ltr`s it) |
//! | 0x10 | flat code: 32-bit for PVH, 64-bit for Linux64 (`__BOOT_CS`) |
//! | 0x18 | flat read/write data (`__BOOT_DS`) |
//!
//! This matches the selectors the Linux 64-bit boot protocol names (`__BOOT_CS` = 0x10,
//! `__BOOT_DS` = 0x18); the PVH ABI names none. The IDT at [`layout::IDT_ADDR`] is a single
//! zero entry, so any exception before the guest loads its own IDT triple-faults, which KVM
//! reports as `KVM_EXIT_SHUTDOWN`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use super::{ArchError, BootEntry, GuestMemoryMmap};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1;
/// CR0.ET: extension type (hard-wired to 1 on every CPU since the 486).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, which always reads as 1.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// Selector of the boot TSS.
pub const BOOT_TSS_SELECTOR: u16 = 0x08;
/// Selector of the boot code segment (`__BOOT_CS`).
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
/// Selector of the boot data segment (`__BOOT_DS`).
pub const BOOT_DATA_SELECTOR: u16 = 0x18;
/// Number of entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 4;

/// Descriptor flags (access byte in bits 0-7, G/DB/L/AVL in bits 12-15): present, ring 0,
/// 32-bit execute/read code, 4 KiB granularity.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Present, ring 0, 64-bit (L=1) execute/read code, 4 KiB granularity.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Present, ring 0, read/write data, 32-bit, 4 KiB granularity.
pub const DATA_FLAGS: u16 = 0xc093;
/// Present, busy 32/64-bit TSS, byte granularity.
pub const TSS_FLAGS: u16 = 0x008b;
/// Limit of a TSS without an I/O permission bitmap (104 bytes).
pub const TSS_LIMIT: u32 = 0x67;
/// Limit field of the flat segments: 0xfffff pages = 4 GiB.
pub const FLAT_LIMIT: u32 = 0xf_ffff;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
pub const FPU_FCW: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked.
pub const FPU_MXCSR: u32 = 0x1f80;

/// Page-table entry bits: present and writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry bit: 2 MiB page.
const PDE_PAGE_SIZE: u64 = 0x80;
/// Entries in one page table.
const PT_ENTRIES: u64 = 512;

// The boot GDT must end before the IDT, and the page tables below guest-free memory.
const _: () = assert!(layout::GDT_ADDR + 8 * BOOT_GDT_ENTRIES as u64 <= layout::IDT_ADDR);
const _: () = assert!(layout::PML4_START + 4096 <= layout::PDPTE_START);
const _: () = assert!(layout::PDPTE_START + 4096 <= layout::PDE_START);
const _: () = assert!(layout::PDE_START + 8 * PT_ENTRIES <= layout::GUEST_FREE_LOW_START);

/// Encodes a GDT descriptor from its `flags` (access byte plus the G/DB/L/AVL nibble in bits
/// 12-15), `base` and 20-bit `limit`.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = u64::from(flags);
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The `width`-bit field of `value` at `shift`, for widths of at most 8.
fn field_u8(value: u64, shift: u32, width: u32) -> u8 {
    let mask = (1u64 << width.min(8)) - 1;
    u8::try_from((value >> shift) & mask).expect("masked to at most 8 bits")
}

/// The segment register state KVM wants for GDT descriptor `entry` at selector `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit =
        u32::try_from((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)).expect("20-bit limit fits");
    let g = field_u8(entry, 55, 1);
    let present = field_u8(entry, 47, 1);
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: field_u8(entry, 40, 4),
        s: field_u8(entry, 44, 1),
        dpl: field_u8(entry, 45, 2),
        present,
        avl: field_u8(entry, 52, 1),
        l: field_u8(entry, 53, 1),
        db: field_u8(entry, 54, 1),
        g,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT for `boot` (see the module docs for the layout).
pub fn boot_gdt(boot: &BootEntry) -> [u64; BOOT_GDT_ENTRIES] {
    let code = match boot {
        BootEntry::Pvh { .. } => CODE32_FLAGS,
        BootEntry::Linux64 { .. } => CODE64_FLAGS,
    };
    [
        0,
        gdt_entry(TSS_FLAGS, 0, TSS_LIMIT),
        gdt_entry(code, 0, FLAT_LIMIT),
        gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT),
    ]
}

/// Writes the boot GDT and the empty IDT into guest memory.
fn write_gdt_idt(mem: &GuestMemoryMmap, gdt: &[u64; BOOT_GDT_ENTRIES]) -> Result<(), ArchError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(layout::GDT_ADDR))
        .map_err(ArchError::WriteGdt)?;
    mem.write_slice(&0u64.to_le_bytes(), GuestAddress(layout::IDT_ADDR))
        .map_err(ArchError::WriteIdt)
}

/// The PML4, PDPT and page directory identity-mapping the first 1 GiB with 2 MiB pages, as
/// (guest address, bytes) pairs.
pub fn identity_page_tables() -> [(u64, Vec<u8>); 3] {
    let pml4 = (layout::PDPTE_START | PTE_PRESENT_RW)
        .to_le_bytes()
        .to_vec();
    let pdpt = (layout::PDE_START | PTE_PRESENT_RW).to_le_bytes().to_vec();
    let pd = (0..PT_ENTRIES)
        .flat_map(|i| ((i << 21) | PDE_PAGE_SIZE | PTE_PRESENT_RW).to_le_bytes())
        .collect();
    [
        (layout::PML4_START, pml4),
        (layout::PDPTE_START, pdpt),
        (layout::PDE_START, pd),
    ]
}

/// Writes the long-mode identity map (see [`identity_page_tables`]).
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), ArchError> {
    for (addr, bytes) in identity_page_tables() {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(ArchError::WritePageTables)?;
    }
    Ok(())
}

/// Sets the x87 control word and MXCSR to their post-reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let fpu = kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ArchError::SetFpu)
}

/// The PVH ABI passes 32-bit physical addresses.
fn pvh_u32(addr: GuestAddress) -> Result<u64, ArchError> {
    u32::try_from(addr.0)
        .map(u64::from)
        .map_err(|_| ArchError::PvhAddressAbove4G(addr.0))
}

/// The general registers for `boot`.
pub fn boot_regs(boot: &BootEntry) -> Result<kvm_regs, ArchError> {
    Ok(match *boot {
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: pvh_u32(entry)?,
            rbx: pvh_u32(start_info)?,
            ..Default::default()
        },
        BootEntry::Linux64 { entry, boot_params } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: boot_params.0,
            ..Default::default()
        },
    })
}

/// Applies the boot segments, descriptor tables and control registers for `boot` to `sregs`
/// (as read from the vCPU, so KVM's APIC base and other reset state are kept).
pub fn apply_boot_sregs(sregs: &mut kvm_bindings::kvm_sregs, boot: &BootEntry) {
    let gdt = boot_gdt(boot);
    let [_, tss, code, data] = gdt;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = u16::try_from(BOOT_GDT_ENTRIES * 8 - 1).expect("32-byte GDT");
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = u16::try_from(size_of::<u64>() - 1).expect("8-byte IDT");

    sregs.cs = segment_from_gdt(code, BOOT_CODE_SELECTOR);
    let data = segment_from_gdt(data, BOOT_DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(tss, BOOT_TSS_SELECTOR);

    match boot {
        BootEntry::Pvh { .. } => {
            // PVH: "CR0: PE set, all other writeable bits clear"; CR4 clear; no long mode.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

/// Everything the boot vCPU needs beyond what every vCPU gets: GDT/IDT in guest memory, page
/// tables (Linux64), special and general registers.
pub fn setup_boot_state(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
) -> Result<(), ArchError> {
    // Validate before touching guest memory or the vCPU.
    let regs = boot_regs(boot)?;
    write_gdt_idt(mem, &boot_gdt(boot))?;
    if let BootEntry::Linux64 { .. } = boot {
        setup_page_tables(mem)?;
    }
    let mut sregs = vcpu.get_sregs().map_err(ArchError::GetSregs)?;
    apply_boot_sregs(&mut sregs, boot);
    vcpu.set_sregs(&sregs).map_err(ArchError::SetSregs)?;
    vcpu.set_regs(&regs).map_err(ArchError::SetRegs)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_sregs;

    use super::*;

    const PVH: BootEntry = BootEntry::Pvh {
        entry: GuestAddress(0x1_0000),
        start_info: GuestAddress(layout::PVH_INFO_START),
    };
    const LINUX64: BootEntry = BootEntry::Linux64 {
        entry: GuestAddress(0x100_0000),
        boot_params: GuestAddress(layout::ZERO_PAGE_START),
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entry_encoding() {
        // Well-known encodings of flat segments.
        assert_eq!(
            gdt_entry(CODE64_FLAGS, 0, FLAT_LIMIT),
            0x00af_9b00_0000_ffff
        );
        assert_eq!(
            gdt_entry(CODE32_FLAGS, 0, FLAT_LIMIT),
            0x00cf_9b00_0000_ffff
        );
        assert_eq!(gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(TSS_FLAGS, 0, TSS_LIMIT), 0x0000_8b00_0000_0067);
        assert_eq!(gdt_entry(0, 0, 0), 0);
        // Base and limit are split across the descriptor.
        assert_eq!(
            gdt_entry(DATA_FLAGS, 0x1234_5678, 0xa_bcde),
            0x12ca_9334_5678_bcde
        );
    }

    #[test]
    fn segment_from_gdt_decodes_every_field() {
        let cs = segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, FLAT_LIMIT), 0x10);
        assert_eq!(
            (cs.base, cs.limit, cs.selector, cs.type_, cs.present, cs.dpl),
            (0, 0xffff_ffff, 0x10, 0xb, 1, 0)
        );
        assert_eq!(
            (cs.db, cs.s, cs.l, cs.g, cs.avl, cs.unusable),
            (0, 1, 1, 1, 0, 0)
        );

        let ds = segment_from_gdt(gdt_entry(DATA_FLAGS, 0x1234_5678, 0xa_bcde), 0x18);
        assert_eq!(
            (ds.base, ds.limit, ds.type_),
            (0x1234_5678, 0xabcd_efff, 0x3)
        );
        assert_eq!((ds.db, ds.s, ds.l, ds.g), (1, 1, 0, 1));

        let tr = segment_from_gdt(gdt_entry(TSS_FLAGS, 0, TSS_LIMIT), 0x08);
        assert_eq!(
            (tr.limit, tr.type_, tr.s, tr.g, tr.present),
            (0x67, 0xb, 0, 0, 1)
        );

        let null = segment_from_gdt(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));

        let ring3 = segment_from_gdt(gdt_entry(0xf3, 0, 0xffff), 0x2b);
        assert_eq!((ring3.dpl, ring3.g, ring3.limit), (3, 0, 0xffff));
    }

    #[test]
    fn gdt_and_idt_are_written() {
        let mem = mem();
        for boot in [PVH, LINUX64] {
            let gdt = boot_gdt(&boot);
            write_gdt_idt(&mem, &gdt).unwrap();
            for (i, want) in gdt.iter().enumerate() {
                let got: u64 = mem
                    .read_obj(GuestAddress(layout::GDT_ADDR + 8 * i as u64))
                    .unwrap();
                assert_eq!(got, *want, "GDT entry {i}");
            }
            let idt: u64 = mem.read_obj(GuestAddress(layout::IDT_ADDR)).unwrap();
            assert_eq!(idt, 0);
        }
        assert_eq!(boot_gdt(&PVH)[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(boot_gdt(&LINUX64)[2], 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_1gib() {
        let mem = mem();
        setup_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(layout::PDPTE_START)).unwrap();
        assert_eq!(pdpt, layout::PDE_START | 3);
        for i in 0..512u64 {
            let pde: u64 = mem
                .read_obj(GuestAddress(layout::PDE_START + 8 * i))
                .unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PDE {i}");
        }
        // The next table entries are not mapped.
        let pml4_1: u64 = mem.read_obj(GuestAddress(layout::PML4_START + 8)).unwrap();
        assert_eq!(pml4_1, 0);
    }

    #[test]
    fn boot_regs_follow_each_protocol() {
        let pvh = boot_regs(&PVH).unwrap();
        assert_eq!(
            (pvh.rip, pvh.rbx, pvh.rflags),
            (0x1_0000, layout::PVH_INFO_START, 2)
        );
        assert_eq!((pvh.rsi, pvh.rsp), (0, 0));
        let l = boot_regs(&LINUX64).unwrap();
        assert_eq!(
            (l.rip, l.rsi, l.rflags),
            (0x100_0000, layout::ZERO_PAGE_START, 2)
        );
        assert_eq!(
            (l.rsp, l.rbp),
            (layout::BOOT_STACK_POINTER, layout::BOOT_STACK_POINTER)
        );

        let high = BootEntry::Pvh {
            entry: GuestAddress(1 << 32),
            start_info: GuestAddress(0),
        };
        assert!(matches!(
            boot_regs(&high),
            Err(ArchError::PvhAddressAbove4G(0x1_0000_0000))
        ));
    }

    #[test]
    fn boot_sregs_follow_each_protocol() {
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        apply_boot_sregs(&mut s, &PVH);
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x11, 0, 0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.limit),
            (0x10, 1, 0, 0xffff_ffff)
        );
        for seg in [s.ds, s.es, s.ss, s.fs, s.gs] {
            assert_eq!(
                (seg.selector, seg.type_, seg.limit, seg.base),
                (0x18, 3, 0xffff_ffff, 0)
            );
        }
        assert_eq!((s.tr.selector, s.tr.type_, s.tr.limit), (0x08, 0xb, 0x67));
        assert_eq!((s.gdt.base, s.gdt.limit), (layout::GDT_ADDR, 31));
        assert_eq!((s.idt.base, s.idt.limit), (layout::IDT_ADDR, 7));
        assert_eq!(s.apic_base, 0xfee0_0900, "KVM's reset state is kept");

        apply_boot_sregs(&mut s, &LINUX64);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!((s.cr3, s.cr4, s.efer), (layout::PML4_START, 0x20, 0x500));
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (0x10, 0, 1));
    }
}
