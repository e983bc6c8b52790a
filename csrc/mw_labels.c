/* mw_labels — see mw_labels.h. */
#include "mw_labels.h"
#include "mw_report.h"

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
    int full = 0;
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
        full = 1;
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
    if (full)
        mw_report_once(MW_REPORT_LABELS_FULL,
                       "the label registry is full (%d distinct label sets: a label whose value "
                       "changes per request or user fills it); samples under newer label sets "
                       "carry no labels (stats() labelsets_refused; per-request ids belong in "
                       "OpenTelemetry span labels, which are recycled)",
                       MW_LABELSETS_MAX);
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

/* ---- span sets ---------------------------------------------------------------------------- */

#define SPAN_IDX_BITS 15
#define SPAN_IDX_MASK ((1u << SPAN_IDX_BITS) - 1)
#define SPAN_GEN_MASK ((MW_SPANSET_FLAG - 1) >> SPAN_IDX_BITS)
_Static_assert(MW_SPANSETS_MAX == 1 << SPAN_IDX_BITS, "span slot index bits");

/* One allocation: the struct, then keys[n] and vals[n], then the span id, trace id and name. */
typedef struct {
    int n;
    const char **keys, **vals;
    char *span, *trace, *name;
} spanset_t;

typedef struct {
    _Atomic uint32_t id;   /* the live id, 0 = free; published after set and base */
    _Atomic uint32_t base; /* the base set's id */
    spanset_t *_Atomic set;
    _Atomic uint32_t seen; /* a sample was taken with the set (mw_labels_span_seen) */
    uint64_t released;     /* windows rotated at release + 1, 0 while owned (g_lock) */
    uint32_t gen;          /* g_lock */
} span_slot_t;

static span_slot_t g_spans[MW_SPANSETS_MAX];
static uint32_t g_span_used;                  /* slots ever handed out (g_lock) */
static uint32_t g_span_free[MW_SPANSETS_MAX]; /* reclaimed slots, a stack (g_lock) */
static uint32_t g_span_nfree;
static uint32_t g_span_ring[MW_SPANSETS_MAX]; /* released slots, oldest first (g_lock) */
static uint32_t g_span_head, g_span_nring;
static atomic_uint_fast64_t g_windows_done, g_windows_rotated;
static _Atomic int g_spans_on;
static atomic_uint_fast64_t g_span_created, g_span_refused, g_span_released, g_span_reclaimed;
static atomic_uint_fast64_t g_span_linked, g_span_link_missed;

static int is_hex(const char *s, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return s[len] == 0;
}

static int span_key(const char *k) {
    return strcmp(k, "span_id") == 0 || strcmp(k, "span_name") == 0;
}

void mw_labels_spans_enable(int on) {
    atomic_store(&g_spans_on, on);
}

uint32_t mw_labels_intern_span(uint32_t base, const char *span_id, const char *trace_id,
                               const char *span_name) {
    if (!atomic_load(&g_spans_on)) return 0;
    const char *const *bk = NULL, *const *bv = NULL;
    int bn = base ? mw_labels_get(base, &bk, &bv) : 0;
    if (bn < 0 || (base & MW_SPANSET_FLAG) || !span_id || !is_hex(span_id, 16) || !trace_id ||
        (trace_id[0] && !is_hex(trace_id, 32))) {
        atomic_fetch_add(&g_span_refused, 1);
        return 0;
    }
    size_t nl = span_name ? strlen(span_name) : 0;
    if (nl > MW_SPAN_NAME_MAX) {
        nl = MW_SPAN_NAME_MAX;
        while (nl > 0 && ((unsigned char)span_name[nl] & 0xC0) == 0x80)
            nl--; /* not inside a UTF-8 sequence */
    }
    size_t npairs = (size_t)bn + 2;
    spanset_t *set = malloc(sizeof *set + 2 * npairs * sizeof(char *) + 17 + 33 + nl + 1);
    if (!set) {
        atomic_fetch_add(&g_span_refused, 1);
        return 0;
    }
    set->keys = (const char **)(set + 1);
    set->vals = set->keys + npairs;
    set->span = (char *)(set->vals + npairs);
    set->trace = set->span + 17;
    set->name = set->trace + 33;
    memcpy(set->span, span_id, 17);
    memcpy(set->trace, trace_id, strlen(trace_id) + 1);
    memcpy(set->name, span_name ? span_name : "", nl);
    set->name[nl] = 0;
    set->keys[0] = "span_id";
    set->vals[0] = set->span;
    set->n = 1;
    if (nl) {
        set->keys[1] = "span_name";
        set->vals[1] = set->name;
        set->n = 2;
    }
    for (int i = 0; i < bn; i++) { /* base sets' strings live as long as the process */
        if (span_key(bk[i])) continue;
        set->keys[set->n] = bk[i];
        set->vals[set->n++] = bv[i];
    }
    pthread_mutex_lock(&g_lock);
    uint32_t idx;
    if (g_span_nfree) {
        idx = g_span_free[--g_span_nfree];
    } else if (g_span_used < MW_SPANSETS_MAX) {
        idx = g_span_used++;
    } else {
        pthread_mutex_unlock(&g_lock);
        free(set);
        atomic_fetch_add(&g_span_refused, 1);
        mw_report_once(MW_REPORT_SPANS_FULL,
                       "the span label table is full (%d requests in the last one or two "
                       "windows): samples of further requests keep their other labels but no "
                       "span_id (stats() spansets_refused; shorter windows, "
                       "MW_PROFILING_UPLOAD_INTERVAL, hold fewer)",
                       MW_SPANSETS_MAX);
        return 0;
    }
    span_slot_t *sl = &g_spans[idx];
    sl->gen = (sl->gen + 1) & SPAN_GEN_MASK;
    sl->released = 0;
    uint32_t id = MW_SPANSET_FLAG | sl->gen << SPAN_IDX_BITS | idx;
    atomic_store(&sl->set, set);
    atomic_store(&sl->base, base);
    atomic_store(&sl->seen, 0);
    atomic_store_explicit(&sl->id, id, memory_order_release);
    pthread_mutex_unlock(&g_lock);
    atomic_fetch_add(&g_span_created, 1);
    return id;
}

