/* mw_module_otel — the OpenTelemetry integration's per-request path in C (the policy and its
 * reasons are in middleware/integrations/otel.py). Appended to middleware._native by
 * csrc/mw_module.c (declared in mw_module.h):
 *
 *   otel_hooks(attach, detach, *, slow_push, pop_labels, apply, current, ids, applied,
 *              span_id_type, labels_globals, span_key, attribute) -> (hook_attach, hook_detach)
 *
 * The two hooks replace opentelemetry.context.attach / detach. hook_attach(context) calls
 * attach, then, when the context's span is a recording local root span (an SDK span whose parent
 * is None or remote) and not already the current span label, pushes the labels span_id (a
 * middleware.labels.SpanId) and span_name over the context's other labels, exactly as
 * middleware.labels.push_span does, and remembers (labels token, SpanId, span) under attach's
 * token. hook_detach(token) calls detach, pops those labels and, when a sample carried the span's
 * labels (mw_labels_span_was_seen) and the span has not ended, sets its attribute `attribute` to
 * its span id: the trace links to a profile that holds the request. (The Python path, taken in
 * threads running an event loop, sets it when pushing: ASGI instrumentation ends its server span
 * before detaching it.)
 *
 * The fast path writes middleware.labels' state itself: the context variable `current` (the
 * label pairs), the thread's native slot (mw_threads_set_labelset) and `applied.__dict__["pairs"]`
 * (what the slot holds), looking base label sets up in `ids` (pairs -> native id). Anything it
 * does not cover goes through the Python functions given, which implement the same rules:
 * `slow_push(context)` -> (labels token, None, None) or None (a context that is not a dict,
 * other labels not interned yet, another span's labels active, a running event loop in the
 * thread, the asyncio hook not arranged yet); `pop_labels(token)` when the token cannot be reset
 * here; `apply(pairs)` when the pairs restored are not interned or an event loop runs. What the
 * fast path writes is what the Python path would have written.
 *
 * In a thread where greenlets switch (greenlet loaded) and whose switches middleware.labels does
 * not follow yet (no "greenlets" key in applied.__dict__), the fast path takes the Python path,
 * which installs the thread's switch tracer (middleware.labels._follow_greenlets).
 *
 * The fast path makes SpanIds itself (str's own constructor; their three slots set here, _ids
 * a new mw_spansets_type: csrc/mw_module.c).
 *
 * A failure in our part never reaches the app: the error is dropped (attach/detach's own result
 * and exceptions pass through unchanged). Remembered tokens are bounded (MAX_PUSHED: the oldest
 * goes; a context attached and never detached is an app bug).
 *
 * Threads: GIL held (every function and hook). The module state below is set by otel_hooks and
 * read by the hooks under the GIL. Not async-signal-safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT, READONLY (3.10, 3.11) */

#include "mw_labels.h"
#include "mw_tasks.h"
#include "mw_module.h"
#include "mw_threads.h"

#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define MAX_PUSHED 65536

/* Set by otel_hooks (strong references, kept for the life of the process). */
static struct {
    PyObject *slow_push, *pop_labels, *apply; /* Python fallbacks */
    PyObject *current;                        /* ContextVar of the label pairs */
    PyObject *ids;                            /* dict: pairs -> native id (int) */
    PyObject *applied;                        /* threading.local: .pairs, .depth */
    PyTypeObject *span_id_type;               /* middleware.labels.SpanId */
    PyObject *labels_globals;                 /* middleware.labels' module dict */
    PyObject *span_key_fn;                    /* () -> OpenTelemetry's span key or None */
    PyObject *span_key;                       /* cached once known */
    PyObject *attribute;                      /* "pyroscope.profile.id" */
    PyObject *pushed;                         /* dict: id(attach's token) -> (it, entry) */
    PyObject *get_running_loop;               /* asyncio.events._get_running_loop, once loaded */
} g;

/* Interned names. */
static PyObject *s_span_id, *s_span_name, *s_get_span_context, *s_parent, *s_is_remote,
    *s_is_recording, *s_is_valid, *s_trace_id, *s_name, *s_span_int, *s_ids, *s_pairs, *s__parent,
    *s__context, *s__name, *s__end_time, *s_dict, *s_set_attribute, *s_hook_state,
    *s_asyncio_events, *s_get_loop_name, *s_greenlets, *s_greenlet;

/* Returned by the fast paths to mean "take the Python path". */
static PyObject g_slow_marker_obj;
#define SLOW (&g_slow_marker_obj)

