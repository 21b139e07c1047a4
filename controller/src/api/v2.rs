// SPDX-License-Identifier: Apache-2.0
//! The containerd 2.x sandbox `Controller` (nine RPCs) over the sandbox service.

use std::sync::Arc;
use std::time::Duration;

use proto::v2::sandbox::controller_server::{Controller, ControllerServer};
use proto::v2::sandbox::{
    ControllerCreateRequest, ControllerCreateResponse, ControllerMetricsRequest,
    ControllerMetricsResponse, ControllerPlatformRequest, ControllerPlatformResponse,
    ControllerShutdownRequest, ControllerShutdownResponse, ControllerStartRequest,
    ControllerStartResponse, ControllerStatusRequest, ControllerStatusResponse,
    ControllerStopRequest, ControllerStopResponse, ControllerUpdateRequest,
    ControllerUpdateResponse, ControllerWaitRequest, ControllerWaitResponse,
};
use proto::v2::types::{Metric, Mount, Platform, Sandbox};
use tonic::{Request, Response, Status};
use tracing::debug;

use super::{timestamp, to_btree_map, to_hash_map};
use crate::backend::VmBackend;
use crate::sandbox::{MountSpec, StoredAny};
use crate::service::{CreateRequest, SandboxInfo, SandboxService};

/// The containerd 2.x API.
#[derive(Debug)]
pub struct V2Api<B: VmBackend> {
    service: Arc<SandboxService<B>>,
}

impl<B: VmBackend> V2Api<B> {
    /// An adapter over `service`.
    pub fn new(service: Arc<SandboxService<B>>) -> Self {
        V2Api { service }
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

fn sandbox_info(s: Sandbox) -> SandboxInfo {
    SandboxInfo {
        labels: to_btree_map(s.labels),
        spec: s.spec.map(StoredAny::from),
        runtime: s.runtime.map(|r| (r.name, r.options.map(StoredAny::from))),
        extensions: s
            .extensions
            .into_iter()
            .map(|(k, v)| (k, StoredAny::from(v)))
            .collect(),
    }
}

#[tonic::async_trait]
impl<B: VmBackend> Controller for V2Api<B> {
    async fn create(
        &self,
        request: Request<ControllerCreateRequest>,
    ) -> Result<Response<ControllerCreateResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, "Create");
        let id = r.sandbox_id.clone();
        self.service
            .create(CreateRequest {
                id: r.sandbox_id,
                sandboxer: r.sandboxer,
                rootfs: r.rootfs.into_iter().map(mount).collect(),
                options: r.options.map(StoredAny::from),
                netns_path: r.netns_path,
                annotations: to_btree_map(r.annotations),
                sandbox: r.sandbox.map(sandbox_info),
            })
            .await?;
        Ok(Response::new(ControllerCreateResponse { sandbox_id: id }))
    }

    async fn start(
        &self,
        request: Request<ControllerStartRequest>,
    ) -> Result<Response<ControllerStartResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, "Start");
        let s = self.service.start(&r.sandbox_id).await?;
        Ok(Response::new(ControllerStartResponse {
            sandbox_id: s.id,
            pid: s.pid,
            created_at: Some(timestamp(s.created_at)),
            labels: to_hash_map(s.labels),
            address: s.address,
            version: s.version,
            spec: None,
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

    async fn stop(
        &self,
        request: Request<ControllerStopRequest>,
    ) -> Result<Response<ControllerStopResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, timeout_secs = r.timeout_secs, "Stop");
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
        debug!(sandbox_id = %r.sandbox_id, "Wait");
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
            info: to_hash_map(s.info),
            created_at: Some(timestamp(s.created_at)),
            exited_at: s.exited_at.map(timestamp),
            extra: s.extra.map(Into::into),
            address: s.address,
            version: s.version,
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ControllerShutdownRequest>,
    ) -> Result<Response<ControllerShutdownResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, "Shutdown");
        self.service.shutdown(&r.sandbox_id).await?;
        Ok(Response::new(ControllerShutdownResponse {}))
    }

    async fn metrics(
        &self,
        request: Request<ControllerMetricsRequest>,
    ) -> Result<Response<ControllerMetricsResponse>, Status> {
        let r = request.into_inner();
        let m = self.service.metrics(&r.sandbox_id).await?;
        Ok(Response::new(ControllerMetricsResponse {
            metrics: Some(Metric {
                timestamp: Some(timestamp(m.at)),
                id: m.id,
                data: Some(m.data.into()),
            }),
        }))
    }

    async fn update(
        &self,
        request: Request<ControllerUpdateRequest>,
    ) -> Result<Response<ControllerUpdateResponse>, Status> {
        let r = request.into_inner();
        debug!(sandbox_id = %r.sandbox_id, fields = ?r.fields, "Update");
        let info = r.sandbox.map(sandbox_info).unwrap_or_default();
        self.service.update(&r.sandbox_id, info, r.fields).await?;
        Ok(Response::new(ControllerUpdateResponse {}))
    }
}
