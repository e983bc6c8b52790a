/* mw_profbuf — fixed-size open-addressing tables; see mw_profbuf.h for the contract.
 *
 * Each table is an array of entries plus an index of 2^k uint32 slots (k chosen so the index
 * is at most half full), holding entry id (1-based) or 0 for an empty slot; linear probing.
 * Nothing is ever deleted except by a whole reset, so probing needs no tombstones.
 */
#include "mw_profbuf.h"

#include "mw_labels.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

typedef struct {
    uint32_t off, len, hash;
} mw_strent_t;

struct mw_profbuf {
    mw_profbuf_limits_t lim;
    mw_profbuf_limits_t room; /* what the tables take with the reserve off (lim less the reserve) */
    int reserve_on;
    uint64_t generation;
    uint64_t overflow;

    char *arena;
    uint32_t arena_used;
    mw_strent_t *strs;
    uint32_t nstrs;
    uint32_t nrenamed; /* index slots taken by renamed strings (mw_profbuf_rename_str) */
    uint32_t *str_index;
    uint32_t str_mask;

    mw_frame_t *frames;
    uint32_t nframes;
    uint32_t *frame_index;
    uint32_t frame_mask;

    mw_stack_t *stacks;
    uint32_t nstacks;
    uint32_t *stack_index;
    uint32_t stack_mask;
    mw_id_t *slots;
    uint32_t slots_used;
};

static atomic_uint_fast64_t g_generation = 1;

void mw_profbuf_default_limits(mw_profbuf_limits_t *lim) {
    lim->max_stacks = 32768;
    lim->max_frames = 65536;
    lim->max_strings = 65536;
    lim->string_bytes = 4u << 20;
    lim->frame_slots = 1u << 20;
    lim->reserve_div = 16;
}

void mw_profbuf_small_limits(mw_profbuf_limits_t *lim) {
    lim->max_stacks = 8192;
    lim->max_frames = 16384;
    lim->max_strings = 16384;
    lim->string_bytes = 1u << 20;
    lim->frame_slots = 1u << 18;
}

static uint32_t index_size(uint32_t n) {
    uint32_t s = 16;
    while (s < 2 * n)
        s <<= 1;
    return s;
}

static uint32_t hash_bytes(const void *p, size_t n, uint32_t h) {
    /* FNV-1a, 32 bit: short keys, good enough spread for linear probing. */
    const unsigned char *c = p;
    if (h == 0) h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ c[i]) * 16777619u;
    return h;
}

mw_profbuf_t *mw_profbuf_new(const mw_profbuf_limits_t *lim) {
    mw_profbuf_t *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->lim = *lim;
    uint32_t si = index_size(lim->max_strings), fi = index_size(lim->max_frames),
             ki = index_size(lim->max_stacks);
    b->arena = malloc(lim->string_bytes);
    b->strs = calloc(lim->max_strings, sizeof *b->strs);
    b->str_index = calloc(si, sizeof(uint32_t));
    b->frames = calloc(lim->max_frames, sizeof *b->frames);
    b->frame_index = calloc(fi, sizeof(uint32_t));
    b->stacks = calloc(lim->max_stacks, sizeof *b->stacks);
    b->stack_index = calloc(ki, sizeof(uint32_t));
    b->slots = malloc((size_t)lim->frame_slots * sizeof(mw_id_t));
    if (!b->arena || !b->strs || !b->str_index || !b->frames || !b->frame_index || !b->stacks ||
        !b->stack_index || !b->slots) {
        mw_profbuf_free(b);
        return NULL;
    }
    b->room = *lim;
    if (lim->reserve_div > 1) { /* the last 1/d of each table: see mw_profbuf_use_reserve */
        uint32_t d = lim->reserve_div;
        b->room.max_stacks -= lim->max_stacks / d;
        b->room.max_frames -= lim->max_frames / d;
        b->room.max_strings -= lim->max_strings / d;
        b->room.string_bytes -= lim->string_bytes / d;
        b->room.frame_slots -= lim->frame_slots / d;
    }
    b->str_mask = si - 1;
    b->frame_mask = fi - 1;
    b->stack_mask = ki - 1;
    b->generation = atomic_fetch_add(&g_generation, 1);
    return b;
}

