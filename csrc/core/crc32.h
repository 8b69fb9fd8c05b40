/* CRC-32 of zip members (zlib's polynomial and conventions): every byte of a .pt output goes
 * through it, and zlib's table-driven loop ran at ~0.8 GB/s here, a fifth of a whole merge.
 * On x86-64 with PCLMULQDQ the bulk is folded with carry-less multiplications (Intel's
 * "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ", 2009); the rest, and other
 * machines, use zlib. C11. */
#ifndef TM_CORE_CRC32_H
#define TM_CORE_CRC32_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Same result as zlib's crc32(crc, buf, len) for any len (start with crc = 0). */
uint32_t tm_crc32(uint32_t crc, const void *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
