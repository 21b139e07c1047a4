// SPDX-License-Identifier: Apache-2.0
//! Stripping the agent before it goes into an initramfs.
//!
//! The release profile keeps line tables (useful for the host daemon's backtraces), which make
//! the static agent about 8x bigger (61 MB instead of 8 MB), and the kernel copies and unpacks
//! every byte of the initramfs at each boot (kernel load 64 ms -> 18 ms). Every initramfs is
//! packed by `mkinitramfs`, which strips `/init` through [`read_init`]: that is the one place
//! the agent gets stripped. The work is done by binutils' `strip` (`build-essential`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The program that strips.
pub const STRIP: &str = "strip";

/// Errors reading or stripping the init binary.
#[derive(Debug, thiserror::Error)]
pub enum StripError {
    /// The binary could not be read.
    #[error("Failed to read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not an ELF binary.
    #[error("{0} is not an ELF binary")]
    NotElf(PathBuf),
    /// `strip` could not be run.
    #[error("Failed to run {STRIP} (binutils)")]
    Spawn(#[source] std::io::Error),
    /// `strip` failed.
    #[error("{STRIP} failed on {0}: {1}")]
    Failed(PathBuf, String),
}

/// Whether `bytes` start like an ELF file.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.get(..4) == Some(b"\x7fELF".as_slice())
}

/// A temporary file removed on drop.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `path` with its symbols and debug information removed (`strip --strip-all`); the file
/// itself is left as it is.
pub fn stripped(path: &Path) -> Result<Vec<u8>, StripError> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let tmp = TempPath(std::env::temp_dir().join(format!(
        "sandboxer-strip-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )));
    let out = Command::new(STRIP)
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp.0)
        .arg(path)
        .output()
        .map_err(StripError::Spawn)?;
    if !out.status.success() {
        return Err(StripError::Failed(
            path.to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    std::fs::read(&tmp.0).map_err(|e| StripError::Read(tmp.0.clone(), e))
}

/// Reads the init binary for an initramfs: checks that it is ELF and, if `strip`, returns it
/// stripped.
pub fn read_init(path: &Path, strip: bool) -> Result<Vec<u8>, StripError> {
    let bytes = std::fs::read(path).map_err(|e| StripError::Read(path.to_owned(), e))?;
    if !is_elf(&bytes) {
        return Err(StripError::NotElf(path.to_owned()));
    }
    if strip { stripped(path) } else { Ok(bytes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself is an unstripped ELF file (dev profile: full debug info).
    fn me() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    fn have_strip() -> bool {
        Command::new(STRIP).arg("--version").output().is_ok()
    }

    #[test]
    fn strips_an_elf_binary() {
        if !have_strip() {
            crate::skip_without_tool(
                "strips_an_elf_binary",
                &format!("no {STRIP} (apt-get install binutils)"),
            );
            return;
        }
        let full = read_init(&me(), false).unwrap();
        let small = read_init(&me(), true).unwrap();
        assert!(is_elf(&small));
        assert!(
            small.len() * 2 < full.len(),
            "stripped {} bytes, unstripped {}",
            small.len(),
            full.len()
        );
        // Stripping a stripped binary changes nothing.
        let dir = tempfile::tempdir().unwrap();
        let once = dir.path().join("once");
        std::fs::write(&once, &small).unwrap();
        assert_eq!(stripped(&once).unwrap(), small);
    }

    #[test]
    fn refuses_what_is_not_elf() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("init.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(matches!(
            read_init(&script, true),
            Err(StripError::NotElf(_))
        ));
        assert!(matches!(
            read_init(&dir.path().join("missing"), false),
            Err(StripError::Read(..))
        ));
    }
}
