/* mw_tasks — asyncio tasks read without the GIL; see mw_tasks.h for the contract.
 *
 * Compiled with Py_BUILD_CORE (as mw_pyframes.c) for the layouts of PyContext and the HAMT
 * object; the HAMT's node layouts are private to Python/hamt.c and the same from 3.10 to 3.13:
 * mirrored below, their types recognised by the addresses found at set-up.
 */
#define Py_BUILD_CORE 1
#include <Python.h>
#if PY_VERSION_HEX >= 0x030C0000 && PY_VERSION_HEX < 0x030D0000
#undef _PyGC_FINALIZED
#endif
#include "pycore_context.h"
#include "pycore_hamt.h"
#if PY_VERSION_HEX >= 0x030B0000
#include "pycore_dict.h"
#endif

#include "mw_tasks.h"
#include "mw_task_loops.h"

#include <pthread.h>
#include <string.h>

typedef struct {
    PyObject_VAR_HEAD uint32_t b_bitmap;
    PyObject *b_array[1]; /* key, value-or-node pairs: 2 * popcount(b_bitmap) */
} hamt_bitmap_t;
typedef struct {
    PyObject_HEAD PyObject *a_array[32];
    Py_ssize_t a_count;
} hamt_array_t;
typedef struct {
    PyObject_VAR_HEAD int32_t c_hash;
    PyObject *c_array[1]; /* key, value pairs: Py_SIZE entries */
} hamt_collision_t;

static mw_tasks_config_t g_cfg;
static int g_ready;
static mw_tasks_stats_t g_stats;

int mw_tasks_setup(const mw_tasks_config_t *cfg) {
    if (__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE)) return 1;
    g_cfg = *cfg;
    __atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
    return 0;
}

int mw_tasks_ready(void) {
    return __atomic_load_n(&g_ready, __ATOMIC_ACQUIRE);
}

/* ---- label values ------------------------------------------------------------------------ */

/* Two ways per slot; an entry is (key << 32 | lid) with key = (a >> LV_BITS) + 1, a = obj >> 4:
 * the slot index and the key together give back a (the slot index mixes in the key), so a hit
 * is exact. Objects above 2^51 (five-level page tables) are not registered: a miss. */
#define LV_BITS 14
#define LV_SLOTS (1u << LV_BITS)
static uint64_t g_lv[LV_SLOTS][2];

static int lv_where(uintptr_t obj, uint32_t *slot, uint64_t *key) {
    uint64_t a = (uint64_t)obj >> 4, hi = a >> LV_BITS;
    if (!obj || hi + 1 >= (1ull << 32)) return -1;
    *slot = ((uint32_t)a ^ (uint32_t)(hi * 2654435761u)) & (LV_SLOTS - 1);
    *key = hi + 1;
    return 0;
}

void mw_tasks_label_value(uintptr_t obj, uint32_t lid) {
    uint32_t s;
    uint64_t key;
    if (lv_where(obj, &s, &key) != 0) return;
    uint64_t e = key << 32 | lid;
    uint64_t w0 = __atomic_load_n(&g_lv[s][0], __ATOMIC_RELAXED);
    uint64_t w1 = __atomic_load_n(&g_lv[s][1], __ATOMIC_RELAXED);
    if (w0 >> 32 == key) {
        if (w0 != e) __atomic_store_n(&g_lv[s][0], e, __ATOMIC_RELAXED);
    } else if (w1 >> 32 == key) {
        if (w1 != e) __atomic_store_n(&g_lv[s][1], e, __ATOMIC_RELAXED);
    } else {
        __atomic_store_n(&g_lv[s][1], w0, __ATOMIC_RELAXED);
        __atomic_store_n(&g_lv[s][0], e, __ATOMIC_RELAXED);
    }
}

static int lv_lookup(uintptr_t obj, uint32_t *lid) {
    uint32_t s;
    uint64_t key;
    if (lv_where(obj, &s, &key) != 0) return -1;
    for (int w = 0; w < 2; w++) {
        uint64_t e = __atomic_load_n(&g_lv[s][w], __ATOMIC_RELAXED);
        if (e >> 32 == key) {
            *lid = (uint32_t)e;
            return 0;
        }
    }
    return -1;
}

/* ---- reading ----------------------------------------------------------------------------- */

static int rd(mw_readcache_t *rc, uintptr_t addr, size_t len, void *dst) {
    if (!addr || (addr & (sizeof(void *) - 1))) return -1;
    return mw_readcache_read_exact(rc, (const void *)addr, len, dst);
}

static int rd_ptr(mw_readcache_t *rc, uintptr_t addr, uintptr_t *out) {
    return rd(rc, addr, sizeof *out, out);
}

/* The value of the labels' variable in context ctx: 0 and *value = 0 when it is not set there;
 * -1 when unreadable. */
