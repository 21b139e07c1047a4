// SPDX-License-Identifier: Apache-2.0
//! The seed API's container operations: Prepare (a container's rootfs attached and its guest
//! bundle written through the Task endpoint, or an exec process recorded), Purge and
//! UpdateResources.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use super::{PrepareRequest, SandboxService, validate_id};
use crate::backend::VmBackend;
use crate::error::SandboxError;
use crate::sandbox::{ContainerRecord, MountSpec, ProcessRecord, SandboxState, StoredAny};
use crate::store::StoreError;
use crate::task::TaskServer;

/// The containerd form of a mount the seed API gave.
fn shim_mount(m: &MountSpec) -> containerd_shim_protos::api::Mount {
    containerd_shim_protos::api::Mount {
        type_: m.kind.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        options: m.options.clone(),
        ..Default::default()
    }
}

impl<B: VmBackend> SandboxService<B> {
    /// Seed API: adds a container (empty `exec_id`) or a process to a ready sandbox and returns
    /// the bundle directory.
    pub async fn prepare(
        self: &Arc<Self>,
        id: &str,
        req: PrepareRequest,
    ) -> Result<String, SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(id, async move { this.do_prepare(owned, req).await })
            .await
    }

    async fn do_prepare(
        self: Arc<Self>,
        id: String,
        req: PrepareRequest,
    ) -> Result<String, SandboxError> {
        validate_id("container_id", &req.container_id)?;
        if !req.exec_id.is_empty() {
            validate_id("exec_id", &req.exec_id)?;
        }
        let op = self.lock(&id).await?;
        let (mut record, vm) = op.snapshot();
        let task = op.entry().with(|d| d.task.as_ref().map(TaskServer::handle));
        let task = match (record.state, vm, task) {
            (SandboxState::Ready, Some(_), Some(task)) => task,
            (state, _, _) => {
                return Err(SandboxError::FailedPrecondition {
                    id,
                    state,
                    op: "prepare a container in",
                });
            }
        };
        let process = ProcessRecord {
            spec: req.spec.clone(),
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };

        if !req.exec_id.is_empty() {
            let container = record
                .containers
                .get_mut(&req.container_id)
                .ok_or_else(|| SandboxError::ChildNotFound {
                    sandbox: id.clone(),
                    what: "container",
                    id: req.container_id.clone(),
                })?;
            if container.execs.contains_key(&req.exec_id) {
                return Err(SandboxError::AlreadyExists {
                    what: "Exec process",
                    id: req.exec_id,
                });
            }
            container.execs.insert(req.exec_id, process);
            let bundle = container.bundle.clone();
            self.commit(&op, record).await?;
            return Ok(bundle);
        }

        if record.containers.contains_key(&req.container_id) {
            return Err(SandboxError::AlreadyExists {
                what: "Container",
                id: req.container_id,
            });
        }
        let config_json = match &req.spec {
            Some(spec) if !spec.value.is_empty() => {
                serde_json::from_slice::<serde_json::Value>(&spec.value).map_err(|e| {
                    SandboxError::InvalidArgument {
                        field: "spec",
                        reason: format!("not an OCI spec in JSON: {e}"),
                    }
                })?;
                Some(spec.value.clone())
            }
            _ => None,
        };
        if config_json.is_none() && !req.rootfs.is_empty() {
            return Err(SandboxError::InvalidArgument {
                field: "spec",
                reason: "a container with a rootfs needs its OCI spec".into(),
            });
        }
        let bundle = self
            .store
            .sandbox_dir(&id)
            .join("containers")
            .join(&req.container_id);
        write_bundle(&bundle, config_json.as_deref())
            .map_err(|e| SandboxError::Store(id.clone(), e))?;
        if config_json.is_some() {
            // The rootfs attached and the guest bundle written, as the Task endpoint's Create
            // does; the engine's Task.Create of this container then only forwards.
            let mounts: Vec<_> = req.rootfs.iter().map(shim_mount).collect();
            if let Err(e) = task.prepare(&req.container_id, &bundle, &mounts).await {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(SandboxError::Endpoint(id, Box::new(e)));
            }
        }
        let bundle_str = bundle.display().to_string();
        record.containers.insert(
            req.container_id.clone(),
            ContainerRecord {
                bundle: bundle_str.clone(),
                rootfs: req.rootfs,
                process,
                ..ContainerRecord::default()
            },
        );
        if let Err(e) = self.commit(&op, record).await {
            // Unrecorded, the engine could never Purge it: free it now.
            task.purge(&req.container_id).await;
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(e);
        }
        info!(sandbox_id = %id, container_id = %req.container_id, "container prepared");
        Ok(bundle_str)
    }

    /// Seed API: removes a container (empty `exec_id`) or a process added by Prepare.
    pub async fn purge(
        self: &Arc<Self>,
        id: &str,
        container_id: &str,
        exec_id: &str,
    ) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let (owned, cid, eid) = (
            id.to_string(),
            container_id.to_string(),
            exec_id.to_string(),
        );
        self.detached(id, async move { this.do_purge(owned, cid, eid).await })
            .await
    }

    async fn do_purge(
        self: Arc<Self>,
        id: String,
        container_id: String,
        exec_id: String,
    ) -> Result<(), SandboxError> {
        validate_id("container_id", &container_id)?;
        if !exec_id.is_empty() {
            validate_id("exec_id", &exec_id)?;
        }
        let op = self.lock(&id).await?;
        let (mut record, _) = op.snapshot();
        let task = op.entry().with(|d| d.task.as_ref().map(TaskServer::handle));
        let missing = |what, child: &str| SandboxError::ChildNotFound {
            sandbox: id.clone(),
            what,
            id: child.to_string(),
        };
        let container = record
            .containers
            .get_mut(&container_id)
            .ok_or_else(|| missing("container", &container_id))?;
        if !exec_id.is_empty() {
            container
                .execs
                .remove(&exec_id)
                .ok_or_else(|| missing("exec process", &exec_id))?;
        } else {
            // Its slots, images and guest bundle (nothing, if Prepare had no spec).
            if let Some(task) = task {
                task.purge(&container_id).await;
            }
            let bundle = PathBuf::from(&container.bundle);
            record.containers.remove(&container_id);
            match std::fs::remove_dir_all(&bundle) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SandboxError::Store(id, StoreError::Remove(bundle, e))),
            }
        }
        self.commit(&op, record).await
    }

    /// Seed API: applies new resources to a container and records them.
    pub async fn update_resources(
        self: &Arc<Self>,
        id: &str,
        container_id: &str,
        resources: Option<StoredAny>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let (owned, cid) = (id.to_string(), container_id.to_string());
        self.detached(id, async move {
            this.do_update_resources(owned, cid, resources, annotations)
                .await
        })
        .await
    }

    async fn do_update_resources(
        self: Arc<Self>,
        id: String,
        container_id: String,
        resources: Option<StoredAny>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), SandboxError> {
        validate_id("container_id", &container_id)?;
        let op = self.lock(&id).await?;
        let (mut record, vm) = op.snapshot();
        let state = record.state;
        let container = record.containers.get_mut(&container_id).ok_or_else(|| {
            SandboxError::ChildNotFound {
                sandbox: id.clone(),
                what: "container",
                id: container_id.clone(),
            }
        })?;
        if let Some(res) = &resources {
            let vm = vm.ok_or_else(|| SandboxError::FailedPrecondition {
                id: id.clone(),
                state,
                op: "update container resources in",
            })?;
            vm.update_resources(&container_id, res)
                .await
                .map_err(|e| SandboxError::Backend(id.clone(), e))?;
        }
        container.resources = resources;
        container.annotations = annotations;
        self.commit(&op, record).await
    }
}

fn write_bundle(bundle: &Path, config_json: Option<&[u8]>) -> Result<(), StoreError> {
    std::fs::create_dir_all(bundle).map_err(|e| StoreError::CreateDir(bundle.to_path_buf(), e))?;
    if let Some(json) = config_json {
        let path = bundle.join("config.json");
        std::fs::write(&path, json).map_err(|e| StoreError::Write(path, e))?;
    }
    Ok(())
}
