// SPDX-License-Identifier: Apache-2.0
//! The copies of a process's FIFO stdio ([`Bridges`]), and handing them to another process.
//!
//! A live upgrade stops every copy with [`Bridges::hand_over`] at a point where its counters
//! are exact (every FIFO write and read is a single cancel-safe call, counted as it returns),
//! and passes each copy's [`BridgeState`] and FIFO/file descriptor to the new process, which
//! goes on with [`resume`]: it opens the agent stream again with a `StreamResume` (see
//! `stream_resume.proto` in the proto crate) and copies as before, under the same windows.
//!
//! - Output: the state holds the bytes taken from the agent and not yet written (`pending`,
//!   at most one window: the credit check comes first) and `offset`, what the host has of the
//!   stream (written + pending). The agent sends again from `offset`.
//! - Stdin: the state holds the bytes read from the FIFO that the agent has not confirmed
//!   (`unconfirmed`, ending at `offset`). A stdin `WindowUpdate` confirms: beyond a
//!   connection's first window the agent grants exactly what it wrote to the process, so at
//!   most one window is ever unconfirmed. The agent's `StreamResumed` says how much it wrote;
//!   the host sends again from there.
//!
//! The old process never writes to a FIFO after `hand_over` returns and never closes an agent
//! stream then (the agent would take a clean close as the end of the stream): it just stops
//! using it.

use std::collections::VecDeque;
use std::io::{Seek as _, SeekFrom};
use std::os::fd::OwnedFd;

use async_trait::async_trait;
use proto::agent::stream_data::{Data, WindowUpdate};
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use proto::stream::{MAX_DATA, WINDOW, WINDOW_BYTES};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use ttrpc::asynchronous::{CSReceiver, CSSender};

use super::proxy::reopen;
use super::{Credit, DATA_TYPE, WINDOW_UPDATE_TYPE, data_of, overrun, pack, type_name};
use crate::backend::TaskTarget;
use crate::task::error::TaskError;

/// Which way a bridge copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// Host FIFO or file -> process stdin.
    Stdin,
    /// Process stdout/stderr -> host FIFO or file.
    Output,
}

/// Where a bridge stood when it was handed over: what a new process needs, with the FIFO or
/// file descriptor, to go on without losing or repeating a byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeState {
    /// The agent stream id (`StreamInit.id`, `StreamResume.id`).
    pub id: String,
    /// Which way it copies.
    pub direction: Direction,
    /// Output: bytes of the stream the host has (`written` + `pending`), where the agent is
    /// to send from. Stdin: bytes read from the FIFO or file (the end of `unconfirmed`; for a
    /// regular file, also its offset in the descriptor handed over).
    pub offset: u64,
    /// Output: bytes written to the FIFO or file.
    pub written: u64,
    /// Output: bytes taken from the agent and not yet written, oldest first.
    #[serde(with = "crate::bytes")]
    pub pending: Vec<u8>,
    /// Stdin: bytes read that the agent has not confirmed writing to the process, ending at
    /// `offset`.
    #[serde(with = "crate::bytes")]
    pub unconfirmed: Vec<u8>,
    /// Stdin: the FIFO or file reached its end (the agent gets end of input once all is sent).
    pub eof: bool,
}

/// A host FIFO or file output goes to.
#[async_trait]
pub(super) trait Sink: AsyncWrite + Send + Unpin + 'static {
    /// The descriptor, once no write is in flight.
    async fn into_fd(self: Box<Self>) -> std::io::Result<OwnedFd>;
}

#[async_trait]
impl Sink for pipe::Sender {
    async fn into_fd(self: Box<Self>) -> std::io::Result<OwnedFd> {
        self.into_nonblocking_fd()
    }
}

#[async_trait]
impl Sink for tokio::fs::File {
    async fn into_fd(mut self: Box<Self>) -> std::io::Result<OwnedFd> {
        // Waits for the write in flight: a tokio file takes bytes before it writes them.
        self.flush().await?;
        Ok(self.into_std().await.into())
    }
}

/// A host FIFO or file stdin comes from.
#[async_trait]
pub(super) trait Source: AsyncRead + Send + Unpin + 'static {
    /// The descriptor, positioned after the `read` bytes taken from it.
    async fn into_fd(self: Box<Self>, read: u64) -> std::io::Result<OwnedFd>;
}

