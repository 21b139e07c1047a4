// SPDX-License-Identifier: Apache-2.0
//! The in-process host API of a VM's vsock device: connect to guest ports and accept guest
//! connections, getting ordinary `UnixStream`s.
//!
//! Every connection is one end of a `UnixStream::pair()`; the muxer owns the other end and
//! relays bytes to and from the guest. The streams work with blocking std I/O or, after
//! `set_nonblocking(true)`, with `tokio::net::UnixStream::from_std`.
//!
//! Design of the listener (no filesystem, no unsafe fd passing): accepted streams travel over a
//! std mpsc channel, and an EventFd counts arrivals. [`VsockListener`] implements `AsRawFd`
//! (the EventFd), so async code can wait for readability (tokio `AsyncFd`) and then call
//! [`VsockListener::try_accept`], which returns `WouldBlock` only after clearing the EventFd,
//! so edge- and level-triggered waiting both work. [`VsockListener::accept`] blocks.
//!
//! `listen` works before the VM runs (it only updates a shared table), so a controller can
//! wait for the guest agent's "ready" connection before booting. `connect` needs the VMM's
//! event loop to run the device; it blocks the calling thread until the guest answers (async
//! callers use `spawn_blocking`, or [`VsockHandle::begin_connect`] and poll).

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::sync::Recover;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// A connection accepted from the guest: the host's stream end and the guest's source port.
pub type Accepted = (UnixStream, u32);

/// Requests from handles to the muxer (which runs on the VMM thread).
#[derive(Debug)]
pub(crate) enum Command {
    /// Connect to a guest port; the reply carries the host stream once the guest accepted.
    Connect {
        port: u32,
        reply: SyncSender<io::Result<UnixStream>>,
        /// The caller stops waiting at this time; later commands are dropped.
        deadline: Instant,
    },
}

/// Where the muxer delivers guest connections for one listening host port.
#[derive(Debug)]
pub(crate) struct ListenerSink {
    id: u64,
    tx: Sender<Accepted>,
    evt: Arc<EventFd>,
}

impl ListenerSink {
    /// Hands `accepted` to the listener; returns false if the listener is gone.
    pub(crate) fn deliver(&self, accepted: Accepted) -> bool {
        if self.tx.send(accepted).is_err() {
            return false;
        }
        // A failed wake-up only delays the accept until the next one; the stream is queued.
        let _ = self.evt.write(1);
        true
    }
}

/// State shared by the muxer and its handles.
#[derive(Debug)]
pub(crate) struct HandleShared {
    /// Written after each command; polled by the muxer.
    pub(crate) cmd_evt: EventFd,
    /// Listening host ports of the in-process API.
    pub(crate) listeners: Mutex<HashMap<u32, ListenerSink>>,
    next_listener_id: AtomicU64,
    /// Set when the muxer is dropped: no listener can be served any more.
    pub(crate) closed: AtomicBool,
}

impl HandleShared {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(HandleShared {
            cmd_evt: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            listeners: Mutex::new(HashMap::new()),
            next_listener_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        })
    }
}

/// A thread-safe handle to one VM's vsock device (host side, CID 2).
#[derive(Clone, Debug)]
pub struct VsockHandle {
    cmd_tx: Sender<Command>,
    shared: Arc<HandleShared>,
    connect_timeout: Duration,
}

impl VsockHandle {
    pub(crate) fn new(
        cmd_tx: Sender<Command>,
        shared: Arc<HandleShared>,
        connect_timeout: Duration,
    ) -> Self {
        VsockHandle {
            cmd_tx,
            shared,
            connect_timeout,
        }
    }

    /// Connects to `guest_port` in the guest and returns the host end once the guest
    /// accepted. Blocks the calling thread for up to the connect timeout.
    ///
    /// Errors: `ConnectionRefused` when the guest resets (nobody listens), `TimedOut` when it
    /// does not answer, `NotConnected` when the device is gone, `Other` when the
    /// connection table is full.
    pub fn connect(&self, guest_port: u32) -> io::Result<UnixStream> {
        self.begin_connect(guest_port)?.wait()
    }

