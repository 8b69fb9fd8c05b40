/* One string → size_t map for every name lookup (tensor names, storage keys, zip members,
 * safetensors header names, metadata keys): open addressing, grows by doubling, sizes
 * overflow-checked. Keys are borrowed, not copied: the caller keeps them alive and unchanged
 * while the map is used. C11.
 *
 * Laid out like CPython's dict: the probed table holds 8-byte slots (entry number and half the
 * hash) and the entries (key, hash, value) are appended in insertion order. With 10⁵–10⁶ names
 * the probed table is a third of a table of whole entries, probes past other keys stay in it,
 * and inserts write the entries sequentially: fewer cache misses as maps grow. */
#ifndef TM_CORE_NAME_MAP_H
#define TM_CORE_NAME_MAP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_name_entry {
    const char *key;
    uint64_t hash;
    size_t value;
} tm_name_entry;

typedef struct tm_name_map {
    uint64_t *slots;         /* cap of them: 0 empty, else entry number + 1 and a hash tag */
    tm_name_entry *entries;  /* count of them, in insertion order */
    size_t cap;              /* 0 or a power of two */
    size_t count, entries_cap;
} tm_name_map;

#define TM_NAME_MAP_INIT {NULL, NULL, 0, 0, 0}

/* Room for n keys without growing; -1 when out of memory or n is too large (2³² − 1 keys or
 * more: entry numbers are 32-bit in the slots). */
int tm_name_map_reserve(tm_name_map *m, size_t n);

/* Adds key → value unless key is there: 0 added, 1 already present (its value in *existing when
 * existing is not NULL; the map is unchanged), -1 out of memory. */
int tm_name_map_insert(tm_name_map *m, const char *key, size_t value, size_t *existing);

/* 1 and *value when key is present, else 0. */
int tm_name_map_find(const tm_name_map *m, const char *key, size_t *value);

void tm_name_map_free(tm_name_map *m);

#ifdef __cplusplus
}
#endif
#endif
