/* mw_sampler — the sampling thread; see mw_sampler.h for the contract.
 *
 * Built from several files, one concern each (listed, with their shared state and its rules, in
 * mw_sampler_int.h); this one: configuration, start/stop, the sampler thread and its ticks (quiet
 * ticks included), buffer swap, stats, fork handlers.
 *
 * Waiting: a condition variable on CLOCK_MONOTONIC with an absolute deadline (rather than a bare
 * clock_nanosleep) so that stop() wakes the thread at once.
 */
#define _GNU_SOURCE
#include "mw_sampler_int.h"
#include "mw_tasks.h"

#include "mw_cputimer.h"
#include "mw_labels.h"
#include "mw_memprof.h"
#include "mw_ownthread.h"
#include "mw_pyframes.h"
#include "mw_report.h"
#include "mw_saferead.h"
#include "mw_sched.h"
#include "mw_symcache.h"
#include "mw_threads.h"
#include "mw_unwind.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t g_buf_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_ctl_lock = PTHREAD_MUTEX_INITIALIZER; /* guards g_stop/cond */
static pthread_cond_t g_cond;
static pthread_t g_thread;
/* Drains asked of the sampler thread by the threads that take its buffer (under g_ctl_lock):
 * the CPU-timer samples the handlers left since its last tick belong to the window being taken
 * (a flush right after 10 ms of work exported an empty window: the samples waited for the next
 * tick, up to a tick period). */
static pthread_cond_t g_sync_cond;
/* A deferred probe of perf events (mw_cputimer_init) is the sampler thread's to run: set by
 * mw_sampler_start, cleared by the sampler thread, which then broadcasts g_probe_cond (under
 * g_ctl_lock). */
static atomic_int g_probe_pending;
static int g_probe_deferred; /* this run's start deferred it (set before the sampler thread) */
static pthread_cond_t g_probe_cond;
static uint64_t g_sync_req, g_sync_done;
static atomic_int g_running;
static int g_stop;
static int g_joinable; /* a started thread has not been joined yet */
mw_sampler_config_t g_cfg;
static mw_profbuf_t *g_active;
static mw_stamp_t g_window_start; /* see mw_sampler_swap */
mw_sampler_stats_t g_stats;       /* written by the sampler thread; read racily for stats */

/* Sampler-thread-private state. */
mw_tstate_t *g_ts;
static mw_pythread_t *g_threads;
mw_rawframe_t *g_raw, *g_raw2;
mw_id_t *g_ids;
const mw_symentry_t **g_sym;
mw_readcache_t *g_rc;
/* Direct reads: the sampler reads other threads' memory with plain loads under this guard
 * (mw_saferead_direct_begin) while our fault handler is the installed one, instead of one
 * process_vm_readv per read (MW_PROFILING_DIRECT_READS=0: system calls only). */
static mw_guard_t g_sguard;
static int g_direct;        /* the guard is registered and direct reads are allowed */
int g_can_pause;            /* the pause handler is installed (mw_unwind_setup) */
int g_timers;               /* CPU samples come from the threads' CPU timers (mw_cputimer) */
int g_timers_armed;         /* some thread may hold a timer */
static int g_tick_hz;       /* ticks per second: rate_hz, at most MW_WALL_HZ with timers */
static int64_t g_drain_gap; /* ns between drains between ticks, 0: none (see drain_pace) */
static int64_t g_last_drain_ns;
static int64_t g_drain_safe; /* the longest gap between drains (see drain_pace), 0: no bound */
mw_gilstate_t g_gil_tick;    /* GIL state read before the current thread's walk */
uint64_t g_tick;
long g_start_tid;
int g_list_cut;
uint64_t g_start_cpu;
int64_t g_last_tick_ns;
uint64_t g_tick_wall;
/* The ticks' slots, with CPU timers (the ticks then place wall time only): time is cut into slots
 * of one tick period and each slot gets one tick at a random instant within it, which stands for
 * the whole slot (jittered systematic sampling, as the CPU timers' samples). A thread doing the
 * same thing every 10 ms is then read at independent phases of its cycle: with the ticks'
 * random walk (each interval the period +-10%) the phase drifted slowly, and a 100 Hz cycle of
 * 3 ms of work and 7 ms of sleep had 14-46% of its wall in the work over 6 s (truth 29%). Without
 * CPU timers the ticks also place the CPU a thread used since its last read, at the stack they
 * find: an instant drawn anew in each slot would make those intervals long exactly when the
 * tick comes late in its slot, so those ticks keep the random walk and place the time elapsed.
 * Sampler thread only. */