static int context_value(mw_readcache_t *rc, uintptr_t ctx, uintptr_t *value) {
    *value = 0;
    PyContext c;
    if (rd(rc, ctx, offsetof(PyContext, ctx_weakreflist), &c) != 0) return -1;
    if ((uintptr_t)Py_TYPE((PyObject *)&c) != (uintptr_t)&PyContext_Type) return -1;
    PyHamtObject h;
    if (rd(rc, (uintptr_t)c.ctx_vars, sizeof h, &h) != 0) return -1;
    uintptr_t node = (uintptr_t)h.h_root;
    uint32_t hash = (uint32_t)g_cfg.labels_hash;
    for (unsigned shift = 0; shift < 35 && node; shift += 5) {
        uintptr_t type = mw_pyframes_type_of(rc, node);
        uint32_t idx = (hash >> shift) & 0x1f;
        if (type && type == g_cfg.hamt_bitmap_type) {
            hamt_bitmap_t b;
            if (rd(rc, node, offsetof(hamt_bitmap_t, b_array), &b) != 0) return -1;
            uint32_t bit = 1u << idx;
            if (!(b.b_bitmap & bit)) return 0;
            uint32_t k = (uint32_t)__builtin_popcount(b.b_bitmap & (bit - 1));
            if ((Py_ssize_t)(2 * k + 1) >= Py_SIZE((PyObject *)&b)) return -1;
            uintptr_t kv[2];
            if (rd(rc, node + offsetof(hamt_bitmap_t, b_array) + 2 * k * sizeof(PyObject *),
                   sizeof kv, kv) != 0)
                return -1;
            if (kv[0] == 0) { /* a sub-node */
                node = kv[1];
                continue;
            }
            if (kv[0] != g_cfg.labels_var) return 0;
            *value = kv[1];
            return 0;
        } else if (type && type == g_cfg.hamt_array_type) {
            if (rd_ptr(rc, node + offsetof(hamt_array_t, a_array) + idx * sizeof(PyObject *),
                       &node) != 0)
                return -1;
            if (!node) return 0;
        } else if (type && type == g_cfg.hamt_collision_type) {
            hamt_collision_t cn;
            if (rd(rc, node, offsetof(hamt_collision_t, c_array), &cn) != 0) return -1;
            Py_ssize_t n = Py_SIZE((PyObject *)&cn);
            for (Py_ssize_t i = 0; i + 1 < n && i < 64; i += 2) {
                uintptr_t kv[2];
                if (rd(rc,
                       node + offsetof(hamt_collision_t, c_array) + (size_t)i * sizeof(PyObject *),
                       sizeof kv, kv) != 0)
                    return -1;
                if (kv[0] == g_cfg.labels_var) {
                    *value = kv[1];
                    return 0;
                }
            }
            return 0;
        } else {
            return -1; /* a node type not known: not read */
        }
    }
    return node ? -1 : 0;
}

/* A task's name as its label: the name the app gave it, or "Task" for asyncio's own numbered
 * names ("Task-<n>", kept as a number until asked for in 3.12+): one label value per request
 * would make one series per request in a backend. */
static void task_name(mw_readcache_t *rc, uintptr_t name, char *out, size_t cap) {
    int n = mw_pyframes_read_str_rc(rc, name, out, cap);
    if (n < 0) {
        snprintf(out, cap, "%s",
                 mw_pyframes_type_of(rc, name) == (uintptr_t)&PyLong_Type ? "Task" : "");
        return;
    }
    if (n > 5 && memcmp(out, "Task-", 5) == 0) {
        int digits = 1;
        for (int i = 5; i < n && digits; i++)
            digits = out[i] >= '0' && out[i] <= '9';
        if (digits) out[4] = '\0';
    }
}

/* The frames of the task being sampled, leaf first: its own chain, then each parent's. */
static mw_rawframe_t g_frames[MW_TASK_FRAMES_MAX];
static uintptr_t g_gens[MW_TASK_FRAMES_MAX], g_awaits[MW_TASK_FRAMES_MAX]; /* as g_frames */
static uint64_t g_cursor; /* the next slot of the set's table to read */

static uint64_t mix(uint64_t h, uint64_t v) {
    return (h ^ v) * 1099511628211ULL;
}

/* The bytes of a coroutine's head worth prefetching: the object and the frame fields a peek reads
 * (3.11+ the frame is inside the object), a few cache lines. */
#define CORO_PREFETCH 192

/* What a Task's head says. 0, or -1 when unreadable or not a C Task (counted). */
typedef struct {
    uintptr_t loop, coro, name, ctx, waiter, callback0;
} head_t;

/* 1 when `type` is asyncio's C Task or a class derived from it (same C layout in front: a
 * Task subclass written in Python, e.g. one a task factory makes), read up its bases. */
static int task_type(mw_readcache_t *rc, uintptr_t type) {
    for (int up = 0; up < 8 && type; up++) {
        if (type == g_cfg.task_type) return 1;
        if (rd_ptr(rc, type + offsetof(PyTypeObject, tp_base), &type) != 0) return 0;
    }
    return 0;
}

