// SPDX-License-Identifier: Apache-2.0
//! Intel MultiProcessor Specification 1.4 table: find the floating pointer, check the
//! checksums, list the enabled processors.

use crate::phys;

/// Most processors recorded (xAPIC ids are 8-bit).
pub const MAX_CPUS: usize = 255;

/// Where the floating pointer may be: the VMM's EBDA (layout::MPTABLE_START), the BIOS EBDA
/// named by the BDA word at 0x40e, and the BIOS ROM area (where SeaBIOS puts it).
const SEARCH: [(u64, u64); 2] = [(0x9_fc00, 0xa_0000), (0xf_0000, 0x10_0000)];

/// What the MP table says.
#[derive(Debug, Clone, Copy)]
pub struct MpInfo {
    /// Physical address of the floating pointer.
    pub floating: u64,
    /// Local APIC base from the configuration table header.
    pub lapic_addr: u32,
    /// APIC ids of the enabled processors, in table order.
    apic_ids: [u8; MAX_CPUS],
    /// Enabled processor entries.
    count: usize,
    /// APIC id of the processor marked as bootstrap, if any.
    pub bsp_apic_id: Option<u8>,
}

impl MpInfo {
    /// Number of enabled processors.
    pub fn cpus(&self) -> usize {
        self.count
    }

    /// APIC ids of the enabled processors.
    pub fn apic_ids(&self) -> &[u8] {
        self.apic_ids.get(..self.count).unwrap_or(&[])
    }
}

/// Why no usable table was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpError {
    /// No "_MP_" floating pointer with a valid checksum.
    NoFloatingPointer,
    /// The floating pointer names no configuration table (default configurations unsupported).
    NoConfigTable,
    /// "PCMP" signature or checksum wrong, or an entry runs past the table.
    BadConfigTable,
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        match addr.checked_add(i).and_then(phys::read_u8) {
            Some(b) => sum = sum.wrapping_add(b),
            None => return false,
        }
    }
    sum == 0
}

fn find_floating() -> Option<u64> {
    let ebda = phys::read_u16(0x40e)
        .map(|seg| u64::from(seg) << 4)
        .filter(|&a| a != 0);
    let ebda_range = ebda.map(|a| (a, a.saturating_add(1024)));
    for (start, end) in ebda_range.into_iter().chain(SEARCH) {
        let mut addr = start;
        while addr.saturating_add(16) <= end {
            if phys::read_u32(addr) == Some(u32::from_le_bytes(*b"_MP_")) {
                let len = phys::read_u8(addr + 8).map_or(0, |l| u64::from(l) * 16);
                if len >= 16 && checksum_ok(addr, len) {
                    return Some(addr);
                }
            }
            addr += 16;
        }
    }
    None
}

/// Finds and parses the MP table.
pub fn parse() -> Result<MpInfo, MpError> {
    let floating = find_floating().ok_or(MpError::NoFloatingPointer)?;
    let table = phys::read_u32(floating + 4).map(u64::from).unwrap_or(0);
    if table == 0 {
        return Err(MpError::NoConfigTable);
    }
    let bad = MpError::BadConfigTable;
    if phys::read_u32(table) != Some(u32::from_le_bytes(*b"PCMP")) {
        return Err(bad);
    }
    let base_len = phys::read_u16(table.checked_add(4).ok_or(bad)?).ok_or(bad)?;
    if base_len < 44 || !checksum_ok(table, u64::from(base_len)) {
        return Err(bad);
    }
    let lapic_addr = phys::read_u32(table + 36).ok_or(bad)?;
    let end = table + u64::from(base_len);

    let mut info = MpInfo {
        floating,
        lapic_addr,
        apic_ids: [0; MAX_CPUS],
        count: 0,
        bsp_apic_id: None,
    };
    // Walk the entries by the table length, as Linux does: some firmware (qboot) leaves the
    // entry count at 0.
    let mut at = table + 44;
    while at < end {
        let kind = phys::read_u8(at).ok_or(bad)?;
        let len = if kind == 0 { 20 } else { 8 };
        if kind > 4 || at + len > end {
            return Err(bad);
        }
        if kind == 0 {
            let apic_id = phys::read_u8(at + 1).ok_or(bad)?;
            let flags = phys::read_u8(at + 3).ok_or(bad)?;
            if flags & 1 != 0 {
                if let Some(slot) = info.apic_ids.get_mut(info.count) {
                    *slot = apic_id;
                    info.count += 1;
                }
                if flags & 2 != 0 {
                    info.bsp_apic_id = Some(apic_id);
                }
            }
        }
        at += len;
    }
    Ok(info)
}
