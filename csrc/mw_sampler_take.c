/* mw_sampler_take — taking samples: a thread's sample at a tick (proven reads, stack reuse),
 * and the naming and interning of frames into the active buffer (the samples left by the threads'
 * CPU timers: mw_sampler_timed.c). Sampler thread only, buffer lock held (see mw_sampler_int.h).
 *
 * Per-thread CPU time. Linux encodes a thread's CPU clock as a clockid built from its kernel
 * tid (the MAKE_THREAD_CPUCLOCK encoding: ~tid << 3 | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED), so
 * the sampler can read any thread's CPU time of its own process with clock_gettime() and no
 * pthread handle. A thread that has exited gives EINVAL: it is skipped, never touched. (A tid
 * reused by a new thread in our own process between two ticks would look like a thread whose
 * clock went backwards: that sample gets no CPU time.)
 */
#define _GNU_SOURCE
#include "mw_sampler_int.h"
#include "mw_report.h"

#include "mw_codenames.h"
#include "mw_cputimer.h"
#include "mw_symcache.h"
#include "mw_labels.h"
#include "mw_threads.h"
#include "mw_unwind.h"

#include <string.h>
#include <time.h>

/* One read of a thread's Python frames, names included: walks from a fresh top-frame pointer
 * and resolves every frame in the symbol cache (names and line tables of cache misses are
 * copied now, while the code objects are alive). Returns the depth; *ok = 0 when a frame could
 * not be resolved. */
static mw_outergen_t g_og; /* of the last read_stack */

static int read_stack(uintptr_t tstate, int *truncated, int *ok) {
    *ok = 1;
    *truncated = 0;
    g_og.gen = 0;
    g_og.idx = -1;
    mw_readcache_reset(g_rc);
    mw_symcache_begin();
    uintptr_t anchor = 0;
    uintptr_t top = mw_pyframes_top_frame_anchored(tstate, &anchor);
    if (!top) return 0;
    int depth =
        mw_pyframes_walk_gen(g_rc, NULL, top, anchor, g_raw, g_cfg.max_depth, truncated, &g_og);
    uint64_t epoch = mw_symcache_epoch();
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < depth; i++) {
            g_sym[i] = mw_symcache_resolve(&g_raw[i]);
            if (!g_sym[i]) *ok = 0;
        }
        if (mw_symcache_epoch() == epoch) break;
        /* The cache was emptied midway (full): earlier handles are gone, resolve again. */
        epoch = mw_symcache_epoch();
        *ok = 1;
    }
    return depth;
}

uint64_t mws_frames_hash(const mw_rawframe_t *raw, int depth) {
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < depth; i++) {
        const mw_rawframe_t *f = &raw[i];
        uint64_t x = (uint64_t)f->code ^ (uint64_t)(uint32_t)f->lasti << 40 ^
                     ((uint64_t)f->info.qualname << 17 | (uint64_t)f->info.qualname >> 47) ^
                     ((uint64_t)f->info.filename << 29 | (uint64_t)f->info.filename >> 35) ^
                     ((uint64_t)f->info.linetable << 43 | (uint64_t)f->info.linetable >> 21) ^
                     ((uint64_t)(uint32_t)f->info.firstlineno << 7) ^
                     ((uint64_t)f->info.version << 23);
        h = (h ^ x) * 1099511628211ULL;
    }
    return (h ^ (uint64_t)(uint32_t)depth) * 1099511628211ULL;
}

static void remember_stack(mw_tstate_t *st, uint64_t gen, uint32_t idx, uint32_t labels_seq,
                           mw_id_t thread, uint32_t labelset, uint64_t cpu_end, int native,
                           uint64_t py_hash) {
    st->cpu_end = cpu_end;
    st->stack_valid = native ? 2 : 1;
    st->stack_gen = gen;
    st->stack_idx = idx;
    st->stack_labels = labels_seq;
    st->stack_thread = thread;
    st->stack_labelset = labelset;
    st->py_hash = py_hash;
}

/* Adds wall time to the thread's remembered entry when it still describes the thread. */
static int reuse_stack(mw_profbuf_t *b, mw_tstate_t *st, uint64_t gen, uint32_t labels_seq,
                       uint64_t dwall) {
    if (!st->stack_valid || st->stack_gen != gen || labels_seq != st->stack_labels) return 0;
    uint32_t labelset;
    mw_id_t thread = mws_thread_name_id(b, st, &labelset);
    if (thread != st->stack_thread || labelset != st->stack_labelset) return 0;
    mw_values_t v = {0, 0, 1, dwall};
    if (mw_profbuf_add_at(b, st->stack_idx, &v) != 0) return 0;
    g_stats.samples++;
    g_stats.reused++;
    return 1;
}

/* The handlers' set of named code objects follows the symbol cache: emptied with it. */
static uint64_t g_known_epoch;
void mws_known_sync(void) {
    uint64_t e = mw_symcache_epoch();
    if (e != g_known_epoch) {
        mw_codenames_clear();
        g_known_epoch = e;
    }
}

/* A marker frame: "[no Python frame]" for CPU used outside any Python frame (thread start or
 * end, pure C); unplaced, "[place unknown: due before thread exit]" for a POSIX timer's samples
 * that were due before the thread ended but never signalled (the kernel checks those timers only
 * at its tick). */
