/* mw_cputimer_reg — arming and disarming the per-thread CPU timers, and the CPU of threads' exits;
 * see mw_cputimer.h (contract) and mw_cputimer_int.h (shared state).
 */
#define _GNU_SOURCE
#include "mw_cputimer_int.h"

#include "mw_cputrap.h"
#include "mw_labels.h"
#include "mw_report.h"
#include "mw_threads.h"

#include <errno.h>
#include <stdlib.h>
#include <linux/perf_event.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The destructor that credits a POSIX-timed thread's exit (timer_exit), set up once. */
static pthread_key_t g_exit_key;
static pthread_once_t g_exit_once = PTHREAD_ONCE_INIT;
static int g_exit_key_ok;
static void exit_key_create(void);
static void disarm_locked(int i);

/* g_reg_top after a registration went: past the highest index still in use. g_lock held. */
static void shrink_top(void) {
    while (g_reg_top > 0 && atomic_load(&g_reg[g_reg_top - 1].tid) == 0)
        g_reg_top--;
}

/* A POSIX timer on thread tid's CPU clock. Its expiries lie on a grid of that clock, one per
 * period at a random phase: the first at base + u (u uniform in (0, P]), then every P. A thread
 * therefore gets a sample with probability cpu / P even when it uses less than a period in all,
 * and the number of its samples times P is its CPU without bias (with the first expiry a fixed
 * period after the arming, a thread using less than one never got a sample: 1,500 threads of
 * 3 ms each came out at 9% of their CPU, 11,400 threads of 0.1 ms at 0%). base: 0 for a thread
 * arming itself at its start (its clock counts from its creation: an expiry already passed fires
 * at once, at its start-up code, and its overrun counts the others, as perf's first sample does),
 * else its clock at the arming. The kernel checks CPU timers at its scheduler tick (CONFIG_HZ), so
 * a signal may come up to a tick of the thread's running later than its instant, standing for the
 * instants passed (1 + overrun); at the thread's exit, those passed with no signal yet are credited
 * by timer_exit. */
static int arm_timer(reg_t *r, long tid, uint32_t key, int born) {
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = g_signo;
    sev.sigev_value.sival_int = (int)key;
    sev._sigev_un._tid = (pid_t)tid;
    clockid_t cid = thread_clockid(tid);
    if (timer_create(cid, &sev, &r->timer) != 0) return -1;
    uint64_t P = (uint64_t)g_period_ns;
    r->rng = ((uint64_t)mono_ns() << 20) ^ ((uint64_t)tid << 1) ^ key ^ 1;
    r->next_due = (born ? 0 : r->cpu_at_arm) + 1 + jitter_draw(&r->rng, P);
    struct itimerspec its;
    its.it_interval.tv_sec = (time_t)(P / 1000000000ULL);
    its.it_interval.tv_nsec = (long)(P % 1000000000ULL);
    its.it_value.tv_sec = (time_t)(r->next_due / 1000000000ULL);
    its.it_value.tv_nsec = (long)(r->next_due % 1000000000ULL);
    r->has_timer = 1; /* before the arming: a first expiry already passed is signalled at once */
    if (timer_settime(r->timer, TIMER_ABSTIME, &its, NULL) != 0) {
        r->has_timer = 0;
        timer_delete(r->timer);
        return -1;
    }
    return 0;
}

