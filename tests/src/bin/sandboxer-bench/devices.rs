// SPDX-License-Identifier: Apache-2.0
//! The device-path scenarios (no KVM): `blk`, `net` and `vsock`, each against the plain system
//! calls that move the same bytes.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::Options;

/// 4 KiB random reads through `VirtioBlock::process_queue` against `pread`.
pub(crate) fn blk(o: &Options) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use devices::test_utils::{TestQueue, single_region_mem};
    use devices::virtio::block::{FileDisk, VirtioBlock};
    use devices::virtio::{Interrupt, IrqTrigger, VirtioDevice};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    const IMAGE_BYTES: u64 = 64 << 20;
    const BLOCK: u32 = 4096;
    const BATCH: u16 = 64;
    let requests = o.iterations.max(1000) * 100;

    let dir = std::path::Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("sandboxer-bench-blk-{}", std::process::id()));
    let image: Vec<u8> = (0..IMAGE_BYTES).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &image)?;
    drop(image);
    let file = std::fs::File::open(&path)?;
    let blocks = IMAGE_BYTES / u64::from(BLOCK);
    // A fixed pseudo-random sequence of block offsets, the same for both sides.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let offsets: Vec<u64> = (0..requests)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * u64::from(BLOCK)
        })
        .collect();

    // Raw: pread into one page-aligned buffer, like the guest's data buffers. (A heap `Vec`
    // has no alignment guarantee, and a misaligned destination makes every copy about 2.5x
    // slower on these machines, so the baseline used to depend on where malloc put it.)
    #[repr(C, align(4096))]
    struct Page([u8; 4096]);
    const _: () = assert!(BLOCK as usize == std::mem::size_of::<Page>());
    let mut page = Box::new(Page([0; 4096]));
    let t0 = Instant::now();
    for &off in &offsets {
        file.read_exact_at(&mut page.0, off)?;
    }
    let raw = t0.elapsed();

    // Device path: a 256-entry queue, requests posted in batches of 64 (3 descriptors each).
    let mem = single_region_mem(16 << 20);
    let tq = TestQueue::new(&mem, GuestAddress(0x1000), 256);
    let mut dev =
        VirtioBlock::with_backend("bench", true, Some(Box::new(FileDisk::open(&path, true)?)))?;
    // The production interrupt's status bits, on an EventFd line (one write per interrupt;
    // the VMM's line is a KVM_IRQ_LINE pulse, which needs a VM).
    let line = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let irq = Arc::new(IrqTrigger::new(line.clone()));
    dev.activate(mem.clone(), vec![tq.queue()], irq.clone())?;
    let hdr_base = 0x10_0000u64;
    let data_base = 0x20_0000u64;
    let status_base = 0x18_0000u64;
    let mut device = Duration::ZERO;
    let mut done = 0usize;
    let mut used_seen = 0u16;
    while done < requests {
        let batch = BATCH.min(u16::try_from(requests - done).unwrap_or(BATCH));
        let n = usize::from(batch);
        for (i, &off) in offsets[done..done + n].iter().enumerate() {
            let i = i as u64;
            let hdr = hdr_base + 16 * i;
            // virtio_blk_req header: type IN (0), reserved, sector.
            mem.write_obj(0u32, GuestAddress(hdr))?;
            mem.write_obj(0u32, GuestAddress(hdr + 4))?;
            mem.write_obj(off / 512, GuestAddress(hdr + 8))?;
            tq.add_chain(&[
                (hdr, 16, false),
                (data_base + i * u64::from(BLOCK), BLOCK, true),
                (status_base + i, 1, true),
            ]);
        }
        let target = used_seen.wrapping_add(batch);
        // Only the device's work counts: building the chains is the guest driver's.
        let t0 = Instant::now();
        while tq.used_idx() != target {
            // What the device's event handler does on a queue notification.
            if dev.process_queue() {
                dev.signal_used_queue();
            }
        }
        device += t0.elapsed();
        used_seen = target;
        done += n;
    }
    // Spot-check the last batch really carried the file's bytes and OK statuses.
    let last = offsets[requests - 1];
    let mut got = vec![0u8; 16];
    let last_slot = ((requests - 1) % usize::from(BATCH)) as u64;
    mem.read_slice(
        &mut got,
        GuestAddress(data_base + last_slot * u64::from(BLOCK)),
    )?;
    let expected: Vec<u8> = (last..last + 16).map(|i| (i % 251) as u8).collect();
    if got != expected {
        bail!("virtio-blk returned wrong data");
    }
    if mem.read_obj::<u8>(GuestAddress(status_base + last_slot))? != 0 {
        bail!("virtio-blk request failed");
    }
    let interrupts = line.read().unwrap_or(0);
    if interrupts == 0 || irq.status() == 0 {
        bail!("virtio-blk never signalled a used buffer interrupt");
    }
    let _ = std::fs::remove_file(&path);

    let iops = requests as f64 / device.as_secs_f64();
    let raw_iops = requests as f64 / raw.as_secs_f64();
    let per_req_us = device.as_secs_f64() * 1e6 / requests as f64;
    let raw_per_req_us = raw.as_secs_f64() * 1e6 / requests as f64;
    println!(
        "blk: {requests} random 4 KiB reads from a {} MiB file in {}",
        IMAGE_BYTES >> 20,
        dir.display()
    );
    println!("{:<14} {:>12} {:>14}", "path", "IOPS", "us/request");
    println!("{:<14} {:>12.0} {:>14.3}", "virtio-blk", iops, per_req_us);
    println!(
        "{:<14} {:>12.0} {:>14.3}",
        "pread", raw_iops, raw_per_req_us
    );
    println!("ratio {:.3}", iops / raw_iops);
    let out = json!({
        "scenario": "blk",
        "requests": requests,
        "block_bytes": BLOCK,
        "iops": iops,
        "raw_iops": raw_iops,
        "ratio": iops / raw_iops,
        "us_per_request": per_req_us,
        "raw_us_per_request": raw_per_req_us,
        "device_overhead_us": per_req_us - raw_per_req_us,
        "interrupts": interrupts,
    });
    println!("{out}");
    Ok(())
}

