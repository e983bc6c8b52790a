/* mw_module_locks — profiled lock types for the block profile (mw_blockprof.h). Appended to
 * middleware._native by csrc/mw_module.c (declared in mw_module.h):
 *
 *   ProfiledLock()      a drop-in threading.Lock (methods of _thread.lock: acquire(blocking=True,
 *                       timeout=-1), release, locked, __enter__/__exit__, acquire_lock,
 *                       release_lock, locked_lock, _at_fork_reinit; weak references)
 *   ProfiledRLock()     a drop-in threading.RLock (_thread.RLock's methods, with _is_owned,
 *                       _release_save, _acquire_restore, _recursion_count for Condition)
 *   locks_enable(rate_ns, skip_files=()) -> None   record the waits of profiled locks
 *   locks_disable() -> None                         stop recording (the locks keep working)
 *   locks_stats() -> dict[str, int]                 mw_blockprof_stats_t fields, lock_*
 *   lock_waited(delay_ns, file, line, skip=0) -> None   a wait measured in Python (asyncio)
 *
 * The types: an acquire first tries the lock without waiting (the uncontended path costs what
 * the stock lock's does: no clock, no allocation). Only when it must wait does it read the
 * monotonic clock before and after (the GIL released meanwhile, signals handled as the stock
 * lock does: Py_MakePendingCalls, the timeout shortened), and, while recording is on, hand the
 * wait to mw_blockprof_sample; a wait kept by the sampling is recorded with the waiting thread's
 * Python stack (read with the C API, GIL held), its name and label set (mw_threads), plus the
 * label lock=<file>:<line>, the lock's creation site. A wait counts whether it ended with the
 * lock or with a timeout.
 *
 * Creation site: the first frame, from the creating call outwards, whose file is not one of
 * skip_files (threading.py, queue.py, ...: a Condition's waiter lock or a Queue's mutex is
 * named after the code that waits or made the Queue); the file name (a str, referenced) and
 * line are kept with the lock.
 *
 * Threads: every function and method runs with the GIL held (GIL builds only); the lock state
 * (locked flag, RLock owner/count) is only changed with the GIL held, as in CPython's own lock
 * objects. Not async-signal-safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h> /* PyFrame_GetBack on 3.10 */

#include "mw_blockprof.h"
#include "mw_labels.h"
#include "mw_module.h"
#include "mw_pyglue.h"
#include "mw_threads.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#if PY_VERSION_HEX < 0x030B0000
#define MW_CODE_NAME(co) ((co)->co_name)
#else
#define MW_CODE_NAME(co) ((co)->co_qualname)
#endif

#define SKIP_FILES_MAX 16
#define SITE_HOPS_MAX 8

/* Files whose frames do not name a lock's creation site (set by locks_enable, GIL held). */
static PyObject *g_skip[SKIP_FILES_MAX];
static int g_nskip;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int skipped_file(PyObject *file) {
    for (int i = 0; i < g_nskip; i++) {
        if (g_skip[i] == file) return 1;
        if (PyUnicode_Check(file) && PyUnicode_Compare(g_skip[i], file) == 0) return 1;
    }
    if (PyErr_Occurred()) PyErr_Clear();
    return 0;
}

