// SPDX-License-Identifier: Apache-2.0
//! Process stdio between the engine on the host and the agent in the VM, over containerd's
//! `containerd.services.streaming.v1.Streaming` protocol (the agent serves it; see its
//! `streaming` module for the message flow: `StreamInit{id}`, then `Data` within the windows
//! granted by `WindowUpdate`s).
//!
//! - `io_type = "streaming"` (containerd): stdio paths are URLs naming this task socket
//!   (`ttrpc+unix://…/task.sock?streaming_id=<id>`); containerd opens `Streaming.Stream` here.
//!   `proxy` opens a stream to the agent for each one and passes messages both ways, so
//!   the URLs go to the agent as they are; a live upgrade hands these streams over too.
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

use proto::agent::stream_data::Data;
use proto::agent::streaming::StreamInit;
use proto::agent::streaming_ttrpc::StreamingClient;
use proto::protobuf::Message;
use proto::protobuf::well_known_types::any::Any;
use tokio::net::unix::pipe;
use ttrpc::asynchronous::{CSReceiver, CSSender};

pub use self::bridge::{BridgeState, Bridges, Direction, resume};
use self::bridge::{InState, OutState, Sink, Source};
pub(crate) use self::proxy::StreamProxy;
pub use self::proxy::{Proxies, ProxyState, RESUME_TOKEN_KEY, StreamKey};
use super::error::TaskError;
use crate::backend::TaskTarget;

mod bridge;
mod proxy;

/// Service name of the stream service.
pub const STREAMING: &str = "containerd.services.streaming.v1.Streaming";
pub(super) const STREAM_INIT_TYPE: &str = "containerd.services.streaming.v1.StreamInit";
const DATA_TYPE: &str = "containerd.types.transfer.Data";
const WINDOW_UPDATE_TYPE: &str = "containerd.types.transfer.WindowUpdate";

/// The bare message name of a type URL.
pub(super) fn type_name(url: &str) -> &str {
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
                bridges.spawn_in(id.clone(), reader, tx, rx, InState::default(), 0);
            }
            Dir::Out => {
                let writer = open_output(name, path).await?;
                let (tx, rx) = open_agent_stream(target, &id).await?;
                bridges.spawn_out(id.clone(), writer, tx, rx, OutState::default());
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
async fn open_input(field: &str, path: &str) -> Result<Box<dyn Source>, TaskError> {
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
async fn open_output(field: &str, path: &str) -> Result<Box<dyn Sink>, TaskError> {
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
    use super::*;

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
