// SPDX-License-Identifier: Apache-2.0
//! The copies between a process's pipe (or pty) and its stream, across the stream's
//! connections.
//!
//! A copy ends as before when the host closes its side cleanly, on `CloseIO`, or when the
//! process's end of the pipe is gone. A transport failure (a send or receive on the ttrpc
//! stream fails: the connection died) does not end it: the copy keeps the pipe and parks until
//! the host resumes the stream on a new connection ([`super::StreamRegistry`] routes the
//! `StreamResume`), or until [`super::RESUME_WAIT`] has passed. A resume may also arrive
//! while the old connection still looks alive (a dead connection's receive can block for
//! ever): the new connection replaces it.
//!
//! A receive on a connection that died does not fail in ttrpc's server (only sends do), so an
//! idle input copy sends an empty `WindowUpdate` every [`super::PROBE_INTERVAL`] to find out;
//! an output copy finds out at its next send.
//!
//! Output keeps the last [`WINDOW_BYTES`] bytes it sent ([`Retained`]): the most the host can
//! be missing is one window it granted. After the process's end of file the copy ends the
//! stream but stays resumable for the same time, in case the last bytes died with the
//! connection. Input writes each `Data` with cancel-safe writes, so that at a resume the
//! count of bytes written to the process is exact; the host sends again from there. Input
//! grants, beyond a connection's first window, exactly the bytes written to the process (the
//! confirmation the host's retention rests on, see [`proto::stream`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::agent::stream_data::{Data, WindowUpdate};
use proto::agent::stream_resume::StreamResumed;
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use proto::stream::{STREAM_RESUMED_TYPE, WINDOW_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::{
    DATA_TYPE, Link, MAX_DATA, Resumable, ResumeRequest, StreamConn, StreamingError, WINDOW,
    WINDOW_UPDATE_TYPE, pack, transport, type_name,
};

/// The last bytes sent on an output stream: offsets `[end - len, end)` of the stream.
#[derive(Debug)]
struct Retained {
    bytes: VecDeque<u8>,
    /// Bytes sent since the stream began.
    end: u64,
    cap: usize,
}

impl Retained {
    fn new(cap: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            end: 0,
            cap,
        }
    }

    fn len64(&self) -> u64 {
        u64::try_from(self.bytes.len()).unwrap_or(u64::MAX)
    }

    /// The oldest offset still retained.
    fn start(&self) -> u64 {
        self.end.saturating_sub(self.len64())
    }

    /// Records `chunk` as sent.
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend(chunk);
        let excess = self.bytes.len().saturating_sub(self.cap);
        self.bytes.drain(..excess);
        self.end = self
            .end
            .saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
    }

    /// Up to `max` retained bytes from offset `from` (empty outside what is retained).
    fn from(&self, from: u64, max: usize) -> Vec<u8> {
        let Some(skip) = from
            .checked_sub(self.start())
            .and_then(|s| usize::try_from(s).ok())
        else {
            return Vec::new();
        };
        self.bytes.iter().skip(skip).take(max).copied().collect()
    }

    /// Where a resume at the host's `received` sends from: `received`, or the oldest offset
    /// retained when `received` is older (a gap: counted in `gaps`).
    fn resume_at(
        &self,
        id: &str,
        received: u64,
        resume: &Resumable,
    ) -> Result<u64, StreamingError> {
        if received > self.end {
            return Err(StreamingError::InvalidOffset {
                id: id.to_owned(),
                received,
                sent: self.end,
            });
        }
        let start = self.start();
        if received < start {
            resume.gaps.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "Stream {id:?}: resumed at byte {received}, but only bytes from {start} are \
                 retained: {} bytes lost",
                start - received
            );
            return Ok(start);
        }
        Ok(received)
    }
}

