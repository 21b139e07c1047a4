// SPDX-License-Identifier: Apache-2.0
//! The engine's stdio streams (`io_type = "streaming"`: containerd opens
//! `Streaming.Stream` on the task socket), proxied to the agent ([`StreamProxy`]), and handed
//! to another process in a live upgrade without losing or repeating a byte.
//!
//! The proxy opens an agent stream for each engine stream and forwards the engine's
//! `StreamInit`, `Data` and the end of its side, and the agent's answer to the init, its
//! `Data` and its grants. It keeps counters that make the stream's position exact at any
//! message boundary, in offsets since the stream began ([`ProxyState`]):
//!
//! - Output (the agent sends `Data`, the engine grants): the proxy grants the agent itself,
//!   never more than the engine granted and never more than one [`WINDOW`] beyond what the
//!   engine was given (containerd grants up to two windows ahead; the agent retains one). So
//!   a new process resumes the agent stream at the bytes the engine has, and the agent,
//!   which keeps the last window it sent, sends again what the old process had not passed on.
//! - Stdin (the engine sends `Data`, the agent grants): the proxy keeps the bytes the agent
//!   has not confirmed (beyond a connection's first window the agent grants exactly the
//!   bytes it wrote, see `proto::stream`); a new process sends again from where the agent's
//!   `StreamResumed` says it is. The agent's grants reach the engine as the difference
//!   between what the agent allows and what the engine was granted, so that the fresh window
//!   of a resumed agent connection neither repeats nor loses a grant for the engine. An
//!   engine that sends beyond what it was granted has the stream ended with an error, so the
//!   bytes kept stay within a window.
//!
//! A cut ([`Proxies::freeze`]) happens after the task connection stopped at frame boundaries
//! (`task::conn`): what the proxy sends to the engine is then either written (the tracker
//! counted the frame) or not written before a thaw; the proxy holds back everything for
//! the agent (a gate, opened again by [`Proxies::thaw`]), waits until it was given every
//! message the tracker read from the engine, and takes down its state under a random token.
//! The new process replays the stream's request with that token in its metadata
//! ([`RESUME_TOKEN_KEY`]); its proxy finds the state by the token ([`Proxies::expect`]),
//! resumes the agent stream (`StreamResume`) and goes on; the engine gets no second answer
//! to its `StreamInit` and sees the same stream go on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use devices::sync::Recover;
use proto::agent::stream_data::{Data, WindowUpdate};
use proto::agent::stream_resume::{StreamResume, StreamResumed};
use proto::agent::streaming::StreamInit;
use proto::agent::streaming_ttrpc::{Streaming, StreamingClient};
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use proto::stream::{MAX_DATA, STREAM_RESUME_TYPE, STREAM_RESUMED_TYPE, WINDOW, WINDOW_BYTES};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use ttrpc::asynchronous::{CSReceiver, CSSender, SSSender, ServerStream, TtrpcContext};

use super::{
    DATA_TYPE, STREAM_INIT_TYPE, WINDOW_UPDATE_TYPE, data_of, is_blank, overrun, pack, type_name,
};
use crate::backend::TaskTarget;
use crate::task::error::TaskError;

/// Metadata key of a stdio stream request replayed to a new process: the token its handed-over
/// state is filed under there (see the module doc).
pub const RESUME_TOKEN_KEY: &str = "sandboxer-stream-resume";

/// What names a stdio stream for its proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamKey {
    /// The stream id of the client's `StreamInit`.
    Init(String),
    /// The handover token of a replayed request ([`RESUME_TOKEN_KEY`]).
    Token(String),
}

/// How long a resumed stream asks the agent again while the agent does not know it (a stream
/// the engine opened whose `Create` the agent had not taken yet).
const RESUME_RETRY: Duration = Duration::from_secs(10);

