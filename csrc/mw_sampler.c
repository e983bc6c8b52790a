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

#include "mw_cputimer.h"
#include "mw_pyframes.h"
#include "mw_report.h"
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
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MW_MAX_DEPTH_CAP 4096

typedef struct {
    /* What a quiet tick looks at, first: one cache line per idle thread per tick. */
    long tid;              /* 0 = free */
    uint64_t tick;         /* last tick the thread was seen */
    uint64_t stack_gen;    /* buffer generation of the remembered stack entry */
    uint64_t active_until; /* read in full on every tick until then: it used CPU recently */
    int stack_valid;       /* the remembered entry may be reused (1 Python-only, 2 native) */
    int quiet;             /* its quiet-tick wall time is owed to the remembered entry */
    int reg;               /* CPU timer (mw_cputimer) registration + 1, 0 = none */
    uint64_t cpu_ns;       /* CPU clock at the start of the last read */
    uint64_t cpu_end;      /* CPU clock right after the last proven read (stack reuse) */
    uint64_t pending;      /* CPU ns used while the thread had no on-CPU sample in the window */
    uint64_t hit_gen;      /* buffer generation in which the thread had an on-CPU sample */
    uint32_t name_seq;
    uint64_t name_gen; /* buffer generation the cached name id belongs to */
    mw_id_t name_id;
    /* The last sample's stack entry, reused while the thread has not run since. */
    uint32_t stack_idx;
    uint32_t stack_labels; /* label-set change counter when it was read */
    mw_id_t stack_thread;
    uint32_t stack_labelset;
    uint64_t py_hash; /* the remembered sample's Python frames (native reuse check) */
    /* Quiet: counted from the global quiet totals at the time it went quiet (see tick()). */
    uint64_t qbase_wall, qbase_n;
    /* The thread state the CPU timer was armed for; wall time of ticks that found the thread
     * running, owed to its next CPU sample. */
    int arm_failed;
    int timer_born;     /* first met through a CPU-timer sample, before any tick read it */
    uint64_t credit_ns; /* CPU already credited from such samples, not yet met by the clock */
    uintptr_t reg_tstate;
    uint64_t owed_wall, owed_n;
    /* The last CPU-timer sample's entry: the next one with the same raw stack goes to it. */
    int list_idx; /* its index in the last full thread list (quiet ticks) */
    uint64_t timed_hash, timed_gen;
    uint32_t timed_idx;
    mw_id_t timed_thread;
} mw_tstate_t;

#define TS_SLOTS (2 * MW_MAX_THREADS)
static void wake(mw_tstate_t *st); /* quiet ticks: see tick() */
#define ACTIVE_TICKS 8             /* a thread that used CPU is read in full for this many ticks */

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
static mw_rawframe_t *g_raw, *g_raw2;
static mw_id_t *g_ids;
static const mw_symentry_t **g_sym;
static mw_readcache_t *g_rc;
/* Direct reads: the sampler reads other threads' memory with plain loads under this guard
 * (mw_saferead_direct_begin) while our fault handler is the installed one, instead of one
 * process_vm_readv per read (MW_PROFILING_DIRECT_READS=0: system calls only). */
static mw_guard_t g_sguard;
static int g_direct;             /* the guard is registered and direct reads are allowed */
static int g_can_pause;          /* the pause handler is installed (mw_unwind_setup) */
static int g_timers;             /* CPU samples come from the threads' CPU timers (mw_cputimer) */
static int g_timers_armed;       /* some thread may hold a timer */
static int g_tick_hz;            /* ticks per second: rate_hz, at most MW_WALL_HZ with timers */
static mw_gilstate_t g_gil_tick; /* GIL state read before the current thread's walk */
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
/* Zeroes memory, handing whole pages back to the kernel (they read back as zeros), so a big
 * table is resident only where it is in use. */
static void zero_pages(void *p, size_t len) {
    uintptr_t a = (uintptr_t)p, lo = (a + 4095) & ~(uintptr_t)4095,
              hi = (a + len) & ~(uintptr_t)4095;
    if (hi > lo + 4096 && madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0) {
        memset(p, 0, lo - a);
        memset((void *)hi, 0, a + len - hi);
        return;
    }
    memset(p, 0, len);
}

