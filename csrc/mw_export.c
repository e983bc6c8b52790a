/* mw_export — the exporter thread; see mw_export.h for the contract.
 *
 * Requests and completion are two counters under g_lock: a flush increments g_req and waits
 * until g_served reaches its number; the thread, when it wakes, reads g_req, exports, and
 * publishes that value as g_served. A request that arrives during an export is therefore
 * served by the next one, whose window includes the moment of the request.
 *
 * The comments of each CPU profile (request counts, span traces) are built by
 * mw_export_comments.c.
 */
#define _GNU_SOURCE
#include "mw_export.h"

#include "mw_backlog.h"
#include "mw_blockprof.h"
#include "mw_memprof.h"
#include "mw_collect.h"
#include "mw_export_comments.h"
#include "mw_labels.h"
#include "mw_ownthread.h"
#include "mw_pprof.h"
#include "mw_report.h"
#include "mw_sampler.h"
#include "mw_store.h"
#include "mw_upload.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t g_life = PTHREAD_MUTEX_INITIALIZER; /* serializes start / stop */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* control state + stats */
static pthread_mutex_t g_hold = PTHREAD_MUTEX_INITIALIZER; /* g_held, g_orphan */
static pthread_cond_t g_wake; /* the thread waits on it (CLOCK_MONOTONIC) */
static pthread_cond_t g_done; /* flush / stop wait on it (CLOCK_MONOTONIC) */
static int g_conds_ready;
static pthread_t g_thread;

/* Guarded by g_lock. */
static int g_started;    /* started and not yet stopped */
static int g_exited = 1; /* the last thread started has returned */
static int g_stop;
static uint64_t g_req, g_served;
static mw_export_stats_t g_stats;

/* Written by start (under g_life) while no thread runs; read by the thread. */
static struct {
    int64_t interval_ns;
    char *dir;
    char service[MW_STORE_SERVICE_MAX + 1];
    uint64_t max_bytes;
    int upload;
    /* Static labels: replaced by start under g_static as well, which encode_snapshot holds
     * while it encodes (it may run while no exporter thread does, from any thread). */
    char *keys[MW_PPROF_MAX_STATIC], *vals[MW_PPROF_MAX_STATIC];
    uint32_t nlabels;
} g_cfg;
static pthread_mutex_t g_static = PTHREAD_MUTEX_INITIALIZER;

/* The profile metadata of a window: its span, the sampling period, our pid, the static labels. */
static mw_pprof_meta_t window_meta(int64_t start, int64_t end) {
    int rate = mw_sampler_rate();
    mw_pprof_meta_t meta = {start,
                            end - start,
                            1000000000LL / (rate > 0 ? rate : 100),
                            (long)getpid(),
                            (const char *const *)g_cfg.keys,
                            (const char *const *)g_cfg.vals,
                            g_cfg.nlabels,
                            MW_PPROF_CPU};
    return meta;
}

/* Replaces the static labels (g_life held, no exporter thread running). -1: out of memory. */
static int set_static_labels(const mw_export_config_t *cfg) {
    char *keys[MW_PPROF_MAX_STATIC] = {0}, *vals[MW_PPROF_MAX_STATIC] = {0};
    uint32_t n = cfg->nlabels < MW_PPROF_MAX_STATIC ? cfg->nlabels : MW_PPROF_MAX_STATIC;
    for (uint32_t i = 0; i < n; i++) {
        keys[i] = strdup(cfg->label_keys[i]);
        vals[i] = strdup(cfg->label_vals[i]);
        if (!keys[i] || !vals[i]) {
            for (uint32_t j = 0; j <= i; j++) {
                free(keys[j]);
                free(vals[j]);
            }
            return -1;
        }
    }
    pthread_mutex_lock(&g_static);
    for (uint32_t i = 0; i < g_cfg.nlabels; i++) {
        free(g_cfg.keys[i]);
        free(g_cfg.vals[i]);
    }
    memcpy(g_cfg.keys, keys, sizeof keys);
    memcpy(g_cfg.vals, vals, sizeof vals);
    g_cfg.nlabels = n;
    pthread_mutex_unlock(&g_static);
    return 0;
}