/* The creating code's file (new reference, NULL if unknown) and line. */
static PyObject *creation_site(int *line) {
    *line = 0;
    if (!mw_blockprof_enabled()) return NULL; /* locks made while not recording: no site */
    PyFrameObject *f = PyEval_GetFrame();     /* borrowed */
    Py_XINCREF(f);
    PyObject *first = NULL, *found = NULL;
    int first_line = 0;
    for (int hop = 0; f && hop < SITE_HOPS_MAX; hop++) {
        PyCodeObject *co = PyFrame_GetCode(f);
        PyObject *file = co->co_filename;
        int skip = skipped_file(file);
        if (!skip || !first) {
            int ln = PyFrame_GetLineNumber(f);
            if (!skip) {
                found = Py_NewRef(file);
                *line = ln;
            } else {
                first = Py_NewRef(file);
                first_line = ln;
            }
        }
        Py_DECREF(co);
        if (found) break;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    if (found) {
        Py_XDECREF(first);
        return found;
    }
    *line = first_line;
    return first;
}

/* Resolved frames by (code object, instruction): a frame seen before costs one probe instead of
 * a line-table decode and two string interns. An entry holds a reference to its code object, so
 * the address it is keyed by cannot be reused while the entry lives; its strings are the code
 * object's. The profile-buffer id is cached per buffer generation (mw_strframe_t.gen/id, updated
 * by mw_blockprof_add under its lock). GIL held for every access. */
#define FCACHE_SLOTS 4096
typedef struct {
    PyCodeObject *code; /* strong reference, NULL = empty */
    int lasti;
    uint64_t walk; /* the last walk that used the entry (g_walk) */
    mw_strframe_t f;
} fcache_t;
static fcache_t g_fcache[FCACHE_SLOTS];
static uint64_t g_walk;

static int frame_lasti(PyFrameObject *f) {
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(f);
#else
    return f->f_lasti;
#endif
}

/* The resolved frame f (code co: a new reference, which the cache entry takes over or which
 * goes to *held). The cached entry when the slot is free for this walk; otherwise (the slot
 * serves another frame of the same stack) the frame is resolved into *spill. NULL when the
 * names cannot be read. *held gets a code object to release once the stack is added
 * (releasing one can run arbitrary code: weak reference callbacks). */
static mw_strframe_t *resolve_frame(PyFrameObject *f, PyCodeObject *co, mw_strframe_t *spill,
                                    PyCodeObject **held) {
    int lasti = frame_lasti(f);
    uintptr_t h = ((uintptr_t)co >> 4) * 0x9E3779B97F4A7C15ull ^ (uintptr_t)lasti * 0x85EBCA6Bu;
    fcache_t *e = &g_fcache[(h >> 20) & (FCACHE_SLOTS - 1)];
    *held = NULL;
    if (e->code == co && e->lasti == lasti) {
        Py_DECREF(co);
        e->walk = g_walk;
        return &e->f;
    }
    Py_ssize_t nlen = 0, flen = 0;
    const char *name = PyUnicode_AsUTF8AndSize(MW_CODE_NAME(co), &nlen);
    const char *file = PyUnicode_AsUTF8AndSize(co->co_filename, &flen);
    if (!name || !file) {
        PyErr_Clear();
        Py_DECREF(co);
        return NULL;
    }
    mw_strframe_t r = {
        name, file, (size_t)nlen, (size_t)flen, PyFrame_GetLineNumber(f), co->co_firstlineno, 0, 0};
    if (e->walk == g_walk) { /* in use by this stack: not evicted, resolved aside */
        *held = co;
        *spill = r;
        return spill;
    }
    *held = e->code;
    e->code = co;
    e->lasti = lasti;
    e->walk = g_walk;
    e->f = r;
    return &e->f;
}

/* The waiting thread's stack (leaf first) and identity, into the block profile. GIL held. */
static void record_wait(PyObject *site_file, int site_line, uint64_t contentions, uint64_t delay_ns,
                        int skip) {
    mw_strframe_t *frames[MW_BLOCKPROF_MAX_DEPTH], spill[MW_BLOCKPROF_MAX_DEPTH];
    PyCodeObject *held[MW_BLOCKPROF_MAX_DEPTH];
    uint32_t depth = 0, nheld = 0;
    g_walk++;
    PyObject *exc_type, *exc_value, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    for (; f && skip > 0; skip--) { /* the caller's own frames (lock_waited) */
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    while (f && depth < MW_BLOCKPROF_MAX_DEPTH) {
        PyCodeObject *code;
        mw_strframe_t *r = resolve_frame(f, PyFrame_GetCode(f), &spill[depth], &code);
        if (code) held[nheld++] = code;
        if (!r) break;
        frames[depth++] = r;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);

    char thread[MW_THREAD_NAME_MAX];
    uint32_t seq;
    long tid = (long)PyThread_get_thread_native_id();
    /* the set interned with the lock's site lives for ever: never a per-request span set */
    uint32_t labelset = mw_labels_base(mw_threads_lookup(tid, thread, sizeof thread, &seq));
    if (!thread[0]) snprintf(thread, sizeof thread, "thread-%ld", tid);
    const char *keys[MW_LABELS_PER_SET], *vals[MW_LABELS_PER_SET];
    const char *const *k0, *const *v0;
    int n = 0, have = labelset ? mw_labels_get(labelset, &k0, &v0) : 0;
    for (int i = 0; i < have && n < MW_LABELS_PER_SET - 1; i++) {
        if (strcmp(k0[i], "lock") == 0) continue; /* ours wins */
        keys[n] = k0[i];
        vals[n++] = v0[i];
    }
    char site[512];
    const char *site_text = site_file ? PyUnicode_AsUTF8(site_file) : NULL;
    if (!site_text) PyErr_Clear();
    snprintf(site, sizeof site, "%s:%d", site_text ? site_text : "unknown", site_line);
    keys[n] = "lock";
    vals[n++] = site;
    uint32_t with_site = mw_labels_intern(keys, vals, n);
    mw_blockprof_add(frames, depth, thread, with_site ? with_site : labelset, contentions,
                     delay_ns);
    for (uint32_t i = 0; i < nheld; i++)
        Py_DECREF(held[i]);
    PyErr_Restore(exc_type, exc_value, exc_tb);
}

/* After a wait of waited_ns for a lock made at (site_file, site_line); skip: innermost Python
 * frames left out of the stack. */
static void waited(PyObject *site_file, int site_line, int64_t waited_ns, int skip) {
    /* Set while a stack is read and added: the walk can run Python code (a frame object's
     * allocation can start a collection, whose finalizers may wait for a lock, even release the
     * GIL), and a nested record would reuse the frame cache under the walk in progress: it is
     * dropped instead (counted). GIL held. */
    static int recording;
    uint64_t contentions, delay;
    if (waited_ns <= 0 || !mw_blockprof_sample((uint64_t)waited_ns, &contentions, &delay)) return;
    if (recording) {
        mw_blockprof_count_dropped();
        return;
    }
    recording = 1;
    record_wait(site_file, site_line, contentions, delay, skip);
    recording = 0;
}

/* Acquires lk within us microseconds (-1: no limit, 0: no wait). *waited_ns gets the time spent
 * waiting (0 when the first try succeeded). PY_LOCK_INTR means a signal handler raised. */
static PyLockStatus acquire_timed(PyThread_type_lock lk, PY_TIMEOUT_T us, int64_t *waited_ns) {
    *waited_ns = 0;
    PyLockStatus r = PyThread_acquire_lock_timed(lk, 0, 0);
    if (r == PY_LOCK_ACQUIRED || us == 0) return r;
    int64_t t0 = now_ns(), deadline = us > 0 ? t0 + (int64_t)us * 1000 : 0;
    do {
        PyThreadState *ts = PyEval_SaveThread();
        r = PyThread_acquire_lock_timed(lk, us, 1);
        PyEval_RestoreThread(ts);
        if (r != PY_LOCK_INTR) break;
        if (Py_MakePendingCalls() < 0) break; /* a handler raised: r stays PY_LOCK_INTR */
        if (us > 0) {
            int64_t left = deadline - now_ns();
            if (left <= 0)
                r = PY_LOCK_FAILURE;
            else
                us = (PY_TIMEOUT_T)((left + 999) / 1000);
        }
    } while (r == PY_LOCK_INTR);
    *waited_ns = now_ns() - t0;
    return r;
}

/* Acquires lk, waiting as long as it takes, not interrupted by signals (as the stock RLock's
 * _acquire_restore). Returns the time waited. */
static int64_t acquire_uninterrupted(PyThread_type_lock lk) {
    if (PyThread_acquire_lock_timed(lk, 0, 0) == PY_LOCK_ACQUIRED) return 0;
    int64_t t0 = now_ns();
    PyThreadState *ts = PyEval_SaveThread();
    PyThread_acquire_lock_timed(lk, -1, 0);
    PyEval_RestoreThread(ts);
    return now_ns() - t0;
}

/* acquire(blocking=True, timeout=-1) arguments, as _thread's locks check them. */
static int parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                         PY_TIMEOUT_T *us) {
    static const char *const names[] = {"blocking", "timeout"};
    PyObject *vals[2] = {NULL, NULL};
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        vals[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        const char *k = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, i));
        int which = !k ? -1 : strcmp(k, names[0]) == 0 ? 0 : strcmp(k, names[1]) == 0 ? 1 : -1;
        if (which < 0 || vals[which]) {
            if (k)
                PyErr_Format(PyExc_TypeError,
                             "acquire() got an unexpected or repeated keyword "
                             "argument '%s'",
                             k);
            return -1;
        }
        vals[which] = args[nargs + i];
    }
    int blocking = 1;
    if (vals[0] && (blocking = PyObject_IsTrue(vals[0])) < 0) return -1;
    double timeout = -1;
    if (vals[1]) {
        timeout = PyFloat_AsDouble(vals[1]);
        if (timeout == -1 && PyErr_Occurred()) return -1;
    }
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return -1;
    }
    if (timeout < 0 && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return -1;
    }
    if (!blocking) {
        *us = 0;
    } else if (timeout == -1) {
        *us = -1;
    } else {
        double micro = ceil(timeout * 1e6);
        if (!(micro < (double)PY_TIMEOUT_MAX)) {
            PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
            return -1;
        }
        *us = (PY_TIMEOUT_T)micro;
    }
    return 0;
}

