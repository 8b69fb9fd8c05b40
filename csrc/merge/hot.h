/* TM_HOT: the loops that are the whole cost of a merge (the kernel's, a method's per-element
 * loops) are built once per x86-64 level (AVX-512, AVX2, baseline) and picked at load time.
 * Files using it are compiled with -ffp-contract=off, so no clone fuses a·b+c into an FMA and
 * every machine computes the same bits. C11. */
#ifndef TM_MERGE_HOT_H
#define TM_MERGE_HOT_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define TM_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TM_HOT
#endif

#endif