/* read_head without counting: 0, -1 unreadable, -2 not a C Task. Reads only (any thread, and
 * async-signal-safe with a direct read cache). */
static int head_of(mw_readcache_t *rc, uintptr_t task, head_t *h) {
    uint8_t head[512];
    long need = g_cfg.off_context + (long)sizeof(uintptr_t);
    if (need > (long)sizeof head || rd(rc, task, (size_t)need, head) != 0) return -1;
    if (!task_type(rc, (uintptr_t)Py_TYPE((PyObject *)head))) return -2;
    memcpy(&h->loop, head + g_cfg.off_loop, sizeof h->loop);
    memcpy(&h->coro, head + g_cfg.off_coro, sizeof h->coro);
    memcpy(&h->name, head + g_cfg.off_name, sizeof h->name);
    memcpy(&h->ctx, head + g_cfg.off_context, sizeof h->ctx);
    memcpy(&h->waiter, head + g_cfg.off_coro - (long)sizeof(uintptr_t), sizeof h->waiter);
    memcpy(&h->callback0, head + g_cfg.off_loop + (long)sizeof(uintptr_t), sizeof h->callback0);
    if (g_cfg.steps_type && mw_pyframes_type_of(rc, h->coro) == g_cfg.steps_type &&
        rd_ptr(rc, h->coro + (uintptr_t)g_cfg.steps_off, &h->coro) != 0)
        return -1;
    return 0;
}

static int read_head(mw_readcache_t *rc, uintptr_t task, head_t *h) {
    int r = head_of(rc, task, h);
    if (r == -1) g_stats.unreadable++;
    if (r == -2) g_stats.other_types++;
    return r < 0 ? -1 : 0;
}

/* The awaitable a coroutine awaits, when it is a coroutine or generator to follow. */
static uintptr_t next_link(mw_readcache_t *rc, uintptr_t awaited) {
    uintptr_t type = mw_pyframes_type_of(rc, awaited);
    return type == (uintptr_t)&PyCoro_Type || type == (uintptr_t)&PyGen_Type ? awaited : 0;
}

/* Task groups and the task waiting in each one's exit, as last seen (see Parents in the header):
 * direct-mapped by the group's address, sampler thread only; an entry is a hint, confirmed on use.
 */
static struct { uintptr_t group, task; } g_groups[MW_TASK_GROUPS];

static int group_wait(uintptr_t code) {
    for (int i = 0; i < MW_TASK_GROUP_WAITS; i++)
        if (code && code == g_cfg.group_wait_code[i]) return 1;
    return 0;
}

static uint32_t group_slot(uintptr_t group) {
    return (uint32_t)(mix(0, group) % MW_TASK_GROUPS);
}

/* Peeks at the chain from coro (of task `owner`), mixing each link into *sig; a link waiting in a
 * task group's exit is remembered as that group's owner. Returns the number of links, -1 when a
 * coroutine of it is running. */
static int peek_chain(mw_readcache_t *rc, uintptr_t coro, uintptr_t owner, uint64_t *sig) {
    int n = 0;
    for (uintptr_t cur = coro; cur && n < MW_TASK_CHAIN_MAX; n++) {
        uintptr_t code, awaited, group;
        int32_t lasti;
        int st = mw_pyframes_coro_peek(rc, cur, &code, &lasti, &awaited);
        if (st == MW_CORO_RUNNING) return -1;
        if (st == MW_CORO_DONE || st == MW_CORO_UNREADABLE) break;
        *sig = mix(mix(mix(mix(*sig, cur), code), (uint64_t)(uint32_t)lasti), awaited);
        if (st == MW_CORO_SUSPENDED && group_wait(code) &&
            mw_pyframes_coro_local0(rc, cur, &group) == 0 && group) {
            uint32_t slot = group_slot(group);
            g_groups[slot].group = group;
            g_groups[slot].task = owner;
        }
        cur = next_link(rc, awaited);
    }
    return n;
}

/* Whether the chain from coro waits in the exit of task group `group` now. */
static int waits_in_group(mw_readcache_t *rc, uintptr_t coro, uintptr_t group) {
    int n = 0;
    for (uintptr_t cur = coro; cur && n < MW_TASK_CHAIN_MAX; n++) {
        uintptr_t code, awaited, local0;
        int32_t lasti;
        if (mw_pyframes_coro_peek(rc, cur, &code, &lasti, &awaited) != MW_CORO_SUSPENDED) return 0;
        if (group_wait(code) && mw_pyframes_coro_local0(rc, cur, &local0) == 0 && local0 == group)
            return 1;
        cur = next_link(rc, awaited);
    }
    return 0;
}

/* The task waiting in the exit of the task group whose done-callback `cb` (a bound method) is,
 * when it is one and that task is known and confirmed; else 0. */
