/* mw_module_tasks — Python glue for asyncio task stacks (mw_tasks). GIL held in every function.
 *
 *   tasks_setup(task, coro, loop, name, tasks_set, labels_var, ctx_one, ctx_many,
 *               steps_type=None, steps_slot=None, joins=(), groups=None,
 *               release=None, current=None, loop_codes=()) -> bool
 *       learns the C Task's layout from `task` (a task made for the purpose, of coroutine `coro`,
 *       loop `loop`, name `name`), the set of weak references holding every task (`tasks_set`,
 *       WeakSet.data), the labels' context variable and the HAMT node types of two contexts
 *       (`ctx_one` with one variable set, `ctx_many` with enough for an array node); steps_type
 *       and its member descriptor steps_slot: a coroutine wrapper whose slot holds the task's
 *       coroutine; joins: (code, index) pairs, at most MW_TASK_JOINS: the code of a done-callback
 *       that asyncio.gather or asyncio.wait puts on the tasks it awaits, whose closure holds the
 *       future the awaiting task awaits at that index; groups: (done_code, (wait_code, ...)) of
 *       asyncio.TaskGroup (at most MW_TASK_GROUP_WAITS wait codes): the code of the done-callback
 *       it puts on its tasks and of the coroutines whose first local is the group while its owner
 *       waits for them; release: (functools.partial, asyncio.tasks._release_waiter), whose
 *       partial asyncio.wait_for puts on the task it waits for (3.10/3.11); current: asyncio's
 *       dict of each loop's current task (how the running task of a thread's sample is found);
 *       loop_codes: code objects of a loop's own frames under a running task's coroutine
 *       (Handle._run, BaseEventLoop._run_once), at most MW_TASK_LOOP_CODES. False (nothing
 *       published) when the layout is not the expected one. Once.
 *   tasks_loop(tid, loop, frames) -> bool
 *       the loop running in thread tid (None: none any more), with the frames under it as
 *       (code, instruction index) pairs, innermost first
 *   tasks_label_value(value, labelset_id) -> None
 *       the label-set id of a value pushed into the labels' context variable
 *   tasks_stats() -> dict[str, int]
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "mw_module.h"
#include "mw_pyglue.h"

#include "mw_pyframes.h"
#include "mw_tasks.h"

#include <string.h>

/* Byte offset of a pointer to `what` among the first `size` bytes of obj, -1 when absent. */
static long find_field(PyObject *obj, size_t size, PyObject *what) {
    for (size_t off = sizeof(PyObject); off + sizeof(void *) <= size; off += sizeof(void *)) {
        PyObject *p;
        memcpy(&p, (const char *)obj + off, sizeof p);
        if (p == what) return (long)off;
    }
    return -1;
}

/* The type of a context's HAMT root node (0 when it has none). */
static uintptr_t root_node_type(PyObject *ctx) {
    /* PyContext: head, ctx_prev, ctx_vars; PyHamtObject: head, h_root (3.10 to 3.13). */
    PyObject *vars, *root;
    memcpy(&vars, (const char *)ctx + sizeof(PyObject) + sizeof(void *), sizeof vars);
    if (!vars) return 0;
    memcpy(&root, (const char *)vars + sizeof(PyObject), sizeof root);
    return root ? (uintptr_t)Py_TYPE(root) : 0;
}

/* Learns where a functools.partial keeps its function and arguments from one made for the
 * purpose: partial(fn, marker). Fills c's partial fields when found (else leaves them 0: wait_for's
 * tasks are then not put under their parent). 0 with an exception set on a Python error. */
