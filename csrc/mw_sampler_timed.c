/* mw_sampler_timed — the samples the threads' CPU timers left (mw_cputimer): named (from the
 * symbol cache, or from the copies their handler made while the code objects were alive), added
 * to the active buffer with the wall time their thread's ticks owed them, and their CPU counted in
 * their thread's window (mws_cpu_window_*). Sampler thread only, buffer lock held (see
 * mw_sampler_int.h).
 */
#define _GNU_SOURCE
#include "mw_sampler_int.h"

#include "mw_cputimer.h"
#include "mw_report.h"
#include "mw_symcache.h"
#include "mw_unwind.h"

#include <string.h>

static void timed_account(mw_tstate_t *st, const mw_cpusample_t *r, uint32_t periods,
                          mw_id_t thread, uint64_t gen, uint64_t own, int place);

/* The CPU time one CPU-timer period stands for (1 / the sample rate). */
static uint64_t cpu_period_ns(void) {
    return (uint64_t)(1000000000LL / g_cfg.rate_hz);
}

#define NAMES_LOST_MARKER "[code object gone before it was named]"

/* What makes two CPU-timer samples' entries the same: the frames (mws_frames_hash), the label
 * set, the task, the markers. */
static uint64_t raw_stack_hash(const mw_cpusample_t *r) {
    uint64_t h = mws_frames_hash(r->frames, r->depth);
    h = (h ^ (uint64_t)r->labelset) * 1099511628211ULL;
    h = (h ^ r->outer.gen) * 1099511628211ULL; /* another task at the same frames: its own entry */
    h = (h ^ (uint64_t)r->unplaced) * 1099511628211ULL;  /* its own marker (mark_if_empty_as) */
    h = (h ^ (uint64_t)r->truncated) * 1099511628211ULL; /* and mark_if_cut's */
    return h;
}

/* A raw sample left by a thread's CPU-timer handler: named now. Names of code objects the symbol
 * cache does not have come from the copies the handler made while they were alive; application
 * memory is never read for them after the fact (the code object may be gone by now). */
