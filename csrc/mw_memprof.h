/* mw_memprof — the memory profile: sampled allocations and the sampled live set.
 *
 * The allocator hooks (mw_module_memory.c) count every allocation's bytes against a countdown
 * drawn from an exponential distribution of mean R bytes (MW_PROFILING_MEMORY_RATE): the points
 * where it runs out form a Poisson process over the bytes allocated, so an allocation of s
 * bytes is sampled with probability p = 1 - exp(-s/R), and a sampled one stands for 1/p
 * allocations of s/p bytes in all (Go's heap profiler does the same). Expected totals per stack
 * are then exactly the allocations' counts and bytes, whatever their sizes.
 *
 * A sampled allocation is recorded with the allocating thread's Python stack (leaf first), name
 * and label set into ONE long-lived buffer, whose stacks carry
 *     cpu_samples / cpu_ns    objects / bytes allocated in the current window (alloc_*)
 *     wall_samples / wall_ns  objects / bytes of the sampled allocations still live (inuse_*)
 * and its pointer into a bounded live table (open addressing). Freeing a sampled pointer takes
 * its values off its stack's inuse fields. A full table counts the sample as allocated only
 * (counted: live_overflow). A pointer never seen (allocated before the hooks, freed through
 * another domain) is simply not found.
 *
 * A counting filter (one byte per hash bucket, 64 Ki buckets) answers "might be sampled" for a
 * freed pointer without the table: a free whose bucket is 0 costs one load.
 *
 * Export (mw_memprof_take): the stacks with any nonzero value are copied into the exporter's
 * buffer (alloc_* of the window, inuse_* at its end), then the window's alloc_* values are
 * zeroed. When a table of the long-lived buffer is over half full, it is compacted: stacks
 * whose inuse_* are 0 go, the live entries follow their stacks to the new indices.
 *
 * Threads:
 *   - mw_memprof_tick, _draw, _record, _maybe_tracked, _untrack: application threads holding the
 *     GIL (the allocator domains hooked require it, so their calls are serialized). _record and
 *     _untrack take g_mu for the buffer and table; they call nothing that allocates through
 *     Python's allocators, and read strings only through mw_safe_read.
 *   - mw_memprof_take / _give_back: the exporter thread (g_mu held for the copy).
 *   - enable/disable/stats: any thread with the GIL.
 * Not async-signal-safe.
 *
 * Memory: the live table, the filter and the three buffers (long-lived, compaction spare,
 * exporter's) are allocated by the first mw_memprof_enable() and kept for the life of the
 * process.
 *
 * Fork: mw_memprof_register_atfork() (module init). The child keeps the live set (its heap is a
 * copy of the parent's) and starts a new window of allocations.
 */
#ifndef MW_MEMPROF_H
#define MW_MEMPROF_H

#include "mw_profbuf.h"

#include <stddef.h>
#include <stdint.h>

#define MW_MEMPROF_MAX_DEPTH 256    /* frames kept per stack (the leaf side) */
#define MW_MEMPROF_LIVE_SLOTS 32768 /* sampled allocations tracked live at most (x 0.75) */
#define MW_MEMPROF_FILTER_BITS 16

/* A frame of the allocating thread as the caller resolved it. name/file: str objects of a code
 * object that is alive for the call (read with mw_safe_read only when the frame is interned).
 * gen/id: the caller's cache of its id in the buffer of generation gen, updated under g_mu. */
typedef struct mw_memframe {
    uintptr_t name, file;
    int32_t line, first_line;
    uint64_t gen;
    mw_id_t id;
} mw_memframe_t;

/* Bytes left before the next sample; INT64_MAX when sampling is off. GIL-serialized. The large
 * blocks, sampled apart from the duty cycle (mw_module_memory.c), have their own, at the rate
 * times mw_memprof_weight: as many samples per byte as the small blocks get on average. */
extern int64_t mw_memprof_countdown, mw_memprof_countdown_large;
/* The counting filter (NULL until the first enable). */
extern uint8_t *mw_memprof_filter;

