// SPDX-License-Identifier: Apache-2.0
//! Rewrites a container's OCI spec (the host bundle's `config.json`, written by containerd or
//! iSulad) for the guest.
//!
//! - `root.path` becomes `rootfs` (the agent mounts the attached layers there).
//! - Bind mounts of small regular host files (CRI's `/etc/hosts`, `resolv.conf`, `hostname`,
//!   `termination-log`) are copied into the guest bundle (`Control.PrepareBundle` files) and
//!   their source becomes `<guest bundle>/files/<name>`.
//! - A bind of a host directory cannot be shared (there is no shared file system): `/dev/shm`
//!   becomes a tmpfs, any other one fails with `INVALID_ARGUMENT` naming the mount. Binds of
//!   device nodes are kept (the guest has its own `/dev`).
//! - Host-only settings are dropped: namespace paths (network, IPC and UTS namespaces given
//!   by path are the pod's, which in the VM are the guest's own: the entry is removed; other
//!   paths are cleared), `linux.cgroupsPath` (the agent puts the container under the pod
//!   cgroup), hooks (host binaries), AppArmor/SELinux labels (the guest has no LSM).
//!
//! The spec is handled as JSON, so fields this module does not know pass through unchanged.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use serde_json::{Map, Value, json};

use super::error::TaskError;

/// Largest host file copied into the guest bundle (the agent's limit).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most files copied into one guest bundle (the agent's limit).
pub const MAX_FILES: usize = 64;
/// Namespaces that, given by path, are the pod's shared ones: in the VM, the guest's own.
const POD_NAMESPACES: &[&str] = &["network", "ipc", "uts"];

/// A host file the guest bundle needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    /// Name under `<guest bundle>/files/`.
    pub name: String,
    /// Contents.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

/// A spec rewritten for the guest, except for the guest bundle path (known only once the
/// agent has made the bundle): [`GuestSpec::render`] fills it in.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    spec: Value,
    /// Files to put into the guest bundle.
    pub files: Vec<HostFile>,
    /// `(index in mounts, file name)` of the mounts whose source is a bundle file.
    file_mounts: Vec<(usize, String)>,
}

/// Reads `<bundle>/config.json`.
pub fn read_config(bundle: &Path) -> Result<Value, TaskError> {
    let path = bundle.join("config.json");
    let text = fs::read(&path).map_err(|e| {
        TaskError::invalid("bundle", format!("cannot read {}: {e}", path.display()))
    })?;
    let spec: Value = serde_json::from_slice(&text).map_err(|e| {
        TaskError::invalid(
            "bundle",
            format!("{} is not valid JSON: {e}", path.display()),
        )
    })?;
    if !spec.is_object() {
        return Err(TaskError::invalid(
            "bundle",
            format!("{} is not a JSON object", path.display()),
        ));
    }
    Ok(spec)
}

/// The spec's `root.path` as a host path (relative paths are relative to the bundle).
pub fn root_dir(spec: &Value, bundle: &Path) -> Option<std::path::PathBuf> {
    let p = spec.pointer("/root/path")?.as_str()?;
    Some(bundle.join(p))
}

fn is_bind(m: &Map<String, Value>) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| {
            o.iter()
                .any(|v| matches!(v.as_str(), Some("bind" | "rbind")))
        })
}

/// A file name for `source`, unique in the bundle: `<index>-<base name>`, only `[A-Za-z0-9._-]`.
fn file_name(index: usize, source: &str) -> String {
    let base = Path::new(source)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{index}-{clean}")
}

fn shm_tmpfs(destination: &Value) -> Value {
    json!({
        "destination": destination,
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
    })
}

