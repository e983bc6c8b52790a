/* mw_codenames — the named-code set and the handler's copy of names; see mw_codenames.h. */
#include "mw_codenames.h"

#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

/* Open addressing, probed from the key's bits 20.. for at most 16 slots; 0 = empty. */
static _Atomic uint64_t *g_known;

int mw_codenames_init(void) {
    if (g_known) return 0;
    void *p = mmap(NULL, MW_CODENAMES_KNOWN * sizeof *g_known, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -1;
    g_known = p;
    return 0;
}

uint64_t mw_codenames_key(const mw_rawframe_t *f) {
    uint64_t h = 1469598103934665603ULL;
    uint64_t parts[6] = {f->code,
                         f->info.qualname,
                         f->info.filename,
                         f->info.linetable,
                         (uint64_t)(uint32_t)f->info.firstlineno,
                         f->info.version};
    for (int i = 0; i < 6; i++)
        h = (h ^ parts[i]) * 1099511628211ULL;
    return h | 1; /* 0 = empty slot */
}

static int known(uint64_t key) {
    if (!g_known) return 0;
    for (uint32_t k = 0, i = (uint32_t)(key >> 20) & (MW_CODENAMES_KNOWN - 1); k < 16;
         k++, i = (i + 1) & (MW_CODENAMES_KNOWN - 1)) {
        uint64_t v = atomic_load_explicit(&g_known[i], memory_order_relaxed);
        if (v == key) return 1;
        if (v == 0) return 0;
    }
    return 0;
}

void mw_codenames_add(uint64_t key) {
    if (!g_known) return;
    for (uint32_t k = 0, i = (uint32_t)(key >> 20) & (MW_CODENAMES_KNOWN - 1); k < 16;
         k++, i = (i + 1) & (MW_CODENAMES_KNOWN - 1)) {
        uint64_t v = atomic_load_explicit(&g_known[i], memory_order_relaxed);
        if (v == key) return;
        if (v == 0) {
            atomic_store_explicit(&g_known[i], key, memory_order_relaxed);
            return;
        }
    }
    /* A full run of slots: the handlers copy that code's names each time (correct, slower). */
}

void mw_codenames_clear(void) {
    if (g_known) memset((void *)g_known, 0, MW_CODENAMES_KNOWN * sizeof *g_known);
}

void mw_codenames_copy(mw_readcache_t *rc, mw_cpusample_t *rec) {
    uint32_t used = 0;
    rec->ncopies = 0;
    for (int i = 0; i < rec->depth; i++) {
        const mw_rawframe_t *f = &rec->frames[i];
        if (known(mw_codenames_key(f))) continue;
        int dup = 0;
        for (int k = 0; k < rec->ncopies && !dup; k++)
            dup = rec->copies[k].code == f->code;
        if (dup) continue;
        if (rec->ncopies >= MW_CPUTIMER_COPIES) return;
        mw_codecopy_t *c = &rec->copies[rec->ncopies];
        char *base = rec->names;
        int n;
        if (used + 1024 > MW_CPUTIMER_NAMES) return;
        n = mw_pyframes_read_str_rc(rc, f->info.qualname, base + used, 512);
        if (n < 0) continue;
        c->name_off = used;
        c->name_len = (uint32_t)n;
        used += (uint32_t)n + 1;
        n = mw_pyframes_read_str_rc(rc, f->info.filename, base + used, 512);
        if (n < 0) continue;
        c->file_off = used;
        c->file_len = (uint32_t)n;
        used += (uint32_t)n + 1;
        n = mw_pyframes_read_bytes_rc(rc, f->info.linetable, (uint8_t *)base + used,
                                      MW_CPUTIMER_NAMES - used);
        c->lt_ok = n >= 0;
        c->lt_off = used;
        c->lt_len = n >= 0 ? (uint32_t)n : 0;
        if (n > 0) used += (uint32_t)n;
        c->code = f->code;
        rec->ncopies++;
    }
}