/* Guarded by g_hold. */
static mw_profbuf_t *g_held; /* window buffer owned by the exporter right now */
/* Start of the first window since the last one written that had no stack (exporter thread):
 * a window with nothing in it writes no file, and the next file covers it, so the files of a
 * process tile its time without holes. 0: none. */
static int64_t g_empty_since;
static mw_profbuf_t *g_orphan; /* in a fork child: the buffer the parent's exporter held */

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec ns_to_ts(int64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    return ts;
}

static int64_t deadline_after(double s) {
    if (!(s > 0)) s = 0; /* also NaN */
    if (s > 1e6) s = 1e6;
    return mw_now_monotonic_ns() + (int64_t)(s * 1e9);
}

static void init_conds(void) {
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g_wake, &ca);
    pthread_cond_init(&g_done, &ca);
    pthread_condattr_destroy(&ca);
    g_conds_ready = 1;
}

static void max_into(uint64_t *m, uint64_t v) {
    if (v > *m) *m = v;
}

/* What the user sees of a window that was dropped: one stderr line per kind of failure and
 * process (mw_report), the counters in stats() say how often. Paths are cut at 200 bytes so
 * the line always ends with what happens to the profiles. */
static void report_store_failure(const char *dir, const mw_store_result_t *res) {
    char eb[128];
    const char *why = res->err ? strerror_r(res->err, eb, sizeof eb) : "unknown error";
    const char *step = !res->failed                         ? "writing a file"
                       : strcmp(res->failed, "open") == 0   ? "creating a file"
                       : strcmp(res->failed, "rename") == 0 ? "renaming a file"
                                                            : "writing a file";
    if (res->err == EMFILE || res->err == ENFILE)
        mw_report_once(MW_REPORT_STORE_NO_FD,
                       "cannot create a file in the profile directory %.200s (%s: the %s has as "
                       "many files open as it may); profiles of process %ld wait in memory until "
                       "one can be created (the last %u MiB; what still waits when the process "
                       "ends is lost)",
                       dir, why, res->err == EMFILE ? "process" : "system", (long)getpid(),
                       MW_BACKLOG_MAX_BYTES >> 20);
    else if (mw_backlog_waits_for(res->err))
        mw_report_once(MW_REPORT_STORE_FULL,
                       "the profile directory %.200s is full (%s: %s); profiles of process %ld "
                       "wait in memory until there is room (the last %u MiB; what still waits "
                       "when the process ends is lost) (MW_PROFILE_DIR, MW_PROFILE_DIR_MAX_MB)",
                       dir, step, why, (long)getpid(), MW_BACKLOG_MAX_BYTES >> 20);
    else
        mw_report_once(MW_REPORT_STORE_WRITE,
                       "cannot write to the profile directory %.200s (%s: %s); profiles of process "
                       "%ld are being dropped (set MW_PROFILE_DIR to a writable directory, or to "
                       "none)",
                       dir, step, why, (long)getpid());
}

/* What delivering one encoded profile did (deliver / account). */
typedef struct {
    int encode_err, store_err, upload_err, submitted;
    mw_store_result_t res;
    mw_backlog_result_t late; /* the waiting profiles written first (store) */
} delivery_t;

/* Writes a profile to the store: first the profiles waiting for room (mw_backlog), oldest first;
 * when they cannot all be written, or this one meets a full store, it waits too (any other
 * failure drops it). Exporter thread. */
static void store(int64_t start_ms, const uint8_t *gz, size_t len, delivery_t *d) {
    long pid = (long)getpid();
    if (mw_backlog_write(g_cfg.dir, g_cfg.service, pid, g_cfg.max_bytes, &d->late) > 0)
        d->res = d->late.failure; /* the older ones wait: this one cannot go before them */
    else if (mw_store_write(g_cfg.dir, g_cfg.service, pid, start_ms, gz, len, g_cfg.max_bytes,
                            &d->res) == 0)
        return;
    d->store_err = 1;
    if (mw_backlog_waits_for(d->res.err)) mw_backlog_keep(start_ms, gz, len);
    report_store_failure(g_cfg.dir, &d->res);
}

/* Encodes b (window [ts, te], kind of meta) and hands it to the store and/or the uploader under
 * the series name `name`. Exporter thread, no lock held. */
