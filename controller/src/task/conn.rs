// SPDX-License-Identifier: Apache-2.0
//! Task API connections that outlive the process serving them (a live upgrade,
//! [`crate::upgrade`]).
//!
//! containerd keeps its ttrpc connection to a sandbox's `task.sock` for the pod's life and
//! takes one that ends for a dead shim: it fails every task of the pod. So an upgrade passes
//! the connections themselves to the new process. ttrpc frames its messages (a 10-byte header:
//! length, stream id, type, flags) and one connection carries many calls, so the cut must fall
//! between frames in both directions, and the calls still unanswered must be known: [`Tracked`]
//! sits between the socket and the ttrpc server, follows the frames as they pass and never
//! reads past the frame in progress. [`Connections::quiesce`] stops every connection of one
//! socket:
//!
//! 1. the listener stops accepting (new clients wait in the backlog for the new process);
//! 2. reading stops at the next frame boundary;
//! 3. calls in flight that change something (Create, Start, Kill, Exec, Delete, ...) are
//!    waited for; calls that only read or wait ([`REPLAYABLE`]) may stay unanswered;
//! 4. writing stops at the next frame boundary: from then on nothing is written on the
//!    connection here, and it is never shut down (only closed: the other process holds a
//!    duplicate of the socket).
//!
//! The new process gets a duplicate of each socket and the requests left unanswered, which it
//! gives its own ttrpc server before anything the socket brings ([`Connections::track`]):
//! containerd has those calls answered by the new process, on the same connection, under the
//! same stream ids. A stdio stream (`io_type = "streaming"`) in flight cannot be cut this way:
//! it fails the quiesce. [`Connections::thaw`] undoes a quiesce (the upgrade failed).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use devices::sync::Recover;
use proto::protobuf::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;
use ttrpc::proto::{
    FLAG_REMOTE_CLOSED, MESSAGE_HEADER_LENGTH as HEADER, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_DATA,
    MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};

use super::stdio::STREAMING;
use super::{TASK_V2, TASK_V3};
use crate::accept::Pause;

/// Task calls that only read or wait: one left unanswered at a handover is asked again of the
/// new process, which answers it in its place.
pub const REPLAYABLE: [&str; 5] = ["State", "Wait", "Pids", "Stats", "Connect"];

/// How often a quiesce looks again at connections that are not still yet.
const POLL: Duration = Duration::from_millis(2);

/// A frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    len: usize,
    stream: u32,
    kind: u8,
    flags: u8,
}

impl Header {
    fn parse(b: &[u8; HEADER]) -> Self {
        let [l0, l1, l2, l3, s0, s1, s2, s3, kind, flags] = *b;
        Header {
            len: usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).unwrap_or(usize::MAX),
            stream: u32::from_be_bytes([s0, s1, s2, s3]),
            kind,
            flags,
        }
    }
}

/// Follows one direction's frames.
#[derive(Debug, Default)]
struct Frames {
    head: [u8; HEADER],
    /// Header bytes seen of the frame in progress (before its header is whole).
    have: usize,
    /// The frame in progress once its header is whole, and its body bytes still to come.
    current: Option<(Header, usize)>,
    /// The frame in progress, kept whole (requests, on the read side).
    kept: Option<Vec<u8>>,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.current.is_none()
    }

    /// Bytes left of the frame in progress as far as it is known: the rest of its header, or
    /// of its body.
    fn room(&self) -> usize {
        match self.current {
            Some((_, left)) => left,
            None => HEADER.saturating_sub(self.have),
        }
    }

    /// Follows `bytes`; `done` gets each frame completed, with its bytes if they were kept.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        keep: bool,
        done: &mut impl FnMut(Header, Option<Vec<u8>>),
    ) {
        while !bytes.is_empty() {
            let (header, left) = match self.current {
                Some(c) => c,
                None => {
                    let n = self.room().min(bytes.len());
                    let (now, rest) = bytes.split_at(n);
                    if let Some(dst) = self.head.get_mut(self.have..self.have + n) {
                        dst.copy_from_slice(now);
                    }
                    self.have += n;
                    bytes = rest;
                    if self.have < HEADER {
                        continue;
                    }
                    self.have = 0;
                    let h = Header::parse(&self.head);
                    // Grown as the body comes, never sized by what a header claims.
                    self.kept =
                        (keep && h.kind == MESSAGE_TYPE_REQUEST && h.len <= MESSAGE_LENGTH_MAX)
                            .then(|| self.head.to_vec());
                    (h, h.len)
                }
            };
            let n = left.min(bytes.len());
            let (now, rest) = bytes.split_at(n);
            if let Some(kept) = &mut self.kept {
                kept.extend_from_slice(now);
            }
            bytes = rest;
            if left == n {
                self.current = None;
                done(header, self.kept.take());
            } else {
                self.current = Some((header, left - n));
            }
        }
    }
}

