// SPDX-License-Identifier: Apache-2.0
//! A network backend with no network: frames the guest sends are dropped, none ever arrives.
//!
//! A VM template's NICs use it (the template never runs after its snapshot; each clone gets the
//! pod's TAP). It offers what a TAP offers (a `virtio_net_hdr_v1` on every frame, so the
//! guest negotiates the same offloads it will use on the clone's TAP).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::NetBackend;

/// The backend of a NIC that is connected to nothing.
#[derive(Debug)]
pub struct NullNet {
    /// Never written: the event loop needs an fd, and nothing ever arrives.
    never: EventFd,
}

impl NullNet {
    /// A backend that drops every frame.
    pub fn new() -> io::Result<Self> {
        Ok(NullNet {
            never: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }
}

impl AsRawFd for NullNet {
    fn as_raw_fd(&self) -> RawFd {
        self.never.as_raw_fd()
    }
}

impl NetBackend for NullNet {
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn has_vnet_hdr(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_everything_and_never_receives() {
        let mut n = NullNet::new().unwrap();
        n.send(&[0u8; 60]).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            n.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(n.has_vnet_hdr());
        n.set_offload(0x1f).unwrap();
    }
}
