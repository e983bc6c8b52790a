/* mw_sampler_others — the CPU of the process's threads that have no Python thread state in the
 * main interpreter (see mw_sampler_int.h for the sampler's state and locks).
 *
 * A C library's own threads (a BLAS pool, gRPC's or a database driver's threads, a compression
 * library's workers), the threads of subinterpreters, and a thread between two calls into Python
 * from C (a ctypes callback from a native thread: its thread state lives only for the call) use
 * CPU that no tick sees: the ticks read the threads of the main interpreter's list. Without this
 * file that CPU was missing from the profile without a word (a native thread burning 1.5 s beside
 * a Python thread burning 1 s: a profile of 1.0 s for 2.5 s of process CPU).
 *
 * Every MWS_OTHERS_SCAN_NS while such threads use CPU and MWS_OTHERS_IDLE_SCAN_NS while none does
 * (unless the process has no more threads than the tick's list and the profiler's own:
 * mws_others_needed), and always when a window ends and when the sampler stops, the sampler lists
 * /proc/self/task; a thread that is not in the tick's Python thread list, is not one of the
 * profiler's own (their names start with "mw-"; their CPU is in stats()), and used CPU since the
 * previous scan gets that CPU as on-CPU samples (one per sample period, at least one) under the
 * marker frame "[native thread]", named after its kernel name (thread-<tid> when that is the
 * process's own name). The clock is cumulative, so nothing a thread that is still there used is
 * lost; what a thread that ends between two scans used since the last one is found as below.
 *
 * A thread that moves between the two sides is counted once, and its C time is not charged to its
 * Python: out of the list, its CPU counts here from the last clock the ticks read (its entry's
 * cpu_ns, carried when the entry is pruned); back in it, the tick first counts here the CPU since
 * the last scan (mws_others_settle: that was C; charged to the stack the tick found, up to a scan
 * interval of C went to a 2 ms callback each call). One met by a tick while in Python has a CPU
 * timer: its entry and timer stay while it runs (mw_sampler_threads.c), its clock is accounted
 * here as a tick would (mws_clock_account) and its handler, told that the thread left the list
 * (mw_cputimer_unlisted), reads the thread state the thread has at each sample.
 *
 * Threads that end between two listings (a thread per task living 10 ms: 88% of such a workload's
 * CPU was missing) are found through the process's CPU clock, which keeps the CPU of ended threads:
 * what it gained since the last listing beyond what the listed threads' clocks gained (all of
 * them, Python ones too) is theirs, counted under "[exited thread]" (thread "exited threads") once
 * it makes half a sample period. The process clock is read before the listing, so the threads'
 * reads can only make it find less than the truth, and what it under-finds is owed back by the
 * next listing. A listing since which a Python thread or one of the profiler's own has ended
 * counts none (their CPU since the last listing is partly counted by the ticks already; stats:
 * exited_unknown). Listings at a window's end and at stop are always made.
 *
 * Sampler thread only (scans run inside a tick or a drain, buffer lock held); mws_others_clear
 * from mw_sampler_start before the thread starts. Not async-signal-safe. Allocates the two tables
 * (96 KiB each, resident only where used) at the first start, and doubles them, in the sampler
 * thread, whenever more threads than half their slots are to be remembered (a process with
 * thousands of native threads: each keeps its entry, so none is counted twice or forgotten); they
 * are never shrunk. Past OTHERS_SLOTS_MAX, or when memory is refused, a thread that gets no entry
 * is not counted (stats: native_threads_untracked) and, after such a scan, neither is a thread
 * without an entry: its CPU may have been counted before the entry was lost.
 */
#define _GNU_SOURCE
#include "mw_sampler_int.h"

#include "mw_cputimer.h"
#include "mw_threads.h"

#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define OTHERS_SLOTS 4096           /* at first: open addressing, half full at most */
#define OTHERS_SLOTS_MAX (1u << 20) /* 524,288 threads without Python */

