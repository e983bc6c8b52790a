/* mw_upload_config — the uploader's copy of its configuration; contract in
 * mw_upload_config.h. */
#define _GNU_SOURCE
#include "mw_upload_config.h"

#include "mw_upload_tenant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static char *strdup0(const char *s) {
    return (s && *s) ? strdup(s) : NULL;
}

static int has_ctl(const char *s) {
    for (; s && *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) return 1;
    return 0;
}

static int is_http_url(const char *s) {
    return s && (strncasecmp(s, "http://", 7) == 0 || strncasecmp(s, "https://", 8) == 0);
}

static double pos_or(double v, double def) {
    return (isfinite(v) && v > 0) ? v : def;
}

static void cfg_free_one(char **s) {
    if (*s) {
        memset(*s, 0, strlen(*s)); /* secrets do not outlive the uploader */
        free(*s);
    }
    *s = NULL;
}

void mw_upload_config_free(mw_upload_cfg_t *c) {
    char **s[] = {&c->server_url,     &c->app_name, &c->tags,         &c->tenant_id,
                  &c->auth_url,       &c->api_key,  &c->bearer_token, &c->basic_user,
                  &c->basic_password, &c->spy_name, &c->user_agent,   &c->ca_file,
                  &c->ca_path};
    for (size_t i = 0; i < sizeof(s) / sizeof(s[0]); i++)
        cfg_free_one(s[i]);
    for (size_t i = 0; c->header_lines && i < c->n_headers; i++)
        if (c->header_lines[i]) {
            memset(c->header_lines[i], 0, strlen(c->header_lines[i])); /* may carry a key */
            free(c->header_lines[i]);
        }
    for (size_t i = 0; c->res_keys && i < c->n_resource; i++) {
        free(c->res_keys[i]);
        free(c->res_values[i]);
    }
    free(c->header_lines);
    free(c->res_keys);
    free(c->res_values);
    free(c->sdk_version);
    c->header_lines = c->res_keys = c->res_values = NULL;
    c->sdk_version = NULL;
    c->n_headers = c->n_resource = 0;
}

/* An HTTP header name: a token (RFC 9110), 1..256 characters. */
static int is_token(const char *s) {
    size_t n = 0;
    for (; s && *s; s++, n++)
        if (!(((unsigned char)*s > 0x20 && (unsigned char)*s < 0x7f) &&
              !strchr("\"(),/:;<=>?@[\\]{}", *s)))
            return 0;
    return n > 0 && n <= 256;
}

/* The OTLP part of the configuration copy. 0, or -1 with *why. */
static int copy_otlp(mw_upload_cfg_t *c, const mw_upload_config_t *in, const char **why) {
    c->otlp_gzip = in->otlp_gzip != 0;
    c->sdk_version = strdup(in->sdk_version ? in->sdk_version : "");
    if (!c->sdk_version) return *why = "out of memory", -1;
    if (in->n_headers > 256 || in->n_resource > 1024)
        return *why = "too many OTLP headers or resource attributes", -1;
    if (in->n_headers) {
        if (!in->header_names || !in->header_values) return *why = "no header names or values", -1;
        c->header_lines = calloc(in->n_headers, sizeof(char *));
        if (!c->header_lines) return *why = "out of memory", -1;
        c->n_headers = in->n_headers;
        for (size_t i = 0; i < in->n_headers; i++) {
            const char *k = in->header_names[i], *v = in->header_values[i];
            if (!is_token(k)) return *why = "an OTLP header name is not an HTTP token", -1;
            if (!v || has_ctl(v))
                return *why = "an OTLP header value contains control characters", -1;
            size_t n = strlen(k) + strlen(v) + 3;
            if (!(c->header_lines[i] = malloc(n))) return *why = "out of memory", -1;
            snprintf(c->header_lines[i], n, "%s: %s", k, v);
        }
    }
    if (in->n_resource) {
        if (!in->resource_keys || !in->resource_values)
            return *why = "no resource keys or values", -1;
        c->res_keys = calloc(in->n_resource, sizeof(char *));
        c->res_values = calloc(in->n_resource, sizeof(char *));
        if (!c->res_keys || !c->res_values) return *why = "out of memory", -1;
        c->n_resource = in->n_resource;
        for (size_t i = 0; i < in->n_resource; i++) {
            if (!in->resource_keys[i] || !in->resource_values[i] || !*in->resource_keys[i])
                return *why = "a resource attribute has no key or value", -1;
            c->res_keys[i] = strdup(in->resource_keys[i]);
            c->res_values[i] = strdup(in->resource_values[i]);
            if (!c->res_keys[i] || !c->res_values[i]) return *why = "out of memory", -1;
        }
    }
    return 0;
}

