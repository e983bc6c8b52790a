/* mw_upload — the native uploader (contract in mw_upload.h).
 *
 * How it works
 *
 * The queue is a ring of at most queue_max items, each owning a malloc'd copy of one gzipped
 * pprof. The ring, the statistics and the message ring live in `g` and are guarded by g.lock.
 * The uploader thread takes the head item *without removing it*: it marks the ring `busy`,
 * copies the item descriptor (pointer, length, window) and releases the lock for the duration
 * of the HTTP request; libcurl reads the body straight from the item's buffer. While `busy` is
 * set nobody may free the head, so when a submit finds the ring full it drops the second-oldest
 * item instead, moving the head descriptor one slot forward (O(1); the buffer itself does not
 * move). After the request the uploader re-takes the lock and finds its item still at the head.
 *
 * Requests run on one easy handle (connections and DNS results are reused) driven by a private
 * multi handle, so the wait for the network is a curl_multi_poll() that mw_upload_stop() can
 * interrupt with curl_multi_wakeup(): an in-flight request is aborted as soon as the stop
 * deadline passes instead of when libcurl's own timeouts fire. Retries sleep on a condition
 * variable (CLOCK_MONOTONIC) that stop also signals; the backoff is per server (a failure
 * streak), not per profile, so a dropped profile does not restart it.
 *
 * Only the uploader thread touches the libcurl handles, the resolved URL and the tenant (the
 * `mw_uploader_t` context). mw_upload_stop() only calls curl_multi_wakeup(), which libcurl
 * documents as callable from any thread, and frees the context after joining.
 *
 * Failures the user must see go to stderr through the core table of middleware._native
 * (mw_report_once, one line per kind and process). The uploader decides what to say while it
 * holds g.lock but writes the line after releasing it; the exporter's submit does the same.
 */
#define _GNU_SOURCE
#include "mw_upload.h"

#include <curl/curl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "push.pb-c.h" /* generated from proto/push.proto (csrc/gen) */

#define MW_NS_PER_S 1000000000LL
#define MW_MSG_SLOTS 16
#define MW_MSG_LEN 512
#define MW_TENANT_MAX 128
#define MW_RESP_CAP_INGEST 2048
#define MW_RESP_CAP_AUTH 65536
#define MW_STATUS_BITS 640
#define MW_LOG_INFO 20
#define MW_LOG_WARNING 30
#define MW_LOG_ERROR 40

/* ---------------------------------------------------------------- small helpers */

static int64_t mw_mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * MW_NS_PER_S + ts.tv_nsec;
}

static int64_t mw_secs_to_ns(double s) {
    if (!(s > 0)) /* also catches NaN */
        return 0;
    if (s > 1e6) s = 1e6;
    return (int64_t)(s * 1e9);
}

static struct timespec mw_ns_to_ts(int64_t ns) {
    struct timespec ts = {.tv_sec = ns / MW_NS_PER_S, .tv_nsec = ns % MW_NS_PER_S};
    return ts;
}

static char *mw_strdup0(const char *s) {
    return (s && *s) ? strdup(s) : NULL;
}

/* printf into a new malloc'd string; NULL on failure. */
__attribute__((format(printf, 1, 2))) static char *mw_fmt(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s) return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

static int mw_has_ctl(const char *s) {
    for (; s && *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) return 1;
    return 0;
}

static int mw_is_http_url(const char *s) {
    return s && (strncasecmp(s, "http://", 7) == 0 || strncasecmp(s, "https://", 8) == 0);
}

/* Replaces every "{tenant}" in tmpl by tenant and strips trailing '/'. New string or NULL. */
static char *mw_subst_tenant(const char *tmpl, const char *tenant) {
    static const char key[] = "{tenant}";
    const size_t klen = sizeof(key) - 1, tlen = tenant ? strlen(tenant) : 0;
    size_t n = 0;
    for (const char *p = tmpl; (p = strstr(p, key)); p += klen)
        n++;
    char *out = malloc(strlen(tmpl) + n * tlen + 1);
    if (!out) return NULL;
    char *o = out;
    for (const char *p = tmpl; *p;) {
        if (strncmp(p, key, klen) == 0) {
            memcpy(o, tenant ? tenant : "", tlen);
            o += tlen;
            p += klen;
        } else {
            *o++ = *p++;
        }
    }
    while (o > out && o[-1] == '/')
        o--;
    *o = '\0';
    return out;
}

/* Copies the URL without any user:password@ part, for messages. */
static void mw_redact_url(const char *url, char *out, size_t n) {
    const char *auth = strstr(url, "://");
    const char *start = auth ? auth + 3 : url;
    const char *end = start + strcspn(start, "/?#");
    const char *at = memchr(start, '@', (size_t)(end - start));
    if (at)
        snprintf(out, n, "%.*s%s", (int)(start - url), url, at + 1);
    else
        snprintf(out, n, "%s", url);
}

/* Printable, single-line, shortened copy of a response body for messages. */
static void mw_snippet(const char *body, size_t len, char *out, size_t n) {
    size_t o = 0;
    int space = 0;
    for (size_t i = 0; i < len && o + 4 < n && o < 160; i++) {
        unsigned char c = (unsigned char)body[i];
        if (c < 0x20 || c >= 0x7f) {
            space = 1;
            continue;
        }
        if (space && o > 0) out[o++] = ' ';
        space = 0;
        out[o++] = (char)c;
    }
    if (o > 0 && o + 4 < n && len > 160) out[o++] = '.', out[o++] = '.', out[o++] = '.';
    out[o] = '\0';
}

/* ---------------------------------------------------------------- shared state */

typedef struct mw_item {
    unsigned char *data; /* owned copy of the profile */
    size_t len;
    int64_t from_s, until_s;
    uint64_t seq; /* unique per start, for the retry counter */
} mw_item_t;

typedef struct mw_msg {
    int level;
    char text[MW_MSG_LEN];
} mw_msg_t;

/* Everything here is guarded by g.lock (including the two condition variables' predicates). */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* uploader waits here: new work, stop requested */
    pthread_cond_t idle; /* flush waits here: the queue shrank, or the uploader exited */
    int running;         /* thread alive and accepting submits */
    int stopping;
    int64_t stop_deadline_ns;
    mw_item_t *ring;
    int cap, head, count;
    int busy; /* the head item is on the wire: do not free it */
    uint64_t next_seq;
    mw_upload_stats_t stats;
    mw_msg_t msgs[MW_MSG_SLOTS];
    int msg_head, msg_count;
    uint64_t reported[MW_STATUS_BITS / 64]; /* statuses already reported as rejected */
    char url[256]; /* the backend URL, redacted, for lines written by other threads */
} g = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Monotonic time after which an in-flight request is aborted (INT64_MAX = never). */
static _Atomic int64_t g_abort_ns = INT64_MAX;