static mw_id_t marker_id(mw_profbuf_t *b, int unplaced) {
    return mws_marker(b,
                      unplaced ? "[place unknown: due before thread exit]" : "[no Python frame]");
}

/* A stack with no readable Python frame (g_ids empty) gets the marker frame, so its CPU time
 * still counts (unplaced: the CPU-timer record says where is unknown). 0 when the buffer cannot
 * take the marker. */
int mws_mark_if_empty_as(mw_profbuf_t *b, uint32_t *n, int unplaced) {
    if (*n) return 1;
    mw_id_t id = marker_id(b, unplaced);
    if (!id) return 0;
    g_ids[(*n)++] = id;
    return 1;
}

/* A walk cut short (truncated 1: more frames than MW_PROFILING_MAX_DEPTH keeps, or a frame that
 * could not be read or looped) kept the leaf side only: its root end gets a marker frame, so that
 * the partial stack is not shown as a call made from nowhere (a root of its own in a flame graph)
 * and its time is seen as cut. */
#define CUT_MARKER "[stack cut: its outer frames were not read]"
void mws_mark_if_cut(mw_profbuf_t *b, uint32_t *n, int truncated) {
    if (truncated != 1 || !*n || *n >= MW_MAX_DEPTH_CAP) return;
    mw_id_t id = mws_marker(b, CUT_MARKER);
    if (id) g_ids[(*n)++] = id;
}

/* Interns raw frames [0..depth), named in g_sym, into g_ids (leaf first); a recursion's frame
 * repeated at the same instruction is interned once. Returns the number of ids (a stack cut where
 * a table was full, mws_cut_at_full); *lost = 1 when not even that could be kept. */
uint32_t mws_intern_frames(mw_profbuf_t *b, const mw_rawframe_t *raw, int depth, int *lost) {
    uint32_t n = 0;
    mw_id_t prev = 0;
    for (int i = 0; i < depth; i++) {
        mw_id_t id = i > 0 && g_sym[i] == g_sym[i - 1] && raw[i].lasti == raw[i - 1].lasti
                         ? prev
                         : mw_symcache_intern(b, g_sym[i], raw[i].lasti);
        g_ids[n++] = id;
        prev = id;
    }
    return mws_cut_at_full(b, g_ids, n, lost);
}

/* Tells the CPU-timer handlers that these frames' code objects are named (g_sym resolved). */
void mws_mark_known(const mw_rawframe_t *raw, int depth) {
    mws_known_sync();
    for (int i = 0; i < depth; i++)
        if (i == 0 || g_sym[i] != g_sym[i - 1]) mw_codenames_add(mw_codenames_key(&raw[i]));
}

/* The label set of a thread as its frames are read: taken while it is paused, or inside the
 * window its unpaused read is proven for (its clock did not move, or the GIL never reached it:
 * labels are written with the GIL held), so it is the set of the instant the stack shows (taken
 * after the read, a set pushed or popped meanwhile paired the stack with no labels: 13% of the
 * CPU of two threads flipping labels every 40 us, read by ticks only). The sequence is read first:
 * a write between the two reads leaves the pair with an older sequence, which only makes the next
 * tick read again. */
typedef struct {
    uint32_t set, seq;
} mw_readlabels_t;
static void labels_at_read(long tid, mw_readlabels_t *lab) {
    lab->seq = mw_threads_labelset_seq(tid);
    lab->set = mw_threads_labelset_now(tid);
}

/* Adds a proven read of st's Python frames (g_raw/g_sym[0..depth), read between CPU clock
 * readings c0 and c1) as a sample: wall time dwall, and when on_cpu, that many on-CPU samples
 * (1 but for a thread that blocks our signal, see signals_blocked). native:
 * the thread is paused in mw_unwind's handler with its native stack captured. */
