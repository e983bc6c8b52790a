/* mw_upload_tenant — the tenant the profiles are sent for.
 *
 * A tenant id matches [A-Za-z0-9_.-]{1,128}. It is either given (tenant_id) or obtained once
 * per mw_upload_start() by exchanging the API key: POST auth_url with
 * "Authorization: Bearer <api_key>", Content-Type application/x-www-form-urlencoded and an
 * empty body, whose answer carries it in data.project_uid (mw_upload_json.h). The API key goes
 * to auth_url only. Every "{tenant}" in server_url is replaced by the tenant id; the result,
 * without trailing '/', is where profiles go (u->base).
 *
 * Threads, locks, memory: mw_upload_tenant_set and mw_upload_tenant_exchange write the
 * uploader context (mw_upload_ctx.h): the lifecycle calls them before the uploader thread
 * starts, the uploader thread afterwards. They take no lock and must not be called with the
 * queue lock held (the exchange waits for the network). The context owns u->tenant and
 * u->base. The other functions are pure, any thread.
 */
#ifndef MW_UPLOAD_TENANT_H
#define MW_UPLOAD_TENANT_H

#include "mw_upload_http.h"

#define MW_UPLOAD_TENANT_MAX 128 /* the longest tenant id */

/* 1 when t is a valid tenant id. */
int mw_upload_tenant_valid(const char *t);

/* tmpl with every "{tenant}" replaced by tenant (NULL: by nothing) and trailing '/' removed:
 * a new malloc'd string, or NULL when out of memory. */
char *mw_upload_tenant_url(const char *tmpl, const char *tenant);

/* Makes tenant u's tenant: u->tenant, u->base (server_url with it) and u->base_redacted.
 * 0, or -1 (out of memory; u unchanged). */
int mw_upload_tenant_set(mw_uploader_t *u, const char *tenant);

/* What one exchange attempt found. */
typedef struct mw_upload_exchange {
    char tenant[MW_UPLOAD_TENANT_MAX + 1]; /* MW_HTTP_OK: the tenant, now u's */
    mw_upload_resp_t resp;                 /* the HTTP answer */
    char detail[300]; /* otherwise: what failed, with the start of the answer's body */
    char what[300];   /* the same without any of the body (for stderr) */
} mw_upload_exchange_t;

/* One attempt at exchanging u->cfg.api_key at u->cfg.auth_url. MW_HTTP_OK: the tenant is set
 * (mw_upload_tenant_set). MW_HTTP_ABORTED: the stop deadline passed. Otherwise MW_HTTP_RETRY
 * (whatever the status: the exchange is retried until it succeeds), with x->detail and
 * x->what. Uploader thread. */
mw_http_outcome_t mw_upload_tenant_exchange(mw_uploader_t *u, mw_upload_exchange_t *x);

#endif /* MW_UPLOAD_TENANT_H */