static int arm_perf(reg_t *r, long tid, uint32_t key, int born) {
    if (g_perf_open >= g_perf_max) return -1;
    /* perf_event_open accepts any thread of the same user: make sure tid is one of OURS (a thread
     * id inherited from another process, e.g. a forked worker's stale thread state, would send
     * our signal to that process). timer_create checks this itself. */
    if (syscall(SYS_tgkill, getpid(), (pid_t)tid, 0) != 0) return -1;
    /* The first sample at a random instant of the first slot (see the handler). */
    r->rng = ((uint64_t)mono_ns() << 20) ^ ((uint64_t)tid << 1) ^ key ^ 1;
    r->slot_off = jitter_draw(&r->rng, (uint64_t)g_period_ns);
    r->slot_end = (uint64_t)g_period_ns; /* the event counts from 0: slot 0 is [0, P) */
    if (r->slot_off < PERF_MIN_PERIOD) r->slot_off = PERF_MIN_PERIOD;
    r->bonus = 0;
    /* SIGTRAP while it is still ours (an application may have taken it since) */
    int trap = g_trap && mw_cputrap_ours();
    int fd = mwc_perf_open(tid, (int64_t)r->slot_off, key, trap);
    if (fd < 0) return -1;
    if (fd >= FDKEYS || (trap ? mwc_perf_own(fd, tid) : mwc_perf_route(fd, tid)) != 0) {
        close(fd);
        return -1;
    }
    struct timespec ts;
    /* The thread's CPU clock as the event starts counting from 0 (its count is read less the
     * host's steal, mw_cpusteal.h); another thread's is read through its clock id. */
    int clock_ok = clock_gettime(born ? CLOCK_THREAD_CPUTIME_ID : thread_clockid(tid), &ts) == 0;
    mw_steal_start(&r->steal, 0,
                   clock_ok ? (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec : 0,
                   clock_ok);
    atomic_store(&r->heard, clock_ok ? r->steal.clock : 0);
    atomic_store(&r->revived, 0);
    if (born && clock_ok) {
        /* A thread arming itself at its start has already run `pre` ns (its creation, the
         * interpreter's thread bootstrap, this arming: ~0.1 ms, as much as a thread that runs
         * 0.1 ms of Python uses in all) that no slot of the event covers: it counts from the
         * enabling below. Those slots' samples were due before: they are taken now, as one
         * sample standing for floor(pre / P) periods plus one more with probability
         * frac(pre / P) (unbiased: pre in expectation), at the stack the thread is in a few us
         * from now (its start-up code). Slot 0 starts after that sample. */
        uint64_t P = (uint64_t)g_period_ns,
                 pre = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec, k = pre / P;
        if (jitter_draw(&r->rng, P) < pre % P) k++;
        if (k > 1000000) k = 1000000;
        uint64_t first = PERF_MIN_PERIOD;
        if (k && ioctl(fd, PERF_EVENT_IOC_PERIOD, &first) == 0) { /* disabled: no timer to move */
            r->bonus = (uint32_t)(k - 1);                         /* the sample itself counts one */
            r->slot_off = PERF_MIN_PERIOD;
            r->slot_end = 0; /* the handler draws slot 0's instant after this sample */
        }
    }
    r->target = r->slot_off;
    atomic_store_explicit(&g_fdkey[fd], key, memory_order_release);
    r->since_refill = 0;
    r->trap = trap;
    /* Enabled with a budget on the real-time route; SIGTRAP needs none (a standard signal, one
     * pending at most, and perf queues one task work per event at a time) and must not have one:
     * the overflow that spends a budget disables the event from an irq work, which may run after
     * the SIGTRAP it raised has been handled and its top-up done, leaving the event disabled for
     * good (a thread's samples stopped after 9 in a clean-clone run on 3.13). */
    if (ioctl(fd, trap ? PERF_EVENT_IOC_ENABLE : PERF_EVENT_IOC_REFRESH, trap ? 0 : PERF_BUDGET) !=
        0) {
        atomic_store(&g_fdkey[fd], 0);
        close(fd);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || ioctl(fd, PERF_EVENT_IOC_ID, &r->fd_id) != 0) {
        ioctl(fd, PERF_EVENT_IOC_DISABLE, 0);
        atomic_store(&g_fdkey[fd], 0);
        close(fd);
        return -1;
    }
    r->fd_dev = st.st_dev;
    r->fd_ino = st.st_ino;
    r->fd = fd;
    g_perf_open++;
    return 0;
}

/* Whether signal signo is blocked or pending in thread tid (its /proc status masks), or that
 * cannot be told (then it is taken as held). */
static int signal_held(long tid, int signo) {
    uint64_t pnd, shd, blk;
    if (mw_threads_sigmasks(tid, &pnd, &shd, &blk) != 0) return 1;
    return ((pnd | shd | blk) >> (signo - 1)) & 1;
}

/* A perf event on the real-time route stops itself after PERF_BUDGET overflows no handler run has
 * answered (so a thread blocking our signal cannot pile up queued signals), and the handler tops
 * it up. Overflows can outrun the signals (at 5-10 kHz a busy thread's samples stopped for good
 * within a second: the kernel sends one signal for overflows that come faster than it delivers,
 * and a top-up can land before the disabling of the overflow that spent the budget). The handler
 * of that overflow's signal (POLL_HUP) restarts it (mw_cputimer.c); should a stop still escape
 * it, the sampler watches. A thread that used PERF_WATCH_PERIODS periods of CPU (and 2 ms) since
 * its handler last ran, with our signal neither blocked nor pending in it, has a stopped event. */
#define PERF_WATCH_PERIODS 4
/* The CPU a thread may use without a sample before the watch acts: PERF_WATCH_PERIODS periods
 * and 2 ms. */
static uint64_t watch_span_ns(void) {
    return PERF_WATCH_PERIODS * (uint64_t)g_period_ns + 2000000;
}
/* Said once, by the sampler thread (never under g_lock: stderr may block), when the app has
 * closed an event's descriptor: found by the watch, or as the thread ended (the sweep). */
static void say_lost(void) {
    if (atomic_load(&c_fds_lost))
        mw_report_once(MW_REPORT_CPU_TIMER_LOST,
                       "the app closed the profiler's perf event descriptors (a daemon closing "
                       "every descriptor?): their threads' CPU timers are armed again; until "
                       "then, up to about %d ms of each one's CPU went to its last samples",
                       (int)((watch_span_ns() + g_period_ns) / 1000000));
}

void mw_cputimer_watch(int i, long tid, uint64_t cpu_now) {
    if (!g_reg || i < 0 || i >= REGS || g_mode != 2) return;
    reg_t *r = &g_reg[i];
    uint64_t heard = atomic_load_explicit(&r->heard, memory_order_relaxed);
    if (!heard || atomic_load(&r->tid) != tid || cpu_now < heard + watch_span_ns()) return;
    if (signal_held(tid, g_signo)) return; /* its budget is doing its job */
    pthread_mutex_lock(&g_lock);
    if (atomic_load(&r->tid) == tid && r->fd >= 0 && !mwc_perf_still(r)) {
        /* The app closed the event's descriptor (a daemon closing every descriptor): the event
         * is gone. The registration goes (disarm_locked leaves the number alone); the sampler
         * arms the thread again at its next tick (mw_sampler_take.c). */
        disarm_locked(i);
        pthread_mutex_unlock(&g_lock);
        say_lost();
        return;
    }
    if (atomic_load(&r->tid) == tid && r->fd >= 0 && !r->trap &&
        ioctl(r->fd, PERF_EVENT_IOC_REFRESH, PERF_BUDGET) == 0) {
        atomic_store(&r->revived, 1); /* the handler starts its slots afresh (mw_cputimer.c) */
        bump(&c_revived, 1);
    }
    atomic_store_explicit(&r->heard, cpu_now, memory_order_relaxed); /* one try per watch span */
    pthread_mutex_unlock(&g_lock);
}

int mw_cputimer_overdue(int i, long tid, uint64_t cpu_now) {
    if (!g_reg || i < 0 || i >= REGS || atomic_load(&g_reg[i].tid) != tid) return 0;
    reg_t *r = &g_reg[i];
    uint64_t since = g_mode == 2 ? atomic_load_explicit(&r->heard, memory_order_relaxed)
                                 : r->next_due; /* POSIX: written by the thread's handler */
    return since && cpu_now >= since + watch_span_ns();
}

uint32_t mw_cputimer_inside(int i, long tid) {
    if (!g_reg || i < 0 || i >= REGS || atomic_load(&g_reg[i].tid) != tid) return 0;
    return atomic_load(&g_reg[i].inside);
}

static int arm_locked(long tid, uintptr_t tstate, int born, int *existed);

int mw_cputimer_arm(long tid, uintptr_t tstate, int born, int *existed) {
    int dummy;
    if (!existed) existed = &dummy;
    *existed = 0;
    if (!g_mode || !g_reg || tid <= 0) return -1;
    pthread_mutex_lock(&g_lock);
    int r = arm_locked(tid, tstate, born, existed);
    pthread_mutex_unlock(&g_lock);
    return r;
}

void mw_cputimer_unlisted(int reg, long tid) {
    if (!g_reg || reg < 0 || reg >= REGS) return;
    if (atomic_load(&g_reg[reg].tid) == tid) atomic_store(&g_reg[reg].unlisted, 1);
}

int mw_cputimer_find(long tid, uintptr_t tstate, uint64_t *cpu_at_arm) {
    if (!g_reg || tid <= 0) return -1;
    int found = -1;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < g_reg_top && found < 0; i++)
        if (atomic_load(&g_reg[i].tid) == tid && g_reg[i].tstate == tstate) {
            found = i;
            *cpu_at_arm = g_reg[i].cpu_at_arm;
        }
    pthread_mutex_unlock(&g_lock);
    return found;
}

