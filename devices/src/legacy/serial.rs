// SPDX-License-Identifier: Apache-2.0
//! The 8250 serial console (vm-superio) and where its output goes.
//!
//! Output goes to an optional log file, an optional passthrough writer (a terminal for the
//! command-line front end) and a bounded in-memory tail that tests and error reports read. The
//! log file is bounded too when given a limit ([`ConsoleSink::with_log_limit`]): once the next
//! write would take it past the limit it starts again, with a line that says how much was
//! dropped and the newest output (what the tail holds, at most half the limit) at its head. A
//! guest printing forever so costs the limit in disk and nothing more.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::sync::Recover;
use crate::virtio::Line;

/// Bytes of console output kept in memory.
pub const TAIL_CAPACITY: usize = 16 * 1024;

/// The last [`TAIL_CAPACITY`] bytes the guest printed, plus a running total.
#[derive(Debug, Default)]
pub struct ConsoleTail {
    inner: Mutex<TailState>,
}

#[derive(Debug, Default)]
struct TailState {
    bytes: VecDeque<u8>,
    total: u64,
}

impl ConsoleTail {
    fn push(&self, data: &[u8]) {
        let mut state = self.inner.lock().recover();
        state.total = state.total.saturating_add(data.len() as u64);
        let keep = data.len().min(TAIL_CAPACITY);
        let data = data.get(data.len() - keep..).unwrap_or_default();
        let overflow = (state.bytes.len() + data.len()).saturating_sub(TAIL_CAPACITY);
        state.bytes.drain(..overflow);
        state.bytes.extend(data);
    }

    /// The retained output, lossily decoded.
    pub fn text(&self) -> String {
        let state = self.inner.lock().recover();
        let (a, b) = state.bytes.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Bytes printed since the VM started (including those no longer retained).
    pub fn total_bytes(&self) -> u64 {
        self.inner.lock().recover().total
    }
}

/// Where the serial port's output goes.
pub struct ConsoleSink {
    tail: Arc<ConsoleTail>,
    log: Option<io::LineWriter<File>>,
    /// Bytes the log file may hold ([`ConsoleSink::with_log_limit`]); `u64::MAX` for no limit.
    log_limit: u64,
    /// Bytes in the log file now.
    log_len: u64,
    /// Bytes dropped from the log file by restarts, in all.
    log_dropped: u64,
    passthrough: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("log", &self.log.is_some())
            .field("passthrough", &self.passthrough.is_some())
            .finish_non_exhaustive()
    }
}

impl ConsoleSink {
    /// A sink writing to the tail, and to `log` and `passthrough` when given.
    pub fn new(log: Option<File>, passthrough: Option<Box<dyn Write + Send>>) -> Self {
        ConsoleSink {
            tail: Arc::new(ConsoleTail::default()),
            log: log.map(io::LineWriter::new),
            log_limit: u64::MAX,
            log_len: 0,
            log_dropped: 0,
            passthrough,
        }
    }

    /// Bounds the log file to `max_bytes` (it may already hold some: it is appended to).
    pub fn with_log_limit(mut self, max_bytes: u64) -> Self {
        self.log_limit = max_bytes;
        self.log_len = self
            .log
            .as_ref()
            .and_then(|log| log.get_ref().metadata().ok())
            .map_or(0, |m| m.len());
        self
    }

    /// Appends `buf` to the log file, first starting it again if `buf` would take it past its
    /// limit.
    fn write_log(&mut self, buf: &[u8]) -> io::Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        let len = buf.len() as u64;
        if self.log_len.saturating_add(len) > self.log_limit {
            log.flush()?;
            log.get_ref().set_len(0)?;
            self.log_dropped = self.log_dropped.saturating_add(self.log_len);
            let text = self.tail.text();
            let room = usize::try_from(self.log_limit / 2).unwrap_or(usize::MAX);
            let mut from = text.len().saturating_sub(room);
            while !text.is_char_boundary(from) {
                from += 1;
            }
            let kept = text.get(from..).unwrap_or_default();
            let note = format!(
                "[sandboxer: console log limit of {} bytes reached, {} bytes dropped in all; \
                 the last {} bytes before this follow]\n",
                self.log_limit,
                self.log_dropped,
                kept.len()
            );
            log::warn!(
                "Console log reached its limit of {} bytes: started again",
                self.log_limit
            );
            log.write_all(note.as_bytes())?;
            log.write_all(kept.as_bytes())?;
            self.log_len = (note.len() + kept.len()) as u64;
        }
        log.write_all(buf)?;
        self.log_len = self.log_len.saturating_add(len);
        Ok(())
    }

    /// The in-memory tail.
    pub fn tail(&self) -> Arc<ConsoleTail> {
        Arc::clone(&self.tail)
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A failing log or terminal must not stop the guest: drop the output and say so once.
        // (The log first: a restart copies the tail as it was before `buf`.)
        if let Err(e) = self.write_log(buf) {
            log::warn!("Console log write failed, log disabled: {e}");
            self.log = None;
        }
        self.tail.push(buf);
        if let Some(out) = self.passthrough.as_mut()
            && out.write_all(buf).and_then(|()| out.flush()).is_err()
        {
            self.passthrough = None;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(log) = self.log.as_mut() {
            let _ = log.flush();
        }
        Ok(())
    }
}

