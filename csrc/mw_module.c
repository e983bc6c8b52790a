/* mw_module — the middleware._native module: thin glue between Python and the native core.
 *
 * Every function here runs in a Python thread with the GIL held, and releases it around
 * anything that may wait (joining the sampler). The other concerns' method tables and init
 * hooks (csrc/mw_module_<concern>.c) are declared in mw_module.h and always linked in.
 *
 * The uploader is not one of them: it is the separate module middleware._upload (libcurl), and
 * this file holds this module's side of the interface in mw_upload.h: the core table exported
 * as a capsule, the registered uploader table the exporter submits through, and the upload_*
 * functions that forward to middleware._upload.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mw_collect.h"
#include "mw_labels.h"
#include "mw_module.h"
#include "mw_pyframes.h"
#include "mw_pyglue.h"
#include "mw_cputimer.h"
#include "mw_exitorder.h"
#include "mw_finishwrite.h"
#include "mw_sampler.h"
#include "mw_symcache.h"
#include "mw_termflush.h"
#include "mw_termguard.h"
#include "mw_threads.h"
#include "mw_unwind.h"
#include "mw_upload.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/syscall.h>
#include <unistd.h>

static PyObject *py_start(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"rate_hz", "max_depth", "max_stacks", "wall_hz", "max_frames", NULL};
    int rate = 100, depth = 1024, max_stacks = 0, wall = 0, max_frames = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iiiii", kwlist, &rate, &depth, &max_stacks, &wall,
                                     &max_frames))
        return NULL;
    if (wall < 0 || wall > 10000) {
        PyErr_SetString(PyExc_ValueError, "wall_hz must be within 1..10000 (0: default)");
        return NULL;
    }
    if (rate < 1 || rate > 10000) {
        PyErr_SetString(PyExc_ValueError, "rate_hz must be within 1..10000");
        return NULL;
    }
    if (mw_sampler_running()) Py_RETURN_FALSE;
    if (mw_pyframes_init() != 0) return NULL;
    mw_sampler_config_t cfg = {.rate_hz = rate, .max_depth = depth, .wall_hz = wall};
    mw_profbuf_default_limits(&cfg.limits);
    if (max_stacks > 0) cfg.limits.max_stacks = (uint32_t)max_stacks;
    if (max_frames > 0) cfg.limits.max_frames = (uint32_t)max_frames;
    const char *why = "unknown error";
    int rc = mw_sampler_start(&cfg, &why);
    if (rc < 0) {
        PyErr_Format(PyExc_RuntimeError, "middleware: cannot start the sampler: %s", why);
        return NULL;
    }
    /* The starting thread's CPU timer now (in a fork child: the only thread, from its start). */
    mw_sampler_thread_started((long)syscall(SYS_gettid), (uintptr_t)PyThreadState_Get(), 0);
    if (mw_collect_init() != 0) { /* no window could be taken: the sampler goes too */
        PyThreadState *ts = PyEval_SaveThread();
        mw_sampler_stop();
        PyEval_RestoreThread(ts);
        PyErr_SetString(PyExc_MemoryError, "middleware: no memory for the profile's buffers");
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *py_stop(PyObject *self, PyObject *noargs) {
    Py_BEGIN_ALLOW_THREADS mw_sampler_stop();
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_running(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(mw_sampler_running());
}

static PyObject *py_stats(PyObject *self, PyObject *noargs) {
    mw_sampler_stats_t s;
    mw_symcache_stats_t c;
    mw_cputimer_stats_t t;
    /* the CPU-timer mode, once the sampler thread's first probe has said it */
    if (mw_sampler_probe_pending()) {
        PyThreadState *ts = PyEval_SaveThread();
        mw_sampler_wait_probe();
        PyEval_RestoreThread(ts);
    }
    mw_sampler_get_stats(&s);
    mw_symcache_get_stats(&c);
    mw_cputimer_get_stats(&t);
    mw_spansets_stats_t sp;
    mw_labels_span_stats(&sp);
    uint64_t fw_n, fw_bytes, fw_watched;
    mw_finishwrite_stats(&fw_n, &fw_bytes, &fw_watched);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    if (mw_dict_put_u64(d, "ticks", s.ticks) || mw_dict_put_u64(d, "samples", s.samples) ||
        mw_dict_put_u64(d, "cpu_samples", s.cpu_samples) ||
        mw_dict_put_u64(d, "dropped", s.dropped) ||
        mw_dict_put_u64(d, "torn_reads", s.torn_reads) ||
        mw_dict_put_u64(d, "truncated", s.truncated) ||
        mw_dict_put_u64(d, "overflow", s.overflow + mw_collect_overflow()) ||
        mw_dict_put_u64(d, "overflow_kept", s.overflow_kept) ||
        mw_dict_put_u64(d, "threads_seen", s.threads_seen) ||
        mw_dict_put_u64(d, "threads_gone", s.threads_gone) ||
        mw_dict_put_u64(d, "threads_unborn", s.unborn) ||
        mw_dict_put_u64(d, "sampler_cpu_ns", s.sampler_cpu_ns) ||
        mw_dict_put_u64(d, "tick_ns_max", s.tick_ns_max) ||
        mw_dict_put_u64(d, "tick_ns_total", s.tick_ns_total) ||
        mw_dict_put_u64(d, "late_ticks", s.late_ticks) ||
        mw_dict_put_u64(d, "tick_late_ns", s.tick_late_ns) ||
        mw_dict_put_u64(d, "sampler_slice_ns", s.sampler_slice_ns) ||
        mw_dict_put_u64(d, "tick_placed", s.tick_placed) ||
        mw_dict_put_u64(d, "timer_unplaced", s.timer_unplaced) ||
        mw_dict_put_u64(d, "cpu_timer_backlog_max", s.timer_backlog_max) ||
        mw_dict_put_u64(d, "cpu_timer_drains", s.timer_drains) ||
        mw_dict_put_u64(d, "saferead_failures", s.saferead_failures) ||
        mw_dict_put_u64(d, "label_races", s.label_races) ||
        mw_dict_put_u64(d, "walk_retries", s.walk_retries) ||
        mw_dict_put_u64(d, "reused", s.reused) || mw_dict_put_u64(d, "quiet", s.quiet) ||
        mw_dict_put_u64(d, "quiet_ticks", s.quiet_ticks) ||
        mw_dict_put_u64(d, "paused", s.paused) || mw_dict_put_u64(d, "preempted", s.preempted) ||
        mw_dict_put_u64(d, "preempted_released", s.preempted_released) ||
        mw_dict_put_u64(d, "preempt_checks", s.preempt_checks) ||
        mw_dict_put_u64(d, "names_unsettled", s.names_unsettled) ||
        mw_dict_put_u64(d, "threads_cut", s.threads_cut) ||
        mw_dict_put_u64(d, "signals_blocked", s.signals_blocked) ||
        mw_dict_put_u64(d, "signal_taken", s.signal_taken) ||
        mw_dict_put_u64(d, "sigblk_placed", s.sigblk_placed) ||
        mw_dict_put_u64(d, "timer_late", s.timer_late) ||
        mw_dict_put_u64(d, "unverified", s.unverified) ||
        mw_dict_put_u64(d, "native_spared_writes", s.native_spared_writes) ||
        mw_dict_put_u64(d, "can_pause", s.can_pause) ||
        mw_dict_put_u64(d, "unproven", s.unproven) ||
        mw_dict_put_u64(d, "cpu_unattributed_ns", s.cpu_unattributed_ns) ||
        mw_dict_put_u64(d, "timer_samples", s.timer_samples) ||
        mw_dict_put_u64(d, "owed", s.owed) || mw_dict_put_u64(d, "names_lost", s.names_lost) ||
        mw_dict_put_u64(d, "wall_unattributed_ns", s.wall_unattributed_ns) ||
        mw_dict_put_u64(d, "stop_timeouts", s.stop_timeouts) ||
        mw_dict_put_u64(d, "native_threads", s.native_threads) ||
        mw_dict_put_u64(d, "native_thread_cpu_ns", s.native_thread_cpu_ns) ||
        mw_dict_put_u64(d, "native_thread_samples", s.native_thread_samples) ||
        mw_dict_put_u64(d, "native_scans", s.native_scans) ||
        mw_dict_put_u64(d, "native_threads_untracked", s.native_threads_untracked) ||
        mw_dict_put_u64(d, "exited_thread_cpu_ns", s.exited_thread_cpu_ns) ||
        mw_dict_put_u64(d, "exited_unknown", s.exited_unknown) ||
        mw_dict_put_u64(d, "exit_tail_cpu_ns", s.exit_tail_cpu_ns) ||
        mw_dict_put_u64(d, "exits_lost", s.exits_lost) ||
        mw_dict_put_u64(d, "cpu_timer_mode", t.mode) ||
        mw_dict_put_u64(d, "cpu_timer_armed", t.armed) ||
        mw_dict_put_u64(d, "cpu_timer_arm_failed", t.arm_failed) ||
        mw_dict_put_u64(d, "cpu_timer_signals", t.signals) ||
        mw_dict_put_u64(d, "cpu_timer_recorded", t.recorded) ||
        mw_dict_put_u64(d, "cpu_timer_periods", t.periods) ||
        mw_dict_put_u64(d, "cpu_timer_no_record", t.no_record) ||
        mw_dict_put_u64(d, "cpu_timer_no_scratch", t.no_scratch) ||
        mw_dict_put_u64(d, "cpu_timer_torn", t.torn) ||
        mw_dict_put_u64(d, "cpu_timer_faults", t.faults) ||
        mw_dict_put_u64(d, "cpu_timer_stale", t.stale) ||
        mw_dict_put_u64(d, "cpu_timer_early", t.early) ||
        mw_dict_put_u64(d, "cpu_timer_exit_periods", t.exit_periods) ||
        mw_dict_put_u64(d, "cpu_timer_steal_ns", t.steal_ns) ||
        mw_dict_put_u64(d, "cpu_timer_revived", t.revived) ||
        mw_dict_put_u64(d, "cpu_timer_fds_lost", t.fds_lost) ||
        mw_dict_put_u64(d, "cpu_timer_sigtrap", t.sigtrap) ||
        mw_dict_put_u64(d, "cut_writes_finished", fw_n) ||
        mw_dict_put_u64(d, "cut_writes_bytes", fw_bytes) ||
        mw_dict_put_u64(d, "cut_writes_watched", fw_watched) ||
        mw_dict_put_u64(d, "handler_ns", t.handler_ns) ||
        mw_dict_put_u64(d, "tick_rate", (uint64_t)mw_sampler_tick_rate()) ||
        mw_dict_put_u64(d, "symcache_aborted", c.aborted) ||
        mw_dict_put_u64(d, "symcache_hits", c.hits) ||
        mw_dict_put_u64(d, "symcache_misses", c.misses) ||
        mw_dict_put_u64(d, "symcache_resets", c.resets) ||
        mw_dict_put_u64(d, "symbol_read_failures", c.read_failures) ||
        mw_dict_put_u64(d, "labelsets_refused", mw_labels_refused()) ||
        mw_dict_put_u64(d, "spansets_created", sp.created) ||
        mw_dict_put_u64(d, "spansets_refused", sp.refused) ||
        mw_dict_put_u64(d, "spansets_released", sp.released) ||
        mw_dict_put_u64(d, "spansets_reclaimed", sp.reclaimed) ||
        mw_dict_put_u64(d, "spansets_linked", sp.linked) ||
        mw_dict_put_u64(d, "spansets_link_missed", sp.link_missed) ||
        mw_dict_put_u64(d, "spansets_live", sp.live) ||
        mw_dict_put_u64(d, "threads_refused", mw_threads_refused())) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

typedef struct {
    PyObject *list;
    int failed;
} snap_ctx_t;

static PyObject *str_of(const mw_profbuf_t *b, mw_id_t id) {
    size_t len = 0;
    const char *s = mw_profbuf_str(b, id, &len);
    if (!s) return PyUnicode_FromString("");
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)len, "replace");
}

static void snap_visit(const mw_profbuf_t *b, void *arg) {
    snap_ctx_t *ctx = arg;
    if (ctx->failed) return;
    uint32_t nf = mw_profbuf_nframes(b);
    PyObject **frames = PyMem_Calloc(nf + 1, sizeof(PyObject *));
    if (!frames) {
        ctx->failed = 1;
        return;
    }
    for (uint32_t i = 1; i <= nf && !ctx->failed; i++) {
        const mw_frame_t *f = mw_profbuf_frame(b, i);
        PyObject *name = str_of(b, f->name), *file = str_of(b, f->file);
        frames[i] = (name && file) ? Py_BuildValue("(OOi)", name, file, (int)f->line) : NULL;
        Py_XDECREF(name);
        Py_XDECREF(file);
        if (!frames[i]) ctx->failed = 1;
    }
    uint32_t ns = mw_profbuf_nstacks(b);
    for (uint32_t i = 0; i < ns && !ctx->failed; i++) {
        const mw_stack_t *s = mw_profbuf_stack(b, i);
        const mw_id_t *ids = mw_profbuf_stack_frames(b, s);
        PyObject *tup = PyTuple_New(s->depth);
        if (!tup) {
            ctx->failed = 1;
            break;
        }
        for (uint32_t d = 0; d < s->depth; d++) {
            PyObject *fr = (ids[d] >= 1 && ids[d] <= nf) ? frames[ids[d]] : Py_None;
            Py_INCREF(fr);
            PyTuple_SET_ITEM(tup, d, fr);
        }
        PyObject *thread = str_of(b, s->thread);
        PyObject *row = thread ? Py_BuildValue("(NNIKKKK)", tup, thread, s->labelset,
                                               (unsigned long long)s->v.cpu_samples,
                                               (unsigned long long)s->v.cpu_ns,
                                               (unsigned long long)s->v.wall_samples,
                                               (unsigned long long)s->v.wall_ns)
                               : NULL;
        if (!thread) Py_DECREF(tup);
        if (!row || PyList_Append(ctx->list, row) != 0) ctx->failed = 1;
        Py_XDECREF(row);
    }
    for (uint32_t i = 1; i <= nf; i++)
        Py_XDECREF(frames[i]);
    PyMem_Free(frames);
}

static PyObject *py_snapshot(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &reset)) return NULL;
    snap_ctx_t ctx = {PyList_New(0), 0};
    if (!ctx.list) return NULL;
    int64_t start = mw_collect_start_ns();
    mw_collect_visit(snap_visit, &ctx);
    if (ctx.failed) {
        Py_DECREF(ctx.list);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    if (reset) mw_collect_reset(1);
    return Py_BuildValue("(LLN)", (long long)start, (long long)mw_now_realtime_ns(), ctx.list);
}

