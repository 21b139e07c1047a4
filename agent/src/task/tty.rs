// SPDX-License-Identifier: Apache-2.0
//! TTY processes (`terminal: true`): libcontainer opens a pty inside the container and sends
//! its master over a console socket; the agent copies between the master and the process's
//! stdio (streams or paths), sets its window size (`ResizePty`) and stops feeding it input on
//! `CloseIO`. A TTY has no separate stderr: a stderr stream given anyway is ended at once.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
use rustix::termios::{Winsize, tcsetwinsize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use super::error::TaskError;
use super::stdio::{Bound, StdinCloser, StdioPaths, open_stdio};
use crate::streaming;

/// How long the agent waits for libcontainer's pty master after the process was built.
const MASTER_WAIT: Duration = Duration::from_secs(5);

/// The unix socket libcontainer sends the pty master to. Removed on drop.
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens at `dir/<name>.sock` (a stale socket there is replaced).
    pub fn bind(dir: &Path, name: &str) -> Result<Self, TaskError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TaskError::internal("Failed to create the console directory", &e))?;
        let path = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| TaskError::internal("Failed to bind the console socket", &e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| TaskError::internal("Console socket", &e))?;
        Ok(Self { listener, path })
    }

    /// The socket's path, for libcontainer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master libcontainer sent (it has connected and sent it by the time the
    /// process is built; wait a little in case).
    pub fn receive_master(&self) -> Result<OwnedFd, TaskError> {
        let deadline = Instant::now() + MASTER_WAIT;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(TaskError::Internal(
                            "libcontainer never connected to the console socket".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(TaskError::internal("Console socket accept", &e)),
            }
        };
        stream
            .set_read_timeout(Some(MASTER_WAIT))
            .map_err(|e| TaskError::internal("Console socket", &e))?;
        let mut name = [0u8; 64];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        recvmsg(
            &stream,
            &mut [IoSliceMut::new(&mut name)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| TaskError::internal("Failed to receive the pty master", &e))?;
        let master = control.drain().find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        master.ok_or_else(|| TaskError::Internal("The console socket carried no fd".into()))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A process's pty master, kept for `ResizePty`.
#[derive(Debug)]
pub struct Console {
    master: OwnedFd,
}

impl Console {
    /// Sets the terminal's window size.
    pub fn resize(&self, width: u32, height: u32) -> Result<(), TaskError> {
        let cols = u16::try_from(width)
            .map_err(|_| TaskError::invalid("width", format!("{width} is too large")))?;
        let rows = u16::try_from(height)
            .map_err(|_| TaskError::invalid("height", format!("{height} is too large")))?;
        tcsetwinsize(
            &self.master,
            Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .map_err(|e| TaskError::internal("TIOCSWINSZ", &e))
    }
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, TaskError> {
    fd.try_clone()
        .map_err(|e| TaskError::internal("dup of the pty master", &e))
}

fn is_eio(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EIO)
}

/// Copies the pty's output into an output file or FIFO until the pty is closed.
async fn output_to_file<R: AsyncRead + Unpin>(mut reader: R, file: File) -> std::io::Result<()> {
    let fifo = file.metadata()?.file_type().is_fifo();
    let mut fifo = if fifo {
        Some(pipe::Sender::from_file(file.try_clone()?)?)
    } else {
        None
    };
    let mut file = file;
    let mut buf = vec![0u8; streaming::MAX_DATA];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if is_eio(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        match fifo.as_mut() {
            Some(f) => f.write_all(chunk).await?,
            // A regular file does not block.
            None => file.write_all(chunk)?,
        }
    }
}

/// Copies a stdin file or FIFO into the pty.
async fn input_from_file<W: AsyncWrite + Unpin>(file: File, mut writer: W) -> std::io::Result<()> {
    if file.metadata()?.file_type().is_fifo() {
        let mut r = pipe::Receiver::from_file(file)?;
        tokio::io::copy(&mut r, &mut writer).await?;
    } else {
        let mut bytes = Vec::new();
        let mut file = file;
        file.read_to_end(&mut bytes)?;
        writer.write_all(&bytes).await?;
    }
    Ok(())
}

/// Starts copying between `master` and the process's stdio; returns the console and what
/// `CloseIO` uses. Needs a tokio runtime.
pub fn bridge(
    master: OwnedFd,
    paths: &StdioPaths,
    bound: Bound,
) -> Result<(Console, StdinCloser), TaskError> {
    let (stdin, stdout, stderr) = bound.into_parts();
    drop(stderr);
    let reader = pipe::Receiver::from_owned_fd_unchecked(dup(&master)?)
        .map_err(|e| TaskError::internal("pty master", &e))?;
    match stdout {
        Some(conn) => {
            tokio::spawn(async move {
                if let Err(e) = streaming::copy_output(conn, reader).await {
                    log::warn!("tty output stream: {e}");
                }
            });
        }
        None => {
            // Without a stdout, drain so the process never blocks on a full pty.
            let file = match open_stdio("stdout", &paths.stdout, true)? {
                Some(f) => f,
                None => {
                    File::from(dev_null().map_err(|e| TaskError::internal("open /dev/null", &e))?)
                }
            };
            tokio::spawn(async move {
                if let Err(e) = output_to_file(reader, file).await {
                    log::warn!("tty output: {e}");
                }
            });
        }
    }
    let mut closer = StdinCloser::default();
    match stdin {
        Some(conn) => {
            let writer = pipe::Sender::from_owned_fd_unchecked(dup(&master)?)
                .map_err(|e| TaskError::internal("pty master", &e))?;
            let (tx, rx) = oneshot::channel();
            closer = StdinCloser::new(tx);
            tokio::spawn(async move {
                if let Err(e) = streaming::copy_input(conn, writer, rx).await {
                    log::warn!("tty input stream: {e}");
                }
            });
        }
        None => {
            if let Some(file) = open_stdio("stdin", &paths.stdin, false)? {
                let writer = pipe::Sender::from_owned_fd_unchecked(dup(&master)?)
                    .map_err(|e| TaskError::internal("pty master", &e))?;
                tokio::spawn(async move {
                    if let Err(e) = input_from_file(file, writer).await {
                        log::warn!("tty input: {e}");
                    }
                });
            }
        }
    }
    Ok((Console { master }, closer))
}

fn dev_null() -> std::io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")?
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_socket_passes_a_master() {
        let dir = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(dir.path(), "c1").unwrap();
        // What libcontainer's init does: connect, send a pty master with SCM_RIGHTS.
        let pty = nix::pty::openpty(None, None).unwrap();
        let client = std::os::unix::net::UnixStream::connect(sock.path()).unwrap();
        let fds = [std::os::fd::AsFd::as_fd(&pty.master)];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &client,
            &[std::io::IoSlice::new(b"/dev/ptmx")],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        let master = sock.receive_master().unwrap();
        let console = Console { master };
        console.resize(100, 40).unwrap();
        let ws = rustix::termios::tcgetwinsize(&pty.slave).unwrap();
        assert_eq!((ws.ws_col, ws.ws_row), (100, 40));
        let e = console.resize(70_000, 1).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        let path = sock.path().to_owned();
        drop(sock);
        assert!(!path.exists());
    }
}
