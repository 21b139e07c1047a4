// SPDX-License-Identifier: Apache-2.0
//! Container root file systems from block devices (`CreateTaskRequest.rootfs`).
//!
//! The host attaches each layer to a virtio-blk slot and names it by the slot's serial
//! (`blk:sbx-slot-<n>`, read back from `/sys/block/*/serial`, the virtio-blk GET_ID string) or
//! passes a device path. Mounts come top layer first. Supported:
//! - one writable `ext4`: mounted as the rootfs;
//! - read-only layers (`erofs`, or any type with option `ro`), optionally under one writable
//!   `ext4` on top: an overlay with the layers as lowerdirs and upper/work on the writable
//!   ext4, or on a tmpfs under the bundle, or none if the spec's `root.readonly`.
//!
//! Everything is mounted under the bundle (`rootfs`, `layers/<n>`, `scratch`) and
//! [`RootfsMounts::unmount`] takes it all down again (Delete).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::error::TaskError;

/// How long a device may take to show a non-zero size (the host swaps a slot's backing just
/// before `Create`).
pub const DEVICE_WAIT: Duration = Duration::from_secs(5);
/// Where block devices are listed.
const SYS_BLOCK: &str = "/sys/block";

/// One entry of `CreateTaskRequest.rootfs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMount {
    /// File system type: `ext4` or `erofs`.
    pub fstype: String,
    /// Device path or `blk:<serial>`.
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

impl LayerMount {
    fn readonly(&self) -> bool {
        self.fstype == "erofs" || self.options.iter().any(|o| o == "ro")
    }
}

/// Mounts made for one container, in mount order.
#[derive(Debug, Default)]
pub struct RootfsMounts {
    mounted: Vec<PathBuf>,
    /// The directory to use as the spec's root path.
    pub rootfs: PathBuf,
}

