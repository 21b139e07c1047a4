// SPDX-License-Identifier: Apache-2.0
//! Lets every gRPC client reach the unix-socket APIs, whatever `:authority` it sends.
//!
//! gRPC C-core (>= 1.57, what iSulad and Python's grpcio link), grpc-java, grpcurl and
//! grpc-swift send a unix socket's path, percent-encoded, as `:authority`. The HTTP/2 layer under
//! tonic (the `h2` crate) parses it as a URI authority, fails, and resets the stream with
//! `PROTOCOL_ERROR`; upstream keeps that check (hyperium/h2 PR 487, hyperium/hyper issue 3750).
//! Authority means nothing on a unix socket, so [`AuthorityFix`] sits between each accepted
//! connection and the server and rewrites an `:authority` that is not a valid URI authority to
//! `localhost` (what grpc-go and containerd send) before `h2` reads it.
//!
//! It reads the client's bytes as HTTP/2 frames (RFC 9113 §4): the connection preface, then
//! frames passed through untouched except HEADERS and their CONTINUATION frames. Those carry one
//! header block in HPACK (RFC 7541), whose dynamic table the client's encoder fills as it goes;
//! every block is decoded with the client's table and encoded again with literal fields only
//! (§6.2.2, "without indexing"), so the server's table stays empty and in step whichever blocks
//! were changed. Padding is dropped, priority and `END_STREAM` are kept, and the block is cut to
//! the server's frame size. Anything that is not well-formed HTTP/2 (no preface, a block the
//! decoder refuses, a CONTINUATION out of place, an oversized frame) is passed on as it came from
//! that point on, so the server reports the error it would have reported anyway.
//! A connection whose first header block needs no change (grpc-go, containerd, tonic: they
//! send `localhost`) is passed on as it came from its first byte, that block included, with
//! nothing decoded any more: a client keeps one `:authority` for a connection's life, and the
//! server then decodes the client's own encoding, table and all.
//! The server-to-client direction is untouched.
#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Size of a frame header.
const FRAME_HEADER: usize = 9;
/// The server's `SETTINGS_MAX_FRAME_SIZE` (the HTTP/2 default; tonic keeps it).
const MAX_FRAME: usize = 16_384;
/// Largest header block this adapter collects (HEADERS plus CONTINUATIONs); the server accepts
/// far less (its header list limit), so a larger one is an error there either way.
const MAX_BLOCK: usize = 256 * 1024;
/// The server's HPACK table size (`SETTINGS_HEADER_TABLE_SIZE`, the default): the most a
/// client's encoder may use.
const TABLE_SIZE: usize = 4096;
/// What an unusable `:authority` becomes.
const LOCALHOST: &[u8] = b"localhost";

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Where the reader is in the client's byte stream.
#[derive(Debug)]
enum State {
    /// Before the 24-byte connection preface.
    Preface,
    /// At a frame header.
    Frame,
    /// Inside the payload of a frame that passes through: this many bytes are left.
    Payload(usize),
    /// Inside a header block: the HEADERS frame and any CONTINUATIONs so far, waiting for the
    /// frame with `END_HEADERS`.
    Block(PendingBlock),
    /// Not HTTP/2 as expected: everything from here passes as it is.
    Raw,
    /// The first header block needed no change: everything from here passes as it is.
    Through,
}

/// A header block being collected.
#[derive(Debug)]
struct PendingBlock {
    stream: u32,
    /// `END_STREAM` of the HEADERS frame.
    end_stream: bool,
    /// The HEADERS frame's priority fields, if it had them.
    priority: Option<[u8; 5]>,
    /// The block's fragments so far, without padding.
    fragments: Vec<u8>,
    /// The frames as they came, to pass on unchanged if the block turns out malformed.
    raw: Vec<u8>,
}