static int is_true_attr(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* A running event loop in this thread (its label hand-offs are the Python path's): 1, 0, -1. */
static int loop_running(void) {
    if (!g.get_running_loop) {
        PyObject *events = PyImport_GetModule(s_asyncio_events);
        if (!events) return PyErr_Occurred() ? -1 : 0;
        g.get_running_loop = PyObject_GetAttr(events, s_get_loop_name);
        Py_DECREF(events);
        if (!g.get_running_loop) return -1;
    }
    PyObject *loop = PyObject_CallNoArgs(g.get_running_loop);
    if (!loop) return -1;
    int running = loop != Py_None;
    Py_DECREF(loop);
    return running;
}

/* The pairs' key is "span_id" or "span_name". */
static int span_key_of(PyObject *pair) {
    PyObject *k = PyTuple_GET_ITEM(pair, 0);
    if (k == s_span_id || k == s_span_name) return 1;
    if (!PyUnicode_Check(k)) return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(k); /* most keys differ in length: no compare */
    return (n == 7 && PyUnicode_Compare(k, s_span_id) == 0) ||
           (n == 9 && PyUnicode_Compare(k, s_span_name) == 0);
}

/* 1 when greenlet is loaded and this thread's greenlet switches are not followed yet (the Python
 * path installs the tracer), 0 when not, -1 with an error. `state`: applied.__dict__. */
static int greenlets_unfollowed(PyObject *state) {
    int has = PyDict_Contains(state, s_greenlets);
    if (has != 0) return has < 0 ? -1 : 0;
    PyObject *mod = PyDict_GetItemWithError(PyImport_GetModuleDict(), s_greenlet); /* borrowed */
    return mod ? 1 : PyErr_Occurred() ? -1 : 0;
}

/* The thread's native slot gets `lid` and applied.pairs `pairs`. */
static int write_slot(PyObject *state, PyObject *pairs, unsigned long lid) {
    mw_threads_set_labelset(mw_module_tid(), (uint32_t)lid);
    return PyDict_SetItem(state, s_pairs, pairs);
}

/* ---- span id values ----------------------------------------------------------------------- */

/* A new SpanId: str's constructor over the hex (SpanId.__new__ is not run), then its slots. */
static PyObject *new_span_id(const char *hex, const char *trace_hex, PyObject *span_int) {
    PyObject *text = PyUnicode_FromStringAndSize(hex, 16);
    PyObject *args = text ? PyTuple_Pack(1, text) : NULL;
    Py_XDECREF(text);
    if (!args) return NULL;
    PyObject *sid = PyUnicode_Type.tp_new(g.span_id_type, args, NULL);
    Py_DECREF(args);
    if (!sid) return NULL;
    PyObject *trace = PyUnicode_FromStringAndSize(trace_hex, 32);
    PyObject *ids = trace ? PyObject_CallNoArgs((PyObject *)&mw_spansets_type) : NULL;
    if (!ids || PyObject_SetAttr(sid, s_trace_id, trace) < 0 ||
        PyObject_SetAttr(sid, s_span_int, span_int) < 0 || PyObject_SetAttr(sid, s_ids, ids) < 0) {
        Py_XDECREF(trace);
        Py_XDECREF(ids);
        Py_DECREF(sid);
        return NULL;
    }
    Py_DECREF(trace);
    Py_DECREF(ids);
    return sid;
}

/* The SpanSets of a SpanId (a new reference), NULL with an error set otherwise. */
static PyObject *span_sets_of(PyObject *sid) {
    PyObject *ids = PyObject_GetAttr(sid, s_ids);
    if (ids && !PyDict_Check(ids)) {
        Py_DECREF(ids);
        PyErr_SetString(PyExc_TypeError, "SpanId._ids is not a dict");
        return NULL;
    }
    return ids;
}

/* pairs + ("span_id", sid) + ("span_name", name), sorted by key (pairs are, and hold neither). */
static PyObject *merged_pairs(PyObject *pairs, PyObject *sid, PyObject *name) {
    Py_ssize_t n = PyTuple_GET_SIZE(pairs);
    PyObject *out = PyTuple_New(n + 2);
    if (!out) return NULL;
    PyObject *p_id = PyTuple_Pack(2, s_span_id, sid), *p_name = PyTuple_Pack(2, s_span_name, name);
    if (!p_id || !p_name) {
        Py_XDECREF(p_id);
        Py_XDECREF(p_name);
        Py_DECREF(out);
        return NULL;
    }
    /* "span_id" < "span_name" ('i' < 'n'): they go in that order, each at its place */
    PyObject *extra[2] = {p_id, p_name};
    Py_ssize_t o = 0, e = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        PyObject *cur = i < n ? PyTuple_GET_ITEM(pairs, i) : NULL;
        while (e < 2) {
            if (cur) {
                int lt = PyUnicode_Compare(PyTuple_GET_ITEM(extra[e], 0), PyTuple_GET_ITEM(cur, 0));
                if (lt == -1 && PyErr_Occurred()) {
                    Py_DECREF(out);
                    Py_DECREF(extra[e]);
                    if (e == 0) Py_DECREF(extra[1]);
                    return NULL;
                }
                if (lt > 0) break;
            }
            PyTuple_SET_ITEM(out, o++, extra[e++]); /* reference moved */
        }
        if (cur) PyTuple_SET_ITEM(out, o++, Py_NewRef(cur));
    }
    return out;
}

/* 16 lowercase hex digits of v, then a NUL. */
static void put_hex(char *out, unsigned long long v) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, v >>= 4)
        out[i] = digits[v & 15];
    out[16] = 0;
}

