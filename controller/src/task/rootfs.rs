// SPDX-License-Identifier: Apache-2.0
//! Container root filesystems as block images (there is no shared file system with the guest).
//!
//! [`plan`] reads `CreateTaskRequest.rootfs` (containerd's mounts) and decides:
//! - one mount of a block device or image file (`ext4`, `xfs`, `erofs`, or the `loop`
//!   option): attached as it is ([`RootfsPlan::Block`]);
//! - an overlay (containerd's overlayfs snapshotter: `lowerdir=a:b:c`, `upperdir=`,
//!   `workdir=`), or a read-only overlay of lowerdirs only ([`RootfsPlan::Layers`]): the
//!   immutable lower chain becomes one erofs image, shared through the [`ImageCache`] by
//!   every container with the same ordered lowerdir list; a non-empty upperdir becomes a
//!   per-container erofs layer on top (overlay whiteouts, char 0/0 devices, and the opaque
//!   xattrs are kept by `mkfs.erofs`);
//! - a bind mount of a directory, or no mount at all with `root.path` a host directory
//!   ([`RootfsPlan::Directory`]): a per-container erofs image.
//!
//! Read-only layers get a tmpfs upper in the guest (the agent does that), so a container's
//! writes stay in the VM.
//!
//! Images are built with `mkfs.erofs` (Debian's erofs-utils) into a temporary file that is
//! renamed into place; a lower chain of more than one directory is first mounted as a
//! read-only overlay in a private directory, so the image holds the merged view.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use containerd_shim_protos::api::Mount;
use devices::sync::Recover;

use super::error::TaskError;

/// File systems a block device or image file may hold.
const BLOCK_FS_TYPES: &[&str] = &["ext4", "ext3", "ext2", "xfs", "erofs"];
/// The kernel takes at most one page of mount options; stay below it.
const MAX_MOUNT_DATA: usize = 4000;

/// What to do with a container's rootfs mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsPlan {
    /// Attach this block device or image file as it is.
    Block {
        /// Device or file.
        path: PathBuf,
        /// File system type (for the guest's mount).
        fs_type: String,
        /// Attach and mount read-only.
        read_only: bool,
    },
    /// Overlay layers: the lower chain (top first) and the upper directory, if any.
    Layers {
        /// Lower directories, top first (overlay order).
        lowers: Vec<PathBuf>,
        /// The writable layer of the snapshot.
        upper: Option<PathBuf>,
    },
    /// A plain directory tree.
    Directory(PathBuf),
}

impl RootfsPlan {
    /// The host files and directories the plan opens.
    pub fn host_paths(&self) -> Vec<&Path> {
        match self {
            RootfsPlan::Block { path, .. } | RootfsPlan::Directory(path) => vec![path.as_path()],
            RootfsPlan::Layers { lowers, upper } => lowers
                .iter()
                .chain(upper.iter())
                .map(PathBuf::as_path)
                .collect(),
        }
    }
}

fn has_option(m: &Mount, name: &str) -> bool {
    m.options.iter().any(|o| o == name)
}

fn absolute_dir(field: &str, what: &str, p: &str) -> Result<PathBuf, TaskError> {
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(TaskError::invalid(
            field,
            format!("{what} {p:?} is not absolute"),
        ));
    }
    if p.contains([',', ':']) {
        return Err(TaskError::invalid(
            field,
            format!("{what} {p:?} contains ',' or ':'"),
        ));
    }
    if !path.is_dir() {
        return Err(TaskError::invalid(
            field,
            format!("{what} {p:?} is not a directory"),
        ));
    }
    Ok(path)
}

