/* mw_pprof — pprof encoding of one profile buffer; see mw_pprof.h for the contract.
 *
 * The mechanism. A buffer already holds interned strings, frames (name, file, line, first
 * line) and stacks of frame ids, so encoding is a relabelling, done in two passes over the
 * stacks with tables sized from the buffer's counts:
 *
 *   pass 1  sums the stack depths (the size of the one location-id array every sample points
 *           into), finds the distinct label sets (an open-addressing map keyed by label-set id)
 *           and the distinct thread names, so the string pool, the label pool and the per-sample
 *           label-pointer array can be allocated exactly;
 *   pass 2  maps, lazily and once each, buffer string ids → string-table indices (the pool
 *           deduplicates by content, so a label value equal to a file name is stored once),
 *           buffer frame ids → location ids (functions keyed by (name, file), locations by
 *           (function, line): frames differing only in first line share a location), and fills
 *           the samples.
 *
 * Label messages are shared between samples (protobuf-c only reads them while packing): one
 * pid label, one thread_name label per thread name, one label per valid pair of each label
 * set. The Profile then is packed once into a buffer of get_packed_size() bytes and gzipped
 * in one deflate() call.
 *
 * Strings must be valid UTF-8 for strict readers (Python's protobuf rejects a proto3 string
 * that is not); a name truncated inside a multi-byte sequence is repaired ('?' for each bad
 * byte) into a private copy.
 */
#include "mw_pprof.h"

#include "mw_labels.h"
#include "profile.pb-c.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

typedef Perftools__Profiles__Profile pb_profile_t;
typedef Perftools__Profiles__ValueType pb_valuetype_t;
typedef Perftools__Profiles__Sample pb_sample_t;
typedef Perftools__Profiles__Label pb_label_t;
typedef Perftools__Profiles__Location pb_location_t;
typedef Perftools__Profiles__Line pb_line_t;
typedef Perftools__Profiles__Function pb_function_t;
typedef Perftools__Profiles__Mapping pb_mapping_t;

static uint32_t pow2_at_least(uint64_t n) {
    uint64_t s = 16;
    while (s < n)
        s <<= 1;
    return (uint32_t)s;
}

static uint32_t mix32(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (uint32_t)x;
}

/* ---- UTF-8 ------------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence starting at s (1..4), 0 if invalid. *s != 0. */
static int utf8_seq_len(const unsigned char *s) {
    if (s[0] < 0x80) return 1;
    int n;
    uint32_t c;
    if ((s[0] & 0xE0) == 0xC0) {
        n = 1;
        c = s[0] & 0x1F;
    } else if ((s[0] & 0xF0) == 0xE0) {
        n = 2;
        c = s[0] & 0x0F;
    } else if ((s[0] & 0xF8) == 0xF0) {
        n = 3;
        c = s[0] & 0x07;
    } else {
        return 0;
    }
    for (int i = 1; i <= n; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0; /* also stops at the terminating NUL */
        c = (c << 6) | (s[i] & 0x3F);
    }
    if ((n == 1 && c < 0x80) || (n == 2 && c < 0x800) || (n == 3 && c < 0x10000) || c > 0x10FFFF ||
        (c >= 0xD800 && c <= 0xDFFF))
        return 0;
    return n + 1;
}

static int utf8_valid(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int n = utf8_seq_len(p);
        if (!n) return 0;
        p += n;
    }
    return 1;
}

static char *utf8_repair(const char *s) {
    size_t len = strlen(s);
    char *o = malloc(len + 1);
    if (!o) return NULL;
    const unsigned char *p = (const unsigned char *)s;
    size_t k = 0;
    while (*p) {
        int n = utf8_seq_len(p);
        if (n) {
            memcpy(o + k, p, (size_t)n);
            k += (size_t)n;
            p += n;
        } else {
            o[k++] = '?';
            p++;
        }
    }
    o[k] = '\0';
    return o;
}

/* ---- string pool --------------------------------------------------------------------------- */

typedef struct {
    char **tab;      /* the string_table handed to protobuf-c */
    uint32_t *hash;  /* hash of each entry */
    uint32_t *index; /* open addressing: entry + 1, 0 = empty */
    uint32_t n, cap, mask;
    char **owned; /* repaired copies to free */
    uint32_t nowned, repaired;
} strpool_t;

