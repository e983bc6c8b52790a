/* mw_pprof — one mw_profbuf (plus the window's metadata) → pprof protobuf bytes → gzip.
 *
 * What we write (docs/interfaces.md, "pprof we write"), by meta.kind:
 *   MW_PPROF_CPU (the sampler's windows):
 *   sample_type          [samples/count, cpu/nanoseconds, wall/nanoseconds]
 *                        = (cpu_samples, cpu_ns, wall_ns) of each stack
 *   default_sample_type  "cpu";  period_type cpu/nanoseconds;  period = meta.period_ns
 *   MW_PPROF_BLOCK (lock waits, mw_blockprof):
 *   sample_type          [contentions/count, delay/nanoseconds] = (wall_samples, wall_ns)
 *   default_sample_type  "delay";  period_type contentions/count;  period = meta.period_ns
 *   MW_PPROF_MEMORY (allocations and live set, mw_memprof):
 *   sample_type          [alloc_objects/count, alloc_space/bytes, inuse_objects/count,
 *                        inuse_space/bytes] = (cpu_samples, cpu_ns, wall_samples, wall_ns)
 *   default_sample_type  "inuse_space";  period_type space/bytes;  period = meta.period_ns (the
 *                        mean bytes between samples)
 *   (the other fields are the same for every kind)
 *   comment              meta.comments, in order (the exporter's request counts, see
 *                        mw_export.h)
 *   time_nanos           window start (unix ns);  duration_nanos = window length
 *   string_table[0]      "" (every string is stored once; invalid UTF-8 is repaired with '?')
 *   function             one per (name, file), ids 1..n, start_line = the code's first line
 *   function.system_name "" (pprof would "demangle" "<module>" into "" otherwise)
 *   location             one per (function, line), ids 1..n, exactly one Line each, all in
 *                        mapping 1, a pseudo mapping "[python]" marked fully symbolized (so
 *                        pprof tools look for no binary)
 *   sample               one per buffer stack; location_id[0] is the leaf (buffers keep stacks
 *                        leaf first); string labels: thread_name, pid (meta.pid) and every pair
 *                        of the stack's label set whose key is a valid label name (see
 *                        mw_pprof_label_key_ok); pairs with an invalid or repeated key, or
 *                        with the reserved keys thread_name / pid, are skipped and counted.
 *
 * Memory: every array is sized from the buffer's counts and allocated once per call (malloc),
 * then freed before returning; nothing grows per sample. The result is malloc'd and owned by
 * the caller (free()).
 *
 * Threads: any thread that owns the buffer for the duration of the call (the exporter, with
 * the buffer it got from mw_collect_rotate, or a private copy). No lock is taken, no Python
 * is touched. Not async-signal-safe (malloc, zlib).
 */
#ifndef MW_PPROF_H
#define MW_PPROF_H

#include "mw_profbuf.h"

#include <stddef.h>
#include <stdint.h>

/* zlib level for the gzip member. Measured on a 10,000-stack profile (713 KiB of protobuf):
 * level 6 (zlib's default) 124 KiB in ~13.7 ms CPU, level 4 126 KiB in ~5.8 ms, level 1 152 KiB
 * in ~4.0 ms. Level 4 keeps level 6's size (lazy matching) at less than half its CPU. */
#define MW_PPROF_GZIP_LEVEL 4

/* At most this many static labels per profile (more are ignored). */
#define MW_PPROF_MAX_STATIC 8

/* At most this many comments per profile (more are ignored). */
#define MW_PPROF_MAX_COMMENTS 256

/* Which values of the buffer's stacks a profile carries (mw_pprof_meta_t.kind). */
#define MW_PPROF_CPU 0
#define MW_PPROF_BLOCK 1
#define MW_PPROF_MEMORY 2

typedef struct mw_pprof_meta {
    int64_t time_nanos;     /* window start, ns since the Unix epoch */
    int64_t duration_nanos; /* window length in ns (negative values are written as 0) */
    int64_t period_ns;      /* 1e9 / sampling rate; <= 0 means 1e9 / 100 */
    long pid;               /* value of the "pid" label; <= 0: no pid label */
    /* Labels every sample carries besides thread_name and pid (the process's code version):
     * nstatic pairs, keys valid label names (mw_pprof_label_key_ok), neither thread_name nor
     * pid, no key twice. A label set's pair with one of these keys is left out (counted in
     * labels_skipped). Borrowed for the duration of the call. */
    const char *const *static_keys, *const *static_vals;
    uint32_t nstatic;
    int kind; /* MW_PPROF_CPU (0), MW_PPROF_BLOCK or MW_PPROF_MEMORY */
    /* The profile's comments (pprof's Profile.comment, in this order): ncomments strings, at most
     * MW_PPROF_MAX_COMMENTS (more are ignored); borrowed for the duration of the call. */
    const char *const *comments;
    uint32_t ncomments;
} mw_pprof_meta_t;

typedef struct mw_pprof_info {
    uint32_t samples, locations, functions, strings;
    uint32_t labels_skipped;   /* label-set pairs left out (invalid/repeated/reserved key) */
    uint32_t strings_repaired; /* strings that were not valid UTF-8 */
    size_t raw_bytes;          /* size of the protobuf before gzip */
} mw_pprof_info_t;

/* Encodes b as a plain (uncompressed) pprof Profile. On success returns 0 and stores a malloc'd
 * buffer in *out (caller frees) and its size in *len; info (may be NULL) gets the counts.
 * Returns -1 on allocation failure (nothing to free). */
int mw_pprof_encode(const mw_profbuf_t *b, const mw_pprof_meta_t *meta, uint8_t **out, size_t *len,
                    mw_pprof_info_t *info);

/* Compresses in[0..n) into one gzip member (zlib deflateInit2(..., 15 + 16, ...)) at the given
 * level (0..9, or -1 for zlib's default). Returns 0 with *out malloc'd (caller frees), or -1
 * (allocation or zlib failure, or n >= 4 GiB). */
int mw_pprof_gzip(const uint8_t *in, size_t n, int level, uint8_t **out, size_t *len);

/* mw_pprof_encode followed by mw_pprof_gzip(MW_PPROF_GZIP_LEVEL). Same contract. */
int mw_pprof_encode_gz(const mw_profbuf_t *b, const mw_pprof_meta_t *meta, uint8_t **out,
                       size_t *len, mw_pprof_info_t *info);

/* 1 if key is an acceptable label name (docs/protocol.md, "Label names"): [a-zA-Z_][a-zA-Z0-9_]*,
 * not starting with "__" -- the form and prefix of middleware.labels.label_name_problem, the
 * project's one rule, which also bounds the length (the Python side drops longer names before
 * they get here). Pure function, any thread, async-signal-safe. */
int mw_pprof_label_key_ok(const char *key);

#endif