static PyObject *py_set_thread_name(PyObject *self, PyObject *args) {
    long tid;
    const char *name;
    if (!PyArg_ParseTuple(args, "ls", &tid, &name)) return NULL;
    return PyBool_FromLong(mw_threads_set_name(tid, name) == 0);
}

static PyObject *py_forget_thread(PyObject *self, PyObject *args) {
    long tid;
    if (!PyArg_ParseTuple(args, "l", &tid)) return NULL;
    mw_threads_forget(tid);
    mw_cputimer_forget(tid); /* its CPU timer too (a dead thread's timer never fires) */
    Py_RETURN_NONE;
}

/* The calling thread's kernel id, cached per thread; after a fork (pthread_atfork: any fork,
 * os.fork or a C library's) the child's thread looks it up again. */
static __thread long t_tid;
static __thread unsigned t_tid_gen;
static unsigned g_fork_gen = 1;

static void tid_after_fork_child(void) {
    g_fork_gen++;
}

long mw_module_tid(void) {
    if (t_tid_gen != g_fork_gen) {
        t_tid = (long)syscall(SYS_gettid);
        t_tid_gen = g_fork_gen;
    }
    return t_tid;
}

/* middleware.labels writes the calling thread's slot at every label change and greenlet switch:
 * without a gettid system call each time (~0.3 us here). */