static int pool_init(strpool_t *p, uint32_t cap) {
    uint32_t isz = pow2_at_least(2ull * cap);
    p->tab = calloc(cap, sizeof *p->tab);
    p->hash = calloc(cap, sizeof *p->hash);
    p->index = calloc(isz, sizeof *p->index);
    p->cap = cap;
    p->mask = isz - 1;
    return (p->tab && p->hash && p->index) ? 0 : -1;
}

static void pool_free(strpool_t *p) {
    for (uint32_t i = 0; i < p->nowned; i++)
        free(p->owned[i]);
    free(p->owned);
    free(p->tab);
    free(p->hash);
    free(p->index);
}

static uint32_t str_hash(const char *s) {
    uint32_t h = 2166136261u;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++)
        h = (h ^ *c) * 16777619u;
    return h;
}

/* Index of s in the string table (adding it), or -1 when the pool is full or out of memory.
 * s must stay valid until the profile is packed. */
static int64_t pool_add(strpool_t *p, const char *s) {
    if (!s) s = "";
    uint32_t h = str_hash(s);
    for (uint32_t i = h & p->mask;; i = (i + 1) & p->mask) {
        uint32_t e = p->index[i];
        if (e == 0) break;
        if (p->hash[e - 1] == h && strcmp(p->tab[e - 1], s) == 0) return e - 1;
    }
    char *use = (char *)s;
    if (!utf8_valid(s)) {
        if (!p->owned && !(p->owned = calloc(p->cap, sizeof *p->owned))) return -1;
        if (!(use = utf8_repair(s))) return -1;
        p->owned[p->nowned++] = use;
        p->repaired++;
        /* The repaired text may equal a string already present: look again. */
        h = str_hash(use);
        for (uint32_t i = h & p->mask;; i = (i + 1) & p->mask) {
            uint32_t e = p->index[i];
            if (e == 0) break;
            if (p->hash[e - 1] == h && strcmp(p->tab[e - 1], use) == 0) return e - 1;
        }
    }
    if (p->n >= p->cap) return -1;
    uint32_t i = h & p->mask;
    while (p->index[i])
        i = (i + 1) & p->mask;
    p->tab[p->n] = use;
    p->hash[p->n] = h;
    p->index[i] = ++p->n;
    return p->n - 1;
}

/* Index of a copy of s[0..len) (a part of a buffer string), the copy owned by the pool. */
static int64_t pool_add_copy(strpool_t *p, const char *s, size_t len) {
    char *c = strndup(s, len);
    if (!c) return -1;
    if (!p->owned && !(p->owned = calloc(p->cap, sizeof *p->owned))) {
        free(c);
        return -1;
    }
    uint32_t before = p->n;
    int64_t k = pool_add(p, c);
    if (k >= 0 && p->n != before && p->tab[k] == c)
        p->owned[p->nowned++] = c;
    else
        free(c);
    return k;
}

/* ---- the encoder ------------------------------------------------------------------------- */

typedef struct {
    uint32_t id;    /* label-set id, 0 = empty slot */
    uint32_t first; /* index of its first label in the label pool */
    uint32_t n;     /* labels kept */
} lsent_t;

typedef struct {
    const mw_profbuf_t *b;
    strpool_t pool;
    uint32_t *strmap; /* buffer string id → table index + 1 (0 = not yet) */

    lsent_t *ls; /* label sets, open addressing */
    uint32_t ls_mask;
    uint32_t *stack_ls;     /* per stack: slot in ls + 1 (0 = no label set) */
    uint32_t *thread_label; /* buffer string id → label index + 1 */
    uint32_t *task_label;   /* buffer string id → its task label's index + 1, 0 = none */

    pb_label_t *labels;
    uint32_t nlabels, labels_cap;
    pb_label_t **label_ptrs;

    pb_function_t *funcs;
    pb_function_t **func_ptrs;
    uint32_t nfuncs;
    uint32_t *func_index; /* open addressing over (name, file): function index + 1 */
    uint32_t func_mask;

    pb_location_t *locs;
    pb_location_t **loc_ptrs;
    pb_line_t *lines;
    pb_line_t **line_ptrs;
    uint32_t nlocs;
    uint32_t *loc_index; /* open addressing over (function id, line): location index + 1 */
    uint32_t loc_mask;
    uint32_t *frame_loc; /* buffer frame id → location id (0 = not yet) */

    pb_sample_t *samples;
    pb_sample_t **sample_ptrs;
    uint64_t *loc_ids;
    int64_t *values;
    uint32_t labels_skipped;
} enc_t;

