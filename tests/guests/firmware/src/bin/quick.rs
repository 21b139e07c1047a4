// SPDX-License-Identifier: Apache-2.0
//! `quick`: signals the boot timer as its first instruction, prints `quick: bye`, triple faults.
//! All of it is the assembly in `quick.S` (the start-up benchmark guest).
//!
//! Console: `quick: bye`.
#![no_std]
#![no_main]

core::arch::global_asm!(include_str!("quick.S"), options(att_syntax));

/// Never called (no Rust code runs in this guest), but a `no_std` binary must have one.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    let idtr = [0u8; 10];
    // SAFETY: loads an empty IDT from a live local, then `ud2` triple faults; nothing follows.
    unsafe {
        core::arch::asm!("lidt [{0}]", "ud2", in(reg) idtr.as_ptr(), options(noreturn, nostack))
    }
}
