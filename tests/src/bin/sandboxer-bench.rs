// SPDX-License-Identifier: Apache-2.0
//! Start-up benchmarks.
fn main() {}
