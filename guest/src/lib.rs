// SPDX-License-Identifier: Apache-2.0
//! Guest image tooling: a newc cpio writer/reader ([`cpio`]), the agent initramfs layout
//! ([`initramfs`]) and the stripping of the agent that goes into it ([`strip`]). The guest kernel itself is built by `guest/build-kernel` from
//! `guest/kernel/config-fragment`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cpio;
pub mod initramfs;
pub mod strip;
