/* mw_elfsym — see mw_elfsym.h. libelf reads the symbol tables, libunwind finds FDEs.
 *
 * Per object (keyed by load bias and name): function symbols (STT_FUNC, STT_GNU_IFUNC; defined,
 * non-zero address) sorted by ELF address, one per address (aliases: sized before size 0, then
 * global before weak before local, then the fewest leading underscores, then the shortest name),
 * names copied into one block. A lookup finds the object containing the address with
 * dl_iterate_phdr (so an object loaded or unloaded since the last call is seen), then the symbol
 * with the greatest start <= the address.
 */
#define _GNU_SOURCE
#define UNW_LOCAL_ONLY
#include "mw_elfsym.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <gelf.h>
#include <libelf.h>
#include <libunwind.h>
#include <limits.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#define BUILD_ID_MAX 64
#define DEBUG_ROOT "/usr/lib/debug"

typedef struct {
    uint64_t start; /* ELF address */
    uint64_t size;  /* 0 = unknown */
    uint32_t name;  /* offset in obj_t.names */
} fsym_t;

typedef struct {
    uintptr_t bias, base;
    char *name; /* dlpi_name as loaded ("" = the main program) */
    char *path; /* file to read */
    uint8_t build_id[BUILD_ID_MAX];
    size_t build_id_len;
    int loaded; /* symbol tables read (or tried) */
    fsym_t *syms;
    size_t nsyms;
    char *names;
} obj_t;

static obj_t *g_objs;
static size_t g_nobjs, g_capobjs;
static int g_elf_ready;

/* ---- the loaded object containing an address ---------------------------------------------- */

typedef struct {
    uintptr_t ip;
    uintptr_t bias, base;
    const char *name;
    uint8_t build_id[BUILD_ID_MAX];
    size_t build_id_len;
} find_t;

static size_t note_build_id(const uint8_t *p, size_t len, size_t align, uint8_t *out) {
    size_t off = 0;
    while (off + sizeof(ElfW(Nhdr)) <= len) {
        const ElfW(Nhdr) *n = (const ElfW(Nhdr) *)(p + off);
        size_t name_off = off + sizeof *n;
        size_t desc_off = name_off + ((n->n_namesz + align - 1) & ~(align - 1));
        size_t next = desc_off + ((n->n_descsz + align - 1) & ~(align - 1));
        if (desc_off > len || n->n_descsz > len - desc_off) break;
        if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 &&
            memcmp(p + name_off, "GNU", 4) == 0 && n->n_descsz > 0 && n->n_descsz <= BUILD_ID_MAX) {
            memcpy(out, p + desc_off, n->n_descsz);
            return n->n_descsz;
        }
        off = next;
    }
    return 0;
}

static int find_object(struct dl_phdr_info *info, size_t size, void *arg) {
    (void)size;
    find_t *f = arg;
    uintptr_t lo = UINTPTR_MAX;
    int hit = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD) continue;
        uintptr_t a = info->dlpi_addr + ph->p_vaddr;
        if (f->ip >= a && f->ip - a < ph->p_memsz) hit = 1;
        if (a < lo) lo = a;
    }
    if (!hit) return 0;
    f->bias = info->dlpi_addr;
    f->base = lo & ~(uintptr_t)4095;
    f->name = info->dlpi_name ? info->dlpi_name : "";
    f->build_id_len = 0;
    for (int i = 0; i < info->dlpi_phnum && !f->build_id_len; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_NOTE)
            f->build_id_len = note_build_id((const uint8_t *)(info->dlpi_addr + ph->p_vaddr),
                                            ph->p_memsz, ph->p_align == 8 ? 8 : 4, f->build_id);
    }
    return 1;
}

