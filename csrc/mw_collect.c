/* mw_collect — see mw_collect.h. */
#include "mw_collect.h"

#include "mw_labels.h"
#include "mw_sampler.h"

#include <pthread.h>
#include <stdatomic.h>

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static mw_profbuf_t *g_cumulative, *g_spare;
static atomic_uint_fast64_t g_overflow;
static mw_stamp_t g_start; /* see mw_collect_start_ns */

int mw_collect_init(void) {
    pthread_mutex_lock(&g_lock);
    if (!g_cumulative) {
        g_cumulative = mw_sampler_new_buffer();
        g_start = mw_stamp_now();
    }
    if (!g_spare) g_spare = mw_sampler_new_buffer();
    int ok = g_cumulative && g_spare;
    pthread_mutex_unlock(&g_lock);
    return ok ? 0 : -1;
}

mw_profbuf_t *mw_collect_rotate(int64_t *t_start, int64_t *t_end) {
    pthread_mutex_lock(&g_lock);
    mw_profbuf_t *out = NULL;
    if (!g_spare) g_spare = mw_sampler_new_buffer(); /* e.g. a fork child whose spare was away */
    if (g_spare && g_cumulative) {
        mw_labels_window_rotated(); /* before the swap: a span set released now waits for it */
        out = mw_sampler_swap(g_spare, t_start, t_end);
        g_spare = NULL;
        if (out) atomic_fetch_add(&g_overflow, mw_profbuf_merge(g_cumulative, out));
    }
    pthread_mutex_unlock(&g_lock);
    return out;
}

void mw_collect_recycle(mw_profbuf_t *b) {
    mw_profbuf_reset(b);
    pthread_mutex_lock(&g_lock);
    if (!g_spare)
        g_spare = b;
    else
        mw_profbuf_free(b);
    pthread_mutex_unlock(&g_lock);
}

void mw_collect_visit(void (*fn)(const mw_profbuf_t *, void *), void *arg) {
    pthread_mutex_lock(&g_lock);
    if (g_cumulative) fn(g_cumulative, arg);
    mw_sampler_with_active(fn, arg);
    pthread_mutex_unlock(&g_lock);
}

static void reset_active(const mw_profbuf_t *b, void *arg) {
    (void)arg;
    mw_profbuf_reset((mw_profbuf_t *)b);
}

void mw_collect_reset(int also_active) {
    pthread_mutex_lock(&g_lock);
    if (g_cumulative) mw_profbuf_reset(g_cumulative);
    g_start = mw_stamp_now();
    if (also_active) mw_sampler_with_active(reset_active, NULL);
    pthread_mutex_unlock(&g_lock);
}

uint64_t mw_collect_overflow(void) {
    return atomic_load(&g_overflow);
}
int64_t mw_collect_start_ns(void) {
    return mw_window_start(g_start, mw_stamp_now());
}

static void atfork_prepare(void) {
    pthread_mutex_lock(&g_lock);
}
static void atfork_parent(void) {
    pthread_mutex_unlock(&g_lock);
}
static void atfork_child(void) {
    pthread_mutex_init(&g_lock, NULL);
    /* The parent's samples are the parent's to export. */
    if (g_cumulative) mw_profbuf_reset(g_cumulative);
    g_start = mw_stamp_now();
    atomic_store(&g_overflow, 0);
}

void mw_collect_register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