static int64_t g_slot_end;      /* where the slots placed so far end */
static int64_t g_tick_slot_end; /* the end of the slot of the tick being taken; 0: up to now */
static uint64_t g_rng = 0x9E3779B97F4A7C15ULL;

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
/* Threads without Python (mw_sampler_others.c): when the last scan ran; a scan is due at the next
 * tick (a window ends, the sampler stops). Sampler thread only. */
static int64_t g_others_last_ns;
static int g_others_due;

/* Quiet-tick bookkeeping (see tick()). Indices into g_threads / g_tsp. */
static int g_hot[MW_MAX_THREADS], g_hot_prev[MW_MAX_THREADS], g_nhot;
static int g_woken[MW_MAX_THREADS], g_nwoken, g_woken_overflow;
static uint64_t g_visit_stamp[MW_MAX_THREADS];

/* A thread's CPU-timer sample says it ran: the next quiet tick must visit it. */
void mws_wake(mw_tstate_t *st) {
    int i = st->list_idx;
    if (i < 0 || i >= g_nthreads || g_tsp[i] != st) return;
    if (g_nwoken < MW_MAX_THREADS)
        g_woken[g_nwoken++] = i;
    else
        g_woken_overflow = 1;
}

static void visit(int i, int quiet, uint64_t gen, int first, const mw_gilstate_t *g) {
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
    st = g_tsp[i] = mws_sample_thread(g_active, &g_threads[i], first);
    if (st) st->list_idx = i;
    g_hot[g_nhot++] = i;
}

/* What the threads left for the sampler: their CPU-timer samples, and the last clocks of those
 * that ended. Buffer lock held. */
static int drain_left(mw_profbuf_t *b) {
    int n = mws_drain_timed(b);
    mws_exits_settle(b);
    return n;
}

/* Returns the CPU-timer records its drain took, -1 when a torn thread list ended it before. */
static int tick(void) {
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
            if (g_tsp[i] && g_tsp[i]->quiet) mws_quiet_flush(g_active, g_tsp[i]);
        n = mw_pyframes_threads(g_rc, g_threads, MW_MAX_THREADS);
        g_list_cut = n == MW_MAX_THREADS;
        if (g_list_cut) {
            g_stats.threads_cut++;
            mw_report_once(MW_REPORT_THREADS_CUT,
                           "process %d has more than %d Python threads: the ticks read the %d "
                           "newest; the older ones get no wall-time samples, and with ticks only "
                           "(MW_PROFILING_CPU_TIMER=off) their CPU has no Python stack",
                           (int)getpid(), MW_MAX_THREADS, MW_MAX_THREADS);
        }
        if (n < 0) {
            pthread_mutex_unlock(&g_buf_lock);
            g_stats.torn_reads++;
            g_nthreads = 0;
            g_nhot = 0;
            return -1;
        }
    } else {
        g_stats.quiet_ticks++;
    }
    g_tick++;
    g_gil_tick = g;
    int drained = drain_left(g_active);
    mws_names_settle(g_active); /* before a name registered since goes */
    mw_threads_reap();          /* names of threads forgotten before the previous drain */
    uint64_t dwall;
    if (g_timers) { /* the slots up to this tick's (a stop: up to now) */
        int64_t end = g_tick_slot_end ? g_tick_slot_end : now;
        dwall = end > g_slot_end ? (uint64_t)(end - g_slot_end) : 0;
        if (end > g_slot_end) g_slot_end = end;
    } else {
        dwall = first ? (uint64_t)(1000000000LL / mw_sampler_tick_rate())
                      : (uint64_t)(now - g_last_tick_ns);
    }
    g_tick_wall = dwall;
    /* On a quiet tick only the threads that may need a read are visited: the previous tick's
     * "hot" ones (read, not settled, or without a CPU timer), those whose CPU-timer samples said
     * they ran (woken), and a rotating slice; threads settled quiet with a timer are skipped
     * without being touched (an idle process with 500 threads costs no per-thread work). */
    int nhot_prev = g_nhot;
    g_nhot = 0;
    if (!quiet || g_woken_overflow) {
        for (int i = 0; i < n; i++)
            visit(i, quiet, gen, first, &g);
    } else {
        for (int k = 0; k < nhot_prev; k++)
            visit(g_hot_prev[k], quiet, gen, first, &g);
        for (int k = 0; k < g_nwoken; k++)
            visit(g_woken[k], quiet, gen, first, &g);
        for (int i = (int)((QUIET_ROUND_TIMED - g_tick % QUIET_ROUND_TIMED) % QUIET_ROUND_TIMED);
             i < n; i += QUIET_ROUND_TIMED)
            visit(i, quiet, gen, first, &g);
    }
    g_nwoken = 0;
    g_woken_overflow = 0;
    mws_tasks_tick(g_active, dwall);
    if (first || g_others_due ||
        now - g_others_last_ns >=
            (mws_others_active() ? MWS_OTHERS_SCAN_NS : MWS_OTHERS_IDLE_SCAN_NS)) {
        /* at a window's end and at stop always: threads that ended since the last listing */
        if (first || g_others_due || mws_others_needed(n)) mws_others_scan(g_active, g_threads, n);
        g_others_last_ns = now;
        g_others_due = 0;
    }
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
        mws_quiet_flush_all(g_active);
        pthread_mutex_unlock(&g_buf_lock);
        mws_ts_prune();
        if (g_timers_armed) mw_cputimer_sweep(); /* threads that ended unseen */
        g_nthreads = 0; /* the table moved: the next tick lists the threads again */
    }
    return drained;
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
static int guarded_tick(void) {
    int direct = g_direct && mw_guard_active();
    if (direct) mw_saferead_direct_begin(&g_sguard);
    mw_readcache_reset(g_rc); /* in the tick's mode */
    int drained = tick();
    if (direct) mw_saferead_direct_end();
    mw_readcache_reset(g_rc);
    return drained;
}

