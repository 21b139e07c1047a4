// SPDX-License-Identifier: Apache-2.0
//! Events for the host (e.g. an OOM kill), kept in a bounded queue until the host takes them
//! with the Control service's `WaitEvent` long poll.
//!
//! Producers (the Task service's OOM watcher) call [`Events::publish`]; it never blocks and
//! drops the oldest event when the queue is full, so a host that never polls cannot make the
//! agent grow without bound.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// containerd's topic for an OOM kill.
pub const TOPIC_OOM: &str = "/tasks/oom";
/// Events kept before the oldest is dropped.
pub const CAPACITY: usize = 256;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// containerd topic, e.g. [`TOPIC_OOM`].
    pub topic: String,
    /// The container it concerns.
    pub container_id: String,
    /// When the agent saw it, nanoseconds since the Unix epoch.
    pub unix_nanos: i64,
}

/// The queue. Share it with `Arc`.
#[derive(Debug, Default)]
pub struct Events {
    queue: Mutex<VecDeque<Event>>,
    ready: Notify,
}

impl Events {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues an event stamped now; drops the oldest when [`CAPACITY`] are queued.
    pub fn publish(&self, topic: &str, container_id: &str) {
        let unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let event = Event {
            topic: topic.to_string(),
            container_id: container_id.to_string(),
            unix_nanos,
        };
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= CAPACITY {
                log::warn!("Event queue full: dropping the oldest event");
                q.pop_front();
            }
            q.push_back(event);
        }
        self.ready.notify_one();
    }

    /// Takes the oldest event, waiting until there is one.
    pub async fn next(&self) -> Event {
        loop {
            let notified = self.ready.notified();
            if let Some(e) = self.try_next() {
                return e;
            }
            notified.await;
        }
    }

    /// Takes the oldest event if there is one.
    pub fn try_next(&self) -> Option<Event> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Events queued now.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn bounded_and_fifo() {
        let ev = Events::new();
        for i in 0..CAPACITY + 3 {
            ev.publish(TOPIC_OOM, &i.to_string());
        }
        assert_eq!(ev.len(), CAPACITY);
        assert_eq!(ev.try_next().map(|e| e.container_id), Some("3".into()));
    }

    #[tokio::test]
    async fn next_waits_for_a_publish() {
        let ev = Arc::new(Events::new());
        let waiter = tokio::spawn({
            let ev = Arc::clone(&ev);
            async move { ev.next().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        ev.publish(TOPIC_OOM, "c1");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("next() did not wake")
            .expect("task");
        assert_eq!(
            (got.topic.as_str(), got.container_id.as_str()),
            (TOPIC_OOM, "c1")
        );
        assert!(got.unix_nanos > 0);
    }
}
