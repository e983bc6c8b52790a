/* mw_cputimer — per-thread CPU-time sample triggers and the in-thread read; see mw_cputimer.h.
 *
 * A registration (g_reg[i]) ties a kernel thread to its PyThreadState and its timer. The key the
 * handler gets back (the POSIX timer's sigev_value, or the perf fd's entry in g_fdkey) is
 * gen << 12 | i; the handler acts only when the registration still has that generation and
 * names the calling thread, so a late signal of a timer deleted meanwhile, or one meant for a
 * thread whose id was reused, does nothing.
 */
#define _GNU_SOURCE
#include "mw_cputimer_int.h"

#include "mw_codenames.h"
#include "mw_cputrap.h"
#include "mw_report.h"
#include "mw_labels.h"
#include "mw_tasks.h"
#include "mw_threads.h"
#include "mw_unmasked.h"
#include "mw_unwind.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    atomic_int busy;
    mw_guard_t guard;
    mw_readcache_t rc;
    /* followed by mw_walkscratch_size() bytes */
} scratch_t;

reg_t *g_reg;
_Atomic uint32_t *g_fdkey;
static mw_cpusample_t g_rec[MW_CPUTIMER_RECORDS];
/* Each record's state, packed (0 free, 1 being written, 2 ready): the scans touch 1 KiB, not
 * one cache line per record. */
static _Atomic uint32_t g_state[MW_CPUTIMER_RECORDS];
static mw_rawframe_t *g_frames; /* MW_CPUTIMER_RECORDS * g_max_depth */
static char *g_names;           /* MW_CPUTIMER_RECORDS * MW_CPUTIMER_NAMES */
static uintptr_t *g_ips;        /* MW_CPUTIMER_RECORDS * MW_UNWIND_MAX_FRAMES */

static uint8_t *g_scratch;
static size_t g_scratch_stride;
int g_signo, g_perf_max, g_perf_open, g_trap;
_Atomic int g_mode; /* written by init, or by the deferred probe (the sampler thread) */
static int g_max_depth;
static int g_guarded; /* direct reads under mw_guard are possible */
int64_t g_period_ns;
uint32_t g_gen_next = 1;
static uint32_t g_rec_next;      /* sampler: where the drain scan resumes */
static _Atomic uint32_t g_ready; /* records in state 2: a tick with none scans nothing */

_Atomic uint64_t c_recorded, c_periods, c_no_record, c_exit_periods, c_steal_ns, c_revived,
    c_fds_lost;
static _Atomic uint64_t c_faults, c_native, c_native_frames, c_signals, c_no_scratch, c_torn,
    c_stale, c_handler_ns, c_early;
uint64_t c_armed, c_arm_failed;
int g_reg_top;
pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static void *map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* ---- the handler (async-signal-safe) -------------------------------------------------------- */

/* A free record, claimed (state 1), or NULL when every one waits for the sampler. Lock-free. */
mw_cpusample_t *mwc_record_claim(void) {
    for (int i = 0; i < MW_CPUTIMER_RECORDS; i++) {
        uint32_t z = 0;
        if (atomic_compare_exchange_strong(&g_state[i], &z, 1)) return &g_rec[i];
    }
    return NULL;
}

/* Hands a filled record to the sampler (state 2). Lock-free. */
void mwc_record_publish(mw_cpusample_t *rec) {
    atomic_store_explicit(&g_state[rec - g_rec], 2, memory_order_release);
    atomic_fetch_add_explicit(&g_ready, 1, memory_order_release);
}

static scratch_t *scratch_at(int i) {
    return (scratch_t *)(g_scratch + (size_t)i * g_scratch_stride);
}

/* Reads the calling thread's own Python frames (and the names the sampler lacks) into rec: plain
 * loads under one fault guard while our fault handler is the installed one, else
 * process_vm_readv. tstate: the thread state it was armed for (unlisted: found out of the thread
 * list since, see mw_cputimer_unlisted). Returns 0, or -1 when a read faulted (the sample is
 * abandoned). */
