/* One string → size_t map for every name lookup (tensor names, storage keys, zip members,
 * safetensors header names): open addressing, grows by doubling, sizes overflow-checked. Keys are
 * borrowed, not copied: the caller keeps them alive and unchanged while the map is used. C11. */
#ifndef TM_CORE_NAME_MAP_H
#define TM_CORE_NAME_MAP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_name_slot {
    const char *key; /* NULL: empty */
    uint64_t hash;
    size_t value;
} tm_name_slot;

typedef struct tm_name_map {
    tm_name_slot *slots;
    size_t cap;   /* 0 or a power of two */
    size_t count;
} tm_name_map;

#define TM_NAME_MAP_INIT {NULL, 0, 0}

/* Room for n keys without growing; -1 when out of memory or n is too large. */
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