/// A vm-superio interrupt trigger that pulses the UART's interrupt [`Line`] (the VMM's).
#[derive(Debug)]
pub struct LineTrigger(pub Arc<dyn Line>);

impl Trigger for LineTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.pulse()
    }
}

/// The serial console device: an 8250 UART on 8 consecutive ports.
#[derive(Debug)]
pub struct SerialConsole {
    uart: Serial<LineTrigger, NoEvents, ConsoleSink>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: Arc<dyn Line>, sink: ConsoleSink) -> Self {
        SerialConsole {
            uart: Serial::new(LineTrigger(irq), sink),
        }
    }

    /// Port read at `offset` (0..8) from the base.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    /// Port write at `offset` (0..8) from the base.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data)
            && let Err(e) = self.uart.write(offset, *value)
        {
            log::debug!("Serial write failed: {e:?}");
        }
    }

    /// Queues host input for the guest to read.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }

    /// The UART's registers and input FIFO, for a VM snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// A UART in a saved state (a VM restored or cloned), raising `irq` and writing to `sink`.
    /// Fails only for an input FIFO larger than a UART has.
    pub fn restore(irq: Arc<dyn Line>, sink: ConsoleSink, state: &SerialState) -> io::Result<Self> {
        let uart = Serial::from_state(state, LineTrigger(irq), NoEvents, sink)
            .map_err(|e| io::Error::other(format!("cannot restore the UART: {e:?}")))?;
        Ok(SerialConsole { uart })
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_tail_log_and_passthrough() {
        let dir = std::env::temp_dir().join(format!("serial-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("console.log");
        let out = Shared::default();
        let sink = ConsoleSink::new(
            Some(File::create(&log_path).unwrap()),
            Some(Box::new(out.clone())),
        );
        let tail = sink.tail();
        let mut serial = SerialConsole::new(Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()), sink);
        for b in b"hello\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(tail.text(), "hello\n");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        drop(serial);
        assert_eq!(std::fs::read_to_string(&log_path).unwrap(), "hello\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_log_with_a_limit_starts_again_with_the_newest_output() {
        let dir = std::env::temp_dir().join(format!("serial-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("console.log");
        std::fs::write(&log_path, "from before\n").unwrap();
        let limit = 4096;
        let file = File::options().append(true).open(&log_path).unwrap();
        let mut sink = ConsoleSink::new(Some(file), None).with_log_limit(limit);
        let mut last = String::new();
        for n in 0..1000 {
            last = format!("line {n:04} of the guest's endless output\n");
            sink.write_all(last.as_bytes()).unwrap();
            sink.flush().unwrap();
            let len = std::fs::metadata(&log_path).unwrap().len();
            assert!(len <= limit, "{len} bytes after line {n}");
        }
        let text = std::fs::read_to_string(&log_path).unwrap();
        assert!(text.ends_with(&last), "{text}");
        assert!(!text.contains("from before"));
        let note = text
            .lines()
            .find(|l| l.starts_with("[sandboxer: console log limit"))
            .unwrap();
        assert!(note.contains("4096 bytes reached"), "{note}");
        // Everything after the note is the guest's own output, in order.
        let after: Vec<&str> = text.split_once(note).unwrap().1.lines().skip(1).collect();
        assert!(after.len() > 40, "{after:?}");
        assert!(after.windows(2).all(|w| w[0] < w[1]), "{after:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tail_is_bounded_and_keeps_the_newest_bytes() {
        let tail = ConsoleTail::default();
        for _ in 0..3 {
            tail.push(&[b'a'; TAIL_CAPACITY]);
        }
        tail.push(b"end");
        let text = tail.text();
        assert_eq!(text.len(), TAIL_CAPACITY);
        assert!(text.ends_with("aaend"));
        assert_eq!(tail.total_bytes(), 3 * TAIL_CAPACITY as u64 + 3);
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let sink = ConsoleSink::new(None, None);
        let tail = sink.tail();
        let mut serial = SerialConsole::new(Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()), sink);
        serial.write(0, b"ab");
        serial.write(u64::MAX, b"a");
        let mut data = [0u8; 2];
        serial.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(tail.total_bytes(), 0);
    }
}
