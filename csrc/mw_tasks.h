/* mw_tasks — asyncio tasks read without the GIL: for each task of an event loop that is not
 * running, its await chain (coroutine frames), its label set and its name.
 *
 * How the tasks are found. asyncio keeps every task in one process-wide WeakSet (3.10/3.11
 * asyncio.tasks._all_tasks, 3.12/3.13 _scheduled_tasks): its `data` set holds a weak reference to
 * each task. The sampler reads that set's hash table with safe reads, a slice of it per tick, the
 * task each live reference points to (the C Task type only), the task's loop, name, context and
 * coroutine, then the chain of coroutines it awaits: a suspended coroutine's awaitable is the top
 * of its value stack (mw_pyframes_coro). Field offsets of the Task object are found at set-up by
 * looking for known objects in a task made for the purpose.
 *
 * Parents. A task awaited by another task (`await task`), gathered by asyncio.gather or waited
 * for by asyncio.wait sits under the awaiting task's chain: the awaiting task is the owner of the
 * awaited future's first done-callback (its wake-up method; for a gathered or waited-for task, the
 * callback gather or wait put on it holds in its closure the future the awaiting task awaits
 * (gather's `outer`, wait's `waiter`), and that future's callback is the awaiting task's
 * wake-up), confirmed by the awaiting task's own awaited future (fut_waiter). A task of an
 * asyncio.TaskGroup (3.11+) has the group's `_on_task_done` as its callback, a method whose
 * __self__ is the group; the task waiting in the group's `__aexit__` (3.13: `_aexit`) has the
 * group as that coroutine's first local. Each sweep remembers, for the groups whose exit it sees
 * in a chain, the task waiting there (MW_TASK_GROUPS, direct-mapped by address), and a group's
 * task goes under that task once its chain is read again and still waits in that group's exit.
 * A task asyncio.wait_for waits for in 3.10/3.11 (it wraps the awaitable in a task and awaits a
 * future of its own) has functools.partial(_release_waiter, waiter) as its callback: the
 * awaiting task is the one whose wake-up is that waiter's callback and whose awaited future it
 * is, as for gather.
 *
 * Labels. A task's labels are the value of middleware.labels' context variable in the task's
 * context: the sampler looks the variable up in the context's HAMT (its node types found at
 * set-up) and gets the value object, a tuple; the tuple's label-set id comes from a table that
 * every push of a label set fills (mw_tasks_label_value: object address → id). An address whose
 * object was freed and reused is registered again when the new tuple is pushed, so a hit is
 * always that object's id; an entry pushed out of the table (two ways per slot) is a miss, and
 * the task's samples carry no labels rather than another's.
 *
 * The running task. A thread's sample knows the outermost coroutine on its stack
 * (mw_pyframes_walk_gen); mw_tasks_running finds its task: among the tasks the sweep met (a
 * coroutine → task hint table, sampler thread only), else in asyncio's dict of each loop's current
 * task (its entries scanned with safe reads; 3.11+ as pycore_dict.h lays them out, 3.10 as its
 * dict-common.h), confirmed by the task's head (its loop, its coroutine).
 *
 * Event loops. A loop is registered with its thread (mw_tasks_loop_set) while it runs, with the
 * frames the thread had when it started running it: a waiting task's stack is its await chain
 * over those frames.
 *
 * Threads and locks. mw_tasks_setup, mw_tasks_loop_set and mw_tasks_label_value: Python threads
 * with the GIL (so one at a time). mw_tasks_loops and mw_tasks_sweep: the sampler thread. The
 * loop table is guarded by its own mutex (held for copies only, never across a read of the
 * interpreter); the label-value table is written with relaxed 64-bit atomic stores and read
 * lock-free; the configuration is published once (ready flag, release/acquire).
 * Nothing here allocates after set-up or calls the Python C API outside mw_tasks_setup.
 */
#ifndef MW_TASKS_H
#define MW_TASKS_H

#include <stddef.h>
#include <stdint.h>

#include "mw_pyframes.h"
#include "mw_saferead.h"

#define MW_TASK_LOOPS 64       /* event loops running at once (more: not followed, counted) */
#define MW_TASK_BASE_MAX 48    /* frames kept under a loop's tasks */
#define MW_TASK_CHAIN_MAX 64   /* coroutines followed per task */
#define MW_TASK_PARENTS 8      /* awaiting tasks followed up from a task */
#define MW_TASK_JOINS 2        /* callbacks of gather-like helpers known (see Parents) */
#define MW_TASK_GROUP_WAITS 2  /* coroutines of TaskGroup in which its owner waits (see Parents) */
#define MW_TASK_GROUPS 256     /* task groups whose waiting owner is remembered (see Parents) */
#define MW_TASK_FRAMES_MAX 128 /* frames of a task and its parents */
#define MW_TASK_LOOP_CODES 4   /* codes of a loop's own frames known (see loop_codes) */
#define MW_TASK_NAME_MAX 96    /* bytes of a task's name kept (UTF-8, NUL included) */
#define MW_TASK_VISITS_SEC                                                                         \
    1000 /* tasks looked at per second (a bounded walk: see mw_tasks_sweep) */