/* Draining between ticks. The CPU-timer records wait in a pool of MW_CPUTIMER_RECORDS for the
 * sampler thread, which drains them at each tick (100 Hz by default with the timers, whatever the
 * sampling rate). Threads on many CPUs at a high rate fill it faster than that (10 kHz on 2 CPUs
 * leaves ~75-100 a tick; 1 kHz on 32 busy CPUs, 320; past the pool, samples are lost). After each
 * drain the thread sets the gap to its next one from the flow the drain saw, so that a drain
 * finds about DRAIN_TARGET records (an eighth of the pool: room for seven late drains), and never
 * longer than g_drain_safe, in which even every CPU the process may run on sampling at the full
 * rate fills only half of it (a burst after a quiet spell, the first tick); no drain between ticks
 * while the ticks suffice, none closer than DRAIN_MIN_GAP_NS. Sampler thread only. */
#define DRAIN_TARGET (MW_CPUTIMER_RECORDS / 8)
#define DRAIN_MIN_GAP_NS 200000LL
static void drain_pace(int drained, int64_t period) {
    int64_t now = mw_now_monotonic_ns(), since = now - g_last_drain_ns;
    g_last_drain_ns = now;
    int64_t gap = drained > 0 && since > 0 ? since * DRAIN_TARGET / drained : period;
    if (g_drain_safe && gap > g_drain_safe) gap = g_drain_safe;
    g_drain_gap = gap >= period ? 0 : gap < DRAIN_MIN_GAP_NS ? DRAIN_MIN_GAP_NS : gap;
}

/* g_drain_safe for a start: at most rate_hz records a second from each CPU the process may run
 * on (its affinity mask). */
static void drain_safe_set(void) {
    cpu_set_t set;
    long cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                            : sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 1) cpus = 1;
    int64_t safe = (int64_t)(MW_CPUTIMER_RECORDS / 2) * 1000000000LL /
                   ((int64_t)g_cfg.rate_hz * (int64_t)cpus);
    g_drain_safe = g_timers && safe < 1000000000LL / g_tick_hz ? safe : 0;
    g_drain_gap = g_drain_safe;
}

/* No CPU timer is armed any more (disarmed or halted, or a fork child's): the threads' entries
 * forget their registrations (a restart arms them again). */
static void timers_forgotten(void) {
    g_timers_armed = 0;
    for (uint32_t i = 0; g_ts && i < g_ts_n; i++)
        g_ts[i].reg = 0;
}

