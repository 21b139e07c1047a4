// SPDX-License-Identifier: Apache-2.0
//! Device models for sandboxer microVMs.
//!
//! Everything here is pure device logic over guest memory and host backends: no KVM, no async
//! runtime. Devices own their EventFds and interrupt triggers; the `vmm` crate registers them with
//! KVM (ioeventfd/irqfd) and drives them from its event loop.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod legacy;
pub mod sync;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod virtio;
