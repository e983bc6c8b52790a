/* mw_otlp — pprof -> OTLP ExportProfilesServiceRequest; contract in mw_otlp.h.
 *
 * How: the pprof is inflated (when gzipped) and unpacked with the generated pprof code. Every
 * output message lives in one arena freed after packing; the dictionary's tables are growable
 * arrays of pointers, and each table is deduplicated by an open-addressing hash map from the
 * entry's bytes (a string, or the indices that make the entry) to its index (the arena, the
 * tables and the maps: mw_otlp_tables.h; gzip, UTF-8 and hex: mw_otlp_codec.h, which also
 * defines mw_otlp_gzip). Output strings point into the unpacked pprof (alive until packing) or
 * into the arena.
 */
#include "mw_otlp.h"

#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mw_otlp_codec.h"
#include "mw_otlp_tables.h"
#include "opentelemetry/proto/collector/profiles/v1development/profiles_service.pb-c.h"
#include "profile.pb-c.h"

typedef Opentelemetry__Proto__Profiles__V1development__ProfilesDictionary otlp_dict_t;
typedef Opentelemetry__Proto__Profiles__V1development__ResourceProfiles otlp_rp_t;
typedef Opentelemetry__Proto__Profiles__V1development__ScopeProfiles otlp_sp_t;
typedef Opentelemetry__Proto__Profiles__V1development__Profile otlp_profile_t;
typedef Opentelemetry__Proto__Profiles__V1development__Sample otlp_sample_t;
typedef Opentelemetry__Proto__Profiles__V1development__ValueType otlp_vt_t;
typedef Opentelemetry__Proto__Profiles__V1development__Mapping otlp_mapping_t;
typedef Opentelemetry__Proto__Profiles__V1development__Location otlp_location_t;
typedef Opentelemetry__Proto__Profiles__V1development__Line otlp_line_t;
typedef Opentelemetry__Proto__Profiles__V1development__Function otlp_function_t;
typedef Opentelemetry__Proto__Profiles__V1development__Link otlp_link_t;
typedef Opentelemetry__Proto__Profiles__V1development__Stack otlp_stack_t;
typedef Opentelemetry__Proto__Profiles__V1development__KeyValueAndUnit otlp_kvu_t;
typedef Opentelemetry__Proto__Common__V1__AnyValue otlp_any_t;
typedef Opentelemetry__Proto__Common__V1__KeyValue otlp_kv_t;
typedef Opentelemetry__Proto__Common__V1__InstrumentationScope otlp_scope_t;
typedef Opentelemetry__Proto__Resource__V1__Resource otlp_resource_t;
typedef Opentelemetry__Proto__Collector__Profiles__V1development__ExportProfilesServiceRequest
    otlp_request_t;
typedef Perftools__Profiles__Profile pprof_t;

#define SPANS_COMMENT "mw:spans "
#define SPAN_HEX 16
#define TRACE_HEX 32

typedef struct {
    const pprof_t *p;
    mw_otlp_arena_t arena;
    const char *why;
    /* the dictionary's tables */
    mw_otlp_vec_t strings, functions, locations, stacks, attrs, links;
    mw_otlp_imap_t str_map, fn_map, loc_map, stack_map, attr_map, link_map, span_map;
    /* pprof -> dictionary */
    int32_t *str_idx;      /* pprof string index -> string_table index (-1: not yet) */
    unsigned char *str_ok; /* pprof string index -> 0 unchecked, 1 UTF-8, 2 not UTF-8 */
    int32_t **loc_frames;  /* pprof location position -> its Location indices (innermost first) */
    size_t *loc_nframes;
    unsigned char (*traces)[16]; /* span_map value -> trace id bytes */
    size_t n_traces, cap_traces;
} conv_t;

static int fail(conv_t *c, const char *why) {
    if (!c->why) c->why = why;
    return -1;
}

/* Finds key in m; when absent, makes it with make(c, ctx) -> the table index to store. Returns
 * the index or -1 (c->why set). */
typedef int32_t (*make_fn)(conv_t *c, void *ctx);

static int32_t intern(conv_t *c, mw_otlp_imap_t *m, const void *key, size_t len, make_fn make,
                      void *ctx) {
    if (mw_otlp_imap_reserve(m) != 0) return fail(c, "out of memory");
    uint64_t h = mw_otlp_hash_bytes(key, len);
    size_t slot = 0;
    int32_t v = mw_otlp_imap_get(m, key, len, h, &slot);
    if (v >= 0) return v;
    v = make(c, ctx);
    if (v < 0) return -1;
    if (mw_otlp_imap_set(m, &c->arena, slot, key, len, h, v) != 0) return fail(c, "out of memory");
    return v;
}

