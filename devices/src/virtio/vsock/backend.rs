// SPDX-License-Identifier: Apache-2.0
//! Vsock backends: the [`VsockBackend`] trait the device drives, and [`VsockMuxer`], the real
//! backend that multiplexes guest connections onto host unix streams.
//!
//! The muxer is single-threaded: it runs on the VMM thread inside the device. It owns an epoll
//! instance (its `AsRawFd`) that holds every host-side descriptor: the command EventFd of the
//! [`VsockHandle`]s, a timer for connect/shutdown timeouts, the hybrid-vsock listener and its
//! not-yet-connected clients, and each connection's host stream. The VMM subscribes that one fd
//! and calls [`VsockBackend::notify`] when it is readable.
//!
//! Host interfaces:
//! - In-process ([`VsockHandle`]): `connect(guest_port)` / `listen(host_port)`, each connection
//!   one end of a `UnixStream::pair()`.
//! - Hybrid vsock (Firecracker/Cloud Hypervisor convention): a client connects to the unix
//!   socket `<uds_path>` and writes `CONNECT <port>\n`; once the guest accepts, it reads
//!   `OK <local port>\n` and then raw bytes flow. A guest connection to CID 2 port P is
//!   connected to the unix listener `<uds_path>_P` (an in-process listener on P wins).
//!
//! Guest-controlled state is bounded: at most `max_connections` connections, each buffering at
//! most `conn_buf_size` bytes (see `connection`), at most `MAX_PENDING_RST` queued resets.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnParams, Connection, Connector, KillReason};
use super::defs::{
    LOCAL_PORT_START, MAX_CONNECT_LINE, MAX_PENDING_HYBRID, MAX_PENDING_RST, OP_REQUEST, OP_RST,
    TYPE_STREAM, VSOCK_HOST_CID,
};
use super::handle::{Command, HandleShared, VsockHandle};
use super::packet::VsockHeader;
use super::{LogLimiter, VsockError, VsockMetrics, validate_guest_cid};

/// The host side of a vsock device, as seen by [`super::Vsock`].
///
/// All calls come from the VMM thread. The backend's fd (`AsRawFd`) is polled by the VMM
/// event loop for [`VsockBackend::interest`]; on readiness the device calls `notify`, then
/// drains [`VsockBackend::recv_pkt`] into the guest's RX buffers.
pub trait VsockBackend: AsRawFd + Send + Debug {
    /// Produces the next packet for the guest. Data for an RW packet goes into the front of
    /// `data` (whose length is the room the guest's RX buffer has); returns the header (its
    /// `len` equal to the data length) and the data length, or `None` when nothing is ready.
    fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(VsockHeader, usize)>;
    /// Takes a packet the guest sent. `data` is the payload (`hdr.len` bytes).
    fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]);
    /// Whether `recv_pkt` may produce a packet now.
    fn has_pending_rx(&self) -> bool;
    /// Handles readiness of the backend's fd.
    fn notify(&mut self, events: EventSet);
    /// Events to poll the backend's fd for.
    fn interest(&self) -> EventSet {
        EventSet::IN
    }
    /// Drops all connections without telling the guest (the driver reset the device).
    fn reset(&mut self);
}

/// Limits of one muxer; the defaults bound host memory per VM to
/// `max_connections * conn_buf_size` (64 MiB) in the worst case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MuxerLimits {
    /// Connections (both directions) the VM may have at once.
    pub max_connections: usize,
    /// Receive buffer advertised to the guest (`buf_alloc`) and the cap on guest data
    /// buffered per connection when the host reads slowly.
    pub conn_buf_size: u32,
    /// How long a host-initiated connection waits for the guest's RESPONSE.
    pub connect_timeout: Duration,
    /// How long a closing connection waits for the guest's RST before forcing one.
    pub shutdown_timeout: Duration,
}

impl Default for MuxerLimits {
    fn default() -> Self {
        MuxerLimits {
            max_connections: 512,
            conn_buf_size: 128 * 1024,
            connect_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(2),
        }
    }
}

