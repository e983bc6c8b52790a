/* mw_termguard — a SIGTERM caught by a Python-level handler is acted on even when the main
 * thread is blocked in a call that the signal does not interrupt.
 *
 * Why: CPython runs a Python signal handler only in the main thread, between bytecodes. Its C
 * handler merely records the signal. When the signal is delivered to another thread (any thread
 * that does not block it may take a process-directed signal), or to the main thread just before
 * it enters a blocking call (between a lock's try-acquire and its wait, say), the main thread
 * blocks on and the Python handler never runs. A multiprocessing pool worker waiting for its next
 * task is exactly there when Pool.terminate() sends SIGTERM and then joins it: the parent waits
 * for ever (seen in ~1.5% of `with Pool(2)` runs with the profiler's idle-worker handler).
 *
 * What: mw_termguard_arm() puts a C handler in front of the handler SIGTERM has now (CPython's,
 * which the caller has just installed with signal.signal). On a SIGTERM it calls that handler
 * (so the Python handler is still what runs), then makes sure the main thread wakes up: from
 * another thread it redirects the signal to the main thread (tgkill); in the main thread it
 * starts a POSIX timer that sends SIGTERM to the main thread every 50 ms, at most 100 times, each
 * interrupting whatever blocking call the thread is in, until the Python handler changes the
 * disposition (it sets SIG_IGN while it flushes, then dies of the default action; a disposition
 * put back to SIG_DFL ends the process at the next tick, which is what the sender asked for).
 *
 * Threads: arm from the main thread only (it records the caller as the main thread), GIL held.
 * The handler is async-signal-safe (tgkill, timer_settime, atomics). Fork: a child has no timer;
 * the next arm in the child makes one (the creating pid is recorded).
 */
#ifndef MW_TERMGUARD_H
#define MW_TERMGUARD_H

/* Installs the guard in front of SIGTERM's current handler, which must be a plain handler (not
 * SIG_DFL/SIG_IGN, not SA_SIGINFO). Returns 0, or -1 (errno set) when SIGTERM's disposition is
 * not such a handler or the timer could not be made: the Python handler then works as without
 * the guard. Idempotent. */
int mw_termguard_arm(void);

/* Times the guard re-sent SIGTERM to the main thread (redirects and timer ticks), this process. */
unsigned long mw_termguard_rekicks(void);

#endif
