/* mw_module_export — Python glue for the exporter (mw_export.h), the pprof encoder and the
 * local store. Appended to middleware._native by csrc/mw_module.c (declared in mw_module.h):
 *
 *   export_start(interval_s, service, profile_dir=None, store_max_bytes=0, upload=False,
 *                labels=()) -> bool
 *       starts the exporter thread; False when it was already running (left as is).
 *       store_max_bytes 0 = 256 MiB. labels: (key, value) pairs of str put on every sample of
 *       every profile (at most MW_PPROF_MAX_STATIC; keys valid label names, not thread_name
 *       nor pid, no key twice). ValueError for a bad interval or label, RuntimeError otherwise.
 *   export_flush(timeout_s=10.0) -> bool     export now and wait (GIL released)
 *   export_stop(timeout_s=10.0) -> bool      final export, join; False if it had to give up
 *   export_running() -> bool
 *   export_stats() -> dict[str, int]         the mw_export_stats_t fields
 *   encode_snapshot() -> bytes               gzipped pprof of everything since start
 *   _debug_fill_active(n, depth=16) -> int   TEST ONLY: n synthetic distinct stacks
 *
 * Every function runs with the GIL held and releases it around anything that waits or
 * encodes. mw_export_module_init registers the fork handlers (once per process).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mw_export.h"
#include "mw_module.h"
#include "mw_pprof.h"
#include "mw_pyglue.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* Reads labels (a sequence of (str, str)) into keys/vals, borrowed from the items (kept alive by
 * *seq, a new reference the caller releases). -1 with a Python exception set. */
static int parse_labels(PyObject *labels, PyObject **seq, const char **keys, const char **vals,
                        uint32_t *n) {
    *n = 0;
    *seq = NULL;
    if (!labels || labels == Py_None) return 0;
    *seq = PySequence_Fast(labels, "labels must be a sequence of (key, value) pairs");
    if (!*seq) return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(*seq);
    if (len > MW_PPROF_MAX_STATIC) {
        PyErr_Format(PyExc_ValueError, "at most %d labels", MW_PPROF_MAX_STATIC);
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(*seq, i);
        const char *k, *v;
        if (!PyTuple_Check(pair) || !PyArg_ParseTuple(pair, "ss", &k, &v)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "labels must be (key, value) pairs of str");
            return -1;
        }
        int bad = !mw_pprof_label_key_ok(k) || strcmp(k, "thread_name") == 0 ||
                  strcmp(k, "pid") == 0 || !*v;
        for (uint32_t j = 0; j < *n && !bad; j++)
            bad = strcmp(keys[j], k) == 0;
        if (bad) {
            PyErr_Format(PyExc_ValueError, "bad static label %R", pair);
            return -1;
        }
        keys[*n] = k;
        vals[*n] = v;
        (*n)++;
    }
    return 0;
}

static PyObject *py_export_start(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"interval_s", "service", "profile_dir", "store_max_bytes",
                             "upload",     "labels",  NULL};
    mw_export_config_t c = {0};
    unsigned long long max_bytes = 0;
    int upload = 0;
    PyObject *labels = NULL, *seq = NULL;
    const char *keys[MW_PPROF_MAX_STATIC], *vals[MW_PPROF_MAX_STATIC];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ds|zKpO:export_start", kwlist, &c.interval_s,
                                     &c.service, &c.profile_dir, &max_bytes, &upload, &labels))
        return NULL;
    if (!(c.interval_s >= MW_EXPORT_MIN_INTERVAL_S) || c.interval_s > 86400.0) {
        PyErr_SetString(PyExc_ValueError, "interval_s must be within 0.01..86400 seconds");
        return NULL;
    }
    if (parse_labels(labels, &seq, keys, vals, &c.nlabels) != 0) {
        Py_XDECREF(seq);
        return NULL;
    }
    c.label_keys = keys;
    c.label_vals = vals;
    c.store_max_bytes = max_bytes;
    c.upload = upload;
    const char *why = "unknown error";
    int rc = mw_export_start(&c, &why); /* quick: copies the config, creates a thread */
    Py_XDECREF(seq);
    if (rc < 0) {
        PyErr_Format(PyExc_RuntimeError, "middleware: cannot start the exporter: %s", why);
        return NULL;
    }
    return PyBool_FromLong(rc == 0);
}

/* export_flush / export_stop: fn(timeout_s) without the GIL; True when it returned 0. */
static PyObject *call_with_timeout(PyObject *args, PyObject *kw, const char *format,
                                   int (*fn)(double)) {
    static char *kwlist[] = {"timeout_s", NULL};
    double t = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &t)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = fn(t);
    Py_END_ALLOW_THREADS return PyBool_FromLong(rc == 0);
}

static PyObject *py_export_flush(PyObject *self, PyObject *args, PyObject *kw) {
    return call_with_timeout(args, kw, "|d:export_flush", mw_export_flush);
}

static PyObject *py_export_stop(PyObject *self, PyObject *args, PyObject *kw) {
    return call_with_timeout(args, kw, "|d:export_stop", mw_export_stop);
}

static PyObject *py_export_running(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(mw_export_running());
}

