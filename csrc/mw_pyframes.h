/* mw_pyframes — reading CPython's thread list and frame chains from outside the interpreter.
 *
 * This is the only file compiled with Py_BUILD_CORE: it includes the interpreter's internal
 * headers so that every offsetof() matches the CPython minor version the extension is built
 * for (3.10, 3.11, 3.12, 3.13). Everything else sees plain addresses and the small structs
 * below.
 *
 * Threads: mw_pyframes_init() needs the GIL (called once from module start). All other
 * functions are called WITHOUT the GIL, by the sampler thread, and mw_pyframes_top_frame_of and
 * mw_pyframes_walk (with a caller-owned scratch) also by a thread in a signal handler: they read
 * interpreter memory only through mw_safe_read(), take no lock, allocate nothing and never call
 * the Python C API (async-signal-safe).
 * A torn read makes them return an error or a shorter result, never crash.
 */
#ifndef MW_PYFRAMES_H
#define MW_PYFRAMES_H

#include <stddef.h>
#include <stdint.h>

#include "mw_saferead.h"

#define MW_MAX_THREADS 4096

typedef struct mw_pythread {
    uintptr_t tstate;
    long tid;            /* kernel thread id (gettid), 0 if unknown */
    uintptr_t top_frame; /* newest frame (version-specific pointer), 0 if none */
    uint64_t uid;        /* the thread state's id: unique in the interpreter (its address is not:
                          * a thread state made again soon after one is freed reuses its memory) */
} mw_pythread_t;

/* What a frame tells about its code object: read once per frame during the walk, and used
 * by the symbol cache both as the key (a recycled code address shows as a changed field) and
 * to fill a missing entry. */
typedef struct mw_pycode {
    uintptr_t qualname;  /* str object (3.10: co_name) */
    uintptr_t filename;  /* str object */
    uintptr_t linetable; /* bytes object */
    int32_t firstlineno;
    uint32_t version; /* 3.12+: co_version, unique per code object (0 on 3.10/3.11) */
} mw_pycode_t;

typedef struct mw_rawframe {
    uintptr_t code; /* PyCodeObject address, validated as a code object */
    int32_t lasti;  /* instruction index in code units, -1 if at function entry */
    /* Native frames (mw_unwind): number of C-level calls of the eval loop that begin at this
     * frame, i.e. it is the outermost Python frame of that call (3.10: every frame; 3.11:
     * is_entry; 3.12+: the frame above a FRAME_OWNED_BY_CSTACK entry frame). >1 when the
     * Python frames of a call were all skipped as incomplete. */
    uint8_t eval_entry;
    mw_pycode_t info;
} mw_rawframe_t;

/* Line-table format of this build (mw_linetable.h). */
int mw_pyframes_linetable_format(void);

/* Records the main interpreter and probes layouts. GIL held. Returns 0 or -1 (Python error set). */
int mw_pyframes_init(void);

/* Lists the interpreter's threads (newest first). Returns the count (<= max), or -1 when the
 * list could not be read consistently. Reads go through rc (reset by the callee): thread states
 * that sit close together are copied a few pages per system call. */
int mw_pyframes_threads(mw_readcache_t *rc, mw_pythread_t *out, int max);

/* The newest thread state of the list (its head), 0 when unreadable. A new thread changes it. */
uintptr_t mw_pyframes_threads_head(void);

/* 1 when thread state `tstate` is of our interpreter, kernel thread `tid`'s (3.10: through its
 * pthread), and still linked into the interpreter's list: its neighbours point back at it. A
 * deleted thread state is unlinked (its neighbours point past it) even while its own memory
 * still looks like the thread's. For a thread beyond a list cut at its length limit, whose
 * absence from the listing says nothing. Plain safe reads; sampler thread. */
int mw_pyframes_listed(uintptr_t tstate, long tid);

/* Re-reads a thread's newest frame pointer (the one mw_pyframes_threads gave is as old as the
 * tick), and *anchor = a frame the chain from the top must reach when the top was read at a
 * consistent moment (3.11/3.12: the previous eval call's current frame), 0 when none. Returns 0
 * when it cannot be read. */