static void emit(mw_profbuf_t *b, mw_tstate_t *st, int depth, int truncated, int ok, int on_cpu,
                 int native, const mw_readlabels_t *lab, uint64_t dwall, uint64_t c0, uint64_t c1,
                 uint64_t gen) {
    if (truncated) g_stats.truncated++;
    uint64_t py_hash = mws_frames_hash(g_raw, depth);
    uint32_t n = 0;
    /* A thread running an asyncio task: the task's name, and (Python frames only) its parents
     * between its coroutine and the loop (mws_task_running). */
    mw_id_t task_thread = 0;
    const mw_rawframe_t *raw = g_raw;
    int rdepth = depth;
    if (ok && g_og.gen && mws_task_running(b, st, &g_og, !native, &raw, &rdepth, &task_thread) < 0)
        ok = 0;
    int lost = 0;
    if (native) { /* native and Python frames spliced, leaf first */
        mw_unwind_release();
        n = ok ? mw_unwind_combine(b, g_raw, depth, g_ids, MW_MAX_DEPTH_CAP) : 0;
        n = mws_cut_at_full(b, g_ids, n, &lost);
    } else if (ok) {
        n = mws_intern_frames(b, raw, rdepth, &lost);
        if (g_timers) mws_mark_known(raw, rdepth);
    }
    if (lost) ok = 0;
    if (!ok) {
        /* A frame whose names could not be read: the sample would be a partial stack. (A thread
         * that ended meanwhile took its frames with it: that is not a lost sample.) */
        uint64_t c;
        if (mws_thread_cpu_ns(st->tid, &c) != 0)
            g_stats.threads_gone++;
        else
            g_stats.dropped++;
        return;
    }
    if (depth == 0 && n == 0 && !on_cpu) return; /* not running, no Python frame */
    mws_mark_if_cut(b, &n, truncated);
    if (!mws_mark_if_empty_as(b, &n, 0)) {
        g_stats.dropped++;
        return;
    }
    uint32_t labelset_now, labelset = lab->set;
    mw_id_t thread = mws_thread_name_id(b, st, &labelset_now);
    mw_labels_span_seen(labelset);
    /* CPU goes only to samples taken while the thread was on CPU: its clock moved across the
     * read, or it was found running and paused. Such samples fall uniformly over the thread's
     * CPU time, so stacks are drawn in proportion to where CPU was used; the CPU time itself is
     * given to them at the end of the window (mws_cpu_window_finalize). */
    mw_values_t v = {(uint64_t)on_cpu, 0, 1, dwall}; /* on_cpu: its weight in samples */
    uint32_t idx = 0;
    if (mws_add_sample(b, g_ids, n, task_thread ? task_thread : thread, labelset, &v, &idx) != 0) {
        g_stats.dropped++;
        return;
    }
    g_stats.samples++;
    if (on_cpu) {
        g_stats.cpu_samples++;
        mws_cpu_window_add(thread, gen, st->pending, (uint64_t)on_cpu, 0);
        st->pending = 0;
        st->hit_gen = gen;
    }
    /* Reusable while the thread does not run. Python-only: only when the read itself saw it
     * not running. Native: when it was not running when asked (the handler's own CPU use makes
     * its clock move: the Python frames decide at the next tick, see above). */
    if (!on_cpu) {
        if (!native && c1 == c0)
            remember_stack(st, gen, idx, lab->seq, thread, labelset, c1, 0, py_hash);
        else if (native)
            remember_stack(st, gen, idx, lab->seq, thread, labelset, UINT64_MAX, 1, py_hash);
    }
}

/* A thread with a CPU timer (mw_cputimer): its CPU samples come from its own timer, so the tick
 * only places its wall time. Not running: its frames are read and kept when proven (clock
 * unchanged, or the GIL never reached it), as a wall-only sample. Running Python: reading it
 * would need a pause; instead the tick's wall time goes where its CPU samples go (it is on CPU,
 * and its CPU samples are where its running time goes): split over its on-CPU samples of the
 * window like its CPU (mws_cpu_window_owe), or, before it has one, owed to its next. (All of it
 * to the next CPU sample put it after the tick, later in a burst: a thread burning 0.6 ms in one
 * function then 0.6 ms in another between sleeps had ~0.78 / ~1.19 of their wall at 1 kHz.) */
static void owe(mw_tstate_t *st, uint64_t gen, uint64_t dwall) {
    g_stats.owed++;
    if (st->hit_gen == gen && st->name_gen == gen && st->name_id &&
        mws_cpu_window_owe(st->name_id, gen, dwall) == 0) {
        g_stats.samples++;
        return;
    }
    st->owed_wall += dwall;
    st->owed_n++;
}

/* A thread that blocks our sampling signal (signal.pthread_sigmask in a worker, a library's own
 * threads) gets no CPU-timer sample and no pause while it does, and the CPU it used meanwhile went
 * to wherever it was when it unblocked: a thread burning 1 s with its signals blocked had it all
 * at its unblocking call (POSIX timers; 0.2-0.3 of it with perf events, the rest at the code
 * after: with ticks only too). The ticks place such a thread's CPU instead, as without timers,
 * reading it unpaused: two reads that agree (`unverified`, as where no signal can pause at all).
 * Asked of /proc (SigBlk) when a pause went unanswered (fresh), or when a timer's signal is
 * overdue, at most every SIGBLK_TICKS ticks per thread; at every tick that finds it running for
 * a while after a timer's sample came as it unblocked the signal (short stretches: mw_unmasked).
 * The signal is the pause's, which the timers share. */
#define SIGBLK_TICKS 8
static int signals_blocked(mw_tstate_t *st, int fresh) {
    if (!fresh && st->sigblk_tick && g_tick < st->sigblk_tick + SIGBLK_TICKS) return st->sigblk;
    st->sigblk_tick = g_tick;
    uint64_t pnd, shd, blk;
    int sig = mw_unwind_signal(), was = st->sigblk;
    uint32_t in0 = st->reg ? mw_cputimer_inside(st->reg - 1, st->tid) : 0;
    st->sigblk =
        sig > 0 && mw_threads_sigmasks(st->tid, &pnd, &shd, &blk) == 0 && ((blk >> (sig - 1)) & 1);
    /* Its timer's handler ran meanwhile: the signal was blocked for the handler's run (as in any
     * handler), not by the thread, and it got through. Taken for the thread's mask, a tick that
     * met a handler (~50 us of every 500 at 2 kHz) placed a tick's CPU by itself and left the
     * thread's samples out of the count. */
    if (st->sigblk && st->reg) {
        uint32_t in1 = mw_cputimer_inside(st->reg - 1, st->tid);
        if ((in0 & 1) || in1 != in0) st->sigblk = 0;
    }
    if (st->sigblk && !was) g_stats.signals_blocked++;
    return st->sigblk;
}

