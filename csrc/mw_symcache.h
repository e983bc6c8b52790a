/* mw_symcache — code object → (qualified name, file, line) for the sampler thread.
 *
 * Entries are keyed by the code object's address and the fields read with the frame that tell
 * code objects apart (name, file and line-table pointers, first line, 3.12+ co_version): a code
 * object freed and another allocated at the same address get an entry each, and both stay until
 * the cache is emptied. The CPU-timer handlers skip copying the names of the code objects the
 * sampler has named (mw_codenames, the same keys), so an entry must not go while its key is
 * there: refilled in place, the entry of one of two code objects alternating at one address was
 * missing whenever the other's had replaced it, and its samples were dropped, their CPU going to
 * the rest (two functions freed and remade in turn at one address, 250 times a second each: 1-6%
 * of the one's 3 s of CPU left under its name). Names and the line table are COPIED into the
 * cache's own arena (read with mw_safe_read), so nothing here points into application memory. When
 * the cache is full it is emptied whole (counted), and the handlers' set with it.
 *
 * Each entry also remembers the string ids it got in the profile buffer of a given generation,
 * so a hot frame costs one hash probe and a line-table decode per sample.
 *
 * Names are only as true as the read that produced the key: a frame read from a stack that was
 * changing could name a code object that was being freed. So the sampler resolves a stack's
 * frames inside an ATTEMPT (mw_symcache_begin ... resolve ... ) while the thread is proven not to
 * run (or paused), and abandons it with mw_symcache_abort() when the proof fails: the entries the
 * attempt filled are dropped, so no name read from a torn stack is ever served later.
 *
 * Threads: sampler thread only (no locks, no malloc after init). Not async-signal-safe. Nothing
 * here takes a lock, so it may run while an application thread is paused in a signal handler.
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

/* The two halves of mw_symcache_frame. resolve() finds or fills the entry of a raw frame
 * (reading names and line table from application memory on a miss); the handle stays valid
 * until the next clear (mw_symcache_epoch() changes) or abort. intern() only touches the cache
 * and the buffer. */
typedef struct mw_symentry mw_symentry_t;
const mw_symentry_t *mw_symcache_resolve(const mw_rawframe_t *rf);
mw_id_t mw_symcache_intern(mw_profbuf_t *b, const mw_symentry_t *h, int32_t lasti);

/* The entry of a raw frame if the cache has it (validated), NULL otherwise; never reads
 * application memory. For frames read earlier than now (mw_cputimer), whose code objects may be
 * gone: a miss is filled only after checking the code object is still the one read. */
const mw_symentry_t *mw_symcache_peek(const mw_rawframe_t *rf);

/* Names and line table of a code object, copied by someone who saw it alive (mw_cputimer's
 * handler): fills the cache from these copies, reading no application memory. */
typedef struct mw_symcopy {
    const char *name, *file;
    const uint8_t *lt;
    uint32_t name_len, file_len, lt_len;
    int lt_ok;
} mw_symcopy_t;
const mw_symentry_t *mw_symcache_put_copied(const mw_rawframe_t *rf, const mw_symcopy_t *c);

/* Attempts: begin() starts remembering the entries filled; abort() drops them again. */
void mw_symcache_begin(void);
void mw_symcache_abort(void);
uint64_t mw_symcache_epoch(void);

typedef struct mw_symcache_stats {
    uint64_t hits, misses, read_failures, resets;
    uint64_t aborted; /* entries dropped because the read that filled them was not proven */
} mw_symcache_stats_t;
void mw_symcache_get_stats(mw_symcache_stats_t *out);

#endif
