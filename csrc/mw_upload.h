/*
 * mw_upload — the native uploader: a bounded queue of gzipped pprof profiles drained by one
 * background pthread that POSTs them to a Pyroscope-compatible backend with libcurl
 * (see /work/shared/PROTOCOL.md, "Every upload").
 *
 * Data path
 *   exporter thread --mw_upload_submit()--> queue (<= queue_max profiles, oldest dropped)
 *   uploader thread --libcurl--> POST {server}/ingest?name=...&from=...&until=...
 *                                (or {server}/push.v1.PusherService/Push with use_push_api)
 *   With use_push_api the body is a push.v1.PushRequest (proto/push.proto, Content-Type
 *   application/proto) holding one RawProfileSeries: labels __name__=process_cpu,
 *   service_name=<app_name> and the static tags (except __name__/service_name), and one
 *   RawSample{raw_profile = the submitted bytes, ID = a random UUID}. Headers, auth and status
 *   handling are the same as for /ingest.
 *
 * Threads and locks
 *   - One uploader thread per process, started by mw_upload_start(), all signals blocked. It
 *     never touches Python, never holds the GIL, and owns the libcurl handles.
 *   - Every piece of shared state (queue, statistics, message ring) is guarded by one internal
 *     mutex that is never held across network I/O or a wait, so mw_upload_submit() and
 *     mw_upload_get_stats() only ever wait for that mutex (a few memcpy-sized critical
 *     sections).
 *   - mw_upload_start() / mw_upload_stop() / mw_upload_flush() may be called from any thread but
 *     not from a signal handler; start and stop are serialized by a second (lifecycle) mutex.
 *   - No function here is async-signal-safe.
 *
 * Upload outcome per HTTP status (PROTOCOL.md)
 *   2xx                    -> delivered (uploaded++), profile freed.
 *   408, 429, 5xx, transport errors (refused, timeout, reset, garbage reply)
 *                          -> retried after a jittered exponential backoff
 *                             (backoff_initial_s * 2^(n-1), capped at backoff_max_s, jittered
 *                             into [d/2, d]); a Retry-After header (seconds or HTTP date) sets
 *                             the delay instead, still capped at backoff_max_s.
 *   other 3xx/4xx          -> rejected: not retried, profile dropped (dropped_rejected++), and
 *                             ONE message per distinct status is queued for the Python layer
 *                             (mw_upload_take_message).
 *   The first failure of an outage and the recovery after it also queue one message each.
 *
 * Key -> tenant exchange
 *   When api_key is set and tenant_id is not, the uploader thread first POSTs to auth_url
 *   (Authorization: Bearer <api_key>, Content-Type: application/x-www-form-urlencoded, empty
 *   body) and reads data.project_uid from {"success":true,"data":{"project_uid":"..."}}. This is
 *   done once per mw_upload_start(), before the first upload, retried with the same backoff
 *   until it succeeds (profiles wait in the queue meanwhile). The tenant must match
 *   [A-Za-z0-9_.-]{1,128}. The API key is never sent to the profiling endpoint.
 *
 * Server URL
 *   Every occurrence of "{tenant}" in server_url is replaced by the tenant id. When server_url
 *   is NULL or empty and api_key is set, it defaults to "https://{tenant}.middleware.io/profiling".
 *   A trailing '/' is ignored. Only http:// and https:// are accepted.
 */
#ifndef MW_UPLOAD_H
#define MW_UPLOAD_H

#include <stddef.h>
#include <stdint.h>