/* ---------------------------------------------------------------- the two types */

/* One layout for both types: a ProfiledLock is held when count is 1 (owner: the thread that
 * took it, informational); a ProfiledRLock counts its owner's acquisitions. */
typedef struct {
    PyObject_HEAD PyThread_type_lock lock;
    unsigned long owner;
    unsigned long count;
    int reentrant; /* ProfiledRLock (or a subclass) */
    int site_line;
    PyObject *site_file; /* str or NULL */
    PyObject *weakreflist;
} plock_t;

static PyObject *lock_new(PyTypeObject *type, int reentrant) {
    plock_t *self = (plock_t *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->lock = PyThread_allocate_lock();
    if (!self->lock) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "can't allocate lock");
        return NULL;
    }
    self->reentrant = reentrant;
    self->site_file = creation_site(&self->site_line);
    return (PyObject *)self;
}

static PyObject *plock_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if ((args && PyTuple_GET_SIZE(args)) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "lock() takes no arguments");
        return NULL;
    }
    return lock_new(type, 0);
}

static PyObject *prlock_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    (void)args;
    (void)kw;
    return lock_new(type, 1);
}

static void lock_dealloc(plock_t *self) {
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    if (self->lock) {
        if (self->count) PyThread_release_lock(self->lock);
        PyThread_free_lock(self->lock);
    }
    Py_XDECREF(self->site_file);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *lock_acquire_us(plock_t *self, PY_TIMEOUT_T us) {
    unsigned long tid = PyThread_get_thread_ident();
    if (self->reentrant && self->count > 0 && self->owner == tid) {
        if (self->count + 1 == 0) {
            PyErr_SetString(PyExc_OverflowError, "Internal lock count overflowed");
            return NULL;
        }
        self->count++;
        Py_RETURN_TRUE;
    }
    int64_t w;
    PyLockStatus r = acquire_timed(self->lock, us, &w);
    if (r == PY_LOCK_INTR) return NULL;
    if (r == PY_LOCK_ACQUIRED) {
        self->owner = tid;
        self->count = 1;
    }
    if (w) waited(self->site_file, self->site_line, w, 0);
    return PyBool_FromLong(r == PY_LOCK_ACQUIRED);
}

static PyObject *lock_acquire(plock_t *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames) {
    PY_TIMEOUT_T us;
    if (nargs == 0 && !kwnames) { /* the common case: no parsing */
        us = -1;
    } else if (parse_acquire(args, nargs, kwnames, &us) != 0) {
        return NULL;
    }
    return lock_acquire_us(self, us);
}

static PyObject *lock_enter(plock_t *self, PyObject *noargs) {
    (void)noargs;
    return lock_acquire_us(self, -1);
}

/* A Lock may be released by any thread; an RLock only by its owner, once per acquisition. */
static PyObject *lock_release(plock_t *self, PyObject *unused) {
    (void)unused;
    if (self->count == 0 || (self->reentrant && self->owner != PyThread_get_thread_ident())) {
        PyErr_SetString(PyExc_RuntimeError, self->reentrant ? "cannot release un-acquired lock"
                                                            : "release unlocked lock");
        return NULL;
    }
    if (--self->count == 0) {
        self->owner = 0;
        PyThread_release_lock(self->lock);
    }
    Py_RETURN_NONE;
}

static PyObject *lock_exit(plock_t *self, PyObject *args) {
    (void)args;
    return lock_release(self, NULL);
}

static PyObject *lock_locked(plock_t *self, PyObject *noargs) {
    (void)noargs;
    return PyBool_FromLong(self->count > 0);
}

static PyObject *lock_at_fork_reinit(plock_t *self, PyObject *noargs) {
    (void)noargs;
    PyThread_type_lock fresh = PyThread_allocate_lock();
    if (!fresh) {
        PyErr_SetString(PyExc_MemoryError, "can't allocate lock");
        return NULL;
    }
    /* The old lock may be held by a thread that does not exist in the child: not freed. */
    self->lock = fresh;
    self->owner = 0;
    self->count = 0;
    Py_RETURN_NONE;
}

static PyObject *no_pickle(PyObject *self, PyObject *args) {
    (void)args;
    return PyErr_Format(PyExc_TypeError, "cannot pickle '%.100s' object", Py_TYPE(self)->tp_name);
}

static PyObject *plock_repr(plock_t *self) {
    return PyUnicode_FromFormat("<%s %s object at %p>", self->count ? "locked" : "unlocked",
                                Py_TYPE(self)->tp_name, self);
}

static PyMethodDef plock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool"},
    {"acquire_lock", (PyCFunction)(void (*)(void))lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "alias of acquire"},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "release the lock"},
    {"release_lock", (PyCFunction)lock_release, METH_NOARGS, "alias of release"},
    {"locked", (PyCFunction)lock_locked, METH_NOARGS, "whether the lock is held"},
    {"locked_lock", (PyCFunction)lock_locked, METH_NOARGS, "alias of locked"},
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, "acquire the lock"},
    {"__exit__", (PyCFunction)lock_exit, METH_VARARGS, "release the lock"},
    {"_at_fork_reinit", (PyCFunction)lock_at_fork_reinit, METH_NOARGS, "a new, unlocked lock"},
    {"__reduce_ex__", no_pickle, METH_VARARGS, "locks cannot be pickled"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject g_plock_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "middleware._native.ProfiledLock",
    .tp_basicsize = sizeof(plock_t),
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_repr = (reprfunc)plock_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A threading.Lock whose waits go to the block profile.",
    .tp_weaklistoffset = offsetof(plock_t, weakreflist),
    .tp_methods = plock_methods,
    .tp_new = plock_new,
};

