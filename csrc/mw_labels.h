/* mw_labels — the process-wide registry of label sets (e.g. {endpoint=/calculate2/<int:n>}).
 *
 * A label set is interned once (Python side, GIL held, serialized by an internal mutex) and
 * referred to by a 32-bit id from then on: the sampler stores only the id with each stack, and
 * the exporter turns ids back into pairs. Entries are immutable once published and never freed
 * while the process lives (bounded: MW_LABELSETS_MAX sets; past it interning returns 0 = no
 * labels, counted). Readers (sampler, exporter) need no lock.
 */
#ifndef MW_LABELS_H
#define MW_LABELS_H

#include <stddef.h>
#include <stdint.h>

#define MW_LABELSETS_MAX 65536
#define MW_LABELS_PER_SET 16

/* Interns n (key, value) pairs (copied). Returns the id (>= 1), or 0 when the registry is full
 * or n is out of range. Identical sets (same pairs in the same order) get the same id. */
uint32_t mw_labels_intern(const char *const *keys, const char *const *vals, int n);

/* Pairs of a set. Returns n (0 for id 0) or -1 for an unknown id. Pointers stay valid for the
 * life of the process. */
int mw_labels_get(uint32_t id, const char *const **keys, const char *const **vals);

uint64_t mw_labels_refused(void);

/* Request counts. An integration counts each request it serves against the label set naming it
 * (e.g. {endpoint=/calculate2/<int:n>}); the exporter takes the counts of each window, so that
 * a profile can be read as cost per request. Counting is one relaxed atomic add (any thread,
 * async-signal-safe); returns -1 for id 0 or an unknown id. Taking exchanges each set's count
 * with 0 and stores the non-zero ones in ids/counts (at most max; the rest stay for the next
 * take); returns how many. Any thread; a count added during a take lands in this take or the
 * next, never in none. */
int mw_labels_count_request(uint32_t id);
uint32_t mw_labels_take_requests(uint32_t *ids, uint64_t *counts, uint32_t max);

/* Span label sets: per-request label sets that are not kept for the life of the process.
 *
 * A request traced with OpenTelemetry labels its samples with span_id (its local root span, 16
 * lowercase hex digits) and span_name over the request's other labels (a "base" set interned
 * above). Such ids are per request, so these sets live in a recycled table of their own: ids
 * with MW_SPANSET_FLAG set, a slot index and a generation (a stale id never names another
 * request's set). The owner (the Python object holding the span's label sets) interns, then
 * releases when no context can push the set any more (no thread's slot holds it then); the slot
 * is reused only once the window active at the release has been encoded (mw_labels_window_done),
 * so no buffer still being encoded holds the id; a sample recorded late (a CPU-timer record
 * drained after the rotation) holds a stale id at worst, which answers nothing. Full table:
 * interning returns 0 (the caller falls back to the base set), counted. At the default 10 s
 * windows the table holds the requests of 10-20 s: about 1,600 traced requests a second.
 *
 * Threads: intern/release from Python threads (GIL held) or any thread (they take the interning
 * mutex); mw_labels_get / mw_labels_span_ids from the exporter (lock-free: the epoch rule keeps
 * the set alive while a window that may hold the id is encoded); mw_labels_base from any thread,
 * lock-free and async-signal-safe (a stale or released id gives its base or 0, never another
 * request's). Span sets are for CPU and wall windows only: the cumulative buffer, memory and
 * lock-wait profiles store mw_labels_base() of the thread's set. */
#define MW_SPANSETS_MAX 32768
#define MW_SPANSET_FLAG 0x80000000u
#define MW_SPAN_NAME_MAX 255

/* A span set over `base` (0 = no other labels): base's pairs (minus any span_id/span_name)
 * plus span_id and span_name (cut at MW_SPAN_NAME_MAX bytes, on a UTF-8 boundary). span_id: 16
 * lowercase hex digits; trace_id: 32 lowercase hex digits or "" (unknown). Returns the id, 0 when
 * the table is full or the input is malformed (counted: refused). */
uint32_t mw_labels_intern_span(uint32_t base, const char *span_id, const char *trace_id,
                               const char *span_name);
/* The owner will not push the set again. Idempotent; ignores ids that are not live span sets. */
void mw_labels_release_span(uint32_t id);
/* The sampler took a sample carrying `id` (CPU-timer handler or sampler thread; lock-free,
 * async-signal-safe; ids that are not live span sets are ignored). A set read for a sample
 * that is then dropped (a torn read) counts as seen too. */
void mw_labels_span_seen(uint32_t id);
/* 1 when a sample was taken while `id` was a thread's label set (mw_labels_span_seen since it
 * was interned), 0 otherwise (also for stale and non-span ids). Any thread, lock-free. The owner
 * asks when the request's span stops being current, to link the span to the profile only when
 * the profile holds the request. */
int mw_labels_span_was_seen(uint32_t id);
/* Counts a seen span that was linked to its profile (1), or that could not be any more (0: the
 * span had ended). Any thread. */
void mw_labels_span_link_counted(int linked);
/* The base set of a span set (0 if the id is stale), the id itself otherwise. */
uint32_t mw_labels_base(uint32_t id);
/* Span and trace id of a live span set (exporter). Returns 0, or -1 for other ids. */
int mw_labels_span_ids(uint32_t id, const char **span_id, const char **trace_id);
/* Span sets are made only while an exporter writes windows (without one, no window would ever
 * carry them and the table would never be reclaimed): intern_span returns 0 while disabled (not
 * counted as refused). The exporter enables them when it starts, disables them when it ends. */
void mw_labels_spans_enable(int on);
/* Window bookkeeping, in order, one exporter: mw_labels_window_rotated before the active window
 * is swapped out (mw_collect_rotate), mw_labels_window_done once a swapped-out window has been
 * encoded and recycled. A slot released while r windows had been rotated is reclaimed once r + 1
 * windows are done: the window active at the release is encoded by then. */
void mw_labels_window_rotated(void);
void mw_labels_window_done(void);

typedef struct {
    uint64_t created, refused, released, reclaimed;
    uint64_t linked, link_missed; /* mw_labels_span_link_counted */
    uint32_t live;                /* slots in use (pushed or waiting for reclaim) */
} mw_spansets_stats_t;
void mw_labels_span_stats(mw_spansets_stats_t *out);

/* In a forked child, before any other call: the interning mutex starts unlocked again (the fork
 * may have come from a thread without the GIL while another was interning; a set half-added
 * then is only missing from the lookup index, and interning it again adds a duplicate). The request
 * counts start at 0 (they were the parent's). */
void mw_labels_after_fork_child(void);

#endif