static void deliver(const mw_profbuf_t *b, const mw_pprof_meta_t *meta, int64_t ts, int64_t te,
                    const char *name, delivery_t *d, mw_pprof_info_t *info, size_t *gzlen) {
    memset(d, 0, sizeof *d);
    uint8_t *gz = NULL;
    *gzlen = 0;
    if (mw_pprof_encode_gz(b, meta, &gz, gzlen, info) != 0) {
        d->encode_err = 1;
        mw_report_once(MW_REPORT_ENCODE,
                       "a profile window could not be encoded (out of memory or a zlib "
                       "error); profiles of process %ld are being dropped",
                       (long)getpid());
        return;
    }
    if (g_cfg.dir) store(ts / 1000000, gz, *gzlen, d);
    if (g_cfg.upload) {
        int64_t from = ts / 1000000000LL, until = (te + 999999999LL) / 1000000000LL;
        if (until <= from) until = from + 1;
        /* the uploader is middleware._upload, reached through its registered table */
        if (mw_upload_submit_registered(gz, *gzlen, from, until, name) == 0)
            d->submitted = 1;
        else
            d->upload_err = 1;
    }
    free(gz);
}

/* Adds a delivery's outcome to the statistics (g_lock held). */
static void account(mw_export_stats_t *s, const delivery_t *d) {
    s->encode_errors += (uint64_t)d->encode_err;
    s->store_errors += (uint64_t)d->store_err;
    s->upload_errors += (uint64_t)d->upload_err;
    s->uploads_submitted += (uint64_t)d->submitted;
    if (d->store_err) s->last_errno = d->res.err;
    if (d->res.bytes_written) {
        s->bytes_written += d->res.bytes_written;
        s->files_written++;
        s->store_dir_bytes = d->res.dir_bytes;
    }
    s->files_evicted += d->res.files_evicted + d->late.files_evicted;
    s->bytes_evicted += d->res.bytes_evicted + d->late.bytes_evicted;
    if (d->late.files_written) {
        s->bytes_written += d->late.bytes_written;
        s->files_written += d->late.files_written;
        if (!d->res.bytes_written) s->store_dir_bytes = d->late.dir_bytes;
    }
}

/* The lock waits of the window [ts, te] (mw_blockprof), written and submitted like the CPU
 * profile, as a profile of kind MW_PPROF_BLOCK ("block"). Exporter thread; nothing is done when
 * lock profiling never started or the window has no wait. */
static void export_block(int64_t ts, int64_t te) {
    mw_profbuf_t *b = mw_blockprof_rotate();
    if (!b) return;
    uint32_t nstacks = mw_profbuf_nstacks(b);
    delivery_t d;
    if (nstacks > 0) {
        mw_pprof_meta_t meta = window_meta(ts, te);
        meta.kind = MW_PPROF_BLOCK;
        meta.period_ns = 1;
        size_t gzlen;
        deliver(b, &meta, ts, te, "block", &d, NULL, &gzlen);
    }
    mw_blockprof_recycle(b);
    if (nstacks == 0) return;
    pthread_mutex_lock(&g_lock);
    g_stats.block_exports += (uint64_t) !(d.encode_err || d.store_err || d.upload_err);
    g_stats.block_stacks += nstacks;
    account(&g_stats, &d);
    pthread_mutex_unlock(&g_lock);
}

/* The memory profile of the window [ts, te] (mw_memprof: allocations of the window, sampled
 * live set at its end), as a profile of kind MW_PPROF_MEMORY ("memory"). Exporter thread;
 * nothing is done when memory profiling never started or nothing was sampled. */
static void export_memory(int64_t ts, int64_t te) {
    mw_profbuf_t *b = mw_memprof_take();
    if (!b) return;
    uint32_t nstacks = mw_profbuf_nstacks(b);
    mw_pprof_meta_t meta = window_meta(ts, te);
    meta.kind = MW_PPROF_MEMORY;
    meta.period_ns = (int64_t)mw_memprof_rate();
    size_t gzlen;
    delivery_t d;
    deliver(b, &meta, ts, te, "memory", &d, NULL, &gzlen);
    mw_memprof_give_back(b);
    pthread_mutex_lock(&g_lock);
    g_stats.memory_exports += (uint64_t) !(d.encode_err || d.store_err || d.upload_err);
    g_stats.memory_stacks += nstacks;
    account(&g_stats, &d);
    pthread_mutex_unlock(&g_lock);
}

