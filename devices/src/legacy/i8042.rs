// SPDX-License-Identifier: Apache-2.0
//! A minimal i8042 keyboard controller: only the "pulse reset line" command matters.
//!
//! A guest reboots through it (Linux `reboot=k`); the VMM treats that as the VM's end. Reads
//! report an empty controller so a probing driver gives up quickly.

use std::sync::Arc;

use crate::virtio::Line;

/// Offset of the command/status port (0x64) from the data port (0x60).
const CMD_OFFSET: u64 = 4;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 device.
#[derive(Debug)]
pub struct I8042 {
    reset: Arc<dyn Line>,
}

impl I8042 {
    /// A device that pulses `reset` when the guest asks for a CPU reset.
    pub fn new(reset: Arc<dyn Line>) -> Self {
        I8042 { reset }
    }

    /// Port read at `offset` from 0x60: no data, nothing pending.
    pub fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Port write at `offset` from 0x60.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET
            && data.first() == Some(&CMD_RESET_CPU)
            && let Err(e) = self.reset.pulse()
        {
            log::error!("Failed to signal the i8042 reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;

    #[test]
    fn reset_command_signals_and_nothing_else_does() {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let dev = I8042::new(evt.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(CMD_OFFSET, &[0xaa]);
        dev.write(CMD_OFFSET, &[]);
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(CMD_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut status = [0xffu8];
        dev.read(CMD_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
