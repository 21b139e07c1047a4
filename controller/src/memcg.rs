// SPDX-License-Identifier: Apache-2.0
//! Guest memory charged to a memory cgroup of the sandbox's (`[cgroup] charge_memory`).
//!
//! Every VM runs in the daemon's process, and the kernel charges a page to the memory cgroup of
//! the address space (`mm`) that allocates it: a guest's page faults, and the VMM's writes into
//! guest memory, are the daemon's. The memory controller is not threaded, so no thread
//! placement changes that ([`crate::cgroup`] places threads for CPU only). What can be charged
//! elsewhere is a page allocated by *another process*: with `charge_memory` on, Start makes
//! the guest memory memfd first, and a short-lived helper process (this binary's hidden
//! `charge-memory` command) joins the sandbox's memory cgroup and allocates every page of it
//! (`fallocate`) before the VM exists. The pages stay charged there for as long as they live
//! (the guest and the VMM then only map them), and go when the VM's memory is freed.
//!
//! The price: the guest's memory is allocated whole at Start, not as the guest touches it, and
//! such a sandbox never starts from a template (a clone's pages are the daemon's own
//! copy-on-write pages). A guest that does not fit the cgroup's limit (the pod's, when the
//! cgroup lies under the pod's `cgroup_parent`) fails Start with `RESOURCE_EXHAUSTED`.
//!
//! Layout: `<memory root>/<parent>/<id>`, where `<parent>` is the pod's CRI `cgroup_parent`
//! when it names one (it must exist), else `[cgroup] parent`; the memory root is the v1
//! `memory` hierarchy's mount, or the unified (v2) mount, where `+memory` is enabled in every
//! ancestor's `cgroup.subtree_control` that lacks it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cgroup::{CgroupError, enable, existing_pod_parent, mkdir, pod_parent_path};

/// The hidden command of the `sandboxer` binary that charges a memfd ([`helper_main`]).
pub const HELPER_COMMAND: &str = "charge-memory";

/// Why a sandbox's guest memory could not be charged to its memory cgroup.
#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    /// The cgroup's limit (its own or an ancestor's) is below the guest's memory.
    #[error(
        "the guest's {mib} MiB of memory do not fit in memory cgroup {cgroup} (its limit, or an ancestor's)"
    )]
    DoesNotFit {
        /// Guest memory in MiB.
        mib: u64,
        /// The cgroup.
        cgroup: PathBuf,
    },
    /// The guest memory memfd could not be made.
    #[error("cannot make the guest memory")]
    Memfd(#[source] vmm::MemoryError),
    /// Making or using the cgroup failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The helper process could not run or failed otherwise.
    #[error("the memory charging helper failed: {0}")]
    Helper(String),
}

/// Where the sandboxes' memory cgroups are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryCgroups {
    /// The hierarchy's root directory.
    root: PathBuf,
    /// Whether it is the unified (v2) hierarchy.
    v2: bool,
    /// `[cgroup] parent`, relative to the root.
    parent: PathBuf,
}

