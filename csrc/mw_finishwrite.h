/* mw_finishwrite — a write(2) that our signal cut short is finished before the app sees it.
 *
 * A real-time signal of ours (a perf event's overflow queued while the thread was in the kernel,
 * or a sampler's pause request) that is pending when a write to a pipe, socket or terminal has
 * to wait ends that write early with a partial count. Most writers loop, but CPython's
 * TextIOWrapper over an unbuffered stream (PYTHONUNBUFFERED=1, python -u: what many container
 * images set) drops the rest of the text (python/cpython#85393): a large print loses data.
 *
 * Called at the end of our handler, this recognizes the return of the C library's write(2)
 * system call in the interrupted context (its instruction pointer right after the
 * `mov $1,%eax; syscall` of the C library's own `write`, found at set-up: a write by any other
 * route is not touched) with a partial count (0 < returned < asked), writes the rest from the
 * same buffer to the same descriptor with one more write(2), and puts the total in the context's
 * return register, so the call returns as if our signal had not come. That write waits as the
 * app's would have: with the interrupted code's signal mask (ours and SIGTRAP blocked), so the
 * app's own signals end it as they would have ended the app's write (with the count so far; one
 * that came while the handler ran, pending, ends it before it is written: taken as the mask is
 * set, it would otherwise be gone before the write waits, and a write that never ends could hang),
 * as do a send timeout, a non-blocking descriptor (EAGAIN) or an error (the count so far is
 * returned: the error is the next call's). A call left short so is left to the app for good: a
 * signal of ours that became pending meanwhile is taken as the handler returns, at the same point
 * of the same call, and its handler does not wait in it again (it did: the app's signal had run
 * its C handler, CPython's flag waited for the thread to get back to Python, and the write never
 * ended; 3 of 16 runs of the SIGALRM test hung, 0 of 60 since). The kernel checks the buffer (a bad
 * address is EFAULT, never a fault in the handler).
 *
 * Scope: x86-64 with a C library whose write(2) issues the system call inline (glibc up to
 * 2.40; glibc 2.41+ issues a multi-threaded process's cancellable calls from a shared routine,
 * musl likewise: not recognized, nothing is done there). Elsewhere both calls are no-ops.
 *
 * Threads: mw_finishwrite_init — once, before our signal handlers are installed (GIL held).
 * mw_finishwrite_after_signal — in our signal handler, any thread; async-signal-safe (system
 * calls only); it preserves errno. Counters: mw_finishwrite_stats, any thread.
 */
#ifndef MW_FINISHWRITE_H
#define MW_FINISHWRITE_H

#include <stdint.h>

void mw_finishwrite_init(void);
/* uc: the handler's third argument (ucontext_t *); our_sig: the handler's signal, kept blocked
 * while the rest is written. */
void mw_finishwrite_after_signal(void *uc, int our_sig);
/* writes finished (*finished) and bytes written for them (*bytes) since the process started;
 * *watched: the system calls found in the C library's write (0: nothing is done; glibc 2.36: 2,
 * its single-threaded and its cancellable path) */
void mw_finishwrite_stats(uint64_t *finished, uint64_t *bytes, uint64_t *watched);

#endif