static void take_timed(mw_profbuf_t *b, mw_cpusample_t *r) {
    int created = 0;
    mw_tstate_t *st = mws_ts_find(r->tid, &created);
    if (!st) {
        g_stats.dropped++;
        return;
    }
    st->active_until = g_tick + MWS_ACTIVE_TICKS; /* it runs: quiet ticks must read it in full */
    if (st->quiet) mws_wake(st);
    if (created) {
        st->tick = g_tick;
        st->reg = r->reg + 1; /* armed at its start, before any tick saw it */
        st->reg_tstate = r->tstate;
        st->timer_born = 1;
    }
    uint64_t gen = mw_profbuf_generation(b);
    uint32_t labelset_now;
    mw_id_t thread = mws_thread_name_id(b, st, &labelset_now);
    /* The handler's own run is CPU the thread spent at this very stack (its clock counts it),
     * capped at a period: a handler preempted midway ran longer in wall time than on CPU. */
    uint64_t own = r->handler_ns < cpu_period_ns() ? r->handler_ns : cpu_period_ns();
    /* A sample that came as the thread unblocked our signal (mw_unmasked) was due earlier, at a
     * stack not known: its CPU is counted, not placed; and the ticks watch the thread for a while
     * (mw_sampler_take.c, signals_blocked), placing its CPU while it blocks the signal. The first
     * sample after a stretch whose CPU the ticks placed stands for the periods it missed, whose
     * CPU and places the ticks have already counted: neither placed nor counted again. */
    if (r->unmasked) st->masks_until = g_tick + MWS_MASKS_TICKS;
    int placed_by_ticks = st->sigblk_cpu && r->periods > 1;
    st->sigblk_cpu = 0;
    if (placed_by_ticks || r->unmasked) {
        g_stats.timer_late++;
        timed_account(st, r, placed_by_ticks ? 0 : r->periods, thread, gen, 0, 0);
        return;
    }
    /* POSIX timers: a thread that toggles its mask is placed by its ticks for a while (masks_until,
     * mw_sampler_take.c), in native mode too: its samples only count then. */
    if (mw_cputimer_mode() == 1 && st->masks_until > g_tick && st->noframe_gen != gen &&
        !r->unplaced && r->depth > 0) {
        g_stats.timer_unplaced++;
        timed_account(st, r, r->periods, thread, gen, 0, 0);
        return;
    }
    /* POSIX timers: a thread a tick has read running in this window has its CPU placed by its
     * ticks (place_running): this sample only counts CPU. Except a thread that ticks cannot see all
     * the time: one sampled with no Python frame in this window (a native thread between its calls
     * into Python): its samples place it, as its ticks do not (its samples' periods count CPU used
     * in its calls too: mixing the two put 1.4x its calls' CPU in them). */
    if (r->depth == 0 && !r->unplaced) st->noframe_gen = gen;
    if (st->tick_hit_gen == gen && st->noframe_gen != gen && r->nips == 0 && !r->unplaced) {
        g_stats.timer_unplaced++;
        timed_account(st, r, r->periods, thread, gen, 0, 0);
        return;
    }
    /* The same raw stack as one of this thread's last CPU samples (a hot loop): same entry, no
     * naming at all. */
    uint64_t h = raw_stack_hash(r);
    int same_window = !created && st->timed_gen == gen && st->timed_thread == thread;
    for (int k = 0; r->nips == 0 && same_window && k < st->timed_n; k++) {
        if (st->timed_hash[k] != h) continue;
        mw_values_t v = {r->periods, 0, st->owed_n, st->owed_wall, own};
        if (mw_profbuf_add_at(b, st->timed_ent[k], &v) != 0) {
            st->timed_n = st->timed_next = 0; /* named again below */
            break;
        }
        g_stats.reused++;
        st->timed_idx = st->timed_ent[k];
        timed_account(st, r, r->periods, thread, gen, own, 1);
        return;
    }
    int depth = r->depth, ok = 1;
    mws_known_sync();
    uint64_t epoch = mw_symcache_epoch();
    mw_symcache_begin();
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < depth && ok; i++) {
            if (i > 0 && r->frames[i].code == r->frames[i - 1].code &&
                memcmp(&r->frames[i].info, &r->frames[i - 1].info, sizeof r->frames[i].info) == 0) {
                g_sym[i] = g_sym[i - 1]; /* recursion: the same code object again */
                continue;
            }
            const mw_symentry_t *h = mw_symcache_peek(&r->frames[i]);
            if (!h) {
                const mw_codecopy_t *c = NULL;
                for (int k = 0; k < r->ncopies && !c; k++)
                    if (r->copies[k].code == r->frames[i].code) c = &r->copies[k];
                if (c) {
                    mw_symcopy_t cp = {r->names + c->name_off,
                                       r->names + c->file_off,
                                       (const uint8_t *)r->names + c->lt_off,
                                       c->name_len,
                                       c->file_len,
                                       c->lt_len,
                                       c->lt_ok};
                    h = mw_symcache_put_copied(&r->frames[i], &cp);
                }
            }
            g_sym[i] = h;
            if (!h) ok = 0;
        }
        if (!ok || mw_symcache_epoch() == epoch) break;
        epoch = mw_symcache_epoch(); /* emptied midway: the earlier handles are gone */
        mws_known_sync();
    }
    if (!ok) {
        /* A code object the sampler had not named and whose names the handler could not copy:
         * no name is better than one read after the code object may have been freed. Its CPU
         * stays under a marker of its own: left out, it went to the thread's next sample. */
        mw_symcache_abort();
        g_stats.names_lost++;
        mw_values_t v = {r->periods, 0, st->owed_n, st->owed_wall, own};
        uint32_t idx = 0;
        if (!(g_ids[0] = mws_marker(b, NAMES_LOST_MARKER)) ||
            mws_add_sample(b, g_ids, 1, thread, r->labelset, &v, &idx) != 0) {
            g_stats.dropped++;
            return;
        }
        timed_account(st, r, r->periods, thread, gen, own, 1);
        return;
    }
    mws_mark_known(r->frames, depth);
    /* A thread running an asyncio task: as in emit() (mws_task_running). */
    mw_id_t task_thread = 0;
    const mw_rawframe_t *raw = r->frames;
    int rdepth = depth;
    int task = r->outer.gen
                   ? mws_task_running(b, st, &r->outer, r->nips == 0, &raw, &rdepth, &task_thread)
                   : 0;
    if (task < 0) {
        g_stats.dropped++;
        return;
    }
    uint32_t n = 0;
    int lost = 0;
    if (r->nips > 0) { /* native mode: the native stack of the same instant, Python spliced in */
        n = mw_unwind_combine_ips(b, r->ips, r->nips, r->ips_complete, r->frames, depth, g_ids,
                                  MW_MAX_DEPTH_CAP);
        n = mws_cut_at_full(b, g_ids, n, &lost);
    } else {
        n = mws_intern_frames(b, raw, rdepth, &lost);
        if (raw != r->frames) mws_mark_known(raw, rdepth);
    }
    if (lost) {
        g_stats.dropped++;
        return;
    }
    mws_mark_if_cut(b, &n, r->truncated);
    if (!mws_mark_if_empty_as(b, &n, r->unplaced)) {
        g_stats.dropped++;
        return;
    }
    if (r->truncated) g_stats.truncated++;
    mw_values_t v = {r->periods, 0, st->owed_n, st->owed_wall, own};
    uint32_t idx = 0;
    if (mws_add_sample(b, g_ids, n, task_thread ? task_thread : thread, r->labelset, &v, &idx) !=
        0) {
        g_stats.dropped++;
        return;
    }
    if (!same_window) {
        st->timed_n = st->timed_next = 0;
        st->timed_gen = gen;
        st->timed_thread = thread;
    }
    st->timed_idx = idx;
    /* Not reused: an entry whose task was not found (the next sample looks again), nor one with
     * native frames (a sample without them never goes where they are). */
    if (task != 2 && r->nips == 0) {
        st->timed_hash[st->timed_next] = h;
        st->timed_ent[st->timed_next] = idx;
        st->timed_next = (uint8_t)((st->timed_next + 1) % MWS_TIMED_WAYS);
        if (st->timed_n < MWS_TIMED_WAYS) st->timed_n++;
    }
    timed_account(st, r, r->periods, thread, gen, own, 1);
}