/* One window: rotate, encode, deliver, recycle. Runs on the exporter thread, no lock held
 * except g_hold around rotate and recycle. */
static void export_once(void) {
    int64_t c0 = thread_cpu_ns(), w0 = mw_now_monotonic_ns();
    int64_t ts = 0, te = 0;
    pthread_mutex_lock(&g_hold);
    mw_profbuf_t *b = mw_collect_rotate(&ts, &te);
    g_held = b;
    pthread_mutex_unlock(&g_hold);
    if (!b) {
        pthread_mutex_lock(&g_lock);
        g_stats.rotate_failures++;
        pthread_mutex_unlock(&g_lock);
        return;
    }

    uint32_t nstacks = mw_profbuf_nstacks(b);
    if (g_empty_since && g_empty_since < ts) ts = g_empty_since;
    g_empty_since = nstacks ? 0 : ts;
    mw_pprof_info_t info;
    memset(&info, 0, sizeof info);
    delivery_t d;
    memset(&d, 0, sizeof d);
    size_t gzlen = 0;
    uint64_t requests = 0; /* the requests counted in the window's comments */
    if (nstacks > 0) {
        mw_pprof_meta_t meta = window_meta(ts, te);
        mw_export_comments_t req;
        /* the static labels: only start replaces them, while no exporter thread runs */
        mw_export_comments_take_requests(&req, (const char *const *)g_cfg.keys,
                                         (const char *const *)g_cfg.vals, g_cfg.nlabels);
        mw_export_comments_add_spans(b, &req);
        meta.ncomments = req.n;
        meta.comments = req.ptrs;
        deliver(b, &meta, ts, te, "process_cpu", &d, &info, &gzlen);
        requests = req.requests;
        mw_export_comments_free(&req);
    }

    pthread_mutex_lock(&g_hold);
    mw_collect_recycle(b);
    g_held = NULL;
    pthread_mutex_unlock(&g_hold);
    mw_labels_window_done(); /* span sets released two windows ago are no longer in any buffer */
    export_block(ts, te);
    export_memory(ts, te);

    uint64_t cpu = (uint64_t)(thread_cpu_ns() - c0), wall = (uint64_t)(mw_now_monotonic_ns() - w0);
    pthread_mutex_lock(&g_lock);
    mw_export_stats_t *s = &g_stats;
    s->last_stacks = nstacks;
    s->last_window_start_ns = ts;
    s->last_window_end_ns = te;
    if (nstacks == 0) {
        s->empty_windows++;
    } else {
        if (d.encode_err || d.store_err || d.upload_err)
            s->export_errors++;
        else
            s->exports++;
        account(s, &d);
        s->requests += requests;
        s->labels_skipped += info.labels_skipped;
        s->last_locations = info.locations;
        s->last_functions = info.functions;
        s->last_raw_bytes = info.raw_bytes;
        s->last_gz_bytes = d.encode_err ? 0 : gzlen;
    }
    s->last_export_cpu_ns = cpu;
    max_into(&s->max_export_cpu_ns, cpu);
    s->total_export_cpu_ns += cpu;
    s->last_export_wall_ns = wall;
    max_into(&s->max_export_wall_ns, wall);
    pthread_mutex_unlock(&g_lock);
}

static void *export_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&g_lock);
    int64_t next = mw_now_monotonic_ns() + g_cfg.interval_ns;
    for (;;) {
        while (!g_stop && g_req == g_served && mw_now_monotonic_ns() < next) {
            struct timespec dl = ns_to_ts(next);
            pthread_cond_timedwait(&g_wake, &g_lock, &dl);
        }
        uint64_t req = g_req;
        int stop = g_stop;
        int64_t began = mw_now_monotonic_ns();
        pthread_mutex_unlock(&g_lock);

        export_once();

        pthread_mutex_lock(&g_lock);
        if (req != g_served) g_stats.flushes++;
        g_served = req;
        pthread_cond_broadcast(&g_done);
        if (stop) break;
        next = began + g_cfg.interval_ns;
    }
    g_exited = 1;
    mw_labels_spans_enable(0);
    pthread_cond_broadcast(&g_done);
    pthread_mutex_unlock(&g_lock);
    return NULL;
}

