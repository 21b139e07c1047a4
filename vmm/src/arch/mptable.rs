// SPDX-License-Identifier: Apache-2.0
//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
//! its ISA bus, the IOAPIC and how interrupt lines reach them.
//!
//! The floating pointer structure (spec §4.1) sits at [`layout::MPTABLE_START`], the first
//! byte of the last KiB of base memory, where Linux's `find_smp_config` scans; the
//! configuration table (spec §4.2, §4.3) follows it directly. All fields are encoded by hand,
//! little-endian, at the offsets the spec gives.

use vm_memory::{Bytes, GuestAddress};

use super::layout;
use super::{ArchError, GuestMemoryMmap, check_cpu_count};

/// `"_MP_"`: floating pointer signature.
const FLOATING_SIGNATURE: [u8; 4] = *b"_MP_";
/// `"PCMP"`: configuration table signature.
const CONFIG_SIGNATURE: [u8; 4] = *b"PCMP";
/// Spec revision 1.4.
const SPEC_REVISION: u8 = 4;
/// OEM id (8 bytes, space padded).
const OEM_ID: [u8; 8] = *b"SANDBOX ";
/// Product id (12 bytes, space padded).
const PRODUCT_ID: [u8; 12] = *b"MICROVM     ";
/// Bus type string of the one bus (6 bytes, space padded).
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";

/// Size of the floating pointer structure.
pub const FLOATING_POINTER_SIZE: usize = 16;
/// Size of the configuration table header.
pub const CONFIG_HEADER_SIZE: usize = 44;
/// Size of a processor entry.
pub const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Size of every other base-table entry (bus, IOAPIC, I/O and local interrupt).
pub const SMALL_ENTRY_SIZE: usize = 8;

/// Entry type: processor.
pub const ENTRY_PROCESSOR: u8 = 0;
/// Entry type: bus.
pub const ENTRY_BUS: u8 = 1;
/// Entry type: I/O APIC.
pub const ENTRY_IOAPIC: u8 = 2;
/// Entry type: I/O interrupt assignment.
pub const ENTRY_IO_INTERRUPT: u8 = 3;
/// Entry type: local interrupt assignment.
pub const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Processor flag: enabled.
pub const CPU_ENABLED: u8 = 1;
/// Processor flag: the bootstrap processor.
pub const CPU_BOOTSTRAP: u8 = 2;
/// Local APIC version of an integrated APIC (what KVM reports in its version register).
const LAPIC_VERSION: u8 = 0x14;
/// CPU signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX feature flags reported per processor: FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = 1 | 1 << 9;
/// I/O APIC version (82093AA-compatible, what KVM's in-kernel IOAPIC reports).
const IOAPIC_VERSION: u8 = 0x11;
/// I/O APIC flag: usable.
const IOAPIC_ENABLED: u8 = 1;

/// Interrupt type: vectored interrupt (from the IOAPIC redirection entry).
pub const INT_TYPE_INT: u8 = 0;
/// Interrupt type: NMI.
pub const INT_TYPE_NMI: u8 = 1;
/// Interrupt type: ExtINT (the 8259 PIC's vector).
pub const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags: polarity and trigger mode conform to the bus.
const INT_FLAGS_CONFORM: u16 = 0;
/// The id of the one (ISA) bus.
const ISA_BUS_ID: u8 = 0;
/// Destination local APIC id meaning "every local APIC".
pub const ALL_LAPICS: u8 = 0xff;

/// Narrows a compile-time constant; a value that does not fit fails the build.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the assert proves the value fits; only used in const items"
)]
const fn const_u32(v: u64) -> u32 {
    assert!(v <= u32::MAX as u64);
    v as u32
}

