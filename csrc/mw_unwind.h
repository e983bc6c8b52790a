/* mw_unwind — native (C) frames for the sampler, opt-in (MwTracker(native=True)).
 *
 * For the thread it samples, the sampler sends a real-time signal (tgkill). The handler runs
 * in that thread, on its alternate signal stack when it has one, and does only async-signal-safe
 * work: it unwinds its own stack from the interrupted context with libunwind (local-only,
 * unw_init_local2/unw_step/unw_get_reg into a preallocated slot), posts a semaphore, then PAUSES
 * (futex wait, bounded) until the sampler has read the thread's Python frames, so the native
 * and the Python stacks describe the same instant. The sampler symbolizes outside the handler
 * (mw_elfsym: one name per function, cached) and splices the Python frames in where the eval loop's
 * C frames are.
 *
 * Contract:
 *   - mw_unwind_enable/disable/thread_init/get_stats: Python threads (GIL held), any time.
 *   - mw_unwind_enabled: any thread (relaxed atomic).
 *   - mw_unwind_capture, mw_unwind_release, mw_unwind_combine: THE SAMPLER THREAD ONLY, in that
 *     order, one request at a time (the slot is single).
 *   - The signal handler touches only the slot (atomics, preallocated libunwind cursor, IP
 *     array), calls gettid/getpid, libunwind's local unwinder, sem_post and futex; it saves and
 *     restores errno. It is installed with SA_SIGINFO|SA_ONSTACK|SA_RESTART and never removed
 *     (a late signal after disable finds no request and returns). SIGSEGV/SIGPROF and every
 *     other handler are never touched.
 *   - Memory: the slot and the symbol cache are allocated once by mw_unwind_enable and kept for
 *     the life of the process (names in the cache are copies owned by this module).
 */
#ifndef MW_UNWIND_H
#define MW_UNWIND_H

#include "mw_profbuf.h"
#include "mw_pyframes.h"

#include <signal.h>
#include <stdint.h>

#define MW_UNWIND_MAX_FRAMES 512     /* native frames captured per sample (leaf side kept) */
#define MW_UNWIND_WAIT_NS 10000000LL /* sampler waits this long for a handler */

typedef struct mw_unwind_stats {
    uint64_t requests;       /* signals sent */
    uint64_t captured;       /* handlers that answered in time */
    uint64_t timeouts;       /* threads that did not answer in time (Python-only sample) */
    uint64_t send_failed;    /* tgkill failed (thread gone) */
    uint64_t skipped;        /* threads not asked (backing off after timeouts, slot busy) */
    uint64_t late;           /* handlers that ran for a request already given up */
    uint64_t truncated;      /* native stacks cut at MW_UNWIND_MAX_FRAMES or by an unwind error */
    uint64_t mismatches;     /* eval-loop frames and Python eval calls did not pair up */
    uint64_t pause_timeouts; /* handlers that stopped waiting for the sampler */
    uint64_t symbols;        /* distinct instruction pointers symbolized */
    uint64_t frames;         /* native frames captured, total */
    uint64_t pauses;         /* threads paused without unwinding (Python-only consistent reads) */
    uint64_t signal;         /* the signal number in use (0 = never enabled) */
    uint64_t enabled;
} mw_unwind_stats_t;

/* Installs the handler (first call: picks a free real-time signal) and enables native frames.
 * show_internal: also show frames of the interpreter (python, libpython) and libc's thread
 * start. Returns 0, or -1 with a reason in *why (no free real-time signal, out of memory). */
int mw_unwind_enable(int show_internal, const char **why);
/* Installs the handler and the request slot WITHOUT enabling native frames, so that the sampler
 * can pause a running thread to read its Python frames consistently (mw_unwind_pause). GIL
 * held. Returns 0, or -1 with a reason in *why. Idempotent. */
int mw_unwind_setup(const char **why);

/* Sampler thread. Pauses thread tid in the handler without unwinding. Returns 0 when the thread
 * is paused (call mw_unwind_release() promptly, after reading its frames and before anything
 * that can take a lock), -1 when it was not asked or did not answer (counted, backed off). */
