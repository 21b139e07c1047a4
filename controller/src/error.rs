// SPDX-License-Identifier: Apache-2.0
//! The sandbox service's error, and its single mapping to a gRPC status.

use crate::backend::BackendError;
pub use crate::error_chain;
use crate::pod::PodError;
use crate::sandbox::{SandboxState, TransitionError};
use crate::store::StoreError;

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No sandbox has this id.
    #[error("Sandbox {0} not found")]
    NotFound(String),
    /// The sandbox has no such container or process.
    #[error("Sandbox {sandbox} has no {what} {id}")]
    ChildNotFound {
        /// The sandbox.
        sandbox: String,
        /// "container" or "exec process".
        what: &'static str,
        /// The missing id.
        id: String,
    },
    /// A sandbox, container or process with this id exists already.
    #[error("{what} {id} already exists")]
    AlreadyExists {
        /// "Sandbox", "Container" or "Exec process".
        what: &'static str,
        /// The id.
        id: String,
    },
    /// A request field is invalid.
    #[error("Invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field, e.g. `sandbox_id`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The sandbox's state does not allow the operation.
    #[error("Cannot {op} sandbox {id}: it is {state}")]
    FailedPrecondition {
        /// The sandbox.
        id: String,
        /// Its state.
        state: SandboxState,
        /// The operation, e.g. "start".
        op: &'static str,
    },
    /// Reading or writing the sandbox's persisted record failed.
    #[error("Failed to persist sandbox {0}")]
    Store(String, #[source] StoreError),
    /// The VM backend failed.
    #[error("VM operation for sandbox {0} failed")]
    Backend(String, #[source] BackendError),
    /// The pod's network could not be set up or torn down.
    #[error("Pod network of sandbox {0} failed")]
    Network(String, #[source] crate::network::NetworkError),
    /// The sandbox's Task endpoint could not be served.
    #[error("Task endpoint of sandbox {0} failed")]
    Endpoint(String, #[source] Box<crate::task::TaskError>),
    /// Another sandbox would run the daemon out of descriptors ([`crate::nofile`]).
    #[error("Cannot create sandbox {0}")]
    FdLimit(String, #[source] crate::nofile::FdLimitError),
    /// The node's budget (`[limits]`) has no room for another sandbox.
    #[error("Cannot create sandbox {id}: {reason} (limits.{limit})")]
    OverBudget {
        /// The sandbox.
        id: String,
        /// The `[limits]` setting.
        limit: &'static str,
        /// What would exceed it.
        reason: String,
    },
    /// The sandbox's CPU cgroup could not be changed.
    #[error("CPU cgroup of sandbox {0} failed")]
    Cgroup(String, #[source] crate::cgroup::CgroupError),
    /// The daemon is handing its sandboxes over to a new process (a live upgrade): the call
    /// can be made again in a moment, to the new process.
    #[error("The sandboxer is being upgraded; try again")]
    Upgrading,
    /// A background task of the service died (a bug).
    #[error("Internal task of sandbox {0} failed")]
    Task(String, #[source] tokio::task::JoinError),
}

impl From<TransitionError> for SandboxError {
    fn from(e: TransitionError) -> Self {
        SandboxError::FailedPrecondition {
            id: e.id,
            state: e.state,
            op: e.op,
        }
    }
}

impl From<PodError> for SandboxError {
    fn from(e: PodError) -> Self {
        SandboxError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl From<SandboxError> for tonic::Status {
    fn from(e: SandboxError) -> Self {
        let msg = error_chain(&e);
        match &e {
            SandboxError::NotFound(_) | SandboxError::ChildNotFound { .. } => {
                tonic::Status::not_found(msg)
            }
            SandboxError::AlreadyExists { .. } => tonic::Status::already_exists(msg),
            SandboxError::Upgrading => tonic::Status::unavailable(msg),
            SandboxError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            SandboxError::FailedPrecondition { .. } => tonic::Status::failed_precondition(msg),
            SandboxError::Backend(_, BackendError::Unsupported(_)) => {
                tonic::Status::unimplemented(msg)
            }
            SandboxError::Backend(_, BackendError::Config(_)) => {
                tonic::Status::failed_precondition(msg)
            }
            SandboxError::Backend(_, BackendError::AgentNotReady { .. }) => {
                tonic::Status::deadline_exceeded(msg)
            }
            SandboxError::Backend(_, BackendError::NoFreeSlot(_))
            | SandboxError::Backend(
                _,
                BackendError::Memory(crate::memcg::ChargeError::DoesNotFit { .. }),
            )
            | SandboxError::FdLimit(..)
            | SandboxError::OverBudget { .. } => tonic::Status::resource_exhausted(msg),
            SandboxError::Network(
                _,
                crate::network::NetworkError::NetnsNotFound { .. }
                | crate::network::NetworkError::NotANetns { .. },
            ) => tonic::Status::invalid_argument(msg),
            // The Task endpoint's own code (same numbering as gRPC): a bad rootfs or spec in
            // a seed Prepare is INVALID_ARGUMENT, a duplicate container ALREADY_EXISTS.
            SandboxError::Endpoint(_, e) => {
                tonic::Status::new(tonic::Code::from(e.code() as i32), msg)
            }
            SandboxError::Store(..)
            | SandboxError::Backend(..)
            | SandboxError::Network(..)
            | SandboxError::Cgroup(..)
            | SandboxError::Task(..) => tonic::Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use tonic::Code;

    use super::*;

    fn status(e: SandboxError) -> tonic::Status {
        e.into()
    }

    #[test]
    fn codes() {
        assert_eq!(
            status(SandboxError::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            status(SandboxError::ChildNotFound {
                sandbox: "s".into(),
                what: "container",
                id: "c".into()
            })
            .code(),
            Code::NotFound
        );
        assert_eq!(
            status(SandboxError::AlreadyExists {
                what: "Sandbox",
                id: "x".into()
            })
            .code(),
            Code::AlreadyExists
        );
        assert_eq!(
            status(SandboxError::FailedPrecondition {
                id: "x".into(),
                state: SandboxState::Ready,
                op: "start"
            })
            .code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            status(SandboxError::Backend(
                "x".into(),
                BackendError::Unsupported("attaching a rootfs")
            ))
            .code(),
            Code::Unimplemented
        );
        assert_eq!(
            status(SandboxError::Backend(
                "x".into(),
                BackendError::Config("no kernel".into())
            ))
            .code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn agent_timeout_and_full_slots() {
        let s = status(SandboxError::Backend(
            "pod".into(),
            BackendError::AgentNotReady {
                timeout_ms: 10,
                console: "/run/x/pod/console.log".into(),
            },
        ));
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(s.message().contains("pod"), "{}", s.message());
        assert!(
            s.message().contains("/run/x/pod/console.log"),
            "{}",
            s.message()
        );
        assert_eq!(
            status(SandboxError::Backend(
                "x".into(),
                BackendError::NoFreeSlot(8)
            ))
            .code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn a_full_descriptor_budget_is_resource_exhausted_naming_the_limit() {
        let budget = crate::nofile::FdBudget { baseline: 30 };
        let refused = budget.admit(1024, 46).unwrap_err();
        let s = status(SandboxError::FdLimit("pod".into(), refused));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message()
                .starts_with("Cannot create sandbox pod: RLIMIT_NOFILE 1024 leaves no room"),
            "{}",
            s.message()
        );
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let s = status(SandboxError::InvalidArgument {
            field: "sandbox_id",
            reason: "must not be empty".into(),
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "Invalid sandbox_id: must not be empty");
    }

    #[test]
    fn internal_carries_the_whole_chain() {
        let e = SandboxError::Store(
            "pod".into(),
            StoreError::Write(
                "/run/x/sandbox.json".into(),
                io::Error::new(io::ErrorKind::StorageFull, "disk full"),
            ),
        );
        let s = status(e);
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(
            s.message(),
            "Failed to persist sandbox pod: Failed to write /run/x/sandbox.json: disk full"
        );
    }

    #[test]
    fn vm_failure_is_internal_with_cause() {
        let s = status(SandboxError::Backend(
            "pod".into(),
            BackendError::Start("KVM setup failed: no /dev/kvm".into()),
        ));
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("no /dev/kvm"), "{}", s.message());
    }
}
