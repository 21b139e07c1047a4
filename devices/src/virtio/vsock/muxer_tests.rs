// SPDX-License-Identifier: Apache-2.0
//! End-to-end tests of [`Vsock`] over [`VsockMuxer`]: a mock driver on one side, host streams
//! (in-process pairs, hybrid unix sockets in a temp dir) on the other. No KVM, no threads
//! except where a blocking API is under test.
#![expect(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "test code"
)]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::backend::{MuxerLimits, VsockMuxer};
use super::defs::*;
use super::device::Vsock;
use super::handle::VsockHandle;
use super::packet::VsockHeader;
use super::test_utils::{Driver, RecordingInterrupt, TempDir, hdr, test_mem};
use crate::GuestMemoryMmap;
use crate::virtio::VirtioDevice;

const CID: u64 = 3;

type Pkt = (VsockHeader, Vec<u8>);

struct Env<'a> {
    drv: Driver<'a>,
    dev: Vsock<VsockMuxer>,
    handle: VsockHandle,
    irq: Arc<RecordingInterrupt>,
}

impl<'a> Env<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with(mem, MuxerLimits::default(), None)
    }

    fn with(mem: &'a GuestMemoryMmap, limits: MuxerLimits, uds: Option<PathBuf>) -> Self {
        let muxer = VsockMuxer::with_limits(CID, uds, limits).unwrap();
        let handle = muxer.handle();
        let mut dev = Vsock::new(CID, muxer).unwrap();
        let drv = Driver::new(mem);
        let irq = drv.activate(&mut dev);
        Env {
            drv,
            dev,
            handle,
            irq,
        }
    }

    fn muxer(&self) -> &VsockMuxer {
        self.dev.backend()
    }

    fn top_up(&mut self) {
        if self.drv.rx_outstanding() < 16 {
            self.drv.add_rx(32, 4096);
        }
    }

    /// Runs the backend and collects what reached the guest.
    fn pump(&mut self) -> Vec<Pkt> {
        // Each backend round may register new fds (accepted clients) whose events show up
        // only in the next round, so stop after a few quiet rounds.
        let mut out = Vec::new();
        let mut quiet = 0;
        while quiet < 3 {
            self.top_up();
            self.dev.handle_backend_event(EventSet::IN);
            self.dev.handle_rxq_event();
            let got = self.drv.recv();
            if got.is_empty() {
                quiet += 1;
            } else {
                quiet = 0;
            }
            out.extend(got);
        }
        out
    }

    /// Sends a guest packet and returns what the guest got back.
    fn send(&mut self, h: &VsockHeader, data: &[u8]) -> Vec<Pkt> {
        self.top_up();
        let h = VsockHeader {
            len: u32::try_from(data.len()).unwrap(),
            ..*h
        };
        self.drv.send(&h, data);
        self.dev.handle_txq_event();
        let mut out = self.drv.recv();
        out.extend(self.pump());
        out
    }

    /// Guest connects from `gport` to host port `hport`; returns the replies.
    fn guest_connect(&mut self, gport: u32, hport: u32) -> Vec<Pkt> {
        self.send(&hdr(CID, gport, hport, OP_REQUEST), &[])
    }

    fn guest_rw(&mut self, gport: u32, hport: u32, data: &[u8]) -> Vec<Pkt> {
        self.send(&hdr(CID, gport, hport, OP_RW), data)
    }
}

/// Whether the muxer's fd would wake the event loop now (it must not when idle, or the VMM
/// thread spins).
fn backend_ready(env: &Env<'_>) -> bool {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
    let epoll = Epoll::new().unwrap();
    let fd = env.muxer().as_raw_fd();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    epoll.wait(0, &mut events).unwrap() > 0
}

