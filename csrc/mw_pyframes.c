/* mw_pyframes — per-version frame reading; see mw_pyframes.h for the contract.
 *
 * How a stack is read without the GIL:
 *   1. The main interpreter's address is recorded at start (GIL held).
 *   2. Each tick the thread list is followed through tstate->next, reading every PyThreadState
 *      with mw_safe_read into a local copy; a state whose interp field is not ours ends the walk
 *      (it was freed and reused under us).
 *   3. From the thread's newest frame, each frame struct is copied locally and its code object
 *      header too; a frame is accepted only if its code object's type is PyCode_Type and its
 *      instruction pointer falls inside the bytecode. Loops and runaway chains are capped.
 * The per-version differences (see the table in ARCHITECTURE.md) are confined to the small
 * #if blocks below.
 */
#define Py_BUILD_CORE 1
#include <Python.h>
/* The layouts below are those of CPython 3.10 to 3.13: another version must never be built
 * against the nearest of them (setup.py refuses it first, in one line). */
#if PY_VERSION_HEX < 0x030A0000 || PY_VERSION_HEX >= 0x030E0000
#error "middleware: csrc/mw_pyframes.c knows the internal layouts of CPython 3.10 to 3.13 only"
#endif
#if PY_VERSION_HEX < 0x030B0000
#include <frameobject.h>
#include <opcode.h> /* YIELD_FROM (at_await) */
#include "pycore_interp.h"
#include "pycore_runtime.h"
#else
#if PY_VERSION_HEX >= 0x030C0000 && PY_VERSION_HEX < 0x030D0000
#undef _PyGC_FINALIZED
#endif
#include "pycore_frame.h"
#include "pycore_interp.h"
#include "pycore_runtime.h"
#if PY_VERSION_HEX < 0x030D0000
#include "opcode.h" /* RESUME... (at_await) */
#endif
#endif

#include "mw_linetable.h"
#include "mw_pyframes.h"
#include "mw_saferead.h"

#include <pthread.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static PyInterpreterState *g_interp;
static struct _gil_runtime_state *g_gil; /* the main interpreter's GIL (NULL: no GIL build) */
#if PY_VERSION_HEX < 0x030B0000
/* 3.10 has no native_thread_id in PyThreadState: tstate->thread_id is the pthread_t, which in
 * glibc points at the thread descriptor holding the kernel tid. The tid's offset inside that
 * descriptor is found at start by scanning our own descriptor for our own tid. */
static long g_tid_offset = -1;
#endif

const char *mw_pyframes_version(void) {
#define MW_STR2(x) #x
#define MW_STR(x) MW_STR2(x)
    return MW_STR(PY_MAJOR_VERSION) "." MW_STR(PY_MINOR_VERSION);
}

int mw_pyframes_linetable_format(void) {
    return PY_VERSION_HEX < 0x030B0000 ? MW_LT_310 : MW_LT_311;
}

int mw_pyframes_init(void) {
    if (mw_saferead_init() != 0) {
        PyErr_SetString(PyExc_RuntimeError,
                        "middleware: process_vm_readv is not usable (seccomp or kernel policy)");
        return -1;
    }
    g_interp = PyInterpreterState_Main();
    if (g_interp == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "middleware: no main interpreter");
        return -1;
    }
#if defined(Py_GIL_DISABLED)
    g_gil = NULL;
#elif PY_VERSION_HEX >= 0x030C0000
    g_gil = g_interp->ceval.gil; /* set at interpreter start, never moves */
#else
    g_gil = &_PyRuntime.ceval.gil;
#endif
#if PY_VERSION_HEX < 0x030B0000
    pid_t tid = (pid_t)syscall(SYS_gettid);
    const char *self = (const char *)pthread_self();
    for (long off = 0; off < 2048; off += (long)sizeof(pid_t)) {
        pid_t v;
        if (mw_safe_read(self + off, sizeof v, &v) == 0 && v == tid) {
            g_tid_offset = off;
            break;
        }
    }
#endif
    return 0;
}

static long tid_of(const PyThreadState *ts) {
#if PY_VERSION_HEX >= 0x030B0000
    return (long)ts->native_thread_id;
#else
    pid_t tid = 0;
    if (g_tid_offset < 0 || ts->thread_id == 0) return 0;
    if (mw_safe_read((const char *)ts->thread_id + g_tid_offset, sizeof tid, &tid) != 0) return 0;
    return tid > 0 ? tid : 0;
#endif
}

