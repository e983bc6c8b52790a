/* mw_module_memory — the allocator hooks of the memory profile and its memory_* functions.
 *
 * memory_enable() puts hooks in front of CPython's "mem" and "obj" allocator domains
 * (PyMem_SetAllocator; "raw" is left alone: it is called without the GIL, and it is where
 * the interpreter's own bookkeeping lives). Every hook calls the allocator it replaced; an
 * allocation also counts its bytes against the sampling countdown (mw_memprof_tick, a
 * subtraction), a free looks its pointer up in the counting filter (one load). Only a sampled
 * allocation does more: the allocating thread reads its OWN Python frames with mw_pyframes'
 * walker (guarded plain loads, no Python C API: the allocator may be called in the middle of
 * a frame's creation or of a collection, where materializing a frame object would allocate and
 * could run a collection and arbitrary finalizers), resolves them through a cache keyed by
 * (code object, instruction) and validated against the fields that identify the code object,
 * and records the sample (mw_memprof).
 *
 * Threads: the hooks run in whatever thread allocates, with the GIL held (required by the
 * two domains hooked), so the countdown, the walk scratch and the frame cache are serialized by
 * the GIL. The CPU-timer handler may interrupt a walk and walk the same thread with a guard of
 * its own, armed later: a fault goes to the innermost armed guard (mw_guard_arm).
 * memory_enable/disable/stats: GIL held.
 *
 * Disable stops the sampling (the countdown never runs out). In delegated mode (below) it also
 * takes the mem/obj hooks out when they are still the installed allocators (nobody -- tracemalloc,
 * memray -- put a hook in front of them since); the raw hook stays for the sampled blocks still
 * live. In wrapped mode the hooks stay: frees of sampled pointers are still seen, so the live
 * set stays true.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mw_labels.h"
#include "mw_memprof.h"
#include "mw_module.h"
#include "mw_pyframes.h"
#include "mw_pyglue.h"
#include "mw_saferead.h"
#include "mw_threads.h"

#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The allocators the hooks replaced, per domain (the hooks' ctx). */
static PyMemAllocatorEx g_orig_mem, g_orig_obj, g_orig_raw;
static PyMemAllocatorEx g_hook_mem, g_hook_obj, g_hook_raw;
static int g_installed; /* 1: wrapped mode, 2: delegated mode */
static int g_on_top;    /* delegated mode: the mem/obj hooks are in place */

/* Walk scratch, mmap'd by the first enable (pages resident once used). GIL-serialized. */
static mw_readcache_t *g_rc;
static mw_walkscratch_t *g_ws;
static mw_guard_t g_guard;
static int g_direct;
static mw_rawframe_t g_raw[MW_MEMPROF_MAX_DEPTH];
static uint64_t g_walk_failed;

/* The calling thread's kernel id, cached. A fork child's only thread inherits the forking
 * thread's copy: reset by the fork handler below (a stale id would fail the walk's check that
 * the thread state is the thread's, and find another thread's name and labels). */
static __thread long t_tid;

static void forget_tid_in_child(void) {
    t_tid = 0;
}

/* Resolved frames by (code object, instruction), validated against the code object's
 * identifying fields (a freed code object's slot reused by another shows a mismatch). */
#define MFC_SLOTS 2048
typedef struct {
    uintptr_t code;
    int32_t lasti;
    mw_pycode_t info;
    mw_memframe_t f;
} mfc_t;
static mfc_t g_mfc[MFC_SLOTS];

