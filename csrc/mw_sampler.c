/* mw_sampler — the sampling thread; see mw_sampler.h for the contract.
 *
 * Per-thread CPU time. Linux encodes a thread's CPU clock as a clockid built from its kernel
 * tid (the MAKE_THREAD_CPUCLOCK encoding: ~tid << 3 | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED), so
 * the sampler can read any thread's CPU time of its own process with clock_gettime() and no
 * pthread handle. A thread that has exited gives EINVAL: it is skipped, never touched. (A tid
 * reused by a new thread in our own process between two ticks would look like a thread whose
 * clock went backwards: that sample gets no CPU time.)
 *
 * The sampler keeps a private table tid → last CPU reading, so each sample carries exactly the
 * CPU nanoseconds consumed since the previous tick: the profile's CPU total equals the CPU
 * time the threads really used, whatever the jitter or a late tick.
 *
 * Waiting: a condition variable on CLOCK_MONOTONIC with an absolute deadline (rather than a bare
 * clock_nanosleep) so that stop() wakes the thread at once.
 */
#define _GNU_SOURCE
#include "mw_sampler.h"

#include "mw_pyframes.h"
#include "mw_saferead.h"
#include "mw_symcache.h"
#include "mw_threads.h"
#include "mw_unwind.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MW_MAX_DEPTH_CAP 4096

typedef struct {
    long tid;        /* 0 = free */
    uint64_t cpu_ns; /* last reading */
    uint64_t tick;   /* last tick the thread was seen */
    uint32_t name_seq;
    uint64_t name_gen; /* buffer generation the cached name id belongs to */
    mw_id_t name_id;
} mw_tstate_t;

#define TS_SLOTS (2 * MW_MAX_THREADS)

static pthread_mutex_t g_buf_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_ctl_lock = PTHREAD_MUTEX_INITIALIZER; /* guards g_stop/cond */
static pthread_cond_t g_cond;
static pthread_t g_thread;
static atomic_int g_running;
static int g_stop;
static int g_joinable; /* a started thread has not been joined yet */
static mw_sampler_config_t g_cfg;
static mw_profbuf_t *g_active;
static int64_t g_window_start_ns;
static mw_sampler_stats_t g_stats; /* written by the sampler thread; read racily for stats */

/* Sampler-thread-private state. */
static mw_tstate_t *g_ts;
static mw_pythread_t *g_threads;
static mw_rawframe_t *g_raw;
static mw_id_t *g_ids;
static mw_readcache_t *g_rc;
static uint64_t g_tick;
static int64_t g_last_tick_ns;
static uint64_t g_rng = 0x9E3779B97F4A7C15ULL;

int64_t mw_now_realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t mw_now_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int thread_cpu_ns(long tid, uint64_t *out) {
    clockid_t cid = (clockid_t)((~(unsigned int)tid) << 3) | 6;
    struct timespec ts;
    if (clock_gettime(cid, &ts) != 0) return -1;
    *out = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    return 0;
}

static mw_tstate_t *ts_find(long tid, int *created) {
    uint32_t h = (uint32_t)((unsigned long)tid * 2654435761u);
    *created = 0;
    for (uint32_t k = 0; k < TS_SLOTS; k++) {
        mw_tstate_t *s = &g_ts[(h + k) & (TS_SLOTS - 1)];
        if (s->tid == tid) return s;
        if (s->tid == 0) {
            memset(s, 0, sizeof *s);
            s->tid = tid;
            *created = 1;
            return s;
        }
    }
    return NULL;
}

/* Drops entries of threads not seen in the last few ticks (rebuilds the table). */
static void ts_prune(void) {
    static mw_tstate_t *tmp;
    if (!tmp) tmp = malloc(TS_SLOTS * sizeof *tmp);
    if (!tmp) return;
    memcpy(tmp, g_ts, TS_SLOTS * sizeof *tmp);
    memset(g_ts, 0, TS_SLOTS * sizeof *g_ts);
    for (uint32_t i = 0; i < TS_SLOTS; i++) {
        if (tmp[i].tid == 0 || tmp[i].tick + 2 < g_tick) continue;
        int c;
        mw_tstate_t *s = ts_find(tmp[i].tid, &c);
        if (s) *s = tmp[i];
    }
}

