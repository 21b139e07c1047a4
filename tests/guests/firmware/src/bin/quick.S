/* SPDX-License-Identifier: Apache-2.0 */
/*
 * quick: the start-up benchmark guest. Its first instruction after PVH entry signals the boot
 * timer, so start -> signal measures the VMM's own cost, not guest work (every guest
 * instruction is emulated on this host's kvm_pvm). Then "quick: bye" and a triple fault.
 * No braces here: global_asm! operands.
 */

.section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long _start

.section .text, "ax", @progbits
.code32
.globl _start
_start:
    movb $123, 0xd0000000       /* boot timer: layout::BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC */
    mov $0x3f8, %dx
    mov $quick_bye, %esi
1:
    lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:
    lidt (quick_null_idt)
    ud2

.section .rodata, "a", @progbits
quick_bye:
    .asciz "quick: bye\n"
    .balign 8
quick_null_idt:
    .word 0
    .long 0
