// SPDX-License-Identifier: Apache-2.0
//! What both ends of a stdio stream (`containerd.services.streaming.v1.Streaming`) agree on:
//! the flow-control window, the largest `Data` message and the type URLs of the resume
//! messages (`sandboxer/agent/v1/stream_resume.proto` describes the resume contract).
//!
//! The window bounds what a resume needs: a sender may have at most one window in flight that
//! the receiver has not yet confirmed, so the agent retains the last [`WINDOW`] bytes it sent
//! on stdout/stderr and the host the stdin bytes the agent has not confirmed (at most one
//! [`WINDOW`]). A `WindowUpdate` confirms bytes: beyond the first window of a connection, a
//! receiver grants only bytes it has written on (the agent to the process, the host to its
//! FIFO or file), so on a connection opened at offset `base` with `granted` bytes granted so
//! far, the receiver has written at least `base + granted - WINDOW`.

/// Bytes a receiver grants at the start of a connection, and the most a sender may have sent
/// that the receiver has not confirmed.
pub const WINDOW: i32 = 64 * 1024;

/// [`WINDOW`] as a byte count.
pub const WINDOW_BYTES: usize = WINDOW.unsigned_abs() as usize;

/// Most bytes in one `Data` message (containerd uses the same).
pub const MAX_DATA: usize = 32 * 1024;
const _: () = assert!(MAX_DATA <= WINDOW_BYTES, "a Data message fits in a window");

/// Type URL of `sandboxer.agent.v1.StreamResume`, the first message of a resumed stream.
pub const STREAM_RESUME_TYPE: &str = "sandboxer.agent.v1.StreamResume";

/// Type URL of `sandboxer.agent.v1.StreamResumed`, the agent's answer to it.
pub const STREAM_RESUMED_TYPE: &str = "sandboxer.agent.v1.StreamResumed";
