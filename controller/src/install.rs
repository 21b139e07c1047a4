// SPDX-License-Identifier: Apache-2.0
//! `sandboxer install containerd`: registers the sandboxer in a node's containerd 2.x config.
//!
//! It adds the sandbox-controller proxy plugin and the two CRI runtime handlers of
//! `docs/containerd.md` (`sandboxer`: streaming stdio, `sandboxer-fifo`: FIFO stdio) and keeps
//! everything else in the file as it was, comments and layout included. Running it again
//! changes nothing. A file it cannot parse, a config older than version 3 (containerd 1.x's
//! layout) or a key of ours that holds something other than a table is refused, and the file
//! is left untouched.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table, value};

/// containerd's default config file.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// The proxy plugin's name: what each runtime handler's `sandboxer` names.
pub const PROXY_PLUGIN: &str = "sandboxer";

/// The CRI runtime handlers added, with their stdio type.
pub const HANDLERS: [(&str, &str); 2] = [("sandboxer", "streaming"), ("sandboxer-fifo", "fifo")];

/// Why the config was not changed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(PathBuf, #[source] io::Error),
    /// The file is not valid TOML.
    #[error("{0} is not a valid TOML file")]
    Parse(PathBuf, #[source] toml_edit::TomlError),
    /// The config is not containerd 2.x's version 3.
    #[error(
        "{0}: version = {1}: the sandboxer needs containerd 2.x's config version 3 (run \
         `containerd config migrate` and install the result first)"
    )]
    Version(PathBuf, String),
    /// A key on the way to one of ours is not a table.
    #[error("{0}: `{1}` is not a table; refusing to replace it")]
    NotATable(PathBuf, String),
}

/// What an install changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The keys set (dotted paths), empty when the file already had them all.
    pub changed: Vec<String>,
    /// The new file text (what was written, or would be with `dry_run`).
    pub text: String,
}

/// Adds the sandboxer to the containerd config at `path` (created when missing) with the
/// daemon's API socket `socket`; with `dry_run`, only reports.
pub fn install_containerd(
    path: &Path,
    socket: &Path,
    dry_run: bool,
) -> Result<Report, InstallError> {
    let io_err = |e| InstallError::Io(path.to_path_buf(), e);
    let old = match fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let report = edit(path, old.as_deref().unwrap_or(""), socket)?;
    if !dry_run && (old.is_none() || !report.changed.is_empty()) {
        write_atomically(path, &report.text).map_err(io_err)?;
    }
    Ok(report)
}

/// The edit itself, on the text of `path` (empty: a new file).
pub fn edit(path: &Path, text: &str, socket: &Path) -> Result<Report, InstallError> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| InstallError::Parse(path.to_path_buf(), e))?;
    let mut changed = Vec::new();
    match doc.get("version") {
        None if doc.is_empty() => {
            doc["version"] = value(3);
            changed.push("version".to_string());
        }
        None => {
            return Err(InstallError::Version(
                path.to_path_buf(),
                "(unset, 1)".into(),
            ));
        }
        Some(v) if v.as_integer() == Some(3) => {}
        Some(v) => {
            let shown = v.as_value().map_or("?".into(), |v| v.to_string());
            return Err(InstallError::Version(
                path.to_path_buf(),
                shown.trim().into(),
            ));
        }
    }
    let socket = socket.to_string_lossy();
    let plugin = ["proxy_plugins", PROXY_PLUGIN];
    set(
        &mut doc,
        path,
        &plugin,
        &[("type", "sandbox"), ("address", &socket)],
        &mut changed,
    )?;
    for (handler, io_type) in HANDLERS {
        let keys = [
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
            handler,
        ];
        let values = [
            ("runtime_type", "io.containerd.sandboxer.v1"),
            ("sandboxer", PROXY_PLUGIN),
            ("io_type", io_type),
            ("snapshotter", "overlayfs"),
        ];
        set(&mut doc, path, &keys, &values, &mut changed)?;
    }
    Ok(Report {
        changed,
        text: doc.to_string(),
    })
}