int mw_export_start(const mw_export_config_t *cfg, const char **why) {
    if (!(cfg->interval_s >= MW_EXPORT_MIN_INTERVAL_S) || !isfinite(cfg->interval_s)) {
        *why = "interval_s must be a finite number >= 0.01";
        return -1;
    }
    pthread_mutex_lock(&g_life);
    pthread_mutex_lock(&g_lock);
    int running = g_started, finishing = !g_exited;
    pthread_mutex_unlock(&g_lock);
    if (running || finishing) {
        pthread_mutex_unlock(&g_life);
        if (running) return 1;
        *why = "the previous exporter thread has not finished its last export yet";
        return -1;
    }

    /* After fork: give back the buffer the parent's exporter held, so rotation works. */
    pthread_mutex_lock(&g_hold);
    int recovered = g_orphan != NULL;
    if (g_orphan) mw_collect_recycle(g_orphan);
    g_orphan = NULL;
    pthread_mutex_unlock(&g_hold);
    if (recovered) {
        pthread_mutex_lock(&g_lock);
        g_stats.fork_buffers_recovered++;
        pthread_mutex_unlock(&g_lock);
    }
    /* Requests counted while no exporter ran belong to no window of ours. */
    uint32_t ids[64];
    uint64_t counts[64];
    while (mw_labels_take_requests(ids, counts, 64) == 64) {
    }

    char *dir = NULL;
    if (cfg->profile_dir && cfg->profile_dir[0] && !(dir = strdup(cfg->profile_dir))) {
        pthread_mutex_unlock(&g_life);
        *why = "out of memory";
        return -1;
    }
    if (set_static_labels(cfg) != 0) {
        free(dir);
        pthread_mutex_unlock(&g_life);
        *why = "out of memory";
        return -1;
    }
    free(g_cfg.dir);
    g_cfg.dir = dir;
    g_cfg.interval_ns = (int64_t)(cfg->interval_s * 1e9);
    mw_store_sanitize_service(cfg->service, g_cfg.service, sizeof g_cfg.service);
    g_cfg.max_bytes = cfg->store_max_bytes ? cfg->store_max_bytes : MW_STORE_DEFAULT_MAX_BYTES;
    g_cfg.upload = cfg->upload;
    if (!g_conds_ready) init_conds();

    pthread_mutex_lock(&g_lock);
    g_stop = 0;
    g_req = g_served = 0;
    g_exited = 0;
    pthread_mutex_unlock(&g_lock);
    g_empty_since = 0; /* no exporter thread runs yet */

    int rc = mw_ownthread_create(&g_thread, "mw-export", export_main, NULL);

    pthread_mutex_lock(&g_lock);
    if (rc != 0)
        g_exited = 1;
    else
        g_started = 1;
    pthread_mutex_unlock(&g_lock);
    mw_labels_spans_enable(rc == 0); /* span sets only while windows are exported */
    pthread_mutex_unlock(&g_life);
    if (rc != 0) {
        *why = strerror(rc);
        return -1;
    }
    return 0;
}

int mw_export_flush(double timeout_s) {
    int64_t dl = deadline_after(timeout_s);
    pthread_mutex_lock(&g_lock);
    if (!g_started || g_stop || g_exited) {
        pthread_mutex_unlock(&g_lock);
        return -1;
    }
    uint64_t mine = ++g_req;
    pthread_cond_signal(&g_wake);
    struct timespec ts = ns_to_ts(dl);
    while (g_served < mine && !g_exited)
        if (pthread_cond_timedwait(&g_done, &g_lock, &ts) == ETIMEDOUT) break;
    int ok = g_served >= mine;
    pthread_mutex_unlock(&g_lock);
    return ok ? 0 : -1;
}

