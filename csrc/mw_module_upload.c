/* mw_module_upload — the middleware._upload module: Python glue for the native uploader
 * (mw_upload.h), in an extension of its own so that libcurl is loaded only by processes that
 * upload. middleware._native's upload_* functions forward here (upload_start imports this
 * module); the methods are:
 *   upload_start(**config) -> None       keyword-only, names = mw_upload_config_t fields
 *                                          (RuntimeError with the reason when it cannot start)
 *   upload_submit(data, from_s, until_s, name="process_cpu") -> bool   False when the uploader is
 * not running upload_flush(deadline) -> int         profiles still held after waiting (GIL
 * released) upload_stop(deadline) -> None         GIL released while stopping upload_running() ->
 * bool upload_stats() -> dict[str, int]      the mw_upload_stats_t fields
 *   upload_take_message(with_level=False) -> str | (int, str) | None
 *   otlp_from_pprof(data, service_name, ...) -> bytes   the OTLP exporter's converter
 *
 * Every function is called with the GIL held; the GIL is released around anything that can
 * wait (submit's mutex and copy, flush, stop).
 *
 * Module init: imports middleware._native's core table (MW_CORE_API_CAPSULE), refuses to load
 * on an interface mismatch (ImportError), hands it to the uploader for its stderr lines and
 * registers the uploader's own table with middleware._native, whose exporter submits through it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mw_otlp.h"
#include "mw_upload.h"

/* (key, value) string pairs of obj (None or a sequence of 2-tuples of str) as two arrays of
 * UTF-8 pointers, valid while *keep (a new reference, or NULL) is alive; the arrays are
 * PyMem_Malloc'd (free with PyMem_Free). 0, or -1 with an exception set. */
static int str_pairs(PyObject *obj, const char *what, PyObject **keep, const char ***keys,
                     const char ***values, size_t *n) {
    *keep = NULL;
    *keys = *values = NULL;
    *n = 0;
    if (!obj || obj == Py_None) return 0;
    PyObject *seq = PySequence_Fast(obj, what);
    if (!seq) return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    *keys = PyMem_Calloc((size_t)len + 1, sizeof(char *));
    *values = PyMem_Calloc((size_t)len + 1, sizeof(char *));
    if (!*keys || !*values) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *k, *v;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyUnicode_Check(k = PyTuple_GET_ITEM(item, 0)) ||
            !PyUnicode_Check(v = PyTuple_GET_ITEM(item, 1))) {
            PyErr_Format(PyExc_TypeError, "%s: expected a sequence of (str, str) pairs", what);
            goto fail;
        }
        if (!((*keys)[i] = PyUnicode_AsUTF8(k)) || !((*values)[i] = PyUnicode_AsUTF8(v))) goto fail;
    }
    *keep = seq;
    *n = (size_t)len;
    return 0;
fail:
    Py_DECREF(seq);
    PyMem_Free((void *)*keys);
    PyMem_Free((void *)*values);
    *keys = *values = NULL;
    return -1;
}

