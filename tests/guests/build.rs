// SPDX-License-Identifier: Apache-2.0
//! Builds the purpose-built test guests and exports their paths to `src/lib.rs`.
//!
//! `firmware/` is a `no_std` crate with its own `[workspace]` (excluded from the outer one),
//! built here by a nested `cargo build --release --target x86_64-unknown-none` into
//! `$OUT_DIR/firmware-target-<hash of its path>`: never the outer target dir, whose lock the outer cargo holds.
//! The nested cargo gets a clean environment: flags and wrappers meant for the host build
//! (clippy's `RUSTC_WORKSPACE_WRAPPER`, `CARGO_ENCODED_RUSTFLAGS`, `CARGO_TARGET_DIR`, ...)
//! would break or redirect it.
//!
//! From the `long64` ELF it then writes `long64.bzImage`: a Linux boot protocol image (boot
//! sector + setup header, no real-mode code) whose protected-mode payload is the flat image of
//! the ELF's loadable segments from 0x100000, so the 64-bit entry at 0x100200 sits at payload
//! offset 0x200.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Target triple of the guests.
const TARGET: &str = "x86_64-unknown-none";
/// Guest binaries and the env var carrying each ELF path.
const GUESTS: [(&str, &str); 7] = [
    ("pvh32", "TEST_GUEST_PVH32"),
    ("quick", "TEST_GUEST_QUICK"),
    ("long64", "TEST_GUEST_LONG64"),
    ("smp", "TEST_GUEST_SMP"),
    ("reset", "TEST_GUEST_RESET"),
    ("spin", "TEST_GUEST_SPIN"),
    ("virtio", "TEST_GUEST_VIRTIO"),
];
/// Env var carrying the bzImage path.
const BZIMAGE_ENV: &str = "TEST_GUEST_LONG64_BZIMAGE";
/// Where the guests are linked (layout::HIMEM_START) and the bzImage payload is loaded.
const LOAD_ADDR: u64 = 0x10_0000;
/// The Linux 64-bit entry is at load address + 0x200.
const ENTRY64: u64 = LOAD_ADDR + 0x200;
/// Setup sectors after the boot sector: one holds the rest of the setup header.
const SETUP_SECTS: u8 = 1;
/// Boot protocol version 2.12, the first with `xloadflags`.
const BOOT_PROTOCOL_VERSION: u16 = 0x020c;

/// Why the guests could not be built.
enum BuildError {
    Env(&'static str),
    SpawnCargo(std::io::Error),
    NestedBuild(std::process::ExitStatus),
    Read(PathBuf, std::io::Error),
    Write(PathBuf, std::io::Error),
    BadElf(&'static str),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "{var} is not set"),
            Self::SpawnCargo(e) => write!(f, "cannot run cargo for the test guests: {e}"),
            Self::NestedBuild(status) => write!(
                f,
                "building tests/guests/firmware failed ({status}); is the {TARGET} target \
                 installed (`rustup target add {TARGET}`)?"
            ),
            Self::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            Self::Write(p, e) => write!(f, "cannot write {}: {e}", p.display()),
            Self::BadElf(why) => write!(f, "long64 ELF unusable for a bzImage: {why}"),
        }
    }
}

// `main` returning `Err` prints the `Debug` form: make it the readable message.
impl fmt::Debug for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn main() -> Result<(), BuildError> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or(BuildError::Env("CARGO_MANIFEST_DIR"))?,
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or(BuildError::Env("OUT_DIR"))?);
    let firmware = manifest_dir.join("firmware");
    for input in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "linker.ld",
        ".cargo",
    ] {
        println!("cargo:rerun-if-changed={}", firmware.join(input).display());
    }

    // Keyed by the firmware's path: the firmware's own build script writes that absolute path
    // into its link arguments, and cargo would reuse that output for a checkout elsewhere
    // that shares this OUT_DIR (seen with two checkouts of the workspace on one target dir).
    let target_dir = out_dir.join(format!("firmware-target-{:016x}", path_hash(&firmware)));
    build_firmware(&firmware, &target_dir)?;

    let bin_dir = target_dir.join(TARGET).join("release");
    for (name, var) in GUESTS {
        println!("cargo:rustc-env={var}={}", bin_dir.join(name).display());
    }

    let elf_path = bin_dir.join("long64");
    let elf = std::fs::read(&elf_path).map_err(|e| BuildError::Read(elf_path, e))?;
    let bzimage = make_bzimage(&elf)?;
    let bz_path = out_dir.join("long64.bzImage");
    std::fs::write(&bz_path, bzimage).map_err(|e| BuildError::Write(bz_path.clone(), e))?;
    println!("cargo:rustc-env={BZIMAGE_ENV}={}", bz_path.display());
    Ok(())
}

/// Whether an inherited variable must not reach the nested cargo.
fn is_host_build_var(key: &str) -> bool {
    const DROP: [&str; 16] = [
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
        "MAKEFLAGS",
        "MFLAGS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
    ];
    // Every CARGO_* (CARGO_ENCODED_RUSTFLAGS, CARGO_TARGET_DIR, CARGO_BUILD_*, CARGO_PROFILE_*,
    // CARGO_CFG_*, CARGO_FEATURE_*, CARGO_MAKEFLAGS, CARGO_PKG_*, ...) but CARGO_HOME.
    (key.starts_with("CARGO_") && key != "CARGO_HOME")
        || key.starts_with("__CARGO")
        || key.starts_with("DEP_")
        || DROP.contains(&key)
}