static int32_t push_entry(conv_t *c, mw_otlp_vec_t *t, void *msg) {
    if (!msg) return fail(c, "out of memory");
    if (t->n >= INT32_MAX) return fail(c, "the profile has more than 2^31 dictionary entries");
    if (mw_otlp_vec_push(t, msg) != 0) return fail(c, "out of memory");
    return (int32_t)(t->n - 1);
}

static int32_t make_string(conv_t *c, void *s) {
    return push_entry(c, &c->strings, s);
}

/* The string_table index of s (s must outlive the packing: pprof or arena memory). */
static int32_t str_of(conv_t *c, const char *s) {
    return intern(c, &c->str_map, s, strlen(s), make_string, (void *)s);
}

/* The pprof's string i, checked (index in range, UTF-8). */
static const char *pstr(conv_t *c, int64_t i) {
    if (i < 0 || (uint64_t)i >= c->p->n_string_table) {
        fail(c, "a pprof string index is out of range");
        return NULL;
    }
    if (c->str_ok[i] == 0)
        c->str_ok[i] = mw_otlp_utf8_valid((const unsigned char *)c->p->string_table[i]) ? 1 : 2;
    if (c->str_ok[i] == 2) {
        fail(c, "a pprof string is not valid UTF-8");
        return NULL;
    }
    return c->p->string_table[i];
}

/* string_table index of the pprof's string i; -1 (c->why) when out of range. */
static int32_t pstr_idx(conv_t *c, int64_t i) {
    const char *s = pstr(c, i);
    if (!s) return -1;
    if (c->str_idx[i] < 0) c->str_idx[i] = str_of(c, s);
    return c->str_idx[i];
}

/* -- functions, locations, stacks, attributes, links */

typedef struct {
    int32_t name, file;
} fn_key_t;

static int32_t make_function(conv_t *c, void *ctx) {
    const fn_key_t *k = ctx;
    otlp_function_t *f = mw_otlp_arena_alloc(&c->arena, sizeof(*f));
    if (!f) return fail(c, "out of memory");
    opentelemetry__proto__profiles__v1development__function__init(f);
    f->name_strindex = f->system_name_strindex = k->name;
    f->filename_strindex = k->file;
    return push_entry(c, &c->functions, f);
}

static int32_t function_of(conv_t *c, const char *name, const char *file) {
    int32_t n = str_of(c, name[0] ? name : "<unknown>"), f = str_of(c, file);
    if (n < 0 || f < 0) return -1;
    fn_key_t k = {n, f};
    return intern(c, &c->fn_map, &k, sizeof(k), make_function, &k);
}

typedef struct {
    int32_t function;
    int32_t pad;
    int64_t line;
} loc_key_t;

static int32_t make_location(conv_t *c, void *ctx) {
    const loc_key_t *k = ctx;
    otlp_location_t *l = mw_otlp_arena_alloc(&c->arena, sizeof(*l));
    otlp_line_t *ln = mw_otlp_arena_alloc(&c->arena, sizeof(*ln));
    otlp_line_t **lines = mw_otlp_arena_alloc(&c->arena, sizeof(*lines));
    if (!l || !ln || !lines) return fail(c, "out of memory");
    opentelemetry__proto__profiles__v1development__location__init(l);
    opentelemetry__proto__profiles__v1development__line__init(ln);
    ln->function_index = k->function;
    ln->line = k->line;
    lines[0] = ln;
    l->n_lines = 1;
    l->lines = lines;
    return push_entry(c, &c->locations, l);
}

static int32_t location_of(conv_t *c, int32_t function, int64_t line) {
    loc_key_t k = {.function = function, .line = line > 0 ? line : 0};
    return intern(c, &c->loc_map, &k, sizeof(k), make_location, &k);
}

typedef struct {
    const int32_t *idx;
    size_t n;
} stack_ctx_t;

static int32_t make_stack(conv_t *c, void *ctx) {
    const stack_ctx_t *k = ctx;
    otlp_stack_t *s = mw_otlp_arena_alloc(&c->arena, sizeof(*s));
    int32_t *idx = mw_otlp_arena_alloc(&c->arena, k->n * sizeof(*idx));
    if (!s || !idx) return fail(c, "out of memory");
    opentelemetry__proto__profiles__v1development__stack__init(s);
    memcpy(idx, k->idx, k->n * sizeof(*idx));
    s->n_location_indices = k->n;
    s->location_indices = idx;
    return push_entry(c, &c->stacks, s);
}