static PyObject *mw_py_upload_start(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"server_url",
                             "app_name",
                             "tags",
                             "tenant_id",
                             "auth_url",
                             "api_key",
                             "bearer_token",
                             "basic_user",
                             "basic_password",
                             "spy_name",
                             "user_agent",
                             "sample_rate",
                             "queue_max",
                             "connect_timeout_s",
                             "total_timeout_s",
                             "backoff_initial_s",
                             "backoff_max_s",
                             "use_push_api",
                             "ca_file",
                             "ca_path",
                             "exporter",
                             "otlp_headers",
                             "resource_attributes",
                             "sdk_version",
                             "otlp_gzip",
                             NULL};
    mw_upload_config_t c = {0};
    PyObject *headers = NULL, *resource = NULL;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "|$zzzzzzzzzzziiddddpzzzOOzp:upload_start", kwlist, &c.server_url,
            &c.app_name, &c.tags, &c.tenant_id, &c.auth_url, &c.api_key, &c.bearer_token,
            &c.basic_user, &c.basic_password, &c.spy_name, &c.user_agent, &c.sample_rate,
            &c.queue_max, &c.connect_timeout_s, &c.total_timeout_s, &c.backoff_initial_s,
            &c.backoff_max_s, &c.use_push_api, &c.ca_file, &c.ca_path, &c.exporter, &headers,
            &resource, &c.sdk_version, &c.otlp_gzip))
        return NULL;
    PyObject *keep_h = NULL, *keep_r = NULL;
    const char **hk = NULL, **hv = NULL, **rk = NULL, **rv = NULL;
    if (str_pairs(headers, "otlp_headers", &keep_h, &hk, &hv, &c.n_headers) != 0) return NULL;
    if (str_pairs(resource, "resource_attributes", &keep_r, &rk, &rv, &c.n_resource) != 0) {
        Py_XDECREF(keep_h);
        PyMem_Free((void *)hk);
        PyMem_Free((void *)hv);
        return NULL;
    }
    c.header_names = hk;
    c.header_values = hv;
    c.resource_keys = rk;
    c.resource_values = rv;
    /* The strings belong to the argument objects, which the caller keeps alive for the whole
     * call (and keep_h / keep_r), so the GIL can be released: start waits for the lifecycle
     * lock, which a concurrent upload_stop holds while it joins the thread. */
    PyThreadState *ts = PyEval_SaveThread();
    int rc = mw_upload_start(&c);
    PyEval_RestoreThread(ts);
    Py_XDECREF(keep_h);
    Py_XDECREF(keep_r);
    PyMem_Free((void *)hk);
    PyMem_Free((void *)hv);
    PyMem_Free((void *)rk);
    PyMem_Free((void *)rv);
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "upload_start: %s", mw_upload_start_error());
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The OTLP converter of the uploader (mw_otlp.h), for tests and tools. */
static PyObject *mw_py_otlp_from_pprof(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"data", "service_name", "sdk_version", "resource_attributes",
                             "pid",  "gzip",         NULL};
    Py_buffer buf;
    const char *service = NULL, *version = NULL;
    PyObject *resource = NULL;
    long long pid = 0;
    int gz = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*s|zOLp:otlp_from_pprof", kwlist, &buf,
                                     &service, &version, &resource, &pid, &gz))
        return NULL;
    PyObject *keep = NULL;
    const char **rk = NULL, **rv = NULL;
    size_t n = 0;
    if (str_pairs(resource, "resource_attributes", &keep, &rk, &rv, &n) != 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    mw_otlp_resource_t res = {service, version, rk, rv, n};
    unsigned char *out = NULL, *z = NULL;
    size_t out_len = 0, z_len = 0;
    const char *why = NULL;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = mw_otlp_from_pprof(buf.buf, (size_t)buf.len, &res, (int64_t)pid, &out, &out_len, &why);
    if (rc == 0 && gz) {
        if (mw_otlp_gzip(out, out_len, &z, &z_len) == 0) {
            free(out);
            out = z;
            out_len = z_len;
        } else {
            rc = -1;
            why = "gzip failed";
        }
    }
    PyEval_RestoreThread(ts);
    PyBuffer_Release(&buf);
    Py_XDECREF(keep);
    PyMem_Free((void *)rk);
    PyMem_Free((void *)rv);
    if (rc != 0) {
        free(out);
        PyErr_Format(PyExc_ValueError, "otlp_from_pprof: %s", why);
        return NULL;
    }
    PyObject *r = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)out_len);
    free(out);
    return r;
}

static PyObject *mw_py_upload_submit(PyObject *self, PyObject *args) {
    Py_buffer buf;
    long long from_s, until_s;
    const char *name = "process_cpu";
    if (!PyArg_ParseTuple(args, "y*LL|s:upload_submit", &buf, &from_s, &until_s, &name))
        return NULL;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = mw_upload_submit(buf.buf, (size_t)buf.len, (int64_t)from_s, (int64_t)until_s, name);
    PyEval_RestoreThread(ts);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(rc == 0);
}

static PyObject *mw_py_upload_flush(PyObject *self, PyObject *args) {
    double deadline;
    if (!PyArg_ParseTuple(args, "d:upload_flush", &deadline)) return NULL;
    PyThreadState *ts = PyEval_SaveThread();
    int n = mw_upload_flush(deadline);
    PyEval_RestoreThread(ts);
    return PyLong_FromLong(n);
}

static PyObject *mw_py_upload_stop(PyObject *self, PyObject *args) {
    double deadline;
    if (!PyArg_ParseTuple(args, "d:upload_stop", &deadline)) return NULL;
    PyThreadState *ts = PyEval_SaveThread();
    mw_upload_stop(deadline);
    PyEval_RestoreThread(ts);
    Py_RETURN_NONE;
}