#define MW_TASK_SLOTS_TICK 1024 /* slots of the task set's table read per tick, at most */

typedef struct {
    long tid;       /* the loop's thread (kernel id) */
    uintptr_t loop; /* the loop object */
    int nbase;      /* frames of the thread under the loop's tasks, innermost first */
    mw_rawframe_t base[MW_TASK_BASE_MAX];
} mw_taskloop_t;

/* What the set-up learnt (filled by the module glue with the GIL held, then published). */
typedef struct {
    uintptr_t task_type;                            /* _asyncio.Task */
    uintptr_t tasks_set;                            /* the set object of the WeakSet of tasks */
    long off_loop, off_coro, off_name, off_context; /* byte offsets in a Task */
    uintptr_t steps_type; /* a coroutine wrapper whose slot holds the task's coroutine, 0 none */
    long steps_off;
    /* Done-callbacks whose closure holds the future an awaiting task awaits: asyncio.gather's
     * (`outer`) and asyncio.wait's (`waiter`); code 0: not followed. */
    uintptr_t join_code[MW_TASK_JOINS];
    long join_cell[MW_TASK_JOINS]; /* index of that future's cell in the closure */
    /* asyncio.TaskGroup (3.11+; 0: not followed): the code of the done-callback it puts on each
     * of its tasks (a method: its __self__ is the group) and of the coroutines in which the task
     * of the `async with` waits for them (`self` their first local). */
    uintptr_t group_done_code;
    uintptr_t group_wait_code[MW_TASK_GROUP_WAITS];
    /* functools.partial(asyncio.tasks._release_waiter, waiter), the callback asyncio.wait_for
     * (3.10/3.11) puts on the task it waits for: the partial type, the function, and the byte
     * offsets of a partial's function and argument tuple (0: not followed). */
    uintptr_t partial_type, release_waiter;
    long off_partial_fn, off_partial_args;
    /* asyncio's dict of the task each loop runs now (_current_tasks: loop → task), 0 unknown */
    uintptr_t current_tasks;
    /* Code of the loop's own frames between a running task's coroutine and the loop's run
     * (asyncio's Handle._run, BaseEventLoop._run_once): not part of a loop's base. */
    uintptr_t loop_codes[MW_TASK_LOOP_CODES];
    uintptr_t labels_var;                                             /* the labels' ContextVar */
    int32_t labels_hash;                                              /* its HAMT hash */
    uintptr_t hamt_bitmap_type, hamt_array_type, hamt_collision_type; /* 0 when unknown */
} mw_tasks_config_t;

/* Publishes the configuration (once; later calls are ignored and return 1). GIL held. */
int mw_tasks_setup(const mw_tasks_config_t *cfg);
int mw_tasks_ready(void);

/* Registers the loop running in thread tid with its base frames (innermost first, at most
 * MW_TASK_BASE_MAX kept), replacing what that thread had; loop 0 removes the thread's. Returns 0,
 * or -1 when the table is full (counted). GIL held. */
int mw_tasks_loop_set(long tid, uintptr_t loop, const mw_rawframe_t *base, int nbase);

/* The registered loops in out (at most max): copied only when the table changed since the copy
 * of *version (the caller keeps out and *version between calls; start *version at 0). Returns
 * their number. Sampler thread. */
int mw_tasks_loops(mw_taskloop_t *out, int max, uint64_t *version);

/* Records that label-set id `lid` is the value object at `obj` (a tuple pushed into the labels'
 * context variable). GIL held; lock-free for readers. */
void mw_tasks_label_value(uintptr_t obj, uint32_t lid);

/* A task found waiting (not running) by a sweep. What the sweep fills: the addresses and a
 * signature of what it peeked at (the task, its coroutines' code, instruction and awaitable, its
 * context and variables, its name): equal signatures, equal samples. The rest (frames, label
 * set, name) is filled by mw_tasks_frames. */
typedef struct {
    uintptr_t task, loop, coro, context, vars, name_obj;
    uint64_t sig;
    int nparents; /* tasks awaiting it (`await task`, gather, wait), innermost first */
    uintptr_t parents[MW_TASK_PARENTS], parent_coros[MW_TASK_PARENTS];
    int parent_len[MW_TASK_PARENTS]; /* frames of each parent's chain */
    int nown;                        /* frames of its own chain (the first of frames) */
    int nframes;                     /* its chain, then each parent's, leaf (innermost) first */
    const mw_rawframe_t *frames;     /* valid until the next call */
    uint32_t labelset;               /* 0: none (or its value was not found) */
    char name[MW_TASK_NAME_MAX];
} mw_task_t;

/* Reads the task's await chain, label set and name into *t. 0, or -1 when the task ran since the
 * sweep looked at it (counted as torn). Sampler thread, from the sweep's fn. */
int mw_tasks_frames(mw_readcache_t *rc, mw_task_t *t);