static obj_t *object_of(uintptr_t ip) {
    find_t f;
    memset(&f, 0, sizeof f);
    f.ip = ip;
    if (!dl_iterate_phdr(find_object, &f)) return NULL;
    for (size_t i = 0; i < g_nobjs; i++)
        if (g_objs[i].bias == f.bias && g_objs[i].base == f.base &&
            strcmp(g_objs[i].name, f.name) == 0)
            return &g_objs[i];
    if (g_nobjs == g_capobjs) {
        size_t cap = g_capobjs ? 2 * g_capobjs : 64;
        obj_t *o = realloc(g_objs, cap * sizeof *o);
        if (!o) return NULL;
        g_objs = o;
        g_capobjs = cap;
    }
    obj_t *o = &g_objs[g_nobjs];
    memset(o, 0, sizeof *o);
    o->bias = f.bias;
    o->base = f.base;
    o->name = strdup(f.name);
    if (f.name[0]) {
        o->path = strdup(f.name);
    } else {
        char buf[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
        buf[n > 0 ? n : 0] = '\0';
        o->path = strdup(buf);
    }
    if (!o->name || !o->path) {
        free(o->name);
        free(o->path);
        return NULL;
    }
    memcpy(o->build_id, f.build_id, f.build_id_len);
    o->build_id_len = f.build_id_len;
    g_nobjs++;
    return o;
}

/* ---- reading an ELF file ------------------------------------------------------------------ */

typedef struct {
    int fd;
    Elf *e;
    Elf_Scn *symtab, *dynsym; /* with contents (not SHT_NOBITS) */
    uint8_t build_id[BUILD_ID_MAX];
    size_t build_id_len;
    const char *link; /* .gnu_debuglink file name */
    uint32_t link_crc;
} elf_t;

static void elf_close(elf_t *f) {
    if (f->e) elf_end(f->e);
    if (f->fd >= 0) close(f->fd);
    memset(f, 0, sizeof *f);
    f->fd = -1;
}

static int elf_open(const char *path, elf_t *f) {
    memset(f, 0, sizeof *f);
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) return -1;
    f->e = elf_begin(f->fd, ELF_C_READ_MMAP, NULL);
    size_t shstrndx;
    if (!f->e || elf_kind(f->e) != ELF_K_ELF || elf_getshdrstrndx(f->e, &shstrndx) != 0) {
        elf_close(f);
        return -1;
    }
    Elf_Scn *scn = NULL;
    while ((scn = elf_nextscn(f->e, scn)) != NULL) {
        GElf_Shdr sh;
        if (!gelf_getshdr(scn, &sh) || sh.sh_type == SHT_NOBITS) continue;
        if (sh.sh_type == SHT_SYMTAB) f->symtab = scn;
        if (sh.sh_type == SHT_DYNSYM) f->dynsym = scn;
        if (sh.sh_type == SHT_NOTE && !f->build_id_len) {
            Elf_Data *d = elf_getdata(scn, NULL);
            if (d && d->d_buf)
                f->build_id_len =
                    note_build_id(d->d_buf, d->d_size, sh.sh_addralign == 8 ? 8 : 4, f->build_id);
        }
        const char *name = elf_strptr(f->e, shstrndx, sh.sh_name);
        if (sh.sh_type == SHT_PROGBITS && name && strcmp(name, ".gnu_debuglink") == 0) {
            Elf_Data *d = elf_getdata(scn, NULL);
            if (!d || !d->d_buf) continue;
            const char *s = d->d_buf;
            size_t len = strnlen(s, d->d_size);
            size_t crc_off = (len + 4) & ~(size_t)3;
            if (len == 0 || crc_off + 4 > d->d_size) continue;
            uint32_t crc;
            memcpy(&crc, s + crc_off, 4); /* in the file's byte order: the host's here */
            f->link = s;
            f->link_crc = crc;
        }
    }
    return 0;
}

static int same_build_id(const elf_t *f, const obj_t *o) {
    return f->build_id_len == o->build_id_len &&
           memcmp(f->build_id, o->build_id, o->build_id_len) == 0;
}

static int file_crc(const char *path, uint32_t *out) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    static unsigned char buf[1 << 16];
    uLong crc = crc32(0L, Z_NULL, 0);
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        crc = crc32(crc, buf, (uInt)n);
    close(fd);
    if (n < 0) return -1;
    *out = (uint32_t)crc;
    return 0;
}

/* Opens the separate debug file of o (whose own file is main, or NULL). 0 or -1. */
static int open_debug_file(const obj_t *o, const elf_t *main, elf_t *out) {
    char path[PATH_MAX];
    if (o->build_id_len >= 2) {
        int n = snprintf(path, sizeof path, DEBUG_ROOT "/.build-id/%02x/", o->build_id[0]);
        for (size_t i = 1; i < o->build_id_len && n > 0 && (size_t)n < sizeof path - 8; i++)
            n += snprintf(path + n, sizeof path - n, "%02x", o->build_id[i]);
        if (n > 0 && (size_t)n < sizeof path - 8) {
            memcpy(path + n, ".debug", 7);
            if (elf_open(path, out) == 0) {
                if (out->symtab && same_build_id(out, o)) return 0;
                elf_close(out);
            }
        }
    }
    if (!main || !main->link || strchr(main->link, '/')) return -1;
    char real[PATH_MAX];
    if (!realpath(o->path, real)) return -1;
    char *slash = strrchr(real, '/');
    if (!slash) return -1;
    *slash = '\0';
    const char *fmt[] = {"%s/%s", "%s/.debug/%s", DEBUG_ROOT "%s/%s"};
    for (size_t i = 0; i < sizeof fmt / sizeof *fmt; i++) {
        int n = snprintf(path, sizeof path, fmt[i], real, main->link);
        if (n <= 0 || (size_t)n >= sizeof path || strcmp(path, o->path) == 0) continue;
        uint32_t crc;
        if (file_crc(path, &crc) != 0 || crc != main->link_crc) continue;
        if (elf_open(path, out) == 0) {
            if (out->symtab) return 0;
            elf_close(out);
        }
    }
    return -1;
}

