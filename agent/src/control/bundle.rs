// SPDX-License-Identifier: Apache-2.0
//! Bundles the agent owns: PrepareBundle writes `<state_dir>/bundles/<id>/config.json` (and
//! the small files the spec's mounts need under `files/`), RemoveBundle removes one whose
//! container was never created.
//!
//! The container id becomes a directory name, so it is checked the way containerd checks
//! identifiers: 1 to 76 characters, runs of `[A-Za-z0-9]` joined by single `.`, `_` or `-`.
//! Files are written only below the new bundle directory: their paths are relative and have
//! no `.`/`..` parts, and the directory is created by this call (`ALREADY_EXISTS` otherwise),
//! so nothing in it can be a link planted by someone else.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use proto::agent::control::PrepareBundleRequest;

use super::error::ControlError;

/// Longest container id (containerd's `identifiers.Validate`).
pub const MAX_ID_LEN: usize = 76;
/// Most files one PrepareBundle may carry.
pub const MAX_FILES: usize = 64;
/// Largest file PrepareBundle takes.
pub const MAX_FILE_SIZE: usize = 1 << 20;
/// Permission bits of a file whose request gives mode 0.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// Checks a container id as containerd does (see the module docs).
pub fn check_container_id(id: &str) -> Result<(), ControlError> {
    let field = "container_id";
    if id.is_empty() {
        return Err(ControlError::invalid(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ControlError::invalid(
            field,
            format!("is {} characters, longer than {MAX_ID_LEN}", id.len()),
        ));
    }
    let mut prev_sep = true;
    for c in id.chars() {
        let sep = matches!(c, '.' | '_' | '-');
        if !(c.is_ascii_alphanumeric() || sep) || (sep && prev_sep) {
            return Err(ControlError::invalid(
                field,
                format!(
                    "{id:?} is not an identifier (letters and digits, joined by single . _ or -)"
                ),
            ));
        }
        prev_sep = sep;
    }
    if prev_sep {
        return Err(ControlError::invalid(
            field,
            format!("{id:?} ends with a separator"),
        ));
    }
    Ok(())
}

/// Checks the path of `files[i]`: relative, only normal parts.
fn check_file_path(i: usize, path: &str) -> Result<PathBuf, ControlError> {
    let field = format!("files[{i}].path");
    let p = Path::new(path);
    if path.is_empty() || path.contains('\0') {
        return Err(ControlError::invalid(field, "must be a non-empty path"));
    }
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ControlError::invalid(
            field,
            format!("{path:?} must be relative, without . or .. parts"),
        ));
    }
    Ok(p.to_path_buf())
}

/// Checks everything in `req` but the id; returns the files' relative paths.
fn check_request(req: &PrepareBundleRequest) -> Result<Vec<PathBuf>, ControlError> {
    match serde_json::from_slice::<serde_json::Value>(&req.config_json) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(_) => {
            return Err(ControlError::invalid("config_json", "is not a JSON object"));
        }
        Err(e) => {
            return Err(ControlError::invalid(
                "config_json",
                format!("is not valid JSON: {e}"),
            ));
        }
    }
    if req.files.len() > MAX_FILES {
        return Err(ControlError::invalid(
            "files",
            format!("has {} files, more than {MAX_FILES}", req.files.len()),
        ));
    }
    let mut paths: Vec<PathBuf> = Vec::with_capacity(req.files.len());
    for (i, f) in req.files.iter().enumerate() {
        let p = check_file_path(i, &f.path)?;
        if f.data.len() > MAX_FILE_SIZE {
            return Err(ControlError::invalid(
                format!("files[{i}].data"),
                format!("is {} bytes, more than {MAX_FILE_SIZE}", f.data.len()),
            ));
        }
        if f.mode > 0o7777 {
            return Err(ControlError::invalid(
                format!("files[{i}].mode"),
                format!("{:#o} has bits beyond 0o7777", f.mode),
            ));
        }
        if let Some(other) = paths.iter().find(|o| o.starts_with(&p) || p.starts_with(o)) {
            return Err(ControlError::invalid(
                format!("files[{i}].path"),
                format!("{:?} clashes with {:?}", f.path, other.display()),
            ));
        }
        paths.push(p);
    }
    Ok(paths)
}

