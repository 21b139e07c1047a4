// SPDX-License-Identifier: Apache-2.0
//! The sandboxer controller: the Sandbox API servers, the sandbox state machine and store, and
//! the VM backend they drive.
//!
//! ```text
//! api::v2 (containerd 2.x)  ─┐
//!                            ├─> service::SandboxService<B> ──> backend::VmBackend (KvmBackend)
//! api::seed (seed API)     ──┘            │
//!                                         └─> store (<state_dir>/<id>/sandbox.json)
//! ```
//!
//! The restart contract (what a sandboxer that starts again reports for the sandboxes of the
//! previous process) is documented in [`store`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod backend;
pub mod client;
pub mod config;
pub mod embedded;
pub mod error;
pub mod install;
pub mod network;
pub mod nofile;
pub mod notify;
pub mod pod;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod shim;
pub mod store;
pub mod task;

pub use backend::{KvmBackend, VmBackend, VmHandle};
pub use config::Config;
pub use error::SandboxError;
pub use service::SandboxService;

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