/* The SpanContext type whose tuple items 0, 1 and 5 were checked to be trace_id, span_id and
 * is_valid (OpenTelemetry's SpanContext is a tuple); contexts of other types are read through
 * their attributes. */
static PyTypeObject *g_sc_type;

/* span_id and trace_id of a span context (new references): 1, 0 when it is not valid, -1. */
static int span_context_ids(PyObject *sc, PyObject **span_int, PyObject **trace_int) {
    PyObject *valid;
    if (Py_TYPE(sc) == g_sc_type) {
        *trace_int = Py_NewRef(PyTuple_GET_ITEM(sc, 0));
        *span_int = Py_NewRef(PyTuple_GET_ITEM(sc, 1));
        valid = Py_NewRef(PyTuple_GET_ITEM(sc, 5));
    } else {
        *trace_int = PyObject_GetAttr(sc, s_trace_id);
        *span_int = *trace_int ? PyObject_GetAttr(sc, s_span_id) : NULL;
        valid = *span_int ? PyObject_GetAttr(sc, s_is_valid) : NULL;
        if (!valid) return -1;
        if (!g_sc_type && PyTuple_Check(sc) && PyTuple_GET_SIZE(sc) == 6 &&
            PyTuple_GET_ITEM(sc, 0) == *trace_int && PyTuple_GET_ITEM(sc, 1) == *span_int &&
            PyTuple_GET_ITEM(sc, 5) == valid)
            g_sc_type = (PyTypeObject *)Py_NewRef(Py_TYPE(sc));
    }
    int t = PyObject_IsTrue(valid);
    Py_DECREF(valid);
    return t;
}