typedef struct {
    long tid;
    uint64_t last;   /* its CPU clock up to which its CPU is counted */
    uint64_t seen;   /* its CPU clock at the listing (every thread, Python ones too) */
    uint32_t stamp;  /* the entry is in use when this is its table's stamp */
    uint8_t settled; /* back in the thread list since (mws_others_settle): the ticks count it */
    uint8_t own;     /* one of the profiler's threads (named mw-*) */
    uint8_t py;      /* a Python thread at the listing: the entry holds only seen */
    uint8_t seen_ok; /* seen was read */
} other_t;

/* Two tables: the threads of the last scan (and carried entries), and the scan being made. A
 * table is emptied by a new stamp: only the slots in use are ever touched (no page of a table
 * nobody needs is made resident). */
typedef struct {
    other_t *e;
    uint32_t stamp;
    uint32_t used; /* entries with the stamp */
} table_t;
static table_t g_tab[2];
static uint32_t g_slots; /* of each table: a power of two */
static int g_lost_entry; /* the last scan could not remember a thread */
static int g_lost_next;  /* ... the scan being made */
static int g_cur;        /* g_tab[g_cur]: the last scan's */
static uint32_t g_stamp; /* the last stamp given (never 0: the stamp of a calloc'd slot) */
static int g_based; /* the clocks of the threads there at the run's start are taken (clear, scan) */
static atomic_int g_any;            /* some thread without Python has used CPU in this run */
static int g_active, g_active_next; /* ... between the last two scans; in the scan being made */
static uint64_t g_own;              /* the profiler's own threads at the last scan */
/* Threads that ended between two listings: the process's CPU clock counts what they used since
 * the first, no thread's clock does. The process clock is read before each listing and every
 * thread's clock during it, so what the listing finds (the process's CPU since the last, less what
 * each listed thread used since) is that CPU less the CPU the listed threads used while being
 * listed: never more than the truth. */
static uint64_t g_proc_seen;   /* the process's CPU clock just before the last listing */
static int g_proc_ok;          /* ... read */
static int64_t g_exit_balance; /* found and not yet counted (< 0: owed by the threads' reads) */
static int64_t g_skew_ns;  /* the most the last listing can have under-found: its length x CPUs */
static int g_unknown;      /* a Python thread ended since the last listing: skip the next */
static uint64_t g_listing; /* number of the listing being made (mw_tstate_t.listed) */
static long g_ncpu;

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static void empty(table_t *t) {
    if (++g_stamp == 0) g_stamp = 1;
    t->stamp = g_stamp;
    t->used = 0;
}

/* Thread tid's entry; with create, a new one when it has none (NULL only when t is full). */
static other_t *probe(table_t *t, long tid, int create) {
    uint32_t h = (uint32_t)((unsigned long)tid * 2654435761u);
    for (uint32_t k = 0; k < g_slots; k++) {
        other_t *o = &t->e[(h + k) & (g_slots - 1)];
        if (o->stamp != t->stamp) {
            if (!create) return NULL;
            *o = (other_t){.tid = tid, .stamp = t->stamp}; /* a slot may hold an old entry */
            t->used++;
            return o;
        }
        if (o->tid == tid) return o;
    }
    return NULL;
}

/* Both tables twice as large, their entries moved over; -1 (tables unchanged) when they are at
 * OTHERS_SLOTS_MAX or memory is refused. Pointers into the tables are stale after it. */
static int grow(void) {
    if (g_slots >= OTHERS_SLOTS_MAX) return -1;
    uint32_t old = g_slots;
    other_t *e[2] = {calloc((size_t)old * 2, sizeof(other_t)),
                     calloc((size_t)old * 2, sizeof(other_t))};
    if (!e[0] || !e[1]) {
        free(e[0]);
        free(e[1]);
        return -1;
    }
    g_slots = old * 2;
    for (int i = 0; i < 2; i++) {
        other_t *prev = g_tab[i].e;
        g_tab[i].e = e[i];
        g_tab[i].used = 0;
        for (uint32_t j = 0; j < old; j++)
            if (prev[j].stamp == g_tab[i].stamp) *probe(&g_tab[i], prev[j].tid, 1) = prev[j];
        free(prev);
    }
    return 0;
}

