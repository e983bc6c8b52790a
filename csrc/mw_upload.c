/* mw_upload — the uploader's queue, thread and lifecycle (contract in mw_upload.h; the other
 * files of the uploader are listed in mw_upload_ctx.h).
 *
 * How it works
 *
 * The queue is a ring of at most queue_max items, each owning a malloc'd copy of one gzipped
 * pprof. The ring, the statistics and the message ring live in `g` and are guarded by g.lock.
 * The uploader thread takes the head item *without removing it*: it marks the ring `busy`,
 * copies the item descriptor (pointer, length, window) and releases the lock for the duration
 * of the HTTP request (mw_upload_http.h); libcurl reads the body straight from the item's
 * buffer. While `busy` is set nobody may free the head, so when a submit finds the ring full it
 * drops the second-oldest item instead, moving the head descriptor one slot forward (O(1); the
 * buffer itself does not move). After the request the uploader re-takes the lock and finds its
 * item still at the head.
 *
 * Retries sleep on a condition variable (CLOCK_MONOTONIC) that stop also signals; the backoff
 * is per server (a failure streak), not per profile, so a dropped profile does not restart it.
 * A request in flight when the stop deadline passes is abandoned (mw_upload_http_abort_at).
 *
 * Only the uploader thread touches its context (mw_upload_ctx.h): the libcurl handles, the
 * resolved URL and the tenant. mw_upload_stop() only sets the abort time, and frees the
 * context after joining.
 *
 * Failures the user must see go to stderr through the core table of middleware._native
 * (mw_report_once, one line per kind and process). The uploader decides what to say while it
 * holds g.lock but writes the line after releasing it; the exporter's submit does the same.
 */
#define _GNU_SOURCE
#include "mw_upload.h"

#include "mw_otlp.h"
#include "mw_ownthread.h"
#include "mw_upload_config.h"
#include "mw_upload_ctx.h"
#include "mw_upload_http.h"
#include "mw_upload_tenant.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MSG_SLOTS 16
#define MSG_LEN 512
#define STATUS_BITS 640
#define LEVEL_INFO 20
#define LEVEL_WARNING 30
#define LEVEL_ERROR 40

/* ---------------------------------------------------------------- shared state */

typedef struct {
    unsigned char *data; /* owned copy of the profile */
    size_t len;
    int64_t from_s, until_s;
    uint64_t seq;  /* unique per start, for the retry counter */
    char name[32]; /* the series name (__name__) */
    int ready;     /* OTLP: data is the request already (converted before the first attempt) */
} item_t;

typedef struct {
    int level;
    char text[MSG_LEN];
} msg_t;

/* Everything here is guarded by g.lock (including the two condition variables' predicates). */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* uploader waits here: new work, stop requested */
    pthread_cond_t idle; /* flush waits here: the queue shrank, or the uploader exited */
    int running;         /* thread alive and accepting submits */
    int stopping;
    int64_t stop_deadline_ns;
    item_t *ring;
    int cap, head, count;
    int busy; /* the head item is on the wire: do not free it */
    uint64_t next_seq;
    mw_upload_stats_t stats;
    msg_t msgs[MSG_SLOTS];
    int msg_head, msg_count;
    uint64_t reported[STATUS_BITS / 64]; /* statuses already reported as rejected */
    char url[256]; /* the backend URL, redacted, for lines written by other threads */
} g = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Lifecycle, guarded by g_life. */
static pthread_mutex_t g_life = PTHREAD_MUTEX_INITIALIZER;
static pthread_t g_thread;
static int g_thread_alive;
static int g_zombie; /* a thread that did not finish in time was detached */
static mw_uploader_t *g_ctx;
static char g_start_error[256];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static struct timespec ns_to_ts(int64_t ns) {
    struct timespec ts = {.tv_sec = ns / MW_NS_PER_S, .tv_nsec = ns % MW_NS_PER_S};
    return ts;
}

static void init_conds(void) {
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g.wake, &ca);
    pthread_cond_init(&g.idle, &ca);
    pthread_condattr_destroy(&ca);
}

