/* mw_sched — the sampler thread's own time slice.
 *
 * A tick must read the threads at its own instant. Woken on a CPU where an application thread
 * runs, the sampler waited for that thread to block or to use up its time slice (EEVDF protects a
 * running task's slice from a waking one of the same length): its reads came late in the thread's
 * bursts, and a thread that burns ~1 ms between sleeps had the first half of each burst read at
 * 0.67 of its due and the second half at 1.34 (ticks only, 1 kHz). A short slice of its own
 * (sched_attr.sched_runtime of a fair task: Linux 6.12+, no privilege needed; ignored before)
 * lets the woken sampler preempt at once.
 *
 * Threads: the calling thread only (it sets its own attributes); not async-signal-safe; no
 * memory, no lock.
 */
#ifndef MW_SCHED_H
#define MW_SCHED_H

#include <stdint.h>

/* Asks for a slice of ns for the calling thread (a fair task's sched_runtime); returns the slice
 * in effect (ns), 0 when the kernel has none to give (before 6.12, or not a fair task). */
uint64_t mw_sched_short_slice(uint64_t ns);

#endif
