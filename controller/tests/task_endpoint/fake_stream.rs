// SPDX-License-Identifier: Apache-2.0
//! An in-process fake of the agent's stdio streams (`Streaming.Stream`), kept to the contract
//! of `stream_resume.proto` and `proto::stream`: a stream registers with `StreamInit` (answered
//! with an `Empty`) or goes on on a new connection with `StreamResume` (answered with
//! `StreamResumed`); output retains the last window it sent; stdin grants a window at the
//! start of each connection and then exactly the bytes it wrote. One [`FakeStreams`] may be
//! served on several sockets: the guest outlives the daemon process that talks to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proto::agent::stream_data::{Data, WindowUpdate};
use proto::agent::stream_resume::{StreamResume, StreamResumed};
use proto::agent::streaming::StreamInit;
use proto::agent::streaming_ttrpc::Streaming;
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use proto::protobuf::well_known_types::empty::Empty;
use proto::stream::{STREAM_RESUME_TYPE, STREAM_RESUMED_TYPE, WINDOW, WINDOW_BYTES};
use tokio::sync::{mpsc, oneshot};
use ttrpc::asynchronous::{SSReceiver, SSSender, ServerStream, TtrpcContext};

pub const INIT: &str = "containerd.services.streaming.v1.StreamInit";
pub const DATA: &str = "containerd.types.transfer.Data";
pub const UPDATE: &str = "containerd.types.transfer.WindowUpdate";
pub const EMPTY: &str = "google.protobuf.Empty";

pub fn pack(type_url: &str, m: &impl Message) -> Any {
    let mut a = Any::new();
    a.type_url = type_url.into();
    a.value = m.write_to_bytes().unwrap();
    a
}

pub fn data(bytes: &[u8]) -> Any {
    let mut d = Data::new();
    d.data = bytes.to_vec();
    pack(DATA, &d)
}

pub fn grant(n: i32) -> Any {
    let mut w = WindowUpdate::new();
    w.update = n;
    pack(UPDATE, &w)
}

pub fn init(id: &str) -> Any {
    let mut i = StreamInit::new();
    i.id = id.into();
    pack(INIT, &i)
}

fn type_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, n)| n)
}

/// One connection of a stream, handed to its copy.
pub struct Conn {
    tx: SSSender<Any>,
    rx: SSReceiver<Any>,
    /// `Some(received)` for a resume.
    resume: Option<u64>,
    _done: oneshot::Sender<()>,
}

/// The streams' copies, by id.
#[derive(Default)]
pub struct FakeStreams {
    copies: Mutex<HashMap<String, mpsc::UnboundedSender<Conn>>>,
    /// `StreamInit`s received.
    pub inits: AtomicU32,
    /// `StreamResume`s received.
    pub resumes: AtomicU32,
    /// Resumes that asked for output older than was retained.
    pub gaps: AtomicU32,
}

impl FakeStreams {
    /// Copies `log` out on stream `id`, a little at a time, within the grants; ends the stream
    /// once all is sent (after a grace period for a resume).
    pub fn output(self: &Arc<Self>, id: &str, log: Arc<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.copies.lock().unwrap().insert(id.into(), tx);
        tokio::spawn(copy_out(rx, log, Arc::clone(self)));
    }

    /// Copies stream `id` into `process`, a message every few milliseconds; `closed` is set when
    /// the host ends its side.
    pub fn input(&self, id: &str, process: Arc<Mutex<Vec<u8>>>, closed: oneshot::Sender<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.copies.lock().unwrap().insert(id.into(), tx);
        tokio::spawn(copy_in(rx, process, closed));
    }
}

