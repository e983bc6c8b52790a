/* mw_sampler — the native sampling thread and the buffers it fills.
 *
 * One pthread (all signals blocked, no Python thread state, never takes the GIL) wakes at the
 * configured rate on CLOCK_MONOTONIC, so that periodic work in the application cannot alias
 * with the ticks: with CPU timers at a random instant of each slot of one period (the tick
 * stands for its slot), without them with random jitter (±MW_JITTER_PCT% on each interval; see
 * g_slot_end in mw_sampler.c for why). Each tick it lists the interpreter's threads
 * (mw_pyframes), reads each thread's CPU clock (derived from its kernel tid) and its frames, and
 * adds one sample per thread to the active mw_profbuf:
 *   wall_ns     = the tick's slot (without CPU timers: the time elapsed since the previous
 *                 tick), under the thread's stack;
 *   cpu_samples = 1 when the thread was on CPU at the sample instant (its clock moved across the
 *                 read, it was found running and paused, or it holds the GIL while waiting for
 *                 a CPU); cpu_ns of such stacks is written when the window ends (or is read):
 *                 the thread's exact CPU of the window split over its on-CPU samples.
 * A stack is kept only when its read is proven consistent (see mw_sampler_take.c: the clock did not
 * move, the GIL never reached the thread, or the thread was paused in mw_unwind's handler).
 *
 * Signals: the sampler sends a real-time signal (mw_unwind) only to a thread that runs Python
 * at the tick, to pause it while its frames are read; in native mode also to threads whose
 * stacks changed since their last sample.
 *
 * Locks: g_buf_lock guards the active-buffer pointer; the sampler holds it while it writes a
 * tick, mw_sampler_swap() holds it to exchange buffers. The collect lock (mw_collect) is always
 * taken BEFORE the buffer lock.
 *
 * Calls: start/stop/stats from Python threads (GIL held; stop joins the thread, so call it
 * with the GIL released or make sure the sampler never waits for the GIL — it never does).
 * Fork: mw_sampler registers pthread_atfork handlers: the child starts with the sampler
 * stopped and empty buffers; the Python layer restarts it.
 */
#ifndef MW_SAMPLER_H
#define MW_SAMPLER_H

#include "mw_profbuf.h"

#include <stdint.h>

#define MW_JITTER_PCT 10
#define MW_SAMPLER_SLICE_NS 100000ULL /* the sampler thread's time slice (the kernel's minimum) */
#define MW_STOP_WAIT_S 3 /* mw_sampler_stop waits at most this long for the sampler thread */

/* Default cap of the tick rate when CPU samples come from the threads' CPU timers. */
#define MW_WALL_HZ 100

typedef struct mw_sampler_config {
    int rate_hz; /* 1..10000: CPU samples per second of a thread's CPU time */
    int wall_hz; /* ticks (wall samples) per second at most, when CPU timers are on; 0 = default */
    int max_depth; /* frames kept per stack (deeper stacks keep the leaf side, flagged) */
    mw_profbuf_limits_t limits;
} mw_sampler_config_t;

