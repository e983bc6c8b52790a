/* mw_sampler_tasks — the samples of waiting asyncio tasks (mw_tasks), taken at each tick.
 *
 * For each event loop registered with its thread, every task of it that is not running gets a
 * wall-time sample: its await chain (leaf first), the chains of the tasks awaiting it, then the
 * frames the thread had when it started running the loop, labelled with the task's own label set,
 * its thread's name and the task's name (the stack's thread string is "<thread name>\x1f<task
 * name>": the encoder makes it the thread_name and task labels). A task stands for the tick's wall
 * time divided by the share of the task set read this tick: all of it while it holds at most
 * MW_TASK_VISITS_SEC / rate tasks, else a slice of that many (each task is met in turn, and
 * stands for the ticks since it was last met). The running task is on its thread's stack: the
 * thread's own sample has it, and mws_task_running gives that sample the task's name and puts
 * the chains of the tasks awaiting it in place of the loop's own frames between the task's
 * coroutine and the loop's base. CPU time never goes to waiting tasks' samples.
 *
 * A chain is kept only when a second read after naming its frames finds every coroutine where
 * the first read found it (mw_tasks_recheck): the task did not run in between, so the frames
 * were on its chain together and their code objects were alive when named (otherwise the names
 * the attempt filled are dropped, mw_symcache_abort). A task the sweep finds as its last sample
 * found it (the same signature, mw_task_t.sig) adds to that sample's entry without a full read.
 *
 * Sampler thread only, buffer lock held (see mw_sampler_int.h).
 */
#include "mw_sampler_int.h"

#include "mw_labels.h"
#include "mw_symcache.h"
#include "mw_tasks.h"
#include "mw_threads.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TASK_FRAMES (MW_TASK_FRAMES_MAX + MW_TASK_BASE_MAX)

static mw_taskloop_t g_tloops[MW_TASK_LOOPS];
static uint64_t g_tloops_version; /* of the copy in g_tloops (mw_tasks_loops) */
static mw_rawframe_t g_traw[TASK_FRAMES];
static const mw_symentry_t *g_tsym[TASK_FRAMES];
static mw_id_t g_tids[TASK_FRAMES];

typedef struct {
    mw_profbuf_t *b;
    int nloops;
    uint64_t dwall;
    int visits;      /* tasks looked at per tick */
    double fraction; /* set by mw_tasks_sweep before the first task */
} tick_t;

/* The stack entry each task's last sample went to, reused while the sweep finds the task as it
 * was then (same signature: coroutines, instructions, awaitables, context, name). Four ways per
 * bucket (with one, a quarter of a thousand tasks would share a slot with another and be read in
 * full at every visit). A way is given to a new task only when its entry is stale (not met for
 * two rounds of the set: its task ended, or left the cache): the sweep meets the tasks in a
 * cycle, and replacing the least recently met would, with more tasks than entries, always evict
 * the one met next. */
#define TASK_BUCKETS 1024 /* 2^10: the hash below takes 10 bits */
#define TASK_WAYS 4
typedef struct {
    uintptr_t task;
    uint64_t sig, gen;
    uint32_t idx;
    uint32_t used; /* g_tclock when last met */
} task_entry_t;
static task_entry_t g_tcache[TASK_BUCKETS][TASK_WAYS];
static uint32_t g_tclock; /* tasks met */

/* The entry of this task, else a stale one to give it, else NULL (not cached). `round`: tasks
 * met in one round of the set. */
static task_entry_t *task_entry(uintptr_t task, uint32_t round) {
    /* the high bits of the product: tasks sit at a fixed stride in their pools */
    task_entry_t *b = g_tcache[((uint64_t)(task >> 4) * 0x9E3779B97F4A7C15ULL) >> 54];
    task_entry_t *old = &b[0];
    for (int w = 0; w < TASK_WAYS; w++) {
        if (b[w].task == task) return &b[w];
        if ((int32_t)(b[w].used - old->used) < 0) old = &b[w];
    }
    return !old->task || g_tclock - old->used > 2 * round + 64 ? old : NULL;
}

