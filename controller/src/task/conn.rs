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
//!    waited for, and so are stdio streams still opening (their `StreamInit` not answered);
//!    calls that only read or wait ([`REPLAYABLE`]) may stay unanswered;
//! 4. writing stops at the next frame boundary: from then on nothing is written on the
//!    connection here, and it is never shut down (only closed: the other process holds a
//!    duplicate of the socket).
//!
//! The new process gets a duplicate of each socket and the requests left unanswered, which it
//! gives its own ttrpc server before anything the socket brings ([`Connections::track`]):
//! containerd has those calls answered by the new process, on the same connection, under the
//! same stream ids. A stdio stream (`io_type = "streaming"`, `Streaming.Stream`) lasts as long
//! as its process: it is cut too ([`CutStream`]). The tracker names it by the `StreamInit` id
//! of the client's first message (or the handover token of its replayed request,
//! [`RESUME_TOKEN_KEY`]) and counts the messages it read from the client and wrote to it, which
//! is what the stream's proxy needs to stop at an exact point (`stdio::proxy`); the new
//! process gets its request again, with a token naming the state it goes on from.
//! [`Connections::thaw`] undoes a quiesce (the upgrade failed).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use devices::sync::Recover;
use proto::agent::streaming::StreamInit;
use proto::protobuf::Message as _;
use proto::protobuf::well_known_types::any::Any;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;
use ttrpc::proto::{
    FLAG_NO_DATA, FLAG_REMOTE_CLOSED, MESSAGE_HEADER_LENGTH as HEADER, MESSAGE_LENGTH_MAX,
    MESSAGE_TYPE_DATA, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};

use super::stdio::{RESUME_TOKEN_KEY, STREAM_INIT_TYPE, STREAMING, StreamKey, type_name};
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

impl Header {
    fn encode(&self) -> Option<[u8; HEADER]> {
        let [l0, l1, l2, l3] = u32::try_from(self.len).ok()?.to_be_bytes();
        let [s0, s1, s2, s3] = self.stream.to_be_bytes();
        Some([l0, l1, l2, l3, s0, s1, s2, s3, self.kind, self.flags])
    }
}

/// What sees the frames of one direction as [`Frames::feed`] follows them.
trait Follow {
    /// Whether the frame that starts with `h` is to be kept whole.
    fn keep(&self, h: &Header) -> bool;
    /// A frame is complete, with its bytes if they were kept.
    fn done(&mut self, h: Header, frame: Option<Vec<u8>>);
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

    /// Follows `bytes`; `follow` says which frames to keep and gets each one completed.
    fn feed(&mut self, mut bytes: &[u8], follow: &mut impl Follow) {
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
                    self.kept = (h.len <= MESSAGE_LENGTH_MAX && follow.keep(&h))
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
                follow.done(header, self.kept.take());
            } else {
                self.current = Some((header, left - n));
            }
        }
    }
}

/// A stdio stream call (`Streaming.Stream`) as the tracker follows it.
#[derive(Debug)]
struct StreamCall {
    /// Known once the client's `StreamInit` was read (or from the replayed request).
    key: Option<StreamKey>,
    /// Messages the server's handler is given from the client: the `DATA` frames read, and
    /// the request's own payload when it does not carry `FLAG_NO_DATA` (ttrpc-rust's server
    /// hands it over as a first message).
    read: u64,
    /// `DATA` frames written to the client.
    written: u64,
}

