// SPDX-License-Identifier: Apache-2.0
//! The ttrpc face of the [`TaskService`]: `containerd.task.v3.Task` (and the same service as
//! `containerd.task.v2.Task` for iSulad), each call a thin adapter over the service's own
//! methods, and the Streaming service registered beside them.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest,
    WaitResponse,
};
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim::shim::CheckpointTaskRequest;
use containerd_shim_protos::shim_async::{Task, create_task};
use ttrpc::asynchronous::{Service, TtrpcContext};

use super::{TASK_V2, TASK_V3, TaskError, TaskService, exit_fields};
use crate::streaming;

/// Registers `service` under both Task service names, and the Streaming service whose streams
/// its Create/Exec take.
pub fn services(service: Arc<TaskService>) -> HashMap<String, Service> {
    let mut all = create_task(service.clone());
    let streams = Arc::clone(&service.streams);
    let v2 = create_task(service)
        .remove(TASK_V3)
        .expect("create_task registers the v3 service");
    all.insert(TASK_V2.to_owned(), v2);
    all.extend(streaming::services(streams));
    all
}

type TtrpcResult<T> = ttrpc::Result<T>;

fn log_err<T>(call: &str, r: Result<T, TaskError>) -> TtrpcResult<T> {
    r.map_err(|e| {
        log::debug!("{call}: {e}");
        e.into()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let pid = log_err("Create", self.do_create(&req).await)?;
        let mut r = CreateTaskResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = log_err("Start", self.do_start(&req))?;
        let mut r = StartResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        log_err("State", TaskService::state(self, &req))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        log_err("Kill", self.do_kill(&req)).map(|()| Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let exit = log_err("Wait", self.do_wait(&req).await)?;
        let mut r = WaitResponse::new();
        (r.exit_status, r.exited_at) = exit_fields(Some(exit));
        Ok(r)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        log_err("Delete", self.do_delete(&req).await)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        log_err("Pids", self.do_pids(&req))
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        log_err("Exec", self.do_exec(&req).await).map(|()| Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        log_err("Stats", self.do_stats(&req))
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        // A stdin path is handed to the process and the agent keeps no copy: the writer (the
        // host side) closes its end. A stdin stream is fed by the agent: end it.
        log_err("CloseIO", self.close_stdin(&req.id, &req.exec_id)).map(|()| Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        log_err(
            "ResizePty",
            self.with_process(&req.id, &req.exec_id, |_, p| match &p.console {
                Some(c) => c.resize(req.width, req.height),
                None => Err(TaskError::FailedPrecondition {
                    what: if req.exec_id.is_empty() {
                        format!("container {:?}", req.id)
                    } else {
                        format!("exec process {:?} of {:?}", req.exec_id, req.id)
                    },
                    state: "without a terminal",
                    call: "ResizePty",
                    wanted: "with a terminal",
                }),
            }),
        )
        .map(|()| Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        log_err("Pause", self.set_paused(&req.id, true)).map(|()| Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        log_err("Resume", self.set_paused(&req.id, false)).map(|()| Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(TaskError::Unimplemented("Checkpoint".into()).into())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        log_err("Update", self.do_update(&req)).map(|()| Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = log_err("Connect", self.with_process(&req.id, "", |_, p| Ok(p.pid)))?;
        let mut r = ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = task_pid;
        r.version = "3".to_owned();
        Ok(r)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // The VM's end belongs to the controller (Controller.Stop/Shutdown), never to the
        // Task API: with tasks left this must not end anything, and without tasks there is
        // nothing of ours to stop either.
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::reaper::Reaper;

    #[test]
    fn both_service_names_are_registered() {
        let dir = tempfile::tempdir().unwrap();
        let svc = TaskService::new(Arc::new(Reaper::new()), dir.path(), Arc::default())
            .unwrap()
            .with_pod_cgroup("pod-x");
        assert_eq!(svc.pod_cgroup(), Path::new("/sys/fs/cgroup/pod-x"));
        let services = services(Arc::new(svc));
        assert_eq!(services.len(), 3);
        assert!(services.contains_key(TASK_V3));
        assert!(services.contains_key(TASK_V2));
        assert!(services.contains_key(streaming::STREAMING));
    }
}