void mw_profbuf_free(mw_profbuf_t *b) {
    if (!b) return;
    free(b->arena);
    free(b->strs);
    free(b->str_index);
    free(b->frames);
    free(b->frame_index);
    free(b->stacks);
    free(b->stack_index);
    free(b->slots);
    free(b);
}

/* Zeroes an index. Whole pages are handed back to the kernel (MADV_DONTNEED on private
 * anonymous memory reads back as zeros), so an emptied buffer is not resident beyond what the
 * next window touches. */
static void clear_index(uint32_t *idx, size_t n) {
    size_t len = n * sizeof(uint32_t);
    uintptr_t lo = ((uintptr_t)idx + 4095) & ~(uintptr_t)4095;
    uintptr_t hi = ((uintptr_t)idx + len) & ~(uintptr_t)4095;
    if (hi > lo + 4096 && madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0) {
        memset(idx, 0, lo - (uintptr_t)idx);
        memset((void *)hi, 0, (uintptr_t)idx + len - hi);
        return;
    }
    memset(idx, 0, len);
}

void mw_profbuf_reset(mw_profbuf_t *b) {
    if (b->nstrs) clear_index(b->str_index, (size_t)b->str_mask + 1);
    if (b->nframes) clear_index(b->frame_index, (size_t)b->frame_mask + 1);
    if (b->nstacks) clear_index(b->stack_index, (size_t)b->stack_mask + 1);
    b->arena_used = b->nstrs = b->nrenamed = b->nframes = b->nstacks = b->slots_used = 0;
    b->overflow = 0;
    b->generation = atomic_fetch_add(&g_generation, 1);
}

int mw_profbuf_use_reserve(mw_profbuf_t *b, int on) {
    int was = b->reserve_on;
    b->reserve_on = on;
    return was;
}

/* The limits in force: all of them with the reserve on, the room left for ordinary entries
 * otherwise. */
static const mw_profbuf_limits_t *limits(const mw_profbuf_t *b) {
    return b->reserve_on ? &b->lim : &b->room;
}

uint64_t mw_profbuf_generation(const mw_profbuf_t *b) {
    return b->generation;
}

mw_id_t mw_profbuf_intern_str(mw_profbuf_t *b, const char *s, size_t len) {
    if (len > 0xFFFF) len = 0xFFFF;
    uint32_t h = hash_bytes(s, len, 0);
    for (uint32_t i = h & b->str_mask;; i = (i + 1) & b->str_mask) {
        uint32_t id = b->str_index[i];
        if (id == 0) {
            const mw_profbuf_limits_t *l = limits(b);
            if (b->nstrs + b->nrenamed >= l->max_strings ||
                b->arena_used + len + 1 > l->string_bytes) {
                b->overflow++;
                return 0;
            }
            mw_strent_t *e = &b->strs[b->nstrs];
            e->off = b->arena_used;
            e->len = (uint32_t)len;
            e->hash = h;
            memcpy(b->arena + e->off, s, len);
            b->arena[e->off + len] = '\0';
            b->arena_used += (uint32_t)len + 1;
            b->str_index[i] = ++b->nstrs;
            return b->nstrs;
        }
        mw_strent_t *e = &b->strs[id - 1];
        if (e->hash == h && e->len == len && memcmp(b->arena + e->off, s, len) == 0) return id;
    }
}

int mw_profbuf_rename_str(mw_profbuf_t *b, mw_id_t id, const char *s, size_t len) {
    if (id < 1 || id > b->nstrs) return -1;
    if (len > 0xFFFF) len = 0xFFFF;
    const mw_profbuf_limits_t *l = limits(b);
    /* the renamed string takes one more index slot: counted as a string, so the index stays at
     * most half full */
    if (b->nstrs + b->nrenamed >= l->max_strings || b->arena_used + len + 1 > l->string_bytes) {
        b->overflow++;
        return -1;
    }
    uint32_t h = hash_bytes(s, len, 0);
    mw_strent_t *e = &b->strs[id - 1];
    e->off = b->arena_used;
    e->len = (uint32_t)len;
    e->hash = h; /* its old slot no longer matches the old text */
    memcpy(b->arena + e->off, s, len);
    b->arena[e->off + len] = '\0';
    b->arena_used += (uint32_t)len + 1;
    b->nrenamed++;
    uint32_t i = h & b->str_mask;
    while (b->str_index[i] != 0)
        i = (i + 1) & b->str_mask;
    b->str_index[i] = id;
    return 0;
}

