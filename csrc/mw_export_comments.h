/* mw_export_comments — the comments the exporter puts in each CPU profile (mw_export.h,
 * docs/interfaces.md "Request counts" and "Spans"):
 *   `mw:requests {"count":N,"labels":{...}}`  one per label set counted since the last take
 *       (mw_labels_take_requests): the set's pairs, then the static labels, then "pid";
 *   `mw:spans {"<span_id>":"<trace_id>",...}`   the trace of each span set the window's stacks
 *       carry (ids in increasing order, each once, those without a trace left out),
 *       MW_SPANS_PER_COMMENT spans per comment.
 * Keys and values are JSON strings: '"', '\\' and control characters escaped, other bytes as
 * they are (the pprof encoder repairs invalid UTF-8). At most MW_PPROF_MAX_COMMENTS comments in
 * all: request counts past it stay counted for the next take, spans past it keep their labels
 * (only their trace is not written).
 *
 * Out of memory: the comments built so far are dropped (freed, n = 0), so the window goes
 * without them (the request counts taken are lost, like the window's samples would be); see
 * mw_export_comments_add_spans for the one exception.
 *
 * Threads, locks, memory: the exporter thread only (it takes the request counts, and reads the
 * span sets under mw_labels' epoch rule); no lock and no state of its own. The comments' text
 * is owned by the mw_export_comments_t (malloc'd), ptrs point into it and stay valid until
 * mw_export_comments_free() or the next call that adds to it; the static labels and the window
 * buffer are the caller's, only read.
 */
#ifndef MW_EXPORT_COMMENTS_H
#define MW_EXPORT_COMMENTS_H

#include <stddef.h>
#include <stdint.h>

#include "mw_pprof.h"
#include "mw_profbuf.h"

#define MW_SPANS_PER_COMMENT 256

/* A growing text buffer; failed once a growth ran out of memory (nothing is added after). */
typedef struct mw_export_sbuf {
    char *p;
    size_t n, cap;
    int failed;
} mw_export_sbuf_t;

/* A window's comments (zeroed = none), as mw_pprof_meta_t takes them: n and ptrs. */
typedef struct mw_export_comments {
    mw_export_sbuf_t text;                   /* the comments, each NUL-terminated */
    const char *ptrs[MW_PPROF_MAX_COMMENTS]; /* into text, once complete */
    uint32_t n;
    uint64_t requests; /* the sum of the counts taken */
} mw_export_comments_t;

/* Takes the requests counted since the last take and formats them into rc (overwritten; any
 * text it held must have been freed), with the static labels keys/vals[0..nlabels). Returns the
 * number of comments; 0 also when formatting ran out of memory. */
uint32_t mw_export_comments_take_requests(mw_export_comments_t *rc, const char *const *keys,
                                          const char *const *vals, uint32_t nlabels);

/* Appends the `mw:spans` comments of the window buffer b to rc while rc has room. Out of
 * memory: rc stays as it was when the span ids cannot be gathered; when the text cannot grow,
 * every comment of rc is dropped, the request counts included. */
void mw_export_comments_add_spans(const mw_profbuf_t *b, mw_export_comments_t *rc);

/* Frees rc's text; rc is left without comments. */
void mw_export_comments_free(mw_export_comments_t *rc);

#endif /* MW_EXPORT_COMMENTS_H */
