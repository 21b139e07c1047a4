// SPDX-License-Identifier: Apache-2.0
//! Errors of the host Task endpoint and their ttrpc status codes.
//!
//! Errors the agent returns keep their code and message ([`TaskError::Agent`]); errors of the
//! endpoint itself name the request field, mount or file they are about and map to
//! containerd's errdefs codes. The message a caller sees carries the whole source chain.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;

use ttrpc::Code;

use crate::backend::BackendError;

/// Why a Task call (or starting/stopping the endpoint) failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A request field, the bundle's `config.json` or a rootfs mount cannot be used.
    #[error("Invalid {field}: {reason}")]
    InvalidArgument {
        /// What is wrong, e.g. `rootfs[0]` or `config.json mounts[3] (/data)`.
        field: String,
        /// Why.
        reason: String,
    },
    /// A container with this id is being created or exists already.
    #[error("Container {0:?} already exists")]
    ContainerExists(String),
    /// The endpoint cannot do this (yet).
    #[error("{0} is not implemented by the sandboxer's Task endpoint")]
    Unimplemented(String),
    /// The agent answered with an error status: passed through unchanged.
    #[error("{}", .0.message())]
    Agent(ttrpc::proto::Status),
    /// The agent did not answer in time.
    #[error("The agent did not answer {call} within {secs} s")]
    AgentTimeout {
        /// The call.
        call: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// The connection to the agent failed (the VM ended, or is not ready).
    #[error("The agent is unreachable ({call})")]
    AgentUnreachable {
        /// The call.
        call: &'static str,
        /// Why.
        #[source]
        source: ttrpc::Error,
    },
    /// The VM has no agent connection.
    #[error("The sandbox VM has no agent connection")]
    NoAgent(#[source] BackendError),
    /// Attaching or detaching a block slot failed.
    #[error("Failed to {op} a block slot")]
    Disk {
        /// "attach" or "detach".
        op: &'static str,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// Building a root filesystem image failed.
    #[error("Failed to build the image {}", .path.display())]
    BuildImage {
        /// The image being built.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A host file system operation failed.
    #[error("Failed to {op} {}", .path.display())]
    Io {
        /// The operation, e.g. "read".
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Binding the task socket or starting the ttrpc server failed.
    #[error("Failed to serve the Task API on {}", .0.display())]
    Serve(PathBuf, #[source] ttrpc::Error),
    /// Encoding a message failed (a bug).
    #[error("Failed to encode {0}")]
    Encode(&'static str, #[source] Box<dyn StdError + Send + Sync>),
    /// The endpoint cannot be handed over to, or taken over from, another process.
    #[error("The Task endpoint cannot be handed over: {0}")]
    Handover(String),
}

impl TaskError {
    /// Shorthand for [`TaskError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The ttrpc status code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            Self::ContainerExists(_) => Code::ALREADY_EXISTS,
            Self::Unimplemented(_) => Code::UNIMPLEMENTED,
            Self::Agent(s) => s.code(),
            Self::AgentTimeout { .. } => Code::DEADLINE_EXCEEDED,
            Self::AgentUnreachable { .. } | Self::NoAgent(_) => Code::UNAVAILABLE,
            Self::Disk { .. }
            | Self::BuildImage { .. }
            | Self::Io { .. }
            | Self::Serve(..)
            | Self::Encode(..) => Code::INTERNAL,
            Self::Handover(_) => Code::UNAVAILABLE,
        }
    }

    /// The message with the whole source chain (`a: b: c`).
    pub fn chain(&self) -> String {
        let mut msg = self.to_string();
        let mut source = self.source();
        while let Some(e) = source {
            let _ = write!(msg, ": {e}");
            source = e.source();
        }
        msg
    }

    /// Turns an error of a call to the agent into a [`TaskError`]: a status passes through,
    /// anything else means the connection is broken.
    pub(crate) fn from_agent(call: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => Self::Agent(s),
            other => Self::AgentUnreachable {
                call,
                source: other,
            },
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        match e {
            // Unchanged, so the caller sees exactly what the agent said.
            TaskError::Agent(s) => ttrpc::Error::RpcStatus(s),
            other => ttrpc::Error::RpcStatus(ttrpc::get_status(other.code(), other.chain())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(e: TaskError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn codes_and_messages() {
        let (code, msg) = status_of(TaskError::invalid("rootfs[0]", "is a FIFO"));
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert_eq!(msg, "Invalid rootfs[0]: is a FIFO");
        let agent = ttrpc::get_status(Code::NOT_FOUND, "Container \"x\" not found");
        let (code, msg) = status_of(TaskError::from_agent(
            "State",
            ttrpc::Error::RpcStatus(agent),
        ));
        assert_eq!(code, Code::NOT_FOUND);
        assert_eq!(msg, "Container \"x\" not found");
        let (code, msg) = status_of(TaskError::from_agent("Wait", ttrpc::Error::RemoteClosed));
        assert_eq!(code, Code::UNAVAILABLE);
        assert!(
            msg.starts_with("The agent is unreachable (Wait): "),
            "{msg}"
        );
        let (code, _) = status_of(TaskError::AgentTimeout {
            call: "Start",
            secs: 3,
        });
        assert_eq!(code, Code::DEADLINE_EXCEEDED);
        let (code, msg) = status_of(TaskError::Io {
            op: "read",
            path: "/x".into(),
            source: io::Error::other("boom"),
        });
        assert_eq!(code, Code::INTERNAL);
        assert_eq!(msg, "Failed to read /x: boom");
    }
}
