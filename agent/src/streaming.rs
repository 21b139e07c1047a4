// SPDX-License-Identifier: Apache-2.0
//! containerd's `containerd.services.streaming.v1.Streaming` service: stdio over ttrpc streams.
//!
//! containerd 2.x with `io_type = "streaming"` names a process's stdio with URLs such as
//! `ttrpc+unix:///run/sandboxer/sbs/<id>/task.sock?streaming_id=<container>-stdout` (stdin and
//! stderr likewise; no stderr with a TTY) in `Task.Create` and `Task.Exec`. The engine dials the
//! address, opens a `Stream`, sends `StreamInit{id}` and waits for one answer (containerd's own
//! server sends a `google.protobuf.Empty`). From then on the stream carries
//! `containerd.types.transfer.Data` and `WindowUpdate` messages, each packed in an `Any` whose
//! type URL is the bare message name: the side that sends `Data` may send only as many bytes as
//! the other side has granted with `WindowUpdate`s. For stdout/stderr the engine grants and the
//! agent sends; for stdin the agent grants and the engine sends, then closes its side at EOF.
//!
//! [`StreamRegistry`] keeps streams that arrived until `Create`/`Exec` takes them by id
//! ([`StreamRegistry::take`] waits a bounded time, since the engine may open them a little
//! later than the call). The ttrpc handler of a stream stays alive until the taker drops the
//! [`StreamConn`]; returning from it ends the stream for the engine (end of file).
//! [`copy_output`] and [`copy_input`] move bytes between a stream and a pipe or pty.
//!
//! A taken stream outlives its connection: when the sandboxer hands its stdio bridges to a new
//! process (a live upgrade), the old connections die and the new process opens a `Stream`
//! whose first message is a `StreamResume{id, received}` (type URL
//! [`proto::stream::STREAM_RESUME_TYPE`]; the contract is in `stream_resume.proto`). The
//! registry hands it to the copy of that id, which answers `StreamResumed` and goes on on the
//! new connection: a copy whose connection failed keeps the process's pipe and waits up to
//! [`RESUME_WAIT`] for that; output retains the last window it sent to send it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proto::agent::stream_resume::StreamResume;
use proto::agent::streaming::StreamInit;
use proto::agent::streaming_ttrpc::{Streaming, create_streaming};
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use proto::stream::STREAM_RESUME_TYPE;
use tokio::sync::{Notify, mpsc, oneshot};
use ttrpc::asynchronous::{SSReceiver, SSSender, ServerStream, Service, TtrpcContext};

mod copy;

pub use copy::{copy_input, copy_output};