static other_t *find(table_t *t, long tid, int create) {
    if (!t->e) return NULL;
    if (!create) return probe(t, tid, 0);
    if ((t->used + 1) * 2 > g_slots) (void)grow(); /* failing that, the table fills up */
    return probe(t, tid, 1);
}

/* One of the profiler's own threads, by its kernel name. */
static int own_name(const char *name) {
    return strncmp(name, "mw-", 3) == 0;
}

/* Its kernel name, without the newline; "" when unreadable. */
static void kernel_name(long tid, char *name, size_t cap) {
    long n = mw_threads_proc_read(tid, "comm", name, cap);
    if (n < 0) n = 0;
    name[n] = '\0';
    if (n > 0 && name[n - 1] == '\n') name[n - 1] = '\0';
}

/* Calls fn for each thread of the process (/proc/self/task); -1 when it cannot be listed. */
static int each_thread(void (*fn)(long tid, void *ctx), void *ctx) {
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    _Alignas(8) char buf[4096];
    for (;;) {
        long got = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (got <= 0) break;
        for (long off = 0; off < got;) {
            const struct linux_dirent64 *d = (const struct linux_dirent64 *)(buf + off);
            off += d->d_reclen;
            char *end;
            long tid = strtol(d->d_name, &end, 10);
            if (tid > 0 && *end == '\0') fn(tid, ctx);
        }
    }
    close(fd);
    return 0;
}

/* The process's CPU clock (ns, every thread's, ended ones too) into *out; -1 when unreadable. */
static int proc_cpu_ns(uint64_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) return -1;
    *out = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    return 0;
}

/* A thread there when the run starts: its CPU counts from now on. */
static void take_base(long tid, void *ctx) {
    uint64_t *own = ctx;
    uint64_t c;
    if (mws_thread_cpu_ns(tid, &c) != 0) return;
    other_t *o = find(&g_tab[!g_cur], tid, 1);
    if (!o) {
        g_lost_next = 1;
        return;
    }
    char name[MW_THREAD_NAME_MAX];
    kernel_name(tid, name, sizeof name);
    o->last = o->seen = c;
    o->seen_ok = 1;
    o->own = (uint8_t)own_name(name);
    *own += o->own;
}

void mws_others_clear(void) {
    if (!g_slots) g_slots = OTHERS_SLOTS;
    for (int i = 0; i < 2; i++) {
        if (!g_tab[i].e) g_tab[i].e = calloc(g_slots, sizeof *g_tab[i].e);
        empty(&g_tab[i]);
    }
    g_active = g_lost_next = 0;
    atomic_store(&g_any, 0);
    g_exit_balance = g_skew_ns = 0;
    g_unknown = 0;
    if (!g_ncpu) g_ncpu = sysconf(_SC_NPROCESSORS_ONLN) > 0 ? sysconf(_SC_NPROCESSORS_ONLN) : 1;
    /* the threads there now (when they cannot be listed, the first scan takes them instead) */
    int64_t t0 = mw_now_monotonic_ns();
    g_proc_ok = proc_cpu_ns(&g_proc_seen) == 0;
    g_own = 0;
    g_based = g_tab[0].e && g_tab[1].e && each_thread(take_base, &g_own) == 0;
    if (g_based) g_cur = !g_cur;
    g_lost_entry = g_based && g_lost_next;
    g_proc_ok = g_proc_ok && g_based && !g_lost_entry;
    g_skew_ns = (mw_now_monotonic_ns() - t0) * g_ncpu; /* what the first listing cannot offset */
}

