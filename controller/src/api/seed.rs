// SPDX-License-Identifier: Apache-2.0
//! The seed document's ten-RPC sandbox `Controller` (iSulad <= 2.1.5, Kuasar < 1.0) over the
//! sandbox service. It shares the service (and so the sandboxes) with the containerd 2.x API.

use std::sync::Arc;
use std::time::Duration;

use proto::seed::sandbox::controller_server::{Controller, ControllerServer};
use proto::seed::sandbox::{
    ControllerCreateRequest, ControllerCreateResponse, ControllerPlatformRequest,
    ControllerPlatformResponse, ControllerShutdownRequest, ControllerShutdownResponse,
    ControllerStartRequest, ControllerStartResponse, ControllerStatusRequest,
    ControllerStatusResponse, ControllerStopRequest, ControllerStopResponse, ControllerWaitRequest,
    ControllerWaitResponse, PrepareRequest, PrepareResponse, PurgeRequest, PurgeResponse,
    UpdateResourcesRequest, UpdateResourcesResponse,
};
use proto::seed::types::{Mount, Platform};
use tonic::{Request, Response, Status};
use tracing::debug;

use super::{timestamp, to_btree_map, to_hash_map};
use crate::backend::VmBackend;
use crate::sandbox::{MountSpec, StoredAny};
use crate::service::{self, CreateRequest, SandboxService};

/// The seed API.
#[derive(Debug)]
pub struct SeedApi<B: VmBackend> {
    service: Arc<SandboxService<B>>,
}

impl<B: VmBackend> SeedApi<B> {
    /// An adapter over `service`.
    pub fn new(service: Arc<SandboxService<B>>) -> Self {
        SeedApi { service }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> ControllerServer<Self> {
        ControllerServer::new(self)
    }
}

fn mount(m: Mount) -> MountSpec {
    MountSpec {
        kind: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

#[tonic::async_trait]
impl<B: VmBackend> Controller for SeedApi<B> {
    async fn create(
        &self,
        request: Request<ControllerCreateRequest>,
    ) -> Result<Response<ControllerCreateResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, "seed Create");
        let id = r.sandbox_id.clone();
        self.service
            .create(CreateRequest {
                id: r.sandbox_id,
                sandboxer: r.sandboxer,
                rootfs: r.rootfs.into_iter().map(mount).collect(),
                options: r.options.map(StoredAny::from),
                netns_path: r.netns_path,
                annotations: Default::default(),
                sandbox: None,
            })
            .await?;
        Ok(Response::new(ControllerCreateResponse { sandbox_id: id }))
    }

    async fn start(
        &self,
        request: Request<ControllerStartRequest>,
    ) -> Result<Response<ControllerStartResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, "seed Start");
        let s = self.service.start(&r.sandbox_id).await?;
        Ok(Response::new(ControllerStartResponse {
            sandbox_id: s.id,
            pid: s.pid,
            created_at: Some(timestamp(s.created_at)),
            labels: to_hash_map(s.labels),
            task_address: s.address,
        }))
    }

    async fn platform(
        &self,
        request: Request<ControllerPlatformRequest>,
    ) -> Result<Response<ControllerPlatformResponse>, Status> {
        let r = request.into_inner();
        let (os, architecture) = self.service.platform(&r.sandbox_id)?;
        Ok(Response::new(ControllerPlatformResponse {
            platform: Some(Platform {
                os: os.to_string(),
                architecture: architecture.to_string(),
                variant: String::new(),
                os_version: String::new(),
            }),
        }))
    }

    async fn prepare(
        &self,
        request: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, container_id = %r.container_id, exec_id = %r.exec_id, "seed Prepare");
        let bundle = self
            .service
            .prepare(
                &r.sandbox_id,
                service::PrepareRequest {
                    container_id: r.container_id,
                    exec_id: r.exec_id,
                    spec: r.spec.map(StoredAny::from),
                    rootfs: r.rootfs.into_iter().map(mount).collect(),
                    stdin: r.stdin,
                    stdout: r.stdout,
                    stderr: r.stderr,
                    terminal: r.terminal,
                },
            )
            .await?;
        Ok(Response::new(PrepareResponse { bundle }))
    }

    async fn purge(
        &self,
        request: Request<PurgeRequest>,
    ) -> Result<Response<PurgeResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, container_id = %r.container_id, exec_id = %r.exec_id, "seed Purge");
        self.service
            .purge(&r.sandbox_id, &r.container_id, &r.exec_id)
            .await?;
        Ok(Response::new(PurgeResponse {}))
    }

    async fn update_resources(
        &self,
        request: Request<UpdateResourcesRequest>,
    ) -> Result<Response<UpdateResourcesResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, container_id = %r.container_id, "seed UpdateResources");
        self.service
            .update_resources(
                &r.sandbox_id,
                &r.container_id,
                r.resources.map(StoredAny::from),
                to_btree_map(r.annotations),
            )
            .await?;
        Ok(Response::new(UpdateResourcesResponse {}))
    }

    async fn stop(
        &self,
        request: Request<ControllerStopRequest>,
    ) -> Result<Response<ControllerStopResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, timeout_secs = r.timeout_secs, "seed Stop");
        self.service
            .stop(
                &r.sandbox_id,
                Duration::from_secs(u64::from(r.timeout_secs)),
            )
            .await?;
        Ok(Response::new(ControllerStopResponse {}))
    }

    async fn wait(
        &self,
        request: Request<ControllerWaitRequest>,
    ) -> Result<Response<ControllerWaitResponse>, Status> {
        let r = request.into_inner();
        let exit = self.service.wait(&r.sandbox_id).await?;
        Ok(Response::new(ControllerWaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)),
        }))
    }

    async fn status(
        &self,
        request: Request<ControllerStatusRequest>,
    ) -> Result<Response<ControllerStatusResponse>, Status> {
        let r = request.into_inner();
        let s = self.service.status(&r.sandbox_id, r.verbose)?;
        Ok(Response::new(ControllerStatusResponse {
            sandbox_id: s.id,
            pid: s.pid,
            state: s.state.api_state().to_string(),
            task_address: s.address,
            info: to_hash_map(s.info),
            created_at: Some(timestamp(s.created_at)),
            exited_at: s.exited_at.map(timestamp),
            extra: s.extra.map(Into::into),
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ControllerShutdownRequest>,
    ) -> Result<Response<ControllerShutdownResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, "seed Shutdown");
        self.service.shutdown(&r.sandbox_id).await?;
        Ok(Response::new(ControllerShutdownResponse {}))
    }
}
