// SPDX-License-Identifier: Apache-2.0
//! Entering a pod's network namespace: the path is checked (it must be an nsfs file, as a
//! `/run/netns/<name>` bind mount or `/proc/<pid>/ns/net` is), and the work runs on a thread
//! of its own that `setns`es into the netns and drives a current-thread runtime. That thread
//! ends with the work, so no thread of the process (least of all a tokio worker) is ever left
//! in a pod's netns. Netlink sockets and taps opened on it stay bound to the pod netns.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, statfs};
use rtnetlink::Handle;
use tokio::sync::oneshot;
use tracing::warn;

use super::NetworkError;

/// Which namespace a namespace file stands for: the nsfs device and inode that `stat` gives
/// for it, the same for a `/run/netns/<name>` bind mount and `/proc/<pid>/ns/net` of one
/// namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsId {
    dev: u64,
    ino: u64,
}

impl NsId {
    /// The namespace `path` stands for (any file has a device and inode: check
    /// [`check_pod_netns`] for a namespace file).
    pub fn of(path: &Path) -> io::Result<NsId> {
        let m = std::fs::metadata(path)?;
        Ok(NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The daemon's own network namespace (the host's, as a rule), read once: its threads
    /// never leave it (see the module doc).
    pub fn own_netns() -> io::Result<NsId> {
        static OWN: std::sync::OnceLock<Option<NsId>> = std::sync::OnceLock::new();
        OWN.get_or_init(|| NsId::of(Path::new("/proc/self/ns/net")).ok())
            .ok_or_else(|| io::Error::other("/proc/self/ns/net cannot be read"))
    }
}

/// Checks a pod's `netns_path` at Create: a namespace file (on nsfs) that is not the daemon's
/// own network namespace, whose taps and tc redirects a pod must never get. Returns its
/// identity, or why it is refused. (That it is a *network* namespace, `setns` checks at
/// Start.)
pub fn check_pod_netns(path: &Path) -> Result<NsId, String> {
    let fs = statfs(path).map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(format!(
            "{} is not a namespace file (not on nsfs)",
            path.display()
        ));
    }
    let id = NsId::of(path).map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
    if NsId::own_netns().is_ok_and(|own| own == id) {
        return Err(format!(
            "{} is the sandboxer's own network namespace (the host's)",
            path.display()
        ));
    }
    Ok(id)
}

/// An open, checked netns file.
#[derive(Debug)]
pub(super) struct NetnsFile {
    path: PathBuf,
    file: File,
}

impl NetnsFile {
    /// Checks that `path` is a namespace file and opens it. `setns` later checks that it is a
    /// *network* namespace.
    pub(super) fn open(path: &Path) -> Result<NetnsFile, NetworkError> {
        if path.as_os_str().is_empty() || !path.is_absolute() {
            return Err(NetworkError::NotANetns {
                netns_path: path.to_path_buf(),
                reason: "not an absolute path".to_string(),
            });
        }
        match path.try_exists() {
            Ok(true) => {}
            Ok(false) => {
                return Err(NetworkError::NetnsNotFound {
                    netns_path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(NetworkError::OpenNetns {
                    netns_path: path.to_path_buf(),
                    source,
                });
            }
        }
        let fs = statfs(path).map_err(|e| NetworkError::OpenNetns {
            netns_path: path.to_path_buf(),
            source: e.into(),
        })?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(NetworkError::NotANetns {
                netns_path: path.to_path_buf(),
                reason: "not on nsfs (no namespace is mounted there)".to_string(),
            });
        }
        let file = File::open(path).map_err(|source| NetworkError::OpenNetns {
            netns_path: path.to_path_buf(),
            source,
        })?;
        Ok(NetnsFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Runs `work` inside the netns on a dedicated thread, with a netlink connection opened
    /// there, and returns its result.
    ///
    /// If the caller stops waiting (its future is dropped), the work still finishes, and
    /// then `undo` gets its successful result on the same thread and netns, so nothing
    /// the work set up is left behind.
    pub(super) async fn run<T, F, Fut, U, UFut>(self, work: F, undo: U) -> Result<T, NetworkError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, NetworkError>>,
        U: FnOnce(Handle, T) -> UFut + Send + 'static,
        UFut: Future<Output = ()>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("sbx-netns".to_string())
            .spawn(move || self.enter_and_run(work, undo, tx))
            .map_err(NetworkError::SpawnThread)?;
        rx.await.map_err(|_| NetworkError::ThreadDied)?
    }

    /// The body of the netns thread.
    fn enter_and_run<T, F, Fut, U, UFut>(
        self,
        work: F,
        undo: U,
        tx: oneshot::Sender<Result<T, NetworkError>>,
    ) where
        F: FnOnce(Handle) -> Fut,
        Fut: Future<Output = Result<T, NetworkError>>,
        U: FnOnce(Handle, T) -> UFut,
        UFut: Future<Output = ()>,
    {
        if let Err(source) = setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            let _ = tx.send(Err(NetworkError::EnterNetns {
                netns_path: self.path.clone(),
                source,
            }));
            return;
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = tx.send(Err(NetworkError::Runtime(e)));
                return;
            }
        };
        runtime.block_on(async move {
            // The socket is created here, after setns: it belongs to the pod netns.
            let (connection, handle, _) = match rtnetlink::new_connection() {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(NetworkError::NetlinkSocket(e)));
                    return;
                }
            };
            let conn_task = tokio::spawn(connection);
            let result = work(handle.clone()).await;
            if let Err(Ok(abandoned)) = tx.send(result) {
                warn!("network namespace work abandoned by its caller: undoing it");
                undo(handle, abandoned).await;
            }
            conn_task.abort();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_missing_relative_and_non_ns_paths() {
        let missing = Path::new("/nonexistent/sandboxer/netns");
        assert!(matches!(
            NetnsFile::open(missing),
            Err(NetworkError::NetnsNotFound { netns_path }) if netns_path == missing
        ));
        assert!(matches!(
            NetnsFile::open(Path::new("run/netns/x")),
            Err(NetworkError::NotANetns { .. })
        ));
        assert!(matches!(
            NetnsFile::open(Path::new("")),
            Err(NetworkError::NotANetns { .. })
        ));
        let err = NetnsFile::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, NetworkError::NotANetns { .. }), "{err:?}");
        assert!(err.to_string().contains("/proc/self/status"), "{err}");
    }

    #[test]
    fn accepts_the_process_netns() {
        // Every process can read its own netns file; this checks only the nsfs test.
        NetnsFile::open(Path::new("/proc/self/ns/net")).unwrap();
    }
}
