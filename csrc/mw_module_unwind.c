/* mw_module_unwind — Python glue for native frames (mw_unwind). GIL held in every function.
 *
 *   unwind_enable(show_internal: bool = False) -> bool   False (with a RuntimeWarning) when
 *       native mode cannot be used; also sets up the calling thread's alternate signal stack
 *   unwind_disable() -> None
 *   unwind_stats() -> dict[str, int]
 *   thread_init() -> int   alternate signal stack for the calling thread (1 installed, 0 it had
 *       one or native mode is off, -1 failed); called by the tracker in each new thread
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mw_module.h"
#include "mw_pyglue.h"

#include "mw_sampler.h"
#include "mw_unwind.h"

#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

static PyObject *py_unwind_enable(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"show_internal", NULL};
    int show = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &show)) return NULL;
    const char *why = "unknown error";
    if (mw_unwind_enable(show, &why) != 0) {
        if (PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                             "middleware: native frames disabled: %s; Python frames only",
                             why) != 0)
            return NULL;
        Py_RETURN_FALSE;
    }
    mw_unwind_thread_init();
    Py_RETURN_TRUE;
}

static PyObject *py_unwind_disable(PyObject *self, PyObject *noargs) {
    mw_unwind_disable();
    Py_RETURN_NONE;
}

static PyObject *py_thread_init(PyObject *self, PyObject *noargs) {
    /* A new thread's CPU timer, armed from inside at its start: its CPU is sampled from its
     * first instruction of Python, not from the sampler's next tick. */
    /* Our real-time signal is thread-directed and private (its handler is ours): unblock it in a
     * thread whose creator blocked everything (uWSGI's extra request threads), so its CPU timer
     * and pauses reach it. Other signals keep the mask the thread was given. */
    int sig = mw_unwind_signal();
    if (sig > 0) {
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        pthread_sigmask(SIG_UNBLOCK, &one, NULL);
    }
    mw_sampler_thread_started((long)syscall(SYS_gettid), (uintptr_t)PyThreadState_Get(), 1);
    if (!mw_unwind_enabled()) return PyLong_FromLong(0);
    return PyLong_FromLong(mw_unwind_thread_init());
}

static PyObject *py_unwind_stats(PyObject *self, PyObject *noargs) {
    mw_unwind_stats_t s;
    mw_unwind_get_stats(&s);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    const struct {
        const char *k;
        uint64_t v;
    } items[] = {
        {"unwind_enabled", s.enabled},
        {"unwind_signal", s.signal},
        {"unwind_requests", s.requests},
        {"unwind_pauses", s.pauses},
        {"unwind_captured", s.captured},
        {"unwind_timeouts", s.timeouts},
        {"unwind_send_failed", s.send_failed},
        {"unwind_skipped", s.skipped},
        {"unwind_late", s.late},
        {"unwind_truncated", s.truncated},
        {"unwind_mismatches", s.mismatches},
        {"unwind_pause_timeouts", s.pause_timeouts},
        {"unwind_symbols", s.symbols},
        {"unwind_frames", s.frames},
    };
    for (size_t i = 0; i < sizeof items / sizeof *items; i++) {
        if (mw_dict_put_u64(d, items[i].k, items[i].v) != 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

PyMethodDef mw_unwind_methods[] = {
    {"unwind_enable", (PyCFunction)(void (*)(void))py_unwind_enable, METH_VARARGS | METH_KEYWORDS,
     "unwind_enable(show_internal=False) -> bool: also capture native (C) frames"},
    {"unwind_disable", py_unwind_disable, METH_NOARGS, "unwind_disable(): Python frames only"},
    {"unwind_stats", py_unwind_stats, METH_NOARGS, "unwind_stats() -> dict of native counters"},
    {"thread_init", py_thread_init, METH_NOARGS,
     "thread_init() -> int: per-thread set-up at thread start: the thread's CPU timer, and "
     "an alternate signal stack in native mode (1 installed, 0 not needed or present)"},
    {NULL, NULL, 0, NULL},
};