static void enc_free(enc_t *e) {
    pool_free(&e->pool);
    free(e->strmap);
    free(e->ls);
    free(e->stack_ls);
    free(e->thread_label);
    free(e->task_label);
    free(e->labels);
    free(e->label_ptrs);
    free(e->funcs);
    free(e->func_ptrs);
    free(e->func_index);
    free(e->locs);
    free(e->loc_ptrs);
    free(e->lines);
    free(e->line_ptrs);
    free(e->loc_index);
    free(e->frame_loc);
    free(e->samples);
    free(e->sample_ptrs);
    free(e->loc_ids);
    free(e->values);
}

/* Table index of buffer string id (0 or unknown ids map to ""). -1 on failure. */
static int64_t buf_str(enc_t *e, mw_id_t id) {
    if (id == 0 || id > mw_profbuf_nstrings(e->b)) return 0;
    if (e->strmap[id]) return e->strmap[id] - 1;
    int64_t k = pool_add(&e->pool, mw_profbuf_str(e->b, id, NULL));
    if (k >= 0) e->strmap[id] = (uint32_t)k + 1;
    return k;
}

static lsent_t *ls_slot(enc_t *e, uint32_t id, int *created) {
    *created = 0;
    for (uint32_t i = mix32(id) & e->ls_mask;; i = (i + 1) & e->ls_mask) {
        if (e->ls[i].id == id) return &e->ls[i];
        if (e->ls[i].id == 0) {
            e->ls[i].id = id;
            *created = 1;
            return &e->ls[i];
        }
    }
}

static pb_label_t *new_label(enc_t *e, int64_t key, int64_t str) {
    pb_label_t *l = &e->labels[e->nlabels++];
    perftools__profiles__label__init(l);
    l->key = key;
    l->str = str;
    return l;
}

int mw_pprof_label_key_ok(const char *k) {
    if (!k || !*k) return 0;
    if (k[0] == '_' && k[1] == '_') return 0;
    for (const char *c = k; *c; c++) {
        int alpha = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || *c == '_';
        int digit = *c >= '0' && *c <= '9';
        if (!alpha && !(digit && c != k)) return 0;
    }
    return 1;
}

/* Turns the distinct label sets found in pass 1 into label messages. Keys k_thread, k_pid and
 * the static labels' keys (reserved[0..nreserved)) are left out. */
static int build_labelsets(enc_t *e, int64_t k_thread, int64_t k_pid, const int64_t *reserved,
                           uint32_t nreserved) {
    for (uint32_t i = 0; i <= e->ls_mask; i++) {
        lsent_t *s = &e->ls[i];
        if (!s->id) continue;
        const char *const *keys = NULL, *const *vals = NULL;
        int n = mw_labels_get(s->id, &keys, &vals);
        s->first = e->nlabels;
        s->n = 0;
        for (int j = 0; j < n; j++) {
            int dup = !mw_pprof_label_key_ok(keys[j]);
            for (int q = 0; q < j && !dup; q++)
                dup = strcmp(keys[q], keys[j]) == 0;
            int64_t k = dup ? -1 : pool_add(&e->pool, keys[j]);
            if (!dup && k < 0) return -1;
            for (uint32_t r = 0; r < nreserved && !dup; r++)
                dup = k == reserved[r];
            if (dup || k == k_thread || k == k_pid) {
                e->labels_skipped++;
                continue;
            }
            int64_t v = pool_add(&e->pool, vals[j]);
            if (v < 0) return -1;
            new_label(e, k, v);
            s->n++;
        }
    }
    return 0;
}

static uint32_t func_get(enc_t *e, int64_t name, int64_t file, int32_t first_line) {
    uint32_t h = mix32(((uint64_t)name << 32) ^ (uint64_t)file);
    for (uint32_t i = h & e->func_mask;; i = (i + 1) & e->func_mask) {
        uint32_t f = e->func_index[i];
        if (f == 0) {
            pb_function_t *fn = &e->funcs[e->nfuncs];
            perftools__profiles__function__init(fn);
            fn->id = e->nfuncs + 1;
            fn->name = name;
            /* system_name stays "": pprof "demangles" a function whose system name equals
             * its name, and its C++ heuristics would turn "<module>" into "". */
            fn->filename = file;
            fn->start_line = first_line > 0 ? first_line : 0;
            e->func_ptrs[e->nfuncs] = fn;
            e->func_index[i] = ++e->nfuncs;
            return e->nfuncs;
        }
        const pb_function_t *fn = &e->funcs[f - 1];
        if (fn->name == name && fn->filename == file) return f;
    }
}