/// Decides how to turn `mounts` into block images. `root_dir` is the bundle's `root.path` as
/// a host path, used when there is no mount.
pub fn plan(mounts: &[Mount], root_dir: Option<&Path>) -> Result<RootfsPlan, TaskError> {
    let m = match mounts {
        [] => {
            let Some(dir) = root_dir.filter(|d| d.is_dir()) else {
                return Err(TaskError::invalid(
                    "rootfs",
                    "no mounts given and the bundle's root.path is not a directory",
                ));
            };
            return Ok(RootfsPlan::Directory(dir.to_owned()));
        }
        [m] => m,
        more => {
            return Err(TaskError::invalid(
                "rootfs",
                format!("{} mounts given; one is supported", more.len()),
            ));
        }
    };
    let field = "rootfs[0]";
    let fs_type = m.type_.as_str();
    if fs_type == "overlay" {
        let mut lowers = Vec::new();
        let mut upper = None;
        for opt in &m.options {
            if let Some(list) = opt.strip_prefix("lowerdir=") {
                for dir in list.split(':') {
                    lowers.push(absolute_dir(field, "lowerdir", dir)?);
                }
            } else if let Some(dir) = opt.strip_prefix("upperdir=") {
                upper = Some(absolute_dir(field, "upperdir", dir)?);
            }
        }
        if lowers.is_empty() {
            return Err(TaskError::invalid(field, "overlay without lowerdir"));
        }
        return Ok(RootfsPlan::Layers { lowers, upper });
    }
    if fs_type == "bind" || has_option(m, "bind") || has_option(m, "rbind") {
        return Ok(RootfsPlan::Directory(absolute_dir(
            field,
            "bind source",
            &m.source,
        )?));
    }
    if BLOCK_FS_TYPES.contains(&fs_type) {
        let path = PathBuf::from(&m.source);
        let meta = fs::metadata(&path).map_err(|e| {
            TaskError::invalid(field, format!("source {:?} cannot be used: {e}", m.source))
        })?;
        use std::os::unix::fs::FileTypeExt as _;
        let ok = meta.is_file() || (meta.file_type().is_block_device() && !has_option(m, "loop"));
        if !ok {
            return Err(TaskError::invalid(
                field,
                format!(
                    "source {:?} is neither a block device nor an image file",
                    m.source
                ),
            ));
        }
        return Ok(RootfsPlan::Block {
            path,
            fs_type: fs_type.to_owned(),
            // erofs cannot be written; the guest mounts it read-only whatever the options say.
            read_only: has_option(m, "ro") || fs_type == "erofs",
        });
    }
    Err(TaskError::invalid(
        field,
        format!(
            "mount type {fs_type:?} is not supported (block image, overlay or bind of a directory)"
        ),
    ))
}

/// Runs a command to completion; a failure carries its stderr.
fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(io::Error::other(format!(
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        stderr.trim()
    )))
}