static int read_self(scratch_t *sc, mw_cpusample_t *rec, uintptr_t tstate, int unlisted, long me,
                     int *mine, int *truncated) {
    mw_readcache_reset(&sc->rc);
    if (g_guarded && mw_guard_active()) {
        if (sigsetjmp(sc->guard.jb, 0)) {
            sc->guard.armed = sc->guard.session = 0;
            atomic_store(&sc->guard.owner, 0);
            return -1;
        }
        atomic_store(&sc->guard.owner, me);
        sc->guard.session = 1;
        atomic_signal_fence(memory_order_seq_cst);
        mw_guard_arm(&sc->guard);
        mw_readcache_direct(&sc->rc, &sc->guard);
    }
    uintptr_t anchor = 0;
    int depth = 0;
    /* Found out of the list by the sampler (a native thread between calls into Python): the
     * thread state it was armed for may be freed (its memory still looking like this thread's
     * state, stale frames and all); the one it runs Python under now, if any, is among the newest.
     */
    uintptr_t cur = unlisted ? mw_pyframes_find_own(&sc->rc, me) : tstate;
    uintptr_t top = mw_pyframes_top_frame_of(&sc->rc, cur, me, &anchor, mine);
    if (!*mine) { /* armed for a thread state it no longer has: it may run Python under another */
        uintptr_t own = mw_pyframes_find_own(&sc->rc, me);
        if (own && own != cur) top = mw_pyframes_top_frame_of(&sc->rc, own, me, &anchor, mine);
    }
    rec->outer.gen = 0;
    rec->outer.idx = -1;
    rec->outer.task = 0;
    if (top)
        depth = mw_pyframes_walk_gen(&sc->rc, (mw_walkscratch_t *)(sc + 1), top, anchor,
                                     rec->frames, g_max_depth, truncated, &rec->outer);
    rec->depth = *truncated == 2 ? 0 : depth;
    /* the task running the coroutine now: by the time the sampler drains this record the loop
     * may be between steps or in another task's, and asyncio's dict says so */
    if (rec->outer.gen && *mine && *truncated != 2)
        rec->outer.task = mw_tasks_current(&sc->rc, rec->outer.gen);
    if (*mine && *truncated != 2) mw_codenames_copy(&sc->rc, rec);
    sc->guard.armed = sc->guard.session = 0;
    atomic_signal_fence(memory_order_seq_cst);
    atomic_store(&sc->guard.owner, 0);
    return 0;
}

static void on_signal(siginfo_t *si, void *ucontext, int64_t t0, uint32_t key, uint32_t periods,
                      int perf_fd, reg_t *r);
/* A handler run longer than this in wall time is measured on the thread's CPU clock instead. */
#define HANDLER_LONG_NS 50000

void mw_cputimer_on_signal(siginfo_t *si, void *ucontext) {
    if (!g_reg) return;
    int64_t t0 = mono_ns();
    uint32_t key = 0, periods = 1;
    int perf_fd = -1;
    if (si->si_signo == SIGTRAP) { /* mw_cputrap's handler passes only TRAP_PERF ones */
        key = (uint32_t)mw_cputrap_data(si);
        reg_t *k = &g_reg[key & (REGS - 1)];
        if (key && atomic_load(&k->gen) == key >> REG_BITS && atomic_load(&k->tid)) perf_fd = k->fd;
    } else if (si->si_code == SI_TIMER) {
        key = (uint32_t)si->si_value.sival_int;
        if (si->si_overrun > 0) periods += (uint32_t)si->si_overrun;
    } else if ((si->si_code == POLL_IN || si->si_code == POLL_HUP) && si->si_fd >= 0 &&
               si->si_fd < FDKEYS && g_fdkey) {
        key = atomic_load_explicit(&g_fdkey[si->si_fd], memory_order_acquire);
        perf_fd = si->si_fd;
    } else {
        return;
    }
    reg_t *r = &g_reg[key & (REGS - 1)];
    /* odd while the handler runs: the signal is blocked in the thread then, and the sampler asking
     * /proc whether the thread blocks it must not take that for the thread's own doing */
    atomic_fetch_add(&r->inside, 1);
    on_signal(si, ucontext, t0, key, periods, perf_fd, r);
    atomic_fetch_add(&r->inside, 1);
}