static PyObject *py_set_labelset_here(PyObject *self, PyObject *arg) {
    unsigned long id = PyLong_AsUnsignedLong(arg);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (id > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "label set id out of range");
        return NULL;
    }
    return PyBool_FromLong(mw_threads_set_labelset(mw_module_tid(), (uint32_t)id) == 0);
}

static PyObject *py_set_thread_labelset(PyObject *self, PyObject *args) {
    long tid;
    unsigned int id;
    if (!PyArg_ParseTuple(args, "lI", &tid, &id)) return NULL;
    return PyBool_FromLong(mw_threads_set_labelset(tid, id) == 0);
}

static PyObject *py_labelset(PyObject *self, PyObject *pairs) {
    PyObject *seq = PySequence_Fast(pairs, "labelset() takes a sequence of (key, value) pairs");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MW_LABELS_PER_SET) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %d labels per set", MW_LABELS_PER_SET);
        return NULL;
    }
    const char *keys[MW_LABELS_PER_SET], *vals[MW_LABELS_PER_SET];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(p) || PyTuple_GET_SIZE(p) != 2 ||
            !(keys[i] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(p, 0))) ||
            !(vals[i] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(p, 1)))) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "labels must be (str, str) pairs");
            return NULL;
        }
    }
    uint32_t id = mw_labels_intern(keys, vals, (int)n);
    Py_DECREF(seq);
    return PyLong_FromUnsignedLong(id);
}

