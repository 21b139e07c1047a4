// SPDX-License-Identifier: Apache-2.0
//! Entry of the long-mode guests and the boot information the VMM hands them.
//!
//! `boot64.S` holds the PVH 32-bit entry (Xen ELF note, type 18), the Linux 64-bit entry at
//! 0x100200, the GDT and the 4 GiB identity map. Both paths call [`fw_entry`], which hands a
//! [`Boot`] to the guest's `guest_main!` function.
//!
//! Parsed structures: PVH `hvm_start_info` (magic 0x336ec578; cmdline_paddr at 24,
//! memmap_paddr at 40, memmap_entries at 48, 24-byte entries) and Linux `boot_params`
//! (cmd_line_ptr at 0x228, ext_cmd_line_ptr at 0xc8, e820_entries at 0x1e8, 20-byte e820
//! entries at 0x2d0).

use core::fmt;

use crate::phys;

core::arch::global_asm!(include_str!("boot64.S"), options(att_syntax));

unsafe extern "Rust" {
    /// Defined by the guest binary through `guest_main!`.
    safe fn fw_guest_main(boot: &Boot) -> !;
}

unsafe extern "C" {
    /// End of the loaded image and its .bss (linker.ld).
    static __image_end: u8;
}

/// First address after the guest image (code, data, .bss, stack).
pub fn image_end() -> u64 {
    (&raw const __image_end).addr() as u64
}

/// Called by `boot64.S` in long mode with the stack set up.
#[unsafe(no_mangle)]
extern "C" fn fw_entry(info: u64, protocol: u64) -> ! {
    let protocol = if protocol == 2 {
        BootProtocol::Linux64
    } else {
        BootProtocol::Pvh
    };
    fw_guest_main(&Boot { protocol, info })
}

/// How the guest was entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit entry from the Xen ELF note, `ebx` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol at 0x100200, `rsi` = `boot_params`.
    Linux64,
}

impl BootProtocol {
    /// Short name used in the console lines: `pvh` or `linux64`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pvh => "pvh",
            Self::Linux64 => "linux64",
        }
    }
}

/// PVH `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Largest command line read, NUL included (layout::CMDLINE_MAX_SIZE).
pub const CMDLINE_MAX: u64 = 4096;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Largest number of memory-map entries looked at.
const MEMMAP_MAX: u32 = 1024;
/// Entries that fit in the zero page's e820 table.
const E820_ZEROPAGE_MAX: u32 = 128;

/// Entry state: protocol and the physical address of its info structure.
#[derive(Debug, Clone, Copy)]
pub struct Boot {
    /// Which entry was taken.
    pub protocol: BootProtocol,
    /// Physical address of `hvm_start_info` (PVH) or `boot_params` (Linux64).
    pub info: u64,
}

/// The boot information could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootError {
    /// `hvm_start_info.magic` is wrong (or unreadable, then 0).
    BadStartInfoMagic(u32),
    /// The structure's address is outside the mapped window.
    Unreadable(u64),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadStartInfoMagic(_) => write!(f, "bad start_info magic"),
            Self::Unreadable(addr) => write!(f, "boot info at {addr:#x} unreadable"),
        }
    }
}

/// What the guest learnt from the VMM.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Kernel command line.
    pub cmdline: Cmdline,
    /// Memory map.
    pub memmap: MemMap,
}

