// SPDX-License-Identifier: Apache-2.0
//! Errors of the Task service and their ttrpc status codes.
//!
//! Every error names the container, exec process or request field it is about, so a caller
//! can tell which of its inputs was wrong. The status code follows containerd's errdefs
//! mapping (`NotFound`, `AlreadyExists`, `FailedPrecondition`, `InvalidArgument`,
//! `Unimplemented`, `Internal`).

use ttrpc::Code;

/// A failed Task call.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No container with this id.
    #[error("Container {0:?} not found")]
    ContainerNotFound(String),
    /// No exec process with this id in the container.
    #[error("Exec process {exec_id:?} not found in container {id:?}")]
    ExecNotFound {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// A container with this id exists already.
    #[error("Container {0:?} already exists")]
    ContainerExists(String),
    /// An exec process with this id exists already.
    #[error("Exec process {exec_id:?} already exists in container {id:?}")]
    ExecExists {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// A request field has a value the agent cannot accept.
    #[error("Invalid {field}: {reason}")]
    InvalidArgument {
        /// The field, e.g. `id` or `bundle/config.json`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The process is not in a state that allows the call.
    #[error("{what} is {state}: {call} needs it {wanted}")]
    FailedPrecondition {
        /// The container or process, e.g. `container "a"`.
        what: String,
        /// Its state.
        state: &'static str,
        /// The call.
        call: &'static str,
        /// The state the call needs.
        wanted: &'static str,
    },
    /// The process has already exited (containerd maps this to `NotFound` for Kill).
    #[error("{0} has already exited")]
    ProcessFinished(String),
    /// A rootfs device is missing or empty.
    #[error("Rootfs device {device:?} not found: {reason}")]
    RootfsDevice {
        /// The mount source as given (path or `blk:<serial>`).
        device: String,
        /// What was wrong.
        reason: String,
    },
    /// A stdio stream named in the request did not arrive.
    #[error("Stdio {field} is not connected: {reason}")]
    StreamMissing {
        /// `stdin`, `stdout` or `stderr`.
        field: &'static str,
        /// Which stream and how long the agent waited.
        reason: String,
    },
    /// A feature the agent does not offer (yet).
    #[error("{0} is not implemented by the sandboxer agent")]
    Unimplemented(String),
    /// Anything else: the runtime or the system failed.
    #[error("{0}")]
    Internal(String),
}

impl TaskError {
    /// The ttrpc status code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::ContainerNotFound(_)
            | Self::ExecNotFound { .. }
            | Self::ProcessFinished(_)
            | Self::RootfsDevice { .. } => Code::NOT_FOUND,
            Self::ContainerExists(_) | Self::ExecExists { .. } => Code::ALREADY_EXISTS,
            Self::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            Self::FailedPrecondition { .. } | Self::StreamMissing { .. } => {
                Code::FAILED_PRECONDITION
            }
            Self::Unimplemented(_) => Code::UNIMPLEMENTED,
            Self::Internal(_) => Code::INTERNAL,
        }
    }

    /// An [`TaskError::Internal`] carrying the whole error chain of `err`.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut msg = format!("{context}: {err}");
        let mut source = err.source();
        while let Some(e) = source {
            msg.push_str(": ");
            msg.push_str(&e.to_string());
            source = e.source();
        }
        Self::Internal(msg)
    }

    /// Shorthand for [`TaskError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let e = TaskError::ContainerNotFound("c1".into());
        assert_eq!(e.code(), Code::NOT_FOUND);
        assert_eq!(e.to_string(), "Container \"c1\" not found");
        assert_eq!(
            TaskError::ContainerExists("c1".into()).code(),
            Code::ALREADY_EXISTS
        );
        let e = TaskError::FailedPrecondition {
            what: "container \"c1\"".into(),
            state: "stopped",
            call: "Exec",
            wanted: "running",
        };
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert_eq!(
            e.to_string(),
            "container \"c1\" is stopped: Exec needs it running"
        );
        let e = TaskError::invalid("bundle", "is empty");
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert_eq!(e.to_string(), "Invalid bundle: is empty");
        assert_eq!(
            TaskError::Unimplemented("Pause".into()).code(),
            Code::UNIMPLEMENTED
        );
        let io = std::io::Error::other("boom");
        let e = TaskError::internal("Failed to start", &io);
        assert_eq!(e.code(), Code::INTERNAL);
        assert_eq!(e.to_string(), "Failed to start: boom");
        match ttrpc::Error::from(TaskError::ContainerNotFound("x".into())) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "Container \"x\" not found");
            }
            other => panic!("{other:?}"),
        }
    }
}