/* Configuration copy: owned strings, defaults applied. */
typedef struct mw_cfg {
    char *server_url, *app_name, *tags, *tenant_id, *auth_url, *api_key, *bearer_token, *basic_user,
        *basic_password, *spy_name, *user_agent;
    int sample_rate, queue_max, use_push_api;
    double connect_timeout_s, total_timeout_s, backoff_initial_s, backoff_max_s;
} mw_cfg_t;

/* Uploader-thread context: only the uploader thread uses it while it runs. */
typedef struct mw_uploader {
    mw_cfg_t cfg;
    CURL *easy;
    CURLM *multi; /* also read by mw_upload_stop for curl_multi_wakeup */
    char *tenant; /* NULL until known */
    char *base;   /* server URL with the tenant substituted, no trailing '/'; NULL until known */
    char *name_enc, *spy_enc; /* URL-encoded query values */
    char base_redacted[256];
    uint64_t rng;
    int fail_streak, auth_streak;
    int outage, auth_reported;
    uint64_t outage_failures;
    char last_error[160]; /* the last retried failure, for the line about profiles dropped */
    char errbuf[CURL_ERROR_SIZE];
    char *resp;
    size_t resp_len, resp_cap;
} mw_uploader_t;

/* Lifecycle, guarded by g_life. */
static pthread_mutex_t g_life = PTHREAD_MUTEX_INITIALIZER;
static pthread_t g_thread;
static int g_thread_alive;
static int g_zombie; /* a thread that did not finish in time was detached */
static mw_uploader_t *g_ctx;
static char g_start_error[256];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void mw_init_conds(void) {
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g.wake, &ca);
    pthread_cond_init(&g.idle, &ca);
    pthread_condattr_destroy(&ca);
}

static void mw_init_once(void) {
    mw_init_conds();
    curl_global_init(CURL_GLOBAL_DEFAULT);
    pthread_atfork(NULL, NULL, mw_upload_atfork_child);
}

/* ---------------------------------------------------------------- stderr lines (mw_report) */

static const mw_core_api_t *g_core; /* set by the module init, before any start */

void mw_upload_set_core(const mw_core_api_t *core) {
    g_core = core;
}

/* 1 while no line of `kind` was written (or silenced) in this process. Any lock state. */
static int mw_report_open(mw_report_kind_t kind) {
    return g_core != NULL && !g_core->report_done(kind);
}

/* One stderr line of `kind`, once per process. Never with g.lock held. */
__attribute__((format(printf, 2, 3))) static void mw_report_line(mw_report_kind_t kind,
                                                                 const char *fmt, ...) {
    if (!mw_report_open(kind)) return;
    char line[480];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    g_core->report_once(kind, "%s", line);
}

static void mw_timedwait_locked(pthread_cond_t *cv, int64_t until_ns) {
    struct timespec ts = mw_ns_to_ts(until_ns);
    pthread_cond_timedwait(cv, &g.lock, &ts);
}

__attribute__((format(printf, 2, 3))) static void mw_post_msg_locked(int level, const char *fmt,
                                                                     ...) {
    if (g.msg_count == MW_MSG_SLOTS) { /* overwrite the oldest */
        g.msg_head = (g.msg_head + 1) % MW_MSG_SLOTS;
        g.msg_count--;
    }
    mw_msg_t *m = &g.msgs[(g.msg_head + g.msg_count) % MW_MSG_SLOTS];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->text, sizeof(m->text), fmt, ap);
    va_end(ap);
    m->level = level;
    g.msg_count++;
}

/* Removes the head item (caller frees the returned buffer outside the lock if it wants). */
static unsigned char *mw_pop_head_locked(void) {
    unsigned char *data = g.ring[g.head].data;
    g.ring[g.head].data = NULL;
    g.head = (g.head + 1) % g.cap;
    g.count--;
    pthread_cond_broadcast(&g.idle);
    return data;
}

/* ---------------------------------------------------------------- key -> tenant JSON */

/* A minimal, strict JSON reader: enough to walk {"success":true,"data":{"project_uid":"..."}}
 * in any key order, with any other members, whitespace and escapes, skipping what it does not
 * need. Every read is bounds-checked; nesting is capped. */
typedef struct mw_json {
    const char *p, *end;
    int depth;
} mw_json_t;

static void mw_js_ws(mw_json_t *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int mw_js_lit(mw_json_t *j, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0) return -1;
    j->p += n;
    return 0;
}

static int mw_js_hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Reads a string. With out: decodes into out[cap] (non-ASCII and NUL become 0x01, which no
 * caller accepts) and sets *trunc when it did not fit. Returns 0 or -1 (malformed). */
static int mw_js_string(mw_json_t *j, char *out, size_t cap, int *trunc) {
    size_t n = 0;
    if (j->p >= j->end || *j->p != '"') return -1;
    j->p++;
    if (trunc) *trunc = 0;
    while (j->p < j->end) {
        unsigned char c = (unsigned char)*j->p++;
        if (c == '"') {
            if (out && cap) out[n] = '\0';
            return 0;
        }
        if (c < 0x20) return -1;
        if (c == '\\') {
            if (j->p >= j->end) return -1;
            char e = *j->p++;
            switch (e) {
            case '"':
            case '\\':
            case '/':
                c = (unsigned char)e;
                break;
            case 'b':
                c = '\b';
                break;
            case 'f':
                c = '\f';
                break;
            case 'n':
                c = '\n';
                break;
            case 'r':
                c = '\r';
                break;
            case 't':
                c = '\t';
                break;
            case 'u': {
                unsigned v = 0;
                if (j->end - j->p < 4) return -1;
                for (int i = 0; i < 4; i++) {
                    int h = mw_js_hex(j->p[i]);
                    if (h < 0) return -1;
                    v = v * 16 + (unsigned)h;
                }
                j->p += 4;
                c = (v == 0 || v >= 0x80) ? 0x01 : (unsigned char)v;
                break;
            }
            default:
                return -1;
            }
        } else if (c >= 0x80) {
            c = 0x01;
        }
        if (out && cap) {
            if (n + 1 < cap)
                out[n++] = (char)c;
            else if (trunc)
                *trunc = 1;
        }
    }
    return -1;
}

static int mw_js_skip(mw_json_t *j);

typedef int (*mw_js_member_fn)(mw_json_t *j, const char *key, int key_trunc, void *ud);

/* Walks an object, calling fn for each member with j positioned at the value; fn must consume
 * the value. */
