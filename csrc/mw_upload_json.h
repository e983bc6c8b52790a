/* mw_upload_json — reading the answer of the API key -> tenant exchange.
 *
 * The exchange answers {"success": true, "data": {"project_uid": "<tenant>"}}, in any key
 * order, with any other members, whitespace and escapes. The answer is parsed with json-c's
 * JSON_TOKENER_STRICT (nesting at most MW_UPLOAD_JSON_DEPTH deep), which is stricter than its
 * default but still takes a few non-RFC 8259 forms (NaN, Infinity, single-quoted keys, raw
 * control characters in strings); only data.project_uid (a string) and success (a boolean)
 * are read, so such forms elsewhere in the answer change nothing.
 *
 * Threads, locks, memory: pure; any thread, no lock, no state. The parse allocates through
 * json-c and frees everything before returning; the caller's buffers stay the caller's.
 */
#ifndef MW_UPLOAD_JSON_H
#define MW_UPLOAD_JSON_H

#include <stddef.h>

#define MW_UPLOAD_JSON_DEPTH 64

/* Reads body[len] (not NUL-terminated). Returns 0 when it is one JSON object, followed by
 * nothing but whitespace, whose "success" is true and whose "data" is an object holding a
 * string "project_uid": that string is copied into uid[n] (NUL-terminated), and *uid_bad is
 * set when it did not fit in n - 1 bytes or holds a NUL character (the copy is then not the
 * tenant). Returns -1 otherwise, with a static reason in *why. */
int mw_upload_json_project_uid(const char *body, size_t len, char *uid, size_t n, int *uid_bad,
                               const char **why);

#endif /* MW_UPLOAD_JSON_H */