static mw_memframe_t *resolve(const mw_rawframe_t *rf, mw_memframe_t *spill, uint64_t walk,
                              uint64_t *stamps) {
    uintptr_t h = (rf->code >> 4) * 0x9E3779B97F4A7C15ull ^ (uintptr_t)rf->lasti * 0x85EBCA6Bu;
    uint32_t slot = (uint32_t)(h >> 21) & (MFC_SLOTS - 1);
    mfc_t *e = &g_mfc[slot];
    if (e->code == rf->code && e->lasti == rf->lasti &&
        memcmp(&e->info, &rf->info, sizeof e->info) == 0) {
        stamps[slot] = walk;
        return &e->f;
    }
    PyCodeObject *co = (PyCodeObject *)rf->code; /* validated by the walk, alive (on our stack) */
    int line = rf->lasti < 0 ? rf->info.firstlineno
                             : PyCode_Addr2Line(co, rf->lasti * 2) /* 2-byte code units */;
    mw_memframe_t r = {rf->info.qualname, rf->info.filename, line, rf->info.firstlineno, 0, 0};
    if (stamps[slot] == walk) { /* serves another frame of this stack */
        *spill = r;
        return spill;
    }
    stamps[slot] = walk;
    e->code = rf->code;
    e->lasti = rf->lasti;
    e->info = rf->info;
    e->f = r;
    return &e->f;
}

/* Reads the calling thread's frames into g_raw. Returns the depth, -1 when unreadable. */
static int read_own_frames(void) {
#if PY_VERSION_HEX >= 0x030D0000
    PyThreadState *ts = PyThreadState_GetUnchecked();
#else
    PyThreadState *ts = _PyThreadState_UncheckedGet();
#endif
    if (!ts) return 0;
    if (!t_tid) t_tid = (long)syscall(SYS_gettid);
    mw_readcache_reset(g_rc);
    if (g_direct && mw_guard_active()) {
        if (sigsetjmp(g_guard.jb, 0)) {
            g_guard.armed = g_guard.session = 0;
            atomic_store(&g_guard.owner, 0);
            return -1;
        }
        atomic_store(&g_guard.owner, t_tid);
        g_guard.session = 1;
        mw_guard_arm(&g_guard); /* a CPU-timer handler's walk nested here arms its own, later */
        mw_readcache_direct(g_rc, &g_guard);
    }
    int truncated = 0, mine = 0;
    uintptr_t anchor = 0;
    uintptr_t top = mw_pyframes_top_frame_of(g_rc, (uintptr_t)ts, t_tid, &anchor, &mine);
    int depth =
        top ? mw_pyframes_walk(g_rc, g_ws, top, anchor, g_raw, MW_MEMPROF_MAX_DEPTH, &truncated)
            : 0;
    g_guard.armed = g_guard.session = 0;
    atomic_signal_fence(memory_order_seq_cst);
    atomic_store(&g_guard.owner, 0);
    return truncated == 2 ? -1 : depth;
}

/* A sampled allocation of size bytes at p. GIL held. */
static void sample(void *p, size_t size) {
    static int busy; /* a nested allocation (none expected) is counted, not sampled */
    uint64_t objects, bytes;
    if (!mw_memprof_draw(size, &objects, &bytes)) return;
    if (busy || !g_rc) {
        mw_memprof_count_dropped();
        return;
    }
    busy = 1;
    static uint64_t walk;
    static uint64_t stamps[MFC_SLOTS];
    static mw_memframe_t spill[MW_MEMPROF_MAX_DEPTH];
    mw_memframe_t *frames[MW_MEMPROF_MAX_DEPTH];
    int depth = read_own_frames();
    if (depth < 0) {
        g_walk_failed++;
        depth = 0;
    }
    walk++;
    for (int i = 0; i < depth; i++)
        frames[i] = resolve(&g_raw[i], &spill[i], walk, stamps);
    char thread[MW_THREAD_NAME_MAX];
    uint32_t seq;
    /* memory profiles outlive windows: no per-request span set */
    uint32_t labelset = mw_labels_base(mw_threads_lookup(t_tid, thread, sizeof thread, &seq));
    if (!thread[0]) snprintf(thread, sizeof thread, "thread-%ld", t_tid);
    mw_memprof_record(p, objects, bytes, frames, (uint32_t)depth, thread, labelset);
    busy = 0;
}