static int thread_gone(long tid) {
    struct timespec ts;
    return clock_gettime(thread_clockid(tid), &ts) != 0;
}

/* One record with no frame for `periods` of thread tid's CPU whose samples never came: "[no
 * Python frame]" as the thread's other samples taken after its thread state was gone, or, unplaced
 * (a POSIX timer's instants passed during its life), "[place unknown: due before thread exit]". */
static void credit_record(reg_t *r, long tid, int i, uint64_t periods, int unplaced) {
    if (periods > 1000000) periods = 1000000;
    mw_cpusample_t *rec = mwc_record_claim();
    if (!rec) {
        bump(&c_no_record, 1);
        return;
    }
    rec->reg = i;
    rec->tstate = r->tstate;
    rec->tid = tid;
    rec->periods = (uint32_t)periods;
    rec->counted = 1;
    rec->unplaced = unplaced;
    rec->unmasked = 0;
    rec->labelset = mw_threads_labelset_now(tid);
    mw_labels_span_seen(rec->labelset);
    rec->depth = rec->truncated = rec->ncopies = rec->nips = rec->ips_complete = 0;
    rec->outer.gen = 0;
    rec->outer.idx = -1;
    rec->outer.task = 0;
    rec->handler_ns = 0;
    bump(&c_recorded, 1);
    bump(&c_periods, periods);
    bump(&c_exit_periods, periods);
    mwc_record_publish(rec);
}