static void on_signal(siginfo_t *si, void *ucontext, int64_t t0, uint32_t key, uint32_t periods,
                      int perf_fd, reg_t *r) {
    /* A descriptor the app closed (and may have reused) is not read nor ioctl'd: its event is gone
     * with it, and this signal, on its way before, is a sample like any other. */
    if (perf_fd >= 0 && !mwc_perf_ours(perf_fd, atomic_load(&r->tid))) perf_fd = -1;
    /* POSIX timer: its expiries lie on a grid of the thread's CPU clock (a random phase, one per
     * period, arm_timer); this signal stands for the grid's instants up to its dequeue (1 +
     * overrun), and the coming one is the next. The thread's exit credits those passed since
     * (timer_exit). Only this thread's handler and its exit write next_due. */
    if (si->si_code == SI_TIMER && key && atomic_load(&r->gen) == key >> REG_BITS &&
        atomic_load(&r->tid))
        r->next_due += (uint64_t)periods * (uint64_t)g_period_ns;
    /* The thread's CPU clock as the handler starts (perf: read with the count below), for its own
     * CPU time when it ran long (see the end). */
    uint64_t cpu0 = 0;
    struct timespec ts0;
    if (perf_fd < 0 && clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts0) == 0)
        cpu0 = (uint64_t)ts0.tv_sec * 1000000000ULL + (uint64_t)ts0.tv_nsec;
    /* Jittered systematic sampling: the thread's CPU time is cut in slots of one period and
     * each slot gets one sample at a random instant within it. A function's sample count is its
     * CPU time / period to within one sample per stretch it ran (as with a fixed period), but
     * the phase is random, so code that alternates on a fixed rhythm cannot alias with the
     * period (with a fixed period the handler's own time, longer on deep stacks, shifted which
     * phase the next sample hit: a 20-deep recursion alternating with a loop every 0.3 ms got up
     * to 5.6 points too few samples on CPython 3.10 with native frames). The slots are laid in
     * the event's own count (task-clock ns of this thread, read here): setting the next period
     * restarts the countdown, and the CPU between the overflow and that restart (signal
     * delivery, the ioctl itself: tens of us on a loaded VM) would otherwise be lost at every
     * sample (a thread whose CPU was known only from its samples came out 10% short). A signal
     * that comes later than a whole slot stands for the slots it missed (periods), as a POSIX
     * timer's overrun count does. One read and one ioctl per sample (~2 and ~12 us here). The
     * count is read less the time the host took the virtual CPU away (mw_cpusteal.h: one more
     * clock read, ~0.4 us): a sample due in the thread's CPU is not one due in stolen time.
     * A perf event also stops by itself after PERF_BUDGET overflows (PERF_EVENT_IOC_REFRESH) and
     * the handler tops the budget up every PERF_REFILL samples, so at most PERF_BUDGET of its
     * signals are ever queued: a thread that blocks our signal cannot pile up queued real-time
     * signals (past RLIMIT_SIGPENDING the kernel would turn an overflow into SIGIO, which
     * kills). Overflows can outrun the handler runs (the kernel sends one signal for overflows
     * that come faster than it delivers them, and a top-up can land between the overflow that
     * spent the budget and the event's disabling): the overflow that spends the budget comes with
     * POLL_HUP, sent after the event is disabled, and its handler gives a whole budget again (at
     * 10 kHz events stopped ~3 times a second per busy thread and waited for the sampler's watch
     * at its next tick: 2-6% of the periods had no sample). */
    int early = 0;
    if (perf_fd >= 0 && key && atomic_load(&r->gen) == key >> REG_BITS && atomic_load(&r->tid)) {
        uint64_t P = (uint64_t)g_period_ns, u = jitter_draw(&r->rng, P), c = 0, next;
        if (!r->trap) {                          /* every overflow spends the budget */
            int spent = si->si_code == POLL_HUP; /* this one spent it all: a whole budget again */
            if (spent || ++r->since_refill >= PERF_REFILL) {
                r->since_refill = 0;
                ioctl(perf_fd, PERF_EVENT_IOC_REFRESH, spent ? PERF_BUDGET : PERF_REFILL);
            }
        }
        struct timespec now;
        uint64_t stolen = 0;
        /* the count less the host's steal; the clock also tells the sampler's watch that this
         * event still signals (mw_cputimer_watch) */
        if (read(perf_fd, &c, sizeof c) == (ssize_t)sizeof c && c &&
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now) == 0) {
            uint64_t t = (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
            cpu0 = t;
            atomic_store_explicit(&r->heard, t, memory_order_relaxed);
            c = mw_steal_less(&r->steal, c, t, &stolen);
            if (!c) c = 1; /* 0 means "no count" below */
            if (stolen) bump(&c_steal_ns, stolen);
        }
        if (c && c < r->target) {
            /* Early: the previous period ran on until our ioctl took effect and overflowed
             * once more meanwhile (a short period, a late handler). Not a sample: the one due
             * is still ahead. */
            early = 1;
            next = r->target - c;
            if (next < PERF_MIN_PERIOD) next = PERF_MIN_PERIOD;
        } else if (c) {
            /* The first signal after the sampler's watch revived a stopped event: the slots of
             * the stopped stretch had no sample, and this one must not stand for them all at
             * this one stack (a thread with a window's worth of samples gets that CPU from its
             * clock, split over all of them). */
            if (atomic_exchange_explicit(&r->revived, 0, memory_order_relaxed) && c > r->slot_end)
                r->slot_end = c;
            uint64_t end = r->slot_end;
            if (c >= end + P) { /* whole slots went by without a sample: this one stands for them */
                uint64_t missed = (c - end) / P;
                if (missed > 1000000) missed = 1000000;
                periods += (uint32_t)missed;
                end += missed * P;
            }
            /* The next sample: in the next slot, [end, end + P). Never sooner than P/8 from now:
             * a short period fires again inside this handler, and a train of them is an
             * overflow storm (the budget would stop it, the samples would be wrong). When the
             * instant drawn is that close (or already past: this signal came late), the slot
             * goes to this sample too and the next slot gets the next one. */
            uint64_t target = end + u,
                     soonest = c + (P / 8 > PERF_MIN_PERIOD ? P / 8 : PERF_MIN_PERIOD);
            for (int g = 0; target < soonest && g < 4; g++) {
                periods++;
                end += P;
                target = end + jitter_draw(&r->rng, P);
            }
            next = target > c ? target - c : P;
            r->slot_end = end + P;
            r->target = target;
        } else { /* no count: relative to now (the gap before the restart is lost) */
            next = P - r->slot_off + u;
            r->slot_off = u;
            if (next < P / 8 + PERF_MIN_PERIOD) { /* as above: too soon, one slot more */
                next += P;
                periods++;
            }
        }
        ioctl(perf_fd, PERF_EVENT_IOC_PERIOD, &next);
        if (!early && r->bonus) { /* the CPU it used before it was armed (arm_perf) */
            periods += r->bonus;
            r->bonus = 0;
        }
    }
    if (early) {
        bump(&c_early, 1);
        return;
    }
    /* The signal is routed to the registered thread (F_OWNER_TID / SIGEV_THREAD_ID, both bound to
     * that task, not to its number): while the registration has the key's generation, we are
     * that thread — no gettid() needed (the walk checks the thread state's own id too). */
    long me = atomic_load(&r->tid);
    if (key == 0 || atomic_load(&r->gen) != key >> REG_BITS || me == 0) {
        bump(&c_stale, 1);
        return;
    }
    bump(&c_signals, 1);
    scratch_t *sc = NULL;
    for (int i = 0; i < SCRATCH && !sc; i++) {
        int z = 0;
        if (atomic_compare_exchange_strong(&scratch_at(i)->busy, &z, 1)) sc = scratch_at(i);
    }
    if (!sc) {
        bump(&c_no_scratch, 1);
        return;
    }
    mw_cpusample_t *rec = mwc_record_claim();
    if (!rec) {
        atomic_store(&sc->busy, 0);
        bump(&c_no_record, 1);
        return;
    }
    int mine = 0, truncated = 0;
    int read = read_self(sc, rec, r->tstate, atomic_load(&r->unlisted), me, &mine, &truncated);
    if (read < 0 || (mine && truncated == 2)) {
        atomic_store(&sc->busy, 0);
        atomic_store(&g_state[rec - g_rec], 0);
        bump(&c_torn, 1);
        if (read < 0) bump(&c_faults, 1); /* a read faulted: caught between two stores */
        return;
    }
    if (!mine) { /* its thread state is going (the thread is ending): its CPU, no Python frame */
        rec->depth = 0;
        rec->ncopies = 0;
        rec->outer.gen = 0;
        rec->outer.idx = -1;
        rec->outer.task = 0;
        truncated = 0;
    }
    int depth = rec->depth;
    rec->nips = rec->ips_complete = 0;
    if (mw_unwind_enabled()) { /* native frames of the same instant */
        uint8_t *cursor = (uint8_t *)(sc + 1) + ((mw_walkscratch_size() + 63) & ~(size_t)63);
        rec->nips =
            mw_unwind_here(ucontext, cursor, rec->ips, MW_UNWIND_MAX_FRAMES, &rec->ips_complete);
        bump(&c_native, 1);
        bump(&c_native_frames, (uint64_t)rec->nips);
    }
    atomic_store(&sc->guard.owner, 0);
    atomic_store(&sc->busy, 0);
    rec->reg = (int32_t)(key & (REGS - 1));
    rec->tstate = r->tstate;
    rec->tid = me;
    rec->periods = periods;
    rec->counted = 1; /* perf: laid in its count; POSIX: on a grid of random phase (arm_timer) */
    rec->labelset = mw_threads_labelset_now(me);
    mw_labels_span_seen(rec->labelset);
    rec->depth = depth;
    rec->truncated = truncated;
    rec->unplaced = 0;
    rec->unmasked = ucontext ? mw_unmasked_at(ucontext) : 0;
    int64_t took = mono_ns() - t0;
    /* Its run is CPU the thread spent at this stack (the sampler charges it there: handler_ns). A
     * run that took long in wall time may have waited (preempted; a perf ioctl behind the
     * sampler's own on the event): its CPU then, one more clock read. Its wall time put up to a
     * period (2 ms at 500 Hz) at the line a fork child was on as the profiler restarted, a few
     * times per child on a busy machine, out of the share of the code that ran. */
    struct timespec ts1;
    if (took > HANDLER_LONG_NS && cpu0 && clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts1) == 0) {
        uint64_t cpu1 = (uint64_t)ts1.tv_sec * 1000000000ULL + (uint64_t)ts1.tv_nsec;
        int64_t ran = cpu1 > cpu0 ? (int64_t)(cpu1 - cpu0) : 0;
        if (ran < took) took = ran;
    }
    rec->handler_ns = took > 0 ? (uint64_t)took : 0;
    bump(&c_handler_ns, rec->handler_ns);
    bump(&c_recorded, 1);
    bump(&c_periods, periods);
    mwc_record_publish(rec);
}