typedef struct mw_sampler_stats {
    uint64_t ticks;          /* ticks taken */
    uint64_t samples;        /* thread samples added to a buffer */
    uint64_t cpu_samples;    /* of which the thread had used CPU */
    uint64_t dropped;        /* thread samples lost (table full, unreadable stack) */
    uint64_t torn_reads;     /* thread lists or frame chains that changed under us */
    uint64_t truncated;      /* stacks kept partially */
    uint64_t overflow;       /* insertions refused by a full buffer */
    uint64_t overflow_kept;  /* samples past a full table kept with less detail (mws_add_sample) */
    uint64_t threads_seen;   /* threads in the last tick */
    uint64_t threads_gone;   /* threads whose CPU clock vanished mid-tick */
    uint64_t unborn;         /* thread states skipped: not started, their creator's ids */
    uint64_t sampler_cpu_ns; /* CPU time of the sampler thread itself */
    uint64_t tick_ns_max;    /* longest tick */
    uint64_t tick_ns_total;  /* time spent in ticks (the rest of sampler_cpu_ns is waking up) */
    uint64_t late_ticks;     /* ticks that started more than a period late */
    uint64_t tick_late_ns; /* sum over ticks of how late each started (waking, waiting for a CPU) */
    uint64_t sampler_slice_ns; /* the sampler thread's own time slice, 0: the kernel's default */
    uint64_t tick_placed; /* POSIX CPU timers: running threads read by ticks to place their CPU */
    uint64_t timer_unplaced;    /* ... their timers' samples meanwhile, counting CPU only */
    uint64_t timer_backlog_max; /* most CPU-timer records one drain found waiting (of
                                 * MW_CPUTIMER_RECORDS: past them samples are lost) */
    uint64_t timer_drains;      /* drains between ticks, when the records came in fast */
    uint64_t saferead_failures;
    uint64_t walk_retries; /* walks redone from a fresh top frame after a torn first try */
    uint64_t label_races;  /* samples whose labels changed during the walk: recorded unlabelled */
    uint64_t reused;       /* samples of threads that had not run since their last read */
    uint64_t quiet;        /* of which taken on a quiet tick, without any system call */
    uint64_t quiet_ticks;  /* ticks on which no thread but the GIL's holder can have run Python */
    uint64_t paused;       /* samples read while the thread was paused in the signal handler */
    uint64_t preempted;    /* on-CPU samples of a GIL holder found waiting for a CPU */
    uint64_t preempted_released;  /* ... of a thread without the GIL (in C) found waiting for one */
    uint64_t preempt_checks;      /* threads asked whether they were preempted (/proc reads) */
    uint64_t names_unsettled;     /* threads met unnamed, not followed for a name (list full) */
    uint64_t threads_cut;         /* ticks whose thread list was cut at MW_MAX_THREADS */
    uint64_t signals_blocked;     /* threads found running with our sampling signal blocked */
    uint64_t signal_taken;        /* the signal the app took from us (its own handler), 0 none */
    uint64_t sigblk_placed;       /* on-CPU samples the ticks took of such threads (unpaused) */
    uint64_t timer_late;          /* CPU-timer samples that came when such a thread unblocked */
    uint64_t can_pause;           /* 1 when the pause handler is installed */
    uint64_t unproven;            /* thread samples dropped: no read could be proven consistent */
    uint64_t unverified;          /* no pause possible here: two agreeing reads kept (not proven) */
    uint64_t cpu_unattributed_ns; /* CPU of threads that ended after their last on-CPU sample */
    uint64_t timer_samples;       /* on-CPU samples taken by the threads' CPU timers */
    uint64_t owed;                /* ticks that found a timed thread running (wall owed) */
    uint64_t names_lost; /* timer samples whose code object was gone before it was named (their
                          * CPU under "[code object gone before it was named]") */
    uint64_t wall_unattributed_ns; /* wall owed to threads that ended before their next sample */
    uint64_t stop_timeouts;        /* stops that did not see the sampler thread end in time */
    uint64_t
        native_spared_writes; /* native mode: blocked in a write, not signalled (no C frames) */
    /* Threads with no Python thread state in the main interpreter (mw_sampler_others.c): */
    uint64_t native_threads;       /* of them at the last scan (the profiler's own left out) */
    uint64_t native_thread_cpu_ns; /* CPU they used, in the profile under "[native thread]" */
    uint64_t exited_thread_cpu_ns; /* CPU of threads that ended unread, under "[exited thread]" */
    uint64_t exited_unknown;   /* listings where that CPU could not be told (a Python one ended) */
    uint64_t exit_tail_cpu_ns; /* CPU of ending threads from their last tick to their end */
    uint64_t exits_lost;       /* ending threads whose last clock found the ring full */
    uint64_t native_thread_samples; /* on-CPU samples that CPU stands for */
    uint64_t native_scans;          /* listings of the process's threads (mw_sampler_others.c) */
    uint64_t
        native_threads_untracked; /* times a scan met one it had no room to remember: not counted */
} mw_sampler_stats_t;