/* Defaults applied by mw_upload_start() to fields that are NULL, <= 0 or not finite. */
#define MW_UPLOAD_DEFAULT_QUEUE_MAX 16
#define MW_UPLOAD_DEFAULT_SAMPLE_RATE 100
#define MW_UPLOAD_DEFAULT_CONNECT_TIMEOUT_S 5.0
#define MW_UPLOAD_DEFAULT_TOTAL_TIMEOUT_S 30.0
#define MW_UPLOAD_DEFAULT_BACKOFF_INITIAL_S 1.0
#define MW_UPLOAD_DEFAULT_BACKOFF_MAX_S 60.0
#define MW_UPLOAD_DEFAULT_AUTH_URL "https://app.middleware.io/api/v1/auth"
#define MW_UPLOAD_DEFAULT_SERVER_URL "https://{tenant}.middleware.io/profiling"
#define MW_UPLOAD_DEFAULT_SPY_NAME "middleware-python"
#define MW_UPLOAD_DEFAULT_USER_AGENT "middleware-python"
#define MW_UPLOAD_QUEUE_MAX_LIMIT 4096 /* larger queue_max values are clamped to this */

/*
 * Configuration. All strings are borrowed for the duration of mw_upload_start() only; the
 * uploader keeps its own copies. Strings that end up in an HTTP header (tenant_id, api_key,
 * bearer_token, basic_user, basic_password, user_agent) and the URLs must not contain control
 * characters; mw_upload_start() fails otherwise.
 */
typedef struct mw_upload_config {
    const char *server_url;   /* base URL, e.g. http://127.0.0.1:4040 ; ingest at {server}/ingest */
    const char *app_name;     /* service name, e.g. "svc" (required, non-empty) */
    const char *tags;         /* "k=v,k=v" static tags appended as name=svc{k=v,...}, may be NULL.
                                 Not validated here: the Python layer validates label names. */
    const char *tenant_id;    /* X-Scope-OrgID, may be NULL; when set no key exchange is done */
    const char *auth_url;     /* key -> tenant exchange URL (default MW_UPLOAD_DEFAULT_AUTH_URL) */
    const char *api_key;      /* never sent to the profiling endpoint */
    const char *bearer_token; /* optional Authorization: Bearer (self-hosted) */
    const char *basic_user, *basic_password; /* optional basic auth; ignored if bearer_token */
    const char *spy_name;                    /* spyName query parameter */
    const char *user_agent;                  /* "middleware-python/<version>" */
    int sample_rate;                         /* sampleRate query parameter (Hz) */
    int queue_max; /* max profiles held (waiting + on the wire); oldest waiting one dropped */
    double connect_timeout_s, total_timeout_s; /* per HTTP request */
    double backoff_initial_s, backoff_max_s;
    int use_push_api; /* POST {server}/push.v1.PusherService/Push instead of /ingest */
} mw_upload_config_t;

/*
 * Copies *cfg (applying the defaults above), resets the statistics and message ring, and
 * starts the uploader thread with all signals blocked. Calls curl_global_init() once per
 * process (never cleaned up). Returns 0, or -1 when already running, when the configuration is
 * unusable (no app_name, no server_url and no api_key, bad URL, control characters) or when a
 * resource cannot be created; mw_upload_start_error() then describes why.
 */
int mw_upload_start(const mw_upload_config_t *cfg);

/* Reason of the last failed mw_upload_start() ("" if none). Static storage; same caller. */
const char *mw_upload_start_error(void);

/* 1 while an uploader thread is running (between a successful start and the end of stop). */
int mw_upload_is_running(void);

/*
 * Queues one profile covering [from_unix_s, until_unix_s]. Copies the buffer (the caller keeps
 * ownership of gz_pprof), never waits for anything but the internal mutex, never touches
 * Python. When queue_max profiles are already held, the oldest one that is not on the wire is
 * dropped (dropped_queue_full++); if queue_max == 1 and that single profile is on the wire, the
 * new profile is dropped instead. Returns 0 when queued, -1 when the uploader is not running,
 * len == 0, or the copy cannot be allocated (the profile is then not counted as submitted).
 * Any thread; typically the exporter thread.
 */
int mw_upload_submit(const void *gz_pprof, size_t len, int64_t from_unix_s, int64_t until_unix_s);

