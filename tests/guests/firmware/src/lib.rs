// SPDX-License-Identifier: Apache-2.0
//! Runtime shared by the long-mode test guests: entry code (PVH and Linux 64-bit boot), serial
//! console, boot-info parsing, the boot-timer signal, MP table and xAPIC helpers, interrupts
//! (IDT, IOAPIC, LAPIC timer), DMA memory, a minimal virtio-mmio driver, and the ways a guest
//! ends (triple fault, i8042 reset).
//!
//! A guest binary is `#![no_std] #![no_main]`, calls [`guest_main!`] with its entry function
//! and links this crate; `pvh32` is the exception (pure 32-bit assembly, no Rust at run time).
#![no_std]
#![warn(missing_docs)]

pub mod boot;
pub mod dma;
pub mod exit;
pub mod irq;
pub mod mptable;
pub mod phys;
pub mod serial;
pub mod smp;
pub mod virtio;

pub use boot::{Boot, BootError, BootInfo, BootProtocol};
pub use serial::Serial;

/// Declares the guest's entry function, `fn(&Boot) -> !`, which the shared boot code calls in
/// long mode with the 4 GiB identity map, a 64 KiB stack and a zeroed `.bss`.
#[macro_export]
macro_rules! guest_main {
    ($main:path) => {
        /// Entry called by the shared boot code (see `firmware::boot`).
        #[unsafe(no_mangle)]
        pub fn fw_guest_main(boot: &$crate::Boot) -> ! {
            $main(boot)
        }
    };
}

/// Prints to the COM1 console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use ::core::fmt::Write as _;
        // Writing to the serial port cannot fail.
        let _ = ::core::write!($crate::Serial, $($arg)*);
    }};
}

/// Prints a line to the COM1 console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use ::core::fmt::Write as _;
        // Writing to the serial port cannot fail.
        let _ = ::core::writeln!($crate::Serial, $($arg)*);
    }};
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(loc) => println!("PANIC: {} at {}:{}", info.message(), loc.file(), loc.line()),
        None => println!("PANIC: {}", info.message()),
    }
    exit::triple_fault()
}