/* Thread r has exited (its CPU clock is gone, so no handler of its runs any more). Its event's
 * count stopped at its exit: if it passed the sample due, that sample never came — past the
 * kernel's exit_signals no signal is delivered, and the exit path (~20-50 us: the thread state's
 * teardown, the C library's and the kernel's exit) is CPU like any other. Those periods are one
 * record with no frame, as a sample taken then would have been. */
static void exit_credit(reg_t *r, long tid, int i) {
    uint64_t c = 0, P = (uint64_t)g_period_ns;
    if (!mwc_perf_still(r) || read(r->fd, &c, sizeof c) != (ssize_t)sizeof c) return;
    c = c > r->steal.steal ? c - r->steal.steal : 0; /* the steal set aside by its handler */
    if (c < r->target) return;
    uint64_t periods = 1 + (uint64_t)r->bonus;
    if (c >= r->slot_end) { /* the slots after: each one's sample was due at a random instant */
        periods += (c - r->slot_end) / P;
        if (jitter_draw(&r->rng, P) < (c - r->slot_end) % P) periods++;
    }
    credit_record(r, tid, i, periods, 0);
}

/* A thread with a POSIX timer that armed itself at its start ends here: a destructor of its
 * thread-specific data, run by the C library in the thread itself after its thread state is gone
 * (CPython's thread function has returned). Its timer's instants passed since its last signal
 * never fire now (the kernel checks them at its tick, and a dead thread has none), so they are
 * credited from its own clock (unplaced), as perf's are from the event's final count (exit_credit);
 * the kernel's own exit after this point (~25 us) is not. Our signal is blocked first (a signal
 * already queued would otherwise be counted twice) and stays blocked: the thread is ending. */
