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

/* In a forked child, before any other call: the interning mutex starts unlocked again (the fork
 * may have come from a thread without the GIL while another was interning; a set half-added
 * then is only missing from the lookup index, and interning it again adds a duplicate). The request
 * counts start at 0 (they were the parent's). */
void mw_labels_after_fork_child(void);

#endif
