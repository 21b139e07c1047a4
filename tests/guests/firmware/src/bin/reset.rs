// SPDX-License-Identifier: Apache-2.0
//! `reset`: asks for a reset through the i8042 (0xfe to port 0x64); a VMM that handles it
//! ends the VM there.
//!
//! Console: `reset: hello`, boot-timer write, then only if the reset was ignored:
//! `reset: still alive` and a triple fault.
#![no_std]
#![no_main]

use firmware::{Boot, exit, println};

firmware::guest_main!(main);

fn main(_boot: &Boot) -> ! {
    println!("reset: hello");
    exit::signal_boot_timer();
    exit::i8042_reset();
    // Give a VMM that handles the reset asynchronously a moment (~1 ms) before saying so.
    exit::delay_cycles(2_000_000);
    println!("reset: still alive");
    exit::triple_fault()
}
