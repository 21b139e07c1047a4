// SPDX-License-Identifier: Apache-2.0
//! `pvh32`: stays in 32-bit protected mode from PVH entry to triple fault. All of it is the
//! assembly in `pvh32.S`; no Rust code runs (Rust here is compiled for 64-bit mode).
//!
//! Console: `pvh32: hello`, `cmdline: <cmdline>` and `memmap: <n> entries` (or
//! `pvh32: bad start_info magic`), boot-timer write, `pvh32: bye`, triple fault.
#![no_std]
#![no_main]

core::arch::global_asm!(include_str!("pvh32.S"), options(att_syntax));

/// Never called (no Rust code runs in this guest), but a `no_std` binary must have one.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    let idtr = [0u8; 10];
    // SAFETY: loads an empty IDT from a live local, then `ud2` triple faults; nothing follows.
    unsafe {
        core::arch::asm!("lidt [{0}]", "ud2", in(reg) idtr.as_ptr(), options(noreturn, nostack))
    }
}