/* Starts sampling. Returns 0, -1 on failure (errno-style reason in *why). Idempotent: a running
 * sampler is left as is (returns 1). */
int mw_sampler_start(const mw_sampler_config_t *cfg, const char **why);
/* Stops and joins the thread (at most MW_STOP_WAIT_S; a thread that does not end is left running
 * and reported once). The buffers keep their data. Safe to call when stopped. */
void mw_sampler_stop(void);
int mw_sampler_running(void);
/* The app is about to install its own disposition for our signal (signal.signal): from now on no
 * pause is asked and every CPU timer is disarmed (the sampler thread places CPU by its ticks at
 * its next tick, and says so once). Returns the signal, 0 when none. Any thread. */
int mw_sampler_release_signal(void);
int mw_sampler_rate(void);
/* A Python thread that starts (GIL held): gives it its CPU timer now when the sampler runs with
 * timers. Any thread. born: tid is the calling thread at its own start (its CPU since its
 * creation is in the profile); 0 for the thread that starts the sampler. While a deferred probe
 * of perf events is pending (and for the starting thread whenever the start deferred one) it
 * arms nothing: the ticks place the thread's CPU and arm it once the probe has ended. */
void mw_sampler_thread_started(long tid, uintptr_t tstate, int born);

/* Waits (at most 200 ms) for the sampler thread's deferred probe of perf events, when there is
 * one (the first start in a process tree: mw_cputimer_init); past that, the caller sees the
 * mode still pending (mw_sampler_probe_pending). Any thread but the sampler's; may block: not
 * with the buffer lock held. Called by stats (the CPU-timer mode it reports). */
void mw_sampler_wait_probe(void);
/* 1 while that probe is pending (an atomic load): any thread. */
int mw_sampler_probe_pending(void);

/* Ticks per second actually used (rate_hz, or at most wall_hz with CPU timers). */
int mw_sampler_tick_rate(void);

/* Hands the active buffer to the caller and installs `fresh` (empty, same limits) in its
 * place. t_start and t_end get the window the returned buffer covers (CLOCK_REALTIME ns): from the
 * previous swap to now (but see mw_window_start). Caller must hold the collect lock
 * (mw_collect_lock). First (any thread but the sampler's) it has the sampler thread drain the
 * CPU-timer samples left since its last tick into the buffer, waiting for that at most 100 ms; so
 * does mw_sampler_with_active. */
mw_profbuf_t *mw_sampler_swap(mw_profbuf_t *fresh, int64_t *t_start, int64_t *t_end);

/* Calls fn on the active buffer with the buffer lock held (for snapshots). */
void mw_sampler_with_active(void (*fn)(const mw_profbuf_t *, void *), void *arg);

void mw_sampler_get_stats(mw_sampler_stats_t *out);
/* Empty buffer factory with the limits the sampler was started with. */
mw_profbuf_t *mw_sampler_new_buffer(void);

/* Registers the fork handlers; call once (module init), before mw_collect_register_atfork so
 * that the collect lock is taken first in the prepare phase. */
void mw_sampler_register_atfork(void);

int64_t mw_now_realtime_ns(void);
int64_t mw_now_monotonic_ns(void);

/* A moment on both clocks: CLOCK_REALTIME (unix ns, what a profile says) and CLOCK_MONOTONIC
 * (what tells a step of the former). Pure values; any thread. */
typedef struct {
    int64_t real_ns, mono_ns;
} mw_stamp_t;
mw_stamp_t mw_stamp_now(void);

/* The wall-clock start of a window begun at `start` and ending at `now`: start.real_ns, so that
 * windows stay contiguous, unless the wall clock was stepped meanwhile (NTP, a VM resumed: the two
 * clocks disagree on the time elapsed by more than MW_CLOCK_STEP_NS plus 1%, far above NTP's
 * slewing), then now.real_ns minus the monotonic time elapsed: a step neither empties nor
 * stretches the window. Pure; any thread. */
#define MW_CLOCK_STEP_NS 50000000LL
int64_t mw_window_start(mw_stamp_t start, mw_stamp_t now);

#endif
