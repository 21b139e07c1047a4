// SPDX-License-Identifier: Apache-2.0
//! `smp`: reads the MP table, starts every application processor through the xAPIC (INIT,
//! SIPI, SIPI to a real-mode trampoline at 0x10000) and counts the ones that came up.
//!
//! Console: `smp: <n> cpus up` (or `smp: only <k> of <n> cpus up`), boot-timer write, triple
//! fault. Without a usable MP table: `smp: no MP table (<why>)`.
#![no_std]
#![no_main]

use firmware::smp::{DEFAULT_LAPIC_ADDR, LocalApic, start_aps};
use firmware::{Boot, exit, mptable, println};

firmware::guest_main!(main);

/// How long to wait for the APs: ~1 s at 3 GHz.
const AP_TIMEOUT_CYCLES: u64 = 3_000_000_000;

fn main(_boot: &Boot) -> ! {
    match mptable::parse() {
        Ok(mp) => {
            let cpus = mp.cpus();
            let base = match u64::from(mp.lapic_addr) {
                0 => DEFAULT_LAPIC_ADDR,
                a => a,
            };
            let up = if LocalApic::x2apic_enabled() {
                println!("smp: APIC in x2APIC mode, APs not started");
                1
            } else {
                let lapic = LocalApic::new(base);
                1 + start_aps(&lapic, mp.apic_ids(), AP_TIMEOUT_CYCLES) as usize
            };
            if up == cpus {
                println!("smp: {cpus} cpus up");
            } else {
                println!("smp: only {up} of {cpus} cpus up");
            }
        }
        Err(e) => println!("smp: no MP table ({e:?})"),
    }
    exit::signal_boot_timer();
    exit::triple_fault()
}