static void timer_exit(void *v) {
    uint32_t key = (uint32_t)(uintptr_t)v;
    int i = (int)(key & (REGS - 1));
    reg_t *r = g_reg ? &g_reg[i] : NULL;
    long me = (long)syscall(SYS_gettid);
    if (!r || atomic_load(&r->gen) != key >> REG_BITS || atomic_load(&r->tid) != me) return;
    sigset_t ss;
    sigemptyset(&ss);
    sigaddset(&ss, g_signo);
    pthread_sigmask(SIG_BLOCK, &ss, NULL);
    pthread_mutex_lock(&g_lock);
    struct timespec ts;
    if (atomic_load(&r->gen) == key >> REG_BITS && atomic_load(&r->tid) == me && r->has_timer &&
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) {
        uint64_t c = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
        if (c >= r->next_due)
            credit_record(r, me, i, 1 + (c - r->next_due) / (uint64_t)g_period_ns, 1);
        disarm_locked(i);
    }
    pthread_mutex_unlock(&g_lock);
}

static void exit_key_create(void) {
    g_exit_key_ok = pthread_key_create(&g_exit_key, timer_exit) == 0;
}

/* The calling thread, whose POSIX-timer registration has this key, credits its exit (timer_exit).
 */
static void exit_hook(uint32_t key) {
    pthread_once(&g_exit_once, exit_key_create);
    if (g_exit_key_ok) pthread_setspecific(g_exit_key, (void *)(uintptr_t)key);
}

void mw_cputimer_forget(long tid) {
    if (!g_reg || tid <= 0) return;
    pthread_mutex_lock(&g_lock);
    int gone = -1;
    for (int i = 0; i < g_reg_top; i++)
        if (atomic_load(&g_reg[i].tid) == tid) {
            /* A thread still running (its Thread object went at its join, which returns before
             * the thread has exited) keeps its timer: its exit is credited by timer_exit or by
             * the sweep that finds it gone. */
            if (gone < 0) gone = thread_gone(tid);
            if (!gone) break;
            exit_credit(&g_reg[i], tid, i);
            disarm_locked(i);
        }
    pthread_mutex_unlock(&g_lock);
}

static int g_halted; /* mw_cputimer_halt: nothing is armed until the next init (g_lock) */

/* Stops and frees every registration; halt 1: and arms none until mw_cputimer_unhalt. */
static void disarm_every(int halt) {
    if (!g_reg) return;
    pthread_mutex_lock(&g_lock);
    if (halt) g_halted = 1;
    for (int i = 0; i < g_reg_top; i++)
        disarm_locked(i);
    pthread_mutex_unlock(&g_lock);
}

void mw_cputimer_halt(void) {
    disarm_every(1);
}

void mw_cputimer_unhalt(void) {
    pthread_mutex_lock(&g_lock);
    g_halted = 0;
    pthread_mutex_unlock(&g_lock);
}