static PyObject *py_labelset_pairs(PyObject *self, PyObject *args) {
    unsigned int id;
    if (!PyArg_ParseTuple(args, "I", &id)) return NULL;
    const char *const *k = NULL, *const *v = NULL;
    int n = mw_labels_get(id, &k, &v);
    if (n < 0) {
        PyErr_Format(PyExc_KeyError, "unknown label set %u", id);
        return NULL;
    }
    PyObject *t = PyTuple_New(n);
    if (!t) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *p = Py_BuildValue("(ss)", k[i], v[i]);
        if (!p) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, p);
    }
    return t;
}

static PyObject *py_span_labelset(PyObject *self, PyObject *args) {
    unsigned int base;
    const char *span, *trace, *name;
    if (!PyArg_ParseTuple(args, "Isss", &base, &span, &trace, &name)) return NULL;
    return PyLong_FromUnsignedLong(mw_labels_intern_span(base, span, trace, name));
}

/* SpanSets: middleware.labels.SpanId._ids, a dict (base label set id -> the span's set over it)
 * that releases the span sets it holds when it is deallocated with its SpanId (no Python
 * __del__ at each request's end). */
static void spansets_release(PyObject *self) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(self, &pos, &k, &v)) {
        unsigned long lid = PyLong_Check(v) ? PyLong_AsUnsignedLong(v) : 0;
        if (lid == (unsigned long)-1 && PyErr_Occurred())
            PyErr_Clear();
        else if (lid && lid <= UINT32_MAX)
            mw_labels_release_span((uint32_t)lid); /* idempotent; ignores other ids */
    }
}

