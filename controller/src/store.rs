// SPDX-License-Identifier: Apache-2.0
//! Persistence of sandbox records: `<state_dir>/<id>/sandbox.json`.
//!
//! # Restart contract
//!
//! The VMs run inside the sandboxer process, so they end when it ends. Records survive it.
//! When a sandboxer starts it reloads every `<state_dir>/*/sandbox.json` (see
//! [`crate::service::SandboxService::recover`]):
//!
//! - a sandbox that was `Starting`, `Ready` or `Stopping` lost its VM with the old process: it
//!   becomes `Failed` with exit status 255, `exited_at` = the time of the reload, and the reason
//!   "the VM ended with the previous sandboxer process". Status reports `SANDBOX_NOTREADY` with
//!   that exit; Wait returns it at once; Shutdown frees the sandbox (its directory, sockets and
//!   files) and forgets it.
//! - a `Created` sandbox had no VM yet and stays `Created`: it can still be started.
//! - a `Stopped` or `Failed` sandbox keeps its recorded exit.
//! - a `Deleted` sandbox was being shut down when the old process ended: its cleanup is
//!   finished and it is forgotten.
//!
//! Records are written atomically (a temporary file in the same directory, then rename), so a
//! sandboxer crash leaves either the old or the new record, never a torn one. They are not
//! fsynced: they exist to outlive the sandboxer process, and the page cache does that; a host
//! crash or power loss ends every VM anyway (and clears the default `/run`), after which each
//! record can only say "VM lost". fsync cost ~0.75 ms each on a disk-backed state dir, twice
//! per save and three saves per Create+Start. A record that cannot be read (e.g. torn by a
//! power loss on a disk-backed state dir) is reported and left on disk for a person to look at.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sandbox::SandboxRecord;

/// File name of a record inside its sandbox directory.
pub const RECORD_FILE: &str = "sandbox.json";
const RECORD_TMP: &str = "sandbox.json.tmp";

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating the sandbox directory failed.
    #[error("Failed to create {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    /// Writing a record failed.
    #[error("Failed to write {0}")]
    Write(PathBuf, #[source] io::Error),
    /// Reading a record or the state dir failed.
    #[error("Failed to read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// A record is not valid JSON for [`SandboxRecord`].
    #[error("Failed to parse {0}")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// A record's id does not match its directory.
    #[error("Record {0} belongs to sandbox {1}")]
    IdMismatch(PathBuf, String),
    /// Removing a sandbox directory failed.
    #[error("Failed to remove {0}")]
    Remove(PathBuf, #[source] io::Error),
}

/// The records under one state directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// What [`Store::load_all`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Readable records.
    pub records: Vec<SandboxRecord>,
    /// Records that could not be read (left on disk).
    pub errors: Vec<StoreError>,
}