/// A client connection whose header blocks get a usable `:authority` (see the module docs).
pub struct AuthorityFix<S> {
    inner: S,
    state: State,
    decoder: loona_hpack::Decoder<'static>,
    /// No header block has been read yet.
    first_block: bool,
    /// Client bytes read but not yet handled.
    input: Vec<u8>,
    /// Bytes ready for the server, from `pending` on.
    output: Vec<u8>,
    pending: usize,
    /// The client closed its side.
    eof: bool,
    /// The API socket's connection slot this connection takes, given back when it closes.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("state", &self.state)
            .field("input", &self.input.len())
            .field("output", &self.output.len().saturating_sub(self.pending))
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        AuthorityFix {
            inner,
            state: State::Preface,
            decoder,
            first_block: true,
            input: Vec::new(),
            output: Vec::new(),
            pending: 0,
            eof: false,
            _slot: None,
        }
    }

    /// The connection holds `slot` until it is dropped.
    #[must_use]
    pub fn holding(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._slot = Some(slot);
        self
    }

    /// Moves everything that can be handled from `input` to `output`; what is left waits for
    /// more input.
    fn process(&mut self) {
        loop {
            let progressed = match std::mem::replace(&mut self.state, State::Raw) {
                State::Preface => self.preface(),
                State::Frame => self.frame(),
                State::Payload(left) => self.payload(left),
                State::Block(block) => self.continuation(block),
                passing @ (State::Raw | State::Through) => {
                    let all = std::mem::take(&mut self.input);
                    self.output.extend_from_slice(&all);
                    self.state = passing;
                    false
                }
            };
            if !progressed {
                return;
            }
        }
    }

    /// Takes `n` bytes from the front of `input`.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let rest = self.input.split_off(n.min(self.input.len()));
        std::mem::replace(&mut self.input, rest)
    }

    fn preface(&mut self) -> bool {
        let n = self.input.len().min(PREFACE.len());
        if self.input.get(..n) != PREFACE.get(..n) {
            self.state = State::Raw;
            return true;
        }
        if n < PREFACE.len() {
            self.state = State::Preface;
            return false;
        }
        let preface = self.take(PREFACE.len());
        self.output.extend_from_slice(&preface);
        self.state = State::Frame;
        true
    }

    fn frame(&mut self) -> bool {
        let Some(header) = self.input.get(..FRAME_HEADER) else {
            self.state = State::Frame;
            return false;
        };
        let head = FrameHead::parse(header);
        if !matches!(head.kind, TYPE_HEADERS | TYPE_CONTINUATION) {
            let header = self.take(FRAME_HEADER);
            self.output.extend_from_slice(&header);
            self.state = State::Payload(head.len);
            return true;
        }
        if head.len > MAX_FRAME || head.kind == TYPE_CONTINUATION {
            // Oversized, or a CONTINUATION with no block open: the server's error to report.
            self.state = State::Raw;
            return true;
        }
        let Some(frame) = self.input.get(..FRAME_HEADER.saturating_add(head.len)) else {
            self.state = State::Frame;
            return false;
        };
        let Some((fragment, priority)) = headers_payload(&head, frame) else {
            self.state = State::Raw;
            return true;
        };
        let block = PendingBlock {
            stream: head.stream,
            end_stream: head.flags & FLAG_END_STREAM != 0,
            priority,
            fragments: fragment.to_vec(),
            raw: frame.to_vec(),
        };
        let _ = self.take(FRAME_HEADER.saturating_add(head.len));
        self.after_fragment(block, head.flags & FLAG_END_HEADERS != 0);
        true
    }

    fn continuation(&mut self, mut block: PendingBlock) -> bool {
        let Some(header) = self.input.get(..FRAME_HEADER) else {
            self.state = State::Block(block);
            return false;
        };
        let head = FrameHead::parse(header);
        let oversized = block.fragments.len().saturating_add(head.len) > MAX_BLOCK;
        if head.kind != TYPE_CONTINUATION
            || head.stream != block.stream
            || head.len > MAX_FRAME
            || oversized
        {
            self.give_up(block);
            return true;
        }
        let Some(frame) = self.input.get(..FRAME_HEADER.saturating_add(head.len)) else {
            self.state = State::Block(block);
            return false;
        };
        block
            .fragments
            .extend_from_slice(frame.get(FRAME_HEADER..).unwrap_or_default());
        block.raw.extend_from_slice(frame);
        let _ = self.take(FRAME_HEADER.saturating_add(head.len));
        self.after_fragment(block, head.flags & FLAG_END_HEADERS != 0);
        true
    }

    fn after_fragment(&mut self, block: PendingBlock, end_headers: bool) {
        if !end_headers {
            self.state = State::Block(block);
            return;
        }
        let first = std::mem::replace(&mut self.first_block, false);
        match rewrite_block(&mut self.decoder, &block.fragments) {
            Some((_, false)) if first => {
                self.output.extend_from_slice(&block.raw);
                self.state = State::Through;
            }
            Some((fields, _)) => {
                write_block(&mut self.output, &block, &fields);
                self.state = State::Frame;
            }
            None => self.give_up(block),
        }
    }

    /// Passes a block on as it came, and everything after it.
    fn give_up(&mut self, block: PendingBlock) {
        self.output.extend_from_slice(&block.raw);
        self.state = State::Raw;
    }

    fn payload(&mut self, left: usize) -> bool {
        if self.input.is_empty() {
            self.state = State::Payload(left);
            return false;
        }
        let n = left.min(self.input.len());
        let chunk = self.take(n);
        self.output.extend_from_slice(&chunk);
        let left = left.saturating_sub(n);
        self.state = if left == 0 {
            State::Frame
        } else {
            State::Payload(left)
        };
        true
    }
}