typedef struct {
    int32_t key, value;  /* string_table indices (the map's key) */
    const char *val_str; /* the value itself */
} attr_ctx_t;

static int32_t make_attr(conv_t *c, void *ctx) {
    const attr_ctx_t *k = ctx;
    otlp_kvu_t *a = mw_otlp_arena_alloc(&c->arena, sizeof(*a));
    otlp_any_t *v = mw_otlp_arena_alloc(&c->arena, sizeof(*v));
    if (!a || !v) return fail(c, "out of memory");
    opentelemetry__proto__profiles__v1development__key_value_and_unit__init(a);
    opentelemetry__proto__common__v1__any_value__init(v);
    v->value_case = OPENTELEMETRY__PROTO__COMMON__V1__ANY_VALUE__VALUE_STRING_VALUE;
    v->string_value = (char *)k->val_str;
    a->key_strindex = k->key;
    a->value = v;
    return push_entry(c, &c->attrs, a);
}

static int32_t make_link(conv_t *c, void *ctx) {
    const unsigned char *k = ctx; /* 16 bytes trace, 8 bytes span */
    otlp_link_t *l = mw_otlp_arena_alloc(&c->arena, sizeof(*l));
    unsigned char *b = mw_otlp_arena_alloc(&c->arena, 24);
    if (!l || !b) return fail(c, "out of memory");
    opentelemetry__proto__profiles__v1development__link__init(l);
    memcpy(b, k, 24);
    l->trace_id.data = b;
    l->trace_id.len = 16;
    l->span_id.data = b + 16;
    l->span_id.len = 8;
    return push_entry(c, &c->links, l);
}

/* -- the mw:spans comments */

static int32_t make_trace(conv_t *c, void *ctx) {
    if (c->n_traces == c->cap_traces) {
        size_t cap = c->cap_traces ? c->cap_traces * 2 : 256;
        void *t = realloc(c->traces, cap * sizeof(*c->traces));
        if (!t) return fail(c, "out of memory");
        c->traces = t;
        c->cap_traces = cap;
    }
    if (c->n_traces >= INT32_MAX) return fail(c, "too many spans");
    memcpy(c->traces[c->n_traces], ctx, 16);
    return (int32_t)c->n_traces++;
}

/* One comment's spans, all or none (a malformed comment is not a spans comment). */
static int read_spans_comment(conv_t *c, const char *text) {
    json_object *doc = json_tokener_parse(text);
    if (!doc) return 0;
    int ok = json_object_is_type(doc, json_type_object);
    unsigned char trace[16], span[8];
    if (ok) {
        json_object_object_foreach(doc, k1, v1) {
            if (!json_object_is_type(v1, json_type_string) || strlen(k1) != SPAN_HEX ||
                mw_otlp_hex_bytes(k1, SPAN_HEX, span) != 0 ||
                json_object_get_string_len(v1) != TRACE_HEX ||
                mw_otlp_hex_bytes(json_object_get_string(v1), TRACE_HEX, trace) != 0) {
                ok = 0;
                break;
            }
        }
    }
    int rc = 0;
    if (ok) {
        json_object_object_foreach(doc, k2, v2) {
            mw_otlp_hex_bytes(json_object_get_string(v2), TRACE_HEX, trace);
            /* a later comment's trace for the same span wins, as in middleware.pprof */
            if (mw_otlp_imap_reserve(&c->span_map) != 0) {
                rc = fail(c, "out of memory");
                break;
            }
            uint64_t h = mw_otlp_hash_bytes(k2, SPAN_HEX);
            size_t slot = 0;
            int32_t at = mw_otlp_imap_get(&c->span_map, k2, SPAN_HEX, h, &slot);
            if (at >= 0) {
                memcpy(c->traces[at], trace, 16);
                continue;
            }
            if (intern(c, &c->span_map, k2, SPAN_HEX, make_trace, trace) < 0) {
                rc = -1;
                break;
            }
        }
    }
    json_object_put(doc);
    return rc;
}

static int read_spans(conv_t *c) {
    const pprof_t *p = c->p;
    for (size_t i = 0; i < p->n_comment; i++) {
        const char *s = pstr(c, p->comment[i]);
        if (!s) return -1;
        if (strncmp(s, SPANS_COMMENT, sizeof(SPANS_COMMENT) - 1) == 0 &&
            read_spans_comment(c, s + sizeof(SPANS_COMMENT) - 1) != 0)
            return -1;
    }
    return 0;
}

/* -- ids -> positions */

typedef struct {
    uint64_t id;
    size_t pos;
} idpos_t;