int mws_others_active(void) {
    return g_active;
}

int mws_others_any(void) {
    return atomic_load(&g_any);
}

void mws_others_carry(long tid, uint64_t cpu_ns) {
    other_t *o = find(&g_tab[g_cur], tid, 1);
    if (!o) return;
    if (o->py) o->last = 0; /* listed as a Python thread: only its seen clock was kept */
    if (cpu_ns > o->last) o->last = cpu_ns;
    o->settled = o->py = 0;
}

void mws_others_py_gone(void) {
    g_unknown = 1;
}

/* A Python thread of the tick's list (the ticks count its CPU), or met through a CPU-timer sample
 * before any tick listed it (a thread that has just started). */
static int in_python(long tid, const mw_tstate_t *st, const mw_pythread_t *threads, int n) {
    if (!st) return 0;
    if (st->timer_born) return 1;
    int i = st->list_idx;
    return i >= 0 && i < n && threads[i].tid == tid;
}

/* cpu_ns as on-CPU samples (one per sample period, at least one) of a thread named thread under
 * the marker frame; returns their number, 0 when the buffer refused them (counted as dropped). */
static uint64_t add_cpu(mw_profbuf_t *b, const char *thread_name, const char *marker_name,
                        uint64_t cpu_ns) {
    uint64_t period = (uint64_t)(1000000000LL / g_cfg.rate_hz);
    uint64_t hits = (cpu_ns + period / 2) / period;
    if (!hits) hits = 1;
    mw_id_t thread = mw_profbuf_intern_str(b, thread_name, strlen(thread_name));
    mw_id_t marker = mws_marker(b, marker_name);
    mw_values_t v = {hits, 0, 0, 0, 0};
    uint32_t idx;
    if (!thread || !marker || mws_add_sample(b, &marker, 1, thread, 0, &v, &idx) != 0) {
        g_stats.dropped++;
        g_stats.cpu_unattributed_ns += cpu_ns;
        return 0;
    }
    mws_cpu_window_add(thread, mw_profbuf_generation(b), cpu_ns, hits, 0);
    g_active_next = 1;
    atomic_store(&g_any, 1);
    return hits;
}

/* Counts cpu_ns of thread tid as used without Python; returns 1 (nothing counted) when it is one
 * of the profiler's own threads. known_name: its kernel name when the caller has just read it
 * (NULL: read here). */
static int credit(mw_profbuf_t *b, long tid, uint64_t cpu_ns, const char *known_name,
                  char *proc_name) {
    char name[MW_THREAD_NAME_MAX];
    uint32_t seq;
    /* past a cut list, the name Python gave it, if any: a Python thread out of the list is not
     * named by the kernel. Not otherwise: a Python thread's start before it is listed, counted
     * here as a native thread's (a sample for a few us of CPU), must not join its own row. */
    name[0] = '\0';
    if (g_list_cut) (void)mw_threads_lookup(tid, name, sizeof name, &seq);
    if (name[0] == '\0') {
        if (known_name)
            snprintf(name, sizeof name, "%s", known_name);
        else
            kernel_name(tid, name, sizeof name);
    }
    if (own_name(name)) return 1;
    if (proc_name[0] == '\0') kernel_name((long)getpid(), proc_name, MW_THREAD_NAME_MAX);
    if (name[0] == '\0' || strcmp(name, proc_name) == 0)
        snprintf(name, sizeof name, "thread-%ld", tid);
    uint64_t hits = add_cpu(b, name, "[native thread]", cpu_ns);
    if (!hits) return 0;
    g_stats.native_thread_cpu_ns += cpu_ns;
    g_stats.native_thread_samples += hits;
    return 0;
}

void mws_others_credit(mw_profbuf_t *b, long tid, uint64_t cpu_ns) {
    char proc_name[MW_THREAD_NAME_MAX] = "";
    (void)credit(b, tid, cpu_ns, NULL, proc_name);
}