/* The app set a disposition of its own for our signal after we set it up (a library taking
 * "its" real-time signal, code resetting every signal): each CPU-timer signal and pause request
 * would run the app's handler (240 calls in 2 s of two busy threads at 100 Hz, every CPU sample
 * lost) or end the process (SIG_DFL). It is no longer sent: the timers are halted (none is armed
 * again: the ticks place CPU from now on, at the sampling rate), running threads are read
 * unpaused (two reads that agree), native frames stop. Said once. Sampler thread, at a tick;
 * signal.signal has mostly released it already (mw_sampler_release_signal). */
static void signal_taken(void) {
    int sig = mw_unwind_release_signal();
    g_can_pause = 0;
    g_timers = 0;
    mw_unwind_disable();
    mw_cputimer_halt();
    timers_forgotten();
    drain_safe_set();
    g_stats.signal_taken = (uint64_t)sig;
    mw_report_once(MW_REPORT_SIGNAL_TAKEN,
                   "process %d set a disposition of its own for signal %d (SIGRTMIN+%d), the "
                   "profiler's: the profiler no longer sends it (CPU timers and pauses off: its "
                   "ticks place CPU, reading running threads twice; no native frames)",
                   (int)getpid(), sig, sig - SIGRTMIN);
}

/* With perf events the ticks only place wall time (and collect the timers' samples): they
 * need not come faster than MW_WALL_HZ. A wake-up of this thread costs ~20 us of CPU on a
 * virtual machine: at 1 kHz that alone would be 2% of a core. POSIX timers cannot place CPU
 * inside bursts: there the ticks place it (mw_sampler_take.c), so they come at the sampling
 * rate (at the wall rate, 160 ms of Python callbacks in a thread at 1 kHz were placed by ~16
 * ticks, each worth 10 samples: its share off by 25%). */
static void set_tick_hz(void) {
    g_tick_hz = g_cfg.rate_hz;
    if (g_timers && mw_cputimer_mode() == 2 && g_tick_hz > g_cfg.wall_hz) g_tick_hz = g_cfg.wall_hz;
}

/* The deferred probe of perf events (mw_cputimer_init) runs on a thread of its own, started by
 * the sampler thread, which meanwhile ticks as without timers (the ticks place every thread's
 * CPU). After the first tick that ends after it, the threads read so far get their timers
 * (mws_arm_listed), the ticks go on with timers, and whoever waits for the mode is told. */
static pthread_t g_probe_thread;
static atomic_int g_probe_done; /* the probe thread has set the mode */

static void *probe_main(void *arg) {
    (void)arg;
    (void)mw_cputimer_probe();
    atomic_store(&g_probe_done, 1);
    return NULL;
}

static void apply_probe(int join, int arm) {
    if (join) pthread_join(g_probe_thread, NULL);
    int timers = g_can_pause && mw_cputimer_mode() > 0; /* unless the app took our signal */
    if (timers && arm) mws_arm_listed(g_threads, g_nthreads);
    pthread_mutex_lock(&g_ctl_lock);
    g_timers = timers;
    set_tick_hz();
    if (arm) g_slot_end = g_last_tick_ns; /* the ticks placed the wall time up to the last one */
    drain_safe_set();
    atomic_store(&g_probe_pending, 0);
    pthread_cond_broadcast(&g_probe_cond);
    pthread_mutex_unlock(&g_ctl_lock);
}

int mw_sampler_probe_pending(void) {
    return atomic_load(&g_probe_pending);
}

/* CLOCK_MONOTONIC in ms from now (the clock of g_probe_cond and g_sync_cond). */
static struct timespec deadline_in_ms(long ms) {
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    long ns = dl.tv_nsec + ms * 1000000L;
    dl.tv_sec += ns / 1000000000L;
    dl.tv_nsec = ns % 1000000000L;
    return dl;
}

#define MW_PROBE_WAIT_MS 200
void mw_sampler_wait_probe(void) {
    if (!atomic_load(&g_probe_pending)) return;
    struct timespec dl = deadline_in_ms(MW_PROBE_WAIT_MS);
    pthread_mutex_lock(&g_ctl_lock);
    while (atomic_load(&g_probe_pending) && !g_stop)
        if (pthread_cond_timedwait(&g_probe_cond, &g_ctl_lock, &dl) == ETIMEDOUT) break;
    pthread_mutex_unlock(&g_ctl_lock);
}