/* ---------------------------------------------------------------- RLock's own methods */

static PyObject *prlock_is_owned(plock_t *self, PyObject *noargs) {
    (void)noargs;
    return PyBool_FromLong(self->count > 0 && self->owner == PyThread_get_thread_ident());
}

static PyObject *prlock_recursion_count(plock_t *self, PyObject *noargs) {
    (void)noargs;
    return PyLong_FromUnsignedLong(self->owner == PyThread_get_thread_ident() ? self->count : 0);
}

/* Condition.wait: gives the lock up whatever its count, to take it back with that state. */
static PyObject *prlock_release_save(plock_t *self, PyObject *noargs) {
    (void)noargs;
    if (self->count == 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return NULL;
    }
    unsigned long count = self->count, owner = self->owner;
    self->count = 0;
    self->owner = 0;
    PyThread_release_lock(self->lock);
    return Py_BuildValue("kk", count, owner);
}

static PyObject *prlock_acquire_restore(plock_t *self, PyObject *args) {
    unsigned long count, owner;
    if (!PyArg_ParseTuple(args, "(kk):_acquire_restore", &count, &owner)) return NULL;
    int64_t w = acquire_uninterrupted(self->lock);
    self->owner = owner;
    self->count = count;
    if (w) waited(self->site_file, self->site_line, w, 0);
    Py_RETURN_NONE;
}