static void init_once(void) {
    init_conds();
    mw_upload_http_global_init();
    pthread_atfork(NULL, NULL, mw_upload_atfork_child);
}

/* ---------------------------------------------------------------- stderr lines (mw_report) */

static const mw_core_api_t *g_core; /* set by the module init, before any start */

void mw_upload_set_core(const mw_core_api_t *core) {
    g_core = core;
}

/* 1 while no line of `kind` was written (or silenced) in this process. Any lock state. */
static int report_open(mw_report_kind_t kind) {
    return g_core != NULL && !g_core->report_done(kind);
}

/* One stderr line of `kind`, once per process. Never with g.lock held. */
__attribute__((format(printf, 2, 3))) static void report_line(mw_report_kind_t kind,
                                                              const char *fmt, ...) {
    if (!report_open(kind)) return;
    char line[480];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    g_core->report_once(kind, "%s", line);
}

static void timedwait_locked(pthread_cond_t *cv, int64_t until_ns) {
    struct timespec ts = ns_to_ts(until_ns);
    pthread_cond_timedwait(cv, &g.lock, &ts);
}

__attribute__((format(printf, 2, 3))) static void post_msg_locked(int level, const char *fmt, ...) {
    if (g.msg_count == MSG_SLOTS) { /* overwrite the oldest */
        g.msg_head = (g.msg_head + 1) % MSG_SLOTS;
        g.msg_count--;
    }
    msg_t *m = &g.msgs[(g.msg_head + g.msg_count) % MSG_SLOTS];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->text, sizeof(m->text), fmt, ap);
    va_end(ap);
    m->level = level;
    g.msg_count++;
}

/* Removes the head item (caller frees the returned buffer outside the lock if it wants). */
static unsigned char *pop_head_locked(void) {
    unsigned char *data = g.ring[g.head].data;
    g.ring[g.head].data = NULL;
    g.head = (g.head + 1) % g.cap;
    g.count--;
    pthread_cond_broadcast(&g.idle);
    return data;
}

/* Sleeps delay_ns, cut short only by the stop deadline. Called and returns with g.lock held. */
static void backoff_wait_locked(int64_t delay_ns) {
    int64_t until = mw_upload_mono_ns() + delay_ns;
    for (;;) {
        int64_t end = until;
        if (g.stopping && g.stop_deadline_ns < end) end = g.stop_deadline_ns;
        if (mw_upload_mono_ns() >= end) return;
        timedwait_locked(&g.wake, end);
    }
}

/* ---------------------------------------------------------------- the key exchange's outcome */

/* One exchange attempt (mw_upload_tenant.h), counted, and said once: a message for the Python
 * layer, and a stderr line. Uploader thread, g.lock not held. Returns MW_HTTP_OK (tenant set),
 * MW_HTTP_RETRY (with the answer's Retry-After in *retry_after_s) or MW_HTTP_ABORTED. */
static mw_http_outcome_t exchange_key(mw_uploader_t *u, int64_t *retry_after_s) {
    mw_upload_exchange_t x;
    mw_http_outcome_t out = mw_upload_tenant_exchange(u, &x);
    if (out == MW_HTTP_ABORTED) return out;
    if (out == MW_HTTP_OK) {
        pthread_mutex_lock(&g.lock);
        snprintf(g.url, sizeof(g.url), "%s", u->base_redacted);
        g.stats.auth_ok++;
        post_msg_locked(LEVEL_INFO, "API key exchanged for tenant %s at MW_AUTH_URL%s", x.tenant,
                        u->auth_reported ? " (after earlier failures)" : "");
        pthread_mutex_unlock(&g.lock);
        u->auth_streak = 0;
        return out;
    }
    pthread_mutex_lock(&g.lock);
    g.stats.auth_failed++;
    if (!u->auth_reported)
        post_msg_locked(LEVEL_WARNING,
                        "exchanging the API key for a tenant at MW_AUTH_URL failed (%s); "
                        "retrying with backoff, profiles wait in the queue",
                        x.detail);
    pthread_mutex_unlock(&g.lock);
    u->auth_reported = 1;
    *retry_after_s = x.resp.retry_after_s;

    snprintf(u->last_error, sizeof(u->last_error), "API key exchange: %.140s", x.what);
    char auth_url[256];
    mw_upload_http_redact_url(u->cfg.auth_url, auth_url, sizeof(auth_url));
    if (x.resp.cc == CURLE_OK && (x.resp.status == 401 || x.resp.status == 403))
        report_line(MW_REPORT_UPLOAD_AUTH,
                    "profile upload to %.120s cannot start: the API key exchange at %.120s was "
                    "refused with HTTP %ld (check MW_API_KEY); profiles are kept (at most %d, "
                    "oldest dropped) and the exchange is retried with backoff",
                    u->base_redacted, auth_url, x.resp.status, u->cfg.queue_max);
    else
        report_line(MW_REPORT_UPLOAD_UNREACHABLE,
                    "profile upload to %.120s cannot start: the API key exchange at %.120s "
                    "failed (%.160s); profiles are kept (at most %d, oldest dropped) and the "
                    "exchange is retried with backoff",
                    u->base_redacted, auth_url, x.what, u->cfg.queue_max);
    return MW_HTTP_RETRY;
}