static uint32_t loc_get(enc_t *e, uint32_t func, int32_t line) {
    uint32_t h = mix32(((uint64_t)func << 32) ^ (uint32_t)line);
    for (uint32_t i = h & e->loc_mask;; i = (i + 1) & e->loc_mask) {
        uint32_t l = e->loc_index[i];
        if (l == 0) {
            uint32_t k = e->nlocs;
            pb_location_t *loc = &e->locs[k];
            pb_line_t *ln = &e->lines[k];
            perftools__profiles__location__init(loc);
            perftools__profiles__line__init(ln);
            ln->function_id = func;
            ln->line = line > 0 ? line : 0;
            e->line_ptrs[k] = ln;
            loc->id = k + 1;
            loc->mapping_id = 1;
            loc->n_line = 1;
            loc->line = &e->line_ptrs[k];
            e->loc_ptrs[k] = loc;
            e->loc_index[i] = ++e->nlocs;
            return e->nlocs;
        }
        const pb_location_t *loc = &e->locs[l - 1];
        if (loc->line[0]->function_id == func && loc->line[0]->line == (line > 0 ? line : 0))
            return l;
    }
}

/* Location id of buffer frame id, 0 if the frame is unknown, (uint32_t)-1 on failure. */
static uint32_t frame_loc(enc_t *e, mw_id_t id) {
    if (id == 0 || id > mw_profbuf_nframes(e->b)) return 0;
    if (e->frame_loc[id]) return e->frame_loc[id];
    const mw_frame_t *f = mw_profbuf_frame(e->b, id);
    int64_t name = buf_str(e, f->name), file = buf_str(e, f->file);
    if (name < 0 || file < 0) return (uint32_t)-1;
    uint32_t fn = func_get(e, name, file, f->first_line);
    return e->frame_loc[id] = loc_get(e, fn, f->line);
}

static int64_t clamp64(uint64_t v) {
    return v > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)v;
}

/* What pass 1 counts: the sizes of the tables pass 2 fills. */
typedef struct {
    uint64_t slots;    /* sum of the stack depths: location ids of all samples */
    uint64_t pairs;    /* label pairs of the distinct label sets */
    uint32_t nthreads; /* distinct thread names */
} enc_sizes_t;

/* The fixed string-table entries and the labels every sample may share. */
typedef struct {
    int64_t samples, count, cpu, ns, wall, thread, task, pid, unknown, map, contentions, delay;
    int64_t alloc_objects, alloc_space, inuse_objects, inuse_space, space, bytes; /* memory */
    int kind;                                                                     /* meta.kind */
    pb_label_t *pid_label; /* NULL without a pid */
    pb_label_t *statics;   /* the meta's static labels, nstatic of them */
    uint32_t nstatic;
    pb_label_t *unknown_thread; /* made when a stack has no thread name */
    char pid_text[24];          /* the pid label's value (the pool keeps a pointer to it) */
} enc_fixed_t;

/* Pass 1: finds the distinct label sets (e->ls, e->stack_ls) and thread names, and counts. */
static int count_pass(enc_t *e, enc_sizes_t *sz) {
    uint32_t ns = mw_profbuf_nstacks(e->b), nstr = mw_profbuf_nstrings(e->b);
    uint32_t ls_cap = pow2_at_least(2ull * ns + 2);
    e->ls = calloc(ls_cap, sizeof *e->ls);
    e->ls_mask = ls_cap - 1;
    e->stack_ls = calloc(ns + 1, sizeof *e->stack_ls);
    e->thread_label = calloc(nstr + 1, sizeof *e->thread_label);
    e->task_label = calloc(nstr + 1, sizeof *e->task_label);
    if (!e->ls || !e->stack_ls || !e->thread_label || !e->task_label) return -1;
    memset(sz, 0, sizeof *sz);
    for (uint32_t i = 0; i < ns; i++) {
        const mw_stack_t *s = mw_profbuf_stack(e->b, i);
        sz->slots += s->depth;
        if (s->thread >= 1 && s->thread <= nstr && !e->thread_label[s->thread]) {
            e->thread_label[s->thread] = 1; /* seen; the real label index comes in pass 2 */
            sz->nthreads++;
        }
        if (s->labelset) {
            int created;
            lsent_t *ent = ls_slot(e, s->labelset, &created);
            if (created) {
                const char *const *k, *const *v;
                int n = mw_labels_get(s->labelset, &k, &v);
                sz->pairs += n > 0 ? (uint64_t)n : 0;
            }
            e->stack_ls[i] = (uint32_t)(ent - e->ls) + 1;
        }
    }
    memset(e->thread_label, 0, (size_t)(nstr + 1) * sizeof *e->thread_label);
    return 0;
}