static uintptr_t top_frame_of(const PyThreadState *ts) {
#if PY_VERSION_HEX >= 0x030D0000
    return (uintptr_t)ts->current_frame;
#elif PY_VERSION_HEX >= 0x030B0000
    _PyCFrame cf;
    if (ts->cframe == NULL || mw_safe_read(ts->cframe, sizeof cf, &cf) != 0) return 0;
    return (uintptr_t)cf.current_frame;
#else
    return (uintptr_t)ts->frame;
#endif
}

uintptr_t mw_pyframes_top_frame_anchored(uintptr_t tstate, uintptr_t *anchor) {
    PyThreadState *ts = (PyThreadState *)tstate;
    uintptr_t top = 0;
    *anchor = 0;
    if (!tstate) return 0;
#if PY_VERSION_HEX >= 0x030D0000
    if (mw_safe_read(&ts->current_frame, sizeof top, &top) != 0) return 0;
#elif PY_VERSION_HEX >= 0x030B0000
    /* The eval loop makes tstate->cframe point at its new C-stack cframe a few instructions
     * before it writes that cframe's current_frame: read in between, current_frame is whatever
     * the C stack held there. The frames of this eval call lead down to the previous cframe's
     * current_frame, so that frame is the anchor the walk must meet. */
    _PyCFrame *cf = NULL, c, p;
    if (mw_safe_read(&ts->cframe, sizeof cf, &cf) != 0 || !cf) return 0;
    if (mw_safe_read(cf, sizeof c, &c) != 0) return 0;
    top = (uintptr_t)c.current_frame;
    if (c.previous && mw_safe_read(c.previous, sizeof p, &p) == 0)
        *anchor = (uintptr_t)p.current_frame;
#else
    if (mw_safe_read(&ts->frame, sizeof top, &top) != 0) return 0;
#endif
    return top;
}

uintptr_t mw_pyframes_top_frame_of(mw_readcache_t *rc, uintptr_t tstate, long tid,
                                   uintptr_t *anchor, int *mine) {
    *anchor = 0;
    *mine = 0;
    if (!tstate) return 0;
    PyThreadState ts;
    if (mw_readcache_read_exact(rc, (void *)tstate, sizeof ts, &ts) != 0 || ts.interp != g_interp)
        return 0;
#if PY_VERSION_HEX >= 0x030B0000
    if ((long)ts.native_thread_id != tid) return 0;
    *mine = 1;
    /* One system call for what the walk reads next: the C-stack frames (3.11/3.12: the current
     * cframe and, mostly close above it, the previous one) and the top of the data stack, where
     * the newest frames are, down to the start of its chunk or 4 pages. */
    uintptr_t pages[12];
    unsigned n = 0;
#if PY_VERSION_HEX < 0x030D0000
    if (ts.cframe) {
        pages[n++] = (uintptr_t)ts.cframe;
        pages[n++] = (uintptr_t)ts.cframe + MW_PAGE_SIZE;
    }
#endif
    uintptr_t top = (uintptr_t)ts.datastack_top, lo = (uintptr_t)ts.datastack_chunk;
    if (top && lo && top > lo) {
        for (uintptr_t p = top - 1; n < 8 && p >= lo && p + 4 * MW_PAGE_SIZE >= top;
             p -= MW_PAGE_SIZE)
            pages[n++] = p;
    }
    mw_readcache_prefetch(rc, pages, n);
#if PY_VERSION_HEX >= 0x030D0000
    return (uintptr_t)ts.current_frame;
#else
    _PyCFrame c, p;
    if (!ts.cframe || mw_readcache_read(rc, ts.cframe, sizeof c, &c, 0) != 0) return 0;
    if (c.previous && mw_readcache_read(rc, c.previous, sizeof p, &p, 0) == 0)
        *anchor = (uintptr_t)p.current_frame;
    return (uintptr_t)c.current_frame;
#endif
#else
    (void)tid;
    (void)rc;
    *mine = 1;
    return (uintptr_t)ts.frame;
#endif
}

uintptr_t mw_pyframes_find_own(mw_readcache_t *rc, long tid) {
    uintptr_t cur = mw_pyframes_threads_head();
    for (int hops = 0; cur && hops < MW_FIND_OWN_HOPS; hops++) {
        PyThreadState ts;
        if (mw_readcache_read_exact(rc, (void *)cur, sizeof ts, &ts) != 0 || ts.interp != g_interp)
            return 0;
        if (tid_of(&ts) == tid && top_frame_of(&ts)) return cur;
        cur = (uintptr_t)ts.next;
    }
    return 0;
}

uintptr_t mw_pyframes_threads_head(void) {
    uintptr_t head = 0;
    if (g_interp == NULL) return 0;
#if PY_VERSION_HEX >= 0x030B0000
    if (mw_safe_read(&g_interp->threads.head, sizeof head, &head) != 0) return 0;
#else
    if (mw_safe_read(&g_interp->tstate_head, sizeof head, &head) != 0) return 0;
#endif
    return head;
}

