// SPDX-License-Identifier: Apache-2.0
//! Fuzz target `vsock`: the virtio-vsock device and its connection muxer, driven synchronously.
//!
//! The input is a script of guest and host actions decoded with `arbitrary::Unstructured`:
//! guest TX packets (mostly well-formed headers on mostly well-formed chains, with malformed
//! fields and layouts fired `rarely`), RX buffers, host-side reads/writes/shutdowns/closes on
//! the in-process streams, host connects, time jumps for the timeouts, resets and queue
//! corruption. No threads and no files: host streams are socketpairs, guest memory is an
//! anonymous mapping, the interrupt only records.
//!
//! Besides "no panic", it checks the muxer's memory bounds after every step.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use arbitrary::{Result, Unstructured};
use devices::GuestMemoryMmap;
use devices::virtio::VirtioDevice;
use devices::virtio::vsock::defs::{
    LOCAL_PORT_START, OP_CREDIT_REQUEST, OP_REQUEST, OP_RW, OP_SHUTDOWN, PKT_HEADER_SIZE,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, VSOCK_HOST_CID,
};
use devices::virtio::vsock::test_utils::{Driver, test_mem};
use devices::virtio::vsock::{
    MuxerLimits, PendingConnect, Vsock, VsockHeader, VsockListener, VsockMuxer,
};
use libfuzzer_sys::{Corpus, fuzz_target};
use vmm_sys_util::epoll::EventSet;

const CID: u64 = 3;
const LISTEN_PORT: u32 = 1024;
const MAX_CONNECTIONS: usize = 8;
const CONN_BUF: u32 = 4096;
const MAX_ACTIONS: usize = 256;
const MAX_STREAMS: usize = 16;

/// `true` about once in `n` draws.
fn rarely(u: &mut Unstructured<'_>, n: u32) -> Result<bool> {
    u.ratio(1, n)
}

struct Fuzz<'m> {
    mem: &'m GuestMemoryMmap,
    drv: Driver<'m>,
    dev: Vsock<VsockMuxer>,
    listener: VsockListener,
    streams: Vec<UnixStream>,
    pending: Vec<PendingConnect>,
    now: Instant,
}

