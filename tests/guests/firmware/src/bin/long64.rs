// SPDX-License-Identifier: Apache-2.0
//! `long64`: PVH (32-bit entry, own GDT and page tables) or Linux 64-bit boot (0x100200) into
//! long mode, then prints its boot information and checks the top page of low RAM.
//!
//! Console: `long64: hello (pvh|linux64)`, `cmdline: <cmdline>`,
//! `memmap: <n> entries, <ram> KiB`, `memtest: ok` (or `memtest: FAIL ...`), boot-timer write,
//! `long64: bye`, triple fault. A bad start_info prints `long64: bad start_info magic` instead
//! of the three middle lines.
#![no_std]
#![no_main]

use firmware::boot::image_end;
use firmware::phys::{self, MAPPED_END};
use firmware::{Boot, BootInfo, BootProtocol, Serial, exit, print, println};

firmware::guest_main!(main);

const PAGE: u64 = 4096;
const LINE: usize = 64;

fn main(boot: &Boot) -> ! {
    match boot.protocol {
        BootProtocol::Pvh => println!("long64: hello (pvh)"),
        BootProtocol::Linux64 => println!("long64: hello (linux64)"),
    }
    match boot.info() {
        Ok(info) => report(&info),
        Err(e) => println!("long64: {e}"),
    }
    exit::signal_boot_timer();
    println!("long64: bye");
    exit::triple_fault()
}

fn report(info: &BootInfo) {
    print!("cmdline: ");
    Serial.write_iter(info.cmdline.bytes());
    println!();
    println!(
        "memmap: {} entries, {} KiB",
        info.memmap.len(),
        info.memmap.ram_bytes() / 1024
    );
    match memtest(info) {
        Ok(()) => println!("memtest: ok"),
        Err(why) => println!("memtest: FAIL {why}"),
    }
}

/// Writes an address-dependent pattern into the last 4 KiB of the highest RAM below 4 GiB (and
/// so below the MMIO gap), one word per 64-byte line, and reads it back. (Every line, not every
/// word: guest instructions cost about 1 us each on the project's nested kvm_pvm host.)
fn memtest(info: &BootInfo) -> Result<(), &'static str> {
    let (start, end) = info
        .memmap
        .highest_ram_below(MAPPED_END)
        .ok_or("(no RAM in the memory map)")?;
    let page = (end & !(PAGE - 1))
        .checked_sub(PAGE)
        .ok_or("(RAM too small)")?;
    if page < start || page < image_end() {
        return Err("(no free page)");
    }
    let pattern = |addr: u64| addr.rotate_left(17) ^ 0x5a5a_a5a5_c3c3_3c3c;
    for addr in (page..page + PAGE).step_by(LINE) {
        if !phys::write_u64(addr, pattern(addr)) {
            return Err("(write)");
        }
    }
    for addr in (page..page + PAGE).step_by(LINE) {
        if phys::read_u64_aligned(addr) != Some(pattern(addr)) {
            return Err("(readback)");
        }
    }
    Ok(())
}
