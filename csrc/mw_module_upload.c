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

#include "mw_upload.h"

static PyObject *mw_py_upload_start(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"server_url",        "app_name",          "tags",
                             "tenant_id",         "auth_url",          "api_key",
                             "bearer_token",      "basic_user",        "basic_password",
                             "spy_name",          "user_agent",        "sample_rate",
                             "queue_max",         "connect_timeout_s", "total_timeout_s",
                             "backoff_initial_s", "backoff_max_s",     "use_push_api",
                             "ca_file",           "ca_path",           NULL};
    mw_upload_config_t c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$zzzzzzzzzzziiddddpzz:upload_start", kwlist,
                                     &c.server_url, &c.app_name, &c.tags, &c.tenant_id, &c.auth_url,
                                     &c.api_key, &c.bearer_token, &c.basic_user, &c.basic_password,
                                     &c.spy_name, &c.user_agent, &c.sample_rate, &c.queue_max,
                                     &c.connect_timeout_s, &c.total_timeout_s, &c.backoff_initial_s,
                                     &c.backoff_max_s, &c.use_push_api, &c.ca_file, &c.ca_path))
        return NULL;
    /* The strings belong to the argument objects, which the caller keeps alive for the whole
     * call, so the GIL can be released: start waits for the lifecycle lock, which a concurrent
     * upload_stop holds while it joins the thread. */
    PyThreadState *ts = PyEval_SaveThread();
    int rc = mw_upload_start(&c);
    PyEval_RestoreThread(ts);
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "upload_start: %s", mw_upload_start_error());
        return NULL;
    }
    Py_RETURN_NONE;
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
     "ca_path)\n"
     "Start the native uploader thread. RuntimeError if it cannot start."},
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

static const mw_upload_api_t g_upload_api = {MW_UPLOAD_ABI, mw_upload_submit};

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