static PyObject *prlock_repr(plock_t *self) {
    return PyUnicode_FromFormat("<%s %s object owner=%lu count=%lu at %p>",
                                self->count ? "locked" : "unlocked", Py_TYPE(self)->tp_name,
                                self->owner, self->count, self);
}

static PyMethodDef prlock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool"},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "release the lock once"},
    {"locked", (PyCFunction)lock_locked, METH_NOARGS, "whether some thread holds the lock"},
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, "acquire the lock"},
    {"__exit__", (PyCFunction)lock_exit, METH_VARARGS, "release the lock"},
    {"_is_owned", (PyCFunction)prlock_is_owned, METH_NOARGS, "held by the calling thread"},
    {"_recursion_count", (PyCFunction)prlock_recursion_count, METH_NOARGS,
     "how many times the calling thread holds it"},
    {"_release_save", (PyCFunction)prlock_release_save, METH_NOARGS, "for Condition.wait"},
    {"_acquire_restore", (PyCFunction)prlock_acquire_restore, METH_VARARGS, "for Condition.wait"},
    {"_at_fork_reinit", (PyCFunction)lock_at_fork_reinit, METH_NOARGS, "a new, unlocked lock"},
    {"__reduce_ex__", no_pickle, METH_VARARGS, "locks cannot be pickled"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject g_prlock_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "middleware._native.ProfiledRLock",
    .tp_basicsize = sizeof(plock_t),
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_repr = (reprfunc)prlock_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A threading.RLock whose waits go to the block profile.",
    .tp_weaklistoffset = offsetof(plock_t, weakreflist),
    .tp_methods = prlock_methods,
    .tp_new = prlock_new,
};