int mw_pyframes_listed(uintptr_t tstate, long tid) {
    PyThreadState ts;
    uintptr_t back = 0;
    if (!tstate || g_interp == NULL || mw_safe_read((void *)tstate, sizeof ts, &ts) != 0 ||
        ts.interp != g_interp || tid_of(&ts) != tid)
        return 0;
    if (ts.prev == NULL)
        back = mw_pyframes_threads_head();
    else if (mw_safe_read(&ts.prev->next, sizeof back, &back) != 0)
        return 0;
    if (back != tstate) return 0;
    if (ts.next && (mw_safe_read(&ts.next->prev, sizeof back, &back) != 0 || back != tstate))
        return 0;
    return 1;
}

/* The set of thread states met in one list walk (a cycle means the list changed under us).
 * Sampler thread only. */
#define SEEN_SLOTS (2 * MW_MAX_THREADS)
static uintptr_t g_seen[SEEN_SLOTS];
static uint32_t g_seen_stamp[SEEN_SLOTS], g_seen_now;

static int seen_before(uintptr_t p) {
    uint32_t h = (uint32_t)((p >> 4) * 2654435761u) & (SEEN_SLOTS - 1);
    for (;; h = (h + 1) & (SEEN_SLOTS - 1)) {
        if (g_seen_stamp[h] != g_seen_now) {
            g_seen_stamp[h] = g_seen_now;
            g_seen[h] = p;
            return 0;
        }
        if (g_seen[h] == p) return 1;
    }
}

int mw_pyframes_threads(mw_readcache_t *rc, mw_pythread_t *out, int max) {
    if (++g_seen_now == 0) {
        memset(g_seen_stamp, 0, sizeof g_seen_stamp);
        g_seen_now = 1;
    }
    if (g_interp == NULL) return -1;
    uintptr_t head = mw_pyframes_threads_head();
    if (!head) return -1;
    mw_readcache_reset(rc);
    int n = 0;
    uintptr_t cur = head;
    while (cur && n < max) {
        PyThreadState ts;
        /* Thread states are malloc'd one after the other: older ones mostly sit lower. */
        if (mw_readcache_read(rc, (void *)cur, sizeof ts, &ts, 3) != 0) return n ? n : -1;
        if (ts.interp != g_interp) return n ? n : -1;
        if (seen_before(cur)) return n; /* cycle: list changed under us */
        out[n].tstate = cur;
        out[n].tid = tid_of(&ts);
        out[n].top_frame = top_frame_of(&ts);
        out[n].uid = (uint64_t)ts.id;
        n++;
        cur = (uintptr_t)ts.next;
    }
    return n;
}

/* Size of the code-object prefix we copy: everything before the bytecode. */
#if PY_VERSION_HEX >= 0x030B0000
#define MW_CODE_HEAD offsetof(PyCodeObject, co_code_adaptive)
#else
#define MW_CODE_HEAD sizeof(PyCodeObject)
#endif

static int read_code_head(mw_readcache_t *rc, uintptr_t addr, PyCodeObject *co) {
    if (addr == 0 || (addr & (sizeof(void *) - 1))) return -1;
    if (rc ? mw_readcache_read(rc, (void *)addr, MW_CODE_HEAD, co, 0) != 0
           : mw_safe_read((void *)addr, MW_CODE_HEAD, co) != 0)
        return -1;
    if (Py_TYPE((PyObject *)co) != &PyCode_Type) return -1;
    return 0;
}

static void code_info(const PyCodeObject *co, mw_pycode_t *out) {
#if PY_VERSION_HEX >= 0x030B0000
    out->qualname = (uintptr_t)co->co_qualname;
#else
    out->qualname = (uintptr_t)co->co_name;
#endif
    out->filename = (uintptr_t)co->co_filename;
    out->linetable = (uintptr_t)co->co_linetable;
    out->firstlineno = co->co_firstlineno;
#if PY_VERSION_HEX >= 0x030C0000
    out->version = co->co_version;
#else
    out->version = 0;
#endif
}

#if PY_VERSION_HEX >= 0x030B0000
/* 3.11+: two passes. The first follows `previous` through the frames (contiguous in the thread's
 * data stack, so the read cache serves most of them from one or two page reads) and notes each
 * frame's code object. The second reads the heads of all distinct code objects in ONE
 * process_vm_readv, then validates every frame against its code object. The scratch arrays are
 * the caller's (mw_walkscratch_t), or the sampler thread's own. */
