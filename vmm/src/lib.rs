// SPDX-License-Identifier: Apache-2.0
//! The in-process VMM: creates, runs and destroys KVM microVMs inside the calling process.
#![warn(missing_docs)]

pub mod arch;
