/* mw_otlp_tables — the storage of the pprof -> OTLP converter (mw_otlp.c): an arena, a growable
 * table of pointers and an open-addressing hash map from bytes to an index.
 *
 *   arena      blocks of any size, 16-aligned and zeroed, all freed at once by
 *              mw_otlp_arena_free() (chunks of 64 KiB, or one chunk of the block's size when
 *              larger)
 *   vec        an array of pointers that doubles when full (64 entries first); it owns the
 *              array, not what the pointers point to
 *   imap       bytes -> int32_t index, linear probing, FNV-1a 64-bit hash; the capacity is a
 *              power of 2 (256 first) and doubles when the map is half full; each key is
 *              copied into an arena given by the caller, so the map never holds the caller's
 *              buffer
 *
 * Out of memory is the only failure: the functions return -1 (or NULL) and leave the object
 * as it was, still valid and still to be freed.
 *
 * Threads, locks, memory: no global state, no lock; each object belongs to one caller (one
 * conversion), on any thread, and is not shared. Zero-initialized objects are empty and
 * valid. A key's copy lives in the arena, so an imap must not outlive the arena its keys were
 * copied into; the _free functions release what the object owns and leave it empty.
 */
#ifndef MW_OTLP_TABLES_H
#define MW_OTLP_TABLES_H

#include <stddef.h>
#include <stdint.h>

/* ---- arena */

typedef struct mw_otlp_chunk mw_otlp_chunk_t;

typedef struct mw_otlp_arena {
    mw_otlp_chunk_t *head;
} mw_otlp_arena_t;

/* n zeroed bytes (at least 16), 16-aligned, alive until mw_otlp_arena_free; NULL when out of
 * memory. */
void *mw_otlp_arena_alloc(mw_otlp_arena_t *a, size_t n);

/* A copy of the NUL-terminated s in the arena; NULL when out of memory. */
char *mw_otlp_arena_strdup(mw_otlp_arena_t *a, const char *s);

/* Frees every block of the arena; the arena is empty again. */
void mw_otlp_arena_free(mw_otlp_arena_t *a);

/* ---- growable pointer table */

typedef struct mw_otlp_vec {
    void **v;
    size_t n, cap;
} mw_otlp_vec_t;

/* Appends p. 0, or -1 when out of memory (t unchanged). */
int mw_otlp_vec_push(mw_otlp_vec_t *t, void *p);

/* Frees the array (not the entries); the table is empty again. */
void mw_otlp_vec_free(mw_otlp_vec_t *t);

/* ---- hash map: bytes -> index */

typedef struct mw_otlp_slot {
    const unsigned char *key; /* in the arena; NULL = empty slot */
    size_t len;
    uint64_t hash;
    int32_t val;
} mw_otlp_slot_t;

typedef struct mw_otlp_imap {
    mw_otlp_slot_t *slots;
    size_t cap, n; /* cap: 0 or a power of 2 */
} mw_otlp_imap_t;

/* The hash the map uses for p[0..n) (FNV-1a, 64 bits). */
uint64_t mw_otlp_hash_bytes(const void *p, size_t n);

/* Makes room for one more key: grows the map when it is at least half full (or has no slot
 * yet). 0, or -1 when out of memory (m unchanged). Call it before a get whose slot is to be
 * filled by mw_otlp_imap_set. */
int mw_otlp_imap_reserve(mw_otlp_imap_t *m);

/* The index stored for key[0..len) (h = mw_otlp_hash_bytes(key, len)), or -1 with *slot the
 * free slot where it would go (valid until the map next grows). A map without slots holds
 * nothing: -1, *slot = 0, and such a slot must not be set. */
int32_t mw_otlp_imap_get(const mw_otlp_imap_t *m, const void *key, size_t len, uint64_t h,
                         size_t *slot);

/* Stores key[0..len) -> val at the free slot a get just gave for that key, copying the key into
 * a. 0, or -1 when out of memory (m unchanged). */
int mw_otlp_imap_set(mw_otlp_imap_t *m, mw_otlp_arena_t *a, size_t slot, const void *key,
                     size_t len, uint64_t h, int32_t val);

/* Stores key[0..len) -> val unless the key is there already (its index is then kept).
 * 0, or -1 when out of memory (m unchanged). */
int mw_otlp_imap_put(mw_otlp_imap_t *m, mw_otlp_arena_t *a, const void *key, size_t len,
                     int32_t val);

/* Frees the slots (the keys are the arena's); the map is empty again. */
void mw_otlp_imap_free(mw_otlp_imap_t *m);

#endif /* MW_OTLP_TABLES_H */