fn ops(pkts: &[Pkt]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

fn data_of(pkts: &[Pkt]) -> Vec<u8> {
    pkts.iter()
        .filter(|(h, _)| h.op == OP_RW)
        .flat_map(|(_, d)| d.clone())
        .collect()
}

fn read_some(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

fn assert_eof(stream: &mut UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    // Closing a socket with unread input resets it instead of a clean EOF.
    match stream.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
}

fn metric(env: &Env<'_>, f: impl Fn(&super::VsockMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(env.muxer().metrics()).load(Ordering::Relaxed)
}

#[test]
fn guest_connects_to_listener_and_data_flows_both_ways() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    assert_eq!(
        listener.try_accept().unwrap_err().kind(),
        ErrorKind::WouldBlock
    );

    let replies = env.guest_connect(5000, 1234);
    assert_eq!(ops(&replies), [OP_RESPONSE]);
    let (h, _) = &replies[0];
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port, h.type_),
        (VSOCK_HOST_CID, CID, 1234, 5000, TYPE_STREAM)
    );
    assert_eq!(h.buf_alloc, MuxerLimits::default().conn_buf_size);
    let (mut host, gport) = listener.try_accept().unwrap();
    assert_eq!(gport, 5000);
    assert_eq!(env.muxer().connection_count(), 1);

    assert!(env.guest_rw(5000, 1234, b"hello host").is_empty());
    assert_eq!(read_some(&mut host, 10), b"hello host");

    host.write_all(b"hello guest").unwrap();
    let got = env.pump();
    assert_eq!(data_of(&got), b"hello guest");
    assert!(
        got.iter()
            .all(|(h, _)| h.src_port == 1234 && h.dst_port == 5000)
    );
    assert!(env.irq.count() >= 2);
}

#[test]
fn host_connects_in_process() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let pending = env.handle.begin_connect(52).unwrap();
    assert!(pending.try_result().is_none());
    let got = env.pump();
    assert_eq!(ops(&got), [OP_REQUEST]);
    let req = got[0].0;
    assert_eq!(
        (req.dst_port, req.dst_cid, req.src_cid),
        (52, CID, VSOCK_HOST_CID)
    );
    assert!(req.src_port >= LOCAL_PORT_START);
    assert!(pending.try_result().is_none());

    let mut resp = hdr(CID, 52, req.src_port, OP_RESPONSE);
    resp.buf_alloc = 65536;
    assert!(env.send(&resp, &[]).is_empty());
    let mut host = pending.try_result().unwrap().unwrap();

    host.write_all(b"ttrpc").unwrap();
    assert_eq!(data_of(&env.pump()), b"ttrpc");
    env.guest_rw(52, req.src_port, b"reply");
    assert_eq!(read_some(&mut host, 5), b"reply");
}

#[test]
fn blocking_connect_returns_after_response() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let handle = env.handle.clone();
    let connector = std::thread::spawn(move || handle.connect(77));
    // Drive the device until the REQUEST shows up, then accept it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let req = loop {
        let got = env.pump();
        if let Some((h, _)) = got.iter().find(|(h, _)| h.op == OP_REQUEST) {
            break *h;
        }
        assert!(Instant::now() < deadline, "no REQUEST");
        std::thread::sleep(Duration::from_millis(1));
    };
    env.send(&hdr(CID, 77, req.src_port, OP_RESPONSE), &[]);
    let mut host = connector.join().unwrap().unwrap();
    host.write_all(b"x").unwrap();
    assert_eq!(data_of(&env.pump()), b"x");
}

#[test]
fn host_connect_refused_and_timed_out() {
    let mem = test_mem();
    let limits = MuxerLimits {
        connect_timeout: Duration::from_millis(200),
        ..MuxerLimits::default()
    };
    let mut env = Env::with(&mem, limits, None);

    let pending = env.handle.begin_connect(9).unwrap();
    let req = env.pump()[0].0;
    env.send(&hdr(CID, 9, req.src_port, OP_RST), &[]);
    let err = pending.try_result().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert_eq!(env.muxer().connection_count(), 0);

    let pending = env.handle.begin_connect(10).unwrap();
    assert_eq!(ops(&env.pump()), [OP_REQUEST]);
    env.dev
        .backend_mut()
        .process_timeouts(Instant::now() + Duration::from_secs(1));
    let err = pending.try_result().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    // The guest is told to drop its half-open connection.
    assert_eq!(ops(&env.pump()), [OP_RST]);
    assert_eq!(env.muxer().connection_count(), 0);

    // The real timer fires too.
    let pending = env.handle.begin_connect(11).unwrap();
    assert_eq!(ops(&env.pump()), [OP_REQUEST]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ops(&env.pump()), [OP_RST]);
    assert_eq!(
        pending.try_result().unwrap().unwrap_err().kind(),
        ErrorKind::TimedOut
    );

    // A late RESPONSE for a finished connection is answered with RST.
    let replies = env.send(&hdr(CID, 11, req.src_port, OP_RESPONSE), &[]);
    assert_eq!(ops(&replies), [OP_RST]);
}

