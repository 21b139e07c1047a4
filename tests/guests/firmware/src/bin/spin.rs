// SPDX-License-Identifier: Apache-2.0
//! `spin`: runs forever, printing `.` every [`DOT_CYCLES`] TSC ticks (about 7 ms at 2.4 GHz),
//! so a test can see a paused VM stop making progress and a resumed one carry on.
//!
//! The interval is measured in TSC ticks rather than loop iterations: on the project's nested
//! `kvm_pvm` host every guest instruction is emulated (about 1 us each, so 1M iterations take
//! ~2.6 s), while on real KVM 1M iterations take ~0.5 ms. Time keeps the rate sane on both.
//!
//! Console: `spin: hello`, boot-timer write, then `.` repeated.
#![no_std]
#![no_main]

use firmware::{Boot, Serial, exit, println};

firmware::guest_main!(main);

/// TSC ticks between two dots.
const DOT_CYCLES: u64 = 1 << 24;

fn main(_boot: &Boot) -> ! {
    println!("spin: hello");
    exit::signal_boot_timer();
    let mut last = exit::rdtsc();
    loop {
        let now = exit::rdtsc();
        if now.wrapping_sub(last) >= DOT_CYCLES {
            Serial.write_bytes(b".");
            last = now;
        }
    }
}