impl RootfsMounts {
    /// Unmounts everything, last mount first; lazily if a mount is busy.
    pub fn unmount(&mut self) -> Result<(), TaskError> {
        let mut first_err = None;
        while let Some(target) = self.mounted.pop() {
            if let Err(e) = umount2(&target, MntFlags::empty()) {
                log::warn!("umount {}: {e}; detaching", target.display());
                if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                    first_err.get_or_insert(TaskError::Internal(format!(
                        "Failed to unmount {}: {e}",
                        target.display()
                    )));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> Result<(), TaskError> {
        std::fs::create_dir_all(target).map_err(|e| {
            TaskError::internal(&format!("Failed to create {}", target.display()), &e)
        })?;
        let data = (!data.is_empty()).then_some(data);
        mount(Some(source), target, Some(fstype), flags, data).map_err(|e| {
            TaskError::invalid(
                "rootfs",
                format!("mount {source} ({fstype}) on {}: {e}", target.display()),
            )
        })?;
        self.mounted.push(target.to_owned());
        Ok(())
    }
}

/// Splits mount options into flags and file-system data.
fn options(opts: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in opts {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// The `/sys/block/<name>` entry whose `serial` is `serial`.
fn device_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|e| {
        let s = std::fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim_end_matches(['\n', '\0']) == serial)
            .then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// The size in sectors of the block device `dev` (a path), via `/sys/dev/block/M:m/size`.
fn device_sectors(dev: &Path) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(dev).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let rdev = md.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Resolves a layer's source to a device path and waits until it has a non-zero size.
pub async fn resolve_device(source: &str, wait: Duration) -> Result<PathBuf, TaskError> {
    let deadline = Instant::now() + wait;
    loop {
        let dev = match source.strip_prefix("blk:") {
            Some(serial) => {
                device_by_serial(Path::new(SYS_BLOCK), serial).map(|n| Path::new("/dev").join(n))
            }
            None => {
                let p = PathBuf::from(source);
                if !p.is_absolute() {
                    return Err(TaskError::invalid(
                        "rootfs",
                        format!("source {source:?} is neither an absolute path nor blk:<serial>"),
                    ));
                }
                Some(p)
            }
        };
        let sectors = dev.as_deref().and_then(device_sectors);
        match (dev, sectors) {
            (Some(d), Some(n)) if n > 0 => return Ok(d),
            (d, n) if Instant::now() >= deadline => {
                let why = match (d, n) {
                    (None, _) => "no block device has this serial".to_owned(),
                    (Some(d), None) => format!("{} is not a block device", d.display()),
                    (Some(d), Some(_)) => format!("{} has size 0", d.display()),
                };
                return Err(TaskError::RootfsDevice {
                    device: source.to_owned(),
                    reason: format!("{why} (waited {wait:?})"),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Checks the shape of `layers` (before anything is mounted).
pub fn validate(layers: &[LayerMount]) -> Result<(), TaskError> {
    for (i, l) in layers.iter().enumerate() {
        if !matches!(l.fstype.as_str(), "ext4" | "erofs") {
            return Err(TaskError::invalid(
                "rootfs",
                format!(
                    "mount {i} has type {:?}; the agent mounts ext4 and erofs block devices",
                    l.fstype
                ),
            ));
        }
        if !l.readonly() && i != 0 {
            return Err(TaskError::invalid(
                "rootfs",
                format!("mount {i} is writable; only the top (first) layer may be"),
            ));
        }
    }
    if layers.is_empty() {
        return Err(TaskError::invalid("rootfs", "no mounts"));
    }
    Ok(())
}

/// Resolves every layer's device (waiting up to `wait` in all).
pub async fn resolve_devices(
    layers: &[LayerMount],
    wait: Duration,
) -> Result<Vec<PathBuf>, TaskError> {
    validate(layers)?;
    let deadline = Instant::now() + wait;
    let mut devices = Vec::with_capacity(layers.len());
    for l in layers {
        let left = deadline.saturating_duration_since(Instant::now());
        devices.push(resolve_device(&l.source, left).await?);
    }
    Ok(devices)
}

/// Mounts `layers` (top first, on `devices` from [`resolve_devices`]) under `bundle` and
/// returns the mounts; the root file system is at `RootfsMounts::rootfs` (`<bundle>/rootfs`).
/// On failure nothing stays mounted.
pub fn mount_layers(
    bundle: &Path,
    layers: &[LayerMount],
    devices: &[PathBuf],
    root_readonly: bool,
) -> Result<RootfsMounts, TaskError> {
    validate(layers)?;
    let mut m = RootfsMounts {
        mounted: Vec::new(),
        rootfs: bundle.join("rootfs"),
    };
    let result = mount_all(&mut m, bundle, layers, devices, root_readonly);
    if let Err(e) = result {
        let _ = m.unmount();
        return Err(e);
    }
    Ok(m)
}

fn dev_str(d: &Path) -> Result<&str, TaskError> {
    d.to_str()
        .ok_or_else(|| TaskError::invalid("rootfs", format!("{} is not UTF-8", d.display())))
}

fn mount_all(
    m: &mut RootfsMounts,
    bundle: &Path,
    layers: &[LayerMount],
    devices: &[PathBuf],
    root_readonly: bool,
) -> Result<(), TaskError> {
    let rootfs = m.rootfs.clone();
    let (top, dev0) = match (layers.first(), devices.first()) {
        (Some(t), Some(d)) => (t, d),
        _ => return Err(TaskError::invalid("rootfs", "no mounts")),
    };
    let writable_top = !top.readonly();
    if writable_top && layers.len() == 1 {
        let (mut flags, data) = options(&top.options);
        if root_readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        return m.mount(dev_str(dev0)?, &rootfs, &top.fstype, flags, &data);
    }
    // Read-only layers, each under layers/<n>.
    let ro_start = usize::from(writable_top);
    let mut lowers = Vec::new();
    for (i, (l, d)) in layers.iter().zip(devices).enumerate().skip(ro_start) {
        let (flags, data) = options(&l.options);
        let target = bundle.join("layers").join(i.to_string());
        m.mount(
            dev_str(d)?,
            &target,
            &l.fstype,
            flags | MsFlags::MS_RDONLY,
            &data,
        )?;
        lowers.push(target);
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let scratch = bundle.join("scratch");
    if root_readonly && !writable_top {
        if let [only] = lowers.as_slice() {
            // One read-only layer: bind it.
            let only = only.clone();
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| TaskError::internal("Failed to create the rootfs dir", &e))?;
            mount(
                Some(&only),
                &rootfs,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| TaskError::invalid("rootfs", format!("bind {}: {e}", only.display())))?;
            m.mounted.push(rootfs);
            return Ok(());
        }
        return m.mount(
            "overlay",
            &rootfs,
            "overlay",
            MsFlags::MS_RDONLY,
            &format!("lowerdir={lowerdir}"),
        );
    }
    if writable_top {
        let (flags, data) = options(&top.options);
        m.mount(dev_str(dev0)?, &scratch, &top.fstype, flags, &data)?;
    } else {
        m.mount("tmpfs", &scratch, "tmpfs", MsFlags::empty(), "mode=0700")?;
    }
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d)
            .map_err(|e| TaskError::internal(&format!("Failed to create {}", d.display()), &e))?;
    }
    let flags = if root_readonly {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    m.mount(
        "overlay",
        &rootfs,
        "overlay",
        flags,
        &format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(fstype: &str, opts: &[&str]) -> LayerMount {
        LayerMount {
            fstype: fstype.into(),
            source: "/dev/null".into(),
            options: opts.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn option_split() {
        let (f, d) = options(&["ro".into(), "noatime".into(), "errors=remount-ro".into()]);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME));
        assert_eq!(d, "errors=remount-ro");
    }

    #[test]
    fn layer_shapes() {
        validate(&[layer("ext4", &[])]).unwrap();
        validate(&[
            layer("ext4", &[]),
            layer("erofs", &[]),
            layer("ext4", &["ro"]),
        ])
        .unwrap();
        let e = validate(&[layer("erofs", &[]), layer("ext4", &[])]).unwrap_err();
        assert!(e.to_string().contains("mount 1 is writable"), "{e}");
        let e = validate(&[layer("overlay", &[])]).unwrap_err();
        assert!(e.to_string().contains("\"overlay\""), "{e}");
        assert!(validate(&[]).is_err());
    }

    #[tokio::test]
    async fn serials_and_missing_devices() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "sbx-slot-0\n"), ("vdb", "sbx-slot-1")] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("serial"), serial).unwrap();
        }
        assert_eq!(
            device_by_serial(dir.path(), "sbx-slot-0").as_deref(),
            Some("vda")
        );
        assert_eq!(
            device_by_serial(dir.path(), "sbx-slot-1").as_deref(),
            Some("vdb")
        );
        assert_eq!(device_by_serial(dir.path(), "sbx-slot-2"), None);
        let e = resolve_device("blk:sbx-nope", Duration::from_millis(30))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
        assert!(e.to_string().contains("blk:sbx-nope"), "{e}");
        let e = resolve_device("/dev/null", Duration::ZERO)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a block device"), "{e}");
        let e = resolve_device("vda", Duration::ZERO).await.unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
    }
}