static void *sampler_main(void *arg) {
    (void)arg;
    g_stats.sampler_slice_ns = mw_sched_short_slice(MW_SAMPLER_SLICE_NS);
    int probing = 0; /* the probe thread runs: join it once done */
    if (atomic_load(&g_probe_pending)) {
        atomic_store(&g_probe_done, 0);
        probing = mw_ownthread_create(&g_probe_thread, "mw-probe", probe_main, NULL) == 0;
        if (!probing) { /* no thread for it: here, the ticks waiting */
            (void)mw_cputimer_probe();
            apply_probe(0, 0);
        }
    }
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
    g_slot_end = next; /* the first slot starts now */
    for (;;) {
        if (g_can_pause && (mw_unwind_released() || !mw_unwind_signal_ours())) signal_taken();
        /* Native mode reads threads at ticks (paused and unwound): full rate there. */
        int64_t period = 1000000000LL / mw_sampler_tick_rate();
        if (g_timers) { /* a random instant of the next slot */
            g_tick_slot_end = g_slot_end + period;
            next = g_slot_end + (int64_t)(rng_next() % (uint64_t)period);
        } else {
            int64_t jitter =
                (int64_t)(rng_next() % (uint64_t)(2 * period * MW_JITTER_PCT / 100 + 1)) -
                period * MW_JITTER_PCT / 100;
            next += period + jitter;
        }
        struct timespec ts = {next / 1000000000LL, next % 1000000000LL};
        int stop = 0;
        for (;;) { /* until the tick is due (or a stop), draining for whoever asks meanwhile,
                    * and every g_drain_gap when the records come in fast */
            int due = 0, drain = 0;
            int64_t until = g_drain_gap ? mw_now_monotonic_ns() + g_drain_gap : next;
            struct timespec wts = ts;
            if (until < next) {
                wts.tv_sec = until / 1000000000LL;
                wts.tv_nsec = until % 1000000000LL;
            } else {
                until = next;
            }
            pthread_mutex_lock(&g_ctl_lock);
            while (!g_stop && g_sync_done == g_sync_req && !due && !drain) {
                if (pthread_cond_timedwait(&g_cond, &g_ctl_lock, &wts) != ETIMEDOUT) continue;
                if (until == next)
                    due = 1;
                else
                    drain = 1;
            }
            stop = g_stop;
            uint64_t req = g_sync_req, done = g_sync_done;
            pthread_mutex_unlock(&g_ctl_lock);
            if (!stop && (req != done || drain)) {
                pthread_mutex_lock(&g_buf_lock);
                int n = drain_left(g_active);
                /* A window ends: the CPU of threads without Python since the last scan is its
                 * own (with the thread list of the last tick: none after a prune), and so is
                 * that of the threads that ended since. */
                if (req != done && g_nthreads > 0) {
                    mws_others_scan(g_active, g_threads, g_nthreads);
                    g_others_last_ns = mw_now_monotonic_ns();
                }
                pthread_mutex_unlock(&g_buf_lock);
                if (drain) g_stats.timer_drains++;
                drain_pace(n, period);
                if (req != done) {
                    pthread_mutex_lock(&g_ctl_lock);
                    g_sync_done = req;
                    pthread_cond_broadcast(&g_sync_cond);
                    pthread_mutex_unlock(&g_ctl_lock);
                }
            }
            if (stop || due) break;
        }
        if (stop || mw_pyframes_finalizing()) {
            /* Stopping (not finalizing): one last tick, so the CPU the threads used since the
             * previous one is counted (a child's last window ends here). */
            if (stop && g_tick > 0 && !mw_pyframes_finalizing()) {
                g_others_due = 1;
                g_tick_slot_end = 0; /* its wall: up to now */
                (void)guarded_tick();
            }
            break;
        }

        int64_t t0 = mw_now_monotonic_ns();
        if (t0 > next) g_stats.tick_late_ns += (uint64_t)(t0 - next);
        if (t0 - next > period) {
            g_stats.late_ticks++;
            next = t0;                          /* do not try to catch up with a burst of ticks */
            if (g_timers) g_tick_slot_end = t0; /* this one stands for the slots missed */
        }
        mw_memory_duty_tick(); /* the allocation hooks in or out until the next tick */
        int drained = guarded_tick();
        if (drained >= 0) drain_pace(drained, period);
        if (probing && drained >= 0 && atomic_load(&g_probe_done)) { /* timers from now on */
            apply_probe(1, 1);
            probing = 0;
        }
        int64_t took = mw_now_monotonic_ns() - t0;
        if ((uint64_t)took > g_stats.tick_ns_max) g_stats.tick_ns_max = (uint64_t)took;
        g_stats.tick_ns_total += (uint64_t)took;
        g_stats.ticks++;
        if ((g_stats.ticks & 15) == 0) sampler_cpu_update(); /* a system call: not every tick */
    }
    if (probing) apply_probe(1, 0); /* stopped while it ran: it ends within ms */
    pthread_mutex_lock(&g_buf_lock);
    drain_left(g_active);
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
    if (!g_ts_index) g_ts_index = calloc(TS_INDEX, sizeof *g_ts_index);
    if (!g_threads) g_threads = calloc(MW_MAX_THREADS, sizeof *g_threads);
    if (!g_raw) g_raw = calloc(MW_MAX_DEPTH_CAP, sizeof *g_raw);
    if (!g_raw2) g_raw2 = calloc(MW_MAX_DEPTH_CAP, sizeof *g_raw2);
    if (!g_ids) g_ids = calloc(MW_MAX_DEPTH_CAP, sizeof *g_ids);
    if (!g_sym) g_sym = calloc(MW_MAX_DEPTH_CAP, sizeof *g_sym);
    if (!g_win) g_win = calloc(WIN_SLOTS, sizeof *g_win);
    if (!g_rc) g_rc = malloc(sizeof *g_rc);
    if (g_rc) mw_readcache_reset(g_rc);
    return (g_ts && g_ts_index && g_threads && g_raw && g_raw2 && g_ids && g_sym && g_win && g_rc &&
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
    int tm = g_can_pause ? mw_cputimer_init(g_cfg.rate_hz, g_cfg.max_depth, mw_unwind_signal(), 1,
                                            &timer_why)
                         : 0;
    /* The first probe of perf events in a process tree is the sampler thread's (see
     * mw_cputimer_init): no timer until then (apply_probe). */
    g_probe_deferred = tm == MW_CPUTIMER_DEFERRED;
    atomic_store(&g_probe_pending, g_probe_deferred);
    g_timers = tm > 0;
    set_tick_hz();
    if (!g_direct) {
        g_direct = mw_guard_allowed() && mw_guard_register(&g_sguard) == 0;
    }
    pthread_mutex_lock(&g_buf_lock);
    if (!g_active) {
        g_active = mw_profbuf_new(&g_cfg.limits);
        g_window_start = mw_stamp_now();
    }
    pthread_mutex_unlock(&g_buf_lock);
    if (!g_active) {
        *why = "out of memory";
        return -1;
    }
    mws_ts_clear();
    mws_others_clear();
    mws_exits_clear();
    g_others_due = 0;
    g_tick = 0;
    drain_safe_set();
    g_last_drain_ns = mw_now_monotonic_ns();
    g_last_prune = 0;
    g_nthreads = 0;
    /* The tick-indexed bookkeeping of an earlier run (or of the parent, in a forked child) must
     * not carry over: a visit stamp equal to the new run's first tick number made the first
     * tick skip that thread as "already visited", so it never became hot and the quiet ticks
     * that followed never read it (a pool worker forked at its parent's first tick lost its
     * whole CPU). */
    memset(g_visit_stamp, 0, sizeof g_visit_stamp);
    g_nhot = g_nwoken = g_woken_overflow = 0;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g_cond, &ca);
    pthread_cond_init(&g_sync_cond, &ca);
    pthread_cond_init(&g_probe_cond, &ca);
    pthread_condattr_destroy(&ca);
    g_stop = 0;
    g_sync_req = g_sync_done = 0;

    struct timespec cpu;
    g_start_tid = clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu) == 0 ? (long)syscall(SYS_gettid) : 0;
    g_start_cpu = (uint64_t)cpu.tv_sec * 1000000000ULL + (uint64_t)cpu.tv_nsec;
    atomic_store(&g_running, 1);
    int rc = mw_ownthread_create(&g_thread, "mw-sampler", sampler_main, NULL);
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
    pthread_cond_broadcast(&g_sync_cond);  /* a drain asked for will not come */
    pthread_cond_broadcast(&g_probe_cond); /* nor, perhaps, the probe: its waiters go */
    pthread_mutex_unlock(&g_ctl_lock);
    if (g_joinable) {
        /* Bounded: stopping runs on the way out of a process (atexit, a worker's last window),
         * and a process must never hang in it because of us. A sampler thread that does not end
         * in time is left alone (still "running": no second one is ever started) and said once. */
        struct timespec dl; /* monotonic: a step of the wall clock neither ends nor stretches it */
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_sec += MW_STOP_WAIT_S;
        int rc = pthread_clockjoin_np(g_thread, NULL, CLOCK_MONOTONIC, &dl);
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
        timers_forgotten();
    }
}

