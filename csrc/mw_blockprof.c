/* mw_blockprof — the block profile's buffers and its delay sampling (contract: mw_blockprof.h). */
#include "mw_blockprof.h"

#include "mw_rand.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

/* g_mu guards g_active, g_spare, g_spare_out and writes to the active buffer. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static mw_profbuf_t *g_active, *g_spare;
static int g_spare_out; /* the exporter holds g_spare (between rotate and recycle) */

static atomic_int g_enabled;
static _Atomic uint64_t g_rate_ns;
static _Atomic uint64_t g_waits, g_recorded, g_sampled_out, g_dropped, g_wait_ns;

/* Per-thread state of the sampling draws (mw_rand). */
static _Thread_local uint64_t t_rng;

static double uniform(void) {
    return mw_rand_uniform(&t_rng);
}

int mw_blockprof_enable(uint64_t rate_ns) {
    pthread_mutex_lock(&g_mu);
    if (!g_active) {
        mw_profbuf_limits_t lim;
        mw_profbuf_small_limits(&lim);
        mw_profbuf_t *a = mw_profbuf_new(&lim), *s = mw_profbuf_new(&lim);
        if (!a || !s) {
            mw_profbuf_free(a);
            mw_profbuf_free(s);
            pthread_mutex_unlock(&g_mu);
            return -1;
        }
        g_active = a;
        g_spare = s;
    }
    atomic_store(&g_rate_ns, rate_ns);
    atomic_store(&g_enabled, 1);
    pthread_mutex_unlock(&g_mu);
    return 0;
}

void mw_blockprof_disable(void) {
    atomic_store(&g_enabled, 0);
}

int mw_blockprof_enabled(void) {
    return atomic_load_explicit(&g_enabled, memory_order_relaxed);
}

int mw_blockprof_sample(uint64_t delay_ns, uint64_t *contentions, uint64_t *delay_out) {
    if (!mw_blockprof_enabled()) return 0;
    atomic_fetch_add_explicit(&g_waits, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&g_wait_ns, delay_ns, memory_order_relaxed);
    uint64_t rate = atomic_load_explicit(&g_rate_ns, memory_order_relaxed);
    if (delay_ns >= rate) {
        *contentions = 1;
        *delay_out = delay_ns;
        return 1;
    }
    /* Kept with probability d/R, standing for R/d waits of R ns in all. */
    double d = delay_ns ? (double)delay_ns : 1.0;
    if (uniform() * (double)rate >= d) {
        atomic_fetch_add_explicit(&g_sampled_out, 1, memory_order_relaxed);
        return 0;
    }
    double n = (double)rate / d;
    uint64_t whole = (uint64_t)n;
    *contentions = whole + (uniform() < n - (double)whole ? 1 : 0);
    *delay_out = rate;
    return 1;
}

int mw_blockprof_add(mw_strframe_t *const *frames, uint32_t depth, const char *thread,
                     uint32_t labelset, uint64_t contentions, uint64_t delay_ns) {
    mw_id_t ids[MW_BLOCKPROF_MAX_DEPTH];
    if (depth > MW_BLOCKPROF_MAX_DEPTH) depth = MW_BLOCKPROF_MAX_DEPTH;
    int rc = -1;
    pthread_mutex_lock(&g_mu);
    mw_profbuf_t *b = g_active;
    if (b && mw_blockprof_enabled()) {
        uint32_t n = 0;
        uint64_t gen = mw_profbuf_generation(b);
        for (uint32_t i = 0; i < depth; i++) {
            mw_strframe_t *sf = frames[i];
            if (sf->gen != gen || !sf->id) {
                mw_frame_t f = {mw_profbuf_intern_str(b, sf->name, sf->name_len),
                                mw_profbuf_intern_str(b, sf->file, sf->file_len), sf->line,
                                sf->first_line};
                sf->id = f.name && f.file ? mw_profbuf_intern_frame(b, &f) : 0;
                sf->gen = gen;
            }
            if (!sf->id) break;
            ids[n++] = sf->id;
        }
        mw_id_t tid = mw_profbuf_intern_str(b, thread ? thread : "", thread ? strlen(thread) : 0);
        mw_values_t v = {0};
        v.wall_samples = contentions;
        v.wall_ns = delay_ns;
        if (n == depth && tid && mw_profbuf_add(b, ids, n, tid, labelset, &v) == 0) rc = 0;
    }
    pthread_mutex_unlock(&g_mu);
    atomic_fetch_add_explicit(rc == 0 ? &g_recorded : &g_dropped, 1, memory_order_relaxed);
    return rc;
}

void mw_blockprof_count_dropped(void) {
    atomic_fetch_add_explicit(&g_dropped, 1, memory_order_relaxed);
}

mw_profbuf_t *mw_blockprof_rotate(void) {
    pthread_mutex_lock(&g_mu);
    mw_profbuf_t *b = NULL;
    if (g_active && g_spare && !g_spare_out) {
        b = g_active;
        g_active = g_spare;
        g_spare = b;
        g_spare_out = 1;
    }
    pthread_mutex_unlock(&g_mu);
    return b;
}

void mw_blockprof_recycle(mw_profbuf_t *b) {
    if (!b) return;
    mw_profbuf_reset(b);
    pthread_mutex_lock(&g_mu);
    if (b == g_spare) g_spare_out = 0;
    pthread_mutex_unlock(&g_mu);
}

void mw_blockprof_get_stats(mw_blockprof_stats_t *out) {
    out->waits = atomic_load(&g_waits);
    out->recorded = atomic_load(&g_recorded);
    out->sampled_out = atomic_load(&g_sampled_out);
    out->dropped = atomic_load(&g_dropped);
    out->wait_ns = atomic_load(&g_wait_ns);
    out->rate_ns = atomic_load(&g_rate_ns);
    out->enabled = (uint64_t)mw_blockprof_enabled();
}

static void atfork_prepare(void) {
    pthread_mutex_lock(&g_mu);
}
static void atfork_parent(void) {
    pthread_mutex_unlock(&g_mu);
}
static void atfork_child(void) {
    pthread_mutex_init(&g_mu, NULL);
    /* The parent's waits are the parent's to export; the child has no exporter yet. */
    if (g_active) mw_profbuf_reset(g_active);
    if (g_spare) mw_profbuf_reset(g_spare);
    g_spare_out = 0;
    t_rng = 0;
    atomic_store(&g_waits, 0);
    atomic_store(&g_recorded, 0);
    atomic_store(&g_sampled_out, 0);
    atomic_store(&g_dropped, 0);
    atomic_store(&g_wait_ns, 0);
}

void mw_blockprof_register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
