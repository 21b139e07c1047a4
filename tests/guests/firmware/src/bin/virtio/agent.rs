// SPDX-License-Identifier: Apache-2.0
//! `virtio.test=agent`: behaves like the sandboxer's guest agent on the wire, so the host's
//! agent path (ready signal, ttrpc client, Setup, Shutdown) runs on a KVM that cannot boot
//! Linux. First socket device only.
//!
//! 1. Dials the host (CID 2) on port `sandboxer.ready_port` (default [`DEFAULT_READY_PORT`]),
//!    writes `READY 1024\n` and closes that connection (a refused dial is retried a few times).
//! 2. Accepts connections on [`AGENT_PORT`] (up to [`MAX_CONNS`] at once) and answers every
//!    ttrpc request frame with an OK response with an empty payload, forever, waiting in
//!    `sti; hlt` between packets. Idle, it takes no timer tick: the LAPIC timer runs only while
//!    a wait has a bound ([`firmware::irq`]), and the serving loop's bound is [`IDLE`].
//! 3. With `agent.counter_port=<port>`, it also keeps a counter and a connection to the host
//!    port that carries it (`counter.rs`), ticking every `agent.counter_ms` (10 ms by default) while it serves.
//! 4. With `agent.dirty_kib=<n>`, at every ttrpc connection it accepts (the host's first
//!    call to a clone, a new process's after a live handover) it writes the connection's number
//!    into each page of an `n` KiB buffer taken at start, and leaves them alone until the
//!    next: pages a clone wrote and keeps, as a real guest's page cache and heap are.
//!
//! A transport-reset event (§5.10.6.7) drops every connection the agent holds; new host
//! connections are accepted as before.
//!
//! ttrpc framing: a 10-byte header (payload length u32 BE, stream id u32 BE, type u8 with 1 =
//! request and 2 = response, flags u8), then the payload. A request's payload is the protobuf
//! `Request {service = 1; method = 2; payload = 3; ...}`; an empty `Response` (zero bytes)
//! decodes as status OK with an empty payload.
//!
//! Console: `agent: ready 1024` once the line was sent; per request, before its answer,
//! `agent: request <service>/<method>` unless `agent.quiet=1`; with `agent.exit_on_shutdown=1`
//! a `sandboxer.agent.v1.Control/Shutdown` request is answered, then `agent: exiting` and a
//! triple fault end the VM. A failure prints `agent: FAIL <step> <why>` and triple faults.

use core::time::Duration;

use firmware::dma::{Arena, DmaBuf};
use firmware::virtio::vsock::{
    EVENT_TRANSPORT_RESET, HOST_CID, MAX_DATA, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, Vsock,
};
use firmware::virtio::{self, DEVICE_ID_VSOCK, VirtioError};
use firmware::{exit, irq, println};

use crate::counter::Counter;
use crate::vsock::{Conn, Event, reject};
use crate::{Devices, Failure, Text};

/// Host port that receives the ready line unless `sandboxer.ready_port` says otherwise.
pub const DEFAULT_READY_PORT: u32 = 1025;
/// Guest port the ttrpc "server" listens on (announced in the ready line).
pub const AGENT_PORT: u32 = 1024;
/// Host connections served at once.
const MAX_CONNS: usize = 4;
/// First guest port used to dial the ready port (one more per retry).
const READY_LOCAL_PORT: u32 = 49_152;
/// Dials of the ready port before giving up.
const READY_TRIES: u32 = 20;
/// Bound on each step of the ready dial.
const STEP: Duration = Duration::from_secs(5);
/// Bound on one wait for a packet while serving (the loop then checks the device and waits
/// again). An idle agent takes one timer interrupt per this bound and nothing else: it has no
/// periodic tick.
const IDLE: Duration = Duration::from_secs(60);
/// Pause before dialling the ready port again after a refusal.
const REDIAL: Duration = Duration::from_millis(10);
/// Time the device gets to take the Shutdown answer off the queue before the VM ends.
const DRAIN: Duration = Duration::from_millis(20);
/// Request bytes kept to find the service and method names (they come first).
const KEEP: usize = 256;
/// ttrpc frame header length.
const FRAME_HDR: usize = 10;
/// ttrpc message types.
const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;
/// `SHUTDOWN` flags of a full close.
const BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// The counter's tick unless `agent.counter_ms` says otherwise.
const DEFAULT_COUNTER_MS: u64 = 10;
/// Largest `agent.dirty_kib`.
const MAX_DIRTY_KIB: u64 = 64 << 10;