static mw_id_t thread_name_id(mw_profbuf_t *b, mw_tstate_t *st, uint32_t *labelset) {
    char name[MW_THREAD_NAME_MAX];
    uint32_t seq;
    *labelset = mw_threads_lookup(st->tid, name, sizeof name, &seq);
    uint64_t gen = mw_profbuf_generation(b);
    if (st->name_id && st->name_gen == gen && st->name_seq == seq) return st->name_id;
    if (name[0] == '\0') snprintf(name, sizeof name, "thread-%ld", st->tid);
    st->name_id = mw_profbuf_intern_str(b, name, strlen(name));
    st->name_gen = gen;
    st->name_seq = seq;
    return st->name_id;
}

static void sample_thread(mw_profbuf_t *b, const mw_pythread_t *th, int64_t now, int first_tick) {
    uint64_t cpu = 0, dcpu = 0;
    int have_cpu = th->tid > 0 && thread_cpu_ns(th->tid, &cpu) == 0;
    if (th->tid > 0 && !have_cpu) {
        g_stats.threads_gone++;
        return;
    }
    mw_tstate_t *st = NULL;
    int created = 0;
    if (th->tid > 0) {
        st = ts_find(th->tid, &created);
        if (!st) {
            g_stats.dropped++;
            return;
        }
        /* A thread first seen after the first tick was born since the previous tick: all
         * its CPU time is new. Threads alive at start only count from now on. */
        if (created)
            dcpu = first_tick ? 0 : cpu;
        else
            dcpu = cpu > st->cpu_ns ? cpu - st->cpu_ns : 0;
        st->cpu_ns = cpu;
        st->tick = g_tick;
    }
    uint64_t dwall =
        first_tick ? (uint64_t)(1000000000LL / g_cfg.rate_hz) : (uint64_t)(now - g_last_tick_ns);

    /* The thread runs on while we walk its frames: a labels block entered or left during the
     * walk would pair a stack from one side with labels from the other. The label set's change
     * counter is read before and after; a sample that straddles a change carries no labels
     * (counted). */
    uint32_t labels_seq = st ? mw_threads_labelset_seq(st->tid) : 0;
    int truncated = 0;
    mw_readcache_reset(g_rc);
    /* Native frames (mw_unwind, opt-in): between capture and release the thread waits in its
     * signal handler, so its native and Python stacks describe the same instant. */
    uintptr_t top = th->top_frame;
    /* The top-frame pointer is as old as the thread list; for a thread that uses labels, take a
     * fresh one read after the label counter, so the stack is not older than the labels. */
    if (labels_seq && top) top = mw_pyframes_top_frame(th->tstate);
    int native = top && mw_unwind_enabled() && mw_unwind_capture(th->tid, th->tstate, &top) == 0;
    int depth = top ? mw_pyframes_walk(g_rc, top, g_raw, g_cfg.max_depth, &truncated) : 0;
    if (native) mw_unwind_release();
    /* A running thread calls and returns while we read it: a walk that found no frame or broke
     * off (the newest frame was being pushed or popped) is retried from a fresh top-frame
     * pointer, at most twice. (Native mode pauses the thread, so it needs no retry.) */
    for (int retry = 0;
         !native && top && (depth == 0 || (truncated && depth < g_cfg.max_depth)) && retry < 2;
         retry++) {
        uintptr_t fresh = mw_pyframes_top_frame(th->tstate);
        if (!fresh) break;
        g_stats.walk_retries++;
        mw_readcache_reset(g_rc);
        truncated = 0;
        depth = mw_pyframes_walk(g_rc, fresh, g_raw, g_cfg.max_depth, &truncated);
    }
    if (truncated) g_stats.truncated++;
    if (depth == 0 && dcpu == 0) return; /* idle thread without Python frames: nothing to say */

    uint32_t n = 0;
    if (native) /* native and Python frames spliced, leaf first */
        n = mw_unwind_combine(b, g_raw, depth, g_ids, MW_MAX_DEPTH_CAP);
    else
        for (int i = 0; i < depth; i++) {
            mw_id_t id = mw_symcache_frame(b, &g_raw[i]);
            if (id) g_ids[n++] = id;
        }
    if (n == 0) {
        /* No readable Python frame: still account the CPU time, under a marker frame. */
        mw_id_t name = mw_profbuf_intern_str(b, "[no Python frame]", 17);
        mw_id_t file = mw_profbuf_intern_str(b, "", 0);
        mw_frame_t f = {name, file, 0, 0};
        mw_id_t id = name && file ? mw_profbuf_intern_frame(b, &f) : 0;
        if (!id) {
            g_stats.dropped++;
            return;
        }
        g_ids[n++] = id;
    }
    uint32_t labelset = 0;
    mw_id_t thread = 0;
    if (st) thread = thread_name_id(b, st, &labelset);
    if (st && mw_threads_labelset_seq(st->tid) != labels_seq) {
        g_stats.label_races++;
        labelset = 0;
    }
    mw_values_t v = {dcpu > 0, dcpu, 1, dwall};
    if (mw_profbuf_add(b, g_ids, n, thread, labelset, &v) != 0) {
        g_stats.dropped++;
        g_stats.overflow++;
        return;
    }
    g_stats.samples++;
    if (dcpu) g_stats.cpu_samples++;
}