#[test]
fn hybrid_host_connect() {
    let mem = test_mem();
    let dir = TempDir::new("hyb-connect");
    let path = dir.path().join("v.sock");
    let mut env = Env::with(&mem, MuxerLimits::default(), Some(path.clone()));

    let mut client = UnixStream::connect(&path).unwrap();
    // Split the line across writes; payload written early must not be swallowed.
    client.write_all(b"CONN").unwrap();
    assert!(env.pump().is_empty());
    client.write_all(b"ECT 52\nearly").unwrap();
    let got = env.pump();
    assert_eq!(ops(&got), [OP_REQUEST]);
    let req = got[0].0;
    assert_eq!(req.dst_port, 52);

    let got = env.send(&hdr(CID, 52, req.src_port, OP_RESPONSE), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(read_some(&mut client, ok.len()), ok.as_bytes());
    assert_eq!(data_of(&got), b"early");
    env.guest_rw(52, req.src_port, b"pong");
    assert_eq!(read_some(&mut client, 4), b"pong");

    // A bad line closes the client; so does EOF before the line.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(b"HELLO 5\n").unwrap();
    assert!(env.pump().is_empty());
    assert_eq!(env.muxer().connection_count(), 1);
    assert_eof(&mut bad);
    let mut long = UnixStream::connect(&path).unwrap();
    long.write_all(&[b'C'; MAX_CONNECT_LINE + 8]).unwrap();
    env.pump();
    assert_eof(&mut long);
}

#[test]
fn hybrid_guest_connect_to_host_listener() {
    let mem = test_mem();
    let dir = TempDir::new("hyb-listen");
    let path = dir.path().join("v.sock");
    let mut env = Env::with(&mem, MuxerLimits::default(), Some(path.clone()));
    let host_listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();

    assert_eq!(ops(&env.guest_connect(6000, 1234)), [OP_RESPONSE]);
    let (mut host, _) = host_listener.accept().unwrap();
    env.guest_rw(6000, 1234, b"via uds");
    assert_eq!(read_some(&mut host, 7), b"via uds");
    host.write_all(b"back").unwrap();
    assert_eq!(data_of(&env.pump()), b"back");

    // No listener for port 1235: reset.
    assert_eq!(ops(&env.guest_connect(6001, 1235)), [OP_RST]);
    // An in-process listener wins over the unix socket.
    let listener = env.handle.listen(1234).unwrap();
    assert_eq!(ops(&env.guest_connect(6002, 1234)), [OP_RESPONSE]);
    assert_eq!(listener.try_accept().unwrap().1, 6002);
}

#[test]
fn rst_for_unknown_ports_and_connections() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let replies = env.guest_connect(5000, 999);
    assert_eq!(ops(&replies), [OP_RST]);
    let h = replies[0].0;
    assert_eq!((h.src_port, h.dst_port, h.dst_cid), (999, 5000, CID));
    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
        0,
        42,
    ] {
        assert_eq!(
            ops(&env.send(&hdr(CID, 5000, 999, op), &[])),
            [OP_RST],
            "op {op}"
        );
    }
    // A reset is never answered.
    assert!(env.send(&hdr(CID, 5000, 999, OP_RST), &[]).is_empty());
    assert_eq!(metric(&env, |m| &m.rst_unknown), 8);
}

#[test]
fn wrong_cid_and_type() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let _listener = env.handle.listen(1234).unwrap();
    // Spoofed source CID, or a destination other than the host: dropped silently.
    assert_eq!(env.guest_connect(5000, 1234).len(), 1);
    let mut spoof = hdr(CID + 1, 5001, 1234, OP_REQUEST);
    assert!(env.send(&spoof, &[]).is_empty());
    spoof = hdr(CID, 5001, 1234, OP_REQUEST);
    spoof.dst_cid = 7;
    assert!(env.send(&spoof, &[]).is_empty());
    assert_eq!(metric(&env, |m| &m.wrong_cid), 2);
    assert_eq!(env.muxer().connection_count(), 1);

    // A non-stream type: reset (unknown connection) or kill (known one).
    let mut seq = hdr(CID, 5002, 1234, OP_REQUEST);
    seq.type_ = 2;
    assert_eq!(ops(&env.send(&seq, &[])), [OP_RST]);
    let mut bad = hdr(CID, 5000, 1234, OP_RW);
    bad.type_ = 9;
    assert_eq!(ops(&env.send(&bad, b"x")), [OP_RST]);
    assert_eq!(env.muxer().connection_count(), 0);
}

