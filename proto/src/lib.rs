// SPDX-License-Identifier: Apache-2.0
//! Generated protocol code for the sandbox API and the agent API. No logic lives here.
#![forbid(unsafe_code)]