/* Allocates every table of pass 2, sized from pass 1's counts. */
static int alloc_tables(enc_t *e, const enc_sizes_t *sz) {
    uint32_t ns = mw_profbuf_nstacks(e->b), nf = mw_profbuf_nframes(e->b);
    uint32_t nstr = mw_profbuf_nstrings(e->b);
    if (pool_init(&e->pool, nstr + 20 + 2 * sz->nthreads + 2 * MW_PPROF_MAX_STATIC +
                                MW_PPROF_MAX_COMMENTS + 2 * (uint32_t)sz->pairs) != 0)
        return -1;
    e->strmap = calloc(nstr + 1, sizeof *e->strmap);
    e->labels_cap = 2 + MW_PPROF_MAX_STATIC + 2 * sz->nthreads + (uint32_t)sz->pairs;
    e->labels = calloc(e->labels_cap, sizeof *e->labels);
    e->funcs = calloc(nf + 1, sizeof *e->funcs);
    e->func_ptrs = calloc(nf + 1, sizeof *e->func_ptrs);
    uint32_t fsz = pow2_at_least(2ull * nf + 2);
    e->func_index = calloc(fsz, sizeof *e->func_index);
    e->func_mask = fsz - 1;
    e->locs = calloc(nf + 1, sizeof *e->locs);
    e->loc_ptrs = calloc(nf + 1, sizeof *e->loc_ptrs);
    e->lines = calloc(nf + 1, sizeof *e->lines);
    e->line_ptrs = calloc(nf + 1, sizeof *e->line_ptrs);
    e->loc_index = calloc(fsz, sizeof *e->loc_index);
    e->loc_mask = fsz - 1;
    e->frame_loc = calloc(nf + 1, sizeof *e->frame_loc);
    e->samples = calloc(ns + 1, sizeof *e->samples);
    e->sample_ptrs = calloc(ns + 1, sizeof *e->sample_ptrs);
    e->loc_ids = calloc(sz->slots + 1, sizeof *e->loc_ids);
    e->values = calloc(4ull * ns + 1, sizeof *e->values);
    if (!e->strmap || !e->labels || !e->funcs || !e->func_ptrs || !e->func_index || !e->locs ||
        !e->loc_ptrs || !e->lines || !e->line_ptrs || !e->loc_index || !e->frame_loc ||
        !e->samples || !e->sample_ptrs || !e->loc_ids || !e->values)
        return -1;
    return 0;
}

/* The fixed strings ("" first), the pid label, the label sets' labels, and the per-sample
 * label pointers (thread + pid + the set's kept pairs). */
