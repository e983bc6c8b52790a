/* mw_export_comments — request counts and span traces as profile comments; contract in
 * mw_export_comments.h. */
#include "mw_export_comments.h"

#include "mw_labels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void mw_export_comments_free(mw_export_comments_t *rc) {
    free(rc->text.p);
    memset(rc, 0, sizeof *rc);
}

static void sb_put(mw_export_sbuf_t *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

/* s as a JSON string ('"', '\\' and control characters escaped; other bytes as they are: the
 * encoder repairs invalid UTF-8). */
static void sb_json(mw_export_sbuf_t *b, const char *s) {
    sb_put(b, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        char esc[8];
        if (*c == '"' || *c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*c;
            sb_put(b, esc, 2);
        } else if (*c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", *c);
            sb_put(b, esc, 6);
        } else {
            sb_put(b, (const char *)c, 1);
        }
    }
    sb_put(b, "\"", 1);
}

uint32_t mw_export_comments_take_requests(mw_export_comments_t *rc, const char *const *keys,
                                          const char *const *vals, uint32_t nlabels) {
    uint32_t ids[MW_PPROF_MAX_COMMENTS];
    uint64_t counts[MW_PPROF_MAX_COMMENTS];
    memset(rc, 0, sizeof *rc);
    uint32_t n = mw_labels_take_requests(ids, counts, MW_PPROF_MAX_COMMENTS);
    size_t starts[MW_PPROF_MAX_COMMENTS];
    char pid[24];
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    for (uint32_t i = 0; i < n; i++) {
        const char *const *k, *const *v;
        int m = mw_labels_get(ids[i], &k, &v);
        if (m < 0) m = 0;
        char head[64];
        int hl = snprintf(head, sizeof head, "mw:requests {\"count\":%llu,\"labels\":{",
                          (unsigned long long)counts[i]);
        starts[i] = rc->text.n;
        sb_put(&rc->text, head, (size_t)hl);
        for (int j = 0; j < m; j++) {
            sb_json(&rc->text, k[j]);
            sb_put(&rc->text, ":", 1);
            sb_json(&rc->text, v[j]);
            sb_put(&rc->text, ",", 1);
        }
        for (uint32_t j = 0; j < nlabels; j++) {
            sb_json(&rc->text, keys[j]);
            sb_put(&rc->text, ":", 1);
            sb_json(&rc->text, vals[j]);
            sb_put(&rc->text, ",", 1);
        }
        sb_put(&rc->text, "\"pid\":", 6);
        sb_json(&rc->text, pid);
        sb_put(&rc->text, "}}", 3); /* with the NUL */
        rc->requests += counts[i];
    }
    if (rc->text.failed) {
        mw_export_comments_free(rc);
        return 0;
    }
    for (uint32_t i = 0; i < n; i++)
        rc->ptrs[i] = rc->text.p + starts[i];
    rc->n = n;
    return n;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

void mw_export_comments_add_spans(const mw_profbuf_t *b, mw_export_comments_t *rc) {
    uint32_t ns = mw_profbuf_nstacks(b), nid = 0;
    uint32_t *ids = malloc((size_t)(ns ? ns : 1) * sizeof *ids);
    if (!ids) return;
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t ls = mw_profbuf_stack(b, i)->labelset;
        if (ls & MW_SPANSET_FLAG) ids[nid++] = ls;
    }
    qsort(ids, nid, sizeof *ids, cmp_u32);
    size_t starts[MW_PPROF_MAX_COMMENTS]; /* offsets: the text may move as it grows */
    uint32_t n = rc->n, in_comment = 0;
    for (uint32_t i = 0; i < n; i++)
        starts[i] = (size_t)(rc->ptrs[i] - rc->text.p);
    for (uint32_t i = 0; i < nid && n < MW_PPROF_MAX_COMMENTS; i++) {
        const char *span, *trace;
        if ((i && ids[i] == ids[i - 1]) || mw_labels_span_ids(ids[i], &span, &trace) != 0 ||
            !trace[0])
            continue;
        if (in_comment == 0) {
            starts[n] = rc->text.n;
            sb_put(&rc->text, "mw:spans {", 10);
        } else {
            sb_put(&rc->text, ",", 1);
        }
        sb_json(&rc->text, span);
        sb_put(&rc->text, ":", 1);
        sb_json(&rc->text, trace);
        if (++in_comment == MW_SPANS_PER_COMMENT) {
            sb_put(&rc->text, "}", 2); /* with the NUL */
            in_comment = 0;
            n++;
        }
    }
    if (in_comment) {
        sb_put(&rc->text, "}", 2);
        n++;
    }
    free(ids);
    if (rc->text.failed) { /* out of memory: the window goes without its comments */
        mw_export_comments_free(rc);
        return;
    }
    for (uint32_t i = 0; i < n; i++)
        rc->ptrs[i] = rc->text.p + starts[i];
    rc->n = n;
}
