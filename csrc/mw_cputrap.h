/* mw_cputrap — the SIGTRAP route of the perf CPU-timer samples.
 *
 * A perf event opened with attr.sigtrap (Linux 5.13+) signals its overflow with SIGTRAP
 * (si_code TRAP_PERF, the event's sig_data in the siginfo) from a task work run when the thread
 * returns to user mode, not from the overflow's interrupt. The difference is what a system call
 * sees: a real-time signal queued by an overflow while the thread is in the kernel (a perf
 * task-clock event counts kernel time too) is pending when that call then blocks, so the call
 * returns early: a write to a full pipe returns a partial count (and CPython's TextIOWrapper then
 * loses the rest of a large print: python/cpython#85393), a call that is not restarted returns
 * EINTR. A signal raised on the way back to user mode comes after the call has finished. The
 * sample is the same: either way the handler runs at the thread's return to user mode.
 *
 * Opt-in (MW_PROFILING_CPU_TIMER=perf-trap), because SIGTRAP is not ours to keep: a library that
 * installs a SIGTRAP handler after the profiler started receives our signals (Celery's billiard
 * pool resets SIGTRAP in its workers to a handler that exits: they died of it), and one that
 * resets it to the default dumps core at the next sample. Taken only where nothing claims SIGTRAP
 * yet: its disposition is the default and no debugger or tracer is attached (each SIGTRAP would
 * stop a traced process); otherwise, and on kernels without attr.sigtrap, the perf events keep
 * the real-time signal (F_SETSIG). Once installed the
 * handler stays for the life of the process (a SIGTRAP of a closed event may still be on its
 * way, and SIGTRAP's default action dumps core); a SIGTRAP that is not TRAP_PERF goes to what
 * was installed before (the default: re-raised with it).
 *
 * Threads: mw_cputrap_install — the thread that starts the sampler (mw_cputimer_init), GIL
 * held. mw_cputrap_ours — any thread. The handler — any thread, async-signal-safe: it calls
 * mw_cputimer_on_signal (mw_cputimer.h) and touches nothing else.
 */
#ifndef MW_CPUTRAP_H
#define MW_CPUTRAP_H

#include <signal.h>
#include <stdint.h>

#define MW_TRAP_PERF 6 /* si_code of a perf event's SIGTRAP (asm-generic/siginfo.h) */

/* Installs the SIGTRAP handler (once). 0 when ours is installed, else -1 with *why. */
int mw_cputrap_install(const char **why);
/* Whether SIGTRAP still goes to our handler (an application may have replaced it since). */
int mw_cputrap_ours(void);
/* The event's sig_data carried by a TRAP_PERF siginfo (the C library's siginfo_t may not name
 * the field: it follows si_addr in the fault layout). */
uint64_t mw_cputrap_data(const siginfo_t *si);

#endif
