// SPDX-License-Identifier: Apache-2.0
//! Fuzz target `queue`: arbitrary descriptor tables and rings walked by virtio-queue and the devices' chain parsers.
//!
//! The input format and the driver live in `fuzz_common::queue` (shared with the seed
//! generator and its tests); see fuzz/README.md.
#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    match fuzz_common::queue::run(data) {
        Some(_) => Corpus::Keep,
        None => Corpus::Reject,
    }
});
