// SPDX-License-Identifier: Apache-2.0
//! Shared code of the fuzz targets: the input format, one synchronous "driver" per target, and
//! seed corpora.
//!
//! Every target reads its input as a stream of operations through [`input::Reader`] (a thin
//! layer over `arbitrary::Unstructured` that reads fixed-width little-endian fields), so the
//! same operations can be written back by [`input::Writer`]: that is how [`seeds`] builds
//! well-formed seed inputs, and how the tests here check that the seeds reach deep states
//! (activated devices, successful requests, delivered frames).
//!
//! Inputs are mostly valid by construction (registers picked from the real register list,
//! addresses inside guest memory, lengths in sectors); invalid knobs are fired "rarely"
//! (about 3% of draws). Nothing here uses threads, timers or real files.

pub mod blk;
pub mod input;
pub mod layout;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod seeds;