/* ---- set-up --------------------------------------------------------------------------------- */

/* The perf event and its routing (mwc_perf_open, mwc_perf_route: mw_cputimer_int.h). */
int mwc_perf_open(long tid, int64_t period_ns, uint32_t key, int trap) {
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.type = PERF_TYPE_SOFTWARE;
    a.size = sizeof a;
    a.config = PERF_COUNT_SW_TASK_CLOCK;
    a.sample_period = (uint64_t)period_ns;
    a.disabled = 1;
    a.wakeup_events = 1;
    a.exclude_hv = 1;
    if (trap) { /* SIGTRAP on the way back to user mode, carrying the key (mw_cputrap.h) */
        a.sigtrap = 1;
        a.remove_on_exec = 1; /* required with sigtrap: an exec'd program has no handler */
        a.sig_data = key;
    }
    /* Kernel time counts: CPU spent in a system call belongs to the Python line that made it. */
    int fd = (int)syscall(SYS_perf_event_open, &a, (pid_t)tid, -1, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0 && (errno == EACCES || errno == EPERM)) {
        a.exclude_kernel = 1;
        fd = (int)syscall(SYS_perf_event_open, &a, (pid_t)tid, -1, -1, PERF_FLAG_FD_CLOEXEC);
    }
    return fd;
}