/// A frame header (RFC 9113 §4.1).
#[derive(Clone, Copy, Debug)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    /// Parses the first 9 bytes of `b` (callers pass at least that many).
    fn parse(b: &[u8]) -> Self {
        let byte = |i: usize| b.get(i).copied().unwrap_or(0);
        FrameHead {
            len: usize::from(byte(0)) << 16 | usize::from(byte(1)) << 8 | usize::from(byte(2)),
            kind: byte(3),
            flags: byte(4),
            stream: u32::from_be_bytes([byte(5) & 0x7f, byte(6), byte(7), byte(8)]),
        }
    }
}

/// The header block fragment and priority fields of a whole HEADERS frame (§6.2), without its
/// padding; `None` if the padding does not fit.
fn headers_payload<'a>(head: &FrameHead, frame: &'a [u8]) -> Option<(&'a [u8], Option<[u8; 5]>)> {
    let mut payload = frame.get(FRAME_HEADER..)?;
    let mut pad = 0usize;
    if head.flags & FLAG_PADDED != 0 {
        let (&len, rest) = payload.split_first()?;
        pad = usize::from(len);
        payload = rest;
    }
    let mut priority = None;
    if head.flags & FLAG_PRIORITY != 0 {
        let (fields, rest) = payload.split_first_chunk::<5>()?;
        priority = Some(*fields);
        payload = rest;
    }
    let end = payload.len().checked_sub(pad)?;
    Some((payload.get(..end)?, priority))
}

/// A block's fields, and whether one was changed.
type Rewritten = (Vec<(Vec<u8>, Vec<u8>)>, bool);

/// Decodes a block with the client's table and returns its fields, with an `:authority` that
/// is not a valid URI authority replaced by `localhost`, and whether that happened. `None` if
/// the block does not decode.
fn rewrite_block(decoder: &mut loona_hpack::Decoder<'static>, block: &[u8]) -> Option<Rewritten> {
    let mut fields = decoder.decode(block).ok()?;
    let mut changed = false;
    for (name, value) in &mut fields {
        if name.as_slice() == b":authority"
            && http::uri::Authority::try_from(value.as_slice()).is_err()
        {
            *value = LOCALHOST.to_vec();
            changed = true;
        }
    }
    Some((fields, changed))
}