    /// Starts a connection without waiting; see [`PendingConnect`].
    pub fn begin_connect(&self, guest_port: u32) -> io::Result<PendingConnect> {
        let (reply, rx) = mpsc::sync_channel(1);
        let deadline = Instant::now()
            .checked_add(self.connect_timeout)
            .ok_or_else(|| io::Error::from(ErrorKind::InvalidInput))?;
        self.cmd_tx
            .send(Command::Connect {
                port: guest_port,
                reply,
                deadline,
            })
            .map_err(|_| io::Error::new(ErrorKind::NotConnected, "vsock device is gone"))?;
        self.shared.cmd_evt.write(1)?;
        Ok(PendingConnect { rx, deadline })
    }

    /// Accepts guest connections to host port `host_port` (CID 2). Works before the VM
    /// starts. Fails with `AddrInUse` if the port is already listened on, `NotConnected` if
    /// the device is gone.
    pub fn listen(&self, host_port: u32) -> io::Result<VsockListener> {
        let mut listeners = self.shared.listeners.lock().recover();
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(device_gone());
        }
        if listeners.contains_key(&host_port) {
            return Err(io::Error::new(
                ErrorKind::AddrInUse,
                format!("vsock port {host_port} is already listened on"),
            ));
        }
        let id = self.shared.next_listener_id.fetch_add(1, Ordering::Relaxed);
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?);
        let (tx, rx) = mpsc::channel();
        listeners.insert(
            host_port,
            ListenerSink {
                id,
                tx,
                evt: Arc::clone(&evt),
            },
        );
        Ok(VsockListener {
            port: host_port,
            id,
            rx,
            evt,
            shared: Arc::downgrade(&self.shared),
        })
    }
}

/// A host-initiated connection waiting for the guest's answer.
#[derive(Debug)]
pub struct PendingConnect {
    rx: Receiver<io::Result<UnixStream>>,
    deadline: Instant,
}

impl PendingConnect {
    /// Blocks until the guest answers or the connect timeout passes.
    pub fn wait(self) -> io::Result<UnixStream> {
        // The muxer enforces the same deadline; the slack covers an event loop that is late
        // or not running at all.
        let slack = Duration::from_millis(500);
        let timeout = self
            .deadline
            .saturating_duration_since(Instant::now())
            .saturating_add(slack);
        match self.rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                ErrorKind::TimedOut,
                "vsock connect timed out",
            )),
            Err(RecvTimeoutError::Disconnected) => Err(device_gone()),
        }
    }

    /// Returns the result if the guest already answered, `None` while still pending.
    pub fn try_result(&self) -> Option<io::Result<UnixStream>> {
        match self.rx.try_recv() {
            Ok(result) => Some(result),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(device_gone())),
        }
    }
}

fn device_gone() -> io::Error {
    io::Error::new(ErrorKind::NotConnected, "vsock device is gone")
}

/// Guest connections to one host port. Dropping it stops listening (new guest connections
/// to the port are then reset).
#[derive(Debug)]
pub struct VsockListener {
    port: u32,
    id: u64,
    rx: Receiver<Accepted>,
    evt: Arc<EventFd>,
    shared: Weak<HandleShared>,
}

impl VsockListener {
    /// The host port listened on.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Blocks until the guest connects; returns the host stream and the guest's port.
    pub fn accept(&self) -> io::Result<Accepted> {
        self.rx.recv().map_err(|_| device_gone())
    }

    /// Returns an already accepted connection, or `WouldBlock` (after which the fd from
    /// `as_raw_fd` becomes readable when the next one arrives).
    pub fn try_accept(&self) -> io::Result<Accepted> {
        match self.rx.try_recv() {
            Ok(accepted) => return Ok(accepted),
            Err(TryRecvError::Disconnected) => return Err(device_gone()),
            Err(TryRecvError::Empty) => {}
        }
        // Clear the readiness, then look again: the muxer queues before it signals, so a
        // connection that arrives after this read signals the EventFd anew.
        match self.evt.read() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        match self.rx.try_recv() {
            Ok(accepted) => Ok(accepted),
            Err(TryRecvError::Empty) => Err(ErrorKind::WouldBlock.into()),
            Err(TryRecvError::Disconnected) => Err(device_gone()),
        }
    }
}

impl AsRawFd for VsockListener {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut listeners = shared.listeners.lock().recover();
            if listeners
                .get(&self.port)
                .is_some_and(|sink| sink.id == self.id)
            {
                listeners.remove(&self.port);
            }
        }
    }
}