static void tick(void) {
    int64_t now = mw_now_monotonic_ns();
    int first = g_tick == 0;
    int n = mw_pyframes_threads(g_threads, MW_MAX_THREADS);
    if (n < 0) {
        g_stats.torn_reads++;
        return;
    }
    g_tick++;
    pthread_mutex_lock(&g_buf_lock);
    for (int i = 0; i < n; i++)
        sample_thread(g_active, &g_threads[i], now, first);
    pthread_mutex_unlock(&g_buf_lock);
    g_stats.threads_seen = (uint64_t)n;
    g_last_tick_ns = now;
    if ((g_tick & 63) == 0) ts_prune();
}

static void sampler_cpu_update(void) {
    struct timespec cpu;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
    g_stats.sampler_cpu_ns = (uint64_t)cpu.tv_sec * 1000000000ULL + (uint64_t)cpu.tv_nsec;
}

static uint64_t rng_next(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static void *sampler_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "mw-sampler");
    int64_t period = 1000000000LL / g_cfg.rate_hz;
    int64_t next = mw_now_monotonic_ns();
    g_rng ^= (uint64_t)next;
    for (;;) {
        int64_t jitter = (int64_t)(rng_next() % (uint64_t)(2 * period * MW_JITTER_PCT / 100 + 1)) -
                         period * MW_JITTER_PCT / 100;
        next += period + jitter;
        struct timespec ts = {next / 1000000000LL, next % 1000000000LL};
        pthread_mutex_lock(&g_ctl_lock);
        while (!g_stop && pthread_cond_timedwait(&g_cond, &g_ctl_lock, &ts) != ETIMEDOUT) {
        }
        int stop = g_stop;
        pthread_mutex_unlock(&g_ctl_lock);
        if (stop || mw_pyframes_finalizing()) break;

        int64_t t0 = mw_now_monotonic_ns();
        if (t0 - next > period) {
            g_stats.late_ticks++;
            next = t0; /* do not try to catch up with a burst of ticks */
        }
        tick();
        int64_t took = mw_now_monotonic_ns() - t0;
        if ((uint64_t)took > g_stats.tick_ns_max) g_stats.tick_ns_max = (uint64_t)took;
        g_stats.ticks++;
        if ((g_stats.ticks & 15) == 0) sampler_cpu_update(); /* a system call: not every tick */
    }
    sampler_cpu_update();
    atomic_store(&g_running, 0);
    return NULL;
}

mw_profbuf_t *mw_sampler_new_buffer(void) {
    return mw_profbuf_new(&g_cfg.limits);
}

static int alloc_private(void) {
    if (!g_ts) g_ts = calloc(TS_SLOTS, sizeof *g_ts);
    if (!g_threads) g_threads = calloc(MW_MAX_THREADS, sizeof *g_threads);
    if (!g_raw) g_raw = calloc(MW_MAX_DEPTH_CAP, sizeof *g_raw);
    if (!g_ids) g_ids = calloc(MW_MAX_DEPTH_CAP, sizeof *g_ids);
    if (!g_rc) g_rc = malloc(sizeof *g_rc);
    if (g_rc) mw_readcache_reset(g_rc);
    return (g_ts && g_threads && g_raw && g_ids && g_rc && mw_symcache_init() == 0) ? 0 : -1;
}