fn build_firmware(firmware: &Path, target_dir: &Path) -> Result<(), BuildError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    // The firmware's own .cargo/config.toml (relocation model) is found from its directory.
    cmd.current_dir(firmware)
        .args([
            "build",
            "--release",
            "--offline",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(target_dir)
        // Cargo reads `cargo:` lines from our stdout: keep the nested output on stderr.
        .stdout(std::io::stderr());
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_host_build_var) {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().map_err(BuildError::SpawnCargo)?;
    if status.success() {
        Ok(())
    } else {
        Err(BuildError::NestedBuild(status))
    }
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn to_usize(v: u64) -> Result<usize, BuildError> {
    usize::try_from(v).map_err(|_| BuildError::BadElf("value does not fit usize"))
}

/// One `PT_LOAD` segment: physical address, file bytes, memory size.
struct Segment<'a> {
    paddr: u64,
    data: &'a [u8],
    memsz: u64,
}

fn load_segments(elf: &[u8]) -> Result<(u64, Vec<Segment<'_>>), BuildError> {
    let bad = BuildError::BadElf;
    if elf.get(..4) != Some(b"\x7fELF".as_slice())
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
    {
        return Err(bad("not a little-endian ELF64"));
    }
    let entry = le_u64(elf, 0x18).ok_or(bad("truncated header"))?;
    let phoff = to_usize(le_u64(elf, 0x20).ok_or(bad("truncated header"))?)?;
    let phentsize = usize::from(le_u16(elf, 0x36).ok_or(bad("truncated header"))?);
    let phnum = usize::from(le_u16(elf, 0x38).ok_or(bad("truncated header"))?);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(bad("program header offset overflows"))?;
        let field = |off: usize| le_u64(elf, ph + off).ok_or(bad("truncated program header"));
        if le_u32(elf, ph).ok_or(bad("truncated program header"))? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) = (field(8)?, field(24)?, field(32)?, field(40)?);
        let start = to_usize(offset)?;
        let end = start
            .checked_add(to_usize(filesz)?)
            .ok_or(bad("segment overflows"))?;
        let data = elf.get(start..end).ok_or(bad("segment outside the file"))?;
        segments.push(Segment { paddr, data, memsz });
    }
    Ok((entry, segments))
}

/// Builds a Linux boot protocol image around the flat image of the ELF's loadable segments.
fn make_bzimage(elf: &[u8]) -> Result<Vec<u8>, BuildError> {
    let bad = BuildError::BadElf;
    let (entry, segments) = load_segments(elf)?;
    if entry != ENTRY64 {
        return Err(bad("entry is not load address + 0x200"));
    }
    let start = segments
        .iter()
        .map(|s| s.paddr)
        .min()
        .ok_or(bad("no PT_LOAD"))?;
    if start != LOAD_ADDR {
        return Err(bad("lowest PT_LOAD is not at 0x100000"));
    }
    let mut file_end = start;
    let mut mem_end = start;
    for s in &segments {
        let len = u64::try_from(s.data.len()).map_err(|_| bad("segment too large"))?;
        file_end = file_end.max(s.paddr.checked_add(len).ok_or(bad("segment overflows"))?);
        mem_end = mem_end.max(
            s.paddr
                .checked_add(s.memsz)
                .ok_or(bad("segment overflows"))?,
        );
    }
    let mut payload = vec![0u8; to_usize(file_end - start)?];
    for s in &segments {
        let at = to_usize(s.paddr - start)?;
        payload
            .get_mut(at..at + s.data.len())
            .ok_or(bad("segment outside the image"))?
            .copy_from_slice(s.data);
    }

    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut image = vec![0u8; setup_len];
    let payload_len = u32::try_from(payload.len()).map_err(|_| bad("image too large"))?;
    let init_size = u32::try_from((mem_end - start).next_multiple_of(4096))
        .map_err(|_| bad("image too large"))?;
    let mut put = |at: usize, bytes: &[u8]| image[at..at + bytes.len()].copy_from_slice(bytes);
    // Offsets and fields: Documentation/arch/x86/boot.rst, "The real-mode kernel header".
    put(0x1f1, &[SETUP_SECTS]); // setup_sects
    put(0x1f4, &payload_len.div_ceil(16).to_le_bytes()); // syssize, 16-byte units
    put(0x1fa, &0xffffu16.to_le_bytes()); // vid_mode: normal
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x200, &[0xeb, 0x6a]); // jump: short jmp to 0x26c, a parking loop
    put(0x202, b"HdrS"); // header magic
    put(0x206, &BOOT_PROTOCOL_VERSION.to_le_bytes()); // version
    put(0x20e, &0x100u16.to_le_bytes()); // kernel_version: string at 0x200 + 0x100
    put(0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(0x212, &0x8000u16.to_le_bytes()); // setup_move_size
    put(0x214, &u32::try_from(LOAD_ADDR).unwrap_or(0).to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &0x10_0000u32.to_le_bytes()); // kernel_alignment
    put(0x234, &[0]); // relocatable_kernel: no, it runs at 0x100000
    put(0x235, &[12]); // min_alignment (log2)
    put(0x236, &0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &4095u32.to_le_bytes()); // cmdline_size
    put(0x258, &LOAD_ADDR.to_le_bytes()); // pref_address
    put(0x260, &init_size.to_le_bytes()); // init_size
    // Real-mode parking loop for a loader that would run the setup code: cli; hlt; jmp hlt.
    put(0x26c, &[0xfa, 0xf4, 0xeb, 0xfd]);
    put(0x300, b"sandboxer test guest long64\0");
    image.extend_from_slice(&payload);
    Ok(image)
}

/// FNV-1a of a path's bytes: a short, stable directory suffix.
fn path_hash(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}