/// Calls `step` until `done` holds; fails after `limit` calls without it (a device that stopped
/// making progress would otherwise spin the benchmark forever).
fn drive(
    what: &str,
    limit: usize,
    mut step: impl FnMut(),
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let mut calls = 0usize;
    while !done() {
        if calls == limit {
            bail!("{what}: no progress after {limit} calls");
        }
        step();
        calls += 1;
    }
    Ok(())
}

/// The bytes of net frame `seq`: a pattern that differs per frame, then the sequence number.
fn fill_frame(seq: u64, frame: &mut [u8]) {
    let base = seq.wrapping_mul(31);
    for (i, b) in frame.iter_mut().enumerate() {
        *b = (base.wrapping_add(i as u64) % 251) as u8;
    }
    if let Some(head) = frame.get_mut(..8) {
        head.copy_from_slice(&seq.to_le_bytes());
    }
}

/// A virtio-net backend that does real I/O without root: one end of an AF_UNIX datagram
/// socketpair, one frame per datagram (message boundaries kept, as on a tap).
#[derive(Debug)]
struct DgramNet(std::os::unix::net::UnixDatagram);

impl std::os::fd::AsRawFd for DgramNet {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl devices::virtio::net::NetBackend for DgramNet {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let n = self.0.send(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::other("short datagram"));
        }
        Ok(())
    }
}