impl StreamCall {
    /// Whether it can be cut: named, and the engine has the answer to its `StreamInit` (a
    /// stream resumed from a handover had it before).
    fn ready(&self) -> bool {
        match self.key {
            Some(StreamKey::Init(_)) => self.written > 0,
            Some(StreamKey::Token(_)) => true,
            None => false,
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
    stream: Option<StreamCall>,
}

impl Unanswered {
    fn new(h: Header, frame: Vec<u8>) -> Self {
        let body = frame.get(HEADER..).unwrap_or_default();
        let (call, replayable, stream) = match ttrpc::proto::Request::parse_from_bytes(body) {
            Ok(r) => {
                let task = r.service == TASK_V3 || r.service == TASK_V2;
                let replayable = task && REPLAYABLE.contains(&r.method.as_str());
                let stream = (r.service == STREAMING && r.method == "Stream").then(|| StreamCall {
                    key: r
                        .metadata
                        .iter()
                        .find(|kv| kv.key == RESUME_TOKEN_KEY)
                        .map(|kv| StreamKey::Token(kv.value.clone())),
                    read: u64::from(h.flags & FLAG_NO_DATA == 0),
                    written: 0,
                });
                (format!("{}/{}", r.service, r.method), replayable, stream)
            }
            // ttrpc answers it with an error at once.
            Err(_) => ("an undecodable request".to_owned(), false, None),
        };
        Unanswered {
            frame,
            call,
            replayable,
            stream,
        }
    }
}

/// The stream id of a client's `StreamInit` message (a `DATA` frame's body).
fn init_id(body: &[u8]) -> Option<String> {
    let any = Any::parse_from_bytes(body).ok()?;
    if type_name(&any.type_url) != STREAM_INIT_TYPE {
        return None;
    }
    StreamInit::parse_from_bytes(&any.value).ok().map(|i| i.id)
}

/// The read side: requests are kept whole, and the first messages of a stdio stream until
/// its `StreamInit` names it.
struct Reads<'a>(&'a mut BTreeMap<u32, Unanswered>);

impl Follow for Reads<'_> {
    fn keep(&self, h: &Header) -> bool {
        match h.kind {
            MESSAGE_TYPE_REQUEST => true,
            MESSAGE_TYPE_DATA => self
                .0
                .get(&h.stream)
                .and_then(|u| u.stream.as_ref())
                .is_some_and(|s| s.key.is_none()),
            _ => false,
        }
    }

    fn done(&mut self, h: Header, frame: Option<Vec<u8>>) {
        if h.kind == MESSAGE_TYPE_REQUEST {
            if let Some(frame) = frame {
                self.0.insert(h.stream, Unanswered::new(h, frame));
            }
            return;
        }
        if h.kind != MESSAGE_TYPE_DATA {
            return;
        }
        let Some(s) = self.0.get_mut(&h.stream).and_then(|u| u.stream.as_mut()) else {
            return;
        };
        s.read = s.read.saturating_add(1);
        if s.key.is_none() {
            s.key = frame
                .as_deref()
                .and_then(|f| f.get(HEADER..))
                .and_then(init_id)
                .map(StreamKey::Init);
        }
    }
}

/// The write side: answers and stream ends clear their request; a stdio stream's messages are
/// counted.
struct Writes<'a>(&'a mut BTreeMap<u32, Unanswered>);