/// Options from the command line.
struct Options {
    ready_port: u32,
    quiet: bool,
    exit_on_shutdown: bool,
    /// Host port of the counter connection (`agent.counter_port`); none: no counter.
    counter_port: Option<u32>,
    /// The counter's tick in ms (`agent.counter_ms`, 1 to 60000).
    counter_ms: u64,
    /// KiB written at each accepted connection (`agent.dirty_kib`, at most [`MAX_DIRTY_KIB`]).
    dirty_kib: u64,
}

impl Options {
    /// One pass over the command line (every guest instruction is emulated on the project's
    /// `kvm_pvm` host, so each scan costs); the last occurrence of a key wins.
    fn parse(cmdline: &[u8]) -> Self {
        let mut opts = Self {
            ready_port: DEFAULT_READY_PORT,
            quiet: false,
            exit_on_shutdown: false,
            counter_port: None,
            counter_ms: DEFAULT_COUNTER_MS,
            dirty_kib: 0,
        };
        for word in virtio::words(cmdline) {
            if let Some(v) = word.strip_prefix(b"sandboxer.ready_port=") {
                opts.ready_port = virtio::parse_number(v, false)
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(DEFAULT_READY_PORT);
            } else if let Some(v) = word.strip_prefix(b"agent.quiet=") {
                opts.quiet = v == b"1";
            } else if let Some(v) = word.strip_prefix(b"agent.exit_on_shutdown=") {
                opts.exit_on_shutdown = v == b"1";
            } else if let Some(v) = word.strip_prefix(b"agent.counter_port=") {
                opts.counter_port =
                    virtio::parse_number(v, false).and_then(|v| u32::try_from(v).ok());
            } else if let Some(v) = word.strip_prefix(b"agent.counter_ms=") {
                opts.counter_ms = virtio::parse_number(v, false)
                    .filter(|ms| (1..=60_000).contains(ms))
                    .unwrap_or(DEFAULT_COUNTER_MS);
            } else if let Some(v) = word.strip_prefix(b"agent.dirty_kib=") {
                opts.dirty_kib = virtio::parse_number(v, false)
                    .filter(|kib| *kib <= MAX_DIRTY_KIB)
                    .unwrap_or(0);
            }
        }
        opts
    }
}

/// One host connection and its frame reassembly state.
struct RpcConn {
    conn: Conn,
    hdr: [u8; FRAME_HDR],
    hdr_have: usize,
    body_len: usize,
    body_have: usize,
    body: [u8; KEEP],
}

/// What a completed request asks for.
enum Call {
    Nothing,
    Shutdown,
}

impl RpcConn {
    fn new(conn: Conn) -> Self {
        Self {
            conn,
            hdr: [0; FRAME_HDR],
            hdr_have: 0,
            body_len: 0,
            body_have: 0,
            body: [0; KEEP],
        }
    }

    /// Consumes received bytes; answers each complete request frame.
    fn feed(&mut self, vs: &mut Vsock, mut data: &[u8], opts: &Options) -> Result<Call, Failure> {
        let mut call = Call::Nothing;
        while !data.is_empty() {
            if self.hdr_have < FRAME_HDR {
                let take = (FRAME_HDR - self.hdr_have).min(data.len());
                if let (Some(dst), Some(src)) = (
                    self.hdr.get_mut(self.hdr_have..self.hdr_have + take),
                    data.get(..take),
                ) {
                    dst.copy_from_slice(src);
                }
                self.hdr_have += take;
                data = data.get(take..).unwrap_or_default();
                if self.hdr_have < FRAME_HDR {
                    break;
                }
                let [l0, l1, l2, l3, ..] = self.hdr;
                self.body_len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
                self.body_have = 0;
            } else {
                let take = (self.body_len - self.body_have).min(data.len());
                let keep_end = (self.body_have + take).min(KEEP);
                if self.body_have < keep_end {
                    let n = keep_end - self.body_have;
                    if let (Some(dst), Some(src)) =
                        (self.body.get_mut(self.body_have..keep_end), data.get(..n))
                    {
                        dst.copy_from_slice(src);
                    }
                }
                self.body_have += take;
                data = data.get(take..).unwrap_or_default();
            }
            if self.hdr_have == FRAME_HDR && self.body_have == self.body_len {
                if let Call::Shutdown = self.complete(vs, opts)? {
                    call = Call::Shutdown;
                }
                self.hdr_have = 0;
                self.body_len = 0;
                self.body_have = 0;
            }
        }
        Ok(call)
    }