/// Rewrites `spec` for the guest, reading the host files its bind mounts need.
pub fn prepare(mut spec: Value) -> Result<GuestSpec, TaskError> {
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| TaskError::invalid("bundle", "config.json is not a JSON object"))?;
    let root = obj
        .entry("root")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| TaskError::invalid("config.json root", "is not an object"))?;
    root.insert("path".into(), json!("rootfs"));

    let mut files = Vec::new();
    let mut file_mounts = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts") {
        let mounts = mounts
            .as_array_mut()
            .ok_or_else(|| TaskError::invalid("config.json mounts", "is not an array"))?;
        for (i, mount) in mounts.iter_mut().enumerate() {
            let Some(m) = mount.as_object() else {
                return Err(TaskError::invalid(
                    format!("config.json mounts[{i}]"),
                    "is not an object",
                ));
            };
            if !is_bind(m) {
                continue;
            }
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
            let field = format!("config.json mounts[{i}] ({dest})");
            let source = m.get("source").and_then(Value::as_str).unwrap_or("");
            let meta = fs::metadata(source).map_err(|e| {
                TaskError::invalid(
                    &field,
                    format!("bind source {source:?} cannot be used: {e}"),
                )
            })?;
            let ft = meta.file_type();
            if ft.is_dir() {
                if dest == "/dev/shm" {
                    *mount = shm_tmpfs(&json!(dest));
                    continue;
                }
                return Err(TaskError::invalid(
                    field,
                    format!(
                        "bind of host directory {source:?}: host directories cannot be shared \
                         with a sandbox VM"
                    ),
                ));
            }
            if ft.is_char_device() || ft.is_block_device() {
                continue;
            }
            if !ft.is_file() {
                return Err(TaskError::invalid(
                    field,
                    format!("bind source {source:?} is not a regular file, directory or device"),
                ));
            }
            if meta.len() > MAX_FILE_BYTES {
                return Err(TaskError::invalid(
                    field,
                    format!(
                        "bind source {source:?} has {} bytes; at most {MAX_FILE_BYTES} can be \
                         copied into the VM",
                        meta.len()
                    ),
                ));
            }
            if files.len() >= MAX_FILES {
                return Err(TaskError::invalid(
                    field,
                    format!("more than {MAX_FILES} host files are bound"),
                ));
            }
            let data = fs::read(source).map_err(|e| {
                TaskError::invalid(&field, format!("cannot read bind source {source:?}: {e}"))
            })?;
            let name = file_name(i, source);
            files.push(HostFile {
                name: name.clone(),
                data,
                mode: meta.permissions().mode() & 0o7777,
            });
            file_mounts.push((i, name));
        }
    }

    if let Some(process) = obj.get_mut("process").and_then(Value::as_object_mut) {
        process.remove("apparmorProfile");
        process.remove("selinuxLabel");
    }
    obj.remove("hooks");
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("cgroupsPath");
        linux.remove("mountLabel");
        if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            namespaces.retain(|ns| {
                let has_path = ns
                    .get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|p| !p.is_empty());
                let ty = ns.get("type").and_then(Value::as_str).unwrap_or("");
                !(has_path && POD_NAMESPACES.contains(&ty))
            });
            for ns in namespaces.iter_mut().filter_map(Value::as_object_mut) {
                ns.remove("path");
            }
        }
    }
    Ok(GuestSpec {
        spec,
        files,
        file_mounts,
    })
}