#define MW_WALK_CODES 512
#define MW_WALK_FRAMES 4096
typedef struct {
    uintptr_t code;
    const _Py_CODEUNIT *ip;
    char owner;
    uint8_t entry; /* mw_rawframe_t.eval_entry */
} pending_t;
struct mw_walkscratch {
    pending_t pending[MW_WALK_FRAMES];
    int idx_of[MW_WALK_FRAMES];
    uintptr_t ucode[MW_WALK_CODES];
    PyCodeObject uhead[MW_WALK_CODES];
    int8_t uok[MW_WALK_CODES];
    uint32_t uslot_stamp[2 * MW_WALK_CODES], stamp;
    uint16_t uslot_idx[2 * MW_WALK_CODES];
    struct iovec l[MW_WALK_CODES], r[MW_WALK_CODES];
};
static mw_walkscratch_t g_scratch; /* the sampler thread's (ws == NULL) */

/* Index of code in the distinct-code table, adding it; -1 when the table is full. */
static int ucode_index(mw_walkscratch_t *w, uintptr_t code, int *nu) {
    uint32_t h = (uint32_t)((code >> 4) * 2654435761u) & (2 * MW_WALK_CODES - 1);
    for (;; h = (h + 1) & (2 * MW_WALK_CODES - 1)) {
        if (w->uslot_stamp[h] != w->stamp) {
            if (*nu >= MW_WALK_CODES) return -1;
            w->uslot_stamp[h] = w->stamp;
            w->uslot_idx[h] = (uint16_t)*nu;
            w->ucode[*nu] = code;
            return (*nu)++;
        }
        if (w->ucode[w->uslot_idx[h]] == code) return w->uslot_idx[h];
    }
}

