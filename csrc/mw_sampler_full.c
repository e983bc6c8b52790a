/* mw_sampler_full — marker frames, and samples kept past a full window (see mw_sampler_int.h).
 * Sampler thread only, buffer lock held. */
#include "mw_labels.h"
#include "mw_report.h"
#include "mw_sampler_int.h"

#include <string.h>

/* Markers are few (six names) and come from the buffer's reserve: a full table never costs a
 * sample its marker. */
mw_id_t mws_marker(mw_profbuf_t *b, const char *s) {
    int was = mw_profbuf_use_reserve(b, 1);
    mw_id_t name = mw_profbuf_intern_str(b, s, strlen(s));
    mw_id_t file = mw_profbuf_intern_str(b, "", 0);
    mw_frame_t f = {name, file, 0, 0};
    mw_id_t id = name && file ? mw_profbuf_intern_frame(b, &f) : 0;
    mw_profbuf_use_reserve(b, was);
    return id;
}

/* A full table costs detail, never time. A window holds at most max_stacks (stack, thread, label
 * set) entries, max_frames frames and max_strings names (mw_profbuf_default_limits; per-request
 * span labels or generated code can fill them); past that, from the buffer's reserve:
 * - a frame that cannot be interned cuts its stack there, under "[frame table full]" (the frames
 *   outside the cut are the sample's own: no frame is skipped, which would join a caller to a
 *   callee it never called);
 * - a sample whose entry does not fit keeps its stack with its span labels dropped (their base
 *   set), then with no labels, then goes under "[stack table full]" in its thread.
 * Counted (overflow_kept), said once on stderr; dropped (counted) only when the reserve is spent
 * too. */
static void said_full(mw_profbuf_t *b) {
    mw_profbuf_counts_t c;
    mw_profbuf_counts(b, &c);
    mw_report_once(MW_REPORT_TABLE_FULL,
                   "a profile window's tables are full (%u stacks, %u frames, %u names): samples "
                   "past them keep less detail (no labels, or a [stack table full] or [frame "
                   "table full] frame); stats() counts them as overflow_kept",
                   c.stacks, c.frames, c.strings);
}

uint32_t mws_cut_at_full(mw_profbuf_t *b, mw_id_t *ids, uint32_t n, int *lost) {
    uint32_t outer = n; /* the outermost frame that could not be interned */
    for (uint32_t i = 0; i < n; i++)
        if (!ids[i]) outer = i;
    *lost = 0;
    if (outer == n) return n;
    mw_id_t m = mws_marker(b, "[frame table full]");
    said_full(b);
    if (!m) {
        *lost = 1;
        return 0;
    }
    g_stats.overflow_kept++;
    ids[0] = m;
    memmove(ids + 1, ids + outer + 1, (size_t)(n - outer - 1) * sizeof *ids);
    return n - outer;
}

int mws_add_sample(mw_profbuf_t *b, const mw_id_t *ids, uint32_t n, mw_id_t thread,
                   uint32_t labelset, const mw_values_t *v, uint32_t *idx) {
    if (mw_profbuf_add_ex(b, ids, n, thread, labelset, v, idx) == 0) return 0;
    g_stats.overflow++;
    mw_profbuf_use_reserve(b, 1);
    int rc = -1;
    uint32_t base = mw_labels_base(labelset);
    if (base != labelset) rc = mw_profbuf_add_ex(b, ids, n, thread, base, v, idx);
    if (rc != 0 && labelset) rc = mw_profbuf_add_ex(b, ids, n, thread, 0, v, idx);
    if (rc != 0) {
        mw_id_t m = mws_marker(b, "[stack table full]");
        if (m) rc = mw_profbuf_add_ex(b, &m, 1, thread, 0, v, idx);
    }
    mw_profbuf_use_reserve(b, 0);
    said_full(b);
    if (rc == 0) g_stats.overflow_kept++;
    return rc;
}
