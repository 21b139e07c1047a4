// SPDX-License-Identifier: Apache-2.0
//! Errors of the Control service and their ttrpc status codes.
//!
//! Every error about the request names the field it is about, in the path form the host uses
//! to build the request (`interfaces[1].mac`, `routes[0].gateway`, `sysctls[net.ipv4.x]`), so
//! the host can tell which of its inputs the agent refused.

use ttrpc::Code;

/// A failed Control call.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A request field has a value the agent cannot accept.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field path, e.g. `interfaces[1].mac`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request field names something the guest does not have.
    #[error("{field}: {reason}")]
    NotFound {
        /// The field path.
        field: String,
        /// What is missing.
        reason: String,
    },
    /// The request would create something that exists already.
    #[error("{field}: {reason}")]
    AlreadyExists {
        /// The field path.
        field: String,
        /// What exists.
        reason: String,
    },
    /// The guest is not in a state that allows the call.
    #[error("{field}: {reason}")]
    FailedPrecondition {
        /// The field path.
        field: String,
        /// Why the call cannot go on.
        reason: String,
    },
    /// Anything else: the system failed.
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// The ttrpc status code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            Self::NotFound { .. } => Code::NOT_FOUND,
            Self::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            Self::FailedPrecondition { .. } => Code::FAILED_PRECONDITION,
            Self::Internal(_) => Code::INTERNAL,
        }
    }

    /// Shorthand for [`ControlError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`ControlError::NotFound`].
    pub fn not_found(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::NotFound {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A [`ControlError::Internal`] carrying the whole error chain of `err`.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        Self::Internal(format!("{context}: {}", chain(err)))
    }

    /// An error about `field` from a failed system call: the code follows the errno
    /// (`EINVAL`/`ERANGE`/`ENETUNREACH` -> `INVALID_ARGUMENT`, `ENOENT`/`ENODEV` ->
    /// `NOT_FOUND`, `EEXIST` -> `ALREADY_EXISTS`, else `INTERNAL`).
    pub fn from_io(field: impl Into<String>, what: &str, err: &std::io::Error) -> Self {
        let field = field.into();
        let reason = format!("{what}: {err}");
        match err.raw_os_error() {
            Some(libc_errno::EINVAL | libc_errno::ERANGE | libc_errno::ENETUNREACH) => {
                Self::InvalidArgument { field, reason }
            }
            Some(libc_errno::ENOENT | libc_errno::ENODEV) => Self::NotFound { field, reason },
            Some(libc_errno::EEXIST) => Self::AlreadyExists { field, reason },
            _ => Self::Internal(format!("{field}: {reason}")),
        }
    }
}

/// The errno values [`ControlError::from_io`] tells apart (from nix, to avoid a libc
/// dependency).
mod libc_errno {
    use nix::errno::Errno;

    pub const EINVAL: i32 = Errno::EINVAL as i32;
    pub const ERANGE: i32 = Errno::ERANGE as i32;
    pub const ENETUNREACH: i32 = Errno::ENETUNREACH as i32;
    pub const ENOENT: i32 = Errno::ENOENT as i32;
    pub const ENODEV: i32 = Errno::ENODEV as i32;
    pub const EEXIST: i32 = Errno::EEXIST as i32;
}

/// `err` and its sources, joined with `: `.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        source = e.source();
    }
    msg
}

impl From<ControlError> for ttrpc::Error {
    fn from(e: ControlError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use nix::errno::Errno;

    use super::*;

    #[test]
    fn codes_and_messages() {
        let e = ControlError::invalid("interfaces[1].mac", "not a MAC address");
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert_eq!(e.to_string(), "interfaces[1].mac: not a MAC address");
        let e = ControlError::not_found("routes[0].device", "no link named \"eth9\"");
        assert_eq!(e.code(), Code::NOT_FOUND);
        let io = std::io::Error::from_raw_os_error(Errno::EINVAL as i32);
        assert_eq!(
            ControlError::from_io("x", "write", &io).code(),
            Code::INVALID_ARGUMENT
        );
        let io = std::io::Error::from_raw_os_error(Errno::ENOENT as i32);
        assert_eq!(
            ControlError::from_io("x", "write", &io).code(),
            Code::NOT_FOUND
        );
        let io = std::io::Error::from_raw_os_error(Errno::EEXIST as i32);
        assert_eq!(
            ControlError::from_io("x", "add", &io).code(),
            Code::ALREADY_EXISTS
        );
        let io = std::io::Error::from_raw_os_error(Errno::EIO as i32);
        let e = ControlError::from_io("sysctls[a.b]", "write", &io);
        assert_eq!(e.code(), Code::INTERNAL);
        assert!(e.to_string().starts_with("sysctls[a.b]: write: "), "{e}");
        match ttrpc::Error::from(ControlError::invalid("hostname", "is too long")) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::INVALID_ARGUMENT);
                assert_eq!(s.message(), "hostname: is too long");
            }
            other => panic!("{other:?}"),
        }
    }
}