/* POSIX CPU timers place a thread's CPU badly: the kernel checks them only at its scheduler tick
 * while the thread runs, and those ticks do not fall evenly over a thread that runs in bursts
 * (fewer early in a burst, more at its end: a thread burning 0.6 ms in one function then 0.6 ms in
 * another between sleeps had 0.66-0.73 and 1.27-1.36 of their CPU at 100 Hz). Our own ticks, at
 * instants of their own, do: a tick that finds such a thread running reads it paused (as without
 * timers) and that read places its CPU; from then on in the window its timer's samples only count
 * CPU (take_timed). A thread no tick has found running (it runs less than a tick at a time) is
 * placed by its timer's samples, as before. The ticks come at the sampling rate in this mode
 * (mw_sampler.c), so a tick's read stands for one sample. Returns 1 when the read was taken. */
static int place_running(mw_profbuf_t *b, const mw_pythread_t *th, mw_tstate_t *st, uint64_t gen,
                         uint64_t dwall, uint64_t c0) {
    if (mw_cputimer_mode() != 1 || st->noframe_gen == gen || !g_can_pause ||
        mw_unwind_pause(th->tid) != 0)
        return 0;
    int truncated = 0, ok = 0;
    int depth = read_stack(th->tstate, &truncated, &ok);
    mw_readlabels_t lab;
    labels_at_read(th->tid, &lab);
    mw_unwind_release();
    if (truncated == 2) { /* paused between two stores of the eval loop */
        mw_symcache_abort();
        g_stats.torn_reads++;
        return 0;
    }
    g_stats.paused++;
    g_stats.tick_placed++;
    st->tick_hit_gen = gen;
    emit(b, st, depth, truncated, ok, 1, 0, &lab, dwall, c0, c0 + 1, gen);
    return 1;
}

static mw_tstate_t *sample_timed(mw_profbuf_t *b, const mw_pythread_t *th, mw_tstate_t *st,
                                 uint64_t gen, uint64_t dwall, uint64_t c0) {
    uintptr_t tstate = th->tstate;
    if (g_gil_tick.ok && g_gil_tick.last_holder == tstate) {
        uint64_t c;
        if (mws_thread_cpu_ns(th->tid, &c) == 0 && c > c0) {
            if (!place_running(b, th, st, gen, dwall, c0)) owe(st, gen, dwall);
            return st;
        }
    }
    int truncated = 0, ok = 0;
    mw_gilstate_t g0 = g_gil_tick, ga = {0, 0, 0, 0};
    int depth = read_stack(tstate, &truncated, &ok);
    mw_readlabels_t lab;
    labels_at_read(th->tid, &lab);
    /* POSIX timers: the GIL's holder found not running was preempted while running Python (often
     * by this very thread, on its CPU): on CPU, as without timers (place_running). Read inside the
     * window in which its clock must not move: then it held the GIL throughout. */
    int posix = mw_cputimer_mode() == 1 && st->noframe_gen != gen, on_cpu = 0;
    if (posix && g0.ok && g0.last_holder == tstate) mw_pyframes_gil(&ga);
    uint64_t c1;
    if (mws_thread_cpu_ns(th->tid, &c1) != 0) {
        mw_symcache_abort();
        g_stats.threads_gone++;
        return st;
    }
    int proven = 0;
    if (truncated == 2) {
        g_stats.torn_reads++;
    } else if (c1 == c0) {
        proven = 1;
        on_cpu = ga.ok && ga.locked && ga.last_holder == tstate; /* preempted */
        if (posix && !on_cpu && mws_preempted_running(th->tid, &g_stats.preempt_checks)) {
            on_cpu = 1; /* preempted in C without the GIL (see the older way's read) */
            g_stats.preempted_released++;
        }
    } else {
        mw_gilstate_t g1;
        mw_pyframes_gil(&g1);
        proven = g0.ok && g1.ok && g1.switch_number == g0.switch_number && g1.last_holder != tstate;
        g_gil_tick = g1;
        /* running without the GIL (in C under these frames): on CPU too */
        on_cpu = posix && proven;
    }
    if (!proven) {
        mw_symcache_abort();
        owe(st, gen, dwall);
        return st;
    }
    if (on_cpu) {
        if (c1 == c0) g_stats.preempted++;
        g_stats.tick_placed++;
        st->tick_hit_gen = gen;
    }
    emit(b, st, depth, truncated, ok, on_cpu, 0, &lab, dwall, c0, c1, gen);
    return st;
}

/* Arms the CPU timer of thread th, read by the ticks without one (from now on its timer samples
 * it), and records the registration in st. Returns 1 when the thread had armed itself already. */