impl MuxerLimits {
    fn validate(&self) -> Result<(), VsockError> {
        if self.max_connections == 0 {
            return Err(VsockError::InvalidLimits(
                "max_connections must be positive",
            ));
        }
        if !(4096..=16 << 20).contains(&self.conn_buf_size) {
            return Err(VsockError::InvalidLimits(
                "conn_buf_size must be between 4 KiB and 16 MiB",
            ));
        }
        if self.connect_timeout.is_zero() || self.shutdown_timeout.is_zero() {
            return Err(VsockError::InvalidLimits("timeouts must be positive"));
        }
        Ok(())
    }

    fn conn_params(&self) -> ConnParams {
        ConnParams {
            buf_size: self.conn_buf_size,
            connect_timeout: self.connect_timeout,
            shutdown_timeout: self.shutdown_timeout,
        }
    }
}

/// Identifies a connection: host port and guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

/// A hybrid-socket client that has not sent its `CONNECT` line yet.
#[derive(Debug)]
struct PendingHybrid {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug)]
struct HybridUds {
    path: PathBuf,
    /// The socket's path as the serving thread resolves it: `path`, or its place under the
    /// directory the thread is confined to ([`VsockMuxer::serve_under`]). Connects to
    /// `<uds>_<port>` go there.
    served_path: PathBuf,
    /// The bound socket's device and inode: the socket file is removed only while it is ours.
    id: (u64, u64),
    listener: UnixListener,
    pending: HashMap<RawFd, PendingHybrid>,
}

/// What reading a hybrid client's first line led to.
enum LineOutcome {
    Wait,
    Drop,
    Connect(u32),
}

/// The real vsock backend: connection table, flow control and the host interfaces.
#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    limits: MuxerLimits,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    timer_dirty: bool,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    /// Connections with something to send to the guest, each at most once.
    rxq: VecDeque<ConnKey>,
    /// Resets answering packets that matched no connection.
    rst_queue: VecDeque<ConnKey>,
    shared: Arc<HandleShared>,
    cmd_tx: Sender<Command>,
    cmd_rx: Receiver<Command>,
    hybrid: Option<HybridUds>,
    next_local_port: u32,
    metrics: Arc<VsockMetrics>,
    log: LogLimiter,
}

fn epoll_data(fd: RawFd) -> u64 {
    u64::try_from(fd).unwrap_or(u64::MAX)
}

impl VsockMuxer {
    /// Creates the muxer for a VM with `guest_cid`, binding the hybrid-vsock socket at
    /// `uds_path` if given. The socket file is removed when the muxer is dropped.
    pub fn new(guest_cid: u64, uds_path: Option<PathBuf>) -> Result<Self, VsockError> {
        Self::with_limits(guest_cid, uds_path, MuxerLimits::default())
    }

    /// Like [`VsockMuxer::new`], serving the hybrid socket `listener` already bound at
    /// `uds_path` (a VM restored after a live handover takes over the old VM's socket). A
    /// listener without a path is served as the in-process API only.
    pub fn with_listener(
        guest_cid: u64,
        uds_path: Option<PathBuf>,
        listener: UnixListener,
    ) -> Result<Self, VsockError> {
        Self::build(
            guest_cid,
            uds_path.map(|p| (p, Some(listener))),
            MuxerLimits::default(),
        )
    }

    /// Like [`VsockMuxer::new`] with explicit limits.
    pub fn with_limits(
        guest_cid: u64,
        uds_path: Option<PathBuf>,
        limits: MuxerLimits,
    ) -> Result<Self, VsockError> {
        Self::build(guest_cid, uds_path.map(|p| (p, None)), limits)
    }

