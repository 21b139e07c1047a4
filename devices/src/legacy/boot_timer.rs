// SPDX-License-Identifier: Apache-2.0
//! Boot timer: the guest's "I am up" signal.
//!
//! The guest writes [`BootTimer::MAGIC`] to offset 0 of the device's MMIO window once it is ready
//! (a test guest right after entry, the agent once it serves). The device records the time since
//! the VM's start, which every start-up benchmark reports. Later writes are ignored, so a guest
//! cannot move the recorded figure.

use crate::sync::Recover;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The recorded boot time, shared with whoever waits for it.
#[derive(Debug, Default)]
pub struct BootSignal {
    value: Mutex<BootState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct BootState {
    elapsed: Option<Duration>,
    closed: bool,
}

impl BootSignal {
    /// The time from VM start to the guest's signal, if it came.
    pub fn get(&self) -> Option<Duration> {
        self.value.lock().recover().elapsed
    }

    /// Waits up to `timeout` for the signal. Returns early (with `None`) once the signal is
    /// closed because the VM ended without signalling.
    pub fn wait(&self, timeout: Duration) -> Option<Duration> {
        let guard = self.value.lock().recover();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |s| s.elapsed.is_none() && !s.closed)
            .recover();
        guard.elapsed
    }

    /// Records the signal once; later calls are ignored.
    fn record(&self, elapsed: Duration) {
        let mut state = self.value.lock().recover();
        if state.elapsed.is_none() {
            state.elapsed = Some(elapsed);
            self.cv.notify_all();
        }
    }

    /// Wakes waiters: no signal will come any more (the VM ended).
    pub fn close(&self) {
        let mut state = self.value.lock().recover();
        state.closed = true;
        self.cv.notify_all();
    }
}

/// The boot timer MMIO device.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    signal: Arc<BootSignal>,
}

impl BootTimer {
    /// The byte the guest writes at offset 0 (Firecracker's value).
    pub const MAGIC: u8 = 123;

    /// A timer counting from `start` (the moment the VM's start was requested).
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            signal: Arc::new(BootSignal::default()),
        }
    }

    /// The shared signal.
    pub fn signal(&self) -> Arc<BootSignal> {
        Arc::clone(&self.signal)
    }

    /// Guest write to the device window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&Self::MAGIC) {
            self.signal.record(self.start.elapsed());
        }
    }

    /// Guest read from the device window: always zero.
    pub fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_first_magic_write_at_offset_zero() {
        let timer = BootTimer::new(Instant::now());
        let signal = timer.signal();
        timer.write(1, &[BootTimer::MAGIC]);
        timer.write(0, &[1]);
        timer.write(0, &[]);
        assert_eq!(signal.get(), None);
        timer.write(0, &[BootTimer::MAGIC, 0, 0, 0]);
        let first = signal.get().expect("recorded");
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BootTimer::MAGIC]);
        assert_eq!(signal.get(), Some(first));
        assert_eq!(signal.wait(Duration::from_secs(1)), Some(first));
    }

    #[test]
    fn wait_returns_when_closed_without_signal() {
        let timer = BootTimer::new(Instant::now());
        let signal = timer.signal();
        let waiter = {
            let signal = Arc::clone(&signal);
            std::thread::spawn(move || signal.wait(Duration::from_secs(30)))
        };
        signal.close();
        assert_eq!(waiter.join().unwrap(), None);
    }

    #[test]
    fn reads_are_zero() {
        let timer = BootTimer::new(Instant::now());
        let mut data = [0xffu8; 4];
        timer.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
