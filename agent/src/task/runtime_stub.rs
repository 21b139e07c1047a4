// SPDX-License-Identifier: Apache-2.0
//! Stand-in for [`runtime`](super) when the agent is built without the `containers` feature:
//! every container operation fails with `UNIMPLEMENTED`.

use std::fs::File;
use std::path::Path;

use nix::unistd::Pid;

use super::error::TaskError;

/// Stdio of a new process; `None` is `/dev/null`.
#[derive(Debug, Default)]
pub struct StdioFiles {
    /// Standard input.
    pub stdin: Option<File>,
    /// Standard output.
    pub stdout: Option<File>,
    /// Standard error.
    pub stderr: Option<File>,
}

/// No container runtime.
#[derive(Debug)]
pub struct Runtime;

/// Never constructed by this runtime (`create` fails).
#[derive(Debug)]
pub struct Handle(());

fn unimplemented() -> TaskError {
    TaskError::Unimplemented("Running containers (agent built without `containers`)".into())
}

impl Runtime {
    /// A runtime that runs nothing.
    pub fn new(_root: &Path) -> std::io::Result<Self> {
        Ok(Self)
    }

    /// Fails with `UNIMPLEMENTED`.
    pub fn create(
        &self,
        _: &str,
        _: &Path,
        _: StdioFiles,
        _: Option<&Path>,
        _: Option<super::seccomp::ProcessSeccomp>,
    ) -> Result<(Handle, Pid), TaskError> {
        Err(unimplemented())
    }

    /// Fails with `UNIMPLEMENTED`.
    pub fn start(&self, _: &mut Handle) -> Result<(), TaskError> {
        Err(unimplemented())
    }

    /// Fails with `UNIMPLEMENTED`.
    pub fn exec(
        &self,
        _: &str,
        _: &Path,
        _: StdioFiles,
        _: Option<&Path>,
        _: Option<super::seccomp::ProcessSeccomp>,
    ) -> Result<Pid, TaskError> {
        Err(unimplemented())
    }

    /// Fails with `UNIMPLEMENTED`.
    pub fn pause(&self, _: &mut Handle) -> Result<(), TaskError> {
        Err(unimplemented())
    }

    /// Fails with `UNIMPLEMENTED`.
    pub fn resume(&self, _: &mut Handle) -> Result<(), TaskError> {
        Err(unimplemented())
    }

    /// Fails with `UNIMPLEMENTED`.
    pub fn delete(&self, _: &mut Handle) -> Result<(), TaskError> {
        Err(unimplemented())
    }
}
