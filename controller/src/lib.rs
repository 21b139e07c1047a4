// SPDX-License-Identifier: Apache-2.0
//! The sandboxer controller: the Sandbox API servers, the sandbox state machine and store, and
//! the VM backend they drive.
//!
//! ```text
//! api::v2 (containerd 2.x)  ─┐
//!                            ├─> service::SandboxService<B> ──> backend::VmBackend (KvmBackend)
//! api::seed (seed API)     ──┘            │
//!                                         └─> store (<state_dir>/sbs/<id>/sandbox.json)
//! ```
//!
//! The restart contract (what a sandboxer that starts again reports for the sandboxes of the
//! previous process) is documented in [`store`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod api;
pub mod backend;
mod bytes;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod embedded;
pub mod error;
pub mod install;
pub mod memcg;
pub mod metrics;
pub mod network;
pub mod nofile;
pub mod notify;
pub mod ops;
pub mod pod;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod shim;
pub mod store;
pub mod task;
pub mod upgrade;

pub use backend::{KvmBackend, VmBackend, VmHandle};
pub use config::Config;
pub use error::SandboxError;
pub use service::SandboxService;

/// Longest guest-supplied string [`guest_text`] keeps.
const GUEST_TEXT_MAX: usize = 128;

/// A string the guest sent, made safe for the host's logs: control characters (newlines,
/// escape sequences) shown escaped, cut at 128 characters. A guest is hostile: it must not
/// forge log lines or drive a terminal.
pub fn guest_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(GUEST_TEXT_MAX + 3));
    for (i, c) in s.chars().enumerate() {
        if i == GUEST_TEXT_MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The error and its sources, `": "`-separated: the one place the chain is printed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    use std::fmt::Write as _;

    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn guest_text_escapes_and_cuts() {
        assert_eq!(super::guest_text("c1"), "c1");
        assert_eq!(
            super::guest_text("x\n2026 INFO forged\u{1b}[2J"),
            "x\\n2026 INFO forged\\u{1b}[2J"
        );
        let long = "a".repeat(500);
        assert_eq!(super::guest_text(&long), format!("{}...", "a".repeat(128)));
    }
}
