// SPDX-License-Identifier: Apache-2.0
//! The socket test (device id 19), first socket device only, one connection at a time.
//!
//! Console:
//! - `virtio: vsock: cid <guest_cid>`
//! - `virtio: vsock: echo ok`: guest port [`GUEST_PORT`] connected to host port
//!   [`HOST_PORT`] (CID 2), sent [`PING`], read the same bytes back, shut down (both
//!   directions) and saw the host's RST or SHUTDOWN; the device's line must have interrupted
//! - `virtio: vsock: listening 6000`, then per host connection to [`LISTEN_PORT`]
//!   `virtio: vsock: closed <cid>:<port> echoed <bytes>` (every payload is sent back in ASCII
//!   upper case until the host shuts down: a full close is answered with RST, a half close
//!   with the guest's own SHUTDOWN, then the device's RST ends it), and after [`SERVE_COUNT`]
//!   of them `virtio: vsock: served 2`
//! - `virtio: vsock: events <n> last <id>` when the event queue delivered any
//! - `virtio: vsock: interrupts <n>`
//!
//! Credit (§5.10.6.3): the guest advertises `buf_alloc` [`BUF_ALLOC`] and the bytes it has
//! consumed (`fwd_cnt`), sends a CREDIT_UPDATE when half the buffer was consumed since the
//! last one it sent, answers CREDIT_REQUEST with CREDIT_UPDATE, and never sends more than the
//! host's advertised free space (asking with CREDIT_REQUEST when it is short).

use core::time::Duration;

use firmware::dma::Arena;
use firmware::virtio::vsock::{
    HOST_CID, Header, MAX_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, Vsock,
};
use firmware::virtio::{DEVICE_ID_VSOCK, VirtioError};
use firmware::{irq, println};

use crate::{Devices, Failure, Report};

/// Guest port of the guest -> host connection.
pub const GUEST_PORT: u32 = 1234;
/// Host port the guest connects to (an echo server).
pub const HOST_PORT: u32 = 5000;
/// Guest port the guest listens on.
pub const LISTEN_PORT: u32 = 6000;
/// What the guest sends to the host echo server.
pub const PING: &[u8] = b"ping from guest";
/// Host connections served before the test ends.
pub const SERVE_COUNT: u32 = 2;
/// The guest's receive buffer per connection.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// Bound on each step of a connection.
const STEP: Duration = Duration::from_secs(5);
/// Bound on the wait for the next host connection (and on any silence while serving).
const ACCEPT: Duration = Duration::from_secs(30);
/// `SHUTDOWN` flags of a full close.
const BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
/// Credit requests sent while waiting for send space.
const CREDIT_TRIES: u32 = 4;

/// One stream connection's state.
pub(crate) struct Conn {
    guest_cid: u64,
    local_port: u32,
    pub(crate) peer_cid: u64,
    pub(crate) peer_port: u32,
    pub(crate) peer_buf_alloc: u32,
    pub(crate) peer_fwd_cnt: u32,
    /// Bytes sent, modulo 2^32.
    tx_cnt: u32,
    /// Bytes consumed, modulo 2^32.
    fwd_cnt: u32,
    /// `fwd_cnt` last told to the peer.
    fwd_cnt_sent: u32,
}

/// What a packet on the connection meant.
pub(crate) enum Event {
    /// The peer accepted the connection.
    Response,
    /// `n` bytes of data were copied into the buffer.
    Data(usize),
    /// The peer shut down (its `SHUTDOWN_*` flags).
    Shutdown(u32),
    /// The peer reset the connection.
    Reset,
    /// Credit traffic or a packet for another connection: nothing for the caller.
    Nothing,
    /// A packet the connection did not expect (op).
    Unexpected(u16),
}

impl Conn {
    pub(crate) fn new(guest_cid: u64, local_port: u32, peer_cid: u64, peer_port: u32) -> Self {
        Self {
            guest_cid,
            local_port,
            peer_cid,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
        }
    }

    fn header(&mut self, op: u16, flags: u32) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: self.guest_cid,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    pub(crate) fn send(&mut self, vs: &mut Vsock, op: u16, flags: u32) -> Result<(), Failure> {
        let hdr = self.header(op, flags);
        vs.send(&hdr, &[])?;
        Ok(())
    }

    pub(crate) fn is_ours(&self, h: &Header) -> bool {
        h.src_cid == self.peer_cid
            && h.src_port == self.peer_port
            && h.dst_cid == self.guest_cid
            && h.dst_port == self.local_port
    }