int mwc_perf_own(int fd, long tid) {
    struct f_owner_ex o = {F_OWNER_TID, (pid_t)tid};
    return fcntl(fd, F_SETOWN_EX, &o) == 0 ? 0 : -1;
}

int mwc_perf_ours(int fd, long tid) {
    struct f_owner_ex o;
    return fd >= 0 && tid > 0 && fcntl(fd, F_GETOWN_EX, &o) == 0 && o.type == F_OWNER_TID &&
           o.pid == (pid_t)tid;
}

int mwc_perf_still(const reg_t *r) {
    struct stat st;
    uint64_t id = 0;
    return r->fd >= 0 && fstat(r->fd, &st) == 0 && st.st_dev == r->fd_dev &&
           st.st_ino == r->fd_ino && ioctl(r->fd, PERF_EVENT_IOC_ID, &id) == 0 && id == r->fd_id;
}

int mwc_perf_route(int fd, long tid) {
    if (mwc_perf_own(fd, tid) != 0 || fcntl(fd, F_SETSIG, g_signo) != 0) return -1;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_ASYNC | O_NONBLOCK) != 0) return -1;
    return 0;
}

/* Whether perf_event_open was tried in this process (or the parent it was forked from), and the
 * MW_PROFILING_CPU_TIMER value a deferred probe is for. */
