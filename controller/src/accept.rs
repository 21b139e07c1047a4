// SPDX-License-Identifier: Apache-2.0
//! The accept loop every unix socket the daemon serves shares: the two API sockets (tonic)
//! and each sandbox's Task API socket (ttrpc).
//!
//! Both servers retry at once when their stream of connections yields an error, and a failed
//! `accept` (`EMFILE`, `ENFILE`, `ENOBUFS`) leaves the listener readable while the error lasts:
//! handed the listener itself, either spins a core for as long as the daemon is out of
//! descriptors. So the daemon accepts for them: a task per socket that pauses after a failure
//! (10 ms, doubled at each failure in a row, up to 1 s), logs once per run of failures, and
//! passes on only accepted connections. Each connection holds one of the socket's slots until
//! it closes: past the limit the socket is not accepted from and new clients wait in the
//! listen backlog, so a client that opens connections without end takes slots, not the
//! daemon's descriptors.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tracing::{info, warn};

/// First pause after a failed accept; doubled at each failure in a row, up to
/// [`BACKOFF_MAX`].
const BACKOFF: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The connections `listener` (bound at `path`, named in the log) accepts, at most `slots` open
/// at once, each made into a `T` by `wrap` with the slot it holds. The accept task ends when the
/// stream is dropped.
pub fn incoming<T: Send + 'static>(
    listener: UnixListener,
    path: PathBuf,
    slots: usize,
    wrap: impl Fn(UnixStream, OwnedSemaphorePermit) -> T + Send + 'static,
) -> impl tokio_stream::Stream<Item = io::Result<T>> {
    incoming_with(listener, path, slots, wrap, None, Vec::new())
}

/// Makes a `T` of a connection accepted by another process, given the slot it holds.
pub type Adopted<T> = Box<dyn FnOnce(OwnedSemaphorePermit) -> T + Send>;

/// [`incoming`], yielding the `adopted` connections first (each holds a slot too), and not
/// accepting while `pause` is paused.
pub fn incoming_with<T: Send + 'static>(
    listener: UnixListener,
    path: PathBuf,
    slots: usize,
    wrap: impl Fn(UnixStream, OwnedSemaphorePermit) -> T + Send + 'static,
    pause: Option<Arc<Pause>>,
    adopted: Vec<Adopted<T>>,
) -> impl tokio_stream::Stream<Item = io::Result<T>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(slots));
    let pause = pause.unwrap_or_default();
    tokio::spawn(async move {
        for make in adopted {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            if tx.send(Ok(make(slot))).await.is_err() {
                return;
            }
        }
        let mut paused = pause.paused.subscribe();
        let mut backoff = BACKOFF;
        let mut failing = false;
        loop {
            if paused.wait_for(|p| !*p).await.is_err() {
                return;
            }
            // Held until the connection is made a `T`: `Pause::pause` waits for it.
            let accepting = pause.accepting.lock().await;
            let accepted = tokio::select! {
                biased;
                _ = paused.wait_for(|p| *p) => continue,
                () = tx.closed() => return,
                accepted = async {
                    let slot = Arc::clone(&slots).acquire_owned().await;
                    (slot, listener.accept().await)
                } => accepted,
            };
            match accepted {
                (Ok(slot), Ok((stream, _))) => {
                    if failing {
                        info!(socket = %path.display(), "accepting connections again");
                        failing = false;
                    }
                    backoff = BACKOFF;
                    let conn = wrap(stream, slot);
                    drop(accepting);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                // The semaphore is never closed.
                (Err(_), _) => return,
                (Ok(_), Err(e)) => {
                    drop(accepting);
                    if !failing {
                        warn!(
                            socket = %path.display(),
                            error = %e,
                            "accept failed; retrying with a pause until it works again"
                        );
                        failing = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Stops and restarts an accept loop ([`incoming_with`]).
#[derive(Debug)]
pub struct Pause {
    paused: watch::Sender<bool>,
    /// Held by the accept loop from an accept until its connection is made.
    accepting: tokio::sync::Mutex<()>,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            paused: watch::Sender::new(false),
            accepting: tokio::sync::Mutex::new(()),
        }
    }
}

impl Pause {
    /// Stops accepting; returns once no accepted connection is still on its way to the server
    /// (new clients wait in the listen backlog).
    pub async fn pause(&self) {
        self.paused.send_replace(true);
        drop(self.accepting.lock().await);
    }

    /// Accepts again.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

/// An accepted connection that holds its socket's slot until it is dropped.
#[derive(Debug)]
pub struct Slotted {
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
}

impl Slotted {
    /// `stream`, holding `slot`.
    pub fn new(stream: UnixStream, slot: OwnedSemaphorePermit) -> Self {
        Slotted {
            stream,
            _slot: slot,
        }
    }
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
    use tokio_stream::StreamExt;

    use super::*;

    /// Set in the child process [`out_of_descriptors_the_accept_loop_pauses`] starts.
    const CHILD: &str = "SANDBOXER_ACCEPT_EMFILE_CHILD";

    fn cpu_time() -> Duration {
        let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
        let t = |tv: nix::sys::time::TimeVal| {
            Duration::from_secs(tv.tv_sec().unsigned_abs())
                + Duration::from_micros(tv.tv_usec().unsigned_abs())
        };
        t(usage.user_time()) + t(usage.system_time())
    }

    /// Out of descriptors with clients waiting, the accept loop pauses instead of spinning, and
    /// accepts them once descriptors are free again. It lowers RLIMIT_NOFILE and uses up every
    /// descriptor, so it runs in a child process: this test binary again, running only this
    /// test with [`CHILD`] set.
    #[test]
    fn out_of_descriptors_the_accept_loop_pauses() {
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "accept::tests::out_of_descriptors_the_accept_loop_pauses",
                ])
                .args(["--nocapture", "--test-threads", "1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, 128, hard).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("task.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let mut stream = Box::pin(incoming(listener, path.clone(), 16, Slotted::new));
            // Clients waiting in the backlog, then no descriptor left to accept them with.
            let _clients: Vec<_> = (0..8)
                .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
                .collect();
            let mut hog = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hog.push(f);
            }
            let (cpu, t0) = (cpu_time(), Instant::now());
            let got = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
            assert!(got.is_err(), "a connection accepted without a descriptor");
            let used = cpu_time() - cpu;
            // Spinning on EMFILE takes the whole second; the pauses leave it idle.
            assert!(
                used < Duration::from_millis(250),
                "{used:?} of CPU in {:?} out of descriptors",
                t0.elapsed()
            );
            drop(hog);
            let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
            assert!(
                matches!(first, Ok(Some(Ok(_)))),
                "nothing accepted once fds were free"
            );
        });
    }
}