int mw_sampler_release_signal(void) {
    int sig = mw_unwind_release_signal(); /* no pause asked from now on */
    if (sig) mw_cputimer_halt();          /* no CPU-timer signal from now on */
    return sig;
}

int mw_sampler_running(void) {
    return atomic_load(&g_running);
}
int mw_sampler_rate(void) {
    return g_cfg.rate_hz;
}
void mw_sampler_thread_started(long tid, uintptr_t tstate, int born) {
    if (born && atomic_load(&g_running)) mws_exit_watch();
    /* While the first start's probe of perf events runs (mw_cputimer_init), no thread arms a
     * timer: the ticks place the CPU of every thread, and arm those they read once it is done
     * (apply_probe); so is the thread that started the sampler, whenever it gets here. */
    if (atomic_load(&g_probe_pending) || (!born && g_probe_deferred)) return;
    if (atomic_load(&g_running) && g_timers && mw_cputimer_arm(tid, tstate, born, NULL) >= 0)
        g_timers_armed = 1;
}

int mw_sampler_tick_rate(void) {
    return g_timers ? g_tick_hz : g_cfg.rate_hz;
}

/* Any thread but the sampler's: has the sampler thread drain the CPU-timer samples taken so far
 * (and scan the threads without Python, when there are any) into the active buffer, waiting at
 * most MW_SYNC_WAIT_MS (a sampler stopping or stuck is not waited for longer: the samples then go
 * to the next window). */
