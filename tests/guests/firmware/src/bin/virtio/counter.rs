// SPDX-License-Identifier: Apache-2.0
//! `agent.counter_port=<port>`: the agent's liveness counter, for tests that must tell a guest
//! that kept running (a VM handed to a new process, say) from one that was booted again.
//!
//! The count lives in guest memory: 1 once the ready line is sent, one more per tick
//! (`agent.counter_ms`, 10 ms by default) waited on the LAPIC timer. The agent keeps one stream connection to the host (CID 2) on the
//! port and writes the count at every tick as a decimal line, `<n>\n`. A tick whose line the
//! host has no room for (its credit is used up) is skipped, never waited for: the ttrpc serving
//! goes on. A refused, reset or closed connection, and every connection dropped by a
//! transport-reset event, is dialled again at the next tick, with the count where it is: every
//! number the host reads, across connections, is higher than the one before.

use firmware::virtio::vsock::{HOST_CID, Header, OP_CREDIT_REQUEST, OP_REQUEST, OP_RST, Vsock};

use crate::Failure;
use crate::vsock::{Conn, Event};

/// Guest ports of the dials: each dial takes the next, so a new connection is never taken for
/// one the host still closes.
const LOCAL_PORT_BASE: u32 = 50_000;
const LOCAL_PORTS: u32 = 10_000;
/// Ticks a dial may go unanswered before it is abandoned (RST) and dialled anew.
const DIAL_TICKS: u64 = 100;
/// `u64::MAX` in decimal and a newline.
const LINE_MAX: usize = 21;

/// The connection to the host's counter port.
enum Link {
    /// None: dial at the next tick.
    Down,
    /// A REQUEST went out at count `since`; no answer yet.
    Dialing { conn: Conn, since: u64 },
    /// Connected. `asked`: a CREDIT_REQUEST is out since the host's room last ran out.
    Up { conn: Conn, asked: bool },
}

/// The counter and its connection.
pub struct Counter {
    port: u32,
    value: u64,
    dials: u32,
    link: Link,
}

impl Counter {
    /// A counter at 1 for host port `port`; it dials at once.
    pub fn start(vs: &mut Vsock, port: u32) -> Result<Self, Failure> {
        let mut counter = Self {
            port,
            value: 1,
            dials: 0,
            link: Link::Down,
        };
        counter.dial(vs)?;
        Ok(counter)
    }

    fn dial(&mut self, vs: &mut Vsock) -> Result<(), Failure> {
        let local = LOCAL_PORT_BASE + self.dials % LOCAL_PORTS;
        self.dials = self.dials.wrapping_add(1);
        let mut conn = Conn::new(vs.guest_cid(), local, HOST_CID, self.port);
        // Down until the REQUEST is out: a failed send leaves nothing half open.
        self.link = Link::Down;
        conn.send(vs, OP_REQUEST, 0)?;
        self.link = Link::Dialing {
            conn,
            since: self.value,
        };
        Ok(())
    }

    /// One tick: count, then write the count, dial, or give up on a dial that went unanswered.
    pub fn tick(&mut self, vs: &mut Vsock) -> Result<(), Failure> {
        self.value = self.value.wrapping_add(1);
        match &mut self.link {
            Link::Down => self.dial(vs),
            Link::Dialing { conn, since } => {
                if self.value.wrapping_sub(*since) < DIAL_TICKS {
                    return Ok(());
                }
                conn.send(vs, OP_RST, 0)?;
                self.dial(vs)
            }
            Link::Up { conn, asked } => {
                let mut buf = [0u8; LINE_MAX];
                let line = decimal_line(self.value, &mut buf);
                if conn.try_send_data(vs, line)? {
                    *asked = false;
                } else if !*asked {
                    // The host's CREDIT_UPDATE answers; this line is skipped meanwhile.
                    conn.send(vs, OP_CREDIT_REQUEST, 0)?;
                    *asked = true;
                }
                Ok(())
            }
        }
    }

    /// Whether `h` belongs to the counter's connection (or its dial).
    pub fn owns(&self, h: &Header) -> bool {
        match &self.link {
            Link::Down => false,
            Link::Dialing { conn, .. } | Link::Up { conn, .. } => conn.is_ours(h),
        }
    }

    /// Handles a packet [`Counter::owns`]. Data from the host is consumed and ignored.
    pub fn handle(&mut self, vs: &mut Vsock, h: &Header, n: usize) -> Result<(), Failure> {
        let (conn, dialing) = match &mut self.link {
            Link::Down => return Ok(()),
            Link::Dialing { conn, .. } => (conn, true),
            Link::Up { conn, .. } => (conn, false),
        };
        match conn.handle(vs, h, n)? {
            Event::Response if dialing => {
                if let Link::Dialing { conn, .. } = core::mem::replace(&mut self.link, Link::Down) {
                    self.link = Link::Up { conn, asked: false };
                }
            }
            // Refused or closed by the host: dial again at the next tick.
            Event::Reset => self.link = Link::Down,
            Event::Shutdown(_) => {
                conn.send(vs, OP_RST, 0)?;
                self.link = Link::Down;
            }
            Event::Response | Event::Data(_) | Event::Nothing | Event::Unexpected(_) => {}
        }
        Ok(())
    }

    /// A transport reset dropped every connection (§5.10.6.7), or a send failed: dial again at
    /// the next tick, sending nothing for the old link.
    pub fn transport_reset(&mut self) {
        self.link = Link::Down;
    }
}

/// `n` in decimal and a newline, at the end of `buf`.
fn decimal_line(n: u64, buf: &mut [u8; LINE_MAX]) -> &[u8] {
    let mut at = LINE_MAX.saturating_sub(1);
    if let Some(nl) = buf.get_mut(at) {
        *nl = b'\n';
    }
    let mut rest = n;
    loop {
        at = at.saturating_sub(1);
        if let Some(d) = buf.get_mut(at) {
            *d = b'0' + u8::try_from(rest % 10).unwrap_or(0);
        }
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    buf.get(at..).unwrap_or_default()
}