int mw_pyframes_walk_gen(mw_readcache_t *rc, mw_walkscratch_t *ws, uintptr_t frame,
                         uintptr_t anchor, mw_rawframe_t *out, int max, int *truncated,
                         mw_outergen_t *og) {
    mw_walkscratch_t *w = ws ? ws : &g_scratch;
    pending_t *g_pending = w->pending;
    int np = 0, steps = 0, met = anchor == 0, gen_at = -1;
    uintptr_t gen = 0;
    char last_owner = 0;
    *truncated = 0;
    if (og) {
        og->gen = 0;
        og->idx = -1;
        og->task = 0;
    }
    if (max > MW_WALK_FRAMES) max = MW_WALK_FRAMES;
    /* Pass 1: the frame chain. */
    while (frame) {
        if (np >= max || ++steps > 4 * max || (frame & (sizeof(void *) - 1))) {
            *truncated = 1;
            break;
        }
        _PyInterpreterFrame f;
        /* localsplus is a flexible tail we do not need. */
        if (mw_readcache_read(rc, (void *)frame, offsetof(_PyInterpreterFrame, localsplus), &f,
                              1) != 0) {
            *truncated = 1;
            break;
        }
        if (frame == anchor) met = 1;
        last_owner = f.owner;
        if (f.owner == FRAME_OWNED_BY_GENERATOR) { /* the frame is inside the object */
            gen_at = np;
            gen = frame - offsetof(PyGenObject, gi_iframe);
        }
        frame = (uintptr_t)f.previous;
#if PY_VERSION_HEX >= 0x030D0000
        if (f.owner >= FRAME_OWNED_BY_CSTACK) {
            if (np && g_pending[np - 1].entry < 255) g_pending[np - 1].entry++;
            continue;
        }
        g_pending[np].code = (uintptr_t)f.f_executable;
        g_pending[np].ip = f.instr_ptr;
        g_pending[np].entry = 0;
#else
#if PY_VERSION_HEX >= 0x030C0000
        if (f.owner == FRAME_OWNED_BY_CSTACK) {
            if (np && g_pending[np - 1].entry < 255) g_pending[np - 1].entry++;
            continue;
        }
        g_pending[np].entry = 0;
#else
        uint8_t is_entry; /* a byte, not a bool: a torn copy may hold any value */
        memcpy(&is_entry, &f.is_entry, 1);
        g_pending[np].entry = is_entry != 0;
#endif
        g_pending[np].code = (uintptr_t)f.f_code;
        g_pending[np].ip = f.prev_instr;
#endif
        g_pending[np].owner = f.owner;
        np++;
    }
    /* A chain that never met the previous eval call's frame, or that ends in a suspended
     * generator's frame (something must be running a generator that is on a stack), was read
     * while the eval loop was between two stores: not a stack the thread had. */
    if (!*truncated && (!met || (np && last_owner == FRAME_OWNED_BY_GENERATOR))) {
        *truncated = 2;
        return 0;
    }
    /* Pass 2: the heads of the distinct code objects, in one system call where possible. */
    w->stamp++;
    int nu = 0;
    int *idx_of = w->idx_of;
    for (int i = 0; i < np; i++)
        idx_of[i] = ucode_index(w, g_pending[i].code, &nu);
    struct iovec *l = w->l, *r = w->r;
    for (int u = 0; u < nu; u++) {
        l[u].iov_base = &w->uhead[u];
        l[u].iov_len = MW_CODE_HEAD;
        r[u].iov_base = (void *)w->ucode[u];
        r[u].iov_len = MW_CODE_HEAD;
        w->uok[u] = 0;
    }
    for (int start = 0; start < nu;) {
        int got = mw_readcache_readv(rc, l + start, r + start, nu - start);
        for (int k = start; k < start + got; k++)
            w->uok[k] = Py_TYPE((PyObject *)&w->uhead[k]) == &PyCode_Type &&
                        !(w->ucode[k] & (sizeof(void *) - 1));
        start += got + 1; /* skip the unreadable one */
    }
    /* Pass 3: validate each frame against its code object. */
    int n = 0;
    for (int i = 0; i < np; i++) {
        PyCodeObject tmp, *co;
        int u = idx_of[i];
        if (u >= 0) {
            co = w->uok[u] ? &w->uhead[u] : NULL;
        } else {
            co = read_code_head(rc, g_pending[i].code, &tmp) == 0 ? &tmp : NULL;
        }
        if (!co) {
#if PY_VERSION_HEX >= 0x030D0000
            if (n) out[n - 1].eval_entry += g_pending[i].entry; /* keep the call boundary */
            continue; /* 3.13: f_executable may legitimately be a non-code object */
#else
            *truncated = 1;
            break;
#endif
        }
        const _Py_CODEUNIT *start = (const _Py_CODEUNIT *)(g_pending[i].code + MW_CODE_HEAD);
        long idx = (long)(g_pending[i].ip - start);
        long size = (long)Py_SIZE((PyObject *)co);
        if (idx < -1 || idx >= size) {
            *truncated = 1;
            break;
        }
        /* Frames that have not reached their first traceable instruction are incomplete
         * (being set up): CPython hides them, so do we. */
        if (g_pending[i].owner != FRAME_OWNED_BY_GENERATOR && idx < co->_co_firsttraceable) {
            if (n) out[n - 1].eval_entry += g_pending[i].entry; /* keep the call boundary */
            continue;
        }
        out[n].code = g_pending[i].code;
        out[n].lasti = (int32_t)idx;
        out[n].eval_entry = g_pending[i].entry;
        code_info(co, &out[n].info);
        if (og && i == gen_at) {
            og->gen = gen;
            og->idx = n;
        }
        n++;
    }
    return n;
}
#else
struct mw_walkscratch {
    int unused;
};
int mw_pyframes_walk_gen(mw_readcache_t *rc, mw_walkscratch_t *ws, uintptr_t frame,
                         uintptr_t anchor, mw_rawframe_t *out, int max, int *truncated,
                         mw_outergen_t *og) {
    (void)anchor; /* 3.10: tstate->frame is written in one store */
    (void)ws;
    int n = 0, steps = 0;
    *truncated = 0;
    if (og) {
        og->gen = 0;
        og->idx = -1;
        og->task = 0;
    }
    while (frame) {
        if (n >= max || ++steps > 4 * max || (frame & (sizeof(void *) - 1))) {
            *truncated = 1;
            break;
        }
        PyFrameObject f;
        if (mw_readcache_read(rc, (void *)frame, sizeof f, &f, 0) != 0) {
            *truncated = 1;
            break;
        }
        PyCodeObject co;
        if (read_code_head(rc, (uintptr_t)f.f_code, &co) != 0) {
            *truncated = 1;
            break;
        }
        out[n].code = (uintptr_t)f.f_code;
        out[n].lasti = f.f_lasti;
        out[n].eval_entry = 1; /* 3.10: one C-level eval call per frame */
        code_info(&co, &out[n].info);
        if (og && f.f_gen) {
            og->gen = (uintptr_t)f.f_gen;
            og->idx = n;
        }
        n++;
        frame = (uintptr_t)f.f_back;
    }
    return n;
}
#endif

int mw_pyframes_walk(mw_readcache_t *rc, mw_walkscratch_t *ws, uintptr_t top_frame,
                     uintptr_t anchor, mw_rawframe_t *out, int max, int *truncated) {
    return mw_pyframes_walk_gen(rc, ws, top_frame, anchor, out, max, truncated, NULL);
}

static int rd(mw_readcache_t *rc, const void *addr, size_t len, void *dst) {
    return rc ? mw_readcache_read_exact(rc, addr, len, dst) : mw_safe_read(addr, len, dst);
}

