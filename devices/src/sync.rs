// SPDX-License-Identifier: Apache-2.0
//! Locks that do not pass a panic on. Every sandbox lives in one process: if a thread panics
//! while it holds a lock (a device handler fed a state nobody foresaw, say), the standard
//! library marks the lock poisoned, and every later `lock().expect(..)` would panic too: the
//! one fault would spread to each thread that takes the lock, the daemon-wide ones included.
//! The VMM contains a panic to the VM it happened in (its thread ends that VM as crashed), so
//! the others take the lock as it was left with [`Recover::recover`]: what a lock guards here
//! is kept consistent between statements (counters, maps, queues of owned values), and the VM
//! whose thread panicked is torn down right after.

use std::sync::PoisonError;

/// Takes what a poisoned lock holds instead of failing.
pub trait Recover<T> {
    /// The guard (or the guard and the wait result), poisoned or not.
    fn recover(self) -> T;
}

impl<T> Recover<T> for Result<T, PoisonError<T>> {
    #[inline]
    fn recover(self) -> T {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::Recover;

    #[test]
    fn a_poisoned_lock_is_taken_as_it_was_left() {
        let m = Arc::new(Mutex::new(1));
        let m2 = Arc::clone(&m);
        let panicked = std::thread::spawn(move || {
            let mut g = m2.lock().recover();
            *g = 2;
            panic!("injected");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*m.lock().recover(), 2);
    }
}
