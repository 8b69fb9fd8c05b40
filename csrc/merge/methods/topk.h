/* An exact top-k by magnitude over one tensor's values, streamed: the values are seen block by
 * block in one or more passes (a method's reduce passes), never held whole and never sorted.
 *
 * Order: larger |v| first; among equal magnitudes the lower flat index first. The k first are
 * kept, exactly k of them. A value's key is the bit pattern of |v| as a uint64 (monotone in |v|
 * for non-negative doubles; a NaN counts as larger than any number).
 *
 * Passes (each is one call of tm_topk_block per block, in order, then tm_topk_end):
 *   HIST     a histogram of the next 16 bits of the keys that share the known prefix (65536
 *            counters); the bin holding the k-th key becomes the prefix. When the bin is small
 *            enough (≤ max(numel/2, 65536) keys) the next pass is COLLECT, else another HIST.
 *   COLLECT  the (key, index) pairs of the bin; a selection (quickselect on (key desc, index asc))
 *            finds the k-th: its key and index are the cutoff.
 *   COUNT    when the k-th key is known exactly but many keys equal it (after 64 bits of
 *            histograms, or a bin of zeros: untouched weights), the index cutoff is where the
 *            running count of equal keys reaches the number still to keep (blocks in order).
 * A tensor of at most 65536 elements goes straight to COLLECT (one pass).
 * Speculation (the usual case in one pass): the first HIST pass histograms only its first block,
 * guesses from it the k-th key's bin, and from then on collects the pairs of the 3 bins around
 * it (at most numel/8 + 65536 of them) and counts the keys above them; when the k-th key falls
 * in those bins, a selection among their pairs ends it (the same k kept). A wrong guess or a
 * full buffer costs one pass: the HIST pass above starts over, without speculation. Memory: 512 KiB of
 * counters during HIST, 16 bytes per candidate during COLLECT (≤ numel/2 candidates past the
 * first pass of a large tensor), nothing during COUNT. The result: keep key > cut_key, or
 * key == cut_key and index < cut_end. C11. */
#ifndef TM_MERGE_METHODS_TOPK_H
#define TM_MERGE_METHODS_TOPK_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { TM_TOPK_DONE, TM_TOPK_HIST, TM_TOPK_COLLECT, TM_TOPK_COUNT };

/* Tensors at most this big are collected whole in one pass (no histogram to clear). */
#define TM_TOPK_SMALL 65536u
#define TM_TOPK_BINS 65536u

typedef struct tm_topk {
    uint64_t numel, k;
    uint64_t above;    /* keys known to rank before the prefix's bin */
    uint64_t prefix;   /* the known top `bits` bits of the k-th key */
    uint64_t zeros;    /* keys == 0 (first histogram) */
    uint64_t expect;   /* COLLECT: the bin's count; COUNT: equal keys still to keep */
    uint64_t seen;     /* COLLECT: pairs collected; COUNT: equal keys seen */
    uint64_t offset;   /* its bytes in the method's memory (tm_topk_layout) */
    uint64_t cut_key, cut_end;
    uint64_t spec_lo, spec_seen, spec_cap, spec_above; /* speculation: the bins' lowest, pairs, room,
                                                          keys above them */
    uint32_t bits, phase;
    uint32_t spec;     /* SPEC_* of topk.c */
} tm_topk;

/* Doubles of method state a tm_topk takes. */
#define TM_TOPK_DOUBLES ((sizeof(tm_topk) + sizeof(double) - 1) / sizeof(double))

static inline uint64_t tm_topk_key(double v) {
    uint64_t u;
    v = fabs(v);
    memcpy(&u, &v, sizeof u);
    return u;
}

/* The element e of a method's loops that read either values themselves (v; sub unused) or float32
 * values less a float64 base (δ = x − b computed as tm_kernel_delta_f64 does, so the same δ
 * without a row of them in between): the VALUE argument of loops defined by macros. */
#define TM_VALUE_PLAIN(v, sub, e) ((void)(sub), (v)[e])
#define TM_VALUE_F32_DELTA(v, sub, e) ((double)(v)[e] - (sub)[e])

/* A selection of the k largest of numel values (k ≤ numel). */
void tm_topk_init(tm_topk *s, uint64_t numel, uint64_t k);

/* Bytes the next pass needs (0 when done or counting), and of them those to clear before it
 * (the counters: the pairs are written before they are read). */
size_t tm_topk_bytes(const tm_topk *s);
size_t tm_topk_zeroed_bytes(const tm_topk *s);

/* Block [begin, begin + count) of the values (mem: the method memory's base; the selection's
 * bytes are at s->offset). */
void tm_topk_block(tm_topk *s, uint8_t *mem, const double *v, uint64_t begin, size_t count);

/* After a pass: the next phase (TM_TOPK_DONE when the cutoff is known). */
void tm_topk_end(tm_topk *s, uint8_t *mem);

/* 1 when the next block of count values would only be scanned for the speculation's candidates
 * (the usual case past a tensor's first block): tm_topk_scan_f32 may then take the block from
 * float32 values x and the base b (float64), δ = x − b, as tm_topk_block would take δ. */
int tm_topk_scanning(const tm_topk *s, size_t count);
void tm_topk_scan_f32(tm_topk *s, uint8_t *mem, const float *x, const double *b, uint64_t begin, size_t count);

static inline int tm_topk_kept(const tm_topk *s, uint64_t key, uint64_t index) {
    return key > s->cut_key || (key == s->cut_key && index < s->cut_end);
}

/* keep[e] = 1 when element begin + e of the block is among the k (the selection is done). */
void tm_topk_keep(const tm_topk *s, const double *v, uint64_t begin, size_t count, uint8_t *keep);

#endif