#[async_trait]
impl Source for pipe::Receiver {
    async fn into_fd(self: Box<Self>, _read: u64) -> std::io::Result<OwnedFd> {
        self.into_nonblocking_fd()
    }
}

#[async_trait]
impl Source for tokio::fs::File {
    async fn into_fd(self: Box<Self>, read: u64) -> std::io::Result<OwnedFd> {
        // A tokio file may have read ahead into its buffer: put the offset where the copy is.
        let mut file = self.into_std().await;
        file.seek(SeekFrom::Start(read))?;
        Ok(file.into())
    }
}

/// Where the copies take the agent's messages from.
#[async_trait]
pub(super) trait Incoming: Send {
    /// The next message; `None` once the stream has ended. Cancel-safe.
    async fn next(&mut self) -> Option<Any>;
}

#[async_trait]
impl Incoming for CSReceiver<Any> {
    async fn next(&mut self) -> Option<Any> {
        self.recv().await.ok()
    }
}

/// Where the copies send their messages.
#[async_trait]
pub(super) trait Outgoing: Send {
    /// Sends `msg`; false once the stream is gone.
    async fn send(&mut self, msg: Any) -> bool;
    /// Closes the sending side (end of input for the agent).
    async fn close(&mut self) -> bool;
}

#[async_trait]
impl Outgoing for CSSender<Any> {
    async fn send(&mut self, msg: Any) -> bool {
        CSSender::send(self, &msg).await.is_ok()
    }
    async fn close(&mut self) -> bool {
        self.close_send().await.is_ok()
    }
}

fn grant_msg(bytes: i32) -> Option<Any> {
    let mut update = WindowUpdate::new();
    update.update = bytes;
    pack(WINDOW_UPDATE_TYPE, &update).ok()
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The output copy's counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct OutState {
    /// Written to the FIFO or file.
    pub(super) written: u64,
    /// Taken from the agent and not yet written.
    pub(super) pending: Vec<u8>,
}

/// How a copy ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum End {
    /// The stream ended and everything was copied.
    Finished,
    /// Stopped for a hand-over.
    Stopped,
}

async fn next_of(incoming: &mut Option<impl Incoming>) -> Option<Any> {
    match incoming {
        Some(i) => i.next().await,
        None => std::future::pending().await,
    }
}

/// Agent -> FIFO: takes every message the agent sends as it comes, checked against the
/// credit, and writes what was taken to `fifo` at its reader's pace, granting the agent as
/// much again. Starts from `st` (a hand-over's pending bytes are written first and count
/// against the first window) and stops, with `st` exact, when `stop` fires.
pub(super) async fn pump_out(
    fifo: &mut (dyn AsyncWrite + Send + Unpin),
    mut out: impl Outgoing,
    incoming: impl Incoming,
    st: &mut OutState,
    stop: &mut oneshot::Receiver<()>,
) -> End {
    let credit = Credit::default();
    // Held + grantable never exceeds one window.
    let first = WINDOW.saturating_sub(i32::try_from(st.pending.len()).unwrap_or(WINDOW));
    credit.grant(first);
    let mut to_grant = first.max(0);
    let mut unreported: usize = 0;
    let mut incoming = Some(incoming);
    loop {
        if to_grant > 0 {
            let Some(msg) = grant_msg(to_grant) else {
                return End::Finished;
            };
            tokio::select! {
                biased;
                _ = &mut *stop => return End::Stopped,
                // A stream that is gone ends through `incoming`.
                _ = out.send(msg) => {}
            }
            to_grant = 0;
        }
        if incoming.is_none() && st.pending.is_empty() {
            let _ = fifo.flush().await;
            return End::Finished;
        }
        let writing = !st.pending.is_empty();
        tokio::select! {
            biased;
            _ = &mut *stop => return End::Stopped,
            msg = next_of(&mut incoming), if incoming.is_some() => match msg {
                None => incoming = None,
                Some(any) => {
                    if let Some(data) = data_of(&any) {
                        if credit.take(data.len()) {
                            st.pending.extend_from_slice(&data);
                        } else {
                            overrun("container");
                            // Dropping the stream ends it.
                            incoming = None;
                        }
                    }
                }
            },
            r = fifo.write(&st.pending), if writing => {
                // A reader that went away: drop the bytes so the process does not block.
                let n = match r {
                    Ok(n) if n > 0 => n.min(st.pending.len()),
                    _ => st.pending.len(),
                };
                st.pending.drain(..n);
                st.written = st.written.saturating_add(len64(n));
                unreported = unreported.saturating_add(n);
                if unreported >= WINDOW_BYTES / 2 {
                    let g = i32::try_from(unreported).unwrap_or(WINDOW);
                    credit.grant(g);
                    to_grant = g;
                    unreported = unreported.saturating_sub(usize::try_from(g).unwrap_or(0));
                }
            }
        }
    }
}

