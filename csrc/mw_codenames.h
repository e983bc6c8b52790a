/* mw_codenames — which code objects the sampler has named, and the CPU-timer handler's copy of the
 * names of those it has not.
 *
 * A CPU-timer sample is read in the sampled thread's signal handler; the sampler thread names its
 * frames later, when a code object may already be freed. So the handler copies the qualname,
 * file name and line table of every code object of the sample that the sampler has not named
 * yet, and copies nothing for those it has: a lock-free set of code keys, written only by the
 * sampler thread, read by handlers.
 *
 * Threads: _init, _add and _clear on the sampler thread (or before it starts); _known (inside
 * _copy) from any thread, in a signal handler. _copy is async-signal-safe: relaxed atomic loads
 * and the safe reads of mw_pyframes only; it never allocates.
 * Memory: one mmap'd table of MW_CODENAMES_KNOWN keys, made by the first _init, kept for the
 * process's life (a forked child keeps the parent's keys: they name the same code objects).
 * A key found "known" wrongly (a table cleared between a sample and its naming) only costs the
 * sample its names (the sampler's names_lost: its CPU under a marker frame); a full probe run
 * only costs extra copies.
 */
#ifndef MW_CODENAMES_H
#define MW_CODENAMES_H

#include "mw_cputimer.h"

#include <stdint.h>

#define MW_CODENAMES_KNOWN 16384 /* keys in the set (a power of two) */

/* Maps the set once. 0, or -1 when out of memory. */
int mw_codenames_init(void);

/* The key of a frame's code object: its address and everything that names it, so that a code
 * object freed and another allocated at the same address get different keys. Never 0. */
uint64_t mw_codenames_key(const mw_rawframe_t *f);

/* Sampler thread: key has been named (its symbols are in the sampler's cache) / the cache was
 * emptied, so nothing is named any more. */
void mw_codenames_add(uint64_t key);
void mw_codenames_clear(void);

/* Handler: copies into rec (rec->copies, rec->names) the names and line table of the sample's
 * code objects the sampler has not named, each once, as many as rec has room for; reads the
 * interpreter's memory through rc. */
void mw_codenames_copy(mw_readcache_t *rc, mw_cpusample_t *rec);

#endif