impl Follow for Writes<'_> {
    fn keep(&self, _: &Header) -> bool {
        false
    }

    fn done(&mut self, h: Header, _: Option<Vec<u8>>) {
        let closes = h.kind == MESSAGE_TYPE_DATA && h.flags & FLAG_REMOTE_CLOSED != 0;
        if h.kind == MESSAGE_TYPE_RESPONSE || closes {
            self.0.remove(&h.stream);
        } else if h.kind == MESSAGE_TYPE_DATA
            && let Some(s) = self.0.get_mut(&h.stream).and_then(|u| u.stream.as_mut())
        {
            s.written = s.written.saturating_add(1);
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
        self.reads.feed(bytes, &mut Reads(&mut self.unanswered));
    }

    fn wrote(&mut self, bytes: &[u8]) {
        self.writes.feed(bytes, &mut Writes(&mut self.unanswered));
    }

    /// What keeps the connection from being cut now, if anything, and whether waiting could
    /// help.
    fn not_still(&self) -> Option<Busy> {
        if self.ended {
            return None;
        }
        if !self.reads.at_boundary() {
            return Some(Busy::Now("a request still arriving".to_owned()));
        }
        if self
            .unanswered
            .values()
            .any(|u| u.stream.as_ref().is_some_and(|s| !s.ready()))
        {
            return Some(Busy::Now(
                "a stdio stream still opening (io_type \"streaming\")".to_owned(),
            ));
        }
        self.unanswered
            .values()
            .find(|u| !u.replayable && u.stream.is_none())
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

/// One connection, cut for a handover: a duplicate of its socket, the requests it left
/// unanswered (whole frames, in stream id order) and its open stdio streams.
#[derive(Debug)]
pub struct CutConnection {
    /// The socket.
    pub socket: OwnedFd,
    /// Frames for the new process's server, before what the socket brings (stdio streams'
    /// requests not among them: see `streams`).
    pub unanswered: Vec<u8>,
    /// The stdio streams open on it.
    pub streams: Vec<CutStream>,
}

/// A stdio stream of a cut connection: where it stood on the wire.
#[derive(Debug)]
pub struct CutStream {
    /// What names it.
    pub key: StreamKey,
    /// Messages the server's handler was given from the client: the `DATA` frames read, and
    /// the request's own payload when it lacks `FLAG_NO_DATA` (ttrpc-rust's server hands it
    /// over as a first message). The handler must have taken them all before its state is
    /// exact.
    pub read: u64,
    /// `DATA` frames written to the client.
    pub written: u64,
    /// Its request frame, as it came.
    pub request: Vec<u8>,
}

/// `frame` (a request frame) with `token` as its [`RESUME_TOKEN_KEY`] metadata (replacing one
/// it had), for the new process's server; `None` if it is no request frame.
pub fn with_resume_token(frame: &[u8], token: &str) -> Option<Vec<u8>> {
    let head = Header::parse(frame.first_chunk::<HEADER>()?);
    if head.kind != MESSAGE_TYPE_REQUEST {
        return None;
    }
    let mut r = ttrpc::proto::Request::parse_from_bytes(frame.get(HEADER..)?).ok()?;
    r.metadata.retain(|kv| kv.key != RESUME_TOKEN_KEY);
    let mut kv = ttrpc::proto::KeyValue::new();
    kv.key = RESUME_TOKEN_KEY.to_owned();
    kv.value = token.to_owned();
    r.metadata.push(kv);
    let body = r.write_to_bytes().ok()?;
    let head = Header {
        len: body.len(),
        ..head
    };
    let mut out = head.encode()?.to_vec();
    out.extend_from_slice(&body);
    Some(out)
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
            Some(Busy::Now(what)) if Instant::now() >= deadline => {
                return Err(QuiesceError::Busy { within, what });
            }
            Some(Busy::Now(_)) => tokio::time::sleep(POLL).await,
        }
    }
}

/// What keeps a connection from being cut: something that ends by itself (a call in
/// flight, a frame half read or written, a stdio stream opening).
#[derive(Debug)]
enum Busy {
    /// What it is.
    Now(String),
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
                    .filter(|u| u.stream.is_none())
                    .flat_map(|u| u.frame.iter().copied())
                    .collect();
                let streams = st
                    .unanswered
                    .values()
                    .filter_map(|u| {
                        let s = u.stream.as_ref()?;
                        Some(CutStream {
                            key: s.key.clone()?,
                            read: s.read,
                            written: s.written,
                            request: u.frame.clone(),
                        })
                    })
                    .collect();
                cut.push(CutConnection {
                    socket,
                    unanswered,
                    streams,
                });
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

    fn any(type_url: &str, msg: &impl proto::protobuf::Message) -> Vec<u8> {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = msg.write_to_bytes().unwrap();
        a.write_to_bytes().unwrap()
    }

    fn init(id: &str) -> Vec<u8> {
        let mut i = StreamInit::new();
        i.id = id.into();
        any(STREAM_INIT_TYPE, &i)
    }