static int arm_locked(long tid, uintptr_t tstate, int born, int *existed) {
    if (g_halted) return -1;
    for (int i = 0; i < g_reg_top; i++) { /* already armed (by itself at start, or a tick) */
        if (atomic_load(&g_reg[i].tid) != tid) continue;
        if (g_reg[i].tstate == tstate) {
            *existed = 1;
            if (born && g_reg[i].has_timer) { /* armed by a tick: its exit is still its own */
                exit_hook(atomic_load(&g_reg[i].gen) << REG_BITS | (uint32_t)i);
            }
            return i;
        }
        disarm_locked(i); /* the id now belongs to another thread state */
    }
    static uint32_t hint; /* the next free index after the last taken: an index is taken again
                           * as late as can be (a late signal's key names a past registration) */
    for (uint32_t k = 0; k < REGS; k++) {
        uint32_t i = (hint + k) & (REGS - 1);
        reg_t *r = &g_reg[i];
        if (atomic_load(&r->tid) != 0) continue;
        hint = i + 1;
        if ((int)i >= g_reg_top) g_reg_top = (int)i + 1;
        uint32_t gen = g_gen_next++;
        if (g_gen_next >= (1u << (32 - REG_BITS))) g_gen_next = 1;
        r->tstate = tstate;
        atomic_store(&r->unlisted, 0);
        r->fd = -1;
        r->has_timer = 0;
        {
            struct timespec ts;
            r->cpu_at_arm = clock_gettime(thread_clockid(tid), &ts) == 0
                                ? (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec
                                : 0;
        }
        atomic_store(&r->gen, gen);
        atomic_store(&r->tid, tid);
        uint32_t key = gen << REG_BITS | i;
        if (g_mode == 2 && arm_perf(r, tid, key, born) == 0) {
            /* Its samples cover it from its birth on (the first one stands for the CPU before
             * the arming): so does its CPU clock, read at ticks. */
            if (born) r->cpu_at_arm = 0;
            c_armed++;
            return (int)i;
        }
        if (arm_timer(r, tid, key, born) == 0) {
            if (born) {
                r->cpu_at_arm = 0; /* its samples cover it from its creation (arm_timer) */
                exit_hook(key);
            }
            c_armed++;
            return (int)i;
        }
        atomic_store(&r->tid, 0);
        shrink_top();
        break;
    }
    c_arm_failed++;
    return -1;
}

int mw_cputimer_counted(int i, long tid) {
    return g_reg && i >= 0 && i < REGS && tid > 0 && atomic_load(&g_reg[i].tid) == tid &&
           (g_reg[i].fd >= 0 || g_reg[i].has_timer);
}

void mw_cputimer_retire(int i, long tid) {
    if (!g_reg || i < 0 || i >= REGS || tid <= 0) return;
    pthread_mutex_lock(&g_lock);
    if (atomic_load(&g_reg[i].tid) == tid) {
        if (thread_gone(tid)) exit_credit(&g_reg[i], tid, i);
        disarm_locked(i);
    }
    pthread_mutex_unlock(&g_lock);
}

void mw_cputimer_sweep(void) {
    if (!g_reg) return;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < g_reg_top; i++) {
        long tid = atomic_load(&g_reg[i].tid);
        if (tid > 0 && thread_gone(tid)) {
            exit_credit(&g_reg[i], tid, i);
            disarm_locked(i);
        }
    }
    pthread_mutex_unlock(&g_lock);
    say_lost();
}

static void disarm_locked(int i) {
    reg_t *r = &g_reg[i];
    long tid = atomic_load(&r->tid);
    if (tid == 0) return;
    atomic_store(&r->tid, 0); /* a signal still on its way is ignored from here on */
    shrink_top();
    if (r->fd >= 0) {
        /* Its key leaves the number's slot unless another registration of ours has the number
         * now (the app closed this one's descriptor and our next event got it). */
        uint32_t key = atomic_load(&r->gen) << REG_BITS | (uint32_t)i;
        atomic_compare_exchange_strong(&g_fdkey[r->fd], &key, 0);
        if (mwc_perf_still(r)) {
            ioctl(r->fd, PERF_EVENT_IOC_DISABLE, 0);
            close(r->fd);
        } else { /* closed by the app: the number may be a file of its own now */
            bump(&c_fds_lost, 1);
        }
        r->fd = -1;
        g_perf_open--;
    }
    if (r->has_timer) {
        timer_delete(r->timer);
        r->has_timer = 0;
    }
    if (c_armed) c_armed--;
}

void mw_cputimer_disarm_all(void) {
    disarm_every(0);
}
