/* mw_cputimer_int — the state shared by the CPU timers' two files (the contract is mw_cputimer.h).
 *
 *   mw_cputimer.c      the handler (the in-thread read, the records it fills), set-up, stats, fork
 *   mw_cputimer_reg.c  registrations: arming a thread's perf event or POSIX timer, disarming,
 *                      the sweep of threads gone and the CPU of their exits
 * Only these files include this header.
 *
 * Threads and locks: g_reg's entries are armed and disarmed under g_lock (never taken by a
 * handler); a handler reads its entry's tid and gen atomically and writes only the fields of its
 * own thread's entry (perf slots, next_due, rng). g_mode, g_signo, g_period_ns, g_perf_max: set by
 * mw_cputimer_init (sampler not running), then read only. g_perf_open, g_gen_next, c_armed,
 * c_arm_failed: under g_lock. The c_* atomics: any thread.
 */
#ifndef MW_CPUTIMER_INT_H
#define MW_CPUTIMER_INT_H

#include "mw_cpusteal.h"
#include "mw_cputimer.h"
#include "mw_rand.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define REGS 4096 /* = MW_MAX_THREADS; the index takes the key's low 12 bits */
#define REG_BITS 12
#define SCRATCH 8     /* handlers reading at the same time (one per CPU running one) */
#define FDKEYS 65536  /* perf fds above this use a POSIX timer instead */
#define PERF_MAX 256  /* perf fds at most (and at most a quarter of RLIMIT_NOFILE) */
#define PERF_BUDGET 8 /* overflows a perf event may signal before the handler re-arms it */
#define PERF_REFILL 4
#define PERF_MIN_PERIOD 20000 /* ns: no period shorter (a handler runs 10-50 us) */

typedef struct {
    _Atomic long tid;     /* 0 = free */
    _Atomic uint32_t gen; /* generation of the current registration (1..2^20-1) */
    uintptr_t tstate;
    int fd;       /* perf event, -1 if none */
    dev_t fd_dev; /* perf: its device, inode and event id (mwc_perf_still) */
    ino_t fd_ino;
    uint64_t fd_id;
    uint32_t since_refill;  /* handler samples since it last topped up the perf budget */
    uint64_t slot_end;      /* perf: end of the coming sample's slot, in the event's own count */
    uint64_t target;        /* perf: the count at which the coming sample is due */
    uint64_t slot_off;      /* perf: where in its slot the coming sample falls (fallback only) */
    uint64_t rng;           /* perf: xorshift64* state (the owning thread's handler) */
    uint64_t cpu_at_arm;    /* CPU clock from which samples cover the thread (0: from its birth) */
    uint32_t bonus;         /* perf: periods the first sample also stands for (CPU before arming) */
    mw_steal_t steal;       /* perf: the count less the host's steal (mw_cpusteal.h) */
    _Atomic uint64_t heard; /* perf: the thread's CPU clock at its handler's last run (the
                             * sampler's watch, mw_cputimer_watch); 0 = unknown */
    _Atomic int revived;    /* perf: set by the watch when it topped the event up again */
    _Atomic uint32_t inside; /* +1 as a handler for it starts and as it ends: odd while one runs */
    _Atomic int unlisted;    /* the sampler found the thread out of the thread list (its thread
                              * state may be freed): the handler looks up its current one */
    uint64_t next_due;       /* POSIX: the thread-CPU instant (its clock) of the coming sample */
    int has_timer;
    int trap; /* perf: its overflows raise SIGTRAP (no budget: mw_cputimer_reg.c arm_perf) */
    timer_t timer;
} reg_t;

extern reg_t *g_reg;
extern _Atomic uint32_t *g_fdkey; /* perf fd -> key, 0 = none */
extern int g_signo, g_perf_max, g_perf_open;
extern _Atomic int g_mode;
extern int g_trap; /* perf events signal through SIGTRAP (mw_cputrap.h), else g_signo */
extern int64_t g_period_ns;
extern uint32_t g_gen_next;
extern pthread_mutex_t g_lock; /* arm / disarm / sweep */
/* 1 + the highest index in use: every scan of the registrations (arming, forgetting, the sweep,
 * a fork child's reset) stops here rather than read all REGS entries (~0.5 MiB) while the
 * process has not used them all. Under g_lock; a fork child's handler alone reads it without. */
extern int g_reg_top;
extern _Atomic uint64_t c_recorded, c_periods, c_no_record, c_exit_periods, c_steal_ns, c_revived,
    c_fds_lost;
extern uint64_t c_armed, c_arm_failed; /* under g_lock */

static inline int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void bump(_Atomic uint64_t *c, uint64_t v) {
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

/* The CPU-time clock of thread tid (of this process), as clock_gettime takes it. */
static inline clockid_t thread_clockid(long tid) {
    return (clockid_t)((~(unsigned int)tid) << 3) | 6;
}

/* A uniform draw in [0, n) (xorshift64*, mw_rand.h; the state is seeded by its owner). */
static inline uint64_t jitter_draw(uint64_t *st, uint64_t n) {
    return n ? (mw_rand_next(st) >> 11) % n : 0;
}

/* A free record, claimed (state 1), or NULL when every one waits for the sampler. Lock-free,
 * async-signal-safe. */
mw_cpusample_t *mwc_record_claim(void);
/* Hands a filled record to the sampler (state 2). Lock-free, async-signal-safe. */
void mwc_record_publish(mw_cpusample_t *rec);
/* A task-clock perf event on thread tid (disabled, sampling every period_ns), or -1. trap: its
 * overflows raise SIGTRAP carrying key (mw_cputrap.h) instead of needing mwc_perf_route. */
int mwc_perf_open(long tid, int64_t period_ns, uint32_t key, int trap);
/* Makes thread tid the owner of fd (F_SETOWN_EX, F_OWNER_TID): what mwc_perf_ours checks. 0, or
 * -1. */
int mwc_perf_own(int fd, long tid);
/* Routes fd's overflow signal (g_signo) to thread tid (its owner, as mwc_perf_own). 0, or -1. */
int mwc_perf_route(int fd, long tid);
/* The app may close our descriptors (a daemon closing every descriptor it did not open) and its
 * next file, pipe or eventfd gets the number: such a descriptor is never read, ioctl'd nor closed
 * by us. Two checks:
 * mwc_perf_ours: 1 when fd's owner is thread tid, as mwc_perf_own set it. One fcntl
 *   (F_GETOWN_EX: any kind of descriptor answers it), for the signal handler, which runs in that
 *   thread. Only while tid lives: the owner of a thread that has exited reads as none.
 *   Async-signal-safe.
 * mwc_perf_still: 1 when r->fd is still the event r opened (the device and inode it had, and the
 *   event id the kernel gave it: perf events share one inode with eventfds and epolls, and only
 *   descriptors of that inode are asked PERF_EVENT_IOC_ID). Whether r's thread lives or not
 *   (its exit, a fork child). Sampler side. */
int mwc_perf_ours(int fd, long tid);
int mwc_perf_still(const reg_t *r);

#endif
