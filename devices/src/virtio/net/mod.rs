// SPDX-License-Identifier: Apache-2.0
//! virtio-net (virtio 1.2 §5.1): one RX and one TX queue in front of a [`NetBackend`].
//!
//! - [`packet`]: pure frame handling over descriptor chains: the TX gather and the RX scatter
//!   (with mergeable RX buffers), the part fuzzed and property-tested.
//! - [`device`]: features, configuration space (MAC, link status, MTU), activation, the queues.
//! - [`backend`]: the [`NetBackend`] trait and [`Tap`] (`IFF_VNET_HDR`, offloads through
//!   `TUNSETOFFLOAD`).
//! - `event_handler`: event-manager glue.
//!
//! Host memory stays bounded whatever the guest does: one RX frame buffer (a frame the guest
//! has no room for waits there, and the backend is not read meanwhile), one TX frame buffer,
//! and a per-call budget of frames.

pub mod backend;
pub mod device;
mod event_handler;
pub mod packet;

pub use backend::{NetBackend, NullNet, Tap, TapError};
pub use device::{NetConfig, NetMetrics, VirtioNet};

/// Feature bits and protocol constants (virtio 1.2 §5.1.3, §5.1.6).
pub mod defs {
    /// The device handles packets with partial checksum (guest -> host offload).
    pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
    /// The driver handles packets with partial checksum (host -> guest).
    pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
    /// `mtu` in configuration space is valid.
    pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
    /// `mac` in configuration space is valid.
    pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
    /// The driver can receive TSOv4.
    pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
    /// The driver can receive TSOv6.
    pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
    /// The driver can receive TSO with ECN.
    pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
    /// The device can receive TSOv4.
    pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
    /// The device can receive TSOv6.
    pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
    /// The device can receive TSO with ECN.
    pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
    /// The driver can merge receive buffers.
    pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// `status` in configuration space is valid.
    pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

    /// `status` bit: the link is up.
    pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

    /// Size of `struct virtio_net_hdr_v1` (with `num_buffers`, always present in virtio 1.x).
    pub const NET_HDR_LEN: usize = 12;
    /// Offset of `num_buffers` inside the header.
    pub const NUM_BUFFERS_OFFSET: u64 = 10;
    /// Largest frame plus header the device moves in either direction (64 KiB GSO frame plus
    /// Ethernet/VLAN headers and the virtio header).
    pub const MAX_BUFFER_LEN: usize = 65562;
    /// Queue size of both queues.
    pub const QUEUE_SIZE: u16 = 256;
    /// Index of the receive queue.
    pub const RX_INDEX: usize = 0;
    /// Index of the transmit queue.
    pub const TX_INDEX: usize = 1;
}

/// Errors creating a net device or its backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The device's EventFds could not be created.
    #[error("Failed to create an EventFd")]
    EventFd(#[source] std::io::Error),
    /// The MTU is outside 68..=65535 (§5.1.4.1).
    #[error("Invalid MTU {0}")]
    Mtu(u16),
}
