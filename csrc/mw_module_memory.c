/* mw_module_memory — the allocator hooks of the memory profile and its memory_* functions.
 *
 * memory_enable() puts hooks in front of CPython's "mem" and "obj" allocator domains, and of "raw"
 * (PyMem_SetAllocator; raw is called with or without the GIL: its hooks see the frees of sampled
 * blocks, and sample the large blocks pymalloc passes to it, in a thread holding the GIL only,
 * see "delegated mode"). Every hook calls the allocator it replaced; an
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
 * the GIL. The sampler thread puts the allocation hooks in and takes them out at its ticks (the
 * duty cycle below: word swaps in the interpreter's allocator tables, no C API, no GIL). The
 * CPU-timer handler may interrupt a walk and walk the same thread with a guard of its own, armed
 * later: a fault goes to the innermost armed guard (mw_guard_arm). memory_enable/disable/stats: GIL
 * held.
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

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
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

/* A sampled allocation of size bytes at p; duty: one the duty cycle gates (a small block). GIL
 * held. */
static void sample(void *p, size_t size, int duty) {
    static int busy; /* a nested allocation (none expected) is counted, not sampled */
    uint64_t objects, bytes;
    if (!mw_memprof_draw(size, duty, &objects, &bytes)) return;
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
        if (p && mw_memprof_tick(n)) sample(p, n, 1);                                              \
        return p;                                                                                  \
    }                                                                                              \
    static void *dom##_calloc(void *ctx, size_t k, size_t n) {                                     \
        (void)ctx;                                                                                 \
        void *p = g_orig_##dom.calloc(g_orig_##dom.ctx, k, n);                                     \
        if (p && mw_memprof_tick(k * n)) sample(p, k *n, 1);                                       \
        return p;                                                                                  \
    }                                                                                              \
    static void *dom##_realloc(void *ctx, void *q, size_t n) {                                     \
        (void)ctx;                                                                                 \
        if (q && mw_memprof_maybe_tracked(q)) mw_memprof_untrack(q);                               \
        void *p = g_orig_##dom.realloc(g_orig_##dom.ctx, q, n);                                    \
        if (p && mw_memprof_tick(n)) sample(p, n, 1);                                              \
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
 * block of each domain freed through the raw domain (pymalloc; not PYTHONMALLOC=malloc).
 *
 * Small and large blocks are sampled in two places. A request over g_small_max bytes, which
 * pymalloc passes to the raw domain, is counted and sampled there (r_malloc, r_calloc,
 * r_realloc: always in place, so such a sample stands for itself alone; a countdown of its own at
 * the rate times the cycle's weight, as many samples per byte as the small blocks get), and the
 * mem/obj hooks let it through; they count and sample the small ones, which the duty cycle gates.
 * The sampling of large blocks is the dear part (a string grown by realloc at every step is
 * sampled at every few steps): done while the mem/obj hooks were in, it slowed the app in those
 * stretches only, and a cycle picking them by the clock then saw less of that code than its
 * share (in use at a third of the truth at 25%). SIZE_MAX when a probe at install did not see
 * pymalloc pass requests over 512 bytes to the raw domain: then the mem/obj hooks sample every
 * size, and there is no duty cycle. */
static size_t g_small_max = SIZE_MAX;
#define PYMALLOC_SMALL_MAX 512 /* pymalloc's largest block (SMALL_REQUEST_THRESHOLD, 3.10-3.13) */

static void *sampled_block(void *p, size_t n) {
    if (p) sample(p, n, 1);
    return p;
}

static void *raw_copy_of(const PyMemAllocatorEx *dom, void *p, size_t n) {
    /* a reallocation to sample: moved to a raw block so that its free is seen (a small block, at
     * most g_small_max bytes, when large ones are sampled in the raw domain) */
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
        if (__builtin_expect(n > g_small_max, 0) ||                                                \
            __builtin_expect((mw_memprof_countdown -= (int64_t)n) > 0, 1))                         \
            return g_orig_##dom.malloc(ctx, n);                                                    \
        return d_sampled_malloc(n);                                                                \
    }                                                                                              \
    static void *d_##dom##_calloc(void *ctx, size_t k, size_t n) {                                 \
        if (__builtin_expect(k * n > g_small_max, 0) ||                                            \
            __builtin_expect((mw_memprof_countdown -= (int64_t)(k * n)) > 0, 1))                   \
            return g_orig_##dom.calloc(ctx, k, n);                                                 \
        return d_sampled_calloc(k, n);                                                             \
    }                                                                                              \
    static void *d_##dom##_realloc(void *ctx, void *q, size_t n) {                                 \
        void *p = g_orig_##dom.realloc(ctx, q, n);                                                 \
        if (__builtin_expect(n > g_small_max, 0) ||                                                \
            __builtin_expect((mw_memprof_countdown -= (int64_t)n) > 0, 1))                         \
            return p;                                                                              \
        return d_sampled_realloc(&g_orig_##dom, p, n);                                             \
    }

