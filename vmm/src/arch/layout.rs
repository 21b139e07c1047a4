// SPDX-License-Identifier: Apache-2.0
//! The guest physical address map shared by the VMM, its boot code and the test guests.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)             0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info          0x0000_6040  PVH module list (initramfs)
//! 0x0000_7000  PVH memory map / zero page  0x0000_8ff0  boot stack
//! 0x0000_9000  PML4, PDPTE, PDE (long-mode identity map of the first 1 GiB)
//! 0x0001_0000  free for guest use (e.g. AP trampolines) up to 0x2_0000
//! 0x0002_0000  kernel command line         0x0009_fc00  EBDA: MP table
//! 0x0010_0000  kernel (HIMEM_START) ... RAM up to the MMIO gap
//! 0xd000_0000  MMIO gap: boot timer, then one 4 KiB slot per virtio-mmio device
//! 0xfec0_0000  IOAPIC                      0xfee0_0000  LAPIC
//! 0x1_0000_0000 RAM above 4 GiB (whatever did not fit below the gap)
//! ```

/// Global descriptor table used by the boot vCPU state.
pub const GDT_ADDR: u64 = 0x500;
/// An empty interrupt descriptor table.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs entry), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (e820-style entries).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol `boot_params` ("zero page"); only one of PVH or Linux boot is used.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Long-mode page tables for the Linux 64-bit boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages = first 1 GiB identity mapped).
pub const PDE_START: u64 = 0xb000;
/// First byte of low memory the VMM never writes (guests may use it freely up to 0x2_0000).
pub const GUEST_FREE_LOW_START: u64 = 0x1_0000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted, including the NUL terminator.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the MP floating pointer and configuration table are written.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of conventional memory (640 KiB); the e820 map reserves from here to 1 MiB.
pub const LOW_RAM_END: u64 = 0xa_0000;
/// The kernel is loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (exclusive).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Boot timer: the guest writes `devices::legacy::BootTimer::MAGIC` here once it is up.
pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
/// Size of the boot timer's MMIO window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_START: u64 = BOOT_TIMER_ADDR + BOOT_TIMER_SIZE;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// IOAPIC MMIO base (in-kernel irqchip).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC MMIO base (in-kernel irqchip).
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// Where RAM continues above the gap.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// COM1 I/O port base.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port (the device spans it to the command port, 0x64, where the "pulse reset
/// line" command ends the VM).
pub const I8042_DATA_PORT: u16 = 0x60;
/// First interrupt line handed to virtio-mmio devices.
pub const IRQ_BASE: u32 = 5;
/// Last interrupt line the IOAPIC offers (24 pins).
pub const IRQ_MAX: u32 = 23;