int mws_others_settle(mw_profbuf_t *b, long tid, uint64_t cpu_ns) {
    other_t *o = find(&g_tab[g_cur], tid, 0);
    if (!o || o->settled || o->py) return 0;
    o->settled = 1;
    char proc_name[MW_THREAD_NAME_MAX] = "";
    if (cpu_ns > o->last) (void)credit(b, tid, cpu_ns - o->last, NULL, proc_name);
    o->last = cpu_ns;
    return 1;
}

typedef struct {
    mw_profbuf_t *b;
    const mw_pythread_t *threads;
    int n;
    char proc_name[MW_THREAD_NAME_MAX]; /* the process's own name, read when first needed */
    uint64_t count, own;                /* threads without Python met, the profiler's own met */
    uint64_t used;                      /* CPU the listed threads used since the last listing */
    int unsure;                         /* one of them could not be accounted for */
} scan_t;

/* Thread tid's entry in the listing being made, its clock c, against its entry at the last listing
 * (prev, had); NULL when there is no room (the listing is then lost for exited threads). */
static other_t *relist(scan_t *sc, long tid, const other_t *prev, int had, uint64_t c) {
    /* what it used since the last listing: all its CPU when it is new (or its id was reused) */
    sc->used += had && prev->seen_ok && c >= prev->seen ? c - prev->seen : c;
    other_t *nx = find(&g_tab[!g_cur], tid, 1);
    if (!nx) {
        g_lost_next = 1;
        g_stats.native_threads_untracked++;
        return NULL;
    }
    nx->seen = c;
    nx->seen_ok = 1;
    return nx;
}

/* One thread of the listing: its CPU since the previous scan, when it is not a Python thread. */
static void scan_one(long tid, void *ctx) {
    scan_t *sc = ctx;
    mw_profbuf_t *b = sc->b;
    mw_tstate_t *st = mws_ts_lookup(tid);
    if (st) st->listed = g_listing;
    const other_t *o = find(&g_tab[g_cur], tid, 0);
    other_t prev = o ? *o : (other_t){0}; /* the tables may grow below: a copy */
    int had = o != NULL;
    uint64_t c;
    if (mws_thread_cpu_ns(tid, &c) != 0) { /* ended meanwhile: an exited thread, if not Python */
        if (st) sc->unsure = 1;
        return;
    }
    if (in_python(tid, st, sc->threads, sc->n)) {
        other_t *nx = relist(sc, tid, &prev, had, c);
        if (nx) nx->py = 1;
        return;
    }
    if (st && st->reg) {
        other_t *nx = relist(sc, tid, &prev, had, c);
        if (nx) nx->py = 1; /* accounted here as a tick would: keeps only its seen clock */
        uint64_t d = c > st->cpu_ns ? c - st->cpu_ns : 0;
        st->cpu_ns = c;
        if (d) g_active_next = 1;
        if (!g_list_cut || !mw_pyframes_listed(st->reg_tstate, tid)) /* see mws_ts_prune */
            mw_cputimer_unlisted(st->reg - 1, tid);
        int counted = mw_cputimer_counted(st->reg - 1, tid);
        mws_clock_account(st, mw_profbuf_generation(b), counted, counted, c, d, d);
        return;
    }
    if (had && prev.py) had = 0; /* a Python thread at the last scan: no count of its own */
    /* new since the last scan: all its CPU (unless that scan lost entries: one may be this) */
    uint64_t base = had ? prev.last : (g_based && !g_lost_entry) ? 0 : c;
    if (base > c) base = 0; /* its id was reused by a new thread */
    if (st && st->cpu_ns > base && st->cpu_ns <= c) base = st->cpu_ns; /* the ticks' part */
    if (st) st->cpu_ns = c; /* back in the list, its CPU counts from here */
    int mine = had ? prev.own : -1;
    other_t *nx = relist(sc, tid, &prev, o != NULL, c); /* may grow the tables: o is stale */
    if (!nx) return;
    nx->last = c;
    char name[MW_THREAD_NAME_MAX] = "";
    if (mine < 0) { /* first met: ours? */
        kernel_name(tid, name, sizeof name);
        mine = own_name(name);
    }
    nx->own = (uint8_t)mine;
    if (!nx->own && c > base && credit(b, tid, c - base, name[0] ? name : NULL, sc->proc_name))
        nx->own = 1;
    if (nx->own)
        sc->own++;
    else
        sc->count++;
}