uintptr_t mw_pyframes_top_frame_anchored(uintptr_t tstate, uintptr_t *anchor);
static inline uintptr_t mw_pyframes_top_frame(uintptr_t tstate) {
    uintptr_t anchor;
    return mw_pyframes_top_frame_anchored(tstate, &anchor);
}

/* Reads the newest frame of thread state `tstate` through rc (the caller resets it) and checks
 * that the state belongs to kernel thread `tid` (3.10: only that it is of our interpreter).
 * Returns 0 when unreadable, not that thread's (*mine = 0) or without a frame (*mine = 1);
 * *anchor as for mw_pyframes_top_frame_anchored. Async-signal-safe: meant for a
 * thread reading its own frames in a signal handler (mw_cputimer). */
uintptr_t mw_pyframes_top_frame_of(mw_readcache_t *rc, uintptr_t tstate, long tid,
                                   uintptr_t *anchor, int *mine);

/* The thread state of kernel thread `tid` that has a frame, among the MW_FIND_OWN_HOPS newest of
 * the list (a thread state is put at its head when made), or 0. For a thread whose CPU timer was
 * armed for an older thread state: a native thread that calls into Python gets a new one for each
 * call (PyGILState_Ensure: ctypes callbacks, pybind11). Async-signal-safe, like
 * mw_pyframes_top_frame_of; the caller resets rc. */
#define MW_FIND_OWN_HOPS 16
uintptr_t mw_pyframes_find_own(mw_readcache_t *rc, long tid);

/* Scratch space of one walk (a few hundred KiB). The sampler thread passes NULL (its own static
 * scratch); other callers (signal handlers) pass one they own exclusively for the walk. */
typedef struct mw_walkscratch mw_walkscratch_t;
size_t mw_walkscratch_size(void);

/* Walks a thread's frames from top_frame: fills out[] leaf first with validated code objects
 * and instruction indices; skips interpreter-internal frames. Returns the depth. *truncated is
 * 1 when the walk stopped early (unreadable frame, loop, depth cap), 2 (and the depth 0) when
 * the chain is not one the thread had: it missed `anchor` (from
 * mw_pyframes_top_frame_anchored; 0 = no check) or ended in a suspended generator's frame.
 * Reads go through rc, which the caller resets before each walk. */
int mw_pyframes_walk(mw_readcache_t *rc, mw_walkscratch_t *ws, uintptr_t top_frame,
                     uintptr_t anchor, mw_rawframe_t *out, int max, int *truncated);

/* The outermost frame of a walk that a generator or coroutine runs (an asyncio task's coroutine,
 * when the thread runs a task): the object's address and the frame's index in out[] (gen 0 and
 * idx -1 when none was kept). */
typedef struct mw_outergen {
    uintptr_t gen;
    int idx;
    /* the asyncio task running gen at the walk, when the walk's caller looked it up then (the
     * CPU-timer handler: mw_tasks_current), else 0; a hint, confirmed when used */
    uintptr_t task;
} mw_outergen_t;

/* mw_pyframes_walk, also filling *og (which may be NULL). Same threads and reads. */
int mw_pyframes_walk_gen(mw_readcache_t *rc, mw_walkscratch_t *ws, uintptr_t top_frame,
                         uintptr_t anchor, mw_rawframe_t *out, int max, int *truncated,
                         mw_outergen_t *og);

/* What a coroutine or generator object is doing (mw_pyframes_coro). */
enum {
    MW_CORO_UNREADABLE = -1, /* not a coroutine/generator, or a read failed */
    MW_CORO_SUSPENDED = 0,   /* paused (at an await when *awaited is set) */
    MW_CORO_CREATED = 1,     /* not started yet */
    MW_CORO_RUNNING = 2,     /* its frame is executing: it is on some thread's stack */
    MW_CORO_DONE = 3         /* returned, raised or closed */
};