/* ---- wrapped mode: every call of the two domains goes through a hook ---------------------- */
#define WRAPPED(dom)                                                                               \
    static void *dom##_malloc(void *ctx, size_t n) {                                               \
        (void)ctx;                                                                                 \
        void *p = g_orig_##dom.malloc(g_orig_##dom.ctx, n);                                        \
        if (p && mw_memprof_tick(n)) sample(p, n);                                                 \
        return p;                                                                                  \
    }                                                                                              \
    static void *dom##_calloc(void *ctx, size_t k, size_t n) {                                     \
        (void)ctx;                                                                                 \
        void *p = g_orig_##dom.calloc(g_orig_##dom.ctx, k, n);                                     \
        if (p && mw_memprof_tick(k * n)) sample(p, k *n);                                          \
        return p;                                                                                  \
    }                                                                                              \
    static void *dom##_realloc(void *ctx, void *q, size_t n) {                                     \
        (void)ctx;                                                                                 \
        if (q && mw_memprof_maybe_tracked(q)) mw_memprof_untrack(q);                               \
        void *p = g_orig_##dom.realloc(g_orig_##dom.ctx, q, n);                                    \
        if (p && mw_memprof_tick(n)) sample(p, n);                                                 \
        return p;                                                                                  \
    }                                                                                              \
    static void dom##_free(void *ctx, void *q) {                                                   \
        (void)ctx;                                                                                 \
        if (q && mw_memprof_maybe_tracked(q)) mw_memprof_untrack(q);                               \
        g_orig_##dom.free(g_orig_##dom.ctx, q);                                                    \
    }

WRAPPED(mem)
WRAPPED(obj)

/* ---- delegated mode: frees are not hooked at all ------------------------------------------------
 * pymalloc hands every block it did not allocate itself to the raw domain (PyMem_RawFree /
 * PyMem_RawRealloc; that is how it serves blocks over 512 bytes). A sampled allocation is served
 * by the raw allocator, so its free comes back through the raw domain, which is hooked; all
 * other frees of the two domains go straight to pymalloc. An allocation's hook is one
 * subtraction and a tail call; a free costs nothing. Used when a probe at install time saw a
 * block of each domain freed through the raw domain (pymalloc; not PYTHONMALLOC=malloc). */
static void *sampled_block(void *p, size_t n) {
    if (p) sample(p, n);
    return p;
}

static void *raw_copy_of(const PyMemAllocatorEx *dom, void *p, size_t n) {
    /* a reallocation to sample: moved to a raw block so that its free is seen */
    void *r = p ? g_orig_raw.malloc(g_orig_raw.ctx, n) : NULL;
    if (!r) return p; /* sampled but not tracked: its free goes to pymalloc unseen */
    memcpy(r, p, n);
    dom->free(dom->ctx, p);
    return r;
}

/* The sampled calls, out of line: the hooks' fast path then needs no stack frame. */
__attribute__((noinline)) static void *d_sampled_malloc(size_t n) {
    return sampled_block(g_orig_raw.malloc(g_orig_raw.ctx, n ? n : 1), n);
}
__attribute__((noinline)) static void *d_sampled_calloc(size_t k, size_t n) {
    return sampled_block(k && n ? g_orig_raw.calloc(g_orig_raw.ctx, k, n)
                                : g_orig_raw.malloc(g_orig_raw.ctx, 1),
                         k * n);
}
__attribute__((noinline)) static void *d_sampled_realloc(const PyMemAllocatorEx *dom, void *p,
                                                         size_t n) {
    return sampled_block(raw_copy_of(dom, p, n ? n : 1), n);
}