/* The process's thread count (/proc/self/stat, field 20), -1 when unreadable. */
static long os_threads(void) {
    char buf[1024];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t got = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (got <= 0) return -1;
    buf[got] = '\0';
    const char *p = strrchr(buf, ')'); /* after the name, which may hold spaces and parentheses */
    for (int field = 2; p && field < 20; field++)
        p = strchr(p + 1, ' ');
    return p ? strtol(p + 1, NULL, 10) : -1;
}

int mws_others_needed(int n) {
    if (g_active || !g_based) return 1;
    long t = os_threads();
    return t < 0 || (uint64_t)t > (uint64_t)(n > 0 ? n : 0) + g_own;
}

/* What the listing found of the CPU of threads that ended since the last: counted once it makes
 * half a sample period, unless a Python thread or one of the profiler's own ended meanwhile (their
 * CPU since the last listing is partly counted already, and cannot be told apart). */
static void exited(mw_profbuf_t *b, const scan_t *sc, uint64_t proc, int proc_ok, int64_t took_ns) {
    int unknown =
        g_unknown || sc->unsure || g_lost_next || !proc_ok || !g_proc_ok || sc->own < g_own;
    for (uint32_t i = 0; !unknown && i < g_ts_n; i++) /* Python threads gone, not yet pruned */
        if (g_ts[i].tid && g_ts[i].listed != g_listing) unknown = 1;
    if (unknown) {
        if (g_proc_ok && proc_ok) g_stats.exited_unknown++;
        g_exit_balance = 0;
    } else {
        g_exit_balance += (int64_t)(proc - g_proc_seen) - (int64_t)sc->used;
        if (g_skew_ns) g_exit_balance -= g_skew_ns; /* the last listing's, not compensated */
    }
    /* after a skipped listing nothing compensates what this one's reads may under-find */
    g_skew_ns = unknown ? took_ns * g_ncpu : 0;
    g_unknown = 0;
    g_proc_seen = proc;
    g_proc_ok = proc_ok;
    int64_t half = 500000000LL / g_cfg.rate_hz;
    if (g_exit_balance < half) return;
    uint64_t cpu = (uint64_t)g_exit_balance;
    g_exit_balance = 0;
    if (add_cpu(b, "exited threads", "[exited thread]", cpu)) g_stats.exited_thread_cpu_ns += cpu;
}

void mws_others_scan(mw_profbuf_t *b, const mw_pythread_t *threads, int n) {
    if (!g_tab[0].e || !g_tab[1].e || !b) return;
    empty(&g_tab[!g_cur]);
    g_active_next = g_lost_next = 0;
    g_listing++;
    scan_t sc = {.b = b, .threads = threads, .n = n};
    uint64_t proc = 0;
    int64_t t0 = mw_now_monotonic_ns();
    int proc_ok = proc_cpu_ns(&proc) == 0;       /* before the listing: see g_proc_seen */
    if (each_thread(scan_one, &sc) != 0) return; /* no /proc: threads without Python stay unseen */
    exited(b, &sc, proc, proc_ok, mw_now_monotonic_ns() - t0);
    g_cur = !g_cur;
    g_based = 1;
    g_lost_entry = g_lost_next;
    g_active = g_active_next;
    g_own = sc.own;
    g_stats.native_threads = sc.count;
    g_stats.native_scans++;
}
