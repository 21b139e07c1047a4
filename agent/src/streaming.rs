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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proto::agent::stream_data::{Data, WindowUpdate};
use proto::agent::streaming::StreamInit;
use proto::agent::streaming_ttrpc::{Streaming, create_streaming};
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use ttrpc::asynchronous::{SSReceiver, SSSender, ServerStream, Service, TtrpcContext};

/// Service name of the stream service.
pub const STREAMING: &str = "containerd.services.streaming.v1.Streaming";
/// Type URL of [`StreamInit`].
pub const STREAM_INIT_TYPE: &str = "containerd.services.streaming.v1.StreamInit";
/// Type URL of [`Data`].
pub const DATA_TYPE: &str = "containerd.types.transfer.Data";
/// Type URL of [`WindowUpdate`].
pub const WINDOW_UPDATE_TYPE: &str = "containerd.types.transfer.WindowUpdate";
/// Type URL of the answer to `StreamInit`.
pub const EMPTY_TYPE: &str = "google.protobuf.Empty";
/// Most bytes in one `Data` message (containerd uses the same).
pub const MAX_DATA: usize = 32 * 1024;
/// Bytes the agent grants a stdin sender at a time.
pub const WINDOW: i32 = 64 * 1024;
/// Longest stream id accepted.
const MAX_ID_LEN: usize = 1024;
/// How long a stream may wait for its `Create`/`Exec` before the agent ends it (an engine
/// that gave up must not leave it behind for ever).
pub const UNTAKEN_TTL: Duration = Duration::from_secs(120);

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
}

