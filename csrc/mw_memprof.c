/* mw_memprof — sampled allocations and the sampled live set (contract: mw_memprof.h). */
#include "mw_memprof.h"

#include "mw_pyframes.h"
#include "mw_rand.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

int64_t mw_memprof_countdown = INT64_MAX, mw_memprof_countdown_large = INT64_MAX;
_Atomic double mw_memprof_weight = 1.0;
uint8_t *mw_memprof_filter;

typedef struct {
    uintptr_t ptr; /* 0 = empty */
    uint32_t stack;
    uint32_t _pad;
    uint64_t objects, bytes;
} live_t;

#define LIVE_MASK (MW_MEMPROF_LIVE_SLOTS - 1)
#define LIVE_MAX (MW_MEMPROF_LIVE_SLOTS / 4 * 3)

/* g_mu guards g_buf, g_spare, g_out_busy, g_live, g_nlive and the filter's writes. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static mw_profbuf_t *g_buf, *g_spare, *g_out;
static int g_out_busy;
static live_t *g_live;
static uint32_t g_nlive;
static uint32_t *g_remap;

static atomic_int g_enabled;
static _Atomic uint64_t g_rate;
static _Atomic uint64_t g_samples, g_recorded, g_dropped, g_overflow, g_frees, g_compactions;
static _Atomic uint64_t g_inuse_bytes;

static uint64_t g_rng; /* state of the draws (mw_rand), GIL-serialized */

static int64_t draw_countdown(uint64_t rate) {
    double d = -log1p(-mw_rand_uniform(&g_rng)) * (double)rate; /* exponential, mean rate */
    if (d < 1.0) d = 1.0;
    if (d > 9.0e18) d = 9.0e18;
    return (int64_t)d;
}

int mw_memprof_enable(uint64_t rate_bytes) {
    if (rate_bytes < 1) rate_bytes = 1;
    pthread_mutex_lock(&g_mu);
    if (!g_buf) {
        mw_profbuf_limits_t lim;
        mw_profbuf_small_limits(&lim);
        mw_profbuf_t *a = mw_profbuf_new(&lim), *s = mw_profbuf_new(&lim),
                     *o = mw_profbuf_new(&lim);
        live_t *live = calloc(MW_MEMPROF_LIVE_SLOTS, sizeof *live);
        uint8_t *filter = calloc((size_t)1 << MW_MEMPROF_FILTER_BITS, 1);
        uint32_t *remap = calloc(lim.max_stacks, sizeof *remap);
        if (!a || !s || !o || !live || !filter || !remap) {
            mw_profbuf_free(a);
            mw_profbuf_free(s);
            mw_profbuf_free(o);
            free(live);
            free(filter);
            free(remap);
            pthread_mutex_unlock(&g_mu);
            return -1;
        }
        g_buf = a;
        g_spare = s;
        g_out = o;
        g_live = live;
        g_remap = remap;
        mw_memprof_filter = filter;
    }
    atomic_store(&g_rate, rate_bytes);
    atomic_store(&g_enabled, 1);
    pthread_mutex_unlock(&g_mu);
    mw_memprof_countdown = draw_countdown(rate_bytes);
    mw_memprof_countdown_large = draw_countdown(rate_bytes);
    return 0;
}

void mw_memprof_disable(void) {
    atomic_store(&g_enabled, 0);
    mw_memprof_countdown = mw_memprof_countdown_large = INT64_MAX;
}

int mw_memprof_enabled(void) {
    return atomic_load_explicit(&g_enabled, memory_order_relaxed);
}

uint64_t mw_memprof_rate(void) {
    return atomic_load_explicit(&g_rate, memory_order_relaxed);
}