#[test]
fn malformed_chains_do_not_reach_the_muxer() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let _listener = env.handle.listen(1234).unwrap();
    let req = hdr(CID, 5000, 1234, OP_REQUEST).to_bytes();
    // Short header.
    env.drv.send_raw(&[(req[..30].to_vec(), false)]);
    // Zero-length descriptors.
    env.drv
        .send_raw(&[(Vec::new(), false), (Vec::new(), false)]);
    // len larger than the descriptor.
    let mut rw = hdr(CID, 5000, 1234, OP_RW);
    rw.len = 4096;
    env.drv
        .send_raw(&[(rw.to_bytes().to_vec(), false), (vec![0; 100], false)]);
    // Buffer outside guest memory, write-only header.
    env.drv.send_descs(&[(u64::MAX - 10, 64, false)]);
    env.drv.send_raw(&[(req.to_vec(), true)]);
    env.dev.handle_txq_event();
    assert_eq!(env.drv.tx_used().len(), 5);
    assert_eq!(env.dev.metrics().tx_malformed.load(Ordering::Relaxed), 5);
    assert!(env.pump().is_empty());
    assert_eq!(env.muxer().connection_count(), 0);
    assert!(!env.dev.needs_reset());
    // The device still works.
    assert_eq!(ops(&env.guest_connect(5000, 1234)), [OP_RESPONSE]);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    let mut req = hdr(CID, 5000, 1234, OP_REQUEST);
    req.buf_alloc = 4096;
    assert_eq!(ops(&env.send(&req, &[])), [OP_RESPONSE]);
    let (mut host, _) = listener.try_accept().unwrap();
    host.set_nonblocking(true).unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let mut written = host.write(&payload).unwrap();

    let got = env.pump();
    let received = data_of(&got);
    assert_eq!(received.len(), 4096, "exactly the guest's credit");
    assert_eq!(got.last().unwrap().0.op, OP_CREDIT_REQUEST);
    // Nothing more while the guest grants nothing, and the idle muxer does not spin.
    assert!(env.pump().is_empty());
    assert!(env.pump().is_empty());
    assert!(!backend_ready(&env));

    // The guest consumed everything and says so.
    let mut all = received;
    let mut fwd = 4096u32;
    while all.len() < payload.len() {
        if written < payload.len() {
            written += host.write(&payload[written..]).unwrap_or(0);
        }
        let mut upd = hdr(CID, 5000, 1234, OP_CREDIT_UPDATE);
        upd.buf_alloc = 4096;
        upd.fwd_cnt = fwd;
        let got = env.send(&upd, &[]);
        let chunk = data_of(&got);
        assert!(chunk.len() <= 4096);
        fwd += u32::try_from(chunk.len()).unwrap();
        all.extend(chunk);
    }
    assert_eq!(all, payload);
}

