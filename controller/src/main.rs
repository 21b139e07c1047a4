// SPDX-License-Identifier: Apache-2.0
//! The `sandboxer` binary.
#![forbid(unsafe_code)]

fn main() {}