static void spansets_dealloc(PyObject *self) {
    spansets_release(self);
    PyDict_Type.tp_dealloc(self); /* frees through the type's tp_free */
}

/* The garbage collector empties a dict of a cycle before it goes: release first. */
static int spansets_clear(PyObject *self) {
    spansets_release(self);
    return PyDict_Type.tp_clear(self);
}

PyTypeObject mw_spansets_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "middleware._native.SpanSets",
    .tp_basicsize = sizeof(PyDictObject),
    .tp_dealloc = spansets_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, /* tp_traverse: dict's, set at init */
    .tp_clear = spansets_clear,
    .tp_doc = "A dict of a span's label sets (base id -> span set id), released when it goes.",
};

static int spansets_init(PyObject *m) {
    mw_spansets_type.tp_base = &PyDict_Type;
    mw_spansets_type.tp_traverse = PyDict_Type.tp_traverse;
    if (PyType_Ready(&mw_spansets_type) < 0) return -1;
    return PyModule_AddObjectRef(m, "SpanSets", (PyObject *)&mw_spansets_type);
}

static PyObject *py_count_request(PyObject *self, PyObject *arg) {
    unsigned long id = PyLong_AsUnsignedLong(arg);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(id <= UINT32_MAX && mw_labels_count_request((uint32_t)id) == 0);
}

static PyObject *py_termguard_arm(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(mw_termguard_arm() == 0);
}

static PyObject *py_termguard_rekicks(PyObject *self, PyObject *noargs) {
    return PyLong_FromUnsignedLong(mw_termguard_rekicks());
}

static PyObject *py_sampling_signal(PyObject *self, PyObject *noargs) {
    int sig = mw_unwind_signal();
    return PyLong_FromLong(sig && !mw_unwind_released() && mw_unwind_signal_ours() ? sig : 0);
}