/* span.set_attribute(attribute, hex) (a plain str: the SpanId would keep its sets alive). */
static int set_profile_id(PyObject *span, const char *hex) {
    PyObject *plain = PyUnicode_FromString(hex);
    if (!plain) return -1;
    PyObject *r = PyObject_CallMethodObjArgs(span, s_set_attribute, g.attribute, plain, NULL);
    Py_DECREF(plain);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* A span type whose instance attributes _parent, _context, _name and _end_time were checked to
 * be what its parent, get_span_context(), name and is_recording() return (the SDK's span):
 * spans of that type are read through them, without calling Python code. Others go through
 * the public properties and methods. */
static PyTypeObject *g_span_type;

/* The span attribute `priv` when the span's type was checked, else `pub` (a property; or a
 * method when call). New reference, or NULL with an error. */
static PyObject *span_get(PyObject *span, PyObject *priv, PyObject *pub, int call) {
    if (Py_TYPE(span) == g_span_type) {
        PyObject *v = PyObject_GetAttr(span, priv);
        if (v || !PyErr_ExceptionMatches(PyExc_AttributeError)) return v;
        PyErr_Clear(); /* this instance lacks it: the public way */
    }
    return call ? PyObject_CallMethodNoArgs(span, pub) : PyObject_GetAttr(span, pub);
}

/* span.is_recording(): 1, 0, or -1 with an error. */
static int span_recording(PyObject *span) {
    if (Py_TYPE(span) == g_span_type) {
        PyObject *end = PyObject_GetAttr(span, s__end_time);
        if (end) {
            int recording = end == Py_None;
            Py_DECREF(end);
            return recording;
        }
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
    }
    PyObject *rec = PyObject_CallMethodNoArgs(span, s_is_recording);
    if (!rec) return -1;
    int recording = PyObject_IsTrue(rec);
    Py_DECREF(rec);
    return recording;
}

/* Checks once whether `span`'s type can be read through its instance attributes. */
static void check_span_type(PyObject *span) {
    if (g_span_type) return;
    PyObject *pub[4] = {
        PyObject_GetAttr(span, s_parent), PyObject_CallMethodNoArgs(span, s_get_span_context),
        PyObject_GetAttr(span, s_name), PyObject_CallMethodNoArgs(span, s_is_recording)};
    PyObject *priv[4] = {PyObject_GetAttr(span, s__parent), PyObject_GetAttr(span, s__context),
                         PyObject_GetAttr(span, s__name), PyObject_GetAttr(span, s__end_time)};
    int ok = 1;
    for (int i = 0; i < 4; i++)
        ok = ok && pub[i] && priv[i];
    ok = ok && pub[0] == priv[0] && pub[1] == priv[1] && pub[2] == priv[2] &&
         (pub[3] == Py_True) == (priv[3] == Py_None) && (pub[3] == Py_True || pub[3] == Py_False);
    PyErr_Clear();
    for (int i = 0; i < 4; i++) {
        Py_XDECREF(pub[i]);
        Py_XDECREF(priv[i]);
    }
    if (ok) g_span_type = (PyTypeObject *)Py_NewRef(Py_TYPE(span));
}

/* The fast push: a new reference to (labels token, SpanId, span), Py_None (nothing pushed),
 * SLOW, or NULL with an error. */
static PyObject *fast_push(PyObject *context) {
    if (!PyDict_Check(context)) return context == Py_None ? Py_NewRef(Py_None) : SLOW;
    if (!g.span_key) {
        PyObject *key = PyObject_CallNoArgs(g.span_key_fn);
        if (!key) return NULL;
        if (key == Py_None) {
            Py_DECREF(key);
            return Py_NewRef(Py_None); /* no span API loaded: no span in any context */
        }
        g.span_key = key;
    }
    PyObject *span = PyDict_GetItemWithError(context, g.span_key); /* borrowed */
    if (!span) return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    Py_INCREF(span);
    PyObject *ret = NULL, *sc = NULL, *span_int = NULL, *trace_int = NULL, *cur = NULL,
             *parent = NULL, *name = NULL, *sid = NULL, *pairs = NULL, *base_obj = NULL,
             *lid_obj = NULL, *state = NULL, *token = NULL;
    check_span_type(span);
    /* a local root span of the SDK's (parent None or remote): children leave here */
    parent = span_get(span, s__parent, s_parent, 0);
    if (!parent) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) goto done;
        PyErr_Clear();
        ret = Py_NewRef(Py_None); /* not an SDK span */
        goto done;
    }
    if (parent != Py_None) {
        int remote = is_true_attr(parent, s_is_remote);
        if (remote < 0) goto done;
        if (!remote) {
            ret = Py_NewRef(Py_None); /* a child span: its root's labels hold */
            goto done;
        }
    }
    sc = span_get(span, s__context, s_get_span_context, 1);
    if (!sc) goto done;
    int valid = span_context_ids(sc, &span_int, &trace_int);
    if (valid <= 0) {
        if (valid == 0) ret = Py_NewRef(Py_None); /* an invalid span context */
        goto done;
    }
    if (PyContextVar_Get(g.current, NULL, &cur) < 0) goto done;
    if (!cur || !PyTuple_CheckExact(cur)) {
        ret = SLOW;
        goto done;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(cur);
    int other_span = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyTuple_GET_ITEM(cur, i);
        if (!PyTuple_CheckExact(p) || PyTuple_GET_SIZE(p) != 2) {
            ret = SLOW;
            goto done;
        }
        if (!span_key_of(p)) continue;
        PyObject *v = PyTuple_GET_ITEM(p, 1);
        if (PyTuple_GET_ITEM(p, 0) == s_span_id ||
            PyUnicode_Compare(PyTuple_GET_ITEM(p, 0), s_span_id) == 0) {
            if (Py_TYPE(v) == g.span_id_type) {
                PyObject *vi = PyObject_GetAttr(v, s_span_int);
                if (!vi) goto done;
                int same = PyObject_RichCompareBool(vi, span_int, Py_EQ);
                Py_DECREF(vi);
                if (same < 0) goto done;
                if (same) { /* the same span made current again */
                    ret = Py_NewRef(Py_None);
                    goto done;
                }
            }
        }
        other_span = 1;
    }
    int recording = span_recording(span);
    if (recording <= 0) {
        if (recording == 0) ret = Py_NewRef(Py_None); /* not sampled, or ended */
        goto done;
    }
    if (other_span) {
        ret = SLOW; /* another span's labels active: the generic merge strips them */
        goto done;
    }
    state = PyObject_GetAttr(g.applied, s_dict);
    if (!state) goto done;
    PyObject *hook_state = PyDict_GetItemWithError(g.labels_globals, s_hook_state);
    if (!hook_state && PyErr_Occurred()) goto done;
    int running = loop_running();
    if (running < 0) goto done;
    int unfollowed = greenlets_unfollowed(state);
    if (unfollowed < 0) goto done;
    /* the asyncio hook still to arrange (1 = ON_FIRST_LABEL), a loop's tasks in this thread, or
     * greenlet switches to follow */
    if (running || unfollowed || !hook_state || !PyLong_CheckExact(hook_state) ||
        PyLong_AsLong(hook_state) == 1) {
        ret = SLOW;
        goto done;
    }
    unsigned long base = 0;
    if (n) {
        base_obj = PyDict_GetItemWithError(g.ids, cur);
        if (!base_obj) {
            ret = PyErr_Occurred() ? NULL : SLOW; /* not interned yet */
            goto done;
        }
        Py_INCREF(base_obj);
        base = PyLong_AsUnsignedLong(base_obj);
        if (base == (unsigned long)-1 && PyErr_Occurred()) goto done;
    } else {
        base_obj = PyLong_FromLong(0);
        if (!base_obj) goto done;
    }
    /* the ids as 16 and 32 lowercase hex digits */
    unsigned long long s64 = PyLong_AsUnsignedLongLong(span_int);
    if (s64 == (unsigned long long)-1 && PyErr_Occurred()) goto done;
    unsigned long long lo = PyLong_AsUnsignedLongLongMask(trace_int);
    if (lo == (unsigned long long)-1 && PyErr_Occurred()) goto done;
    PyObject *sixty_four = PyLong_FromLong(64);
    PyObject *hi_obj = sixty_four ? PyNumber_Rshift(trace_int, sixty_four) : NULL;
    Py_XDECREF(sixty_four);
    if (!hi_obj) goto done;
    unsigned long long hi = PyLong_AsUnsignedLongLongMask(hi_obj);
    Py_DECREF(hi_obj);
    if (hi == (unsigned long long)-1 && PyErr_Occurred()) goto done;
    char hex[17], trace_hex[33];
    put_hex(hex, s64);
    put_hex(trace_hex, hi);
    put_hex(trace_hex + 16, lo);
    name = span_get(span, s__name, s_name, 0);
    if (!name) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) goto done;
        PyErr_Clear();
    }
    if (!name || !PyUnicode_Check(name)) {
        PyObject *s = name ? PyObject_Str(name) : PyUnicode_FromString("");
        Py_XDECREF(name);
        if (!(name = s)) goto done;
    }
    const char *name_utf8 = PyUnicode_AsUTF8(name);
    if (!name_utf8) goto done;
    if (!(sid = new_span_id(hex, trace_hex, span_int))) goto done;
    uint32_t lid = mw_labels_intern_span((uint32_t)base, hex, trace_hex, name_utf8);
    if (!lid) lid = (uint32_t)base; /* table full (counted): the other labels still hold */
    if (!(lid_obj = PyLong_FromUnsignedLong(lid))) goto done;
    PyObject *sid_ids = span_sets_of(sid);
    int put = sid_ids ? PyDict_SetItem(sid_ids, base_obj, lid_obj) : -1;
    Py_XDECREF(sid_ids);
    if (put < 0) goto done;
    if (!(pairs = merged_pairs(cur, sid, name))) goto done;
    if (!(token = PyContextVar_Set(g.current, pairs))) goto done;
    mw_tasks_label_value((uintptr_t)pairs, lid); /* a task waiting under it is labelled too */
    if (write_slot(state, pairs, lid) < 0 || !(ret = PyTuple_Pack(3, token, sid, span))) {
        /* not remembered, so never popped: this request's labels must not outlive the failure */
        PyErr_Clear();
        if (PyContextVar_Reset(g.current, token) < 0 || write_slot(state, cur, base) < 0)
            PyErr_Clear();
        PyErr_SetString(PyExc_RuntimeError, "span labels not pushed");
    }