/// Sets `values` in the table at `keys`, creating the tables on the way (implicit, so only
/// the last one gets a header), and records each key whose value changed.
fn set(
    doc: &mut DocumentMut,
    path: &Path,
    keys: &[&str],
    values: &[(&str, &str)],
    changed: &mut Vec<String>,
) -> Result<(), InstallError> {
    let dotted = |n: usize| {
        keys[..n]
            .iter()
            .map(|k| {
                if k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    (*k).to_string()
                } else {
                    format!("{k:?}")
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut table = doc.as_table_mut();
    for (depth, key) in keys.iter().enumerate() {
        let last = depth + 1 == keys.len();
        let item = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(!last);
            Item::Table(t)
        });
        // An inline table (`x = { ... }`) becomes a standard one; anything else is not ours.
        if let Some(inline) = item.as_inline_table().cloned() {
            *item = Item::Table(inline.into_table());
        }
        table = item
            .as_table_mut()
            .ok_or_else(|| InstallError::NotATable(path.to_path_buf(), dotted(depth + 1)))?;
    }
    for (key, want) in values {
        if table.get(key).and_then(Item::as_str) != Some(*want) {
            table[*key] = value(*want);
            changed.push(format!("{}.{key}", dotted(keys.len())));
        }
    }
    Ok(())
}

/// Replaces `path` with `text` so that no reader sees a partial file; keeps its permissions.
fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map_or("config.toml".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{name}.sandboxer-install"));
    let mode = fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = "/run/sandboxer/sandboxer.sock";

    fn apply(text: &str) -> Result<Report, InstallError> {
        edit(Path::new("config.toml"), text, Path::new(SOCKET))
    }

    #[test]
    fn an_empty_config_gets_version_3_and_everything() {
        let r = apply("").unwrap();
        let v: toml::Table = toml::from_str(&r.text).unwrap();
        assert_eq!(v["version"].as_integer(), Some(3));
        assert_eq!(
            v["proxy_plugins"]["sandboxer"]["type"].as_str(),
            Some("sandbox")
        );
        assert_eq!(
            v["proxy_plugins"]["sandboxer"]["address"].as_str(),
            Some(SOCKET)
        );
        let runtimes = &v["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
        assert_eq!(runtimes["sandboxer"]["io_type"].as_str(), Some("streaming"));
        assert_eq!(runtimes["sandboxer-fifo"]["io_type"].as_str(), Some("fifo"));
        assert_eq!(
            runtimes["sandboxer-fifo"]["sandboxer"].as_str(),
            Some("sandboxer")
        );
        // Implicit parents: no empty `[plugins]` header.
        assert!(!r.text.contains("[plugins]\n"), "{}", r.text);
        // A second run changes nothing.
        let again = apply(&r.text).unwrap();
        assert!(again.changed.is_empty(), "{:?}", again.changed);
        assert_eq!(again.text, r.text);
    }

    #[test]
    fn what_is_there_is_kept() {
        let text = "# my node\nversion = 3\n\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\" # keep\n\n[proxy_plugins.sandboxer]\n  address = \"/old.sock\"\n  extra = 1\n";
        let r = apply(text).unwrap();
        assert!(r.text.starts_with("# my node\nversion = 3\n"), "{}", r.text);
        assert!(
            r.text
                .contains("runtime_type = \"io.containerd.runc.v2\" # keep"),
            "{}",
            r.text
        );
        let v: toml::Table = toml::from_str(&r.text).unwrap();
        assert_eq!(
            v["proxy_plugins"]["sandboxer"]["address"].as_str(),
            Some(SOCKET)
        );
        assert_eq!(
            v["proxy_plugins"]["sandboxer"]["extra"].as_integer(),
            Some(1)
        );
        assert!(
            r.changed
                .contains(&"proxy_plugins.sandboxer.address".to_string())
        );
        assert!(
            r.changed
                .contains(&"proxy_plugins.sandboxer.type".to_string())
        );
        assert!(!r.changed.contains(&"version".to_string()));
    }

    #[test]
    fn inline_tables_are_extended() {
        let r =
            apply("version = 3\nproxy_plugins = { other = { type = \"snapshot\" } }\n").unwrap();
        let v: toml::Table = toml::from_str(&r.text).unwrap();
        assert_eq!(
            v["proxy_plugins"]["other"]["type"].as_str(),
            Some("snapshot")
        );
        assert_eq!(
            v["proxy_plugins"]["sandboxer"]["type"].as_str(),
            Some("sandbox")
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let err = apply("version = 3\n[plugins\n").unwrap_err();
        assert!(matches!(err, InstallError::Parse(..)), "{err}");
        let err = apply("version = 2\n[plugins]\n").unwrap_err();
        assert!(err.to_string().contains("version = 2"), "{err}");
        let err = apply("root = \"/var/lib/containerd\"\n").unwrap_err();
        assert!(matches!(err, InstallError::Version(..)), "{err}");
        let err = apply("version = 3\nproxy_plugins = \"x\"\n").unwrap_err();
        assert!(
            err.to_string().contains("`proxy_plugins` is not a table"),
            "{err}"
        );
        let err =
            apply("version = 3\n[plugins.\"io.containerd.cri.v1.runtime\"]\ncontainerd = 5\n")
                .unwrap_err();
        assert!(
            err.to_string()
                .contains("`plugins.\"io.containerd.cri.v1.runtime\".containerd` is not a table"),
            "{err}"
        );
    }

    #[test]
    fn the_file_is_written_once_and_kept_on_refusal() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("etc/containerd/config.toml");
        let socket = Path::new(SOCKET);
        let r = install_containerd(&path, socket, true).unwrap();
        assert!(!r.changed.is_empty());
        assert!(!path.exists(), "dry run wrote the file");
        install_containerd(&path, socket, false).unwrap();
        let written = fs::read_to_string(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let r = install_containerd(&path, socket, false).unwrap();
        assert!(r.changed.is_empty());
        assert_eq!(fs::read_to_string(&path).unwrap(), written);
        // A changed socket rewrites the file and keeps its mode.
        install_containerd(&path, Path::new("/s.sock"), false).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Garbage is refused and left as it was.
        fs::write(&path, "version = [").unwrap();
        install_containerd(&path, socket, false).unwrap_err();
        assert_eq!(fs::read_to_string(&path).unwrap(), "version = [");
    }
}
