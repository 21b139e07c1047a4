// SPDX-License-Identifier: Apache-2.0
//! The 8250 serial console (vm-superio) and where its output goes.
//!
//! Output goes to an optional log file, an optional passthrough writer (a terminal for the
//! command-line front end) and a bounded in-memory tail that tests and error reports read. All
//! three are bounded: a guest printing forever costs the log file's disk and nothing else.

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
            passthrough,
        }
    }

    /// The in-memory tail.
    pub fn tail(&self) -> Arc<ConsoleTail> {
        Arc::clone(&self.tail)
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.push(buf);
        // A failing log or terminal must not stop the guest: drop the output and say so once.
        if let Some(log) = self.log.as_mut()
            && let Err(e) = log.write_all(buf)
        {
            log::warn!("Console log write failed, log disabled: {e}");
            self.log = None;
        }
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