    /// Whatever the chunks, requests are kept whole, answers and stream ends clear them, only
    /// calls that read or wait count as replayable, and a stdio stream is named by its
    /// `StreamInit` and its messages counted both ways.
    #[test]
    fn frames_are_followed_across_any_split() {
        let wait = request(1, TASK_V3, "Wait");
        let start = request(3, TASK_V2, "Start");
        // As containerd's Go client opens it: no FLAG_NO_DATA, so the (empty) payload is a
        // first message for the handler.
        let stream = request(5, STREAMING, "Stream");
        let data = frame(5, MESSAGE_TYPE_DATA, 0, &init("c1-stdout"));
        let update = frame(5, MESSAGE_TYPE_DATA, 0, b"a window update");
        let input: Vec<u8> = [wait.as_slice(), &start, &stream, &data, &update].concat();
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
            let s = st.unanswered.get(&5).unwrap().stream.as_ref().unwrap();
            assert_eq!(s.key, Some(StreamKey::Init("c1-stdout".into())));
            assert_eq!((s.read, s.written), (3, 0));
            // A stream whose StreamInit is not answered yet is still opening.
            assert!(
                matches!(st.not_still(), Some(Busy::Now(w)) if w.contains("stdio stream")),
                "{:?}",
                st.not_still()
            );
            for piece in [
                frame(5, MESSAGE_TYPE_DATA, 0, b"ack"),
                frame(5, MESSAGE_TYPE_DATA, 0, b"d"),
            ]
            .concat()
            .chunks(chunk)
            {
                st.wrote(piece);
            }
            let s = st.unanswered.get(&5).unwrap().stream.as_ref().unwrap();
            assert_eq!(s.written, 2);
            // Answered, it can be cut: the Start in flight is what is left to wait for.
            assert!(
                matches!(st.not_still(), Some(Busy::Now(w)) if w.contains("Task/Start")),
                "{:?}",
                st.not_still()
            );
            for piece in frame(3, MESSAGE_TYPE_RESPONSE, 0, b"ok").chunks(chunk) {
                st.wrote(piece);
            }
            assert!(st.not_still().is_none());
            // The stream ends.
            for piece in frame(5, MESSAGE_TYPE_DATA, FLAG_REMOTE_CLOSED, b"").chunks(chunk) {
                st.wrote(piece);
            }
            assert!(st.writes.at_boundary());
            assert_eq!(st.unanswered.keys().copied().collect::<Vec<_>>(), [1]);
            assert!(st.unanswered.get(&1).is_some_and(|u| u.stream.is_none()));
            assert!(st.not_still().is_none());
        }
        // Half a header is not a boundary.
        let mut st = State::default();
        st.read(&wait[..4]);
        assert_eq!(st.reads.room(), HEADER - 4);
        assert!(st.not_still().is_some());
    }

    /// A replayed stream request carries its token; the tracker of the new process names the
    /// stream by it, and the request is the same call.
    #[test]
    fn a_resume_token_names_a_replayed_stream() {
        let mut r = ttrpc::proto::Request::new();
        r.service = STREAMING.into();
        r.method = "Stream".into();
        let req = frame(
            7,
            MESSAGE_TYPE_REQUEST,
            FLAG_NO_DATA,
            &r.write_to_bytes().unwrap(),
        );
        let once = with_resume_token(&req, "t1").unwrap();
        let twice = with_resume_token(&once, "t2").unwrap();
        let mut st = State::default();
        st.read(&twice);
        let u = st.unanswered.get(&7).unwrap();
        assert_eq!(u.call, format!("{STREAMING}/Stream"));
        let s = u.stream.as_ref().unwrap();
        assert_eq!(s.key, Some(StreamKey::Token("t2".into())));
        // FLAG_NO_DATA: no first message from the request.
        assert_eq!(s.read, 0);
        assert!(st.not_still().is_none());
        let body = ttrpc::proto::Request::parse_from_bytes(&twice[HEADER..]).unwrap();
        assert_eq!(body.metadata.len(), 1);
        assert!(with_resume_token(&frame(7, MESSAGE_TYPE_DATA, 0, b""), "t").is_none());
    }
}
