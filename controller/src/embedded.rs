// SPDX-License-Identifier: Apache-2.0
//! The guest kernel and the agent initramfs a single-binary `sandboxer` carries
//! (`tools/devtool dist`, see `build.rs`). With `vm.kernel` or `vm.initramfs` left empty the
//! daemon unpacks the embedded one once at start into a sealed memfd and boots VMs from it:
//! nothing is written to disk and nothing can change it while the daemon runs.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::LazyLock;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MemFdCreateFlag, memfd_create};

mod versions {
    include!(concat!(env!("OUT_DIR"), "/embedded_versions.rs"));
}

static KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernel.img"));
static INITRAMFS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/initramfs.img"));

/// The first four bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// One artefact built into this binary.
#[derive(Clone, Copy, Debug)]
pub struct Artifact {
    /// What it is, for messages ("guest kernel", "agent initramfs").
    pub what: &'static str,
    /// The version the build recorded for it.
    pub version: &'static str,
    data: &'static [u8],
}

/// The guest kernel this binary carries, if any.
pub fn kernel() -> Option<Artifact> {
    artifact("guest kernel", versions::KERNEL_VERSION, KERNEL)
}

/// The agent initramfs this binary carries, if any.
pub fn initramfs() -> Option<Artifact> {
    artifact("agent initramfs", versions::AGENT_VERSION, INITRAMFS)
}

fn artifact(what: &'static str, version: &'static str, data: &'static [u8]) -> Option<Artifact> {
    (!data.is_empty()).then_some(Artifact {
        what,
        version,
        data,
    })
}

impl Artifact {
    /// Whether it is stored zstd-compressed.
    pub fn is_compressed(&self) -> bool {
        self.data.starts_with(&ZSTD_MAGIC)
    }

    /// Its size inside the binary.
    pub fn stored_len(&self) -> usize {
        self.data.len()
    }

    /// An artefact of `data`, for tests of code that uses one.
    #[cfg(test)]
    pub(crate) fn for_test(what: &'static str, data: &'static [u8]) -> Artifact {
        Artifact {
            what,
            version: "test",
            data,
        }
    }

    /// Unpacks it into a new memfd named after `name`, sealed against any change.
    pub fn unpack(&self, name: &str) -> io::Result<Unpacked> {
        unpack_into(self.data, name)
    }
}

/// An unpacked artefact: a sealed memfd that lives as long as this value.
#[derive(Debug)]
pub struct Unpacked {
    file: File,
    len: u64,
}

impl Unpacked {
    /// A path that opens the memfd (for code that takes paths, such as the kernel loader).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Its unpacked size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty (never, for what [`Artifact::unpack`] returns).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn unpack_into(data: &[u8], name: &str) -> io::Result<Unpacked> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd name contains NUL"))?;
    let fd = memfd_create(
        &cname,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    let len = if data.starts_with(&ZSTD_MAGIC) {
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = decoder.read(&mut buf)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])?;
            total += n as u64;
        }
        total
    } else {
        file.write_all(data)?;
        data.len() as u64
    };
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} unpacks to nothing"),
        ));
    }
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    Ok(Unpacked { file, len })
}

/// `sandboxer --version`: the daemon's version and what it carries.
pub static LONG_VERSION: LazyLock<String> = LazyLock::new(|| {
    let line = |what: &str, a: Option<Artifact>, instead: &str| match a {
        Some(a) => format!(
            "{what}: {} ({:.1} MiB{})",
            a.version,
            a.stored_len() as f64 / f64::from(1 << 20),
            if a.is_compressed() { " zstd" } else { "" }
        ),
        None => format!("{what}: none embedded ({instead})"),
    };
    format!(
        "{}\n{}\n{}",
        env!("CARGO_PKG_VERSION"),
        line("guest kernel", kernel(), "vm.kernel names one"),
        line("agent", initramfs(), "vm.initramfs names one"),
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(u: &Unpacked) -> Vec<u8> {
        std::fs::read(u.path()).unwrap()
    }

    #[test]
    fn plain_data_is_copied_and_sealed() {
        let u = unpack_into(b"070701 cpio", "plain").unwrap();
        assert_eq!(u.len(), 11);
        assert_eq!(read_back(&u), b"070701 cpio");
        // Sealed: opening it for writing works, writing does not.
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(u.path())
            .unwrap();
        let err = w.write_all(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EPERM as i32));
    }

    #[test]
    fn zstd_data_is_unpacked() {
        // A zstd frame of "hello hello hello\n" made with `zstd -19`.
        let frame: &[u8] = &[
            0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x68, 0x6d, 0x00, 0x00, 0x38, 0x68, 0x65, 0x6c, 0x6c,
            0x6f, 0x20, 0x0a, 0x01, 0x00, 0x31, 0x4a, 0x11, 0xa3, 0xaa, 0x74, 0xce,
        ];
        let u = unpack_into(frame, "zstd").unwrap();
        assert_eq!(read_back(&u), b"hello hello hello\n");
    }

    #[test]
    fn corrupt_zstd_is_an_error() {
        let err = unpack_into(&[0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff], "bad").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn version_names_both_pieces() {
        let v = LONG_VERSION.as_str();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
        assert!(v.contains("\nguest kernel: "), "{v}");
        assert!(v.contains("\nagent: "), "{v}");
    }
}
