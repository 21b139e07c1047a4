// SPDX-License-Identifier: Apache-2.0
//! Fuzz target `virtio_net_tx`: virtio-net TX and RX queues over the loopback backend.
//!
//! The input format and the driver live in `fuzz_common::net` (shared with the seed
//! generator and its tests); see fuzz/README.md.
#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    match fuzz_common::net::run(data) {
        Some(_) => Corpus::Keep,
        None => Corpus::Reject,
    }
});