/* Drops entries of threads not seen in the last few ticks (rebuilds the table). */
static void ts_prune(void) {
    static mw_tstate_t *tmp;
    if (!tmp) tmp = malloc(TS_SLOTS * sizeof *tmp); /* only the prefix in use is touched */
    if (!tmp) return;
    uint32_t live = 0;
    for (uint32_t i = 0; i < TS_SLOTS; i++) {
        if (g_ts[i].tid == 0) continue;
        if (g_ts[i].tick + 2 < g_tick) { /* gone: CPU it used after its last on-CPU sample */
            g_stats.cpu_unattributed_ns += g_ts[i].pending;
            g_stats.wall_unattributed_ns += g_ts[i].owed_wall;
            if (g_ts[i].reg) mw_cputimer_disarm(g_ts[i].reg - 1);
            continue;
        }
        tmp[live++] = g_ts[i];
    }
    zero_pages(g_ts, TS_SLOTS * sizeof *g_ts);
    for (uint32_t i = 0; i < live; i++) {
        int c;
        mw_tstate_t *st = ts_find(tmp[i].tid, &c);
        if (st) *st = tmp[i];
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

/* CPU per window, per thread name. A thread's CPU time is exact (its CPU clock), but where it
 * was spent is only known at its on-CPU samples. At the end of a window (and for a snapshot)
 * each thread's CPU of the window is split over its on-CPU samples of the window in
 * proportion to their counts: a ratio estimator, unbiased as the samples are, with the exact
 * total. Threads with the same name share one row. Sampler thread (ticks) and the swap/snapshot
 * side, both under the buffer lock. */
#define WIN_SLOTS (2 * MW_MAX_THREADS)
typedef struct {
    uint64_t gen; /* buffer generation the row belongs to (0 = free) */
    mw_id_t thread;
    uint64_t cpu_ns, hits;
} cpu_window_t;
static cpu_window_t *g_win;

static cpu_window_t *cpu_window_row(mw_id_t thread, uint64_t gen, int create) {
    uint32_t h = (uint32_t)(thread * 2654435761u);
    for (uint32_t k = 0; k < WIN_SLOTS; k++) {
        cpu_window_t *w = &g_win[(h + k) & (WIN_SLOTS - 1)];
        if (w->gen == gen && w->thread == thread) return w;
        if (w->gen != gen) { /* free, or left over from an older window */
            if (!create) return NULL;
            w->gen = gen;
            w->thread = thread;
            w->cpu_ns = w->hits = 0;
            return w;
        }
    }
    return NULL;
}

static void cpu_window_add(mw_id_t thread, uint64_t gen, uint64_t cpu_ns, uint64_t hits) {
    cpu_window_t *w = g_win ? cpu_window_row(thread, gen, 1) : NULL;
    if (!w) {
        g_stats.cpu_unattributed_ns += cpu_ns;
        return;
    }
    w->cpu_ns += cpu_ns;
    w->hits += hits;
}

/* Writes every on-CPU stack's CPU time: its share of its thread's window CPU. Idempotent. */
static void cpu_window_finalize(mw_profbuf_t *b) {
    if (!g_win || !b) return;
    uint64_t gen = mw_profbuf_generation(b);
    uint32_t n = mw_profbuf_nstacks(b);
    for (uint32_t i = 0; i < n; i++) {
        mw_stack_t *s = (mw_stack_t *)mw_profbuf_stack(b, i);
        if (!s->v.cpu_samples) continue;
        cpu_window_t *w = cpu_window_row(s->thread, gen, 0);
        s->v.cpu_ns =
            w && w->hits ? (uint64_t)((__uint128_t)w->cpu_ns * s->v.cpu_samples / w->hits) : 0;
    }
}

/* One read of a thread's Python frames, names included: walks from a fresh top-frame pointer
 * and resolves every frame in the symbol cache (names and line tables of cache misses are
 * copied now, while the code objects are alive). Returns the depth; *ok = 0 when a frame could
 * not be resolved. */
static int read_stack(uintptr_t tstate, int *truncated, int *ok) {
    *ok = 1;
    *truncated = 0;
    mw_readcache_reset(g_rc);
    mw_symcache_begin();
    uintptr_t anchor = 0;
    uintptr_t top = mw_pyframes_top_frame_anchored(tstate, &anchor);
    if (!top) return 0;
    int depth = mw_pyframes_walk(g_rc, NULL, top, anchor, g_raw, g_cfg.max_depth, truncated);
    uint64_t epoch = mw_symcache_epoch();
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < depth; i++) {
            g_sym[i] = mw_symcache_resolve(&g_raw[i]);
            if (!g_sym[i]) *ok = 0;
        }
        if (mw_symcache_epoch() == epoch) break;
        /* The cache was emptied midway (full): earlier handles are gone, resolve again. */
        epoch = mw_symcache_epoch();
        *ok = 1;
    }
    return depth;
}

static uint64_t raw_hash(int depth) {
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < depth; i++) {
        h = (h ^ g_raw[i].code) * 1099511628211ULL;
        h = (h ^ (uint64_t)(uint32_t)g_raw[i].lasti) * 1099511628211ULL;
    }
    return h ^ (uint64_t)depth;
}

static void remember_stack(mw_tstate_t *st, uint64_t gen, uint32_t idx, uint32_t labels_seq,
                           mw_id_t thread, uint32_t labelset, uint64_t cpu_end, int native,
                           uint64_t py_hash) {
    st->cpu_end = cpu_end;
    st->stack_valid = native ? 2 : 1;
    st->stack_gen = gen;
    st->stack_idx = idx;
    st->stack_labels = labels_seq;
    st->stack_thread = thread;
    st->stack_labelset = labelset;
    st->py_hash = py_hash;
}

/* Adds wall time to the thread's remembered entry when it still describes the thread. */
static int reuse_stack(mw_profbuf_t *b, mw_tstate_t *st, uint64_t gen, uint32_t labels_seq,
                       uint64_t dwall) {
    if (!st->stack_valid || st->stack_gen != gen || labels_seq != st->stack_labels) return 0;
    uint32_t labelset;
    mw_id_t thread = thread_name_id(b, st, &labelset);
    if (thread != st->stack_thread || labelset != st->stack_labelset) return 0;
    mw_values_t v = {0, 0, 1, dwall};
    if (mw_profbuf_add_at(b, st->stack_idx, &v) != 0) return 0;
    g_stats.samples++;
    g_stats.reused++;
    return 1;
}

/* Wall time of quiet ticks (see tick()): totals over all quiet ticks so far; a quiet thread
 * owes its remembered entry the difference since it went quiet. Buffer lock held. */
static uint64_t g_quiet_wall, g_quiet_n;

static void quiet_flush(mw_profbuf_t *b, mw_tstate_t *st) {
    if (!st->quiet) return;
    st->quiet = 0;
    uint64_t n = g_quiet_n - st->qbase_n;
    if (!n) return;
    mw_values_t v = {0, 0, n, g_quiet_wall - st->qbase_wall};
    /* A window that was reset since (snapshot(reset=True)) took that wall time with it. */
    if (st->stack_gen == mw_profbuf_generation(b) && mw_profbuf_add_at(b, st->stack_idx, &v) == 0) {
        g_stats.samples += n;
        g_stats.reused += n;
        g_stats.quiet += n;
    }
}

/* Settles every quiet thread's wall time into buffer b (before it is handed out or read). */
static void quiet_flush_all(mw_profbuf_t *b) {
    if (!g_ts || !b) return;
    for (uint32_t i = 0; i < TS_SLOTS; i++) {
        mw_tstate_t *st = &g_ts[i];
        if (st->tid && st->quiet) quiet_flush(b, st); /* the next quiet tick starts it again */
    }
}

/* The handlers' set of named code objects follows the symbol cache: emptied with it. */
static uint64_t g_known_epoch;
static void known_sync(void) {
    uint64_t e = mw_symcache_epoch();
    if (e != g_known_epoch) {
        mw_cputimer_known_clear();
        g_known_epoch = e;
    }
}

/* The marker frame of CPU used outside any Python frame (thread start or end, pure C). */
static mw_id_t no_frame_id(mw_profbuf_t *b) {
    mw_id_t name = mw_profbuf_intern_str(b, "[no Python frame]", 17);
    mw_id_t file = mw_profbuf_intern_str(b, "", 0);
    mw_frame_t f = {name, file, 0, 0};
    return name && file ? mw_profbuf_intern_frame(b, &f) : 0;
}

/* A stack with no readable Python frame (g_ids empty) gets the marker frame, so its CPU time
 * still counts. 0 when the buffer cannot take the marker. */
