/* mw_upload_json — reading the exchange's answer with json-c; contract in mw_upload_json.h. */
#include "mw_upload_json.h"

#include <json-c/json.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

/* The parsed value of body[len], NULL with *why when it is not one JSON object followed by
 * nothing but whitespace. The caller releases it with json_object_put. */
static json_object *parse_object(const char *body, size_t len, const char **why) {
    *why = "the response is not a JSON object";
    if (len > INT_MAX) return NULL;
    json_tokener *tok = json_tokener_new_ex(MW_UPLOAD_JSON_DEPTH);
    if (!tok) return NULL;
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_ALLOW_TRAILING_CHARS);
    json_object *v = json_tokener_parse_ex(tok, body, (int)len);
    size_t end = json_tokener_get_parse_end(tok);
    int ok = v != NULL && json_tokener_get_error(tok) == json_tokener_success &&
             json_object_is_type(v, json_type_object);
    json_tokener_free(tok);
    if (!ok) {
        json_object_put(v);
        return NULL;
    }
    for (; end < len; end++) {
        if (!strchr(" \t\n\r", body[end]) || body[end] == '\0') {
            *why = "the response has trailing data after the JSON object";
            json_object_put(v);
            return NULL;
        }
    }
    return v;
}

int mw_upload_json_project_uid(const char *body, size_t len, char *uid, size_t n, int *uid_bad,
                               const char **why) {
    json_object *top = parse_object(body, len, why);
    if (!top) return -1;
    json_object *success = NULL, *data = NULL, *project_uid = NULL;
    int rc = -1;
    if (!json_object_object_get_ex(top, "success", &success) ||
        !json_object_is_type(success, json_type_boolean) || !json_object_get_boolean(success)) {
        *why = "the response does not say \"success\": true";
    } else if (!json_object_object_get_ex(top, "data", &data) ||
               !json_object_is_type(data, json_type_object) ||
               !json_object_object_get_ex(data, "project_uid", &project_uid) ||
               !json_object_is_type(project_uid, json_type_string)) {
        *why = "the response has no data.project_uid string";
    } else {
        const char *s = json_object_get_string(project_uid);
        size_t slen = (size_t)json_object_get_string_len(project_uid);
        *uid_bad = slen >= n || memchr(s, '\0', slen) != NULL;
        snprintf(uid, n, "%.*s", (int)(slen < n ? slen : n - 1), s);
        rc = 0;
    }
    json_object_put(top);
    return rc;
}