#[test]
fn guest_to_host_buffering_is_capped_by_credit() {
    let mem = test_mem();
    let limits = MuxerLimits {
        conn_buf_size: 16 * 1024,
        ..MuxerLimits::default()
    };
    let mut env = Env::with(&mem, limits, None);
    let listener = env.handle.listen(1234).unwrap();
    assert_eq!(ops(&env.guest_connect(5000, 1234)), [OP_RESPONSE]);
    let (mut host, _) = listener.try_accept().unwrap();

    // A well-behaved guest: sends only while the muxer's advertised credit allows.
    let chunk = vec![0xabu8; 4096];
    let mut sent: u64 = 0;
    let mut peer_fwd: u64 = 0;
    let mut peer_alloc: u64 = 16 * 1024;
    let mut rounds = 0;
    loop {
        let credit = peer_alloc - (sent - peer_fwd);
        if credit < chunk.len() as u64 {
            break;
        }
        for (h, _) in env.guest_rw(5000, 1234, &chunk) {
            peer_fwd = u64::from(h.fwd_cnt);
            peer_alloc = u64::from(h.buf_alloc);
        }
        sent += chunk.len() as u64;
        rounds += 1;
        assert!(rounds < 10_000, "the host never stopped taking data");
        assert!(env.muxer().buffered_bytes() <= 16 * 1024);
    }
    // The host socket is full and the muxer holds at most its cap.
    assert!(env.muxer().buffered_bytes() > 0);
    assert!(env.muxer().buffered_bytes() <= 16 * 1024);

    // The host drains: everything arrives in order and the guest gets credit back.
    host.set_nonblocking(true).unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut updates = 0;
    for _ in 0..10_000 {
        match host.read(&mut buf) {
            Ok(n) => {
                assert!(buf[..n].iter().all(|&b| b == 0xab));
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        let got = env.pump();
        updates += got.iter().filter(|(h, _)| h.op == OP_CREDIT_UPDATE).count();
        if total == sent {
            break;
        }
    }
    assert_eq!(total, sent);
    assert!(updates >= 1);
    assert_eq!(env.muxer().buffered_bytes(), 0);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mem = test_mem();
    let limits = MuxerLimits {
        conn_buf_size: 8 * 1024,
        ..MuxerLimits::default()
    };
    let mut env = Env::with(&mem, limits, None);
    let listener = env.handle.listen(1234).unwrap();
    assert_eq!(ops(&env.guest_connect(5000, 1234)), [OP_RESPONSE]);
    let (mut host, _) = listener.try_accept().unwrap();
    // Ignore credit and keep sending while the host does not read.
    let chunk = vec![1u8; 4096];
    let mut reset = false;
    for _ in 0..10_000 {
        let got = env.guest_rw(5000, 1234, &chunk);
        assert!(env.muxer().buffered_bytes() <= 8 * 1024);
        if ops(&got).contains(&OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset);
    assert_eq!(metric(&env, |m| &m.credit_violations), 1);
    assert_eq!(env.muxer().connection_count(), 0);
    assert_eq!(env.muxer().buffered_bytes(), 0);
    // The host sees the data forwarded before the reset, then EOF.
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.iter().all(|&b| b == 1));
}

#[test]
fn shutdown_flags_both_ways() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    env.guest_connect(5000, 1234);
    let (mut host, _) = listener.try_accept().unwrap();

    // Guest stops sending: the host reads EOF but can still write.
    env.guest_rw(5000, 1234, b"bye");
    let mut sd = hdr(CID, 5000, 1234, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_SEND;
    assert!(env.send(&sd, &[]).is_empty());
    let mut all = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"bye");
    host.write_all(b"still here").unwrap();
    assert_eq!(data_of(&env.pump()), b"still here");

    // Host closes its write side: SHUTDOWN(SEND) to the guest, then RST (both sides done).
    host.shutdown(Shutdown::Write).unwrap();
    let got = env.pump();
    assert_eq!(ops(&got), [OP_SHUTDOWN, OP_RST]);
    assert_eq!(got[0].0.flags, SHUTDOWN_SEND);
    assert_eq!(env.muxer().connection_count(), 0);
}

#[test]
fn host_close_waits_for_guest_rst_or_times_out() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();

    // Clean close: the host drops its stream, the guest answers RST.
    env.guest_connect(5000, 1234);
    let (host, _) = listener.try_accept().unwrap();
    drop(host);
    let got = env.pump();
    assert_eq!(ops(&got), [OP_SHUTDOWN]);
    assert_eq!(got[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(env.muxer().connection_count(), 1);
    assert!(env.send(&hdr(CID, 5000, 1234, OP_RST), &[]).is_empty());
    assert_eq!(env.muxer().connection_count(), 0);

    // The guest never answers: the muxer forces a RST after the shutdown timeout.
    env.guest_connect(5001, 1234);
    let (mut host, _) = listener.try_accept().unwrap();
    host.write_all(b"last").unwrap();
    drop(host);
    let got = env.pump();
    assert_eq!(ops(&got), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(got[0].1, b"last");
    env.dev
        .backend_mut()
        .process_timeouts(Instant::now() + Duration::from_secs(1));
    assert!(env.pump().is_empty(), "not yet");
    env.dev
        .backend_mut()
        .process_timeouts(Instant::now() + Duration::from_secs(3));
    assert_eq!(ops(&env.pump()), [OP_RST]);
    assert_eq!(env.muxer().connection_count(), 0);
}

#[test]
fn guest_full_shutdown_is_acknowledged_with_rst() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    env.guest_connect(5000, 1234);
    let (mut host, _) = listener.try_accept().unwrap();
    env.guest_rw(5000, 1234, b"final");
    let mut sd = hdr(CID, 5000, 1234, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    assert_eq!(ops(&env.send(&sd, &[])), [OP_RST]);
    assert_eq!(env.muxer().connection_count(), 0);
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"final");
}

#[test]
fn connection_table_limit() {
    let mem = test_mem();
    let limits = MuxerLimits {
        max_connections: 2,
        ..MuxerLimits::default()
    };
    let mut env = Env::with(&mem, limits, None);
    let _listener = env.handle.listen(1234).unwrap();
    assert_eq!(ops(&env.guest_connect(1, 1234)), [OP_RESPONSE]);
    assert_eq!(ops(&env.guest_connect(2, 1234)), [OP_RESPONSE]);
    assert_eq!(ops(&env.guest_connect(3, 1234)), [OP_RST]);
    assert_eq!(env.muxer().connection_count(), 2);
    assert_eq!(metric(&env, |m| &m.conns_over_limit), 1);

    let pending = env.handle.begin_connect(52).unwrap();
    assert!(env.pump().is_empty());
    pending.try_result().unwrap().unwrap_err();

    // Closing one frees a slot.
    env.send(&hdr(CID, 1, 1234, OP_RST), &[]);
    assert_eq!(ops(&env.guest_connect(3, 1234)), [OP_RESPONSE]);
}

#[test]
fn reset_queue_is_bounded_without_rx_buffers() {
    let mem = test_mem();
    let muxer = VsockMuxer::new(CID, None).unwrap();
    let mut dev = Vsock::new(CID, muxer).unwrap();
    let mut drv = Driver::new(&mem);
    let _irq = drv.activate(&mut dev);
    // A guest that floods requests to closed ports and never posts RX buffers.
    for i in 0..1000u32 {
        drv.send(&hdr(CID, i, 999, OP_REQUEST), &[]);
        if i % 100 == 99 {
            dev.handle_txq_event();
        }
    }
    let m = dev.backend().metrics();
    assert_eq!(
        m.rst_unknown.load(Ordering::Relaxed),
        MAX_PENDING_RST as u64
    );
    assert_eq!(
        m.rst_dropped.load(Ordering::Relaxed),
        1000 - MAX_PENDING_RST as u64
    );
    drv.add_rx(200, 4096);
    dev.handle_rxq_event();
    drv.add_rx(200, 4096);
    dev.handle_rxq_event();
    assert_eq!(drv.recv().len(), MAX_PENDING_RST);
}

#[test]
fn listener_lifecycle() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    assert_eq!(
        env.handle.listen(1234).unwrap_err().kind(),
        ErrorKind::AddrInUse
    );
    assert_eq!(listener.port(), 1234);
    env.guest_connect(1, 1234);
    // The listener's fd is readable (eventfd count) until try_accept drains it.
    let (_s, port) = listener.try_accept().unwrap();
    assert_eq!(port, 1);
    assert_eq!(
        listener.try_accept().unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    drop(listener);
    assert_eq!(ops(&env.guest_connect(2, 1234)), [OP_RST]);
    let again = env.handle.listen(1234).unwrap();
    assert_eq!(ops(&env.guest_connect(3, 1234)), [OP_RESPONSE]);
    assert_eq!(again.accept().unwrap().1, 3);
}

#[test]
fn listen_before_activation_and_connect_queued_until_driver_is_up() {
    let mem = test_mem();
    let muxer = VsockMuxer::new(CID, None).unwrap();
    let handle = muxer.handle();
    let listener = handle.listen(1024).unwrap();
    let pending = handle.begin_connect(52).unwrap();
    let mut dev = Vsock::new(CID, muxer).unwrap();
    // The device is not active: the backend runs but nothing reaches the guest.
    dev.handle_backend_event(EventSet::IN);
    let mut drv = Driver::new(&mem);
    let _irq = drv.activate(&mut dev);
    drv.add_rx(4, 4096);
    dev.handle_rxq_event();
    let got = drv.recv();
    assert_eq!(ops(&got), [OP_REQUEST]);
    drv.send(&hdr(CID, 52, got[0].0.src_port, OP_RESPONSE), &[]);
    drv.send(&hdr(CID, 7, 1024, OP_REQUEST), &[]);
    dev.handle_txq_event();
    pending.try_result().unwrap().expect("connected");
    assert_eq!(listener.try_accept().unwrap().1, 7);
}

#[test]
fn device_reset_drops_connections() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    env.guest_connect(5000, 1234);
    let (mut host, _) = listener.try_accept().unwrap();
    let pending = env.handle.begin_connect(9).unwrap();
    env.pump();
    assert_eq!(env.muxer().connection_count(), 2);
    env.dev.reset().unwrap();
    assert_eq!(env.muxer().connection_count(), 0);
    assert_eof(&mut host);
    assert_eq!(
        pending.try_result().unwrap().unwrap_err().kind(),
        ErrorKind::ConnectionAborted
    );
    // The listener survives a reset.
    let mut drv = Driver::new(&mem);
    let _irq = drv.activate(&mut env.dev);
    drv.add_rx(4, 4096);
    drv.send(&hdr(CID, 5001, 1234, OP_REQUEST), &[]);
    env.dev.handle_txq_event();
    assert_eq!(ops(&drv.recv()), [OP_RESPONSE]);
    assert_eq!(listener.try_accept().unwrap().1, 5001);
}

#[test]
fn dropped_device_fails_handles() {
    let muxer = VsockMuxer::new(CID, None).unwrap();
    let handle = muxer.handle();
    let listener = handle.listen(5).unwrap();
    drop(muxer);
    assert_eq!(
        handle.connect(1).unwrap_err().kind(),
        ErrorKind::NotConnected
    );
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        ErrorKind::NotConnected
    );
    assert_eq!(
        handle.listen(6).unwrap_err().kind(),
        ErrorKind::NotConnected
    );
}

