/* mw_upload_http — the uploader's HTTP side; contract in mw_upload_http.h.
 *
 * A request is the easy handle added to the private multi handle and driven by
 * curl_multi_perform() / curl_multi_poll(): the poll waits at most until the abort time (and
 * never more than a second), and curl_multi_wakeup() from mw_upload_http_abort_at() ends it
 * early, so a stop deadline is kept within milliseconds instead of when libcurl's own
 * timeouts fire. Between requests curl_easy_reset() clears the options but keeps the
 * connection and DNS caches.
 *
 * The handles keep descriptors between requests: the connections (opened and closed through
 * open_socket / close_socket) and the multi handle's wakeup pair (found as the descriptors that
 * appear across curl_multi_init). An app may close every descriptor it did not open (a daemon)
 * and get the numbers for its own files, pipes and sockets: libcurl would then write a request
 * into them, read them and close them. Each descriptor is recorded with its device and inode
 * (a socket's are its own) and checked before each request, each wait and each wakeup; when one
 * is not ours any more the handles are abandoned (never cleaned up: that would close the app's
 * numbers), the descriptors still ours are closed, and new handles take over.
 */
#define _GNU_SOURCE
#include "mw_upload_http.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "push.pb-c.h" /* generated from proto/push.proto (csrc/gen) */

#define RESP_CAP_INGEST 2048 /* the ingest answer is only shown in messages */
#define SNIPPET_MAX 160