#define DELEGATED(dom)                                                                             \
    static void *d_##dom##_malloc(void *ctx, size_t n) {                                           \
        if (__builtin_expect((mw_memprof_countdown -= (int64_t)n) > 0, 1))                         \
            return g_orig_##dom.malloc(ctx, n);                                                    \
        return d_sampled_malloc(n);                                                                \
    }                                                                                              \
    static void *d_##dom##_calloc(void *ctx, size_t k, size_t n) {                                 \
        if (__builtin_expect((mw_memprof_countdown -= (int64_t)(k * n)) > 0, 1))                   \
            return g_orig_##dom.calloc(ctx, k, n);                                                 \
        return d_sampled_calloc(k, n);                                                             \
    }                                                                                              \
    static void *d_##dom##_realloc(void *ctx, void *q, size_t n) {                                 \
        void *p = g_orig_##dom.realloc(ctx, q, n);                                                 \
        if (__builtin_expect((mw_memprof_countdown -= (int64_t)n) > 0, 1)) return p;               \
        return d_sampled_realloc(&g_orig_##dom, p, n);                                             \
    }

DELEGATED(mem)
DELEGATED(obj)

/* The raw domain (delegated mode): frees and reallocations of sampled blocks. Called with or
 * without the GIL; mw_memprof_untrack takes its lock. */
static void *probe_block;
static int probe_seen;

static void *r_malloc(void *ctx, size_t n) {
    return g_orig_raw.malloc(ctx, n);
}
static void *r_calloc(void *ctx, size_t k, size_t n) {
    return g_orig_raw.calloc(ctx, k, n);
}
static void *r_realloc(void *ctx, void *q, size_t n) {
    if (q && mw_memprof_maybe_tracked(q)) mw_memprof_untrack(q);
    return g_orig_raw.realloc(ctx, q, n);
}
static void r_free(void *ctx, void *q) {
    if (q && q == probe_block) probe_seen = 1;
    if (q && mw_memprof_maybe_tracked(q)) mw_memprof_untrack(q);
    g_orig_raw.free(ctx, q);
}

/* Whether a block over pymalloc's limit, allocated and freed by the domain's allocator, is
 * freed through the raw domain (with the raw hooks in place). GIL held. */
static int frees_through_raw(const PyMemAllocatorEx *dom) {
    void *p = dom->malloc(dom->ctx, 4096);
    if (!p) return 0;
    probe_seen = 0;
    probe_block = p;
    dom->free(dom->ctx, p);
    probe_block = NULL;
    return probe_seen;
}

static int is_current(PyMemAllocatorDomain dom, const PyMemAllocatorEx *a) {
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(dom, &cur);
    return cur.ctx == a->ctx && cur.malloc == a->malloc && cur.calloc == a->calloc &&
           cur.realloc == a->realloc && cur.free == a->free;
}

