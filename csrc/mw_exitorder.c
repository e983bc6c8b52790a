/* mw_exitorder — see mw_exitorder.h. */
#define Py_BUILD_CORE 1
#include "mw_exitorder.h"

#if PY_VERSION_HEX < 0x030A0000 || PY_VERSION_HEX >= 0x030E0000
#error "middleware: csrc/mw_exitorder.c knows the atexit layout of CPython 3.10 to 3.13 only"
#endif
#include "pycore_interp.h"

int mw_exitorder_run_last(PyObject *func) {
    struct atexit_state *st = &PyInterpreterState_Get()->atexit;
    for (int i = st->ncallbacks - 1; i >= 0; i--) {
        if (!st->callbacks[i] || st->callbacks[i]->func != func) continue;
        /* the list runs from its end: the entry at 0 runs last */
        void *mine = st->callbacks[i];
        memmove(&st->callbacks[1], &st->callbacks[0], (size_t)i * sizeof st->callbacks[0]);
        st->callbacks[0] = mine;
        return 1;
    }
    return 0;
}
