// SPDX-License-Identifier: Apache-2.0
//! The one rule for the ids the protocols carry (sandbox, container and exec ids), applied by
//! both ends: the sandboxer (both Sandbox APIs and its Task endpoint) and the guest agent.
//!
//! An id becomes a directory or file name on the host and in the guest, so the rule keeps `/`,
//! `..`, NUL and leading dots out: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`. Every id containerd
//! (at most 76 bytes, `identifiers.Validate`), Kubernetes and iSulad (64 hex digits) make fits.

use std::fmt;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why an id was refused (the caller names the field it came in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdError {
    /// The id is empty.
    Empty,
    /// The first character is not a letter or digit.
    BadStart,
    /// Longer than [`MAX_ID_LEN`] bytes.
    TooLong,
    /// A character outside `[A-Za-z0-9_.-]`.
    BadChar(char),
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Empty => f.write_str("must not be empty"),
            IdError::BadStart => f.write_str("must start with a letter or digit"),
            IdError::TooLong => write!(f, "longer than {MAX_ID_LEN} characters"),
            IdError::BadChar(c) => write!(
                f,
                "contains {c:?}; allowed are letters, digits, '_', '.' and '-'"
            ),
        }
    }
}

impl std::error::Error for IdError {}

/// Checks a sandbox, container or exec id against the rule above.
pub fn validate(id: &str) -> Result<(), IdError> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err(IdError::Empty),
        Some(c) if !c.is_ascii_alphanumeric() => return Err(IdError::BadStart),
        Some(_) => {}
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    match chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        Some(bad) => Err(IdError::BadChar(bad)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let max = "a".repeat(MAX_ID_LEN);
        let hex = "3f2a9c".repeat(10);
        for id in ["a", "0", "pod-1", "A.b_c-d", "c-1_x.y", &hex, &max] {
            assert_eq!(validate(id), Ok(()), "{id:?}");
        }
    }

    #[test]
    fn invalid_ids() {
        let too_long = "a".repeat(MAX_ID_LEN + 1);
        for (id, want) in [
            ("", IdError::Empty),
            ("-a", IdError::BadStart),
            (".a", IdError::BadStart),
            ("_a", IdError::BadStart),
            ("..", IdError::BadStart),
            ("é", IdError::BadStart),
            ("a/b", IdError::BadChar('/')),
            ("a b", IdError::BadChar(' ')),
            ("a\0", IdError::BadChar('\0')),
            ("aé", IdError::BadChar('é')),
            (&too_long, IdError::TooLong),
        ] {
            assert_eq!(validate(id), Err(want), "{id:?}");
        }
    }
}