/* ---------------------------------------------------------------- one upload's outcome */

/* Accounts for one attempt on the head item (still at the head: it was busy). g.lock held. */
static void account_locked(mw_uploader_t *u, mw_http_outcome_t out, const mw_upload_resp_t *r,
                           unsigned char **to_free) {
    char what[300], snip[200];
    g.stats.last_status = (r->cc == CURLE_OK) ? (uint64_t)r->status : 0;
    g.stats.fds_lost = u->fds_lost;
    if (out == MW_HTTP_OK) {
        g.stats.uploaded++;
        *to_free = pop_head_locked();
        if (u->outage)
            post_msg_locked(LEVEL_INFO, "profile upload to %s recovered after %llu failed attempts",
                            u->base_redacted, (unsigned long long)u->outage_failures);
        u->outage = 0;
        u->outage_failures = 0;
        u->fail_streak = 0;
        return;
    }
    g.stats.failed_attempts++;
    g.stats.last_error_unix_s = (int64_t)time(NULL);
    if (out == MW_HTTP_REJECT) {
        g.stats.dropped_rejected++;
        *to_free = pop_head_locked();
        u->fail_streak = 0;
        long s = r->status;
        if (s >= 0 && s < STATUS_BITS && !(g.reported[s / 64] & (1ULL << (s % 64)))) {
            g.reported[s / 64] |= 1ULL << (s % 64);
            mw_upload_http_snippet(u->resp, u->resp_len, snip, sizeof(snip));
            post_msg_locked(LEVEL_ERROR,
                            "profiling server %s rejected a profile with HTTP %ld%s%s; %s. "
                            "Such profiles are dropped, not retried (counted in "
                            "dropped_rejected; this message is not repeated)",
                            u->base_redacted, s, snip[0] ? ": " : "", snip,
                            mw_upload_http_reject_hint(s, u->cfg.otlp));
        }
        return;
    }
    u->fail_streak++;
    u->outage_failures++;
    mw_upload_http_describe(u, r, u->last_error, sizeof(u->last_error));
    if (!u->outage) {
        mw_upload_http_describe(u, r, what, sizeof(what));
        post_msg_locked(LEVEL_WARNING,
                        "profile upload to %s failed (%s); retrying with backoff, keeping at "
                        "most %d profiles (oldest dropped)",
                        u->base_redacted, what, g.cap);
        u->outage = 1;
    }
}

/* The stderr line about one failed attempt, if its kind was not reported yet. Uploader
 * thread, g.lock not held. */