uintptr_t mw_pyframes_type_of(mw_readcache_t *rc, uintptr_t obj) {
    PyObject o;
    if (!obj || (obj & (sizeof(void *) - 1)) || rd(rc, (void *)obj, sizeof o, &o) != 0) return 0;
    return (uintptr_t)Py_TYPE(&o);
}

int mw_pyframes_code_frame(mw_readcache_t *rc, uintptr_t code, int32_t lasti, mw_rawframe_t *out) {
    PyCodeObject co;
    if (read_code_head(rc, code, &co) != 0) return -1;
#if PY_VERSION_HEX >= 0x030B0000
    if (lasti < -1 || lasti >= (int32_t)Py_SIZE((PyObject *)&co)) return -1;
#else
    if (lasti < -1) return -1; /* 3.10: the bytecode is a separate object (a walk checks no more) */
#endif
    out->code = code;
    out->lasti = lasti;
    out->eval_entry = 0;
    code_info(&co, &out->info);
    return 0;
}

#if PY_VERSION_HEX < 0x030B0000
/* CPython's own test (_PyGen_yf, 3.10): a suspended generator is in a `yield from` (an await)
 * when its next instruction is YIELD_FROM; then the top of its value stack is what it awaits. */
static int at_await(mw_readcache_t *rc, uintptr_t code, int lasti) {
    uintptr_t bytes;
    uint8_t op;
    if (lasti < 0 ||
        rd(rc, (const char *)code + offsetof(PyCodeObject, co_code), sizeof bytes, &bytes) != 0 ||
        !bytes ||
        rd(rc, (const char *)bytes + offsetof(PyBytesObject, ob_sval) + (size_t)(lasti + 1) * 2, 1,
           &op) != 0)
        return 0;
    return op == YIELD_FROM;
}
#elif PY_VERSION_HEX < 0x030D0000
/* CPython's own test (_PyGen_yf, 3.11/3.12): a suspended generator is in a `yield from` (an
 * await) when the instruction after its last one is a RESUME with an argument of 2 or more; then
 * the top of its value stack is what it awaits. (3.13 says so in the generator's state.) */
static int at_await(mw_readcache_t *rc, const _Py_CODEUNIT *prev_instr) {
    _Py_CODEUNIT next;
    if (rd(rc, prev_instr + 1, sizeof next, &next) != 0) return 0;
    int op = _Py_OPCODE(next), arg = _Py_OPARG(next);
#if PY_VERSION_HEX >= 0x030C0000
    return (op == RESUME || op == INSTRUMENTED_RESUME) && arg >= 2;
#else
    return (op == RESUME || op == RESUME_QUICK) && arg >= 2;
#endif
}
#endif

#if PY_VERSION_HEX >= 0x030B0000
/* What mw_pyframes_coro and its peek share, 3.11+: the generator's state and its frame, read
 * together (the frame is inside the object, gi_iframe, after its head; its fixed part, up to
 * the locals, into *f). Returns the MW_CORO_* state; for SUSPENDED and CREATED also the code
 * object (*code), the instruction pointer (*ip) and whether it is suspended at an await, a
 * `yield from` (*at: the top of its value stack is what it awaits). */
static int gen_read(mw_readcache_t *rc, uintptr_t gen, _PyInterpreterFrame *f, uintptr_t *code,
                    const _Py_CODEUNIT **ip, int *at) {
    size_t head = offsetof(PyGenObject, gi_iframe);
    uint8_t buf[offsetof(PyGenObject, gi_iframe) + offsetof(_PyInterpreterFrame, localsplus)];
    if (rd(rc, (void *)gen, sizeof buf, buf) != 0) return MW_CORO_UNREADABLE;
    PyGenObject g;
    memcpy(&g, buf, head);
    if (Py_TYPE((PyObject *)&g) != &PyCoro_Type && Py_TYPE((PyObject *)&g) != &PyGen_Type)
        return MW_CORO_UNREADABLE;
    int8_t state = g.gi_frame_state;
    if (state == FRAME_EXECUTING) return MW_CORO_RUNNING;
    if (state > FRAME_EXECUTING) return MW_CORO_DONE;
    memcpy(f, buf + head, offsetof(_PyInterpreterFrame, localsplus));
#if PY_VERSION_HEX >= 0x030D0000
    *code = (uintptr_t)f->f_executable;
    *ip = f->instr_ptr;
#else
    *code = (uintptr_t)f->f_code;
    *ip = f->prev_instr;
#endif
    if (state == FRAME_CREATED) return MW_CORO_CREATED;
#if PY_VERSION_HEX >= 0x030D0000
    *at = state == FRAME_SUSPENDED_YIELD_FROM;
#else
    *at = at_await(rc, *ip);
#endif
    return MW_CORO_SUSPENDED;
}