DELEGATED(mem)
DELEGATED(obj)

/* The raw domain (delegated mode): the large blocks pymalloc passes on (sampled here, see above),
 * frees and reallocations of sampled blocks. Called with or without the GIL: a block is counted
 * and sampled only by a thread holding it (the countdown and the walk scratch are serialized by
 * it); mw_memprof_untrack takes its lock. */
static void *probe_block;
static int probe_seen;
static size_t probe_size; /* a malloc of this size was seen (probe_seen = 2) */

/* Whether the calling thread holds the GIL (no allocation, no lock). */
static int holds_gil(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyThreadState_GetUnchecked() != NULL; /* the thread's attached state */
#else
    /* the GIL holder's thread state (3.10/3.11: the runtime's; 3.12: the thread's) */
    PyThreadState *cur = _PyThreadState_UncheckedGet();
    return cur && cur == PyGILState_GetThisThreadState();
#endif
}

/* A large block (n > g_small_max: never when there is no split) to count, in a thread holding the
 * GIL, while sampling is on: 1 when it is to be sampled. */
static inline int raw_counts(size_t n) {
    return n > g_small_max && mw_memprof_enabled() && holds_gil() && mw_memprof_tick_large(n);
}

static void *r_malloc(void *ctx, size_t n) {
    void *p = g_orig_raw.malloc(ctx, n);
    if (__builtin_expect(probe_size != 0, 0) && n == probe_size) probe_seen = 2;
    if (p && raw_counts(n)) sample(p, n, 0);
    return p;
}
static void *r_calloc(void *ctx, size_t k, size_t n) {
    void *p = g_orig_raw.calloc(ctx, k, n);
    if (p && raw_counts(k * n)) sample(p, k * n, 0);
    return p;
}
static void *r_realloc(void *ctx, void *q, size_t n) {
    if (q && mw_memprof_maybe_tracked(q)) mw_memprof_untrack(q);
    void *p = g_orig_raw.realloc(ctx, q, n);
    if (p && raw_counts(n)) sample(p, n, 0);
    return p;
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

/* Whether a request of n bytes to the domain's allocator reaches the raw domain as a malloc of
 * n bytes (with the raw hooks in place). GIL held. */
static int allocs_through_raw(const PyMemAllocatorEx *dom, size_t n) {
    probe_seen = 0;
    probe_size = n;
    void *p = dom->malloc(dom->ctx, n);
    probe_size = 0;
    int seen = probe_seen == 2;
    probe_seen = 0;
    if (p) dom->free(dom->ctx, p);
    return seen;
}

static int is_current(PyMemAllocatorDomain dom, const PyMemAllocatorEx *a) {
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(dom, &cur);
    return cur.ctx == a->ctx && cur.malloc == a->malloc && cur.calloc == a->calloc &&
           cur.realloc == a->realloc && cur.free == a->free;
}

/* ---- duty cycle (delegated mode): the small blocks' hooks in place part of the time ----------
 * Every allocation through a hook pays one more indirect call (~1 ns): 2% of the CPU of code that
 * allocates at every step. So the sampler thread can take the mem/obj allocation hooks out and put
 * them back at its ticks: one tick of every run of g_duty_run (memory_enable's duty_run, from
 * MW_PROFILING_MEMORY_DUTY: 4 for 25%; 1 when not given, always in), at a random place in the run,
 * puts them in until the next tick, independently of anything the app does, so a small allocation
 * at any instant is seen with probability 1 / g_duty_run and each such sample stands for
 * g_duty_run times more (mw_memprof_weight). Unbiased as long as the hooks do not slow the app
 * down in those stretches: hence large blocks, whose sampling is dear, are sampled in the raw
 * domain, always (g_small_max above); what the hooks of the small ones cost in the stretches
 * they are in (~2% on code that allocates at every step) is what such code is under-counted by.
 * Only with that split (else no cycle). A run of 1: always in, no cycle. Frees are
 * untouched (a sampled block's free comes through the raw hook, always in place), so the live set
 * stays exact. How, without the C API (the sampler thread holds no GIL): PyMem_SetAllocator copies
 * the hooks into the interpreter's own PyMemAllocatorEx of each domain (a static of obmalloc.c, or
 * a field of _PyRuntime on 3.12+); after installing, that copy is found once in the interpreter's
 * writable data (the one place holding our hook's five words) and the sampler swaps its malloc,
 * calloc and realloc words between ours and the originals with compare-and-swap (each word a
 * valid allocator either way: a caller reading a mix calls a consistent pair, since the ctx and
 * free words never change). A value that is neither (tracemalloc or memray put its hooks in front
 * of ours) is left alone: cycling pauses, and samples count once each while what it captured
 * was ours in place (`foreign`). memory_enable/disable stop and restart the cycle under g_duty.
 * Threads: mw_memory_duty_tick, the sampler thread only; the rest GIL held. */
static int g_duty_run = 1; /* ticks per run, one of them with the hooks in (GIL held) */
static PyMemAllocatorEx *g_live_mem, *g_live_obj; /* the interpreter's copies, or NULL */
static atomic_int g_duty;                         /* lock: sampler tick vs enable/disable */
static int g_cycling;                             /* the sampler may flip (under g_duty) */
static int g_out;                                 /* the hooks are out (under g_duty) */
static int g_foreign;                             /* another hook in front of the copies */
static uint64_t g_duty_rng, g_duty_ticks, g_duty_in, g_duty_foreign;
static int g_duty_pos, g_duty_pick; /* the tick's place in its run, the run's tick in */

static void duty_lock(void) {
    while (atomic_exchange(&g_duty, 1))
        sched_yield();
}
static void duty_unlock(void) {
    atomic_store(&g_duty, 0);
}

/* The single 8-aligned place in the interpreter's writable file mappings holding hook's words. */
static PyMemAllocatorEx *find_live(const PyMemAllocatorEx *hook) {
    Dl_info info;
    if (!dladdr((void *)(uintptr_t)PyObject_Malloc, &info) || !info.dli_fname) return NULL;
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return NULL;
    char line[4096], exe[4096] = "";
    PyMemAllocatorEx *found = NULL;
    int n = 0;
    uintptr_t code = (uintptr_t)PyObject_Malloc;
    /* the path of the mapping holding PyObject_Malloc's code: its rw mappings hold the copies */
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char path[4096] = "";
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %4095s", &lo, &hi, path) >= 2 && code >= lo &&
            code < hi)
            snprintf(exe, sizeof exe, "%s", path);
    }
    rewind(f);
    while (exe[0] && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perms[8] = "", path[4096] = "";
        if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %4095s", &lo, &hi, perms, path) < 4 ||
            perms[0] != 'r' || perms[1] != 'w' || strcmp(path, exe) != 0)
            continue;
        const uintptr_t *w = (const uintptr_t *)hook, first = w[1]; /* its malloc word */
        for (uintptr_t a = lo; a + sizeof *hook <= hi; a += sizeof(void *)) {
            const uintptr_t *v = (const uintptr_t *)a;
            if (v[1] == first && v[0] == w[0] && v[2] == w[2] && v[3] == w[3] && v[4] == w[4]) {
                found = (PyMemAllocatorEx *)a;
                n++;
            }
        }
    }
    fclose(f);
    return n == 1 ? found : NULL;
}

