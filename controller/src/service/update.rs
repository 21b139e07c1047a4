// SPDX-License-Identifier: Apache-2.0
//! Update: the engine's own record of the sandbox (containerd 2.x and iSulad `Update`), field by
//! field, and the extensions the sandboxer reads (iSulad's `tasks`, containerd's
//! `updated-resources`).

use std::sync::Arc;
use std::time::SystemTime;

use tracing::info;

use super::{SandboxInfo, SandboxService};
use crate::backend::VmBackend;
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
        for field in &fields {
            apply_update_field(&mut record, &sandbox, field)?;
        }
        record.updated_at = SystemTime::now();
        self.commit(&op, record).await?;
        info!(sandbox_id = %id, ?fields, "sandbox updated");
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