int mw_unwind_pause(long tid);

/* The real-time signal the handler is installed for (0 = none). The handler also takes the
 * signals of the threads' CPU timers (mw_cputimer: si_code SI_TIMER or POLL_IN) and hands them
 * to mw_cputimer_on_signal. */
int mw_unwind_signal(void);
/* 0 when that signal's handler is no longer ours (the app installed its own after our set-up),
 * 1 otherwise (or no signal). One sigaction call; any thread. */
int mw_unwind_signal_ours(void);
/* The app is taking our signal (its own disposition for it, about to be installed): no pause is
 * asked from now on and native unwinding stops. Returns the signal (0: none). Any thread. A later
 * mw_unwind_setup finds a free signal again. */
int mw_unwind_release_signal(void);
int mw_unwind_released(void);
/* In a fork child (its only thread): the send lock afresh. */
void mw_unwind_after_fork_child(void);
/* The action of our sampling signals (handler given): SA_SIGINFO | SA_ONSTACK | SA_RESTART, every
 * other asynchronous signal waiting for the short handler, faults (SEGV, BUS, ILL, FPE, ABRT)
 * still deliverable so a crash in it reaches faulthandler. Any thread. */
void mw_unwind_signal_action(struct sigaction *sa, void (*handler)(int, siginfo_t *, void *));

/* Disables native frames (the handler stays installed and ignores stray signals). */
void mw_unwind_disable(void);
int mw_unwind_enabled(void);

/* Gives the calling thread an alternate signal stack unless it already has one (the handler
 * then runs there). Returns 1 when installed, 0 when one was present, -1 on failure. The stack
 * is freed when the thread exits. */
int mw_unwind_thread_init(void);

void mw_unwind_get_stats(mw_unwind_stats_t *out);

/* Sampler thread. Signals thread tid (PyThreadState at tstate) and waits for its handler.
 * Returns 0 when the native stack was captured: the thread is then paused in its handler and
 * *top_frame holds its current Python frame (unchanged if unreadable); the caller must call
 * mw_unwind_release() promptly (after walking the Python frames, before anything that can take
 * a lock). Returns -1 when the thread was not asked or did not answer (counted). */
int mw_unwind_capture(long tid, uintptr_t tstate, uintptr_t *top_frame);
void mw_unwind_release(void);

/* Sampler thread, after mw_unwind_capture() == 0 and the Python walk: writes the combined stack
 * of frame ids of buffer b into out (leaf first, at most cap; the root side is cut) — native
 * frames interned as (symbol or object+0xSTART, shared object basename, line 0), Python frames
 * (py[0..npy), leaf first, resolved with mw_symcache) in place of the eval loop's frames.
 * Returns the number of ids written; an id is 0 where a frame could not be interned (a full
 * table: the caller cuts the stack at the outermost one, never skips it). */
uint32_t mw_unwind_combine(mw_profbuf_t *b, const mw_rawframe_t *py, int npy, mw_id_t *out,
                           uint32_t cap);

/* The same splice for native frames captured elsewhere (mw_cputimer's handler): ips[0..k) leaf
 * first, complete = the unwind reached the outermost frame. Sampler thread. */
uint32_t mw_unwind_combine_ips(mw_profbuf_t *b, const uintptr_t *ips, int k, int complete,
                               const mw_rawframe_t *py, int npy, mw_id_t *out, uint32_t cap);

/* Unwinds the calling thread's native stack from a signal handler's ucontext into ips (leaf
 * first, at most max) using `cursor` (mw_unwind_cursor_size() bytes, owned by the caller for the
 * call). Async-signal-safe as the pause handler's unwind is (libunwind local, no cache). Returns
 * the number of frames; *complete as above. */
size_t mw_unwind_cursor_size(void);
int mw_unwind_here(void *ucontext, void *cursor, uintptr_t *ips, int max, int *complete);

#endif