impl MemoryCgroups {
    /// The memory hierarchy of this host (`/proc/self/mountinfo`), sandboxes under `parent`.
    pub fn probe(parent: &Path) -> Result<Self, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| CgroupError::Read("/proc/self/mountinfo".into(), e))?;
        let (root, v2) = find_memory_root(&mountinfo, |dir| {
            std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default()
        })
        .ok_or_else(|| {
            CgroupError::Unusable("no cgroup hierarchy with the memory controller".into())
        })?;
        Self::at(root, v2, parent)
    }

    /// Memory cgroups in the hierarchy at `root` (`v2`: unified), sandboxes under `parent`.
    pub fn at(root: PathBuf, v2: bool, parent: &Path) -> Result<Self, CgroupError> {
        let parent = pod_parent_path(&parent.to_string_lossy())?;
        Ok(MemoryCgroups { root, v2, parent })
    }

    /// The memory cgroup (relative to the root) of sandbox `id`: under the pod's CRI
    /// `cgroup_parent` when it names one (it must exist), else under `[cgroup] parent`.
    pub fn group_of(&self, id: &str, pod_parent: &str) -> Result<PathBuf, CgroupError> {
        if pod_parent.is_empty() {
            return Ok(self.parent.join(id));
        }
        Ok(existing_pod_parent(&self.root, pod_parent)?.join(id))
    }

    /// The directory of `group`.
    pub fn dir(&self, group: &Path) -> PathBuf {
        self.root.join(group)
    }

    /// Bytes charged to `group` now (`memory.current`, v1 `memory.usage_in_bytes`).
    pub fn usage(&self, group: &Path) -> Result<u64, CgroupError> {
        let file = self.dir(group).join(if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        });
        let text =
            std::fs::read_to_string(&file).map_err(|e| CgroupError::Read(file.clone(), e))?;
        text.trim()
            .parse()
            .map_err(|_| CgroupError::Read(file, io::Error::other(format!("{text:?}"))))
    }

    /// Makes `group` and any parent it lacks (and, v2, lets memory be distributed down to
    /// it).
    fn make(&self, group: &Path) -> Result<PathBuf, CgroupError> {
        let dir = self.dir(group);
        if self.v2 {
            // Every ancestor below the root must hand the memory controller down.
            let mut at = self.root.clone();
            for part in group.parent().into_iter().flat_map(Path::components) {
                enable(&at, "memory")?;
                at.push(part);
                mkdir(&at)?;
            }
            enable(&at, "memory")?;
        }
        mkdir(&dir)?;
        Ok(dir)
    }

    /// Charges every page of `memory` (a guest memory memfd of `bytes`, no page allocated yet)
    /// to `group`, creating it: a helper process joins the cgroup and allocates them all. Blocks
    /// until it is done (the helper's own start and `bytes` of zeroed pages).
    pub fn charge(&self, group: &Path, memory: &File, bytes: u64) -> Result<(), ChargeError> {
        let dir = self.make(group)?;
        let exe = std::env::current_exe()
            .map_err(|e| ChargeError::Helper(format!("cannot find this binary: {e}")))?;
        let fd_path = format!("/proc/{}/fd/{}", std::process::id(), memory.as_raw_fd());
        let out = Command::new(&exe)
            .arg(HELPER_COMMAND)
            .arg(dir.join("cgroup.procs"))
            .arg(&fd_path)
            .arg(bytes.to_string())
            .env_clear()
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| ChargeError::Helper(format!("cannot run {}: {e}", exe.display())))?;
        if out.status.success() {
            return Ok(());
        }
        // The memory cgroup's OOM killer ends the helper (its only task) when the pages do not
        // fit; a kernel that refuses the charge instead makes fallocate fail with ENOMEM.
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() == Some(nix::libc::SIGKILL)
            || out.status.code() == Some(HELPER_NO_MEMORY)
        {
            return Err(ChargeError::DoesNotFit {
                mib: bytes >> 20,
                cgroup: dir,
            });
        }
        Err(ChargeError::Helper(format!(
            "{} {HELPER_COMMAND}: {}: {}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    /// Removes `group` (its pages stay charged to it until the VM's memory is freed; the kernel
    /// keeps a removed cgroup's accounts until then). A group already gone is fine.
    pub fn remove(&self, group: &Path) -> Result<(), CgroupError> {
        let dir = self.dir(group);
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CgroupError::Remove(dir, e)),
            _ => Ok(()),
        }
    }
}

/// The helper's exit code when the allocation was refused for lack of memory.
const HELPER_NO_MEMORY: i32 = 3;

/// The `charge-memory <cgroup.procs> <memfd path> <bytes>` command: moves this process into
/// the cgroup whose `cgroup.procs` is given, then allocates `bytes` of the memfd (opened by
/// its `/proc/<pid>/fd/<n>` path). Returns the exit code: 0, 3 (refused for lack of memory),
/// or 1 with the reason on stderr.
pub fn helper_main(args: &[std::ffi::OsString]) -> i32 {
    let [procs, memfd, bytes] = args else {
        eprintln!("usage: {HELPER_COMMAND} <cgroup.procs> <memfd path> <bytes>");
        return 1;
    };
    let Some(bytes) = bytes.to_str().and_then(|b| b.parse::<i64>().ok()) else {
        eprintln!("{HELPER_COMMAND}: bytes: not a number: {bytes:?}");
        return 1;
    };
    // Into the cgroup before the first page is allocated: "0" is the writing process.
    if let Err(e) = std::fs::write(procs, b"0") {
        eprintln!(
            "{HELPER_COMMAND}: cannot join {}: {e}",
            Path::new(procs).display()
        );
        return 1;
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(memfd)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "{HELPER_COMMAND}: cannot open {}: {e}",
                Path::new(memfd).display()
            );
            return 1;
        }
    };
    match nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        bytes,
    ) {
        Ok(()) => 0,
        Err(nix::errno::Errno::ENOMEM | nix::errno::Errno::ENOSPC) => HELPER_NO_MEMORY,
        Err(e) => {
            eprintln!("{HELPER_COMMAND}: fallocate: {e}");
            1
        }
    }
}