static int partial_layout(mw_tasks_config_t *c, PyObject *type, PyObject *fn) {
    PyObject *marker = PyTuple_New(0);
    if (!marker) return 0;
    PyObject *probe = PyObject_CallFunctionObjArgs(type, fn, marker, NULL);
    Py_DECREF(marker);
    if (!probe) return 0;
    PyObject *args = PyObject_GetAttrString(probe, "args");
    if (!args) {
        Py_DECREF(probe);
        return 0;
    }
    size_t size = (size_t)Py_TYPE(probe)->tp_basicsize;
    long off_fn = Py_TYPE(probe) == (PyTypeObject *)type ? find_field(probe, size, fn) : -1;
    long off_args = PyTuple_Check(args) ? find_field(probe, size, args) : -1;
    Py_DECREF(args);
    Py_DECREF(probe);
    if (off_fn > 0 && off_args > 0) {
        c->partial_type = (uintptr_t)type;
        c->release_waiter = (uintptr_t)fn;
        c->off_partial_fn = off_fn;
        c->off_partial_args = off_args;
        Py_INCREF(type); /* kept for the life of the process: the sampler compares with them */
        Py_INCREF(fn);
    }
    return 1;
}

static int32_t hamt_hash(Py_hash_t h) {
    int32_t x = (int32_t)(h & 0xffffffffl) ^ (int32_t)(h >> 32);
    return x == -1 ? -2 : x;
}

