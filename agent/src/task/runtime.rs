// SPDX-License-Identifier: Apache-2.0
//! Containers through youki's `libcontainer`: create from an OCI bundle, start, exec, delete.
//!
//! Every call forks (libcontainer's intermediate and init processes), so the caller runs these
//! inside [`crate::reaper::Reaper::spawn`]: libcontainer `waitpid`s its intermediate process
//! itself, and the reaper lock keeps PID 1's reaping away until the new process is watched.
//! The agent is single-threaded (see `main.rs`), so no other thread holds a lock across the
//! fork.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;

use super::error::TaskError;
use super::seccomp::ProcessSeccomp;

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

/// Runs the container process through `std`'s `exec`, which resets what a fresh process
/// expects and libcontainer does not: the signal mask (the agent blocks the signals it reads
/// from a signalfd, and a mask survives `execve`) and `SIGPIPE` (ignored by Rust binaries).
///
/// With a seccomp profile it installs the filter first, as the last step before `execve`
/// (libcontainer has dropped the capabilities and waited for `Start` by then), and then drops
/// the `CAP_SYS_ADMIN` lent for the install ([`ProcessSeccomp::prepare`]). Under the filter the
/// process then makes only `capset` (when lent), `rt_sigprocmask`, `rt_sigaction` and
/// `execve`; runc's init makes `capset`, its Go runtime's calls and the exec FIFO's `openat`
/// and `read` under its filter, so a profile runc can start with, the agent can too.
#[derive(Debug, Clone)]
struct StdExecutor {
    seccomp: Option<ProcessSeccomp>,
}

fn apply_seccomp(s: &ProcessSeccomp) -> Result<(), ExecutorError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ExecutorError::Execution(format!("{what}: {e}").into())
    };
    s.program
        .install()
        .map_err(|e| failed("Failed to apply the seccomp profile", &e))?;
    let admin = caps::Capability::CAP_SYS_ADMIN;
    if s.drop_admin_effective {
        caps::drop(None, caps::CapSet::Effective, admin)
            .map_err(|e| failed("Failed to drop CAP_SYS_ADMIN (effective)", &e))?;
    }
    if s.drop_admin_permitted {
        caps::drop(None, caps::CapSet::Permitted, admin)
            .map_err(|e| failed("Failed to drop CAP_SYS_ADMIN (permitted)", &e))?;
    }
    Ok(())
}

impl Executor for StdExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .ok_or(ExecutorError::InvalidArg)?;
        let (program, rest) = args.split_first().ok_or(ExecutorError::InvalidArg)?;
        if let Some(s) = &self.seccomp {
            apply_seccomp(s)?;
        }
        // libcontainer has already set the environment and the working directory; PATH is
        // the container's.
        let err = std::process::Command::new(program)
            .arg0(program)
            .args(rest)
            .exec();
        Err(ExecutorError::Execution(
            format!("Failed to execute {program:?}: {err}").into(),
        ))
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

/// Where libcontainer keeps its container state.
#[derive(Debug)]
pub struct Runtime {
    root: PathBuf,
    /// `/` is the initramfs (`rootfs`), where pivot_root(2) fails with EINVAL: containers
    /// then enter their root with a move mount + chroot (runc's `--no-pivot`).
    no_pivot: bool,
}

/// The runtime's handle of one container.
pub type Handle = Container;

fn lc_err(context: &str) -> impl Fn(libcontainer::error::LibcontainerError) -> TaskError + '_ {
    move |e| TaskError::internal(context, &e)
}

/// Whether the mount at `/` in `mountinfo` (the text of /proc/self/mountinfo) is the kernel's
/// initial `rootfs` (the initramfs), which cannot be pivoted away from.
fn root_is_initramfs(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4);
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next());
        mount_point == Some("/") && fstype == Some("rootfs")
    })
}