void mw_labels_release_span(uint32_t id) {
    if (!(id & MW_SPANSET_FLAG)) return;
    span_slot_t *sl = &g_spans[id & SPAN_IDX_MASK];
    pthread_mutex_lock(&g_lock);
    if (atomic_load(&sl->id) == id && sl->released == 0) {
        sl->released = atomic_load(&g_windows_rotated) + 1;
        g_span_ring[(g_span_head + g_span_nring++) % MW_SPANSETS_MAX] = id & SPAN_IDX_MASK;
        atomic_fetch_add(&g_span_released, 1);
    }
    pthread_mutex_unlock(&g_lock);
}

uint32_t mw_labels_base(uint32_t id) {
    if (!(id & MW_SPANSET_FLAG)) return id;
    span_slot_t *sl = &g_spans[id & SPAN_IDX_MASK];
    if (atomic_load_explicit(&sl->id, memory_order_acquire) != id) return 0;
    uint32_t base = atomic_load(&sl->base);
    return atomic_load(&sl->id) == id ? base : 0;
}

void mw_labels_span_seen(uint32_t id) {
    if (!(id & MW_SPANSET_FLAG)) return;
    span_slot_t *sl = &g_spans[id & SPAN_IDX_MASK];
    /* read first: a request's later samples do not write the line again */
    if (atomic_load_explicit(&sl->id, memory_order_acquire) == id &&
        !atomic_load_explicit(&sl->seen, memory_order_relaxed))
        atomic_store_explicit(&sl->seen, 1, memory_order_relaxed);
}

int mw_labels_span_was_seen(uint32_t id) {
    if (!(id & MW_SPANSET_FLAG)) return 0;
    span_slot_t *sl = &g_spans[id & SPAN_IDX_MASK];
    if (atomic_load_explicit(&sl->id, memory_order_acquire) != id) return 0;
    return atomic_load(&sl->seen) != 0;
}

void mw_labels_span_link_counted(int linked) {
    atomic_fetch_add(linked ? &g_span_linked : &g_span_link_missed, 1);
}

static spanset_t *span_set(uint32_t id) {
    span_slot_t *sl = &g_spans[id & SPAN_IDX_MASK];
    if (atomic_load_explicit(&sl->id, memory_order_acquire) != id) return NULL;
    return atomic_load(&sl->set);
}

int mw_labels_span_ids(uint32_t id, const char **span_id, const char **trace_id) {
    spanset_t *set = (id & MW_SPANSET_FLAG) ? span_set(id) : NULL;
    if (!set) return -1;
    *span_id = set->span;
    *trace_id = set->trace;
    return 0;
}

void mw_labels_window_rotated(void) {
    atomic_fetch_add(&g_windows_rotated, 1);
}

void mw_labels_window_done(void) {
    uint64_t done = atomic_fetch_add(&g_windows_done, 1) + 1;
    pthread_mutex_lock(&g_lock);
    while (g_span_nring) {
        uint32_t idx = g_span_ring[g_span_head];
        span_slot_t *sl = &g_spans[idx];
        /* released while r windows had been rotated: the window then active is the (r + 1)th,
         * encoded once r + 1 windows are done */
        if (sl->released > done) break;
        g_span_head = (g_span_head + 1) % MW_SPANSETS_MAX;
        g_span_nring--;
        spanset_t *set = atomic_load(&sl->set);
        atomic_store(&sl->id, 0);
        atomic_store(&sl->set, NULL);
        free(set);
        sl->released = 0;
        g_span_free[g_span_nfree++] = idx;
        atomic_fetch_add(&g_span_reclaimed, 1);
    }
    pthread_mutex_unlock(&g_lock);
}

void mw_labels_span_stats(mw_spansets_stats_t *out) {
    pthread_mutex_lock(&g_lock);
    out->live = g_span_used - g_span_nfree;
    pthread_mutex_unlock(&g_lock);
    out->created = atomic_load(&g_span_created);
    out->refused = atomic_load(&g_span_refused);
    out->released = atomic_load(&g_span_released);
    out->reclaimed = atomic_load(&g_span_reclaimed);
    out->linked = atomic_load(&g_span_linked);
    out->link_missed = atomic_load(&g_span_link_missed);
}

int mw_labels_get(uint32_t id, const char *const **keys, const char *const **vals) {
    if (id == 0) return 0;
    if (id & MW_SPANSET_FLAG) {
        spanset_t *set = span_set(id);
        if (!set) return -1;
        *keys = set->keys;
        *vals = set->vals;
        return set->n;
    }
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