/// Guest address of the configuration table, right after the floating pointer.
const CONFIG_ADDR: u32 = const_u32(layout::MPTABLE_START + FLOATING_POINTER_SIZE as u64);
/// Local APIC base as the table encodes it.
const LAPIC_ADDR: u32 = const_u32(layout::APIC_ADDR);
/// IOAPIC base as the table encodes it.
const IOAPIC_ADDR: u32 = const_u32(layout::IOAPIC_ADDR);
/// Last IOAPIC pin described, as the table encodes it.
#[expect(
    clippy::cast_possible_truncation,
    reason = "checked by the assert below: the IOAPIC has 24 pins"
)]
const LAST_IRQ: u8 = layout::IRQ_MAX as u8;
const _: () = assert!(layout::IRQ_MAX <= u8::MAX as u32);
/// Number of IOAPIC input pins described (IRQ 0 ..= [`layout::IRQ_MAX`]).
const NUM_IRQS: usize = LAST_IRQ as usize + 1;
/// Bytes taken by everything except the processor entries.
const FIXED_SIZE: usize = FLOATING_POINTER_SIZE
    + CONFIG_HEADER_SIZE
    + SMALL_ENTRY_SIZE // bus
    + SMALL_ENTRY_SIZE // IOAPIC
    + NUM_IRQS * SMALL_ENTRY_SIZE
    + 2 * SMALL_ENTRY_SIZE; // LINT0, LINT1
/// Room for the table: from its start to the end of conventional memory.
const SPACE: usize = const_u32(layout::LOW_RAM_END - layout::MPTABLE_START) as usize;
/// Processor entries that fit in [`SPACE`].
const CPUS_THAT_FIT: usize = (SPACE - FIXED_SIZE) / PROCESSOR_ENTRY_SIZE;

/// Largest vCPU count the MP table in the EBDA (layout::MPTABLE_START..layout::LOW_RAM_END)
/// can describe; at most 32.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the value is at most 32, checked at compile time below"
)]
pub const MAX_VCPUS: u8 = if CPUS_THAT_FIT < 32 {
    CPUS_THAT_FIT as u8
} else {
    32
};
const _: () = assert!(MAX_VCPUS >= 1 && (MAX_VCPUS as usize) <= CPUS_THAT_FIT);
// The IOAPIC takes APIC id `num_cpus`, which must stay below the broadcast id 0xff.
const _: () = assert!((MAX_VCPUS as usize) < ALL_LAPICS as usize);

/// A little-endian byte writer for the table.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// Overwrites bytes at `offset` (which the caller has already written past).
    fn patch(&mut self, offset: usize, v: &[u8]) {
        if let Some(dst) = self.0.get_mut(offset..offset.saturating_add(v.len())) {
            dst.copy_from_slice(v);
        }
    }
}