static int mw_js_object(mw_json_t *j, mw_js_member_fn fn, void *ud) {
    if (j->p >= j->end || *j->p != '{' || ++j->depth > 64) return -1;
    j->p++;
    mw_js_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
        j->depth--;
        return 0;
    }
    for (;;) {
        char key[32];
        int trunc = 0;
        mw_js_ws(j);
        if (mw_js_string(j, key, sizeof(key), &trunc) != 0) return -1;
        mw_js_ws(j);
        if (j->p >= j->end || *j->p != ':') return -1;
        j->p++;
        mw_js_ws(j);
        if (fn(j, key, trunc, ud) != 0) return -1;
        mw_js_ws(j);
        if (j->p >= j->end) return -1;
        if (*j->p == ',') {
            j->p++;
            continue;
        }
        if (*j->p != '}') return -1;
        j->p++;
        j->depth--;
        return 0;
    }
}

static int mw_js_skip_member(mw_json_t *j, const char *key, int trunc, void *ud) {
    (void)key, (void)trunc, (void)ud;
    return mw_js_skip(j);
}

static int mw_js_skip(mw_json_t *j) {
    mw_js_ws(j);
    if (j->p >= j->end) return -1;
    switch (*j->p) {
    case '"':
        return mw_js_string(j, NULL, 0, NULL);
    case '{':
        return mw_js_object(j, mw_js_skip_member, NULL);
    case '[':
        if (++j->depth > 64) return -1;
        j->p++;
        mw_js_ws(j);
        if (j->p < j->end && *j->p == ']') {
            j->p++;
            j->depth--;
            return 0;
        }
        for (;;) {
            if (mw_js_skip(j) != 0) return -1;
            mw_js_ws(j);
            if (j->p >= j->end) return -1;
            if (*j->p == ',') {
                j->p++;
                continue;
            }
            if (*j->p != ']') return -1;
            j->p++;
            j->depth--;
            return 0;
        }
    case 't':
        return mw_js_lit(j, "true");
    case 'f':
        return mw_js_lit(j, "false");
    case 'n':
        return mw_js_lit(j, "null");
    default: {
        const char *start = j->p;
        while (j->p < j->end && strchr("+-0123456789.eE", *j->p))
            j->p++;
        return j->p > start ? 0 : -1;
    }
    }
}

typedef struct mw_auth_parse {
    int success;
    int have_uid, uid_bad;
    char uid[MW_TENANT_MAX + 1];
} mw_auth_parse_t;

static int mw_js_data_member(mw_json_t *j, const char *key, int trunc, void *ud) {
    mw_auth_parse_t *a = ud;
    if (!trunc && strcmp(key, "project_uid") == 0 && j->p < j->end && *j->p == '"') {
        int t = 0;
        if (mw_js_string(j, a->uid, sizeof(a->uid), &t) != 0) return -1;
        a->have_uid = 1;
        a->uid_bad = t;
        return 0;
    }
    return mw_js_skip(j);
}

static int mw_js_top_member(mw_json_t *j, const char *key, int trunc, void *ud) {
    mw_auth_parse_t *a = ud;
    if (!trunc && strcmp(key, "success") == 0) {
        if (mw_js_lit(j, "true") == 0) {
            a->success = 1;
            return 0;
        }
        a->success = 0;
        return mw_js_skip(j);
    }
    if (!trunc && strcmp(key, "data") == 0 && j->p < j->end && *j->p == '{')
        return mw_js_object(j, mw_js_data_member, a);
    return mw_js_skip(j);
}

static int mw_valid_tenant(const char *t) {
    size_t n = strlen(t);
    if (n == 0 || n > MW_TENANT_MAX) return 0;
    for (; *t; t++)
        if (!((*t >= 'a' && *t <= 'z') || (*t >= 'A' && *t <= 'Z') || (*t >= '0' && *t <= '9') ||
              *t == '_' || *t == '-' || *t == '.'))
            return 0;
    return 1;
}

/* Parses the auth response; 0 with the tenant in out, -1 with a reason. */
static int mw_parse_auth(const char *body, size_t len, char *out, size_t n, const char **why) {
    mw_auth_parse_t a = {0};
    mw_json_t j = {.p = body, .end = body + len};
    mw_js_ws(&j);
    if (mw_js_object(&j, mw_js_top_member, &a) != 0) {
        *why = "the response is not a JSON object";
        return -1;
    }
    mw_js_ws(&j);
    if (j.p != j.end) {
        *why = "the response has trailing data after the JSON object";
        return -1;
    }
    if (!a.success) {
        *why = "the response does not say \"success\": true";
        return -1;
    }
    if (!a.have_uid) {
        *why = "the response has no data.project_uid string";
        return -1;
    }
    if (a.uid_bad || !mw_valid_tenant(a.uid)) {
        *why = "data.project_uid is not a valid tenant id ([A-Za-z0-9_.-], at most 128)";
        return -1;
    }
    snprintf(out, n, "%s", a.uid);
    return 0;
}

/* ---------------------------------------------------------------- HTTP */

enum { MW_OUT_OK, MW_OUT_RETRY, MW_OUT_REJECT, MW_OUT_ABORTED };

typedef struct mw_resp {
    CURLcode cc;
    long status;
    int64_t retry_after_s;
    int aborted;
} mw_resp_t;

static size_t mw_sink(char *p, size_t size, size_t nmemb, void *ud) {
    mw_uploader_t *u = ud;
    size_t total = size * nmemb;
    size_t room = u->resp_cap > u->resp_len ? u->resp_cap - u->resp_len : 0;
    size_t take = total < room ? total : room;
    memcpy(u->resp + u->resp_len, p, take);
    u->resp_len += take;
    return total; /* the rest is discarded, not an error */
}

static void mw_setopt_common(mw_uploader_t *u, const char *url, struct curl_slist *hdrs,
                             const void *body, size_t len, size_t resp_cap) {
    CURL *e = u->easy;
    long cto = (long)(u->cfg.connect_timeout_s * 1000.0);
    long tto = (long)(u->cfg.total_timeout_s * 1000.0);
    curl_easy_reset(e); /* keeps the connection and DNS caches */
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(e, CURLOPT_USERAGENT, u->cfg.user_agent);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, cto > 0 ? cto : 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, tto > 0 ? tto : 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, u->errbuf);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, mw_sink);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, u);
    u->errbuf[0] = '\0';
    u->resp_len = 0;
    u->resp_cap = resp_cap;
}