/* ---- an object's function symbols ---------------------------------------------------------- */

typedef struct {
    uint64_t start, size;
    const char *name;
    int rank;
} cand_t;

typedef struct {
    cand_t *v;
    size_t n, cap;
} cands_t;

static void collect(Elf *e, Elf_Scn *scn, cands_t *c) {
    GElf_Shdr sh;
    Elf_Data *d;
    if (!scn || !gelf_getshdr(scn, &sh) || sh.sh_entsize == 0 || !(d = elf_getdata(scn, NULL)))
        return;
    size_t count = sh.sh_size / sh.sh_entsize;
    for (size_t i = 1; i < count; i++) {
        GElf_Sym s;
        if (!gelf_getsym(d, (int)i, &s)) break;
        int type = GELF_ST_TYPE(s.st_info);
        if ((type != STT_FUNC && type != STT_GNU_IFUNC) || s.st_shndx == SHN_UNDEF ||
            s.st_value == 0)
            continue;
        const char *name = elf_strptr(e, sh.sh_link, s.st_name);
        if (!name || !name[0]) continue;
        if (c->n == c->cap) {
            size_t cap = c->cap ? 2 * c->cap : 1024;
            cand_t *v = realloc(c->v, cap * sizeof *v);
            if (!v) return;
            c->v = v;
            c->cap = cap;
        }
        int bind = GELF_ST_BIND(s.st_info);
        c->v[c->n++] = (cand_t){s.st_value, s.st_size, name,
                                bind == STB_GLOBAL ? 0
                                : bind == STB_WEAK ? 1
                                                   : 2};
    }
}

static size_t underscores(const char *s) {
    size_t n = 0;
    while (s[n] == '_')
        n++;
    return n;
}

static int cand_cmp(const void *pa, const void *pb) {
    const cand_t *a = pa, *b = pb;
    if (a->start != b->start) return a->start < b->start ? -1 : 1;
    if (!a->size != !b->size) return a->size ? -1 : 1;
    if (a->rank != b->rank) return a->rank - b->rank;
    size_t ua = underscores(a->name), ub = underscores(b->name);
    if (ua != ub) return ua < ub ? -1 : 1;
    size_t la = strlen(a->name), lb = strlen(b->name);
    if (la != lb) return la < lb ? -1 : 1;
    return strcmp(a->name, b->name);
}

/* Length of name without a compiler's cold-part suffix (".cold", ".cold.N"). */
static size_t display_len(const char *name) {
    size_t len = strlen(name);
    const char *c = strstr(name, ".cold");
    if (!c || c == name) return len;
    const char *t = c + 5;
    if (*t == '.') {
        t++;
        if (!*t) return len;
        while (*t >= '0' && *t <= '9')
            t++;
    }
    return *t ? len : (size_t)(c - name);
}

