/* mw_sampler_int — the state shared by the sampler's files (the sampler's contract is
 * mw_sampler.h).
 *
 * The sampler is built from these files, one concern each:
 *   mw_sampler.c          configuration, start/stop, the sampler thread and its ticks (quiet
 *                         ticks included), buffer swap, stats, fork handlers
 *   mw_sampler_threads.c  the per-thread state table (g_ts), the CPU of each window per thread
 *                         (g_win), the wall time of quiet ticks (g_quiet_wall, g_quiet_n), the
 *                         last clocks of threads that end (mws_exit*)
 *   mw_sampler_take.c     taking samples: a thread's sample at a tick, naming and interning
 *                         frames
 *   mw_sampler_timed.c    the CPU timers' samples: naming them, their owed wall, their CPU
 *   mw_sampler_others.c   the CPU of threads without a Python thread state (native threads)
 * Only these files include this header.
 *
 * Threads and locks
 *   - Written by mw_sampler_start() (the thread that starts the sampler) before the sampler thread
 *     is created, then only read while it runs: g_cfg, g_can_pause, g_timers (g_timers is set
 *     by the sampler thread once a deferred probe of perf events has ended, under g_ctl_lock,
 *     before it clears g_probe_pending). g_cfg.rate_hz is also read by any thread
 *     (mw_sampler_rate), g_timers by any thread that starts (mw_sampler_thread_started, once no
 *     probe is pending).
 *   - The sampler thread only, while it runs: g_ts and every mw_tstate_t, the scratch arrays
 *     (g_raw, g_raw2, g_ids, g_sym, g_rc), g_tick, g_last_tick_ns, g_tick_wall, g_gil_tick.
 * mw_sampler_start() resets g_tick and g_ts before creating the thread; mw_sampler_stop() (after
 * the join) and the fork child's handler clear the entries' timer registrations (reg).
 *   - Under the buffer lock (g_buf_lock, mw_sampler.c), taken by the sampler thread for a tick
 *     and by the swap/snapshot side: g_win and g_quiet_wall/g_quiet_n, and every function below
 *     that is given a buffer (mws_quiet_flush*, mws_cpu_window_*, mws_thread_name_id,
 *     mws_sample_thread, mws_drain_timed) as it writes into that buffer.
 *   - g_stats: written by the sampler thread, by mw_sampler_stop (stop_timeouts) and by the fork
 *     child's handler; read racily by mw_sampler_get_stats.
 *   - g_timers_armed: set by the sampler thread and by mw_sampler_thread_started (any thread), a
 *     hint that some timer may be armed; cleared by mw_sampler_stop after the join.
 * Memory: g_ts, g_win and the scratch arrays are allocated by the first mw_sampler_start() and
 * kept for the life of the process (a fork child reuses them).
 */
#ifndef MW_SAMPLER_INT_H
#define MW_SAMPLER_INT_H

#include "mw_sampler.h"

#include "mw_pyframes.h"
#include "mw_saferead.h"
#include "mw_symcache.h"
#include "mw_threads.h"

#include <stdint.h>
#include <time.h>

#define MW_MAX_DEPTH_CAP 4096

/* Thread tid's CPU clock (ns) into *out, read through its clock id; -1 when the thread is gone. */
static inline int mws_thread_cpu_ns(long tid, uint64_t *out) {
    struct timespec ts;
    if (clock_gettime((clockid_t)((~(unsigned int)tid) << 3) | 6, &ts) != 0) return -1;
    *out = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    return 0;
}

/* A thread the sampler has met: an entry of g_ts, open addressing by kernel tid. */
/* Ticks a thread stays watched after a CPU-timer sample came as it unblocked our signal. */
#define MWS_MASKS_TICKS 256
/* Raw stacks of a thread's last CPU-timer samples whose entries are reused without naming. */
#define MWS_TIMED_WAYS 8