/* ---------------------------------------------------------------- module functions */

static PyObject *py_locks_enable(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"rate_ns", "skip_files", NULL};
    unsigned long long rate;
    PyObject *skip = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|O:locks_enable", kwlist, &rate, &skip))
        return NULL;
    PyObject *seq = skip ? PySequence_Fast(skip, "skip_files must be a sequence of str") : NULL;
    if (skip && !seq) return NULL;
    Py_ssize_t n = seq ? PySequence_Fast_GET_SIZE(seq) : 0;
    if (n > SKIP_FILES_MAX) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "at most %d skip_files", SKIP_FILES_MAX);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_Check(PySequence_Fast_GET_ITEM(seq, i))) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_TypeError, "skip_files must be a sequence of str");
        }
    }
    for (int i = 0; i < g_nskip; i++)
        Py_CLEAR(g_skip[i]);
    g_nskip = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        g_skip[g_nskip++] = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
    Py_XDECREF(seq);
    if (mw_blockprof_enable((uint64_t)rate) != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* lock_waited(delay_ns, file, line, skip=0): a wait measured in Python (asyncio's locks),
 * recorded like a profiled lock's with the calling thread's stack (for a task: its await chain
 * under the event loop's frames) less its `skip` innermost frames, and the label
 * lock=<file>:<line>. */
static PyObject *py_lock_waited(PyObject *self, PyObject *args) {
    (void)self;
    long long delay;
    PyObject *file;
    int line, skip = 0;
    if (!PyArg_ParseTuple(args, "LUi|i:lock_waited", &delay, &file, &line, &skip)) return NULL;
    waited(file, line, delay, skip);
    Py_RETURN_NONE;
}

static PyObject *py_locks_disable(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    mw_blockprof_disable();
    Py_RETURN_NONE;
}

static PyObject *py_locks_stats(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    mw_blockprof_stats_t s;
    mw_blockprof_get_stats(&s);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    if (mw_dict_put_u64(d, "lock_waits", s.waits) ||
        mw_dict_put_u64(d, "lock_waits_recorded", s.recorded) ||
        mw_dict_put_u64(d, "lock_waits_sampled_out", s.sampled_out) ||
        mw_dict_put_u64(d, "lock_waits_dropped", s.dropped) ||
        mw_dict_put_u64(d, "lock_wait_ns", s.wait_ns) ||
        mw_dict_put_u64(d, "lock_rate_ns", s.rate_ns) ||
        mw_dict_put_u64(d, "lock_profiling", s.enabled)) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

PyMethodDef mw_locks_methods[] = {
    {"locks_enable", (PyCFunction)(void (*)(void))py_locks_enable, METH_VARARGS | METH_KEYWORDS,
     "locks_enable(rate_ns, skip_files=()) -> None: record the waits of profiled locks"},
    {"locks_disable", py_locks_disable, METH_NOARGS, "stop recording lock waits"},
    {"lock_waited", py_lock_waited, METH_VARARGS,
     "lock_waited(delay_ns, file, line, skip=0) -> None: record a wait measured by the caller"},
    {"locks_stats", py_locks_stats, METH_NOARGS, "counters of the lock-wait recorder"},
    {NULL, NULL, 0, NULL},
};

int mw_locks_module_init(PyObject *m) {
    static int forked_registered;
    if (!forked_registered) {
        mw_blockprof_register_atfork();
        forked_registered = 1;
    }
    if (PyType_Ready(&g_plock_type) < 0 || PyType_Ready(&g_prlock_type) < 0) return -1;
    if (PyModule_AddObjectRef(m, "ProfiledLock", (PyObject *)&g_plock_type) < 0 ||
        PyModule_AddObjectRef(m, "ProfiledRLock", (PyObject *)&g_prlock_type) < 0)
        return -1;
    return 0;
}