/// `config_json` with every mount source of the form `files/<path>` (bundle-relative, as the
/// OCI spec allows for bind mounts) made absolute under `dir`, so the host never needs to know
/// where the agent keeps bundles. Other sources are left alone (`proc`, `tmpfs`, ... are
/// relative-looking names of non-bind mounts).
fn resolve_file_sources(dir: &Path, config_json: &[u8]) -> Result<Vec<u8>, ControlError> {
    let mut spec: serde_json::Value = serde_json::from_slice(config_json)
        .map_err(|e| ControlError::invalid("config_json", format!("is not valid JSON: {e}")))?;
    let Some(mounts) = spec
        .get_mut("mounts")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return Ok(config_json.to_vec());
    };
    let mut changed = false;
    for (i, m) in mounts.iter_mut().enumerate() {
        let Some(source) = m.get("source").and_then(serde_json::Value::as_str) else {
            continue;
        };
        let rel = Path::new(source);
        if !rel.starts_with("files") || source.starts_with('/') {
            continue;
        }
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(ControlError::invalid(
                format!("config_json mounts[{i}].source"),
                format!("{source:?} must stay inside the bundle (no . or .. parts)"),
            ));
        }
        let absolute = dir.join(rel).display().to_string();
        m["source"] = serde_json::Value::String(absolute);
        changed = true;
    }
    if !changed {
        return Ok(config_json.to_vec());
    }
    serde_json::to_vec(&spec)
        .map_err(|e| ControlError::invalid("config_json", format!("cannot be re-encoded: {e}")))
}

/// Writes the bundle of `req` at `dir` (which must not exist) and returns `dir`.
pub fn prepare(dir: &Path, req: &PrepareBundleRequest) -> Result<PathBuf, ControlError> {
    check_container_id(&req.container_id)?;
    let paths = check_request(req)?;
    let config_json = resolve_file_sources(dir, &req.config_json)?;
    let io = |what: String, e: std::io::Error| ControlError::from_io("container_id", &what, &e);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| io(format!("create {}", parent.display()), e))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ControlError::AlreadyExists {
                field: "container_id".into(),
                reason: format!("bundle {} exists", dir.display()),
            });
        }
        Err(e) => return Err(io(format!("create {}", dir.display()), e)),
    }
    let written = write_contents(dir, req, &config_json, &paths);
    if written.is_err()
        && let Err(e) = std::fs::remove_dir_all(dir)
    {
        log::warn!("Removing the half-written bundle {}: {e}", dir.display());
    }
    written.map(|()| dir.to_path_buf())
}

fn write_contents(
    dir: &Path,
    req: &PrepareBundleRequest,
    config_json: &[u8],
    paths: &[PathBuf],
) -> Result<(), ControlError> {
    let write = |field: String, path: &Path, mode: u32, data: &[u8]| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(mode);
        opts.open(path)
            .and_then(|mut f| f.write_all(data))
            .map_err(|e| ControlError::from_io(field, &format!("write {}", path.display()), &e))
    };
    write(
        "config_json".into(),
        &dir.join("config.json"),
        0o644,
        config_json,
    )?;
    let files = dir.join("files");
    for (i, (f, rel)) in req.files.iter().zip(paths).enumerate() {
        let path = files.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                ControlError::from_io(
                    format!("files[{i}].path"),
                    &format!("create {}", parent.display()),
                    &e,
                )
            })?;
        }
        let mode = if f.mode == 0 {
            DEFAULT_FILE_MODE
        } else {
            f.mode
        };
        write(format!("files[{i}].path"), &path, mode, &f.data)?;
        // `mode` at creation is filtered by the umask; the host asked for these bits.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| ControlError::from_io(format!("files[{i}].mode"), "chmod", &e))?;
    }
    Ok(())
}

/// Removes the bundle at `dir` without crossing into a mounted file system (a rootfs still
/// mounted under it makes the call fail instead of emptying the mount).
pub fn remove(dir: &Path) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) | Err(_) => {
            return Err(ControlError::not_found(
                "container_id",
                format!("no bundle at {}", dir.display()),
            ));
        }
    };
    remove_tree(dir, meta.dev())
}