/* Runs the configured request; aborts it once g_abort_ns has passed. */
static void mw_perform(mw_uploader_t *u, mw_resp_t *r) {
    memset(r, 0, sizeof(*r));
    r->cc = CURLE_OK;
    if (curl_multi_add_handle(u->multi, u->easy) != CURLM_OK) {
        r->cc = CURLE_FAILED_INIT;
        return;
    }
    int done = 0;
    for (;;) {
        int running = 0;
        if (curl_multi_perform(u->multi, &running) != CURLM_OK) {
            r->cc = CURLE_FAILED_INIT;
            break;
        }
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(u->multi, &left)))
            if (m->msg == CURLMSG_DONE && m->easy_handle == u->easy) {
                r->cc = m->data.result;
                done = 1;
            }
        if (done || running == 0) break;
        int64_t now = mw_mono_ns(), abort_ns = atomic_load(&g_abort_ns);
        if (now >= abort_ns) {
            r->aborted = 1;
            r->cc = CURLE_ABORTED_BY_CALLBACK;
            break;
        }
        int64_t wait_ms = (abort_ns - now) / 1000000 + 1;
        curl_multi_poll(u->multi, NULL, 0, wait_ms < 1000 ? (int)wait_ms : 1000, NULL);
    }
    curl_multi_remove_handle(u->multi, u->easy);
    if (!r->aborted && r->cc == CURLE_OK) {
        curl_off_t ra = 0;
        curl_easy_getinfo(u->easy, CURLINFO_RESPONSE_CODE, &r->status);
        if (curl_easy_getinfo(u->easy, CURLINFO_RETRY_AFTER, &ra) == CURLE_OK && ra > 0)
            r->retry_after_s = (int64_t)ra;
    }
}

static int mw_classify(const mw_resp_t *r) {
    if (r->aborted) return MW_OUT_ABORTED;
    if (r->cc != CURLE_OK) return MW_OUT_RETRY;
    if (r->status >= 200 && r->status < 300) return MW_OUT_OK;
    if (r->status == 408 || r->status == 429 || r->status >= 500 || r->status < 100)
        return MW_OUT_RETRY;
    return MW_OUT_REJECT;
}

static void mw_describe(mw_uploader_t *u, const mw_resp_t *r, char *out, size_t n) {
    if (r->cc != CURLE_OK)
        snprintf(out, n, "%s%s%s", curl_easy_strerror(r->cc), u->errbuf[0] ? ": " : "", u->errbuf);
    else
        snprintf(out, n, "HTTP %ld", r->status);
}

static uint64_t mw_rand(mw_uploader_t *u) { /* xorshift64* */
    u->rng ^= u->rng >> 12;
    u->rng ^= u->rng << 25;
    u->rng ^= u->rng >> 27;
    return u->rng * 2685821657736338717ULL;
}

/* Delay before the next attempt after `streak` consecutive failures. */
static int64_t mw_backoff_ns(mw_uploader_t *u, int streak, int64_t retry_after_s) {
    double d = u->cfg.backoff_initial_s;
    for (int i = 1; i < streak && d < u->cfg.backoff_max_s; i++)
        d *= 2;
    if (d > u->cfg.backoff_max_s) d = u->cfg.backoff_max_s;
    d *= 0.5 + 0.5 * ((double)(mw_rand(u) >> 11) / (double)(1ULL << 53));
    if (retry_after_s > 0)
        d = (double)retry_after_s < u->cfg.backoff_max_s ? (double)retry_after_s
                                                         : u->cfg.backoff_max_s;
    return mw_secs_to_ns(d);
}

/* Sleeps delay_ns, cut short only by the stop deadline. Called and returns with g.lock held. */
static void mw_backoff_wait_locked(int64_t delay_ns) {
    int64_t until = mw_mono_ns() + delay_ns;
    for (;;) {
        int64_t end = until;
        if (g.stopping && g.stop_deadline_ns < end) end = g.stop_deadline_ns;
        if (mw_mono_ns() >= end) return;
        mw_timedwait_locked(&g.wake, end);
    }
}

/* ---------------------------------------------------------------- key -> tenant exchange */

static int mw_set_tenant(mw_uploader_t *u, const char *tenant) {
    char *t = strdup(tenant);
    char *base = mw_subst_tenant(u->cfg.server_url, tenant);
    if (!t || !base) {
        free(t);
        free(base);
        return -1;
    }
    free(u->tenant);
    free(u->base);
    u->tenant = t;
    u->base = base;
    mw_redact_url(base, u->base_redacted, sizeof(u->base_redacted));
    return 0;
}

/* One exchange attempt. Returns MW_OUT_OK (tenant set), MW_OUT_RETRY or MW_OUT_ABORTED. */
static int mw_auth_once(mw_uploader_t *u, int64_t *retry_after_s) {
    char *authz = mw_fmt("Authorization: Bearer %s", u->cfg.api_key);
    struct curl_slist *h = NULL, *h2;
    if (!authz) return MW_OUT_RETRY;
    const char *lines[] = {authz, "Content-Type: application/x-www-form-urlencoded", "Expect:"};
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
        if (!(h2 = curl_slist_append(h, lines[i]))) {
            curl_slist_free_all(h);
            free(authz);
            return MW_OUT_RETRY;
        }
        h = h2;
    }
    mw_resp_t r;
    mw_setopt_common(u, u->cfg.auth_url, h, "", 0, MW_RESP_CAP_AUTH);
    mw_perform(u, &r);
    curl_easy_setopt(u->easy, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(h);
    memset(authz, 0, strlen(authz)); /* do not leave the key in freed memory */
    free(authz);

    int out = mw_classify(&r);
    if (out == MW_OUT_ABORTED) return out;
    char tenant[MW_TENANT_MAX + 1], what[300], snip[200];
    const char *why = NULL;
    if (out == MW_OUT_OK &&
        mw_parse_auth(u->resp, u->resp_len, tenant, sizeof(tenant), &why) == 0 &&
        mw_set_tenant(u, tenant) == 0) {
        pthread_mutex_lock(&g.lock);
        snprintf(g.url, sizeof(g.url), "%s", u->base_redacted);
        g.stats.auth_ok++;
        mw_post_msg_locked(MW_LOG_INFO, "API key exchanged for tenant %s at MW_AUTH_URL%s", tenant,
                           u->auth_reported ? " (after earlier failures)" : "");
        pthread_mutex_unlock(&g.lock);
        u->auth_streak = 0;
        return MW_OUT_OK;
    }
    mw_snippet(u->resp, u->resp_len, snip, sizeof(snip));
    if (out == MW_OUT_OK)
        snprintf(what, sizeof(what), "%s", why ? why : "out of memory");
    else if (r.cc != CURLE_OK)
        mw_describe(u, &r, what, sizeof(what));
    else
        snprintf(what, sizeof(what), "HTTP %ld%s%s%s", r.status,
                 (r.status == 401 || r.status == 403) ? " (check MW_API_KEY)" : "",
                 snip[0] ? ": " : "", snip);
    pthread_mutex_lock(&g.lock);
    g.stats.auth_failed++;
    if (!u->auth_reported)
        mw_post_msg_locked(MW_LOG_WARNING,
                           "exchanging the API key for a tenant at MW_AUTH_URL failed (%s); "
                           "retrying with backoff, profiles wait in the queue",
                           what);
    pthread_mutex_unlock(&g.lock);
    u->auth_reported = 1;
    *retry_after_s = r.retry_after_s;

    /* what this failure was, without the response body: for the stderr lines */
    if (out == MW_OUT_OK)
        snprintf(what, sizeof(what), "%s", why ? why : "out of memory");
    else if (r.cc != CURLE_OK)
        mw_describe(u, &r, what, sizeof(what));
    else
        snprintf(what, sizeof(what), "HTTP %ld", r.status);
    snprintf(u->last_error, sizeof(u->last_error), "API key exchange: %.140s", what);
    char auth_url[256];
    mw_redact_url(u->cfg.auth_url, auth_url, sizeof(auth_url));
    if (r.cc == CURLE_OK && (r.status == 401 || r.status == 403))
        mw_report_line(MW_REPORT_UPLOAD_AUTH,
                       "profile upload to %.120s cannot start: the API key exchange at %.120s was "
                       "refused with HTTP %ld (check MW_API_KEY); profiles are kept (at most %d, "
                       "oldest dropped) and the exchange is retried with backoff",
                       u->base_redacted, auth_url, r.status, u->cfg.queue_max);
    else
        mw_report_line(MW_REPORT_UPLOAD_UNREACHABLE,
                       "profile upload to %.120s cannot start: the API key exchange at %.120s "
                       "failed (%.160s); profiles are kept (at most %d, oldest dropped) and the "
                       "exchange is retried with backoff",
                       u->base_redacted, auth_url, what, u->cfg.queue_max);
    return MW_OUT_RETRY;
}

