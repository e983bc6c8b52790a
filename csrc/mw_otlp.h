/* mw_otlp — one window's pprof -> an OTLP profiles ExportProfilesServiceRequest (v1development,
 * proto/otlp/, generated protobuf-c code in csrc/gen/otlp), for the uploader's OTLP exporter
 * (MW_PROFILING_EXPORTER=otlp, mw_upload.h).
 *
 * The request is built from the very pprof the exporter wrote (gzipped or plain), unpacked with
 * the generated pprof code, so the OTLP totals equal the pprof's by construction:
 *   - one ResourceProfiles: attributes service.name, process.pid (int: the samples' `pid` label,
 *     else pid_fallback), telemetry.sdk.name = "middleware", telemetry.sdk.language = "python",
 *     telemetry.sdk.version, then the extra attributes in order (a key seen before takes the
 *     later value; service.name is never replaced); one ScopeProfiles (scope "middleware",
 *     version = the sdk version);
 *   - one Profile per pprof sample type, in the pprof's order: sample_type, period_type, period,
 *     time_unix_nano = time_nanos, duration_nano = duration_nanos; its samples are the pprof
 *     samples whose value for that type is not 0, each with values = [that value];
 *   - one shared ProfilesDictionary, every table's entry 0 the zero value; no mappings; one
 *     Function per (name, file) (name = system name = the pprof name, "<unknown>" when empty);
 *     one Location per (function, line) with one Line (a pprof location with several lines
 *     gives one Location per line, innermost first; one without lines gives a function named
 *     "0x<address>" in its mapping's file, line 0); stacks leaf first;
 *   - sample attributes: the pprof labels (string labels verbatim; numeric ones as
 *     "<num>[ <unit>]"), interned in attribute_table, except a `span_id` label whose trace the
 *     profile carries in its `mw:spans {"<span id>":"<trace id>",...}` comments: that one
 *     becomes the sample's Link (trace id 16 bytes, span id 8 bytes) instead.
 *
 * Bad input (not gzip/pprof, larger than MW_OTLP_MAX_PPROF_BYTES once inflated, a string, id or
 * value count that does not fit) gets -1 and a static reason; nothing is read out of bounds.
 *
 * Threads, locks, memory: pure functions of their arguments, no global state, no lock; any
 * thread (the uploader thread calls them). The caller owns the input and frees *out.
 */
#ifndef MW_OTLP_H
#define MW_OTLP_H

#include <stddef.h>
#include <stdint.h>

#define MW_OTLP_MAX_PPROF_BYTES (64u << 20) /* the largest inflated pprof converted */

typedef struct mw_otlp_resource {
    const char *service_name; /* required */
    const char *sdk_version;  /* telemetry.sdk.version and the scope's version; NULL = "" */
    const char *const *keys;  /* extra resource attributes (string values), n of them */
    const char *const *values;
    size_t n;
} mw_otlp_resource_t;

/* Converts pprof[0..len) (a gzip member or a plain pprof) into a packed
 * ExportProfilesServiceRequest. Returns 0 with *out (malloc'd) and *out_len, or -1 with a
 * static reason in *why. */
int mw_otlp_from_pprof(const void *pprof, size_t len, const mw_otlp_resource_t *res,
                       int64_t pid_fallback, unsigned char **out, size_t *out_len,
                       const char **why);

/* in[0..n) as one gzip member (zlib's default level). 0 with *out malloc'd, or -1. */
int mw_otlp_gzip(const void *in, size_t n, unsigned char **out, size_t *out_len);

#endif /* MW_OTLP_H */
