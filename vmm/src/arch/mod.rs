// SPDX-License-Identifier: Apache-2.0
//! x86_64 architecture support: the guest physical layout, MP table, CPUID, boot registers.
//!
//! Everything here is safe code over kvm-ioctls' safe wrappers and vm-memory's `Bytes`.

pub mod layout;
