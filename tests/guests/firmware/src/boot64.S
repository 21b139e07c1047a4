/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Entry code of the long-mode test guests (AT&T syntax, assembled through global_asm!).
 *
 * Two ways in, one way on:
 *   pvh_start32  PVH: 32-bit protected mode, paging off, ebx = hvm_start_info. Loads our GDT,
 *                enables PAE + EFER.LME + paging with our 4 GiB identity map, jumps to 64-bit.
 *   _start       Linux 64-bit boot protocol at 0x100200: long mode, rsi = boot_params, only
 *                1 GiB mapped by the VMM. Loads our GDT and our CR3.
 * Both zero .bss, take the stack in .bss and call fw_entry(info_paddr, protocol).
 * No brace characters in this file: global_asm! reads them as operands.
 */

/* The Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH 32-bit entry address. */
.section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz */
    .long 18                    /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32

.section .text.boot32, "ax", @progbits
.code32
.globl pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi              /* hvm_start_info, kept until fw_entry */
    lgdt (boot_gdt_ptr)
    ljmp $0x18, $1f             /* our 32-bit code segment */
1:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $__bss_start, %edi      /* zero .bss; the stack is outside it (see .stack) */
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx                /* linker.ld aligns both ends to 16 */
    xor %eax, %eax
    rep stosl
    mov $boot_stack_top, %esp
    mov %cr4, %eax
    or $0x20, %eax              /* CR4.PAE */
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       /* IA32_EFER */
    rdmsr
    or $0x100, %eax             /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    ljmp $0x08, $pvh_start64

.code64
pvh_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_stack_top, %rsp
    mov %esi, %edi              /* zero-extends: rdi = hvm_start_info */
    mov $1, %esi                /* BootProtocol::Pvh */
    call fw_entry
    ud2

.section .text.startup64, "ax", @progbits
.code64
.globl _start
_start:
    cli
    cld
    mov %rsi, %r12              /* boot_params, kept until fw_entry */
    mov $__bss_start, %edi      /* zero .bss; the stack is outside it (see .stack) */
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx                /* linker.ld aligns both ends to 16 */
    xor %eax, %eax
    rep stosq
    mov $boot_stack_top, %rsp
    lgdt (boot_gdt_ptr)
    pushq $0x08
    lea 2f(%rip), %rax
    pushq %rax
    lretq
2:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_pml4, %eax
    mov %rax, %cr3
    mov %r12, %rdi
    mov $2, %esi                /* BootProtocol::Linux64 */
    call fw_entry
    ud2

.section .rodata.boot_gdt, "a", @progbits
.balign 16
boot_gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00af9b000000ffff    /* 0x08 64-bit code (accessed bit preset: no descriptor writes) */
    .quad 0x00cf93000000ffff    /* 0x10 flat data */
    .quad 0x00cf9b000000ffff    /* 0x18 flat 32-bit code */
boot_gdt_end:
.balign 8
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt              /* 32-bit lgdt reads the low 4 bytes: the GDT is below 4 GiB */

/*
 * Identity map of the first 4 GiB with 2 MiB pages, built by the assembler. The MMIO gap
 * (0xd0000000 and up: boot timer, virtio-mmio, IOAPIC, LAPIC) is mapped uncached.
 */
.section .data.boot_pagetables, "aw", @progbits
.balign 4096
.globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x0003
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .fill 508, 8, 0
boot_pd:
    .set pde_index, 0
    .rept 2048
    .if pde_index >= 0x680
    .quad (pde_index << 21) | 0x9b   /* P | RW | PWT | PCD | PS */
    .else
    .quad (pde_index << 21) | 0x83   /* P | RW | PS */
    .endif
    .set pde_index, pde_index + 1
    .endr

/*
 * The stack is not in .bss: it needs no zeroing, and zeroing 64 KiB costs tens of ms on the
 * project's nested kvm_pvm host, where every guest instruction (and rep step) is emulated.
 */
.section .stack, "aw", @nobits
.balign 16
boot_stack:
    .skip 0x10000
boot_stack_top:

.section .text, "ax", @progbits
.code64
