/* mw_sampler_threads — the sampler's per-thread state; see mw_sampler_int.h for who may touch
 * what, mw_sampler.c for the sampler as a whole.
 *
 * The sampler keeps a private table tid → last CPU reading, so each sample carries exactly the
 * CPU nanoseconds consumed since the previous tick: the profile's CPU total equals the CPU
 * time the threads really used, whatever the jitter or a late tick.
 */
#define _GNU_SOURCE
#include "mw_sampler_int.h"

#include "mw_cputimer.h"
#include "mw_labels.h"
#include "mw_report.h"
#include "mw_threads.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

uint32_t g_ts_n;
uint32_t *g_ts_index;

static uint32_t ts_hash(long tid) {
    return (uint32_t)((unsigned long)tid * 2654435761u);
}

/* Indexes entry i (its tid is set) in g_ts_index. */
static void ts_index_put(uint32_t i) {
    uint32_t h = ts_hash(g_ts[i].tid);
    for (uint32_t k = 0; k < TS_INDEX; k++) {
        uint32_t *slot = &g_ts_index[(h + k) & (TS_INDEX - 1)];
        if (*slot == 0) {
            *slot = i + 1;
            return;
        }
    }
}

/* Threads charged as "thread-<tid>" in the active buffer, with the tick that met them: a name they
 * register within UNNAMED_TICKS is given to that string (mws_names_settle). */
#define UNNAMED_MAX 256
#define UNNAMED_TICKS 128
typedef struct {
    long tid;
    uint64_t tick;
} unnamed_t;
static unnamed_t g_unnamed[UNNAMED_MAX];
static int g_nunnamed;

mw_tstate_t *mws_ts_find(long tid, int *created) {
    uint32_t h = ts_hash(tid);
    *created = 0;
    for (uint32_t k = 0; k < TS_INDEX; k++) {
        uint32_t *slot = &g_ts_index[(h + k) & (TS_INDEX - 1)];
        if (*slot == 0) {
            if (g_ts_n >= TS_SLOTS) return NULL;
            mw_tstate_t *s = &g_ts[g_ts_n];
            memset(s, 0, sizeof *s);
            s->tid = tid;
            *slot = ++g_ts_n;
            *created = 1;
            return s;
        }
        if (g_ts[*slot - 1].tid == tid) return &g_ts[*slot - 1];
    }
    return NULL;
}

mw_tstate_t *mws_ts_lookup(long tid) {
    uint32_t h = ts_hash(tid);
    for (uint32_t k = 0; k < TS_INDEX; k++) {
        uint32_t slot = g_ts_index[(h + k) & (TS_INDEX - 1)];
        if (slot == 0) return NULL;
        if (g_ts[slot - 1].tid == tid) return &g_ts[slot - 1];
    }
    return NULL;
}

/* Zeroes memory, handing whole pages back to the kernel (they read back as zeros), so a big
 * table is resident only where it is in use. */
void mws_zero_pages(void *p, size_t len) {
    uintptr_t a = (uintptr_t)p, lo = (a + 4095) & ~(uintptr_t)4095,
              hi = (a + len) & ~(uintptr_t)4095;
    if (hi > lo + 4096 && madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0) {
        memset(p, 0, lo - a);
        memset((void *)hi, 0, a + len - hi);
        return;
    }
    memset(p, 0, len);
}

void mws_ts_clear(void) {
    if (g_ts_n) mws_zero_pages(g_ts, (size_t)g_ts_n * sizeof *g_ts);
    g_ts_n = 0;
    if (g_ts_index) memset(g_ts_index, 0, TS_INDEX * sizeof *g_ts_index);
    g_nunnamed = 0;
}

/* Drops entries of threads not seen in the last few ticks: the live ones move down in place
 * (their order kept) and the index is rebuilt. Touches only the entries in use and the 64 KiB
 * index: no page of the table is handed back and faulted in again at every prune (each such
 * write fault on a page read as zeros flushes the TLB of every CPU running the app). */