static int cmp_idpos(const void *a, const void *b) {
    uint64_t x = ((const idpos_t *)a)->id, y = ((const idpos_t *)b)->id;
    return x < y ? -1 : x > y;
}

/* Sorted (id, position) pairs; -1 when an id is 0 or repeated. */
static idpos_t *sort_ids(conv_t *c, size_t n, uint64_t (*id_at)(const pprof_t *, size_t),
                         const char *bad) {
    idpos_t *v = malloc((n ? n : 1) * sizeof(*v));
    if (!v) {
        fail(c, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        v[i] = (idpos_t){id_at(c->p, i), i};
    qsort(v, n, sizeof(*v), cmp_idpos);
    for (size_t i = 0; i < n; i++)
        if (v[i].id == 0 || (i > 0 && v[i].id == v[i - 1].id)) {
            free(v);
            fail(c, bad);
            return NULL;
        }
    return v;
}

static long find_id(const idpos_t *v, size_t n, uint64_t id) {
    idpos_t k = {id, 0};
    const idpos_t *r = bsearch(&k, v, n, sizeof(*v), cmp_idpos);
    return r ? (long)r->pos : -1;
}

static uint64_t fn_id_at(const pprof_t *p, size_t i) {
    return p->function[i]->id;
}
static uint64_t loc_id_at(const pprof_t *p, size_t i) {
    return p->location[i]->id;
}
static uint64_t map_id_at(const pprof_t *p, size_t i) {
    return p->mapping[i]->id;
}

/* Every pprof location's Location indices (innermost first). */
static int read_locations(conv_t *c, const idpos_t *fns, const idpos_t *maps) {
    const pprof_t *p = c->p;
    c->loc_frames = calloc(p->n_location ? p->n_location : 1, sizeof(*c->loc_frames));
    c->loc_nframes = calloc(p->n_location ? p->n_location : 1, sizeof(*c->loc_nframes));
    if (!c->loc_frames || !c->loc_nframes) return fail(c, "out of memory");
    for (size_t i = 0; i < p->n_location; i++) {
        const Perftools__Profiles__Location *loc = p->location[i];
        long mpos = -1;
        if (loc->mapping_id && (mpos = find_id(maps, p->n_mapping, loc->mapping_id)) < 0)
            return fail(c, "a pprof location refers to a missing mapping");
        size_t n = loc->n_line ? loc->n_line : 1;
        int32_t *fr = mw_otlp_arena_alloc(&c->arena, n * sizeof(*fr));
        if (!fr) return fail(c, "out of memory");
        for (size_t j = 0; j < loc->n_line; j++) {
            long fpos = find_id(fns, p->n_function, loc->line[j]->function_id);
            if (fpos < 0) return fail(c, "a pprof location refers to a missing function");
            const Perftools__Profiles__Function *f = p->function[fpos];
            const char *name = pstr(c, f->name), *file = pstr(c, f->filename);
            if (!name || !file) return -1;
            int32_t fi = function_of(c, name, file);
            if (fi < 0 || (fr[j] = location_of(c, fi, loc->line[j]->line)) < 0) return -1;
        }
        if (loc->n_line == 0) { /* an unsymbolized address */
            char addr[24];
            snprintf(addr, sizeof(addr), "0x%llx", (unsigned long long)loc->address);
            const char *name = mw_otlp_arena_strdup(&c->arena, addr);
            const char *file = mpos >= 0 ? pstr(c, p->mapping[mpos]->filename) : "";
            if (!name || !file) return name ? -1 : fail(c, "out of memory");
            int32_t fi = function_of(c, name, file);
            if (fi < 0 || (fr[0] = location_of(c, fi, 0)) < 0) return -1;
        }
        c->loc_frames[i] = fr;
        c->loc_nframes[i] = n;
    }
    return 0;
}

/* What the sample types' Profiles share of one pprof sample. */
typedef struct {
    int32_t stack, link;
    int32_t *attrs;
    size_t n_attrs;
} conv_sample_t;

static int convert_sample(conv_t *c, const Perftools__Profiles__Sample *s, const idpos_t *locs,
                          conv_sample_t *out, int32_t **scratch, size_t *scratch_cap) {
    const pprof_t *p = c->p;
    size_t n = 0;
    for (size_t i = 0; i < s->n_location_id; i++) {
        long pos = find_id(locs, p->n_location, s->location_id[i]);
        if (pos < 0) return fail(c, "a pprof sample refers to a missing location");
        size_t k = c->loc_nframes[pos];
        if (n + k > *scratch_cap) {
            size_t cap = (n + k) * 2;
            int32_t *v = realloc(*scratch, cap * sizeof(*v));
            if (!v) return fail(c, "out of memory");
            *scratch = v;
            *scratch_cap = cap;
        }
        memcpy(*scratch + n, c->loc_frames[pos], k * sizeof(int32_t));
        n += k;
    }
    stack_ctx_t sk = {*scratch, n};
    if ((out->stack = intern(c, &c->stack_map, *scratch, n * sizeof(int32_t), make_stack, &sk)) < 0)
        return -1;

    out->link = 0;
    out->attrs = mw_otlp_arena_alloc(&c->arena, (s->n_label ? s->n_label : 1) * sizeof(int32_t));
    if (!out->attrs) return fail(c, "out of memory");
    out->n_attrs = 0;
    for (size_t i = 0; i < s->n_label; i++) {
        const Perftools__Profiles__Label *l = s->label[i];
        const char *key = pstr(c, l->key), *val;
        if (!key) return -1;
        if (l->str) {
            val = pstr(c, l->str);
            if (!val) return -1;
        } else { /* a numeric label, as middleware.pprof reads it */
            const char *unit = pstr(c, l->num_unit);
            if (!unit) return -1;
            char buf[96];
            snprintf(buf, sizeof(buf), "%lld%s%.64s", (long long)l->num, unit[0] ? " " : "", unit);
            if (!(val = mw_otlp_arena_strdup(&c->arena, buf))) return fail(c, "out of memory");
        }
        if (strcmp(key, "span_id") == 0 && out->link == 0 && strlen(val) == SPAN_HEX &&
            c->span_map.cap) {
            size_t slot = 0;
            int32_t t = mw_otlp_imap_get(&c->span_map, val, SPAN_HEX,
                                         mw_otlp_hash_bytes(val, SPAN_HEX), &slot);
            unsigned char lk[24];
            if (t >= 0 && mw_otlp_hex_bytes(val, SPAN_HEX, lk + 16) == 0) {
                memcpy(lk, c->traces[t], 16);
                if ((out->link = intern(c, &c->link_map, lk, 24, make_link, lk)) < 0) return -1;
                continue;
            }
        }
        attr_ctx_t a = {.key = str_of(c, key), .value = str_of(c, val), .val_str = val};
        if (a.key < 0 || a.value < 0) return -1;
        int32_t ak[2] = {a.key, a.value};
        int32_t ai = intern(c, &c->attr_map, ak, sizeof(ak), make_attr, &a);
        if (ai < 0) return -1;
        out->attrs[out->n_attrs++] = ai;
    }
    return 0;
}

/* The tables' entries 0 (zero values); the empty stack and the all-zero link map to them. */
static int zero_entries(conv_t *c, otlp_mapping_t **mapping0) {
    otlp_mapping_t *m = mw_otlp_arena_alloc(&c->arena, sizeof(*m));
    otlp_location_t *l = mw_otlp_arena_alloc(&c->arena, sizeof(*l));
    otlp_function_t *f = mw_otlp_arena_alloc(&c->arena, sizeof(*f));
    otlp_link_t *k = mw_otlp_arena_alloc(&c->arena, sizeof(*k));
    otlp_kvu_t *a = mw_otlp_arena_alloc(&c->arena, sizeof(*a));
    otlp_stack_t *s = mw_otlp_arena_alloc(&c->arena, sizeof(*s));
    if (!m || !l || !f || !k || !a || !s) return fail(c, "out of memory");
    opentelemetry__proto__profiles__v1development__mapping__init(m);
    opentelemetry__proto__profiles__v1development__location__init(l);
    opentelemetry__proto__profiles__v1development__function__init(f);
    opentelemetry__proto__profiles__v1development__link__init(k);
    opentelemetry__proto__profiles__v1development__key_value_and_unit__init(a);
    opentelemetry__proto__profiles__v1development__stack__init(s);
    static const unsigned char zero[24];
    if (str_of(c, "") != 0 || push_entry(c, &c->locations, l) != 0 ||
        push_entry(c, &c->functions, f) != 0 || push_entry(c, &c->links, k) != 0 ||
        push_entry(c, &c->attrs, a) != 0 || push_entry(c, &c->stacks, s) != 0 ||
        mw_otlp_imap_put(&c->stack_map, &c->arena, "", 0, 0) != 0 ||
        mw_otlp_imap_put(&c->link_map, &c->arena, zero, 24, 0) != 0)
        return fail(c, "out of memory"); /* keeps the reason of a failure before */
    *mapping0 = m;
    return 0;
}

/* -- the resource */

static otlp_kv_t *kv_new(conv_t *c, const char *key) {
    otlp_kv_t *kv = mw_otlp_arena_alloc(&c->arena, sizeof(*kv));
    otlp_any_t *v = mw_otlp_arena_alloc(&c->arena, sizeof(*v));
    if (!kv || !v) return NULL;
    opentelemetry__proto__common__v1__key_value__init(kv);
    opentelemetry__proto__common__v1__any_value__init(v);
    kv->key = (char *)key;
    kv->value = v;
    return kv;
}

static otlp_kv_t *kv_str(conv_t *c, const char *key, const char *val) {
    otlp_kv_t *kv = kv_new(c, key);
    if (!kv) return NULL;
    kv->value->value_case = OPENTELEMETRY__PROTO__COMMON__V1__ANY_VALUE__VALUE_STRING_VALUE;
    kv->value->string_value = (char *)val;
    return kv;
}

/* The samples' pid (their `pid` label), else fallback. */
static int64_t profile_pid(const pprof_t *p, int64_t fallback) {
    for (size_t i = 0; i < p->n_sample; i++)
        for (size_t j = 0; j < p->sample[i]->n_label; j++) {
            const Perftools__Profiles__Label *l = p->sample[i]->label[j];
            if (l->key < 0 || (uint64_t)l->key >= p->n_string_table ||
                strcmp(p->string_table[l->key], "pid") != 0)
                continue;
            if (l->str > 0 && (uint64_t)l->str < p->n_string_table) {
                char *end;
                long long v = strtoll(p->string_table[l->str], &end, 10);
                if (*end == '\0' && end != p->string_table[l->str] && v > 0) return v;
            } else if (l->str == 0 && l->num > 0) {
                return l->num;
            }
        }
    return fallback;
}

static otlp_resource_t *build_resource(conv_t *c, const mw_otlp_resource_t *res, int64_t pid) {
    size_t cap = 5 + res->n;
    otlp_kv_t **kvs = mw_otlp_arena_alloc(&c->arena, cap * sizeof(*kvs));
    otlp_resource_t *r = mw_otlp_arena_alloc(&c->arena, sizeof(*r));
    if (!kvs || !r) return NULL;
    opentelemetry__proto__resource__v1__resource__init(r);
    const char *ver = res->sdk_version ? res->sdk_version : "";
    size_t n = 0;
    kvs[n++] = kv_str(c, "service.name", res->service_name);
    kvs[n] = kv_new(c, "process.pid");
    if (kvs[n]) {
        kvs[n]->value->value_case = OPENTELEMETRY__PROTO__COMMON__V1__ANY_VALUE__VALUE_INT_VALUE;
        kvs[n]->value->int_value = pid;
    }
    n++;
    kvs[n++] = kv_str(c, "telemetry.sdk.name", "middleware");
    kvs[n++] = kv_str(c, "telemetry.sdk.language", "python");
    kvs[n++] = kv_str(c, "telemetry.sdk.version", ver);
    for (size_t i = 0; i < n; i++)
        if (!kvs[i]) return NULL;
    for (size_t i = 0; i < res->n; i++) {
        const char *k = res->keys[i], *v = res->values[i];
        if (!k || !v || strcmp(k, "service.name") == 0) continue;
        size_t j = 0;
        while (j < n && strcmp(kvs[j]->key, k) != 0)
            j++;
        otlp_kv_t *kv = kv_str(c, k, v);
        if (!kv) return NULL;
        kvs[j] = kv; /* a key seen before: the later value wins, in the earlier place */
        if (j == n) n++;
    }
    r->n_attributes = n;
    r->attributes = kvs;
    return r;
}

/* -- the whole request */

static void conv_free(conv_t *c) {
    mw_otlp_vec_t *v[] = {&c->strings, &c->functions, &c->locations,
                          &c->stacks,  &c->attrs,     &c->links};
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        mw_otlp_vec_free(v[i]);
    mw_otlp_imap_t *m[] = {&c->str_map,  &c->fn_map,   &c->loc_map, &c->stack_map,
                           &c->attr_map, &c->link_map, &c->span_map};
    for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++)
        mw_otlp_imap_free(m[i]);
    free(c->str_idx);
    free(c->str_ok);
    free(c->loc_frames);
    free(c->loc_nframes);
    free(c->traces);
    mw_otlp_arena_free(&c->arena);
}

/* Builds and packs the request from c->p. */
static int build(conv_t *c, const mw_otlp_resource_t *res, int64_t pid_fallback,
                 unsigned char **out, size_t *out_len) {
    const pprof_t *p = c->p;
    if (p->n_sample_type == 0) return fail(c, "the pprof has no sample type");
    c->str_idx = malloc((p->n_string_table ? p->n_string_table : 1) * sizeof(*c->str_idx));
    c->str_ok = calloc(p->n_string_table ? p->n_string_table : 1, 1);
    if (!c->str_idx || !c->str_ok) return fail(c, "out of memory");
    for (size_t i = 0; i < p->n_string_table; i++)
        c->str_idx[i] = -1;
    otlp_mapping_t *mapping0 = NULL;
    if (zero_entries(c, &mapping0) != 0 || read_spans(c) != 0) return -1;

    idpos_t *fns = sort_ids(c, p->n_function, fn_id_at, "a pprof function id is zero or repeated");
    idpos_t *maps =
        fns ? sort_ids(c, p->n_mapping, map_id_at, "a pprof mapping id is zero or repeated") : NULL;
    idpos_t *locs =
        maps ? sort_ids(c, p->n_location, loc_id_at, "a pprof location id is zero or repeated")
             : NULL;
    conv_sample_t *cs = NULL;
    int32_t *scratch = NULL;
    size_t scratch_cap = 0;
    int rc = -1;
    if (!locs || read_locations(c, fns, maps) != 0) goto out;

    cs = calloc(p->n_sample ? p->n_sample : 1, sizeof(*cs));
    if (!cs) {
        fail(c, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < p->n_sample; i++) {
        if (p->sample[i]->n_value != p->n_sample_type) {
            fail(c, "a pprof sample has not one value per sample type");
            goto out;
        }
        if (convert_sample(c, p->sample[i], locs, &cs[i], &scratch, &scratch_cap) != 0) goto out;
    }

    /* one Profile per sample type */
    size_t nt = p->n_sample_type;
    otlp_profile_t **profs = mw_otlp_arena_alloc(&c->arena, nt * sizeof(*profs));
    if (!profs) {
        fail(c, "out of memory");
        goto out;
    }
    const Perftools__Profiles__ValueType *pt = p->period_type;
    int32_t pt_type = pt ? pstr_idx(c, pt->type) : 0, pt_unit = pt ? pstr_idx(c, pt->unit) : 0;
    if (pt_type < 0 || pt_unit < 0) goto out;
    for (size_t t = 0; t < nt; t++) {
        otlp_profile_t *pr = mw_otlp_arena_alloc(&c->arena, sizeof(*pr));
        otlp_vt_t *st = mw_otlp_arena_alloc(&c->arena, sizeof(*st));
        otlp_vt_t *ptv = mw_otlp_arena_alloc(&c->arena, sizeof(*ptv));
        if (!pr || !st || !ptv) {
            fail(c, "out of memory");
            goto out;
        }
        opentelemetry__proto__profiles__v1development__profile__init(pr);
        opentelemetry__proto__profiles__v1development__value_type__init(st);
        opentelemetry__proto__profiles__v1development__value_type__init(ptv);
        if ((st->type_strindex = pstr_idx(c, p->sample_type[t]->type)) < 0 ||
            (st->unit_strindex = pstr_idx(c, p->sample_type[t]->unit)) < 0)
            goto out;
        ptv->type_strindex = pt_type;
        ptv->unit_strindex = pt_unit;
        pr->sample_type = st;
        pr->period_type = pt ? ptv : NULL;
        pr->period = p->period;
        pr->time_unix_nano = (uint64_t)p->time_nanos;
        pr->duration_nano = p->duration_nanos > 0 ? (uint64_t)p->duration_nanos : 0;
        size_t ns = 0;
        for (size_t i = 0; i < p->n_sample; i++)
            ns += p->sample[i]->value[t] != 0;
        otlp_sample_t **ss = mw_otlp_arena_alloc(&c->arena, (ns ? ns : 1) * sizeof(*ss));
        otlp_sample_t *sv = mw_otlp_arena_alloc(&c->arena, (ns ? ns : 1) * sizeof(*sv));
        int64_t *vals = mw_otlp_arena_alloc(&c->arena, (ns ? ns : 1) * sizeof(*vals));
        if (!ss || !sv || !vals) {
            fail(c, "out of memory");
            goto out;
        }
        size_t k = 0;
        for (size_t i = 0; i < p->n_sample; i++) {
            int64_t v = p->sample[i]->value[t];
            if (v == 0) continue;
            otlp_sample_t *s = &sv[k];
            opentelemetry__proto__profiles__v1development__sample__init(s);
            s->stack_index = cs[i].stack;
            s->link_index = cs[i].link;
            s->n_attribute_indices = cs[i].n_attrs;
            s->attribute_indices = cs[i].attrs;
            vals[k] = v;
            s->n_values = 1;
            s->values = &vals[k];
            ss[k++] = s;
        }
        pr->n_samples = k;
        pr->samples = ss;
        profs[t] = pr;
    }

    otlp_dict_t dict = OPENTELEMETRY__PROTO__PROFILES__V1DEVELOPMENT__PROFILES_DICTIONARY__INIT;
    otlp_mapping_t *mappings[1] = {mapping0};
    dict.n_mapping_table = 1;
    dict.mapping_table = mappings;
    dict.n_location_table = c->locations.n;
    dict.location_table = (otlp_location_t **)c->locations.v;
    dict.n_function_table = c->functions.n;
    dict.function_table = (otlp_function_t **)c->functions.v;
    dict.n_link_table = c->links.n;
    dict.link_table = (otlp_link_t **)c->links.v;
    dict.n_string_table = c->strings.n;
    dict.string_table = (char **)c->strings.v;
    dict.n_attribute_table = c->attrs.n;
    dict.attribute_table = (otlp_kvu_t **)c->attrs.v;
    dict.n_stack_table = c->stacks.n;
    dict.stack_table = (otlp_stack_t **)c->stacks.v;

    otlp_scope_t scope = OPENTELEMETRY__PROTO__COMMON__V1__INSTRUMENTATION_SCOPE__INIT;
    scope.name = "middleware";
    scope.version = (char *)(res->sdk_version ? res->sdk_version : "");
    otlp_sp_t sp = OPENTELEMETRY__PROTO__PROFILES__V1DEVELOPMENT__SCOPE_PROFILES__INIT;
    sp.scope = &scope;
    sp.n_profiles = nt;
    sp.profiles = profs;
    otlp_sp_t *sps[1] = {&sp};
    otlp_rp_t rp = OPENTELEMETRY__PROTO__PROFILES__V1DEVELOPMENT__RESOURCE_PROFILES__INIT;
    rp.resource = build_resource(c, res, profile_pid(p, pid_fallback));
    if (!rp.resource) {
        fail(c, "out of memory");
        goto out;
    }
    rp.n_scope_profiles = 1;
    rp.scope_profiles = sps;
    otlp_rp_t *rps[1] = {&rp};
    otlp_request_t req =
        OPENTELEMETRY__PROTO__COLLECTOR__PROFILES__V1DEVELOPMENT__EXPORT_PROFILES_SERVICE_REQUEST__INIT;
    req.n_resource_profiles = 1;
    req.resource_profiles = rps;
    req.dictionary = &dict;
    size_t len =
        opentelemetry__proto__collector__profiles__v1development__export_profiles_service_request__get_packed_size(
            &req);
    unsigned char *buf = malloc(len ? len : 1);
    if (!buf) {
        fail(c, "out of memory");
        goto out;
    }
    *out_len =
        opentelemetry__proto__collector__profiles__v1development__export_profiles_service_request__pack(
            &req, buf);
    *out = buf;
    rc = 0;
out:
    free(fns);
    free(maps);
    free(locs);
    free(cs);
    free(scratch);
    return rc;
}

int mw_otlp_from_pprof(const void *pprof, size_t len, const mw_otlp_resource_t *res,
                       int64_t pid_fallback, unsigned char **out, size_t *out_len,
                       const char **why) {
    *why = NULL;
    *out = NULL;
    *out_len = 0;
    if (!pprof || len == 0 || !res || !res->service_name) return *why = "no pprof", -1;
    const unsigned char *in = pprof;
    unsigned char *plain = NULL;
    size_t plain_len = len;
    if (len >= 2 && in[0] == 0x1f && in[1] == 0x8b) {
        if (mw_otlp_inflate_pprof(in, len, &plain, &plain_len, why) != 0) return -1;
        in = plain;
    } else if (len > MW_OTLP_MAX_PPROF_BYTES) {
        return *why = "the pprof is larger than the limit", -1;
    }
    pprof_t *p = perftools__profiles__profile__unpack(NULL, plain_len, in);
    free(plain);
    if (!p) return *why = "not a pprof profile (protobuf decoding failed)", -1;
    conv_t c;
    memset(&c, 0, sizeof(c));
    c.p = p;
    int rc = build(&c, res, pid_fallback, out, out_len);
    if (rc != 0) *why = c.why ? c.why : "conversion failed";
    conv_free(&c);
    perftools__profiles__profile__free_unpacked(p, NULL);
    return rc;
}
