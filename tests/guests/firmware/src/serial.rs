// SPDX-License-Identifier: Apache-2.0
//! COM1 console output and raw port I/O.
//!
//! Bytes are written straight to the transmit register: the VMM's 8250 (vm-superio) and QEMU's
//! both accept them at any time, and polling the line status would cost one more exit a byte.

use core::arch::asm;
use core::fmt;

/// COM1 base I/O port (layout::SERIAL_PORT).
pub const COM1: u16 = 0x3f8;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output touches no memory of this program; every port the guests use is
    // emulated by the VMM, and the guest runs at CPL 0 so `out` cannot fault.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; `in` only writes `al`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// The COM1 console. Zero-sized: every guest has exactly one and never shares it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl Serial {
    /// Writes raw bytes.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            outb(COM1, b);
        }
    }

    /// Writes the bytes of an iterator (e.g. a command line read from guest memory).
    pub fn write_iter(&mut self, bytes: impl IntoIterator<Item = u8>) {
        for b in bytes {
            outb(COM1, b);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}