impl Runtime {
    /// A runtime keeping its state under `root` (created if missing).
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let no_pivot = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| root_is_initramfs(&m))
            .unwrap_or(false);
        if no_pivot {
            log::info!("/ is the initramfs: containers use a move mount instead of pivot_root");
        }
        Ok(Self {
            root: root.canonicalize()?,
            no_pivot,
        })
    }

    fn builder(
        &self,
        id: &str,
        stdio: StdioFiles,
        console: Option<&Path>,
        seccomp: Option<ProcessSeccomp>,
    ) -> Result<ContainerBuilder, TaskError> {
        let mut b = ContainerBuilder::new(id.to_owned(), SyscallType::Linux)
            .with_root_path(&self.root)
            .map_err(lc_err("Invalid runtime root"))?
            .with_executor(StdExecutor { seccomp })
            .with_console_socket(console);
        if let Some(f) = stdio.stdin {
            b = b.with_stdin(f);
        }
        if let Some(f) = stdio.stdout {
            b = b.with_stdout(f);
        }
        if let Some(f) = stdio.stderr {
            b = b.with_stderr(f);
        }
        Ok(b)
    }

    /// Creates container `id` from `bundle`; its init process waits for [`Runtime::start`].
    /// With `console` (a TTY), libcontainer sends the pty master to that socket. With
    /// `seccomp`, the init process applies it right before `execve`. Returns the handle and
    /// the init pid.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: StdioFiles,
        console: Option<&Path>,
        seccomp: Option<ProcessSeccomp>,
    ) -> Result<(Handle, Pid), TaskError> {
        let container = self
            .builder(id, stdio, console, seccomp)?
            .as_init(bundle)
            .with_no_pivot(self.no_pivot)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(lc_err("Failed to create the container"))?;
        let pid = container
            .pid()
            .ok_or_else(|| TaskError::Internal("libcontainer returned no init pid".into()))?;
        Ok((container, pid))
    }

    /// Lets the init process of a created container run its program.
    pub fn start(&self, handle: &mut Handle) -> Result<(), TaskError> {
        handle
            .start()
            .map_err(lc_err("Failed to start the container"))
    }

    /// Starts the process described by the OCI process JSON at `process` in container `id`
    /// (with `console` and `seccomp` as for [`Runtime::create`]).
    pub fn exec(
        &self,
        id: &str,
        process: &Path,
        stdio: StdioFiles,
        console: Option<&Path>,
        seccomp: Option<ProcessSeccomp>,
    ) -> Result<Pid, TaskError> {
        self.builder(id, stdio, console, seccomp)?
            .as_tenant()
            .with_process(Some(process))
            .with_detach(true)
            .build()
            .map_err(lc_err("Failed to exec in the container"))
    }

    /// Freezes the container's cgroup.
    pub fn pause(&self, handle: &mut Handle) -> Result<(), TaskError> {
        handle
            .pause()
            .map_err(lc_err("Failed to pause the container"))
    }

    /// Thaws the container's cgroup.
    pub fn resume(&self, handle: &mut Handle) -> Result<(), TaskError> {
        handle
            .resume()
            .map_err(lc_err("Failed to resume the container"))
    }

    /// Removes the container's state and cgroup, killing what is left of it.
    pub fn delete(&self, handle: &mut Handle) -> Result<(), TaskError> {
        handle
            .delete(true)
            .map_err(lc_err("Failed to delete the container"))
    }
}

#[cfg(test)]
mod tests {
    use super::root_is_initramfs;

    #[test]
    fn initramfs_root_is_detected() {
        let vm = "1 1 0:2 / / rw - rootfs rootfs rw,size=120000k\n\
                  20 1 0:20 / /proc rw,nosuid - proc proc rw\n";
        assert!(root_is_initramfs(vm));
        let host = "28 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                    30 28 0:5 / /dev rw - devtmpfs udev rw\n";
        assert!(!root_is_initramfs(host));
        // A rootfs mounted elsewhere does not count.
        assert!(!root_is_initramfs("5 1 0:2 / /mnt rw - rootfs rootfs rw\n"));
    }
}