impl Boot {
    /// Parses the protocol's info structure.
    pub fn info(&self) -> Result<BootInfo, BootError> {
        let base = self.info;
        let field = |off: u64| base.checked_add(off).ok_or(BootError::Unreadable(base));
        match self.protocol {
            BootProtocol::Pvh => {
                let magic = phys::read_u32(base).ok_or(BootError::Unreadable(base))?;
                if magic != PVH_MAGIC {
                    return Err(BootError::BadStartInfoMagic(magic));
                }
                let version = phys::read_u32(field(4)?).unwrap_or(0);
                let cmdline = phys::read_u64(field(24)?).unwrap_or(0);
                // memmap_paddr/memmap_entries exist from version 1 on.
                let (map, entries) = if version >= 1 {
                    (
                        phys::read_u64(field(40)?).unwrap_or(0),
                        phys::read_u32(field(48)?).unwrap_or(0),
                    )
                } else {
                    (0, 0)
                };
                Ok(BootInfo {
                    cmdline: Cmdline::at(cmdline),
                    memmap: MemMap {
                        addr: map,
                        count: entries.min(MEMMAP_MAX),
                        stride: 24,
                    },
                })
            }
            BootProtocol::Linux64 => {
                let lo = phys::read_u32(field(0x228)?).ok_or(BootError::Unreadable(base))?;
                let hi = phys::read_u32(field(0xc8)?).unwrap_or(0);
                let entries = phys::read_u8(field(0x1e8)?).unwrap_or(0);
                Ok(BootInfo {
                    cmdline: Cmdline::at((u64::from(hi) << 32) | u64::from(lo)),
                    memmap: MemMap {
                        addr: field(0x2d0)?,
                        count: u32::from(entries).min(E820_ZEROPAGE_MAX),
                        stride: 20,
                    },
                })
            }
        }
    }
}

/// A NUL-terminated command line in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Cmdline {
    addr: u64,
    len: u64,
}

impl Cmdline {
    fn at(addr: u64) -> Self {
        if let Some(len) = phys::strnlen(addr, CMDLINE_MAX - 1) {
            return Self { addr, len };
        }
        // Near the end of the mapped window: byte by byte up to its end.
        let mut len = 0;
        while len < CMDLINE_MAX - 1 {
            match addr.checked_add(len).and_then(phys::read_u8) {
                Some(0) | None => break,
                Some(_) => len += 1,
            }
        }
        Self { addr, len }
    }

    /// Copies the command line into the start of `buf` (as much as fits) and returns how many
    /// bytes were copied: one block copy where the bytes are mapped.
    pub fn copy_into(&self, buf: &mut [u8]) -> usize {
        let n = usize::try_from(self.len)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(dst) = buf.get_mut(..n) else {
            return 0;
        };
        if phys::copy_to(self.addr, dst).is_some() {
            return n;
        }
        let mut copied = 0;
        for (d, b) in dst.iter_mut().zip(self.bytes()) {
            *d = b;
            copied += 1;
        }
        copied
    }

    /// Length in bytes, NUL excluded.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the command line is empty (or absent).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, read from guest memory.
    pub fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        (0..self.len).map_while(|i| self.addr.checked_add(i).and_then(phys::read_u8))
    }
}

/// One memory-map entry (e820 types: 1 = RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// e820 type.
    pub kind: u32,
}

impl MemRegion {
    /// End address (exclusive), saturating.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The memory map: PVH `hvm_memmap_table_entry` array or the zero page's e820 table.
#[derive(Debug, Clone, Copy)]
pub struct MemMap {
    addr: u64,
    count: u32,
    stride: u64,
}

impl MemMap {
    /// Number of entries.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries; stops early at an unreadable one.
    pub fn iter(&self) -> impl Iterator<Item = MemRegion> + '_ {
        (0..u64::from(self.count)).map_while(|i| {
            let at = self.addr.checked_add(i.checked_mul(self.stride)?)?;
            Some(MemRegion {
                addr: phys::read_u64(at)?,
                size: phys::read_u64(at.checked_add(8)?)?,
                kind: phys::read_u32(at.checked_add(16)?)?,
            })
        })
    }

    /// Total usable RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.iter()
            .filter(|r| r.kind == E820_RAM)
            .fold(0u64, |acc, r| acc.saturating_add(r.size))
    }

    /// The highest usable RAM region, clipped to end at or below `limit`: `(start, end)`.
    pub fn highest_ram_below(&self, limit: u64) -> Option<(u64, u64)> {
        self.iter()
            .filter(|r| r.kind == E820_RAM && r.addr < limit)
            .map(|r| (r.addr, r.end().min(limit)))
            .filter(|&(start, end)| end > start)
            .max_by_key(|&(_, end)| end)
    }
}
