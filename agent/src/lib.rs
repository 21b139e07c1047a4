// SPDX-License-Identifier: Apache-2.0
//! The guest agent: PID 1 inside every sandbox VM.
//!
//! The PID-1 foundation: boot mounts ([`mounts`]), settings from the kernel command line
//! ([`cmdline`]), child reaping that never loses a watched exit status ([`reaper`]), console
//! logging ([`console`]) and orderly shutdown ([`shutdown`]); the ttrpc listener and ready
//! signal ([`transport`]), the containerd Task API ([`task`]) and the sandboxer's Control
//! service ([`control`]). The binary `sandboxer-agent`
//! (src/main.rs) ties them together.
// unsafe is denied everywhere but `control::entropy` (two ioctls with no safe wrapper) and
// `task::seccomp` (seccomp(2)).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cmdline;
pub mod console;
pub mod control;
pub mod events;
pub mod mounts;
pub mod reaper;
pub mod shutdown;
pub mod streaming;
pub mod task;
pub mod transport;
