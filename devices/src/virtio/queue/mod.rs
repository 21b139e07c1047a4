// SPDX-License-Identifier: Apache-2.0
//! The one way the devices use a split virtqueue (virtio 1.2 §2.7).
//!
//! The transport builds a `virtio_queue::Queue` from the driver's registers; it holds the
//! queue's configuration and its positions between passes, and nothing else uses it directly.
//! Every device (virtio-blk, virtio-net, virtio-vsock) goes through this layer to:
//! - pop available chains, add used elements, publish the used index and decide the used
//!   buffer notification: a [`RingPass`] (`ring`);
//! - walk a chain's descriptors once into readable and writable segments, and read or write
//!   its buffers by logical offset: [`ChainBuffers`] (`chain`);
//! - reach guest memory, fast in the common single-region case: [`GuestView`] (`view`).
//!
//! `reference` (feature `test-utils`) keeps `virtio-queue`'s own iterators as the oracle the
//! tests and the `queue` fuzz target compare the layer with; no device uses it.
pub mod chain;
#[cfg(any(test, feature = "test-utils"))]
pub mod reference;
pub mod ring;
pub mod view;

pub use chain::{ChainBuffers, ChainError, INLINE_SEGMENTS, Segment};
pub use ring::{Drained, RingPass, drain_queue};
pub use view::GuestView;
