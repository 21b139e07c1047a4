// SPDX-License-Identifier: Apache-2.0
//! The sandboxer controller library.
#![forbid(unsafe_code)]
