// SPDX-License-Identifier: Apache-2.0
//! What the operator's tools ask of the service (`sandboxer ps`, `inspect`, `console`, over
//! the `sandboxer.admin.v1.Admin` API): a summary of every sandbox, one sandbox's whole
//! record with what only the running daemon knows, and where its guest console log is.

use std::path::PathBuf;

use devices::sync::Recover;
use tokio::sync::watch;

use super::SandboxService;
use crate::backend::VmBackend;
use crate::error::SandboxError;
use crate::sandbox::ExitInfo;
pub use crate::sandbox::{SandboxSummary, from_template};

impl<B: VmBackend> crate::metrics::Source for SandboxService<B> {
    fn sandboxes(&self) -> Vec<SandboxSummary> {
        self.list()
    }

    fn templates(&self) -> Option<crate::backend::template::TemplateStats> {
        self.backend().template_stats()
    }
}

/// A sandbox's guest console log, and the watch that says when its VM has ended.
#[derive(Debug)]
pub struct ConsoleLog {
    /// The file the VMM appends the guest's serial output to.
    pub path: PathBuf,
    /// Holds the sandbox's exit once it has ended.
    pub ended: watch::Receiver<Option<ExitInfo>>,
}

impl<B: VmBackend> SandboxService<B> {
    /// Every sandbox, sorted by id.
    pub fn list(&self) -> Vec<SandboxSummary> {
        let entries: Vec<_> = {
            let map = self.sandboxes.lock().recover();
            map.values().cloned().collect()
        };
        let mut list: Vec<SandboxSummary> = entries
            .iter()
            .map(|e| {
                let (record, vm) = e.snapshot();
                SandboxSummary {
                    thread_ids: vm.map(|vm| vm.thread_ids()).unwrap_or_default(),
                    id: record.id,
                    state: record.state,
                    created_at: record.created_at,
                    vcpus: record.vm.vcpus,
                    mem_mib: record.vm.mem_mib,
                    start_us: record.start_us,
                }
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// The sandbox's record as persisted, plus `thread_ids` and `console_log`, as one JSON
    /// object.
    pub fn inspect(&self, id: &str) -> Result<serde_json::Value, SandboxError> {
        let (record, vm) = self.get(id)?.snapshot();
        // A record is plain data with string keys: encoding it cannot fail, but say so if it does.
        let mut json = serde_json::to_value(&record)
            .unwrap_or_else(|e| serde_json::json!({ "id": id, "error": e.to_string() }));
        if let Some(obj) = json.as_object_mut() {
            let tids = vm.map(|vm| vm.thread_ids()).unwrap_or_default();
            obj.insert("thread_ids".into(), tids.into());
            let log = self.store.sandbox_dir(id).join(CONSOLE_LOG);
            obj.insert(
                "console_log".into(),
                log.to_string_lossy().into_owned().into(),
            );
        }
        Ok(json)
    }

    /// Where the sandbox's guest console goes.
    pub fn console_log(&self, id: &str) -> Result<ConsoleLog, SandboxError> {
        let entry = self.get(id)?;
        Ok(ConsoleLog {
            path: self.store.sandbox_dir(id).join(CONSOLE_LOG),
            ended: entry.end.subscribe(),
        })
    }
}

/// The console log's name in the sandbox's state directory.
pub const CONSOLE_LOG: &str = "console.log";