/// Service name of the stream service.
pub const STREAMING: &str = "containerd.services.streaming.v1.Streaming";
/// Type URL of [`StreamInit`].
pub const STREAM_INIT_TYPE: &str = "containerd.services.streaming.v1.StreamInit";
/// Type URL of [`Data`](proto::agent::stream_data::Data).
pub const DATA_TYPE: &str = "containerd.types.transfer.Data";
/// Type URL of [`WindowUpdate`](proto::agent::stream_data::WindowUpdate).
pub const WINDOW_UPDATE_TYPE: &str = "containerd.types.transfer.WindowUpdate";
/// Type URL of the answer to `StreamInit`.
pub const EMPTY_TYPE: &str = "google.protobuf.Empty";
/// Most bytes in one `Data` message (containerd uses the same).
pub const MAX_DATA: usize = proto::stream::MAX_DATA;
/// Bytes the agent grants a stdin sender at the start of a connection.
pub const WINDOW: i32 = proto::stream::WINDOW;
/// Longest stream id accepted.
const MAX_ID_LEN: usize = 1024;
/// How long a stream may wait for its `Create`/`Exec` before the agent ends it (an engine
/// that gave up must not leave it behind for ever).
pub const UNTAKEN_TTL: Duration = Duration::from_secs(120);
/// How long a copy whose connection failed (or whose output has all been sent) keeps its pipe
/// and waits for the host to resume the stream before it ends as if the host had gone.
pub const RESUME_WAIT: Duration = Duration::from_secs(120);
/// How long an input copy waits for the host's next message before it checks that the
/// connection still lives (an empty `WindowUpdate`): a receive on a connection that died does
/// not fail in ttrpc's server, only a send does.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Errors of the stream service.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The stream ended (or failed) before its `StreamInit`.
    #[error("Stream closed before its StreamInit")]
    NoInit,
    /// The first message is not a `StreamInit`.
    #[error("First stream message has type {0:?}, expected {STREAM_INIT_TYPE}")]
    NotInit(String),
    /// A message could not be decoded.
    #[error("Malformed {0} message")]
    Decode(&'static str, #[source] proto::protobuf::Error),
    /// The stream id is empty or too long.
    #[error("Invalid stream id {0:?}")]
    InvalidId(String),
    /// Another stream with this id is waiting already.
    #[error("Stream {0:?} is registered already")]
    Duplicate(String),
    /// No stream with this id arrived in time.
    #[error("Stream {id:?} did not arrive within {timeout:?}")]
    Timeout {
        /// The stream id.
        id: String,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The ttrpc stream failed.
    #[error("Stream transport failed: {0}")]
    Transport(String),
    /// No copy of this stream id is running (it ended, or never was).
    #[error("No stream {0:?} to resume")]
    NotFound(String),
    /// A resume of this stream is being handled already.
    #[error("Stream {0:?} is being resumed already")]
    ResumeBusy(String),
    /// The host resumes output at an offset beyond what the agent sent.
    #[error("Stream {id:?} cannot resume at byte {received}: only {sent} were sent")]
    InvalidOffset {
        /// The stream id.
        id: String,
        /// The offset the host asked for.
        received: u64,
        /// The bytes sent so far.
        sent: u64,
    },
    /// The connection failed and the host did not resume the stream in time.
    #[error("Stream {id:?} was not resumed within {wait:?} of its connection failing")]
    NotResumed {
        /// The stream id.
        id: String,
        /// How long the copy waited.
        wait: Duration,
    },
}

impl From<StreamingError> for ttrpc::Error {
    fn from(e: StreamingError) -> Self {
        let code = match e {
            StreamingError::Duplicate(_) | StreamingError::ResumeBusy(_) => {
                ttrpc::Code::ALREADY_EXISTS
            }
            StreamingError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            StreamingError::Timeout { .. } | StreamingError::NotResumed { .. } => {
                ttrpc::Code::DEADLINE_EXCEEDED
            }
            StreamingError::Transport(_) => ttrpc::Code::UNAVAILABLE,
            _ => ttrpc::Code::INVALID_ARGUMENT,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

/// The stream id of a stdio URL (`<scheme>://<address>?streaming_id=<id>`), or `None` when
/// `stdio` is not such a URL (a file or FIFO path, or empty).
pub fn stream_id(stdio: &str) -> Option<&str> {
    let (address, query) = stdio.split_once('?')?;
    if !address.contains("://") {
        return None;
    }
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("streaming_id="))
        .filter(|id| !id.is_empty())
}

/// The bare message name of a type URL (`type.googleapis.com/x.Y` and `x.Y` both give `x.Y`).
fn type_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, name)| name)
}

/// A message with neither type nor value. containerd's Go ttrpc client opens a client stream
/// with a request that carries no payload and no `FLAG_NO_DATA`; ttrpc-rust's server then hands
/// the handler that empty payload as a first message, before the client's `StreamInit`. It
/// means nothing and is skipped.
pub fn is_blank(msg: &Any) -> bool {
    msg.type_url.is_empty() && msg.value.is_empty()
}

fn pack(type_url: &str, msg: &impl Message) -> Result<Any, StreamingError> {
    let mut any = Any::new();
    any.type_url = type_url.to_owned();
    any.value = msg
        .write_to_bytes()
        .map_err(|e| StreamingError::Decode("outgoing", e))?;
    Ok(any)
}

