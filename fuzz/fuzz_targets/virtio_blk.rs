// SPDX-License-Identifier: Apache-2.0
//! Fuzz target `virtio_blk`: virtio-blk request queue over an in-memory disk, with backing swaps, resets and ring corruption.
//!
//! The input format and the driver live in `fuzz_common::blk` (shared with the seed
//! generator and its tests); see fuzz/README.md.
#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    match fuzz_common::blk::run(data) {
        Some(_) => Corpus::Keep,
        None => Corpus::Reject,
    }
});
