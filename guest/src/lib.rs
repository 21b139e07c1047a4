// SPDX-License-Identifier: Apache-2.0
//! Guest image tooling.
#![forbid(unsafe_code)]