typedef void (*mw_task_fn)(void *arg, mw_task_t *t);

/* Reads the next slice of the task set, from where the last sweep stopped, and calls fn for each
 * waiting task of a loop in loops[0..nloops). The walk is bounded: all of the set when it holds
 * at most `visits` tasks, else a slice of its table sized to hold about `visits` of them (the
 * set's count over its table's size; at most MW_TASK_SLOTS_TICK slots), so each task is met once
 * every size/slice ticks and stands for 1/fraction of the tick. *fraction gets the share of the
 * table the slice covers (1 when all of it), set before fn is first called. Returns the number of
 * tasks given to fn, -1 when not set up or the set was unreadable. Sampler thread; reads through
 * rc (reset per task). */
int mw_tasks_sweep(mw_readcache_t *rc, const mw_taskloop_t *loops, int nloops, int visits,
                   mw_task_fn fn, void *arg, double *fraction);

/* Reads the task's coroutines again: 0 when each is where the sweep found it (same code,
 * instruction and awaitable), so the chain given to fn was one the task had; -1 otherwise (it
 * ran meanwhile: drop the sample). Call from fn, with the t it was given. Sampler thread. */
int mw_tasks_recheck(mw_readcache_t *rc, const mw_task_t *t);

/* The running task of a thread's sample: the task of `loop` whose coroutine is `gen` (the
 * outermost frame a coroutine runs on the thread's stack, mw_pyframes_walk_gen), found through
 * the tasks met so far as the loop's current task, else asyncio's dict of current tasks, and
 * confirmed by the task's own head (its loop, its coroutine: a coroutine belongs to one task,
 * and the task keeps it alive). Fills *t: the task, its name and, when `parents`, the tasks
 * awaiting it and their chains (t->frames: the parents' chains only, nown 0; then check with
 * mw_tasks_recheck after naming them). `hint`, when not 0, is tried first: the task found running
 * gen when the sample was taken (mw_tasks_current). 0, or -1 when gen is no known task's
 * coroutine (counted). Sampler thread. */
int mw_tasks_running(mw_readcache_t *rc, uintptr_t loop, uintptr_t gen, uintptr_t hint, int parents,
                     mw_task_t *t);

/* The task whose coroutine is `gen` among asyncio's current tasks (one per running loop), read
 * now, else 0. For the thread running gen, at the instant of its sample: between two steps of a
 * task the dict no longer holds it, so a sample resolved later can miss its task. Reads only
 * (no counter, no lock, no allocation): async-signal-safe with a direct read cache, so the
 * CPU-timer handler calls it on the thread's own sample. */
uintptr_t mw_tasks_current(mw_readcache_t *rc, uintptr_t gen);

/* The loop whose current task runs coroutine `gen` (asyncio's dict of current tasks, each
 * task's head read), else 0: how a loop whose start was not seen (a uvloop imported before the
 * tracker, a loop already running in another thread) is found from a thread's sample; `hint` as
 * for mw_tasks_running. Sampler thread. */
uintptr_t mw_tasks_loop_of(mw_readcache_t *rc, uintptr_t gen, uintptr_t hint);
/* Registers loop with thread tid from a sample: its base frames are the n frames below the
 * task's coroutine (innermost first), less the loop's own frames (loop_codes) in front. 0, or -1
 * when the table is full (counted). Sampler thread. */
int mw_tasks_loop_adopt(long tid, uintptr_t loop, const mw_rawframe_t *below, int n);

typedef struct {
    uint64_t tasks;          /* waiting tasks given to samples */
    uint64_t running_found;  /* thread samples given their running task (name, parents) */
    uint64_t running_missed; /* thread samples of a loop's thread whose task was not found */
    uint64_t running;        /* tasks skipped because they were running (on their thread's stack) */
    uint64_t unreadable;     /* tasks whose fields or coroutines could not be read */
    uint64_t other_types;    /* objects in the set not of the C Task or a subclass (not followed) */
    uint64_t partial_ticks;  /* ticks that read only a slice of the set (the cap) */
    uint64_t chain_capped;   /* await chains cut at MW_TASK_CHAIN_MAX */
    uint64_t loops_refused;  /* loops not followed: the table was full */
    uint64_t loops_found;    /* loops registered from a thread's sample (their start not seen) */
    uint64_t labels_missed;  /* tasks with a label value the table did not know */
    uint64_t torn;           /* samples dropped: the task ran while it was read (recheck) */
    uint64_t dropped;        /* samples dropped: a frame not named, or the buffer full */
} mw_tasks_stats_t;
/* Counts a task sample the sampler dropped (torn: mw_tasks_recheck failed). Sampler thread. */
void mw_tasks_count_dropped(int torn);
void mw_tasks_get_stats(mw_tasks_stats_t *out);

/* In a forked child: the loop table's mutex starts unlocked and the table empty (the parent's
 * loops do not run in the child; its own register again). */
void mw_tasks_after_fork_child(void);

#endif