static void task_sample(void *arg, mw_task_t *t) {
    tick_t *k = arg;
    const mw_taskloop_t *l = NULL;
    for (int i = 0; i < k->nloops && !l; i++)
        if (g_tloops[i].loop == t->loop) l = &g_tloops[i];
    if (!l) return;
    double f = k->fraction > 0 ? k->fraction : 1.0;
    mw_values_t v = {0, 0, 1, (uint64_t)((double)k->dwall / f + 0.5), 0};
    uint64_t gen = mw_profbuf_generation(k->b);
    g_tclock++;
    double round = (double)k->visits / f;
    task_entry_t *c = task_entry(t->task, round < (1 << 28) ? (uint32_t)round : 1u << 28);
    if (c) c->used = g_tclock;
    if (c && c->task == t->task && c->sig == t->sig && c->gen == gen &&
        mw_profbuf_add_at(k->b, c->idx, &v) == 0) {
        g_stats.samples++;
        g_stats.reused++;
        return;
    }
    if (mw_tasks_frames(g_rc, t) != 0) return;
    int n = 0;
    for (int i = 0; i < t->nframes && n < TASK_FRAMES; i++)
        g_traw[n++] = t->frames[i];
    for (int i = 0; i < l->nbase && n < TASK_FRAMES; i++)
        g_traw[n++] = l->base[i];
    mw_symcache_begin();
    for (int i = 0; i < n; i++) {
        g_tsym[i] = mw_symcache_resolve(&g_traw[i]);
        if (!g_tsym[i]) {
            mw_symcache_abort();
            mw_tasks_count_dropped(0);
            return;
        }
    }
    if (mw_tasks_recheck(g_rc, t) != 0) {
        mw_symcache_abort();
        mw_tasks_count_dropped(1);
        return;
    }
    uint32_t m = 0;
    int lost = 0;
    for (int i = 0; i < n; i++)
        g_tids[m++] = mw_symcache_intern(k->b, g_tsym[i], g_traw[i].lasti);
    m = mws_cut_at_full(k->b, g_tids, m, &lost); /* 0 ids: a full table (lost: m == 0) */
    int created = 0;
    mw_tstate_t *st = mws_ts_find(l->tid, &created);
    if (!st || !m) {
        mw_tasks_count_dropped(0);
        return;
    }
    uint32_t thread_labels;
    mw_id_t tname = mws_thread_name_id(k->b, st, &thread_labels);
    size_t len = 0;
    const char *thread = tname ? mw_profbuf_str(k->b, tname, &len) : NULL;
    char s[MW_THREAD_NAME_MAX + MW_TASK_NAME_MAX + 2];
    int sl = snprintf(s, sizeof s, "%s\x1f%s", thread ? thread : "", t->name);
    if (sl < 0) return;
    if ((size_t)sl >= sizeof s) sl = (int)sizeof s - 1;
    mw_id_t sid = mw_profbuf_intern_str(k->b, s, (size_t)sl);
    mw_labels_span_seen(t->labelset);
    uint32_t idx;
    if (!sid || mws_add_sample(k->b, g_tids, m, sid, t->labelset, &v, &idx) != 0) {
        mw_tasks_count_dropped(0);
        if (!sid) g_stats.overflow++;
        return;
    }
    g_stats.samples++;
    if (c) {
        c->task = t->task;
        c->sig = t->sig;
        c->gen = gen;
        c->idx = idx;
    }
}

/* ---- the running task of a thread's sample --------------------------------------------- */

static mw_rawframe_t *g_xraw; /* the spliced stack: MW_MAX_DEPTH_CAP frames */
static const mw_symentry_t **g_xsym;
static int g_ntloops;
/* Per thread, the last outermost coroutine found to be no loop's task (asked about once). */
#define NO_LOOP_SLOTS 64
static struct {
    long tid;
    uintptr_t gen;
} g_noloop[NO_LOOP_SLOTS];

/* The thread string "<thread name>\x1f<task name>" of a task's sample in b; 0 when b is full. */
static mw_id_t task_thread(mw_profbuf_t *b, mw_tstate_t *st, const char *task) {
    uint32_t thread_labels;
    mw_id_t tname = mws_thread_name_id(b, st, &thread_labels);
    size_t len = 0;
    const char *thread = tname ? mw_profbuf_str(b, tname, &len) : NULL;
    char s[MW_THREAD_NAME_MAX + MW_TASK_NAME_MAX + 2];
    int sl = snprintf(s, sizeof s, "%s\x1f%s", thread ? thread : "", task);
    if (sl < 0) return 0;
    if ((size_t)sl >= sizeof s) sl = (int)sizeof s - 1;
    return mw_profbuf_intern_str(b, s, (size_t)sl);
}

mw_id_t mws_plain_thread(mw_profbuf_t *b, mw_id_t thread) {
    size_t len = 0;
    const char *s = thread ? mw_profbuf_str(b, thread, &len) : NULL;
    const char *sep = s ? memchr(s, '\x1f', len) : NULL;
    if (!sep) return thread;
    mw_id_t plain = mw_profbuf_intern_str(b, s, (size_t)(sep - s));
    return plain ? plain : thread;
}

/* Where the loop's base frames start in raw (after index k): the first index from which the
 * thread's outermost frames are the base's codes, else -1. */
static int base_at(const mw_taskloop_t *l, const mw_rawframe_t *raw, int depth, int k) {
    if (l->nbase <= 0) return depth;
    for (int j = k + 1; j + l->nbase <= depth; j++) {
        int i = 0;
        while (i < l->nbase && raw[j + i].code == l->base[i].code)
            i++;
        if (i == l->nbase) return j;
    }
    return -1;
}

/* A loop whose start was not seen (a uvloop imported before the tracker, a loop already running
 * in another thread when it started, a loop started after the thread's last one ended unseen):
 * the loop of the task whose coroutine og's is, registered with st's thread in place of `old`
 * (0: none). Asked once per coroutine met outermost on such a thread (a generator a thread
 * iterates is asked about once). The new entry, or NULL. */