/*
 * Waits until every held profile is delivered or dropped, or deadline_s seconds (relative,
 * monotonic) have passed. Does not shorten a running backoff. Returns the number of profiles
 * still held (0 = empty queue). Returns 0 immediately when not running. Never call it from the
 * uploader thread.
 */
int mw_upload_flush(double deadline_s);

/*
 * Final flush then shutdown: the uploader keeps delivering until the queue is empty or
 * deadline_s seconds have passed; at the deadline an in-flight request is aborted (within a few
 * milliseconds: the transfer loop is woken with curl_multi_wakeup) and the remaining profiles
 * are dropped (dropped_at_exit++). Then joins the thread, frees the queue and the libcurl
 * handles. As a last guard the join itself gives up deadline_s + total_timeout_s + 2 s after
 * the call (the thread is then detached and the uploader cannot be restarted in this process).
 * Statistics stay readable after stop. No-op when not running.
 */
void mw_upload_stop(double deadline_s);

typedef struct {
    uint64_t submitted;          /* profiles accepted by mw_upload_submit */
    uint64_t uploaded;           /* profiles acknowledged with a 2xx */
    uint64_t failed_attempts;    /* HTTP attempts that did not end in 2xx (includes rejected) */
    uint64_t retried;            /* attempts that were retries of an earlier failed attempt */
    uint64_t dropped_queue_full; /* dropped because the queue was full */
    uint64_t dropped_rejected;   /* dropped after a non-retryable status (401/403/400/...) */
    uint64_t dropped_at_exit;    /* still held when mw_upload_stop's deadline passed */
    uint64_t auth_ok;            /* successful key -> tenant exchanges (0 or 1 per start) */
    uint64_t auth_failed;        /* failed key -> tenant attempts */
    uint64_t last_status;        /* HTTP status of the last upload attempt, 0 = transport error */
    int64_t last_error_unix_s;   /* wall-clock time of the last failed attempt, 0 = never */
    /* additions to the interface in the brief: */
    uint64_t queued;     /* profiles held right now (waiting + on the wire) */
    uint64_t queue_high; /* highest value `queued` reached since start (<= queue_max) */
} mw_upload_stats_t;

/*
 * Snapshot of the counters (reset by mw_upload_start). Invariant once stopped:
 * submitted == uploaded + dropped_queue_full + dropped_rejected + dropped_at_exit.
 * Any thread.
 */
void mw_upload_get_stats(mw_upload_stats_t *out);

/*
 * Pops the next pending human-readable message (rejections, auth problems, start/end of an
 * outage) into buf (NUL-terminated, truncated to n - 1 bytes; buf may be NULL when n == 0).
 * Returns 0 when there is none, else the Python logging level of the message (20 = INFO,
 * 30 = WARNING, 40 = ERROR). At most 16 messages are kept; older ones are overwritten.
 * Messages never contain the API key, tokens or passwords. Any thread.
 */
int mw_upload_take_message(char *buf, size_t n);

/*
 * Fork support: call in a forked child (after fork, before anything else here). Forgets the
 * parent's uploader: re-creates the locks (another thread may have held them at fork time),
 * forgets the queue and the libcurl handles without freeing them (the queue may have been
 * mid-update; cleaning the handles up would shut down connections the parent still uses), and
 * leaves the uploader stopped with zeroed statistics, ready for mw_upload_start(). Idempotent.
 * The first mw_upload_start() registers it with pthread_atfork(), so callers normally need not
 * call it; there is deliberately no prepare handler (taking the queue lock before fork could
 * invert the lock order with a thread that holds its own lock while calling
 * mw_upload_submit()).
 */
void mw_upload_atfork_child(void);

/* The Python method table (csrc/mw_module_upload.c), appended by csrc/mw_module.c. Visible
 * only to files that include <Python.h> before this header. */
#ifdef Py_PYTHON_H
extern PyMethodDef mw_upload_methods[];
#endif

#endif /* MW_UPLOAD_H */