/// The stdin copy's counters: `unconfirmed` holds offsets `[read - len, read)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct InState {
    /// Bytes read from the FIFO or file.
    pub(super) read: u64,
    /// Read and not confirmed by the agent.
    pub(super) unconfirmed: VecDeque<u8>,
    /// The FIFO or file reached its end.
    pub(super) eof: bool,
}

impl InState {
    fn start(&self) -> u64 {
        self.read.saturating_sub(len64(self.unconfirmed.len()))
    }

    /// Drops what the agent confirmed, up to `offset` (never what was not read).
    fn confirm(&mut self, offset: u64) {
        let n = usize::try_from(offset.saturating_sub(self.start()))
            .unwrap_or(usize::MAX)
            .min(self.unconfirmed.len());
        self.unconfirmed.drain(..n);
    }
}

/// FIFO -> agent: sends `Data` within the windows the agent grants, from offset `base` (where
/// the agent is: 0, or its `StreamResumed`); keeps what the agent has not confirmed in `st`.
/// At end of file closes the sending side and holds the stream until the agent ends it.
pub(super) async fn copy_in(
    fifo: &mut (dyn AsyncRead + Send + Unpin),
    mut out: impl Outgoing,
    mut incoming: impl Incoming,
    st: &mut InState,
    base: u64,
    stop: &mut oneshot::Receiver<()>,
) -> End {
    st.confirm(base);
    let mut sent = base.max(st.start());
    let mut granted: i64 = 0;
    let mut window: i64 = 0;
    let mut closed = false;
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        if sent < st.read && window > 0 {
            // What was read and not sent yet (after a resume), within the window.
            let skip = usize::try_from(sent.saturating_sub(st.start())).unwrap_or(usize::MAX);
            let max = usize::try_from(window).map_or(MAX_DATA, |w| w.min(MAX_DATA));
            let chunk: Vec<u8> = st
                .unconfirmed
                .iter()
                .skip(skip)
                .take(max)
                .copied()
                .collect();
            let n = chunk.len();
            let mut data = Data::new();
            data.data = chunk;
            let Ok(msg) = pack(DATA_TYPE, &data) else {
                return End::Finished;
            };
            tokio::select! {
                biased;
                _ = &mut *stop => return End::Stopped,
                ok = out.send(msg) => if !ok {
                    return End::Finished;
                }
            }
            sent = sent.saturating_add(len64(n));
            window = window.saturating_sub(i64::try_from(n).unwrap_or(i64::MAX));
            continue;
        }
        if st.eof && sent >= st.read && !closed {
            tokio::select! {
                biased;
                _ = &mut *stop => return End::Stopped,
                _ = out.close() => {}
            }
            closed = true;
        }
        let cap =
            usize::try_from(window.clamp(0, i64::try_from(MAX_DATA).unwrap_or(0))).unwrap_or(0);
        let reading = cap > 0 && !st.eof && sent >= st.read;
        tokio::select! {
            biased;
            _ = &mut *stop => return End::Stopped,
            msg = incoming.next() => match msg {
                Some(any) if type_name(&any.type_url) == WINDOW_UPDATE_TYPE => {
                    if let Ok(w) = WindowUpdate::parse_from_bytes(&any.value) {
                        let w = i64::from(w.update.max(0));
                        window = window.saturating_add(w);
                        granted = granted.saturating_add(w);
                        // Beyond the first window, grants confirm bytes written.
                        let confirmed = u64::try_from(granted.saturating_sub(i64::from(WINDOW)))
                            .unwrap_or(0);
                        st.confirm(base.saturating_add(confirmed).min(sent));
                    }
                }
                Some(_) => {}
                // The agent ended the stream (the process is gone).
                None => return End::Finished,
            },
            n = fifo.read(buf.get_mut(..cap).unwrap_or_default()), if reading => match n {
                Ok(n) if n > 0 => {
                    st.unconfirmed.extend(buf.get(..n).unwrap_or_default());
                    st.read = st.read.saturating_add(len64(n));
                }
                _ => st.eof = true,
            },
        }
    }
}