/// A request read and not answered yet.
#[derive(Debug)]
struct Unanswered {
    /// The whole frame, as it came.
    frame: Vec<u8>,
    /// `Service/Method`.
    call: String,
    replayable: bool,
    /// A stdio stream (`io_type = "streaming"`): it lasts as long as its process.
    stream: bool,
}

impl Unanswered {
    fn new(frame: Vec<u8>) -> Self {
        let body = frame.get(HEADER..).unwrap_or_default();
        let (call, replayable, stream) = match ttrpc::proto::Request::parse_from_bytes(body) {
            Ok(r) => {
                let task = r.service == TASK_V3 || r.service == TASK_V2;
                let replayable = task && REPLAYABLE.contains(&r.method.as_str());
                let stream = r.service == STREAMING && r.method == "Stream";
                (format!("{}/{}", r.service, r.method), replayable, stream)
            }
            // ttrpc answers it with an error at once.
            Err(_) => ("an undecodable request".to_owned(), false, false),
        };
        Unanswered {
            frame,
            call,
            replayable,
            stream,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    reads: Frames,
    writes: Frames,
    /// Requests read and not answered, by stream id.
    unanswered: BTreeMap<u32, Unanswered>,
    /// Bytes for the server before the socket's (requests an earlier process left unanswered).
    replay: Vec<u8>,
    replayed: usize,
    read_stop: bool,
    write_stop: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// The peer closed its end, or the socket failed.
    ended: bool,
}

impl State {
    fn read(&mut self, bytes: &[u8]) {
        let unanswered = &mut self.unanswered;
        self.reads.feed(bytes, true, &mut |h, frame| {
            if let Some(frame) = frame {
                unanswered.insert(h.stream, Unanswered::new(frame));
            }
        });
    }

    fn wrote(&mut self, bytes: &[u8]) {
        let unanswered = &mut self.unanswered;
        self.writes.feed(bytes, false, &mut |h, _| {
            let closes = h.kind == MESSAGE_TYPE_DATA && h.flags & FLAG_REMOTE_CLOSED != 0;
            if h.kind == MESSAGE_TYPE_RESPONSE || closes {
                unanswered.remove(&h.stream);
            }
        });
    }

    /// What keeps the connection from being cut now, if anything, and whether waiting could
    /// help.
    fn not_still(&self) -> Option<Busy> {
        if self.ended {
            return None;
        }
        if let Some(u) = self.unanswered.values().find(|u| u.stream) {
            return Some(Busy::Never(format!(
                "a stdio stream ({}, io_type \"streaming\") is open: it lasts as long as its \
                 process and cannot be handed over yet",
                u.call
            )));
        }
        if !self.reads.at_boundary() {
            return Some(Busy::Now("a request still arriving".to_owned()));
        }
        self.unanswered
            .values()
            .find(|u| !u.replayable)
            .map(|u| Busy::Now(format!("a {} call in flight", u.call)))
    }

    /// Whether a reply is being written.
    fn writing(&self) -> Option<Busy> {
        (!self.ended && !self.writes.at_boundary())
            .then(|| Busy::Now("a reply being written".to_owned()))
    }

    fn wake(&mut self) {
        for w in [self.read_waker.take(), self.write_waker.take()]
            .into_iter()
            .flatten()
        {
            w.wake();
        }
    }
}

#[derive(Debug)]
struct Shared {
    stream: UnixStream,
    state: Mutex<State>,
}

/// One connection of a Task socket, as the ttrpc server sees it: the socket, with its frames
/// followed ([`Connections`]). Holds the socket's slot until dropped.
#[derive(Debug)]
pub struct Tracked {
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        let mut st = shared.state.lock().recover();
        let room = st.reads.room().min(buf.remaining());
        if room == 0 {
            return Poll::Ready(Ok(()));
        }
        if st.replayed < st.replay.len() {
            let from = st.replayed;
            let to = from.saturating_add(room).min(st.replay.len());
            let chunk = st.replay.get(from..to).unwrap_or_default().to_vec();
            buf.put_slice(&chunk);
            st.replayed = to;
            st.read(&chunk);
            if st.replayed == st.replay.len() {
                st.replay = Vec::new();
                st.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if st.read_stop && st.reads.at_boundary() {
            st.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        loop {
            ready!(shared.stream.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled_to(room);
            match shared.stream.try_read(dst) {
                Ok(n) => {
                    let got = dst.get(..n).unwrap_or_default();
                    if n == 0 {
                        st.ended = true;
                    }
                    st.read(got);
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    st.ended = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut st = shared.state.lock().recover();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if st.write_stop && st.writes.at_boundary() {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // Never past the frame in progress: a whole frame when it starts here.
        let limit = match (st.writes.at_boundary(), buf.first_chunk::<HEADER>()) {
            (true, Some(head)) => HEADER.saturating_add(Header::parse(head).len),
            _ => st.writes.room(),
        }
        .min(buf.len());
        let chunk = buf.get(..limit).unwrap_or(buf);
        loop {
            ready!(shared.stream.poll_write_ready(cx))?;
            match shared.stream.try_write(chunk) {
                Ok(n) => {
                    st.wrote(chunk.get(..n).unwrap_or_default());
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    st.ended = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Never half-closes: another process may hold a duplicate of the socket (dropping it
    /// closes this process's descriptor, which is all that ends the connection).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One connection, cut for a handover: a duplicate of its socket and the requests it left
/// unanswered (whole frames, in stream id order).
#[derive(Debug)]
pub struct CutConnection {
    /// The socket.
    pub socket: OwnedFd,
    /// Frames for the new process's server, before what the socket brings.
    pub unanswered: Vec<u8>,
}

/// Why a socket's connections could not be cut (they run on as before).
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    /// A connection did not come to a point where it can be cut in time.
    #[error("a Task connection did not come to rest within {within:?}: {what}")]
    Busy {
        /// How long it was given.
        within: Duration,
        /// What kept it busy.
        what: String,
    },
    /// A connection carries what cannot be handed over.
    #[error("a Task connection cannot be handed over: {0}")]
    Unmovable(String),
    /// A socket could not be duplicated.
    #[error("cannot duplicate a Task connection")]
    Dup(#[source] io::Error),
}

/// Waits until `busy` is `None` for every connection, up to `deadline` (`within` from the start).
async fn settle(
    conns: &[Arc<Shared>],
    deadline: Instant,
    within: Duration,
    busy: fn(&State) -> Option<Busy>,
) -> Result<(), QuiesceError> {
    loop {
        let what = conns.iter().find_map(|c| busy(&c.state.lock().recover()));
        match what {
            None => return Ok(()),
            Some(Busy::Never(what)) => return Err(QuiesceError::Unmovable(what)),
            Some(Busy::Now(what)) if Instant::now() >= deadline => {
                return Err(QuiesceError::Busy { within, what });
            }
            Some(Busy::Now(_)) => tokio::time::sleep(POLL).await,
        }
    }
}

/// What keeps a connection from being cut.
#[derive(Debug)]
enum Busy {
    /// Something that ends by itself (a call in flight, a frame half read or written).
    Now(String),
    /// Something that does not end while the sandbox runs.
    Never(String),
}

/// The connections of one Task socket, which [`Connections::quiesce`] can cut all at once.
#[derive(Debug, Default)]
pub struct Connections {
    live: Mutex<Vec<Weak<Shared>>>,
    accept: Arc<Pause>,
}

impl Connections {
    /// Follows the connections of a new socket.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// What stops the socket's accept loop from a quiesce until a thaw.
    pub fn pause(&self) -> Arc<Pause> {
        Arc::clone(&self.accept)
    }

    /// `stream` for the ttrpc server, holding `slot`; the server reads `unanswered` first (what
    /// a [`CutConnection`] of an earlier process left; empty for a new connection).
    pub fn track(
        &self,
        stream: UnixStream,
        slot: OwnedSemaphorePermit,
        unanswered: Vec<u8>,
    ) -> Tracked {
        let shared = Arc::new(Shared {
            stream,
            state: Mutex::new(State {
                replay: unanswered,
                ..State::default()
            }),
        });
        let mut live = self.live.lock().recover();
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&shared));
        Tracked {
            shared,
            _slot: slot,
        }
    }

    fn live(&self) -> Vec<Arc<Shared>> {
        self.live
            .lock()
            .recover()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Stops accepting and cuts every connection (see the module doc), waiting up to `within`
    /// for calls that change something. On an error everything runs on as before.
    pub async fn quiesce(&self, within: Duration) -> Result<Vec<CutConnection>, QuiesceError> {
        let deadline = Instant::now() + within;
        self.accept.pause().await;
        let conns = self.live();
        for c in &conns {
            c.state.lock().recover().read_stop = true;
        }
        let result = async {
            settle(&conns, deadline, within, State::not_still).await?;
            for c in &conns {
                c.state.lock().recover().write_stop = true;
            }
            settle(&conns, deadline, within, State::writing).await?;
            let mut cut = Vec::with_capacity(conns.len());
            for c in &conns {
                let st = c.state.lock().recover();
                if st.ended {
                    continue;
                }
                let socket = c
                    .stream
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(QuiesceError::Dup)?;
                let unanswered = st
                    .unanswered
                    .values()
                    .flat_map(|u| u.frame.iter().copied())
                    .collect();
                cut.push(CutConnection { socket, unanswered });
            }
            Ok(cut)
        }
        .await;
        if result.is_err() {
            self.thaw();
        }
        result
    }

    /// Undoes a quiesce: the connections go on and the socket accepts again.
    pub fn thaw(&self) {
        for c in self.live() {
            let mut st = c.state.lock().recover();
            st.read_stop = false;
            st.write_stop = false;
            st.wake();
        }
        self.accept.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: u32, kind: u8, flags: u8, body: &[u8]) -> Vec<u8> {
        let mut f = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(body);
        f
    }

    fn request(stream: u32, service: &str, method: &str) -> Vec<u8> {
        let mut r = ttrpc::proto::Request::new();
        r.service = service.into();
        r.method = method.into();
        r.payload = vec![7; 40];
        frame(
            stream,
            MESSAGE_TYPE_REQUEST,
            0,
            &r.write_to_bytes().unwrap(),
        )
    }

    /// Whatever the chunks, requests are kept whole, answers and stream ends clear them, and
    /// only calls that read or wait count as replayable.
    #[test]
    fn frames_are_followed_across_any_split() {
        let wait = request(1, TASK_V3, "Wait");
        let start = request(3, TASK_V2, "Start");
        let stream = request(5, "containerd.services.streaming.v1.Streaming", "Stream");
        let data = frame(5, MESSAGE_TYPE_DATA, 0, b"abc");
        let input: Vec<u8> = [wait.as_slice(), &start, &stream, &data].concat();
        for chunk in [1, 3, 10, 11, 64, input.len()] {
            let mut st = State::default();
            for piece in input.chunks(chunk) {
                st.read(piece);
            }
            assert!(st.reads.at_boundary());
            assert_eq!(st.unanswered.len(), 3, "chunk {chunk}");
            assert_eq!(st.unanswered.get(&1).unwrap().frame, wait);
            assert!(st.unanswered.get(&1).unwrap().replayable);
            assert!(!st.unanswered.get(&3).unwrap().replayable);
            assert!(!st.unanswered.get(&5).unwrap().replayable);
            // An open stdio stream is never still; a Start is, once answered.
            assert!(
                matches!(st.not_still(), Some(Busy::Never(w)) if w.contains("stdio stream")),
                "{:?}",
                st.not_still()
            );
            // The stream ends: the Start in flight is what is left to wait for.
            for piece in frame(5, MESSAGE_TYPE_DATA, FLAG_REMOTE_CLOSED, b"").chunks(chunk) {
                st.wrote(piece);
            }
            assert!(
                matches!(st.not_still(), Some(Busy::Now(w)) if w.contains("Task/Start")),
                "{:?}",
                st.not_still()
            );
            for piece in frame(3, MESSAGE_TYPE_RESPONSE, 0, b"ok").chunks(chunk) {
                st.wrote(piece);
            }
            assert!(st.writes.at_boundary());
            assert_eq!(st.unanswered.keys().copied().collect::<Vec<_>>(), [1]);
            assert!(st.unanswered.get(&1).is_some_and(|u| !u.stream));
            assert!(st.not_still().is_none());
        }
        // Half a header is not a boundary.
        let mut st = State::default();
        st.read(&wait[..4]);
        assert_eq!(st.reads.room(), HEADER - 4);
        assert!(st.not_still().is_some());
    }
}
