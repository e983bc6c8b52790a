/* mw_profbuf — one profile buffer: interned strings, frames and stacks → values.
 *
 * A buffer holds everything an exported profile needs and nothing that can go away under it:
 * function and file names are copied into the buffer's own string arena, frames refer to those
 * strings by id, stacks are arrays of frame ids (leaf first). All memory is allocated once by
 * mw_profbuf_new() from the limits given; nothing grows afterwards. When a table is full the
 * insertion fails, the overflow counter says so, and the caller drops the sample.
 *
 * Ids are 1-based (0 means "none" / "failed").
 *
 * Threads: a buffer has no lock. At any time exactly one thread writes it (the sampler writes
 * the active buffer; the exporter owns the buffer it swapped out, and the cumulative buffer).
 * Ownership is handed over under the sampler's mutex (mw_sampler_swap). Nothing here is
 * async-signal-safe except the read-only accessors. No function touches Python.
 */
#ifndef MW_PROFBUF_H
#define MW_PROFBUF_H

#include <stddef.h>
#include <stdint.h>

typedef uint32_t mw_id_t;

typedef struct mw_profbuf_limits {
    uint32_t max_stacks;   /* distinct (stack, thread, labelset) entries */
    uint32_t max_frames;   /* distinct (function, file, line) frames */
    uint32_t max_strings;  /* distinct strings */
    uint32_t string_bytes; /* bytes of string arena */
    uint32_t frame_slots;  /* total frame ids stored over all stacks */
    uint32_t reserve_div;  /* 0: no reserve; d: the last 1/d of each table is a reserve that only
                            * mw_profbuf_use_reserve opens */
} mw_profbuf_limits_t;

typedef struct mw_frame {
    mw_id_t name; /* string id: qualified function name */
    mw_id_t file; /* string id: file name */
    int32_t line; /* line executed, 0 if unknown */
    int32_t first_line;
} mw_frame_t;

typedef struct mw_values {
    uint64_t cpu_samples; /* samples taken while the thread was on CPU */
    uint64_t cpu_ns;      /* CPU time attributed to the stack */
    uint64_t wall_samples;
    uint64_t wall_ns; /* elapsed time attributed to the stack */
    uint64_t own_ns;  /* the profiler's own time in the thread at this stack (a CPU-timer
                       * handler's run), part of cpu_ns once the window is settled */
} mw_values_t;

typedef struct mw_stack {
    uint32_t frames_off; /* index into the buffer's frame-id arena */
    uint16_t depth;      /* number of frame ids, leaf first */
    uint16_t _pad;
    mw_id_t thread;    /* string id of the thread name */
    uint32_t labelset; /* global label-set id (mw_labels), 0 = none */
    uint32_t hash;
    mw_values_t v;
} mw_stack_t;

typedef struct mw_profbuf_counts {
    uint32_t stacks, frames, strings, string_bytes_used, frame_slots_used;
    uint64_t overflow; /* insertions refused because a table was full */
} mw_profbuf_counts_t;

typedef struct mw_profbuf mw_profbuf_t;

/* Default limits (documented in the README's design section), with a reserve of 1/16. */
void mw_profbuf_default_limits(mw_profbuf_limits_t *lim);
/* The limits of the event profiles' buffers (lock waits, memory): 8,192 stacks, 16,384 frames
 * and strings, 1 MiB of strings, 256 Ki frame slots. */
void mw_profbuf_small_limits(mw_profbuf_limits_t *lim);

/* Allocates a buffer. Returns NULL on allocation failure. Caller owns it; free with
 * mw_profbuf_free. */
mw_profbuf_t *mw_profbuf_new(const mw_profbuf_limits_t *lim);
void mw_profbuf_free(mw_profbuf_t *b);

/* Empties the buffer (keeps its memory) and bumps its generation. */
void mw_profbuf_reset(mw_profbuf_t *b);

/* Changes whenever the buffer is reset; lets callers cache ids per generation. Buffers get
 * distinct generation numbers, so (generation) identifies both the buffer and its epoch. */
uint64_t mw_profbuf_generation(const mw_profbuf_t *b);

