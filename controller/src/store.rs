// SPDX-License-Identifier: Apache-2.0
//! Persistence of sandbox records: `<state_dir>/sbs/<id>/sandbox.json`.
//!
//! Sandbox directories live in a directory of their own, so no API-chosen id can name a path
//! the daemon owns (`<state_dir>/images`, `<state_dir>/templates.json`): a sandbox called
//! `images` once shared its directory with every tenant's image cache, and its Shutdown
//! removed them all. Records of older sandboxers, at `<state_dir>/<id>/sandbox.json`, are moved
//! to the new place when the records are loaded ([`Store::load_all`]).
//!
//! # Restart contract
//!
//! The VMs run inside the sandboxer process, so they end when it ends. Records survive it.
//! When a sandboxer starts it reloads every `<state_dir>/sbs/*/sandbox.json` (see
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
/// The directory under the state dir that holds one directory per sandbox. Short: each holds
/// the sandbox's unix sockets, and a socket path may have at most 107 bytes (with the default
/// state dir and containerd's 64-character ids, `vsock.sock` takes 100 of them).
pub const SANDBOXES_DIR: &str = "sbs";
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
    /// Moving an older sandboxer's record to the current layout failed.
    #[error("Failed to move {0} to {1}")]
    Migrate(PathBuf, PathBuf, #[source] io::Error),
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
    /// Ids whose directories were moved from an older sandboxer's layout.
    pub migrated: Vec<String>,
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

    /// `<root>/sbs`.
    fn sandboxes(&self) -> PathBuf {
        self.root.join(SANDBOXES_DIR)
    }

    /// `<root>/sbs/<id>`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }

    /// Creates `<root>/sbs/<id>` (mode 0700; the state dir and `sbs` are created
    /// if missing, mode 0711).
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        let dir = self.sandbox_dir(id);
        let parent = self.sandboxes();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&parent)
            .map_err(|e| StoreError::CreateDir(parent, e))?;
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

    /// Writes `record` atomically to `<root>/sbs/<id>/sandbox.json`.
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

    /// Reads `<root>/sbs/<id>/sandbox.json`.
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

    /// Moves the sandbox directories of an older sandboxer (`<root>/<id>` holding a record)
    /// to `<root>/sbs/<id>`; returns their ids. A name taken in the new place is left
    /// where it is and reported.
    fn migrate(&self, loaded: &mut Loaded) -> Result<(), StoreError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::Read(self.root.clone(), e)),
        };
        let mut legacy = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::Read(self.root.clone(), e))?;
            let path = entry.path();
            if entry.file_name() == SANDBOXES_DIR
                || !path.is_dir()
                || !path.join(RECORD_FILE).exists()
            {
                continue;
            }
            if let Some(id) = entry.file_name().to_str() {
                legacy.push(id.to_string());
            }
        }
        legacy.sort();
        for id in legacy {
            let from = self.root.join(&id);
            let to = self.sandbox_dir(&id);
            let moved = fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(self.sandboxes())
                .and_then(|()| {
                    if to.exists() {
                        Err(io::Error::from(io::ErrorKind::AlreadyExists))
                    } else {
                        fs::rename(&from, &to)
                    }
                });
            match moved {
                Ok(()) => loaded.migrated.push(id),
                Err(e) => loaded.errors.push(StoreError::Migrate(from, to, e)),
            }
        }
        Ok(())
    }

    /// Reads every record under the state dir, first moving an older sandboxer's records to
    /// the current layout. A missing state dir holds no records.
    pub fn load_all(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        self.migrate(&mut loaded)?;
        let dir = self.sandboxes();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(loaded),
            Err(e) => return Err(StoreError::Read(dir, e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::Read(dir.clone(), e))?;
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

    /// Removes `<root>/sbs/<id>` and everything in it. Removing a missing directory succeeds.
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
        let dir = tmp.path().join(SANDBOXES_DIR);
        fs::write(dir.join("sandboxer.sock"), b"").unwrap();
        fs::create_dir(dir.join("empty")).unwrap();
        fs::create_dir(dir.join("bad")).unwrap();
        fs::write(dir.join("bad").join(RECORD_FILE), b"{not json").unwrap();
        fs::create_dir(dir.join("moved")).unwrap();
        fs::write(
            dir.join("moved").join(RECORD_FILE),
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
        assert!(dir.join("bad").join(RECORD_FILE).exists());
    }

    #[test]
    fn ids_never_name_the_daemons_own_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        // What the daemon keeps beside the sandboxes.
        fs::create_dir(tmp.path().join("images")).unwrap();
        fs::write(tmp.path().join("images").join("layer.erofs"), b"image").unwrap();
        fs::write(tmp.path().join("templates.json"), b"[]").unwrap();
        for id in ["images", "templates.json"] {
            let dir = store.create_dir(id).unwrap();
            assert_eq!(dir, tmp.path().join(SANDBOXES_DIR).join(id));
            store.save(&sample(id)).unwrap();
            store.remove(id).unwrap();
        }
        assert_eq!(
            fs::read(tmp.path().join("images").join("layer.erofs")).unwrap(),
            b"image"
        );
        assert_eq!(fs::read(tmp.path().join("templates.json")).unwrap(), b"[]");
    }

    #[test]
    fn an_older_sandboxers_records_move_to_the_sandboxes_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        // The old layout: <state>/<id>/sandbox.json, beside the image cache.
        for id in ["old-a", "old-b"] {
            fs::create_dir(tmp.path().join(id)).unwrap();
            fs::write(
                tmp.path().join(id).join(RECORD_FILE),
                serde_json::to_vec(&sample(id)).unwrap(),
            )
            .unwrap();
            fs::write(tmp.path().join(id).join("console.log"), b"boot").unwrap();
        }
        fs::create_dir(tmp.path().join("images")).unwrap();
        // A sandbox of the new layout with the name of an old one: the old one stays put.
        store.create_dir("old-b").unwrap();
        store.save(&sample("old-b")).unwrap();

        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.migrated, ["old-a"]);
        let ids: Vec<_> = loaded.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["old-a", "old-b"]);
        assert!(
            matches!(&loaded.errors[..], [StoreError::Migrate(from, ..)] if from.ends_with("old-b"))
        );
        assert!(!tmp.path().join("old-a").exists());
        assert_eq!(
            fs::read(store.sandbox_dir("old-a").join("console.log")).unwrap(),
            b"boot"
        );
        assert!(tmp.path().join("images").is_dir());
        // Loading again finds nothing more to move.
        assert!(store.load_all().unwrap().migrated.is_empty());
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