static PyObject *py_export_stats(PyObject *self, PyObject *noargs) {
    mw_export_stats_t s;
    mw_export_get_stats(&s);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    if (mw_dict_put_u64(d, "exports", s.exports) ||
        mw_dict_put_u64(d, "export_errors", s.export_errors) ||
        mw_dict_put_u64(d, "encode_errors", s.encode_errors) ||
        mw_dict_put_u64(d, "store_errors", s.store_errors) ||
        mw_dict_put_u64(d, "upload_errors", s.upload_errors) ||
        mw_dict_put_u64(d, "uploads_submitted", s.uploads_submitted) ||
        mw_dict_put_u64(d, "empty_windows", s.empty_windows) ||
        mw_dict_put_u64(d, "rotate_failures", s.rotate_failures) ||
        mw_dict_put_u64(d, "flushes", s.flushes) ||
        mw_dict_put_u64(d, "fork_buffers_recovered", s.fork_buffers_recovered) ||
        mw_dict_put_u64(d, "bytes_written", s.bytes_written) ||
        mw_dict_put_u64(d, "files_written", s.files_written) ||
        mw_dict_put_u64(d, "files_evicted", s.files_evicted) ||
        mw_dict_put_u64(d, "bytes_evicted", s.bytes_evicted) ||
        mw_dict_put_u64(d, "store_dir_bytes", s.store_dir_bytes) ||
        mw_dict_put_u64(d, "labels_skipped", s.labels_skipped) ||
        mw_dict_put_u64(d, "last_export_cpu_ns", s.last_export_cpu_ns) ||
        mw_dict_put_u64(d, "max_export_cpu_ns", s.max_export_cpu_ns) ||
        mw_dict_put_u64(d, "total_export_cpu_ns", s.total_export_cpu_ns) ||
        mw_dict_put_u64(d, "last_export_wall_ns", s.last_export_wall_ns) ||
        mw_dict_put_u64(d, "max_export_wall_ns", s.max_export_wall_ns) ||
        mw_dict_put_u64(d, "last_stacks", s.last_stacks) ||
        mw_dict_put_u64(d, "last_locations", s.last_locations) ||
        mw_dict_put_u64(d, "last_functions", s.last_functions) ||
        mw_dict_put_u64(d, "last_raw_bytes", s.last_raw_bytes) ||
        mw_dict_put_u64(d, "last_gz_bytes", s.last_gz_bytes) ||
        mw_dict_put_i64(d, "last_window_start_ns", s.last_window_start_ns) ||
        mw_dict_put_i64(d, "last_window_end_ns", s.last_window_end_ns) ||
        mw_dict_put_i64(d, "last_errno", s.last_errno) ||
        mw_dict_put_u64(d, "block_exports", s.block_exports) ||
        mw_dict_put_u64(d, "block_stacks", s.block_stacks) ||
        mw_dict_put_u64(d, "memory_exports", s.memory_exports) ||
        mw_dict_put_u64(d, "memory_stacks", s.memory_stacks) ||
        mw_dict_put_u64(d, "requests", s.requests) || mw_dict_put_u64(d, "running", s.running) ||
        mw_dict_put_u64(d, "store_waiting", s.store_waiting) ||
        mw_dict_put_u64(d, "store_waiting_bytes", s.store_waiting_bytes) ||
        mw_dict_put_u64(d, "store_kept", s.store_kept) ||
        mw_dict_put_u64(d, "store_written_late", s.store_written_late) ||
        mw_dict_put_u64(d, "store_dropped", s.store_dropped)) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *py_encode_snapshot(PyObject *self, PyObject *noargs) {
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = mw_export_encode_snapshot(&buf, &len);
    Py_END_ALLOW_THREADS if (rc != 0) return PyErr_NoMemory();
    PyObject *o = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)len);
    free(buf);
    return o;
}

static PyObject *py_debug_fill_active(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"n", "depth", NULL};
    unsigned int n, depth = 16;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "I|I:_debug_fill_active", kwlist, &n, &depth))
        return NULL;
    uint32_t added;
    Py_BEGIN_ALLOW_THREADS added = mw_export_debug_fill_active(n, depth);
    Py_END_ALLOW_THREADS return PyLong_FromUnsignedLong(added);
}

PyMethodDef mw_export_methods[] = {
    {"export_start", (PyCFunction)(void (*)(void))py_export_start, METH_VARARGS | METH_KEYWORDS,
     "export_start(interval_s, service, profile_dir=None, store_max_bytes=0, upload=False) -> "
     "bool: start the exporter thread (False: already running)"},
    {"export_flush", (PyCFunction)(void (*)(void))py_export_flush, METH_VARARGS | METH_KEYWORDS,
     "export_flush(timeout_s=10.0) -> bool: export the current window now and wait"},
    {"export_stop", (PyCFunction)(void (*)(void))py_export_stop, METH_VARARGS | METH_KEYWORDS,
     "export_stop(timeout_s=10.0) -> bool: final export and join (False: gave up waiting)"},
    {"export_running", py_export_running, METH_NOARGS, "is the exporter thread running"},
    {"export_stats", py_export_stats, METH_NOARGS, "counters of the exporter and the store"},
    {"encode_snapshot", py_encode_snapshot, METH_NOARGS,
     "encode_snapshot() -> bytes: gzipped pprof of everything collected since start"},
    {"_debug_fill_active", (PyCFunction)(void (*)(void))py_debug_fill_active,
     METH_VARARGS | METH_KEYWORDS,
     "_debug_fill_active(n, depth=16) -> int: TEST ONLY, add n synthetic distinct stacks to "
     "the active buffer"},
    {NULL, NULL, 0, NULL},
};

static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

int mw_export_module_init(PyObject *m) {
    (void)m;
    pthread_once(&g_atfork_once, mw_export_register_atfork);
    return 0;
}
