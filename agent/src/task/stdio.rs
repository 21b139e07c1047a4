// SPDX-License-Identifier: Apache-2.0
//! A process's stdio: file or FIFO paths opened for the process, or containerd stream URLs
//! (`<address>?streaming_id=<id>`, see [`crate::streaming`]) bridged through pipes.
//!
//! Streams are bound in two steps. [`bind`] waits (bounded) for the named streams to arrive
//! while no lock is held; [`wire`] then makes a pipe per stream, gives the process its end and
//! spawns the task that copies between the pipe and the stream. Plain paths are opened by
//! [`wire`] as before: a FIFO for output needs a reader already.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use super::error::TaskError;
use super::runtime::StdioFiles;
use crate::streaming::{self, StreamConn, StreamRegistry};

/// Paths or stream URLs of a process's stdio, as given in the request.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    /// Standard input.
    pub stdin: String,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Streams taken from the registry for one process, not yet wired.
#[derive(Debug, Default)]
pub struct Bound {
    stdin: Option<StreamConn>,
    stdout: Option<StreamConn>,
    stderr: Option<StreamConn>,
}

impl Bound {
    /// Whether any stdio is a stream.
    pub fn any(&self) -> bool {
        self.stdin.is_some() || self.stdout.is_some() || self.stderr.is_some()
    }

    /// The streams for stdin, stdout and stderr.
    pub fn into_parts(self) -> (Option<StreamConn>, Option<StreamConn>, Option<StreamConn>) {
        (self.stdin, self.stdout, self.stderr)
    }
}

/// Takes the streams named by `paths` from `registry`, waiting up to `wait` for each.
pub async fn bind(
    registry: &StreamRegistry,
    paths: &StdioPaths,
    wait: Duration,
) -> Result<Bound, TaskError> {
    let take = |field: &'static str, url: &str| {
        let id = streaming::stream_id(url).map(str::to_owned);
        async move {
            let Some(id) = id else { return Ok(None) };
            registry
                .take(&id, wait)
                .await
                .map(Some)
                .map_err(|e| TaskError::StreamMissing {
                    field,
                    reason: e.to_string(),
                })
        }
    };
    Ok(Bound {
        stdin: take("stdin", &paths.stdin).await?,
        stdout: take("stdout", &paths.stdout).await?,
        stderr: take("stderr", &paths.stderr).await?,
    })
}

/// What the caller keeps of a wired process's stdio.
#[derive(Debug, Default)]
pub struct StdinCloser(Option<oneshot::Sender<()>>);

impl StdinCloser {
    /// A closer that fires `tx`.
    pub fn new(tx: oneshot::Sender<()>) -> Self {
        Self(Some(tx))
    }

    /// Ends the process's stdin (`CloseIO`); a no-op when the agent does not own it.
    pub fn close(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A pipe whose read end goes to the process (stdin) or whose write end does (output).
fn pipe_pair() -> Result<(OwnedFd, OwnedFd), TaskError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| TaskError::internal("pipe2", &e))
}

fn stdin_from_stream(conn: StreamConn) -> Result<(File, StdinCloser), TaskError> {
    let (r, w) = pipe_pair()?;
    let writer =
        pipe::Sender::from_owned_fd(w).map_err(|e| TaskError::internal("stdin pipe", &e))?;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = streaming::copy_input(conn, writer, rx).await {
            log::warn!("stdin stream: {e}");
        }
    });
    Ok((File::from(r), StdinCloser(Some(tx))))
}

fn output_to_stream(conn: StreamConn) -> Result<File, TaskError> {
    let (r, w) = pipe_pair()?;
    let reader =
        pipe::Receiver::from_owned_fd(r).map_err(|e| TaskError::internal("output pipe", &e))?;
    tokio::spawn(async move {
        if let Err(e) = streaming::copy_output(conn, reader).await {
            log::warn!("output stream: {e}");
        }
    });
    Ok(File::from(w))
}