/* The bookkeeping of a CPU-timer sample: the CPU it counts in its thread's window, and when it was
 * added to the buffer (place), the owed wall time it paid and the weight it places. */
static void timed_account(mw_tstate_t *st, const mw_cpusample_t *r, uint32_t periods,
                          mw_id_t thread, uint64_t gen, uint64_t own, int place) {
    if (place) {
        g_stats.samples += st->owed_n;
        st->owed_n = st->owed_wall = 0;
        g_stats.cpu_samples++;
    }
    g_stats.timer_samples++;
    /* A thread no tick has read yet: its CPU so far is known only from its samples (periods of
     * CPU time); the first tick that reads its clock takes the credited part off. */
    uint64_t credit = 0;
    if (st->timer_born || r->counted) credit = (uint64_t)periods * cpu_period_ns();
    if (st->timer_born) st->credit_ns += credit;
    /* Laid in its event's count: the sample stands for its periods (unbiased for the count)
     * until the thread has MWS_CLOCK_HITS samples in the window; then its clock of the window
     * (exact: the event misses the CPU of each context switch, ~18 us here) replaces them, and
     * later samples only place it. */
    if (r->counted) mws_hw_window(st, gen);
    if (r->counted && st->hw_clocked) credit = 0;
    mws_cpu_window_add(thread, gen, st->pending + credit, place ? periods : 0, own);
    st->pending = 0;
    st->hit_gen = gen;
    if (r->counted && !st->hw_clocked) {
        st->hw_credit += credit;
        mws_hw_hits(st, thread, gen, 1);
    }
}

int mws_drain_timed(mw_profbuf_t *b) {
    mw_cpusample_t *r;
    int k = 0;
    for (; k < MW_CPUTIMER_RECORDS && (r = mw_cputimer_next()) != NULL; k++) {
        if (b && g_timers) take_timed(b, r);
        mw_cputimer_done(r);
    }
    if ((uint64_t)k > g_stats.timer_backlog_max) g_stats.timer_backlog_max = (uint64_t)k;
    /* A sample taken while every record waiting for this thread was full is lost: said once. */
    static uint64_t lost_seen;
    mw_cputimer_stats_t t;
    mw_cputimer_get_stats(&t);
    if (t.no_record + t.no_scratch > lost_seen) {
        lost_seen = t.no_record + t.no_scratch;
        mw_report_once(MW_REPORT_SAMPLES_LOST,
                       "CPU samples lost: %llu came while the %d records waiting for the sampler "
                       "thread were all taken (it fell behind: more busy threads than the rate "
                       "allows for); stats() cpu_timer_no_record",
                       (unsigned long long)lost_seen, MW_CPUTIMER_RECORDS);
    }
    return k;
}