impl From<StreamingError> for ttrpc::Error {
    fn from(e: StreamingError) -> Self {
        let code = match e {
            StreamingError::Duplicate(_) => ttrpc::Code::ALREADY_EXISTS,
            StreamingError::Timeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
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

/// A stream taken from the registry. Dropping it ends the stream.
#[derive(Debug)]
pub struct StreamConn {
    /// The stream id.
    pub id: String,
    tx: SSSender<Any>,
    rx: SSReceiver<Any>,
    /// Dropped with the conn: lets the ttrpc handler return.
    _done: oneshot::Sender<()>,
}

/// Streams that arrived and wait for `Create`/`Exec`. Share it with `Arc`.
#[derive(Debug, Default)]
pub struct StreamRegistry {
    streams: Mutex<HashMap<String, StreamConn>>,
    arrived: Notify,
}

impl StreamRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
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

    /// Takes the stream `id`, waiting up to `timeout` for it to arrive.
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
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| StreamingError::Timeout {
                id: id.to_owned(),
                timeout,
            })
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
        if type_name(&first.type_url) != STREAM_INIT_TYPE {
            return Err(StreamingError::NotInit(first.type_url));
        }
        let init = StreamInit::parse_from_bytes(&first.value)
            .map_err(|e| StreamingError::Decode("StreamInit", e))?;
        if init.id.is_empty() || init.id.len() > MAX_ID_LEN {
            return Err(StreamingError::InvalidId(init.id));
        }
        let (done_tx, done_rx) = oneshot::channel();
        let ack = pack(
            EMPTY_TYPE,
            &proto::protobuf::well_known_types::empty::Empty::new(),
        )?;
        // Register before the answer, as containerd does: once the engine has the answer it
        // may send the call that names the stream.
        self.registry.register(StreamConn {
            id: init.id.clone(),
            tx: tx.clone(),
            rx,
            _done: done_tx,
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

/// Copies `reader` (a process's stdout/stderr pipe or pty) into the stream as `Data`, within
/// the windows the engine grants, until end of file; then ends the stream. A pty's `EIO` (no
/// process has it open any more) counts as end of file. Returns the bytes sent.
pub async fn copy_output<R: AsyncRead + Unpin>(
    conn: StreamConn,
    mut reader: R,
) -> Result<u64, StreamingError> {
    let StreamConn { id, tx, mut rx, .. } = conn;
    let mut window: i64 = 0;
    let mut peer_open = true;
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        tokio::select! {
            msg = rx.recv(), if peer_open => match msg {
                Ok(Some(any)) if type_name(&any.type_url) == WINDOW_UPDATE_TYPE => {
                    let w = WindowUpdate::parse_from_bytes(&any.value)
                        .map_err(|e| StreamingError::Decode("WindowUpdate", e))?;
                    window = window.saturating_add(i64::from(w.update.max(0)));
                }
                Ok(Some(any)) => log::debug!("Stream {id:?}: ignoring a {:?}", any.type_url),
                Ok(None) => peer_open = false,
                Err(e) => {
                    log::debug!("Stream {id:?}: {e}");
                    peer_open = false;
                }
            },
            n = reader.read(&mut buf), if window > 0 || !peer_open => {
                let n = match n {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => break,
                    Err(e) => return Err(StreamingError::Transport(format!("read: {e}"))),
                };
                if !peer_open && window <= 0 {
                    // Nobody will grant more: drop the bytes so the process does not block.
                    continue;
                }
                let chunk = buf.get(..n).unwrap_or_default();
                let mut data = Data::new();
                data.data = chunk.to_vec();
                tx.send(&pack(DATA_TYPE, &data)?).await.map_err(|e| transport(&e))?;
                let n64 = u64::try_from(n).unwrap_or(u64::MAX);
                window = window.saturating_sub(i64::try_from(n).unwrap_or(i64::MAX));
                sent = sent.saturating_add(n64);
            }
        }
        // Never read more than the window allows (with no window left, reads only drain).
        let cap = if window <= 0 {
            MAX_DATA
        } else {
            usize::try_from(window).map_or(MAX_DATA, |w| w.min(MAX_DATA))
        };
        buf.resize(cap, 0);
    }
    log::debug!("Stream {id:?}: output ended after {sent} bytes");
    Ok(sent)
}

/// Copies `Data` from the stream into `writer` (a process's stdin pipe or pty), granting
/// [`WINDOW`] bytes at a time, until the engine closes its side, `close` fires (`CloseIO`) or
/// the process stops reading; then drops `writer` (end of file for the process, or for a pty
/// just the end of input). Returns the bytes written.
pub async fn copy_input<W: AsyncWrite + Unpin>(
    conn: StreamConn,
    mut writer: W,
    close: oneshot::Receiver<()>,
) -> Result<u64, StreamingError> {
    let StreamConn { id, tx, mut rx, .. } = conn;
    let mut update = WindowUpdate::new();
    update.update = WINDOW;
    let grant = pack(WINDOW_UPDATE_TYPE, &update)?;
    tx.send(&grant).await.map_err(|e| transport(&e))?;
    let mut granted: i64 = i64::from(WINDOW);
    let mut written: u64 = 0;
    tokio::pin!(close);
    loop {
        let msg = tokio::select! {
            _ = &mut close => break,
            msg = rx.recv() => msg,
        };
        let any = match msg {
            Ok(Some(any)) => any,
            Ok(None) => break,
            Err(e) => {
                log::debug!("Stream {id:?}: {e}");
                break;
            }
        };
        if type_name(&any.type_url) != DATA_TYPE {
            log::debug!("Stream {id:?}: ignoring a {:?}", any.type_url);
            continue;
        }
        let data =
            Data::parse_from_bytes(&any.value).map_err(|e| StreamingError::Decode("Data", e))?;
        if let Err(e) = writer.write_all(&data.data).await {
            log::debug!("Stream {id:?}: the process stopped reading stdin: {e}");
            break;
        }
        let n = i64::try_from(data.data.len()).unwrap_or(i64::MAX);
        written = written.saturating_add(u64::try_from(n).unwrap_or(0));
        granted = granted.saturating_sub(n);
        if granted < i64::from(WINDOW) / 2 {
            tx.send(&grant).await.map_err(|e| transport(&e))?;
            granted = granted.saturating_add(i64::from(WINDOW));
        }
    }
    let _ = writer.shutdown().await;
    log::debug!("Stream {id:?}: input ended after {written} bytes");
    Ok(written)
}

#[cfg(test)]
mod tests {
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
        let (tx, mut rx) = (conn.tx.clone(), conn.rx);
        kept.send(&pack(DATA_TYPE, &d).unwrap()).await.unwrap();
        let got = rx.recv().await.unwrap().unwrap();
        assert_eq!(Data::parse_from_bytes(&got.value).unwrap().data, b"x");
        tx.send(&pack(DATA_TYPE, &d).unwrap()).await.unwrap();
        assert_eq!(kept.recv().await.unwrap().type_url, DATA_TYPE);
        drop((tx, rx, conn._done));
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