static inline uint32_t mw_memprof_bucket(const void *p) {
    return (uint32_t)((((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull) >>
                      (64 - MW_MEMPROF_FILTER_BITS));
}

/* Counts size bytes; 1 when the allocation is to be sampled (then call mw_memprof_draw). */
static inline int mw_memprof_tick(size_t size) {
    return (mw_memprof_countdown -= (int64_t)size) <= 0;
}
/* The same for a large block (then mw_memprof_draw with duty 0). */
static inline int mw_memprof_tick_large(size_t size) {
    return (mw_memprof_countdown_large -= (int64_t)size) <= 0;
}

/* 1 when p may be a sampled live pointer (then call mw_memprof_untrack). */
static inline int mw_memprof_maybe_tracked(const void *p) {
    return mw_memprof_filter && mw_memprof_filter[mw_memprof_bucket(p)];
}

/* What each sampled allocation's weights are multiplied by: 1 / the fraction of the time the
 * hooks are in place (mw_module_memory.c's duty cycle; 1 when they always are). Set by that file
 * (GIL held, or the sampler thread under its duty lock); read by mw_memprof_draw. */
extern _Atomic double mw_memprof_weight;

/* Defined by csrc/mw_module_memory.c (the hooks' owner): at each tick of the sampler, puts the
 * allocation hooks in place until the next tick, or takes them out (its duty cycle). The sampler
 * thread only; never blocks (a tick that meets memory_enable/disable at work leaves the state). */
void mw_memory_duty_tick(void);

/* After a tick that ran out: draws the next countdown and gives the sampled allocation of size
 * bytes its weights (objects and bytes it stands for). duty 1: an allocation the duty cycle gates
 * (mw_memprof_countdown; its weights times mw_memprof_weight); 0: a large block, always counted
 * (mw_memprof_countdown_large, at the rate times mw_memprof_weight). Returns 0 when sampling is
 * off meanwhile (nothing to record). */
int mw_memprof_draw(size_t size, int duty, uint64_t *objects, uint64_t *bytes);

/* Records a sampled allocation at p (non-NULL) with its weights, stack (frames leaf first;
 * depth 0: none known), thread name and label set. Returns 0, or -1 when the buffer is full
 * (the sample is counted as dropped). */
int mw_memprof_record(const void *p, uint64_t objects, uint64_t bytes, mw_memframe_t *const *frames,
                      uint32_t depth, const char *thread, uint32_t labelset);

/* A freed (or reallocated) pointer that mw_memprof_maybe_tracked flagged. */
void mw_memprof_untrack(const void *p);

/* Starts sampling with mean rate_bytes between samples (allocates the tables the first time).
 * Returns 0, or -1 when memory cannot be allocated. */
int mw_memprof_enable(uint64_t rate_bytes);
/* Stops sampling; frees of sampled pointers are still tracked, buffered values still exported. */
void mw_memprof_disable(void);
int mw_memprof_enabled(void);
uint64_t mw_memprof_rate(void);

/* Exporter: the window's profile (see above) in the exporter's buffer, NULL when profiling
 * never started or nothing is to be exported. Give it back with mw_memprof_give_back(). */
mw_profbuf_t *mw_memprof_take(void);
void mw_memprof_give_back(mw_profbuf_t *b);

typedef struct mw_memprof_stats {
    uint64_t samples;       /* sampled allocations */
    uint64_t recorded;      /* of which recorded with their stack */
    uint64_t dropped;       /* not recorded: buffer full, or the stack could not be read */
    uint64_t live;          /* sampled allocations live now */
    uint64_t live_overflow; /* samples not tracked live: the table was full */
    uint64_t frees;         /* frees of sampled pointers */
    uint64_t compactions;   /* compactions of the long-lived buffer */
    uint64_t inuse_bytes;   /* estimated bytes live (sum of the live samples' weights) */
    uint64_t rate_bytes;
    uint64_t enabled;
} mw_memprof_stats_t;
void mw_memprof_get_stats(mw_memprof_stats_t *out);

/* Counts a sample that could not be recorded by its caller. */
void mw_memprof_count_dropped(void);

void mw_memprof_register_atfork(void);

#endif