/// One bridge: its copy task and what stops it.
#[derive(Debug)]
struct Bridge {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Option<(BridgeState, OwnedFd)>>,
}

/// Copy tasks of one process's FIFO stdio; dropping it stops them (use
/// [`Bridges::hand_over`] to pass them on instead).
#[derive(Debug, Default)]
pub struct Bridges(Vec<Bridge>);

impl Drop for Bridges {
    fn drop(&mut self) {
        for b in &self.0 {
            b.task.abort();
        }
    }
}

impl Bridges {
    /// Whether every copy has ended.
    pub fn finished(&self) -> bool {
        self.0.iter().all(|b| b.task.is_finished())
    }

    /// Starts an output copy of stream `id` into `fifo`.
    pub(super) fn spawn_out(
        &mut self,
        id: String,
        fifo: Box<dyn Sink>,
        tx: CSSender<Any>,
        rx: CSReceiver<Any>,
        st: OutState,
    ) {
        let (stop_tx, mut stop) = oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut fifo, mut st) = (fifo, st);
            if pump_out(&mut *fifo, tx, rx, &mut st, &mut stop).await == End::Finished {
                return None;
            }
            let fd = fifo
                .into_fd()
                .await
                .map_err(|e| tracing::warn!("stdio bridge {id}: cannot hand over: {e}"))
                .ok()?;
            let state = BridgeState {
                id,
                direction: Direction::Output,
                offset: st.written.saturating_add(len64(st.pending.len())),
                written: st.written,
                pending: st.pending,
                unconfirmed: Vec::new(),
                eof: false,
            };
            Some((state, fd))
        });
        self.0.push(Bridge {
            stop: Some(stop_tx),
            task,
        });
    }

    /// Starts a stdin copy of stream `id` from `fifo`, the agent being at `base`.
    pub(super) fn spawn_in(
        &mut self,
        id: String,
        fifo: Box<dyn Source>,
        tx: CSSender<Any>,
        rx: CSReceiver<Any>,
        st: InState,
        base: u64,
    ) {
        let (stop_tx, mut stop) = oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut fifo, mut st) = (fifo, st);
            if copy_in(&mut *fifo, tx, rx, &mut st, base, &mut stop).await == End::Finished {
                return None;
            }
            let fd = fifo
                .into_fd(st.read)
                .await
                .map_err(|e| tracing::warn!("stdio bridge {id}: cannot hand over: {e}"))
                .ok()?;
            let state = BridgeState {
                id,
                direction: Direction::Stdin,
                offset: st.read,
                written: 0,
                pending: Vec::new(),
                unconfirmed: st.unconfirmed.into(),
                eof: st.eof,
            };
            Some((state, fd))
        });
        self.0.push(Bridge {
            stop: Some(stop_tx),
            task,
        });
    }

    /// Stops every copy where its counters are exact and returns each one's state and FIFO or
    /// file descriptor, for [`resume`] in another process. Copies that had ended (their
    /// process is gone) are left out, and so is a copy whose descriptor cannot be taken back
    /// (logged). After it returns nothing here writes to a FIFO or uses an agent stream.
    pub async fn hand_over(mut self) -> Vec<(BridgeState, OwnedFd)> {
        let mut bridges = std::mem::take(&mut self.0);
        // All stop at once; then each is collected.
        for b in &mut bridges {
            if let Some(stop) = b.stop.take() {
                let _ = stop.send(());
            }
        }
        let mut states = Vec::new();
        for b in bridges {
            match b.task.await {
                Ok(Some(s)) => states.push(s),
                Ok(None) => {}
                Err(e) => tracing::warn!("stdio bridge failed before its hand-over: {e}"),
            }
        }
        states
    }
}

fn is_fifo(fd: &OwnedFd) -> std::io::Result<bool> {
    use std::os::unix::fs::FileTypeExt as _;
    let file = std::fs::File::from(fd.try_clone()?);
    Ok(file.metadata()?.file_type().is_fifo())
}