/* The top of the value stack of the frame inside gen (depth `top`), or 0 when unreadable. */
static uintptr_t gen_stack_top(mw_readcache_t *rc, uintptr_t gen, int top) {
    uintptr_t tos = 0;
    if (rd(rc,
           (const char *)gen + offsetof(PyGenObject, gi_iframe) +
               offsetof(_PyInterpreterFrame, localsplus) + (size_t)(top - 1) * sizeof(PyObject *),
           sizeof tos, &tos) != 0)
        return 0;
    return tos;
}
#endif

int mw_pyframes_coro_peek(mw_readcache_t *rc, uintptr_t gen, uintptr_t *code, int32_t *lasti,
                          uintptr_t *awaited) {
    *awaited = *code = 0;
    *lasti = -1;
    if (!gen || (gen & (sizeof(void *) - 1))) return MW_CORO_UNREADABLE;
#if PY_VERSION_HEX >= 0x030B0000
    _PyInterpreterFrame f;
    const _Py_CODEUNIT *ip = NULL;
    int at = 0, state = gen_read(rc, gen, &f, code, &ip, &at);
    if (state == MW_CORO_SUSPENDED || state == MW_CORO_CREATED)
        *lasti = (int32_t)(ip - (const _Py_CODEUNIT *)(*code + MW_CODE_HEAD));
    if (at && f.stacktop > 0 && f.stacktop < (1 << 20))
        *awaited = gen_stack_top(rc, gen, f.stacktop);
    return state;
#else
    PyGenObject g;
    if (rd(rc, (void *)gen, sizeof g, &g) != 0) return MW_CORO_UNREADABLE;
    if (Py_TYPE((PyObject *)&g) != &PyCoro_Type && Py_TYPE((PyObject *)&g) != &PyGen_Type)
        return MW_CORO_UNREADABLE;
    if (!g.gi_frame) return MW_CORO_DONE;
    PyFrameObject f;
    if (rd(rc, (void *)g.gi_frame, sizeof f, &f) != 0) return MW_CORO_UNREADABLE;
    if (f.f_state == FRAME_EXECUTING) return MW_CORO_RUNNING;
    if (f.f_state > FRAME_EXECUTING) return MW_CORO_DONE;
    *code = (uintptr_t)f.f_code;
    *lasti = f.f_lasti;
    if (f.f_state == FRAME_CREATED) return MW_CORO_CREATED;
    if (!at_await(rc, *code, f.f_lasti)) return MW_CORO_SUSPENDED;
    if (f.f_stackdepth > 0 && f.f_stackdepth < (1 << 20))
        (void)rd(rc, f.f_valuestack + f.f_stackdepth - 1, sizeof *awaited, awaited);
    return MW_CORO_SUSPENDED;
#endif
}

int mw_pyframes_coro_local0(mw_readcache_t *rc, uintptr_t gen, uintptr_t *out) {
    *out = 0;
    if (!gen || (gen & (sizeof(void *) - 1))) return -1;
#if PY_VERSION_HEX >= 0x030B0000
    return rd(rc,
              (const char *)gen + offsetof(PyGenObject, gi_iframe) +
                  offsetof(_PyInterpreterFrame, localsplus),
              sizeof *out, out);
#else
    (void)rc;
    return -1;
#endif
}

int mw_pyframes_coro(mw_readcache_t *rc, uintptr_t gen, mw_rawframe_t *out, uintptr_t *awaited) {
    *awaited = 0;
    if (!gen || (gen & (sizeof(void *) - 1))) return MW_CORO_UNREADABLE;
#if PY_VERSION_HEX >= 0x030B0000
    _PyInterpreterFrame f;
    uintptr_t code = 0;
    const _Py_CODEUNIT *ip = NULL;
    int at = 0, state = gen_read(rc, gen, &f, &code, &ip, &at);
    if (state != MW_CORO_SUSPENDED && state != MW_CORO_CREATED) return state;
    PyCodeObject co;
    if (read_code_head(rc, code, &co) != 0) return MW_CORO_UNREADABLE;
    long idx = (long)(ip - (const _Py_CODEUNIT *)(code + MW_CODE_HEAD));
    if (idx < -1 || idx >= (long)Py_SIZE((PyObject *)&co)) return MW_CORO_UNREADABLE;
    out->code = code;
    out->lasti = (int32_t)idx;
    out->eval_entry = 0;
    code_info(&co, &out->info);
    /* At an await: what it awaits is the top of its value stack, within the code's bounds. */
    int top = f.stacktop;
    if (at && top > co.co_nlocalsplus && top <= co.co_nlocalsplus + co.co_stacksize)
        *awaited = gen_stack_top(rc, gen, top);
    return state;
#else
    uintptr_t code;
    int32_t lasti;
    int state = mw_pyframes_coro_peek(rc, gen, &code, &lasti, awaited);
    if (state != MW_CORO_SUSPENDED && state != MW_CORO_CREATED) return state;
    if (mw_pyframes_code_frame(rc, code, lasti, out) != 0) {
        *awaited = 0;
        return MW_CORO_UNREADABLE;
    }
    return state;
#endif
}

