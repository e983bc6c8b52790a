/* mw_module — the parts of the middleware._native module defined outside csrc/mw_module.c.
 *
 * middleware._native is one extension module: csrc/mw_module.c holds its core functions and
 * creates it, and each other concern contributes a method table and an init hook from its own
 * glue file, csrc/mw_module_<concern>.c. Every part is always compiled in (setup.py builds all
 * C files of csrc/ but the uploader's into the module): a missing part is an undefined symbol,
 * so the module does not import and `make build`, which imports it, fails.
 *
 * Method tables: NULL-terminated, static for the life of the process, never modified; appended
 * after the core functions in the order listed here.
 *
 * Init hooks: called by PyInit__native with the GIL held, after the module object is created
 * and before it is returned; once per import of the module (more than once only when an
 * interpreter imports it again), so each must be idempotent. Return 0, or -1 with a Python
 * error set (the import then fails).
 *
 * Include after <Python.h>.
 */
#ifndef MW_MODULE_H
#define MW_MODULE_H

/* csrc/mw_module_export.c: export_*, encode_snapshot (exporter, pprof encoder, local store). */
extern PyMethodDef mw_export_methods[];
/* Registers the exporter's fork handlers (once per process). */
int mw_export_module_init(PyObject *m);

/* csrc/mw_module_unwind.c: unwind_*, thread_init (native frames, per-thread set-up). */
extern PyMethodDef mw_unwind_methods[];

/* csrc/mw_module_locks.c: locks_* and the ProfiledLock / ProfiledRLock types (block profile). */
extern PyMethodDef mw_locks_methods[];
/* Adds the two lock types to the module and registers mw_blockprof's fork handlers (once). */
int mw_locks_module_init(PyObject *m);

/* csrc/mw_module_memory.c: memory_* (allocator hooks, memory profile). */
extern PyMethodDef mw_memory_methods[];
/* Registers mw_memprof's fork handlers (once). */
int mw_memory_module_init(PyObject *m);

/* csrc/mw_module.c: SpanSets, the dict type of middleware.labels.SpanId._ids (ready once the
 * module is initialised). */
extern PyTypeObject mw_spansets_type;

/* csrc/mw_module_otel.c: otel_hooks, span_seen (the OpenTelemetry span labels' hot path). */
extern PyMethodDef mw_otel_methods[];
/* Interns its names and readies the hook type. */
int mw_otel_module_init(PyObject *m);

/* csrc/mw_module.c: the calling thread's kernel id (gettid), cached per thread and looked up
 * again in a forked child. Any thread; not async-signal-safe (its first call per thread). */
long mw_module_tid(void);

/* csrc/mw_module_tasks.c: tasks_* (asyncio task stacks). */
extern PyMethodDef mw_tasks_methods[];

#endif /* MW_MODULE_H */