/// Opens the process's ends of its stdio: streams in `bound` become pipes copied by spawned
/// tasks, other non-empty paths are opened. Needs a tokio runtime.
pub fn wire(paths: &StdioPaths, bound: Bound) -> Result<(StdioFiles, StdinCloser), TaskError> {
    let (stdin, closer) = match bound.stdin {
        Some(conn) => {
            let (f, c) = stdin_from_stream(conn)?;
            (Some(f), c)
        }
        None => (
            open_stdio("stdin", &paths.stdin, false)?,
            StdinCloser::default(),
        ),
    };
    let stdout = match bound.stdout {
        Some(conn) => Some(output_to_stream(conn)?),
        None => open_stdio("stdout", &paths.stdout, true)?,
    };
    let stderr = match bound.stderr {
        Some(conn) => Some(output_to_stream(conn)?),
        None => open_stdio("stderr", &paths.stderr, true)?,
    };
    Ok((
        StdioFiles {
            stdin,
            stdout,
            stderr,
        },
        closer,
    ))
}

/// Opens one stdio path without blocking on a FIFO, then makes the fd blocking again.
pub fn open_stdio(field: &'static str, path: &str, write: bool) -> Result<Option<File>, TaskError> {
    if path.is_empty() {
        return Ok(None);
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(TaskError::invalid(
            field,
            format!("{path:?} is not absolute"),
        ));
    }
    let is_fifo = std::fs::metadata(p).is_ok_and(|m| m.file_type().is_fifo());
    let mut opts = OpenOptions::new();
    if write {
        opts.write(true).append(true).create(!is_fifo);
    } else {
        opts.read(true);
    }
    let file = opts
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::ENXIO as i32 => TaskError::FailedPrecondition {
                what: format!("{field} FIFO {path:?}"),
                state: "without a reader",
                call: "Create/Exec",
                wanted: "opened for reading by the host",
            },
            _ => TaskError::invalid(field, format!("cannot open {path:?}: {e}")),
        })?;
    let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)
        .map_err(|e| TaskError::internal("F_GETFL on stdio", &e))?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags))
        .map_err(|e| TaskError::internal("F_SETFL on stdio", &e))?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_opening() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open_stdio("stdout", "", true).unwrap().is_none());
        let e = open_stdio("stdout", "relative/out", true).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        // A plain output file is created.
        let out = dir.path().join("out");
        let f = open_stdio("stdout", out.to_str().unwrap(), true)
            .unwrap()
            .unwrap();
        let flags = OFlag::from_bits_truncate(fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(!flags.contains(OFlag::O_NONBLOCK));
        assert!(out.exists());
        // A missing input file is an invalid argument naming the field.
        let e = open_stdio("stdin", dir.path().join("nope").to_str().unwrap(), false).unwrap_err();
        assert!(e.to_string().starts_with("Invalid stdin"), "{e}");
        // A FIFO with no reader is a failed precondition, not a hang.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_stdio("stdout", fifo.to_str().unwrap(), true).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION, "{e}");
        // Its read side opens at once.
        assert!(
            open_stdio("stdin", fifo.to_str().unwrap(), false)
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_missing_stream_fails_naming_it() {
        let registry = StreamRegistry::new();
        let paths = StdioPaths {
            stdout: "ttrpc+unix:///run/x/task.sock?streaming_id=c1-stdout".into(),
            ..StdioPaths::default()
        };
        let e = bind(&registry, &paths, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::FAILED_PRECONDITION);
        assert!(
            e.to_string().contains("stdout") && e.to_string().contains("c1-stdout"),
            "{e}"
        );
        // Paths need no stream.
        let paths = StdioPaths {
            stdout: "/dev/null".into(),
            ..StdioPaths::default()
        };
        assert!(!bind(&registry, &paths, Duration::ZERO).await.unwrap().any());
    }
}