static void report_attempt(mw_uploader_t *u, mw_http_outcome_t out, const mw_upload_resp_t *r) {
    if (out == MW_HTTP_REJECT && (r->status == 401 || r->status == 403))
        report_line(MW_REPORT_UPLOAD_AUTH,
                    "profile upload to %.200s was refused with HTTP %ld: %s; refused profiles "
                    "are dropped, not retried",
                    u->base_redacted, r->status,
                    mw_upload_http_reject_hint(r->status, u->cfg.otlp));
    else if (out == MW_HTTP_REJECT)
        report_line(MW_REPORT_UPLOAD_REJECTED,
                    "profile upload to %.200s was rejected with HTTP %ld: %s; rejected profiles "
                    "are dropped, not retried",
                    u->base_redacted, r->status,
                    mw_upload_http_reject_hint(r->status, u->cfg.otlp));
    else if (out == MW_HTTP_RETRY)
        report_line(MW_REPORT_UPLOAD_UNREACHABLE,
                    "profile upload to %.200s failed (%s); profiles are kept (at most %d, "
                    "oldest dropped) and retried with backoff",
                    u->base_redacted, u->last_error, u->cfg.queue_max);
}

/* ---------------------------------------------------------------- the OTLP request */

/* Converts the head item (busy: nobody else frees or moves its buffer, though a submit may move
 * its descriptor to another slot, which stays g.ring[g.head]) into the OTLP request, in place.
 * On failure the item is dropped, counted and said once. Uploader thread, g.lock not held;
 * returns 0 when the head is now the request, -1 when it was dropped (busy cleared). */
static int otlp_convert(mw_uploader_t *u) {
    pthread_mutex_lock(&g.lock);
    const unsigned char *src = g.ring[g.head].data;
    size_t src_len = g.ring[g.head].len;
    pthread_mutex_unlock(&g.lock);

    const mw_upload_cfg_t *c = &u->cfg;
    mw_otlp_resource_t res = {
        .service_name = c->app_name,
        .sdk_version = c->sdk_version,
        .keys = (const char *const *)c->res_keys,
        .values = (const char *const *)c->res_values,
        .n = c->n_resource,
    };
    unsigned char *req = NULL, *gz = NULL;
    size_t req_len = 0, gz_len = 0;
    const char *why = NULL;
    int rc = mw_otlp_from_pprof(src, src_len, &res, (int64_t)getpid(), &req, &req_len, &why);
    if (rc == 0 && c->otlp_gzip) {
        if (mw_otlp_gzip(req, req_len, &gz, &gz_len) == 0) {
            free(req);
            req = gz;
            req_len = gz_len;
        } else {
            rc = -1;
            why = "gzip failed";
        }
    }
    unsigned char *old = NULL;
    int first = 0;
    pthread_mutex_lock(&g.lock);
    if (rc == 0) {
        old = g.ring[g.head].data;
        g.ring[g.head].data = req;
        g.ring[g.head].len = req_len;
        g.ring[g.head].ready = 1;
    } else {
        g.busy = 0;
        g.stats.dropped_rejected++;
        g.stats.convert_failed++;
        first = g.stats.convert_failed == 1;
        if (first)
            post_msg_locked(LEVEL_ERROR,
                            "a profile could not be converted to OTLP (%s); it was dropped "
                            "(counted in convert_failed; this message is not repeated)",
                            why);
        old = pop_head_locked();
    }
    pthread_mutex_unlock(&g.lock);
    free(old);
    if (rc != 0)
        report_line(MW_REPORT_UPLOAD_REJECTED,
                    "profile upload to %.200s: a profile could not be converted to OTLP (%.120s); "
                    "such profiles are dropped",
                    u->base_redacted, why);
    return rc;
}

/* ---------------------------------------------------------------- the uploader thread */