/// Goes on with one handed-over bridge.
async fn resume_one(
    bridges: &mut Bridges,
    client: ttrpc::asynchronous::Client,
    state: BridgeState,
    fd: OwnedFd,
) -> Result<(), TaskError> {
    let io = |e: std::io::Error| TaskError::invalid(format!("stream {}", state.id), e.to_string());
    let fifo = is_fifo(&fd).map_err(io)?;
    match state.direction {
        Direction::Output => {
            let (tx, rx, from) = reopen(client, &state.id, state.offset).await?;
            if from < state.offset {
                return Err(TaskError::invalid(
                    format!("stream {}", state.id),
                    format!("the agent resumes at {from}, before {}", state.offset),
                ));
            }
            if from > state.offset {
                tracing::warn!(
                    "stdio bridge {}: {} bytes of output were lost in the hand-over",
                    state.id,
                    from - state.offset
                );
            }
            let sink: Box<dyn Sink> = if fifo {
                Box::new(pipe::Sender::from_owned_fd(fd).map_err(io)?)
            } else {
                Box::new(tokio::fs::File::from_std(std::fs::File::from(fd)))
            };
            let st = OutState {
                written: state.written,
                pending: state.pending,
            };
            bridges.spawn_out(state.id, sink, tx, rx, st);
        }
        Direction::Stdin => {
            let (tx, rx, written) = reopen(client, &state.id, 0).await?;
            let st = InState {
                read: state.offset,
                unconfirmed: state.unconfirmed.into(),
                eof: state.eof,
            };
            if written < st.start() || written > st.read {
                return Err(TaskError::invalid(
                    format!("stream {}", state.id),
                    format!(
                        "the agent wrote {written} bytes; bytes {}..{} can be sent",
                        st.start(),
                        st.read
                    ),
                ));
            }
            let source: Box<dyn Source> = if fifo {
                Box::new(pipe::Receiver::from_owned_fd(fd).map_err(io)?)
            } else {
                Box::new(tokio::fs::File::from_std(std::fs::File::from(fd)))
            };
            bridges.spawn_in(state.id, source, tx, rx, st, written);
        }
    }
    Ok(())
}