int mw_export_stop(double timeout_s) {
    int64_t dl = deadline_after(timeout_s);
    /* Another start/stop in progress: wait for it, but not past our own deadline. */
    struct timespec life_dl = ns_to_ts(dl + 1000000LL);
    if (pthread_mutex_clocklock(&g_life, CLOCK_MONOTONIC, &life_dl) != 0) return -1;
    pthread_mutex_lock(&g_lock);
    if (!g_started) {
        pthread_mutex_unlock(&g_lock);
        pthread_mutex_unlock(&g_life);
        return 0;
    }
    g_stop = 1; /* the thread does one last export, then returns */
    pthread_cond_signal(&g_wake);
    struct timespec ts = ns_to_ts(dl);
    while (!g_exited)
        if (pthread_cond_timedwait(&g_done, &g_lock, &ts) == ETIMEDOUT) break;
    int exited = g_exited;
    g_started = 0;
    pthread_mutex_unlock(&g_lock);
    if (exited)
        pthread_join(g_thread, NULL);
    else
        pthread_detach(g_thread); /* finishes on its own; start refuses until it has */
    pthread_mutex_unlock(&g_life);
    return exited ? 0 : -1;
}

int mw_export_running(void) {
    pthread_mutex_lock(&g_lock);
    int r = g_started && !g_exited;
    pthread_mutex_unlock(&g_lock);
    return r;
}

void mw_export_get_stats(mw_export_stats_t *out) {
    pthread_mutex_lock(&g_lock);
    *out = g_stats;
    out->running = (uint64_t)(g_started && !g_exited);
    pthread_mutex_unlock(&g_lock);
    mw_backlog_stats_t b;
    mw_backlog_stats(&b);
    out->store_waiting = b.waiting;
    out->store_waiting_bytes = b.waiting_bytes;
    out->store_kept = b.kept;
    out->store_written_late = b.written;
    out->store_dropped = b.dropped;
}

/* ---- snapshot ------------------------------------------------------------------------------ */

typedef struct {
    mw_profbuf_t *copy[2];
    int n;
    int failed;
} snap_ctx_t;

/* A buffer with exactly the room needed for the counts given (plus one of each). */
static mw_profbuf_t *buffer_for(uint64_t stacks, uint64_t frames, uint64_t strings, uint64_t bytes,
                                uint64_t slots) {
    mw_profbuf_limits_t lim = {(uint32_t)stacks + 1, (uint32_t)frames + 1, (uint32_t)strings + 1,
                               (uint32_t)bytes + 1, (uint32_t)slots + 1};
    return mw_profbuf_new(&lim);
}

/* Called with the collect lock (and, for the active buffer, the sampler's buffer lock) held:
 * copy only, encode later. */
static void snap_copy(const mw_profbuf_t *b, void *arg) {
    snap_ctx_t *ctx = arg;
    mw_profbuf_counts_t c;
    mw_profbuf_counts(b, &c);
    if (ctx->failed || c.stacks == 0 || ctx->n >= 2) return;
    mw_profbuf_t *cp =
        buffer_for(c.stacks, c.frames, c.strings, c.string_bytes_used, c.frame_slots_used);
    if (!cp || mw_profbuf_merge(cp, b) != 0) {
        mw_profbuf_free(cp);
        ctx->failed = 1;
        return;
    }
    ctx->copy[ctx->n++] = cp;
}

int mw_export_encode_snapshot(uint8_t **out, size_t *len) {
    snap_ctx_t ctx;
    memset(&ctx, 0, sizeof ctx);
    int64_t start = mw_collect_start_ns();
    mw_collect_visit(snap_copy, &ctx);
    int64_t end = mw_now_realtime_ns();
    if (start <= 0) start = end;
    mw_profbuf_t *all = NULL;
    int rc = -1;
    if (ctx.failed) goto done;
    if (ctx.n == 1) {
        all = ctx.copy[0];
        ctx.copy[0] = NULL;
    } else {
        mw_profbuf_counts_t c[2];
        memset(c, 0, sizeof c);
        for (int i = 0; i < ctx.n; i++)
            mw_profbuf_counts(ctx.copy[i], &c[i]);
        all = buffer_for((uint64_t)c[0].stacks + c[1].stacks, (uint64_t)c[0].frames + c[1].frames,
                         (uint64_t)c[0].strings + c[1].strings,
                         (uint64_t)c[0].string_bytes_used + c[1].string_bytes_used,
                         (uint64_t)c[0].frame_slots_used + c[1].frame_slots_used);
        if (!all) goto done;
        for (int i = 0; i < ctx.n; i++)
            if (mw_profbuf_merge(all, ctx.copy[i]) != 0) goto done;
    }
    pthread_mutex_lock(&g_static);
    mw_pprof_meta_t meta = window_meta(start, end);
    rc = mw_pprof_encode_gz(all, &meta, out, len, NULL);
    pthread_mutex_unlock(&g_static);
done:
    mw_profbuf_free(all);
    for (int i = 0; i < 2; i++)
        mw_profbuf_free(ctx.copy[i]);
    return rc;
}