static uintptr_t group_owner(mw_readcache_t *rc, uintptr_t task, uintptr_t cb) {
    PyMethodObject m;
    uintptr_t code;
    if (!g_cfg.group_done_code || rd(rc, cb, sizeof m, &m) != 0 || !m.im_func || !m.im_self ||
        mw_pyframes_type_of(rc, (uintptr_t)m.im_func) != (uintptr_t)&PyFunction_Type ||
        rd_ptr(rc, (uintptr_t)m.im_func + offsetof(PyFunctionObject, func_code), &code) != 0 ||
        code != g_cfg.group_done_code)
        return 0;
    uintptr_t group = (uintptr_t)m.im_self;
    uint32_t slot = group_slot(group);
    uintptr_t owner = g_groups[slot].group == group ? g_groups[slot].task : 0;
    head_t h;
    if (!owner || owner == task || read_head(rc, owner, &h) != 0 ||
        !waits_in_group(rc, h.coro, group))
        return 0;
    return owner;
}

/* The future a gather-like helper's done-callback `cb` (a function) holds for the task awaiting
 * the helper: 0 when cb is not one of the known callbacks (or anything read does not fit). */
static uintptr_t joined_future(mw_readcache_t *rc, uintptr_t cb) {
    PyFunctionObject f;
    if (rd(rc, cb, sizeof f, &f) != 0 || !f.func_closure) return 0;
    for (int j = 0; j < MW_TASK_JOINS; j++) {
        uintptr_t cell, fut;
        if (!g_cfg.join_code[j] || (uintptr_t)f.func_code != g_cfg.join_code[j]) continue;
        if (rd_ptr(rc,
                   (uintptr_t)f.func_closure + offsetof(PyTupleObject, ob_item) +
                       (uintptr_t)g_cfg.join_cell[j] * sizeof(PyObject *),
                   &cell) != 0 ||
            mw_pyframes_type_of(rc, cell) != (uintptr_t)&PyCell_Type ||
            rd_ptr(rc, cell + offsetof(PyCellObject, ob_ref), &fut) != 0)
            return 0;
        return fut;
    }
    return 0;
}

/* The waiter future of a functools.partial(_release_waiter, waiter) callback, else 0. */
static uintptr_t released_waiter(mw_readcache_t *rc, uintptr_t cb) {
    uintptr_t fn, args, waiter;
    if (rd_ptr(rc, cb + (uintptr_t)g_cfg.off_partial_fn, &fn) != 0 || fn != g_cfg.release_waiter ||
        rd_ptr(rc, cb + (uintptr_t)g_cfg.off_partial_args, &args) != 0 ||
        mw_pyframes_type_of(rc, args) != (uintptr_t)&PyTuple_Type)
        return 0;
    Py_ssize_t n;
    if (rd(rc, args + offsetof(PyVarObject, ob_size), sizeof n, &n) != 0 || n < 1 ||
        rd_ptr(rc, args + offsetof(PyTupleObject, ob_item), &waiter) != 0)
        return 0;
    return waiter;
}

/* The task awaiting `task` (whose first done-callback is callback0): the task whose wake-up is
 * that callback and whose awaited future is `task` itself (`await task`); for a task gathered by
 * asyncio.gather, waited for by asyncio.wait or (3.10/3.11) by asyncio.wait_for, the task awaiting
 * the future the helper's callback holds (in its closure, or as the partial's argument); for a
 * task of an asyncio.TaskGroup, the task waiting in the group's exit. 0 when none, or when
 * anything read does not confirm it. */
static uintptr_t parent_of(mw_readcache_t *rc, uintptr_t task, uintptr_t callback0) {
    uintptr_t awaited = task, cb = callback0, type = mw_pyframes_type_of(rc, cb);
    if (type == (uintptr_t)&PyMethod_Type) return group_owner(rc, task, cb);
    if (type == (uintptr_t)&PyFunction_Type || (g_cfg.partial_type && type == g_cfg.partial_type)) {
        uintptr_t fut =
            type == (uintptr_t)&PyFunction_Type ? joined_future(rc, cb) : released_waiter(rc, cb);
        if (!fut || rd_ptr(rc, fut + (uintptr_t)g_cfg.off_loop + sizeof(uintptr_t), &cb) != 0)
            return 0;
        awaited = fut;
        type = mw_pyframes_type_of(rc, cb);
    }
    if (type != (uintptr_t)&PyCFunction_Type && type != (uintptr_t)&PyCMethod_Type) return 0;
    PyCFunctionObject m;
    head_t h;
    if (rd(rc, cb, sizeof m, &m) != 0 || !m.m_self ||
        !task_type(rc, mw_pyframes_type_of(rc, (uintptr_t)m.m_self)))
        return 0;
    uintptr_t parent = (uintptr_t)m.m_self;
    if (parent == task || read_head(rc, parent, &h) != 0 || h.waiter != awaited) return 0;
    return parent;
}

/* The tasks awaiting `task` (first done-callback callback0) into t->parents, while each waits on
 * the one below and they fit, each one's chain peeked and mixed into sig. Returns sig. */