fn remove_tree(dir: &Path, dev: u64) -> Result<(), ControlError> {
    let io = |what: String, e: std::io::Error| ControlError::from_io("container_id", &what, &e);
    let entries = std::fs::read_dir(dir).map_err(|e| io(format!("read {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io(format!("read {}", dir.display()), e))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| io(format!("stat {}", path.display()), e))?;
        if meta.is_dir() {
            if meta.dev() != dev {
                return Err(ControlError::FailedPrecondition {
                    field: "container_id".into(),
                    reason: format!("{} is a mount point: unmount it first", path.display()),
                });
            }
            remove_tree(&path, dev)?;
        } else {
            std::fs::remove_file(&path).map_err(|e| io(format!("remove {}", path.display()), e))?;
        }
    }
    std::fs::remove_dir(dir).map_err(|e| io(format!("remove {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use proto::agent::control::BundleFile;

    use super::*;

    fn request(id: &str, json: &str) -> PrepareBundleRequest {
        let mut r = PrepareBundleRequest::new();
        r.container_id = id.into();
        r.config_json = json.as_bytes().to_vec();
        r
    }

    fn file(path: &str, data: &[u8], mode: u32) -> BundleFile {
        let mut f = BundleFile::new();
        f.path = path.into();
        f.data = data.to_vec();
        f.mode = mode;
        f
    }

    #[test]
    fn ids() {
        for good in ["a", "c1", "a.b_c-d", &"x".repeat(76), "0123abc"] {
            check_container_id(good).unwrap();
        }
        for bad in [
            "",
            &"x".repeat(77),
            "a/b",
            "..",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a b",
            "a\0",
            "é",
        ] {
            let e = check_container_id(bad).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{bad:?}");
            assert!(e.to_string().starts_with("container_id: "), "{e}");
        }
    }

    #[test]
    fn bundle_relative_file_sources_become_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundles/c1");
        let mut req = request(
            "c1",
            r#"{"mounts":[
                {"destination":"/proc","type":"proc","source":"proc"},
                {"destination":"/etc/hosts","type":"bind","source":"files/etc/hosts"},
                {"destination":"/data","type":"bind","source":"/abs/data"},
                {"destination":"/x","type":"tmpfs"}]}"#,
        );
        req.files = vec![file("etc/hosts", b"127.0.0.1 localhost\n", 0o644)];
        prepare(&bundle, &req).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let sources: Vec<_> = config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["source"].as_str().map(str::to_owned))
            .collect();
        let hosts = bundle.join("files/etc/hosts").display().to_string();
        assert_eq!(
            sources,
            [
                Some("proc".into()),
                Some(hosts),
                Some("/abs/data".into()),
                None
            ]
        );
        // A bundle-relative source may not leave the bundle; nothing is written then.
        let escape = request(
            "c2",
            r#"{"mounts":[{"destination":"/e","type":"bind","source":"files/../../etc/shadow"}]}"#,
        );
        let e = prepare(&dir.path().join("bundles/c2"), &escape).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("mounts[0].source"), "{e}");
        assert!(!dir.path().join("bundles/c2").exists());
    }

    #[test]
    fn prepare_writes_config_and_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundles/c1");
        let mut req = request("c1", r#"{"ociVersion":"1.0.2"}"#);
        req.files = vec![
            file("etc/hosts", b"127.0.0.1 localhost\n", 0o644),
            file("hostname", b"pod\n", 0o600),
            file("resolv.conf", b"", 0),
        ];
        assert_eq!(prepare(&bundle, &req).unwrap(), bundle);
        assert_eq!(
            std::fs::read_to_string(bundle.join("config.json")).unwrap(),
            r#"{"ociVersion":"1.0.2"}"#
        );
        assert_eq!(
            std::fs::read(bundle.join("files/etc/hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        let mode = |p: &str| {
            std::fs::metadata(bundle.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("files/hostname"), 0o600);
        assert_eq!(mode("files/resolv.conf"), DEFAULT_FILE_MODE);
        let e = prepare(&bundle, &req).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::ALREADY_EXISTS, "{e}");
        remove(&bundle).unwrap();
        assert!(!bundle.exists());
        let e = remove(&bundle).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
    }

    #[test]
    fn bad_requests_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundles/c1");
        let cases: Vec<(PrepareBundleRequest, &str)> = vec![
            (request("c1", "{"), "config_json: is not valid JSON"),
            (request("c1", "[1]"), "config_json: is not a JSON object"),
            (
                {
                    let mut r = request("c1", "{}");
                    r.files = vec![file("../x", b"", 0)];
                    r
                },
                "files[0].path: ",
            ),
            (
                {
                    let mut r = request("c1", "{}");
                    r.files = vec![file("ok", b"", 0), file("/etc/passwd", b"", 0)];
                    r
                },
                "files[1].path: ",
            ),
            (
                {
                    let mut r = request("c1", "{}");
                    r.files = vec![file("a", b"", 0), file("a/b", b"", 0)];
                    r
                },
                "files[1].path: \"a/b\" clashes",
            ),
            (
                {
                    let mut r = request("c1", "{}");
                    r.files = vec![file("big", &vec![0; MAX_FILE_SIZE + 1], 0)];
                    r
                },
                "files[0].data: ",
            ),
            (
                {
                    let mut r = request("c1", "{}");
                    r.files = (0..=MAX_FILES)
                        .map(|i| file(&i.to_string(), b"", 0))
                        .collect();
                    r
                },
                "files: has 65 files",
            ),
            (
                {
                    let mut r = request("c1", "{}");
                    r.files = vec![file("m", b"", 0o10000)];
                    r
                },
                "files[0].mode: ",
            ),
        ];
        for (req, want) in cases {
            let e = prepare(&bundle, &req).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
            assert!(e.to_string().starts_with(want), "{e} (wanted {want:?})");
            assert!(!bundle.exists());
        }
    }
}
