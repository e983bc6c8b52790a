/* mw_symcache — see mw_symcache.h. Open addressing over a power-of-two slot array; an arena
 * holds the copied strings and line tables. */
#include "mw_symcache.h"

#include "mw_linetable.h"

#include <stdlib.h>
#include <string.h>

#define SC_SLOTS 8192 /* at most SC_SLOTS/2 live entries before a reset */
#define SC_ARENA (4u << 20)
#define SC_NAME_MAX 512
#define SC_LINETABLE_MAX 65536

typedef struct {
    uintptr_t code; /* 0 = empty slot */
    mw_pycode_t info;
    uint32_t name_off, name_len, file_off, file_len, lt_off, lt_len;
    int lt_ok;
    uint64_t gen;
    mw_id_t name_id, file_id;
    int32_t last_lasti, last_line;
} sc_entry_t;

#define SC_TOMBSTONE ((uintptr_t)1) /* an entry filled by an attempt that was abandoned */
#define SC_JOURNAL 4096

static sc_entry_t *g_slots;
static char *g_arena;
static uint32_t g_arena_used, g_live;
static uint64_t g_epoch;               /* bumped by every clear */
static uint32_t g_journal[SC_JOURNAL]; /* slots filled since mw_symcache_begin */
static uint32_t g_njournal;
static int g_journal_lost; /* more fills than the journal holds */
static mw_symcache_stats_t g_stats;
static int g_format;

int mw_symcache_init(void) {
    if (g_slots) return 0;
    g_slots = calloc(SC_SLOTS, sizeof *g_slots);
    g_arena = malloc(SC_ARENA);
    if (!g_slots || !g_arena) {
        mw_symcache_free();
        return -1;
    }
    g_format = mw_pyframes_linetable_format();
    return 0;
}

void mw_symcache_free(void) {
    free(g_slots);
    free(g_arena);
    g_slots = NULL;
    g_arena = NULL;
    g_arena_used = g_live = 0;
}

void mw_symcache_clear(void) {
    if (g_slots) memset(g_slots, 0, SC_SLOTS * sizeof *g_slots);
    g_arena_used = g_live = 0;
    g_njournal = 0;
    g_epoch++;
    g_stats.resets++;
}

void mw_symcache_begin(void) {
    g_njournal = 0;
    g_journal_lost = 0;
}

void mw_symcache_abort(void) {
    if (g_journal_lost) {
        mw_symcache_clear(); /* cannot tell which entries the attempt filled: drop them all */
        return;
    }
    for (uint32_t i = 0; i < g_njournal; i++)
        g_slots[g_journal[i]].code = SC_TOMBSTONE;
    g_stats.aborted += g_njournal;
    g_njournal = 0;
}

uint64_t mw_symcache_epoch(void) {
    return g_epoch;
}

static void journal(const sc_entry_t *e) {
    if (g_njournal < SC_JOURNAL)
        g_journal[g_njournal++] = (uint32_t)(e - g_slots);
    else
        g_journal_lost = 1;
}

void mw_symcache_get_stats(mw_symcache_stats_t *out) {
    *out = g_stats;
}

static int arena_str(uintptr_t str, uint32_t *off, uint32_t *len) {
    if (g_arena_used + SC_NAME_MAX > SC_ARENA) return -1;
    int n = mw_pyframes_read_str(str, g_arena + g_arena_used, SC_NAME_MAX);
    if (n < 0) return -1;
    *off = g_arena_used;
    *len = (uint32_t)n;
    g_arena_used += (uint32_t)n + 1;
    return 0;
}

static int fill(sc_entry_t *e, const mw_rawframe_t *rf) {
    uint32_t mark = g_arena_used;
    e->code = rf->code;
    e->info = rf->info;
    e->gen = 0;
    e->last_lasti = -2;
    if (arena_str(rf->info.qualname, &e->name_off, &e->name_len) != 0 ||
        arena_str(rf->info.filename, &e->file_off, &e->file_len) != 0) {
        g_arena_used = mark;
        e->code = 0;
        return -1;
    }
    e->lt_ok = 0;
    uint32_t room = SC_ARENA - g_arena_used;
    int n = mw_pyframes_read_bytes(rf->info.linetable, (uint8_t *)g_arena + g_arena_used,
                                   room < SC_LINETABLE_MAX ? room : SC_LINETABLE_MAX);
    if (n >= 0) {
        e->lt_off = g_arena_used;
        e->lt_len = (uint32_t)n;
        e->lt_ok = 1;
        g_arena_used += (uint32_t)n;
    }
    return 0;
}

static int same_code(const mw_pycode_t *a, const mw_pycode_t *b) {
    return a->qualname == b->qualname && a->filename == b->filename &&
           a->linetable == b->linetable && a->firstlineno == b->firstlineno &&
           a->version == b->version;
}