static int fixed_labels(enc_t *e, const mw_pprof_meta_t *meta, enc_fixed_t *fx) {
    memset(fx, 0, sizeof *fx);
    int64_t empty = pool_add(&e->pool, "");
    fx->samples = pool_add(&e->pool, "samples");
    fx->count = pool_add(&e->pool, "count");
    fx->cpu = pool_add(&e->pool, "cpu");
    fx->ns = pool_add(&e->pool, "nanoseconds");
    fx->wall = pool_add(&e->pool, "wall");
    fx->kind = meta->kind;
    fx->contentions = meta->kind == MW_PPROF_BLOCK ? pool_add(&e->pool, "contentions") : 0;
    fx->delay = meta->kind == MW_PPROF_BLOCK ? pool_add(&e->pool, "delay") : 0;
    if (meta->kind == MW_PPROF_MEMORY) {
        fx->alloc_objects = pool_add(&e->pool, "alloc_objects");
        fx->alloc_space = pool_add(&e->pool, "alloc_space");
        fx->inuse_objects = pool_add(&e->pool, "inuse_objects");
        fx->inuse_space = pool_add(&e->pool, "inuse_space");
        fx->space = pool_add(&e->pool, "space");
        fx->bytes = pool_add(&e->pool, "bytes");
        if (fx->alloc_objects < 0 || fx->alloc_space < 0 || fx->inuse_objects < 0 ||
            fx->inuse_space < 0 || fx->space < 0 || fx->bytes < 0)
            return -1;
    }
    fx->thread = pool_add(&e->pool, "thread_name");
    fx->task = pool_add(&e->pool, "task");
    fx->pid = pool_add(&e->pool, "pid");
    fx->unknown = pool_add(&e->pool, "unknown");
    fx->map = pool_add(&e->pool, "[python]");
    snprintf(fx->pid_text, sizeof fx->pid_text, "%ld", meta->pid);
    int64_t pid_value = meta->pid > 0 ? pool_add(&e->pool, fx->pid_text) : 0;
    if (empty != 0 || fx->samples < 0 || fx->count < 0 || fx->cpu < 0 || fx->ns < 0 ||
        fx->wall < 0 || fx->contentions < 0 || fx->delay < 0 || fx->thread < 0 || fx->task < 0 ||
        fx->pid < 0 || fx->unknown < 0 || fx->map < 0 || pid_value < 0)
        return -1;
    fx->pid_label = meta->pid > 0 ? new_label(e, fx->pid, pid_value) : NULL;
    int64_t reserved[MW_PPROF_MAX_STATIC];
    for (uint32_t j = 0; j < meta->nstatic && j < MW_PPROF_MAX_STATIC; j++) {
        int64_t k = pool_add(&e->pool, meta->static_keys[j]),
                v = pool_add(&e->pool, meta->static_vals[j]);
        if (k < 0 || v < 0) return -1;
        pb_label_t *l = new_label(e, k, v);
        if (!fx->statics) fx->statics = l;
        reserved[fx->nstatic++] = k;
    }
    if (build_labelsets(e, fx->thread, fx->pid, reserved, fx->nstatic) != 0) return -1;

    uint32_t ns = mw_profbuf_nstacks(e->b);
    uint64_t nptr = 0;
    for (uint32_t i = 0; i < ns; i++)
        nptr += 2 + (fx->pid_label ? 1 : 0) + fx->nstatic +
                (e->stack_ls[i] ? e->ls[e->stack_ls[i] - 1].n : 0);
    e->label_ptrs = calloc(nptr + 1, sizeof *e->label_ptrs);
    return e->label_ptrs ? 0 : -1;
}

/* The thread_name label of a stack's thread (made at its first use). NULL on failure. */
static pb_label_t *label_of_thread(enc_t *e, enc_fixed_t *fx, mw_id_t thread) {
    if (thread < 1 || thread > mw_profbuf_nstrings(e->b)) {
        if (!fx->unknown_thread) fx->unknown_thread = new_label(e, fx->thread, fx->unknown);
        return fx->unknown_thread;
    }
    if (!e->thread_label[thread]) {
        /* An asyncio task's sample: "<thread name>\x1f<task name>" (mw_sampler_tasks.c). */
        size_t len;
        const char *text = mw_profbuf_str(e->b, thread, &len);
        const char *sep = text ? memchr(text, '\x1f', len) : NULL;
        int64_t v = sep ? pool_add_copy(&e->pool, text, (size_t)(sep - text)) : buf_str(e, thread);
        if (v < 0) return NULL;
        new_label(e, fx->thread, v);
        e->thread_label[thread] = e->nlabels; /* index + 1 */
        if (sep) {
            int64_t t = pool_add_copy(&e->pool, sep + 1, len - (size_t)(sep - text) - 1);
            if (t < 0) return NULL;
            new_label(e, fx->task, t);
            e->task_label[thread] = e->nlabels;
        }
    }
    return &e->labels[e->thread_label[thread] - 1];
}