typedef struct {
    /* What a quiet tick looks at, first: one cache line per idle thread per tick. */
    long tid;              /* 0 = free */
    uint64_t tick;         /* last tick the thread was seen */
    uint64_t stack_gen;    /* buffer generation of the remembered stack entry */
    uint64_t active_until; /* read in full on every tick until then: it used CPU recently */
    int stack_valid;       /* the remembered entry may be reused (1 Python-only, 2 native) */
    int quiet;             /* its quiet-tick wall time is owed to the remembered entry */
    int reg;               /* CPU timer (mw_cputimer) registration + 1, 0 = none */
    uint64_t cpu_ns;       /* CPU clock at the start of the last read */
    uint64_t cpu_end;      /* CPU clock right after the last proven read (stack reuse) */
    uint64_t pending;      /* CPU ns used while the thread had no on-CPU sample in the window */
    uint64_t hit_gen;      /* buffer generation in which the thread had an on-CPU sample */
    /* POSIX CPU timers: the generation in which a tick read it running (its ticks place its CPU),
     * and one in which its timer sampled it with no Python frame (ticks cannot see all of it). */
    uint64_t tick_hit_gen, noframe_gen;
    uint32_t name_seq;
    uint64_t name_gen; /* buffer generation the cached name id belongs to */
    mw_id_t name_id;
    int name_unknown; /* name_id is "thread-<tid>": the thread had no name yet (or never) */
    char last_name[MW_THREAD_NAME_MAX]; /* the last name it had ("" if none): kept for its end,
                                         * which may come in a later window than its name */
    /* The last sample's stack entry, reused while the thread has not run since. */
    uint32_t stack_idx;
    uint32_t stack_labels; /* label-set change counter when it was read */
    mw_id_t stack_thread;
    uint32_t stack_labelset;
    uint64_t py_hash; /* the remembered sample's Python frames (native reuse check) */
    /* Quiet: counted from the global quiet totals at the time it went quiet (see tick(),
     * mw_sampler.c). */
    uint64_t qbase_wall, qbase_n;
    /* The thread state the CPU timer was armed for; wall time of ticks that found the thread
     * running, owed to its next CPU sample. */
    int arm_failed;
    int timer_born;     /* first met through a CPU-timer sample, before any tick read it */
    uint64_t credit_ns; /* CPU already credited from such samples, not yet met by the clock */
    /* A thread whose CPU samples are laid in its perf event's count, in window hw_gen: its
     * samples, the CPU they stood for (added to its row), its clock read by ticks meanwhile,
     * and whether its clock has replaced its samples' CPU (from MWS_CLOCK_HITS samples on). */
    uint64_t hw_gen, hw_hits, hw_credit, hw_clock;
    int hw_clocked;
    int counted; /* the last tick's: its CPU samples are laid in a count (mws_clock_account) */
    /* Whether it blocks our sampling signal (signals_blocked, mw_sampler_take.c): the answer of
     * its /proc mask at tick sigblk_tick; and its CPU clock at the last tick that placed its CPU
     * for that reason (0: none since its last CPU-timer sample). */
    int sigblk;
    uint64_t sigblk_tick, sigblk_cpu;
    uint64_t masks_until; /* a CPU-timer sample came as it unblocked our signal: until this tick,
                           * each tick that finds it running asks whether it blocks it now */
    uintptr_t reg_tstate;
    uint64_t owed_wall, owed_n;
    /* The last CPU-timer sample's entry: the next one with the same raw stack goes to it. */
    int list_idx;    /* its index in the last full thread list (quiet ticks) */
    uint64_t listed; /* the last listing of the process's threads that found it (others scan) */
    uint64_t py_uid; /* id of the thread state (with a frame) its last read found it under */
    /* Its last CPU-timer samples' raw stacks in window timed_gen under name timed_thread: the
     * next sample with one of them goes to its entry unnamed (a loop over a few lines hits one
     * of MWS_TIMED_WAYS, filled in turn); timed_idx is the last sample's entry. */
    uint64_t timed_gen;
    uint64_t timed_hash[MWS_TIMED_WAYS];
    uint32_t timed_ent[MWS_TIMED_WAYS];
    uint32_t timed_idx;
    uint8_t timed_n, timed_next;
    mw_id_t timed_thread;
} mw_tstate_t;

