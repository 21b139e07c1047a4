// SPDX-License-Identifier: Apache-2.0
//! Legacy (non-virtio) devices: the 8250 serial console, the i8042 reset port and the boot timer.

mod boot_timer;
mod i8042;
mod serial;

pub use boot_timer::{BootSignal, BootTimer};
pub use i8042::I8042;
pub use serial::{ConsoleSink, ConsoleTail, LineTrigger, SerialConsole, TAIL_CAPACITY};
pub use vm_superio::serial::SerialState;