/// Frames through the virtio-net TX and RX paths vs `send`/`recv` on the same kind of socket.
pub(crate) fn net(o: &Options) -> anyhow::Result<()> {
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;

    use devices::test_utils::{TestQueue, single_region_mem};
    use devices::virtio::net::defs::{NET_HDR_LEN, VIRTIO_NET_F_MRG_RXBUF};
    use devices::virtio::net::{NetConfig, VirtioNet};
    use devices::virtio::{Interrupt, IrqTrigger, VIRTIO_F_VERSION_1, VirtioDevice};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    /// Frames per batch: the guest posts this many, then the device runs.
    const BATCH: usize = 64;
    /// Guest memory per frame buffer.
    const SLOT: u64 = 0x1_0000;
    const TX_BASE: u64 = 0x10_0000;
    const RX_BASE: u64 = 0x50_0000;
    let frame_len = o.frame_bytes;
    if !(14..=65_000).contains(&frame_len) {
        bail!("--frame-bytes must be in 14..=65000");
    }
    let frames = o.iterations.max(1000) * 500;
    let chain_len = u32::try_from(NET_HDR_LEN + frame_len)?;
    // Receive buffers as a driver with mergeable buffers posts them: fixed size, one frame each.
    let rx_buf_len = chain_len.max(2048);
    let hdr_len = NET_HDR_LEN as u64;

    let mem = single_region_mem(16 << 20);
    let rxq = TestQueue::new(&mem, GuestAddress(0x1000), 256);
    let txq = TestQueue::new(&mem, GuestAddress(0x4000), 256);
    let (dev_end, host_end) = UnixDatagram::pair()?;
    dev_end.set_nonblocking(true)?;
    host_end.set_nonblocking(true)?;
    let mut dev = VirtioNet::new(NetConfig::default(), Box::new(DgramNet(dev_end)))?;
    dev.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    // The production interrupt's status bits, on an EventFd line (one write per interrupt;
    // the VMM's line is a KVM_IRQ_LINE pulse, which needs a VM).
    let line = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let irq = Arc::new(IrqTrigger::new(line.clone()));
    dev.activate(mem.clone(), vec![rxq.queue(), txq.queue()], irq.clone())?;

    let mut frame = vec![0u8; frame_len];
    let mut got = vec![0u8; frame_len + 64];

    // The baseline's socketpair, and host buffers for its frames.
    let (raw_tx_end, raw_rx_end) = UnixDatagram::pair()?;
    raw_tx_end.set_nonblocking(true)?;
    raw_rx_end.set_nonblocking(true)?;
    let mut batch_frames = vec![vec![0u8; frame_len]; BATCH];
    let mut bufs = vec![0u8; BATCH * (frame_len + 64)];

    // TX, batch by batch, the device and the baseline in turn (so both see the same machine
    // load). Device: the guest posts a batch, the device sends it, the host reads it. Baseline:
    // the same frames from host memory with one `send` each.
    let (mut tx_device, mut tx_raw) = (Duration::ZERO, Duration::ZERO);
    let mut used_seen = 0u16;
    let mut seq = 0usize;
    while seq < frames {
        let n = BATCH.min(frames - seq);
        for i in 0..n {
            let at = TX_BASE + i as u64 * SLOT;
            mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))?;
            fill_frame((seq + i) as u64, &mut frame);
            mem.write_slice(&frame, GuestAddress(at + hdr_len))?;
            txq.add_chain(&[(at, chain_len, false)]);
        }
        let target = used_seen.wrapping_add(u16::try_from(n)?);
        // Only the device's work counts: building the chains is the guest driver's.
        let t0 = Instant::now();
        drive(
            "virtio-net TX",
            1_000_000,
            || {
                if dev.process_tx() {
                    dev.signal_used_queue();
                }
            },
            || txq.used_idx() == target,
        )?;
        tx_device += t0.elapsed();
        used_seen = target;
        for i in 0..n {
            let len = host_end
                .recv(&mut got)
                .with_context(|| format!("TX frame {} did not reach the socket", seq + i))?;
            fill_frame((seq + i) as u64, &mut frame);
            if got[..len] != frame[..] {
                bail!("TX frame {} arrived corrupted ({len} bytes)", seq + i);
            }
        }

        for (i, f) in batch_frames[..n].iter_mut().enumerate() {
            fill_frame((seq + i) as u64, f);
        }
        let t0 = Instant::now();
        for f in &batch_frames[..n] {
            if raw_tx_end.send(f)? != frame_len {
                bail!("short datagram");
            }
        }
        tx_raw += t0.elapsed();
        for f in &batch_frames[..n] {
            let len = raw_rx_end.recv(&mut got)?;
            if got[..len] != f[..] {
                bail!("raw TX frame arrived corrupted");
            }
        }
        seq += n;
    }

    // RX the same way. Device: the host sends a batch, the guest posts buffers, the device
    // delivers. Baseline: the same frames received with one `recv` each into distinct buffers.
    let (mut rx_device, mut rx_raw) = (Duration::ZERO, Duration::ZERO);
    let mut head_slot = vec![0u64; 256];
    let mut rx_used_seen = 0u16;
    let mut seq = 0usize;
    while seq < frames {
        let n = BATCH.min(frames - seq);
        for i in 0..n {
            fill_frame((seq + i) as u64, &mut frame);
            host_end.send(&frame)?;
            let at = RX_BASE + i as u64 * SLOT;
            let head = rxq.add_chain(&[(at, rx_buf_len, true)]);
            head_slot[usize::from(head)] = at;
        }
        let target = rx_used_seen.wrapping_add(u16::try_from(n)?);
        let t0 = Instant::now();
        drive(
            "virtio-net RX",
            1_000_000,
            || {
                if dev.process_rx() {
                    dev.signal_used_queue();
                }
            },
            || rxq.used_idx() == target,
        )?;
        rx_device += t0.elapsed();
        for (i, pos) in (0..n).zip(0u16..) {
            let (id, len) = rxq.used_elem(rx_used_seen.wrapping_add(pos));
            if len != chain_len {
                bail!("RX frame {} delivered with length {len}", seq + i);
            }
            let at = head_slot[usize::from(id)];
            if mem.read_obj::<u16>(GuestAddress(at + 10))? != 1 {
                bail!("RX frame {}: num_buffers is not 1", seq + i);
            }
            mem.read_slice(&mut got[..frame_len], GuestAddress(at + hdr_len))?;
            fill_frame((seq + i) as u64, &mut frame);
            if got[..frame_len] != frame[..] {
                bail!("RX frame {} arrived corrupted", seq + i);
            }
        }
        rx_used_seen = target;

        for i in 0..n {
            fill_frame((seq + i) as u64, &mut frame);
            raw_tx_end.send(&frame)?;
        }
        let t0 = Instant::now();
        for buf in bufs.chunks_mut(frame_len + 64).take(n) {
            if raw_rx_end.recv(buf)? != frame_len {
                bail!("short datagram");
            }
        }
        rx_raw += t0.elapsed();
        for (i, buf) in bufs.chunks(frame_len + 64).take(n).enumerate() {
            fill_frame((seq + i) as u64, &mut frame);
            if buf[..frame_len] != frame[..] {
                bail!("raw RX frame arrived corrupted");
            }
        }
        seq += n;
    }

    let m = dev.metrics();
    if m.tx_frames != frames as u64 || m.rx_frames != frames as u64 || m.tx_dropped != 0 {
        bail!("virtio-net counters disagree: {m:?}");
    }
    let interrupts = line.read().unwrap_or(0);
    if interrupts == 0 || irq.status() == 0 {
        bail!("virtio-net never signalled a used buffer interrupt");
    }

    let fps = |d: Duration| frames as f64 / d.as_secs_f64();
    let us = |d: Duration| d.as_secs_f64() * 1e6 / frames as f64;
    println!(
        "net: {frames} frames of {frame_len} bytes each way, every one checked on arrival; \
         backend and baseline: an AF_UNIX SOCK_DGRAM socketpair (baseline: one send/recv per frame)"
    );
    println!(
        "{:<4} {:<12} {:>12} {:>10}",
        "dir", "path", "frames/s", "us/frame"
    );
    for (dir, path, d) in [
        ("TX", "virtio-net", tx_device),
        ("TX", "send", tx_raw),
        ("RX", "virtio-net", rx_device),
        ("RX", "recv", rx_raw),
    ] {
        println!("{dir:<4} {path:<12} {:>12.0} {:>10.3}", fps(d), us(d));
    }
    let tx_ratio = fps(tx_device) / fps(tx_raw);
    let rx_ratio = fps(rx_device) / fps(rx_raw);
    println!("ratio TX {tx_ratio:.3} RX {rx_ratio:.3}");
    let out = json!({
        "scenario": "net",
        "frames": frames,
        "frame_bytes": frame_len,
        "baseline": "AF_UNIX SOCK_DGRAM socketpair send/recv",
        "tx_fps": fps(tx_device),
        "raw_tx_fps": fps(tx_raw),
        "tx_us_per_frame": us(tx_device),
        "raw_tx_us_per_frame": us(tx_raw),
        "tx_ratio": tx_ratio,
        "rx_fps": fps(rx_device),
        "raw_rx_fps": fps(rx_raw),
        "rx_us_per_frame": us(rx_device),
        "raw_rx_us_per_frame": us(rx_raw),
        "rx_ratio": rx_ratio,
        "interrupts": interrupts,
    });
    println!("{out}");
    Ok(())
}