#define TS_SLOTS (2 * MW_MAX_THREADS) /* entries: live threads and the dead ones not pruned yet */
#define TS_INDEX (2 * TS_SLOTS)       /* index slots (half full at most) */

/* A row of the CPU-window table (mw_sampler_threads.c). */
#define WIN_SLOTS (2 * MW_MAX_THREADS)
typedef struct {
    uint64_t gen; /* buffer generation the row belongs to (0 = free) */
    mw_id_t thread;
    uint64_t cpu_ns, hits, own_ns;
    /* Wall time (and ticks) of ticks that found the thread running, not split yet. */
    uint64_t owed_wall, owed_n;
    /* mws_cpu_window_finalize's split of what was owed at its call `sp_epoch`: the wall time and
     * ticks it splits, the hits and wall given out so far. */
    uint64_t sp_epoch, sp_wall, sp_n, sp_hits, sp_given;
} cpu_window_t;

/* mw_sampler.c */
extern mw_sampler_config_t g_cfg;
extern mw_sampler_stats_t g_stats;
/* The threads the sampler has met: g_ts_n entries in a dense array of TS_SLOTS (only the prefix
 * in use is ever touched), found by tid through g_ts_index (TS_INDEX slots, entry + 1, 0 = free).
 * Pointers into g_ts stay valid until the next mws_ts_prune. Sampler thread only (and
 * start/stop/at-fork, when it is not running). */
extern mw_tstate_t *g_ts;
extern uint32_t g_ts_n;
extern uint32_t *g_ts_index;
extern mw_rawframe_t *g_raw, *g_raw2; /* MW_MAX_DEPTH_CAP frames each */
extern mw_id_t *g_ids;                /* MW_MAX_DEPTH_CAP */
extern const mw_symentry_t **g_sym;   /* MW_MAX_DEPTH_CAP */
extern mw_readcache_t *g_rc;
extern int g_can_pause;          /* the pause handler is installed (mw_unwind_setup) */
extern int g_timers;             /* CPU samples come from the threads' CPU timers (mw_cputimer) */
extern int g_timers_armed;       /* some thread may hold a timer */
extern mw_gilstate_t g_gil_tick; /* GIL state read before the current thread's walk */
extern uint64_t g_tick;
/* The thread that started the sampler and its CPU clock then (mw_sampler_start): its CPU counts
 * from there, not from the first tick that reads it. Set before the sampler thread starts; the
 * sampler thread clears g_start_tid once it has used it. */
/* The last full list of Python threads was cut at MW_MAX_THREADS: threads out of it may be
 * Python threads (their CPU is counted by the scans of threads without Python, under their Python
 * names). Sampler thread. */
extern int g_list_cut;
extern long g_start_tid;
extern uint64_t g_start_cpu;
extern int64_t g_last_tick_ns;
/* The wall time the tick being taken places under each thread it reads (see g_slot_end in
 * mw_sampler.c). Sampler thread. */
extern uint64_t g_tick_wall;
/* A thread's CPU-timer sample says it ran: the next quiet tick must visit it. */
void mws_wake(mw_tstate_t *st);

/* mw_sampler_threads.c */
extern cpu_window_t *g_win; /* WIN_SLOTS rows */
extern uint64_t g_quiet_wall, g_quiet_n;
/* The entry of thread tid, created (zeroed, *created = 1) when absent; NULL when the table is
 * full. */
mw_tstate_t *mws_ts_find(long tid, int *created);
/* The entry of thread tid, or NULL. */
mw_tstate_t *mws_ts_lookup(long tid);
/* Drops entries of threads not seen in the last few ticks (compacts the table). */
void mws_ts_prune(void);
/* Empties the table (a new run). */
void mws_ts_clear(void);
/* Zeroes memory, handing whole pages back to the kernel. */
void mws_zero_pages(void *p, size_t len);
/* The interned name of st's thread in b (cached per buffer generation); its label set. A thread
 * with no name yet is "thread-<tid>" until it registers one: then that string takes the name, so
 * what was charged to the thread before (its start-up) carries it too. A thread whose name is gone
 * (its Thread object collected, the thread ending) keeps the name it had in this buffer. */