void mw_upload_http_global_init(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* ---------------------------------------------------------------- the handles' descriptors */

#define FDMAP 65536 /* descriptors above are not watched */

/* The descriptors open now, one bit each (NULL: /proc not there, or out of memory). */
static uint8_t *open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return NULL;
    uint8_t *map = calloc(FDMAP / 8, 1);
    struct dirent *e;
    while (map && (e = readdir(d)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        long fd = strtol(e->d_name, NULL, 10);
        if (fd >= 0 && fd < FDMAP) map[fd / 8] |= (uint8_t)(1u << (fd % 8));
    }
    closedir(d);
    return map;
}

static void fd_record(mw_uploader_t *u, int fd) { /* fds_mu held */
    struct stat st;
    if (u->nfds < MW_UPLOAD_FDS && fstat(fd, &st) == 0)
        u->fds[u->nfds++] = (struct mw_upload_fd){fd, st.st_dev, st.st_ino};
}

static int fd_still_ours(const struct mw_upload_fd *f) {
    struct stat st;
    return fstat(f->fd, &st) == 0 && st.st_dev == f->dev && st.st_ino == f->ino;
}

static int fds_intact(const mw_uploader_t *u) { /* fds_mu held */
    for (int i = 0; i < u->nfds; i++)
        if (!fd_still_ours(&u->fds[i])) return 0;
    return 1;
}

static int handles_intact(mw_uploader_t *u) {
    pthread_mutex_lock(&u->fds_mu);
    int ok = u->easy && u->multi && fds_intact(u);
    pthread_mutex_unlock(&u->fds_mu);
    return ok;
}

/* CURLOPT_OPENSOCKETFUNCTION: a connection's socket, recorded. */
static curl_socket_t open_socket(void *ud, curlsocktype purpose, struct curl_sockaddr *a) {
    (void)purpose;
    mw_uploader_t *u = ud;
    int fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
    if (fd < 0) return CURL_SOCKET_BAD;
    pthread_mutex_lock(&u->fds_mu);
    fd_record(u, fd);
    pthread_mutex_unlock(&u->fds_mu);
    return fd;
}

/* CURLOPT_CLOSESOCKETFUNCTION: closed while it is still the socket opened (one not recorded,
 * past MW_UPLOAD_FDS, is closed as libcurl would). */
static int close_socket(void *ud, curl_socket_t fd) {
    mw_uploader_t *u = ud;
    int ours = 1;
    pthread_mutex_lock(&u->fds_mu);
    for (int i = 0; i < u->nfds; i++)
        if (u->fds[i].fd == fd) {
            ours = fd_still_ours(&u->fds[i]);
            u->fds[i] = u->fds[--u->nfds];
            break;
        }
    pthread_mutex_unlock(&u->fds_mu);
    if (ours) close(fd);
    return 0;
}

/* New handles. The multi handle's own descriptors (its wakeup pair) are those that appear across
 * curl_multi_init; one another thread opened meanwhile is recorded too (if its owner closes it,
 * the handles are renewed once more: no harm). 0, or -1. */
static int handles_new(mw_uploader_t *u) {
    uint8_t *before = open_fds();
    CURLM *m = curl_multi_init();
    uint8_t *after = before ? open_fds() : NULL;
    CURL *e = curl_easy_init();
    pthread_mutex_lock(&u->fds_mu);
    u->nfds = 0;
    for (int fd = 0; before && after && m && fd < FDMAP; fd++)
        if ((after[fd / 8] & ~before[fd / 8]) & (1u << (fd % 8))) fd_record(u, fd);
    u->multi = m;
    u->easy = e;
    pthread_mutex_unlock(&u->fds_mu);
    free(before);
    free(after);
    return m && e ? 0 : -1;
}

/* A descriptor of the handles is not ours any more: they are abandoned (see the top of this
 * file) and the descriptors still ours closed. */
static void handles_abandon(mw_uploader_t *u) {
    pthread_mutex_lock(&u->fds_mu);
    for (int i = 0; i < u->nfds; i++)
        if (fd_still_ours(&u->fds[i])) close(u->fds[i].fd);
    u->nfds = 0;
    u->multi = NULL;
    u->easy = NULL;
    pthread_mutex_unlock(&u->fds_mu);
    u->fds_lost++;
}

int mw_upload_http_init(mw_uploader_t *u, const char **why) {
    const mw_upload_cfg_t *c = &u->cfg;
    atomic_store(&u->abort_ns, INT64_MAX);
    u->fds_mu_ok = pthread_mutex_init(&u->fds_mu, NULL) == 0;
    u->resp = malloc(MW_UPLOAD_RESP_CAP + 1);
    if (!u->fds_mu_ok || handles_new(u) != 0 || !u->resp) {
        *why = "cannot create the libcurl handles";
        return -1;
    }
    char *name = c->tags ? mw_upload_http_fmt("%s{%s}", c->app_name, c->tags) : strdup(c->app_name);
    if (name) {
        u->name_enc = curl_easy_escape(u->easy, name, 0);
        free(name);
    }
    u->spy_enc = curl_easy_escape(u->easy, c->spy_name, 0);
    if (!u->name_enc || !u->spy_enc) {
        *why = "out of memory";
        return -1;
    }
    u->rng = (uint64_t)mw_upload_mono_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)u;
    if (u->rng == 0) u->rng = 0x9e3779b97f4a7c15ULL;
    return 0;
}

void mw_upload_http_free(mw_uploader_t *u) {
    if (u->fds_mu_ok && u->easy && u->multi && !handles_intact(u)) handles_abandon(u);
    if (u->multi) curl_multi_cleanup(u->multi);
    if (u->easy) curl_easy_cleanup(u->easy);
    if (u->name_enc) curl_free(u->name_enc);
    if (u->spy_enc) curl_free(u->spy_enc);
    free(u->resp);
    u->multi = NULL;
    u->easy = NULL;
    u->name_enc = u->spy_enc = u->resp = NULL;
    if (u->fds_mu_ok) pthread_mutex_destroy(&u->fds_mu);
    u->fds_mu_ok = 0;
}

void mw_upload_http_abort_at(mw_uploader_t *u, int64_t mono_ns) {
    atomic_store(&u->abort_ns, mono_ns);
    pthread_mutex_lock(&u->fds_mu);
    if (u->multi && fds_intact(u)) curl_multi_wakeup(u->multi); /* else its poll ends within 1 s */
    pthread_mutex_unlock(&u->fds_mu);
}

/* ---------------------------------------------------------------- one request */

