// SPDX-License-Identifier: Apache-2.0
//! `sandboxer.admin.v1.Admin`: the operator's view of the daemon (`sandboxer ps`, `inspect`,
//! `console`), served on the containerd API socket.

use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::admin::v1::admin_server::{Admin, AdminServer};
use proto::admin::v1::{
    ConsoleChunk, ConsoleRequest, InspectRequest, InspectResponse, ListRequest, ListResponse,
    SandboxSummary, UpgradeRequest, UpgradeResponse,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{timestamp, to_hash_map_u64};
use crate::backend::VmBackend;
use crate::service::{SandboxService, validate_id};

/// Largest console chunk sent in one message.
const CHUNK: usize = 64 * 1024;
/// How often a followed console log is checked for more output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The operator API.
#[derive(Debug)]
pub struct AdminApi<B: VmBackend> {
    service: Arc<SandboxService<B>>,
}

impl<B: VmBackend> AdminApi<B> {
    /// An adapter over `service`.
    pub fn new(service: Arc<SandboxService<B>>) -> Self {
        AdminApi { service }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }
}

type ConsoleStream = Pin<Box<dyn Stream<Item = Result<ConsoleChunk, Status>> + Send>>;

#[tonic::async_trait]
impl<B: VmBackend> Admin for AdminApi<B> {
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let sandboxes = self
            .service
            .list()
            .into_iter()
            .map(|s| SandboxSummary {
                from_template: s.from_template(),
                id: s.id,
                state: s.state.name().to_string(),
                created_at: Some(timestamp(s.created_at)),
                vcpus: u32::from(s.vcpus),
                mem_mib: s.mem_mib,
                thread_ids: s.thread_ids,
                start_phases_us: to_hash_map_u64(s.start_us),
            })
            .collect();
        Ok(Response::new(ListResponse { sandboxes }))
    }

    async fn inspect(
        &self,
        req: Request<InspectRequest>,
    ) -> Result<Response<InspectResponse>, Status> {
        let id = req.into_inner().sandbox_id;
        validate_id("sandbox_id", &id)?;
        let json = self.service.inspect(&id)?;
        let json = serde_json::to_string_pretty(&json).unwrap_or_else(|_| json.to_string());
        Ok(Response::new(InspectResponse { json }))
    }

    async fn upgrade(
        &self,
        req: Request<UpgradeRequest>,
    ) -> Result<Response<UpgradeResponse>, Status> {
        let binary = req.into_inner().binary;
        let binary = (!binary.is_empty()).then(|| std::path::PathBuf::from(binary));
        if let Some(b) = &binary
            && !b.is_absolute()
        {
            return Err(Status::invalid_argument(format!(
                "Invalid binary: {} is not an absolute path",
                b.display()
            )));
        }
        let report = self
            .service
            .upgrade(binary)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(UpgradeResponse {
            old_pid: std::process::id(),
            new_pid: report.new_pid,
            sandboxes: u32::try_from(report.sandboxes).unwrap_or(u32::MAX),
            pauses_us: report.pauses_us,
            failed: report
                .failed
                .into_iter()
                .map(|(id, why)| format!("{id}: {why}"))
                .collect(),
            total_us: report.total_us,
            phases: report
                .phases_us
                .into_iter()
                .map(|(name, at_us)| proto::admin::v1::UpgradePhase { name, at_us })
                .collect(),
            freezes_us: report.freezes_us,
            old_window_cpu_us: report.old_window_cpu_us,
            new_window_cpu_us: report.new_window_cpu_us,
        }))
    }

    type ConsoleStream = ConsoleStream;

    async fn console(
        &self,
        req: Request<ConsoleRequest>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let req = req.into_inner();
        validate_id("sandbox_id", &req.sandbox_id)?;
        let log = self.service.console_log(&req.sandbox_id)?;
        let mut file = match tokio::fs::File::open(&log.path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::failed_precondition(format!(
                    "sandbox {} has no console log yet (it has not started)",
                    req.sandbox_id
                )));
            }
            Err(e) => {
                return Err(Status::internal(format!(
                    "cannot open the console log: {e}"
                )));
            }
        };
        let len = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("cannot read the console log: {e}")))?
            .len();
        let mut pos = 0;
        if req.tail_bytes > 0 {
            let from = len.saturating_sub(req.tail_bytes);
            pos = from;
            file.seek(SeekFrom::Start(from))
                .await
                .map_err(|e| Status::internal(format!("cannot read the console log: {e}")))?;
        }
        let (tx, rx) = mpsc::channel(4);
        let mut ended = log.ended;
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            // Set once the VM has ended: read what is left, then stop.
            let mut last_round = false;
            loop {
                let n = match file.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("console log: {e}"))))
                            .await;
                        return;
                    }
                };
                if n > 0 {
                    pos += n as u64;
                    let chunk = ConsoleChunk {
                        data: buf[..n].to_vec(),
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // the client went away
                    }
                    continue;
                }
                // A log that reached its limit starts again (`[vm] console_log_max_kib`): go
                // back to its start, where a line says so.
                let restarted = file.metadata().await.is_ok_and(|m| m.len() < pos);
                if restarted && file.seek(SeekFrom::Start(0)).await.is_ok() {
                    pos = 0;
                    continue;
                }
                // At the end of what is there: done, unless following a VM that still runs.
                if !req.follow || last_round || ended.borrow().is_some() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(FOLLOW_POLL) => {}
                    // Ended, or the sandbox is gone: one more read for its last words.
                    _ = ended.changed() => last_round = true,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
