/* mw_upload_tenant — the tenant and the API key exchange; contract in mw_upload_tenant.h. */
#include "mw_upload_tenant.h"

#include "mw_upload_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INVALID_TENANT "data.project_uid is not a valid tenant id ([A-Za-z0-9_.-], at most 128)"

int mw_upload_tenant_valid(const char *t) {
    size_t n = strlen(t);
    if (n == 0 || n > MW_UPLOAD_TENANT_MAX) return 0;
    for (; *t; t++)
        if (!((*t >= 'a' && *t <= 'z') || (*t >= 'A' && *t <= 'Z') || (*t >= '0' && *t <= '9') ||
              *t == '_' || *t == '-' || *t == '.'))
            return 0;
    return 1;
}

char *mw_upload_tenant_url(const char *tmpl, const char *tenant) {
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

int mw_upload_tenant_set(mw_uploader_t *u, const char *tenant) {
    char *t = strdup(tenant);
    char *base = mw_upload_tenant_url(u->cfg.server_url, tenant);
    if (!t || !base) {
        free(t);
        free(base);
        return -1;
    }
    free(u->tenant);
    free(u->base);
    u->tenant = t;
    u->base = base;
    mw_upload_http_redact_url(base, u->base_redacted, sizeof(u->base_redacted));
    return 0;
}

/* The tenant in the exchange's answer, set as u's: 0, or -1 with a reason. */
static int take_tenant(mw_uploader_t *u, mw_upload_exchange_t *x, const char **why) {
    int bad = 0;
    if (mw_upload_json_project_uid(u->resp, u->resp_len, x->tenant, sizeof(x->tenant), &bad, why) !=
        0)
        return -1;
    if (bad || !mw_upload_tenant_valid(x->tenant)) {
        *why = INVALID_TENANT;
        return -1;
    }
    if (mw_upload_tenant_set(u, x->tenant) != 0) {
        *why = "out of memory";
        return -1;
    }
    return 0;
}

mw_http_outcome_t mw_upload_tenant_exchange(mw_uploader_t *u, mw_upload_exchange_t *x) {
    memset(x, 0, sizeof(*x));
    char *authz = mw_upload_http_fmt("Authorization: Bearer %s", u->cfg.api_key);
    const char *lines[] = {authz, "Content-Type: application/x-www-form-urlencoded", "Expect:"};
    mw_http_outcome_t out =
        mw_upload_http_post(u, u->cfg.auth_url, lines, sizeof(lines) / sizeof(lines[0]), "", 0,
                            MW_UPLOAD_RESP_CAP, 0, &x->resp);
    if (authz) {
        memset(authz, 0, strlen(authz)); /* do not leave the key in freed memory */
        free(authz);
    }
    if (out == MW_HTTP_ABORTED) return out;
    const char *why = NULL;
    if (out == MW_HTTP_OK && take_tenant(u, x, &why) == 0) return MW_HTTP_OK;
    x->tenant[0] = '\0';

    const mw_upload_resp_t *r = &x->resp;
    if (out == MW_HTTP_OK) {
        snprintf(x->what, sizeof(x->what), "%s", why);
        snprintf(x->detail, sizeof(x->detail), "%s", why);
    } else if (r->cc != CURLE_OK) {
        mw_upload_http_describe(u, r, x->what, sizeof(x->what));
        snprintf(x->detail, sizeof(x->detail), "%s", x->what);
    } else {
        char snip[200];
        mw_upload_http_snippet(u->resp, u->resp_len, snip, sizeof(snip));
        snprintf(x->what, sizeof(x->what), "HTTP %ld", r->status);
        snprintf(x->detail, sizeof(x->detail), "HTTP %ld%s%s%s", r->status,
                 (r->status == 401 || r->status == 403) ? " (check MW_API_KEY)" : "",
                 snip[0] ? ": " : "", snip);
    }
    return MW_HTTP_RETRY;
}