/// How long an ended stream's counters are kept for a cut (its end may not have been written
/// to the engine yet).
const ENDED_KEPT: Duration = Duration::from_secs(60);

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Where a proxied stream stood when it was cut: what a new process goes on from. Offsets
/// count bytes since the stream began, across processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyState {
    /// What the stream's replayed request carries to find this state (random, made by the
    /// cut; never taken from a client).
    pub token: String,
    /// The agent stream id (the engine's `StreamInit.id`).
    pub id: String,
    /// Bytes of the agent's `Data` delivered to the engine.
    pub delivered: u64,
    /// Bytes the engine granted (its `WindowUpdate`s).
    pub engine_granted: u64,
    /// Bytes granted to the engine (the agent's grants passed on).
    pub agent_granted: u64,
    /// Bytes of `Data` the engine sent.
    pub engine_sent: u64,
    /// The last of them, which the agent has not confirmed writing: they end at
    /// `engine_sent`.
    #[serde(with = "crate::bytes")]
    pub unconfirmed: Vec<u8>,
    /// The engine closed its side.
    pub closed: bool,
    /// The agent had ended the stream.
    pub ended: bool,
}

/// A message for the engine on its way: what it counts for once written.
#[derive(Debug, Clone, Copy, Default)]
struct Down {
    data: u64,
    grant: u64,
}

/// For the agent, in order.
#[derive(Debug)]
enum Up {
    Msg(Any),
    Close,
}

/// A stream's counters ([`ProxyState`] and what this process's connections add).
#[derive(Debug, Default)]
struct Counters {
    st: ProxyState,
    /// Messages taken from the engine (blank ones and the end of its side too), compared
    /// with what the connection tracker read.
    from_engine: u64,
    /// Messages to the engine whose write completed.
    acked: u64,
    /// The message to the engine being written.
    in_flight: Option<Down>,
    /// The stream offset up to which the agent may send `Data`.
    agent_limit: u64,
    /// The stream offset of the agent's `Data` received.
    agent_sent: u64,
    /// The bytes the agent had written when its current connection began.
    in_base: u64,
    /// Bytes the agent granted on its current connection.
    agent_granted_conn: u64,
}

impl Counters {
    /// A grant for the agent, if its output may go further: up to what the engine granted,
    /// at most one window beyond what the engine was given.
    fn agent_grant(&mut self) -> Option<Up> {
        let target = self
            .st
            .engine_granted
            .min(self.st.delivered.saturating_add(len64(WINDOW_BYTES)));
        let more = target.checked_sub(self.agent_limit).filter(|&m| m > 0)?;
        let more = i32::try_from(more).unwrap_or(i32::MAX);
        self.agent_limit = self
            .agent_limit
            .saturating_add(u64::from(more.unsigned_abs()));
        let mut w = WindowUpdate::new();
        w.update = more;
        pack(WINDOW_UPDATE_TYPE, &w).ok().map(Up::Msg)
    }

    /// The stream offset up to which the engine may have sent stdin: every grant passed on,
    /// the one being written included (the engine may read it before the write returns).
    fn engine_allowed(&self) -> u64 {
        let writing = self.in_flight.map_or(0, |d| d.grant);
        self.st.agent_granted.saturating_add(writing)
    }

    /// A grant from the agent: drops the stdin bytes it confirms and returns what the engine
    /// is to be granted now.
    fn agent_granted(&mut self, bytes: i32) -> Option<Any> {
        self.agent_granted_conn = self
            .agent_granted_conn
            .saturating_add(u64::from(bytes.max(0).unsigned_abs()));
        let confirmed = self.in_base.saturating_add(
            self.agent_granted_conn
                .saturating_sub(u64::from(WINDOW.unsigned_abs())),
        );
        let start = self
            .st
            .engine_sent
            .saturating_sub(len64(self.st.unconfirmed.len()));
        let drop = usize::try_from(confirmed.saturating_sub(start))
            .unwrap_or(usize::MAX)
            .min(self.st.unconfirmed.len());
        self.st.unconfirmed.drain(..drop);
        let allowed = self.in_base.saturating_add(self.agent_granted_conn);
        let more = allowed
            .checked_sub(self.st.agent_granted)
            .filter(|&m| m > 0)?;
        let mut w = WindowUpdate::new();
        w.update = i32::try_from(more).unwrap_or(i32::MAX);
        pack(WINDOW_UPDATE_TYPE, &w).ok()
    }

    /// The state to hand over, `written` being the `DATA` frames the tracker saw written.
    fn snapshot(&self, written: u64) -> ProxyState {
        let mut st = self.st.clone();
        if written > self.acked
            && let Some(d) = self.in_flight
        {
            st.delivered = st.delivered.saturating_add(d.data);
            st.agent_granted = st.agent_granted.saturating_add(d.grant);
        }
        st
    }
}

