/*
 * mw_upload — the native uploader: a bounded queue of gzipped pprof profiles drained by one
 * background pthread that POSTs them to a Pyroscope-compatible backend with libcurl
 * (docs/interfaces.md, "Native module: upload part"; the push API is Pyroscope's /ingest).
 *
 * Two modules
 *   The uploader is built into its own extension module, middleware._upload (mw_upload*.c,
 *   listed in mw_upload_ctx.h, mw_module_upload.c, gen/push.pb-c.c; linked against libcurl and
 *   json-c), so a process that only writes the local store never loads libcurl, json-c and
 *   their libraries. middleware._native (sampler, exporter, mw_report) links neither and
 *   calls none of the mw_upload_* functions below directly: the modules reach each other only
 *   through the two tables at the end of this header.
 *
 * Data path
 *   exporter thread --mw_upload_submit()--> queue (<= queue_max profiles, oldest dropped)
 *   uploader thread --libcurl--> POST {server}/ingest?name=...&from=...&until=...
 *                                (or {server}/push.v1.PusherService/Push with use_push_api)
 *   With use_push_api the body is a push.v1.PushRequest (proto/push.proto, Content-Type
 *   application/proto) holding one RawProfileSeries: labels __name__=<the profile's name>,
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
 * Upload outcome per HTTP status (docs/protocol.md, "Answers, retries and the queue")
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
 * What the user sees (mw_report, through the core table: one stderr line per kind and process)
 *   Each line names the backend URL (without any user:password@), the HTTP status or the
 *   libcurl error, and what happens to the profiles; never a key, token or password.
 *   MW_REPORT_UPLOAD_AUTH         401/403 from the profiling endpoint (profile dropped) or from
 *                                 the key exchange (profiles kept, exchange retried)
 *   MW_REPORT_UPLOAD_REJECTED     another non-retryable status (profile dropped)
 *   MW_REPORT_UPLOAD_UNREACHABLE  any retried failure: transport errors (refused, timeout, DNS,
 *                                 garbage reply), 408/429/5xx, an unusable key-exchange answer
 *                                 (profiles kept, retried with backoff)
 *   MW_REPORT_UPLOAD_DROPPED      profiles dropped without a backend answer: queue full, stop
 *                                 deadline passed, submitted while the uploader is not running
 *   Lines are written outside the internal mutex (a blocked stderr never blocks a submit).
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
 *
 * OTLP exporter (exporter = "otlp")
 *   Each profile is sent as an OTLP profiles ExportProfilesServiceRequest (mw_otlp.h) with
 *   POST <server_url> (the full URL, used as is: no {tenant}, no path added), Content-Type
 *   application/x-protobuf, the configured header lines (header_names/header_values) and, with
 *   otlp_gzip, Content-Encoding: gzip. The uploader thread converts the submitted pprof before
 *   its first attempt and keeps the request for the retries; a pprof that cannot be converted is
 *   dropped (dropped_rejected++, convert_failed++, one message and one
 *   MW_REPORT_UPLOAD_REJECTED line). No key exchange, tenant, bearer or basic auth, push API nor
 *   query string in this mode. Statuses, retries, backoff, the queue and the lines are the same.
 */
#ifndef MW_UPLOAD_H
#define MW_UPLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "mw_report.h" /* the kinds only: the uploader reports through mw_core_api_t */

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
    int use_push_api;     /* POST {server}/push.v1.PusherService/Push instead of /ingest */
    const char *ca_file;  /* CA certificates (PEM) for https, may be NULL: libcurl's built-in */
    const char *ca_path;  /* directory of hashed CA certificates, may be NULL: libcurl's built-in */
    const char *exporter; /* "pyroscope" (or NULL/"") or "otlp"; anything else fails the start */
    /* OTLP only: extra request headers (names are HTTP tokens, values without control
     * characters), n_headers of each */
    const char *const *header_names, *const *header_values;
    size_t n_headers;
    /* OTLP only: extra resource attributes (mw_otlp.h), n_resource of each */
    const char *const *resource_keys, *const *resource_values;
    size_t n_resource;
    const char *sdk_version; /* OTLP only: telemetry.sdk.version and the scope's version */
    int otlp_gzip;           /* OTLP only: gzip the request (Content-Encoding: gzip) */
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
 * Queues one profile covering [from_unix_s, until_unix_s], of the series `name` (the push API's
 * __name__: "process_cpu", "block"; NULL or "" = "process_cpu", at most 31 bytes kept). Copies the
 * buffer (the caller keeps ownership of gz_pprof), never waits for anything but the internal mutex,
 * never touches Python. When queue_max profiles are already held, the oldest one that is not on the
 * wire is dropped (dropped_queue_full++); if queue_max == 1 and that single profile is on the wire,
 * the new profile is dropped instead. Returns 0 when queued, -1 when the uploader is not running,
 * len == 0, or the copy cannot be allocated (the profile is then not counted as submitted).
 * Any thread; typically the exporter thread.
 */
