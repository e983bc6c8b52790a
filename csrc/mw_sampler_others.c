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
 * Every MWS_OTHERS_SCAN_NS while such threads use CPU, MWS_OTHERS_IDLE_SCAN_NS while none does,
 * and when a window ends and when the sampler stops — unless the process has no more threads than
 * the tick's list and the profiler's own (mws_others_needed) — the sampler lists /proc/self/task; a
 * thread that is not in the tick's Python thread list, is not one of the profiler's own (their
 * names start with "mw-"; their CPU is in stats()), and used CPU since the previous scan gets that
 * CPU as on-CPU samples (one per sample period, at least one) under the marker frame "[native
 * thread]", named after its kernel name (thread-<tid> when that is the process's own name). The
 * clock is cumulative, so nothing a thread that is still there used is lost; a thread that ends
 * between two scans takes the CPU it used since the last one with it (at most 50 ms of CPU; 250 ms
 * for one that lives less than that in a process where none used CPU).
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
 * Sampler thread only (scans run inside a tick or a drain, buffer lock held); mws_others_clear
 * from mw_sampler_start before the thread starts. Not async-signal-safe. No allocation but the two
 * tables (96 KiB each, resident only where used), at the first start.
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

#define OTHERS_SLOTS 4096 /* open addressing, half full at most: 2,048 threads without Python */

typedef struct {
    long tid;
    uint64_t last;   /* its CPU clock up to which its CPU is counted */
    uint32_t stamp;  /* the entry is in use when this is its table's stamp */
    uint8_t settled; /* back in the thread list since (mws_others_settle): the ticks count it */
    uint8_t own;     /* one of the profiler's threads (named mw-*) */
} other_t;

/* Two tables: the threads of the last scan (and carried entries), and the scan being made. A
 * table is emptied by a new stamp: only the slots in use are ever touched (no page of a table
 * nobody needs is made resident). */
typedef struct {
    other_t *e;
    uint32_t stamp;
} table_t;
static table_t g_tab[2];
static int g_cur;        /* g_tab[g_cur]: the last scan's */
static uint32_t g_stamp; /* the last stamp given (never 0: the stamp of a calloc'd slot) */
static int g_based;      /* a scan of this run has taken the clocks as they were at its start */
static atomic_int g_any; /* some thread without Python has used CPU in this run */
static int g_active, g_active_next; /* ... between the last two scans; in the scan being made */
static uint64_t g_own;              /* the profiler's own threads at the last scan */

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
}

static other_t *find(table_t *t, long tid, int create) {
    if (!t->e) return NULL;
    uint32_t h = (uint32_t)((unsigned long)tid * 2654435761u);
    for (uint32_t k = 0; k < OTHERS_SLOTS / 2; k++) {
        other_t *o = &t->e[(h + k) & (OTHERS_SLOTS - 1)];
        if (o->stamp != t->stamp) {
            if (!create) return NULL;
            o->tid = tid;
            o->last = 0;
            o->stamp = t->stamp;
            o->settled = o->own = 0;
            return o;
        }
        if (o->tid == tid) return o;
    }
    return NULL;
}

void mws_others_clear(void) {
    for (int i = 0; i < 2; i++) {
        if (!g_tab[i].e) g_tab[i].e = calloc(OTHERS_SLOTS, sizeof *g_tab[i].e);
        empty(&g_tab[i]);
    }
    g_based = g_active = 0;
    atomic_store(&g_any, 0);
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
    if (cpu_ns > o->last) o->last = cpu_ns;
    o->settled = 0;
}

/* Its kernel name, without the newline; "" when unreadable. */
static void kernel_name(long tid, char *name, size_t cap) {
    long n = mw_threads_proc_read(tid, "comm", name, cap);
    if (n < 0) n = 0;
    name[n] = '\0';
    if (n > 0 && name[n - 1] == '\n') name[n - 1] = '\0';
}

/* A Python thread of the tick's list (the ticks count its CPU), or met through a CPU-timer sample
 * before any tick listed it (a thread that has just started). */
static int in_python(long tid, const mw_tstate_t *st, const mw_pythread_t *threads, int n) {
    if (!st) return 0;
    if (st->timer_born) return 1;
    int i = st->list_idx;
    return i >= 0 && i < n && threads[i].tid == tid;
}

/* Counts cpu_ns of thread tid as used without Python; returns 1 (nothing counted) when it is one
 * of the profiler's own threads. */
