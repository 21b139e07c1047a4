// SPDX-License-Identifier: Apache-2.0
//! The file systems PID 1 mounts before anything else runs, in order.

use std::io;

use nix::mount::{MsFlags, mount};

/// One mount done at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootMount {
    /// File system type (also used as the source).
    pub fstype: &'static str,
    /// Mount point; created if missing.
    pub target: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// File-system-specific options.
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Boot mounts in order: each target lies on `/` (the initramfs) or on an earlier mount.
pub const BOOT_MOUNTS: &[BootMount] = &[
    BootMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BootMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BootMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    // A private devpts instance; /dev/ptmx (from devtmpfs) opens the instance at ../pts.
    BootMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    BootMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    BootMount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    BootMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Symbolic links in /dev that programs expect (devtmpfs does not create them).
pub const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// Errors of the boot mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Creating a mount point failed.
    #[error("Failed to create mount point {0}")]
    CreateMountPoint(&'static str, #[source] io::Error),
    /// The mount itself failed.
    #[error("Failed to mount {fstype} on {target}")]
    Mount {
        /// File system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Creating a /dev symlink failed.
    #[error("Failed to create symlink {0}")]
    Symlink(&'static str, #[source] io::Error),
}

/// Mounts [`BOOT_MOUNTS`] and creates [`DEV_SYMLINKS`].
pub fn mount_all() -> Result<(), MountError> {
    for m in BOOT_MOUNTS {
        std::fs::create_dir_all(m.target).map_err(|e| MountError::CreateMountPoint(m.target, e))?;
        mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            MountError::Mount {
                fstype: m.fstype,
                target: m.target,
                source,
            }
        })?;
    }
    for (link, target) in DEV_SYMLINKS {
        match std::os::unix::fs::symlink(target, link) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(MountError::Symlink(link, e));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The last of `earlier` whose target holds `path` strictly below it.
    fn lies_on(path: &Path, earlier: &[BootMount]) -> Option<&'static str> {
        earlier
            .iter()
            .rev()
            .map(|m| m.target)
            .find(|t| path.starts_with(t) && path != Path::new(t))
    }

    #[test]
    fn order_puts_parents_first() {
        // Nested mount points must come after the mount that holds them.
        for (i, m) in BOOT_MOUNTS.iter().enumerate() {
            let parent = Path::new(m.target).parent().unwrap();
            let holder = lies_on(Path::new(m.target), &BOOT_MOUNTS[..i]);
            if parent != Path::new("/") {
                assert!(
                    holder.is_some(),
                    "{} is mounted before its parent",
                    m.target
                );
            }
            // And nothing mounted later hides it.
            assert!(
                lies_on(Path::new(m.target), &BOOT_MOUNTS[i + 1..]).is_none(),
                "{} is hidden by a later mount",
                m.target
            );
        }
        assert_eq!(lies_on(Path::new("/dev/pts"), BOOT_MOUNTS), Some("/dev"));
        assert_eq!(
            lies_on(Path::new("/sys/fs/cgroup"), BOOT_MOUNTS),
            Some("/sys")
        );
    }

    #[test]
    fn required_mounts_are_present() {
        let find = |t: &str| BOOT_MOUNTS.iter().find(|m| m.target == t).unwrap();
        assert_eq!(find("/proc").fstype, "proc");
        assert_eq!(find("/sys").fstype, "sysfs");
        assert_eq!(find("/dev").fstype, "devtmpfs");
        assert_eq!(find("/sys/fs/cgroup").fstype, "cgroup2");
        assert_eq!(find("/run").fstype, "tmpfs");
        assert_eq!(find("/dev/shm").fstype, "tmpfs");
        let pts = find("/dev/pts");
        assert_eq!(pts.fstype, "devpts");
        let opts = pts.data.unwrap();
        assert!(opts.split(',').any(|o| o == "ptmxmode=0666"));
        assert!(opts.split(',').any(|o| o == "newinstance"));
        // Nothing that users write to is executable-by-setuid.
        assert!(
            BOOT_MOUNTS
                .iter()
                .all(|m| m.flags.contains(MsFlags::MS_NOSUID))
        );
        // Symlinks live in /dev, which is mounted.
        for (link, _) in DEV_SYMLINKS {
            assert_eq!(lies_on(Path::new(link), BOOT_MOUNTS), Some("/dev"));
        }
    }
}
