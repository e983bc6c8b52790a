/* mw_exitorder — puts one of Python's atexit callbacks last in the order they run.
 *
 * atexit runs its callbacks newest first, so a profiler registering its final export when it
 * starts would stop before every callback registered earlier (by the app, or a library imported
 * first) and lose their CPU. mw_exitorder_run_last moves the given callback to the oldest place
 * of the interpreter's list (interp->atexit.callbacks, an internal layout known for CPython 3.10
 * to 3.13), the others keeping their order; a callback registered later still runs before it.
 *
 * Thread: a Python thread holding the GIL (as atexit.register does). No memory is allocated or
 * freed: entries are only moved. Not async-signal-safe.
 */
#ifndef MW_EXITORDER_H
#define MW_EXITORDER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* 1: func's registration (the newest, when it is there twice) now runs last; 0: func is not
 * registered with atexit. */
int mw_exitorder_run_last(PyObject *func);

#endif