/* CURLOPT_WRITEFUNCTION: keeps the first resp_cap bytes of the body. */
static size_t keep_body(char *p, size_t size, size_t nmemb, void *ud) {
    mw_uploader_t *u = ud;
    size_t total = size * nmemb;
    size_t room = u->resp_cap > u->resp_len ? u->resp_cap - u->resp_len : 0;
    size_t take = total < room ? total : room;
    memcpy(u->resp + u->resp_len, p, take);
    u->resp_len += take;
    return total; /* the rest is discarded, not an error */
}

static void set_options(mw_uploader_t *u, const char *url, struct curl_slist *hdrs,
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
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, keep_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, u);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, u);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, u);
    if (u->cfg.ca_file) curl_easy_setopt(e, CURLOPT_CAINFO, u->cfg.ca_file);
    if (u->cfg.ca_path) curl_easy_setopt(e, CURLOPT_CAPATH, u->cfg.ca_path);
    u->resp_len = 0;
    u->resp_cap = resp_cap < MW_UPLOAD_RESP_CAP ? resp_cap : MW_UPLOAD_RESP_CAP;
}

/* Runs the configured request; abandons it once the abort time has passed. Returns 1 when it
 * was stopped because a descriptor of the handles is not ours any more (the app closed it
 * meanwhile): the request is to be made again on new handles. */
static int perform(mw_uploader_t *u, mw_upload_resp_t *r) {
    if (curl_multi_add_handle(u->multi, u->easy) != CURLM_OK) {
        r->cc = CURLE_FAILED_INIT;
        return 0;
    }
    int done = 0, lost = 0;
    for (;;) {
        int running = 0;
        if (!handles_intact(u)) { /* closed by the app meanwhile */
            lost = 1;
            r->cc = CURLE_SEND_ERROR;
            break;
        }
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
        int64_t now = mw_upload_mono_ns(), abort_ns = atomic_load(&u->abort_ns);
        if (now >= abort_ns) {
            r->aborted = 1;
            r->cc = CURLE_ABORTED_BY_CALLBACK;
            break;
        }
        int64_t wait_ms = (abort_ns - now) / 1000000 + 1;
        curl_multi_poll(u->multi, NULL, 0, wait_ms < 1000 ? (int)wait_ms : 1000, NULL);
    }
    if (!lost) curl_multi_remove_handle(u->multi, u->easy);
    if (!r->aborted && r->cc == CURLE_OK) {
        curl_off_t ra = 0;
        curl_easy_getinfo(u->easy, CURLINFO_RESPONSE_CODE, &r->status);
        if (curl_easy_getinfo(u->easy, CURLINFO_RETRY_AFTER, &ra) == CURLE_OK && ra > 0)
            r->retry_after_s = (int64_t)ra;
    }
    return lost;
}

static mw_http_outcome_t classify(const mw_upload_resp_t *r) {
    if (r->aborted) return MW_HTTP_ABORTED;
    if (r->cc != CURLE_OK) return MW_HTTP_RETRY;
    if (r->status >= 200 && r->status < 300) return MW_HTTP_OK;
    if (r->status == 408 || r->status == 429 || r->status >= 500 || r->status < 100)
        return MW_HTTP_RETRY;
    return MW_HTTP_REJECT;
}

