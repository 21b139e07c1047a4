// SPDX-License-Identifier: Apache-2.0
//! Agent events to containerd: one task per sandbox long-polls `Control.WaitEvent` and
//! forwards `/tasks/oom` to containerd's `<containerd address>.ttrpc`
//! (`containerd.services.events.ttrpc.v1.Events/Forward`), or logs it when no containerd
//! address is configured (iSulad, tests).
//!
//! The loop ends when the agent connection is gone (the VM ended) or the agent has no
//! `WaitEvent`; the endpoint aborts it on shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::events::task::TaskOOM;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;
use proto::agent::control::{Event, WaitEventRequest};

use super::error::TaskError;
use super::service::Endpoint;

/// containerd's topic for an OOM kill.
pub const TOPIC_OOM: &str = "/tasks/oom";
/// Type URL of the OOM event body.
pub const TASK_OOM_TYPE: &str = "containerd.events.TaskOOM";
/// Namespace for events of containers created without one (CRI's).
pub const DEFAULT_NAMESPACE: &str = "k8s.io";
/// Pause after a failed poll before the next one.
const RETRY: Duration = Duration::from_secs(1);
/// Events a sandbox may send in a burst, and per second after it: more are dropped (counted).
const EVENT_BURST: f64 = 20.0;
const EVENTS_PER_SEC: f64 = 10.0;

/// A token bucket: how many guest events to accept.
#[derive(Debug)]
struct RateLimit {
    tokens: f64,
    at: std::time::Instant,
}

impl RateLimit {
    fn new() -> Self {
        RateLimit {
            tokens: EVENT_BURST,
            at: std::time::Instant::now(),
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: std::time::Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * EVENTS_PER_SEC;
        self.tokens = (self.tokens + refill).min(EVENT_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a guest event is not forwarded, if it is not.
fn refuse(event: &Event, known: bool, limit: &mut RateLimit) -> Option<&'static str> {
    if event.topic != TOPIC_OOM {
        return Some("unknown_topic");
    }
    // Only for a container of this sandbox: a guest must not speak for another's.
    if !known {
        return Some("unknown_container");
    }
    if !limit.take(std::time::Instant::now()) {
        return Some("rate_limited");
    }
    None
}
/// Bound on one Forward to containerd.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The `Forward` request for an agent event.
pub fn envelope(event: &Event, namespace: &str) -> Result<ForwardRequest, TaskError> {
    let mut oom = TaskOOM::new();
    oom.container_id.clone_from(&event.container_id);
    let mut any = Any::new();
    any.type_url = TASK_OOM_TYPE.to_owned();
    any.value = oom
        .write_to_bytes()
        .map_err(|e| TaskError::Encode("TaskOOM", Box::new(e)))?;
    let mut ts = Timestamp::new();
    ts.seconds = event.unix_nanos.div_euclid(1_000_000_000);
    ts.nanos = i32::try_from(event.unix_nanos.rem_euclid(1_000_000_000)).unwrap_or(0);
    let mut env = Envelope::new();
    env.timestamp = MessageField::some(ts);
    env.namespace = namespace.to_owned();
    env.topic.clone_from(&event.topic);
    env.event = MessageField::some(any);
    let mut req = ForwardRequest::new();
    req.envelope = MessageField::some(env);
    Ok(req)
}

/// Sends events to containerd, connecting (again) when needed.
#[derive(Debug)]
struct Publisher {
    address: PathBuf,
    client: Option<EventsClientDebug>,
}

/// `EventsClient` is not `Debug`.
struct EventsClientDebug(EventsClient);

impl std::fmt::Debug for EventsClientDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventsClient")
    }
}

impl Publisher {
    async fn client(&mut self) -> Result<&EventsClient, ttrpc::Error> {
        if self.client.is_none() {
            let addr = format!("unix://{}.ttrpc", self.address.display());
            let c = ttrpc::asynchronous::Client::connect(&addr).await?;
            self.client = Some(EventsClientDebug(EventsClient::new(c)));
        }
        Ok(&self.client.as_ref().expect("set above").0)
    }

