/* mw_pyglue — small helpers shared by the module-glue files (csrc/mw_module*.c).
 * GIL held; include after <Python.h>. */
#ifndef MW_PYGLUE_H
#define MW_PYGLUE_H

/* d[key] = v. Returns 0, or -1 with a Python error set. */
static inline int mw_dict_put_u64(PyObject *d, const char *key, unsigned long long v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int rc = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return rc;
}

static inline int mw_dict_put_i64(PyObject *d, const char *key, long long v) {
    PyObject *o = PyLong_FromLongLong(v);
    int rc = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return rc;
}

#endif