int mw_upload_config_copy(mw_upload_cfg_t *c, const mw_upload_config_t *in, const char **why) {
    c->server_url = strdup0(in->server_url);
    c->app_name = strdup0(in->app_name);
    c->tags = strdup0(in->tags);
    c->tenant_id = strdup0(in->tenant_id);
    c->api_key = strdup0(in->api_key);
    c->auth_url = strdup0(in->auth_url ? in->auth_url : MW_UPLOAD_DEFAULT_AUTH_URL);
    c->bearer_token = strdup0(in->bearer_token);
    c->basic_user = strdup0(in->basic_user);
    c->basic_password = strdup0(in->basic_password);
    c->spy_name = strdup0(in->spy_name ? in->spy_name : MW_UPLOAD_DEFAULT_SPY_NAME);
    c->user_agent = strdup0(in->user_agent ? in->user_agent : MW_UPLOAD_DEFAULT_USER_AGENT);
    c->ca_file = strdup0(in->ca_file);
    c->ca_path = strdup0(in->ca_path);
    if (!c->server_url && c->api_key) c->server_url = strdup(MW_UPLOAD_DEFAULT_SERVER_URL);
    c->sample_rate = in->sample_rate > 0 ? in->sample_rate : MW_UPLOAD_DEFAULT_SAMPLE_RATE;
    c->queue_max = in->queue_max > 0 ? in->queue_max : MW_UPLOAD_DEFAULT_QUEUE_MAX;
    if (c->queue_max > MW_UPLOAD_QUEUE_MAX_LIMIT) c->queue_max = MW_UPLOAD_QUEUE_MAX_LIMIT;
    c->connect_timeout_s = pos_or(in->connect_timeout_s, MW_UPLOAD_DEFAULT_CONNECT_TIMEOUT_S);
    c->total_timeout_s = pos_or(in->total_timeout_s, MW_UPLOAD_DEFAULT_TOTAL_TIMEOUT_S);
    c->backoff_initial_s = pos_or(in->backoff_initial_s, MW_UPLOAD_DEFAULT_BACKOFF_INITIAL_S);
    c->backoff_max_s = pos_or(in->backoff_max_s, MW_UPLOAD_DEFAULT_BACKOFF_MAX_S);
    if (c->backoff_max_s < c->backoff_initial_s) c->backoff_max_s = c->backoff_initial_s;
    c->use_push_api = in->use_push_api != 0;
    *why = NULL;
    if (in->exporter && *in->exporter && strcmp(in->exporter, "pyroscope") != 0) {
        if (strcmp(in->exporter, "otlp") != 0)
            return *why = "exporter must be pyroscope or otlp", -1;
        c->otlp = 1;
        if (copy_otlp(c, in, why) != 0) return -1;
        /* no key exchange, tenant, push API or credentials of ours: the headers carry them */
        cfg_free_one(&c->api_key);
        cfg_free_one(&c->tenant_id);
        cfg_free_one(&c->bearer_token);
        cfg_free_one(&c->basic_user);
        cfg_free_one(&c->basic_password);
        c->use_push_api = 0;
    }
    if (!c->app_name || !c->auth_url || !c->spy_name || !c->user_agent)
        *why = "out of memory";
    else if (!c->server_url)
        *why = "neither server_url nor api_key is set";
    else if (!is_http_url(c->server_url))
        *why = "server_url must start with http:// or https://";
    else if (c->api_key && !c->tenant_id && !is_http_url(c->auth_url))
        *why = "auth_url must start with http:// or https://";
    else if (!c->otlp && strstr(c->server_url, "{tenant}") && !c->tenant_id && !c->api_key)
        *why = "server_url contains {tenant} but there is no tenant_id nor api_key";
    else if (c->tenant_id && !mw_upload_tenant_valid(c->tenant_id))
        *why = "tenant_id must match [A-Za-z0-9_.-]{1,128}";
    return *why ? -1 : 0;
}

const char *mw_upload_config_invalid(const mw_upload_config_t *in) {
    const char *strs[] = {in->server_url,     in->app_name, in->tags,         in->tenant_id,
                          in->auth_url,       in->api_key,  in->bearer_token, in->basic_user,
                          in->basic_password, in->spy_name, in->user_agent,   in->ca_file,
                          in->ca_path,        in->exporter, in->sdk_version};
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++)
        if (has_ctl(strs[i])) return "a configuration string contains control characters";
    if (!in->app_name || !*in->app_name) return "app_name is empty";
    return NULL;
}
