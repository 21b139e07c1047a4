// SPDX-License-Identifier: Apache-2.0
//! `mkl1initramfs`: packs the L1 initramfs (uncompressed newc cpio, with the `guest` crate's
//! writer): `/init`, the base directories and device nodes, and any number of files and links.
//!
//! ```text
//! mkl1initramfs --output FILE --init BIN [--file SRC=DST[:MODE]]... [--link DST=TARGET]...
//! ```
//! `DST` is a path inside the archive (parents are created), `MODE` octal (default 0755).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use guest::cpio::{CpioWriter, DeviceKind, Metadata};

/// Directories every L1 needs before its init runs.
const BASE_DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("tests", 0o755),
];

#[derive(Debug, Default)]
struct Args {
    output: Option<PathBuf>,
    init: Option<PathBuf>,
    files: Vec<(PathBuf, String, u32)>,
    links: Vec<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--output" => args.output = Some(value()?.into()),
            "--init" => args.init = Some(value()?.into()),
            "--file" => {
                let v = value()?;
                let (src, rest) = v
                    .split_once('=')
                    .ok_or(format!("--file {v}: expected SRC=DST[:MODE]"))?;
                let (dst, mode) = match rest.split_once(':') {
                    Some((dst, mode)) => (
                        dst,
                        u32::from_str_radix(mode, 8).map_err(|_| format!("bad mode in {v}"))?,
                    ),
                    None => (rest, 0o755),
                };
                args.files.push((src.into(), clean(dst)?, mode));
            }
            "--link" => {
                let v = value()?;
                let (dst, target) = v
                    .split_once('=')
                    .ok_or(format!("--link {v}: expected DST=TARGET"))?;
                args.links.push((clean(dst)?, target.to_owned()));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// An archive path without leading `/`, `.` or `..` components.
fn clean(path: &str) -> Result<String, String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(format!("bad archive path {path:?}"));
    }
    Ok(parts.join("/"))
}

/// Adds the missing parent directories of `path`.
fn add_parents<W: std::io::Write>(
    w: &mut CpioWriter<W>,
    dirs: &mut BTreeSet<String>,
    path: &str,
) -> Result<(), String> {
    let mut parent = String::new();
    let comps: Vec<&str> = path.split('/').collect();
    for comp in comps.iter().take(comps.len().saturating_sub(1)) {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(comp);
        if dirs.insert(parent.clone()) {
            w.add_dir(&parent, Metadata::new(0o755))
                .map_err(|e| format!("{parent}: {e}"))?;
        }
    }
    Ok(())
}

fn add_file<W: std::io::Write>(
    w: &mut CpioWriter<W>,
    src: &PathBuf,
    dst: &str,
    mode: u32,
) -> Result<(), String> {
    let file = File::open(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", src.display()))?
        .len();
    w.add_file_from_reader(dst, Metadata::new(mode), len, file)
        .map_err(|e| format!("{dst}: {e}"))
}

fn build(args: &Args) -> Result<u64, String> {
    let output = args.output.as_ref().ok_or("--output is required")?;
    let init = args.init.as_ref().ok_or("--init is required")?;
    let mut tmp = output.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let out = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut w = CpioWriter::new(BufWriter::new(out));
    let mut dirs = BTreeSet::new();
    for (dir, mode) in BASE_DIRS {
        w.add_dir(dir, Metadata::new(*mode))
            .map_err(|e| format!("{dir}: {e}"))?;
        dirs.insert((*dir).to_owned());
    }
    w.add_device("dev/console", DeviceKind::Char, 5, 1, Metadata::new(0o600))
        .map_err(|e| format!("dev/console: {e}"))?;
    w.add_device("dev/null", DeviceKind::Char, 1, 3, Metadata::new(0o666))
        .map_err(|e| format!("dev/null: {e}"))?;
    add_file(&mut w, init, "init", 0o755)?;
    for (src, dst, mode) in &args.files {
        add_parents(&mut w, &mut dirs, dst)?;
        add_file(&mut w, src, dst, *mode)?;
    }
    for (dst, target) in &args.links {
        add_parents(&mut w, &mut dirs, dst)?;
        w.add_symlink(dst, target, Metadata::new(0o777))
            .map_err(|e| format!("{dst}: {e}"))?;
    }
    let size = w.bytes_written();
    let mut buf = w.finish().map_err(|e| format!("finish: {e}"))?;
    std::io::Write::flush(&mut buf).map_err(|e| format!("{}: {e}", tmp.display()))?;
    drop(buf);
    std::fs::rename(&tmp, output).map_err(|e| format!("{}: {e}", output.display()))?;
    Ok(size)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        let size = build(&args)?;
        Ok((args, size))
    });
    match result {
        Ok((args, size)) => {
            if let Some(out) = args.output {
                println!("{} ({size} bytes)", out.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mkl1initramfs: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_are_cleaned() {
        assert_eq!(clean("/guest//vmlinux").unwrap(), "guest/vmlinux");
        assert!(clean("/").is_err());
        assert!(clean("a/../b").is_err());
    }
}