/* ---------------------------------------------------------------- one upload */

/* Encodes a push.v1.PushRequest around the profile; malloc'd buffer or NULL. */
static unsigned char *mw_push_body(mw_uploader_t *u, const mw_item_t *it, size_t *out_len) {
    size_t ntags = 0;
    for (const char *p = u->cfg.tags; p && *p; p++)
        ntags += (*p == ',');
    ntags += (u->cfg.tags && *u->cfg.tags) ? 1 : 0;
    size_t nlabels = 2 + ntags;
    Push__V1__LabelPair *labels = calloc(nlabels, sizeof(*labels));
    Push__V1__LabelPair **lp = calloc(nlabels, sizeof(*lp));
    char *tags = u->cfg.tags ? strdup(u->cfg.tags) : NULL;
    unsigned char *buf = NULL;
    if (!labels || !lp || (u->cfg.tags && !tags)) goto out;
    size_t n = 0;
    push__v1__label_pair__init(&labels[n]);
    labels[n].name = "__name__";
    labels[n].value = "process_cpu";
    n++;
    push__v1__label_pair__init(&labels[n]);
    labels[n].name = "service_name";
    labels[n].value = u->cfg.app_name;
    n++;
    char *save = NULL;
    for (char *kv = tags ? strtok_r(tags, ",", &save) : NULL; kv && n < nlabels;
         kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) continue;
        *eq = '\0';
        if (strcmp(kv, "__name__") == 0 || strcmp(kv, "service_name") == 0) continue;
        push__v1__label_pair__init(&labels[n]);
        labels[n].name = kv;
        labels[n].value = eq + 1;
        n++;
    }
    for (size_t i = 0; i < n; i++)
        lp[i] = &labels[i];

    char id[37];
    uint64_t a = mw_rand(u), b = mw_rand(u);
    a = (a & ~0xf000ULL) | 0x4000ULL;                        /* version 4 */
    b = (b & 0x3fffffffffffffffULL) | 0x8000000000000000ULL; /* variant 10 */
    snprintf(id, sizeof(id), "%08x-%04x-%04x-%04x-%012llx", (unsigned)(a >> 32),
             (unsigned)((a >> 16) & 0xffff), (unsigned)(a & 0xffff), (unsigned)(b >> 48),
             (unsigned long long)(b & 0xffffffffffffULL));

    Push__V1__RawSample sample = PUSH__V1__RAW_SAMPLE__INIT;
    sample.raw_profile.data = it->data;
    sample.raw_profile.len = it->len;
    sample.id = id;
    Push__V1__RawSample *samples[1] = {&sample};
    Push__V1__RawProfileSeries series = PUSH__V1__RAW_PROFILE_SERIES__INIT;
    series.n_labels = n;
    series.labels = lp;
    series.n_samples = 1;
    series.samples = samples;
    Push__V1__RawProfileSeries *sp[1] = {&series};
    Push__V1__PushRequest req = PUSH__V1__PUSH_REQUEST__INIT;
    req.n_series = 1;
    req.series = sp;
    size_t len = push__v1__push_request__get_packed_size(&req);
    buf = malloc(len ? len : 1);
    if (buf) *out_len = push__v1__push_request__pack(&req, buf);
out:
    free(labels);
    free(lp);
    free(tags);
    return buf;
}