/// One proxied stream, as a cut sees it.
#[derive(Debug)]
struct Live {
    counters: Mutex<Counters>,
    /// The engine gave a message.
    taken: Notify,
    /// Whether messages may go to the agent (closed by a cut until a thaw).
    gate: watch::Sender<bool>,
    /// The token it was resumed with, if it was.
    token: Option<String>,
    /// When its handler ended.
    ended_at: Mutex<Option<Instant>>,
}

impl Live {
    fn new(st: ProxyState) -> Arc<Self> {
        let token = (!st.token.is_empty()).then(|| st.token.clone());
        Arc::new(Self {
            counters: Mutex::new(Counters {
                st,
                ..Counters::default()
            }),
            taken: Notify::new(),
            gate: watch::channel(true).0,
            token,
            ended_at: Mutex::new(None),
        })
    }

    fn push(&self, up: &mpsc::UnboundedSender<Up>, msg: Option<Up>) {
        if let Some(m) = msg {
            // The writer lives as long as the handler that pushes.
            let _ = up.send(m);
        }
    }
}

/// A freshly made handover token: 128 random bits, hex.
fn new_token() -> Result<String, TaskError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| TaskError::Handover(format!("no entropy for a stream token: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The proxied streams of one Task endpoint, and the states handed to it.
#[derive(Debug, Default)]
pub struct Proxies {
    /// By agent stream id.
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Handed-over states by token, until their replayed request comes.
    expected: Mutex<HashMap<String, ProxyState>>,
    /// Streams a cut froze, for a thaw.
    frozen: Mutex<Vec<Arc<Live>>>,
}

impl Proxies {
    fn register(&self, id: &str, live: &Arc<Live>) {
        let mut all = self.live.lock().recover();
        all.retain(|_, l| {
            l.ended_at
                .lock()
                .recover()
                .is_none_or(|t| t.elapsed() < ENDED_KEPT)
        });
        all.insert(id.to_owned(), Arc::clone(live));
    }

    fn find(&self, key: &StreamKey) -> Option<Arc<Live>> {
        let all = self.live.lock().recover();
        match key {
            StreamKey::Init(id) => all.get(id).cloned(),
            StreamKey::Token(t) => all.values().find(|l| l.token.as_ref() == Some(t)).cloned(),
        }
    }

    /// States handed over by a cut, for the replayed requests that carry their tokens.
    pub fn expect(&self, states: Vec<ProxyState>) {
        let mut expected = self.expected.lock().recover();
        for s in states {
            expected.insert(s.token.clone(), s);
        }
    }

    /// Stops the stream `key` at a message boundary, once its handler was given the `read`
    /// messages the connection read, and returns its state under a new token; `written`:
    /// the `DATA` frames the connection wrote to the engine. Waits until `deadline`. Nothing
    /// goes to the agent any more until [`Proxies::thaw`].
    pub async fn freeze(
        &self,
        key: &StreamKey,
        read: u64,
        written: u64,
        deadline: Instant,
    ) -> Result<ProxyState, TaskError> {
        let name = match key {
            StreamKey::Init(id) => id.clone(),
            StreamKey::Token(_) => "a resumed stream".to_owned(),
        };
        let live = self.find(key).ok_or_else(|| {
            TaskError::Handover(format!("stdio stream {name:?} has no proxy here"))
        })?;
        live.gate.send_replace(false);
        self.frozen.lock().recover().push(Arc::clone(&live));
        loop {
            let taken = live.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            {
                let c = live.counters.lock().recover();
                let ended = live.ended_at.lock().recover().is_some();
                if c.from_engine >= read || ended {
                    let mut st = c.snapshot(written);
                    st.token = new_token()?;
                    return Ok(st);
                }
            }
            if tokio::time::timeout_at(deadline.into(), taken)
                .await
                .is_err()
            {
                return Err(TaskError::Handover(format!(
                    "stdio stream {name:?} did not take what the engine sent in time"
                )));
            }
        }
    }

    /// Lets every stream a cut froze go on.
    pub fn thaw(&self) {
        for l in std::mem::take(&mut *self.frozen.lock().recover()) {
            l.gate.send_replace(true);
        }
    }
}

/// Forwards the engine's streams to the agent (grants translated, see the module doc) and
/// resumes the streams a handover passed on.
#[derive(Debug)]
pub(crate) struct StreamProxy {
    target: Arc<dyn TaskTarget>,
    proxies: Arc<Proxies>,
}

impl StreamProxy {
    pub(crate) fn new(target: Arc<dyn TaskTarget>, proxies: Arc<Proxies>) -> Self {
        Self { target, proxies }
    }
}

fn agent_err(e: ttrpc::Error) -> ttrpc::Error {
    TaskError::from_agent("Stream", e).into()
}

/// Sends the agent what is pushed for it, in order, while the gate is open.
async fn to_agent(
    up_tx: CSSender<Any>,
    mut queue: mpsc::UnboundedReceiver<Up>,
    mut gate: watch::Receiver<bool>,
) {
    while let Some(m) = queue.recv().await {
        if gate.wait_for(|open| *open).await.is_err() {
            break;
        }
        let sent = match m {
            Up::Msg(any) => up_tx.send(&any).await,
            Up::Close => up_tx.close_send().await,
        };
        if sent.is_err() {
            break;
        }
    }
    // The other direction decides when the stream ends.
    std::future::pending::<()>().await;
}

/// Takes the engine's messages: counts them and pushes what the agent is to get. Stdin beyond
/// what the engine was granted ends the stream: the proxy keeps every stdin byte the agent has
/// not confirmed, and only the window bounds them (containerd's sender waits for grants).
async fn from_engine(
    live: &Arc<Live>,
    proxies: &Proxies,
    mut down_rx: ttrpc::asynchronous::SSReceiver<Any>,
    up: mpsc::UnboundedSender<Up>,
) -> ttrpc::Result<()> {
    loop {
        let msg = down_rx.recv().await;
        let mut c = live.counters.lock().recover();
        c.from_engine = c.from_engine.saturating_add(1);
        let push = match msg {
            Ok(Some(m)) if is_blank(&m) => None,
            Ok(Some(m)) => match type_name(&m.type_url) {
                WINDOW_UPDATE_TYPE => {
                    if let Ok(w) = WindowUpdate::parse_from_bytes(&m.value) {
                        c.st.engine_granted =
                            c.st.engine_granted
                                .saturating_add(u64::from(w.update.max(0).unsigned_abs()));
                    }
                    c.agent_grant()
                }
                DATA_TYPE => {
                    if let Some(d) = data_of(&m) {
                        let sent = c.st.engine_sent.saturating_add(len64(d.len()));
                        if sent > c.engine_allowed() {
                            drop(c);
                            live.taken.notify_waiters();
                            tracing::warn!(
                                "the engine sent stdin beyond the window granted: stream ended"
                            );
                            return Err(ttrpc::Error::Others(
                                "stdin beyond the window granted".into(),
                            ));
                        }
                        c.st.engine_sent = sent;
                        c.st.unconfirmed.extend_from_slice(&d);
                    }
                    Some(Up::Msg(m))
                }
                STREAM_INIT_TYPE => {
                    if let Ok(init) = StreamInit::parse_from_bytes(&m.value) {
                        c.st.id.clone_from(&init.id);
                        proxies.register(&init.id, live);
                    }
                    Some(Up::Msg(m))
                }
                _ => Some(Up::Msg(m)),
            },
            // The engine closed its side: so does the agent's.
            Ok(None) | Err(_) => {
                c.st.closed = true;
                live.push(&up, Some(Up::Close));
                drop(c);
                live.taken.notify_waiters();
                break;
            }
        };
        live.push(&up, push);
        drop(c);
        live.taken.notify_waiters();
    }
    // The other direction decides when the stream ends.
    std::future::pending().await
}

/// Passes the agent's messages on to the engine, within the grants, counting what was
/// written.
async fn from_agent(
    live: &Live,
    mut up_rx: CSReceiver<Any>,
    down_tx: SSSender<Any>,
    up: mpsc::UnboundedSender<Up>,
) -> ttrpc::Result<()> {
    loop {
        let msg = match up_rx.recv().await {
            Ok(m) if is_blank(&m) => continue,
            Ok(m) => m,
            Err(e) => {
                live.counters.lock().recover().st.ended = true;
                return match e {
                    ttrpc::Error::RpcStatus(s) => Err(ttrpc::Error::RpcStatus(s)),
                    _ => Ok(()),
                };
            }
        };
        let out = {
            let mut c = live.counters.lock().recover();
            let (out, down) = match type_name(&msg.type_url) {
                DATA_TYPE => {
                    let n = data_of(&msg).map_or(0, |d| len64(d.len()));
                    let sent = c.agent_sent.saturating_add(n);
                    if sent > c.agent_limit {
                        overrun("streamed");
                        return Err(ttrpc::Error::Others(
                            "the agent sent output beyond the window granted".into(),
                        ));
                    }
                    if live.token.is_some() && c.agent_sent == c.in_base && n > 0 {
                        tracing::info!(
                            "stdio stream {}: output flows again from {}",
                            c.st.id,
                            c.agent_sent
                        );
                    }
                    c.agent_sent = sent;
                    (Some(msg), Down { data: n, grant: 0 })
                }
                WINDOW_UPDATE_TYPE => {
                    let w = WindowUpdate::parse_from_bytes(&msg.value).map_or(0, |w| w.update);
                    let out = c.agent_granted(w);
                    let grant = out
                        .as_ref()
                        .and_then(|m| WindowUpdate::parse_from_bytes(&m.value).ok())
                        .map_or(0, |w| u64::from(w.update.max(0).unsigned_abs()));
                    (out, Down { data: 0, grant })
                }
                _ => (Some(msg), Down::default()),
            };
            if out.is_some() {
                c.in_flight = Some(down);
            }
            out
        };
        let Some(out) = out else { continue };
        if down_tx.send(&out).await.is_err() {
            return Ok(());
        }
        let mut c = live.counters.lock().recover();
        c.acked = c.acked.saturating_add(1);
        if let Some(d) = c.in_flight.take() {
            c.st.delivered = c.st.delivered.saturating_add(d.data);
            c.st.agent_granted = c.st.agent_granted.saturating_add(d.grant);
        }
        let grant = c.agent_grant();
        live.push(&up, grant);
    }
}

/// Marks a stream's handler ended when it goes.
struct Ended<'a>(&'a Live);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        *self.0.ended_at.lock().recover() = Some(Instant::now());
    }
}

