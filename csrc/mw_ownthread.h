/* mw_ownthread — starts the profiler's own threads (mw-sampler, mw-export, mw-upload,
 * mw-termflush): every signal blocked in them, and their kernel name (mw-*) theirs from their
 * first instant.
 *
 * Why the name from the first instant: the sampler charges the CPU of threads without Python to
 * "[native thread]" rows unless their kernel name says they are the profiler's (mw-*). A thread
 * that named itself once it ran was, for its first microseconds (hundreds under ASan), an
 * unnamed native thread with CPU, and a listing in between put it in the app's profile.
 * How: a new thread inherits its creator's kernel name (comm). The calling thread takes `name`
 * (prctl PR_SET_NAME, at most 15 bytes) around pthread_create and gets its own back at once.
 *
 * Why the mask through the thread's attributes (pthread_attr_setsigmask_np, glibc 2.32+) and not
 * the caller's: a caller whose signals were blocked for the call got the CPU-timer sample due
 * meanwhile as it unblocked them, which looks like a thread that blocks our signal (mw_unmasked):
 * a fork child restarting the profiler was then watched as one. Older C libraries: the caller's
 * mask, blocked around pthread_create.
 *
 * Threads: any thread (GIL not needed), not async-signal-safe. For the duration of the call the
 * calling thread's kernel name is `name` (/proc, ps: for the main thread, the process's name);
 * it is restored before it returns.
 */
#ifndef MW_OWNTHREAD_H
#define MW_OWNTHREAD_H

#include <pthread.h>

/* pthread_create(t, NULL, fn, arg) as above; returns its result (0 or an errno value). */
int mw_ownthread_create(pthread_t *t, const char *name, void *(*fn)(void *), void *arg);

#endif
