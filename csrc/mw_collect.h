/* mw_collect — hands finished windows to the exporter and keeps the cumulative profile that
 * tracker.snapshot() reads.
 *
 * Buffers: the sampler's active buffer, one spare (the exporter's), and the cumulative buffer
 * (everything since start or the last reset; bounded like any buffer: what does not fit is
 * counted as overflow). All three have the limits the sampler was started with.
 *
 * Locking: one collect mutex, always taken before the sampler's buffer lock. mw_collect_rotate
 * holds it across the swap and the merge into the cumulative buffer, so a snapshot never sees
 * a window in neither place.
 *
 * Calls: any non-signal context; never from the sampler thread. No Python.
 */
#ifndef MW_COLLECT_H
#define MW_COLLECT_H

#include "mw_profbuf.h"

#include <stdint.h>

/* Allocates the cumulative and spare buffers (after mw_sampler_start). 0 or -1. */
int mw_collect_init(void);

/* Ends the current window: swaps the sampler's buffer, merges it into the cumulative buffer,
 * and returns it with its window (CLOCK_REALTIME ns). The caller owns the buffer until it
 * passes it back with mw_collect_recycle(). Returns NULL if not initialised or no spare. */
mw_profbuf_t *mw_collect_rotate(int64_t *t_start, int64_t *t_end);
void mw_collect_recycle(mw_profbuf_t *b);

/* Calls fn on the cumulative buffer, then on the active buffer (windows not yet rotated), with
 * the locks held. fn must not call back into mw_collect or mw_sampler. */
void mw_collect_visit(void (*fn)(const mw_profbuf_t *, void *), void *arg);

/* Empties the cumulative buffer (and, with also_active, the sampler's active one). */
void mw_collect_reset(int also_active);

/* Fork handlers (register after mw_sampler_register_atfork): the child starts empty. */
void mw_collect_register_atfork(void);

uint64_t mw_collect_overflow(void); /* stacks that did not fit the cumulative buffer */
/* Start of the cumulative window, unix ns (mw_window_start: the wall clock stepped since). */
int64_t mw_collect_start_ns(void);

#endif
