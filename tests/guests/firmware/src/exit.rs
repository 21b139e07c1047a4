// SPDX-License-Identifier: Apache-2.0
//! The guest's signals to the VMM: the boot timer, and the ways a guest ends.

use core::arch::asm;

use crate::{phys, serial};

/// Boot timer MMIO address (layout::BOOT_TIMER_ADDR, start of the MMIO gap).
pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
/// The byte that signals "guest is up" (`devices::legacy::BootTimer::MAGIC`).
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// i8042 command port.
pub const I8042_CMD_PORT: u16 = 0x64;
/// i8042 "pulse reset line" command.
pub const I8042_RESET_CMD: u8 = 0xfe;

/// Writes the boot-timer byte. Without a device there (e.g. under QEMU) the write is dropped.
pub fn signal_boot_timer() {
    phys::write_u8(BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC);
}

/// Asks for a reset through the i8042 controller; returns if the VMM ignored it.
pub fn i8042_reset() {
    serial::outb(I8042_CMD_PORT, I8042_RESET_CMD);
}

/// Ends the VM with a triple fault: an empty IDT turns `ud2` into #UD -> #DF -> shutdown, which
/// the VMM sees as `KVM_EXIT_SHUTDOWN`. (`hlt` would wait forever with the in-kernel irqchip,
/// and `int3` breaks the host's emulator, DESIGN.md §5.)
pub fn triple_fault() -> ! {
    let idtr = [0u8; 10]; // limit 0, base 0
    // SAFETY: `lidt` reads 10 bytes from a live local; after it any exception is fatal, which is
    // the purpose. Nothing runs after `ud2`.
    unsafe { asm!("lidt [{0}]", "ud2", in(reg) idtr.as_ptr(), options(noreturn, nostack)) }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only writes edx:eax; CR4.TSD is clear at CPL 0 anyway.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Busy-waits about `cycles` TSC ticks.
pub fn delay_cycles(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}