/* Pass 2: one sample per stack, mapping its frames to locations and pointing at its labels. */
static int sample_pass(enc_t *e, enc_fixed_t *fx) {
    uint32_t ns = mw_profbuf_nstacks(e->b);
    uint64_t lo = 0, po = 0;
    for (uint32_t i = 0; i < ns; i++) {
        const mw_stack_t *s = mw_profbuf_stack(e->b, i);
        const mw_id_t *ids = mw_profbuf_stack_frames(e->b, s);
        pb_sample_t *sm = &e->samples[i];
        perftools__profiles__sample__init(sm);
        sm->location_id = &e->loc_ids[lo];
        for (uint32_t d = 0; d < s->depth; d++) { /* leaf first, as stored */
            uint32_t loc = frame_loc(e, ids[d]);
            if (loc == (uint32_t)-1) return -1;
            if (loc) e->loc_ids[lo + sm->n_location_id++] = loc;
        }
        lo += sm->n_location_id;
        sm->value = &e->values[4ull * i];
        if (fx->kind == MW_PPROF_MEMORY) {
            sm->n_value = 4;
            sm->value[0] = clamp64(s->v.cpu_samples);
            sm->value[1] = clamp64(s->v.cpu_ns);
            sm->value[2] = clamp64(s->v.wall_samples);
            sm->value[3] = clamp64(s->v.wall_ns);
        } else if (fx->kind == MW_PPROF_BLOCK) {
            sm->n_value = 2;
            sm->value[0] = clamp64(s->v.wall_samples);
            sm->value[1] = clamp64(s->v.wall_ns);
        } else {
            sm->n_value = 3;
            sm->value[0] = clamp64(s->v.cpu_samples);
            sm->value[1] = clamp64(s->v.cpu_ns);
            sm->value[2] = clamp64(s->v.wall_ns);
        }

        sm->label = &e->label_ptrs[po];
        pb_label_t *tl = label_of_thread(e, fx, s->thread);
        if (!tl) return -1;
        sm->label[sm->n_label++] = tl;
        if (s->thread >= 1 && s->thread <= mw_profbuf_nstrings(e->b) && e->task_label[s->thread])
            sm->label[sm->n_label++] = &e->labels[e->task_label[s->thread] - 1];
        if (fx->pid_label) sm->label[sm->n_label++] = fx->pid_label;
        for (uint32_t j = 0; j < fx->nstatic; j++)
            sm->label[sm->n_label++] = &fx->statics[j];
        if (e->stack_ls[i]) {
            const lsent_t *ls = &e->ls[e->stack_ls[i] - 1];
            for (uint32_t j = 0; j < ls->n; j++)
                sm->label[sm->n_label++] = &e->labels[ls->first + j];
        }
        po += sm->n_label;
        e->sample_ptrs[i] = sm;
    }
    return 0;
}

