// SPDX-License-Identifier: Apache-2.0
//! Virtio transports. Only virtio-mmio version 2 (virtio 1.2 §4.2, modern devices only).

mod mmio;

pub use mmio::{
    MMIO_REGION_SIZE, MmioState, MmioTransport, NOTIFY_REG_OFFSET, QueueRegsState, RestoreError,
};