    async fn publish(&mut self, req: &ForwardRequest) -> Result<(), ttrpc::Error> {
        let mut last = None;
        for _ in 0..2 {
            let result = match self.client().await {
                Ok(c) => c
                    .forward(ttrpc::context::with_duration(PUBLISH_TIMEOUT), req)
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e @ ttrpc::Error::RpcStatus(_)) => return Err(e),
                // A stale connection (containerd restarted): reconnect once.
                Err(e) => {
                    self.client = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(ttrpc::Error::RemoteClosed))
    }
}

/// Polls the agent for events until the connection ends; forwards OOM events.
pub(crate) async fn run(endpoint: Arc<Endpoint>, containerd: Option<PathBuf>) {
    let mut publisher = containerd.map(|address| Publisher {
        address,
        client: None,
    });
    let mut limit = RateLimit::new();
    loop {
        let control = match endpoint.control() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("Event loop ends: {}", e.chain());
                return;
            }
        };
        let event = match control
            .wait_event(ttrpc::context::Context::default(), &WaitEventRequest::new())
            .await
        {
            Ok(ev) => ev,
            Err(ttrpc::Error::RpcStatus(s))
                if matches!(
                    s.code(),
                    ttrpc::Code::UNIMPLEMENTED | ttrpc::Code::NOT_FOUND
                ) =>
            {
                tracing::warn!(
                    "The agent has no event service ({}); OOM events are lost",
                    s.message()
                );
                return;
            }
            Err(ttrpc::Error::RpcStatus(s)) => {
                tracing::warn!("WaitEvent failed: {}", s.message());
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(e) => {
                tracing::debug!("Event loop ends, agent connection gone: {e}");
                return;
            }
        };
        if event.topic.is_empty() {
            // A long poll that returns at once with nothing: the agent does not implement it
            // (polling again would spin). Real events always name their topic.
            tracing::warn!("The agent answered WaitEvent without an event; OOM events are lost");
            return;
        }
        let known = endpoint.has_container(&event.container_id);
        if let Some(why) = refuse(&event, known, &mut limit) {
            crate::metrics::global().observe_event_drop(why);
            tracing::debug!(
                "Dropped agent event {} for {}: {why}",
                crate::guest_text(&event.topic),
                crate::guest_text(&event.container_id)
            );
            continue;
        }
        let namespace = endpoint
            .namespace_of(&event.container_id)
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        tracing::info!(
            "Container {} was OOM-killed",
            crate::guest_text(&event.container_id)
        );
        let Some(p) = publisher.as_mut() else {
            continue;
        };
        let result = match envelope(&event, &namespace) {
            Ok(req) => p.publish(&req).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.chain()),
        };
        if let Err(e) = result {
            tracing::warn!(
                "Forwarding the OOM event of {} to containerd failed: {e}",
                crate::guest_text(&event.container_id)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ooms_of_own_containers_within_the_rate_pass() {
        let mut ev = Event::new();
        ev.topic = TOPIC_OOM.to_owned();
        ev.container_id = "c1".to_owned();
        let mut limit = RateLimit::new();
        assert_eq!(refuse(&ev, false, &mut limit), Some("unknown_container"));
        let mut other = ev.clone();
        other.topic = "/tasks/exit".to_owned();
        assert_eq!(refuse(&other, true, &mut limit), Some("unknown_topic"));
        // A burst passes, then the rate holds.
        let passed = (0..100)
            .filter(|_| refuse(&ev, true, &mut limit).is_none())
            .count();
        assert_eq!(passed, 20);
        // A second later, ten more.
        limit.at -= Duration::from_secs(1);
        let passed = (0..100)
            .filter(|_| refuse(&ev, true, &mut limit).is_none())
            .count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn oom_envelope() {
        let mut ev = Event::new();
        ev.topic = TOPIC_OOM.to_owned();
        ev.container_id = "c1".to_owned();
        ev.unix_nanos = 5_000_000_007;
        let req = envelope(&ev, "k8s.io").unwrap();
        let env = req.envelope.as_ref().unwrap();
        assert_eq!(env.namespace, "k8s.io");
        assert_eq!(env.topic, "/tasks/oom");
        assert_eq!((env.timestamp.seconds, env.timestamp.nanos), (5, 7));
        let any = env.event.as_ref().unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskOOM");
        let oom = TaskOOM::parse_from_bytes(&any.value).unwrap();
        assert_eq!(oom.container_id, "c1");
    }
}