void mws_ts_prune(void) {
    uint32_t live = 0;
    for (uint32_t i = 0; i < g_ts_n; i++) {
        mw_tstate_t *s = &g_ts[i];
        uint64_t cpu;
        int stale = s->tick + 2 < g_tick;
        int running = stale && mws_thread_cpu_ns(s->tid, &cpu) == 0; /* one read per stale entry */
        if (stale && s->reg && running) {
            /* Out of the list but running, with its CPU timer: a native thread between two calls
             * into Python. Kept, timer and all: its samples place its CPU (no Python frame, or the
             * frames of its next call), which a new timer would miss until its first tick. Or a
             * Python thread beyond a list cut at MW_MAX_THREADS: its handler keeps reading the
             * thread state it was armed for (the newest few, where an unlisted one looks, do not
             * have it). */
            if (!g_list_cut || !mw_pyframes_listed(s->reg_tstate, s->tid))
                mw_cputimer_unlisted(s->reg - 1, s->tid);
        } else if (stale) { /* gone: CPU it used after its last on-CPU sample */
            g_stats.cpu_unattributed_ns += s->pending;
            g_stats.wall_unattributed_ns += s->owed_wall;
            if (s->reg) mw_cputimer_retire(s->reg - 1, s->tid);
            if (!running) mws_others_py_gone(); /* ended */
            /* Still running without Python (a native thread between two calls into Python):
             * its CPU from here on is counted by the scans of threads without Python. */
            mws_others_carry(s->tid, s->cpu_ns);
            continue;
        }
        if (live != i) g_ts[live] = *s;
        live++;
    }
    if (live < g_ts_n) memset(&g_ts[live], 0, (size_t)(g_ts_n - live) * sizeof *g_ts);
    g_ts_n = live;
    memset(g_ts_index, 0, TS_INDEX * sizeof *g_ts_index);
    for (uint32_t i = 0; i < live; i++)
        ts_index_put(i);
}

int mws_blocked_writing(long tid) {
    char buf[64];
    if (mw_threads_proc_read(tid, "syscall", buf, sizeof buf) < 0 || buf[0] < '0' || buf[0] > '9')
        return 0; /* "running", "-1 ..." or unreadable */
    long nr = strtol(buf, NULL, 10);
    static const long writes[] = {
        SYS_write,    SYS_writev,   SYS_pwrite64, SYS_pwritev, SYS_sendto,
        SYS_sendmsg,  SYS_sendmmsg, SYS_sendfile, SYS_splice,  SYS_vmsplice,
#ifdef SYS_pwritev2
        SYS_pwritev2,
#endif
    };
    for (size_t i = 0; i < sizeof writes / sizeof *writes; i++)
        if (nr == writes[i]) return 1;
    return 0;
}

int mws_preempted_running(long tid, uint64_t *checks) {
    char buf[256];
    ++*checks;
    long n = mw_threads_proc_read(tid, "stat", buf, sizeof buf);
    if (n <= 0) return 0;
    const char *paren = NULL; /* "pid (comm) S ...": comm may hold spaces and parentheses */
    for (long i = n - 1; i >= 0 && !paren; i--)
        if (buf[i] == ')') paren = buf + i;
    return paren && paren + 2 < buf + n && paren[2] == 'R';
}

mw_id_t mws_thread_name_id(mw_profbuf_t *b, mw_tstate_t *st, uint32_t *labelset) {
    char name[MW_THREAD_NAME_MAX];
    uint32_t seq;
    *labelset = mw_threads_lookup(st->tid, name, sizeof name, &seq);
    mw_labels_span_seen(*labelset);
    uint64_t gen = mw_profbuf_generation(b);
    int cached = st->name_id && st->name_gen == gen;
    if (cached && st->name_seq == seq) return st->name_id;
    if (cached && (name[0] == '\0') != st->name_unknown) {
        /* named since it was met (its start-up before it registered a name: 0.5-1% of short
         * threads' CPU with POSIX timers) or its name gone since (it is ending) */
        if (name[0] == '\0' || mw_profbuf_rename_str(b, st->name_id, name, strlen(name)) == 0) {
            if (name[0] != '\0') memcpy(st->last_name, name, sizeof name);
            st->name_unknown = 0;
            st->name_seq = seq;
            return st->name_id;
        }
    }
    if (name[0] == '\0' && st->last_name[0] != '\0') /* its name gone: the one it had */
        memcpy(name, st->last_name, sizeof name);
    else if (name[0] != '\0')
        memcpy(st->last_name, name, sizeof name);
    st->name_unknown = name[0] == '\0';
    if (st->name_unknown) snprintf(name, sizeof name, "thread-%ld", st->tid);
    st->name_id = mw_profbuf_intern_str(b, name, strlen(name));
    st->name_gen = gen;
    st->name_seq = seq;
    if (st->name_unknown && st->name_id) { /* to be named by mws_names_settle, room permitting */
        if (g_nunnamed < UNNAMED_MAX)
            g_unnamed[g_nunnamed++] = (unnamed_t){st->tid, g_tick};
        else
            g_stats.names_unsettled++;
    }
    return st->name_id;
}