int mw_sampler_start(const mw_sampler_config_t *cfg, const char **why) {
    if (atomic_load(&g_running)) return 1;
    if (mw_saferead_init() != 0) {
        *why = "process_vm_readv is not usable (seccomp or kernel policy)";
        return -1;
    }
    g_cfg = *cfg;
    if (g_cfg.rate_hz < 1) g_cfg.rate_hz = 1;
    if (g_cfg.rate_hz > 10000) g_cfg.rate_hz = 10000;
    if (g_cfg.max_depth < 1 || g_cfg.max_depth > MW_MAX_DEPTH_CAP)
        g_cfg.max_depth = MW_MAX_DEPTH_CAP;
    if (alloc_private() != 0) {
        *why = "out of memory";
        return -1;
    }
    pthread_mutex_lock(&g_buf_lock);
    if (!g_active) {
        g_active = mw_profbuf_new(&g_cfg.limits);
        g_window_start_ns = mw_now_realtime_ns();
    }
    pthread_mutex_unlock(&g_buf_lock);
    if (!g_active) {
        *why = "out of memory";
        return -1;
    }
    memset(g_ts, 0, TS_SLOTS * sizeof *g_ts);
    g_tick = 0;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g_cond, &ca);
    pthread_condattr_destroy(&ca);
    g_stop = 0;

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    atomic_store(&g_running, 1);
    int rc = pthread_create(&g_thread, NULL, sampler_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        atomic_store(&g_running, 0);
        *why = strerror(rc);
        return -1;
    }
    g_joinable = 1;
    return 0;
}

void mw_sampler_stop(void) {
    pthread_mutex_lock(&g_ctl_lock);
    g_stop = 1;
    pthread_cond_broadcast(&g_cond);
    pthread_mutex_unlock(&g_ctl_lock);
    if (g_joinable) {
        pthread_join(g_thread, NULL);
        g_joinable = 0;
    }
    atomic_store(&g_running, 0);
}

int mw_sampler_running(void) {
    return atomic_load(&g_running);
}
int mw_sampler_rate(void) {
    return g_cfg.rate_hz;
}

mw_profbuf_t *mw_sampler_swap(mw_profbuf_t *fresh, int64_t *t_start, int64_t *t_end) {
    pthread_mutex_lock(&g_buf_lock);
    mw_profbuf_t *old = g_active;
    int64_t now = mw_now_realtime_ns();
    *t_start = g_window_start_ns;
    *t_end = now;
    g_active = fresh;
    g_window_start_ns = now;
    pthread_mutex_unlock(&g_buf_lock);
    return old;
}

void mw_sampler_with_active(void (*fn)(const mw_profbuf_t *, void *), void *arg) {
    pthread_mutex_lock(&g_buf_lock);
    if (g_active) fn(g_active, arg);
    pthread_mutex_unlock(&g_buf_lock);
}

void mw_sampler_get_stats(mw_sampler_stats_t *out) {
    *out = g_stats;
    out->saferead_failures = mw_saferead_failures();
}

/* Fork handling: the parent holds both locks across fork() so the child never inherits a lock
 * held by the sampler mid-tick; the child has no sampler thread and starts from empty state. */
static void atfork_prepare(void) {
    pthread_mutex_lock(&g_ctl_lock);
    pthread_mutex_lock(&g_buf_lock);
}
static void atfork_parent(void) {
    pthread_mutex_unlock(&g_buf_lock);
    pthread_mutex_unlock(&g_ctl_lock);
}
static void atfork_child(void) {
    pthread_mutex_init(&g_buf_lock, NULL);
    pthread_mutex_init(&g_ctl_lock, NULL);
    atomic_store(&g_running, 0);
    g_joinable = 0;
    g_stop = 1;
    if (g_active) mw_profbuf_reset(g_active);
    g_window_start_ns = mw_now_realtime_ns();
    memset(&g_stats, 0, sizeof g_stats);
    mw_threads_reset_after_fork();
}

void mw_sampler_register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
