/* mw_threads — what the sampler knows about a thread beyond its frames: the name Python gave
 * it and the label set currently active in it, keyed by kernel thread id.
 *
 * Writers: Python threads (with the GIL) through the module glue; writers are serialized by an
 * internal mutex. Reader: the sampler thread, lock-free (atomic slot ids, a sequence counter
 * around the name). Fixed capacity (MW_THREADS_MAX slots); a full table refuses new threads
 * (counted) until some are forgotten. Not async-signal-safe.
 */
#ifndef MW_THREADS_H
#define MW_THREADS_H

#include <stddef.h>
#include <stdint.h>

#define MW_THREADS_MAX 8192
#define MW_THREAD_NAME_MAX 64

int mw_threads_set_name(long tid, const char *name); /* 0, or -1 when full */
int mw_threads_set_labelset(long tid, uint32_t labelset);
/* The thread is gone (its Thread object was collected): its entry goes at the sampler's
 * second mw_threads_reap from now, so the samples it left are still named after it. */
void mw_threads_forget(long tid);
/* Sampler thread, after each drain of CPU-timer samples: drops the entries forgotten before the
 * previous reap. */
void mw_threads_reap(void);

/* Reads /proc/self/task/<tid>/<file> (what fits in cap - 1 bytes) into buf, NUL-terminated.
 * Returns the bytes read, or -1 (the thread is gone, or /proc is not there). Any thread; not
 * async-signal-safe. */
long mw_threads_proc_read(long tid, const char *file, char *buf, size_t cap);
/* Thread tid's signal masks from its /proc status (SigPnd, ShdPnd, SigBlk; bit signo - 1 each).
 * Returns 0, or -1 when unreadable. Any thread (a system call and a parse: not async-signal-safe
 * only in that it calls strtoull). */
int mw_threads_sigmasks(long tid, uint64_t *pending, uint64_t *shared_pending, uint64_t *blocked);
/* 1 when a thread of this process has signal sig pending (its own or the process's), from each
 * thread's /proc status; 0 when none does or /proc is not there. Any thread; not
 * async-signal-safe (opendir). */
int mw_threads_signal_pending(int sig);

/* Sampler side. Copies the name (NUL-terminated, "" if unknown) and returns the labelset
 * (0 if none). *name_seq gets a value that changes whenever the name changes. */
uint32_t mw_threads_lookup(long tid, char *name, size_t cap, uint32_t *name_seq);
/* The *name_seq mw_threads_lookup would give now (0 while the name is being written, or for a
 * thread unknown): a cheap check that a name is still the one read. Lock-free. */
uint32_t mw_threads_name_seq(long tid);

/* Sampler side: a counter bumped on every labelset write for tid (0 if unknown). Equal values
 * before and after reading a stack mean the labels did not change meanwhile. Lock-free. */
uint32_t mw_threads_labelset_seq(long tid);

/* The labelset of tid now (0 if none). Async-signal-safe (atomic loads only): a thread may read
 * its own in a signal handler. */
uint32_t mw_threads_labelset_now(long tid);

/* After fork, in the child: every entry belongs to a thread that does not exist there. */
void mw_threads_reset_after_fork(void);
uint64_t mw_threads_refused(void);

#endif