    /// A whole frame arrived: answer a request with an empty OK response.
    fn complete(&mut self, vs: &mut Vsock, opts: &Options) -> Result<Call, Failure> {
        let [_, _, _, _, s0, s1, s2, s3, kind, _] = self.hdr;
        if kind != TYPE_REQUEST {
            return Ok(Call::Nothing);
        }
        let mut reply = [0u8; FRAME_HDR];
        if let Some(sid) = reply.get_mut(4..8) {
            sid.copy_from_slice(&[s0, s1, s2, s3]);
        }
        if let Some(t) = reply.get_mut(8) {
            *t = TYPE_RESPONSE;
        }
        let kept = self.body.get(..self.body_len.min(KEEP)).unwrap_or_default();
        let (service, method) = names(kept);
        // Printed before the answer: once the host has the answer, the line is in the log.
        if !opts.quiet {
            println!("agent: request {}/{}", Text(service), Text(method));
        }
        let mut scratch = [0u8; 64];
        self.conn.send_data(vs, &reply, &mut scratch)?;
        if service == b"sandboxer.agent.v1.Control" && method == b"Shutdown" {
            return Ok(Call::Shutdown);
        }
        Ok(Call::Nothing)
    }
}

/// Reads a protobuf varint.
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The `service` (1) and `method` (2) strings of an encoded ttrpc `Request` (empty if absent
/// or cut off).
fn names(mut buf: &[u8]) -> (&[u8], &[u8]) {
    let (mut service, mut method): (&[u8], &[u8]) = (&[], &[]);
    while !buf.is_empty() {
        let Some(tag) = varint(&mut buf) else { break };
        let skip = match tag & 7 {
            0 => {
                if varint(&mut buf).is_none() {
                    break;
                }
                0
            }
            1 => 8,
            2 => {
                let Some(len) = varint(&mut buf).and_then(|l| usize::try_from(l).ok()) else {
                    break;
                };
                let Some(value) = buf.get(..len) else { break };
                match tag >> 3 {
                    1 => service = value,
                    2 => method = value,
                    _ => {}
                }
                len
            }
            5 => 4,
            _ => break,
        };
        let Some(rest) = buf.get(skip..) else { break };
        buf = rest;
    }
    (service, method)
}

fn fail(step: &str, why: impl core::fmt::Display) -> ! {
    println!("agent: FAIL {step} {why}");
    exit::triple_fault()
}

/// Runs the agent on the first socket device; never returns.
pub fn run(cmdline: &[u8], devices: &Devices, arena: &mut Arena) -> ! {
    let opts = Options::parse(cmdline);
    let Some(dev) = devices.of_type(DEVICE_ID_VSOCK).next() else {
        fail("probe", "no vsock device")
    };
    let mut vs = match Vsock::new(dev, arena) {
        Ok(vs) => vs,
        Err(e) => fail("init", e),
    };
    let dirty = match usize::try_from(opts.dirty_kib.div_ceil(4)) {
        Ok(0) | Err(_) => None,
        Ok(pages) => Some(
            arena
                .pages(pages)
                .unwrap_or_else(|| fail("dirty", "no RAM left")),
        ),
    };
    let mut scratch = [0u8; MAX_DATA];
    if let Err(e) = announce(&mut vs, &mut scratch, opts.ready_port) {
        fail("ready", e);
    }
    serve(&mut vs, &mut scratch, &opts, dirty)
}

/// Writes `n` into the first bytes of every page of `buf` (`agent.dirty_kib`).
fn dirty_pages(buf: &mut DmaBuf, n: u64) {
    for page in buf.bytes_mut().chunks_exact_mut(firmware::dma::PAGE_LEN) {
        if let Some(head) = page.get_mut(..8) {
            head.copy_from_slice(&n.to_le_bytes());
        }
    }
}

/// Dials the ready port and sends the ready line, retrying a refused dial.
fn announce(vs: &mut Vsock, scratch: &mut [u8], port: u32) -> Result<(), Failure> {
    let cid = vs.guest_cid();
    for attempt in 0..READY_TRIES {
        let mut conn = Conn::new(cid, READY_LOCAL_PORT + attempt, HOST_CID, port);
        conn.send(vs, OP_REQUEST, 0)?;
        let accepted = loop {
            let (h, n) = vs
                .recv(STEP, scratch)
                .map_err(|e| Failure::During("connect", e))?;
            if !conn.is_ours(&h) {
                reject(vs, &h)?;
                continue;
            }
            match conn.handle(vs, &h, n)? {
                Event::Response => break true,
                Event::Reset => break false,
                Event::Nothing => {}
                Event::Data(_) | Event::Shutdown(_) => return Err(Failure::UnexpectedOp(h.op)),
                Event::Unexpected(op) => return Err(Failure::UnexpectedOp(op)),
            }
        };
        if !accepted {
            // Nobody listens yet: wait a little and dial again.
            irq::sleep(REDIAL);
            continue;
        }
        let mut line = [0u8; 16];
        let text = b"READY 1024\n";
        let line = line.get_mut(..text.len()).ok_or(Failure::Msg("line"))?;
        line.copy_from_slice(text);
        conn.send_data(vs, line, scratch)?;
        // On the console before the connection closes: a host that snapshots this guest once
        // the ready connection is gone (a VM template) has the line in the template's console,
        // never in a clone's.
        println!("agent: ready {AGENT_PORT}");
        // The host reads one line and closes; its RST or SHUTDOWN arrives while serving and
        // is answered there (as a packet of no connection).
        conn.send(vs, OP_SHUTDOWN, BOTH)?;
        return Ok(());
    }
    Err(Failure::Msg("the host refused every dial"))
}

/// Serves ttrpc connections on [`AGENT_PORT`] forever (and ticks the counter, if any).
fn serve(vs: &mut Vsock, scratch: &mut [u8], opts: &Options, mut dirty: Option<DmaBuf>) -> ! {
    let mut cid = vs.guest_cid();
    let mut conns: [Option<RpcConn>; MAX_CONNS] = [const { None }; MAX_CONNS];
    let mut counter = opts
        .counter_port
        .map(|port| Counter::start(vs, port).unwrap_or_else(|e| fail("counter", e)));
    // Packets do not postpone a tick: the deadline lives across receives.
    let period = Duration::from_millis(opts.counter_ms);
    let mut tick = irq::Deadline::after(period);
    let mut events = vs.events().0;
    let mut accepted = 0u64;
    loop {
        let received = match counter {
            Some(_) => vs.recv_within(&mut tick, scratch),
            None => vs.recv(IDLE, scratch),
        };
        // Events are taken inside the driver's receive and send: before this packet, which may
        // already be the new host's, forget every connection a transport reset dropped.
        let (seen, last) = vs.events();
        if seen != events {
            events = seen;
            if last == EVENT_TRANSPORT_RESET {
                conns = [const { None }; MAX_CONNS];
                cid = vs.guest_cid();
                if let Some(c) = counter.as_mut() {
                    c.transport_reset();
                }
            }
        }
        let (h, n) = match received {
            Ok(p) => p,
            Err(VirtioError::Timeout) => {
                if let Some(c) = counter.as_mut() {
                    tick = irq::Deadline::after(period);
                    // A counter that cannot send (a host too busy to take its packets in
                    // time) drops its link and dials again at the next tick: it never ends
                    // the guest.
                    if c.tick(vs).is_err() {
                        c.transport_reset();
                    }
                }
                continue;
            }
            Err(e) => fail("recv", e),
        };
        if let Some(c) = counter.as_mut().filter(|c| c.owns(&h)) {
            if c.handle(vs, &h, n).is_err() {
                c.transport_reset();
            }
            continue;
        }
        let data = scratch.get(..n).unwrap_or_default();
        let owner = conns
            .iter_mut()
            .find(|c| c.as_ref().is_some_and(|c| c.conn.is_ours(&h)));
        let Some(slot) = owner else {
            let is_new = h.op == OP_REQUEST
                && h.kind == TYPE_STREAM
                && h.dst_cid == cid
                && h.dst_port == AGENT_PORT;
            let free = conns.iter_mut().find(|c| c.is_none());
            let result = match (is_new, free) {
                (true, Some(free)) => {
                    let mut c = Conn::new(cid, AGENT_PORT, h.src_cid, h.src_port);
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    let sent = c.send(vs, OP_RESPONSE, 0);
                    *free = Some(RpcConn::new(c));
                    accepted += 1;
                    if let Some(buf) = dirty.as_mut() {
                        dirty_pages(buf, accepted);
                    }
                    sent
                }
                _ => reject(vs, &h),
            };
            if let Err(e) = result {
                fail("accept", e);
            }
            continue;
        };
        let Some(rpc) = slot.as_mut() else { continue };
        let event = match rpc.conn.handle(vs, &h, n) {
            Ok(event) => event,
            Err(e) => fail("packet", e),
        };
        let close = match event {
            Event::Data(_) => match rpc.feed(vs, data, opts) {
                Ok(Call::Shutdown) if opts.exit_on_shutdown => {
                    // Let the device take the response off the queue before the VM ends.
                    irq::sleep(DRAIN);
                    println!("agent: exiting");
                    exit::triple_fault()
                }
                Ok(_) => false,
                Err(e) => fail("reply", e),
            },
            Event::Shutdown(_) => {
                let _ = rpc.conn.send(vs, OP_RST, 0);
                true
            }
            Event::Reset => true,
            Event::Nothing | Event::Response | Event::Unexpected(_) => false,
        };
        if close {
            *slot = None;
        }
    }
}