/* Sends one profile. Fills r; returns an MW_OUT_* outcome. */
static int mw_send(mw_uploader_t *u, const mw_item_t *it, mw_resp_t *r) {
    char *url = NULL, *org = NULL, *bearer = NULL;
    struct curl_slist *h = NULL, *h2;
    const unsigned char *body = it->data;
    unsigned char *owned = NULL;
    size_t len = it->len;
    int out = MW_OUT_RETRY;
    memset(r, 0, sizeof(*r));
    r->cc = CURLE_OUT_OF_MEMORY;

    if (u->cfg.use_push_api) {
        owned = mw_push_body(u, it, &len);
        body = owned;
        url = mw_fmt("%s/push.v1.PusherService/Push", u->base);
    } else {
        url = mw_fmt("%s/ingest?name=%s&from=%lld&until=%lld&format=pprof&sampleRate=%d"
                     "&spyName=%s",
                     u->base, u->name_enc, (long long)it->from_s, (long long)it->until_s,
                     u->cfg.sample_rate, u->spy_enc);
    }
    if (!url || !body) goto out;
    const char *lines[5];
    size_t nl = 0;
    lines[nl++] = u->cfg.use_push_api ? "Content-Type: application/proto"
                                      : "Content-Type: binary/octet-stream";
    lines[nl++] = "Expect:";
    if (u->tenant) {
        if (!(org = mw_fmt("X-Scope-OrgID: %s", u->tenant))) goto out;
        lines[nl++] = org;
    }
    if (u->cfg.bearer_token) {
        if (!(bearer = mw_fmt("Authorization: Bearer %s", u->cfg.bearer_token))) goto out;
        lines[nl++] = bearer;
    }
    for (size_t i = 0; i < nl; i++) {
        if (!(h2 = curl_slist_append(h, lines[i]))) goto out;
        h = h2;
    }
    mw_setopt_common(u, url, h, body, len, MW_RESP_CAP_INGEST);
    if (!u->cfg.bearer_token && u->cfg.basic_user) {
        curl_easy_setopt(u->easy, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
        curl_easy_setopt(u->easy, CURLOPT_USERNAME, u->cfg.basic_user);
        curl_easy_setopt(u->easy, CURLOPT_PASSWORD,
                         u->cfg.basic_password ? u->cfg.basic_password : "");
    }
    mw_perform(u, r);
    curl_easy_setopt(u->easy, CURLOPT_HTTPHEADER, NULL);
    out = mw_classify(r);
out:
    curl_slist_free_all(h);
    if (bearer) {
        memset(bearer, 0, strlen(bearer));
        free(bearer);
    }
    free(org);
    free(url);
    free(owned);
    return out;
}

static const char *mw_reject_hint(long status) {
    if (status == 401 || status == 403)
        return "check the credentials (MW_API_KEY, MW_PROFILING_TENANT_ID, "
               "MW_PROFILING_BEARER_TOKEN, MW_PROFILING_BASIC_AUTH_USER/PASSWORD)";
    if (status == 404 || status == 405)
        return "check MW_PROFILING_SERVER_URL (profiles go to {server}/ingest)";
    if (status == 413) return "the profile is larger than the server accepts";
    if (status >= 300 && status < 400)
        return "the server redirects; set MW_PROFILING_SERVER_URL to the final address";
    return "the server refused the profile";
}

/* Accounts for one attempt on the head item (still at the head: it was busy). g.lock held. */
static void mw_account_locked(mw_uploader_t *u, int out, const mw_resp_t *r,
                              unsigned char **to_free) {
    char what[300], snip[200];
    g.stats.last_status = (r->cc == CURLE_OK) ? (uint64_t)r->status : 0;
    if (out == MW_OUT_OK) {
        g.stats.uploaded++;
        *to_free = mw_pop_head_locked();
        if (u->outage)
            mw_post_msg_locked(MW_LOG_INFO,
                               "profile upload to %s recovered after %llu failed attempts",
                               u->base_redacted, (unsigned long long)u->outage_failures);
        u->outage = 0;
        u->outage_failures = 0;
        u->fail_streak = 0;
        return;
    }
    g.stats.failed_attempts++;
    g.stats.last_error_unix_s = (int64_t)time(NULL);
    if (out == MW_OUT_REJECT) {
        g.stats.dropped_rejected++;
        *to_free = mw_pop_head_locked();
        u->fail_streak = 0;
        long s = r->status;
        if (s >= 0 && s < MW_STATUS_BITS && !(g.reported[s / 64] & (1ULL << (s % 64)))) {
            g.reported[s / 64] |= 1ULL << (s % 64);
            mw_snippet(u->resp, u->resp_len, snip, sizeof(snip));
            mw_post_msg_locked(MW_LOG_ERROR,
                               "profiling server %s rejected a profile with HTTP %ld%s%s; %s. "
                               "Such profiles are dropped, not retried (counted in "
                               "dropped_rejected; this message is not repeated)",
                               u->base_redacted, s, snip[0] ? ": " : "", snip, mw_reject_hint(s));
        }
        return;
    }
    u->fail_streak++;
    u->outage_failures++;
    mw_describe(u, r, u->last_error, sizeof(u->last_error));
    if (!u->outage) {
        mw_describe(u, r, what, sizeof(what));
        mw_post_msg_locked(MW_LOG_WARNING,
                           "profile upload to %s failed (%s); retrying with backoff, keeping at "
                           "most %d profiles (oldest dropped)",
                           u->base_redacted, what, g.cap);
        u->outage = 1;
    }
}

/* The stderr line about one failed attempt, if its kind was not reported yet. Uploader
 * thread, g.lock not held. */
static void mw_report_attempt(mw_uploader_t *u, int out, const mw_resp_t *r) {
    if (out == MW_OUT_REJECT && (r->status == 401 || r->status == 403))
        mw_report_line(MW_REPORT_UPLOAD_AUTH,
                       "profile upload to %.200s was refused with HTTP %ld: %s; refused profiles "
                       "are dropped, not retried",
                       u->base_redacted, r->status, mw_reject_hint(r->status));
    else if (out == MW_OUT_REJECT)
        mw_report_line(MW_REPORT_UPLOAD_REJECTED,
                       "profile upload to %.200s was rejected with HTTP %ld: %s; rejected profiles "
                       "are dropped, not retried",
                       u->base_redacted, r->status, mw_reject_hint(r->status));
    else if (out == MW_OUT_RETRY)
        mw_report_line(MW_REPORT_UPLOAD_UNREACHABLE,
                       "profile upload to %.200s failed (%s); profiles are kept (at most %d, "
                       "oldest dropped) and retried with backoff",
                       u->base_redacted, u->last_error, u->cfg.queue_max);
}

/* ---------------------------------------------------------------- the uploader thread */

static void *mw_uploader_main(void *arg) {
    mw_uploader_t *u = arg;
    int need_auth = u->tenant == NULL && u->cfg.api_key != NULL;
    uint64_t retry_seq = 0; /* item whose previous attempt failed */

    pthread_mutex_lock(&g.lock);
    for (;;) {
        if (g.stopping && (g.count == 0 || mw_mono_ns() >= g.stop_deadline_ns)) break;
        if (need_auth) {
            int64_t ra = 0;
            pthread_mutex_unlock(&g.lock);
            int out = mw_auth_once(u, &ra);
            pthread_mutex_lock(&g.lock);
            if (out == MW_OUT_OK)
                need_auth = 0;
            else if (out == MW_OUT_RETRY)
                mw_backoff_wait_locked(mw_backoff_ns(u, ++u->auth_streak, ra));
            continue;
        }
        if (g.count == 0) {
            pthread_cond_wait(&g.wake, &g.lock);
            continue;
        }
        mw_item_t it = g.ring[g.head];
        g.busy = 1;
        pthread_mutex_unlock(&g.lock);

        mw_resp_t r;
        int out = mw_send(u, &it, &r);
        unsigned char *to_free = NULL;

        pthread_mutex_lock(&g.lock);
        g.busy = 0;
        if (out == MW_OUT_ABORTED)
            continue; /* the stop deadline passed: the loop head drops what is left */
        if (it.seq == retry_seq) g.stats.retried++;
        mw_account_locked(u, out, &r, &to_free);
        if (to_free || out != MW_OUT_OK) {
            pthread_mutex_unlock(&g.lock);
            free(to_free);
            mw_report_attempt(u, out, &r);
            pthread_mutex_lock(&g.lock);
        }
        if (out == MW_OUT_RETRY) {
            retry_seq = it.seq;
            mw_backoff_wait_locked(mw_backoff_ns(u, u->fail_streak, r.retry_after_s));
        }
    }
    /* Stopping: whatever is left is dropped. */
    int dropped = 0;
    while (g.count > 0) {
        free(mw_pop_head_locked());
        g.stats.dropped_at_exit++;
        dropped++;
    }
    g.running = 0;
    pthread_cond_broadcast(&g.idle);
    pthread_mutex_unlock(&g.lock);
    if (dropped > 0)
        mw_report_line(MW_REPORT_UPLOAD_DROPPED,
                       "profile upload to %.200s: %d profile%s not delivered when the uploader "
                       "stopped (its deadline passed%s%.160s) %s dropped",
                       u->base_redacted, dropped, dropped == 1 ? "" : "s",
                       u->last_error[0] ? "; last error: " : "", u->last_error,
                       dropped == 1 ? "was" : "were");
    return NULL;
}

/* ---------------------------------------------------------------- lifecycle */

static void mw_cfg_free(mw_cfg_t *c) {
    char **s[] = {&c->server_url,     &c->app_name, &c->tags,         &c->tenant_id,
                  &c->auth_url,       &c->api_key,  &c->bearer_token, &c->basic_user,
                  &c->basic_password, &c->spy_name, &c->user_agent};
    for (size_t i = 0; i < sizeof(s) / sizeof(s[0]); i++) {
        if (*s[i]) {
            memset(*s[i], 0, strlen(*s[i])); /* secrets do not outlive the uploader */
            free(*s[i]);
        }
        *s[i] = NULL;
    }
}

static void mw_ctx_free(mw_uploader_t *u) {
    if (!u) return;
    if (u->multi) curl_multi_cleanup(u->multi);
    if (u->easy) curl_easy_cleanup(u->easy);
    if (u->name_enc) curl_free(u->name_enc);
    if (u->spy_enc) curl_free(u->spy_enc);
    mw_cfg_free(&u->cfg);
    free(u->tenant);
    free(u->base);
    free(u->resp);
    free(u);
}

static double mw_pos_or(double v, double def) {
    return (isfinite(v) && v > 0) ? v : def;
}

static int mw_fail(mw_uploader_t *u, const char *why) {
    snprintf(g_start_error, sizeof(g_start_error), "%s", why);
    mw_ctx_free(u);
    return -1;
}

static int mw_start_locked(const mw_upload_config_t *in) {
    if (!in) return mw_fail(NULL, "no configuration");
    if (g_thread_alive || g_zombie) return mw_fail(NULL, "the uploader is already running");
    const char *strs[] = {in->server_url,     in->app_name, in->tags,         in->tenant_id,
                          in->auth_url,       in->api_key,  in->bearer_token, in->basic_user,
                          in->basic_password, in->spy_name, in->user_agent};
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++)
        if (mw_has_ctl(strs[i]))
            return mw_fail(NULL, "a configuration string contains control characters");
    if (!in->app_name || !*in->app_name) return mw_fail(NULL, "app_name is empty");

    mw_uploader_t *u = calloc(1, sizeof(*u));
    if (!u) return mw_fail(NULL, "out of memory");
    mw_cfg_t *c = &u->cfg;
    c->server_url = mw_strdup0(in->server_url);
    c->app_name = mw_strdup0(in->app_name);
    c->tags = mw_strdup0(in->tags);
    c->tenant_id = mw_strdup0(in->tenant_id);
    c->api_key = mw_strdup0(in->api_key);
    c->auth_url = mw_strdup0(in->auth_url ? in->auth_url : MW_UPLOAD_DEFAULT_AUTH_URL);
    c->bearer_token = mw_strdup0(in->bearer_token);
    c->basic_user = mw_strdup0(in->basic_user);
    c->basic_password = mw_strdup0(in->basic_password);
    c->spy_name = mw_strdup0(in->spy_name ? in->spy_name : MW_UPLOAD_DEFAULT_SPY_NAME);
    c->user_agent = mw_strdup0(in->user_agent ? in->user_agent : MW_UPLOAD_DEFAULT_USER_AGENT);
    if (!c->server_url && c->api_key) c->server_url = strdup(MW_UPLOAD_DEFAULT_SERVER_URL);
    c->sample_rate = in->sample_rate > 0 ? in->sample_rate : MW_UPLOAD_DEFAULT_SAMPLE_RATE;
    c->queue_max = in->queue_max > 0 ? in->queue_max : MW_UPLOAD_DEFAULT_QUEUE_MAX;
    if (c->queue_max > MW_UPLOAD_QUEUE_MAX_LIMIT) c->queue_max = MW_UPLOAD_QUEUE_MAX_LIMIT;
    c->connect_timeout_s = mw_pos_or(in->connect_timeout_s, MW_UPLOAD_DEFAULT_CONNECT_TIMEOUT_S);
    c->total_timeout_s = mw_pos_or(in->total_timeout_s, MW_UPLOAD_DEFAULT_TOTAL_TIMEOUT_S);
    c->backoff_initial_s = mw_pos_or(in->backoff_initial_s, MW_UPLOAD_DEFAULT_BACKOFF_INITIAL_S);
    c->backoff_max_s = mw_pos_or(in->backoff_max_s, MW_UPLOAD_DEFAULT_BACKOFF_MAX_S);
    if (c->backoff_max_s < c->backoff_initial_s) c->backoff_max_s = c->backoff_initial_s;
    c->use_push_api = in->use_push_api != 0;
    if (!c->app_name || !c->auth_url || !c->spy_name || !c->user_agent)
        return mw_fail(u, "out of memory");
    if (!c->server_url) return mw_fail(u, "neither server_url nor api_key is set");
    if (!mw_is_http_url(c->server_url))
        return mw_fail(u, "server_url must start with http:// or https://");
    if (c->api_key && !c->tenant_id && !mw_is_http_url(c->auth_url))
        return mw_fail(u, "auth_url must start with http:// or https://");
    if (strstr(c->server_url, "{tenant}") && !c->tenant_id && !c->api_key)
        return mw_fail(u, "server_url contains {tenant} but there is no tenant_id nor api_key");
    if (c->tenant_id && !mw_valid_tenant(c->tenant_id))
        return mw_fail(u, "tenant_id must match [A-Za-z0-9_.-]{1,128}");

    u->easy = curl_easy_init();
    u->multi = curl_multi_init();
    u->resp = malloc(MW_RESP_CAP_AUTH + 1);
    if (!u->easy || !u->multi || !u->resp) return mw_fail(u, "cannot create the libcurl handles");
    char *name = c->tags ? mw_fmt("%s{%s}", c->app_name, c->tags) : strdup(c->app_name);
    if (name) {
        u->name_enc = curl_easy_escape(u->easy, name, 0);
        free(name);
    }
    u->spy_enc = curl_easy_escape(u->easy, c->spy_name, 0);
    if (!u->name_enc || !u->spy_enc) return mw_fail(u, "out of memory");
    if (c->tenant_id) {
        if (mw_set_tenant(u, c->tenant_id) != 0) return mw_fail(u, "out of memory");
    } else if (!strstr(c->server_url, "{tenant}")) {
        if (!(u->base = mw_subst_tenant(c->server_url, NULL))) return mw_fail(u, "out of memory");
    }
    mw_redact_url(u->base ? u->base : c->server_url, u->base_redacted, sizeof(u->base_redacted));
    u->rng = (uint64_t)mw_mono_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)u;
    if (u->rng == 0) u->rng = 0x9e3779b97f4a7c15ULL;

    mw_item_t *ring = calloc((size_t)c->queue_max, sizeof(*ring));
    if (!ring) return mw_fail(u, "out of memory");

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
    atomic_store(&g_abort_ns, INT64_MAX);

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&g_thread, NULL, mw_uploader_main, u);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_mutex_lock(&g.lock);
        g.running = 0;
        pthread_mutex_unlock(&g.lock);
        return mw_fail(u, "cannot create the uploader thread");
    }
    g_ctx = u;
    g_thread_alive = 1;
    g_start_error[0] = '\0';
    return 0;
}