/* ---- synthetic stacks (tests, benchmarks) ------------------------------------------------ */

typedef struct {
    uint32_t n, depth, added;
} fill_ctx_t;

static mw_id_t fill_frame(mw_profbuf_t *b, const char *name, mw_id_t file, int line) {
    mw_id_t nid = mw_profbuf_intern_str(b, name, strlen(name));
    mw_frame_t f = {nid, file, line, 1};
    return nid ? mw_profbuf_intern_frame(b, &f) : 0;
}

/* Runs under the sampler's buffer lock: the sampler does not write the buffer meanwhile, and
 * only adds ids, so its cached ids stay valid. */
static void fill_active(const mw_profbuf_t *cb, void *arg) {
    fill_ctx_t *ctx = arg;
    mw_profbuf_t *b = (mw_profbuf_t *)cb;
    mw_id_t ids[64], thread = mw_profbuf_intern_str(b, "synthetic", 9),
                     file = mw_profbuf_intern_str(b, "synthetic.py", 12);
    char name[48];
    if (!thread || !file) return;
    for (uint32_t i = 0; i < ctx->n; i++) {
        uint32_t d = 0;
        /* leaf: 1000 functions x many lines, so every stack is distinct */
        snprintf(name, sizeof name, "leaf_%u", i % 1000);
        ids[d++] = fill_frame(b, name, file, (int)(i / 1000) + 1);
        for (uint32_t k = 1; k + 1 < ctx->depth; k++) {
            snprintf(name, sizeof name, "level%u_%u", k, (i / (k + 1)) % 32);
            ids[d++] = fill_frame(b, name, file, (int)k + 10);
        }
        if (ctx->depth > 1) ids[d++] = fill_frame(b, "main", file, 5);
        int ok = 1;
        for (uint32_t k = 0; k < d; k++)
            ok &= ids[k] != 0;
        mw_values_t v = {1, 10000000, 1, 10000000};
        if (ok && mw_profbuf_add(b, ids, d, thread, 0, &v) == 0) ctx->added++;
    }
}

uint32_t mw_export_debug_fill_active(uint32_t n, uint32_t depth) {
    fill_ctx_t ctx = {n, depth < 1 ? 1 : depth > 64 ? 64 : depth, 0};
    mw_sampler_with_active(fill_active, &ctx);
    return ctx.added;
}

/* ---- fork --------------------------------------------------------------------------------- */

static void atfork_prepare(void) {
    pthread_mutex_lock(&g_hold);
    pthread_mutex_lock(&g_lock);
    mw_backlog_atfork_prepare();
}

static void atfork_parent(void) {
    mw_backlog_atfork_parent();
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_unlock(&g_hold);
}

static void atfork_child(void) {
    pthread_mutex_init(&g_static, NULL); /* a snapshot being encoded in another thread is gone */
    pthread_mutex_init(&g_life, NULL);
    pthread_mutex_init(&g_lock, NULL);
    pthread_mutex_init(&g_hold, NULL);
    if (g_conds_ready) init_conds();
    if (g_held) g_orphan = g_held;
    g_held = NULL;
    g_started = 0;
    g_exited = 1;
    mw_labels_spans_enable(0); /* until the child's exporter starts */
    g_stop = 0;
    g_req = g_served = 0;
    g_empty_since = 0;
    memset(&g_stats, 0, sizeof g_stats);
    mw_backlog_atfork_child();
    mw_report_reset_after_fork(); /* a child reports its own failures once */
}

void mw_export_register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
