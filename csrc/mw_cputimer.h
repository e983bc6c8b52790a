/* mw_cputimer — CPU samples taken by the thread that spends the CPU, at the instant it spends it.
 *
 * Every Python thread the sampler knows gets a timer on its OWN CPU-time clock: a perf software
 * event (task-clock, PERF_COUNT_SW_TASK_CLOCK, one fd per thread, its overflow signal routed to
 * that thread with F_SETOWN_EX/F_SETSIG, or, opt-in, raising SIGTRAP in it on its way back to user
 * mode: mw_cputrap.h; jittered systematic: one overflow at a random instant of
 * each period of CPU time, the handler setting the next one) where perf_event_open is
 * allowed, else a POSIX timer on the thread's CPU clock (timer_create, SIGEV_THREAD_ID; the
 * kernel checks it on its scheduler tick, so a busy thread gets at most CONFIG_HZ signals a
 * second and an overrun count says how many periods each one stands for). Either way the signal
 * comes only while the thread runs, after each `period` of CPU it used, from the CPU it runs on:
 * no inter-processor interrupt, no pause, and a thread that sleeps is never disturbed.
 *
 * The handler (mw_unwind's handler dispatches here: one real-time signal for both) reads the
 * thread's own Python frames through the safe-read primitive — the thread is interrupted, so
 * they show one instant (the eval loop's half-written states are caught by the walk's anchor
 * checks, as for a paused thread) — and leaves a raw sample (code addresses with the fields that
 * identify each code object, instruction indices, the thread's label set; when a coroutine runs
 * outermost, the asyncio task running it, read from asyncio's dict of current tasks at that
 * instant: mw_tasks_current) in a record of a fixed pool. The sampler thread drains ready records
 * every tick, names the frames (mw_symcache) and adds them as on-CPU samples. Every CPU sample is
 * therefore a stack the thread had while it was using CPU, and samples fall uniformly over its CPU
 * time.
 *
 * Threads and safety:
 *   - mw_cputimer_init / mw_cputimer_shutdown: the thread that starts/stops the sampler (GIL
 *     held), the sampler thread not running; mw_cputimer_probe: one thread (the sampler's probe
 *     thread), before any timer is armed (none is meanwhile: the sampler ticks without timers
 *     until it has ended, and no thread arms itself until then).
 *   - mw_cputimer_arm, _disarm, _sweep: any thread (a mutex serializes them; never taken by the
 *     handler). A thread arms itself at its start (mw_sampler_thread_started), the sampler arms
 *     threads it meets unarmed and disarms those that are gone.
 *   - mw_cputimer_next, _done, _get_stats: THE SAMPLER THREAD ONLY.
 *   - mw_cputimer_on_signal: any thread, in a signal handler; async-signal-safe (atomics,
 *     process_vm_readv, clock_gettime, gettid; no lock, no allocation). Records and walk scratch
 *     are claimed with compare-and-swap; none free → the sample is dropped and counted.
 *   - mw_cputimer_after_fork_child: in the child, before any other call (closes inherited perf
 *     fds; POSIX timers are not inherited).
 *   - A thread that armed a POSIX timer itself (born) also sets a thread-specific value whose
 *     destructor runs in that thread at its exit (after its thread state is gone): it blocks our
 *     signal, credits its timer's instants passed with no signal yet (an unplaced record),
 *     and disarms it, under the arm/disarm mutex. mw_cputimer_forget leaves a thread that is
 *     still running armed for it (or for the sweep).
 * Memory: the registration table, the record pool and the walk scratch are mmap'd once by the
 * first init and kept for the life of the process; pages are resident only once used.
 */
#ifndef MW_CPUTIMER_H
#define MW_CPUTIMER_H

#include "mw_pyframes.h"

#include <signal.h>
#include <stdint.h>

#define MW_CPUTIMER_RECORDS 256 /* raw samples waiting for the sampler thread */
#define MW_CPUTIMER_COPIES 64   /* code objects per sample whose names the handler copied */
#define MW_CPUTIMER_NAMES 16384 /* bytes of copied names and line tables per sample */

/* Names and line table of a code object the sampler had not named yet, copied by the thread
 * itself at the sample (the code object was certainly alive then). Offsets into names[]. */
typedef struct {
    uintptr_t code;
    uint32_t name_off, name_len, file_off, file_len, lt_off, lt_len;
    int lt_ok;
} mw_codecopy_t;