static const mw_taskloop_t *adopt_loop(mw_tstate_t *st, const mw_outergen_t *og,
                                       const mw_rawframe_t *raw, int depth, uintptr_t old) {
    uint32_t slot = (uint32_t)st->tid % NO_LOOP_SLOTS;
    if (g_noloop[slot].tid == st->tid && g_noloop[slot].gen == og->gen) return NULL;
    mw_readcache_reset(g_rc);
    uintptr_t loop = mw_tasks_loop_of(g_rc, og->gen, og->task);
    if (!loop || loop == old ||
        mw_tasks_loop_adopt(st->tid, loop, raw + og->idx + 1, depth - og->idx - 1) != 0) {
        g_noloop[slot].tid = st->tid;
        g_noloop[slot].gen = og->gen;
        return NULL;
    }
    g_ntloops = mw_tasks_loops(g_tloops, MW_TASK_LOOPS, &g_tloops_version);
    for (int i = 0; i < g_ntloops; i++)
        if (g_tloops[i].tid == st->tid) return &g_tloops[i];
    return NULL;
}

int mws_task_running(mw_profbuf_t *b, mw_tstate_t *st, const mw_outergen_t *og, int splice,
                     const mw_rawframe_t **raw, int *depth, mw_id_t *thread) {
    if (!og || !og->gen || og->idx < 0 || og->idx >= *depth || !mw_tasks_ready()) return 0;
    int n = mw_tasks_loops(g_tloops, MW_TASK_LOOPS, &g_tloops_version);
    if (n >= 0) g_ntloops = n;
    const mw_taskloop_t *l = NULL;
    for (int i = 0; i < g_ntloops && !l; i++)
        if (g_tloops[i].tid == st->tid) l = &g_tloops[i];
    if (!l && !(l = adopt_loop(st, og, *raw, *depth, 0))) return 0;
    if (splice && !g_xraw) {
        g_xraw = calloc(MW_MAX_DEPTH_CAP, sizeof *g_xraw);
        g_xsym = calloc(MW_MAX_DEPTH_CAP, sizeof *g_xsym);
        if (!g_xraw || !g_xsym) {
            free(g_xraw);
            free((void *)g_xsym);
            g_xraw = NULL;
            g_xsym = NULL;
            splice = 0;
        }
    }
    int k = og->idx, j = splice ? base_at(l, *raw, *depth, k) : -1;
    mw_task_t t;
    mw_readcache_reset(g_rc);
    if (mw_tasks_running(g_rc, l->loop, og->gen, og->task, j >= 0, &t) != 0) {
        /* the thread's entry may be a loop gone (its stop not seen) and this a new one's task */
        const mw_taskloop_t *l2 = adopt_loop(st, og, *raw, *depth, l->loop);
        if (!l2) return 2;
        l = l2;
        j = splice ? base_at(l, *raw, *depth, k) : -1;
        mw_readcache_reset(g_rc);
        if (mw_tasks_running(g_rc, l->loop, og->gen, og->task, j >= 0, &t) != 0) return 2;
    }
    mw_id_t sid = task_thread(b, st, t.name);
    if (!sid) return 2;
    *thread = sid;
    if (j < 0) return 1;
    /* own frames [0..k], the parents' chains, the base [j..depth) */
    int m = k + 1 + t.nframes + (*depth - j);
    if (m > MW_MAX_DEPTH_CAP) return 1;
    const mw_rawframe_t *in = *raw;
    uint64_t epoch = mw_symcache_epoch();
    mw_symcache_begin();
    int x = 0;
    for (int i = 0; i <= k; i++, x++) {
        g_xraw[x] = in[i];
        g_xsym[x] = g_sym[i];
    }
    for (int i = 0; i < t.nframes; i++, x++) {
        g_xraw[x] = t.frames[i];
        g_xsym[x] = mw_symcache_resolve(&t.frames[i]);
        if (!g_xsym[x]) break;
    }
    if (mw_symcache_epoch() != epoch) return -1; /* emptied: every handle is gone */
    if (x != k + 1 + t.nframes || (t.nframes && mw_tasks_recheck(g_rc, &t) != 0)) {
        mw_symcache_abort(); /* a parent ran meanwhile: the thread's stack as it is */
        return 1;
    }
    for (int i = j; i < *depth; i++, x++) {
        g_xraw[x] = in[i];
        g_xsym[x] = g_sym[i];
    }
    memcpy((void *)g_sym, g_xsym, (size_t)x * sizeof *g_sym);
    *raw = g_xraw;
    *depth = x;
    return 1;
}

void mws_tasks_tick(mw_profbuf_t *b, uint64_t dwall) {
    if (!mw_tasks_ready()) return;
    int n = mw_tasks_loops(g_tloops, MW_TASK_LOOPS, &g_tloops_version);
    if (n <= 0) return;
    int rate = mw_sampler_tick_rate();
    tick_t k = {b, n, dwall, rate > 0 ? (MW_TASK_VISITS_SEC + rate - 1) / rate : 1, 1.0};
    mw_tasks_sweep(g_rc, g_tloops, n, k.visits, task_sample, &k, &k.fraction);
}