/// The byte that makes `bytes` sum to zero (mod 256).
pub fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `num_cpus` CPUs, as they are to be
/// written at [`layout::MPTABLE_START`].
pub fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, ArchError> {
    check_cpu_count(num_cpus)?;
    let ioapic_id = num_cpus;

    // Floating pointer (spec §4.1, table 4-1).
    let mut w = Writer(Vec::with_capacity(SPACE));
    w.bytes(&FLOATING_SIGNATURE);
    w.u32(CONFIG_ADDR);
    w.u8(1); // length in 16-byte paragraphs
    w.u8(SPEC_REVISION);
    w.u8(0); // checksum, patched below
    w.u8(0); // feature 1: 0 = a configuration table is present
    w.u8(0); // feature 2: IMCRP clear = virtual wire mode, no IMCR
    w.bytes(&[0; 3]); // features 3-5, reserved

    // Configuration table header (spec §4.2, table 4-2).
    let header = w.0.len();
    w.bytes(&CONFIG_SIGNATURE);
    w.u16(0); // base table length, patched below
    w.u8(SPEC_REVISION);
    w.u8(0); // checksum, patched below
    w.bytes(&OEM_ID);
    w.bytes(&PRODUCT_ID);
    w.u32(0); // OEM table pointer
    w.u16(0); // OEM table size
    w.u16(0); // entry count, patched below
    w.u32(LAPIC_ADDR);
    w.u16(0); // extended table length
    w.u8(0); // extended table checksum
    w.u8(0); // reserved

    let mut entries: u16 = 0;
    // Processor entries (table 4-4), one per vCPU; APIC id = vCPU id.
    for id in 0..num_cpus {
        w.u8(ENTRY_PROCESSOR);
        w.u8(id);
        w.u8(LAPIC_VERSION);
        w.u8(CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 });
        w.u32(CPU_SIGNATURE);
        w.u32(CPU_FEATURES);
        w.bytes(&[0; 8]); // reserved
        entries += 1;
    }
    // The ISA bus (table 4-8).
    w.u8(ENTRY_BUS);
    w.u8(ISA_BUS_ID);
    w.bytes(&BUS_TYPE_ISA);
    entries += 1;
    // The IOAPIC (table 4-10).
    w.u8(ENTRY_IOAPIC);
    w.u8(ioapic_id);
    w.u8(IOAPIC_VERSION);
    w.u8(IOAPIC_ENABLED);
    w.u32(IOAPIC_ADDR);
    entries += 1;
    // ISA IRQ n -> IOAPIC pin n (table 4-12), matching KVM's default GSI routing.
    for irq in 0..=LAST_IRQ {
        w.u8(ENTRY_IO_INTERRUPT);
        w.u8(INT_TYPE_INT);
        w.u16(INT_FLAGS_CONFORM);
        w.u8(ISA_BUS_ID);
        w.u8(irq); // source bus IRQ
        w.u8(ioapic_id);
        w.u8(irq); // IOAPIC INTIN#
        entries += 1;
    }
    // Local interrupts (table 4-14): the PIC's ExtINT on LINT0 and NMI on LINT1 of every
    // local APIC, as in the spec's default configurations (§5.3).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        w.u8(ENTRY_LOCAL_INTERRUPT);
        w.u8(kind);
        w.u16(INT_FLAGS_CONFORM);
        w.u8(ISA_BUS_ID);
        w.u8(0); // source bus IRQ
        w.u8(ALL_LAPICS);
        w.u8(lint);
        entries += 1;
    }

    let total = w.0.len();
    if total > SPACE {
        return Err(ArchError::MpTableTooLarge(total));
    }
    let base_len = u16::try_from(total - header).map_err(|_| ArchError::MpTableTooLarge(total))?;
    w.patch(header + 4, &base_len.to_le_bytes());
    w.patch(header + 34, &entries.to_le_bytes());
    let config_sum = checksum(w.0.get(header..).unwrap_or_default());
    w.patch(header + 7, &[config_sum]);
    let pointer_sum = checksum(w.0.get(..FLOATING_POINTER_SIZE).unwrap_or_default());
    w.patch(10, &[pointer_sum]);
    Ok(w.0)
}