/// The memory hierarchy in `mountinfo`: a v1 `cgroup` mount with the `memory` option, else a
/// `cgroup2` mount whose `cgroup.controllers` (read by `controllers`) lists `memory`.
fn find_memory_root(
    mountinfo: &str,
    controllers: impl Fn(&Path) -> String,
) -> Option<(PathBuf, bool)> {
    let mut unified = None;
    for line in mountinfo.lines() {
        // `<id> <parent> <dev> <root> <mount point> <opts> [optional...] - <fstype> <src> <super opts>`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split_whitespace().nth(4) else {
            continue;
        };
        let mut right = right.split_whitespace();
        let (fstype, super_opts) = (right.next(), right.nth(1).unwrap_or(""));
        match fstype {
            Some("cgroup") if super_opts.split(',').any(|o| o == "memory") => {
                return Some((PathBuf::from(point), false));
            }
            Some("cgroup2") if unified.is_none() => {
                let point = PathBuf::from(point);
                if controllers(&point)
                    .split_whitespace()
                    .any(|c| c == "memory")
                {
                    unified = Some((point, true));
                }
            }
            _ => {}
        }
    }
    unified
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn the_memory_hierarchy_is_found_in_either_version() {
        let none = |_: &Path| String::new();
        let all = |_: &Path| "cpuset cpu io memory pids".to_string();
        assert_eq!(
            find_memory_root(HYBRID, none),
            Some(("/sys/fs/cgroup/memory".into(), false))
        );
        assert_eq!(
            find_memory_root(UNIFIED, all),
            Some(("/sys/fs/cgroup".into(), true))
        );
        // A unified mount without the controller (the hybrid layout's) is no memory root.
        assert_eq!(find_memory_root(UNIFIED, none), None);
    }

    #[test]
    fn a_sandbox_goes_under_the_pod_parent_or_the_configured_one() {
        let root = tempfile::tempdir().unwrap();
        let cgroups = MemoryCgroups::at(root.path().into(), false, Path::new("sandboxer")).unwrap();
        assert_eq!(
            cgroups.group_of("pod1", "").unwrap(),
            Path::new("sandboxer/pod1")
        );
        std::fs::create_dir_all(root.path().join("kubepods/podA")).unwrap();
        assert_eq!(
            cgroups.group_of("pod1", "/kubepods/podA").unwrap(),
            Path::new("kubepods/podA/pod1")
        );
        let missing = cgroups.group_of("pod1", "/kubepods/podB").unwrap_err();
        assert!(missing.to_string().contains("kubepods/podB"), "{missing}");
        cgroups.group_of("pod1", "../escape").unwrap_err();
    }

    #[test]
    fn a_v1_group_is_made_with_the_parents_it_lacks() {
        let root = tempfile::tempdir().unwrap();
        let cgroups = MemoryCgroups::at(root.path().into(), false, Path::new("sandboxer")).unwrap();
        let dir = cgroups.make(Path::new("sandboxer/pod1")).unwrap();
        assert!(dir.is_dir());
        assert!(!root.path().join("cgroup.subtree_control").exists());
    }

    #[test]
    fn v2_hands_the_memory_controller_down_to_the_sandbox() {
        let root = tempfile::tempdir().unwrap();
        let cgroups = MemoryCgroups::at(root.path().into(), true, Path::new("sandboxer")).unwrap();
        let dir = cgroups.make(Path::new("sandboxer/pod1")).unwrap();
        assert!(dir.is_dir());
        for d in [root.path().to_owned(), root.path().join("sandboxer")] {
            assert_eq!(
                std::fs::read_to_string(d.join("cgroup.subtree_control")).unwrap(),
                "+memory",
                "{}",
                d.display()
            );
        }
        assert!(!dir.join("cgroup.subtree_control").exists());
        cgroups.remove(Path::new("sandboxer/pod1")).unwrap();
        cgroups.remove(Path::new("sandboxer/pod1")).unwrap();
        assert!(!dir.exists());
    }
}