/* Reads the coroutine or generator object at `gen` (of the built-in coroutine or generator
 * type, else MW_CORO_UNREADABLE): its frame into *out (code object, instruction index, code
 * info; filled for SUSPENDED and CREATED only) and, when it is suspended at an await (yield
 * from), the object it awaits into *awaited (the top of its value stack: the caller checks its
 * type; 0 when none). Returns its MW_CORO_* state. No GIL, no C API: reads through rc (NULL:
 * one safe read each). */
int mw_pyframes_coro(mw_readcache_t *rc, uintptr_t gen, mw_rawframe_t *out, uintptr_t *awaited);

/* The same without reading the code object: its state, code object address, instruction index
 * and awaited object (0 when none) as mw_pyframes_coro gives them, unvalidated: to compare a
 * coroutine with an earlier full read of it. */
int mw_pyframes_coro_peek(mw_readcache_t *rc, uintptr_t gen, uintptr_t *code, int32_t *lasti,
                          uintptr_t *awaited);

/* The first local (the first argument: `self` of a method) of the frame of the suspended
 * coroutine or generator at `gen` into *out. 0, or -1 when unreadable or before 3.11 (where a
 * coroutine's frame is a separate object; nothing needs it there). No GIL, no C API: reads
 * through rc; the value is unvalidated (the caller compares it with an address it knows). */
int mw_pyframes_coro_local0(mw_readcache_t *rc, uintptr_t gen, uintptr_t *out);

/* Fills *out for code object `code` at instruction index `lasti` (-1: at entry), validated as a
 * walk validates a frame. 0, or -1 when it is not a readable code object or lasti is out of
 * its bytecode. Any thread, no GIL (reads as mw_pyframes_coro). */
int mw_pyframes_code_frame(mw_readcache_t *rc, uintptr_t code, int32_t lasti, mw_rawframe_t *out);

/* The type (ob_type) of the object at obj, 0 when unreadable. Any thread, no GIL. */
uintptr_t mw_pyframes_type_of(mw_readcache_t *rc, uintptr_t obj);

/* Copies a str object as UTF-8 into buf (NUL-terminated, truncated to cap-1), or a bytes
 * object's contents (-1 also if larger than cap). Returns the length or -1. Through a read
 * cache's mode (guarded direct copies in a signal handler: async-signal-safe), or, rc NULL, safe
 * reads. */
int mw_pyframes_read_str_rc(mw_readcache_t *rc, uintptr_t str, char *buf, size_t cap);
int mw_pyframes_read_bytes_rc(mw_readcache_t *rc, uintptr_t bytes, uint8_t *buf, size_t cap);
static inline int mw_pyframes_read_str(uintptr_t str, char *buf, size_t cap) {
    return mw_pyframes_read_str_rc(NULL, str, buf, cap);
}
static inline int mw_pyframes_read_bytes(uintptr_t bytes, uint8_t *buf, size_t cap) {
    return mw_pyframes_read_bytes_rc(NULL, bytes, buf, cap);
}

/* The GIL's bookkeeping, read without the GIL. In a GIL build only the thread holding the GIL
 * can change its Python frames. `switch_number` grows each time the GIL passes to a thread
 * other than `last_holder`, so two readings with the same switch_number and a last holder other
 * than thread T prove that T did not hold the GIL at any moment in between (and so that T's
 * frame chain did not change). */
typedef struct mw_gilstate {
    uintptr_t last_holder; /* PyThreadState of the last thread that took the GIL */
    unsigned long switch_number;
    int locked; /* the GIL is held (by last_holder) */
    int ok;     /* 0 when unreadable or when the build has no GIL (nothing is proven then) */
} mw_gilstate_t;

void mw_pyframes_gil(mw_gilstate_t *out);

/* 1 while the interpreter is finalizing. Any thread; a plain load of _PyRuntime. */
int mw_pyframes_finalizing(void);

/* Version string of the headers the extension was built with, e.g. "3.12". */
const char *mw_pyframes_version(void);

#endif
