/* mw_backlog — profiles the local store had no room for (ENOSPC, EDQUOT), or no descriptor to
 * create a file with (EMFILE, ENFILE: the app holds as many as it may), kept in memory and
 * written, oldest first, once there is room again: a full disk that is cleared, or an app that
 * closes files again, loses nothing.
 *
 * Bound: at most MW_BACKLOG_MAX_FILES files and MW_BACKLOG_MAX_BYTES bytes wait; keeping one
 * more drops the oldest (counted as dropped). What still waits when the process ends is lost
 * (the exporter's statistics show it as waiting).
 *
 * Memory: mw_backlog_keep copies the bytes; an entry is freed when written or dropped.
 *
 * Threads: keep and write from the exporter thread only (one at a time); stats from any thread.
 * g_lock (internal) guards the list and the counters and is never held across a write. Not
 * async-signal-safe. Fork: the exporter's fork handlers call mw_backlog_atfork_*; the child
 * frees the parent's entries (the parent writes them).
 */
#ifndef MW_BACKLOG_H
#define MW_BACKLOG_H

#include "mw_store.h"

#include <stddef.h>
#include <stdint.h>

#define MW_BACKLOG_MAX_FILES 256
#define MW_BACKLOG_MAX_BYTES (4u << 20) /* 4 MiB */

typedef struct mw_backlog_stats {
    uint64_t waiting, waiting_bytes; /* files in memory now, and their bytes */
    uint64_t kept;                   /* files ever kept */
    uint64_t written;                /* of which written later */
    uint64_t dropped;                /* of which dropped: the bound, or no memory to keep them */
} mw_backlog_stats_t;

/* What writing the waiting files did (mw_backlog_write). */
typedef struct mw_backlog_result {
    uint64_t files_written, bytes_written, files_evicted, bytes_evicted;
    uint64_t dir_bytes;        /* pattern files in the store after the last write */
    mw_store_result_t failure; /* the write that failed (failure.err != 0), if one did */
} mw_backlog_result_t;

/* 1 when a store failure with this errno is one the backlog waits out (no room, no descriptor). */
int mw_backlog_waits_for(int err);

/* Keeps a copy of data[0..len), the profile of the window starting at start_ms. Returns 0, or
 * -1 when no memory (the profile is dropped, counted). */
int mw_backlog_keep(int64_t start_ms, const void *data, size_t len);

/* Writes the waiting files, oldest first, with mw_store_write (same arguments); stops at the
 * first failure, which keeps its file at the head. Returns the number of files still waiting. */
size_t mw_backlog_write(const char *dir, const char *service, long pid, uint64_t max_bytes,
                        mw_backlog_result_t *out);

void mw_backlog_stats(mw_backlog_stats_t *out);

void mw_backlog_atfork_prepare(void);
void mw_backlog_atfork_parent(void);
void mw_backlog_atfork_child(void);

#endif