mw_id_t mw_profbuf_intern_frame(mw_profbuf_t *b, const mw_frame_t *f) {
    uint32_t h = hash_bytes(f, sizeof *f, 0);
    for (uint32_t i = h & b->frame_mask;; i = (i + 1) & b->frame_mask) {
        uint32_t id = b->frame_index[i];
        if (id == 0) {
            if (b->nframes >= limits(b)->max_frames) {
                b->overflow++;
                return 0;
            }
            b->frames[b->nframes] = *f;
            b->frame_index[i] = ++b->nframes;
            return b->nframes;
        }
        if (memcmp(&b->frames[id - 1], f, sizeof *f) == 0) return id;
    }
}

static uint32_t stack_hash(const mw_id_t *frames, uint32_t depth, mw_id_t thread,
                           uint32_t labelset) {
    uint32_t h = hash_bytes(&thread, sizeof thread, 0);
    h = hash_bytes(&labelset, sizeof labelset, h);
    return hash_bytes(frames, (size_t)depth * sizeof *frames, h);
}

static void add_values(mw_stack_t *s, const mw_values_t *v) {
    s->v.cpu_samples += v->cpu_samples;
    s->v.cpu_ns += v->cpu_ns;
    s->v.wall_samples += v->wall_samples;
    s->v.wall_ns += v->wall_ns;
    s->v.own_ns += v->own_ns;
}

int mw_profbuf_add(mw_profbuf_t *b, const mw_id_t *frames, uint32_t depth, mw_id_t thread,
                   uint32_t labelset, const mw_values_t *v) {
    return mw_profbuf_add_ex(b, frames, depth, thread, labelset, v, NULL);
}

int mw_profbuf_add_at(mw_profbuf_t *b, uint32_t idx, const mw_values_t *v) {
    if (idx >= b->nstacks) return -1;
    add_values(&b->stacks[idx], v);
    return 0;
}

int mw_profbuf_add_ex(mw_profbuf_t *b, const mw_id_t *frames, uint32_t depth, mw_id_t thread,
                      uint32_t labelset, const mw_values_t *v, uint32_t *idx) {
    if (depth > 0xFFFF) depth = 0xFFFF;
    uint32_t h = stack_hash(frames, depth, thread, labelset);
    for (uint32_t i = h & b->stack_mask;; i = (i + 1) & b->stack_mask) {
        uint32_t id = b->stack_index[i];
        mw_stack_t *s;
        if (id == 0) {
            const mw_profbuf_limits_t *l = limits(b);
            if (b->nstacks >= l->max_stacks || b->slots_used + depth > l->frame_slots) {
                b->overflow++;
                return -1;
            }
            s = &b->stacks[b->nstacks];
            memset(s, 0, sizeof *s);
            s->frames_off = b->slots_used;
            s->depth = (uint16_t)depth;
            s->thread = thread;
            s->labelset = labelset;
            s->hash = h;
            memcpy(b->slots + b->slots_used, frames, (size_t)depth * sizeof *frames);
            b->slots_used += depth;
            b->stack_index[i] = ++b->nstacks;
        } else {
            s = &b->stacks[id - 1];
            if (s->hash != h || s->depth != depth || s->thread != thread ||
                s->labelset != labelset ||
                memcmp(b->slots + s->frames_off, frames, (size_t)depth * sizeof *frames) != 0)
                continue;
        }
        add_values(s, v);
        if (idx) *idx = (uint32_t)(s - b->stacks);
        return 0;
    }
}