fn status(code: ttrpc::Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

#[async_trait]
impl Streaming for FakeStreams {
    async fn stream(&self, _: &TtrpcContext, s: ServerStream<Any, Any>) -> ttrpc::Result<()> {
        let (tx, mut rx) = s.split();
        let first = loop {
            let m = rx
                .recv()
                .await?
                .ok_or_else(|| status(ttrpc::Code::INVALID_ARGUMENT, "no first message"))?;
            if !(m.type_url.is_empty() && m.value.is_empty()) {
                break m;
            }
        };
        let (id, resume) = match type_name(&first.type_url) {
            INIT => {
                self.inits.fetch_add(1, Ordering::Relaxed);
                let id = StreamInit::parse_from_bytes(&first.value).unwrap().id;
                tx.send(&pack(EMPTY, &Empty::new())).await?;
                (id, None)
            }
            STREAM_RESUME_TYPE => {
                self.resumes.fetch_add(1, Ordering::Relaxed);
                let r = StreamResume::parse_from_bytes(&first.value).unwrap();
                (r.id, Some(r.received))
            }
            other => return Err(status(ttrpc::Code::INVALID_ARGUMENT, other)),
        };
        let copy = self.copies.lock().unwrap().get(&id).cloned();
        let Some(copy) = copy else {
            return Err(status(ttrpc::Code::NOT_FOUND, &id));
        };
        let (done, wait) = oneshot::channel();
        let conn = Conn {
            tx,
            rx,
            resume,
            _done: done,
        };
        if copy.send(conn).is_err() {
            return Err(status(ttrpc::Code::NOT_FOUND, &id));
        }
        let _ = wait.await;
        Ok(())
    }
}

async fn resumed(c: &Conn, at: u64) -> bool {
    let mut r = StreamResumed::new();
    r.received = at;
    c.tx.send(&pack(STREAM_RESUMED_TYPE, &r)).await.is_ok()
}

/// The next message of `link`, never without one.
async fn next(link: &mut Option<Conn>) -> ttrpc::Result<Option<Any>> {
    match link {
        Some(c) => c.rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn copy_out(
    mut conns: mpsc::UnboundedReceiver<Conn>,
    log: Arc<Vec<u8>>,
    s: Arc<FakeStreams>,
) {
    let mut link: Option<Conn> = conns.recv().await;
    let len = log.len() as u64;
    let (mut next_at, mut end, mut window) = (0u64, 0u64, 0i64);
    loop {
        if next_at == len && end == len {
            // All sent: wait a little for a resume that asks for the tail again, then end.
            match tokio::time::timeout(Duration::from_millis(500), conns.recv()).await {
                Ok(Some(c)) => {
                    link = resume_out(c, end, &s, &mut next_at, &mut window).await;
                    continue;
                }
                _ => return,
            }
        }
        tokio::select! {
            c = conns.recv() => {
                let Some(c) = c else { return };
                link = resume_out(c, end, &s, &mut next_at, &mut window).await;
            }
            m = next(&mut link) => match m {
                Ok(Some(m)) if type_name(&m.type_url) == UPDATE => {
                    window += i64::from(WindowUpdate::parse_from_bytes(&m.value).unwrap().update);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => link = None,
            },
            () = tokio::time::sleep(Duration::from_millis(1)), if window > 0 && next_at < len && link.is_some() => {
                let n = (window as u64).min(8 * 1024).min(len - next_at);
                let chunk = &log[next_at as usize..(next_at + n) as usize];
                next_at += n;
                end = end.max(next_at);
                window -= n as i64;
                if link.as_ref().unwrap().tx.send(&data(chunk)).await.is_err() {
                    link = None;
                }
            }
        }
    }
}

async fn resume_out(
    c: Conn,
    end: u64,
    s: &FakeStreams,
    next_at: &mut u64,
    window: &mut i64,
) -> Option<Conn> {
    let received = c.resume.expect("a second init of an output stream");
    assert!(received <= end, "resumed at {received}, only {end} sent");
    let retained = end.saturating_sub(WINDOW_BYTES as u64);
    if received < retained {
        s.gaps.fetch_add(1, Ordering::Relaxed);
    }
    let from = received.max(retained);
    (*next_at, *window) = (from, 0);
    resumed(&c, from).await.then_some(c)
}

async fn copy_in(
    mut conns: mpsc::UnboundedReceiver<Conn>,
    process: Arc<Mutex<Vec<u8>>>,
    closed: oneshot::Sender<()>,
) {
    let mut link: Option<Conn> = conns.recv().await;
    let mut written = 0u64;
    let mut unreported = 0usize;
    let mut fresh = true;
    loop {
        if fresh && let Some(c) = &link {
            fresh = false;
            if c.tx.send(&grant(WINDOW)).await.is_err() {
                link = None;
            }
        }
        tokio::select! {
            c = conns.recv() => {
                let Some(c) = c else { return };
                assert!(c.resume.is_some(), "a second init of a stdin stream");
                unreported = 0;
                fresh = true;
                link = resumed(&c, written).await.then_some(c);
            }
            m = next(&mut link) => match m {
                Ok(Some(m)) if type_name(&m.type_url) == DATA => {
                    let d = Data::parse_from_bytes(&m.value).unwrap().data;
                    // A process slower than the host: what the connection brought and the
                    // process did not take yet dies with the connection.
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    process.lock().unwrap().extend_from_slice(&d);
                    written += d.len() as u64;
                    unreported += d.len();
                    if unreported >= WINDOW_BYTES / 2 {
                        let g = i32::try_from(unreported).unwrap();
                        unreported = 0;
                        if link.as_ref().unwrap().tx.send(&grant(g)).await.is_err() {
                            link = None;
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let _ = closed.send(());
                    return;
                }
                Err(_) => link = None,
            },
        }
    }
}