impl<'m> Fuzz<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> Option<Self> {
        let limits = MuxerLimits {
            max_connections: MAX_CONNECTIONS,
            conn_buf_size: CONN_BUF,
            connect_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(2),
        };
        let muxer = VsockMuxer::with_limits(CID, None, limits).ok()?;
        let listener = muxer.handle().listen(LISTEN_PORT).ok()?;
        let mut dev = Vsock::new(CID, muxer).ok()?;
        let drv = Driver::new(mem);
        let _irq = drv.activate(&mut dev);
        Some(Fuzz {
            mem,
            drv,
            dev,
            listener,
            streams: Vec::new(),
            pending: Vec::new(),
            now: Instant::now(),
        })
    }

    fn port(&self, u: &mut Unstructured<'_>) -> Result<u32> {
        Ok(match u.int_in_range(0..=5)? {
            0 | 1 => LISTEN_PORT,
            2 => LISTEN_PORT + 1,
            3 => LOCAL_PORT_START + u.int_in_range(0..=3)?,
            4 => u.int_in_range(1000..=1003)?,
            _ => u.arbitrary()?,
        })
    }

    fn header(&self, u: &mut Unstructured<'_>, data_len: usize) -> Result<VsockHeader> {
        let op = if rarely(u, 16)? {
            u.arbitrary()?
        } else {
            u.int_in_range(OP_REQUEST..=OP_CREDIT_REQUEST)?
        };
        let flags = if op == OP_SHUTDOWN && !rarely(u, 8)? {
            *u.choose(&[SHUTDOWN_RCV, SHUTDOWN_SEND, SHUTDOWN_RCV | SHUTDOWN_SEND])?
        } else {
            u.arbitrary()?
        };
        let len = if rarely(u, 16)? {
            u.arbitrary()?
        } else {
            u32::try_from(data_len).unwrap_or(u32::MAX)
        };
        let any_alloc: u32 = u.arbitrary()?;
        Ok(VsockHeader {
            src_cid: if rarely(u, 32)? { u.arbitrary()? } else { CID },
            dst_cid: if rarely(u, 32)? {
                u.arbitrary()?
            } else {
                VSOCK_HOST_CID
            },
            src_port: if rarely(u, 16)? {
                u.arbitrary()?
            } else {
                u.int_in_range(1000..=1003)?
            },
            dst_port: self.port(u)?,
            len,
            type_: if rarely(u, 32)? {
                u.arbitrary()?
            } else {
                TYPE_STREAM
            },
            op,
            flags,
            buf_alloc: *u.choose(&[0, 100, 4096, 65536, any_alloc])?,
            fwd_cnt: if u.arbitrary()? { 0 } else { u.arbitrary()? },
        })
    }

    fn guest_send(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let data_len = if u.arbitrary()? {
            0
        } else {
            u.int_in_range(0..=9000)?
        };
        let data = u.bytes(data_len.min(u.len()))?.to_vec();
        let hdr = self.header(u, data.len())?;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(&data);

        match u.int_in_range(0..=9)? {
            // Out-of-memory descriptor.
            0 if rarely(u, 4)? => {
                self.drv
                    .send_descs(&[(u.arbitrary()?, u.arbitrary()?, false)]);
            }
            // Write-only, truncated or empty descriptors.
            1 if rarely(u, 2)? => {
                let cut = u.int_in_range(0..=bytes.len())?;
                bytes.truncate(cut);
                let writable = u.arbitrary()?;
                self.drv.send_raw(&[(bytes, writable), (Vec::new(), false)]);
            }
            // Split at arbitrary points into up to 6 descriptors.
            2..=4 => {
                let mut parts = Vec::new();
                let mut rest = bytes.as_slice();
                while !rest.is_empty() && parts.len() < 5 {
                    let at = u.int_in_range(0..=rest.len())?;
                    let (head, tail) = rest.split_at(at);
                    parts.push((head.to_vec(), false));
                    rest = tail;
                }
                parts.push((rest.to_vec(), false));
                self.drv.send_raw(&parts);
            }
            // Header and data apart (the classic Linux layout).
            5 | 6 => {
                let data = bytes.split_off(PKT_HEADER_SIZE);
                let mut parts = vec![(bytes, false)];
                if !data.is_empty() {
                    parts.push((data, false));
                }
                self.drv.send_raw(&parts);
            }
            // One descriptor (Linux >= 6.2).
            _ => self.drv.send_raw(&[(bytes, false)]),
        }
        self.dev.handle_txq_event();
        Ok(())
    }

    fn add_rx(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        if self.drv.rx_outstanding() > 200 {
            return Ok(());
        }
        let count = u.int_in_range(1..=8)?;
        for _ in 0..count {
            if rarely(u, 8)? {
                let lens: Vec<u32> = (0..u.int_in_range(1..=4)?)
                    .map(|_| u.int_in_range(0..=100))
                    .collect::<Result<_>>()?;
                self.drv.add_rx_raw(&lens);
            } else {
                let size = *u.choose(&[44, 60, 4096, 65_600])?;
                self.drv.add_rx(1, size);
            }
        }
        self.dev.handle_rxq_event();
        Ok(())
    }

    fn check_rx(&mut self) {
        for (hdr, data) in self.drv.recv() {
            assert_eq!(hdr.src_cid, VSOCK_HOST_CID);
            assert_eq!(hdr.dst_cid, CID);
            assert_eq!(hdr.type_, TYPE_STREAM);
            assert_eq!(hdr.len as usize, data.len());
            if hdr.op != OP_RW {
                assert!(data.is_empty());
            }
        }
    }

    fn stream(&mut self, u: &mut Unstructured<'_>) -> Result<Option<usize>> {
        if self.streams.is_empty() {
            return Ok(None);
        }
        Ok(Some(u.choose_index(self.streams.len())?))
    }

    fn add_stream(&mut self, stream: UnixStream) {
        if self.streams.len() < MAX_STREAMS && stream.set_nonblocking(true).is_ok() {
            self.streams.push(stream);
        }
    }

    fn step(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        match u.int_in_range(0..=13)? {
            0..=3 => self.guest_send(u)?,
            4 | 5 => self.add_rx(u)?,
            6 => {
                if let Ok((stream, _)) = self.listener.try_accept() {
                    self.add_stream(stream);
                }
            }
            7 => {
                if let Some(i) = self.stream(u)? {
                    let len = u.int_in_range(0..=70_000)?;
                    let byte: u8 = u.arbitrary()?;
                    let _ = self.streams[i].write(&vec![byte; len]);
                }
            }
            8 => {
                if let Some(i) = self.stream(u)? {
                    let mut buf = vec![0u8; 70_000];
                    let _ = self.streams[i].read(&mut buf);
                }
            }
            9 => {
                if let Some(i) = self.stream(u)? {
                    if u.arbitrary()? {
                        self.streams.swap_remove(i);
                    } else {
                        let how = *u.choose(&[Shutdown::Read, Shutdown::Write, Shutdown::Both])?;
                        let _ = self.streams[i].shutdown(how);
                    }
                }
            }
            10 => {
                if self.pending.len() < 4 {
                    let port = self.port(u)?;
                    if let Ok(p) = self.dev.backend().handle().begin_connect(port) {
                        self.pending.push(p);
                    }
                }
                let mut still = Vec::new();
                for p in std::mem::take(&mut self.pending) {
                    match p.try_result() {
                        None => still.push(p),
                        Some(Ok(stream)) => self.add_stream(stream),
                        Some(Err(_)) => {}
                    }
                }
                self.pending = still;
            }
            11 => {
                let secs = u.int_in_range(0..=5)?;
                self.now += Duration::from_secs(secs);
                self.dev.backend_mut().process_timeouts(self.now);
                self.dev.handle_rxq_event();
            }
            12 => {
                if rarely(u, 4)? {
                    self.drv.corrupt_tx_avail_idx();
                    self.dev.handle_txq_event();
                }
                if self.dev.needs_reset() || rarely(u, 4)? {
                    self.dev.reset().expect("reset never fails");
                    self.drv = Driver::new(self.mem);
                    let _irq = self.drv.activate(&mut self.dev);
                }
            }
            _ => self.dev.handle_backend_event(EventSet::IN),
        }
        self.check_rx();
        let muxer = self.dev.backend();
        assert!(muxer.connection_count() <= MAX_CONNECTIONS);
        assert!(muxer.buffered_bytes() <= MAX_CONNECTIONS * CONN_BUF as usize);
        Ok(())
    }
}

fn run(u: &mut Unstructured<'_>, mem: &GuestMemoryMmap) -> Result<()> {
    let Some(mut fuzz) = Fuzz::new(mem) else {
        return Ok(());
    };
    for _ in 0..MAX_ACTIONS {
        if u.is_empty() {
            break;
        }
        fuzz.step(u)?;
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < 4 {
        return Corpus::Reject;
    }
    let mem = test_mem();
    let mut u = Unstructured::new(data);
    match run(&mut u, &mem) {
        Ok(()) => Corpus::Keep,
        Err(_) => Corpus::Reject,
    }
});