fn transport(e: &ttrpc::Error) -> StreamingError {
    StreamingError::Transport(e.to_string())
}

/// One connection of a stream: its two halves, and what keeps its ttrpc handler alive
/// (dropping the link ends the stream on that connection).
#[derive(Debug)]
pub(crate) struct Link {
    tx: SSSender<Any>,
    rx: SSReceiver<Any>,
    _done: oneshot::Sender<()>,
}

/// A host's request to go on with a stream on a new connection.
#[derive(Debug)]
pub(crate) struct ResumeRequest {
    /// `StreamResume.received`.
    received: u64,
    /// The new connection; the copy answers `StreamResumed` on it.
    link: Link,
    /// Whether the copy took the stream over (`Err` goes to the host as the call's status).
    verdict: oneshot::Sender<Result<(), StreamingError>>,
}

/// Taken streams that can be resumed: id -> (registration, where resume requests go).
type Live = Arc<Mutex<HashMap<String, (u64, mpsc::Sender<ResumeRequest>)>>>;

/// What lets a copy be resumed: its resume requests, for as long as it holds this.
#[derive(Debug)]
pub(crate) struct Resumable {
    requests: mpsc::Receiver<ResumeRequest>,
    /// How long a copy waits for a resume.
    wait: Duration,
    /// How often an idle input copy checks its connection.
    probe: Duration,
    /// Resumes that asked for output older than was retained.
    gaps: Arc<AtomicU64>,
    live: Live,
    id: String,
    registration: u64,
}

impl Drop for Resumable {
    fn drop(&mut self) {
        let mut live = self.live.lock().expect("poisoned");
        // A later registration of the same id is not ours to remove.
        if live
            .get(&self.id)
            .is_some_and(|(r, _)| *r == self.registration)
        {
            live.remove(&self.id);
        }
    }
}

/// A stream taken from the registry. Dropping it ends the stream.
#[derive(Debug)]
pub struct StreamConn {
    /// The stream id.
    pub id: String,
    link: Link,
    /// `Some` once taken from a registry: the copy can then be resumed.
    resume: Option<Resumable>,
}

/// Streams that arrived and wait for `Create`/`Exec`, and taken streams a host may resume.
/// Share it with `Arc`.
#[derive(Debug)]
pub struct StreamRegistry {
    streams: Mutex<HashMap<String, StreamConn>>,
    arrived: Notify,
    live: Live,
    registrations: AtomicU64,
    resume_wait: Duration,
    probe: Duration,
    gaps: Arc<AtomicU64>,
}

impl Default for StreamRegistry {
    fn default() -> Self {
        Self {
            streams: Mutex::default(),
            arrived: Notify::new(),
            live: Live::default(),
            registrations: AtomicU64::new(0),
            resume_wait: RESUME_WAIT,
            probe: PROBE_INTERVAL,
            gaps: Arc::default(),
        }
    }
}