static int g_perf_probed;
static const char *g_probe_force;

/* Opens and closes a perf event on the calling thread: mode 2 when it opens, else 1. */
static int perf_probe(const char *force) {
    /* perf-trap: perf events raise SIGTRAP (mw_cputrap.h), opt-in: a library that takes SIGTRAP
     * after the profiler started would get ours (Celery's billiard pool workers exit on it) */
    int trap_wanted = force && strcmp(force, "perf-trap") == 0;
    long me = (long)syscall(SYS_gettid);
    int fd = mwc_perf_open(me, g_period_ns, 0, 0), err = errno;
    g_perf_probed = 1;
    if (fd >= 0) {
        close(fd);
        /* The SIGTRAP route when asked for, where the kernel has it (5.13+) and nothing else
         * claims SIGTRAP yet. */
        const char *trap_why = NULL;
        g_trap = 0;
        if (trap_wanted && mw_cputrap_install(&trap_why) == 0 &&
            (fd = mwc_perf_open(me, g_period_ns, 0, 1)) >= 0) {
            close(fd);
            g_trap = 1;
        } else if (trap_wanted) { /* asked for, not had: say so (stats: cpu_timer_sigtrap 0) */
            mw_report_once(MW_REPORT_CPU_TIMER,
                           "MW_PROFILING_CPU_TIMER=perf-trap: no SIGTRAP route (%s); CPU "
                           "samples from perf events on the real-time signal",
                           trap_why ? trap_why : strerror(errno));
        }
        atomic_store(&g_mode, 2);
        return 2;
    }
    if (force) /* perf or perf-trap asked for: where it is refused, the fallback is said */
        mw_report_once(MW_REPORT_CPU_TIMER,
                       "MW_PROFILING_CPU_TIMER=%s: perf_event_open refused (%s); CPU samples "
                       "from POSIX CPU timers",
                       force, strerror(err));
    atomic_store(&g_mode, 1);
    return 1;
}