static uint64_t find_parents(mw_readcache_t *rc, uintptr_t task, uintptr_t callback0, uint64_t sig,
                             mw_task_t *t) {
    uintptr_t cur = task, cb = callback0;
    while (t->nparents < MW_TASK_PARENTS) {
        uintptr_t parent = parent_of(rc, cur, cb);
        head_t ph;
        if (!parent || read_head(rc, parent, &ph) != 0) break;
        uint64_t psig = mix(mix(sig, parent), ph.coro);
        if (peek_chain(rc, ph.coro, parent, &psig) <= 0) break;
        sig = psig;
        t->parents[t->nparents] = parent;
        t->parent_coros[t->nparents++] = ph.coro;
        cur = parent;
        cb = ph.callback0;
    }
    return sig;
}

/* Looks at one task: 1 when it is a waiting task of a followed loop and *t is filled (all but
 * its frames, labels and name: mw_tasks_frames), 0 to skip it. The chains are only peeked at:
 * the signature says whether they are where an earlier full read found them. */
static void run_remember(uintptr_t gen, uintptr_t task);

static int peek_task(mw_readcache_t *rc, uintptr_t task, head_t h, mw_task_t *t) {
    uint64_t sig = mix(mix(1469598103934665603ULL, task), h.coro);
    int n = peek_chain(rc, h.coro, task, &sig);
    if (n < 0) {
        g_stats.running++;
        run_remember(h.coro, task); /* a thread's sample will ask which task runs it */
        return 0;
    }
    if (n == 0) return 0;
    memset(t, 0, sizeof *t);
    sig = find_parents(rc, task, h.callback0, sig, t);
    PyContext c;
    uintptr_t vars = 0;
    if (rd(rc, h.ctx, offsetof(PyContext, ctx_weakreflist), &c) == 0) vars = (uintptr_t)c.ctx_vars;
    /* The head again, after the chains: the sweep read it before (a stage ahead), and a task
     * that ended meanwhile may have left its address, coroutine and context to others. The same
     * head now says the chain peeked was this task's (a task's coroutine never changes). */
    head_t again;
    if (read_head(rc, task, &again) != 0 || again.loop != h.loop || again.coro != h.coro ||
        again.ctx != h.ctx || again.name != h.name || again.callback0 != h.callback0) {
        g_stats.torn++;
        return 0;
    }
    t->task = task;
    t->loop = h.loop;
    t->coro = h.coro;
    t->context = h.ctx;
    t->vars = vars;
    t->name_obj = h.name;
    t->sig = mix(mix(mix(sig, h.ctx), vars), h.name);
    return 1;
}

/* ---- the running task ------------------------------------------------------------------ */

/* The (key, value) entries of a dict with few entries (asyncio's current tasks: one per running
 * loop), at most max, read with safe reads (3.11+ laid out as pycore_dict.h says, 3.10 as its
 * dict-common.h); deleted entries have key 0. Returns their number, 0 when unreadable. The dict
 * changes as tasks run: what is found is confirmed by the caller. */
typedef struct {
    Py_hash_t hash;
    uintptr_t key, value;
} dict_entry_t;
#define DICT_SCAN_MAX 64
#define CURRENT_SCAN_MAX 64 /* entries the handler's look-up reads, one at a time */
/* Where a dict with few entries keeps them: *entries and their number (deleted ones included).
 * 0, or -1 when unreadable or not laid out as expected. */
static int dict_table(mw_readcache_t *rc, uintptr_t dict, uintptr_t *entries, Py_ssize_t *n) {
    PyDictObject d;
    if (rd(rc, dict, sizeof d, &d) != 0 || Py_TYPE((PyObject *)&d) != &PyDict_Type || d.ma_values ||
        !d.ma_keys)
        return -1;
    uintptr_t keys = (uintptr_t)d.ma_keys;
#if PY_VERSION_HEX >= 0x030B0000
    PyDictKeysObject k;
    if (rd(rc, keys, offsetof(PyDictKeysObject, dk_indices), &k) != 0 ||
        k.dk_kind != DICT_KEYS_GENERAL || k.dk_log2_index_bytes > 40)
        return -1;
    *entries =
        keys + offsetof(PyDictKeysObject, dk_indices) + ((uintptr_t)1 << k.dk_log2_index_bytes);
    *n = k.dk_nentries;
#else
    struct { /* 3.10's PyDictKeysObject (Objects/dict-common.h), up to its index table */
        Py_ssize_t dk_refcnt, dk_size;
        void *dk_lookup;
        Py_ssize_t dk_usable, dk_nentries;
    } k;
    if (rd(rc, keys, sizeof k, &k) != 0 || k.dk_size < 8 || k.dk_size > (1L << 30)) return -1;
    uintptr_t width = k.dk_size <= 0xff ? 1 : k.dk_size <= 0xffff ? 2 : 4;
    *entries = keys + sizeof k + (uintptr_t)k.dk_size * width;
    *n = k.dk_nentries;
#endif
    return *n > 0 ? 0 : -1;
}