impl StreamProxy {
    /// Runs one stream between `stream` (the engine) and the agent stream `(up_tx, up_rx)`;
    /// `first`: what the agent is to get before anything else (a resume's resent stdin).
    async fn run(
        &self,
        live: Arc<Live>,
        stream: ServerStream<Any, Any>,
        (up_tx, up_rx): (CSSender<Any>, CSReceiver<Any>),
        first: Vec<Up>,
    ) -> ttrpc::Result<()> {
        let _ended = Ended(&live);
        let (down_tx, down_rx) = stream.split();
        let (up, queue) = mpsc::unbounded_channel();
        for m in first {
            live.push(&up, Some(m));
        }
        tokio::select! {
            () = to_agent(up_tx, queue, live.gate.subscribe()) => Ok(()),
            r = from_engine(&live, &self.proxies, down_rx, up.clone()) => r,
            r = from_agent(&live, up_rx, down_tx, up) => r,
        }
    }

    /// Goes on with a stream a handover passed on: resumes the agent stream where the engine
    /// is, sends again the stdin the agent had not written, and carries on.
    async fn resume(&self, st: ProxyState, stream: ServerStream<Any, Any>) -> ttrpc::Result<()> {
        let agent = self.target.agent().map_err(TaskError::NoAgent)?;
        let started = Instant::now();
        let (tx, rx, from) = loop {
            match reopen(agent.clone(), &st.id, st.delivered).await {
                Ok(r) => break r,
                Err(TaskError::Agent(s))
                    if s.code() == ttrpc::Code::NOT_FOUND
                        && !st.ended
                        && started.elapsed() < RESUME_RETRY =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(TaskError::Agent(s)) if s.code() == ttrpc::Code::NOT_FOUND => {
                    tracing::info!("stdio stream {}: it has ended", st.id);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        };
        let id = st.id.clone();
        let live = Live::new(st);
        let mut first = Vec::new();
        {
            let mut c = live.counters.lock().recover();
            if from > c.st.delivered {
                tracing::warn!(
                    "stdio stream {id}: {} bytes of output were lost in the hand-over",
                    from - c.st.delivered
                );
                c.st.delivered = from;
            }
            (c.agent_sent, c.agent_limit, c.in_base) = (from, from, from);
            let start =
                c.st.engine_sent
                    .saturating_sub(len64(c.st.unconfirmed.len()));
            if from < c.st.engine_sent {
                if from < start {
                    return Err(TaskError::invalid(
                        format!("stream {id}"),
                        format!(
                            "the agent wrote {from} bytes; bytes {start}..{} can be sent",
                            c.st.engine_sent
                        ),
                    )
                    .into());
                }
                let skip = usize::try_from(from - start)
                    .unwrap_or(usize::MAX)
                    .min(c.st.unconfirmed.len());
                c.st.unconfirmed.drain(..skip);
                for chunk in c.st.unconfirmed.chunks(MAX_DATA) {
                    let mut d = Data::new();
                    d.data = chunk.to_vec();
                    first.push(Up::Msg(pack(DATA_TYPE, &d)?));
                }
            } else {
                c.st.unconfirmed.clear();
            }
            if c.st.closed {
                first.push(Up::Close);
            }
            first.extend(c.agent_grant());
        }
        self.proxies.register(&id, &live);
        tracing::info!("stdio stream {id} resumed at {from}");
        self.run(live, stream, (tx, rx), first).await
    }
}

/// Opens the agent stream `id` again with a `StreamResume{id, received}`; returns it and the
/// agent's `StreamResumed.received`.
pub(super) async fn reopen(
    client: ttrpc::asynchronous::Client,
    id: &str,
    received: u64,
) -> Result<(CSSender<Any>, CSReceiver<Any>, u64), TaskError> {
    let s = StreamingClient::new(client)
        .stream(ttrpc::context::Context::default())
        .await
        .map_err(|e| TaskError::from_agent("Stream", e))?;
    let (tx, mut rx) = s.split();
    let mut resume = StreamResume::new();
    resume.id = id.to_owned();
    resume.received = received;
    tx.send(&pack(STREAM_RESUME_TYPE, &resume)?)
        .await
        .map_err(|e| TaskError::from_agent("Stream", e))?;
    let answer = rx
        .recv()
        .await
        .map_err(|e| TaskError::from_agent("Stream", e))?;
    if type_name(&answer.type_url) != STREAM_RESUMED_TYPE {
        return Err(TaskError::invalid(
            format!("stream {id}"),
            format!("the agent answered a resume with a {:?}", answer.type_url),
        ));
    }
    let resumed = StreamResumed::parse_from_bytes(&answer.value)
        .map_err(|e| TaskError::invalid(format!("stream {id}"), e.to_string()))?;
    Ok((tx, rx, resumed.received))
}

#[async_trait]
impl Streaming for StreamProxy {
    async fn stream(
        &self,
        ctx: &TtrpcContext,
        stream: ServerStream<Any, Any>,
    ) -> ttrpc::Result<()> {
        if let Some(token) = ctx.metadata.get(RESUME_TOKEN_KEY).and_then(|v| v.first()) {
            let st = self.proxies.expected.lock().recover().remove(token);
            let Some(st) = st else {
                return Err(TaskError::invalid(
                    RESUME_TOKEN_KEY,
                    "no stream was handed over under this token",
                )
                .into());
            };
            return self.resume(st, stream).await;
        }
        let agent = self.target.agent().map_err(TaskError::NoAgent)?;
        let up = StreamingClient::new(agent)
            .stream(ttrpc::context::Context::default())
            .await
            .map_err(agent_err)?;
        self.run(
            Live::new(ProxyState::default()),
            stream,
            up.split(),
            Vec::new(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant_of(up: Option<Up>) -> i32 {
        match up {
            Some(Up::Msg(m)) => WindowUpdate::parse_from_bytes(&m.value).unwrap().update,
            other => panic!("{other:?}"),
        }
    }

    /// The agent's output is granted what the engine granted, never more than a window
    /// beyond what the engine was given.
    #[test]
    fn output_grants_stay_within_a_window_of_the_engine() {
        let mut c = Counters::default();
        assert!(c.agent_grant().is_none());
        c.st.engine_granted = 2 * 65536;
        assert_eq!(grant_of(c.agent_grant()), WINDOW);
        assert!(c.agent_grant().is_none());
        c.st.delivered = 1000;
        assert_eq!(grant_of(c.agent_grant()), 1000);
        c.st.delivered = 200_000;
        assert_eq!(grant_of(c.agent_grant()), 2 * 65536 - 65536 - 1000);
    }

    /// Stdin grants confirm bytes beyond a connection's first window, and reach the engine as
    /// what the agent allows minus what the engine was granted.
    #[test]
    fn stdin_grants_confirm_and_translate() {
        let mut c = Counters::default();
        c.st.engine_sent = 0;
        assert_eq!(
            WindowUpdate::parse_from_bytes(&c.agent_granted(WINDOW).unwrap().value)
                .unwrap()
                .update,
            WINDOW
        );
        c.st.agent_granted = 65536;
        c.st.engine_sent = 50_000;
        c.st.unconfirmed = vec![1; 50_000];
        let g = c.agent_granted(40_000).unwrap();
        assert_eq!(
            WindowUpdate::parse_from_bytes(&g.value).unwrap().update,
            40_000
        );
        assert_eq!(c.st.unconfirmed.len(), 10_000);
        // A resumed connection: the agent wrote 45,000 and grants a fresh window; the engine
        // was granted 65,536 + 40,000 (the last grant was written): it gets the difference.
        c.st.agent_granted = 105_536;
        (c.in_base, c.agent_granted_conn) = (45_000, 0);
        let g = c.agent_granted(WINDOW).unwrap();
        assert_eq!(
            WindowUpdate::parse_from_bytes(&g.value).unwrap().update,
            45_000 + 65_536 - 105_536
        );
        // A probe grants nothing.
        c.st.agent_granted = 45_000 + 65_536;
        assert!(c.agent_granted(0).is_none());
    }

    /// A cut waits until the handler was given every message the connection read, holds
    /// back what goes to the agent meanwhile and until a thaw, and names the state with a
    /// fresh token each time; an unknown stream fails it.
    #[tokio::test]
    async fn a_freeze_waits_for_what_was_read_and_a_thaw_opens_the_gate() {
        let proxies = Proxies::default();
        let live = Live::new(ProxyState {
            id: "c1-stdout".into(),
            delivered: 500,
            ..ProxyState::default()
        });
        proxies.register("c1-stdout", &live);
        live.counters.lock().unwrap().from_engine = 1;
        let key = StreamKey::Init("c1-stdout".into());
        let soon = || Instant::now() + Duration::from_millis(50);
        let e = proxies.freeze(&key, 2, 0, soon()).await.unwrap_err();
        assert!(e.to_string().contains("did not take"), "{e}");
        assert!(!*live.gate.borrow(), "held back while cut");
        proxies.thaw();
        assert!(*live.gate.borrow());
        let taker = {
            let live = Arc::clone(&live);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                live.counters.lock().unwrap().from_engine = 2;
                live.taken.notify_waiters();
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let a = proxies.freeze(&key, 2, 0, deadline).await.unwrap();
        taker.await.unwrap();
        assert_eq!((a.id.as_str(), a.delivered), ("c1-stdout", 500));
        assert_eq!(a.token.len(), 32);
        let b = proxies.freeze(&key, 2, 0, deadline).await.unwrap();
        assert_ne!(a.token, b.token);
        let unknown = StreamKey::Token("nope".into());
        let e = proxies.freeze(&unknown, 0, 0, deadline).await.unwrap_err();
        assert!(e.to_string().contains("no proxy"), "{e}");
    }

    /// The message being written counts as delivered only if the tracker saw it written.
    #[test]
    fn a_snapshot_counts_the_message_in_flight_only_when_written() {
        let mut c = Counters {
            acked: 4,
            in_flight: Some(Down {
                data: 300,
                grant: 0,
            }),
            ..Counters::default()
        };
        c.st.delivered = 1000;
        assert_eq!(c.snapshot(4).delivered, 1000);
        assert_eq!(c.snapshot(5).delivered, 1300);
    }
}
