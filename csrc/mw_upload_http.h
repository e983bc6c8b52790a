/* mw_upload_http — the uploader's HTTP side: libcurl, the request that carries one profile,
 * status classes, backoff and Retry-After.
 *
 * Requests
 *   One easy handle per uploader (connections and DNS results are reused) driven by a private
 *   multi handle, so that the wait for the network can be cut short from another thread: once
 *   the time set by mw_upload_http_abort_at() has passed, a request in flight is abandoned
 *   within a few milliseconds (MW_HTTP_ABORTED). Only http:// and https:// are followed; no
 *   signals are used (CURLOPT_NOSIGNAL). At most resp_cap bytes of a response body are kept
 *   (in u->resp / u->resp_len, valid until the next request); the rest is read and discarded.
 *
 * Status classes (the outcome of one request)
 *   MW_HTTP_OK       2xx
 *   MW_HTTP_RETRY    transport errors (refused, timeout, DNS, reset, garbage reply, out of
 *                    memory before sending), 408, 429, 5xx, and statuses below 100
 *   MW_HTTP_REJECT   every other 3xx/4xx: the request will not succeed as it is
 *   MW_HTTP_ABORTED  the abort time passed while the request was in flight
 *
 * Backoff
 *   After `streak` consecutive failures the next attempt waits
 *   backoff_initial_s * 2^(streak-1), capped at backoff_max_s and jittered into [d/2, d]; a
 *   Retry-After header (seconds or an HTTP date, as libcurl reads it) replaces that delay,
 *   still capped at backoff_max_s.
 *
 * Threads, locks, memory
 *   Every function taking a context runs on the uploader thread (mw_upload_ctx.h), except
 *   mw_upload_http_init / mw_upload_http_free (the lifecycle: before the thread starts, after it
 *   is joined) and mw_upload_http_abort_at (any thread while the context is alive). The only
 *   lock taken is u->fds_mu (the records of the handles' descriptors, held around a few system
 *   calls, never while waiting), and none may be called with the uploader's queue lock held (they
 *   wait for the network). The functions without a context are pure and may run on any thread.
 *   Strings returned to the caller are malloc'd and the caller frees them; the context owns the
 *   handles, the response buffer and the encoded query values.
 *
 * Descriptors
 *   The handles' descriptors (connections, the multi handle's wakeup pair) are checked before
 *   each request, wait and wakeup: one the app closed (its number may be a file of the app's now)
 *   makes the handles abandoned, never cleaned up, and new ones made (u->fds_lost).
 */
#ifndef MW_UPLOAD_HTTP_H
#define MW_UPLOAD_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "mw_upload_ctx.h"

#define MW_UPLOAD_RESP_CAP 65536 /* the largest response body kept (the exchange's answer) */

typedef enum { MW_HTTP_OK, MW_HTTP_RETRY, MW_HTTP_REJECT, MW_HTTP_ABORTED } mw_http_outcome_t;

typedef struct mw_upload_resp {
    CURLcode cc;           /* CURLE_OK when an HTTP answer arrived */
    long status;           /* its status, when cc == CURLE_OK */
    int64_t retry_after_s; /* its Retry-After in seconds, 0 = none */
    int aborted;           /* abandoned at the abort time */
} mw_upload_resp_t;

/* Once per process (curl_global_init), before the first mw_upload_http_init. */
void mw_upload_http_global_init(void);

/* Creates u's handles and response buffer, URL-encodes the ingest query values from u->cfg
 * (name = app_name{tags}, spyName), seeds u->rng and clears the abort time. 0, or -1 with a
 * static reason in *why (what is already created is freed by mw_upload_http_free). */
int mw_upload_http_init(mw_uploader_t *u, const char **why);

/* Frees what mw_upload_http_init created; NULL fields are skipped. */
void mw_upload_http_free(mw_uploader_t *u);

/* Aborts requests of u once the monotonic clock reaches mono_ns (INT64_MAX: never), waking a
 * request that waits for the network now. Any thread. */
void mw_upload_http_abort_at(mw_uploader_t *u, int64_t mono_ns);

/* POSTs body[len] to url with the given header lines and u's user agent and timeouts (and,
 * with basic_auth, u's basic credentials unless a bearer token is configured). A NULL url,
 * body or header line (one that could not be allocated) fails as out of memory without
 * sending anything. Fills *r; returns the outcome. */
mw_http_outcome_t mw_upload_http_post(mw_uploader_t *u, const char *url, const char *const *lines,
                                      size_t nlines, const void *body, size_t len, size_t resp_cap,
                                      int basic_auth, mw_upload_resp_t *r);

/* Sends one gzipped pprof covering [from_s, until_s] to u->base: POST /ingest?name=...&from=
 * ...&until=...&format=pprof&sampleRate=...&spyName=... with the profile as the body, or, with
 * use_push_api, POST /push.v1.PusherService/Push with a push.v1.PushRequest around it (labels
 * __name__=<name>, service_name=<app_name> and the static tags, one RawSample with a
 * random UUID). X-Scope-OrgID carries u->tenant, Authorization the bearer token; the API key
 * is never sent. With the OTLP exporter (u->cfg.otlp) data is the OTLP request already: POST
 * u->base as is, Content-Type application/x-protobuf, Content-Encoding gzip when configured,
 * and the configured header lines. data stays the caller's. Fills *r; returns the outcome. */
mw_http_outcome_t mw_upload_http_send_profile(mw_uploader_t *u, const void *data, size_t len,
                                              int64_t from_s, int64_t until_s, const char *name,
                                              mw_upload_resp_t *r);

/* The failure of *r in words: libcurl's error (and its detail) or "HTTP <status>". */
void mw_upload_http_describe(const mw_uploader_t *u, const mw_upload_resp_t *r, char *out,
                             size_t n);

/* What a rejected status asks the user to check (static text; otlp: for the OTLP exporter's
 * settings). Pure. */
const char *mw_upload_http_reject_hint(long status, int otlp);

/* Delay before the next attempt after `streak` consecutive failures (see Backoff). */
int64_t mw_upload_http_backoff_ns(mw_uploader_t *u, int streak, int64_t retry_after_s);

/* printf into a new malloc'd string; NULL on failure. Pure. */
char *mw_upload_http_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* url without any user:password@ part, into out[n], for messages. Pure. */
void mw_upload_http_redact_url(const char *url, char *out, size_t n);

/* A printable, single-line copy of a response body, cut to 160 bytes ("..." when cut), into
 * out[n], for messages. Pure. */
void mw_upload_http_snippet(const char *body, size_t len, char *out, size_t n);

#endif /* MW_UPLOAD_HTTP_H */