typedef struct mw_cpusample {
    int32_t reg;      /* registration of the thread that took it */
    uintptr_t tstate; /* its PyThreadState */
    long tid;
    uint32_t periods;    /* CPU periods this sample stands for (1 + timer overruns) */
    int counted;         /* periods x period estimates the CPU without bias: laid in its perf
                          * event's count, or on its POSIX timer's grid of random phase */
    uint32_t labelset;   /* the thread's label set at the sample (mw_threads) */
    int depth;           /* frames[0..depth), leaf first */
    int truncated;       /* as mw_pyframes_walk: 1 cut, 2 torn (depth 0, to be dropped) */
    int unplaced;        /* a POSIX timer's instants credited at the thread's exit (depth 0):
                          * due earlier, where the kernel's tick never came to tell */
    int unmasked;        /* it came as the thread unblocked our signal (mw_unmasked): due
                          * earlier, at a stack not known */
    mw_outergen_t outer; /* the outermost frame a coroutine runs (mw_pyframes_walk_gen), its task */
    uint64_t handler_ns; /* time the handler took (its cost to the application thread) */
    mw_rawframe_t *frames;
    int ncopies;
    mw_codecopy_t copies[MW_CPUTIMER_COPIES];
    /* Native mode: the thread's native stack at the same instant (mw_unwind_here). */
    int nips, ips_complete;
    uintptr_t *ips; /* MW_UNWIND_MAX_FRAMES */
    char *names;    /* MW_CPUTIMER_NAMES bytes */
} mw_cpusample_t;

typedef struct mw_cputimer_stats {
    uint64_t mode;         /* 0 off, 1 POSIX CPU timers, 2 perf task-clock */
    uint64_t armed;        /* threads with a timer now */
    uint64_t arm_failed;   /* threads that could not get one (read at ticks instead) */
    uint64_t signals;      /* handler runs for a timer */
    uint64_t recorded;     /* raw samples left for the sampler */
    uint64_t periods;      /* CPU periods they stand for */
    uint64_t no_record;    /* dropped: every record was waiting (sampler behind) */
    uint64_t no_scratch;   /* dropped: every walk scratch busy (more handlers than CPUs) */
    uint64_t torn;         /* dropped: the thread was between two stores of the eval loop */
    uint64_t faults;       /* of which a read that faulted (recovered by the guard) */
    uint64_t stale;        /* signals for a registration that had moved on (ignored) */
    uint64_t early;        /* perf overflows before the sample due (a period not yet reset) */
    uint64_t exit_periods; /* periods of exited threads whose due sample never came (credited) */
    uint64_t steal_ns;     /* perf count set aside: the host had the virtual CPU (mw_cpusteal.h) */
    uint64_t revived;      /* stopped perf events the sampler topped up again (mw_cputimer_watch) */
    uint64_t fds_lost;     /* perf event descriptors the app closed (armed again: the watch) */
    uint64_t handler_ns;   /* total time spent in handlers */
    uint64_t native;       /* samples with a native stack (native mode) */
    uint64_t native_frames; /* native frames captured in them */
    uint64_t period_ns;
    uint64_t sigtrap; /* perf events signal through SIGTRAP (mw_cputrap.h), not a real-time one */
} mw_cputimer_stats_t;

/* Sets the period (1e9 / rate_hz ns of CPU time), the frames kept per sample and the signal
 * (mw_unwind's, which must be installed), and picks the mechanism (perf if a probe on the calling
 * thread works, else POSIX timers) and the perf route (the real-time signal; SIGTRAP with
 * MW_PROFILING_CPU_TIMER=perf-trap where mw_cputrap_install takes it).
 * MW_PROFILING_CPU_TIMER=timer|perf|perf-trap|off forces one (tests, diagnosis). Returns the mode
 * (1 or 2), 0 when off or unusable (*why says why).
 *
 * may_defer: when perf events are to be tried and this process (or the one it was forked from)
 * never tried them, returns MW_CPUTIMER_DEFERRED instead, the mode still 0: the caller has
 * mw_cputimer_probe() run later, on another thread, before any timer is armed. The
 * first per-thread perf event opened on a machine where none was open for a second makes the
 * kernel enable its scheduler hooks and wait for every CPU to see them (synchronize_rcu): the
 * probe then takes 10-20 ms instead of ~0.4, which the starting thread need not wait for. */