int mw_upload_start(const mw_upload_config_t *cfg) {
    pthread_once(&g_once, mw_init_once);
    pthread_mutex_lock(&g_life);
    int rc = mw_start_locked(cfg);
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
static void mw_report_full(const char *url, int cap) {
    mw_report_line(MW_REPORT_UPLOAD_DROPPED,
                   "profile upload to %.200s: the queue of %d profile%s is full (the backend is "
                   "unreachable or slow); profiles are being dropped, oldest first, while it "
                   "stays full (MW_PROFILING_UPLOAD_QUEUE)",
                   url, cap, cap == 1 ? "" : "s");
}

int mw_upload_submit(const void *gz_pprof, size_t len, int64_t from_unix_s, int64_t until_unix_s) {
    if (!gz_pprof || len == 0) return -1;
    unsigned char *copy = malloc(len);
    if (!copy) return -1;
    memcpy(copy, gz_pprof, len);
    unsigned char *victim = NULL;
    char url[256] = "";
    int report_full = 0;

    pthread_mutex_lock(&g.lock);
    if (!g.running) {
        if (mw_report_open(MW_REPORT_UPLOAD_DROPPED)) snprintf(url, sizeof(url), "%s", g.url);
        pthread_mutex_unlock(&g.lock);
        free(copy);
        mw_report_line(MW_REPORT_UPLOAD_DROPPED,
                       "profile upload%s%.200s: a profile arrived while the uploader was not "
                       "running; it was dropped, not uploaded",
                       url[0] ? " to " : "", url);
        return -1;
    }
    g.stats.submitted++;
    if (g.count == g.cap) {
        g.stats.dropped_queue_full++;
        if (mw_report_open(MW_REPORT_UPLOAD_DROPPED)) {
            snprintf(url, sizeof(url), "%s", g.url);
            report_full = 1;
        }
        if (!g.busy) {
            victim = mw_pop_head_locked();
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
            if (report_full) mw_report_full(url, 1);
            return 0;
        }
    }
    mw_item_t *it = &g.ring[(g.head + g.count) % g.cap];
    it->data = copy;
    it->len = len;
    it->from_s = from_unix_s;
    it->until_s = until_unix_s;
    it->seq = ++g.next_seq;
    g.count++;
    if ((uint64_t)g.count > g.stats.queue_high) g.stats.queue_high = (uint64_t)g.count;
    int cap = g.cap;
    pthread_cond_signal(&g.wake);
    pthread_mutex_unlock(&g.lock);
    free(victim);
    if (report_full) mw_report_full(url, cap);
    return 0;
}

int mw_upload_flush(double deadline_s) {
    int64_t end = mw_mono_ns() + mw_secs_to_ns(deadline_s);
    pthread_mutex_lock(&g.lock);
    while (g.running && g.count > 0 && mw_mono_ns() < end)
        mw_timedwait_locked(&g.idle, end);
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
    int64_t deadline = mw_mono_ns() + mw_secs_to_ns(deadline_s);
    pthread_mutex_lock(&g.lock);
    g.stopping = 1;
    g.stop_deadline_ns = deadline;
    pthread_cond_broadcast(&g.wake);
    pthread_mutex_unlock(&g.lock);
    atomic_store(&g_abort_ns, deadline);
    curl_multi_wakeup(g_ctx->multi);

    struct timespec abs;
    clock_gettime(CLOCK_REALTIME, &abs);
    int64_t guard = (int64_t)abs.tv_sec * MW_NS_PER_S + abs.tv_nsec + mw_secs_to_ns(deadline_s) +
                    mw_secs_to_ns(g_ctx->cfg.total_timeout_s) + 2 * MW_NS_PER_S;
    abs = mw_ns_to_ts(guard);
    if (pthread_timedjoin_np(g_thread, NULL, &abs) == 0) {
        mw_ctx_free(g_ctx);
    } else { /* should not happen: give up on the thread rather than hang the app */
        pthread_detach(g_thread);
        g_zombie = 1;
    }
    g_ctx = NULL;
    g_thread_alive = 0;
    pthread_mutex_lock(&g.lock);
    g.stopping = 0;
    pthread_mutex_unlock(&g.lock);
    atomic_store(&g_abort_ns, INT64_MAX);
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
    mw_msg_t *m = &g.msgs[g.msg_head];
    int level = m->level;
    if (buf && n > 0) snprintf(buf, n, "%s", m->text);
    g.msg_head = (g.msg_head + 1) % MW_MSG_SLOTS;
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
    mw_init_conds();
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
    atomic_store(&g_abort_ns, INT64_MAX);
    if (g_core) g_core->report_reset_after_fork(); /* the child reports its own failures once */
}