impl GuestSpec {
    /// The spec as JSON, with bundle file sources bundle-relative (`files/<name>`): the agent
    /// makes them absolute under the bundle it writes (Control.PrepareBundle).
    pub fn render(&self) -> Result<Vec<u8>, TaskError> {
        let mut spec = self.spec.clone();
        if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
            for (i, name) in &self.file_mounts {
                if let Some(m) = mounts.get_mut(*i).and_then(Value::as_object_mut) {
                    m.insert("source".into(), json!(format!("files/{name}")));
                }
            }
        }
        serde_json::to_vec(&spec).map_err(|e| TaskError::Encode("config.json", Box::new(e)))
    }

    /// The rewritten spec (bundle file sources not yet filled in).
    pub fn spec(&self) -> &Value {
        &self.spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_for_the_guest() {
        let tmp = tempfile::tempdir().unwrap();
        let hosts = tmp.path().join("hosts");
        fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        fs::set_permissions(&hosts, fs::Permissions::from_mode(0o644)).unwrap();
        let shm = tmp.path().join("shm");
        fs::create_dir(&shm).unwrap();
        let spec = json!({
            "ociVersion": "1.2.0",
            "root": {"path": "/host/rootfs", "readonly": true},
            "process": {"args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d"},
            "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts,
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind"]},
                {"destination": "/dev/null2", "source": "/dev/null", "options": ["bind"]}
            ],
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts", "path": "/proc/42/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "cgroup", "path": "/proc/42/ns/cgroup"}
                ],
                "unknownField": 7
            }
        });
        let g = prepare(spec).unwrap();
        assert_eq!(
            g.files,
            vec![HostFile {
                name: "1-hosts".into(),
                data: b"127.0.0.1 localhost\n".to_vec(),
                mode: 0o644
            }]
        );
        let out: Value = serde_json::from_slice(&g.render().unwrap()).unwrap();
        assert_eq!(out["root"], json!({"path": "rootfs", "readonly": true}));
        assert_eq!(out["mounts"][0]["type"], "proc");
        // Bundle-relative: the agent resolves it under the bundle it writes.
        assert_eq!(out["mounts"][1]["source"], "files/1-hosts");
        assert_eq!(
            out["mounts"][1]["options"],
            json!(["rbind", "rprivate", "rw"])
        );
        assert_eq!(out["mounts"][2]["type"], "tmpfs");
        assert_eq!(out["mounts"][2]["destination"], "/dev/shm");
        assert_eq!(out["mounts"][3]["source"], "/dev/null");
        assert!(out.get("hooks").is_none());
        assert!(out["process"].get("apparmorProfile").is_none());
        assert_eq!(out["process"]["args"], json!(["sh"]));
        assert!(out["linux"].get("cgroupsPath").is_none());
        assert_eq!(out["linux"]["unknownField"], 7);
        assert_eq!(
            out["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}, {"type": "cgroup"}])
        );
    }

    #[test]
    fn refuses_what_cannot_be_shared() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        fs::create_dir(&data).unwrap();
        let big = tmp.path().join("big");
        fs::write(
            &big,
            vec![0u8; usize::try_from(MAX_FILE_BYTES).unwrap() + 1],
        )
        .unwrap();
        let bad = |mount: Value, want: &str| {
            let e = prepare(json!({"root": {"path": "r"}, "mounts": [mount]})).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
            assert!(e.to_string().contains(want), "{e} should contain {want:?}");
        };
        bad(
            json!({"destination": "/data", "type": "bind", "source": data}),
            "Invalid config.json mounts[0] (/data): bind of host directory",
        );
        bad(
            json!({"destination": "/x", "type": "bind", "source": "/no/such/file"}),
            "mounts[0] (/x): bind source \"/no/such/file\" cannot be used",
        );
        bad(
            json!({"destination": "/big", "type": "bind", "source": big}),
            "at most 1048576",
        );
        let e = prepare(json!({"mounts": {}})).unwrap_err();
        assert!(e.to_string().contains("mounts"), "{e}");
        let e = prepare(json!([])).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
    }

    #[test]
    fn reads_the_bundle_config() {
        let tmp = tempfile::tempdir().unwrap();
        let e = read_config(tmp.path()).unwrap_err();
        assert!(
            e.to_string().starts_with("Invalid bundle: cannot read"),
            "{e}"
        );
        fs::write(tmp.path().join("config.json"), "{nope").unwrap();
        let e = read_config(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("is not valid JSON"), "{e}");
        fs::write(
            tmp.path().join("config.json"),
            r#"{"root":{"path":"rootfs"}}"#,
        )
        .unwrap();
        let spec = read_config(tmp.path()).unwrap();
        assert_eq!(root_dir(&spec, tmp.path()), Some(tmp.path().join("rootfs")));
        assert_eq!(file_name(3, "/var/lib/x/resolv.conf"), "3-resolv.conf");
        assert_eq!(file_name(0, "/a/b c"), "0-b_c");
    }
}
