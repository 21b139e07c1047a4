// SPDX-License-Identifier: Apache-2.0
//! Process stdio between the engine on the host and the agent in the VM, over containerd's
//! `containerd.services.streaming.v1.Streaming` protocol (the agent serves it; see its
//! `streaming` module for the message flow: `StreamInit{id}`, then `Data` within the windows
//! granted by `WindowUpdate`s).
//!
//! - `io_type = "streaming"` (containerd): stdio paths are URLs naming this task socket
//!   (`ttrpc+unix://…/task.sock?streaming_id=<id>`); containerd opens `Streaming.Stream` here.
//!   `StreamProxy` opens a stream to the agent for each one and copies messages both ways
//!   unchanged, so the URLs go to the agent as they are.
//! - `io_type = "fifo"` (containerd, iSulad): stdio paths are host FIFOs the engine created.
//!   [`bridge`] opens them here, opens one agent stream per FIFO (a fresh id) and copies bytes
//!   between them; the agent is given `…?streaming_id=<id>` URLs instead of the paths.
//! - Empty paths stay empty (`/dev/null` in the guest).
//!
//! Output is bounded by the window it is granted, end to end: a stream whose agent sends more
//! `Data` than it was granted (by containerd through the proxy, or by [`bridge`]'s own grants)
//! is ended at once, counted (`sandboxer_guest_stdio_overruns_total`) and logged, so what a
//! guest can make the daemon hold for a slow reader is the window and no more. The bridge
//! takes the agent's messages as they come (ttrpc's client would otherwise queue them without
//! bound) into a buffer of at most one window that the FIFO drains at its reader's pace.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use proto::agent::stream_data::{Data, WindowUpdate};
use proto::agent::streaming::StreamInit;
use proto::agent::streaming_ttrpc::{Streaming, StreamingClient};
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use ttrpc::asynchronous::{CSReceiver, CSSender, ServerStream, TtrpcContext};

use super::error::TaskError;
use crate::backend::TaskTarget;
use devices::sync::Recover;

/// Service name of the stream service.
pub const STREAMING: &str = "containerd.services.streaming.v1.Streaming";
const STREAM_INIT_TYPE: &str = "containerd.services.streaming.v1.StreamInit";
const DATA_TYPE: &str = "containerd.types.transfer.Data";
const WINDOW_UPDATE_TYPE: &str = "containerd.types.transfer.WindowUpdate";
/// Most bytes in one `Data` message.
const MAX_DATA: usize = 32 * 1024;
/// Bytes granted to the agent at a time for output.
const WINDOW: i32 = 64 * 1024;

/// The bare message name of a type URL.
fn type_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, name)| name)
}

/// Output bytes an agent may still send on one stream: what it was granted by `WindowUpdate`s
/// minus the `Data` it sent.
#[derive(Debug, Default)]
struct Credit(AtomicI64);

impl Credit {
    fn grant(&self, bytes: i32) {
        self.0.fetch_add(i64::from(bytes.max(0)), Ordering::AcqRel);
    }

    /// Takes `bytes` of a `Data` message; false if the agent had not been granted them.
    fn take(&self, bytes: usize) -> bool {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.0.fetch_sub(bytes, Ordering::AcqRel) >= bytes
    }
}

/// Ends a stream whose agent overran its window.
fn overrun(what: &str) {
    crate::metrics::global().observe_stdio_overrun();
    tracing::warn!("the agent sent {what} output beyond the window granted: stream ended");
}

/// The `Data` payload of `any`, if it is one.
fn data_of(any: &Any) -> Option<Vec<u8>> {
    if type_name(&any.type_url) != DATA_TYPE {
        return None;
    }
    Data::parse_from_bytes(&any.value).ok().map(|d| d.data)
}

fn pack(type_url: &str, msg: &impl Message) -> Result<Any, TaskError> {
    let mut any = Any::new();
    any.type_url = type_url.to_owned();
    any.value = msg
        .write_to_bytes()
        .map_err(|e| TaskError::Encode("a stream message", Box::new(e)))?;
    Ok(any)
}