static int arm_read(mw_tstate_t *st, const mw_pythread_t *th) {
    int existed = 0;
    int r = mw_cputimer_arm(th->tid, th->tstate, 0, &existed);
    st->reg = r >= 0 ? r + 1 : 0;
    st->arm_failed = r < 0;
    st->reg_tstate = th->tstate;
    g_timers_armed |= r >= 0;
    return existed;
}

/* Why a stack may be trusted. The sampler reads a thread's frames while the thread may run on.
 * A read is kept only when it is PROVEN to show one instant of the thread:
 *   - the thread's CPU clock did not move across the read (it executed nothing meanwhile); or
 *   - the GIL never reached the thread across the read (same switch_number before and after,
 *     and another last holder): in a GIL build only the GIL holder changes its Python frames; or
 *   - the thread was paused in a signal handler while it was read (mw_unwind_pause/capture).
 * A read that is not proven is thrown away (its symbol-cache fills too) and redone. */
mw_tstate_t *mws_sample_thread(mw_profbuf_t *b, const mw_pythread_t *th, int first_tick) {
    uint64_t dwall = g_tick_wall;
    uint64_t c0 = 0;
    if (th->tid <= 0 || mws_thread_cpu_ns(th->tid, &c0) != 0) {
        /* No CPU clock: the thread is gone (or its kernel id is unknown). */
        g_stats.threads_gone++;
        return NULL;
    }
    int created = 0;
    mw_tstate_t *st = mws_ts_find(th->tid, &created);
    if (!st) {
        g_stats.dropped++;
        return NULL;
    }
    /* A thread state with no frame carrying the kernel id of another thread state that has the
     * id's timer: on CPython <= 3.11 the state made for a new thread holds its creator's ids
     * until the new thread runs. Not a thread yet: taken for the id's new owner, it had the
     * creator's timer retired and re-armed at every thread start (a main thread starting
     * threads in a loop: 57 times in 2 s, its CPU counted twice where it flipped). */
    if (!created && !th->top_frame && st->reg && st->reg_tstate && st->reg_tstate != th->tstate) {
        g_stats.unborn++;
        return NULL;
    }
    mws_quiet_flush(b, st);
    /* A thread first seen after the first tick was born since the previous tick: all its CPU
     * time is new. Threads alive at start only count from now on, except the one that started
     * the sampler: from its start (the first tick can come milliseconds later in a busy process:
     * a forked child burning at once lost 2-8 ms of its first 50 with ticks only). */
    uint64_t dcpu = created ? (first_tick ? 0 : c0) : (c0 > st->cpu_ns ? c0 - st->cpu_ns : 0);
    if (created && g_start_tid && th->tid == g_start_tid) {
        dcpu = c0 > g_start_cpu ? c0 - g_start_cpu : 0;
        g_start_tid = 0;
    }
    /* A thread armed before this tick first saw it (at its start, or the thread that started the
     * sampler): its CPU samples cover it from the arming on, so its CPU counts from there. */
    uint64_t at_arm = 0;
    int reg_found = (created || st->timer_born) && g_timers
                        ? mw_cputimer_find(th->tid, th->tstate, &at_arm)
                        : -1;
    if (reg_found >= 0 && at_arm && c0 >= at_arm) dcpu = c0 - at_arm;
    /* A thread that a scan found out of the list (a native thread calling into Python): its CPU
     * since then goes where its CPU without Python went, not to this stack. */
    if (!first_tick && mws_others_settle(b, th->tid, c0)) dcpu = 0;
    /* Without a CPU timer: under another thread state than at its last read, it ran without one
     * in between (a native thread calling into Python gets one per call): that CPU was C. */
    if (!created && !st->reg && th->top_frame && st->py_uid && st->py_uid != th->uid && dcpu) {
        mws_others_credit(b, th->tid, dcpu);
        dcpu = 0;
    }
    if (th->top_frame) st->py_uid = th->uid;
    uint64_t dclock = dcpu; /* its CPU since the previous read (or since its timer) */
    if (st->timer_born) {   /* first clock reading: its CPU since arming, minus what was credited */
        dcpu = dcpu > st->credit_ns ? dcpu - st->credit_ns : 0;
        st->timer_born = 0;
        st->credit_ns = 0;
    }
    st->cpu_ns = c0;
    st->tick = g_tick;
    if (dcpu) st->active_until = g_tick + MWS_ACTIVE_TICKS;
    uint64_t gen = mw_profbuf_generation(b);
    /* CPU time: see mws_cpu_window_* (mw_sampler_threads.c). Until the thread's first on-CPU sample
     * of this window its CPU waits in `pending`. Except for a thread whose CPU samples are laid
     * in its perf event's count: until it has MWS_CLOCK_HITS samples in this window its CPU is
     * what they stand for (timed_account) and its clock is only kept; from then on its clock
     * counts. (Its clock split over its samples of each window gave a thread using less than a
     * period in its life its CPU only when sampled, and kept it waiting in `pending` otherwise:
     * 1,500 threads of 3 ms came out at 64-69%.) */
    int counted =
        (st->reg && st->reg_tstate == th->tstate && mw_cputimer_counted(st->reg - 1, th->tid)) ||
        (reg_found >= 0 && mw_cputimer_counted(reg_found, th->tid)); /* armed at its start */
    /* Blocking our signal while it runs (signals_blocked): its CPU is placed by this tick's read,
     * not counted by its timer. */
    int blocked = 0, masks = st->masks_until > g_tick;
    if (st->reg && masks && dclock && mw_cputimer_mode() == 1) {
        /* It blocks the signal in stretches of a tick or so (a timer's sample came as it
         * unblocked it): read unpaused whether it blocks it right now or not, so that every read
         * of it falls as soon after the tick. Asking /proc first (~15 us) and reading the open
         * stretches paused put the reads of the blocked ones later than the others', moving the
         * end of each blocked stretch into the code after it: 0.6 ms open after 1.2 ms blocked
         * came out at 1.04 of its CPU on average, up to 1.16 on a loaded machine. Its timer's
         * samples then only count (take_timed), native mode included: there the ticks placed
         * none of its open stretches, which its timer's samples, held until it unblocked, hardly
         * ever placed either (0.6 ms open stretches had 0.07 of their CPU); these reads have no
         * native frames. */
        blocked = 1;
    } else if (st->reg && (masks || mw_cputimer_overdue(st->reg - 1, th->tid, c0))) {
        if (dclock) blocked = signals_blocked(st, masks); /* else asleep: read as any other */
    } else if (st->reg) {
        st->sigblk = 0; /* its timer's signals come: ask again when they stop */
        st->sigblk_tick = 0;
    }
    if (blocked) counted = 0;
    st->counted = counted;
    uint32_t name_seq = mw_threads_name_seq(st->tid);
    if (st->name_id && name_seq && st->name_seq != name_seq) {
        /* named (or renamed) since its last sample: its CPU since goes to the name it has now (a
         * tick that met a new thread before it registered its name left its next tick's CPU to
         * "thread-<tid>": ~1% of new threads here); not when its name is gone (its Thread
         * object was collected, the thread is ending): the name it had */
        uint32_t labelset;
        (void)mws_thread_name_id(b, st, &labelset);
    }
    mws_clock_account(st, gen, counted, st->reg && st->reg_tstate == th->tstate, c0, dclock, dcpu);
    uint32_t labels_seq = mw_threads_labelset_seq(st->tid);

    /* A thread that has not run since its last proven read still has that stack (and labels):
     * its wall time goes to the same entry with no read at all, and in native mode it is not
     * signalled. Idle threads cost one clock read. */
    if (!created && c0 == st->cpu_end && reuse_stack(b, st, gen, labels_seq, dwall)) return st;

    /* CPU timers: a thread gets one the first time it is seen (again if its id now belongs to
     * another thread state). Until its timer has run for a tick it is read the older way. */
    int wall_only = 0; /* native mode with a timer: the tick gives wall time only */
    int first = 0;     /* ... or first seen, its CPU sampled by its timer */
    if (g_timers && !blocked) {
        if (created && st->reg && st->reg_tstate == th->tstate && !st->timed_gen &&
            !mw_unwind_enabled()) {
            /* First seen, armed at its start, no CPU-timer sample yet: read the older way once,
             * so a thread that ends before its first timer sample is still seen; for its wall
             * time only, unless it blocks the signal: its timer samples the CPU this read would
             * place (its first sample may simply not be drained yet), and a CPU sample here too
             * was one more than the CPU warranted, at the thread's first stack (a fork child
             * burning 100 ms at once put 2% of it at the line that restarted the profiler). */
            first = 1;
        } else if (st->reg && st->reg_tstate == th->tstate &&
                   mw_cputimer_counted(st->reg - 1, th->tid)) {
            if (!mw_unwind_enabled()) return sample_timed(b, th, st, gen, dwall, c0);
            /* Native: running → its wall time is owed to its next CPU sample (which carries
             * its native stack); not running → read below the native way, for wall time. */
            uint64_t c;
            if (mws_thread_cpu_ns(th->tid, &c) == 0 && c > c0) {
                owe(st, gen, dwall);
                return st;
            }
            wall_only = 1;
        } else {
            if (st->reg) mw_cputimer_retire(st->reg - 1, th->tid);
            st->reg = 0;
            if (!st->arm_failed || st->reg_tstate != th->tstate) {
                int existed = arm_read(st, th);
                /* It armed itself at its start: native mode reads it for wall time only (its CPU
                 * samples carry its native stacks); Python-only, until its first CPU sample it is
                 * read the older way (above). */
                if (existed && mw_unwind_enabled())
                    wall_only = 1;
                else if (existed)
                    first = 1; /* as above */
            }
        }
    }

    int truncated = 0, ok = 0, depth = 0, proven = 0, native = 0, on_cpu = 0;
    mw_readlabels_t lab = {0, 0};
    uintptr_t tstate = th->tstate;
    /* Without a timer, known to block the pause's signal (asked again every SIGBLK_TICKS) */
    if (!blocked && !st->reg && st->sigblk && signals_blocked(st, 0)) blocked = 1;
    int want_native = mw_unwind_enabled() && !blocked;
    int want_pause = 0;
    uint64_t cs = c0; /* CPU clock before the current read */
    /* Is it on CPU right now? Only asked where the answer decides whether to pause: the GIL's
     * last holder (running Python, reading it unpaused would be wasted) and native mode. */
    if (want_native || (g_gil_tick.ok && g_gil_tick.last_holder == tstate)) {
        uint64_t c;
        int r = mws_thread_cpu_ns(th->tid, &c);
        if (r == 0 && c > c0 && wall_only) { /* running after all: owed, as above */
            owe(st, gen, dwall);
            return st;
        } else if (r == 0 && c > c0) {
            on_cpu = 1;
            want_pause = 1;
            cs = c;
        } else if (r == 0 && want_native && !wall_only && g_gil_tick.ok &&
                   g_gil_tick.last_holder == tstate) {
            /* Native mode reads it paused: the preempted-holder test (below) is made here. */
            mw_gilstate_t ga;
            mw_pyframes_gil(&ga);
            uint64_t c2;
            if (ga.ok && ga.locked && ga.last_holder == tstate &&
                mws_thread_cpu_ns(th->tid, &c2) == 0 && c2 == c) {
                on_cpu = 1;
                g_stats.preempted++;
            }
        }
    }
    if (want_native && !on_cpu && st->stack_valid == 2 && st->stack_gen == gen &&
        labels_seq == st->stack_labels) {
        /* Native, not running, and it ran only briefly since its last native sample (the
         * handler's own return counts): if its Python frames are exactly those of that sample,
         * its native stack is too (blocked at the same call): reuse it, unsignalled. */
        uint64_t c1;
        depth = read_stack(tstate, &truncated, &ok);
        int frozen = mws_thread_cpu_ns(th->tid, &c1) == 0 && c1 == cs;
        if (!frozen) mw_symcache_abort();
        if (frozen && ok && mws_frames_hash(g_raw, depth) == st->py_hash &&
            reuse_stack(b, st, gen, labels_seq, dwall)) {
            st->cpu_end = c1;
            return st;
        }
    }
    /* Native mode: a thread whose frames may have changed is signalled, running or not (a
     * blocked thread's native leaf is the call it waits in); one whose Python frames are
     * unchanged kept its native stack above, unsignalled. */
    /* ... except one blocked in a write: the signal would end its wait with a partial count (a
     * pipe or socket writer; CPython's TextIOWrapper then loses the rest of a large print), so
     * its Python frames are read unpaused (proven: its clock does not move), with no native
     * frames (counted: native_spared_writes). */
    if (want_native && !on_cpu && mws_blocked_writing(th->tid)) {
        want_native = 0;
        g_stats.native_spared_writes++;
    }
    if (want_native) want_pause = 1;
    uint64_t c1 = cs;
    for (int attempt = 0; attempt < 3 && !proven; attempt++) {
        if (want_pause) {
            /* Pause the thread in its handler (native mode: and unwind its C stack). */
            uintptr_t top_unused = 0;
            int paused = 0;
            if (want_native && mw_unwind_capture(th->tid, tstate, &top_unused) == 0)
                paused = native = 1;
            else if (!want_native && g_can_pause && !blocked && mw_unwind_pause(th->tid) == 0)
                paused = 1;
            else if (!want_native && g_can_pause && !blocked)
                blocked = signals_blocked(st, 1); /* unanswered: does it block the signal? */
            if (paused) {
                depth = read_stack(tstate, &truncated, &ok);
                labels_at_read(th->tid, &lab);
                if (truncated == 2) { /* paused between two stores of the eval loop */
                    if (native) native = 0;
                    mw_unwind_release();
                    mw_symcache_abort();
                    g_stats.torn_reads++;
                    want_native = 0;
                    continue;
                }
                if (!native) mw_unwind_release(); /* native: after mw_unwind_combine's reads */
                proven = 1;
                g_stats.paused++;
                break;
            }
            want_native = want_pause = 0; /* cannot pause it: read it unpaused, and prove it */
        }
        mw_gilstate_t g0 = g_gil_tick, ga = {0, 0, 0, 0};
        depth = read_stack(tstate, &truncated, &ok);
        labels_at_read(th->tid, &lab);
        /* A GIL holder that is not running was preempted in the middle of running Python (it
         * cannot hold the GIL without having run since it last blocked), so it counts as on
         * CPU. Read inside the window in which its clock must not move: then it held the GIL
         * throughout. */
        if (!on_cpu && g0.ok && g0.last_holder == tstate) mw_pyframes_gil(&ga);
        if (mws_thread_cpu_ns(th->tid, &c1) != 0) {
            mw_symcache_abort();
            g_stats.threads_gone++;
            return st;
        }
        if (c1 > cs) on_cpu = 1;
        if (truncated == 2) {
            g_stats.torn_reads++; /* caught between two stores: not proven, read again */
        } else if (c1 == cs) {
            proven = 1;
            if (ga.ok && ga.locked && ga.last_holder == tstate) {
                on_cpu = 1;
                g_stats.preempted++;
            } else if (!on_cpu && !wall_only &&
                       mws_preempted_running(th->tid, &g_stats.preempt_checks)) {
                /* Not running, GIL not held, yet runnable outside a waiting call: preempted in C
                 * without the GIL (hashing, compressing, a read's copy), often by this very
                 * thread on its CPU. Not asking put such C at 0.26-0.33 of its CPU, the Python
                 * around it at 1.5-1.8 (ticks only, POSIX timers). */
                on_cpu = 1;
                g_stats.preempted_released++;
            }
        } else {
            mw_gilstate_t g1;
            mw_pyframes_gil(&g1);
            if (g0.ok && g1.ok && g1.switch_number == g0.switch_number && g1.last_holder != tstate)
                proven = 1;
            g_gil_tick = g1; /* the reference for whatever is read next */
        }
        if (!proven) {
            mw_symcache_abort();
            g_stats.walk_retries++;
            want_pause = g_can_pause && !blocked;
            cs = c1;
            if (blocked && on_cpu) break; /* running: only two reads that agree prove it, now */
        }
    }
    if (!proven && (!g_can_pause || blocked)) {
        /* No pause at all in this process (no free real-time signal), or none reaches this thread
         * (it blocks the signal): the next best thing is
         * two reads back to back that agree frame for frame (and on every caller's instruction).
         * Counted apart (`unverified`): such a stack is very probably, not provably, real. A
         * pair that disagrees (a call or a return between them) is read again at once: dropping
         * it left code that calls and returns often short of samples (a thread blocking the
         * signal around 1.2 ms bursts had the code between them at ~0.6 of its CPU). */
        for (int pair = 0; pair < 3 && !proven; pair++) {
            depth = read_stack(tstate, &truncated, &ok);
            labels_at_read(th->tid, &lab);
            int again = 0, t2 = 0;
            uintptr_t anchor = 0;
            uintptr_t top = mw_pyframes_top_frame_anchored(tstate, &anchor);
            mw_readcache_reset(g_rc);
            if (top)
                again = mw_pyframes_walk(g_rc, NULL, top, anchor, g_raw2, g_cfg.max_depth, &t2);
            /* The leaf's instruction moves on between the reads of a running thread; its callers'
             * do not while it runs. */
            int same = again == depth && truncated != 2 && t2 != 2;
            for (int i = 0; same && i < depth; i++)
                same = g_raw2[i].code == g_raw[i].code &&
                       (i == 0 || g_raw2[i].lasti == g_raw[i].lasti);
            if (same) {
                proven = 1;
                g_stats.unverified++;
                if (mw_threads_labelset_seq(th->tid) != lab.seq) { /* changed between the reads */
                    g_stats.label_races++;
                    lab.set = 0;
                }
            } else {
                mw_symcache_abort();
            }
        }
    }
    if (!proven) {
        /* Could not be read consistently (it runs Python and cannot be paused): no stack is
         * better than a wrong one. Its CPU stays pending for its next proven on-CPU sample. */
        uint64_t c;
        if (mws_thread_cpu_ns(th->tid, &c) != 0) {
            g_stats.threads_gone++;
        } else {
            g_stats.dropped++;
            g_stats.unproven++;
        }
        return st;
    }
    if (blocked && on_cpu) {
        /* As many samples as the timers take in the time between two ticks: the ticks may come
         * slower than the rate (perf events: at the wall rate), its other stretches' samples not */
        int tr = mw_sampler_tick_rate();
        on_cpu = tr > 0 && g_cfg.rate_hz > tr ? (g_cfg.rate_hz + tr / 2) / tr : 1;
    } else if (first) {
        on_cpu = 0;
    }
    emit(b, st, depth, truncated, ok, wall_only ? 0 : on_cpu, native, &lab, dwall, c0, c1, gen);
    if (blocked && on_cpu) { /* its timer's late sample must not place this stretch again */
        st->sigblk_cpu = c1;
        if (mw_cputimer_mode() == 1)
            st->tick_hit_gen = gen; /* nor those of its open ones (above) */
        g_stats.sigblk_placed++;
        /* These samples count toward its clock's taking over from its timer's samples: a thread
         * with few of its own (a POSIX timer's come at the kernel's ticks), placed by ticks for
         * the rest, was left with what they stood for, less the CPU from its last one to the
         * stretch the ticks placed (threads of 5 ms open then 45 ms blocked: 0.94 of their CPU) */
        if (st->reg && st->hit_gen == gen && st->name_gen == gen && st->name_id)
            mws_hw_hits(st, st->name_id, gen, (uint64_t)on_cpu);
    }
    return st;
}

/* The deferred probe of perf events has ended (mw_sampler.c, apply_probe): every Python thread of
 * the last list gets its CPU timer now, as the tick that first read it would have given it one
 * (that tick placed its CPU up to its read; its timer samples it from the arming on). A thread
 * that arms itself at its start from now on finds its timer there, as after any tick that read it
 * first. Left to arm itself after ticks had read it untimed, a spawn pool worker's main thread
 * came out at 150 of its 240 ms. A thread state with no frame (on CPython <= 3.11 a new thread's,
 * under its creator's id until it runs) is left to its tick. */
void mws_arm_listed(const mw_pythread_t *threads, int n) {
    for (int i = 0; i < n; i++) {
        const mw_pythread_t *th = &threads[i];
        mw_tstate_t *st = th->top_frame ? mws_ts_lookup(th->tid) : NULL;
        if (st && !st->reg) (void)arm_read(st, th);
    }
}
