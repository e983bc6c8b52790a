/* Test-only C extension for tests/native/test_native_frames.py: a CPU hot spot inside C code
 * called from Python. Built by the test with gcc into a temporary directory; never installed.
 *
 *   mw_test_ext.spin(n) -> int   runs mw_test_spin(n) (about n multiply-adds), GIL held
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

/* Exported (default visibility) and not inlined, so dladdr names it in the native stack. */
__attribute__((noinline, visibility("default"))) uint64_t mw_test_spin(uint64_t n) {
    volatile uint64_t acc = 1;
    for (uint64_t i = 0; i < n; i++)
        acc = acc * 6364136223846793005ULL + i;
    return acc;
}

static PyObject *spin(PyObject *self, PyObject *arg) {
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(mw_test_spin(n));
}

static PyMethodDef methods[] = {
    {"spin", spin, METH_O, "spin(n) -> int: n multiply-adds in C"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "mw_test_ext", NULL, -1, methods};

PyMODINIT_FUNC PyInit_mw_test_ext(void) {
    return PyModule_Create(&moddef);
}