#define MW_SYNC_WAIT_MS 100
static void sync_drain(void) {
    if (!atomic_load(&g_running) || (!g_timers && !mws_others_any()) ||
        pthread_equal(pthread_self(), g_thread))
        return;
    struct timespec dl = deadline_in_ms(MW_SYNC_WAIT_MS);
    pthread_mutex_lock(&g_ctl_lock);
    uint64_t want = ++g_sync_req;
    pthread_cond_signal(&g_cond);
    while (!g_stop && g_sync_done < want)
        if (pthread_cond_timedwait(&g_sync_cond, &g_ctl_lock, &dl) == ETIMEDOUT) break;
    pthread_mutex_unlock(&g_ctl_lock);
}

mw_profbuf_t *mw_sampler_swap(mw_profbuf_t *fresh, int64_t *t_start, int64_t *t_end) {
    sync_drain();
    pthread_mutex_lock(&g_buf_lock);
    mw_profbuf_t *old = g_active;
    mws_quiet_flush_all(old);
    mws_cpu_window_finalize(old);
    mw_stamp_t now = mw_stamp_now();
    *t_start = mw_window_start(g_window_start, now);
    *t_end = now.real_ns;
    g_active = fresh;
    g_window_start = now;
    pthread_mutex_unlock(&g_buf_lock);
    return old;
}

void mw_sampler_with_active(void (*fn)(const mw_profbuf_t *, void *), void *arg) {
    sync_drain();
    pthread_mutex_lock(&g_buf_lock);
    mws_quiet_flush_all(g_active);
    mws_cpu_window_finalize(g_active);
    if (g_active) fn(g_active, arg);
    pthread_mutex_unlock(&g_buf_lock);
}

void mw_sampler_get_stats(mw_sampler_stats_t *out) {
    *out = g_stats;
    out->can_pause = (uint64_t)g_can_pause;
    out->saferead_failures = mw_saferead_failures();
    out->exits_lost = mws_exits_lost();
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
    atomic_store(&g_probe_pending, 0); /* the parent's sampler thread was to probe: not here */
    g_probe_deferred = 0;
    g_joinable = 0;
    g_stop = 1;
    if (g_active) mw_profbuf_reset(g_active);
    g_window_start = mw_stamp_now();
    memset(&g_stats, 0, sizeof g_stats);
    mw_threads_reset_after_fork();
    mw_labels_after_fork_child();
    mw_cputimer_after_fork_child();
    mw_unwind_after_fork_child();
    mw_tasks_after_fork_child();
    mws_exits_clear();
    timers_forgotten();
}

void mw_sampler_register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
