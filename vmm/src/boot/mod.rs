// SPDX-License-Identifier: Apache-2.0
//! Loading the guest: kernel, command line, initramfs and the boot-protocol structures.
//!
//! - An ELF `vmlinux` with a PVH note boots through PVH: `hvm_start_info` with the e820-style
//!   memory map, the command line and the initramfs as module 0.
//! - A `bzImage`, or an ELF without a PVH note, boots through the Linux 64-bit boot protocol: the
//!   `boot_params` zero page with the e820 table, the command line and the ramdisk.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use devices::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::BootEntry;
use crate::arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_RAM_START, HIMEM_START, MMIO_GAP_START,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::config::{KernelFormat, ValidatedConfig, page_align_up};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// e820 type for usable RAM.
const E820_RAM: u32 = 1;
/// e820 type for reserved memory.
const E820_RESERVED: u32 = 2;
/// Boot protocol `type_of_loader` for an unregistered boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry point from the protected-mode kernel's load address.
const STARTUP_64_OFFSET: u64 = 0x200;
/// `boot_flag` value and `HdrS` magic of a Linux boot protocol header.
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `setup_header.loadflags`: the kernel is loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x01;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Rewinding the kernel file failed.
    #[error("Failed to read the kernel")]
    ReadKernel(#[source] std::io::Error),
    /// linux-loader rejected or failed to load the kernel.
    #[error("Failed to load the kernel")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The loaded bzImage carried no setup header.
    #[error("The bzImage has no setup header")]
    NoSetupHeader,
    /// Writing the command line failed.
    #[error("Failed to write the kernel command line")]
    WriteCmdline(#[source] vm_memory::GuestMemoryError),
    /// The command line is too long.
    #[error("Kernel command line of {0} bytes exceeds the limit")]
    CmdlineTooLong(usize),
    /// Copying the initramfs failed.
    #[error("Failed to load the initramfs")]
    LoadInitramfs(#[source] vm_memory::GuestMemoryError),
    /// The initramfs does not fit above the kernel.
    #[error("The initramfs does not fit in guest memory above the kernel")]
    InitramfsPlacement,
    /// Writing the boot-protocol structures failed.
    #[error("Failed to write the boot parameters")]
    WriteBootParams(#[source] vm_memory::GuestMemoryError),
}

/// One e820 memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type (1 = RAM, 2 = reserved).
    pub kind: u32,
}

/// The guest's memory map for `mem_bytes` of RAM.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        // The EBDA (MP table) up to the end of the legacy BIOS area.
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Loads kernel, command line and initramfs into `mem` and writes the boot structures.
/// Returns how the boot vCPU must enter the kernel.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    cfg: &mut ValidatedConfig,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    cfg.kernel
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = match cfg.kernel_format {
        KernelFormat::Elf => Elf::load(mem, None, &mut cfg.kernel, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut cfg.kernel, himem),
    }
    .map_err(BootError::LoadKernel)?;

    let cmdline_len = write_cmdline(mem, cmdline)?;
    let initramfs = match cfg.initramfs.as_mut() {
        Some((file, size)) => Some(load_initramfs(
            mem,
            file,
            *size,
            cfg.mem_bytes,
            cfg.kernel_end,
        )?),
        None => None,
    };
    let map = e820_map(cfg.mem_bytes);

    match (cfg.kernel_format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh(mem, &map, initramfs)?;
            Ok(BootEntry::Pvh {
                entry,
                start_info: GuestAddress(PVH_INFO_START),
            })
        }
        (KernelFormat::Elf, _) => {
            write_zero_page(mem, default_setup_header(), &map, cmdline_len, initramfs)?;
            Ok(BootEntry::Linux64 {
                entry: loaded.kernel_load,
                boot_params: GuestAddress(ZERO_PAGE_START),
            })
        }
        (KernelFormat::BzImage, _) => {
            let hdr = loaded.setup_header.ok_or(BootError::NoSetupHeader)?;
            write_zero_page(mem, hdr, &map, cmdline_len, initramfs)?;
            Ok(BootEntry::Linux64 {
                entry: startup_64(&loaded),
                boot_params: GuestAddress(ZERO_PAGE_START),
            })
        }
    }
}

fn startup_64(loaded: &KernelLoaderResult) -> GuestAddress {
    loaded.kernel_load.unchecked_add(STARTUP_64_OFFSET)
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let len = cmdline.len();
    if len + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(len));
    }
    let mut bytes = Vec::with_capacity(len + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::WriteCmdline)?;
    Ok(len)
}

/// Places the initramfs at the top of low RAM, page aligned, above the kernel.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    file: &mut File,
    size: u64,
    mem_bytes: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= page_align_up(kernel_end))
        .ok_or(BootError::InitramfsPlacement)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::LoadInitramfs(vm_memory::GuestMemoryError::IOError(e)))?;
    let len = usize::try_from(size).map_err(|_| BootError::InitramfsPlacement)?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(BootError::LoadInitramfs)?;
    Ok((addr, size))
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let write_err = BootError::WriteBootParams;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(map.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(write_err)?;
    }
    if let Some((paddr, size)) = initramfs {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(write_err)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(write_err)
}

/// The setup header for an ELF kernel entered through its 64-bit entry point.
fn default_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: 0x0100_0000,
        loadflags: LOADED_HIGH,
        ..Default::default()
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    map: &[E820Entry],
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).expect("the command line sits below 4 GiB");
    hdr.cmdline_size =
        u32::try_from(cmdline_len).map_err(|_| BootError::CmdlineTooLong(cmdline_len))?;
    if let Some((addr, size)) = initramfs {
        hdr.ramdisk_image = u32::try_from(addr).map_err(|_| BootError::InitramfsPlacement)?;
        hdr.ramdisk_size = u32::try_from(size).map_err(|_| BootError::InitramfsPlacement)?;
    }
    params.hdr = hdr;
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = u8::try_from(map.len().min(params.e820_table.len())).unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_vm() {
        let map = e820_map(64 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 64 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (64 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn e820_large_vm_has_high_ram() {
        let map = e820_map(8 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, HIGH_RAM_START);
        assert_eq!(map[3].size, (8 << 30) - MMIO_GAP_START);
    }

    #[test]
    fn pvh_structures_are_written_where_the_guest_looks() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let map = e820_map(32 << 20);
        write_pvh(&mem, &map, Some((0x100_0000, 0x2000))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x100_0000, 0x2000));
        let e: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!(e.addr, HIMEM_START);
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
    }

    #[test]
    fn zero_page_carries_cmdline_ramdisk_and_e820() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let map = e820_map(32 << 20);
        write_zero_page(
            &mem,
            default_setup_header(),
            &map,
            13,
            Some((0x180_0000, 0x1000)),
        )
        .unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        let cmd_line_ptr = hdr.cmd_line_ptr;
        assert_eq!(u64::from(cmd_line_ptr), CMDLINE_START);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ hdr.ramdisk_image }, 0x180_0000);
        assert_eq!({ hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!({ last.addr }, HIMEM_START);
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::write(&path, vec![0x5a; 5000]).unwrap();
        let mut file = File::open(&path).unwrap();
        let (addr, size) = load_initramfs(&mem, &mut file, 5000, 32 << 20, 0x20_0000).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr, ((32 << 20) - 5000) & !0xfff);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 0x5a);
        let mut file = File::open(&path).unwrap();
        assert!(matches!(
            load_initramfs(&mem, &mut file, 5000, 32 << 20, (32 << 20) - 100),
            Err(BootError::InitramfsPlacement)
        ));
    }
}