done:
    Py_XDECREF(state);
    Py_XDECREF(token);
    Py_XDECREF(pairs);
    Py_XDECREF(lid_obj);
    Py_XDECREF(base_obj);
    Py_XDECREF(sid);
    Py_XDECREF(name);
    Py_XDECREF(parent);
    Py_XDECREF(cur);
    Py_XDECREF(trace_int);
    Py_XDECREF(span_int);
    Py_XDECREF(sc);
    Py_DECREF(span);
    return ret;
}

/* The fast pop of a labels token: 0 done, 1 take the Python path, -1 error. */
static int fast_pop(PyObject *ltok) {
    if (PyContextVar_Reset(g.current, ltok) < 0) {
        PyErr_Clear();
        return 1; /* a token of another context: pop_labels says so */
    }
    PyObject *now = NULL, *state = NULL;
    int rc = -1;
    if (PyContextVar_Get(g.current, NULL, &now) < 0) return -1;
    if (!now) return -1;
    int running = !PyTuple_CheckExact(now) ? 1 : PyTuple_GET_SIZE(now) ? loop_running() : 0;
    if (running < 0) goto done;
    if (running) { /* or not a tuple: the Python path */
        PyObject *r = PyObject_CallOneArg(g.apply, now);
        rc = r ? 0 : -1;
        Py_XDECREF(r);
        goto done;
    }
    if (!(state = PyObject_GetAttr(g.applied, s_dict))) goto done;
    int unfollowed = greenlets_unfollowed(state);
    if (unfollowed < 0) goto done;
    if (unfollowed) { /* the Python path installs the thread's switch tracer */
        PyObject *r = PyObject_CallOneArg(g.apply, now);
        rc = r ? 0 : -1;
        Py_XDECREF(r);
        goto done;
    }
    PyObject *before = PyDict_GetItemWithError(state, s_pairs); /* borrowed */
    if (!before && PyErr_Occurred()) goto done;
    if (before) {
        int same = before == now ? 1 : PyObject_RichCompareBool(before, now, Py_EQ);
        if (same < 0) goto done;
        if (same) {
            rc = 0;
            goto done;
        }
    }
    unsigned long lid = 0;
    if (PyTuple_GET_SIZE(now)) {
        PyObject *lid_obj = PyDict_GetItemWithError(g.ids, now);
        if (!lid_obj) { /* a span's set or not interned yet: the Python path */
            if (PyErr_Occurred()) goto done;
            PyObject *r = PyObject_CallOneArg(g.apply, now);
            rc = r ? 0 : -1;
            Py_XDECREF(r);
            goto done;
        }
        lid = PyLong_AsUnsignedLong(lid_obj);
        if (lid == (unsigned long)-1 && PyErr_Occurred()) goto done;
    }
    rc = write_slot(state, now, lid);
done:
    Py_XDECREF(state);
    Py_DECREF(now);
    return rc;
}

