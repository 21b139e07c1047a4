// SPDX-License-Identifier: Apache-2.0
//! Requests the VM handle sends to its VMM thread.
//!
//! A request travels over a channel and wakes the VMM thread through its API EventFd; the reply
//! comes back on a per-request channel. Each variant says which VM states allow it.

/// An action for the VMM thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmAction {
    /// Parks every vCPU outside the guest. Allowed while running (a no-op when paused).
    Pause,
    /// Lets paused vCPUs run again. Allowed while running or paused.
    Resume,
    /// Ends the VM. Allowed in every state; the VM then reports [`crate::VmExit::Stopped`].
    Stop,
}

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmData {
    /// Nothing to return.
    Empty,
}

/// Why an action failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmmActionError {
    /// The VM has ended.
    #[error("The VM is not running")]
    NotRunning,
    /// Some vCPU did not leave the guest in time.
    #[error("Timed out waiting for the vCPUs to pause")]
    PauseTimedOut,
}
