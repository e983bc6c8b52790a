/* mw_task_loops — the table of running event loops (mw_tasks_loop_set, mw_tasks_loops,
 * mw_tasks_after_fork_child, declared in mw_tasks.h) and its two counters, kept apart from the
 * task reader (mw_tasks.c) that uses them.
 *
 * Threads and locks: the table and both counters are guarded by one mutex, held for copies and
 * counts only, never across a read of the app's memory. Not async-signal-safe. No allocation.
 */
#ifndef MW_TASK_LOOPS_H
#define MW_TASK_LOOPS_H

#include <stdint.h>

#include "mw_tasks.h"

/* One more loop registered from a thread's sample (mw_tasks_loop_adopt). Any thread. */
void mw_task_loops_count_found(void);
/* The loops refused (table full) and found from samples so far. Any thread. */
void mw_task_loops_counts(uint64_t *refused, uint64_t *found);

#endif
