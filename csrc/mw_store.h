/* mw_store — the local profile store: a directory of gzipped pprof files.
 *
 * Files are named  <service>-<pid>-<window start, unix ms>.pb.gz  (service sanitized to
 * [A-Za-z0-9._-], see mw_store_sanitize_service). Each file is written atomically: the bytes go
 * to a hidden temporary file ".<name>.tmp" in the same directory, which is then renamed into
 * place, so a reader (the CLI, `serve`'s importer) never sees a partial file. No fsync: the
 * store is a cache for humans, not a journal (a power cut may lose the last files).
 *
 * Bound: after each write, the files of the directory matching the pattern above (any service,
 * any pid — gunicorn workers share the directory) are summed; while the sum exceeds max_bytes
 * the oldest (by the window start in the name, then by name) are unlinked and counted. The
 * file just written is never removed, even if it alone exceeds the bound. Hidden temporary
 * files left by a crashed writer are removed once they are older than MW_STORE_STALE_TMP_S.
 * Other files in the directory are never touched nor counted.
 *
 * Threads: the exporter thread (one writer per process); several processes may share a
 * directory (unlinks racing with another process are harmless: ENOENT is not an error). No
 * locks, no Python, not async-signal-safe.
 */
#ifndef MW_STORE_H
#define MW_STORE_H

#include <stddef.h>
#include <stdint.h>

#define MW_STORE_DEFAULT_MAX_BYTES (256ull << 20) /* 256 MiB */
#define MW_STORE_STALE_TMP_S 600
#define MW_STORE_SERVICE_MAX 128

typedef struct mw_store_result {
    uint64_t bytes_written; /* size of the file written (0 on failure) */
    uint32_t files_evicted; /* files removed by the bound */
    uint64_t bytes_evicted;
    uint64_t dir_bytes; /* bytes of pattern files left in the directory */
    uint32_t dir_files; /* number of pattern files left */
    int err;            /* errno of the first failure, 0 if none */
    const char *failed; /* which step failed: "open", "write", "rename", "scan"; NULL if none */
    char path[4096];    /* the file written ("" on failure) */
} mw_store_result_t;

/* Writes data[0..len) as <dir>/<service>-<pid>-<start_ms>.pb.gz, creating dir (and parents)
 * if missing, then applies the bound (max_bytes == 0 means MW_STORE_DEFAULT_MAX_BYTES). If the
 * name is taken (two windows starting in the same millisecond), start_ms is increased until it
 * is free. `service` must already be sanitized. Returns 0 when the file was written (eviction
 * problems are reported in res but do not fail the write), -1 otherwise (res->err, res->failed
 * say why; the temporary file is removed). */
int mw_store_write(const char *dir, const char *service, long pid, int64_t start_ms,
                   const void *data, size_t len, uint64_t max_bytes, mw_store_result_t *res);

/* Applies the bound alone (keep_name: a file never to remove, may be NULL). Returns 0, or -1
 * when the directory cannot be read. Fills the eviction fields of res. */
int mw_store_evict(const char *dir, uint64_t max_bytes, const char *keep_name,
                   mw_store_result_t *res);

/* 1 if name is a store file name (<service>-<pid>-<ms>.pb.gz); *start_ms gets the window start
 * (may be NULL). Pure function. */
int mw_store_parse_name(const char *name, int64_t *start_ms);

/* Copies service into out (cap bytes, cap >= 2) keeping [A-Za-z0-9._-], replacing any other
 * byte (and a leading '.', which would hide the file) with '_', truncated to
 * MW_STORE_SERVICE_MAX bytes; empty input gives "python". Pure function. */
void mw_store_sanitize_service(const char *service, char *out, size_t cap);

#endif