impl StreamRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies of streams taken from this registry wait up to `wait` for a resume (default
    /// [`RESUME_WAIT`]).
    #[must_use]
    pub fn with_resume_wait(mut self, wait: Duration) -> Self {
        self.resume_wait = wait;
        self
    }

    /// Idle input copies of streams taken from this registry check their connection every
    /// `probe` (default [`PROBE_INTERVAL`]).
    #[must_use]
    pub fn with_probe_interval(mut self, probe: Duration) -> Self {
        self.probe = probe;
        self
    }

    /// How many resumes asked for output older than the agent retained (bytes were lost).
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }

    fn register(&self, conn: StreamConn) -> Result<(), StreamingError> {
        let mut streams = self.streams.lock().expect("poisoned");
        if streams.contains_key(&conn.id) {
            return Err(StreamingError::Duplicate(conn.id));
        }
        log::debug!("Stream {:?} arrived", conn.id);
        streams.insert(conn.id.clone(), conn);
        drop(streams);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Makes the stream `id` resumable until the returned value is dropped.
    fn resumable(&self, id: &str) -> Resumable {
        // One pending request at a time: a host cannot queue connections here.
        let (tx, requests) = mpsc::channel(1);
        let registration = self.registrations.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .expect("poisoned")
            .insert(id.to_owned(), (registration, tx));
        Resumable {
            requests,
            wait: self.resume_wait,
            probe: self.probe,
            gaps: Arc::clone(&self.gaps),
            live: Arc::clone(&self.live),
            id: id.to_owned(),
            registration,
        }
    }

    /// Hands a resume request to the copy of stream `id`.
    fn resume(&self, id: &str, request: ResumeRequest) -> Result<(), StreamingError> {
        let tx = self
            .live
            .lock()
            .expect("poisoned")
            .get(id)
            .map(|(_, tx)| tx.clone())
            .ok_or_else(|| StreamingError::NotFound(id.to_owned()))?;
        tx.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StreamingError::ResumeBusy(id.to_owned()),
            mpsc::error::TrySendError::Closed(_) => StreamingError::NotFound(id.to_owned()),
        })
    }

    /// Takes the stream `id`, waiting up to `timeout` for it to arrive. From then on, until
    /// the returned conn is dropped, the host may resume the stream on a new connection.
    pub async fn take(&self, id: &str, timeout: Duration) -> Result<StreamConn, StreamingError> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if let Some(c) = self.streams.lock().expect("poisoned").remove(id) {
                    return c;
                }
                arrived.await;
            }
        };
        let mut conn =
            tokio::time::timeout(timeout, wait)
                .await
                .map_err(|_| StreamingError::Timeout {
                    id: id.to_owned(),
                    timeout,
                })?;
        conn.resume = Some(self.resumable(id));
        Ok(conn)
    }

    /// Ids of the streams waiting to be taken.
    pub fn waiting(&self) -> Vec<String> {
        self.streams
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Ends every stream still waiting to be taken (before the ttrpc server shuts down: it
    /// waits for stream handlers, and a waiting stream's handler only ends when dropped).
    pub fn close_all(&self) -> usize {
        let mut streams = self.streams.lock().expect("poisoned");
        let n = streams.len();
        streams.clear();
        n
    }

    /// Drops the waiting stream `id`, if any (ends it for the engine).
    pub fn discard(&self, id: &str) -> bool {
        self.streams.lock().expect("poisoned").remove(id).is_some()
    }
}

/// The ttrpc `Streaming` service over a registry.
#[derive(Debug)]
pub struct StreamingService {
    registry: Arc<StreamRegistry>,
    untaken_ttl: Duration,
}

impl StreamingService {
    /// A service that puts arriving streams into `registry`.
    pub fn new(registry: Arc<StreamRegistry>) -> Self {
        Self {
            registry,
            untaken_ttl: UNTAKEN_TTL,
        }
    }

    /// Ends streams nobody takes within `ttl` (default [`UNTAKEN_TTL`]).
    #[must_use]
    pub fn with_untaken_ttl(mut self, ttl: Duration) -> Self {
        self.untaken_ttl = ttl;
        self
    }

    async fn serve(&self, stream: ServerStream<Any, Any>) -> Result<(), StreamingError> {
        let (tx, mut rx) = stream.split();
        let first = loop {
            let msg = rx
                .recv()
                .await
                .map_err(|e| transport(&e))?
                .ok_or(StreamingError::NoInit)?;
            if !is_blank(&msg) {
                break msg;
            }
        };
        match type_name(&first.type_url) {
            STREAM_INIT_TYPE => self.init(&first, tx, rx).await,
            STREAM_RESUME_TYPE => self.resume(&first, tx, rx).await,
            _ => Err(StreamingError::NotInit(first.type_url)),
        }
    }

    /// A new stream: registered until `Create`/`Exec` takes it.
    async fn init(
        &self,
        first: &Any,
        tx: SSSender<Any>,
        rx: SSReceiver<Any>,
    ) -> Result<(), StreamingError> {
        let init = StreamInit::parse_from_bytes(&first.value)
            .map_err(|e| StreamingError::Decode("StreamInit", e))?;
        check_id(&init.id)?;
        let (done_tx, done_rx) = oneshot::channel();
        let ack = pack(
            EMPTY_TYPE,
            &proto::protobuf::well_known_types::empty::Empty::new(),
        )?;
        // Register before the answer, as containerd does: once the engine has the answer it
        // may send the call that names the stream.
        self.registry.register(StreamConn {
            id: init.id.clone(),
            link: Link {
                tx: tx.clone(),
                rx,
                _done: done_tx,
            },
            resume: None,
        })?;
        if let Err(e) = tx.send(&ack).await {
            self.registry.discard(&init.id);
            return Err(transport(&e));
        }
        // Until the taker drops the conn (or the registry discards it).
        tokio::pin!(done_rx);
        tokio::select! {
            _ = &mut done_rx => {}
            () = tokio::time::sleep(self.untaken_ttl) => {
                if self.registry.discard(&init.id) {
                    log::warn!("Stream {:?} was never taken: ending it", init.id);
                }
                let _ = done_rx.await;
            }
        }
        log::debug!("Stream {:?} done", init.id);
        Ok(())
    }

    /// A taken stream going on on this connection: handed to its copy, which answers.
    async fn resume(
        &self,
        first: &Any,
        tx: SSSender<Any>,
        rx: SSReceiver<Any>,
    ) -> Result<(), StreamingError> {
        let resume = StreamResume::parse_from_bytes(&first.value)
            .map_err(|e| StreamingError::Decode("StreamResume", e))?;
        check_id(&resume.id)?;
        let (done_tx, done_rx) = oneshot::channel();
        let (verdict_tx, verdict_rx) = oneshot::channel();
        self.registry.resume(
            &resume.id,
            ResumeRequest {
                received: resume.received,
                link: Link {
                    tx,
                    rx,
                    _done: done_tx,
                },
                verdict: verdict_tx,
            },
        )?;
        verdict_rx
            .await
            .map_err(|_| StreamingError::NotFound(resume.id.clone()))??;
        log::info!("Stream {:?} resumed", resume.id);
        // Until the copy drops this connection.
        let _ = done_rx.await;
        log::debug!("Stream {:?} done", resume.id);
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), StreamingError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(StreamingError::InvalidId(id.to_owned()));
    }
    Ok(())
}