void mws_names_settle(mw_profbuf_t *b) {
    uint64_t gen = mw_profbuf_generation(b);
    int kept = 0;
    for (int i = 0; i < g_nunnamed; i++) {
        unnamed_t u = g_unnamed[i];
        mw_tstate_t *st = mws_ts_lookup(u.tid);
        if (!st || !st->name_unknown || st->name_gen != gen) continue; /* named, or window gone */
        uint32_t labelset;
        (void)mws_thread_name_id(b, st, &labelset);
        if (st->name_unknown && u.tick + UNNAMED_TICKS > g_tick) g_unnamed[kept++] = u;
    }
    g_nunnamed = kept;
}

/* CPU per window, per thread name. A thread's CPU time is exact (its CPU clock), but where it
 * was spent is only known at its on-CPU samples. At the end of a window (and for a snapshot)
 * each thread's CPU of the window is split over its on-CPU samples of the window in
 * proportion to their counts: a ratio estimator, unbiased as the samples are, with the exact
 * total. Except for a thread sampled through its perf event with fewer than MWS_CLOCK_HITS
 * samples in the window: the CPU its samples stand for goes in instead (periods, unbiased),
 * since splitting its clock only over windows where it has a sample gives a thread using less
 * than a period its CPU only when sampled (mw_sampler_take.c). One part is known exactly: the
 * CPU-timer handlers' own runs (own_ns), which the thread's clock counts at the stack each one
 * interrupted but which no sample can land in (a sample comes at the start of its handler). Each
 * stack gets its own handler time, and the rest of the window's CPU is split by counts; otherwise a
 * stack whose handler is dearer (a deep native stack to unwind) would lose its surplus to the
 * cheaper stacks. The wall time of ticks that found the thread running (mws_cpu_window_owe) is
 * split the same way, by counts. Threads with the same name share one row. Sampler thread (ticks)
 * and the swap/snapshot side, both under the buffer lock. */
cpu_window_t *g_win;

static cpu_window_t *cpu_window_row(mw_id_t thread, uint64_t gen, int create) {
    uint32_t h = (uint32_t)(thread * 2654435761u);
    for (uint32_t k = 0; k < WIN_SLOTS; k++) {
        cpu_window_t *w = &g_win[(h + k) & (WIN_SLOTS - 1)];
        if (w->gen == gen && w->thread == thread) return w;
        if (w->gen != gen) { /* free, or left over from an older window */
            if (!create) return NULL;
            w->gen = gen;
            w->thread = thread;
            w->cpu_ns = w->hits = w->own_ns = 0;
            w->owed_wall = w->owed_n = w->sp_epoch = w->sp_wall = w->sp_n = 0;
            w->sp_hits = w->sp_given = 0;
            return w;
        }
    }
    return NULL;
}

void mws_cpu_window_add(mw_id_t thread, uint64_t gen, uint64_t cpu_ns, uint64_t hits,
                        uint64_t own_ns) {
    cpu_window_t *w = g_win ? cpu_window_row(thread, gen, 1) : NULL;
    if (!w) {
        g_stats.cpu_unattributed_ns += cpu_ns;
        return;
    }
    w->cpu_ns += cpu_ns;
    w->hits += hits;
    w->own_ns += own_ns;
}

int mws_cpu_window_owe(mw_id_t thread, uint64_t gen, uint64_t wall) {
    cpu_window_t *w = g_win ? cpu_window_row(thread, gen, 0) : NULL;
    if (!w || !w->hits) return -1;
    w->owed_wall += wall;
    w->owed_n++;
    return 0;
}

void mws_cpu_window_replace(mw_id_t thread, uint64_t gen, uint64_t sub, uint64_t add) {
    cpu_window_t *w = g_win ? cpu_window_row(thread, gen, 0) : NULL;
    if (!w) {
        g_stats.cpu_unattributed_ns += add;
        return;
    }
    w->cpu_ns = (w->cpu_ns > sub ? w->cpu_ns - sub : 0) + add;
}

void mws_hw_window(mw_tstate_t *st, uint64_t gen) {
    if (st->hw_gen == gen) return;
    st->hw_gen = gen;
    st->hw_hits = st->hw_credit = st->hw_clock = 0;
    st->hw_clocked = 0;
}

void mws_hw_hits(mw_tstate_t *st, mw_id_t thread, uint64_t gen, uint64_t hits) {
    mws_hw_window(st, gen);
    if (st->hw_clocked) return;
    st->hw_hits += hits;
    if (st->hw_hits >= MWS_CLOCK_HITS) {
        mws_cpu_window_replace(thread, gen, st->hw_credit, st->hw_clock);
        st->hw_clocked = 1;
    }
}