#[test]
fn many_connections_interleave() {
    let mem = test_mem();
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    let mut hosts = Vec::new();
    for port in 0..20u32 {
        assert_eq!(ops(&env.guest_connect(100 + port, 1234)), [OP_RESPONSE]);
        hosts.push(listener.try_accept().unwrap());
    }
    for (stream, port) in &mut hosts {
        stream.write_all(&port.to_le_bytes()).unwrap();
    }
    let got = env.pump();
    assert_eq!(got.len(), 20);
    for (h, d) in got {
        assert_eq!(d, h.dst_port.to_le_bytes());
    }
}

#[test]
fn idle_muxer_does_not_stay_ready() {
    let mem = test_mem();
    let limits = MuxerLimits {
        connect_timeout: Duration::from_millis(100),
        ..MuxerLimits::default()
    };
    let mut env = Env::with(&mem, limits, None);
    // A connect answered in time leaves the timer armed; when it fires there is nothing to
    // expire, and it must be disarmed rather than left readable.
    let pending = env.handle.begin_connect(52).unwrap();
    let req = env.pump()[0].0;
    env.send(&hdr(CID, 52, req.src_port, OP_RESPONSE), &[]);
    let mut host = pending.try_result().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert!(backend_ready(&env));
    assert!(env.pump().is_empty());
    assert!(!backend_ready(&env));

    host.write_all(b"x").unwrap();
    assert_eq!(data_of(&env.pump()), b"x");
    assert!(!backend_ready(&env));

    // Host data while the guest posts no RX buffers: quiet until buffers arrive.
    let mut env = Env::new(&mem);
    let listener = env.handle.listen(1234).unwrap();
    env.drv.send(&hdr(CID, 5000, 1234, OP_REQUEST), &[]);
    env.dev.handle_txq_event();
    let (mut host, _) = listener.try_accept().unwrap();
    host.write_all(b"queued").unwrap();
    // The stream is not polled before RESPONSE went out, so nothing is ready at all.
    assert!(!backend_ready(&env));
    env.dev.handle_backend_event(EventSet::IN);
    assert!(!backend_ready(&env));
    let got = env.pump();
    assert_eq!(ops(&got), [OP_RESPONSE, OP_RW]);
    assert_eq!(got[1].1, b"queued");
    // Data arrives, but no buffers: one wake-up, then quiet.
    host.write_all(b"more").unwrap();
    while env.drv.rx_outstanding() > 0 {
        env.drv.send(&hdr(CID, 9, 1, OP_REQUEST), &[]);
        env.dev.handle_txq_event();
        env.drv.recv();
    }
    assert!(backend_ready(&env));
    env.dev.handle_backend_event(EventSet::IN);
    assert!(!backend_ready(&env));
    assert_eq!(data_of(&env.pump()), b"more");
}
