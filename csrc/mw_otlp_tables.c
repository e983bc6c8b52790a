/* mw_otlp_tables — arena, pointer table, bytes -> index map; contract in mw_otlp_tables.h. */
#include "mw_otlp_tables.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- arena */

struct mw_otlp_chunk {
    struct mw_otlp_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

void *mw_otlp_arena_alloc(mw_otlp_arena_t *a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (n == 0) n = 16;
    mw_otlp_chunk_t *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > (1u << 16) ? n : (1u << 16);
        c = calloc(1, sizeof(mw_otlp_chunk_t) + cap);
        if (!c) return NULL;
        c->cap = cap;
        c->next = a->head;
        a->head = c;
    }
    void *p = c->data + c->used;
    c->used += n;
    return p;
}

char *mw_otlp_arena_strdup(mw_otlp_arena_t *a, const char *s) {
    size_t n = strlen(s) + 1;
    char *d = mw_otlp_arena_alloc(a, n);
    if (d) memcpy(d, s, n);
    return d;
}

void mw_otlp_arena_free(mw_otlp_arena_t *a) {
    for (mw_otlp_chunk_t *c = a->head, *next; c; c = next) {
        next = c->next;
        free(c);
    }
    a->head = NULL;
}

/* ---------------------------------------------------------------- growable pointer table */

int mw_otlp_vec_push(mw_otlp_vec_t *t, void *p) {
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        void **v = realloc(t->v, cap * sizeof(*v));
        if (!v) return -1;
        t->v = v;
        t->cap = cap;
    }
    t->v[t->n++] = p;
    return 0;
}

void mw_otlp_vec_free(mw_otlp_vec_t *t) {
    free(t->v);
    t->v = NULL;
    t->n = t->cap = 0;
}

/* ---------------------------------------------------------------- hash map: bytes -> index */

uint64_t mw_otlp_hash_bytes(const void *p, size_t n) { /* FNV-1a, 64 bits */
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

int mw_otlp_imap_reserve(mw_otlp_imap_t *m) {
    if (m->n * 2 < m->cap) return 0;
    size_t cap = m->cap ? m->cap * 2 : 256;
    mw_otlp_slot_t *s = calloc(cap, sizeof(*s));
    if (!s) return -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].key) continue;
        size_t j = m->slots[i].hash & (cap - 1);
        while (s[j].key)
            j = (j + 1) & (cap - 1);
        s[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = s;
    m->cap = cap;
    return 0;
}

int32_t mw_otlp_imap_get(const mw_otlp_imap_t *m, const void *key, size_t len, uint64_t h,
                         size_t *slot) {
    *slot = 0;
    if (m->cap == 0) return -1;
    size_t j = h & (m->cap - 1);
    while (m->slots[j].key) {
        const mw_otlp_slot_t *s = &m->slots[j];
        if (s->hash == h && s->len == len && memcmp(s->key, key, len) == 0) return s->val;
        j = (j + 1) & (m->cap - 1);
    }
    *slot = j;
    return -1;
}

int mw_otlp_imap_set(mw_otlp_imap_t *m, mw_otlp_arena_t *a, size_t slot, const void *key,
                     size_t len, uint64_t h, int32_t val) {
    unsigned char *copy = mw_otlp_arena_alloc(a, len ? len : 1);
    if (!copy) return -1;
    memcpy(copy, key, len);
    m->slots[slot] = (mw_otlp_slot_t){.key = copy, .len = len, .hash = h, .val = val};
    m->n++;
    return 0;
}

int mw_otlp_imap_put(mw_otlp_imap_t *m, mw_otlp_arena_t *a, const void *key, size_t len,
                     int32_t val) {
    if (mw_otlp_imap_reserve(m) != 0) return -1;
    uint64_t h = mw_otlp_hash_bytes(key, len);
    size_t slot = 0;
    if (mw_otlp_imap_get(m, key, len, h, &slot) >= 0) return 0;
    return mw_otlp_imap_set(m, a, slot, key, len, h, val);
}

void mw_otlp_imap_free(mw_otlp_imap_t *m) {
    free(m->slots);
    m->slots = NULL;
    m->cap = m->n = 0;
}