void mws_clock_account(mw_tstate_t *st, uint64_t gen, int counted, int watch, uint64_t c0,
                       uint64_t dclock, uint64_t dcpu) {
    if (counted) {
        if (watch) mw_cputimer_watch(st->reg - 1, st->tid, c0);
        mws_hw_window(st, gen);
        if (st->hw_clocked && st->name_gen == gen && st->name_id)
            mws_cpu_window_add(st->name_id, gen, dclock, 0, 0);
        else
            st->hw_clock += dclock;
        return;
    }
    /* Placed by the tick (it blocks our signal, or has no timer). On its first clock reading a
     * thread known so far from its timer's samples has dcpu less what they credited; if they are
     * counted in this window, the credit goes when its clock replaces them (timed_account), and
     * that part of its clock with it: into the clock that replaces them, or, once replaced, the
     * window (a fork child's first tick, finding it blocking the signal for a moment, lost the
     * 4-10 ms its samples had credited). */
    if (dclock > dcpu && st->hw_gen == gen) {
        if (!st->hw_clocked)
            st->hw_clock += dclock - dcpu;
        else if (st->name_gen == gen && st->name_id)
            mws_cpu_window_add(st->name_id, gen, dclock - dcpu, 0, 0);
    }
    if (dcpu) {
        if (st->hit_gen == gen && st->name_gen == gen && st->name_id)
            mws_cpu_window_add(st->name_id, gen, dcpu, 0, 0);
        else
            st->pending += dcpu;
    }
}

/* A stack's share of `owed` when the hits of the row's stacks before it are `before` of `hits`:
 * cumulative rounding, so the shares of a row add up to `owed` exactly. */
static uint64_t share(uint64_t owed, uint64_t before, uint64_t mine, uint64_t hits) {
    return (uint64_t)((__uint128_t)owed * (before + mine) / hits -
                      (__uint128_t)owed * before / hits);
}

/* Writes every on-CPU stack's CPU time (its share of its thread's window CPU) and adds its share of
 * the wall time owed to its row since the last call. Idempotent. */
void mws_cpu_window_finalize(mw_profbuf_t *b) {
    static uint64_t epoch;
    if (!g_win || !b) return;
    uint64_t gen = mw_profbuf_generation(b);
    epoch++;
    uint32_t n = mw_profbuf_nstacks(b);
    for (uint32_t i = 0; i < n; i++) {
        mw_stack_t *s = (mw_stack_t *)mw_profbuf_stack(b, i);
        if (!s->v.cpu_samples) continue;
        cpu_window_t *w = cpu_window_row(mws_plain_thread(b, s->thread), gen, 0);
        if (!w || !w->hits) {
            s->v.cpu_ns = 0;
            continue;
        }
        if (w->sp_epoch != epoch) {       /* the row's first stack in this call: what it owes now */
            if (w->sp_given < w->sp_wall) /* not expected: its stacks and hits disagreed */
                g_stats.wall_unattributed_ns += w->sp_wall - w->sp_given;
            w->sp_epoch = epoch;
            w->sp_wall = w->owed_wall;
            w->sp_n = w->owed_n;
            w->owed_wall = w->owed_n = w->sp_hits = w->sp_given = 0;
        }
        uint64_t mine = s->v.cpu_samples, before = w->sp_hits;
        if (w->sp_n && before + mine <= w->hits) { /* the row's stacks add up to its hits */
            uint64_t wall = share(w->sp_wall, before, mine, w->hits);
            s->v.wall_ns += wall;
            s->v.wall_samples += share(w->sp_n, before, mine, w->hits);
            w->sp_given += wall;
        }
        w->sp_hits = before + mine;
        uint64_t own = s->v.own_ns, rest = 0;
        if (w->own_ns > w->cpu_ns) /* not expected: the clock counts every handler run */
            own = (uint64_t)((__uint128_t)w->cpu_ns * own / w->own_ns);
        else
            rest = w->cpu_ns - w->own_ns;
        s->v.cpu_ns = (uint64_t)((__uint128_t)rest * s->v.cpu_samples / w->hits) + own;
    }
}

/* Wall time of quiet ticks (see tick(), mw_sampler.c): totals over all quiet ticks so far; a quiet
 * thread owes its remembered entry the difference since it went quiet. Buffer lock held. */
uint64_t g_quiet_wall, g_quiet_n;