static int mark_if_empty(mw_profbuf_t *b, uint32_t *n) {
    if (*n) return 1;
    mw_id_t id = no_frame_id(b);
    if (!id) return 0;
    g_ids[(*n)++] = id;
    return 1;
}

/* Interns raw frames [0..depth), named in g_sym, into g_ids (leaf first); a recursion's frame
 * repeated at the same instruction is interned once. Returns the number of ids. */
static uint32_t intern_frames(mw_profbuf_t *b, const mw_rawframe_t *raw, int depth) {
    uint32_t n = 0;
    mw_id_t prev = 0;
    for (int i = 0; i < depth; i++) {
        mw_id_t id = i > 0 && g_sym[i] == g_sym[i - 1] && raw[i].lasti == raw[i - 1].lasti
                         ? prev
                         : mw_symcache_intern(b, g_sym[i], raw[i].lasti);
        if (id) g_ids[n++] = id;
        prev = id;
    }
    return n;
}

/* Tells the CPU-timer handlers that these frames' code objects are named (g_sym resolved). */
static void mark_known(const mw_rawframe_t *raw, int depth) {
    known_sync();
    for (int i = 0; i < depth; i++)
        if (i == 0 || g_sym[i] != g_sym[i - 1])
            mw_cputimer_known_add(mw_cputimer_code_key(&raw[i]));
}

/* Adds a proven read of st's Python frames (g_raw/g_sym[0..depth), read between CPU clock
 * readings c0 and c1) as a sample: wall time dwall, and an on-CPU sample when on_cpu. native:
 * the thread is paused in mw_unwind's handler with its native stack captured. */
static void emit(mw_profbuf_t *b, mw_tstate_t *st, int depth, int truncated, int ok, int on_cpu,
                 int native, uint32_t labels_seq, uint64_t dwall, uint64_t c0, uint64_t c1,
                 uint64_t gen) {
    if (truncated) g_stats.truncated++;
    uint64_t py_hash = raw_hash(depth);
    uint32_t n = 0;
    if (native) { /* native and Python frames spliced, leaf first */
        mw_unwind_release();
        n = ok ? mw_unwind_combine(b, g_raw, depth, g_ids, MW_MAX_DEPTH_CAP) : 0;
    } else if (ok) {
        n = intern_frames(b, g_raw, depth);
        if (g_timers) mark_known(g_raw, depth);
    }
    if (!ok) {
        /* A frame whose names could not be read: the sample would be a partial stack. (A thread
         * that ended meanwhile took its frames with it: that is not a lost sample.) */
        uint64_t c;
        if (thread_cpu_ns(st->tid, &c) != 0)
            g_stats.threads_gone++;
        else
            g_stats.dropped++;
        return;
    }
    if (depth == 0 && n == 0 && !on_cpu) return; /* not running, no Python frame */
    if (!mark_if_empty(b, &n)) {
        g_stats.dropped++;
        return;
    }
    uint32_t labelset = 0;
    mw_id_t thread = thread_name_id(b, st, &labelset);
    uint32_t labels_after = mw_threads_labelset_seq(st->tid);
    if (labels_after != labels_seq) {
        g_stats.label_races++;
        labelset = 0;
    }
    /* CPU goes only to samples taken while the thread was on CPU: its clock moved across the
     * read, or it was found running and paused. Such samples fall uniformly over the thread's
     * CPU time, so stacks are drawn in proportion to where CPU was used; the CPU time itself is
     * given to them at the end of the window (cpu_window_finalize). */
    mw_values_t v = {(uint64_t)on_cpu, 0, 1, dwall};
    uint32_t idx = 0;
    if (mw_profbuf_add_ex(b, g_ids, n, thread, labelset, &v, &idx) != 0) {
        g_stats.dropped++;
        g_stats.overflow++;
        return;
    }
    g_stats.samples++;
    if (on_cpu) {
        g_stats.cpu_samples++;
        cpu_window_add(thread, gen, st->pending, 1);
        st->pending = 0;
        st->hit_gen = gen;
    }
    /* Reusable while the thread does not run. Python-only: only when the read itself saw it
     * not running. Native: when it was not running when asked (the handler's own CPU use makes
     * its clock move: the Python frames decide at the next tick, see above). */
    if (labels_after == labels_seq && !on_cpu) {
        if (!native && c1 == c0)
            remember_stack(st, gen, idx, labels_seq, thread, labelset, c1, 0, py_hash);
        else if (native)
            remember_stack(st, gen, idx, labels_seq, thread, labelset, UINT64_MAX, 1, py_hash);
    }
}

/* A thread with a CPU timer (mw_cputimer): its CPU samples come from its own timer, so the tick
 * only places its wall time. Not running: its frames are read and kept when proven (clock
 * unchanged, or the GIL never reached it), as a wall-only sample. Running Python: reading it
 * would need a pause; instead the tick's wall time is owed to its next CPU sample (it is on
 * CPU, and its CPU samples are where its running time goes). */
static void owe(mw_tstate_t *st, uint64_t dwall) {
    st->owed_wall += dwall;
    st->owed_n++;
    g_stats.owed++;
}

static mw_tstate_t *sample_timed(mw_profbuf_t *b, const mw_pythread_t *th, mw_tstate_t *st,
                                 uint64_t gen, uint32_t labels_seq, uint64_t dwall, uint64_t c0) {
    uintptr_t tstate = th->tstate;
    if (g_gil_tick.ok && g_gil_tick.last_holder == tstate) {
        uint64_t c;
        if (thread_cpu_ns(th->tid, &c) == 0 && c > c0) {
            owe(st, dwall);
            return st;
        }
    }
    int truncated = 0, ok = 0;
    mw_gilstate_t g0 = g_gil_tick;
    int depth = read_stack(tstate, &truncated, &ok);
    uint64_t c1;
    if (thread_cpu_ns(th->tid, &c1) != 0) {
        mw_symcache_abort();
        g_stats.threads_gone++;
        return st;
    }
    int proven = 0;
    if (truncated == 2) {
        g_stats.torn_reads++;
    } else if (c1 == c0) {
        proven = 1;
    } else {
        mw_gilstate_t g1;
        mw_pyframes_gil(&g1);
        proven = g0.ok && g1.ok && g1.switch_number == g0.switch_number && g1.last_holder != tstate;
        g_gil_tick = g1;
    }
    if (!proven) {
        mw_symcache_abort();
        owe(st, dwall);
        return st;
    }
    emit(b, st, depth, truncated, ok, 0, 0, labels_seq, dwall, c0, c1, gen);
    return st;
}