static void *uploader_main(void *arg) {
    mw_uploader_t *u = arg;
    int need_auth = u->tenant == NULL && u->cfg.api_key != NULL;
    uint64_t retry_seq = 0; /* item whose previous attempt failed */

    pthread_mutex_lock(&g.lock);
    for (;;) {
        if (g.stopping && (g.count == 0 || mw_upload_mono_ns() >= g.stop_deadline_ns)) break;
        if (need_auth) {
            int64_t ra = 0;
            pthread_mutex_unlock(&g.lock);
            mw_http_outcome_t out = exchange_key(u, &ra);
            pthread_mutex_lock(&g.lock);
            if (out == MW_HTTP_OK)
                need_auth = 0;
            else if (out == MW_HTTP_RETRY)
                backoff_wait_locked(mw_upload_http_backoff_ns(u, ++u->auth_streak, ra));
            continue;
        }
        if (g.count == 0) {
            pthread_cond_wait(&g.wake, &g.lock);
            continue;
        }
        item_t it = g.ring[g.head];
        g.busy = 1;
        pthread_mutex_unlock(&g.lock);

        if (u->cfg.otlp && !it.ready) {
            if (otlp_convert(u) != 0) {
                pthread_mutex_lock(&g.lock);
                continue;
            }
            pthread_mutex_lock(&g.lock);
            it = g.ring[g.head]; /* still ours (busy), now the request */
            pthread_mutex_unlock(&g.lock);
        }

        mw_upload_resp_t r;
        mw_http_outcome_t out =
            mw_upload_http_send_profile(u, it.data, it.len, it.from_s, it.until_s, it.name, &r);
        unsigned char *to_free = NULL;

        pthread_mutex_lock(&g.lock);
        g.busy = 0;
        if (out == MW_HTTP_ABORTED)
            continue; /* the stop deadline passed: the loop head drops what is left */
        if (it.seq == retry_seq) g.stats.retried++;
        account_locked(u, out, &r, &to_free);
        if (to_free || out != MW_HTTP_OK) {
            pthread_mutex_unlock(&g.lock);
            free(to_free);
            report_attempt(u, out, &r);
            pthread_mutex_lock(&g.lock);
        }
        if (out == MW_HTTP_RETRY) {
            retry_seq = it.seq;
            backoff_wait_locked(mw_upload_http_backoff_ns(u, u->fail_streak, r.retry_after_s));
        }
    }
    /* Stopping: whatever is left is dropped. */
    int dropped = 0;
    while (g.count > 0) {
        free(pop_head_locked());
        g.stats.dropped_at_exit++;
        dropped++;
    }
    g.running = 0;
    pthread_cond_broadcast(&g.idle);
    pthread_mutex_unlock(&g.lock);
    if (dropped > 0)
        report_line(MW_REPORT_UPLOAD_DROPPED,
                    "profile upload to %.200s: %d profile%s not delivered when the uploader "
                    "stopped (its deadline passed%s%.160s) %s dropped",
                    u->base_redacted, dropped, dropped == 1 ? "" : "s",
                    u->last_error[0] ? "; last error: " : "", u->last_error,
                    dropped == 1 ? "was" : "were");
    return NULL;
}

/* ---------------------------------------------------------------- lifecycle */

static void ctx_free(mw_uploader_t *u) {
    if (!u) return;
    mw_upload_http_free(u);
    mw_upload_config_free(&u->cfg);
    free(u->tenant);
    free(u->base);
    free(u);
}

static int fail_start(mw_uploader_t *u, const char *why) {
    snprintf(g_start_error, sizeof(g_start_error), "%s", why);
    ctx_free(u);
    return -1;
}