int mw_memprof_draw(size_t size, int duty, uint64_t *objects, uint64_t *bytes) {
    if (!mw_memprof_enabled()) {
        mw_memprof_countdown = mw_memprof_countdown_large = INT64_MAX;
        return 0;
    }
    /* a large block: a Poisson process of its own over the bytes, stretched by the weight the
     * duty cycle gives the small ones' samples, so that a sample stands for as much either way */
    double w = atomic_load_explicit(&mw_memprof_weight, memory_order_relaxed);
    double r = (double)mw_memprof_rate() * (duty ? 1.0 : w);
    if (duty)
        mw_memprof_countdown = draw_countdown((uint64_t)r);
    else
        mw_memprof_countdown_large = draw_countdown((uint64_t)r);
    atomic_fetch_add_explicit(&g_samples, 1, memory_order_relaxed);
    /* Sampled with probability p = 1 - exp(-s/R): stands for 1/p allocations, s/p bytes. */
    double s = size ? (double)size : 1.0;
    double p = -expm1(-s / r);
    double n = (p > 0 ? 1.0 / p : 1.0) * (duty ? w : 1.0);
    uint64_t whole = (uint64_t)n;
    double frac = n - (double)whole;
    *objects = whole + (mw_rand_uniform(&g_rng) < frac ? 1 : 0);
    *bytes = (uint64_t)(s * n + 0.5);
    return 1;
}

static uint32_t live_slot(uintptr_t p) {
    return (uint32_t)(((p >> 4) * 0xD6E8FEB86659FD93ull) >> 32) & LIVE_MASK;
}

/* The slot holding p, or -1. g_mu held. */
static int64_t live_find(uintptr_t p) {
    for (uint32_t i = live_slot(p), n = 0; n < MW_MEMPROF_LIVE_SLOTS;
         i = (i + 1) & LIVE_MASK, n++) {
        if (g_live[i].ptr == p) return i;
        if (!g_live[i].ptr) return -1;
    }
    return -1;
}

/* Removes slot i, shifting back the entries of its probe run (linear probing). g_mu held. */
static void live_delete(uint32_t i) {
    uint32_t j = i;
    for (;;) {
        j = (j + 1) & LIVE_MASK;
        if (!g_live[j].ptr) break;
        uint32_t home = live_slot(g_live[j].ptr);
        /* entry j may move to i when its home is not cyclically within (i, j] */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (stays) continue;
        g_live[i] = g_live[j];
        i = j;
    }
    memset(&g_live[i], 0, sizeof g_live[i]);
    g_nlive--;
}

static void filter_add(uintptr_t p) {
    uint8_t *f = &mw_memprof_filter[mw_memprof_bucket((const void *)p)];
    if (*f < 255) (*f)++;
}

static void filter_remove(uintptr_t p) {
    uint8_t *f = &mw_memprof_filter[mw_memprof_bucket((const void *)p)];
    if (*f > 0 && *f < 255) (*f)--; /* a saturated bucket stays: freeing there looks it up */
}

/* Interns frame f into b (its cached id when of b's generation). 0 when b is full or its names
 * cannot be read. g_mu held. */
static mw_id_t intern_frame(mw_profbuf_t *b, uint64_t gen, mw_memframe_t *f) {
    if (f->gen == gen && f->id) return f->id;
    char name[512], file[1024];
    int nl = mw_pyframes_read_str(f->name, name, sizeof name);
    int fl = mw_pyframes_read_str(f->file, file, sizeof file);
    f->gen = gen;
    f->id = 0;
    if (nl < 0 || fl < 0) return 0;
    mw_frame_t fr = {mw_profbuf_intern_str(b, name, (size_t)nl),
                     mw_profbuf_intern_str(b, file, (size_t)fl), f->line, f->first_line};
    f->id = fr.name && fr.file ? mw_profbuf_intern_frame(b, &fr) : 0;
    return f->id;
}

static mw_id_t no_frame(mw_profbuf_t *b) {
    mw_frame_t f = {mw_profbuf_intern_str(b, "[no Python frame]", 17),
                    mw_profbuf_intern_str(b, "", 0), 0, 0};
    return f.name && f.file ? mw_profbuf_intern_frame(b, &f) : 0;
}

