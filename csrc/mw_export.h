/* mw_export — the exporter thread: every interval (or on a flush request) it ends the current
 * window and turns it into a gzipped pprof for the local store and/or the uploader.
 *
 * One export:  mw_collect_rotate() → the finished window's buffer, now ours alone
 *              → mw_pprof_encode_gz() (no lock held, no GIL)
 *              → mw_store_write() into profile_dir (if set; when it is full, the profile
 *                waits in memory for room: mw_backlog) and/or
 *                mw_upload_submit_registered() (if upload is on; the uploader copies the
 *                bytes and never blocks)
 *              → mw_collect_recycle()
 *              → the same for the window's lock waits (mw_blockprof_rotate, a profile of kind
 *                MW_PPROF_BLOCK submitted as "block"), when lock profiling ever started.
 * Each CPU profile carries the requests counted since the previous one (mw_labels_take_requests),
 * one comment per counted label set: `mw:requests {"count":N,"labels":{...}}` (JSON; the labels
 * are the set's pairs, the static labels and pid: docs/interfaces.md, "Request counts"), so that
 * a reader can divide a window's cost by the requests served in it.
 * A window without any stack is not written nor submitted (counted as empty_windows; its
 * requests go with the next window written). Windows
 * are contiguous: each starts where the previous one ended (mw_sampler_swap), unless the wall
 * clock was stepped in between (mw_window_start).
 *
 * Thread: one pthread, all signals blocked, never touches Python. It sleeps on a condition
 * variable (CLOCK_MONOTONIC) until the next interval, a flush request or stop; the next
 * periodic export is one interval after the previous export began.
 *
 * Locks (internal): g_lock guards the control state (requests, completion, stats) and is never
 * held across an export. g_hold is held only while rotating (and while recycling), so that the
 * fork handler always knows whether the thread owned a window buffer at fork time; order:
 * g_hold → collect lock → sampler buffer lock. A lifecycle mutex serializes start/stop. The static
 * labels (mw_export_config_t) are replaced only by start, under g_static, which
 * encode_snapshot holds while it encodes; the exporter thread reads them without it (start
 * replaces them only while no exporter thread runs).
 *
 * Fork: mw_export_register_atfork(). The child has no exporter thread; it re-creates the locks,
 * zeroes the statistics and keeps a buffer the parent's exporter held at fork time, to give
 * it back to mw_collect on the next mw_export_start() (otherwise the child could never rotate).
 * The Python layer restarts the exporter in the child.
 *
 * Calls: start/stop/flush/stats/encode_snapshot from any non-signal thread other than the
 * exporter itself (Python threads release the GIL around flush, stop and encode_snapshot).
 */
#ifndef MW_EXPORT_H
#define MW_EXPORT_H

#include <stddef.h>
#include <stdint.h>

#define MW_EXPORT_MIN_INTERVAL_S 0.01

typedef struct mw_export_config {
    double interval_s;        /* >= MW_EXPORT_MIN_INTERVAL_S */
    const char *service;      /* sanitized for file names (mw_store_sanitize_service) */
    const char *profile_dir;  /* NULL or "": no local files */
    uint64_t store_max_bytes; /* 0: MW_STORE_DEFAULT_MAX_BYTES (256 MiB) */
    int upload;               /* submit each profile to the uploader */
    /* Labels on every sample of every profile (mw_pprof_meta_t's static labels), copied:
     * nlabels pairs, at most MW_PPROF_MAX_STATIC, keys checked by the caller. */
    const char *const *label_keys, *const *label_vals;
    uint32_t nlabels;
} mw_export_config_t;

typedef struct mw_export_stats {
    uint64_t exports;       /* windows encoded and handed to every destination */
    uint64_t export_errors; /* windows for which some step failed (encode, write, submit) */
    uint64_t encode_errors; /* of which the encoding (memory, zlib) */
    uint64_t store_errors;  /* of which writing the file */
    uint64_t upload_errors; /* of which the uploader refused (uploader not running...) */
    uint64_t uploads_submitted;
    uint64_t empty_windows;          /* windows without stacks (nothing written nor submitted) */
    uint64_t rotate_failures;        /* no buffer to rotate (sampler never started) */
    uint64_t flushes;                /* flush requests served */
    uint64_t fork_buffers_recovered; /* window buffers taken back after a fork (child) */
    uint64_t bytes_written;          /* to the store */
    uint64_t files_written;
    uint64_t files_evicted; /* removed by the store's size bound (by this process) */
    uint64_t bytes_evicted;
    uint64_t store_dir_bytes;    /* pattern files in the store after the last write */
    uint64_t labels_skipped;     /* label pairs left out (invalid / repeated / reserved key) */
    uint64_t last_export_cpu_ns; /* exporter thread CPU time of the last export */
    uint64_t max_export_cpu_ns;
    uint64_t total_export_cpu_ns;
    uint64_t last_export_wall_ns;
    uint64_t max_export_wall_ns;
    uint64_t last_stacks; /* stacks in the last window */
    uint64_t last_locations, last_functions;
    uint64_t last_raw_bytes; /* protobuf size of the last profile */
    uint64_t last_gz_bytes;  /* gzipped size */
    int64_t last_window_start_ns, last_window_end_ns;
    int64_t last_errno;      /* errno of the last store failure, 0 if none */
    uint64_t block_exports;  /* lock-wait windows written/submitted without error (mw_blockprof) */
    uint64_t block_stacks;   /* stacks in them */
    uint64_t memory_exports; /* memory windows written/submitted without error (mw_memprof) */
    uint64_t memory_stacks;  /* stacks in them */
    uint64_t requests;       /* requests counted (mw_labels_count_request) in the windows written */
    uint64_t running;
    /* Profiles the store had no room for (mw_backlog): waiting in memory now (files, bytes),
     * ever kept, written later, dropped (the backlog's bound, no memory). */
    uint64_t store_waiting, store_waiting_bytes, store_kept, store_written_late, store_dropped;
} mw_export_stats_t;

/* Starts the exporter thread with a copy of *cfg. Returns 0 when started, 1 when already
 * running (left as is), -1 on failure (*why says why: bad config, thread creation, a previous
 * thread that did not stop in time is still finishing). */
int mw_export_start(const mw_export_config_t *cfg, const char **why);

/* Asks for an export now and waits until it is done or timeout_s passed. Returns 0 when the
 * export that started after the call has finished, -1 on timeout or when not running. */
int mw_export_flush(double timeout_s);

/* Final export, then joins the thread. Returns 0 when joined within timeout_s; otherwise
 * detaches it (it finishes its export on its own) and returns -1 (also -1 when another
 * start/stop kept the lifecycle lock past the deadline). No-op (0) when stopped. */
int mw_export_stop(double timeout_s);

int mw_export_running(void);
void mw_export_get_stats(mw_export_stats_t *out);

/* Gzipped pprof of everything since start (cumulative buffer + the window not yet rotated),
 * window = [mw_collect_start_ns(), now]; a profile without samples when nothing was collected.
 * The buffers are copied under mw_collect's locks (a copy costs about a merge), then encoded
 * with no lock held. Returns 0 with *out malloc'd (caller frees), -1 on allocation failure. */
int mw_export_encode_snapshot(uint8_t **out, size_t *len);

/* Adds n synthetic distinct stacks (depth frames each, thread "synthetic") to the sampler's
 * active buffer, under its lock. For tests and benchmarks only. Returns the number added. */
uint32_t mw_export_debug_fill_active(uint32_t n, uint32_t depth);

/* Registers the fork handlers. Call once, after mw_collect_register_atfork (module init). */
void mw_export_register_atfork(void);

#endif
