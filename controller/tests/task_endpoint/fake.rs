// SPDX-License-Identifier: Apache-2.0
//! An in-process fake agent (Task + Control over ttrpc on a unix socket), a fake containerd
//! events service, and a [`TaskTarget`] with fake slots: what the endpoint's own logic is
//! tested against without root (bundle paths, undo on failure, timeouts, OOM forwarding).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CreateTaskRequest, CreateTaskResponse, StartRequest, StartResponse, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::TaskOOM;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Events, Task, create_events, create_task};
use controller::backend::{AttachedDisk, BackendError, TaskTarget};
use proto::agent::control::{
    Event, PrepareBundleRequest, PrepareBundleResponse, RemoveBundleRequest, WaitEventRequest,
};
use proto::agent::control_ttrpc::{Control, create_control};
use tokio::sync::Notify;
use ttrpc::asynchronous::{Server, TtrpcContext};

/// What the fake agent saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub prepares: Vec<PrepareBundleRequest>,
    pub removes: Vec<String>,
    pub creates: Vec<CreateTaskRequest>,
    pub create_metadata: Vec<HashMap<String, Vec<String>>>,
}

#[derive(Debug, Default)]
pub struct FakeAgent {
    pub seen: Mutex<Seen>,
    /// Events WaitEvent hands out, one per call; then it waits.
    pub events: Mutex<Vec<Event>>,
    pub event_ready: Notify,
    /// What Wait answers once set ([`FakeAgent::exit`]); until then it waits.
    pub exit_status: Mutex<Option<u32>>,
    pub exited: Notify,
}

impl FakeAgent {
    /// Every Wait, waiting or to come, answers `status`.
    pub fn exit(&self, status: u32) {
        *self.exit_status.lock().unwrap() = Some(status);
        self.exited.notify_waiters();
    }
}

fn status(code: ttrpc::Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

#[async_trait]
impl Task for FakeAgent {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let fail = req.id == "fail";
        let mut seen = self.seen.lock().unwrap();
        seen.create_metadata.push(ctx.metadata.clone());
        seen.creates.push(req);
        if fail {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                "fake create failure",
            ));
        }
        let mut r = CreateTaskResponse::new();
        r.pid = 42;
        Ok(r)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        if req.id == "slow" {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        let mut r = StartResponse::new();
        r.pid = 42;
        Ok(r)
    }

    async fn wait(&self, _ctx: &TtrpcContext, _req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        loop {
            let exited = self.exited.notified();
            if let Some(status) = *self.exit_status.lock().unwrap() {
                let mut r = WaitResponse::new();
                r.exit_status = status;
                return Ok(r);
            }
            exited.await;
        }
    }
}

#[async_trait]
impl Control for FakeAgent {
    async fn prepare_bundle(
        &self,
        _ctx: &TtrpcContext,
        req: PrepareBundleRequest,
    ) -> ttrpc::Result<PrepareBundleResponse> {
        let mut r = PrepareBundleResponse::new();
        r.bundle = format!("/agent/bundles/{}", req.container_id);
        self.seen.lock().unwrap().prepares.push(req);
        Ok(r)
    }

    async fn remove_bundle(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveBundleRequest,
    ) -> ttrpc::Result<Empty> {
        self.seen.lock().unwrap().removes.push(req.container_id);
        Ok(Empty::new())
    }

    async fn wait_event(
        &self,
        _ctx: &TtrpcContext,
        _req: WaitEventRequest,
    ) -> ttrpc::Result<Event> {
        loop {
            let ready = self.event_ready.notified();
            if let Some(e) = self.events.lock().unwrap().pop() {
                return Ok(e);
            }
            ready.await;
        }
    }
}

/// Serves `agent` on `sock`.
pub async fn serve_agent(agent: Arc<FakeAgent>, sock: &Path) -> Server {
    serve_agent_with(agent, HashMap::new(), sock).await
}

/// Serves `agent` on `sock`, and `more` services beside it.
pub async fn serve_agent_with(
    agent: Arc<FakeAgent>,
    more: HashMap<String, ttrpc::asynchronous::Service>,
    sock: &Path,
) -> Server {
    let mut services = create_task(agent.clone());
    services.extend(create_control(agent));
    services.extend(more);
    let mut server = Server::new()
        .bind(&format!("unix://{}", sock.display()))
        .unwrap()
        .register_service(services);
    server.start().await.unwrap();
    server
}

/// containerd's events service: records what is forwarded.
#[derive(Debug, Default)]
pub struct FakeContainerd {
    pub forwarded: Mutex<Vec<(String, String, String)>>,
    pub got: Notify,
}

#[async_trait]
impl Events for FakeContainerd {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        let env = req.envelope.unwrap_or_default();
        let oom = TaskOOM::parse_from_bytes(&env.event.value).unwrap_or_default();
        assert_eq!(env.event.type_url, "containerd.events.TaskOOM");
        self.forwarded
            .lock()
            .unwrap()
            .push((env.namespace, env.topic, oom.container_id));
        self.got.notify_one();
        Ok(Empty::new())
    }
}

/// Serves `c` on `<address>.ttrpc`.
pub async fn serve_containerd(c: Arc<FakeContainerd>, address: &Path) -> Server {
    let mut server = Server::new()
        .bind(&format!("unix://{}.ttrpc", address.display()))
        .unwrap()
        .register_service(create_events(c));
    server.start().await.unwrap();
    server
}

/// Slots that only record what was attached.
pub struct FakeSlots {
    pub client: ttrpc::asynchronous::Client,
    pub next: AtomicU32,
    pub slots: Mutex<BTreeMap<u32, (PathBuf, bool)>>,
}

impl std::fmt::Debug for FakeSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeSlots")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TaskTarget for FakeSlots {
    fn agent(&self) -> Result<ttrpc::asynchronous::Client, BackendError> {
        Ok(self.client.clone())
    }

    async fn attach_disk(
        &self,
        path: &Path,
        read_only: bool,
    ) -> Result<AttachedDisk, BackendError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed);
        self.slots
            .lock()
            .unwrap()
            .insert(slot, (path.to_owned(), read_only));
        Ok(AttachedDisk {
            slot,
            source: format!("blk:sbx-slot-{slot}"),
        })
    }

    async fn detach_disk(&self, slot: u32) -> Result<(), BackendError> {
        self.slots
            .lock()
            .unwrap()
            .remove(&slot)
            .map(drop)
            .ok_or(BackendError::Unsupported("unknown slot"))
    }
}