/* Swaps one word of live from `from` to `to`. 0 done (or already there), -1 a foreign value. */
static int swap_word(void *word, const void *from, const void *to) {
    uintptr_t expect = (uintptr_t)from;
    if (__atomic_compare_exchange_n((uintptr_t *)word, &expect, (uintptr_t)to, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
        return 0;
    return expect == (uintptr_t)to ? 0 : -1;
}

/* Puts the hooks of one domain in (in = 1) or out. 0, or -1 when a foreign hook is in front. */
static int swap_domain(PyMemAllocatorEx *live, const PyMemAllocatorEx *hook,
                       const PyMemAllocatorEx *orig, int in) {
    const PyMemAllocatorEx *from = in ? orig : hook, *to = in ? hook : orig;
    if (swap_word(&live->malloc, (const void *)(uintptr_t)from->malloc,
                  (const void *)(uintptr_t)to->malloc) ||
        swap_word(&live->calloc, (const void *)(uintptr_t)from->calloc,
                  (const void *)(uintptr_t)to->calloc) ||
        swap_word(&live->realloc, (const void *)(uintptr_t)from->realloc,
                  (const void *)(uintptr_t)to->realloc))
        return -1;
    return 0;
}

/* Both domains in or out; keeps g_out, g_foreign and the weight in step. Under g_duty. */
static void duty_set(int in) {
    if (swap_domain(g_live_mem, &g_hook_mem, &g_orig_mem, in) == 0 &&
        swap_domain(g_live_obj, &g_hook_obj, &g_orig_obj, in) == 0) {
        g_foreign = 0;
        g_out = !in;
        atomic_store(&mw_memprof_weight, (double)g_duty_run);
        return;
    }
    /* Another tool's hook in front of ours, in one domain or both: ours in wherever they can
     * still be moved, and each sample counted once, until it is gone (what it captured, ours in
     * or out, stays as it was: its domain is seen in full or not at all meanwhile). */
    (void)swap_domain(g_live_mem, &g_hook_mem, &g_orig_mem, 1);
    (void)swap_domain(g_live_obj, &g_hook_obj, &g_orig_obj, 1);
    g_foreign = 1;
    g_out = 0;
    g_duty_foreign++;
    atomic_store(&mw_memprof_weight, 1.0);
}

void mw_memory_duty_tick(void) {
    if (atomic_exchange(&g_duty, 1)) return; /* enable/disable at work: this tick leaves it */
    if (g_cycling) {
        /* Stratified: one tick of each run of g_duty_run, at a random place in the run (each
         * tick is in with probability 1 / g_duty_run whatever its length, and the runs keep the
         * share of ticks in exact: independent draws made the totals of a few seconds vary by
         * +-9% with the count of ticks in) */
        if (g_duty_pos == 0) {
            g_duty_rng ^= g_duty_rng << 13;
            g_duty_rng ^= g_duty_rng >> 7;
            g_duty_rng ^= g_duty_rng << 17;
            g_duty_pick = (int)((g_duty_rng >> 33) % (uint64_t)g_duty_run);
        }
        int in = g_duty_pos == g_duty_pick;
        g_duty_pos = (g_duty_pos + 1) % g_duty_run;
        duty_set(in);
        g_duty_ticks++;
        g_duty_in += (uint64_t)(in && !g_foreign); /* ticks it chose to have them in */
    }
    duty_unlock();
}

/* Stops the cycle with the hooks in (when they are ours to move): the state enable/disable and
 * is_current() expect. GIL held. */
static void duty_stop(void) {
    duty_lock();
    if (g_cycling) {
        g_cycling = 0;
        if (g_out) duty_set(1);
        atomic_store(&mw_memprof_weight, 1.0);
    }
    duty_unlock();
}

static void duty_start(int run) {
    /* Only the delegated hooks with the large blocks in the raw domain cycle (wrapped hooks, as
     * MW_PROFILING_MEMORY_HOOKS=wrapped installs, have no live flags). */
    if (!g_live_mem || !g_live_obj || g_small_max == SIZE_MAX || run <= 1) return;
    duty_lock();
    g_duty_run = run;
    g_duty_pos = 0;
    g_cycling = 1;
    g_out = 0;
    g_foreign = 0;
    if (!g_duty_rng) g_duty_rng = ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid() ^ 1;
    atomic_store(&mw_memprof_weight, 1.0); /* in until the first tick draws */
    duty_unlock();
}

static void duty_after_fork_child(void) {
    atomic_store(&g_duty, 0); /* taken by the parent's sampler thread at the fork, maybe */
}

static void *map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static PyObject *py_memory_enable(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"rate_bytes", "duty_run", NULL};
    long long rate = 512 * 1024;
    int run = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|Li", kwlist, &rate, &run)) return NULL;
    if (rate < 1 || rate > (1LL << 40)) {
        PyErr_SetString(PyExc_ValueError, "rate_bytes must be within 1..2**40");
        return NULL;
    }
    if (run < 1 || run > 100) {
        PyErr_SetString(PyExc_ValueError, "duty_run must be within 1..100");
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
    duty_stop();
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
            const size_t m = PYMALLOC_SMALL_MAX;
            if (allocs_through_raw(&g_orig_mem, m + 1) && allocs_through_raw(&g_orig_obj, m + 1) &&
                !allocs_through_raw(&g_orig_mem, m) && !allocs_through_raw(&g_orig_obj, m))
                g_small_max = m; /* large blocks sampled in the raw domain (see above) */
        } else {
            g_hook_mem = (PyMemAllocatorEx){NULL, mem_malloc, mem_calloc, mem_realloc, mem_free};
            g_hook_obj = (PyMemAllocatorEx){NULL, obj_malloc, obj_calloc, obj_realloc, obj_free};
            g_installed = 1;
        }
        PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_hook_mem);
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_hook_obj);
        if (g_installed == 2) {
            g_live_mem = find_live(&g_hook_mem);
            g_live_obj = find_live(&g_hook_obj);
        }
    } else if (g_installed == 2 && !g_on_top && is_current(PYMEM_DOMAIN_MEM, &g_orig_mem) &&
               is_current(PYMEM_DOMAIN_OBJ, &g_orig_obj)) {
        PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_hook_mem);
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_hook_obj);
        g_on_top = 1;
    }
    if (g_installed == 2 && g_on_top) duty_start(run);
    Py_RETURN_NONE;
}

static PyObject *py_memory_disable(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    duty_stop();
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
        mw_dict_put_u64(d, "hooked", (uint64_t)(g_installed == 1 || g_on_top)) ||
        mw_dict_put_u64(d, "small_max", g_small_max == SIZE_MAX ? 0 : (uint64_t)g_small_max) ||
        mw_dict_put_u64(d, "duty_pct", g_cycling ? (uint64_t)(100 / g_duty_run) : 100) ||
        mw_dict_put_u64(d, "duty_ticks", g_duty_ticks) ||
        mw_dict_put_u64(d, "duty_in", g_duty_in) ||
        mw_dict_put_u64(d, "duty_foreign", g_duty_foreign)) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

PyMethodDef mw_memory_methods[] = {
    {"memory_enable", (PyCFunction)(void (*)(void))py_memory_enable, METH_VARARGS | METH_KEYWORDS,
     "memory_enable(rate_bytes=524288, duty_run=1): sample allocations, one per rate_bytes "
     "allocated on average while the hooks are in, which they are at one sampler tick of every "
     "duty_run (hooks the mem and obj allocator domains the first time)."},
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
        pthread_atfork(NULL, NULL, duty_after_fork_child);
        once = 1;
    }
    return 0;
}
