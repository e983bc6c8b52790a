/* mw_linetable — decoders for CPython's line tables; see mw_linetable.h.
 * Written from the format descriptions in CPython's Objects/lnotab_notes.txt (3.10) and
 * Objects/locations.md (3.11+). */
#include "mw_linetable.h"

#include <limits.h>

static int line_310(const uint8_t *t, size_t len, int line, int lasti) {
    long addr = (long)lasti * 2, end = 0;
    int cur = -1;
    for (size_t i = 0; i + 1 < len; i += 2) {
        long start = end;
        end += t[i];
        int8_t ld = (int8_t)t[i + 1];
        if (ld == -128)
            cur = -1;
        else {
            line += ld;
            cur = line;
        }
        if (addr >= start && addr < end) return cur;
    }
    return -1;
}

static size_t read_varint(const uint8_t *t, size_t len, size_t i, unsigned *out) {
    unsigned v = 0, shift = 0;
    while (i < len) {
        uint8_t b = t[i++];
        v |= (unsigned)(b & 63) << shift;
        shift += 6;
        if (!(b & 64) || shift > 30) break;
    }
    *out = v;
    return i;
}

static int line_311(const uint8_t *t, size_t len, int first, int lasti) {
    long pos = 0;
    long line = first; /* a corrupt table's deltas may add up past an int */
    size_t i = 0;
    while (i < len) {
        uint8_t h = t[i];
        if (!(h & 0x80)) return -1; /* corrupt: not at an entry start */
        int code = (h >> 3) & 15;
        long n = (h & 7) + 1;
        int delta = 0;
        if (code == 13 || code == 14) {
            unsigned u;
            read_varint(t, len, i + 1, &u);
            delta = (u & 1) ? -(int)(u >> 1) : (int)(u >> 1);
        } else if (code >= 10 && code <= 12) {
            delta = code - 10;
        }
        line += delta;
        if (line < INT_MIN || line > INT_MAX) return -1; /* corrupt */
        if (lasti >= pos && lasti < pos + n) return code == 15 ? -1 : (int)line;
        pos += n;
        do
            i++;
        while (i < len && !(t[i] & 0x80));
    }
    return -1;
}

int mw_linetable_line(int format, const uint8_t *table, size_t len, int firstlineno, int lasti) {
    if (lasti < 0 || table == NULL) return firstlineno;
    int l = format == MW_LT_310 ? line_310(table, len, firstlineno, lasti)
                                : line_311(table, len, firstlineno, lasti);
    return l > 0 ? l : firstlineno;
}