static PyObject *py_release_signal(PyObject *self, PyObject *args) {
    double timeout = 0.1;
    if (!PyArg_ParseTuple(args, "|d", &timeout)) return NULL;
    int sig = mw_sampler_release_signal(), drained = 1;
    if (sig) { /* those already queued reach our handler before the app's disposition is in */
        Py_BEGIN_ALLOW_THREADS;
        int64_t waited = 0;
        while ((drained = !mw_threads_signal_pending(sig)) == 0 &&
               waited < (int64_t)(timeout * 1e9)) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
            waited += 1000000;
        }
        Py_END_ALLOW_THREADS;
    }
    return Py_BuildValue("(iO)", sig, drained ? Py_True : Py_False);
}

static PyObject *py_termflush_arm(PyObject *self, PyObject *noargs) {
    int r = mw_termflush_arm();
    if (r < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(r);
}

static PyObject *py_atexit_run_last(PyObject *self, PyObject *func) {
    return PyBool_FromLong(mw_exitorder_run_last(func));
}

static PyObject *py_build_info(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:s}", "python", mw_pyframes_version());
}

static PyMethodDef core_methods[] = {
    {"start", (PyCFunction)(void (*)(void))py_start, METH_VARARGS | METH_KEYWORDS,
     "start(rate_hz=100, max_depth=1024, max_stacks=0, wall_hz=0, max_frames=0) -> bool: start "
     "the sampler thread (wall_hz: cap of the tick rate when CPU timers give the CPU samples; 0 = "
     "100; max_stacks/max_frames: a window's table sizes, 0 = 32768/65536)"},
    {"stop", py_stop, METH_NOARGS, "stop the sampler thread (joins it)"},
    {"running", py_running, METH_NOARGS, "is the sampler thread running"},
    {"stats", py_stats, METH_NOARGS, "counters of the sampler"},
    {"sampling_signal", py_sampling_signal, METH_NOARGS,
     "the real-time signal the sampler sends (CPU timers, pauses), 0 when none"},
    {"release_signal", py_release_signal, METH_VARARGS,
     "release_signal(timeout=0.1) -> (signal, drained): the app takes our signal: stop sending it "
     "and wait until no thread has it pending"},
    {"termflush_arm", py_termflush_arm, METH_NOARGS,
     "termflush_arm() -> bool: where SIGTERM's (SIGHUP's) disposition is the default, the signal "
     "exports the last window, then ends the process as the default would (csrc/mw_termflush.h); "
     "False: the app has its own SIGTERM disposition"},
    {"atexit_run_last", py_atexit_run_last, METH_O,
     "atexit_run_last(func) -> bool: func's atexit registration runs after every other one "
     "(csrc/mw_exitorder.h); False when func is not registered"},
    {"snapshot", (PyCFunction)(void (*)(void))py_snapshot, METH_VARARGS | METH_KEYWORDS,
     "snapshot(reset=False) -> (start_ns, end_ns, rows)"},
    {"set_thread_name", py_set_thread_name, METH_VARARGS, "set_thread_name(tid, name)"},
    {"forget_thread", py_forget_thread, METH_VARARGS, "forget_thread(tid)"},
    {"set_thread_labelset", py_set_thread_labelset, METH_VARARGS, "set_thread_labelset(tid, id)"},
    {"set_labelset_here", py_set_labelset_here, METH_O, "set_labelset_here(id): this thread's"},
    {"labelset", py_labelset, METH_O, "labelset(pairs) -> id (0 = none / registry full)"},
    {"labelset_pairs", py_labelset_pairs, METH_VARARGS, "labelset_pairs(id) -> pairs"},
    {"span_labelset", py_span_labelset, METH_VARARGS,
     "span_labelset(base, span_id, trace_id, span_name) -> id (0 = refused)"},
    {"termguard_arm", py_termguard_arm, METH_NOARGS,
     "termguard_arm() -> bool: put the SIGTERM guard in front of SIGTERM's Python handler, from "
     "the main thread (csrc/mw_termguard.h)"},
    {"termguard_rekicks", py_termguard_rekicks, METH_NOARGS,
     "termguard_rekicks() -> int: SIGTERMs the guard re-sent to the main thread"},
    {"count_request", py_count_request, METH_O,
     "count_request(id) -> bool: one request served under label set id (a comment of the next "
     "CPU profile; False for an unknown id)"},
    {"build_info", py_build_info, METH_NOARGS, "what the extension was built for"},
    {NULL, NULL, 0, NULL},
};