static void timed_account(mw_tstate_t *st, const mw_cpusample_t *r, mw_id_t thread, uint64_t gen);

/* A raw sample left by a thread's CPU-timer handler: named now. Names of code objects the symbol
 * cache does not have come from the copies the handler made while they were alive; application
 * memory is never read for them after the fact (the code object may be gone by now). */
static void take_timed(mw_profbuf_t *b, mw_cpusample_t *r) {
    int created = 0;
    mw_tstate_t *st = ts_find(r->tid, &created);
    if (!st) {
        g_stats.dropped++;
        return;
    }
    st->active_until = g_tick + ACTIVE_TICKS; /* it runs: quiet ticks must read it in full */
    if (st->quiet) wake(st);
    if (created) {
        st->tick = g_tick;
        st->reg = r->reg + 1; /* armed at its start, before any tick saw it */
        st->reg_tstate = r->tstate;
        st->timer_born = 1;
    }
    uint64_t gen = mw_profbuf_generation(b);
    uint32_t labelset_now;
    mw_id_t thread = thread_name_id(b, st, &labelset_now);
    /* The same raw stack as this thread's previous CPU sample (a hot loop): same entry, no
     * naming at all. */
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < r->depth; i++) {
        h = (h ^ r->frames[i].code) * 1099511628211ULL;
        h = (h ^ (uint64_t)(uint32_t)r->frames[i].lasti) * 1099511628211ULL;
    }
    h = (h ^ ((uint64_t)r->labelset << 32 | (uint64_t)(uint32_t)r->depth)) * 1099511628211ULL;
    if (r->nips == 0 && !created && st->timed_gen == gen && st->timed_hash == h &&
        st->timed_thread == thread) {
        mw_values_t v = {r->periods, 0, st->owed_n, st->owed_wall};
        if (mw_profbuf_add_at(b, st->timed_idx, &v) == 0) {
            g_stats.reused++;
            timed_account(st, r, thread, gen);
            return;
        }
    }
    int depth = r->depth, ok = 1;
    known_sync();
    uint64_t epoch = mw_symcache_epoch();
    mw_symcache_begin();
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < depth && ok; i++) {
            if (i > 0 && r->frames[i].code == r->frames[i - 1].code &&
                memcmp(&r->frames[i].info, &r->frames[i - 1].info, sizeof r->frames[i].info) == 0) {
                g_sym[i] = g_sym[i - 1]; /* recursion: the same code object again */
                continue;
            }
            const mw_symentry_t *h = mw_symcache_peek(&r->frames[i]);
            if (!h) {
                const mw_codecopy_t *c = NULL;
                for (int k = 0; k < r->ncopies && !c; k++)
                    if (r->copies[k].code == r->frames[i].code) c = &r->copies[k];
                if (c) {
                    mw_symcopy_t cp = {r->names + c->name_off,
                                       r->names + c->file_off,
                                       (const uint8_t *)r->names + c->lt_off,
                                       c->name_len,
                                       c->file_len,
                                       c->lt_len,
                                       c->lt_ok};
                    h = mw_symcache_put_copied(&r->frames[i], &cp);
                }
            }
            g_sym[i] = h;
            if (!h) ok = 0;
        }
        if (!ok || mw_symcache_epoch() == epoch) break;
        epoch = mw_symcache_epoch(); /* emptied midway: the earlier handles are gone */
        known_sync();
    }
    if (!ok) {
        /* A code object the sampler had not named and whose names the handler could not copy:
         * no name is better than one read after the code object may have been freed. */
        mw_symcache_abort();
        g_stats.names_lost++;
        g_stats.dropped++;
        return;
    }
    mark_known(r->frames, depth);
    uint32_t n = 0;
    if (r->nips > 0) { /* native mode: the native stack of the same instant, Python spliced in */
        n = mw_unwind_combine_ips(b, r->ips, r->nips, r->ips_complete, r->frames, depth, g_ids,
                                  MW_MAX_DEPTH_CAP);
    } else {
        n = intern_frames(b, r->frames, depth);
    }
    if (!mark_if_empty(b, &n)) {
        g_stats.dropped++;
        return;
    }
    if (r->truncated) g_stats.truncated++;
    mw_values_t v = {r->periods, 0, st->owed_n, st->owed_wall};
    uint32_t idx = 0;
    if (mw_profbuf_add_ex(b, g_ids, n, thread, r->labelset, &v, &idx) != 0) {
        g_stats.dropped++;
        g_stats.overflow++;
        return;
    }
    st->timed_hash = h;
    st->timed_gen = gen;
    st->timed_idx = idx;
    st->timed_thread = thread;
    timed_account(st, r, thread, gen);
}

/* The bookkeeping of a CPU-timer sample added to the buffer: owed wall time paid, CPU window. */
static void timed_account(mw_tstate_t *st, const mw_cpusample_t *r, mw_id_t thread, uint64_t gen) {
    g_stats.samples += st->owed_n;
    st->owed_n = st->owed_wall = 0;
    g_stats.cpu_samples++;
    g_stats.timer_samples++;
    /* A thread no tick has read yet: its CPU so far is known only from its samples (periods of
     * CPU time); the first tick that reads its clock takes the credited part off. */
    uint64_t credit = 0;
    if (st->timer_born) {
        credit = (uint64_t)r->periods * (uint64_t)(1000000000LL / g_cfg.rate_hz);
        st->credit_ns += credit;
    }
    cpu_window_add(thread, gen, st->pending + credit, r->periods);
    st->pending = 0;
    st->hit_gen = gen;
}

static void drain_timed(mw_profbuf_t *b) {
    mw_cpusample_t *r;
    for (int k = 0; k < MW_CPUTIMER_RECORDS && (r = mw_cputimer_next()) != NULL; k++) {
        if (b && g_timers) take_timed(b, r);
        mw_cputimer_done(r);
    }
}

/* Why a stack may be trusted. The sampler reads a thread's frames while the thread may run on.
 * A read is kept only when it is PROVEN to show one instant of the thread:
 *   - the thread's CPU clock did not move across the read (it executed nothing meanwhile); or
 *   - the GIL never reached the thread across the read (same switch_number before and after,
 *     and another last holder): in a GIL build only the GIL holder changes its Python frames; or
 *   - the thread was paused in a signal handler while it was read (mw_unwind_pause/capture).
 * A read that is not proven is thrown away (its symbol-cache fills too) and redone. */