mw_id_t mws_thread_name_id(mw_profbuf_t *b, mw_tstate_t *st, uint32_t *labelset);
/* Sampler thread, each tick (buffer lock held): threads met before they registered a name and
 * named since get it on what was charged to them in b (mws_thread_name_id). */
void mws_names_settle(mw_profbuf_t *b);
/* Whether thread tid (of this process) is blocked in a system call that writes (write, writev,
 * pwrite*, send*, sendfile, splice, vmsplice: /proc/self/task/<tid>/syscall). A signal would end
 * its wait with a partial count. Sampler thread; ~3 system calls. */
int mws_blocked_writing(long tid);
/* Whether thread tid (of this process), found not running, was preempted while running: it is
 * runnable (/proc/self/task/<tid>/stat: R). A thread running C without the GIL (hashing,
 * compressing, in a system call), preempted there — by the sampler itself when they share a CPU —
 * holds no GIL that says it was running. A thread woken and not yet run is runnable too, and
 * nothing cheap tells it apart (the kernel reports any runnable thread's system call as
 * "running"): its blocking call is then taken for running. Sampler thread; 3 system calls,
 * counted in *checks. */
int mws_preempted_running(long tid, uint64_t *checks);
/* Adds CPU time, on-CPU sample counts and the profiler's own time at those samples (a part of
 * cpu_ns, see mws_cpu_window_finalize) to a thread's row of window gen. */
void mws_cpu_window_add(mw_id_t thread, uint64_t gen, uint64_t cpu_ns, uint64_t hits,
                        uint64_t own_ns);
/* The wall time of a tick that found a thread running, into its row of window gen: split over its
 * on-CPU samples of the window like its CPU (they fall where its running time went). -1 when the
 * row is not there (the caller owes it to the thread's next CPU sample instead). */
int mws_cpu_window_owe(mw_id_t thread, uint64_t gen, uint64_t wall);
/* Replaces CPU time in a thread's row of window gen: takes `sub` off (never below 0), adds
 * `add`. */
void mws_cpu_window_replace(mw_id_t thread, uint64_t gen, uint64_t sub, uint64_t add);
/* Samples of a thread in a window from which its CPU clock replaces what they stand for. */
#define MWS_CLOCK_HITS 8
/* Writes every on-CPU stack's CPU time: its share of its thread's window CPU; and adds its share of
 * the wall time owed to its thread's row since the last call (mws_cpu_window_owe). Idempotent. */
void mws_cpu_window_finalize(mw_profbuf_t *b);
/* Pays a quiet thread's wall time to its remembered entry in b; the thread is no longer quiet. */
void mws_quiet_flush(mw_profbuf_t *b, mw_tstate_t *st);
/* Settles every quiet thread's wall time into buffer b (before it is handed out or read). */
void mws_quiet_flush_all(mw_profbuf_t *b);

/* Threads' last CPU clocks (mw_sampler_threads.c). A thread registered by mws_exit_watch (any
 * thread, for itself, at its start: a pthread key whose destructor runs at its end) leaves its
 * CPU clock as it ends, after its last Python code, in a ring of 256 (full: counted by
 * mws_exits_lost, any thread). mws_exits_settle (sampler thread, buffer lock held, at each drain;
 * the ring is looked at only when a record was written since) counts each such thread's CPU since
 * the last tick read it as that tick would have (a tick reads a thread's clock only while it lives:
 * what a busy thread used from its last tick to its end was lost, half a tick of CPU on average),
 * and gives the wall time its ticks owed to its next CPU sample to its last one. mws_exits_clear:
 * at start and in a fork child. */
void mws_exit_watch(void);
void mws_exits_settle(mw_profbuf_t *b);
void mws_exits_clear(void);
uint64_t mws_exits_lost(void);

