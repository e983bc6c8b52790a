/* mw_labels — see mw_labels.h. */
#include "mw_labels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int n;
    uint32_t hash;
    const char *keys[MW_LABELS_PER_SET];
    const char *vals[MW_LABELS_PER_SET];
    atomic_uint_fast64_t requests; /* requests counted against the set since the last take */
} mw_labelset_t;

#define INDEX_SIZE (2 * MW_LABELSETS_MAX)

static mw_labelset_t *_Atomic g_sets[MW_LABELSETS_MAX + 1];
static _Atomic uint32_t g_count;
static uint32_t g_index[INDEX_SIZE]; /* writer only */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_uint_fast64_t g_refused;

static uint32_t hash_set(const char *const *k, const char *const *v, int n) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++) {
        for (const char *p = k[i]; *p; p++)
            h = (h ^ (unsigned char)*p) * 16777619u;
        h = (h ^ 0xFF) * 16777619u;
        for (const char *p = v[i]; *p; p++)
            h = (h ^ (unsigned char)*p) * 16777619u;
        h = (h ^ 0xFE) * 16777619u;
    }
    return h;
}

static int same(const mw_labelset_t *s, const char *const *k, const char *const *v, int n) {
    if (s->n != n) return 0;
    for (int i = 0; i < n; i++)
        if (strcmp(s->keys[i], k[i]) || strcmp(s->vals[i], v[i])) return 0;
    return 1;
}

uint32_t mw_labels_intern(const char *const *keys, const char *const *vals, int n) {
    if (n <= 0) return 0;
    if (n > MW_LABELS_PER_SET) {
        atomic_fetch_add(&g_refused, 1);
        return 0;
    }
    uint32_t h = hash_set(keys, vals, n), id = 0;
    pthread_mutex_lock(&g_lock);
    uint32_t i = h & (INDEX_SIZE - 1);
    for (;; i = (i + 1) & (INDEX_SIZE - 1)) {
        uint32_t cur = g_index[i];
        if (cur == 0) break;
        mw_labelset_t *s = atomic_load(&g_sets[cur]);
        if (s->hash == h && same(s, keys, vals, n)) {
            id = cur;
            goto out;
        }
    }
    uint32_t next = atomic_load(&g_count) + 1;
    if (next > MW_LABELSETS_MAX) {
        atomic_fetch_add(&g_refused, 1);
        goto out;
    }
    mw_labelset_t *s = calloc(1, sizeof *s);
    if (!s) goto out;
    s->n = n;
    s->hash = h;
    for (int j = 0; j < n; j++) {
        s->keys[j] = strdup(keys[j]);
        s->vals[j] = strdup(vals[j]);
        if (!s->keys[j] || !s->vals[j]) {
            for (int q = 0; q <= j; q++) {
                free((void *)s->keys[q]);
                free((void *)s->vals[q]);
            }
            free(s);
            goto out;
        }
    }
    atomic_store(&g_sets[next], s);
    atomic_store(&g_count, next);
    g_index[i] = next;
    id = next;
out:
    pthread_mutex_unlock(&g_lock);
    return id;
}

void mw_labels_after_fork_child(void) {
    pthread_mutex_init(&g_lock, NULL);
    /* the parent's uncounted requests are the parent's: the child's first window starts at 0 */
    uint32_t n = atomic_load(&g_count);
    for (uint32_t id = 1; id <= n; id++) {
        mw_labelset_t *s = atomic_load(&g_sets[id]);
        if (s) atomic_store(&s->requests, 0);
    }
}

int mw_labels_count_request(uint32_t id) {
    if (id == 0 || id > atomic_load(&g_count)) return -1;
    mw_labelset_t *s = atomic_load(&g_sets[id]);
    if (!s) return -1;
    atomic_fetch_add_explicit(&s->requests, 1, memory_order_relaxed);
    return 0;
}

uint32_t mw_labels_take_requests(uint32_t *ids, uint64_t *counts, uint32_t max) {
    uint32_t n = atomic_load(&g_count), got = 0;
    for (uint32_t id = 1; id <= n && got < max; id++) {
        mw_labelset_t *s = atomic_load(&g_sets[id]);
        if (!s || atomic_load_explicit(&s->requests, memory_order_relaxed) == 0) continue;
        uint64_t c = atomic_exchange(&s->requests, 0);
        if (c == 0) continue;
        ids[got] = id;
        counts[got++] = c;
    }
    return got;
}

int mw_labels_get(uint32_t id, const char *const **keys, const char *const **vals) {
    if (id == 0) return 0;
    if (id > atomic_load(&g_count)) return -1;
    mw_labelset_t *s = atomic_load(&g_sets[id]);
    if (!s) return -1;
    *keys = s->keys;
    *vals = s->vals;
    return s->n;
}

uint64_t mw_labels_refused(void) {
    return atomic_load(&g_refused);
}