/* The Profile message around the tables, packed into a new malloc'd buffer. */
static int pack_profile(enc_t *e, const enc_fixed_t *fx, const mw_pprof_meta_t *meta, uint8_t **out,
                        size_t *len) {
    pb_valuetype_t st[4], period_type;
    pb_valuetype_t *st_ptrs[4] = {&st[0], &st[1], &st[2], &st[3]};
    const int block = fx->kind == MW_PPROF_BLOCK, memory = fx->kind == MW_PPROF_MEMORY;
    int64_t st_def[4][2] = {{block ? fx->contentions : fx->samples, fx->count},
                            {block ? fx->delay : fx->cpu, fx->ns},
                            {fx->wall, fx->ns},
                            {0, 0}};
    if (memory) {
        const int64_t mem_def[4][2] = {{fx->alloc_objects, fx->count},
                                       {fx->alloc_space, fx->bytes},
                                       {fx->inuse_objects, fx->count},
                                       {fx->inuse_space, fx->bytes}};
        memcpy(st_def, mem_def, sizeof st_def);
    }
    const size_t ntypes = memory ? 4 : block ? 2 : 3;
    for (size_t i = 0; i < ntypes; i++) {
        perftools__profiles__value_type__init(&st[i]);
        st[i].type = st_def[i][0];
        st[i].unit = st_def[i][1];
    }
    perftools__profiles__value_type__init(&period_type);
    period_type.type = memory ? fx->space : block ? fx->contentions : fx->cpu;
    period_type.unit = memory ? fx->bytes : block ? fx->count : fx->ns;

    /* One pseudo mapping, fully symbolized, so that pprof tools neither look for a binary
     * nor try to symbolize addresses. */
    pb_mapping_t mapping, *mapping_ptr = &mapping;
    perftools__profiles__mapping__init(&mapping);
    mapping.id = 1;
    mapping.filename = fx->map;
    mapping.has_functions = mapping.has_filenames = mapping.has_line_numbers = 1;

    pb_profile_t p;
    perftools__profiles__profile__init(&p);
    p.n_mapping = 1;
    p.mapping = &mapping_ptr;
    p.n_sample_type = ntypes;
    p.sample_type = st_ptrs;
    p.n_sample = mw_profbuf_nstacks(e->b);
    p.sample = e->sample_ptrs;
    p.n_location = e->nlocs;
    p.location = e->loc_ptrs;
    p.n_function = e->nfuncs;
    p.function = e->func_ptrs;
    p.string_table = e->pool.tab;
    p.time_nanos = meta->time_nanos;
    p.duration_nanos = meta->duration_nanos > 0 ? meta->duration_nanos : 0;
    p.period_type = &period_type;
    p.period = meta->period_ns > 0 ? meta->period_ns : 1000000000LL / 100;
    p.default_sample_type = memory ? fx->inuse_space : block ? fx->delay : fx->cpu;
    int64_t comments[MW_PPROF_MAX_COMMENTS];
    size_t ncomments = 0;
    for (uint32_t i = 0; i < meta->ncomments && i < MW_PPROF_MAX_COMMENTS; i++) {
        int64_t c = pool_add(&e->pool, meta->comments[i]);
        if (c < 0) return -1;
        comments[ncomments++] = c;
    }
    p.n_comment = ncomments;
    p.comment = comments;
    p.n_string_table = e->pool.n; /* the comments may have added strings */

    size_t size = perftools__profiles__profile__get_packed_size(&p);
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return -1;
    if (perftools__profiles__profile__pack(&p, buf) != size) {
        free(buf);
        return -1;
    }
    *out = buf;
    *len = size;
    return 0;
}

int mw_pprof_encode(const mw_profbuf_t *b, const mw_pprof_meta_t *meta, uint8_t **out, size_t *len,
                    mw_pprof_info_t *info) {
    enc_t e;
    memset(&e, 0, sizeof e);
    e.b = b;
    enc_sizes_t sz;
    enc_fixed_t fx;
    int rc = -1;
    if (count_pass(&e, &sz) == 0 && alloc_tables(&e, &sz) == 0 &&
        fixed_labels(&e, meta, &fx) == 0 && sample_pass(&e, &fx) == 0 &&
        pack_profile(&e, &fx, meta, out, len) == 0) {
        if (info) {
            info->samples = mw_profbuf_nstacks(b);
            info->locations = e.nlocs;
            info->functions = e.nfuncs;
            info->strings = e.pool.n;
            info->labels_skipped = e.labels_skipped;
            info->strings_repaired = e.pool.repaired;
            info->raw_bytes = *len;
        }
        rc = 0;
    }
    enc_free(&e);
    return rc;
}

int mw_pprof_gzip(const uint8_t *in, size_t n, int level, uint8_t **out, size_t *len) {
    if (n >= UINT_MAX) return -1;
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    /* windowBits 15 + 16: a gzip header and trailer around the deflate stream. */
    if (deflateInit2(&zs, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) return -1;
    uLong cap = deflateBound(&zs, (uLong)n);
    uint8_t *o = malloc(cap ? cap : 1);
    if (!o) {
        deflateEnd(&zs);
        return -1;
    }
    zs.next_in = (Bytef *)in;
    zs.avail_in = (uInt)n;
    zs.next_out = o;
    zs.avail_out = (uInt)cap;
    int zrc = deflate(&zs, Z_FINISH);
    size_t used = (size_t)zs.total_out;
    deflateEnd(&zs);
    if (zrc != Z_STREAM_END) {
        free(o);
        return -1;
    }
    *out = o;
    *len = used;
    return 0;
}

int mw_pprof_encode_gz(const mw_profbuf_t *b, const mw_pprof_meta_t *meta, uint8_t **out,
                       size_t *len, mw_pprof_info_t *info) {
    uint8_t *raw = NULL;
    size_t rawlen = 0;
    if (mw_pprof_encode(b, meta, &raw, &rawlen, info) != 0) return -1;
    int rc = mw_pprof_gzip(raw, rawlen, MW_PPROF_GZIP_LEVEL, out, len);
    free(raw);
    return rc;
}