/* mw_sampler_take.c */
#define MWS_ACTIVE_TICKS 8 /* a thread that used CPU is read in full for this many ticks */
/* Naming and interning frames (g_raw-style raw frames, named in g_sym, into g_ids). The CPU-timer
 * handlers' set of named code objects follows the symbol cache (mws_known_sync: emptied with it);
 * mws_mark_known tells them these frames' code objects are named. mws_intern_frames: ids of
 * raw[0..depth) into g_ids (leaf first; a recursion's frame repeated at one instruction interned
 * once), the count (cut where a table was full: mws_cut_at_full), *lost = 1 when not even that
 * fits. mws_mark_if_cut: a marker at the root of a walk cut short (truncated 1).
 * mws_mark_if_empty_as: the marker frame of a stack with no Python frame ("[place unknown: due
 * before thread exit]" when unplaced), 0 when the buffer cannot take it. */
void mws_known_sync(void);
void mws_mark_known(const mw_rawframe_t *raw, int depth);
uint32_t mws_intern_frames(mw_profbuf_t *b, const mw_rawframe_t *raw, int depth, int *lost);
/* A hash of raw frames [0..depth): each frame's code object as the symbol cache keys it (its
 * address and the fields that tell a code object remade at that address apart) and instruction.
 * One multiply a frame: the fields are mixed beside it. */
uint64_t mws_frames_hash(const mw_rawframe_t *raw, int depth);
void mws_mark_if_cut(mw_profbuf_t *b, uint32_t *n, int truncated);
int mws_mark_if_empty_as(mw_profbuf_t *b, uint32_t *n, int unplaced);
/* Samples one listed thread into b at this tick; its entry, or NULL (gone, table full). */
mw_tstate_t *mws_sample_thread(mw_profbuf_t *b, const mw_pythread_t *th, int first_tick);
/* Arms the CPU timer of each thread of the list (n entries) the ticks have read without one:
 * the sampler thread, once the deferred probe of perf events has set the mode. */
void mws_arm_listed(const mw_pythread_t *threads, int n);
/* A thread's CPU-timer accounting (hw_*) starts afresh in window gen (once per window). */
void mws_hw_window(mw_tstate_t *st, uint64_t gen);
/* `hits` more of its samples in window gen: from MWS_CLOCK_HITS on, its clock replaces the CPU its
 * timer's samples stood for (hw_credit by hw_clock, in thread's row). Its CPU-timer samples, and
 * the ticks' reads of it while it blocks our signal. */
void mws_hw_hits(mw_tstate_t *st, mw_id_t thread, uint64_t gen, uint64_t hits);
/* The CPU a thread's clock says it used since its last read (dclock; dcpu: the part that is new
 * to the profile) into window gen: through its CPU-timer samples when they are laid in its event's
 * count (counted; watch: its clock is read for the event too), else to its row once it has an
 * on-CPU sample in the window (pending until then). Buffer lock held. */
void mws_clock_account(mw_tstate_t *st, uint64_t gen, int counted, int watch, uint64_t c0,
                       uint64_t dclock, uint64_t dcpu);
/* mw_sampler_tasks.c */
/* The wall samples of the waiting asyncio tasks of the registered event loops (mw_tasks). */
void mws_tasks_tick(mw_profbuf_t *b, uint64_t dwall);
/* A thread's sample (raw[0..*depth), named in g_sym) when the thread runs a task of the event
 * loop registered with it: og (mw_pyframes_walk_gen) says which coroutine runs outermost. When
 * it is a task's, *thread gets the thread string with the task's name (as for a waiting task's
 * sample) and, when `splice`, the frames between the task's coroutine and the loop's base frames
 * (the loop running its callbacks) are replaced by the chains of the tasks awaiting it: *raw and
 * *depth then point to the spliced frames (named in g_sym). 1 when the task was found, 0 when the
 * thread runs no registered loop or no coroutine, 2 when it does but the task was not found (both:
 * nothing changed), -1 when the symbol cache was emptied meanwhile (g_sym is stale: drop the
 * sample). Sampler thread, buffer lock held. */
int mws_task_running(mw_profbuf_t *b, mw_tstate_t *st, const mw_outergen_t *og, int splice,
                     const mw_rawframe_t **raw, int *depth, mw_id_t *thread);
/* The plain thread of a stack's thread string (a task's: "<thread name>\x1f<task name>"), for
 * the CPU window rows (kept per thread). */