mw_http_outcome_t mw_upload_http_post(mw_uploader_t *u, const char *url, const char *const *lines,
                                      size_t nlines, const void *body, size_t len, size_t resp_cap,
                                      int basic_auth, mw_upload_resp_t *r) {
    memset(r, 0, sizeof(*r));
    r->cc = CURLE_OUT_OF_MEMORY;
    u->errbuf[0] = '\0';
    u->resp_len = 0;
    struct curl_slist *h = NULL, *h2;
    int ok = url != NULL && body != NULL;
    for (size_t i = 0; ok && i < nlines; i++) {
        if (!lines[i] || !(h2 = curl_slist_append(h, lines[i])))
            ok = 0;
        else
            h = h2;
    }
    if (!ok) {
        curl_slist_free_all(h);
        return MW_HTTP_RETRY;
    }
    /* Once more on new handles when the app closed a descriptor of theirs during the request. */
    for (int again = 1; again >= 0; again--) {
        if (!handles_intact(u)) {
            handles_abandon(u);
            (void)handles_new(u);
        }
        if (!u->easy || !u->multi) {
            curl_slist_free_all(h);
            r->cc = CURLE_OUT_OF_MEMORY;
            return MW_HTTP_RETRY;
        }
        *r = (mw_upload_resp_t){CURLE_OK, 0, 0, 0};
        u->errbuf[0] = '\0';
        set_options(u, url, h, body, len, resp_cap);
        if (basic_auth && !u->cfg.bearer_token && u->cfg.basic_user) {
            curl_easy_setopt(u->easy, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
            curl_easy_setopt(u->easy, CURLOPT_USERNAME, u->cfg.basic_user);
            curl_easy_setopt(u->easy, CURLOPT_PASSWORD,
                             u->cfg.basic_password ? u->cfg.basic_password : "");
        }
        if (!perform(u, r)) break;
    }
    curl_easy_setopt(u->easy, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(h);
    return classify(r);
}

/* ---------------------------------------------------------------- the profile request */

static uint64_t next_rand(mw_uploader_t *u) { /* xorshift64* */
    u->rng ^= u->rng >> 12;
    u->rng ^= u->rng << 25;
    u->rng ^= u->rng >> 27;
    return u->rng * 2685821657736338717ULL;
}

/* Encodes a push.v1.PushRequest around the profile; malloc'd buffer or NULL. */
static unsigned char *push_body(mw_uploader_t *u, const void *data, size_t data_len,
                                const char *name, size_t *out_len) {
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
    labels[n].value = (char *)name;
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
    uint64_t a = next_rand(u), b = next_rand(u);
    a = (a & ~0xf000ULL) | 0x4000ULL;                        /* version 4 */
    b = (b & 0x3fffffffffffffffULL) | 0x8000000000000000ULL; /* variant 10 */
    snprintf(id, sizeof(id), "%08x-%04x-%04x-%04x-%012llx", (unsigned)(a >> 32),
             (unsigned)((a >> 16) & 0xffff), (unsigned)(a & 0xffff), (unsigned)(b >> 48),
             (unsigned long long)(b & 0xffffffffffffULL));

    Push__V1__RawSample sample = PUSH__V1__RAW_SAMPLE__INIT;
    sample.raw_profile.data = (uint8_t *)data;
    sample.raw_profile.len = data_len;
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

/* One OTLP request (already encoded) to u->base. */
static mw_http_outcome_t send_otlp(mw_uploader_t *u, const void *data, size_t len,
                                   mw_upload_resp_t *r) {
    const mw_upload_cfg_t *c = &u->cfg;
    size_t nl = 0;
    const char **lines = malloc((c->n_headers + 3) * sizeof(*lines));
    if (!lines) {
        memset(r, 0, sizeof(*r));
        r->cc = CURLE_OUT_OF_MEMORY;
        return MW_HTTP_RETRY;
    }
    lines[nl++] = "Content-Type: application/x-protobuf";
    lines[nl++] = "Expect:";
    if (c->otlp_gzip) lines[nl++] = "Content-Encoding: gzip";
    for (size_t i = 0; i < c->n_headers; i++)
        lines[nl++] = c->header_lines[i];
    mw_http_outcome_t out =
        mw_upload_http_post(u, u->base, lines, nl, data, len, RESP_CAP_INGEST, 0, r);
    free(lines);
    return out;
}

mw_http_outcome_t mw_upload_http_send_profile(mw_uploader_t *u, const void *data, size_t len,
                                              int64_t from_s, int64_t until_s, const char *name,
                                              mw_upload_resp_t *r) {
    if (u->cfg.otlp) return send_otlp(u, data, len, r);
    const void *body = data;
    unsigned char *owned = NULL;
    char *url;
    if (u->cfg.use_push_api) {
        body = owned = push_body(u, data, len, name, &len);
        url = mw_upload_http_fmt("%s/push.v1.PusherService/Push", u->base);
    } else {
        url = mw_upload_http_fmt("%s/ingest?name=%s&from=%lld&until=%lld&format=pprof"
                                 "&sampleRate=%d&spyName=%s",
                                 u->base, u->name_enc, (long long)from_s, (long long)until_s,
                                 u->cfg.sample_rate, u->spy_enc);
    }
    char *org = u->tenant ? mw_upload_http_fmt("X-Scope-OrgID: %s", u->tenant) : NULL;
    char *bearer = u->cfg.bearer_token
                       ? mw_upload_http_fmt("Authorization: Bearer %s", u->cfg.bearer_token)
                       : NULL;
    const char *lines[4];
    size_t nl = 0;
    lines[nl++] = u->cfg.use_push_api ? "Content-Type: application/proto"
                                      : "Content-Type: binary/octet-stream";
    lines[nl++] = "Expect:";
    if (u->tenant) lines[nl++] = org;
    if (u->cfg.bearer_token) lines[nl++] = bearer;
    mw_http_outcome_t out =
        mw_upload_http_post(u, url, lines, nl, body, len, RESP_CAP_INGEST, 1, r);
    if (bearer) {
        memset(bearer, 0, strlen(bearer)); /* do not leave the token in freed memory */
        free(bearer);
    }
    free(org);
    free(url);
    free(owned);
    return out;
}

/* ---------------------------------------------------------------- outcomes, backoff */

void mw_upload_http_describe(const mw_uploader_t *u, const mw_upload_resp_t *r, char *out,
                             size_t n) {
    if (r->cc != CURLE_OK)
        snprintf(out, n, "%s%s%s", curl_easy_strerror(r->cc), u->errbuf[0] ? ": " : "", u->errbuf);
    else
        snprintf(out, n, "HTTP %ld", r->status);
}

const char *mw_upload_http_reject_hint(long status, int otlp) {
    if (otlp) {
        if (status == 401 || status == 403)
            return "check the credentials in OTEL_EXPORTER_OTLP_PROFILES_HEADERS or "
                   "OTEL_EXPORTER_OTLP_HEADERS";
        if (status == 404 || status == 405)
            return "check OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT (the full URL) or "
                   "OTEL_EXPORTER_OTLP_ENDPOINT (profiles go to {endpoint}/v1development/profiles)";
        if (status == 413) return "the profile is larger than the collector accepts";
        if (status == 415) return "the collector does not accept OTLP profiles over HTTP/protobuf";
    }
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

int64_t mw_upload_http_backoff_ns(mw_uploader_t *u, int streak, int64_t retry_after_s) {
    double d = u->cfg.backoff_initial_s;
    for (int i = 1; i < streak && d < u->cfg.backoff_max_s; i++)
        d *= 2;
    if (d > u->cfg.backoff_max_s) d = u->cfg.backoff_max_s;
    d *= 0.5 + 0.5 * ((double)(next_rand(u) >> 11) / (double)(1ULL << 53));
    if (retry_after_s > 0)
        d = (double)retry_after_s < u->cfg.backoff_max_s ? (double)retry_after_s
                                                         : u->cfg.backoff_max_s;
    return mw_upload_secs_to_ns(d);
}

/* ---------------------------------------------------------------- text */

char *mw_upload_http_fmt(const char *fmt, ...) {
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

void mw_upload_http_redact_url(const char *url, char *out, size_t n) {
    const char *auth = strstr(url, "://");
    const char *start = auth ? auth + 3 : url;
    const char *end = start + strcspn(start, "/?#");
    const char *at = memchr(start, '@', (size_t)(end - start));
    if (at)
        snprintf(out, n, "%.*s%s", (int)(start - url), url, at + 1);
    else
        snprintf(out, n, "%s", url);
}

void mw_upload_http_snippet(const char *body, size_t len, char *out, size_t n) {
    size_t o = 0;
    int space = 0;
    for (size_t i = 0; i < len && o + 4 < n && o < SNIPPET_MAX; i++) {
        unsigned char c = (unsigned char)body[i];
        if (c < 0x20 || c >= 0x7f) {
            space = 1;
            continue;
        }
        if (space && o > 0) out[o++] = ' ';
        space = 0;
        out[o++] = (char)c;
    }
    if (o > 0 && o + 4 < n && len > SNIPPET_MAX) out[o++] = '.', out[o++] = '.', out[o++] = '.';
    out[o] = '\0';
}
