// SPDX-License-Identifier: Apache-2.0
//! The guest agent (PID 1 inside the sandbox VM).
#![forbid(unsafe_code)]