/// Appends an HPACK integer with an `n`-bit prefix (RFC 7541 §5.1) whose first byte has
/// `first` in the bits above the prefix.
fn put_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits).saturating_sub(1);
    if value < max {
        out.push(first | u8::try_from(value).unwrap_or(u8::MAX));
        return;
    }
    out.push(first | u8::try_from(max).unwrap_or(u8::MAX));
    value = value.saturating_sub(max);
    while value >= 0x80 {
        out.push(u8::try_from(value & 0x7f).unwrap_or(0) | 0x80);
        value >>= 7;
    }
    out.push(u8::try_from(value).unwrap_or(0));
}

/// Encodes `fields` as literals without indexing, with literal names (RFC 7541 §6.2.2).
fn encode_literals(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        put_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name);
        put_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// Appends the block as a HEADERS frame and as many CONTINUATION frames as its size needs.
fn write_block(out: &mut Vec<u8>, block: &PendingBlock, fields: &[(Vec<u8>, Vec<u8>)]) {
    let encoded = encode_literals(fields);
    let mut first_room = MAX_FRAME;
    let mut flags = 0u8;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
        first_room = first_room.saturating_sub(5);
    }
    let (first, mut rest) = encoded.split_at(first_room.min(encoded.len()));
    let put_frame = |out: &mut Vec<u8>, kind: u8, flags: u8, prefix: &[u8], body: &[u8]| {
        let len = prefix.len().saturating_add(body.len());
        let len = u32::try_from(len).unwrap_or(0).to_be_bytes();
        out.extend_from_slice(len.get(1..).unwrap_or_default());
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&block.stream.to_be_bytes());
        out.extend_from_slice(prefix);
        out.extend_from_slice(body);
    };
    let end = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
    let priority = block.priority.unwrap_or_default();
    let prefix: &[u8] = if block.priority.is_some() {
        &priority
    } else {
        &[]
    };
    put_frame(out, TYPE_HEADERS, flags | end, prefix, first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(MAX_FRAME.min(rest.len()));
        rest = tail;
        let end = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        put_frame(out, TYPE_CONTINUATION, end, &[], chunk);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pending < this.output.len() {
                let ready = this.output.get(this.pending..).unwrap_or_default();
                let n = ready.len().min(buf.remaining());
                buf.put_slice(ready.get(..n).unwrap_or_default());
                this.pending = this.pending.saturating_add(n);
                if this.pending == this.output.len() {
                    this.output.clear();
                    this.pending = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Whatever is left unparsed goes as it is: the server sees the truncation.
                let rest = std::mem::take(&mut this.input);
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output = rest;
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                if let State::Block(block) = std::mem::replace(&mut this.state, State::Raw) {
                    this.give_up(block);
                }
                continue;
            }
            this.input.extend_from_slice(read.filled());
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "test code builds and reads frames it made itself"
)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A frame with `payload`.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = len[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An HPACK literal field with incremental indexing and a literal name (RFC 7541 §6.2.1):
    /// the client's table gets it, so a later block can refer to it by index.
    fn indexed_literal(name: &str, value: &str) -> Vec<u8> {
        let mut b = vec![0x40, u8::try_from(name.len()).unwrap()];
        b.extend_from_slice(name.as_bytes());
        b.push(u8::try_from(value.len()).unwrap());
        b.extend_from_slice(value.as_bytes());
        b
    }

    /// Runs client bytes through the adapter and returns what the server would read.
    async fn through(client: &[u8]) -> Vec<u8> {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(client).await.unwrap();
        drop(a);
        let mut fix = AuthorityFix::new(b);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        out
    }

    /// A frame the server reads: type, flags, stream and (at `END_HEADERS`) the block's fields.
    type Seen = (u8, u8, u32, Vec<(String, String)>);

    /// Splits server-side bytes (after the preface) into frames, and decodes the header blocks
    /// with one decoder, as the server does.
    fn server_view(bytes: &[u8]) -> Vec<Seen> {
        let mut rest = bytes.strip_prefix(PREFACE.as_slice()).unwrap();
        let mut decoder = loona_hpack::Decoder::new();
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let head = FrameHead::parse(rest);
            let payload = &rest[FRAME_HEADER..FRAME_HEADER + head.len];
            rest = &rest[FRAME_HEADER + head.len..];
            let fields = if matches!(head.kind, TYPE_HEADERS | TYPE_CONTINUATION) {
                let fragment = if head.flags & FLAG_PRIORITY != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                block.extend_from_slice(fragment);
                if head.flags & FLAG_END_HEADERS == 0 {
                    Vec::new()
                } else {
                    let fields = decoder.decode(&std::mem::take(&mut block)).unwrap();
                    fields
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect()
                }
            } else {
                Vec::new()
            };
            frames.push((head.kind, head.flags, head.stream, fields));
        }
        frames
    }

    fn authority(fields: &[(String, String)]) -> Option<&str> {
        fields
            .iter()
            .find(|(n, _)| n == ":authority")
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn what_c_core_sends_is_no_authority_and_what_go_sends_is() {
        // grpcio 1.85 on "unix:/tmp/probe dir/sock+x.sock" (seen on the wire here).
        http::uri::Authority::try_from("tmp%2Fprobe%20dir%2Fsock+x.sock").unwrap_err();
        http::uri::Authority::try_from("localhost").unwrap();
    }

    #[tokio::test]
    async fn a_bad_authority_becomes_localhost_and_the_table_stays_in_step() {
        let mut client = PREFACE.to_vec();
        // SETTINGS passes as it is.
        client.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        // Block 1: the client indexes a bad authority and a custom header.
        let mut b1 = indexed_literal(":authority", "run%2Fsandboxer%2Fsandboxer.sock");
        b1.extend(indexed_literal("x-id", "42"));
        b1.extend([0x83, 0x86]); // :method POST, :scheme http (static)
        client.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b1));
        client.extend(frame(0x0, FLAG_END_STREAM, 1, b"hello"));
        // Block 2: refers to both by index (62 = x-id, 63 = :authority), padded, with
        // priority, cut in two by a CONTINUATION.
        let mut payload = vec![3u8]; // pad length
        payload.extend([0, 0, 0, 0, 16]); // priority: stream dependency, weight
        payload.extend([0xbf, 0x80 | 62]); // indexed 63, indexed 62
        payload.extend([0, 0, 0]); // padding
        client.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &payload,
        ));
        client.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[0x83]));

        let seen = server_view(&through(&client).await);
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen[0].0, 0x4);
        let (kind, flags, stream, fields) = &seen[1];
        assert_eq!(
            (*kind, *flags, *stream),
            (TYPE_HEADERS, FLAG_END_HEADERS, 1)
        );
        assert_eq!(authority(fields), Some("localhost"));
        assert!(fields.contains(&("x-id".into(), "42".into())));
        assert_eq!(seen[2].0, 0x0);
        let (kind, flags, stream, fields) = &seen[3];
        assert_eq!(*kind, TYPE_HEADERS);
        assert_eq!(
            *flags,
            FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS,
            "padding dropped, one frame"
        );
        assert_eq!(*stream, 3);
        assert_eq!(authority(fields), Some("localhost"));
        assert!(fields.contains(&("x-id".into(), "42".into())));
        assert!(fields.contains(&(":method".into(), "POST".into())));
    }

    #[tokio::test]
    async fn bytes_that_come_one_at_a_time_give_the_same_result() {
        let mut client = PREFACE.to_vec();
        let mut b = indexed_literal(":authority", "x%2Fy");
        b.extend([0x83]);
        client.extend(frame(TYPE_HEADERS, FLAG_PADDED | FLAG_END_HEADERS, 1, &{
            let mut p = vec![2];
            p.extend(&b);
            p.extend([0, 0]);
            p
        }));
        client.extend(frame(0x0, FLAG_END_STREAM, 1, b"body"));
        let whole = through(&client).await;
        let (mut a, rx) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            for byte in client {
                a.write_all(&[byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut trickled = Vec::new();
        AuthorityFix::new(rx)
            .read_to_end(&mut trickled)
            .await
            .unwrap();
        writer.await.unwrap();
        assert_eq!(trickled, whole);
        assert_eq!(authority(&server_view(&whole)[0].3), Some("localhost"));
    }

    #[tokio::test]
    async fn a_good_authority_and_other_frames_pass_unchanged() {
        let mut client = PREFACE.to_vec();
        let mut b = indexed_literal(":authority", "localhost");
        b.extend([0x83]);
        client.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
        let data = vec![7u8; 40_000];
        client.extend(frame(0x0, 0, 1, &data));
        let out = through(&client).await;
        let seen = server_view(&out);
        assert_eq!(authority(&seen[0].3), Some("localhost"));
        assert!(out.ends_with(&frame(0x0, 0, 1, &data)));
        // The first block needed nothing: all of it went as it came.
        assert_eq!(out, client);
    }

    #[tokio::test]
    async fn after_a_first_block_that_needs_nothing_the_connection_passes_as_it_came() {
        let mut client = PREFACE.to_vec();
        // Block 1 indexes a good authority and a header; block 2 refers to both by index.
        let mut b1 = indexed_literal(":authority", "localhost");
        b1.extend(indexed_literal("x-id", "42"));
        b1.extend([0x83, 0x86]);
        client.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b1));
        client.extend(frame(0x0, FLAG_END_STREAM, 1, b"hello"));
        client.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            3,
            &[0xbf, 0x80 | 62, 0x83],
        ));
        let out = through(&client).await;
        assert_eq!(out, client, "nothing re-encoded");
        // The server decodes the client's own encoding, its table in step.
        let seen = server_view(&out);
        assert_eq!(authority(&seen[2].3), Some("localhost"), "{seen:?}");
        assert!(seen[2].3.contains(&("x-id".into(), "42".into())));
    }

    #[tokio::test]
    async fn a_large_block_is_cut_to_the_frame_size() {
        let mut client = PREFACE.to_vec();
        let mut b = indexed_literal(":authority", "a%2Fb");
        let big = "v".repeat(30_000);
        // Literal without indexing, literal name, 2-byte-prefixed length.
        b.extend([0x00, 5]);
        b.extend(b"x-big");
        b.push(0x7f);
        let mut len = Vec::new();
        put_int(&mut len, 0, 7, big.len());
        b.extend(&len[1..]);
        b.extend(big.as_bytes());
        client.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b[..10_000]));
        let seen_raw = through(&client).await;
        // Cut short by the client: the block never ended, so it passes as it came.
        assert_eq!(seen_raw, client);

        let mut client = PREFACE.to_vec();
        client.extend(frame(TYPE_HEADERS, 0, 1, &b[..10_000]));
        client.extend(frame(TYPE_CONTINUATION, 0, 1, &b[10_000..20_000]));
        client.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &b[20_000..]));
        let seen = server_view(&through(&client).await);
        assert!(seen.len() >= 2);
        assert!(
            seen.iter()
                .all(|f| f.0 == TYPE_HEADERS || f.0 == TYPE_CONTINUATION)
        );
        let fields = &seen.last().unwrap().3;
        assert_eq!(authority(fields), Some("localhost"));
        assert!(fields.contains(&("x-big".into(), big)));
    }

    #[tokio::test]
    async fn what_is_not_http2_passes_as_it_came() {
        assert_eq!(
            through(b"GET / HTTP/1.1\r\n\r\n").await,
            b"GET / HTTP/1.1\r\n\r\n"
        );
        // A CONTINUATION with no open block, and a block that does not decode.
        for bad in [
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x83]),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]),
        ] {
            let mut client = PREFACE.to_vec();
            client.extend(&bad);
            client.extend(frame(0x0, 0, 1, b"after"));
            assert_eq!(through(&client).await, client);
        }
    }
}