static sc_entry_t *lookup(const mw_rawframe_t *rf) {
    uint32_t h = (uint32_t)((rf->code >> 4) * 2654435761u);
    for (uint32_t i = h & (SC_SLOTS - 1);; i = (i + 1) & (SC_SLOTS - 1)) {
        sc_entry_t *e = &g_slots[i];
        if (e->code == rf->code && same_code(&e->info, &rf->info)) {
            g_stats.hits++;
            return e;
        }
        if (e->code == 0) {
            if (g_live >= SC_SLOTS / 2 || g_arena_used + 2 * SC_NAME_MAX > SC_ARENA) {
                mw_symcache_clear();
                return lookup(rf);
            }
            g_stats.misses++;
            if (fill(e, rf) != 0) return NULL;
            g_live++;
            journal(e);
            return e;
        }
    }
}

static int fill_copied(sc_entry_t *e, const mw_rawframe_t *rf, const mw_symcopy_t *c) {
    size_t need = (size_t)c->name_len + c->file_len + 2 + (c->lt_ok ? c->lt_len : 0);
    if (g_arena_used + need > SC_ARENA) return -1;
    e->code = rf->code;
    e->info = rf->info;
    e->gen = 0;
    e->last_lasti = -2;
    e->name_off = g_arena_used;
    e->name_len = c->name_len;
    memcpy(g_arena + g_arena_used, c->name, c->name_len);
    g_arena[g_arena_used + c->name_len] = '\0';
    g_arena_used += c->name_len + 1;
    e->file_off = g_arena_used;
    e->file_len = c->file_len;
    memcpy(g_arena + g_arena_used, c->file, c->file_len);
    g_arena[g_arena_used + c->file_len] = '\0';
    g_arena_used += c->file_len + 1;
    e->lt_ok = c->lt_ok;
    if (c->lt_ok) {
        e->lt_off = g_arena_used;
        e->lt_len = c->lt_len;
        memcpy(g_arena + g_arena_used, c->lt, c->lt_len);
        g_arena_used += c->lt_len;
    }
    return 0;
}

const mw_symentry_t *mw_symcache_put_copied(const mw_rawframe_t *rf, const mw_symcopy_t *c) {
    if (!g_slots) return NULL;
    if (g_live >= SC_SLOTS / 2 || g_arena_used + 2 * SC_NAME_MAX + c->lt_len > SC_ARENA)
        mw_symcache_clear();
    uint32_t h = (uint32_t)((rf->code >> 4) * 2654435761u);
    for (uint32_t i = h & (SC_SLOTS - 1);; i = (i + 1) & (SC_SLOTS - 1)) {
        sc_entry_t *e = &g_slots[i];
        if (e->code == rf->code && same_code(&e->info, &rf->info)) return (const mw_symentry_t *)e;
        if (e->code == 0) {
            g_stats.misses++;
            if (fill_copied(e, rf, c) != 0) {
                e->code = 0;
                return NULL;
            }
            g_live++;
            journal(e);
            return (const mw_symentry_t *)e;
        }
    }
}

const mw_symentry_t *mw_symcache_peek(const mw_rawframe_t *rf) {
    if (!g_slots) return NULL;
    uint32_t h = (uint32_t)((rf->code >> 4) * 2654435761u);
    for (uint32_t i = h & (SC_SLOTS - 1);; i = (i + 1) & (SC_SLOTS - 1)) {
        sc_entry_t *e = &g_slots[i];
        if (e->code == rf->code && same_code(&e->info, &rf->info)) {
            g_stats.hits++;
            return (const mw_symentry_t *)e;
        }
        if (e->code == 0) return NULL;
    }
}

const mw_symentry_t *mw_symcache_resolve(const mw_rawframe_t *rf) {
    if (!g_slots) return NULL;
    sc_entry_t *e = lookup(rf);
    if (!e) g_stats.read_failures++;
    return (const mw_symentry_t *)e;
}

mw_id_t mw_symcache_frame(mw_profbuf_t *b, const mw_rawframe_t *rf) {
    const mw_symentry_t *h = mw_symcache_resolve(rf);
    return h ? mw_symcache_intern(b, h, rf->lasti) : 0;
}

mw_id_t mw_symcache_intern(mw_profbuf_t *b, const mw_symentry_t *h, int32_t lasti) {
    sc_entry_t *e = (sc_entry_t *)h;
    uint64_t gen = mw_profbuf_generation(b);
    if (e->gen != gen) {
        e->name_id = mw_profbuf_intern_str(b, g_arena + e->name_off, e->name_len);
        e->file_id = mw_profbuf_intern_str(b, g_arena + e->file_off, e->file_len);
        if (!e->name_id || !e->file_id) return 0;
        e->gen = gen;
    }
    if (e->last_lasti != lasti) {
        e->last_line = e->lt_ok ? mw_linetable_line(g_format, (const uint8_t *)g_arena + e->lt_off,
                                                    e->lt_len, e->info.firstlineno, lasti)
                                : e->info.firstlineno;
        e->last_lasti = lasti;
    }
    mw_frame_t f = {e->name_id, e->file_id, e->last_line, e->info.firstlineno};
    return mw_profbuf_intern_frame(b, &f);
}