static int start_locked(const mw_upload_config_t *in) {
    if (!in) return fail_start(NULL, "no configuration");
    if (g_thread_alive || g_zombie) return fail_start(NULL, "the uploader is already running");
    const char *bad = mw_upload_config_invalid(in);
    if (bad) return fail_start(NULL, bad);

    mw_uploader_t *u = calloc(1, sizeof(*u));
    if (!u) return fail_start(NULL, "out of memory");
    const char *why;
    if (mw_upload_config_copy(&u->cfg, in, &why) != 0 || mw_upload_http_init(u, &why) != 0)
        return fail_start(u, why);
    mw_upload_cfg_t *c = &u->cfg;
    if (c->otlp) { /* the full URL, as given */
        if (!(u->base = strdup(c->server_url))) return fail_start(u, "out of memory");
    } else if (c->tenant_id) {
        if (mw_upload_tenant_set(u, c->tenant_id) != 0) return fail_start(u, "out of memory");
    } else if (!strstr(c->server_url, "{tenant}")) {
        if (!(u->base = mw_upload_tenant_url(c->server_url, NULL)))
            return fail_start(u, "out of memory");
    }
    mw_upload_http_redact_url(u->base ? u->base : c->server_url, u->base_redacted,
                              sizeof(u->base_redacted));

    item_t *ring = calloc((size_t)c->queue_max, sizeof(*ring));
    if (!ring) return fail_start(u, "out of memory");

    pthread_mutex_lock(&g.lock);
    free(g.ring);
    g.ring = ring;
    g.cap = c->queue_max;
    g.head = g.count = g.busy = 0;
    g.next_seq = 0;
    g.stopping = 0;
    g.stop_deadline_ns = 0;
    memset(&g.stats, 0, sizeof(g.stats));
    memset(g.reported, 0, sizeof(g.reported));
    g.msg_head = g.msg_count = 0;
    snprintf(g.url, sizeof(g.url), "%s", u->base_redacted);
    g.running = 1;
    pthread_mutex_unlock(&g.lock);

    int rc = mw_ownthread_create(&g_thread, "mw-upload", uploader_main, u);
    if (rc != 0) {
        pthread_mutex_lock(&g.lock);
        g.running = 0;
        pthread_mutex_unlock(&g.lock);
        return fail_start(u, "cannot create the uploader thread");
    }
    g_ctx = u;
    g_thread_alive = 1;
    g_start_error[0] = '\0';
    return 0;
}

int mw_upload_start(const mw_upload_config_t *cfg) {
    pthread_once(&g_once, init_once);
    pthread_mutex_lock(&g_life);
    int rc = start_locked(cfg);
    pthread_mutex_unlock(&g_life);
    return rc;
}

const char *mw_upload_start_error(void) {
    return g_start_error;
}

int mw_upload_is_running(void) {
    pthread_mutex_lock(&g.lock);
    int r = g.running;
    pthread_mutex_unlock(&g.lock);
    return r;
}

/* The line about the first profile dropped because the queue was full. g.lock not held. */
static void report_full(const char *url, int cap) {
    report_line(MW_REPORT_UPLOAD_DROPPED,
                "profile upload to %.200s: the queue of %d profile%s is full (the backend is "
                "unreachable or slow); profiles are being dropped, oldest first, while it "
                "stays full (MW_PROFILING_UPLOAD_QUEUE)",
                url, cap, cap == 1 ? "" : "s");
}

int mw_upload_submit(const void *gz_pprof, size_t len, int64_t from_unix_s, int64_t until_unix_s,
                     const char *name) {
    if (!gz_pprof || len == 0) return -1;
    unsigned char *copy = malloc(len);
    if (!copy) return -1;
    memcpy(copy, gz_pprof, len);
    unsigned char *victim = NULL;
    char url[256] = "";
    int full = 0;

    pthread_mutex_lock(&g.lock);
    if (!g.running) {
        if (report_open(MW_REPORT_UPLOAD_DROPPED)) snprintf(url, sizeof(url), "%s", g.url);
        pthread_mutex_unlock(&g.lock);
        free(copy);
        report_line(MW_REPORT_UPLOAD_DROPPED,
                    "profile upload%s%.200s: a profile arrived while the uploader was not "
                    "running; it was dropped, not uploaded",
                    url[0] ? " to " : "", url);
        return -1;
    }
    g.stats.submitted++;
    if (g.count == g.cap) {
        g.stats.dropped_queue_full++;
        if (report_open(MW_REPORT_UPLOAD_DROPPED)) {
            snprintf(url, sizeof(url), "%s", g.url);
            full = 1;
        }
        if (!g.busy) {
            victim = pop_head_locked();
        } else if (g.count >= 2) { /* keep the on-the-wire head, drop the next oldest */
            int next = (g.head + 1) % g.cap;
            victim = g.ring[next].data;
            g.ring[next] = g.ring[g.head];
            g.ring[g.head].data = NULL;
            g.head = next;
            g.count--;
        } else {
            pthread_mutex_unlock(&g.lock);
            free(copy);
            if (full) report_full(url, 1);
            return 0;
        }
    }
    item_t *it = &g.ring[(g.head + g.count) % g.cap];
    it->data = copy;
    it->len = len;
    it->from_s = from_unix_s;
    it->until_s = until_unix_s;
    snprintf(it->name, sizeof it->name, "%s", name && *name ? name : "process_cpu");
    it->seq = ++g.next_seq;
    it->ready = 0;
    g.count++;
    if ((uint64_t)g.count > g.stats.queue_high) g.stats.queue_high = (uint64_t)g.count;
    int cap = g.cap;
    pthread_cond_signal(&g.wake);
    pthread_mutex_unlock(&g.lock);
    free(victim);
    if (full) report_full(url, cap);
    return 0;
}