static void *map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static PyObject *py_memory_enable(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"rate_bytes", NULL};
    long long rate = 512 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|L", kwlist, &rate)) return NULL;
    if (rate < 1 || rate > (1LL << 40)) {
        PyErr_SetString(PyExc_ValueError, "rate_bytes must be within 1..2**40");
        return NULL;
    }
    if (mw_pyframes_init() != 0) return NULL;
    if (!g_rc) {
        g_rc = map(sizeof *g_rc);
        g_ws = map(mw_walkscratch_size());
        if (!g_rc || !g_ws) {
            if (g_rc) munmap(g_rc, sizeof *g_rc);
            if (g_ws) munmap(g_ws, mw_walkscratch_size());
            g_rc = NULL;
            g_ws = NULL;
            return PyErr_NoMemory();
        }
        g_direct = mw_guard_allowed() && mw_guard_register(&g_guard) == 0;
    }
    if (mw_memprof_enable((uint64_t)rate) != 0) return PyErr_NoMemory();
    if (!g_installed) {
        PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &g_orig_mem);
        PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &g_orig_obj);
        PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &g_orig_raw);
        g_hook_raw = (PyMemAllocatorEx){g_orig_raw.ctx, r_malloc, r_calloc, r_realloc, r_free};
        PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &g_hook_raw);
        const char *force = getenv("MW_PROFILING_MEMORY_HOOKS");
        int wrapped = force && strcmp(force, "wrapped") == 0;
        if (!wrapped && frees_through_raw(&g_orig_mem) && frees_through_raw(&g_orig_obj)) {
            g_hook_mem = (PyMemAllocatorEx){g_orig_mem.ctx, d_mem_malloc, d_mem_calloc,
                                            d_mem_realloc, g_orig_mem.free};
            g_hook_obj = (PyMemAllocatorEx){g_orig_obj.ctx, d_obj_malloc, d_obj_calloc,
                                            d_obj_realloc, g_orig_obj.free};
            g_installed = 2;
            g_on_top = 1;
        } else {
            g_hook_mem = (PyMemAllocatorEx){NULL, mem_malloc, mem_calloc, mem_realloc, mem_free};
            g_hook_obj = (PyMemAllocatorEx){NULL, obj_malloc, obj_calloc, obj_realloc, obj_free};
            g_installed = 1;
        }
        PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_hook_mem);
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_hook_obj);
    } else if (g_installed == 2 && !g_on_top && is_current(PYMEM_DOMAIN_MEM, &g_orig_mem) &&
               is_current(PYMEM_DOMAIN_OBJ, &g_orig_obj)) {
        PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_hook_mem);
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_hook_obj);
        g_on_top = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *py_memory_disable(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    mw_memprof_disable();
    /* Delegated mode: the mem/obj hooks only count (frees never pass through them), so they can
     * go while nobody has put another hook on top of them: a disabled profiler costs nothing.
     * The raw hook stays: sampled blocks still live come back through it. */
    if (g_installed == 2 && g_on_top && is_current(PYMEM_DOMAIN_MEM, &g_hook_mem) &&
        is_current(PYMEM_DOMAIN_OBJ, &g_hook_obj)) {
        PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_orig_mem);
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_orig_obj);
        g_on_top = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *py_memory_stats(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    mw_memprof_stats_t s;
    mw_memprof_get_stats(&s);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    if (mw_dict_put_u64(d, "samples", s.samples) || mw_dict_put_u64(d, "recorded", s.recorded) ||
        mw_dict_put_u64(d, "dropped", s.dropped) || mw_dict_put_u64(d, "live", s.live) ||
        mw_dict_put_u64(d, "live_overflow", s.live_overflow) ||
        mw_dict_put_u64(d, "frees", s.frees) || mw_dict_put_u64(d, "compactions", s.compactions) ||
        mw_dict_put_u64(d, "inuse_bytes", s.inuse_bytes) ||
        mw_dict_put_u64(d, "rate_bytes", s.rate_bytes) ||
        mw_dict_put_u64(d, "enabled", s.enabled) ||
        mw_dict_put_u64(d, "walk_failed", g_walk_failed) ||
        mw_dict_put_u64(d, "hook_mode", (uint64_t)g_installed) ||
        mw_dict_put_u64(d, "hooked", (uint64_t)(g_installed == 1 || g_on_top))) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

PyMethodDef mw_memory_methods[] = {
    {"memory_enable", (PyCFunction)(void (*)(void))py_memory_enable, METH_VARARGS | METH_KEYWORDS,
     "memory_enable(rate_bytes=524288): sample allocations, one per rate_bytes on average "
     "(hooks the mem and obj allocator domains the first time)."},
    {"memory_disable", py_memory_disable, METH_NOARGS,
     "memory_disable(): stop sampling allocations (frees of sampled ones are still seen)."},
    {"memory_stats", py_memory_stats, METH_NOARGS, "memory_stats() -> dict of counters."},
    {NULL, NULL, 0, NULL}};

int mw_memory_module_init(PyObject *m) {
    (void)m;
    static int once;
    if (!once) {
        mw_memprof_register_atfork();
        pthread_atfork(NULL, NULL, forget_tid_in_child);
        once = 1;
    }
    return 0;
}