/* ---- the uploader (middleware._upload), see mw_upload.h ------------------------------------ */

#define MW_UPLOAD_MODULE "middleware._upload"

/* Set once by middleware._upload's init; never unset. */
static _Atomic(const mw_upload_api_t *) g_uploader;

static void set_uploader(const mw_upload_api_t *table) {
    atomic_store(&g_uploader, table);
}

static const mw_core_api_t g_core_api = {MW_UPLOAD_ABI, mw_report_once, mw_report_done,
                                         mw_report_reset_after_fork, set_uploader};

int mw_upload_submit_registered(const void *gz_pprof, size_t len, int64_t from_unix_s,
                                int64_t until_unix_s, const char *name) {
    const mw_upload_api_t *up = atomic_load(&g_uploader);
    if (up) return up->submit(gz_pprof, len, from_unix_s, until_unix_s, name);
    mw_report_once(MW_REPORT_UPLOAD_DROPPED,
                   "uploading is on but the uploader (" MW_UPLOAD_MODULE ") was never loaded in "
                   "process %ld; its profiles are not uploaded",
                   (long)getpid());
    return -1;
}

int mw_upload_flush_registered(double deadline_s) {
    const mw_upload_api_t *up = atomic_load(&g_uploader);
    return up ? up->flush(deadline_s) : 0;
}

/* upload_start: imports middleware._upload (the only place that does), then forwards. */
static PyObject *py_upload_start(PyObject *self, PyObject *args, PyObject *kw) {
    PyObject *mod = PyImport_ImportModule(MW_UPLOAD_MODULE);
    if (!mod) {
        /* The reason (e.g. "libcurl.so.4: cannot open shared object file") goes into one
         * stderr line and into the ImportError raised instead. */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *exc = PyErr_GetRaisedException();
#else
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
#endif
        PyObject *text = exc ? PyObject_Str(exc) : NULL;
        const char *why = text ? PyUnicode_AsUTF8(text) : NULL;
        if (!why) {
            PyErr_Clear();
            why = "unknown error";
        }
        mw_report_once(MW_REPORT_UPLOAD_DROPPED,
                       "uploading is configured but the uploader (" MW_UPLOAD_MODULE
                       ", linked against libcurl) cannot be loaded: %.300s; no profile of "
                       "process %ld is uploaded",
                       why, (long)getpid());
        PyErr_Format(PyExc_ImportError,
                     "the uploader (" MW_UPLOAD_MODULE ", linked against libcurl) cannot be "
                     "loaded: %s",
                     why);
        Py_XDECREF(text);
        Py_XDECREF(exc);
        return NULL;
    }
    PyObject *fn = PyObject_GetAttrString(mod, "upload_start");
    Py_DECREF(mod);
    if (!fn) return NULL;
    PyObject *r = PyObject_Call(fn, args, kw);
    Py_DECREF(fn);
    return r;
}

/* The other upload_* functions: the same function of middleware._upload when it is loaded,
 * else what a stopped uploader answers (`idle`, a new reference), without loading it. */
static PyObject *forward_upload(const char *name, PyObject *args, PyObject *kw, PyObject *idle) {
    if (!atomic_load(&g_uploader)) return idle;
    Py_XDECREF(idle);
    PyObject *mod = PyImport_ImportModule(MW_UPLOAD_MODULE);
    if (!mod) return NULL;
    PyObject *fn = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    if (!fn) return NULL;
    PyObject *r = PyObject_Call(fn, args, kw);
    Py_DECREF(fn);
    return r;
}

static PyObject *py_upload_submit(PyObject *self, PyObject *args, PyObject *kw) {
    return forward_upload("upload_submit", args, kw, PyBool_FromLong(0));
}

static PyObject *py_upload_flush(PyObject *self, PyObject *args, PyObject *kw) {
    return forward_upload("upload_flush", args, kw, PyLong_FromLong(0));
}

static PyObject *py_upload_stop(PyObject *self, PyObject *args, PyObject *kw) {
    return forward_upload("upload_stop", args, kw, Py_NewRef(Py_None));
}

static PyObject *py_upload_running(PyObject *self, PyObject *args, PyObject *kw) {
    return forward_upload("upload_running", args, kw, PyBool_FromLong(0));
}

