#include "core/name_map.h"

#include <stdlib.h>
#include <string.h>

static uint64_t hash_name(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* The slot holding key, or the empty slot where it would go. */
static size_t probe(const tm_name_slot *slots, size_t cap, const char *key, uint64_t h) {
    size_t j = (size_t)h & (cap - 1);
    while (slots[j].key && (slots[j].hash != h || strcmp(slots[j].key, key) != 0)) j = (j + 1) & (cap - 1);
    return j;
}

int tm_name_map_reserve(tm_name_map *m, size_t n) {
    /* At most half full, so probes stay short and one slot is always empty. */
    size_t cap = m->cap ? m->cap : 16;
    while (cap / 2 < n) {
        if (cap > SIZE_MAX / 2 / sizeof *m->slots) return -1;
        cap *= 2;
    }
    if (cap == m->cap) return 0;
    tm_name_slot *slots = calloc(cap, sizeof *slots);
    if (!slots) return -1;
    for (size_t i = 0; i < m->cap; i++)
        if (m->slots[i].key) slots[probe(slots, cap, m->slots[i].key, m->slots[i].hash)] = m->slots[i];
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return 0;
}

int tm_name_map_insert(tm_name_map *m, const char *key, size_t value, size_t *existing) {
    if (m->count == SIZE_MAX || tm_name_map_reserve(m, m->count + 1)) return -1;
    uint64_t h = hash_name(key);
    size_t j = probe(m->slots, m->cap, key, h);
    if (m->slots[j].key) {
        if (existing) *existing = m->slots[j].value;
        return 1;
    }
    m->slots[j].key = key;
    m->slots[j].hash = h;
    m->slots[j].value = value;
    m->count++;
    return 0;
}

int tm_name_map_find(const tm_name_map *m, const char *key, size_t *value) {
    if (!m->cap || !key) return 0;
    size_t j = probe(m->slots, m->cap, key, hash_name(key));
    if (!m->slots[j].key) return 0;
    *value = m->slots[j].value;
    return 1;
}

void tm_name_map_free(tm_name_map *m) {
    free(m->slots);
    m->slots = NULL;
    m->cap = m->count = 0;
}