static int dict_entries(mw_readcache_t *rc, uintptr_t dict, dict_entry_t *out, int max) {
    uintptr_t entries;
    Py_ssize_t n;
    if (dict_table(rc, dict, &entries, &n) != 0) return 0;
    if (n > max) n = max;
    return rd(rc, entries, (size_t)n * sizeof *out, out) == 0 ? (int)n : 0;
}

/* Coroutines found to be a task's (gen → task), direct-mapped: a hint, confirmed on use. */
#define RUN_SLOTS 1024
static struct { uintptr_t gen, task; } g_run[RUN_SLOTS];

static void run_remember(uintptr_t gen, uintptr_t task) {
    uint32_t slot = (uint32_t)(mix(0, gen) % RUN_SLOTS);
    g_run[slot].gen = gen;
    g_run[slot].task = task;
}

static int read_chain(mw_readcache_t *rc, uintptr_t coro, int at);

uintptr_t mw_tasks_current(mw_readcache_t *rc, uintptr_t gen) {
    if (!gen || !mw_tasks_ready() || !g_cfg.current_tasks) return 0;
    uintptr_t entries, type, loop, coro;
    Py_ssize_t n;
    if (dict_table(rc, g_cfg.current_tasks, &entries, &n) != 0) return 0;
    if (n > CURRENT_SCAN_MAX) n = CURRENT_SCAN_MAX;
    /* one entry and one field at a time: this runs on the signal's stack, which may be small */
    for (Py_ssize_t i = 0; i < n; i++) {
        dict_entry_t e;
        if (rd(rc, entries + (uintptr_t)i * sizeof e, sizeof e, &e) != 0) return 0;
        if (!e.key || !e.value || rd_ptr(rc, e.value + offsetof(PyObject, ob_type), &type) != 0 ||
            !task_type(rc, type) || rd_ptr(rc, e.value + (uintptr_t)g_cfg.off_loop, &loop) != 0 ||
            loop != e.key || rd_ptr(rc, e.value + (uintptr_t)g_cfg.off_coro, &coro) != 0)
            continue;
        if (g_cfg.steps_type && mw_pyframes_type_of(rc, coro) == g_cfg.steps_type &&
            rd_ptr(rc, coro + (uintptr_t)g_cfg.steps_off, &coro) != 0)
            continue;
        if (coro == gen) return e.value;
    }
    return 0;
}

int mw_tasks_running(mw_readcache_t *rc, uintptr_t loop, uintptr_t gen, uintptr_t hint, int parents,
                     mw_task_t *t) {
    if (!mw_tasks_ready() || !gen || !loop) return -1;
    uint32_t slot = (uint32_t)(mix(0, gen) % RUN_SLOTS);
    head_t h;
    uintptr_t task = hint;
    if (task && (head_of(rc, task, &h) != 0 || h.loop != loop || h.coro != gen)) task = 0;
    if (task) {
        run_remember(gen, task); /* confirmed: h is its head */
    } else if (!(task = g_run[slot].gen == gen ? g_run[slot].task : 0) ||
               read_head(rc, task, &h) != 0 || h.loop != loop || h.coro != gen) {
        dict_entry_t e[DICT_SCAN_MAX];
        int ne = g_cfg.current_tasks ? dict_entries(rc, g_cfg.current_tasks, e, DICT_SCAN_MAX) : 0;
        task = 0;
        for (int i = 0; i < ne && !task; i++)
            if (e[i].key == loop) task = e[i].value;
        if (!task || read_head(rc, task, &h) != 0 || h.loop != loop || h.coro != gen) {
            g_stats.running_missed++;
            return -1;
        }
        run_remember(gen, task);
    }
    memset(t, 0, sizeof *t);
    uint64_t sig = mix(mix(1469598103934665603ULL, task), h.coro);
    if (parents) sig = find_parents(rc, task, h.callback0, sig, t);
    int n = 0;
    for (int i = 0; i < t->nparents; i++) {
        int m = read_chain(rc, t->parent_coros[i], n);
        if (m <= 0) { /* it ran since the peek: the parents up to it only */
            t->nparents = i;
            break;
        }
        t->parent_len[i] = m;
        n += m;
    }
    t->task = task;
    t->loop = h.loop;
    t->coro = h.coro;
    t->context = h.ctx;
    t->name_obj = h.name;
    t->nframes = n;
    t->frames = g_frames;
    /* recomputed over the parents kept, as mw_tasks_recheck will */
    sig = mix(mix(1469598103934665603ULL, task), h.coro);
    for (int i = 0, at = 0; i < t->nparents; i++) {
        sig = mix(mix(sig, t->parents[i]), t->parent_coros[i]);
        for (int j = at + t->parent_len[i] - 1; j >= at; j--)
            sig = mix(mix(mix(mix(sig, g_gens[j]), g_frames[j].code),
                          (uint64_t)(uint32_t)g_frames[j].lasti),
                      g_awaits[j]);
        at += t->parent_len[i];
    }
    t->sig = mix(mix(mix(sig, h.ctx), 0), h.name);
    task_name(rc, h.name, t->name, sizeof t->name);
    g_stats.running_found++;
    return 0;
}