int mw_memprof_record(const void *p, uint64_t objects, uint64_t bytes, mw_memframe_t *const *frames,
                      uint32_t depth, const char *thread, uint32_t labelset) {
    mw_id_t ids[MW_MEMPROF_MAX_DEPTH];
    if (depth > MW_MEMPROF_MAX_DEPTH) depth = MW_MEMPROF_MAX_DEPTH;
    int rc = -1;
    pthread_mutex_lock(&g_mu);
    mw_profbuf_t *b = g_buf;
    if (b && p) {
        uint64_t gen = mw_profbuf_generation(b);
        uint32_t n = 0;
        for (uint32_t i = 0; i < depth; i++) {
            mw_id_t id = intern_frame(b, gen, frames[i]);
            if (!id) break;
            ids[n++] = id;
        }
        if (depth == 0 && (ids[0] = no_frame(b)) != 0) n = depth = 1;
        mw_id_t tid = mw_profbuf_intern_str(b, thread ? thread : "", thread ? strlen(thread) : 0);
        int track = g_nlive < LIVE_MAX && live_find((uintptr_t)p) < 0;
        mw_values_t v = {0};
        v.cpu_samples = objects;
        v.cpu_ns = bytes;
        if (track) {
            v.wall_samples = objects;
            v.wall_ns = bytes;
        }
        uint32_t idx = 0;
        if (n == depth && tid && mw_profbuf_add_ex(b, ids, n, tid, labelset, &v, &idx) == 0) {
            rc = 0;
            if (track) {
                uint32_t i = live_slot((uintptr_t)p);
                while (g_live[i].ptr)
                    i = (i + 1) & LIVE_MASK;
                g_live[i] = (live_t){(uintptr_t)p, idx, 0, objects, bytes};
                g_nlive++;
                filter_add((uintptr_t)p);
                atomic_fetch_add_explicit(&g_inuse_bytes, bytes, memory_order_relaxed);
            } else {
                atomic_fetch_add_explicit(&g_overflow, 1, memory_order_relaxed);
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
    atomic_fetch_add_explicit(rc == 0 ? &g_recorded : &g_dropped, 1, memory_order_relaxed);
    return rc;
}

void mw_memprof_untrack(const void *p) {
    pthread_mutex_lock(&g_mu);
    int64_t i = g_live ? live_find((uintptr_t)p) : -1;
    if (i >= 0) {
        live_t e = g_live[i];
        /* unsigned wrap-around: adding -x takes x off */
        mw_values_t v = {0};
        v.wall_samples = (uint64_t)0 - e.objects;
        v.wall_ns = (uint64_t)0 - e.bytes;
        mw_profbuf_add_at(g_buf, e.stack, &v);
        live_delete((uint32_t)i);
        filter_remove((uintptr_t)p);
        atomic_fetch_sub_explicit(&g_inuse_bytes, e.bytes, memory_order_relaxed);
        atomic_fetch_add_explicit(&g_frees, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&g_mu);
}

void mw_memprof_count_dropped(void) {
    atomic_fetch_add_explicit(&g_dropped, 1, memory_order_relaxed);
}

static int pick_nonzero(void *ctx, const mw_stack_t *s, mw_values_t *v) {
    (void)ctx;
    (void)v;
    return s->v.cpu_samples || s->v.cpu_ns || s->v.wall_samples || s->v.wall_ns;
}

static int pick_live(void *ctx, const mw_stack_t *s, mw_values_t *v) {
    (void)ctx;
    v->cpu_samples = v->cpu_ns = 0;
    return s->v.wall_samples || s->v.wall_ns;
}

/* Whether a table of b is over half full. */
static int crowded(const mw_profbuf_t *b) {
    mw_profbuf_limits_t lim;
    mw_profbuf_small_limits(&lim);
    mw_profbuf_counts_t c;
    mw_profbuf_counts(b, &c);
    return c.stacks > lim.max_stacks / 2 || c.frames > lim.max_frames / 2 ||
           c.strings > lim.max_strings / 2 || c.string_bytes_used > lim.string_bytes / 2 ||
           c.frame_slots_used > lim.frame_slots / 2;
}

/* Moves the stacks with live values into the spare, which becomes the buffer. g_mu held. */
static void compact(void) {
    mw_profbuf_reset(g_spare);
    mw_profbuf_merge_pick(g_spare, g_buf, pick_live, NULL, g_remap);
    for (uint32_t i = 0; i < MW_MEMPROF_LIVE_SLOTS; i++) {
        if (!g_live[i].ptr) continue;
        uint32_t to =
            g_live[i].stack < mw_profbuf_nstacks(g_buf) ? g_remap[g_live[i].stack] : UINT32_MAX;
        /* a stack that did not fit (not possible from a buffer at most half full): the entry
         * stays, with no stack to take its values off */
        g_live[i].stack = to;
    }
    mw_profbuf_t *t = g_buf;
    g_buf = g_spare;
    g_spare = t;
    mw_profbuf_reset(g_spare);
    atomic_fetch_add_explicit(&g_compactions, 1, memory_order_relaxed);
}

mw_profbuf_t *mw_memprof_take(void) {
    pthread_mutex_lock(&g_mu);
    mw_profbuf_t *out = NULL;
    if (g_buf && !g_out_busy) {
        out = g_out;
        mw_profbuf_reset(out);
        mw_profbuf_merge_pick(out, g_buf, pick_nonzero, NULL, NULL);
        uint32_t n = mw_profbuf_nstacks(g_buf);
        for (uint32_t i = 0; i < n; i++) {
            mw_values_t v = mw_profbuf_stack(g_buf, i)->v;
            if (!v.cpu_samples && !v.cpu_ns) continue;
            v.cpu_samples = v.cpu_ns = 0;
            mw_profbuf_set_values(g_buf, i, &v);
        }
        if (crowded(g_buf)) compact();
        g_out_busy = 1;
    }
    pthread_mutex_unlock(&g_mu);
    if (out && mw_profbuf_nstacks(out) == 0) {
        mw_memprof_give_back(out);
        return NULL;
    }
    return out;
}

void mw_memprof_give_back(mw_profbuf_t *b) {
    if (!b) return;
    pthread_mutex_lock(&g_mu);
    if (b == g_out) g_out_busy = 0;
    pthread_mutex_unlock(&g_mu);
}

void mw_memprof_get_stats(mw_memprof_stats_t *out) {
    out->samples = atomic_load(&g_samples);
    out->recorded = atomic_load(&g_recorded);
    out->dropped = atomic_load(&g_dropped);
    pthread_mutex_lock(&g_mu);
    out->live = g_nlive;
    pthread_mutex_unlock(&g_mu);
    out->live_overflow = atomic_load(&g_overflow);
    out->frees = atomic_load(&g_frees);
    out->compactions = atomic_load(&g_compactions);
    out->inuse_bytes = atomic_load(&g_inuse_bytes);
    out->rate_bytes = atomic_load(&g_rate);
    out->enabled = (uint64_t)mw_memprof_enabled();
}

static void atfork_prepare(void) {
    pthread_mutex_lock(&g_mu);
}
static void atfork_parent(void) {
    pthread_mutex_unlock(&g_mu);
}
static void atfork_child(void) {
    pthread_mutex_init(&g_mu, NULL);
    /* The live set is the child's too (its heap is a copy); the window's allocations were the
     * parent's. */
    if (g_buf) {
        uint32_t n = mw_profbuf_nstacks(g_buf);
        for (uint32_t i = 0; i < n; i++) {
            mw_values_t v = mw_profbuf_stack(g_buf, i)->v;
            v.cpu_samples = v.cpu_ns = 0;
            mw_profbuf_set_values(g_buf, i, &v);
        }
    }
    g_out_busy = 0;
    g_rng = 0;
    atomic_store(&g_samples, 0);
    atomic_store(&g_recorded, 0);
    atomic_store(&g_dropped, 0);
    atomic_store(&g_overflow, 0);
    atomic_store(&g_frees, 0);
}

void mw_memprof_register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
