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

/* In a forked child, before any other call: the interning mutex starts unlocked again (the fork
 * may have come from a thread without the GIL while another was interning; a set half-added
 * then is only missing from the lookup index, and interning it again adds a duplicate). */
void mw_labels_after_fork_child(void);

#endif
