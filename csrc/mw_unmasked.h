/* mw_unmasked — whether a signal of ours came as the thread unblocked it.
 *
 * A thread that blocks our sampling signal (signal.pthread_sigmask) gets the signals due
 * meanwhile when it unblocks it: at the return of the C library's sigprocmask system call, where
 * its stack is that of the unblocking call, not the one the sample was due at (all of a thread's
 * CPU inside 1.2 ms blocked stretches came out at `pthread_sigmask`). This recognizes that
 * return in the interrupted context: its instruction pointer right after the
 * `mov $14,%eax; syscall` (rt_sigprocmask) of the C library's own pthread_sigmask or sigprocmask,
 * found at set-up (a mask changed by any other route is not recognized).
 *
 * Scope: x86-64 with a C library that issues the system call inline in those functions (glibc
 * 2.36: one site in pthread_sigmask, which sigprocmask calls). Elsewhere mw_unmasked_at is 0.
 *
 * Threads: mw_unmasked_init — once, before our signal handlers are installed (GIL held).
 * mw_unmasked_at — in our signal handler, any thread; async-signal-safe (loads only).
 * mw_unmasked_sites — any thread.
 */
#ifndef MW_UNMASKED_H
#define MW_UNMASKED_H

void mw_unmasked_init(void);
/* uc: a signal handler's third argument (ucontext_t *). 1 when the interrupted code is the
 * return of the C library's sigprocmask system call. */
int mw_unmasked_at(const void *uc);
/* the sites found (0: nothing is recognized) */
int mw_unmasked_sites(void);

#endif
