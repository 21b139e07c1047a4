// SPDX-License-Identifier: Apache-2.0
//! The host paths the Task API may open: the daemon runs as root and attaches rootfs sources
//! read-write, turns directories into images, reads bundles and opens stdio files, all at
//! paths an API client chose. Each such path must lie, once its symbolic links are resolved,
//! under one of a few roots: where the engines keep snapshots, bundles and stdio FIFOs
//! ([`DEFAULT_ROOTS`], configurable as `[task] host_paths`) and the daemon's own state and
//! image directories. Anything else is refused with `INVALID_ARGUMENT` naming the field.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::TaskError;

pub use crate::config::DEFAULT_TASK_HOST_PATHS as DEFAULT_ROOTS;

/// The roots the Task API's host paths must lie under.
#[derive(Clone, Debug, Default)]
pub struct HostPaths {
    roots: Vec<PathBuf>,
    /// The roots resolved, once, at the first check (a root missing then stays as given).
    resolved: OnceLock<Vec<PathBuf>>,
}

impl HostPaths {
    /// Paths under `roots` (absolute; others are ignored).
    pub fn new(roots: impl IntoIterator<Item = PathBuf>) -> Self {
        HostPaths {
            roots: roots.into_iter().filter(|r| r.is_absolute()).collect(),
            resolved: OnceLock::new(),
        }
    }

    /// [`DEFAULT_ROOTS`].
    pub fn defaults() -> Self {
        Self::new(DEFAULT_ROOTS.iter().map(PathBuf::from))
    }

    /// These roots and `more`.
    #[must_use]
    pub fn with(mut self, more: impl IntoIterator<Item = PathBuf>) -> Self {
        self.roots
            .extend(more.into_iter().filter(|r| r.is_absolute()));
        self.resolved = OnceLock::new();
        self
    }

    /// The roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `path` (of request field `field`) resolved, if it lies under a root. A file that does
    /// not exist yet (an output file the bridge creates) is resolved through its directory. The
    /// roots are resolved too (one may itself be a symbolic link, as `/var/run` is), at the
    /// first check.
    pub fn check(&self, field: &str, path: &Path) -> Result<PathBuf, TaskError> {
        if !path.is_absolute() {
            return Err(TaskError::invalid(
                field,
                format!("{} is not absolute", path.display()),
            ));
        }
        let resolved = resolve(path).map_err(|e| {
            TaskError::invalid(field, format!("{} cannot be resolved: {e}", path.display()))
        })?;
        let roots = self.resolved.get_or_init(|| {
            self.roots
                .iter()
                .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
                .collect()
        });
        let allowed = roots.iter().any(|root| resolved.starts_with(root));
        if allowed {
            Ok(resolved)
        } else {
            Err(TaskError::invalid(
                field,
                format!(
                    "{} is outside the directories the sandboxer opens for the Task API ({}; \
                     `[task] host_paths` in the config)",
                    path.display(),
                    self.roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    }
}

/// `path` with every symbolic link and `..` resolved; a missing last component (a file to be
/// created) is resolved through its parent.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    match path.canonicalize() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (Some(parent), Some(std::path::Component::Normal(name))) =
                (path.parent(), path.components().next_back())
            else {
                return Err(e);
            };
            Ok(parent.canonicalize()?.join(name))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_a_root_pass_and_others_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("snap/fs")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let paths = HostPaths::new([root.clone(), PathBuf::from("relative/ignored")]);
        assert_eq!(paths.roots(), std::slice::from_ref(&root));

        paths.check("rootfs", &root.join("snap/fs")).unwrap();
        let refused = |p: &Path| match paths.check("rootfs", p) {
            Err(TaskError::InvalidArgument { field, reason }) => {
                assert_eq!(field, "rootfs");
                reason
            }
            other => panic!("{other:?}"),
        };
        assert!(refused(&outside.join("secret")).contains("outside the directories"));
        // `..` and symbolic links are resolved before the check.
        refused(&root.join("../outside/secret"));
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        refused(&root.join("link/secret"));
        // A file to be created is judged by its directory.
        paths.check("stdout", &root.join("new.log")).unwrap();
        refused(&root.join("link/new.log"));
        assert!(refused(&root.join("missing/new.log")).contains("cannot be resolved"));
        // The host's own files.
        refused(Path::new("/etc/shadow"));
        HostPaths::defaults()
            .check("bundle", Path::new("/etc"))
            .unwrap_err();
    }
}