int mw_cputimer_probe(void) {
    return perf_probe(g_probe_force);
}

int mw_cputimer_init(int rate_hz, int max_depth, int signo, int may_defer, const char **why) {
    atomic_store(&g_mode, 0);
    mw_cputimer_unhalt(); /* a signal of our own again */
    const char *force = getenv("MW_PROFILING_CPU_TIMER");
    if (force && !*force) force = NULL;
    if (force && strcmp(force, "perf") != 0 && strcmp(force, "perf-trap") != 0 &&
        strcmp(force, "timer") != 0 && strcmp(force, "off") != 0) {
        mw_report_once(MW_REPORT_CPU_TIMER,
                       "MW_PROFILING_CPU_TIMER=%.40s is none of perf, perf-trap, timer, off: "
                       "ignored (the default: perf events where the kernel allows them)",
                       force);
        force = NULL;
    }
    if (force && strcmp(force, "off") == 0) {
        *why = "MW_PROFILING_CPU_TIMER=off";
        return 0;
    }
    if (signo <= 0) {
        *why = "no signal handler";
        return 0;
    }
    if (!g_reg) {
        g_reg = map(REGS * sizeof *g_reg);
        g_names = map((size_t)MW_CPUTIMER_RECORDS * MW_CPUTIMER_NAMES);
        g_ips = map((size_t)MW_CPUTIMER_RECORDS * MW_UNWIND_MAX_FRAMES * sizeof *g_ips);
        g_fdkey = map(FDKEYS * sizeof *g_fdkey);
        g_scratch_stride =
            (sizeof(scratch_t) + mw_walkscratch_size() + 64 + mw_unwind_cursor_size() + 4095) &
            ~(size_t)4095;
        g_scratch = map(SCRATCH * g_scratch_stride);
        if (!g_reg || !g_fdkey || !g_scratch || mw_codenames_init() != 0 || !g_names || !g_ips) {
            *why = "out of memory";
            return 0;
        }
        /* No slot is written here: each is set up as it is first taken (arm_locked, fd -1
         * before anything else), and every slot below g_reg_top has been taken once (they are
         * taken in index order from a hint that only moves up, wrapping). Setting every fd to
         * -1 here made all REGS slots resident: 864 KiB in every profiled process. */
        g_guarded = mw_guard_allowed();
        for (int i = 0; i < SCRATCH && g_guarded; i++)
            if (mw_guard_register(&scratch_at(i)->guard) != 0) g_guarded = 0;
    }
    if (max_depth > g_max_depth || !g_frames) {
        mw_rawframe_t *f = map((size_t)MW_CPUTIMER_RECORDS * (size_t)max_depth * sizeof *f);
        if (!f) {
            *why = "out of memory";
            return 0;
        }
        if (g_frames)
            munmap(g_frames, (size_t)MW_CPUTIMER_RECORDS * (size_t)g_max_depth * sizeof *f);
        g_frames = f;
        g_max_depth = max_depth;
    }
    for (int i = 0; i < MW_CPUTIMER_RECORDS; i++) {
        g_rec[i].frames = g_frames + (size_t)i * (size_t)g_max_depth;
        g_rec[i].names = g_names + (size_t)i * MW_CPUTIMER_NAMES;
        g_rec[i].ips = g_ips + (size_t)i * MW_UNWIND_MAX_FRAMES;
        atomic_store(&g_state[i], 0);
    }
    g_signo = signo;
    g_period_ns = 1000000000LL / (rate_hz > 0 ? rate_hz : 100);
    struct rlimit rl;
    g_perf_max = PERF_MAX;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (int)(rl.rlim_cur / 4) < g_perf_max)
        g_perf_max = (int)(rl.rlim_cur / 4);
    /* perf events unless another mode is forced (perf-trap: see perf_probe) */
    int want_perf = !force || strcmp(force, "perf") == 0 || strcmp(force, "perf-trap") == 0;
    if (want_perf && may_defer && !g_perf_probed) {
        g_probe_force = force; /* getenv's string: stable */
        return MW_CPUTIMER_DEFERRED;
    }
    if (want_perf) return perf_probe(force);
    atomic_store(&g_mode, 1);
    return 1;
}