/// A message with neither type nor value: it carries nothing. containerd's Go ttrpc client
/// opens a client stream with no payload and without `FLAG_NO_DATA`, and ttrpc-rust's server
/// hands the handler that empty payload as a first message; the agent's answers never are
/// blank. Neither direction forwards one.
fn is_blank(msg: &Any) -> bool {
    msg.type_url.is_empty() && msg.value.is_empty()
}

/// Whether `stdio` is a `streaming_id` URL (as opposed to a path).
pub fn is_stream_url(stdio: &str) -> bool {
    stdio
        .split_once('?')
        .is_some_and(|(addr, q)| addr.contains("://") && q.contains("streaming_id="))
}

/// Forwards the engine's streams to the agent, message for message.
#[derive(Debug)]
pub(crate) struct StreamProxy {
    target: Arc<dyn TaskTarget>,
}

impl StreamProxy {
    pub(crate) fn new(target: Arc<dyn TaskTarget>) -> Self {
        Self { target }
    }
}

fn unreachable_agent(e: ttrpc::Error) -> ttrpc::Error {
    TaskError::from_agent("Stream", e).into()
}

#[async_trait]
impl Streaming for StreamProxy {
    async fn stream(
        &self,
        _ctx: &TtrpcContext,
        stream: ServerStream<Any, Any>,
    ) -> ttrpc::Result<()> {
        let agent = self.target.agent().map_err(TaskError::NoAgent)?;
        let up = StreamingClient::new(agent)
            .stream(ttrpc::context::Context::default())
            .await
            .map_err(unreachable_agent)?;
        let (down_tx, mut down_rx) = stream.split();
        let (up_tx, mut up_rx) = up.split();
        // What containerd granted the agent (its WindowUpdates pass here first), so that the
        // agent cannot make this proxy queue more for containerd than containerd asked for.
        let credit = Arc::new(Credit::default());
        let granted = Arc::clone(&credit);
        let to_agent = async move {
            loop {
                match down_rx.recv().await {
                    Ok(Some(msg)) if is_blank(&msg) => {}
                    Ok(Some(msg)) => {
                        if type_name(&msg.type_url) == WINDOW_UPDATE_TYPE
                            && let Ok(w) = WindowUpdate::parse_from_bytes(&msg.value)
                        {
                            granted.grant(w.update);
                        }
                        if up_tx.send(&msg).await.is_err() {
                            break;
                        }
                    }
                    // The engine closed its side: so does the agent's.
                    Ok(None) | Err(_) => {
                        let _ = up_tx.close_send().await;
                        break;
                    }
                }
            }
            // Keep the task alive: the other direction decides when the stream ends.
            std::future::pending::<()>().await;
        };
        let from_agent = async move {
            loop {
                match up_rx.recv().await {
                    Ok(msg) if is_blank(&msg) => {}
                    Ok(msg) => {
                        if let Some(data) = data_of(&msg)
                            && !credit.take(data.len())
                        {
                            overrun("streamed");
                            return Err(ttrpc::Error::Others(
                                "the agent sent output beyond the window granted".into(),
                            ));
                        }
                        if down_tx.send(&msg).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(ttrpc::Error::RpcStatus(s)) => return Err(ttrpc::Error::RpcStatus(s)),
                    Err(_) => return Ok(()),
                }
            }
        };
        tokio::select! {
            () = to_agent => Ok(()),
            r = from_agent => r,
        }
    }
}

/// Copy tasks of one process's FIFO stdio; dropping it stops them.
#[derive(Debug, Default)]
pub struct Bridges(Vec<JoinHandle<()>>);

impl Drop for Bridges {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Bridges {
    /// Whether every copy has ended.
    pub fn finished(&self) -> bool {
        self.0.iter().all(JoinHandle::is_finished)
    }
}

/// Which stdio stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    In,
    Out,
}

static NEXT_STREAM: AtomicU64 = AtomicU64::new(0);

/// Opens a stream to the agent and registers it under `id`.
async fn open_agent_stream(
    target: &dyn TaskTarget,
    id: &str,
) -> Result<(CSSender<Any>, CSReceiver<Any>), TaskError> {
    let agent = target.agent().map_err(TaskError::NoAgent)?;
    let s = StreamingClient::new(agent)
        .stream(ttrpc::context::Context::default())
        .await
        .map_err(|e| TaskError::from_agent("Stream", e))?;
    let (tx, mut rx) = s.split();
    let mut init = StreamInit::new();
    init.id = id.to_owned();
    tx.send(&pack(STREAM_INIT_TYPE, &init)?)
        .await
        .map_err(|e| TaskError::from_agent("Stream", e))?;
    // The agent answers once the stream is registered.
    rx.recv()
        .await
        .map_err(|e| TaskError::from_agent("Stream", e))?;
    Ok((tx, rx))
}

/// Host FIFO or file -> agent (stdin): sends `Data` within the windows the agent grants.
async fn copy_in(
    mut fifo: Box<dyn AsyncRead + Send + Unpin>,
    tx: CSSender<Any>,
    mut rx: CSReceiver<Any>,
) {
    let mut window: i64 = 0;
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(any) if type_name(&any.type_url) == WINDOW_UPDATE_TYPE => {
                    if let Ok(w) = WindowUpdate::parse_from_bytes(&any.value) {
                        window = window.saturating_add(i64::from(w.update.max(0)));
                    }
                }
                Ok(_) => {}
                // The agent ended the stream (the process is gone): stop.
                Err(_) => return,
            },
            n = fifo.read(&mut buf), if window > 0 => {
                let n = match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut data = Data::new();
                data.data = buf.get(..n).unwrap_or_default().to_vec();
                let Ok(msg) = pack(DATA_TYPE, &data) else { break };
                if tx.send(&msg).await.is_err() {
                    return;
                }
                window = window.saturating_sub(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        let cap = usize::try_from(window.clamp(1, i64::try_from(MAX_DATA).unwrap_or(1)))
            .unwrap_or(MAX_DATA);
        buf.resize(cap, 0);
    }
    // End of input for the process.
    let _ = tx.close_send().await;
    // Hold the stream until the agent ends it.
    while rx.recv().await.is_ok() {}
}

/// Agent -> host FIFO or file (stdout/stderr): grants windows as the FIFO takes the bytes.
async fn copy_out(
    fifo: Box<dyn AsyncWrite + Send + Unpin>,
    tx: CSSender<Any>,
    rx: CSReceiver<Any>,
) {
    pump_out(fifo, tx, rx).await;
}

/// Where [`pump_out`] takes the agent's messages from.
#[async_trait]
trait Incoming: Send {
    /// The next message; `None` once the stream has ended.
    async fn next(&mut self) -> Option<Any>;
}

#[async_trait]
impl Incoming for CSReceiver<Any> {
    async fn next(&mut self) -> Option<Any> {
        self.recv().await.ok()
    }
}

/// Where [`pump_out`] sends its window grants.
#[async_trait]
trait Grants: Send {
    /// Grants `bytes` more; false once the stream is gone.
    async fn grant(&mut self, bytes: i32) -> bool;
}

#[async_trait]
impl Grants for CSSender<Any> {
    async fn grant(&mut self, bytes: i32) -> bool {
        let mut update = WindowUpdate::new();
        update.update = bytes;
        match pack(WINDOW_UPDATE_TYPE, &update) {
            Ok(msg) => self.send(&msg).await.is_ok(),
            Err(_) => false,
        }
    }
}

/// Output taken from the agent and not yet written: at most one window (the credit check
/// comes first).
#[derive(Debug, Default)]
struct Pending {
    bytes: Mutex<Vec<u8>>,
    /// Set when the receiving half has ended (stream closed or overrun).
    ended: std::sync::atomic::AtomicBool,
    ready: Notify,
}

/// The bridge's output copy: one half takes every message the agent sends as it comes and
/// checks it against the credit; the other writes what was taken to `fifo` at its reader's
/// pace and grants the agent as much again.
async fn pump_out(
    mut fifo: Box<dyn AsyncWrite + Send + Unpin>,
    mut grants: impl Grants,
    incoming: impl Incoming,
) {
    let credit = Credit::default();
    let pending = Pending::default();
    credit.grant(WINDOW);
    if !grants.grant(WINDOW).await {
        return;
    }
    // Owns `incoming`: the stream is dropped (closed) as soon as this half ends.
    let receive = async {
        let mut incoming = incoming;
        while let Some(any) = incoming.next().await {
            let Some(data) = data_of(&any) else {
                continue;
            };
            if !credit.take(data.len()) {
                overrun("container");
                break;
            }
            pending.bytes.lock().recover().extend_from_slice(&data);
            pending.ready.notify_one();
        }
        pending.ended.store(true, Ordering::Release);
        pending.ready.notify_one();
    };
    let write = async {
        let mut written: i32 = 0;
        loop {
            let chunk = std::mem::take(&mut *pending.bytes.lock().recover());
            if chunk.is_empty() {
                if pending.ended.load(Ordering::Acquire) {
                    break;
                }
                pending.ready.notified().await;
                continue;
            }
            // A reader that went away: keep draining so the process does not block.
            let _ = fifo.write_all(&chunk).await;
            written = written.saturating_add(i32::try_from(chunk.len()).unwrap_or(i32::MAX));
            if written >= WINDOW / 2 {
                credit.grant(written);
                if !grants.grant(written).await {
                    break;
                }
                written = 0;
            }
        }
        let _ = fifo.flush().await;
    };
    tokio::join!(receive, write);
}

/// Rewrites `[stdin, stdout, stderr]` for the agent: stream URLs and empty paths stay; FIFO
/// (or plain file) paths are opened and bridged to fresh agent streams, and replaced by URLs
/// naming them.
/// `what` names the process in errors and stream ids (`<container>` or `<container>-<exec>`).
pub async fn bridge(
    target: &dyn TaskTarget,
    socket: &Path,
    what: &str,
    stdio: [&str; 3],
) -> Result<([String; 3], Bridges), TaskError> {
    let mut out: [String; 3] = Default::default();
    let mut bridges = Bridges::default();
    for (i, (path, name)) in stdio.iter().zip(["stdin", "stdout", "stderr"]).enumerate() {
        let slot = out.get_mut(i).expect("three stdio slots");
        if path.is_empty() || is_stream_url(path) {
            *slot = (*path).to_owned();
            continue;
        }
        let dir = if i == 0 { Dir::In } else { Dir::Out };
        let seq = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let id = format!("{what}-{name}-{seq}");
        match dir {
            Dir::In => {
                let reader = open_input(name, path).await?;
                let (tx, rx) = open_agent_stream(target, &id).await?;
                bridges.0.push(tokio::spawn(copy_in(reader, tx, rx)));
            }
            Dir::Out => {
                let writer = open_output(name, path).await?;
                let (tx, rx) = open_agent_stream(target, &id).await?;
                bridges.0.push(tokio::spawn(copy_out(writer, tx, rx)));
            }
        }
        *slot = format!("ttrpc+unix://{}?streaming_id={id}", socket.display());
    }
    Ok((out, bridges))
}

fn is_fifo(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// Opens a stdin source: a FIFO (without blocking for a writer) or a regular file.
async fn open_input(
    field: &str,
    path: &str,
) -> Result<Box<dyn AsyncRead + Send + Unpin>, TaskError> {
    let err = |e: std::io::Error| TaskError::invalid(field, format!("cannot open {path:?}: {e}"));
    if is_fifo(path) {
        let fifo = pipe::OpenOptions::new().open_receiver(path).map_err(err)?;
        return Ok(Box::new(fifo));
    }
    let file = tokio::fs::File::open(path).await.map_err(err)?;
    Ok(Box::new(file))
}

/// Opens a stdout/stderr sink: a FIFO or a file (appended to, created if missing).
///
/// A FIFO is opened read-write, as containerd's runc shim keeps a read end of its output FIFOs:
/// the engine may open its reader a moment after the call that names the FIFO (containerd's
/// `ExecSync` does, from a goroutine), output waits in the pipe until it does, and when the
/// engine restarts and reopens the FIFO the copy goes on instead of failing with `EPIPE`.
async fn open_output(
    field: &str,
    path: &str,
) -> Result<Box<dyn AsyncWrite + Send + Unpin>, TaskError> {
    if is_fifo(path) {
        let fifo = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map_err(|e| TaskError::invalid(field, format!("cannot open {path:?}: {e}")))?;
        return Ok(Box::new(fifo));
    }
    if !Path::new(path).is_absolute() {
        return Err(TaskError::invalid(
            field,
            format!("{path:?} is not absolute"),
        ));
    }
    let file = tokio::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .await
        .map_err(|e| TaskError::invalid(field, format!("cannot open {path:?}: {e}")))?;
    Ok(Box::new(file))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;
    use tokio::sync::mpsc;

    use super::*;

    #[async_trait]
    impl Incoming for mpsc::Receiver<Any> {
        async fn next(&mut self) -> Option<Any> {
            self.recv().await
        }
    }

    #[async_trait]
    impl Grants for mpsc::UnboundedSender<i32> {
        async fn grant(&mut self, bytes: i32) -> bool {
            self.send(bytes).is_ok()
        }
    }

    fn data(len: usize, fill: u8) -> Any {
        let mut d = Data::new();
        d.data = vec![fill; len];
        pack(DATA_TYPE, &d).unwrap()
    }

    #[test]
    fn credit_refuses_what_was_not_granted() {
        let c = Credit::default();
        assert!(!c.take(1));
        c.grant(10);
        c.grant(-5); // ignored
        assert!(c.take(4));
        assert!(c.take(5));
        assert!(!c.take(2));
    }

    #[tokio::test]
    async fn output_within_the_windows_reaches_the_fifo() {
        let (agent, incoming) = mpsc::channel(64);
        let (grants_tx, mut grants) = mpsc::unbounded_channel();
        let (fifo, mut reader) = tokio::io::duplex(4096);
        let pump = tokio::spawn(pump_out(Box::new(fifo), grants_tx, incoming));
        let chunk = 30 * 1024;
        let mut window = i64::from(grants.recv().await.unwrap());
        let mut sent = 0;
        let mut read = Vec::new();
        let mut buf = vec![0u8; 8192];
        // A well-behaved agent: 10 chunks, each within what it was granted.
        for n in 0..10u8 {
            while window < i64::try_from(chunk).unwrap() {
                tokio::select! {
                    g = grants.recv() => window += i64::from(g.unwrap()),
                    r = reader.read(&mut buf) => read.extend_from_slice(&buf[..r.unwrap()]),
                }
            }
            agent.send(data(chunk, n)).await.unwrap();
            window -= i64::try_from(chunk).unwrap();
            sent += chunk;
        }
        drop(agent);
        while read.len() < sent {
            let r = reader.read(&mut buf).await.unwrap();
            assert!(r > 0);
            read.extend_from_slice(&buf[..r]);
        }
        pump.await.unwrap();
        assert_eq!(read.len(), sent);
        assert!(
            read.chunks(chunk)
                .enumerate()
                .all(|(n, c)| c.iter().all(|&b| usize::from(b) == n))
        );
    }

    #[tokio::test]
    async fn an_agent_that_overruns_its_window_has_its_stream_ended() {
        // One message at a time: what the pump holds is what it took, not this test's queue.
        let (agent, incoming) = mpsc::channel(1);
        let (grants_tx, mut grants) = mpsc::unbounded_channel();
        // Nobody reads the FIFO: without the check, everything the agent sends would pile up.
        let (fifo, _reader) = tokio::io::duplex(1024);
        let _pump = tokio::spawn(pump_out(Box::new(fifo), grants_tx, incoming));
        assert_eq!(grants.recv().await, Some(WINDOW));
        let chunk = 16 * 1024;
        let mut sent = 0;
        while agent.send(data(chunk, 1)).await.is_ok() {
            sent += chunk;
            assert!(
                sent <= 10 * usize::try_from(WINDOW).unwrap(),
                "never cut off"
            );
        }
        // Cut off at the first byte past the one window it was given.
        assert_eq!(sent, usize::try_from(WINDOW).unwrap() + chunk);
        assert!(agent.is_closed());
    }

    #[test]
    fn stream_urls() {
        assert!(is_stream_url(
            "ttrpc+unix:///run/sandboxer/p/task.sock?streaming_id=c1-stdout"
        ));
        assert!(!is_stream_url("/run/containerd/fifo/c1-stdout"));
        assert!(!is_stream_url("/tmp/a?streaming_id=x"));
        assert!(!is_stream_url(""));
        assert_eq!(type_name("type.googleapis.com/x.Y"), "x.Y");
        assert_eq!(type_name("x.Y"), "x.Y");
    }
}