static int credit(mw_profbuf_t *b, long tid, uint64_t cpu_ns, char *proc_name) {
    char name[MW_THREAD_NAME_MAX];
    kernel_name(tid, name, sizeof name);
    if (strncmp(name, "mw-", 3) == 0) return 1;
    if (proc_name[0] == '\0') kernel_name((long)getpid(), proc_name, MW_THREAD_NAME_MAX);
    if (name[0] == '\0' || strcmp(name, proc_name) == 0)
        snprintf(name, sizeof name, "thread-%ld", tid);
    uint64_t period = (uint64_t)(1000000000LL / g_cfg.rate_hz);
    uint64_t hits = (cpu_ns + period / 2) / period;
    if (!hits) hits = 1;
    mw_id_t thread = mw_profbuf_intern_str(b, name, strlen(name));
    mw_id_t marker = mws_marker(b, "[native thread]");
    mw_values_t v = {hits, 0, 0, 0, 0};
    uint32_t idx;
    if (!thread || !marker || mws_add_sample(b, &marker, 1, thread, 0, &v, &idx) != 0) {
        g_stats.dropped++;
        g_stats.cpu_unattributed_ns += cpu_ns;
        return 0;
    }
    mws_cpu_window_add(thread, mw_profbuf_generation(b), cpu_ns, hits, 0);
    g_active_next = 1;
    g_stats.native_thread_cpu_ns += cpu_ns;
    g_stats.native_thread_samples += hits;
    atomic_store(&g_any, 1);
    return 0;
}

void mws_others_credit(mw_profbuf_t *b, long tid, uint64_t cpu_ns) {
    char proc_name[MW_THREAD_NAME_MAX] = "";
    (void)credit(b, tid, cpu_ns, proc_name);
}

int mws_others_settle(mw_profbuf_t *b, long tid, uint64_t cpu_ns) {
    other_t *o = find(&g_tab[g_cur], tid, 0);
    if (!o || o->settled) return 0;
    o->settled = 1;
    char proc_name[MW_THREAD_NAME_MAX] = "";
    if (cpu_ns > o->last) (void)credit(b, tid, cpu_ns - o->last, proc_name);
    o->last = cpu_ns;
    return 1;
}

/* One thread of the listing: its CPU since the previous scan, when it is not a Python thread. */
static void scan_one(mw_profbuf_t *b, long tid, const mw_pythread_t *threads, int n,
                     char *proc_name, uint64_t *count, uint64_t *own) {
    mw_tstate_t *st = mws_ts_lookup(tid);
    if (in_python(tid, st, threads, n)) return;
    uint64_t c;
    if (mws_thread_cpu_ns(tid, &c) != 0) return; /* ended meanwhile */
    if (st && st->reg) {
        uint64_t d = c > st->cpu_ns ? c - st->cpu_ns : 0;
        st->cpu_ns = c;
        if (d) g_active_next = 1;
        mw_cputimer_unlisted(st->reg - 1, tid);
        int counted = mw_cputimer_counted(st->reg - 1, tid);
        mws_clock_account(st, mw_profbuf_generation(b), counted, counted, c, d, d);
        return;
    }
    other_t *o = find(&g_tab[g_cur], tid, 0);
    uint64_t base = o ? o->last : g_based ? 0 : c; /* new since the last scan: all its CPU */
    if (base > c) base = 0;                        /* its id was reused by a new thread */
    if (st && st->cpu_ns > base && st->cpu_ns <= c) base = st->cpu_ns; /* the ticks' part */
    if (st) st->cpu_ns = c; /* back in the list, its CPU counts from here */
    other_t *nx = find(&g_tab[!g_cur], tid, 1);
    if (!nx) return; /* more threads without Python than the table holds: counted next time */
    nx->last = c;
    if (o) {
        nx->own = o->own;
    } else { /* first met: ours? */
        char name[MW_THREAD_NAME_MAX];
        kernel_name(tid, name, sizeof name);
        nx->own = strncmp(name, "mw-", 3) == 0;
    }
    if (!nx->own && c > base && credit(b, tid, c - base, proc_name)) nx->own = 1;
    if (nx->own)
        (*own)++;
    else
        (*count)++;
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

void mws_others_scan(mw_profbuf_t *b, const mw_pythread_t *threads, int n) {
    if (!g_tab[0].e || !g_tab[1].e || !b) return;
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return; /* no /proc: the threads without Python stay unseen */
    empty(&g_tab[!g_cur]);
    g_active_next = 0;
    char proc_name[MW_THREAD_NAME_MAX] = "";
    uint64_t count = 0, own = 0;
    _Alignas(8) char buf[4096];
    for (;;) {
        long got = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (got <= 0) break;
        for (long off = 0; off < got;) {
            const struct linux_dirent64 *d = (const struct linux_dirent64 *)(buf + off);
            off += d->d_reclen;
            char *end;
            long tid = strtol(d->d_name, &end, 10);
            if (tid > 0 && *end == '\0') scan_one(b, tid, threads, n, proc_name, &count, &own);
        }
    }
    close(fd);
    g_cur = !g_cur;
    g_based = 1;
    g_active = g_active_next;
    g_own = own;
    g_stats.native_threads = count;
    g_stats.native_scans++;
}