void mws_quiet_flush(mw_profbuf_t *b, mw_tstate_t *st) {
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
void mws_quiet_flush_all(mw_profbuf_t *b) {
    if (!g_ts || !b) return;
    for (uint32_t i = 0; i < g_ts_n; i++) {
        mw_tstate_t *st = &g_ts[i];
        if (st->tid && st->quiet) mws_quiet_flush(b, st); /* the next quiet tick starts it again */
    }
}

/* Threads' last clocks: a ring the ending threads write (a slot is theirs while its tid is 0) and
 * the sampler empties at a drain when a record was written since the previous one. A thread that
 * finds its slot still taken (more than EXITS threads ended between two drains) is counted lost,
 * and said once. */
#define EXITS 256
static struct {
    _Atomic long tid; /* 0: free; set last, after the clock */
    uint64_t cpu_ns;
} g_exits[EXITS];
static _Atomic uint32_t g_exits_next;
static _Atomic uint32_t g_exits_done; /* records written, each after its slot */
static uint32_t g_exits_read;         /* g_exits_done at the last settle (sampler thread) */
static _Atomic uint64_t g_exits_lost;
static uint64_t g_exits_lost_seen; /* g_exits_lost when last looked at (sampler thread) */
static pthread_key_t g_exit_key;
static pthread_once_t g_exit_once = PTHREAD_ONCE_INIT;

/* The key's destructor: runs in the ending thread, after its last Python code. */
static void thread_ending(void *unused) {
    (void)unused;
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return;
    uint32_t i = atomic_fetch_add(&g_exits_next, 1) % EXITS;
    if (atomic_load(&g_exits[i].tid) != 0) { /* not emptied since it went round */
        atomic_fetch_add(&g_exits_lost, 1);
        return;
    }
    g_exits[i].cpu_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    atomic_store(&g_exits[i].tid, (long)syscall(SYS_gettid)); /* after the clock */
    atomic_fetch_add(&g_exits_done, 1);
}

static void exit_key_create(void) {
    if (pthread_key_create(&g_exit_key, thread_ending) != 0) g_exit_key = (pthread_key_t)-1;
}

void mws_exit_watch(void) {
    pthread_once(&g_exit_once, exit_key_create);
    if (g_exit_key != (pthread_key_t)-1) (void)pthread_setspecific(g_exit_key, (void *)1);
}

void mws_exits_settle(mw_profbuf_t *b) {
    uint64_t lost = atomic_load(&g_exits_lost);
    if (lost > g_exits_lost_seen) {
        g_exits_lost_seen = lost;
        mw_report_once(MW_REPORT_EXITS_LOST,
                       "the CPU of %llu ending threads' last moments is not in the profile: more "
                       "than %d threads ended between two ticks and their last clocks found no "
                       "room; stats() exits_lost",
                       (unsigned long long)lost, EXITS);
    }
    uint32_t done = atomic_load(&g_exits_done);
    if (done == g_exits_read) return; /* no thread ended since: the ring is not touched */
    g_exits_read = done;
    uint64_t gen = b ? mw_profbuf_generation(b) : 0;
    for (int i = 0; i < EXITS; i++) {
        long tid = atomic_load(&g_exits[i].tid);
        if (!tid) continue;
        uint64_t c = g_exits[i].cpu_ns;
        atomic_store(&g_exits[i].tid, 0);
        mw_tstate_t *st = b ? mws_ts_lookup(tid) : NULL;
        if (!st) continue;
        /* read by a tick (a thread known only from its CPU samples has no clock reading yet) */
        if (!st->timer_born && c > st->cpu_ns) {
            uint64_t d = c - st->cpu_ns;
            st->cpu_ns = c;
            g_stats.exit_tail_cpu_ns += d;
            /* as the last tick counted it (its timer may be retired by now) */
            mws_clock_account(st, gen, st->counted, 0, c, d, d);
        }
        /* The wall time of ticks that found it running, owed to a next CPU sample that will not
         * come: to its last one (else lost at its prune, wall_unattributed_ns). */
        mw_values_t v = {0, 0, st->owed_n, st->owed_wall, 0};
        if (st->owed_n && st->timed_gen == gen && mw_profbuf_add_at(b, st->timed_idx, &v) == 0) {
            g_stats.samples += st->owed_n;
            st->owed_n = st->owed_wall = 0;
        }
    }
}

void mws_exits_clear(void) {
    for (int i = 0; i < EXITS; i++)
        atomic_store(&g_exits[i].tid, 0);
    atomic_store(&g_exits_lost, 0);
    g_exits_lost_seen = 0;
    g_exits_read = atomic_load(&g_exits_done);
}

uint64_t mws_exits_lost(void) {
    return atomic_load(&g_exits_lost);
}