static mw_tstate_t *sample_thread(mw_profbuf_t *b, const mw_pythread_t *th, int64_t now,
                                  int first_tick) {
    uint64_t dwall = first_tick ? (uint64_t)(1000000000LL / mw_sampler_tick_rate())
                                : (uint64_t)(now - g_last_tick_ns);
    uint64_t c0 = 0;
    if (th->tid <= 0 || thread_cpu_ns(th->tid, &c0) != 0) {
        /* No CPU clock: the thread is gone (or its kernel id is unknown). */
        g_stats.threads_gone++;
        return NULL;
    }
    int created = 0;
    mw_tstate_t *st = ts_find(th->tid, &created);
    if (!st) {
        g_stats.dropped++;
        return NULL;
    }
    quiet_flush(b, st);
    /* A thread first seen after the first tick was born since the previous tick: all its CPU
     * time is new. Threads alive at start only count from now on. */
    uint64_t dcpu = created ? (first_tick ? 0 : c0) : (c0 > st->cpu_ns ? c0 - st->cpu_ns : 0);
    /* A thread armed before this tick first saw it (at its start, or the thread that started the
     * sampler): its CPU samples cover it from the arming on, so its CPU counts from there. */
    uint64_t at_arm = 0;
    if ((created || st->timer_born) && g_timers &&
        mw_cputimer_find(th->tid, th->tstate, &at_arm) >= 0 && at_arm && c0 >= at_arm)
        dcpu = c0 - at_arm;
    if (st->timer_born) { /* first clock reading: its CPU since arming, minus what was credited */
        dcpu = dcpu > st->credit_ns ? dcpu - st->credit_ns : 0;
        st->timer_born = 0;
        st->credit_ns = 0;
    }
    st->cpu_ns = c0;
    st->tick = g_tick;
    if (dcpu) st->active_until = g_tick + ACTIVE_TICKS;
    uint64_t gen = mw_profbuf_generation(b);
    /* CPU time: see cpu_window_* below. Until the thread's first on-CPU sample of this
     * window its CPU waits in `pending`. */
    if (dcpu) {
        if (st->hit_gen == gen && st->name_gen == gen && st->name_id)
            cpu_window_add(st->name_id, gen, dcpu, 0);
        else
            st->pending += dcpu;
    }
    uint32_t labels_seq = mw_threads_labelset_seq(st->tid);

    /* A thread that has not run since its last proven read still has that stack (and labels):
     * its wall time goes to the same entry with no read at all, and in native mode it is not
     * signalled. Idle threads cost one clock read. */
    if (!created && c0 == st->cpu_end && reuse_stack(b, st, gen, labels_seq, dwall)) return st;

    /* CPU timers: a thread gets one the first time it is seen (again if its id now belongs to
     * another thread state). Until its timer has run for a tick it is read the older way. */
    int wall_only = 0; /* native mode with a timer: the tick gives wall time only */
    if (g_timers) {
        if (created && st->reg && st->reg_tstate == th->tstate && !st->timed_gen &&
            !mw_unwind_enabled()) {
            /* First seen, armed at its start, no CPU-timer sample yet: read the older way once,
             * so a thread that ends before its first timer sample is still seen. */
        } else if (st->reg && st->reg_tstate == th->tstate) {
            if (!mw_unwind_enabled()) return sample_timed(b, th, st, gen, labels_seq, dwall, c0);
            /* Native: running → its wall time is owed to its next CPU sample (which carries
             * its native stack); not running → read below the native way, for wall time. */
            uint64_t c;
            if (thread_cpu_ns(th->tid, &c) == 0 && c > c0) {
                owe(st, dwall);
                return st;
            }
            wall_only = 1;
        } else {
            if (st->reg) mw_cputimer_disarm(st->reg - 1);
            st->reg = 0;
            if (!st->arm_failed || st->reg_tstate != th->tstate) {
                int existed = 0;
                int r = mw_cputimer_arm(th->tid, th->tstate, &existed);
                st->reg = r >= 0 ? r + 1 : 0;
                st->arm_failed = r < 0;
                st->reg_tstate = th->tstate;
                g_timers_armed |= r >= 0;
                /* It armed itself at its start: native mode reads it for wall time only (its CPU
                 * samples carry its native stacks); Python-only, until its first CPU sample it is
                 * read the older way (above). */
                if (existed && mw_unwind_enabled()) wall_only = 1;
            }
        }
    }

    int truncated = 0, ok = 0, depth = 0, proven = 0, native = 0, on_cpu = 0;
    uintptr_t tstate = th->tstate;
    int want_native = mw_unwind_enabled();
    int want_pause = 0;
    uint64_t cs = c0; /* CPU clock before the current read */
    /* Is it on CPU right now? Only asked where the answer decides whether to pause: the GIL's
     * last holder (running Python, reading it unpaused would be wasted) and native mode. */
    if (want_native || (g_gil_tick.ok && g_gil_tick.last_holder == tstate)) {
        uint64_t c;
        int r = thread_cpu_ns(th->tid, &c);
        if (r == 0 && c > c0 && wall_only) { /* running after all: owed, as above */
            owe(st, dwall);
            return st;
        } else if (r == 0 && c > c0) {
            on_cpu = 1;
            want_pause = 1;
            cs = c;
        } else if (r == 0 && want_native && !wall_only && g_gil_tick.ok &&
                   g_gil_tick.last_holder == tstate) {
            /* Native mode reads it paused: the preempted-holder test (below) is made here. */
            mw_gilstate_t ga;
            mw_pyframes_gil(&ga);
            uint64_t c2;
            if (ga.ok && ga.locked && ga.last_holder == tstate &&
                thread_cpu_ns(th->tid, &c2) == 0 && c2 == c) {
                on_cpu = 1;
                g_stats.preempted++;
            }
        }
    }
    if (want_native && !on_cpu && st->stack_valid == 2 && st->stack_gen == gen &&
        labels_seq == st->stack_labels) {
        /* Native, not running, and it ran only briefly since its last native sample (the
         * handler's own return counts): if its Python frames are exactly those of that sample,
         * its native stack is too (blocked at the same call): reuse it, unsignalled. */
        uint64_t c1;
        depth = read_stack(tstate, &truncated, &ok);
        int frozen = thread_cpu_ns(th->tid, &c1) == 0 && c1 == cs;
        if (!frozen) mw_symcache_abort();
        if (frozen && ok && raw_hash(depth) == st->py_hash &&
            reuse_stack(b, st, gen, labels_seq, dwall)) {
            st->cpu_end = c1;
            return st;
        }
    }
    /* Native mode: a thread whose frames may have changed is signalled, running or not (a
     * blocked thread's native leaf is the call it waits in); one whose Python frames are
     * unchanged kept its native stack above, unsignalled. */
    if (want_native) want_pause = 1;
    uint64_t c1 = cs;
    for (int attempt = 0; attempt < 3 && !proven; attempt++) {
        if (want_pause) {
            /* Pause the thread in its handler (native mode: and unwind its C stack). */
            uintptr_t top_unused = 0;
            int paused = 0;
            if (want_native && mw_unwind_capture(th->tid, tstate, &top_unused) == 0)
                paused = native = 1;
            else if (!want_native && g_can_pause && mw_unwind_pause(th->tid) == 0)
                paused = 1;
            if (paused) {
                depth = read_stack(tstate, &truncated, &ok);
                if (truncated == 2) { /* paused between two stores of the eval loop */
                    if (native) native = 0;
                    mw_unwind_release();
                    mw_symcache_abort();
                    g_stats.torn_reads++;
                    want_native = 0;
                    continue;
                }
                if (!native) mw_unwind_release(); /* native: after mw_unwind_combine's reads */
                proven = 1;
                g_stats.paused++;
                break;
            }
            want_native = want_pause = 0; /* cannot pause it: read it unpaused, and prove it */
        }
        mw_gilstate_t g0 = g_gil_tick, ga = {0, 0, 0, 0};
        depth = read_stack(tstate, &truncated, &ok);
        /* A GIL holder that is not running was preempted in the middle of running Python (it
         * cannot hold the GIL without having run since it last blocked), so it counts as on
         * CPU. Read inside the window in which its clock must not move: then it held the GIL
         * throughout. */
        if (!on_cpu && g0.ok && g0.last_holder == tstate) mw_pyframes_gil(&ga);
        if (thread_cpu_ns(th->tid, &c1) != 0) {
            mw_symcache_abort();
            g_stats.threads_gone++;
            return st;
        }
        if (c1 > cs) on_cpu = 1;
        if (truncated == 2) {
            g_stats.torn_reads++; /* caught between two stores: not proven, read again */
        } else if (c1 == cs) {
            proven = 1;
            if (ga.ok && ga.locked && ga.last_holder == tstate) {
                on_cpu = 1;
                g_stats.preempted++;
            }
        } else {
            mw_gilstate_t g1;
            mw_pyframes_gil(&g1);
            if (g0.ok && g1.ok && g1.switch_number == g0.switch_number && g1.last_holder != tstate)
                proven = 1;
            g_gil_tick = g1; /* the reference for whatever is read next */
        }
        if (!proven) {
            mw_symcache_abort();
            g_stats.walk_retries++;
            want_pause = g_can_pause;
            cs = c1;
        }
    }
    if (!proven && !g_can_pause) {
        /* No pause at all in this process (no free real-time signal): the next best thing is
         * two reads back to back that agree frame for frame (and on every caller's instruction).
         * Counted apart (`unverified`): such a stack is very probably, not provably, real. */
        depth = read_stack(tstate, &truncated, &ok);
        int again = 0, t2 = 0;
        uintptr_t anchor = 0;
        uintptr_t top = mw_pyframes_top_frame_anchored(tstate, &anchor);
        mw_readcache_reset(g_rc);
        if (top) again = mw_pyframes_walk(g_rc, NULL, top, anchor, g_raw2, g_cfg.max_depth, &t2);
        /* The leaf's instruction moves on between the reads of a running thread; its callers'
         * do not while it runs. */
        int same = again == depth && truncated != 2 && t2 != 2;
        for (int i = 0; same && i < depth; i++)
            same = g_raw2[i].code == g_raw[i].code && (i == 0 || g_raw2[i].lasti == g_raw[i].lasti);
        if (same) {
            proven = 1;
            g_stats.unverified++;
        } else {
            mw_symcache_abort();
        }
    }
    if (!proven) {
        /* Could not be read consistently (it runs Python and cannot be paused): no stack is
         * better than a wrong one. Its CPU stays pending for its next proven on-CPU sample. */
        uint64_t c;
        if (thread_cpu_ns(th->tid, &c) != 0) {
            g_stats.threads_gone++;
        } else {
            g_stats.dropped++;
            g_stats.unproven++;
        }
        return st;
    }
    emit(b, st, depth, truncated, ok, wall_only ? 0 : on_cpu, native, labels_seq, dwall, c0, c1,
         gen);
    return st;
}