/* After the pop: the root span names its profile when a sample carried its labels. */
static int link_profile(PyObject *sid, PyObject *span) {
    PyObject *ids = span_sets_of(sid);
    if (!ids) return -1;
    int seen = 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (!seen && PyDict_Next(ids, &pos, &k, &v)) {
        unsigned long lid = PyLong_AsUnsignedLong(v);
        if (lid == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(ids);
            return -1;
        }
        seen = lid <= UINT32_MAX && mw_labels_span_was_seen((uint32_t)lid);
    }
    Py_DECREF(ids);
    if (!seen) return 0;
    int recording = span_recording(span); /* ended: too late */
    if (recording < 0) return -1;
    mw_labels_span_link_counted(recording);
    const char *hex = recording ? PyUnicode_AsUTF8(sid) : NULL;
    if (recording && (!hex || set_profile_id(span, hex) < 0)) return -1;
    return 0;
}

/* Our part failed: the app's tracing goes on, the profile loses this request's labels. */
static void drop_error(void) {
    PyErr_Clear();
}

/* ---- the hook objects --------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD PyObject *wrapped;
    int detach; /* 0: attach hook, 1: detach hook */
    vectorcallfunc vectorcall;
} hook_t;

/* pushed[id(token)] = (token, entry): contextvars tokens are not hashable. */
static int remember(PyObject *token, PyObject *entry) {
    if (PyDict_GET_SIZE(g.pushed) >= MAX_PUSHED) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        if (PyDict_Next(g.pushed, &pos, &k, &v)) {
            Py_INCREF(k);
            int rc = PyDict_DelItem(g.pushed, k);
            Py_DECREF(k);
            if (rc < 0) return -1;
        }
    }
    PyObject *key = PyLong_FromVoidPtr(token), *val = key ? PyTuple_Pack(2, token, entry) : NULL;
    int rc = val ? PyDict_SetItem(g.pushed, key, val) : -1;
    Py_XDECREF(key);
    Py_XDECREF(val);
    return rc;
}