int mw_upload_submit(const void *gz_pprof, size_t len, int64_t from_unix_s, int64_t until_unix_s,
                     const char *name);

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
    uint64_t queued;             /* profiles held right now (waiting + on the wire) */
    uint64_t queue_high;         /* highest value `queued` reached since start (<= queue_max) */
    uint64_t convert_failed;     /* OTLP: profiles that could not be converted (also rejected) */
    uint64_t fds_lost; /* libcurl handles renewed: the app had closed a descriptor of theirs */
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
 * mw_upload_submit()). It also calls the core table's report_reset_after_fork (idempotent), so
 * a child reports its own upload failures once.
 */
void mw_upload_atfork_child(void);

/* ---------------------------------------------------------------- between the two modules
 *
 *   _native --PyCapsule MW_CORE_API_CAPSULE--> _upload   mw_core_api_t: mw_report for the
 *                                                         uploader's lines, and set_uploader
 *   _upload --core->set_uploader(&table)-----> _native   mw_upload_api_t: what the exporter
 *                                                         calls to hand over a profile
 *
 * middleware._upload's module init imports the capsule (PyCapsule_Import imports
 * middleware._native), refuses to load when abi differs, keeps the core table
 * (mw_upload_set_core) and registers its own table; the registration is never undone (an
 * extension module is never unloaded). So "the uploader table is set" == "middleware._upload
 * is loaded in this process". Both tables are static and immutable.
 *
 * In middleware._native (csrc/mw_module.c) the Python functions upload_start, upload_submit,
 * upload_flush, upload_stop, upload_running, upload_stats and upload_take_message forward to
 * the same functions of middleware._upload; upload_start imports it (the only place where it is
 * imported), and an import failure there is an ImportError plus one MW_REPORT_UPLOAD_DROPPED
 * line. Before that the others answer as a stopped uploader would, without importing it.
 */
#define MW_UPLOAD_ABI 3 /* bump on any change to the two tables */
#define MW_CORE_API_CAPSULE "middleware._native._core_api"

typedef struct mw_upload_api {
    int abi; /* MW_UPLOAD_ABI */
    /* mw_upload_submit: any thread, never touches Python */
    int (*submit)(const void *gz_pprof, size_t len, int64_t from_unix_s, int64_t until_unix_s,
                  const char *name);
    int (*flush)(double deadline_s); /* mw_upload_flush: any thread but the uploader's */
} mw_upload_api_t;

typedef struct mw_core_api {
    int abi;                                                         /* MW_UPLOAD_ABI */
    int (*report_once)(mw_report_kind_t kind, const char *fmt, ...); /* mw_report_once */
    int (*report_done)(mw_report_kind_t kind);                       /* mw_report_done */
    void (*report_reset_after_fork)(void);              /* mw_report_reset_after_fork */
    void (*set_uploader)(const mw_upload_api_t *table); /* GIL held (module init) */
} mw_core_api_t;

/* middleware._upload: the core table the uploader reports through (NULL: no reports). Set by
 * the module init before any other function here is called; the table must outlive the
 * process. */
void mw_upload_set_core(const mw_core_api_t *core);

/* middleware._native (csrc/mw_module.c): mw_upload_submit through the registered table, same
 * contract; -1 and one MW_REPORT_UPLOAD_DROPPED line when middleware._upload is not loaded.
 * Any thread; what the exporter calls. */
int mw_upload_submit_registered(const void *gz_pprof, size_t len, int64_t from_unix_s,
                                int64_t until_unix_s, const char *name);
/* mw_upload_flush through the registered table, same contract; 0 when middleware._upload is not
 * loaded. Any thread but the uploader's. */
int mw_upload_flush_registered(double deadline_s);

/* Python side, both modules: the mw_upload_stats_t fields as a new dict (NULL with an error
 * set). Visible only to files that include <Python.h> before this header. */
#ifdef Py_PYTHON_H
static inline PyObject *mw_upload_stats_dict(const mw_upload_stats_t *s) {
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:L,s:K,s:K,s:K,s:K}", "submitted",
        (unsigned long long)s->submitted, "uploaded", (unsigned long long)s->uploaded,
        "failed_attempts", (unsigned long long)s->failed_attempts, "retried",
        (unsigned long long)s->retried, "dropped_queue_full",
        (unsigned long long)s->dropped_queue_full, "dropped_rejected",
        (unsigned long long)s->dropped_rejected, "dropped_at_exit",
        (unsigned long long)s->dropped_at_exit, "auth_ok", (unsigned long long)s->auth_ok,
        "auth_failed", (unsigned long long)s->auth_failed, "last_status",
        (unsigned long long)s->last_status, "last_error_unix_s", (long long)s->last_error_unix_s,
        "queued", (unsigned long long)s->queued, "queue_high", (unsigned long long)s->queue_high,
        "convert_failed", (unsigned long long)s->convert_failed, "fds_lost",
        (unsigned long long)s->fds_lost);
}
#endif

#endif /* MW_UPLOAD_H */