static mw_id_t copy_str(mw_profbuf_t *dst, const mw_profbuf_t *src, mw_id_t id) {
    size_t len;
    const char *s = mw_profbuf_str(src, id, &len);
    return s ? mw_profbuf_intern_str(dst, s, len) : 0;
}

uint32_t mw_profbuf_merge(mw_profbuf_t *dst, const mw_profbuf_t *src) {
    return mw_profbuf_merge_pick(dst, src, NULL, NULL, NULL);
}

uint32_t mw_profbuf_merge_pick(mw_profbuf_t *dst, const mw_profbuf_t *src, mw_profbuf_pick_fn pick,
                               void *ctx, uint32_t *remap) {
    uint32_t lost = 0;
    if (remap)
        for (uint32_t i = 0; i < src->nstacks; i++)
            remap[i] = UINT32_MAX;
    /* Frame ids of src translate to dst lazily; a small map avoids re-hashing strings. */
    mw_id_t *map = calloc(src->nframes + 1, sizeof *map);
    mw_id_t *ids = malloc(0x10000 * sizeof *ids);
    if (!map || !ids) {
        free(map);
        free(ids);
        return src->nstacks;
    }
    for (uint32_t i = 0; i < src->nstacks; i++) {
        const mw_stack_t *s = &src->stacks[i];
        mw_values_t v = s->v;
        if (pick && !pick(ctx, s, &v)) continue;
        const mw_id_t *fr = src->slots + s->frames_off;
        int ok = 1;
        for (uint32_t d = 0; d < s->depth && ok; d++) {
            mw_id_t f = fr[d];
            if (!map[f]) {
                mw_frame_t nf = src->frames[f - 1];
                nf.name = copy_str(dst, src, nf.name);
                nf.file = copy_str(dst, src, nf.file);
                map[f] = (nf.name && nf.file) ? mw_profbuf_intern_frame(dst, &nf) : 0;
            }
            ids[d] = map[f];
            ok = ids[d] != 0;
        }
        mw_id_t th = ok ? copy_str(dst, src, s->thread) : 0;
        uint32_t at = 0;
        if (!ok || (s->thread && !th) ||
            mw_profbuf_add_ex(dst, ids, s->depth, th, mw_labels_base(s->labelset), &v, &at) != 0)
            lost++;
        else if (remap)
            remap[i] = at;
    }
    free(map);
    free(ids);
    return lost;
}

int mw_profbuf_set_values(mw_profbuf_t *b, uint32_t idx, const mw_values_t *v) {
    if (idx >= b->nstacks) return -1;
    b->stacks[idx].v = *v;
    return 0;
}

uint32_t mw_profbuf_nstacks(const mw_profbuf_t *b) {
    return b->nstacks;
}
const mw_stack_t *mw_profbuf_stack(const mw_profbuf_t *b, uint32_t i) {
    return i < b->nstacks ? &b->stacks[i] : NULL;
}
const mw_id_t *mw_profbuf_stack_frames(const mw_profbuf_t *b, const mw_stack_t *s) {
    return b->slots + s->frames_off;
}
uint32_t mw_profbuf_nframes(const mw_profbuf_t *b) {
    return b->nframes;
}
const mw_frame_t *mw_profbuf_frame(const mw_profbuf_t *b, mw_id_t id) {
    return (id >= 1 && id <= b->nframes) ? &b->frames[id - 1] : NULL;
}
uint32_t mw_profbuf_nstrings(const mw_profbuf_t *b) {
    return b->nstrs;
}
const char *mw_profbuf_str(const mw_profbuf_t *b, mw_id_t id, size_t *len) {
    if (id < 1 || id > b->nstrs) return NULL;
    const mw_strent_t *e = &b->strs[id - 1];
    if (len) *len = e->len;
    return b->arena + e->off;
}
void mw_profbuf_counts(const mw_profbuf_t *b, mw_profbuf_counts_t *out) {
    out->stacks = b->nstacks;
    out->frames = b->nframes;
    out->strings = b->nstrs;
    out->string_bytes_used = b->arena_used;
    out->frame_slots_used = b->slots_used;
    out->overflow = b->overflow;
}