/* The entry remembered for `token` (a new reference, removed), or NULL (none, or an error set). */
static PyObject *forget(PyObject *token) {
    PyObject *key = PyLong_FromVoidPtr(token);
    if (!key) return NULL;
    PyObject *val = PyDict_GetItemWithError(g.pushed, key); /* borrowed */
    PyObject *entry = NULL;
    if (val) {
        if (PyTuple_GET_ITEM(val, 0) == token) entry = Py_NewRef(PyTuple_GET_ITEM(val, 1));
        if (PyDict_DelItem(g.pushed, key) < 0) Py_CLEAR(entry);
    }
    Py_DECREF(key);
    return entry;
}

static PyObject *hook_attach(hook_t *self, PyObject *const *args, size_t nargsf, PyObject *kw) {
    PyObject *token = PyObject_Vectorcall(self->wrapped, args, nargsf, kw);
    if (!token || PyVectorcall_NARGS(nargsf) != 1 || kw) return token;
    PyObject *entry = fast_push(args[0]);
    if (entry == SLOW) entry = PyObject_CallOneArg(g.slow_push, args[0]);
    if (!entry || (entry != Py_None && remember(token, entry) < 0)) drop_error();
    Py_XDECREF(entry);
    return token;
}

static PyObject *hook_detach(hook_t *self, PyObject *const *args, size_t nargsf, PyObject *kw) {
    PyObject *entry = NULL;
    if (PyVectorcall_NARGS(nargsf) == 1 && !kw && !(entry = forget(args[0])) && PyErr_Occurred())
        drop_error();
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *r = PyObject_Vectorcall(self->wrapped, args, nargsf, kw);
    PyObject *exc = r ? NULL : PyErr_GetRaisedException();
#else
    PyObject *r = PyObject_Vectorcall(self->wrapped, args, nargsf, kw);
    PyObject *et = NULL, *ev = NULL, *etb = NULL;
    if (!r) PyErr_Fetch(&et, &ev, &etb);
#endif
    if (entry && PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 3) {
        PyObject *ltok = PyTuple_GET_ITEM(entry, 0), *sid = PyTuple_GET_ITEM(entry, 1);
        int rc = fast_pop(ltok);
        if (rc == 1) {
            PyObject *p = PyObject_CallOneArg(g.pop_labels, ltok);
            rc = p ? 0 : -1;
            Py_XDECREF(p);
        }
        if (rc < 0 || (sid != Py_None && link_profile(sid, PyTuple_GET_ITEM(entry, 2)) < 0))
            drop_error();
    }
    Py_XDECREF(entry);
#if PY_VERSION_HEX >= 0x030C0000
    if (exc) PyErr_SetRaisedException(exc);
#else
    if (!r) PyErr_Restore(et, ev, etb);
#endif
    return r;
}

static PyObject *hook_getattro(hook_t *self, PyObject *name) {
    PyObject *v = PyObject_GenericGetAttr((PyObject *)self, name);
    if (v || !PyErr_ExceptionMatches(PyExc_AttributeError)) return v;
    PyErr_Clear();
    return PyObject_GetAttr(self->wrapped, name); /* __name__, __doc__, __module__... */
}

static PyObject *hook_mw_wrapped(hook_t *self, void *closure) {
    Py_RETURN_TRUE;
}

static PyObject *hook_repr(hook_t *self) {
    return PyUnicode_FromFormat("<middleware span hook around %R>", self->wrapped);
}

static int hook_traverse(hook_t *self, visitproc visit, void *arg) {
    Py_VISIT(self->wrapped);
    return 0;
}

static void hook_dealloc(hook_t *self) {
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->wrapped);
    PyObject_GC_Del(self);
}