/// Writes the MP table for `num_cpus` CPUs at [`layout::MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), ArchError> {
    let table = build_mptable(num_cpus)?;
    mem.write_slice(&table, GuestAddress(layout::MPTABLE_START))
        .map_err(ArchError::WriteMpTable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Everything a guest learns from the table, parsed the way a guest parses it.
    #[derive(Debug, Default)]
    struct Parsed {
        cpus: Vec<(u8, u8)>, // (APIC id, flags)
        buses: Vec<(u8, [u8; 6])>,
        ioapics: Vec<(u8, u8, u32)>,    // (id, flags, address)
        io_ints: Vec<(u8, u8, u8, u8)>, // (type, src irq, dst ioapic, pin)
        local_ints: Vec<(u8, u8, u8)>,  // (type, dst lapic, lint)
        lapic_addr: u32,
    }

    fn parse(mem: &GuestMemoryMmap) -> Parsed {
        let mut fp = [0u8; FLOATING_POINTER_SIZE];
        mem.read_slice(&mut fp, GuestAddress(layout::MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp[8], 1, "length in paragraphs");
        assert_eq!(fp[9], 4, "spec revision 1.4");
        assert_eq!(
            fp.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
            0,
            "pointer checksum"
        );
        assert_eq!(fp[11], 0, "no default configuration");
        let config = u64::from(u32_at(&fp, 4));
        assert!((layout::MPTABLE_START + 16..layout::LOW_RAM_END).contains(&config));

        let mut hdr = [0u8; CONFIG_HEADER_SIZE];
        mem.read_slice(&mut hdr, GuestAddress(config)).unwrap();
        assert_eq!(&hdr[0..4], b"PCMP");
        assert_eq!(hdr[6], 4);
        let len = usize::from(u16_at(&hdr, 4));
        assert!(
            config + len as u64 <= layout::LOW_RAM_END,
            "table ends in the EBDA"
        );
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(config)).unwrap();
        assert_eq!(
            table.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
            0,
            "config table checksum"
        );
        assert_eq!(u16_at(&hdr, 40), 0, "no extended table");
        let count = u16_at(&hdr, 34);
        let mut p = Parsed {
            lapic_addr: u32_at(&hdr, 36),
            ..Default::default()
        };
        let mut off = CONFIG_HEADER_SIZE;
        for _ in 0..count {
            let e = &table[off..];
            match e[0] {
                ENTRY_PROCESSOR => {
                    assert_eq!(e[2], LAPIC_VERSION);
                    p.cpus.push((e[1], e[3]));
                    off += PROCESSOR_ENTRY_SIZE;
                    continue;
                }
                ENTRY_BUS => p.buses.push((e[1], e[2..8].try_into().unwrap())),
                ENTRY_IOAPIC => p.ioapics.push((e[1], e[3], u32_at(e, 4))),
                ENTRY_IO_INTERRUPT => p.io_ints.push((e[1], e[5], e[6], e[7])),
                ENTRY_LOCAL_INTERRUPT => p.local_ints.push((e[1], e[6], e[7])),
                t => panic!("unknown entry type {t}"),
            }
            off += SMALL_ENTRY_SIZE;
        }
        assert_eq!(off, len, "entries fill the base table exactly");
        p
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn max_vcpus_fits_in_the_ebda() {
        assert_eq!(MAX_VCPUS, 32);
        let table = build_mptable(MAX_VCPUS).unwrap();
        assert!(layout::MPTABLE_START + table.len() as u64 <= layout::LOW_RAM_END);
    }

    #[test]
    fn too_many_or_zero_cpus_is_an_error() {
        assert!(matches!(
            build_mptable(MAX_VCPUS + 1),
            Err(ArchError::InvalidCpuCount(n)) if n == MAX_VCPUS + 1
        ));
        assert!(matches!(
            build_mptable(0),
            Err(ArchError::InvalidCpuCount(0))
        ));
        assert!(matches!(
            build_mptable(u8::MAX),
            Err(ArchError::InvalidCpuCount(255))
        ));
    }

    #[test]
    fn table_parses_back_for_every_cpu_count() {
        for n in 1..=MAX_VCPUS {
            let mem = mem();
            setup_mptable(&mem, n).unwrap();
            let p = parse(&mem);
            assert_eq!(p.lapic_addr, 0xfee0_0000);
            assert_eq!(p.cpus.len(), usize::from(n));
            for (i, (id, flags)) in p.cpus.iter().enumerate() {
                assert_eq!(usize::from(*id), i);
                let want = if i == 0 {
                    CPU_ENABLED | CPU_BOOTSTRAP
                } else {
                    CPU_ENABLED
                };
                assert_eq!(*flags, want, "cpu {i}");
            }
            assert_eq!(p.buses, vec![(0, *b"ISA   ")]);
            assert_eq!(p.ioapics, vec![(n, IOAPIC_ENABLED, 0xfec0_0000)]);
            assert_eq!(p.io_ints.len(), 24);
            for (i, (kind, src, dst, pin)) in p.io_ints.iter().enumerate() {
                assert_eq!(
                    (*kind, usize::from(*src), *dst, usize::from(*pin)),
                    (0, i, n, i)
                );
            }
            assert_eq!(
                p.local_ints,
                vec![(INT_TYPE_EXTINT, 0xff, 0), (INT_TYPE_NMI, 0xff, 1)]
            );
        }
    }

    #[test]
    fn checksum_makes_sum_zero() {
        let data = [1u8, 2, 3, 250];
        let c = checksum(&data);
        assert_eq!(data.iter().fold(c, |s, b| s.wrapping_add(*b)), 0);
        assert_eq!(checksum(&[]), 0);
    }
}