static void object_load(obj_t *o) {
    o->loaded = 1;
    if (!g_elf_ready) {
        if (elf_version(EV_CURRENT) == EV_NONE) return;
        g_elf_ready = 1;
    }
    elf_t mainf, dbg;
    memset(&mainf, 0, sizeof mainf);
    memset(&dbg, 0, sizeof dbg);
    mainf.fd = dbg.fd = -1;
    int have_main = o->path[0] && elf_open(o->path, &mainf) == 0;
    if (have_main && mainf.build_id_len && o->build_id_len && !same_build_id(&mainf, o)) {
        elf_close(&mainf); /* not the file that was loaded */
        have_main = 0;
    }
    cands_t c = {NULL, 0, 0};
    if (have_main) {
        collect(mainf.e, mainf.dynsym, &c);
        collect(mainf.e, mainf.symtab, &c);
    }
    if ((!have_main || !mainf.symtab) && open_debug_file(o, have_main ? &mainf : NULL, &dbg) == 0)
        collect(dbg.e, dbg.symtab, &c);
    if (c.n) {
        qsort(c.v, c.n, sizeof *c.v, cand_cmp);
        size_t kept = 0, bytes = 0;
        for (size_t i = 0; i < c.n; i++) {
            if (kept && c.v[kept - 1].start == c.v[i].start) {
                if (!c.v[kept - 1].size) c.v[kept - 1].size = c.v[i].size;
                continue;
            }
            c.v[kept++] = c.v[i];
            bytes += display_len(c.v[i].name) + 1;
        }
        o->syms = malloc(kept * sizeof *o->syms);
        o->names = bytes <= UINT32_MAX ? malloc(bytes) : NULL;
        if (o->syms && o->names) {
            size_t off = 0;
            for (size_t i = 0; i < kept; i++) {
                size_t len = display_len(c.v[i].name);
                memcpy(o->names + off, c.v[i].name, len);
                o->names[off + len] = '\0';
                o->syms[i] = (fsym_t){c.v[i].start, c.v[i].size, (uint32_t)off};
                off += len + 1;
            }
            o->nsyms = kept;
        } else {
            free(o->syms);
            free(o->names);
            o->syms = NULL;
            o->names = NULL;
        }
    }
    free(c.v);
    if (dbg.e) elf_close(&dbg);
    if (have_main) elf_close(&mainf);
}

/* The symbol with the greatest start <= rel, or NULL. */
static const fsym_t *sym_floor(const obj_t *o, uint64_t rel) {
    size_t lo = 0, hi = o->nsyms;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (o->syms[mid].start <= rel)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo ? &o->syms[lo - 1] : NULL;
}

/* ---- lookup -------------------------------------------------------------------------------- */

static void set_name(mw_elfsym_t *out, const char *name) {
    out->name = name;
    out->name_len = name ? strlen(name) : 0;
}

/* An object without a symbol table of its own (no readable file): the loader's .dynsym. */
static int dladdr_covering(uintptr_t ip, mw_elfsym_t *out) {
    Dl_info info;
    const ElfW(Sym) *sym = NULL;
    if (!dladdr1((void *)ip, &info, (void **)&sym, RTLD_DL_SYMENT) || !info.dli_sname ||
        !info.dli_saddr || !sym)
        return 0;
    uintptr_t s = (uintptr_t)info.dli_saddr;
    if (sym->st_size ? ip - s >= sym->st_size : 0) return 0;
    out->start = s;
    out->end = sym->st_size ? s + sym->st_size : 0;
    set_name(out, info.dli_sname);
    return 1;
}

int mw_elfsym_lookup(uintptr_t ip, mw_elfsym_t *out) {
    memset(out, 0, sizeof *out);
    out->start = ip;
    out->path = "";
    obj_t *o = object_of(ip);
    if (!o) return -1;
    if (!o->loaded) object_load(o);
    out->bias = o->bias;
    out->base = o->base;
    out->path = o->path;
    uint64_t rel = ip - o->bias;
    const fsym_t *s = sym_floor(o, rel);
    if (s && s->size && rel - s->start < s->size) {
        out->start = o->bias + s->start;
        out->end = out->start + s->size;
        out->source = MW_ELFSYM_SYMBOL;
        set_name(out, o->names + s->name);
        return 0;
    }
    unw_proc_info_t pi;
    memset(&pi, 0, sizeof pi);
    if (unw_get_proc_info_by_ip(unw_local_addr_space, (unw_word_t)ip, &pi, NULL) == 0 &&
        pi.start_ip <= ip && ip < pi.end_ip) {
        out->start = pi.start_ip;
        out->end = pi.end_ip;
        out->source = MW_ELFSYM_FDE;
        const fsym_t *at = sym_floor(o, pi.start_ip - o->bias);
        if (at && at->start == pi.start_ip - o->bias) {
            set_name(out, o->names + at->name);
        } else if (!o->nsyms) {
            mw_elfsym_t d;
            if (dladdr_covering(pi.start_ip, &d) && d.start == pi.start_ip) set_name(out, d.name);
        }
        return 0;
    }
    if (s && !s->size) { /* a symbol without a size (hand-written code) and no FDE */
        out->start = o->bias + s->start;
        out->source = MW_ELFSYM_SYMBOL;
        set_name(out, o->names + s->name);
        return 0;
    }
    if (!o->nsyms && dladdr_covering(ip, out)) out->source = MW_ELFSYM_SYMBOL;
    return 0;
}