static PyMemberDef hook_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(hook_t, wrapped), READONLY, "the wrapped function"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef hook_getset[] = {
    {"_mw_wrapped", (getter)hook_mw_wrapped, NULL, "always True: installed by middleware", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject g_hook_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "middleware._native.SpanHook",
    .tp_basicsize = sizeof(hook_t),
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_repr = (reprfunc)hook_repr,
    .tp_call = PyVectorcall_Call,
    .tp_getattro = (getattrofunc)hook_getattro,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "opentelemetry.context.attach or detach, with the span labels (middleware).",
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_vectorcall_offset = offsetof(hook_t, vectorcall),
    .tp_members = hook_members,
    .tp_getset = hook_getset,
};

static PyObject *new_hook(PyObject *wrapped, int detach) {
    hook_t *h = PyObject_GC_New(hook_t, &g_hook_type);
    if (!h) return NULL;
    h->wrapped = Py_NewRef(wrapped);
    h->detach = detach;
    h->vectorcall = detach ? (vectorcallfunc)hook_detach : (vectorcallfunc)hook_attach;
    PyObject_GC_Track(h);
    return (PyObject *)h;
}

#define SET_REF(field, value) Py_XSETREF(g.field, Py_NewRef(value))

static PyObject *py_otel_hooks(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"attach",   "detach",    "slow_push", "pop_labels",   "apply",
                             "current",  "ids",       "applied",   "span_id_type", "labels_globals",
                             "span_key", "attribute", NULL};
    PyObject *attach, *detach, *slow_push, *pop_labels, *apply, *current, *ids, *applied,
        *labels_globals, *span_key, *attribute;
    PyTypeObject *span_id_type;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO$OOOO!O!OO!O!OU", kwlist, &attach, &detach,
                                     &slow_push, &pop_labels, &apply, &PyContextVar_Type, &current,
                                     &PyDict_Type, &ids, &applied, &PyType_Type, &span_id_type,
                                     &PyDict_Type, &labels_globals, &span_key, &attribute))
        return NULL;
    if (!PyType_IsSubtype(span_id_type, &PyUnicode_Type)) {
        PyErr_SetString(PyExc_TypeError, "span_id_type must be a str subclass");
        return NULL;
    }
    if (!g.pushed && !(g.pushed = PyDict_New())) return NULL;
    SET_REF(slow_push, slow_push);
    SET_REF(pop_labels, pop_labels);
    SET_REF(apply, apply);
    SET_REF(current, current);
    SET_REF(ids, ids);
    SET_REF(applied, applied);
    Py_XSETREF(g.span_id_type, (PyTypeObject *)Py_NewRef(span_id_type));
    SET_REF(labels_globals, labels_globals);
    SET_REF(span_key_fn, span_key);
    SET_REF(attribute, attribute);
    Py_CLEAR(g.span_key);
    PyObject *a = new_hook(attach, 0), *d = a ? new_hook(detach, 1) : NULL;
    if (!d) {
        Py_XDECREF(a);
        return NULL;
    }
    PyObject *r = PyTuple_Pack(2, a, d);
    Py_DECREF(a);
    Py_DECREF(d);
    return r;
}

PyMethodDef mw_otel_methods[] = {
    {"otel_hooks", (PyCFunction)(void (*)(void))py_otel_hooks, METH_VARARGS | METH_KEYWORDS,
     "otel_hooks(attach, detach, *, slow_push, pop_labels, apply, current, ids, applied, "
     "span_id_type, labels_globals, span_key, attribute) -> (attach hook, detach hook)"},
    {NULL, NULL, 0, NULL},
};

#define INTERN(var, text)                                                                          \
    do {                                                                                           \
        if (!(var) && !((var) = PyUnicode_InternFromString(text))) return -1;                      \
    } while (0)

int mw_otel_module_init(PyObject *m) {
    INTERN(s_span_id, "span_id");
    INTERN(s_span_name, "span_name");
    INTERN(s_get_span_context, "get_span_context");
    INTERN(s_parent, "parent");
    INTERN(s_is_remote, "is_remote");
    INTERN(s_is_recording, "is_recording");
    INTERN(s_is_valid, "is_valid");
    INTERN(s_trace_id, "trace_id");
    INTERN(s_name, "name");
    INTERN(s_span_int, "span_int");
    INTERN(s_ids, "_ids");
    INTERN(s_pairs, "pairs");
    INTERN(s__parent, "_parent");
    INTERN(s__context, "_context");
    INTERN(s__name, "_name");
    INTERN(s__end_time, "_end_time");
    INTERN(s_dict, "__dict__");
    INTERN(s_set_attribute, "set_attribute");
    INTERN(s_hook_state, "_asyncio_hook_state");
    INTERN(s_asyncio_events, "asyncio.events");
    INTERN(s_get_loop_name, "_get_running_loop");
    INTERN(s_greenlets, "greenlets");
    INTERN(s_greenlet, "greenlet");
    if (PyType_Ready(&g_hook_type) < 0) return -1;
    return 0;
}