#[async_trait]
impl Streaming for StreamingService {
    async fn stream(
        &self,
        _ctx: &TtrpcContext,
        stream: ServerStream<Any, Any>,
    ) -> ttrpc::Result<()> {
        self.serve(stream).await.map_err(|e| {
            log::warn!("Stream: {e}");
            e.into()
        })
    }
}

/// The ttrpc service map of the stream service.
pub fn services(registry: Arc<StreamRegistry>) -> HashMap<String, Service> {
    create_streaming(Arc::new(StreamingService::new(registry)))
}

#[cfg(test)]
mod tests {
    use proto::agent::stream_data::Data;

    use super::*;

    #[test]
    fn stream_urls() {
        let base = "ttrpc+unix:///run/sandboxer/p1/task.sock";
        assert_eq!(
            stream_id(&format!("{base}?streaming_id=c1-stdout")),
            Some("c1-stdout")
        );
        assert_eq!(
            stream_id(&format!("{base}?x=1&streaming_id=c1-stdin")),
            Some("c1-stdin")
        );
        assert_eq!(stream_id(&format!("{base}?streaming_id=")), None);
        assert_eq!(stream_id(base), None);
        assert_eq!(stream_id("/run/fifo/c1-stdout"), None);
        assert_eq!(stream_id("/tmp/a?streaming_id=x"), None);
        assert_eq!(stream_id(""), None);
    }

    #[test]
    fn type_names() {
        assert_eq!(
            type_name("type.googleapis.com/containerd.types.transfer.Data"),
            DATA_TYPE
        );
        assert_eq!(type_name(DATA_TYPE), DATA_TYPE);
    }

