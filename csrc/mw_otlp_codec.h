/* mw_otlp_codec — the byte encodings the pprof -> OTLP converter (mw_otlp.c) reads and writes:
 * gzip in (the pprof the exporter wrote), gzip out (mw_otlp_gzip, declared in mw_otlp.h and
 * defined here), the UTF-8 check protobuf requires of strings, and lowercase hex (the span and
 * trace ids of the `mw:spans` comments).
 *
 * Bad input gets -1 (and, for the inflate, a static reason); nothing is read past the lengths
 * given or past a string's NUL.
 *
 * Threads, locks, memory: pure functions of their arguments, no global state, no lock; any
 * thread. The caller owns the input and frees what is returned in *out (malloc'd).
 */
#ifndef MW_OTLP_CODEC_H
#define MW_OTLP_CODEC_H

#include <stddef.h>

/* Inflates the gzip (or zlib) stream in[0..len) into *out (malloc'd), *out_len bytes, at most
 * MW_OTLP_MAX_PPROF_BYTES (mw_otlp.h). 0, or -1 with a static reason in *why (which must be
 * NULL on entry): larger than the limit, truncated, not gzip, out of memory. */
int mw_otlp_inflate_pprof(const unsigned char *in, size_t len, unsigned char **out, size_t *out_len,
                          const char **why);

/* 1 when the NUL-terminated s is well-formed UTF-8 (RFC 3629: no overlongs, surrogates or code
 * points past U+10FFFF), else 0. */
int mw_otlp_utf8_valid(const unsigned char *s);

/* Decodes the nhex lowercase hex digits s[0..nhex) (nhex even) into out[0..nhex/2). 0 when they
 * are all hex digits and s[nhex] is the NUL, else -1 (out then partly written). */
int mw_otlp_hex_bytes(const char *s, size_t nhex, unsigned char *out);

#endif /* MW_OTLP_CODEC_H */
