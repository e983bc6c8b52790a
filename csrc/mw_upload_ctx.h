/* mw_upload_ctx — the context of one uploader thread, shared by the uploader's files.
 *
 * The uploader (contract in mw_upload.h) is built from five files, one concern each:
 *   mw_upload.c         the queue, the uploader thread and its lifecycle (start, stop, fork)
 *   mw_upload_config.c  the uploader's copy of its configuration: checks, defaults, freeing
 *   mw_upload_http.c    HTTP: libcurl, the profile request, status classes, backoff, Retry-After
 *   mw_upload_tenant.c  the tenant: API key -> tenant exchange, {tenant} in the server URL
 *   mw_upload_json.c    reading the exchange's JSON answer (json-c)
 * and, for the OTLP exporter, mw_otlp.c (pprof -> OTLP request, a pure function; with
 * mw_otlp_tables.c and mw_otlp_codec.c).
 * This header holds what the first four share: the uploader's copy of its configuration and
 * the context of the uploader thread (mw_uploader_t), plus two clock helpers.
 *
 * Memory and threads
 *   mw_upload_start() allocates a context, fills it (mw_upload_http_init, mw_upload_tenant_set
 *   when a tenant id is given) and hands it to the uploader thread, which from then on is the
 *   only one to read or write it. The one exception is mw_upload_stop(), which aborts a request
 *   through mw_upload_http_abort_at() (an atomic store and curl_multi_wakeup(), both safe from
 *   any thread) and frees the context after joining the thread. A forked child forgets (leaks)
 *   its parent's context. So no lock guards the context but fds_mu, which guards what
 *   mw_upload_http_abort_at() reads (the multi handle, and the descriptors it must still own
 *   to wake it): no other field is ever read by one thread while another writes it.
 *   Every string of cfg is owned (malloc'd, or NULL) and zeroed before it is freed: some hold
 *   secrets (api_key, bearer_token, basic_password).
 */
#ifndef MW_UPLOAD_CTX_H
#define MW_UPLOAD_CTX_H

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define MW_NS_PER_S 1000000000LL
#define MW_UPLOAD_FDS 32 /* descriptors of the handles watched (connections, the wakeup pair) */

/* The configuration, copied by mw_upload_start() with the defaults of mw_upload.h applied
 * (mw_upload_config.h). */
typedef struct mw_upload_cfg {
    char *server_url, *app_name, *tags, *tenant_id, *auth_url, *api_key, *bearer_token, *basic_user,
        *basic_password, *spy_name, *user_agent, *ca_file, *ca_path;
    int sample_rate, queue_max, use_push_api;
    double connect_timeout_s, total_timeout_s, backoff_initial_s, backoff_max_s;
    /* OTLP exporter: header lines ("Name: value"), resource attributes, sdk version */
    int otlp, otlp_gzip;
    char **header_lines;
    size_t n_headers;
    char **res_keys, **res_values;
    size_t n_resource;
    char *sdk_version;
} mw_upload_cfg_t;

typedef struct mw_uploader {
    mw_upload_cfg_t cfg;

    /* HTTP (mw_upload_http.c) */
    CURL *easy;
    CURLM *multi;
    _Atomic int64_t abort_ns; /* monotonic time after which a request is aborted */
    char errbuf[CURL_ERROR_SIZE];
    char *resp; /* the last response's body, at most resp_cap bytes kept */
    size_t resp_len, resp_cap;
    char *name_enc, *spy_enc; /* URL-encoded ?name= and &spyName= values (curl_free) */
    uint64_t rng;             /* xorshift64* state: backoff jitter, push sample ids */
    /* the descriptors the handles hold, each with its device and inode: the app may close them
     * (a daemon closing every descriptor) and reuse the numbers (mw_upload_http.c) */
    pthread_mutex_t fds_mu; /* guards fds, nfds, and easy/multi as mw_upload_http_abort_at reads */
    struct mw_upload_fd {
        int fd;
        dev_t dev;
        ino_t ino;
    } fds[MW_UPLOAD_FDS];
    int nfds, fds_mu_ok;
    uint64_t fds_lost; /* handles abandoned because a descriptor of theirs was no longer ours */

    /* the tenant (mw_upload_tenant.c) */
    char *tenant; /* NULL until known */
    char *base;   /* server URL with the tenant substituted, no trailing '/'; NULL until known */
    char base_redacted[256]; /* the same without user:password@, for messages */

    /* the uploader thread (mw_upload.c) */
    int fail_streak, auth_streak; /* consecutive failed uploads / exchanges */
    int outage, auth_reported;
    uint64_t outage_failures;
    char last_error[160]; /* the last retried failure, for the line about profiles dropped */
} mw_uploader_t;

static inline int64_t mw_upload_mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * MW_NS_PER_S + ts.tv_nsec;
}

/* Seconds to nanoseconds, capped at 1e6 s; 0 for anything not > 0 (also NaN). */
static inline int64_t mw_upload_secs_to_ns(double s) {
    if (!(s > 0)) return 0;
    if (s > 1e6) s = 1e6;
    return (int64_t)(s * 1e9);
}

#endif /* MW_UPLOAD_CTX_H */
