/* mw_blockprof — the block profile: where threads waited for a lock, how often and how long.
 *
 * Application threads that had to wait for a profiled lock (mw_locks) report the wait here
 * with their Python stack; the exporter takes each window's waits as one buffer and writes it
 * as a pprof of kind MW_PPROF_BLOCK (contentions/count, delay/nanoseconds), next to the CPU
 * profile of the same window.
 *
 * Values: a stack's wall_samples are its contentions, its wall_ns the time waited (mw_values_t
 * fields; the other fields stay 0).
 *
 * Sampling by delay (rate R ns, MW_PROFILING_LOCK_RATE): a wait of d >= R ns is always recorded
 * as (1 contention, d ns). A shorter wait is recorded with probability d/R, as (R/d contentions
 * -- randomly rounded to an integer --, R ns): the expected values are (1, d) for every wait, so
 * sums are unbiased while the number of stacks captured per second stays bounded by the time
 * spent waiting / R. R = 0 records every wait as it is.
 *
 * Buffers: an active buffer (written by application threads under g_mu) and a spare (the
 * exporter's, between rotate and recycle), allocated by the first mw_blockprof_enable() and
 * kept for the life of the process. A full buffer refuses the stack (counted, dropped).
 *
 * Threads: mw_blockprof_sample / mw_blockprof_add from any application thread (they take g_mu
 * for the insertion only; no Python, no allocation). rotate/recycle: the exporter thread only.
 * enable/disable/stats: any thread. Not async-signal-safe.
 *
 * Fork: mw_blockprof_register_atfork() (module init). The child's buffers start empty; a spare
 * the parent's exporter held at fork time is given back.
 */
#ifndef MW_BLOCKPROF_H
#define MW_BLOCKPROF_H

#include "mw_profbuf.h"

#include <stddef.h>
#include <stdint.h>

#define MW_BLOCKPROF_MAX_DEPTH 256 /* frames kept per stack (the leaf side) */

/* A frame as the recording thread resolved it (strings borrowed for the call). gen/id: the
 * caller's cache of the frame's id in the buffer of generation gen (0/0: none), read and updated
 * by mw_blockprof_add under its lock; callers serialize their calls (the GIL). */
typedef struct mw_strframe {
    const char *name, *file;
    size_t name_len, file_len;
    int32_t line, first_line;
    uint64_t gen;
    mw_id_t id;
} mw_strframe_t;

/* Starts recording waits with sampling rate rate_ns (allocates the buffers the first time).
 * Returns 0, or -1 when the buffers cannot be allocated. */
int mw_blockprof_enable(uint64_t rate_ns);
/* Stops recording (what is buffered is still exported). */
void mw_blockprof_disable(void);
int mw_blockprof_enabled(void);

/* Whether a wait of delay_ns is recorded (see "Sampling" above). When it is, returns 1 and
 * sets *contentions and *delay_out to the values to record; returns 0 when the wait is sampled
 * out or recording is off. Counts the wait either way. Any thread. */
int mw_blockprof_sample(uint64_t delay_ns, uint64_t *contentions, uint64_t *delay_out);

/* Adds one wait: frames leaf first (depth <= MW_BLOCKPROF_MAX_DEPTH; each frame's gen/id
 * updated), the waiting thread's
 * name, its label set (mw_labels id, 0 = none) and the values from mw_blockprof_sample.
 * Returns 0, or -1 when the buffer is full or recording is off (counted). */
int mw_blockprof_add(mw_strframe_t *const *frames, uint32_t depth, const char *thread,
                     uint32_t labelset, uint64_t contentions, uint64_t delay_ns);

/* Counts a wait kept by the sampling but not added (its recorder could not read the stack). */
void mw_blockprof_count_dropped(void);

/* Exporter: takes the active buffer (the spare becomes active). NULL when recording never
 * started or the spare is out. The caller gives it back with mw_blockprof_recycle(). */
mw_profbuf_t *mw_blockprof_rotate(void);
void mw_blockprof_recycle(mw_profbuf_t *b);

typedef struct mw_blockprof_stats {
    uint64_t waits;       /* waits reported (every contended acquire while recording) */
    uint64_t recorded;    /* of which recorded with their stack */
    uint64_t sampled_out; /* of which left out by the delay sampling */
    uint64_t dropped;     /* recorded but refused by a full buffer */
    uint64_t wait_ns;     /* time waited, all reported waits (not sampled) */
    uint64_t rate_ns;
    uint64_t enabled;
} mw_blockprof_stats_t;
void mw_blockprof_get_stats(mw_blockprof_stats_t *out);

void mw_blockprof_register_atfork(void);

#endif