/// Builds an erofs image of `dir` at `image` (through a temporary file next to it).
pub fn mkfs_erofs(dir: &Path, image: &Path) -> Result<(), TaskError> {
    let tmp = image.with_extension("tmp");
    let err = |source| TaskError::BuildImage {
        path: image.to_owned(),
        source,
    };
    let result = run(Command::new("mkfs.erofs").arg("--quiet").arg(&tmp).arg(dir))
        .and_then(|()| fs::rename(&tmp, image));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// The longest common parent directory of `paths` (all absolute).
fn common_parent(paths: &[PathBuf]) -> PathBuf {
    let mut common: Option<PathBuf> = None;
    for p in paths {
        let parent = p.parent().unwrap_or(p);
        common = Some(match common {
            None => parent.to_owned(),
            Some(c) => c
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    common.unwrap_or_else(|| PathBuf::from("/"))
}

/// The overlay `lowerdir=` option for `lowers`, and the directory the mount must run in when
/// the paths had to be made relative to fit the kernel's limit.
fn lowerdir_option(lowers: &[PathBuf]) -> io::Result<(String, Option<PathBuf>)> {
    let join = |paths: Vec<String>| format!("ro,lowerdir={}", paths.join(":"));
    let absolute = join(lowers.iter().map(|p| p.display().to_string()).collect());
    if absolute.len() <= MAX_MOUNT_DATA {
        return Ok((absolute, None));
    }
    let base = common_parent(lowers);
    let relative = join(
        lowers
            .iter()
            .map(|p| {
                p.strip_prefix(&base)
                    .map(|r| r.display().to_string())
                    .unwrap_or_default()
            })
            .collect(),
    );
    if relative.len() > MAX_MOUNT_DATA {
        return Err(io::Error::other(format!(
            "{} lower directories do not fit the overlay mount options",
            lowers.len()
        )));
    }
    Ok((relative, Some(base)))
}

/// Builds the erofs image of the merged view of `lowers` (top first) at `image`; `scratch` is
/// a private directory for the temporary overlay mount.
pub fn build_lower_image(
    lowers: &[PathBuf],
    image: &Path,
    scratch: &Path,
) -> Result<(), TaskError> {
    if let [single] = lowers {
        return mkfs_erofs(single, image);
    }
    let err = |source| TaskError::BuildImage {
        path: image.to_owned(),
        source,
    };
    let (options, cwd) = lowerdir_option(lowers).map_err(err)?;
    fs::create_dir_all(scratch).map_err(err)?;
    let mut mount = Command::new("mount");
    mount
        .args(["-t", "overlay", "overlay", "-o", &options])
        .arg(scratch);
    if let Some(dir) = cwd {
        mount.current_dir(dir);
    }
    run(&mut mount).map_err(err)?;
    let built = mkfs_erofs(scratch, image);
    let unmounted = run(Command::new("umount").arg(scratch))
        .or_else(|_| run(Command::new("umount").arg("-l").arg(scratch)));
    let _ = fs::remove_dir(scratch);
    built?;
    unmounted.map_err(err)
}

/// Whether `dir` has no entries (a fresh snapshot's upperdir).
pub fn dir_is_empty(dir: &Path) -> Result<bool, TaskError> {
    let mut entries = fs::read_dir(dir).map_err(|source| TaskError::Io {
        op: "read",
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries.next().is_none())
}

#[derive(Debug)]
struct CacheEntry {
    refs: usize,
    image: PathBuf,
    /// Held while the image is built; `true` once it exists.
    built: std::sync::Arc<tokio::sync::Mutex<bool>>,
}

/// Erofs images of lower chains, shared by every container (of every sandbox) with the same
/// ordered lowerdir list and removed when the last one lets go.
///
/// The key is the exact list: containerd never changes a committed snapshot and never reuses
/// its directory. Images do not outlive the process: [`ImageCache::new`] empties the
/// directory.
#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
    seq: AtomicU64,
    entries: Mutex<HashMap<Vec<PathBuf>, CacheEntry>>,
}

/// One reference to a cached image; give it back with [`ImageCache::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct CachedImage {
    key: Vec<PathBuf>,
    /// The image file.
    pub path: PathBuf,
}

/// FNV-1a, only to make image names recognisable (the cache key is the full list).
fn short_hash(paths: &[PathBuf]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in paths {
        for b in p.as_os_str().as_encoded_bytes().iter().chain(b":") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl CachedImage {
    /// The lower chain it was built of.
    pub fn lowers(&self) -> &[PathBuf] {
        &self.key
    }
}

impl ImageCache {
    /// A cache in `dir` (created with the first image; stale images of an earlier process are
    /// removed now).
    pub fn new(dir: &Path) -> Result<Self, TaskError> {
        Self::keeping(dir, &[])
    }

    /// [`ImageCache::new`], keeping the images in `keep` (those of containers a live upgrade
    /// hands over, [`ImageCache::adopt`]).
    pub fn keeping(dir: &Path, keep: &[PathBuf]) -> Result<Self, TaskError> {
        let io_err = |op, source| TaskError::Io {
            op,
            path: dir.to_owned(),
            source,
        };
        let entries = match fs::read_dir(dir) {
            Ok(entries) => Some(entries),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", e)),
        };
        for entry in entries.into_iter().flatten() {
            let path = entry.map_err(|e| io_err("read", e))?.path();
            if path.is_file() && !keep.contains(&path) {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            seq: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// The directory holding the images.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of images held (built or being built).
    pub fn len(&self) -> usize {
        self.entries.lock().recover().len()
    }

    /// Whether the cache holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// References held on the image of `lowers`, 0 if there is none.
    pub fn refs(&self, lowers: &[PathBuf]) -> usize {
        self.entries
            .lock()
            .recover()
            .get(lowers)
            .map_or(0, |e| e.refs)
    }

    /// Takes a reference on the image of `lowers`, building it first if needed (concurrent
    /// callers for the same chain wait for one build).
    pub async fn acquire(&self, lowers: &[PathBuf]) -> Result<CachedImage, TaskError> {
        let key = lowers.to_vec();
        let (image, built) = {
            let mut entries = self.entries.lock().recover();
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let entry = entries.entry(key.clone()).or_insert_with(|| CacheEntry {
                refs: 0,
                image: self
                    .dir
                    .join(format!("lower-{:016x}-{seq}.erofs", short_hash(lowers))),
                built: std::sync::Arc::default(),
            });
            entry.refs = entry.refs.saturating_add(1);
            (entry.image.clone(), entry.built.clone())
        };
        let mut done = built.lock().await;
        if !*done {
            let lowers2 = key.clone();
            let image2 = image.clone();
            let scratch = image.with_extension("mnt");
            let dir = self.dir.clone();
            let result = tokio::task::spawn_blocking(move || {
                fs::create_dir_all(&dir).map_err(|source| TaskError::BuildImage {
                    path: dir.clone(),
                    source,
                })?;
                build_lower_image(&lowers2, &image2, &scratch)
            })
            .await
            .unwrap_or_else(|e| {
                Err(TaskError::BuildImage {
                    path: image.clone(),
                    source: io::Error::other(e),
                })
            });
            if let Err(e) = result {
                drop(done);
                self.release(CachedImage {
                    key,
                    path: image.clone(),
                });
                return Err(e);
            }
            *done = true;
        }
        Ok(CachedImage { key, path: image })
    }

    /// Takes a reference on the built image `path` of `lowers` that another process made (a
    /// container handed over by a live upgrade).
    pub fn adopt(&self, lowers: Vec<PathBuf>, path: PathBuf) -> CachedImage {
        let mut entries = self.entries.lock().recover();
        let entry = entries.entry(lowers.clone()).or_insert_with(|| CacheEntry {
            refs: 0,
            image: path,
            built: std::sync::Arc::new(tokio::sync::Mutex::new(true)),
        });
        entry.refs = entry.refs.saturating_add(1);
        CachedImage {
            key: lowers,
            path: entry.image.clone(),
        }
    }

    /// Gives a reference back; the image is removed with the last one.
    pub fn release(&self, image: CachedImage) {
        let mut entries = self.entries.lock().recover();
        let Some(entry) = entries.get_mut(&image.key) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs == 0 {
            let entry = entries
                .remove(&image.key)
                .expect("present: looked up above");
            if let Err(e) = fs::remove_file(&entry.image)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("Removing unused image {}: {e}", entry.image.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(ty: &str, source: &str, options: &[&str]) -> Mount {
        let mut m = Mount::new();
        m.type_ = ty.to_owned();
        m.source = source.to_owned();
        m.options = options.iter().map(|s| (*s).to_owned()).collect();
        m
    }

    #[test]
    fn plans() {
        let tmp = tempfile::tempdir().unwrap();
        let d = |n: &str| {
            let p = tmp.path().join(n);
            fs::create_dir_all(&p).unwrap();
            p
        };
        let (l1, l2, up) = (d("l1"), d("l2"), d("up"));
        let lowerdir = format!("lowerdir={}:{}", l1.display(), l2.display());
        let upperdir = format!("upperdir={}", up.display());
        let p = plan(
            &[mount(
                "overlay",
                "overlay",
                &["index=off", &upperdir, "workdir=/w", &lowerdir],
            )],
            None,
        )
        .unwrap();
        assert_eq!(
            p,
            RootfsPlan::Layers {
                lowers: vec![l1.clone(), l2.clone()],
                upper: Some(up.clone())
            }
        );
        let p = plan(&[mount("overlay", "overlay", &[&lowerdir])], None).unwrap();
        assert!(matches!(p, RootfsPlan::Layers { upper: None, .. }));
        let p = plan(
            &[mount("bind", &l1.display().to_string(), &["rbind", "rw"])],
            None,
        )
        .unwrap();
        assert_eq!(p, RootfsPlan::Directory(l1.clone()));
        let img = tmp.path().join("disk.img");
        fs::write(&img, b"x").unwrap();
        let p = plan(
            &[mount("ext4", &img.display().to_string(), &["loop", "ro"])],
            None,
        )
        .unwrap();
        assert_eq!(
            p,
            RootfsPlan::Block {
                path: img.clone(),
                fs_type: "ext4".into(),
                read_only: true
            }
        );
        let p = plan(&[mount("erofs", &img.display().to_string(), &[])], None).unwrap();
        assert!(matches!(
            p,
            RootfsPlan::Block {
                read_only: true,
                ..
            }
        ));
        let p = plan(&[], Some(&l2)).unwrap();
        assert_eq!(p, RootfsPlan::Directory(l2.clone()));

        let bad = |mounts: &[Mount], root: Option<&Path>, want: &str| {
            let e = plan(mounts, root).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
            assert!(e.to_string().contains(want), "{e} should contain {want}");
        };
        bad(&[], None, "no mounts given");
        bad(&[], Some(&tmp.path().join("nope")), "no mounts given");
        let m = mount("overlay", "overlay", &[&lowerdir]);
        bad(&[m.clone(), m], None, "2 mounts given");
        bad(
            &[mount("overlay", "overlay", &[&upperdir])],
            None,
            "without lowerdir",
        );
        bad(
            &[mount("overlay", "overlay", &["lowerdir=rel/dir"])],
            None,
            "is not absolute",
        );
        bad(
            &[mount("overlay", "overlay", &["lowerdir=/no/such/dir"])],
            None,
            "is not a directory",
        );
        bad(
            &[mount("ext4", &l1.display().to_string(), &[])],
            None,
            "neither a block device nor an image file",
        );
        bad(
            &[mount("ext4", "/no/such/image", &[])],
            None,
            "cannot be used",
        );
        bad(
            &[mount("nfs", "host:/x", &[])],
            None,
            "\"nfs\" is not supported",
        );
        bad(
            &[mount("bind", &img.display().to_string(), &["rbind"])],
            None,
            "is not a directory",
        );
    }

    #[test]
    fn long_lowerdir_lists_become_relative() {
        let lowers: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("/var/lib/containerd/snapshots/{i}/fs")))
            .collect();
        let (opt, cwd) = lowerdir_option(&lowers[..3]).unwrap();
        assert_eq!(
            opt,
            "ro,lowerdir=/var/lib/containerd/snapshots/0/fs:/var/lib/containerd/snapshots/1/fs:\
             /var/lib/containerd/snapshots/2/fs"
        );
        assert!(cwd.is_none());
        let (opt, cwd) = lowerdir_option(&lowers).unwrap();
        assert_eq!(cwd.unwrap(), Path::new("/var/lib/containerd/snapshots"));
        assert!(opt.starts_with("ro,lowerdir=0/fs:1/fs:"), "{opt}");
        assert!(opt.len() <= MAX_MOUNT_DATA);
        let too_many: Vec<PathBuf> = (0..2000)
            .map(|i| PathBuf::from(format!("/s/{i}/fs")))
            .collect();
        lowerdir_option(&too_many).unwrap_err();
    }

    #[test]
    fn short_hash_depends_on_order() {
        let a = [PathBuf::from("/a"), PathBuf::from("/b")];
        let b = [PathBuf::from("/b"), PathBuf::from("/a")];
        assert_ne!(short_hash(&a), short_hash(&b));
        assert_eq!(short_hash(&a), short_hash(&a.clone()));
    }

    fn have_mkfs_erofs() -> bool {
        Command::new("mkfs.erofs").output().is_ok()
    }

    #[tokio::test]
    async fn cache_shares_and_frees_single_layer_images() {
        if !have_mkfs_erofs() {
            // Under CI (where tests/setup installs erofs-utils) a missing tool is a failure.
            let required = std::env::var("CI").is_ok_and(|v| v == "true")
                || std::env::var("SANDBOXER_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "no mkfs.erofs (required: CI=true or SANDBOXER_REQUIRE_TOOLS=1)"
            );
            eprintln!("SKIP cache_shares_and_frees_single_layer_images: no mkfs.erofs");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        fs::create_dir_all(layer.join("etc")).unwrap();
        fs::write(layer.join("etc/hello"), b"hi").unwrap();
        let cache_dir = tmp.path().join("cache");
        fs::create_dir_all(&cache_dir).unwrap();
        fs::write(cache_dir.join("stale.erofs"), b"old").unwrap();
        let cache = ImageCache::new(&cache_dir).unwrap();
        assert!(!cache_dir.join("stale.erofs").exists());
        let lowers = vec![layer.clone()];
        let a = cache.acquire(&lowers).await.unwrap();
        let b = cache.acquire(&lowers).await.unwrap();
        assert_eq!(a.path, b.path);
        assert_eq!(cache.refs(&lowers), 2);
        let image = fs::read(&a.path).unwrap();
        // The erofs super block magic at offset 1024.
        assert_eq!(
            image.get(1024..1028),
            Some(&0xE0F5_E1E2u32.to_le_bytes()[..])
        );
        let path = a.path.clone();
        cache.release(a);
        assert!(path.exists());
        cache.release(b);
        assert!(!path.exists());
        assert!(cache.is_empty());
        // A failed build leaves no reference and no file behind.
        let e = cache
            .acquire(&[tmp.path().join("missing")])
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INTERNAL);
        assert!(cache.is_empty());
        assert_eq!(fs::read_dir(&cache_dir).unwrap().count(), 0);
    }
}