/// The next resume request of a resumable copy; never for one that is not.
async fn next_request(resume: &mut Option<Resumable>) -> ResumeRequest {
    match resume {
        Some(r) => match r.requests.recv().await {
            Some(req) => req,
            // Another copy of the same id replaced this one in the registry.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Waits, for as long as resumable copies wait, for a resume; `None` when none came (or the
/// copy is not resumable).
async fn park(resume: &mut Option<Resumable>, id: &str) -> Option<ResumeRequest> {
    let wait = resume.as_ref()?.wait;
    log::info!("Stream {id:?}: waiting up to {wait:?} for the host to resume it");
    tokio::time::timeout(wait, next_request(resume)).await.ok()
}

/// How long a resumable copy waits, for errors.
fn waited(resume: Option<&Resumable>) -> Duration {
    resume.map_or(Duration::ZERO, |r| r.wait)
}

/// Answers a resume request: on `Ok(offset)` sends `StreamResumed{offset}` on the new
/// connection and returns it; on `Err` (or if that send fails) refuses the request.
async fn answer(id: &str, req: ResumeRequest, offset: Result<u64, StreamingError>) -> Option<Link> {
    let ResumeRequest { link, verdict, .. } = req;
    let offset = match offset {
        Ok(o) => o,
        Err(e) => {
            log::warn!("Stream {id:?}: resume refused: {e}");
            let _ = verdict.send(Err(e));
            return None;
        }
    };
    let mut resumed = StreamResumed::new();
    resumed.received = offset;
    let sent = match pack(STREAM_RESUMED_TYPE, &resumed) {
        Ok(msg) => link.tx.send(&msg).await.map_err(|e| transport(&e)),
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        let _ = verdict.send(Err(e));
        return None;
    }
    let _ = verdict.send(Ok(()));
    Some(link)
}

async fn send_data(link: &Link, chunk: Vec<u8>) -> Result<(), StreamingError> {
    let mut data = Data::new();
    data.data = chunk;
    link.tx
        .send(&pack(DATA_TYPE, &data)?)
        .await
        .map_err(|e| transport(&e))
}

async fn send_grant(link: &Link, bytes: i32) -> Result<(), StreamingError> {
    let mut update = WindowUpdate::new();
    update.update = bytes;
    link.tx
        .send(&pack(WINDOW_UPDATE_TYPE, &update)?)
        .await
        .map_err(|e| transport(&e))
}

/// The next message of the current connection (never, without one: `select!` evaluates the
/// futures of disabled branches too).
async fn recv(link: &mut Option<Link>) -> ttrpc::Result<Option<Any>> {
    match link {
        Some(l) => l.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads from the pipe while it is open (never once it is dropped).
async fn read<R: AsyncRead + Unpin>(
    reader: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match reader {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Sleeps for `d` (for ever without one).
async fn sleep(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Copies `reader` (a process's stdout/stderr pipe or pty) into the stream as `Data`, within
/// the windows the host grants, until end of file; then ends the stream. A pty's `EIO` (no
/// process has it open any more) counts as end of file. A failed connection parks the copy
/// until the stream is resumed (see the module doc). Returns the bytes sent.
pub async fn copy_output<R: AsyncRead + Unpin>(
    conn: StreamConn,
    reader: R,
) -> Result<u64, StreamingError> {
    // Dropped at end of file (a pty master must not be held open while the copy lingers).
    let mut reader = Some(reader);
    let StreamConn {
        id,
        link,
        mut resume,
    } = conn;
    let mut link = Some(link);
    let mut kept = Retained::new(if resume.is_some() { WINDOW_BYTES } else { 0 });
    // The next offset to send: below `kept.end` only while sending again after a resume.
    let mut next: u64 = 0;
    let mut window: i64 = 0;
    let mut peer_open = true;
    let mut eof = false;
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        let Some(l) = link.as_ref() else {
            // The connection failed, or everything was sent: wait for a resume.
            let Some(req) = park(&mut resume, &id).await else {
                if eof {
                    break;
                }
                return Err(StreamingError::NotResumed {
                    id,
                    wait: waited(resume.as_ref()),
                });
            };
            let at = match resume.as_ref() {
                Some(r) => kept.resume_at(&id, req.received, r),
                None => Err(StreamingError::NotFound(id.clone())),
            };
            let from = at.as_ref().ok().copied();
            if let (Some(new), Some(from)) = (answer(&id, req, at).await, from) {
                (link, next, window, peer_open) = (Some(new), from, 0, true);
            }
            continue;
        };
        if next < kept.end && window > 0 {
            // Sending again what the host missed, within the new window.
            let max = usize::try_from(window).map_or(MAX_DATA, |w| w.min(MAX_DATA));
            let chunk = kept.from(next, max);
            let n = chunk.len();
            if let Err(e) = send_data(l, chunk).await {
                log::info!("Stream {id:?}: {e}");
                link = None;
                continue;
            }
            next = next.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            window = window.saturating_sub(to_i64(n));
            continue;
        }
        if eof && next >= kept.end {
            if !peer_open || resume.is_none() {
                break;
            }
            // All sent: end the stream, but stay resumable in case the end did not arrive.
            link = None;
            continue;
        }
        // Never read more than the window allows (with no window left, reads only drain).
        let cap = if window <= 0 {
            MAX_DATA
        } else {
            usize::try_from(window).map_or(MAX_DATA, |w| w.min(MAX_DATA))
        };
        let reading = !eof && next >= kept.end && (window > 0 || !peer_open);
        tokio::select! {
            req = next_request(&mut resume) => {
                let at = match resume.as_ref() {
                    Some(r) => kept.resume_at(&id, req.received, r),
                    None => Err(StreamingError::NotFound(id.clone())),
                };
                let from = at.as_ref().ok().copied();
                if let (Some(new), Some(from)) = (answer(&id, req, at).await, from) {
                    (link, next, window, peer_open) = (Some(new), from, 0, true);
                }
            }
            msg = recv(&mut link), if peer_open => {
                match msg {
                    Ok(Some(any)) if type_name(&any.type_url) == WINDOW_UPDATE_TYPE => {
                        let w = WindowUpdate::parse_from_bytes(&any.value)
                            .map_err(|e| StreamingError::Decode("WindowUpdate", e))?;
                        window = window.saturating_add(i64::from(w.update.max(0)));
                    }
                    Ok(Some(any)) => log::debug!("Stream {id:?}: ignoring a {:?}", any.type_url),
                    Ok(None) => peer_open = false,
                    Err(e) => {
                        log::info!("Stream {id:?}: {e}");
                        link = None;
                    }
                }
            }
            n = read(&mut reader, buf.get_mut(..cap).unwrap_or_default()), if reading => {
                let n = match n {
                    Ok(0) => 0,
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => 0,
                    Err(e) => return Err(StreamingError::Transport(format!("read: {e}"))),
                };
                if n == 0 {
                    eof = true;
                    reader = None;
                    continue;
                }
                if !peer_open && window <= 0 {
                    // Nobody will grant more: drop the bytes so the process does not block.
                    continue;
                }
                let chunk = buf.get(..n).unwrap_or_default();
                // Retained first: if the send fails, a resume sends it again.
                kept.push(chunk);
                next = kept.end;
                window = window.saturating_sub(to_i64(n));
                if let Some(l) = link.as_ref()
                    && let Err(e) = send_data(l, chunk.to_vec()).await
                {
                    log::info!("Stream {id:?}: {e}");
                    link = None;
                }
            }
        }
    }
    log::debug!("Stream {id:?}: output ended after {} bytes", kept.end);
    Ok(kept.end)
}

/// Copies `Data` from the stream into `writer` (a process's stdin pipe or pty), granting
/// [`WINDOW`] bytes at the start of each connection and then the bytes written, until the
/// host closes its side, `close` fires (`CloseIO`) or the process stops reading; then drops
/// `writer` (end of file for the process, or for a pty just the end of input). A failed
/// connection parks the copy until the stream is resumed (see the module doc). Returns the
/// bytes written.
pub async fn copy_input<W: AsyncWrite + Unpin>(
    conn: StreamConn,
    mut writer: W,
    close: oneshot::Receiver<()>,
) -> Result<u64, StreamingError> {
    let StreamConn {
        id,
        link,
        mut resume,
    } = conn;
    let mut link = Some(link);
    let mut fresh = true;
    let mut written: u64 = 0;
    // Written and not yet granted again.
    let mut unreported: usize = 0;
    // The `Data` being written, and how much of it is.
    let mut data: Vec<u8> = Vec::new();
    let mut off: usize = 0;
    let mut result = Ok(());
    tokio::pin!(close);
    loop {
        let Some(l) = link.as_ref() else {
            let req = tokio::select! {
                _ = &mut close => break,
                req = park(&mut resume, &id) => req,
            };
            let Some(req) = req else {
                result = Err(StreamingError::NotResumed {
                    id: id.clone(),
                    wait: waited(resume.as_ref()),
                });
                break;
            };
            // What was not written yet is sent again from `written`.
            (data, off) = (Vec::new(), 0);
            if let Some(new) = answer(&id, req, Ok(written)).await {
                (link, fresh, unreported) = (Some(new), true, 0);
            }
            continue;
        };
        let grant = if fresh {
            Some(WINDOW)
        } else if unreported >= WINDOW_BYTES / 2 {
            Some(i32::try_from(unreported).unwrap_or(i32::MAX))
        } else {
            None
        };
        if let Some(bytes) = grant {
            if let Err(e) = send_grant(l, bytes).await {
                log::info!("Stream {id:?}: {e}");
                link = None;
                continue;
            }
            if fresh {
                fresh = false;
            } else {
                unreported = unreported.saturating_sub(usize::try_from(bytes).unwrap_or(0));
            }
        }
        let writing = off < data.len();
        let probe = resume.as_ref().map(|r| r.probe);
        tokio::select! {
            _ = &mut close => break,
            () = sleep(probe), if !writing => {
                if let Some(l) = link.as_ref()
                    && let Err(e) = send_grant(l, 0).await
                {
                    log::info!("Stream {id:?}: {e}");
                    link = None;
                }
            }
            req = next_request(&mut resume) => {
                (data, off) = (Vec::new(), 0);
                if let Some(new) = answer(&id, req, Ok(written)).await {
                    (link, fresh, unreported) = (Some(new), true, 0);
                }
            }
            n = writer.write(data.get(off..).unwrap_or_default()), if writing => match n {
                Ok(n) if n > 0 => {
                    off = off.saturating_add(n);
                    written = written.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
                    unreported = unreported.saturating_add(n);
                }
                Ok(_) => break,
                Err(e) => {
                    log::debug!("Stream {id:?}: the process stopped reading stdin: {e}");
                    break;
                }
            },
            msg = recv(&mut link), if !writing => {
                match msg {
                    Ok(Some(any)) if type_name(&any.type_url) == DATA_TYPE => {
                        let d = Data::parse_from_bytes(&any.value)
                            .map_err(|e| StreamingError::Decode("Data", e))?;
                        (data, off) = (d.data, 0);
                    }
                    Ok(Some(any)) => log::debug!("Stream {id:?}: ignoring a {:?}", any.type_url),
                    Ok(None) => break,
                    Err(e) => {
                        log::info!("Stream {id:?}: {e}");
                        link = None;
                    }
                }
            }
        }
    }
    let _ = writer.shutdown().await;
    log::debug!("Stream {id:?}: input ended after {written} bytes");
    result.map(|()| written)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use proto::agent::stream_resume::StreamResume;
    use proto::agent::streaming::StreamInit;
    use proto::agent::streaming_ttrpc::{StreamingClient, create_streaming};
    use proto::stream::STREAM_RESUME_TYPE;
    use tokio::net::unix::pipe;
    use tokio::task::JoinHandle;
    use ttrpc::asynchronous::{CSReceiver, CSSender};

    use super::super::{STREAM_INIT_TYPE, StreamRegistry, StreamingService};
    use super::*;

    /// Forwards connections from one unix socket to another; `cut` kills them all, as a
    /// live upgrade kills the guest's connections.
    struct Relay {
        path: PathBuf,
        conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
        accept: JoinHandle<()>,
    }

    impl Relay {
        fn new(dir: &Path, to: &Path) -> Self {
            let path = dir.join("relay.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
            let to = to.to_owned();
            let kept = Arc::clone(&conns);
            let accept = tokio::spawn(async move {
                loop {
                    let (mut a, _) = listener.accept().await.unwrap();
                    let mut b = tokio::net::UnixStream::connect(&to).await.unwrap();
                    kept.lock().unwrap().push(tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }));
                }
            });
            Self {
                path,
                conns,
                accept,
            }
        }

        fn cut(&self) {
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.cut();
            self.accept.abort();
        }
    }

    /// An agent's stream service on a unix socket.
    async fn serve(
        dir: &Path,
        registry: &Arc<StreamRegistry>,
    ) -> (PathBuf, ttrpc::asynchronous::Server) {
        let sock = dir.join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let service = StreamingService::new(Arc::clone(registry));
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(ttrpc::asynchronous::transport::Listener::from(listener))
            .register_service(create_streaming(Arc::new(service)));
        server.start().await.unwrap();
        (sock, server)
    }

    /// Opens a stream on `sock` whose first message is `first`; returns it after the answer.
    async fn open(sock: &Path, first: Any) -> (CSSender<Any>, CSReceiver<Any>, Any) {
        let client = ttrpc::asynchronous::Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap();
        let s = StreamingClient::new(client)
            .stream(ttrpc::context::with_timeout(0))
            .await
            .unwrap();
        let (tx, mut rx) = s.split();
        tx.send(&first).await.unwrap();
        let answer = rx.recv().await;
        (tx, rx, answer.unwrap())
    }

    fn init(id: &str) -> Any {
        let mut m = StreamInit::new();
        m.id = id.into();
        pack(STREAM_INIT_TYPE, &m).unwrap()
    }

    fn resume_msg(id: &str, received: u64) -> Any {
        let mut m = StreamResume::new();
        m.id = id.into();
        m.received = received;
        pack(STREAM_RESUME_TYPE, &m).unwrap()
    }

    fn resumed_at(any: &Any) -> u64 {
        assert_eq!(any.type_url, STREAM_RESUMED_TYPE);
        StreamResumed::parse_from_bytes(&any.value)
            .unwrap()
            .received
    }

    fn grant(n: i32) -> Any {
        let mut w = WindowUpdate::new();
        w.update = n;
        pack(WINDOW_UPDATE_TYPE, &w).unwrap()
    }

    fn data(bytes: &[u8]) -> Any {
        let mut d = Data::new();
        d.data = bytes.to_vec();
        pack(DATA_TYPE, &d).unwrap()
    }

    /// Reads `Data` until `want` bytes came (granting as it reads, like the host).
    async fn take_data(rx: &mut CSReceiver<Any>, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            let any = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("data in time")
                .unwrap();
            assert_eq!(any.type_url, DATA_TYPE);
            got.extend(Data::parse_from_bytes(&any.value).unwrap().data);
        }
        got
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        registry: Arc<StreamRegistry>,
        agent: PathBuf,
        relay: Relay,
        _server: ttrpc::asynchronous::Server,
    }

    /// A new connection's `Streaming.Stream` to the agent, opened with a resume of `id`.
    async fn resume_stream(
        f: &Fixture,
        id: &str,
        received: u64,
    ) -> ttrpc::asynchronous::ClientStream<Any, Any> {
        let client = ttrpc::asynchronous::Client::connect(&format!("unix://{}", f.agent.display()))
            .await
            .unwrap();
        let s = StreamingClient::new(client)
            .stream(ttrpc::context::with_timeout(0))
            .await
            .unwrap();
        s.send(&resume_msg(id, received)).await.unwrap();
        s
    }

    /// A resume of `id` is answered NOT_FOUND (no copy waits for it).
    async fn assert_not_resumable(f: &Fixture, id: &str, received: u64) {
        let mut s = resume_stream(f, id, received).await;
        match s.recv().await {
            Err(ttrpc::Error::RpcStatus(st)) => assert_eq!(st.code(), ttrpc::Code::NOT_FOUND),
            other => panic!("{other:?}"),
        }
    }

    async fn fixture(wait: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(
            StreamRegistry::new()
                .with_resume_wait(wait)
                .with_probe_interval(Duration::from_millis(100)),
        );
        let (agent, server) = serve(dir.path(), &registry).await;
        let relay = Relay::new(dir.path(), &agent);
        Fixture {
            _dir: dir,
            registry,
            agent,
            relay,
            _server: server,
        }
    }

    /// An output copy on a pipe, its stream opened through the relay.
    async fn output(
        f: &Fixture,
        id: &str,
    ) -> (
        CSSender<Any>,
        CSReceiver<Any>,
        pipe::Sender,
        JoinHandle<Result<u64, StreamingError>>,
    ) {
        let (tx, rx, ack) = open(&f.relay.path, init(id)).await;
        assert_eq!(ack.type_url, super::super::EMPTY_TYPE);
        let conn = f.registry.take(id, Duration::from_secs(5)).await.unwrap();
        let (w, r) = pipe::pipe().unwrap();
        let copy = tokio::spawn(copy_output(conn, r));
        (tx, rx, w, copy)
    }

    #[tokio::test]
    async fn output_resumes_from_the_hosts_offset() {
        let f = fixture(Duration::from_secs(30)).await;
        let (tx, mut rx, mut w, copy) = output(&f, "c1-stdout").await;
        let bytes = pattern(100_000);
        tx.send(&grant(WINDOW)).await.unwrap();
        w.write_all(&bytes[..40_000]).await.unwrap();
        let got = take_data(&mut rx, 40_000).await;
        assert_eq!(got, bytes[..40_000]);
        // The connection dies; the host kept only the first 30,000 bytes.
        f.relay.cut();
        drop((tx, rx));
        let (tx, mut rx, answer) = open(&f.agent, resume_msg("c1-stdout", 30_000)).await;
        assert_eq!(resumed_at(&answer), 30_000);
        tx.send(&grant(WINDOW)).await.unwrap();
        w.write_all(&bytes[40_000..60_000]).await.unwrap();
        let got = take_data(&mut rx, 30_000).await;
        assert_eq!(got, bytes[30_000..60_000]);
        // Within the new window only: 34 KiB granted so far, more once the host grants.
        w.write_all(&bytes[60_000..]).await.unwrap();
        drop(w);
        tx.send(&grant(WINDOW)).await.unwrap();
        let got = take_data(&mut rx, 40_000).await;
        assert_eq!(got, bytes[60_000..]);
        // End of file ends the stream.
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(end.is_err(), "{end:?}");
        assert_eq!(f.registry.gaps(), 0);
        copy.abort();
    }

    #[tokio::test]
    async fn output_resumed_too_late_has_a_counted_gap() {
        let f = fixture(Duration::from_secs(30)).await;
        let (tx, mut rx, mut w, copy) = output(&f, "c1-stderr").await;
        let bytes = pattern(200_000);
        // A host that grants far ahead: the agent still keeps only one window.
        tx.send(&grant(1 << 20)).await.unwrap();
        w.write_all(&bytes[..150_000]).await.unwrap();
        assert_eq!(take_data(&mut rx, 150_000).await, bytes[..150_000]);
        f.relay.cut();
        let (tx, mut rx, answer) = open(&f.agent, resume_msg("c1-stderr", 10)).await;
        let from = resumed_at(&answer);
        assert_eq!(from, 150_000 - u64::try_from(WINDOW_BYTES).unwrap());
        assert_eq!(f.registry.gaps(), 1);
        tx.send(&grant(1 << 20)).await.unwrap();
        w.write_all(&bytes[150_000..]).await.unwrap();
        drop(w);
        let from = usize::try_from(from).unwrap();
        assert_eq!(take_data(&mut rx, 200_000 - from).await, bytes[from..]);
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(end.is_err(), "{end:?}");
        // The copy stays resumable a while after the end, in case the end got lost.
        assert!(!copy.is_finished());
        copy.abort();
    }

    #[tokio::test]
    async fn an_offset_beyond_what_was_sent_is_refused() {
        let f = fixture(Duration::from_secs(30)).await;
        let (tx, mut rx, mut w, copy) = output(&f, "c2-stdout").await;
        tx.send(&grant(WINDOW)).await.unwrap();
        w.write_all(b"hello").await.unwrap();
        assert_eq!(take_data(&mut rx, 5).await, b"hello");
        f.relay.cut();
        let mut s = resume_stream(&f, "c2-stdout", 6).await;
        match s.recv().await {
            Err(ttrpc::Error::RpcStatus(st)) => {
                assert_eq!(st.code(), ttrpc::Code::INVALID_ARGUMENT, "{}", st.message());
                assert!(st.message().contains("only 5"), "{}", st.message());
            }
            other => panic!("{other:?}"),
        }
        // The stream waits on: a valid resume still gets everything.
        let (tx, mut rx, answer) = open(&f.agent, resume_msg("c2-stdout", 5)).await;
        assert_eq!(resumed_at(&answer), 5);
        tx.send(&grant(WINDOW)).await.unwrap();
        w.write_all(b" world").await.unwrap();
        drop(w);
        assert_eq!(take_data(&mut rx, 6).await, b" world");
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(end.is_err(), "{end:?}");
        copy.abort();
        let _ = copy.await;
        // A stream nobody copies is not found.
        assert_not_resumable(&f, "c9-stdout", 0).await;
    }

    #[tokio::test]
    async fn an_output_copy_not_resumed_in_time_ends_and_closes_the_pipe() {
        let f = fixture(Duration::from_millis(300)).await;
        let (tx, mut rx, mut w, copy) = output(&f, "c3-stdout").await;
        tx.send(&grant(WINDOW)).await.unwrap();
        w.write_all(b"a").await.unwrap();
        assert_eq!(take_data(&mut rx, 1).await, b"a");
        f.relay.cut();
        // The next send fails: the copy parks, then gives up.
        w.write_all(b"b").await.unwrap();
        let started = tokio::time::Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(10), copy)
            .await
            .expect("the copy gave up")
            .unwrap();
        assert!(
            matches!(end, Err(StreamingError::NotResumed { .. })),
            "{end:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
        // The process's pipe is closed: its writes fail.
        let e = w.write_all(&[0u8; 70_000]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        // And the stream cannot be resumed any more.
        assert_not_resumable(&f, "c3-stdout", 1).await;
    }

    /// An input copy into a pipe, its stream opened through the relay.
    async fn input(
        f: &Fixture,
        id: &str,
    ) -> (
        CSSender<Any>,
        CSReceiver<Any>,
        pipe::Receiver,
        oneshot::Sender<()>,
        JoinHandle<Result<u64, StreamingError>>,
    ) {
        let (tx, rx, ack) = open(&f.relay.path, init(id)).await;
        assert_eq!(ack.type_url, super::super::EMPTY_TYPE);
        let conn = f.registry.take(id, Duration::from_secs(5)).await.unwrap();
        let (w, r) = pipe::pipe().unwrap();
        let (close_tx, close_rx) = oneshot::channel();
        let copy = tokio::spawn(copy_input(conn, w, close_rx));
        (tx, rx, r, close_tx, copy)
    }

    async fn next_grant(rx: &mut CSReceiver<Any>) -> i32 {
        let any = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a grant in time")
            .unwrap();
        assert_eq!(any.type_url, WINDOW_UPDATE_TYPE);
        WindowUpdate::parse_from_bytes(&any.value).unwrap().update
    }

    #[tokio::test]
    async fn input_resumes_from_what_the_process_got() {
        let f = fixture(Duration::from_secs(30)).await;
        let (tx, mut rx, mut r, _close, copy) = input(&f, "c1-stdin").await;
        let bytes = pattern(150_000);
        assert_eq!(next_grant(&mut rx).await, WINDOW);
        for c in bytes[..60_000].chunks(20_000) {
            tx.send(&data(c)).await.unwrap();
        }
        // The process reads 45,000 of them; the rest waits in the copy and the pipe.
        let mut got = vec![0u8; 45_000];
        r.read_exact(&mut got).await.unwrap();
        // Grants confirm bytes written: at least half a window, at most what was written.
        let g = next_grant(&mut rx).await;
        assert!((WINDOW / 2..=60_000).contains(&g), "{g}");
        f.relay.cut();
        drop((tx, rx));
        let (tx, mut rx, answer) = open(&f.agent, resume_msg("c1-stdin", 0)).await;
        let written = usize::try_from(resumed_at(&answer)).unwrap();
        assert!((45_000..=60_000).contains(&written), "{written}");
        assert!(written >= usize::try_from(g).unwrap());
        // A fresh window on the new connection; the host sends on from `written`.
        assert_eq!(next_grant(&mut rx).await, WINDOW);
        let mut sent = written;
        let mut window = i64::from(WINDOW);
        let reader = tokio::spawn(async move {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            got.extend(rest);
            got
        });
        while sent < bytes.len() {
            while window <= 0 {
                window += i64::from(next_grant(&mut rx).await);
            }
            let n = (bytes.len() - sent)
                .min(MAX_DATA)
                .min(usize::try_from(window).unwrap());
            tx.send(&data(&bytes[sent..sent + n])).await.unwrap();
            sent += n;
            window -= i64::try_from(n).unwrap();
        }
        tx.close_send().await.unwrap();
        assert_eq!(copy.await.unwrap().unwrap(), 150_000);
        assert_eq!(reader.await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn an_input_copy_not_resumed_in_time_ends_the_process_input() {
        let f = fixture(Duration::from_millis(300)).await;
        let (tx, mut rx, mut r, _close, copy) = input(&f, "c2-stdin").await;
        assert_eq!(next_grant(&mut rx).await, WINDOW);
        tx.send(&data(&[7u8; 40_000])).await.unwrap();
        let mut got = vec![0u8; 40_000];
        r.read_exact(&mut got).await.unwrap();
        // The copy notices the dead connection when it grants what was written.
        f.relay.cut();
        let end = tokio::time::timeout(Duration::from_secs(10), copy)
            .await
            .expect("the copy gave up")
            .unwrap();
        assert!(
            matches!(end, Err(StreamingError::NotResumed { .. })),
            "{end:?}"
        );
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn output_all_sent_can_still_be_resumed_for_its_tail() {
        let f = fixture(Duration::from_secs(30)).await;
        let (tx, mut rx, mut w, copy) = output(&f, "c4-stdout").await;
        tx.send(&grant(WINDOW)).await.unwrap();
        w.write_all(b"last words").await.unwrap();
        drop(w);
        assert_eq!(take_data(&mut rx, 10).await, b"last words");
        // The stream ended, but the host may not have seen the end before its connection went.
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(end.is_err(), "{end:?}");
        let (tx, mut rx, answer) = open(&f.agent, resume_msg("c4-stdout", 4)).await;
        assert_eq!(resumed_at(&answer), 4);
        tx.send(&grant(WINDOW)).await.unwrap();
        assert_eq!(take_data(&mut rx, 6).await, b" words");
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(end.is_err(), "{end:?}");
        assert!(!copy.is_finished());
        copy.abort();
    }

    #[test]
    fn retained_keeps_the_last_bytes() {
        let mut r = Retained::new(10);
        r.push(b"0123456");
        assert_eq!((r.start(), r.end), (0, 7));
        r.push(b"789abc");
        assert_eq!((r.start(), r.end), (3, 13));
        assert_eq!(r.from(3, 4), b"3456");
        assert_eq!(r.from(11, 10), b"bc");
        assert!(r.from(2, 10).is_empty());
        assert!(r.from(13, 10).is_empty());
        let mut none = Retained::new(0);
        none.push(b"abc");
        assert_eq!((none.start(), none.end), (3, 3));
    }
}
