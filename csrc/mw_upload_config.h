/* mw_upload_config — the uploader's own copy of its configuration (mw_upload_cfg_t, in
 * mw_upload_ctx.h): checking what mw_upload_start() is given, copying it with the defaults of
 * mw_upload.h applied, and freeing the copy.
 *
 * What is checked (the start fails with the reason, nothing is started):
 *   - no configuration string contains control characters, app_name is not empty
 *     (mw_upload_config_invalid);
 *   - exporter is "pyroscope" (or NULL/""), or "otlp"; server_url (or the default one, when an
 *     api_key is given) and auth_url (when the key is to be exchanged) start with http:// or
 *     https://; a "{tenant}" in server_url has a tenant_id or an api_key to fill it (pyroscope);
 *     tenant_id matches mw_upload_tenant_valid();
 *   - OTLP: at most 256 headers and 1024 resource attributes, header names are HTTP tokens
 *     (RFC 9110, 1..256 characters), header values have no control characters, resource
 *     attributes have a non-empty key and a value.
 * Defaults: numbers that are not > 0 (or not finite) take the MW_UPLOAD_DEFAULT_* values,
 * queue_max is capped at MW_UPLOAD_QUEUE_MAX_LIMIT, backoff_max_s is at least
 * backoff_initial_s. Empty strings are NULL. With the OTLP exporter the copy keeps no api_key,
 * tenant_id or credentials and no push API (the configured headers carry what the backend
 * needs); header lines are stored as "Name: value".
 *
 * Threads, locks, memory: the lifecycle calls these (mw_upload.c, under its lifecycle lock),
 * before the uploader thread starts and after it is joined; none takes a lock. The copy owns
 * every string and array in it (malloc'd, or NULL); the caller's configuration stays the
 * caller's. mw_upload_config_free() zeroes the configuration strings and the header lines
 * before freeing them (some hold secrets: api_key, bearer_token, basic_password, a header's
 * key) and leaves the copy empty; it is also the way to release a copy that failed half-way.
 */
#ifndef MW_UPLOAD_CONFIG_H
#define MW_UPLOAD_CONFIG_H

#include "mw_upload.h"
#include "mw_upload_ctx.h"

/* NULL when in's strings are usable (no control characters, app_name not empty), else a
 * static reason. in is not NULL. */
const char *mw_upload_config_invalid(const mw_upload_config_t *in);

/* Fills the zeroed *c from in, defaults applied, and checks it. 0, or -1 with a static reason
 * in *why (c may then hold part of the copy: free it with mw_upload_config_free). */
int mw_upload_config_copy(mw_upload_cfg_t *c, const mw_upload_config_t *in, const char **why);

/* Frees every string and array of c (zeroing those that may hold secrets); they are left NULL
 * and their counts 0. */
void mw_upload_config_free(mw_upload_cfg_t *c);

#endif /* MW_UPLOAD_CONFIG_H */
