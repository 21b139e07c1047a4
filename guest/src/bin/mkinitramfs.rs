// SPDX-License-Identifier: Apache-2.0
//! `mkinitramfs`: packs a static binary as `/init` into an initramfs (newc cpio, optionally
//! gzip-compressed), with `/dev`, `/proc`, `/sys`, `/run`, `/tmp`, `/mnt`, `/dev/console` and
//! `/dev/null`. The binary is stripped on the way in (see [`guest::strip`]) unless
//! `--no-strip` is given: every script that packs an initramfs goes through here.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use guest::initramfs::{self, Compression};

/// Build an initramfs whose /init is the given static binary.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The static binary to install as /init.
    #[arg(long)]
    init: PathBuf,
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
    /// gzip-compress the archive (the kernel needs CONFIG_RD_GZIP).
    #[arg(long)]
    gzip: bool,
    /// Keep the binary's symbols and debug information (by default they are stripped: the
    /// kernel unpacks every byte at each boot).
    #[arg(long)]
    no_strip: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let init = guest::strip::read_init(&args.init, !args.no_strip)?;
    let compression = if args.gzip {
        Compression::Gzip
    } else {
        Compression::None
    };
    let image = initramfs::build(&init, compression).context("Failed to build the initramfs")?;
    // Write next to the target, then rename, so a reader never sees a partial image.
    let mut tmp = args.output.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, &image).with_context(|| format!("Failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("Failed to rename to {}", args.output.display()))?;
    println!("{} ({} bytes)", args.output.display(), image.len());
    Ok(())
}