int mw_pyframes_read_str_rc(mw_readcache_t *rc, uintptr_t str, char *buf, size_t cap) {
    PyASCIIObject a;
    if (cap == 0 || str == 0 || rd(rc, (void *)str, sizeof a, &a) != 0) return -1;
    if (Py_TYPE((PyObject *)&a) != &PyUnicode_Type || !a.state.compact) return -1;
    Py_ssize_t len = a.length;
    if (len < 0 || len > (1 << 20)) return -1;
    int kind = a.state.kind;
    const char *data = (const char *)str +
                       (a.state.ascii ? sizeof(PyASCIIObject) : sizeof(PyCompactUnicodeObject));
    if (a.state.ascii) {
        size_t n = (size_t)len < cap - 1 ? (size_t)len : cap - 1;
        if (rd(rc, data, n, buf) != 0) return -1;
        buf[n] = '\0';
        return (int)n;
    }
    /* Non-ASCII: copy code points (kind = 1, 2 or 4 bytes each) and encode as UTF-8. */
    uint8_t raw[1024];
    size_t count = (size_t)len;
    if (count * (size_t)kind > sizeof raw) count = sizeof raw / (size_t)kind;
    if (kind != 1 && kind != 2 && kind != 4) return -1;
    if (rd(rc, data, count * (size_t)kind, raw) != 0) return -1;
    size_t o = 0;
    for (size_t i = 0; i < count; i++) {
        uint32_t c = kind == 1 ? raw[i] : kind == 2 ? ((uint16_t *)raw)[i] : ((uint32_t *)raw)[i];
        char tmp[4];
        size_t k = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
        for (size_t j = k - 1; j > 0; j--, c >>= 6) /* continuation bytes, last first */
            tmp[j] = (char)(0x80 | (c & 63));
        static const uint8_t lead[5] = {0, 0, 0xC0, 0xE0, 0xF0}; /* by length */
        tmp[0] = (char)(lead[k] | c);
        if (o + k >= cap) break;
        memcpy(buf + o, tmp, k);
        o += k;
    }
    buf[o] = '\0';
    return (int)o;
}

int mw_pyframes_read_bytes_rc(mw_readcache_t *rc, uintptr_t bytes, uint8_t *buf, size_t cap) {
    PyBytesObject b;
    size_t head = offsetof(PyBytesObject, ob_sval);
    if (bytes == 0 || rd(rc, (void *)bytes, head, &b) != 0) return -1;
    if (Py_TYPE((PyObject *)&b) != &PyBytes_Type) return -1;
    Py_ssize_t len = Py_SIZE((PyObject *)&b);
    if (len < 0 || (size_t)len > cap) return -1;
    if (rd(rc, (const char *)bytes + head, (size_t)len, buf) != 0) return -1;
    return (int)len;
}

void mw_pyframes_gil(mw_gilstate_t *out) {
    out->ok = 0;
    if (!g_gil) return;
    struct _gil_runtime_state g;
    /* last_holder and switch_number sit next to each other at the head of the struct. */
    size_t len = offsetof(struct _gil_runtime_state, switch_number) + sizeof g.switch_number;
    if (mw_safe_read(g_gil, len, &g) != 0) return;
    uintptr_t holder;
    int locked;
    memcpy(&holder, &g.last_holder, sizeof holder); /* _Py_atomic_address or a plain pointer */
    memcpy(&locked, &g.locked, sizeof locked);      /* _Py_atomic_int or a plain int */
    out->locked = locked == 1;
    out->last_holder = holder;
    out->switch_number = g.switch_number;
    out->ok = 1;
}

int mw_pyframes_finalizing(void) {
    /* A plain load: _PyRuntime is a static of the interpreter we are linked into, mapped for
     * the life of the process (a guarded or process_vm_readv read here cost a system call at
     * every tick, ~13% of the sampler thread's CPU with 4 busy threads). Whatever atomic type
     * wraps the field, its first word is the pointer. */
    uintptr_t v;
    __atomic_signal_fence(__ATOMIC_SEQ_CST); /* read it anew at every call */
    memcpy(&v, (const void *)&_PyRuntime._finalizing, sizeof v);
    return v != 0;
}

size_t mw_walkscratch_size(void) {
    return sizeof(mw_walkscratch_t);
}