/* With the reserve on, interning and adding may use the reserve (limits.reserve_div): the writer
 * opens it to keep, with less detail, a sample whose own entry did not fit (its stack without its
 * labels, or a marker frame), so that a full table costs detail, not time. Off at creation.
 * Returns whether it was on (to restore it). */
int mw_profbuf_use_reserve(mw_profbuf_t *b, int on);

/* Interns a string (copied). Returns its id, or 0 if the string table is full. */
mw_id_t mw_profbuf_intern_str(mw_profbuf_t *b, const char *s, size_t len);
/* Gives string id the text s from now on, in everything that holds the id (a placeholder whose
 * real text became known later); interning s then finds id, unless s was interned before. The old
 * text is no longer found. 0, or -1 when the arena or the string table is full (counted as
 * overflow; nothing changed). */
int mw_profbuf_rename_str(mw_profbuf_t *b, mw_id_t id, const char *s, size_t len);
/* Interns a frame whose string ids belong to this buffer. Returns its id or 0 when full. */
mw_id_t mw_profbuf_intern_frame(mw_profbuf_t *b, const mw_frame_t *f);

/* Adds values to the stack (frame ids leaf first, depth <= 65535; frames non-NULL even when
 * depth is 0) of this thread/labelset, creating it if needed. Returns 0, or -1 if a table is
 * full (counted as overflow). */
int mw_profbuf_add(mw_profbuf_t *b, const mw_id_t *frames, uint32_t depth, mw_id_t thread,
                   uint32_t labelset, const mw_values_t *v);

/* Same, and stores the 0-based index of the stack entry in *idx (when idx is not NULL) so
 * that later values for the very same (stack, thread, labelset) can go to mw_profbuf_add_at. */
int mw_profbuf_add_ex(mw_profbuf_t *b, const mw_id_t *frames, uint32_t depth, mw_id_t thread,
                      uint32_t labelset, const mw_values_t *v, uint32_t *idx);
/* Adds values to the stack entry at idx (from mw_profbuf_add_ex on this buffer, same
 * generation). Returns 0, or -1 when idx is out of range. */
int mw_profbuf_add_at(mw_profbuf_t *b, uint32_t idx, const mw_values_t *v);

/* Adds every stack of src into dst, re-interning strings and frames; a stack's span label set
 * becomes its base set (mw_labels_base: per-request span sets are for a window's own buffer,
 * never for a buffer that outlives it). Returns the number of stacks that did not fit. */
uint32_t mw_profbuf_merge(mw_profbuf_t *dst, const mw_profbuf_t *src);

/* Like mw_profbuf_merge, for the stacks of src that pick(ctx, stack, &values) keeps (returns 1;
 * it may change the values added, which start as the stack's); pick NULL keeps all. remap
 * (NULL, or one entry per stack of src) gets each kept stack's index in dst, UINT32_MAX for the
 * others and for those that did not fit. Returns the number of kept stacks that did not fit. */
typedef int (*mw_profbuf_pick_fn)(void *ctx, const mw_stack_t *s, mw_values_t *v);
uint32_t mw_profbuf_merge_pick(mw_profbuf_t *dst, const mw_profbuf_t *src, mw_profbuf_pick_fn pick,
                               void *ctx, uint32_t *remap);

/* Replaces the values of the stack entry at idx. 0, or -1 when idx is out of range. */
int mw_profbuf_set_values(mw_profbuf_t *b, uint32_t idx, const mw_values_t *v);

/* Read access (any thread that owns the buffer at the moment). */
uint32_t mw_profbuf_nstacks(const mw_profbuf_t *b);
const mw_stack_t *mw_profbuf_stack(const mw_profbuf_t *b, uint32_t i); /* 0-based index */
const mw_id_t *mw_profbuf_stack_frames(const mw_profbuf_t *b, const mw_stack_t *s);
uint32_t mw_profbuf_nframes(const mw_profbuf_t *b);
const mw_frame_t *mw_profbuf_frame(const mw_profbuf_t *b, mw_id_t id); /* NULL if bad id */
uint32_t mw_profbuf_nstrings(const mw_profbuf_t *b);
const char *mw_profbuf_str(const mw_profbuf_t *b, mw_id_t id, size_t *len); /* NUL-terminated */
void mw_profbuf_counts(const mw_profbuf_t *b, mw_profbuf_counts_t *out);

#endif