/* A quiet tick: since the previous tick no thread other than the GIL's last holder took the
 * GIL (same switch_number and holder) and no thread was created (same list head). Then no other
 * thread changed its Python frames, and the thread list is the same: the other threads' wall
 * time goes to their remembered stacks with no system call at all. Threads that recently used
 * CPU (they may run native code without the GIL) and a rotating 1/QUIET_ROUND of the others are
 * still read in full, so CPU used without the GIL is seen within QUIET_ROUND ticks (and never
 * lost: the clock is cumulative). In native mode only with CPU timers: native stacks move
 * without the GIL, but only in a thread that runs, and a thread that runs gets CPU-timer samples,
 * which mark it active (read in full) for ACTIVE_TICKS. */
#define QUIET_ROUND 32
/* A thread with a CPU timer announces its own CPU use (its samples mark it active): the rotating
 * full read only has to catch bursts shorter than one timer period. */
#define QUIET_ROUND_TIMED 512
static mw_gilstate_t g_gil_prev;
static uintptr_t g_head_prev;
static int g_nthreads;
static uint64_t g_gen_prev;

static mw_tstate_t *g_tsp[MW_MAX_THREADS]; /* thread i's state, as of the last full list */
static uint64_t g_last_prune;
static int g_ts_used; /* g_ts holds entries of an earlier run */

/* Quiet-tick bookkeeping (see tick()). Indices into g_threads / g_tsp. */
static int g_hot[MW_MAX_THREADS], g_hot_prev[MW_MAX_THREADS], g_nhot;
static int g_woken[MW_MAX_THREADS], g_nwoken, g_woken_overflow;
static uint64_t g_visit_stamp[MW_MAX_THREADS];

/* A thread's CPU-timer sample says it ran: the next quiet tick must visit it. */
static void wake(mw_tstate_t *st) {
    int i = st->list_idx;
    if (i < 0 || i >= g_nthreads || g_tsp[i] != st) return;
    if (g_nwoken < MW_MAX_THREADS)
        g_woken[g_nwoken++] = i;
    else
        g_woken_overflow = 1;
}

