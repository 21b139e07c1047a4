/* SPDX-License-Identifier: Apache-2.0 */
/*
 * pvh32: a guest that never leaves 32-bit protected mode. Entered through PVH (ebx =
 * hvm_start_info, paging off), it prints its start_info, signals the boot timer and triple
 * faults. Pure assembly so no 64-bit code can run. No braces here: global_asm! operands.
 */

.section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz */
    .long 18                    /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long _start

.section .text, "ax", @progbits
.code32
.globl _start
_start:
    cli
    cld
    mov %ebx, %ebp              /* hvm_start_info */
    lgdt (pvh32_gdt_ptr)
    ljmp $0x08, $1f
1:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $pvh32_stack_top, %esp

    mov $msg_hello, %esi
    call puts
    cmpl $0x336ec578, (%ebp)    /* hvm_start_info.magic */
    jne bad_magic

    mov $msg_cmdline, %esi
    call puts
    mov 24(%ebp), %esi          /* cmdline_paddr, low half */
    cmpl $0, 28(%ebp)           /* above 4 GiB: unreachable without paging */
    jne 3f
    test %esi, %esi
    jz 3f
    mov $4095, %ecx             /* layout::CMDLINE_MAX_SIZE without the NUL */
2:
    lodsb
    test %al, %al
    jz 3f
    call putc
    loop 2b
3:
    mov $10, %al
    call putc

    mov $msg_memmap, %esi
    call puts
    xor %eax, %eax
    cmpl $1, 4(%ebp)            /* memmap fields exist from version 1 */
    jb 4f
    mov 48(%ebp), %eax          /* memmap_entries */
4:
    call putdec
    mov $msg_entries, %esi
    call puts
    jmp done

bad_magic:
    mov $msg_bad_magic, %esi
    call puts

done:
    movb $123, (0xd0000000)     /* boot timer */
    mov $msg_bye, %esi
    call puts
    lidt (pvh32_null_idt)       /* triple fault: empty IDT, then #UD */
    ud2

/* putc: al -> COM1. Preserves every register but flags. */
putc:
    push %edx
    mov $0x3f8, %dx
    out %al, %dx
    pop %edx
    ret

/* puts: NUL-terminated string at esi. Clobbers eax, esi. */
puts:
    lodsb
    test %al, %al
    jz 1f
    call putc
    jmp puts
1:
    ret

/* putdec: eax in decimal. Clobbers eax. */
putdec:
    push %ebx
    push %ecx
    push %edx
    mov $10, %ebx
    xor %ecx, %ecx
1:
    xor %edx, %edx
    div %ebx
    push %edx
    inc %ecx
    test %eax, %eax
    jnz 1b
2:
    pop %eax
    add $0x30, %al
    call putc
    loop 2b
    pop %edx
    pop %ecx
    pop %ebx
    ret

.section .rodata, "a", @progbits
msg_hello:      .asciz "pvh32: hello\n"
msg_cmdline:    .asciz "cmdline: "
msg_memmap:     .asciz "memmap: "
msg_entries:    .asciz " entries\n"
msg_bad_magic:  .asciz "pvh32: bad start_info magic\n"
msg_bye:        .asciz "pvh32: bye\n"

.balign 16
pvh32_gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00cf9b000000ffff    /* 0x08 flat 32-bit code (accessed bit preset) */
    .quad 0x00cf93000000ffff    /* 0x10 flat data */
pvh32_gdt_end:
.balign 8
pvh32_gdt_ptr:
    .word pvh32_gdt_end - pvh32_gdt - 1
    .long pvh32_gdt
.balign 8
pvh32_null_idt:
    .word 0
    .long 0

.section .bss, "aw", @nobits
.balign 16
    .skip 4096
pvh32_stack_top:

.section .text, "ax", @progbits
.code64
