/* mw_symcache — code object → (qualified name, file, line) for the sampler thread.
 *
 * Entries are keyed by the code object's address and validated against the fields read with
 * the frame (name, file and line-table pointers, first line): a code object freed and another
 * allocated at the same address shows as a mismatch and the entry is refilled. Names and the
 * line table are COPIED into the cache's own arena (read with mw_safe_read), so nothing here
 * points into application memory. When the cache is full it is emptied whole (counted).
 *
 * Each entry also remembers the string ids it got in the profile buffer of a given generation,
 * so a hot frame costs one hash probe and a line-table decode per sample.
 *
 * Threads: sampler thread only (no locks). Not async-signal-safe (uses the arena, not malloc).
 */
#ifndef MW_SYMCACHE_H
#define MW_SYMCACHE_H

#include "mw_profbuf.h"
#include "mw_pyframes.h"

/* Allocates the cache (once, at sampler start). 0 or -1. */
int mw_symcache_init(void);
void mw_symcache_free(void);
void mw_symcache_clear(void);

/* Resolves a raw frame into a frame of buffer b (string ids interned into b).
 * Returns the frame id in b, or 0 if the frame could not be read or b is full. */
mw_id_t mw_symcache_frame(mw_profbuf_t *b, const mw_rawframe_t *rf);

typedef struct mw_symcache_stats {
    uint64_t hits, misses, read_failures, resets;
} mw_symcache_stats_t;
void mw_symcache_get_stats(mw_symcache_stats_t *out);

#endif