#define MW_CPUTIMER_DEFERRED (-1)
int mw_cputimer_init(int rate_hz, int max_depth, int signo, int may_defer, const char **why);
/* The deferred probe: sets and returns the mode (2 perf events, else 1 POSIX timers). */
int mw_cputimer_probe(void);
/* Any thread, async-signal-safe (an atomic load). */
int mw_cputimer_mode(void);

/* Gives thread tid (its PyThreadState at tstate) a timer, or finds the one it has. Returns its
 * registration index (>= 0) or -1 (no timer: counted; the sampler reads it at ticks as before).
 * born: tid is the calling thread, arming itself at its start: with a perf event its samples
 * cover its CPU from its creation (the first one also stands for the CPU before the arming). */
int mw_cputimer_arm(long tid, uintptr_t tstate, int born,
                    int *existed /* 1: it had one; may be NULL */);
/* The sampler thread, at a tick, for a thread counted by its timer (registration i) whose CPU
 * clock reads cpu_now: a perf event on the real-time route that has stopped (its overflow budget
 * spent with no handler run to top it up) while our signal is neither blocked nor pending in the
 * thread is topped up again. Takes the arm/disarm mutex only when it acts. */
void mw_cputimer_watch(int i, long tid, uint64_t cpu_now);
/* Whether registration i (thread tid's) has a timer whose signal is overdue at the thread's CPU
 * clock cpu_now: more than 4 periods and 2 ms of its CPU since its handler last ran (perf) or
 * since its next expiry was due (POSIX). 0 when unknown. A hint for the sampler thread, which
 * then asks whether the thread blocks the signal. */
int mw_cputimer_overdue(int i, long tid, uint64_t cpu_now);
/* Registration i's handler runs, twice over (+1 as each starts, +1 as it ends: odd while one runs
 * in thread tid); 0 when i is not tid's. Sampler thread. */
uint32_t mw_cputimer_inside(int i, long tid);

/* The registration of (tid, tstate) and the thread's CPU clock from which its samples cover it
 * (0: from its creation), or -1. */
int mw_cputimer_find(long tid, uintptr_t tstate, uint64_t *cpu_at_arm);
/* Thread tid's Thread object is gone: if the thread has exited, credits its exit as
 * mw_cputimer_retire does and disarms its registration; a thread still running (a join returns
 * before the thread has exited) keeps it until its own exit or the sweep. */
void mw_cputimer_forget(long tid);
/* Whether registration reg is thread tid's and has a timer, whose samples are counted
 * (rec->counted). A hint for the sampler thread (it may be disarmed meanwhile). */
int mw_cputimer_counted(int reg, long tid);
/* The sampler found thread tid (registration reg) running but out of the interpreter's thread
 * list: a native thread between two calls into Python, each under a thread state of its own
 * (PyGILState_Ensure: ctypes callbacks, pybind11). From now on its handler reads the thread
 * state the thread has at the sample (mw_pyframes_find_own) instead of the one it was armed for,
 * which may be freed. A new registration (re-armed for a new thread state) starts listed.
 * Sampler thread. */
void mw_cputimer_unlisted(int reg, long tid);
/* Retires registrations whose thread has exited (mw_cputimer_retire). */
void mw_cputimer_sweep(void);
/* Stops and frees registration reg of thread tid, no longer seen or seen with another thread
 * state, if reg is still its registration (the index may have gone to another thread since): if
 * it has exited, the periods its count passed without their sample (its exit) are left as one
 * record with no frame first (as _forget and _sweep do). */
void mw_cputimer_retire(int reg, long tid);
/* Stops and frees every registration (the sampler stops). */
void mw_cputimer_disarm_all(void);
/* Disarms every registration and arms none until mw_cputimer_unhalt (the app took our signal:
 * no thread may get one more of it). Any thread. */
void mw_cputimer_halt(void);
void mw_cputimer_unhalt(void);

/* Drain: the next ready record (NULL when none), to be handed back with _done. */
mw_cpusample_t *mw_cputimer_next(void);
void mw_cputimer_done(mw_cpusample_t *s);

void mw_cputimer_on_signal(siginfo_t *si, void *ucontext);
void mw_cputimer_get_stats(mw_cputimer_stats_t *out);
void mw_cputimer_after_fork_child(void);

#endif
