// SPDX-License-Identifier: Apache-2.0
//! Where the agent serves ttrpc, and how it tells the host that it is ready.
//!
//! In the VM the agent listens on AF_VSOCK (any CID, port `sandboxer.port`, default
//! [`DEFAULT_PORT`]). On a host, for tests, it listens on a unix socket path instead
//! (`--listen unix:/path`); the services (Task, Control) are the same.
//!
//! # Ready signal
//!
//! Once the server is accepting connections, the agent in the VM dials the host (CID
//! [`HOST_CID`], port `sandboxer.ready_port`, default [`DEFAULT_READY_PORT`]), writes exactly
//! one line and closes the connection. The host never polls a guest port. The line is ASCII:
//!
//! ```text
//! READY <port>\n
//! ```
//!
//! where `<port>` is the decimal vsock port the ttrpc server listens on (for example
//! `READY 1024\n`). On the host side the VMM's `VsockHandle::listen(ready_port)` accepts the
//! guest's connection and reads that line; afterwards it dials `<port>` in the guest. In unix
//! socket mode there is no vsock: the same kind of line, `READY unix:<path>\n`, goes to the file
//! descriptor given with `--ready-fd` (if any).

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::io::AsyncWriteExt;
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener, VsockStream};
use ttrpc::asynchronous::transport::Listener;

/// Default vsock port of the agent's ttrpc server.
pub const DEFAULT_PORT: u32 = 1024;
/// Default host vsock port that receives the ready line.
pub const DEFAULT_READY_PORT: u32 = 1025;
/// The host's vsock CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;
/// Longest ready line the host needs to accept (`READY ` + a u32 + `\n` is 17 bytes; unix
/// paths are limited to 108 bytes by `sockaddr_un`).
pub const MAX_READY_LINE: usize = 128;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// `--listen` was not `vsock:<port>` or `unix:<path>`.
    #[error("Invalid listen address {0:?}: expected vsock:<port> or unix:<path>")]
    InvalidAddress(String),
    /// Binding the listener failed.
    #[error("Failed to listen on {0}")]
    Bind(ListenAddr, #[source] std::io::Error),
    /// Dialling the host's ready port failed.
    #[error("Failed to connect to the host's ready port {0}")]
    ConnectReady(u32, #[source] std::io::Error),
    /// Writing the ready line failed.
    #[error("Failed to write the ready line")]
    WriteReady(#[source] std::io::Error),
}

/// Where the ttrpc server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK on this port, any CID (inside the VM).
    Vsock(u32),
    /// A unix socket at this path (host tests). A stale socket file is replaced.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Self::Vsock)
                .map_err(|_| TransportError::InvalidAddress(s.to_owned()));
        }
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(TransportError::InvalidAddress(s.to_owned())),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock(port) => write!(f, "vsock:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// Binds the listener. Must run inside a tokio runtime.
    pub fn bind(&self) -> Result<Listener, TransportError> {
        let err = |e| TransportError::Bind(self.clone(), e);
        match self {
            Self::Vsock(port) => {
                let listener =
                    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, *port)).map_err(err)?;
                Ok(Listener::from(listener))
            }
            Self::Unix(path) => {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
                    _ => {}
                }
                let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
                Ok(Listener::from(listener))
            }
        }
    }

    /// The ready line for this address (see the module docs).
    pub fn ready_line(&self) -> String {
        match self {
            Self::Vsock(port) => format!("READY {port}\n"),
            Self::Unix(path) => format!("READY unix:{}\n", path.display()),
        }
    }
}

/// Parses a ready line as the host reads it: `Some(port)` for `READY <port>\n`.
pub fn parse_ready_line(line: &str) -> Option<u32> {
    let rest = line.strip_suffix('\n')?.strip_prefix("READY ")?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// Dials the host (CID 2) on `ready_port`, writes `line` and closes the connection.
pub async fn announce_ready_vsock(ready_port: u32, line: &str) -> Result<(), TransportError> {
    let mut stream = VsockStream::connect(VsockAddr::new(HOST_CID, ready_port))
        .await
        .map_err(|e| TransportError::ConnectReady(ready_port, e))?;
    AsyncWriteExt::write_all(&mut stream, line.as_bytes())
        .await
        .map_err(TransportError::WriteReady)?;
    AsyncWriteExt::flush(&mut stream)
        .await
        .map_err(TransportError::WriteReady)
    // Dropping the stream closes the connection.
}

/// Writes `line` to the inherited file descriptor `fd` (through `/proc/self/fd`, so no unsafe
/// fd adoption is needed). The descriptor itself stays open.
pub fn announce_ready_fd(fd: u32, line: &str) -> Result<(), TransportError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(TransportError::WriteReady)?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.flush())
        .map_err(TransportError::WriteReady)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(1024)
        );
        assert_eq!(
            "unix:/tmp/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/a.sock".into())
        );
        for bad in [
            "", "vsock:", "vsock:x", "vsock:-1", "unix:", "tcp:1", "/tmp/a",
        ] {
            assert!(
                matches!(
                    bad.parse::<ListenAddr>(),
                    Err(TransportError::InvalidAddress(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(ListenAddr::Vsock(7).to_string(), "vsock:7");
        assert_eq!(ListenAddr::Unix("/x".into()).to_string(), "unix:/x");
    }

    #[test]
    fn ready_lines_round_trip() {
        let line = ListenAddr::Vsock(1024).ready_line();
        assert_eq!(line, "READY 1024\n");
        assert_eq!(parse_ready_line(&line), Some(1024));
        assert_eq!(
            parse_ready_line(&ListenAddr::Vsock(u32::MAX).ready_line()),
            Some(u32::MAX)
        );
        assert!(ListenAddr::Vsock(u32::MAX).ready_line().len() <= MAX_READY_LINE);
        for bad in [
            "READY 1024",
            "READY \n",
            "READY +1\n",
            "ready 1\n",
            "READY 99999999999\n",
        ] {
            assert_eq!(parse_ready_line(bad), None, "{bad:?}");
        }
        assert_eq!(
            ListenAddr::Unix("/run/a.sock".into()).ready_line(),
            "READY unix:/run/a.sock\n"
        );
    }

    #[tokio::test]
    async fn unix_listener_replaces_stale_socket_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, b"stale").unwrap();
        let addr = ListenAddr::Unix(path.clone());
        let _listener = addr.bind().unwrap();
        tokio::net::UnixStream::connect(&path).await.unwrap();
    }

    #[test]
    fn ready_fd_writes_one_line() {
        let (reader, writer) = std::io::pipe().unwrap();
        let fd = {
            use std::os::fd::AsRawFd;
            u32::try_from(writer.as_raw_fd()).unwrap()
        };
        announce_ready_fd(fd, "READY unix:/x\n").unwrap();
        drop(writer);
        let mut line = String::new();
        BufReader::new(reader).read_line(&mut line).unwrap();
        assert_eq!(line, "READY unix:/x\n");
        announce_ready_fd(999_999, "x").unwrap_err();
    }
}
