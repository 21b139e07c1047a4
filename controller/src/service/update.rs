// SPDX-License-Identifier: Apache-2.0
//! Update: the engine's own record of the sandbox (containerd 2.x and iSulad `Update`), field by
//! field, and the extensions the sandboxer reads (iSulad's `tasks`, containerd's
//! `updated-resources`).

use std::sync::Arc;
use std::time::SystemTime;

use tracing::info;

use super::{SandboxInfo, SandboxService};
use crate::backend::VmBackend;
use crate::cgroup::CpuLimit;
use crate::error::SandboxError;
use crate::sandbox::{SandboxRecord, SandboxState, StoredAny};

impl<B: VmBackend> SandboxService<B> {
    /// Updates the sandbox's record from the engine's (containerd 2.x / iSulad `Update`).
    ///
    /// `fields` names what changed: `labels`, `labels.<key>`, `extensions`, `extensions.<key>`
    /// (e.g. iSulad's `extensions.tasks`, containerd's `extensions.updated-resources`), `spec`,
    /// `runtime`. No fields means all of them.
    pub async fn update(
        self: &Arc<Self>,
        id: &str,
        sandbox: SandboxInfo,
        fields: Vec<String>,
    ) -> Result<(), SandboxError> {
        let this = Arc::clone(self);
        let owned = id.to_string();
        self.detached(
            id,
            async move { this.do_update(owned, sandbox, fields).await },
        )
        .await
    }

    async fn do_update(
        self: Arc<Self>,
        id: String,
        sandbox: SandboxInfo,
        fields: Vec<String>,
    ) -> Result<(), SandboxError> {
        let op = self.lock(&id).await?;
        let mut record = op.snapshot().0;
        if record.state == SandboxState::Deleted {
            return Err(SandboxError::NotFound(id));
        }
        let all = [
            "labels".to_string(),
            "extensions".to_string(),
            "spec".to_string(),
            "runtime".to_string(),
        ];
        let fields = if fields.is_empty() {
            all.to_vec()
        } else {
            fields
        };
        let before = record.updated_resources.clone();
        for field in &fields {
            apply_update_field(&mut record, &sandbox, field)?;
        }
        if record.updated_resources != before {
            self.update_cpu(&mut record).await?;
        }
        record.updated_at = SystemTime::now();
        self.commit(&op, record).await?;
        info!(sandbox_id = %id, ?fields, "sandbox updated");
        Ok(())
    }
}

impl<B: VmBackend> SandboxService<B> {
    /// Takes the CPU limit of containerd's `updated-resources` (`Resources.cpu_quota`,
    /// `cpu_period`, `cpu_shares`) into the record's pod config and applies it to the running
    /// sandbox's CPU cgroup. Refuses a limit beyond `[limits] max_sandbox_vcpus`.
    async fn update_cpu(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        const FIELD: &str = "sandbox.extensions[updated-resources]";
        let Some(res) = record
            .updated_resources
            .as_ref()
            .and_then(|v| v.get("Resources"))
            .filter(|r| r.is_object())
        else {
            return Ok(());
        };
        let get = |key: &str| {
            res.get(key)
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0)
        };
        let (quota, period, shares) = (get("cpu_quota"), get("cpu_period"), get("cpu_shares"));
        let limit = CpuLimit::from_cri(quota, period, shares).map_err(|reason| {
            SandboxError::InvalidArgument {
                field: FIELD,
                reason,
            }
        })?;
        self.admit_cpus(record.vm.vcpus, &limit)
            .map_err(|e| match e {
                SandboxError::InvalidArgument { reason, .. } => SandboxError::InvalidArgument {
                    field: FIELD,
                    reason,
                },
                other => other,
            })?;
        let pod = record.pod.get_or_insert_with(Default::default);
        pod.cpu_quota = quota;
        pod.cpu_period = period;
        pod.cpu_shares = shares;
        if let (SandboxState::Ready, Some(cgroups), Some(group)) =
            (record.state, &self.config.cgroups, &record.cgroup)
        {
            let (cgroups, group) = (cgroups.clone(), group.clone());
            tokio::task::spawn_blocking(move || cgroups.set_limit(&group, &limit))
                .await
                .map_err(|e| SandboxError::Task(record.id.clone(), e))?
                .map_err(|e| SandboxError::Cgroup(record.id.clone(), e))?;
            info!(sandbox_id = %record.id, cpu_max = %limit.cpu_max(), "CPU limit updated");
        }
        Ok(())
    }
}

/// Sets (or with `None` removes) one extension, parsing the ones the sandboxer understands.
pub(super) fn set_extension(
    record: &mut SandboxRecord,
    key: &str,
    value: Option<StoredAny>,
) -> Result<(), SandboxError> {
    let parse = |v: &StoredAny, field: &'static str| {
        serde_json::from_slice::<serde_json::Value>(&v.value).map_err(|e| {
            SandboxError::InvalidArgument {
                field,
                reason: format!("not JSON: {e}"),
            }
        })
    };
    match key {
        "tasks" => {
            record.tasks = value
                .as_ref()
                .map(|v| parse(v, "sandbox.extensions[tasks]"))
                .transpose()?;
        }
        "updated-resources" => {
            record.updated_resources = value
                .as_ref()
                .map(|v| parse(v, "sandbox.extensions[updated-resources]"))
                .transpose()?;
        }
        _ => {}
    }
    match value {
        Some(v) => record.extensions.insert(key.to_string(), v),
        None => record.extensions.remove(key),
    };
    Ok(())
}

fn apply_update_field(
    record: &mut SandboxRecord,
    sandbox: &SandboxInfo,
    field: &str,
) -> Result<(), SandboxError> {
    match field {
        "labels" => record.labels.clone_from(&sandbox.labels),
        "spec" => record.spec.clone_from(&sandbox.spec),
        "runtime" => record.runtime.clone_from(&sandbox.runtime),
        "extensions" => {
            let old: Vec<String> = record.extensions.keys().cloned().collect();
            for key in old {
                set_extension(record, &key, None)?;
            }
            for (key, value) in &sandbox.extensions {
                set_extension(record, key, Some(value.clone()))?;
            }
        }
        f => {
            if let Some(key) = f.strip_prefix("labels.") {
                match sandbox.labels.get(key) {
                    Some(v) => record.labels.insert(key.to_string(), v.clone()),
                    None => record.labels.remove(key),
                };
            } else if let Some(key) = f.strip_prefix("extensions.") {
                set_extension(record, key, sandbox.extensions.get(key).cloned())?;
            } else {
                return Err(SandboxError::InvalidArgument {
                    field: "fields",
                    reason: format!("cannot update {f:?}"),
                });
            }
        }
    }
    Ok(())
}