uintptr_t mw_tasks_loop_of(mw_readcache_t *rc, uintptr_t gen, uintptr_t hint) {
    if (!mw_tasks_ready() || !gen || !g_cfg.current_tasks) return 0;
    head_t hh;
    if (hint && head_of(rc, hint, &hh) == 0 && hh.coro == gen && hh.loop) {
        run_remember(gen, hint);
        return hh.loop;
    }
    dict_entry_t e[DICT_SCAN_MAX];
    int ne = dict_entries(rc, g_cfg.current_tasks, e, DICT_SCAN_MAX);
    for (int i = 0; i < ne; i++) {
        head_t h;
        if (e[i].key && e[i].value && read_head(rc, e[i].value, &h) == 0 && h.coro == gen &&
            h.loop == e[i].key) {
            run_remember(gen, e[i].value);
            return e[i].key;
        }
    }
    return 0;
}

int mw_tasks_loop_adopt(long tid, uintptr_t loop, const mw_rawframe_t *below, int n) {
    int skip = 0;
    while (skip < n && skip < 8) {
        int known = 0;
        for (int i = 0; i < MW_TASK_LOOP_CODES && !known; i++)
            known = g_cfg.loop_codes[i] && g_cfg.loop_codes[i] == below[skip].code;
        if (!known) break;
        skip++;
    }
    if (mw_tasks_loop_set(tid, loop, below + skip, n - skip) != 0) return -1;
    mw_task_loops_count_found();
    return 0;
}

/* Reads the chain from coro in full into g_frames[at..], leaf first. Returns the number of
 * frames, -1 when it ran since it was peeked (its first coroutine no longer suspended). */
static int read_chain(mw_readcache_t *rc, uintptr_t coro, int at) {
    mw_rawframe_t tmp[MW_TASK_CHAIN_MAX];
    uintptr_t gens[MW_TASK_CHAIN_MAX], awaits[MW_TASK_CHAIN_MAX];
    int n = 0;
    for (uintptr_t cur = coro; cur;) {
        if (n == MW_TASK_CHAIN_MAX || at + n == MW_TASK_FRAMES_MAX) {
            g_stats.chain_capped++;
            break;
        }
        uintptr_t awaited = 0;
        int st = mw_pyframes_coro(rc, cur, &tmp[n], &awaited);
        if (st == MW_CORO_RUNNING || (n == 0 && st != MW_CORO_SUSPENDED && st != MW_CORO_CREATED))
            return -1;
        if (st != MW_CORO_SUSPENDED && st != MW_CORO_CREATED) break;
        gens[n] = cur;
        awaits[n++] = awaited;
        cur = next_link(rc, awaited);
    }
    for (int i = 0; i < n; i++) { /* outermost first there, leaf first here */
        g_frames[at + i] = tmp[n - 1 - i];
        g_gens[at + i] = gens[n - 1 - i];
        g_awaits[at + i] = awaits[n - 1 - i];
    }
    return n;
}

int mw_tasks_frames(mw_readcache_t *rc, mw_task_t *t) {
    int n = read_chain(rc, t->coro, 0);
    if (n <= 0) {
        g_stats.torn++; /* it ran since the peek */
        return -1;
    }
    t->nown = n;
    for (int i = 0; i < t->nparents; i++) {
        int m = read_chain(rc, t->parent_coros[i], n);
        if (m <= 0) {
            g_stats.torn++;
            return -1;
        }
        t->parent_len[i] = m;
        n += m;
    }
    t->nframes = n;
    t->frames = g_frames;
    t->labelset = 0;
    uintptr_t value = 0;
    if (context_value(rc, t->context, &value) == 0 && value &&
        lv_lookup(value, &t->labelset) != 0) {
        t->labelset = 0;
        g_stats.labels_missed++;
    }
    task_name(rc, t->name_obj, t->name, sizeof t->name);
    return 0;
}

/* Peeks at a chain the full read found at g_frames[at..at+n) (leaf first): each coroutine
 * where it was, mixed into *sig as peek_chain does (outermost first). 0, or -1 on a change. */
static int recheck_chain(mw_readcache_t *rc, int at, int n, uint64_t *sig) {
    for (int i = at + n - 1; i >= at; i--) {
        uintptr_t code, awaited;
        int32_t lasti;
        int st = mw_pyframes_coro_peek(rc, g_gens[i], &code, &lasti, &awaited);
        if ((st != MW_CORO_SUSPENDED && st != MW_CORO_CREATED) || code != g_frames[i].code ||
            lasti != g_frames[i].lasti || (g_awaits[i] && awaited != g_awaits[i]))
            return -1;
        *sig = mix(mix(mix(mix(*sig, g_gens[i]), code), (uint64_t)(uint32_t)lasti), awaited);
    }
    return 0;
}

