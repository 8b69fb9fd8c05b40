#include "core/name_map.h"

#include <stdlib.h>
#include <string.h>

#include "core/hash.h"

/* A slot: the entry number + 1 in the low half, the hash's high half above it, so that probing
 * past other keys reads the slots only, not their entries. */
static uint64_t slot_of(size_t entry, uint64_t h) { return (h & 0xffffffff00000000ull) | (uint64_t)(entry + 1); }
static size_t entry_of(uint64_t slot) { return (size_t)(uint32_t)slot - 1; }

/* The slot holding key's entry, or the empty slot where it would go. */
static size_t probe(const tm_name_map *m, const char *key, uint64_t h) {
    size_t j = (size_t)h & (m->cap - 1);
    for (uint64_t s; (s = m->slots[j]); j = (j + 1) & (m->cap - 1))
        if ((s ^ h) >> 32 == 0 && strcmp(m->entries[entry_of(s)].key, key) == 0) break;
    return j;
}

/* At most half the slots in use, so probes stay short and one slot is always empty. */
static int grow_slots(tm_name_map *m, size_t n) {
    size_t cap = m->cap ? m->cap : 16;
    while (cap / 2 < n) {
        if (cap > SIZE_MAX / 2 / sizeof *m->slots) return -1;
        cap *= 2;
    }
    if (cap == m->cap) return 0;
    uint64_t *slots = calloc(cap, sizeof *slots);
    if (!slots) return -1;
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    for (size_t i = 0; i < m->count; i++) { /* the entries, read in order, say where each goes */
        size_t j = (size_t)m->entries[i].hash & (cap - 1);
        while (slots[j]) j = (j + 1) & (cap - 1);
        slots[j] = slot_of(i, m->entries[i].hash);
    }
    return 0;
}

static int grow_entries(tm_name_map *m, size_t n) {
    if (n <= m->entries_cap) return 0;
    if (n > SIZE_MAX / sizeof *m->entries) return -1;
    tm_name_entry *e = realloc(m->entries, n * sizeof *e);
    if (!e) return -1;
    m->entries = e;
    m->entries_cap = n;
    return 0;
}

int tm_name_map_reserve(tm_name_map *m, size_t n) {
    if (n >= UINT32_MAX) return -1; /* entry numbers + 1 fit the 4-byte slots */
    return grow_slots(m, n) || grow_entries(m, n) ? -1 : 0;
}

int tm_name_map_insert(tm_name_map *m, const char *key, size_t value, size_t *existing) {
    if (m->count + 1 >= UINT32_MAX) return -1;
    /* Doubling, so a map filled one insert at a time costs amortised O(1) per insert. */
    if (m->count == m->entries_cap &&
        grow_entries(m, m->entries_cap > 8 ? 2 * m->entries_cap : 16))
        return -1;
    if (grow_slots(m, m->count + 1)) return -1;
    uint64_t h = tm_hash_str(key);
    size_t j = probe(m, key, h);
    if (m->slots[j]) {
        if (existing) *existing = m->entries[entry_of(m->slots[j])].value;
        return 1;
    }
    m->entries[m->count] = (tm_name_entry){key, h, value};
    m->slots[j] = slot_of(m->count++, h);
    return 0;
}

int tm_name_map_find(const tm_name_map *m, const char *key, size_t *value) {
    if (!m->cap || !key) return 0;
    size_t j = probe(m, key, tm_hash_str(key));
    if (!m->slots[j]) return 0;
    *value = m->entries[entry_of(m->slots[j])].value;
    return 1;
}

void tm_name_map_free(tm_name_map *m) {
    free(m->slots);
    free(m->entries);
    memset(m, 0, sizeof *m);
}