    /// Free space in the peer's receive buffer.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Handles a packet received for any connection: credit bookkeeping and replies here,
    /// the rest is returned.
    pub(crate) fn handle(
        &mut self,
        vs: &mut Vsock,
        h: &Header,
        len: usize,
    ) -> Result<Event, Failure> {
        if !self.is_ours(h) {
            reject(vs, h)?;
            return Ok(Event::Nothing);
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        Ok(match h.op {
            OP_RESPONSE => Event::Response,
            OP_RW => {
                self.fwd_cnt = self.fwd_cnt.wrapping_add(u32::try_from(len).unwrap_or(0));
                if self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= BUF_ALLOC / 2 {
                    self.send(vs, OP_CREDIT_UPDATE, 0)?;
                }
                Event::Data(len)
            }
            OP_CREDIT_REQUEST => {
                self.send(vs, OP_CREDIT_UPDATE, 0)?;
                Event::Nothing
            }
            OP_CREDIT_UPDATE => Event::Nothing,
            OP_SHUTDOWN => Event::Shutdown(h.flags),
            OP_RST => Event::Reset,
            op => Event::Unexpected(op),
        })
    }

    /// Sends `data` as one RW packet once the peer has room, asking for credit if needed.
    pub(crate) fn send_data(
        &mut self,
        vs: &mut Vsock,
        data: &[u8],
        scratch: &mut [u8],
    ) -> Result<(), Failure> {
        let mut tries = 0;
        while !self.try_send_data(vs, data)? {
            if tries == CREDIT_TRIES {
                return Err(Failure::Msg("no credit from the peer"));
            }
            tries += 1;
            self.send(vs, OP_CREDIT_REQUEST, 0)?;
            let (h, n) = vs
                .recv(STEP, scratch)
                .map_err(|e| Failure::During("credit", e))?;
            match self.handle(vs, &h, n)? {
                Event::Nothing => {}
                Event::Data(_) => return Err(Failure::Msg("data while waiting for credit")),
                Event::Shutdown(_) | Event::Reset => {
                    return Err(Failure::Msg("closed while waiting for credit"));
                }
                Event::Response => return Err(Failure::UnexpectedOp(OP_RESPONSE)),
                Event::Unexpected(op) => return Err(Failure::UnexpectedOp(op)),
            }
        }
        Ok(())
    }

    /// Sends `data` as one RW packet if the peer has room for it now; `false` (nothing sent)
    /// when it has not. Never waits for credit.
    pub(crate) fn try_send_data(&mut self, vs: &mut Vsock, data: &[u8]) -> Result<bool, Failure> {
        let len = u32::try_from(data.len()).map_err(|_| Failure::Msg("payload too large"))?;
        if self.peer_free() < len {
            return Ok(false);
        }
        let hdr = self.header(OP_RW, 0);
        vs.send(&hdr, data)?;
        self.tx_cnt = self.tx_cnt.wrapping_add(len);
        Ok(true)
    }
}

/// Answers a packet that belongs to no connection with RST (unless it is one).
pub(crate) fn reject(vs: &mut Vsock, h: &Header) -> Result<(), Failure> {
    if h.op == OP_RST {
        return Ok(());
    }
    let rst = Header {
        src_cid: h.dst_cid,
        dst_cid: h.src_cid,
        src_port: h.dst_port,
        dst_port: h.src_port,
        len: 0,
        kind: h.kind,
        op: OP_RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    };
    vs.send(&rst, &[])?;
    Ok(())
}

/// Runs the test on the first socket device.
pub fn run(devices: &Devices, arena: &mut Arena, report: &mut Report, explicit: bool) {
    let Some(dev) = devices.of_type(DEVICE_ID_VSOCK).next() else {
        if explicit {
            report.fail("vsock", "probe", "no device");
        } else {
            println!("virtio: vsock: not present");
        }
        return;
    };
    let mut vs = match Vsock::new(dev, arena) {
        Ok(vs) => vs,
        Err(e) => return report.fail("vsock", "init", e),
    };
    println!("virtio: vsock: cid {}", vs.guest_cid());
    let mut scratch = [0u8; MAX_DATA];
    report.check("vsock", "echo", echo(&mut vs, &mut scratch));
    println!("virtio: vsock: listening {LISTEN_PORT}");
    match serve(&mut vs, &mut scratch) {
        Ok(()) => println!("virtio: vsock: served {SERVE_COUNT}"),
        Err((served, why)) => report.fail(
            "vsock",
            "serve",
            format_args!("{why} after {served} served"),
        ),
    }
    let (events, last) = vs.events();
    if events != 0 {
        println!("virtio: vsock: events {events} last {last}");
    }
    println!(
        "virtio: vsock: interrupts {}",
        vs.transport().interrupt_count()
    );
}

/// Guest -> host: connect, ping, read the echo, shut down.
fn echo(vs: &mut Vsock, scratch: &mut [u8]) -> Result<(), Failure> {
    let mut conn = Conn::new(vs.guest_cid(), GUEST_PORT, HOST_CID, HOST_PORT);
    conn.send(vs, OP_REQUEST, 0)?;
    loop {
        let (h, n) = vs
            .recv(STEP, scratch)
            .map_err(|e| Failure::During("connect", e))?;
        match conn.handle(vs, &h, n)? {
            Event::Response => break,
            Event::Reset => return Err(Failure::Msg("connection refused")),
            Event::Nothing => {}
            Event::Data(_) | Event::Shutdown(_) => return Err(Failure::UnexpectedOp(h.op)),
            Event::Unexpected(op) => return Err(Failure::UnexpectedOp(op)),
        }
    }
    conn.send_data(vs, PING, scratch)?;
    let mut echoed = [0u8; 32];
    let mut have = 0;
    while have < PING.len() {
        let (h, n) = vs
            .recv(STEP, scratch)
            .map_err(|e| Failure::During("echo", e))?;
        match conn.handle(vs, &h, n)? {
            Event::Data(n) => {
                let end = have + n;
                match (echoed.get_mut(have..end), scratch.get(..n)) {
                    (Some(dst), Some(src)) => dst.copy_from_slice(src),
                    _ => return Err(Failure::Msg("echo longer than sent")),
                }
                have = end;
            }
            Event::Nothing => {}
            Event::Shutdown(_) | Event::Reset => {
                return Err(Failure::Msg("closed before the echo"));
            }
            Event::Response => return Err(Failure::UnexpectedOp(OP_RESPONSE)),
            Event::Unexpected(op) => return Err(Failure::UnexpectedOp(op)),
        }
    }
    if echoed.get(..have) != Some(PING) {
        return Err(Failure::Msg("echo differs"));
    }
    // The replies must have come with interrupts. Those that arrived while the guest was
    // still polling are pending in the LAPIC and are taken at the next `sti`.
    let transport = vs.transport();
    if !irq::wait_until(STEP, || transport.interrupt_count() > 0) {
        return Err(VirtioError::NoInterrupt.into());
    }
    conn.send(vs, OP_SHUTDOWN, BOTH)?;
    loop {
        let (h, n) = vs
            .recv(STEP, scratch)
            .map_err(|e| Failure::During("shutdown", e))?;
        match conn.handle(vs, &h, n)? {
            Event::Reset => return Ok(()),
            Event::Shutdown(_) => {
                conn.send(vs, OP_RST, 0)?;
                return Ok(());
            }
            Event::Nothing | Event::Data(_) => {}
            Event::Response => return Err(Failure::UnexpectedOp(OP_RESPONSE)),
            Event::Unexpected(op) => return Err(Failure::UnexpectedOp(op)),
        }
    }
}

/// Host -> guest: accept [`SERVE_COUNT`] connections on [`LISTEN_PORT`] one after the other
/// and echo in upper case. On failure returns how many were served and why.
fn serve(vs: &mut Vsock, scratch: &mut [u8]) -> Result<(), (u32, Failure)> {
    let cid = vs.guest_cid();
    let mut served = 0;
    // The connection, the bytes echoed, whether the guest has sent its SHUTDOWN.
    let mut conn: Option<(Conn, usize, bool)> = None;
    let mut out = [0u8; MAX_DATA];
    while served < SERVE_COUNT {
        let (h, n) = vs
            .recv(ACCEPT, scratch)
            .map_err(|e| (served, Failure::During("accept", e)))?;
        let Some((c, echoed, shut)) = conn.as_mut() else {
            if h.op == OP_REQUEST
                && h.kind == TYPE_STREAM
                && h.dst_cid == cid
                && h.dst_port == LISTEN_PORT
            {
                let mut c = Conn::new(cid, LISTEN_PORT, h.src_cid, h.src_port);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                c.send(vs, OP_RESPONSE, 0).map_err(|e| (served, e))?;
                conn = Some((c, 0, false));
            } else {
                reject(vs, &h).map_err(|e| (served, e))?;
            }
            continue;
        };
        let event = c.handle(vs, &h, n).map_err(|e| (served, e))?;
        let closed = match event {
            Event::Data(n) => {
                let (Some(dst), Some(src)) = (out.get_mut(..n), scratch.get(..n)) else {
                    return Err((served, Failure::Msg("payload too large")));
                };
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s.to_ascii_uppercase();
                }
                c.send_data(vs, dst, scratch).map_err(|e| (served, e))?;
                *echoed += n;
                false
            }
            // The host closed both ways: answer with the RST that ends the connection.
            Event::Shutdown(flags) if flags & BOTH == BOTH => {
                c.send(vs, OP_RST, 0).map_err(|e| (served, e))?;
                true
            }
            // Half close: everything was echoed already, so close the other way too and wait
            // for the device's RST.
            Event::Shutdown(_) => {
                if !*shut {
                    c.send(vs, OP_SHUTDOWN, BOTH).map_err(|e| (served, e))?;
                    *shut = true;
                }
                false
            }
            Event::Reset => true,
            Event::Nothing => false,
            Event::Response => return Err((served, Failure::UnexpectedOp(OP_RESPONSE))),
            Event::Unexpected(op) => return Err((served, Failure::UnexpectedOp(op))),
        };
        if closed {
            println!(
                "virtio: vsock: closed {}:{} echoed {}",
                c.peer_cid, c.peer_port, echoed
            );
            served += 1;
            conn = None;
        }
    }
    Ok(())
}