int mw_cputimer_mode(void) {
    return atomic_load_explicit(&g_mode, memory_order_relaxed);
}

mw_cpusample_t *mw_cputimer_next(void) {
    if (atomic_load_explicit(&g_ready, memory_order_acquire) == 0) return NULL;
    for (int k = 0; k < MW_CPUTIMER_RECORDS; k++) {
        uint32_t i = (g_rec_next + (uint32_t)k) % MW_CPUTIMER_RECORDS;
        if (atomic_load_explicit(&g_state[i], memory_order_acquire) == 2) {
            g_rec_next = i + 1;
            return &g_rec[i];
        }
    }
    return NULL;
}

void mw_cputimer_done(mw_cpusample_t *s) {
    atomic_store_explicit(&g_state[s - g_rec], 0, memory_order_release);
    atomic_fetch_sub_explicit(&g_ready, 1, memory_order_relaxed);
}

void mw_cputimer_get_stats(mw_cputimer_stats_t *out) {
    out->mode = (uint64_t)g_mode;
    out->armed = c_armed;
    out->arm_failed = c_arm_failed;
    out->signals = atomic_load(&c_signals);
    out->recorded = atomic_load(&c_recorded);
    out->periods = atomic_load(&c_periods);
    out->no_record = atomic_load(&c_no_record);
    out->no_scratch = atomic_load(&c_no_scratch);
    out->torn = atomic_load(&c_torn);
    out->stale = atomic_load(&c_stale);
    out->early = atomic_load(&c_early);
    out->exit_periods = atomic_load(&c_exit_periods);
    out->steal_ns = atomic_load(&c_steal_ns);
    out->revived = atomic_load(&c_revived);
    out->fds_lost = atomic_load(&c_fds_lost);
    out->handler_ns = atomic_load(&c_handler_ns);
    out->native = atomic_load(&c_native);
    out->faults = atomic_load(&c_faults);
    out->native_frames = atomic_load(&c_native_frames);
    out->period_ns = (uint64_t)g_period_ns;
    out->sigtrap = (uint64_t)g_trap;
}

void mw_cputimer_after_fork_child(void) {
    pthread_mutex_init(&g_lock, NULL);
    if (!g_reg) return;
    /* Only the entries in use are written: a write to each would copy every page of the table
     * (copy-on-write), a good part of every fork's cost. */
    for (int i = 0; i < g_reg_top; i++) {
        reg_t *r = &g_reg[i];
        if (r->fd >= 0) { /* the parent's event: not ours to keep (unless the app closed it) */
            atomic_store(&g_fdkey[r->fd], 0);
            if (mwc_perf_still(r)) close(r->fd);
            r->fd = -1;
        }
        if (r->has_timer) r->has_timer = 0; /* POSIX timers are not inherited */
        if (atomic_load(&r->tid)) atomic_store(&r->tid, 0);
    }
    g_reg_top = 0;
    for (int i = 0; i < MW_CPUTIMER_RECORDS; i++)
        if (atomic_load(&g_state[i])) atomic_store(&g_state[i], 0);
    atomic_store(&g_ready, 0);
    for (int i = 0; i < SCRATCH && g_scratch; i++)
        atomic_store(&scratch_at(i)->busy, 0);
    g_perf_open = 0;
    c_armed = 0;
}