    /// Opens a stream and sends `StreamInit{id}`; `go_client`: first a blank message, which is
    /// what ttrpc-rust's server hands the handler when containerd's Go client opens a stream.
    async fn open(
        sock: &std::path::Path,
        id: &str,
        go_client: bool,
    ) -> ttrpc::asynchronous::ClientStream<Any, Any> {
        let client = ttrpc::asynchronous::Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let s = proto::agent::streaming_ttrpc::StreamingClient::new(client)
            .stream(ttrpc::context::with_timeout(0))
            .await
            .unwrap();
        if go_client {
            s.send(&Any::new()).await.unwrap();
        }
        let mut init = StreamInit::new();
        init.id = id.into();
        s.send(&pack(STREAM_INIT_TYPE, &init).unwrap())
            .await
            .unwrap();
        s
    }

    #[tokio::test]
    async fn streams_register_answer_and_expire_untaken() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let registry = Arc::new(StreamRegistry::new());
        let service = StreamingService::new(Arc::clone(&registry))
            .with_untaken_ttl(Duration::from_millis(300));
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(ttrpc::asynchronous::transport::Listener::from(listener))
            .register_service(create_streaming(Arc::new(service)));
        server.start().await.unwrap();

        // Registered, then answered with an Empty; taken within the TTL it stays open.
        let mut kept = open(&sock, "kept", false).await;
        let ack = kept.recv().await.unwrap();
        assert_eq!(ack.type_url, EMPTY_TYPE);
        let conn = registry.take("kept", Duration::from_secs(5)).await.unwrap();
        // Not taken: ended after the TTL (end of file for the engine). This one is opened the
        // way containerd's Go client opens it: the blank first message is skipped.
        let mut lost = open(&sock, "lost", true).await;
        assert_eq!(lost.recv().await.unwrap().type_url, EMPTY_TYPE);
        assert_eq!(registry.waiting(), ["lost"]);
        let end = tokio::time::timeout(Duration::from_secs(5), lost.recv())
            .await
            .expect("untaken stream ended");
        assert!(matches!(end, Err(ttrpc::Error::Eof)), "{end:?}");
        assert!(registry.waiting().is_empty());
        // The taken one carries data both ways until its conn is dropped.
        let mut d = Data::new();
        d.data = b"x".to_vec();
        let Link { tx, mut rx, _done } = conn.link;
        kept.send(&pack(DATA_TYPE, &d).unwrap()).await.unwrap();
        let got = rx.recv().await.unwrap().unwrap();
        assert_eq!(Data::parse_from_bytes(&got.value).unwrap().data, b"x");
        tx.send(&pack(DATA_TYPE, &d).unwrap()).await.unwrap();
        assert_eq!(kept.recv().await.unwrap().type_url, DATA_TYPE);
        drop((tx, rx, _done));
        let end = tokio::time::timeout(Duration::from_secs(5), kept.recv())
            .await
            .expect("dropped stream ended");
        assert!(matches!(end, Err(ttrpc::Error::Eof)), "{end:?}");
        // A first message that is no StreamInit is refused.
        let client = ttrpc::asynchronous::Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let mut bad = proto::agent::streaming_ttrpc::StreamingClient::new(client)
            .stream(ttrpc::context::with_timeout(0))
            .await
            .unwrap();
        bad.send(&pack(DATA_TYPE, &d).unwrap()).await.unwrap();
        match bad.recv().await {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT);
                assert!(s.message().contains(STREAM_INIT_TYPE), "{}", s.message());
            }
            other => panic!("{other:?}"),
        }
        // (No `server.shutdown()`: it waits up to 10 s for the clients' connections.)
        drop((kept, lost, bad, server));
    }

    #[tokio::test]
    async fn take_times_out_with_the_id() {
        let r = StreamRegistry::new();
        let e = r
            .take("c1-stdout", Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(e, StreamingError::Timeout { .. }));
        assert!(e.to_string().contains("\"c1-stdout\""), "{e}");
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), ttrpc::Code::DEADLINE_EXCEEDED),
            other => panic!("{other:?}"),
        }
    }
}