static void visit(int i, int quiet, uint64_t gen, int64_t now, int first, const mw_gilstate_t *g) {
    if (g_visit_stamp[i] == g_tick) return; /* already visited this tick */
    g_visit_stamp[i] = g_tick;
    mw_tstate_t *st = quiet ? g_tsp[i] : NULL;
    if (st && st->tid == g_threads[i].tid && g_threads[i].tstate != g->last_holder &&
        st->stack_valid && st->stack_gen == gen && st->active_until <= g_tick &&
        ((uint64_t)i + g_tick) % (st->reg ? QUIET_ROUND_TIMED : QUIET_ROUND) != 0) {
        if (!st->quiet) {
            st->quiet = 1;
            st->qbase_wall = g_quiet_wall;
            st->qbase_n = g_quiet_n;
        }
        st->tick = g_tick;
        if (!st->reg) g_hot[g_nhot++] = i; /* its rotation is checked on every quiet tick */
        return;
    }
    st = g_tsp[i] = sample_thread(g_active, &g_threads[i], now, first);
    if (st) st->list_idx = i;
    g_hot[g_nhot++] = i;
}

static void tick(void) {
    int64_t now = mw_now_monotonic_ns();
    int first = g_tick == 0;
    mw_gilstate_t g;
    mw_pyframes_gil(&g);
    uintptr_t head = mw_pyframes_threads_head();
    pthread_mutex_lock(&g_buf_lock);
    uint64_t gen = mw_profbuf_generation(g_active);
    int quiet = !first && g_nthreads > 0 && g.ok && g_gil_prev.ok && head && head == g_head_prev &&
                g.switch_number == g_gil_prev.switch_number &&
                g.last_holder == g_gil_prev.last_holder && gen == g_gen_prev &&
                (g_timers || !mw_unwind_enabled());
    int n = g_nthreads;
    if (!quiet) {
        /* Settle the quiet threads of the last list first: some may be gone. */
        for (int i = 0; i < g_nthreads; i++)
            if (g_tsp[i] && g_tsp[i]->quiet) quiet_flush(g_active, g_tsp[i]);
        n = mw_pyframes_threads(g_rc, g_threads, MW_MAX_THREADS);
        if (n < 0) {
            pthread_mutex_unlock(&g_buf_lock);
            g_stats.torn_reads++;
            g_nthreads = 0;
            g_nhot = 0;
            return;
        }
    } else {
        g_stats.quiet_ticks++;
    }
    g_tick++;
    g_gil_tick = g;
    drain_timed(g_active);
    uint64_t dwall = first ? (uint64_t)(1000000000LL / mw_sampler_tick_rate())
                           : (uint64_t)(now - g_last_tick_ns);
    /* On a quiet tick only the threads that may need a read are visited: the previous tick's
     * "hot" ones (read, not settled, or without a CPU timer), those whose CPU-timer samples said
     * they ran (woken), and a rotating slice; threads settled quiet with a timer are skipped
     * without being touched (an idle process with 500 threads costs no per-thread work). */
    int nhot_prev = g_nhot;
    g_nhot = 0;
    if (!quiet || g_woken_overflow) {
        for (int i = 0; i < n; i++)
            visit(i, quiet, gen, now, first, &g);
    } else {
        for (int k = 0; k < nhot_prev; k++)
            visit(g_hot_prev[k], quiet, gen, now, first, &g);
        for (int k = 0; k < g_nwoken; k++)
            visit(g_woken[k], quiet, gen, now, first, &g);
        for (int i = (int)((QUIET_ROUND_TIMED - g_tick % QUIET_ROUND_TIMED) % QUIET_ROUND_TIMED);
             i < n; i += QUIET_ROUND_TIMED)
            visit(i, quiet, gen, now, first, &g);
    }
    g_nwoken = 0;
    g_woken_overflow = 0;
    memcpy(g_hot_prev, g_hot, (size_t)g_nhot * sizeof *g_hot);
    if (quiet) {
        g_quiet_wall += dwall;
        g_quiet_n++;
    }
    g_gen_prev = mw_profbuf_generation(g_active);
    pthread_mutex_unlock(&g_buf_lock);
    g_gil_prev = g;
    g_head_prev = head;
    g_nthreads = n;
    g_stats.threads_seen = (uint64_t)n;
    g_last_tick_ns = now;
    if (!quiet && g_tick - g_last_prune >= 64) {
        g_last_prune = g_tick;
        pthread_mutex_lock(&g_buf_lock);
        quiet_flush_all(g_active);
        pthread_mutex_unlock(&g_buf_lock);
        ts_prune();
        if (g_timers_armed) mw_cputimer_sweep(); /* threads that ended unseen */
        g_nthreads = 0; /* the table moved: the next tick lists the threads again */
    }
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

/* A tick with direct reads when our fault handler is still the installed one (checked once per
 * tick: an application that installs its own SIGSEGV handler turns them off). */
static void guarded_tick(void) {
    int direct = g_direct && mw_guard_active();
    if (direct) mw_saferead_direct_begin(&g_sguard);
    mw_readcache_reset(g_rc); /* in the tick's mode */
    tick();
    if (direct) mw_saferead_direct_end();
    mw_readcache_reset(g_rc);
}

static void *sampler_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "mw-sampler");
    if (g_direct) {
        /* A fault inside a guarded read must reach our handler: a blocked synchronous SIGSEGV
         * would kill the process. */
        sigset_t faults;
        sigemptyset(&faults);
        sigaddset(&faults, SIGSEGV);
        sigaddset(&faults, SIGBUS);
        pthread_sigmask(SIG_UNBLOCK, &faults, NULL);
        atomic_store(&g_sguard.owner, (long)syscall(SYS_gettid));
    }
    int64_t next = mw_now_monotonic_ns();
    g_rng ^= (uint64_t)next;
    for (;;) {
        /* Native mode reads threads at ticks (paused and unwound): full rate there. */
        int64_t period = 1000000000LL / mw_sampler_tick_rate();
        int64_t jitter = (int64_t)(rng_next() % (uint64_t)(2 * period * MW_JITTER_PCT / 100 + 1)) -
                         period * MW_JITTER_PCT / 100;
        next += period + jitter;
        struct timespec ts = {next / 1000000000LL, next % 1000000000LL};
        pthread_mutex_lock(&g_ctl_lock);
        while (!g_stop && pthread_cond_timedwait(&g_cond, &g_ctl_lock, &ts) != ETIMEDOUT) {
        }
        int stop = g_stop;
        pthread_mutex_unlock(&g_ctl_lock);
        if (stop || mw_pyframes_finalizing()) {
            /* Stopping (not finalizing): one last tick, so the CPU the threads used since the
             * previous one is counted (a child's last window ends here). */
            if (stop && g_tick > 0 && !mw_pyframes_finalizing()) guarded_tick();
            break;
        }

        int64_t t0 = mw_now_monotonic_ns();
        if (t0 - next > period) {
            g_stats.late_ticks++;
            next = t0; /* do not try to catch up with a burst of ticks */
        }
        guarded_tick();
        int64_t took = mw_now_monotonic_ns() - t0;
        if ((uint64_t)took > g_stats.tick_ns_max) g_stats.tick_ns_max = (uint64_t)took;
        g_stats.tick_ns_total += (uint64_t)took;
        g_stats.ticks++;
        if ((g_stats.ticks & 15) == 0) sampler_cpu_update(); /* a system call: not every tick */
    }
    pthread_mutex_lock(&g_buf_lock);
    drain_timed(g_active);
    pthread_mutex_unlock(&g_buf_lock);
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
    if (!g_raw2) g_raw2 = calloc(MW_MAX_DEPTH_CAP, sizeof *g_raw2);
    if (!g_ids) g_ids = calloc(MW_MAX_DEPTH_CAP, sizeof *g_ids);
    if (!g_sym) g_sym = calloc(MW_MAX_DEPTH_CAP, sizeof *g_sym);
    if (!g_win) g_win = calloc(WIN_SLOTS, sizeof *g_win);
    if (!g_rc) g_rc = malloc(sizeof *g_rc);
    if (g_rc) mw_readcache_reset(g_rc);
    return (g_ts && g_threads && g_raw && g_raw2 && g_ids && g_sym && g_win && g_rc &&
            mw_symcache_init() == 0)
               ? 0
               : -1;
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
    if (g_cfg.wall_hz < 1) g_cfg.wall_hz = MW_WALL_HZ;
    if (g_cfg.max_depth < 1 || g_cfg.max_depth > MW_MAX_DEPTH_CAP)
        g_cfg.max_depth = MW_MAX_DEPTH_CAP;
    if (alloc_private() != 0) {
        *why = "out of memory";
        return -1;
    }
    /* The pause handler (a real-time signal) lets the sampler read a thread that runs Python
     * consistently; without it such threads are read unpaused and kept only when proven. */
    const char *pause_why = NULL;
    g_can_pause = mw_unwind_setup(&pause_why) == 0;
    /* CPU samples from the threads' own CPU timers (they use the same signal handler). */
    const char *timer_why = NULL;
    g_timers = g_can_pause &&
               mw_cputimer_init(g_cfg.rate_hz, g_cfg.max_depth, mw_unwind_signal(), &timer_why) > 0;
    /* With CPU timers the ticks only place wall time (and collect the timers' samples): they
     * need not come faster than MW_WALL_HZ. A wake-up of this thread costs ~20 us of CPU on a
     * virtual machine: at 1 kHz that alone would be 2% of a core. */
    g_tick_hz = g_cfg.rate_hz;
    if (g_timers && g_tick_hz > g_cfg.wall_hz) g_tick_hz = g_cfg.wall_hz;
    if (!g_direct) {
        const char *direct = getenv("MW_PROFILING_DIRECT_READS");
        g_direct = !(direct && strcmp(direct, "0") == 0) && mw_guard_install() == 0 &&
                   mw_guard_register(&g_sguard) == 0;
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
    if (g_ts_used) zero_pages(g_ts, TS_SLOTS * sizeof *g_ts); /* calloc'd: untouched till used */
    g_ts_used = 1;
    g_tick = 0;
    g_last_prune = 0;
    g_nthreads = 0;
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
        /* Bounded: stopping runs on the way out of a process (atexit, a worker's last window),
         * and a process must never hang in it because of us. A sampler thread that does not end
         * in time is left alone (still "running": no second one is ever started) and said once. */
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += MW_STOP_WAIT_S;
        int rc = pthread_timedjoin_np(g_thread, NULL, &dl);
        if (rc == ETIMEDOUT) {
            g_stats.stop_timeouts++;
            mw_report_once(MW_REPORT_SAMPLER,
                           "the sampler thread of process %d did not stop within %d s: left "
                           "running, its last samples are not exported",
                           (int)getpid(), MW_STOP_WAIT_S);
            return;
        }
        g_joinable = 0;
    }
    atomic_store(&g_running, 0);
    /* The sampler thread is gone: its state is ours. Timers stop; their threads' entries forget
     * them (a restart arms them again). */
    if (g_timers_armed) {
        mw_cputimer_disarm_all();
        g_timers_armed = 0;
        for (uint32_t i = 0; g_ts && i < TS_SLOTS; i++)
            g_ts[i].reg = 0;
    }
}