impl Store {
    /// A store rooted at `root` (the state dir). Nothing is touched yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    /// The state dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<id>`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates `<root>/<id>` (mode 0700; the state dir itself is created if missing).
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        let dir = self.sandbox_dir(id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(|e| StoreError::CreateDir(self.root.clone(), e))?;
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            // A directory without a record is what an interrupted Create leaves: reuse it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {
                if dir.join(RECORD_FILE).exists() {
                    Err(StoreError::CreateDir(dir, e))
                } else {
                    Ok(dir)
                }
            }
            Err(e) => Err(StoreError::CreateDir(dir, e)),
        }
    }

    /// Writes `record` atomically to `<root>/<id>/sandbox.json`.
    pub fn save(&self, record: &SandboxRecord) -> Result<(), StoreError> {
        let dir = self.sandbox_dir(&record.id);
        let tmp = dir.join(RECORD_TMP);
        let path = dir.join(RECORD_FILE);
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| StoreError::Write(path.clone(), io::Error::other(e)))?;
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| StoreError::Write(path, e))
    }

    /// Reads `<root>/<id>/sandbox.json`.
    pub fn load(&self, id: &str) -> Result<SandboxRecord, StoreError> {
        let path = self.sandbox_dir(id).join(RECORD_FILE);
        let bytes = fs::read(&path).map_err(|e| StoreError::Read(path.clone(), e))?;
        let record: SandboxRecord =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Parse(path.clone(), e))?;
        if record.id != id {
            return Err(StoreError::IdMismatch(path, record.id));
        }
        Ok(record)
    }

    /// Reads every record under the state dir. A missing state dir holds no records.
    pub fn load_all(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(loaded),
            Err(e) => return Err(StoreError::Read(self.root.clone(), e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::Read(self.root.clone(), e))?;
            let path = entry.path();
            if !path.is_dir() || !path.join(RECORD_FILE).exists() {
                continue;
            }
            if let Some(id) = entry.file_name().to_str() {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        for id in ids {
            match self.load(&id) {
                Ok(r) => loaded.records.push(r),
                Err(e) => loaded.errors.push(e),
            }
        }
        Ok(loaded)
    }

    /// Removes `<root>/<id>` and everything in it. Removing a missing directory succeeds.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.sandbox_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Remove(dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::sandbox::{
        ContainerRecord, ExitInfo, MountSpec, PodConfig, SandboxState, StoredAny, VmSize,
    };

    fn sample(id: &str) -> SandboxRecord {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let mut r = SandboxRecord::new(id.to_string(), t);
        r.state = SandboxState::Stopped;
        r.sandboxer = "sandboxer".into();
        r.netns_path = "/var/run/netns/x".into();
        r.rootfs = vec![MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["lowerdir=/a".into()],
        }];
        r.labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        r.pod = Some(PodConfig {
            hostname: "web-0".into(),
            memory_limit_bytes: 1 << 30,
            ..PodConfig::default()
        });
        r.vm = VmSize {
            vcpus: 2,
            mem_mib: 1280,
        };
        r.extensions.insert(
            "tasks".into(),
            StoredAny {
                type_url: "x".into(),
                value: b"{}".to_vec(),
            },
        );
        r.tasks = Some(serde_json::json!({"containers": []}));
        r.containers.insert("c1".into(), ContainerRecord::default());
        r.exit = Some(ExitInfo {
            status: 0,
            at: t + Duration::from_secs(5),
            reason: "stopped".into(),
        });
        r
    }

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("state"));
        let r = sample("pod-1");
        store.create_dir("pod-1").unwrap();
        store.save(&r).unwrap();
        assert_eq!(store.load("pod-1").unwrap(), r);
        // Overwrite: the new record replaces the old one and no temp file stays.
        let mut r2 = r.clone();
        r2.state = SandboxState::Deleted;
        store.save(&r2).unwrap();
        assert_eq!(store.load("pod-1").unwrap(), r2);
        assert!(!store.sandbox_dir("pod-1").join(RECORD_TMP).exists());
    }

    #[test]
    fn load_all_skips_foreign_entries_and_reports_bad_records() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        for id in ["b", "a"] {
            store.create_dir(id).unwrap();
            store.save(&sample(id)).unwrap();
        }
        // A socket-like file, a directory without a record, a corrupt and a misplaced record.
        fs::write(tmp.path().join("sandboxer.sock"), b"").unwrap();
        fs::create_dir(tmp.path().join("empty")).unwrap();
        fs::create_dir(tmp.path().join("bad")).unwrap();
        fs::write(tmp.path().join("bad").join(RECORD_FILE), b"{not json").unwrap();
        fs::create_dir(tmp.path().join("moved")).unwrap();
        fs::write(
            tmp.path().join("moved").join(RECORD_FILE),
            serde_json::to_vec(&sample("other")).unwrap(),
        )
        .unwrap();

        let loaded = store.load_all().unwrap();
        let ids: Vec<_> = loaded.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(loaded.errors.len(), 2, "{:?}", loaded.errors);
        assert!(
            loaded
                .errors
                .iter()
                .any(|e| matches!(e, StoreError::Parse(..)))
        );
        assert!(
            loaded
                .errors
                .iter()
                .any(|e| matches!(e, StoreError::IdMismatch(_, id) if id == "other"))
        );
        // The unreadable record is left for a person.
        assert!(tmp.path().join("bad").join(RECORD_FILE).exists());
    }

    #[test]
    fn missing_state_dir_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let loaded = Store::new(tmp.path().join("nope")).load_all().unwrap();
        assert!(loaded.records.is_empty() && loaded.errors.is_empty());
    }

    #[test]
    fn create_dir_refuses_an_existing_record_and_remove_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        store.create_dir("x").unwrap();
        // No record yet: an interrupted Create's directory is reused.
        store.create_dir("x").unwrap();
        store.save(&sample("x")).unwrap();
        assert!(matches!(
            store.create_dir("x"),
            Err(StoreError::CreateDir(..))
        ));
        fs::write(store.sandbox_dir("x").join("console.log"), b"hi").unwrap();
        store.remove("x").unwrap();
        assert!(!store.sandbox_dir("x").exists());
        store.remove("x").unwrap();
    }
}