/// Byte `offset` of the vsock benchmark's stream.
fn fill_stream(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (offset.wrapping_add(i as u64) % 251) as u8;
    }
}

/// A byte stream through the vsock device to an in-process host stream and back, vs the same
/// chunks through a plain unix stream socketpair.
pub(crate) fn vsock(o: &Options) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use devices::virtio::vsock::defs::{
        MAX_PKT_DATA_SIZE, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW,
        PKT_HEADER_SIZE,
    };
    use devices::virtio::vsock::test_utils::{Driver, hdr, test_mem};
    use devices::virtio::vsock::{Vsock, VsockBackend, VsockHeader, VsockMuxer};
    use devices::virtio::{Interrupt, IrqTrigger, VirtioDevice};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    const CID: u64 = 3;
    const HOST_PORT: u32 = 1234;
    const GUEST_PORT: u32 = 5000;
    /// The receive buffer the guest advertises.
    const GUEST_BUF_ALLOC: u32 = 256 * 1024;
    /// Bytes per batch: half the muxer's default credit, so a guest that keeps to the credit
    /// protocol never waits.
    const BATCH_BYTES: usize = 64 * 1024;
    const TIMEOUT: Duration = Duration::from_secs(5);

    let chunk = o.packet_bytes;
    if !(1..=MAX_PKT_DATA_SIZE).contains(&chunk) {
        bail!("--packet-bytes must be in 1..={MAX_PKT_DATA_SIZE}");
    }
    let packets = o.iterations.max(1000) * 100;
    let total = packets * chunk;
    let per_batch = (BATCH_BYTES / chunk).clamp(1, 64);
    let rx_buf_len = u32::try_from(PKT_HEADER_SIZE + chunk)?;

    /// The guest's side of the connection's credit (virtio 1.2 §5.10.6.3).
    struct Credit {
        tx_cnt: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
        /// Host bytes the guest consumed.
        fwd_cnt: u32,
    }
    impl Credit {
        fn peer_free(&self) -> usize {
            let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
            self.peer_buf_alloc.saturating_sub(in_flight) as usize
        }
        fn update(&mut self, h: &VsockHeader) {
            self.peer_buf_alloc = h.buf_alloc;
            self.peer_fwd_cnt = h.fwd_cnt;
        }
        fn header(&self, op: u16, len: usize) -> VsockHeader {
            let mut h = hdr(CID, GUEST_PORT, HOST_PORT, op);
            h.len = u32::try_from(len).expect("packet lengths are at most 64 KiB");
            h.buf_alloc = GUEST_BUF_ALLOC;
            h.fwd_cnt = self.fwd_cnt;
            h
        }
    }

    let mem = test_mem();
    let mut drv = Driver::new(&mem);
    let muxer = VsockMuxer::new(CID, None)?;
    let listener = muxer.handle().listen(HOST_PORT)?;
    let mut dev = Vsock::new(CID, muxer)?;
    // What the event loop polls the muxer's fd for; it reports the same when it is ready.
    let readable = dev.backend().interest();
    let line = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let irq = Arc::new(IrqTrigger::new(line.clone()));
    let (queues, _) = drv.queues();
    dev.activate(mem.clone(), queues, irq.clone())?;
    let spare_rx = per_batch + 8;
    drv.add_rx(spare_rx, rx_buf_len);

    // The guest connects to the host's listener.
    let mut credit = Credit {
        tx_cnt: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        fwd_cnt: 0,
    };
    drv.send(&credit.header(OP_REQUEST, 0), &[]);
    dev.handle_txq_event();
    drv.tx_used();
    let answer = drv.recv();
    let Some((resp, _)) = answer.iter().find(|(h, _)| h.op == OP_RESPONSE) else {
        bail!("the muxer did not accept the connection: {answer:?}");
    };
    credit.update(resp);
    let (mut host, _) = listener.accept()?;
    host.set_read_timeout(Some(TIMEOUT))?;

    // The baseline's socketpair.
    let (mut raw_a, mut raw_b) = UnixStream::pair()?;
    raw_a.set_read_timeout(Some(TIMEOUT))?;
    raw_b.set_read_timeout(Some(TIMEOUT))?;

    // TX, batch by batch, the device and the baseline in turn (so both see the same machine
    // load). Device: the guest sends a batch of RW packets, the device forwards them, the host
    // reads. Baseline: the same chunks written to a unix stream, read by the other end.
    let mut data = vec![0u8; chunk];
    let mut host_buf = vec![0u8; per_batch * chunk];
    let mut expected = vec![0u8; per_batch * chunk];
    let (mut tx_device, mut tx_raw) = (Duration::ZERO, Duration::ZERO);
    let mut offset = 0usize;
    while offset < total {
        let want = per_batch.min((total - offset) / chunk);
        if credit.peer_free() < want * chunk {
            // Credit updates come on the RX queue; the device delivers them there.
            let t0 = Instant::now();
            dev.handle_rxq_event();
            tx_device += t0.elapsed();
            for (h, _) in drv.recv() {
                credit.update(&h);
            }
        }
        let n = want.min(credit.peer_free() / chunk);
        if n == 0 {
            bail!(
                "the guest ran out of credit: {} bytes free",
                credit.peer_free()
            );
        }
        for k in 0..n {
            fill_stream((offset + k * chunk) as u64, &mut data);
            drv.send(&credit.header(OP_RW, chunk), &data);
        }
        let t0 = Instant::now();
        dev.handle_txq_event();
        tx_device += t0.elapsed();
        let used = drv.tx_used();
        if used.len() != n {
            bail!("vsock TX: {} of {n} buffers returned", used.len());
        }
        let bytes = n * chunk;
        credit.tx_cnt = credit.tx_cnt.wrapping_add(u32::try_from(bytes)?);
        host.read_exact(&mut host_buf[..bytes])
            .context("vsock TX data did not reach the host stream")?;
        fill_stream(offset as u64, &mut expected[..bytes]);
        if host_buf[..bytes] != expected[..bytes] {
            bail!("vsock TX data arrived corrupted at stream offset {offset}");
        }
        for (h, _) in drv.recv() {
            if h.op != OP_CREDIT_UPDATE {
                bail!("unexpected packet during TX: {h:?}");
            }
            credit.update(&h);
        }
        let posted = usize::from(drv.rx_outstanding());
        drv.add_rx(spare_rx.saturating_sub(posted), rx_buf_len);

        let t0 = Instant::now();
        for piece in expected[..bytes].chunks(chunk) {
            raw_a.write_all(piece)?;
        }
        tx_raw += t0.elapsed();
        raw_b.read_exact(&mut host_buf[..bytes])?;
        if host_buf[..bytes] != expected[..bytes] {
            bail!("raw TX data arrived corrupted");
        }
        offset += bytes;
    }

    // RX the same way. Device: the host writes a batch, the device moves it into the guest's
    // RX buffers, and the guest gives the credit back as it consumes (that packet is device
    // work too). Baseline: the host writes the batch, the other end reads it in the same
    // chunks.
    let (mut rx_device, mut rx_raw) = (Duration::ZERO, Duration::ZERO);
    let mut offset = 0usize;
    while offset < total {
        let bytes = (per_batch * chunk).min(total - offset);
        fill_stream(offset as u64, &mut expected[..bytes]);
        host.write_all(&expected[..bytes])?;
        let mut got = 0usize;
        let mut idle = 0usize;
        while got < bytes {
            let t0 = Instant::now();
            dev.handle_backend_event(readable);
            rx_device += t0.elapsed();
            let before = got;
            for (h, d) in drv.recv() {
                credit.update(&h);
                match h.op {
                    OP_RW => {
                        if got + d.len() > bytes || d[..] != expected[got..got + d.len()] {
                            bail!("vsock RX data arrived corrupted near stream offset {offset}");
                        }
                        got += d.len();
                        credit.fwd_cnt = credit.fwd_cnt.wrapping_add(u32::try_from(d.len())?);
                    }
                    OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {}
                    _ => bail!("unexpected packet during RX: {h:?}"),
                }
            }
            let posted = usize::from(drv.rx_outstanding());
            drv.add_rx(spare_rx.saturating_sub(posted), rx_buf_len);
            idle = if got == before { idle + 1 } else { 0 };
            if idle > 1000 {
                bail!("vsock RX: stuck at {got} of {bytes} bytes");
            }
        }
        drv.send(&credit.header(OP_CREDIT_UPDATE, 0), &[]);
        let t0 = Instant::now();
        dev.handle_txq_event();
        rx_device += t0.elapsed();
        drv.tx_used();

        raw_b.write_all(&expected[..bytes])?;
        let t0 = Instant::now();
        for piece in host_buf[..bytes].chunks_mut(chunk) {
            raw_a.read_exact(piece)?;
        }
        rx_raw += t0.elapsed();
        if host_buf[..bytes] != expected[..bytes] {
            bail!("raw RX data arrived corrupted");
        }
        offset += bytes;
    }

    let interrupts = line.read().unwrap_or(0);
    if interrupts == 0 || irq.status() == 0 {
        bail!("virtio-vsock never signalled a used buffer interrupt");
    }

    let mbs = |d: Duration| total as f64 / d.as_secs_f64() / 1e6;
    println!(
        "vsock: {:.1} MB each way in {chunk}-byte packets ({} per batch), every byte checked; \
         host end: an in-process VsockHandle stream; baseline: a unix stream socketpair, same chunks",
        total as f64 / 1e6,
        per_batch
    );
    println!("{:<4} {:<14} {:>10}", "dir", "path", "MB/s");
    for (dir, path, d) in [
        ("TX", "virtio-vsock", tx_device),
        ("TX", "write", tx_raw),
        ("RX", "virtio-vsock", rx_device),
        ("RX", "read", rx_raw),
    ] {
        println!("{dir:<4} {path:<14} {:>10.1}", mbs(d));
    }
    let tx_ratio = mbs(tx_device) / mbs(tx_raw);
    let rx_ratio = mbs(rx_device) / mbs(rx_raw);
    println!("ratio TX {tx_ratio:.3} RX {rx_ratio:.3}");
    let out = json!({
        "scenario": "vsock",
        "bytes": total,
        "packet_bytes": chunk,
        "baseline": "unix stream socketpair write/read in the same chunks",
        "tx_mb_s": mbs(tx_device),
        "raw_tx_mb_s": mbs(tx_raw),
        "tx_ratio": tx_ratio,
        "rx_mb_s": mbs(rx_device),
        "raw_rx_mb_s": mbs(rx_raw),
        "rx_ratio": rx_ratio,
        "interrupts": interrupts,
    });
    println!("{out}");
    Ok(())
}
