// SPDX-License-Identifier: Apache-2.0
//! Network backends for virtio-net: the [`NetBackend`] trait, [`Tap`] and [`NullNet`].

mod null;
mod tap;

use std::fmt::Debug;
use std::io;
use std::os::fd::AsRawFd;

pub use null::NullNet;
pub use tap::{Tap, TapError};

/// Where guest frames go and host frames come from.
///
/// The file descriptor from [`AsRawFd`] must become readable (edge-triggered is enough) when a
/// frame can be received; the device registers it with the event loop.
pub trait NetBackend: Send + Debug + AsRawFd {
    /// Receives one frame into `buf` and returns its length, or `WouldBlock` when none is
    /// waiting. With [`NetBackend::has_vnet_hdr`] the frame starts with a 12-byte
    /// `virtio_net_hdr_v1`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Sends one frame (with its 12-byte header if [`NetBackend::has_vnet_hdr`]).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;

    /// Whether frames carry a `virtio_net_hdr_v1` in both directions, which is what makes
    /// checksum and segmentation offloads possible.
    fn has_vnet_hdr(&self) -> bool {
        false
    }

    /// Tells the backend which offloads the guest accepts on receive, as `TUN_F_*` flags.
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    /// A second descriptor of the backend's file, for a live handover to another process
    /// (`None`: a backend that cannot be handed over).
    fn try_clone_file(&self) -> Option<io::Result<std::fs::File>> {
        None
    }
}
