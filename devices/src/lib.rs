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

/// Guest memory as the devices and the VMM map it, with a dirty bitmap: every write the host
/// makes through it (a device filling a buffer, a used ring) marks its page, so a live
/// handover can tell which pages the host wrote since a point in time (the guest's own
/// writes are in KVM's dirty log).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;
/// A mapped range of [`GuestMemoryMmap`]; writes through it mark its pages in the dirty
/// bitmap (a raw-pointer write, such as a `pread` into it, must mark them itself).
pub type GuestSlice<'a> =
    vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;
