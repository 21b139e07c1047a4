// SPDX-License-Identifier: Apache-2.0
//! Fuzz target `mmio_transport`: register read/write sequences on the virtio-mmio transport in front of a dummy, block or net device.
//!
//! The input format and the driver live in `fuzz_common::mmio` (shared with the seed
//! generator and its tests); see fuzz/README.md.
#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    match fuzz_common::mmio::run(data) {
        Some(_) => Corpus::Keep,
        None => Corpus::Reject,
    }
});