static PyObject *py_upload_stats(PyObject *self, PyObject *args, PyObject *kw) {
    mw_upload_stats_t zero;
    memset(&zero, 0, sizeof zero);
    PyObject *idle = atomic_load(&g_uploader) ? NULL : mw_upload_stats_dict(&zero);
    if (!idle && PyErr_Occurred()) return NULL;
    return forward_upload("upload_stats", args, kw, idle);
}

static PyObject *py_upload_take_message(PyObject *self, PyObject *args, PyObject *kw) {
    return forward_upload("upload_take_message", args, kw, Py_NewRef(Py_None));
}

#define MW_FWD(f) (PyCFunction)(void (*)(void))(f), METH_VARARGS | METH_KEYWORDS
static PyMethodDef upload_methods[] = {
    {"upload_start", MW_FWD(py_upload_start),
     "upload_start(**config) -> None: import " MW_UPLOAD_MODULE " and start the uploader "
     "(ImportError when it cannot be loaded, RuntimeError when it cannot start)"},
    {"upload_submit", MW_FWD(py_upload_submit),
     "upload_submit(data, from_s, until_s) -> bool (" MW_UPLOAD_MODULE ")"},
    {"upload_flush", MW_FWD(py_upload_flush),
     "upload_flush(deadline) -> int (" MW_UPLOAD_MODULE ")"},
    {"upload_stop", MW_FWD(py_upload_stop), "upload_stop(deadline) -> None (" MW_UPLOAD_MODULE ")"},
    {"upload_running", MW_FWD(py_upload_running),
     "upload_running() -> bool (" MW_UPLOAD_MODULE ")"},
    {"upload_stats", MW_FWD(py_upload_stats),
     "upload_stats() -> dict[str, int] (" MW_UPLOAD_MODULE "; zeros before upload_start)"},
    {"upload_take_message", MW_FWD(py_upload_take_message),
     "upload_take_message(with_level=False) -> str | tuple[int, str] | None (" MW_UPLOAD_MODULE
     ")"},
    {NULL, NULL, 0, NULL},
};
#undef MW_FWD

static PyMethodDef *g_all_methods;

static size_t count_methods(const PyMethodDef *t) {
    size_t n = 0;
    while (t[n].ml_name)
        n++;
    return n;
}

static struct PyModuleDef g_moddef = {
    PyModuleDef_HEAD_INIT,
    "middleware._native",
    "Native sampling core of middleware (see csrc/).",
    -1,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit__native(void) {
    const PyMethodDef *tables[] = {core_methods,      upload_methods,   mw_export_methods,
                                   mw_unwind_methods, mw_locks_methods, mw_memory_methods,
                                   mw_otel_methods,   mw_tasks_methods};
    size_t total = 0;
    for (size_t i = 0; i < sizeof tables / sizeof *tables; i++)
        total += count_methods(tables[i]);
    if (!g_all_methods) {
        g_all_methods = PyMem_Calloc(total + 1, sizeof(PyMethodDef));
        if (!g_all_methods) return PyErr_NoMemory();
        size_t o = 0;
        for (size_t i = 0; i < sizeof tables / sizeof *tables; i++) {
            size_t n = count_methods(tables[i]);
            if (n) memcpy(g_all_methods + o, tables[i], n * sizeof(PyMethodDef));
            o += n;
        }
        g_moddef.m_methods = g_all_methods;
        mw_sampler_register_atfork();
        mw_collect_register_atfork();
        pthread_atfork(NULL, NULL, tid_after_fork_child);
    }
    PyObject *m = PyModule_Create(&g_moddef);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_LABELS_PER_SET", MW_LABELS_PER_SET) ||
        PyModule_AddStringConstant(m, "PYTHON_VERSION", mw_pyframes_version())) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *core = PyCapsule_New((void *)&g_core_api, MW_CORE_API_CAPSULE, NULL);
    int rc = core ? PyModule_AddObjectRef(m, "_core_api", core) : -1;
    Py_XDECREF(core);
    if (rc != 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (mw_export_module_init(m) != 0 || mw_locks_module_init(m) != 0 ||
        mw_memory_module_init(m) != 0 || spansets_init(m) != 0 || mw_otel_module_init(m) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
