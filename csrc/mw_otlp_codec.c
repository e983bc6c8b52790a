/* mw_otlp_codec — gzip in/out, UTF-8 check, hex; contract in mw_otlp_codec.h. */
#include "mw_otlp_codec.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "mw_otlp.h"

int mw_otlp_inflate_pprof(const unsigned char *in, size_t len, unsigned char **out, size_t *out_len,
                          const char **why) {
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, 15 + 32) != Z_OK) return *why = "zlib failed", -1;
    size_t cap = len * 4 + 4096, n = 0;
    unsigned char *buf = malloc(cap);
    int rc = Z_OK;
    z.next_in = (unsigned char *)in;
    while (buf && rc != Z_STREAM_END) {
        if (n == cap) {
            if (cap >= MW_OTLP_MAX_PPROF_BYTES) {
                *why = "the inflated pprof is larger than the limit";
                break;
            }
            cap = cap * 2 < MW_OTLP_MAX_PPROF_BYTES ? cap * 2 : MW_OTLP_MAX_PPROF_BYTES;
            unsigned char *b = realloc(buf, cap);
            if (!b) break;
            buf = b;
        }
        size_t in_left = len - (size_t)(z.next_in - in);
        z.avail_in = in_left > UINT_MAX ? UINT_MAX : (unsigned)in_left;
        size_t room = cap - n;
        z.avail_out = room > UINT_MAX ? UINT_MAX : (unsigned)room;
        z.next_out = buf + n;
        unsigned before = z.avail_out;
        rc = inflate(&z, Z_NO_FLUSH);
        n += before - z.avail_out;
        if (rc == Z_BUF_ERROR && z.avail_out > 0) { /* no more input before the end */
            *why = "the gzipped pprof is truncated";
            break;
        }
        if (rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) {
            *why = "the pprof is not valid gzip";
            break;
        }
    }
    inflateEnd(&z);
    if (rc != Z_STREAM_END) {
        if (!*why) *why = "out of memory"; /* no buffer, or it could not grow */
        free(buf);
        return -1;
    }
    *out = buf;
    *out_len = n;
    return 0;
}

int mw_otlp_gzip(const void *in, size_t n, unsigned char **out, size_t *out_len) {
    if ((uint64_t)n >= UINT_MAX) return -1;
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        return -1;
    uLong cap = deflateBound(&z, (uLong)n);
    unsigned char *buf = malloc(cap);
    if (!buf) {
        deflateEnd(&z);
        return -1;
    }
    z.next_in = (unsigned char *)in;
    z.avail_in = (unsigned)n;
    z.next_out = buf;
    z.avail_out = (unsigned)cap;
    int rc = deflate(&z, Z_FINISH);
    *out_len = (size_t)z.total_out;
    deflateEnd(&z);
    if (rc != Z_STREAM_END) {
        free(buf);
        return -1;
    }
    *out = buf;
    return 0;
}

int mw_otlp_utf8_valid(const unsigned char *s) {
    while (*s) {
        unsigned char b = *s;
        size_t n;
        uint32_t cp, min;
        if (b < 0x80) {
            s++;
            continue;
        } else if ((b & 0xe0) == 0xc0) {
            n = 1, cp = b & 0x1f, min = 0x80;
        } else if ((b & 0xf0) == 0xe0) {
            n = 2, cp = b & 0x0f, min = 0x800;
        } else if ((b & 0xf8) == 0xf0) {
            n = 3, cp = b & 0x07, min = 0x10000;
        } else {
            return 0;
        }
        for (size_t i = 1; i <= n; i++) {
            if ((s[i] & 0xc0) != 0x80) return 0; /* also stops at the NUL */
            cp = (cp << 6) | (s[i] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        s += n + 1;
    }
    return 1;
}

int mw_otlp_hex_bytes(const char *s, size_t nhex, unsigned char *out) {
    for (size_t i = 0; i < nhex; i++) {
        char ch = s[i];
        int v = (ch >= '0' && ch <= '9') ? ch - '0' : (ch >= 'a' && ch <= 'f') ? ch - 'a' + 10 : -1;
        if (v < 0) return -1;
        if (i % 2 == 0)
            out[i / 2] = (unsigned char)(v << 4);
        else
            out[i / 2] |= (unsigned char)v;
    }
    return s[nhex] == '\0' ? 0 : -1;
}