static PyObject *py_tasks_setup(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"task",       "coro",       "loop",       "name",
                             "tasks_set",  "labels_var", "ctx_one",    "ctx_many",
                             "steps_type", "steps_slot", "joins",      "groups",
                             "release",    "current",    "loop_codes", NULL};
    PyObject *task, *coro, *loop, *name, *set, *var, *one, *many,
        *steps = Py_None, *slot = Py_None, *joins = NULL, *groups = Py_None, *release = Py_None,
        *current = Py_None, *loop_codes = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO!OO!O!|OOO!OOOO!", kwlist, &task, &coro, &loop,
                                     &name, &PySet_Type, &set, &var, &PyContext_Type, &one,
                                     &PyContext_Type, &many, &steps, &slot, &PyTuple_Type, &joins,
                                     &groups, &release, &current, &PyTuple_Type, &loop_codes))
        return NULL;
    if (loop_codes && PyTuple_GET_SIZE(loop_codes) > MW_TASK_LOOP_CODES) {
        PyErr_Format(PyExc_ValueError, "at most %d loop codes", MW_TASK_LOOP_CODES);
        return NULL;
    }
    for (Py_ssize_t j = 0; loop_codes && j < PyTuple_GET_SIZE(loop_codes); j++)
        if (!PyCode_Check(PyTuple_GET_ITEM(loop_codes, j))) {
            PyErr_SetString(PyExc_TypeError, "loop_codes must be code objects");
            return NULL;
        }
    if (current != Py_None && !PyDict_CheckExact(current)) {
        PyErr_SetString(PyExc_TypeError, "current must be asyncio's dict of current tasks");
        return NULL;
    }
    if (release != Py_None && (!PyTuple_Check(release) || PyTuple_GET_SIZE(release) != 2 ||
                               !PyType_Check(PyTuple_GET_ITEM(release, 0)) ||
                               !PyFunction_Check(PyTuple_GET_ITEM(release, 1)))) {
        PyErr_SetString(PyExc_TypeError, "release must be (functools.partial, a function)");
        return NULL;
    }
    PyObject *group_done = NULL, *group_waits = NULL;
    if (groups != Py_None) {
        if (!PyTuple_Check(groups) || PyTuple_GET_SIZE(groups) != 2 ||
            !PyCode_Check(group_done = PyTuple_GET_ITEM(groups, 0)) ||
            !PyTuple_Check(group_waits = PyTuple_GET_ITEM(groups, 1)) ||
            PyTuple_GET_SIZE(group_waits) > MW_TASK_GROUP_WAITS) {
            PyErr_Format(PyExc_TypeError,
                         "groups must be (code, (code, ...)) with at most %d codes",
                         MW_TASK_GROUP_WAITS);
            return NULL;
        }
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(group_waits); j++)
            if (!PyCode_Check(PyTuple_GET_ITEM(group_waits, j))) {
                PyErr_SetString(PyExc_TypeError, "groups' wait codes must be code objects");
                return NULL;
            }
    }
    Py_ssize_t njoins = joins ? PyTuple_GET_SIZE(joins) : 0;
    if (njoins > MW_TASK_JOINS) {
        PyErr_Format(PyExc_ValueError, "at most %d joins", MW_TASK_JOINS);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < njoins; j++) {
        PyObject *p = PyTuple_GET_ITEM(joins, j);
        if (!PyTuple_Check(p) || PyTuple_GET_SIZE(p) != 2 ||
            !PyCode_Check(PyTuple_GET_ITEM(p, 0)) || !PyLong_Check(PyTuple_GET_ITEM(p, 1))) {
            PyErr_SetString(PyExc_TypeError, "joins must hold (code, closure index) pairs");
            return NULL;
        }
    }
    if (!PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "labels_var must be a ContextVar");
        return NULL;
    }
    mw_tasks_config_t c;
    memset(&c, 0, sizeof c);
    size_t size = (size_t)Py_TYPE(task)->tp_basicsize;
    c.task_type = (uintptr_t)Py_TYPE(task);
    c.tasks_set = (uintptr_t)set;
    c.off_loop = find_field(task, size, loop);
    c.off_coro = find_field(task, size, coro);
    c.off_name = find_field(task, size, name);
    /* The context follows the name (3.10 to 3.13: fut_waiter, coro, name, context). */
    c.off_context = c.off_coro + 2 * (long)sizeof(void *);
    PyObject *ctx = NULL;
    if (c.off_coro > 0 && (size_t)c.off_context + sizeof(void *) <= size)
        memcpy(&ctx, (const char *)task + c.off_context, sizeof ctx);
    if (c.off_loop < 0 || c.off_coro < 0 || c.off_name != c.off_coro + (long)sizeof(void *) ||
        !ctx || !PyContext_CheckExact(ctx))
        Py_RETURN_FALSE;
    Py_hash_t h = PyObject_Hash(var);
    if (h == -1) return NULL;
    c.labels_var = (uintptr_t)var;
    c.labels_hash = hamt_hash(h);
    c.hamt_bitmap_type = root_node_type(one);
    c.hamt_array_type = root_node_type(many);
    if (!c.hamt_bitmap_type || c.hamt_array_type == c.hamt_bitmap_type) c.hamt_array_type = 0;
    if (steps != Py_None && slot != Py_None) {
        if (!PyType_Check(steps) || Py_TYPE(slot) != &PyMemberDescr_Type) {
            PyErr_SetString(PyExc_TypeError, "steps_type must be a type and steps_slot its member");
            return NULL;
        }
        c.steps_type = (uintptr_t)steps;
        c.steps_off = (long)((PyMemberDescrObject *)slot)->d_member->offset;
    }
    for (Py_ssize_t j = 0; j < njoins; j++) {
        PyObject *code = PyTuple_GET_ITEM(PyTuple_GET_ITEM(joins, j), 0);
        long cell = PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(joins, j), 1));
        if (cell == -1 && PyErr_Occurred()) return NULL;
        if (cell < 0 || cell >= PyCode_GetNumFree((PyCodeObject *)code)) continue;
        c.join_code[j] = (uintptr_t)code;
        c.join_cell[j] = cell;
        Py_INCREF(code); /* kept for the life of the process: the sampler compares with it */
    }
    if (release != Py_None &&
        !partial_layout(&c, PyTuple_GET_ITEM(release, 0), PyTuple_GET_ITEM(release, 1)))
        return NULL;
    if (group_done) { /* kept for the life of the process: the sampler compares with them */
        c.group_done_code = (uintptr_t)group_done;
        Py_INCREF(group_done);
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(group_waits); j++) {
            c.group_wait_code[j] = (uintptr_t)PyTuple_GET_ITEM(group_waits, j);
            Py_INCREF(PyTuple_GET_ITEM(group_waits, j));
        }
    }
    for (Py_ssize_t j = 0; loop_codes && j < PyTuple_GET_SIZE(loop_codes); j++) {
        c.loop_codes[j] = (uintptr_t)PyTuple_GET_ITEM(loop_codes, j);
        Py_INCREF(PyTuple_GET_ITEM(loop_codes, j)); /* kept: the sampler compares with them */
    }
    if (current != Py_None) { /* kept for the life of the process: the sampler reads it */
        c.current_tasks = (uintptr_t)current;
        Py_INCREF(current);
    }
    mw_tasks_setup(&c);
    Py_RETURN_TRUE;
}