mw_id_t mws_plain_thread(mw_profbuf_t *b, mw_id_t thread);
/* mw_sampler_full.c. A marker frame (name, empty file, line 0) interned from the buffer's
 * reserve (markers are few): 0 only when not even the reserve takes it. Sampler thread. */
mw_id_t mws_marker(mw_profbuf_t *b, const char *name);
/* Adds a sample of stack ids[0..n) (mw_profbuf_add_ex); when its entry does not fit, keeps it with
 * less detail from the buffer's reserve (its span labels dropped, then all labels, then under a
 * "[stack table full]" frame), counted as overflow_kept and said once on stderr. 0, or -1 when
 * even that failed (the caller counts the sample dropped). Sampler thread. */
int mws_add_sample(mw_profbuf_t *b, const mw_id_t *ids, uint32_t n, mw_id_t thread,
                   uint32_t labelset, const mw_values_t *v, uint32_t *idx);
/* ids[0..n) (leaf first) holds a 0 where a frame could not be interned (a full table): cuts the
 * stack at the outermost such frame, under a "[frame table full]" leaf from the reserve, and
 * returns the new length (n when nothing is missing); *lost = 1 (and 0 returned) when not even the
 * marker fits. Sampler thread. */
uint32_t mws_cut_at_full(mw_profbuf_t *b, mw_id_t *ids, uint32_t n, int *lost);

/* mw_sampler_others.c: the CPU of threads without a Python thread state in the main interpreter.
 * Sampler thread (a scan inside a tick, buffer lock held); mws_others_clear before it starts. */
/* A scan every 50 ms while threads without Python use CPU, every 250 ms while none does (listing
 * /proc/self/task costs ~60 us, ~0.6 ms with 500 threads here), and at a window's end. */
#define MWS_OTHERS_SCAN_NS 50000000LL
#define MWS_OTHERS_IDLE_SCAN_NS 250000000LL
/* Forgets every thread and takes the clocks of those there now as the base of a new run (their
 * CPU counts from here; when /proc cannot be listed, the first scan takes it). Allocates the
 * tables at the first call. mw_sampler_start, in the starting thread, before the sampler starts. */
void mws_others_clear(void);
/* Counts cpu_ns of thread tid's CPU as used without Python (a "[native thread]" sample in b). */
void mws_others_credit(mw_profbuf_t *b, long tid, uint64_t cpu_ns);
/* Lists the process's threads: each that is not in the tick's thread list threads[0..n), has no
 * CPU timer and is not the profiler's own gets the CPU it used since the previous scan in b, and
 * the threads that ended since get theirs (found through the process's CPU clock). */
void mws_others_scan(mw_profbuf_t *b, const mw_pythread_t *threads, int n);
/* Some thread without Python used CPU between the last two scans: the next is due sooner. */
int mws_others_active(void);
/* Whether a scan can find anything: 0 only when no thread without Python used CPU at the last
 * scan and the process has no more threads than the n of the thread list and the profiler's own
 * (one read of /proc/self/stat, however many threads: listing them costs ~1 us each). Threads that
 * came and went meanwhile are found by the next scan: at a window's end and at stop, always. */
int mws_others_needed(int n);
/* A thread a scan counted as without Python is in the thread list now, its clock at cpu_ns: the
 * CPU it used since that scan is counted as the scan would (it ran C until lately), into b.
 * Returns 1, or 0 when no scan counted it (nothing done). */
int mws_others_settle(mw_profbuf_t *b, long tid, uint64_t cpu_ns);
/* Thread tid left the thread list (its entry is pruned) with its CPU counted up to cpu_ns. */
void mws_others_carry(long tid, uint64_t cpu_ns);
/* A Python thread has ended (its entry is pruned): the CPU of threads that ended between the
 * listing before and the next is not told apart from its own then (none is counted). */
void mws_others_py_gone(void);
/* Some thread without Python used CPU in this run (any thread: an atomic load). */
int mws_others_any(void);

/* mw_sampler_timed.c */
/* Takes the samples the CPU-timer handlers left (b NULL or no timers: frees them unused);
 * returns how many there were. */
int mws_drain_timed(mw_profbuf_t *b);

#endif