int mw_upload_flush(double deadline_s) {
    int64_t end = mw_upload_mono_ns() + mw_upload_secs_to_ns(deadline_s);
    pthread_mutex_lock(&g.lock);
    while (g.running && g.count > 0 && mw_upload_mono_ns() < end)
        timedwait_locked(&g.idle, end);
    int n = g.count;
    pthread_mutex_unlock(&g.lock);
    return n;
}

void mw_upload_stop(double deadline_s) {
    pthread_mutex_lock(&g_life);
    if (!g_thread_alive) {
        pthread_mutex_unlock(&g_life);
        return;
    }
    int64_t deadline = mw_upload_mono_ns() + mw_upload_secs_to_ns(deadline_s);
    pthread_mutex_lock(&g.lock);
    g.stopping = 1;
    g.stop_deadline_ns = deadline;
    pthread_cond_broadcast(&g.wake);
    pthread_mutex_unlock(&g.lock);
    mw_upload_http_abort_at(g_ctx, deadline);

    int64_t guard = mw_upload_mono_ns() + mw_upload_secs_to_ns(deadline_s) +
                    mw_upload_secs_to_ns(g_ctx->cfg.total_timeout_s) + 2 * MW_NS_PER_S;
    struct timespec abs = ns_to_ts(guard);
    if (pthread_clockjoin_np(g_thread, NULL, CLOCK_MONOTONIC, &abs) == 0) {
        ctx_free(g_ctx);
    } else { /* should not happen: give up on the thread rather than hang the app */
        pthread_detach(g_thread);
        g_zombie = 1;
    }
    g_ctx = NULL;
    g_thread_alive = 0;
    pthread_mutex_lock(&g.lock);
    g.stopping = 0;
    pthread_mutex_unlock(&g.lock);
    pthread_mutex_unlock(&g_life);
}

void mw_upload_get_stats(mw_upload_stats_t *out) {
    pthread_mutex_lock(&g.lock);
    *out = g.stats;
    out->queued = (uint64_t)g.count;
    pthread_mutex_unlock(&g.lock);
}

int mw_upload_take_message(char *buf, size_t n) {
    pthread_mutex_lock(&g.lock);
    if (g.msg_count == 0) {
        pthread_mutex_unlock(&g.lock);
        return 0;
    }
    msg_t *m = &g.msgs[g.msg_head];
    int level = m->level;
    if (buf && n > 0) snprintf(buf, n, "%s", m->text);
    g.msg_head = (g.msg_head + 1) % MSG_SLOTS;
    g.msg_count--;
    pthread_mutex_unlock(&g.lock);
    return level;
}

void mw_upload_atfork_child(void) {
    /* Another thread may have held g.lock or g_life in the middle of an update when fork()
     * copied the process: re-create the locks and forget (leak) the queue rather than walk it.
     * The leaked pages are the parent's, shared copy-on-write. */
    pthread_mutex_init(&g.lock, NULL);
    pthread_mutex_init(&g_life, NULL);
    init_conds();
    g.ring = NULL;
    g.cap = g.head = g.count = g.busy = 0;
    g.running = g.stopping = 0;
    memset(&g.stats, 0, sizeof(g.stats));
    memset(g.reported, 0, sizeof(g.reported));
    g.msg_head = g.msg_count = 0;
    g.url[0] = '\0';
    g_ctx = NULL; /* leaked on purpose: its libcurl handles share sockets with the parent */
    g_thread_alive = 0;
    g_zombie = 0;
    if (g_core) g_core->report_reset_after_fork(); /* the child reports its own failures once */
}