    fn build(
        guest_cid: u64,
        uds: Option<(PathBuf, Option<UnixListener>)>,
        limits: MuxerLimits,
    ) -> Result<Self, VsockError> {
        validate_guest_cid(guest_cid)?;
        limits.validate()?;
        let epoll = Epoll::new().map_err(VsockError::CreateEpoll)?;
        let timer = TimerFd::new().map_err(VsockError::CreateTimer)?;
        let shared = Arc::new(HandleShared::new().map_err(VsockError::CreateEventFd)?);
        let (cmd_tx, cmd_rx) = mpsc::channel();

        let hybrid = match uds {
            Some((path, bound)) => {
                let listener = match bound {
                    Some(listener) => listener,
                    None => UnixListener::bind(&path)
                        .map_err(|e| VsockError::BindUds(path.clone(), e))?,
                };
                listener
                    .set_nonblocking(true)
                    .map_err(|e| VsockError::BindUds(path.clone(), e))?;
                let meta =
                    std::fs::metadata(&path).map_err(|e| VsockError::BindUds(path.clone(), e))?;
                Some(HybridUds {
                    served_path: path.clone(),
                    id: (meta.dev(), meta.ino()),
                    path,
                    listener,
                    pending: HashMap::new(),
                })
            }
            None => None,
        };

        let muxer = VsockMuxer {
            guest_cid,
            limits,
            epoll,
            timer,
            timer_deadline: None,
            timer_dirty: false,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            shared,
            cmd_tx,
            cmd_rx,
            hybrid,
            next_local_port: LOCAL_PORT_START,
            metrics: Arc::new(VsockMetrics::default()),
            log: LogLimiter::default(),
        };
        let mut fds = vec![muxer.shared.cmd_evt.as_raw_fd(), muxer.timer.as_raw_fd()];
        if let Some(h) = &muxer.hybrid {
            fds.push(h.listener.as_raw_fd());
        }
        for fd in fds {
            muxer
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, epoll_data(fd)),
                )
                .map_err(VsockError::EpollCtl)?;
        }
        Ok(muxer)
    }

    /// Says that the thread serving this muxer runs with `root` as its root directory
    /// (`chroot`), so the hybrid socket's path-based calls (a guest's connection to host port
    /// P connects to `<uds>_P`; the socket's removal) resolve there: `root` must hold the
    /// socket. Without a hybrid socket there is nothing to do.
    pub fn serve_under(&mut self, root: &Path) -> Result<(), VsockError> {
        let Some(hybrid) = self.hybrid.as_mut() else {
            return Ok(());
        };
        let inside = hybrid.path.strip_prefix(root).map_err(|_| {
            VsockError::BindUds(
                hybrid.path.clone(),
                io::Error::other(format!("not under {}", root.display())),
            )
        })?;
        hybrid.served_path = Path::new("/").join(inside);
        Ok(())
    }

    /// A handle for the in-process host API; clone it freely. Valid before the VM starts.
    pub fn handle(&self) -> VsockHandle {
        VsockHandle::new(
            self.cmd_tx.clone(),
            Arc::clone(&self.shared),
            self.limits.connect_timeout,
        )
    }

    /// The muxer's counters.
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// The guest CID this muxer serves.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Connections currently in the table.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest data buffered on the host side, summed over all connections.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(Connection::tx_buffered).sum()
    }

    /// Runs the connect and shutdown timeouts as if the clock read `now`. The event loop does
    /// this from the timer; tests and fuzzing call it to move time forward.
    pub fn process_timeouts(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.expiry().is_some_and(|at| at <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_timeout(now);
            }
            self.post_conn(key);
        }
        // The timer fired (or time moved): always re-arm or disarm it, which also clears its
        // readiness (a timerfd left readable would wake the event loop forever).
        self.timer_dirty = false;
        let next = self.conns.values().filter_map(Connection::expiry).min();
        self.arm_timer(next, now);
    }

    fn process_events(&mut self, now: Instant) {
        let mut events = [EpollEvent::default(); 64];
        let count = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if self.log.allow() {
                    warn!("vsock: epoll_wait failed: {e}");
                }
                return;
            }
        };
        let cmd_fd = self.shared.cmd_evt.as_raw_fd();
        let timer_fd = self.timer.as_raw_fd();
        let listener_fd = self.hybrid.as_ref().map(|h| h.listener.as_raw_fd());
        for event in events.iter().take(count) {
            let fd = event.fd();
            let set = event.event_set();
            if fd == cmd_fd {
                let _ = self.shared.cmd_evt.read();
                self.process_commands(now);
            } else if fd == timer_fd {
                self.process_timeouts(now);
            } else if Some(fd) == listener_fd {
                self.accept_hybrid();
            } else if let Some(key) = self.fd_keys.get(&fd).copied() {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.notify_host(set, now);
                }
                self.post_conn(key);
            } else if self
                .hybrid
                .as_ref()
                .is_some_and(|h| h.pending.contains_key(&fd))
            {
                self.read_connect_line(fd, now);
            }
        }
        self.update_timer(now);
    }

    fn process_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            match cmd {
                Command::Connect {
                    port,
                    reply,
                    deadline,
                } => {
                    if deadline <= now {
                        // The caller stopped waiting (the VM was not running yet).
                        continue;
                    }
                    if let Err(e) = self.host_connect(port, reply, now) {
                        debug!("vsock: in-process connect to port {port} failed: {e}");
                    }
                }
            }
        }
    }

    /// Starts an in-process connection to `port` in the guest.
    fn host_connect(
        &mut self,
        port: u32,
        reply: mpsc::SyncSender<std::io::Result<UnixStream>>,
        now: Instant,
    ) -> std::io::Result<()> {
        let fail = |reply: &mpsc::SyncSender<std::io::Result<UnixStream>>, e: std::io::Error| {
            let msg = e.to_string();
            let _ = reply.try_send(Err(e));
            std::io::Error::other(msg)
        };
        if self.conns.len() >= self.limits.max_connections {
            VsockMetrics::inc(&self.metrics.conns_over_limit);
            return Err(fail(
                &reply,
                std::io::Error::other("vsock connection table is full"),
            ));
        }
        let (ours, client) = UnixStream::pair().map_err(|e| fail(&reply, e))?;
        ours.set_nonblocking(true).map_err(|e| fail(&reply, e))?;
        let Some(local_port) = self.alloc_local_port(port) else {
            return Err(fail(&reply, ErrorKind::AddrNotAvailable.into()));
        };
        self.insert_local_init(
            ours,
            local_port,
            port,
            Connector::InProcess { client, reply },
            now,
        );
        Ok(())
    }

    /// Picks a free host port for a host-initiated connection to `peer_port`.
    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        let listeners = self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let attempts = self
            .conns
            .len()
            .saturating_add(listeners.len())
            .saturating_add(1);
        for _ in 0..attempts {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(next) if next < u32::MAX => next,
                _ => LOCAL_PORT_START,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) && !listeners.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Adds a host-initiated connection from `local_port` to guest `port` over `stream`.
    fn insert_local_init(
        &mut self,
        stream: UnixStream,
        local_port: u32,
        port: u32,
        connector: Connector,
        now: Instant,
    ) {
        let conn = Connection::new_local_init(
            stream,
            self.guest_cid,
            local_port,
            port,
            connector,
            self.limits.conn_params(),
            now,
        );
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        self.insert_conn(key, conn);
    }

    fn insert_conn(&mut self, key: ConnKey, conn: Connection) {
        self.fd_keys.insert(conn.stream().as_raw_fd(), key);
        if let Some(old) = self.conns.insert(key, conn) {
            // Callers check for an existing key first; never leak its registration.
            self.fd_keys.remove(&old.stream().as_raw_fd());
        }
        VsockMetrics::inc(&self.metrics.conns_opened);
        self.post_conn(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream().as_raw_fd();
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.fd_keys.remove(&fd);
            if conn.expiry().is_some() {
                self.timer_dirty = true;
            }
        }
    }

    /// Brings a connection's bookkeeping up to date after anything happened to it: removes
    /// it when done, fixes its epoll registration, queues it for RX, notes timer changes.
    fn post_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.take_kill_reason() {
            Some(KillReason::CreditViolation) => {
                VsockMetrics::inc(&self.metrics.credit_violations);
                if self.log.allow() {
                    warn!(
                        "vsock: guest port {} overran its credit, resetting",
                        key.peer_port
                    );
                }
            }
            Some(KillReason::Protocol) => {
                VsockMetrics::inc(&self.metrics.protocol_errors);
                if self.log.allow() {
                    warn!(
                        "vsock: protocol error on guest port {}, resetting",
                        key.peer_port
                    );
                }
            }
            Some(KillReason::Closed | KillReason::HostError) | None => {}
        }
        if conn.expiry().is_some() {
            self.timer_dirty = true;
        }
        if conn.is_done() {
            self.remove_conn(key);
            return;
        }

        let desired = conn.interest();
        if desired != conn.registered {
            let fd = conn.stream().as_raw_fd();
            let result = match (conn.registered, desired) {
                (None, Some(ev)) => self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(ev, epoll_data(fd)),
                ),
                (Some(_), Some(ev)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(ev, epoll_data(fd)),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = desired,
                Err(e) => {
                    if self.log.allow() {
                        warn!("vsock: cannot poll a host stream: {e}");
                    }
                    conn.kill(KillReason::HostError);
                    if conn.registered.is_some() {
                        let _ = self
                            .epoll
                            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        conn.registered = None;
                    }
                }
            }
        }
        if conn.has_pending_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
    }

    /// Arms the timer for the earliest connection expiry.
    fn update_timer(&mut self, now: Instant) {
        if !self.timer_dirty {
            return;
        }
        self.timer_dirty = false;
        let next = self.conns.values().filter_map(Connection::expiry).min();
        if next != self.timer_deadline {
            self.arm_timer(next, now);
        }
    }

    /// Sets the timer to fire at `next` (or disarms it).
    fn arm_timer(&mut self, next: Option<Instant>, now: Instant) {
        self.timer_deadline = next;
        let result = match next {
            Some(at) => {
                // A zero duration would disarm the timer.
                let after = at
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                self.timer.reset(after, None)
            }
            None => self.timer.clear(),
        };
        match result {
            Err(e) if self.log.allow() => warn!("vsock: cannot arm the timer: {e}"),
            _ => {}
        }
    }

    /// A second descriptor of the hybrid socket's listener, for a live handover (`None`:
    /// the muxer has no hybrid socket).
    pub fn try_clone_listener(&self) -> Option<io::Result<UnixListener>> {
        self.hybrid.as_ref().map(|h| h.listener.try_clone())
    }

    /// Closes the host end of every connection, telling the guest nothing (a VM handed over
    /// to another process, which resets them in the guest): the host peers see them end now,
    /// not when this process does.
    pub fn drop_host_ends(&mut self) {
        self.conns.clear();
        self.fd_keys.clear();
        self.rxq.clear();
        if let Some(hybrid) = &mut self.hybrid {
            hybrid.pending.clear();
        }
    }

    /// The open connections as (host port, guest port) pairs: what a VM saved for a live
    /// handover leaves behind in its guest ([`VsockMuxer::reset_stale`]).
    pub fn connection_ports(&self) -> Vec<(u32, u32)> {
        self.conns
            .keys()
            .map(|k| (k.local_port, k.peer_port))
            .collect()
    }

    /// Tells the guest that `ports` ((host port, guest port) pairs, the connections of the VM
    /// this one was restored from) are gone: one RST each, before any other packet, so the
    /// guest closes those sockets (no transport reset, which would race with the host's new
    /// connections). Host ports for new connections start above them, so none is mistaken
    /// for an old one.
    pub fn reset_stale(&mut self, ports: &[(u32, u32)]) {
        for &(local_port, peer_port) in ports.iter().take(self.limits.max_connections) {
            self.rst_queue.push_back(ConnKey {
                local_port,
                peer_port,
            });
            if local_port >= self.next_local_port
                && let Some(next) = local_port.checked_add(1).filter(|&n| n < u32::MAX)
            {
                self.next_local_port = next;
            }
        }
        // Wakes the device, which delivers them as the guest gives receive buffers.
        let _ = self.shared.cmd_evt.write(1);
    }

    /// Queues a reset for a packet that matched no connection.
    fn push_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            VsockMetrics::inc(&self.metrics.rst_dropped);
            return;
        }
        VsockMetrics::inc(&self.metrics.rst_unknown);
        self.rst_queue.push_back(key);
    }

    /// The guest asks to connect to host port `hdr.dst_port`.
    fn guest_connect(&mut self, hdr: &VsockHeader, key: ConnKey) {
        if self.conns.len() >= self.limits.max_connections {
            VsockMetrics::inc(&self.metrics.conns_over_limit);
            if self.log.allow() {
                warn!(
                    "vsock: connection table full, refusing port {}",
                    hdr.dst_port
                );
            }
            self.push_rst(key);
            return;
        }
        let Some(stream) = self.open_host_end(hdr.dst_port, hdr.src_port) else {
            self.push_rst(key);
            return;
        };
        if stream.set_nonblocking(true).is_err() {
            self.push_rst(key);
            return;
        }
        let conn =
            Connection::new_peer_init(stream, self.guest_cid, hdr, self.limits.conn_params());
        self.insert_conn(key, conn);
    }

    /// Finds who takes a guest connection to host `port`: an in-process listener, else the
    /// hybrid listener `<uds_path>_<port>`.
    fn open_host_end(&mut self, port: u32, peer_port: u32) -> Option<UnixStream> {
        {
            let mut listeners = self
                .shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(sink) = listeners.get(&port) {
                let (ours, theirs) = UnixStream::pair().ok()?;
                if sink.deliver((theirs, peer_port)) {
                    return Some(ours);
                }
                // The listener was dropped without deregistering (a race with its Drop).
                listeners.remove(&port);
                return None;
            }
        }
        let hybrid = self.hybrid.as_ref()?;
        let mut path = hybrid.served_path.clone().into_os_string();
        path.push(format!("_{port}"));
        // A unix-socket connect completes or fails at once unless the listener's backlog is
        // full; that host-side stall is accepted (Firecracker does the same).
        UnixStream::connect(&path).ok()
    }

    /// Accepts new hybrid-socket clients.
    fn accept_hybrid(&mut self) {
        let Some(hybrid) = self.hybrid.as_mut() else {
            return;
        };
        loop {
            match hybrid.listener.accept() {
                Ok((stream, _)) => {
                    if hybrid.pending.len() >= MAX_PENDING_HYBRID {
                        if self.log.allow() {
                            warn!("vsock: too many hybrid clients without CONNECT, dropping one");
                        }
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, epoll_data(fd)),
                        )
                        .is_err()
                    {
                        continue;
                    }
                    hybrid.pending.insert(
                        fd,
                        PendingHybrid {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.log.allow() {
                        warn!("vsock: accept on the hybrid socket failed: {e}");
                    }
                    break;
                }
            }
        }
    }

    /// Reads a hybrid client's `CONNECT <port>\n` line, byte by byte so no payload that
    /// follows it is consumed.
    fn read_connect_line(&mut self, fd: RawFd, now: Instant) {
        let Some(hybrid) = self.hybrid.as_mut() else {
            return;
        };
        let Some(pending) = hybrid.pending.get_mut(&fd) else {
            return;
        };
        let outcome = loop {
            let mut byte = [0u8; 1];
            match pending.stream.read(&mut byte) {
                Ok(0) => break LineOutcome::Drop,
                Ok(_) => {
                    let [b] = byte;
                    if b == b'\n' {
                        break match parse_connect_line(&pending.line) {
                            Some(port) => LineOutcome::Connect(port),
                            None => LineOutcome::Drop,
                        };
                    }
                    pending.line.push(b);
                    if pending.line.len() > MAX_CONNECT_LINE {
                        break LineOutcome::Drop;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break LineOutcome::Wait,
                Err(_) => break LineOutcome::Drop,
            }
        };
        let port = match outcome {
            LineOutcome::Wait => return,
            LineOutcome::Drop => None,
            LineOutcome::Connect(port) => Some(port),
        };
        let Some(pending) = hybrid.pending.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(port) = port else {
            return;
        };
        if self.conns.len() >= self.limits.max_connections {
            VsockMetrics::inc(&self.metrics.conns_over_limit);
            return;
        }
        let Some(local_port) = self.alloc_local_port(port) else {
            return;
        };
        self.insert_local_init(pending.stream, local_port, port, Connector::Hybrid, now);
    }

    fn rst_header(&self, key: ConnKey) -> VsockHeader {
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r` is tolerated).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl VsockBackend for VsockMuxer {
    fn recv_pkt(&mut self, data: &mut [u8]) -> Option<(VsockHeader, usize)> {
        if let Some(key) = self.rst_queue.pop_front() {
            return Some((self.rst_header(key), 0));
        }
        let now = Instant::now();
        let mut tries = self.rxq.len();
        let mut result = None;
        while tries > 0 && result.is_none() {
            tries = tries.saturating_sub(1);
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            result = conn.recv_pkt(data, now);
            self.post_conn(key);
        }
        self.update_timer(now);
        result
    }

    fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) {
        let now = Instant::now();
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            VsockMetrics::inc(&self.metrics.wrong_cid);
            if self.log.allow() {
                warn!(
                    "vsock: dropping packet from CID {} to CID {}",
                    hdr.src_cid, hdr.dst_cid
                );
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            if hdr.type_ == TYPE_STREAM {
                conn.on_guest_pkt(hdr, data, now);
            } else {
                conn.kill(KillReason::Protocol);
            }
            self.post_conn(key);
        } else if hdr.op == OP_RST {
            // Never answer a reset.
        } else if hdr.type_ == TYPE_STREAM && hdr.op == OP_REQUEST {
            self.guest_connect(hdr, key);
        } else {
            self.push_rst(key);
        }
        self.update_timer(now);
    }

    fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    fn notify(&mut self, _events: EventSet) {
        self.process_events(Instant::now());
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.abort();
            }
            self.remove_conn(key);
        }
        self.rxq.clear();
        self.rst_queue.clear();
        self.timer_dirty = false;
        self.arm_timer(None, Instant::now());
    }
}

impl AsRawFd for VsockMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // Blocked `VsockListener::accept` calls return once their senders are gone.
        let mut listeners = self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        listeners.clear();
        drop(listeners);
        if let Some(hybrid) = &self.hybrid {
            // Dropped on the confined serving thread the socket is at `served_path`; anywhere
            // else (a VM that never ran) at `path`. A file that is not this socket (a
            // confined path resolved outside the confinement, a socket bound since) stays.
            for path in [&hybrid.served_path, &hybrid.path] {
                let ours =
                    std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == hybrid.id);
                if ours {
                    let _ = std::fs::remove_file(path);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT  7 "), Some(7));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"connect 5",
            b"UPGRADE 5",
            b"CONNECT 5 6",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn limits_are_validated() {
        let bad = [
            MuxerLimits {
                max_connections: 0,
                ..MuxerLimits::default()
            },
            MuxerLimits {
                conn_buf_size: 100,
                ..MuxerLimits::default()
            },
            MuxerLimits {
                connect_timeout: Duration::ZERO,
                ..MuxerLimits::default()
            },
        ];
        for limits in bad {
            assert!(matches!(
                VsockMuxer::with_limits(3, None, limits),
                Err(VsockError::InvalidLimits(_))
            ));
        }
        assert!(matches!(
            VsockMuxer::new(2, None),
            Err(VsockError::InvalidGuestCid(2))
        ));
    }

    #[test]
    fn local_ports_skip_listeners_and_wrap() {
        let mut muxer = VsockMuxer::new(3, None).unwrap();
        let handle = muxer.handle();
        let _l = handle.listen(LOCAL_PORT_START).unwrap();
        assert_eq!(muxer.alloc_local_port(9), Some(LOCAL_PORT_START + 1));
        muxer.next_local_port = u32::MAX - 1;
        assert_eq!(muxer.alloc_local_port(9), Some(u32::MAX - 1));
        assert_eq!(muxer.alloc_local_port(9), Some(LOCAL_PORT_START + 1));
    }

    #[test]
    fn hybrid_socket_file_is_removed_on_drop() {
        let dir = crate::virtio::vsock::test_utils::TempDir::new("uds-drop");
        let path = dir.path().join("vsock.sock");
        let muxer = VsockMuxer::new(3, Some(path.clone())).unwrap();
        assert!(path.exists());
        assert!(matches!(
            VsockMuxer::new(3, Some(path.clone())),
            Err(VsockError::BindUds(..))
        ));
        drop(muxer);
        assert!(!path.exists());
    }
}