/// Goes on, in this process, with bridges another process handed over
/// ([`Bridges::hand_over`]): reopens each agent stream with a `StreamResume` and copies on
/// under the same windows. Fails only without an agent connection; a bridge that cannot be
/// resumed (its stream ended in the meantime, the agent refused) is logged and dropped, and
/// its descriptor closed.
pub async fn resume(
    target: &dyn TaskTarget,
    states: Vec<(BridgeState, OwnedFd)>,
) -> Result<Bridges, TaskError> {
    let client = target.agent().map_err(TaskError::NoAgent)?;
    let mut bridges = Bridges::default();
    for (state, fd) in states {
        let id = state.id.clone();
        match resume_one(&mut bridges, client.clone(), state, fd).await {
            Ok(()) => tracing::info!("stdio bridge {id} resumed"),
            Err(TaskError::Agent(s)) if s.code() == ttrpc::Code::NOT_FOUND => {
                tracing::info!("stdio bridge {id}: its stream has ended");
            }
            Err(e) => tracing::warn!("stdio bridge {id} cannot be resumed: {}", e.chain()),
        }
    }
    Ok(bridges)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;

    #[async_trait]
    impl Incoming for mpsc::Receiver<Any> {
        async fn next(&mut self) -> Option<Any> {
            self.recv().await
        }
    }

    const CLOSE: &str = "test.Close";

    #[async_trait]
    impl Outgoing for mpsc::UnboundedSender<Any> {
        async fn send(&mut self, msg: Any) -> bool {
            mpsc::UnboundedSender::send(self, msg).is_ok()
        }
        async fn close(&mut self) -> bool {
            let mut m = Any::new();
            m.type_url = CLOSE.into();
            mpsc::UnboundedSender::send(self, m).is_ok()
        }
    }

    fn data(bytes: &[u8]) -> Any {
        let mut d = Data::new();
        d.data = bytes.to_vec();
        pack(DATA_TYPE, &d).unwrap()
    }

    fn grant_of(any: &Any) -> Option<i64> {
        (type_name(&any.type_url) == WINDOW_UPDATE_TYPE)
            .then(|| i64::from(WindowUpdate::parse_from_bytes(&any.value).unwrap().update))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 253).unwrap()).collect()
    }

    /// An agent sending `log[from..]` on stdout within the grants it gets, in chunks of
    /// varying size; returns when all is sent or the host has dropped the stream.
    async fn agent_out(
        log: Arc<Vec<u8>>,
        from: usize,
        tx: mpsc::Sender<Any>,
        mut grants: mpsc::UnboundedReceiver<Any>,
    ) {
        let mut window: i64 = 0;
        let mut at = from;
        let mut n = 1000;
        while at < log.len() {
            while window <= 0 {
                match grants.recv().await {
                    Some(g) => window += grant_of(&g).unwrap_or(0),
                    None => return,
                }
            }
            n = (n * 7 + 13) % MAX_DATA + 1;
            let len = n.min(log.len() - at).min(usize::try_from(window).unwrap());
            if tx.send(data(&log[at..at + len])).await.is_err() {
                return;
            }
            at += len;
            window -= i64::try_from(len).unwrap();
        }
    }

    use std::sync::Arc;

    /// Reads the pipe slowly until end of file.
    fn slow_reader(mut r: pipe::Receiver) -> JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 3000];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    }

    #[tokio::test]
    async fn output_handed_over_at_any_point_loses_and_repeats_nothing() {
        let log = Arc::new(pattern(400_000));
        for stop_after_us in [0u64, 300, 1_000, 3_000, 7_000, 15_000] {
            let (w, r) = pipe::pipe().unwrap();
            let reader = slow_reader(r);
            let mut fifo: Box<dyn Sink> = Box::new(w);
            let mut st = OutState::default();
            // Before the hand-over.
            let (agent_tx, incoming) = mpsc::channel(4);
            let (out, grants) = mpsc::unbounded_channel();
            let agent = tokio::spawn(agent_out(Arc::clone(&log), 0, agent_tx, grants));
            let (stop_tx, mut stop) = oneshot::channel();
            let stopper = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(stop_after_us)).await;
                stop_tx.send(()).unwrap();
            });
            let end = pump_out(&mut *fifo, out, incoming, &mut st, &mut stop).await;
            assert_eq!(end, End::Stopped);
            stopper.await.unwrap();
            // The connection dies with whatever was in flight.
            agent.abort();
            assert!(st.pending.len() <= WINDOW_BYTES);
            let offset = st.written + len64(st.pending.len());
            // After it: the agent sends again from the host's offset.
            let (agent_tx, incoming) = mpsc::channel(4);
            let (out, grants) = mpsc::unbounded_channel();
            let from = usize::try_from(offset).unwrap();
            let agent = tokio::spawn(agent_out(Arc::clone(&log), from, agent_tx, grants));
            let (_keep, mut stop) = oneshot::channel::<()>();
            let end = pump_out(&mut *fifo, out, incoming, &mut st, &mut stop).await;
            assert_eq!(end, End::Finished);
            agent.await.unwrap();
            assert_eq!(st.written, 400_000);
            drop(fifo);
            let got = reader.await.unwrap();
            assert!(
                got == *log,
                "stopped after {stop_after_us} us: {} bytes",
                got.len()
            );
        }
    }

    #[tokio::test]
    async fn credit_is_enforced_after_a_hand_over() {
        // Handed over with 40 KiB pending: the agent may send only the rest of a window.
        let mut st = OutState {
            written: 1000,
            pending: vec![1u8; 40 * 1024],
        };
        let (agent, incoming) = mpsc::channel(1);
        let (out, mut grants) = mpsc::unbounded_channel();
        // Nobody reads the FIFO.
        let (mut fifo, _reader) = tokio::io::duplex(1024);
        let pump = tokio::spawn(async move {
            let (_keep, mut stop) = oneshot::channel::<()>();
            pump_out(&mut fifo, out, incoming, &mut st, &mut stop).await;
        });
        let first = grant_of(&grants.recv().await.unwrap()).unwrap();
        assert_eq!(first, i64::from(WINDOW) - 40 * 1024);
        let mut sent = 0;
        while agent.send(data(&[2u8; 8 * 1024])).await.is_ok() {
            sent += 8 * 1024;
            assert!(sent <= 10 * WINDOW_BYTES, "never cut off");
        }
        // Cut off at the first byte past the rest of the window.
        assert_eq!(sent, 24 * 1024 + 8 * 1024);
        assert!(agent.is_closed());
        pump.abort();
    }

    #[tokio::test]
    async fn output_within_the_windows_reaches_the_fifo() {
        let log = Arc::new(pattern(300_000));
        let (w, r) = pipe::pipe().unwrap();
        let reader = slow_reader(r);
        let (agent_tx, incoming) = mpsc::channel(64);
        let (out, grants) = mpsc::unbounded_channel();
        let agent = tokio::spawn(agent_out(Arc::clone(&log), 0, agent_tx, grants));
        let mut fifo = w;
        let mut st = OutState::default();
        let (_keep, mut stop) = oneshot::channel::<()>();
        let end = pump_out(&mut fifo, out, incoming, &mut st, &mut stop).await;
        assert_eq!(end, End::Finished);
        agent.await.unwrap();
        drop(fifo);
        assert!(reader.await.unwrap() == *log);
    }

    /// An agent copying stdin into `process`, granting as the agent does (a window, then what
    /// it wrote once that is half a window); `written` counts what reached the process.
    async fn agent_in(
        process: Arc<std::sync::Mutex<Vec<u8>>>,
        out: mpsc::Sender<Any>,
        mut incoming: mpsc::UnboundedReceiver<Any>,
    ) -> bool {
        let grant = |n: i32| grant_msg(n).unwrap();
        if out.send(grant(WINDOW)).await.is_err() {
            return false;
        }
        let mut unreported = 0usize;
        while let Some(msg) = incoming.recv().await {
            if msg.type_url == CLOSE {
                return true;
            }
            let d = Data::parse_from_bytes(&msg.value).unwrap().data;
            // A process that reads in small bites.
            for c in d.chunks(5000) {
                process.lock().unwrap().extend_from_slice(c);
                unreported += c.len();
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            if unreported >= WINDOW_BYTES / 2 {
                let g = i32::try_from(unreported).unwrap();
                if out.send(grant(g)).await.is_err() {
                    return false;
                }
                unreported = 0;
            }
        }
        false
    }

    #[tokio::test]
    async fn stdin_handed_over_at_any_point_loses_and_repeats_nothing() {
        let input = pattern(500_000);
        for stop_after_us in [0u64, 200, 1_000, 4_000, 9_000] {
            let (mut w, r) = pipe::pipe().unwrap();
            let feed = input.clone();
            let writer = tokio::spawn(async move {
                for c in feed.chunks(7000) {
                    w.write_all(c).await.unwrap();
                }
            });
            let mut fifo: Box<dyn Source> = Box::new(r);
            let process = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut st = InState::default();
            let (agent_tx, incoming) = mpsc::channel(4);
            let (out, agent_rx) = mpsc::unbounded_channel();
            let agent = tokio::spawn(agent_in(Arc::clone(&process), agent_tx, agent_rx));
            let (stop_tx, mut stop) = oneshot::channel();
            let stopper = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(stop_after_us)).await;
                stop_tx.send(()).unwrap();
            });
            let end = copy_in(&mut *fifo, out, incoming, &mut st, 0, &mut stop).await;
            assert_eq!(end, End::Stopped);
            stopper.await.unwrap();
            // The connection dies: the agent keeps what it wrote, the rest in flight is gone.
            agent.abort();
            let _ = agent.await;
            assert!(
                st.unconfirmed.len() <= WINDOW_BYTES,
                "{}",
                st.unconfirmed.len()
            );
            let written = len64(process.lock().unwrap().len());
            assert!(
                (st.start()..=st.read).contains(&written),
                "{written} not in {}..{}",
                st.start(),
                st.read
            );
            let (agent_tx, incoming) = mpsc::channel(4);
            let (out, agent_rx) = mpsc::unbounded_channel();
            let agent = tokio::spawn(agent_in(Arc::clone(&process), agent_tx, agent_rx));
            let (_keep, mut stop) = oneshot::channel::<()>();
            let copy = copy_in(&mut *fifo, out, incoming, &mut st, written, &mut stop);
            // The agent ends the stream once it has the end of input.
            let (end, closed) = tokio::join!(copy, async { agent.await.unwrap() });
            assert!(closed);
            assert_eq!(end, End::Finished);
            writer.await.unwrap();
            let got = process.lock().unwrap().clone();
            assert!(
                got == input,
                "stopped after {stop_after_us} us: {} bytes",
                got.len()
            );
        }
    }
}