int mw_tasks_recheck(mw_readcache_t *rc, const mw_task_t *t) {
    if (t->frames != g_frames) return -1;
    /* Each coroutine where the full read found it, and the whole as the sweep's peek saw it
     * (the same signature): the tasks did not run from the peek to now. */
    uint64_t sig = mix(mix(1469598103934665603ULL, t->task), t->coro);
    if (recheck_chain(rc, 0, t->nown, &sig) != 0) return -1;
    int at = t->nown;
    for (int i = 0; i < t->nparents; i++) {
        sig = mix(mix(sig, t->parents[i]), t->parent_coros[i]);
        if (recheck_chain(rc, at, t->parent_len[i], &sig) != 0) return -1;
        at += t->parent_len[i];
    }
    sig = mix(mix(mix(sig, t->context), t->vars), t->name_obj);
    return sig == t->sig ? 0 : -1;
}

int mw_tasks_sweep(mw_readcache_t *rc, const mw_taskloop_t *loops, int nloops, int visits,
                   mw_task_fn fn, void *arg, double *fraction) {
    *fraction = 1.0;
    if (!mw_tasks_ready()) return -1;
    PySetObject set;
    if (rd(rc, g_cfg.tasks_set, sizeof set, &set) != 0 ||
        Py_TYPE((PyObject *)&set) != &PySet_Type || set.mask < 0 || set.mask > (1 << 26))
        return -1;
    uint64_t size = (uint64_t)set.mask + 1, todo = size;
    uintptr_t table = (uintptr_t)set.table;
    if (table == g_cfg.tasks_set + offsetof(PySetObject, smalltable)) table = 0; /* in the copy */
    if (visits < 1) visits = 1;
    if (set.used > visits) /* a slice holding about `visits` of the set's tasks */
        todo = (size * (uint64_t)visits + (uint64_t)set.used - 1) / (uint64_t)set.used;
    if (todo > MW_TASK_SLOTS_TICK) todo = MW_TASK_SLOTS_TICK;
    if (todo < size)
        g_stats.partial_ticks++;
    else
        todo = size;
    *fraction = (double)todo / (double)size;
    uint64_t start = g_cursor % size;
    g_cursor = start + todo;
    int given = 0;
    setentry chunk[32];
    uintptr_t tasks[32];
    head_t heads[32];
    for (uint64_t done = 0; done < todo;) {
        uint64_t at = (start + done) % size, n = todo - done;
        if (n > 32) n = 32;
        if (n > size - at) n = size - at;
        if (table) {
            if (rd(rc, table + at * sizeof(setentry), n * sizeof(setentry), chunk) != 0)
                return given;
        } else {
            memcpy(chunk, set.smalltable + at, n * sizeof(setentry));
        }
        done += n;
        /* In stages over the chunk, each prefetching what the next reads: the objects of
         * different tasks are far apart, and one after the other each read would wait for
         * memory in turn. (A prefetch never faults; the reads stay guarded.) */
        for (uint64_t i = 0; i < n; i++)
            if (chunk[i].key) __builtin_prefetch(chunk[i].key);
        int nt = 0;
        for (uint64_t i = 0; i < n; i++) {
            uintptr_t key = (uintptr_t)chunk[i].key;
            if (!key) continue;
            PyWeakReference w;
            if (rd(rc, key, sizeof w, &w) != 0 || Py_TYPE((PyObject *)&w) != &_PyWeakref_RefType)
                continue; /* the set's dummy entry, or not a reference */
            uintptr_t task = (uintptr_t)w.wr_object;
            if (!task || task == (uintptr_t)Py_None) continue;
            for (long o = 0; o <= g_cfg.off_context; o += 64)
                __builtin_prefetch((const void *)(task + (uintptr_t)o));
            tasks[nt++] = task;
        }
        int nh = 0;
        for (int i = 0; i < nt; i++) {
            head_t h;
            if (read_head(rc, tasks[i], &h) != 0) continue;
            int mine = 0;
            for (int l = 0; l < nloops && !mine; l++)
                mine = loops[l].loop == h.loop;
            if (!mine) continue;
            for (unsigned o = 0; o < CORO_PREFETCH; o += 64)
                __builtin_prefetch((const void *)(h.coro + o));
            __builtin_prefetch((const void *)h.ctx);
            tasks[nh] = tasks[i];
            heads[nh++] = h;
        }
        for (int i = 0; i < nh; i++) {
            mw_task_t t;
            if (peek_task(rc, tasks[i], heads[i], &t)) {
                g_stats.tasks++;
                given++;
                fn(arg, &t);
            }
        }
    }
    return given;
}

void mw_tasks_count_dropped(int torn) {
    if (torn)
        g_stats.torn++;
    else
        g_stats.dropped++;
}

void mw_tasks_get_stats(mw_tasks_stats_t *out) {
    *out = g_stats;
    mw_task_loops_counts(&out->loops_refused, &out->loops_found);
}