static PyObject *py_tasks_loop(PyObject *self, PyObject *args) {
    long tid;
    PyObject *loop, *frames;
    if (!PyArg_ParseTuple(args, "lOO", &tid, &loop, &frames)) return NULL;
    static mw_rawframe_t base[MW_TASK_BASE_MAX]; /* GIL held: one caller at a time */
    int n = 0;
    if (loop != Py_None) {
        PyObject *seq = PySequence_Fast(frames, "frames must be a sequence");
        if (!seq) return NULL;
        Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
        for (Py_ssize_t i = 0; i < len && n < MW_TASK_BASE_MAX; i++) {
            PyObject *code;
            int lasti;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "O!i", &PyCode_Type, &code,
                                  &lasti)) {
                Py_DECREF(seq);
                return NULL;
            }
            if (mw_pyframes_code_frame(NULL, (uintptr_t)code, lasti, &base[n]) == 0) n++;
        }
        Py_DECREF(seq);
    }
    int rc = mw_tasks_loop_set(tid, loop == Py_None ? 0 : (uintptr_t)loop, base, n);
    return PyBool_FromLong(rc == 0);
}

static PyObject *py_tasks_label_value(PyObject *self, PyObject *args) {
    PyObject *value;
    unsigned int lid;
    if (!PyArg_ParseTuple(args, "OI", &value, &lid)) return NULL;
    mw_tasks_label_value((uintptr_t)value, lid);
    Py_RETURN_NONE;
}

static PyObject *py_tasks_stats(PyObject *self, PyObject *noargs) {
    mw_tasks_stats_t s;
    mw_tasks_get_stats(&s);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    if (mw_dict_put_u64(d, "task_samples", s.tasks) ||
        mw_dict_put_u64(d, "tasks_running", s.running) ||
        mw_dict_put_u64(d, "tasks_running_found", s.running_found) ||
        mw_dict_put_u64(d, "task_loops_found", s.loops_found) ||
        mw_dict_put_u64(d, "tasks_running_missed", s.running_missed) ||
        mw_dict_put_u64(d, "tasks_unreadable", s.unreadable) ||
        mw_dict_put_u64(d, "tasks_other_types", s.other_types) ||
        mw_dict_put_u64(d, "task_partial_ticks", s.partial_ticks) ||
        mw_dict_put_u64(d, "task_chains_capped", s.chain_capped) ||
        mw_dict_put_u64(d, "task_loops_refused", s.loops_refused) ||
        mw_dict_put_u64(d, "task_labels_missed", s.labels_missed) ||
        mw_dict_put_u64(d, "task_torn", s.torn) || mw_dict_put_u64(d, "task_dropped", s.dropped) ||
        mw_dict_put_u64(d, "tasks_ready", (uint64_t)mw_tasks_ready())) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

PyMethodDef mw_tasks_methods[] = {
    {"tasks_setup", (PyCFunction)(void (*)(void))py_tasks_setup, METH_VARARGS | METH_KEYWORDS,
     "Learns the asyncio Task layout and the task set (once)."},
    {"tasks_loop", py_tasks_loop, METH_VARARGS,
     "Registers the event loop running in a thread, with the frames under it."},
    {"tasks_label_value", py_tasks_label_value, METH_VARARGS,
     "Records the label-set id of a value of the labels' context variable."},
    {"tasks_stats", py_tasks_stats, METH_NOARGS, "Counters of the asyncio task samples."},
    {NULL, NULL, 0, NULL},
};