int mw_sampler_running(void) {
    return atomic_load(&g_running);
}
int mw_sampler_rate(void) {
    return g_cfg.rate_hz;
}
void mw_sampler_thread_started(long tid, uintptr_t tstate) {
    if (atomic_load(&g_running) && g_timers && mw_cputimer_arm(tid, tstate, NULL) >= 0)
        g_timers_armed = 1;
}

int mw_sampler_tick_rate(void) {
    return g_timers ? g_tick_hz : g_cfg.rate_hz;
}

mw_profbuf_t *mw_sampler_swap(mw_profbuf_t *fresh, int64_t *t_start, int64_t *t_end) {
    pthread_mutex_lock(&g_buf_lock);
    mw_profbuf_t *old = g_active;
    quiet_flush_all(old);
    cpu_window_finalize(old);
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
    quiet_flush_all(g_active);
    cpu_window_finalize(g_active);
    if (g_active) fn(g_active, arg);
    pthread_mutex_unlock(&g_buf_lock);
}

void mw_sampler_get_stats(mw_sampler_stats_t *out) {
    *out = g_stats;
    out->can_pause = (uint64_t)g_can_pause;
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
    mw_cputimer_after_fork_child();
    g_timers_armed = 0;
    for (uint32_t i = 0; g_ts && i < TS_SLOTS; i++)
        g_ts[i].reg = 0;
}

void mw_sampler_register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