static PyObject *mw_py_upload_running(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(mw_upload_is_running());
}

static PyObject *mw_py_upload_stats(PyObject *self, PyObject *unused) {
    mw_upload_stats_t s;
    mw_upload_get_stats(&s);
    return mw_upload_stats_dict(&s);
}

static PyObject *mw_py_upload_take_message(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"with_level", NULL};
    int with_level = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|p:upload_take_message", kwlist, &with_level))
        return NULL;
    char buf[1024];
    int level = mw_upload_take_message(buf, sizeof(buf));
    if (level == 0) Py_RETURN_NONE;
    if (with_level) return Py_BuildValue("(is)", level, buf);
    return PyUnicode_DecodeUTF8(buf, (Py_ssize_t)strlen(buf), "replace");
}

static PyMethodDef mw_upload_methods[] = {
    {"upload_start", (PyCFunction)(void (*)(void))mw_py_upload_start, METH_VARARGS | METH_KEYWORDS,
     "upload_start(*, server_url, app_name, tags, tenant_id, auth_url, api_key, bearer_token, "
     "basic_user, basic_password, spy_name, user_agent, sample_rate, queue_max, "
     "connect_timeout_s, total_timeout_s, backoff_initial_s, backoff_max_s, use_push_api, ca_file, "
     "ca_path, exporter, otlp_headers, resource_attributes, sdk_version, otlp_gzip)\n"
     "Start the native uploader thread. RuntimeError if it cannot start."},
    {"otlp_from_pprof", (PyCFunction)(void (*)(void))mw_py_otlp_from_pprof,
     METH_VARARGS | METH_KEYWORDS,
     "otlp_from_pprof(data, service_name, sdk_version=None, resource_attributes=(), pid=0, "
     "gzip=False) -> bytes\n"
     "The OTLP ExportProfilesServiceRequest the OTLP exporter sends for this pprof (gzipped or "
     "plain). ValueError with the reason for a pprof it cannot convert."},
    {"upload_submit", mw_py_upload_submit, METH_VARARGS,
     "upload_submit(data: bytes, from_s: int, until_s: int, name: str = \"process_cpu\") -> bool\n"
     "Queue one gzipped pprof (copied). False if the uploader is not running."},
    {"upload_flush", mw_py_upload_flush, METH_VARARGS,
     "upload_flush(deadline: float) -> int\nWait up to deadline seconds for the queue to empty; "
     "returns the number of profiles still held."},
    {"upload_stop", mw_py_upload_stop, METH_VARARGS,
     "upload_stop(deadline: float) -> None\nFinal flush for up to deadline seconds, then stop."},
    {"upload_running", mw_py_upload_running, METH_NOARGS,
     "upload_running() -> bool\nWhether the uploader thread is running."},
    {"upload_stats", mw_py_upload_stats, METH_NOARGS,
     "upload_stats() -> dict[str, int]\nUploader counters (reset by upload_start)."},
    {"upload_take_message", (PyCFunction)(void (*)(void))mw_py_upload_take_message,
     METH_VARARGS | METH_KEYWORDS,
     "upload_take_message(with_level=False) -> str | tuple[int, str] | None\n"
     "Pop the next pending uploader message (with its logging level if asked)."},
    {NULL, NULL, 0, NULL},
};

static const mw_upload_api_t g_upload_api = {MW_UPLOAD_ABI, mw_upload_submit, mw_upload_flush};

static struct PyModuleDef g_moddef = {
    PyModuleDef_HEAD_INIT,
    "middleware._upload",
    "The native uploader of middleware (libcurl); see csrc/mw_upload.h.",
    -1,
    mw_upload_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit__upload(void) {
    const mw_core_api_t *core = PyCapsule_Import(MW_CORE_API_CAPSULE, 0);
    if (!core) return NULL;
    if (core->abi != MW_UPLOAD_ABI) {
        PyErr_Format(PyExc_ImportError,
                     "middleware._upload (interface %d) does not match middleware._native "
                     "(interface %d): both come from one build (make build)",
                     MW_UPLOAD_ABI, core->abi);
        return NULL;
    }
    PyObject *m = PyModule_Create(&g_moddef);
    if (!m) return NULL;
    mw_upload_set_core(core);
    core->set_uploader(&g_upload_api);
    return m;
}
