/* mw_unwind — native frames; see mw_unwind.h for the contract.
 *
 * The request protocol. One slot, one request at a time. Its state word packs a sequence
 * number and a phase: IDLE, REQ (the sampler asked thread `tid`), BUSY (that thread's handler
 * owns the slot and is unwinding), DONE (IPs written). The sampler sets REQ then tgkill()s the
 * thread and waits on a semaphore (CLOCK_MONOTONIC deadline). The handler claims the slot with a
 * compare-and-swap REQ -> BUSY of the sequence it read, so a handler that runs late (its request
 * was given up: the sampler swapped REQ -> IDLE) or in the wrong thread (a queued signal of an
 * older request) cannot write: its CAS fails. If the sampler times out while the handler is
 * BUSY, the slot stays BUSY and later requests are skipped until the handler finishes.
 *
 * The pause. After DONE the handler sem_post()s and waits on a futex word (`release`, bounded
 * by MW_UNWIND_PAUSE_NS) until the sampler has read the thread's current Python frame chain.
 * The native stack and the Python stack then describe the same instant, which is what makes
 * the splice exact for pure-Python code too. While the thread is paused the sampler takes no
 * lock the thread could hold (it only does process_vm_readv into preallocated buffers);
 * symbolization (dladdr takes the loader lock) happens after the release.
 *
 * The splice. Walking leaf to root, each native frame inside _PyEval_EvalFrameDefault is one
 * C-level call of the eval loop; mw_pyframes_walk marks the outermost Python frame of each such
 * call (eval_entry). The calls are paired leaf first (the leaf side is what a truncated native
 * stack keeps); Python frames of unpaired calls go at the root. Hidden by default: frames in
 * the python executable and libpython (the eval frames become the Python frames they run), and
 * libc frames below the outermost eval call, and libc's thread/process start (start_thread,
 * clone3, __libc_start_main) wherever it appears: a thread exiting after its Python function
 * returned has no eval frame, and its exit work (start_thread -> __munmap) keeps only the leaf.
 */
#define _GNU_SOURCE
#define UNW_LOCAL_ONLY
#include "mw_unwind.h"

#include "mw_cputimer.h"
#include "mw_finishwrite.h"
#include "mw_unmasked.h"
#include "mw_symcache.h"

#include <dlfcn.h>
#include <errno.h>
#include <libunwind.h>
#include <link.h>
#include <linux/futex.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MW_UNWIND_PAUSE_NS 20000000LL /* a paused handler gives up after 20 ms */
#define MW_ALTSTACK_SIZE (64 * 1024)
#if defined(__x86_64__) || defined(__i386__)
#define mw_cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define mw_cpu_relax() __asm__ volatile("yield")
#else
#define mw_cpu_relax() ((void)0)
#endif
#define MW_UNWIND_SPIN 4000        /* ~20-40 us of pause instructions before sleeping */
#define MW_PAUSE_WAIT_NS 2000000LL /* a running thread answers a pause in microseconds */

enum { PH_IDLE = 0, PH_REQ = 1, PH_BUSY = 2, PH_DONE = 3 };

typedef struct {
    _Atomic uint64_t state;   /* seq << 2 | phase */
    _Atomic uint32_t release; /* futex word: low 32 bits of the last released sequence; a
                               * handler paused for sequence q goes once release >= q */
    _Atomic long tid;         /* thread asked */
    _Atomic int unwind;       /* 0: pause only (the Python frames are all the sampler wants) */
    _Atomic long late_tid;    /* last thread whose handler ran after its request was given up */
    int n;                    /* IPs written, leaf first */
    int complete;             /* the unwind reached the outermost frame */
    uintptr_t ip[MW_UNWIND_MAX_FRAMES];
    unw_cursor_t cursor;
} slot_t;

static slot_t *g_slot;
static sem_t g_sem;
static int g_sig;             /* 0 = handler never installed */
static atomic_int g_enabled;  /* native frames wanted */
static atomic_int g_released; /* the app is taking g_sig: no request is sent */
static pthread_mutex_t g_send_lock = PTHREAD_MUTEX_INITIALIZER; /* released vs a request's send */
static int g_show_internal;                                     /* read by the sampler */
static uint64_t g_seq;                                          /* sampler thread */
static pthread_key_t g_altstack_key;
static pthread_once_t g_key_once = PTHREAD_ONCE_INIT;
static mw_unwind_stats_t g_st;                    /* sampler-thread counters */
static _Atomic uint64_t g_late, g_pause_timeouts; /* handler counters */

/* ---- the handler (async-signal-safe only) -------------------------------------------------- */

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* async-signal-safe */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void on_signal(int sig, siginfo_t *si, void *ucv) {
    int saved_errno = errno;
    slot_t *s = g_slot;
    if (si->si_code == SI_TIMER || si->si_code == POLL_IN || si->si_code == POLL_HUP) {
        /* the thread's own CPU timer */
        mw_cputimer_on_signal(si, ucv);
        goto out;
    }
    if (!s || si->si_code != SI_TKILL || si->si_pid != getpid()) goto out;
    uint64_t st = atomic_load(&s->state);
    long me = (long)syscall(SYS_gettid);
    if ((st & 3) != PH_REQ || atomic_load(&s->tid) != me ||
        !atomic_compare_exchange_strong(&s->state, &st, (st & ~3ULL) | PH_BUSY)) {
        /* A request given up on: this thread does take the signal, it was only slow (waiting
         * for a CPU). Tell the sampler so it does not back off from it. */
        atomic_fetch_add_explicit(&g_late, 1, memory_order_relaxed);
        atomic_store(&s->late_tid, me);
        goto out;
    }
    int n = 0, complete = 0;
    /* On x86-64 unw_context_t is ucontext_t: start from the interrupted context. */
    if (atomic_load(&s->unwind) &&
        unw_init_local2(&s->cursor, (unw_context_t *)ucv, UNW_INIT_SIGNAL_FRAME) == 0) {
        for (;;) {
            unw_word_t ip;
            if (unw_get_reg(&s->cursor, UNW_REG_IP, &ip) != 0 || ip == 0) break;
            s->ip[n++] = (uintptr_t)ip;
            if (n >= MW_UNWIND_MAX_FRAMES) break;
            int r = unw_step(&s->cursor);
            if (r <= 0) {
                complete = r == 0;
                break;
            }
        }
    }
    s->n = n;
    s->complete = complete;
    uint32_t seq32 = (uint32_t)(st >> 2);
    atomic_store(&s->state, (st & ~3ULL) | PH_DONE);
    sem_post(&g_sem);
    /* Pause until the sampler has read our Python frames (bounded). */
    int64_t deadline = mono_ns() + MW_UNWIND_PAUSE_NS;
    for (;;) {
        uint32_t r = atomic_load(&s->release);
        if ((int32_t)(r - seq32) >= 0) break; /* released (later requests release us too) */
        int64_t left = deadline - mono_ns();
        if (left <= 0) {
            atomic_fetch_add_explicit(&g_pause_timeouts, 1, memory_order_relaxed);
            break;
        }
        struct timespec ts = {left / 1000000000LL, left % 1000000000LL};
        syscall(SYS_futex, &s->release, FUTEX_WAIT_PRIVATE, r, &ts, NULL, 0);
    }
out:
    /* last: a write this signal cut short is finished before the thread goes on */
    mw_finishwrite_after_signal(ucv, sig);
    errno = saved_errno;
}

/* ---- enable / disable / per-thread set-up (GIL held) ---------------------------------------- */

static int signal_is_ours(int sig) {
    struct sigaction old;
    return sigaction(sig, NULL, &old) == 0 && (old.sa_flags & SA_SIGINFO) &&
           old.sa_sigaction == on_signal;
}

void mw_unwind_signal_action(struct sigaction *sa, void (*handler)(int, siginfo_t *, void *)) {
    memset(sa, 0, sizeof *sa);
    sa->sa_sigaction = handler;
    sa->sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigfillset(&sa->sa_mask);
    sigdelset(&sa->sa_mask, SIGSEGV);
    sigdelset(&sa->sa_mask, SIGBUS);
    sigdelset(&sa->sa_mask, SIGILL);
    sigdelset(&sa->sa_mask, SIGFPE);
    sigdelset(&sa->sa_mask, SIGABRT);
}

static int install_handler(const char **why) {
    if (g_sig && signal_is_ours(g_sig)) {
        atomic_store(&g_released, 0); /* still ours: the app's own set-up did not happen */
        return 0;
    }
    mw_finishwrite_init();
    mw_unmasked_init();
    /* Probe for a real-time signal nobody handles (glibc keeps its own below SIGRTMIN). */
    for (int sig = SIGRTMIN + 6; sig <= SIGRTMAX - 2; sig++) {
        struct sigaction old;
        if (sigaction(sig, NULL, &old) != 0) continue;
        if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) continue;
        struct sigaction sa;
        mw_unwind_signal_action(&sa, on_signal);
        if (sigaction(sig, &sa, NULL) != 0) continue;
        g_sig = sig;
        atomic_store(&g_released, 0);
        return 0;
    }
    *why = "no free real-time signal (every SIGRTMIN+6..SIGRTMAX-2 already has a handler)";
    return -1;
}

static void symcache_setup(void);

int mw_unwind_setup(const char **why) {
    if (!g_slot) {
        void *p =
            mmap(NULL, sizeof(slot_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            *why = "out of memory";
            return -1;
        }
        if (sem_init(&g_sem, 0, 0) != 0) {
            munmap(p, sizeof(slot_t));
            *why = "sem_init failed";
            return -1;
        }
        g_slot = p;
        /* No libunwind cache: nothing shared between handlers, no lock, no thread-local
         * allocation inside a signal handler. */
        unw_set_caching_policy(unw_local_addr_space, UNW_CACHE_GLOBAL);
    }
    return install_handler(why);
}

int mw_unwind_enable(int show_internal, const char **why) {
    if (mw_unwind_setup(why) != 0) return -1;
    symcache_setup();
    g_show_internal = show_internal;
    g_st.signal = (uint64_t)g_sig;
    atomic_store(&g_enabled, 1);
    return 0;
}

int mw_unwind_signal(void) {
    return g_sig;
}

int mw_unwind_signal_ours(void) {
    return !g_sig || signal_is_ours(g_sig);
}

int mw_unwind_release_signal(void) {
    if (!g_sig) return 0;
    pthread_mutex_lock(&g_send_lock); /* a request being sent is sent before this returns */
    atomic_store(&g_released, 1);
    pthread_mutex_unlock(&g_send_lock);
    atomic_store(&g_enabled, 0);
    return g_sig;
}

int mw_unwind_released(void) {
    return atomic_load(&g_released);
}

void mw_unwind_after_fork_child(void) {
    pthread_mutex_init(&g_send_lock, NULL);
}

void mw_unwind_disable(void) {
    atomic_store(&g_enabled, 0);
}

int mw_unwind_enabled(void) {
    return atomic_load_explicit(&g_enabled, memory_order_relaxed);
}

static void altstack_free(void *p) {
    stack_t cur;
    if (sigaltstack(NULL, &cur) == 0 && cur.ss_sp == p && !(cur.ss_flags & SS_ONSTACK)) {
        stack_t off = {.ss_flags = SS_DISABLE};
        sigaltstack(&off, NULL);
        munmap(p, MW_ALTSTACK_SIZE);
    }
}

static void make_key(void) {
    pthread_key_create(&g_altstack_key, altstack_free);
}

int mw_unwind_thread_init(void) {
    stack_t cur;
    if (sigaltstack(NULL, &cur) != 0) return -1;
    if (!(cur.ss_flags & SS_DISABLE)) return 0; /* keep the thread's own (e.g. faulthandler's) */
    pthread_once(&g_key_once, make_key);
    void *p =
        mmap(NULL, MW_ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -1;
    stack_t ss = {.ss_sp = p, .ss_size = MW_ALTSTACK_SIZE, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0) {
        munmap(p, MW_ALTSTACK_SIZE);
        return -1;
    }
    pthread_setspecific(g_altstack_key, p);
    return 1;
}

void mw_unwind_get_stats(mw_unwind_stats_t *out) {
    *out = g_st;
    out->late = atomic_load(&g_late);
    out->pause_timeouts = atomic_load(&g_pause_timeouts);
    out->enabled = (uint64_t)mw_unwind_enabled();
    /* Native stacks captured by the threads' own CPU-timer handlers count as captured too. */
    mw_cputimer_stats_t t;
    mw_cputimer_get_stats(&t);
    out->captured += t.native;
    out->frames += t.native_frames;
}

/* ---- requests (sampler thread) ------------------------------------------------------------ */

/* Threads that did not answer are asked again only after a growing number of skipped turns
 * (a thread that blocks the signal would otherwise queue one per tick). */
#define BACKOFF_SLOTS 256
static struct {
    long tid;
    uint32_t fails, skip;
} g_backoff[BACKOFF_SLOTS];

static void release_seq(uint64_t seq) {
    atomic_store(&g_slot->release, (uint32_t)seq);
    syscall(SYS_futex, &g_slot->release, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Sends a request to thread tid and waits until its handler has answered (it is then paused).
 * The handler answers within microseconds when the thread runs: spin briefly before sleeping
 * on the semaphore, so that a pause costs neither side a context switch. */
static int request(long tid, int unwind, int64_t wait_ns) {
    slot_t *s = g_slot;
    if (!s || !g_sig || tid <= 0 || atomic_load(&g_released)) return -1;
    unsigned bi = (unsigned)tid & (BACKOFF_SLOTS - 1);
    long late = atomic_exchange(&s->late_tid, 0);
    if (late) { /* its handler ran after all: it takes our signal, forget the back-off */
        unsigned li = (unsigned)late & (BACKOFF_SLOTS - 1);
        if (g_backoff[li].tid == late) g_backoff[li].fails = g_backoff[li].skip = 0;
    }
    if (g_backoff[bi].tid == tid && g_backoff[bi].skip) {
        g_backoff[bi].skip--;
        g_st.skipped++;
        return -1;
    }
    uint64_t st = atomic_load(&s->state);
    if ((st & 3) == PH_BUSY) { /* a handler we gave up on is still unwinding */
        g_st.skipped++;
        return -1;
    }
    if ((st & 3) == PH_DONE) release_seq(st >> 2); /* one that ended after we gave up */
    while (sem_trywait(&g_sem) == 0) {
    }
    uint64_t seq = ++g_seq;
    atomic_store(&s->tid, tid);
    atomic_store(&s->unwind, unwind);
    s->n = 0;
    atomic_store(&s->state, seq << 2 | PH_REQ);
    g_st.requests++;
    pthread_mutex_lock(&g_send_lock);
    int sent = !atomic_load(&g_released) && syscall(SYS_tgkill, getpid(), (pid_t)tid, g_sig) == 0;
    pthread_mutex_unlock(&g_send_lock);
    if (!sent) {
        atomic_store(&s->state, seq << 2 | PH_IDLE);
        g_st.send_failed++;
        return -1;
    }
    for (int spin = 0; spin < MW_UNWIND_SPIN; spin++) {
        if (atomic_load_explicit(&s->state, memory_order_acquire) == (seq << 2 | PH_DONE))
            goto answered;
        mw_cpu_relax();
    }
    int64_t dl = mono_ns() + wait_ns;
    int extended = 0;
    for (;;) {
        struct timespec ts = {dl / 1000000000LL, dl % 1000000000LL};
        int rc = sem_clockwait(&g_sem, CLOCK_MONOTONIC, &ts);
        st = atomic_load(&s->state);
        if (st == (seq << 2 | PH_DONE)) break;
        if (rc == 0 || errno == EINTR) continue; /* a stale post */
        uint64_t want = seq << 2 | PH_REQ;
        if (atomic_compare_exchange_strong(&s->state, &want, seq << 2 | PH_IDLE) || extended) {
            /* Not answered (or still unwinding after the grace period: the slot stays BUSY
             * until that handler ends, and requests are skipped meanwhile). */
            g_st.timeouts++;
            if (g_backoff[bi].tid != tid) {
                g_backoff[bi].tid = tid;
                g_backoff[bi].fails = 0;
            }
            uint32_t f = ++g_backoff[bi].fails;
            /* Pauses are asked of running threads: a time-out there is mostly a thread that
             * lost its CPU right after, so back off only a little. */
            uint32_t cap = unwind ? 6 : 3;
            g_backoff[bi].skip = 1u << (f < cap ? f : cap);
            return -1;
        }
        extended = 1; /* the handler is BUSY: unwinding takes microseconds, give it more */
        dl += wait_ns;
    }
answered:
    if (g_backoff[bi].tid == tid) g_backoff[bi].fails = 0;
    return 0;
}

int mw_unwind_pause(long tid) {
    if (request(tid, 0, MW_PAUSE_WAIT_NS) != 0) return -1;
    g_st.pauses++;
    return 0;
}

int mw_unwind_capture(long tid, uintptr_t tstate, uintptr_t *top_frame) {
    slot_t *s = g_slot;
    if (request(tid, 1, MW_UNWIND_WAIT_NS) != 0) return -1;
    /* The thread is paused in its handler: note its current Python frame. */
    if (tstate) {
        uintptr_t p = mw_pyframes_top_frame(tstate);
        if (p) *top_frame = p;
    }
    g_st.captured++;
    g_st.frames += (uint64_t)s->n;
    if (!s->complete) g_st.truncated++;
    return 0;
}

void mw_unwind_release(void) {
    release_seq(g_seq);
}

/* ---- symbolization (sampler thread, outside the handler) ---------------------------------- */

/* Native frames are functions: every address is mapped (mw_elfsym) to the function it is in,
 * whose name is its symbol or, with no symbol, "object+0xSTART" (its start as an address in the
 * object's ELF file). Two caches: address -> function (g_ip) and function start -> name, file,
 * flags and frame id (g_sy); a new address costs one mw_elfsym lookup, a new function one name.
 * Both are emptied together (with the name arena) when either is half full. */
#include "mw_elfsym.h"

enum { SY_INTERNAL = 1, SY_EVAL = 2, SY_LIBC = 4, SY_ROOT = 8 };

/* libc's thread and process start: the root of every complete native stack. Hidden by default
 * wherever they appear, also in a stack with no eval frame to anchor the libc rule (a thread
 * exiting after its Python function returned: start_thread -> __munmap). */
static int sy_is_root(const char *name, size_t len) {
    static const char *const roots[] = {
        "start_thread",           "clone", "clone3", "__clone", "__clone3", "__libc_start_main",
        "__libc_start_call_main", "_start"};
    for (size_t i = 0; i < sizeof roots / sizeof *roots; i++)
        if (strlen(roots[i]) == len && memcmp(roots[i], name, len) == 0) return 1;
    return 0;
}

typedef struct {
    uintptr_t start; /* function start (the address itself if bounds unknown); 0 = empty */
    uint32_t name_off, file_off;
    uint16_t name_len, file_len;
    uint8_t flags;
    uint64_t gen;
    mw_id_t frame_id;
} sym_t;

typedef struct {
    uintptr_t addr; /* lookup address (return address - 1 except for the leaf); 0 = empty */
    uint32_t sy;    /* index in g_sy */
} ipent_t;

#define IP_SLOTS 16384 /* powers of two; at most half used before a reset */
#define SY_SLOTS 8192
#define SY_ARENA (2u << 20)

static ipent_t *g_ip;
static sym_t *g_sy;
static char *g_sy_arena;
static uint32_t g_sy_used, g_ip_live, g_sy_live, g_sy_clears;
static uintptr_t g_eval_lo, g_eval_hi; /* _PyEval_EvalFrameDefault */
static const void *g_base_python, *g_base_exe, *g_base_libc;
static char g_exe_name[256] = "[exe]";

static int first_object(struct dl_phdr_info *info, size_t size, void *arg) {
    (void)size;
    uintptr_t lo = UINTPTR_MAX;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_LOAD && info->dlpi_phdr[i].p_vaddr < lo)
            lo = info->dlpi_phdr[i].p_vaddr;
    *(uintptr_t *)arg = info->dlpi_addr + (lo & ~(uintptr_t)4095);
    return 1; /* the main program comes first */
}

static const void *object_base(const char *symbol) {
    void *p = dlsym(RTLD_DEFAULT, symbol);
    Dl_info info;
    return p && dladdr(p, &info) ? info.dli_fbase : NULL;
}

static void symcache_setup(void) {
    if (g_sy) return;
    g_ip = calloc(IP_SLOTS, sizeof *g_ip);
    g_sy = calloc(SY_SLOTS, sizeof *g_sy);
    g_sy_arena = malloc(SY_ARENA);
    if (!g_ip || !g_sy || !g_sy_arena) {
        free(g_ip);
        free(g_sy);
        free(g_sy_arena);
        g_ip = NULL;
        g_sy = NULL;
        g_sy_arena = NULL;
        return;
    }
    void *ev = dlsym(RTLD_DEFAULT, "_PyEval_EvalFrameDefault");
    Dl_info info;
    const ElfW(Sym) *sym = NULL;
    if (ev && dladdr1(ev, &info, (void **)&sym, RTLD_DL_SYMENT) && sym && sym->st_size) {
        g_eval_lo = (uintptr_t)ev;
        g_eval_hi = (uintptr_t)ev + sym->st_size;
    }
    g_base_python = object_base("PyObject_Call");
    g_base_libc = object_base("gnu_get_libc_version");
    uintptr_t exe = 0;
    dl_iterate_phdr(first_object, &exe);
    g_base_exe = (const void *)exe;
    char path[1024];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
    if (n > 0) {
        path[n] = '\0';
        const char *b = strrchr(path, '/');
        b = b ? b + 1 : path;
        size_t len = strlen(b) < sizeof g_exe_name - 1 ? strlen(b) : sizeof g_exe_name - 1;
        memcpy(g_exe_name, b, len);
        g_exe_name[len] = '\0';
    }
}

static int arena_put(const char *str, size_t len, uint32_t *off, uint16_t *olen) {
    if (len > 1000) len = 1000;
    if (g_sy_used + len + 1 > SY_ARENA) return -1;
    memcpy(g_sy_arena + g_sy_used, str, len);
    g_sy_arena[g_sy_used + len] = '\0';
    *off = g_sy_used;
    *olen = (uint16_t)len;
    g_sy_used += (uint32_t)len + 1;
    return 0;
}

static void sy_clear(void) {
    memset(g_ip, 0, IP_SLOTS * sizeof *g_ip);
    memset(g_sy, 0, SY_SLOTS * sizeof *g_sy);
    g_sy_used = g_ip_live = g_sy_live = 0;
    g_sy_clears++;
}

static int sy_fill(sym_t *e, const mw_elfsym_t *fn, int found) {
    char buf[1100];
    const char *name = fn->name, *file = "[unknown]";
    size_t name_len = fn->name_len;
    e->flags = 0;
    if (found) {
        const void *base = (const void *)fn->base;
        if (base == g_base_exe) {
            file = g_exe_name;
        } else if (fn->path[0]) {
            const char *b = strrchr(fn->path, '/');
            file = b ? b + 1 : fn->path;
        }
        if (base == g_base_python || base == g_base_exe) e->flags |= SY_INTERNAL;
        if (base == g_base_libc) e->flags |= SY_LIBC;
        if (fn->name && sy_is_root(fn->name, fn->name_len)) e->flags |= SY_ROOT;
    }
    if (!name) {
        if (found)
            snprintf(buf, sizeof buf, "%.1000s+0x%lx", file, (unsigned long)(fn->start - fn->bias));
        else
            snprintf(buf, sizeof buf, "0x%lx", (unsigned long)fn->start);
        name = buf;
        name_len = strlen(buf);
    }
    /* the eval loop, or its cold part (same C frame, named after it) */
    if ((g_eval_lo && fn->start >= g_eval_lo && fn->start < g_eval_hi) ||
        (name_len == 24 && memcmp(name, "_PyEval_EvalFrameDefault", 24) == 0))
        e->flags |= SY_EVAL;
    if (arena_put(name, name_len, &e->name_off, &e->name_len) != 0 ||
        arena_put(file, strlen(file), &e->file_off, &e->file_len) != 0)
        return -1;
    e->start = fn->start;
    e->gen = 0;
    e->frame_id = 0;
    return 0;
}

/* The function of addr, or NULL when a cache is full (the caller empties both). */
static sym_t *sy_function(uintptr_t addr) {
    mw_elfsym_t fn;
    int found = mw_elfsym_lookup(addr, &fn) == 0;
    uintptr_t key = fn.start;
    uint32_t h = (uint32_t)((key >> 2) * 2654435761u) & (SY_SLOTS - 1);
    for (uint32_t k = 0; k < SY_SLOTS; k++, h = (h + 1) & (SY_SLOTS - 1)) {
        sym_t *e = &g_sy[h];
        if (e->start == key) return e;
        if (e->start != 0) continue;
        if (g_sy_live < SY_SLOTS / 2 && sy_fill(e, &fn, found) == 0) {
            g_sy_live++;
            return e;
        }
        break;
    }
    return NULL;
}

static sym_t *sy_lookup(uintptr_t addr) {
    if (!g_sy || addr == 0) return NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        uint32_t h = (uint32_t)((addr >> 2) * 2654435761u) & (IP_SLOTS - 1);
        for (uint32_t k = 0; k < IP_SLOTS; k++, h = (h + 1) & (IP_SLOTS - 1)) {
            ipent_t *e = &g_ip[h];
            if (e->addr == addr) return &g_sy[e->sy];
            if (e->addr != 0) continue;
            sym_t *f = g_ip_live < IP_SLOTS / 2 ? sy_function(addr) : NULL;
            if (f) {
                e->addr = addr;
                e->sy = (uint32_t)(f - g_sy);
                g_ip_live++;
                g_st.symbols++;
                return f;
            }
            break;
        }
        sy_clear(); /* full: start again */
    }
    return NULL;
}

static mw_id_t sy_frame(mw_profbuf_t *b, sym_t *e) {
    uint64_t gen = mw_profbuf_generation(b);
    if (e->gen == gen && e->frame_id) return e->frame_id;
    mw_frame_t f = {0, 0, 0, 0};
    f.name = mw_profbuf_intern_str(b, g_sy_arena + e->name_off, e->name_len);
    f.file = mw_profbuf_intern_str(b, g_sy_arena + e->file_off, e->file_len);
    mw_id_t id = f.name && f.file ? mw_profbuf_intern_frame(b, &f) : 0;
    e->gen = gen;
    e->frame_id = id;
    return id;
}

/* ---- the splice (sampler thread) ---------------------------------------------------------- */

uint32_t mw_unwind_combine(mw_profbuf_t *b, const mw_rawframe_t *py, int npy, mw_id_t *out,
                           uint32_t cap) {
    slot_t *s = g_slot;
    if (!s) return mw_unwind_combine_ips(b, NULL, 0, 0, py, npy, out, cap);
    return mw_unwind_combine_ips(b, s->ip, s->n, s->complete, py, npy, out, cap);
}

size_t mw_unwind_cursor_size(void) {
    return sizeof(unw_cursor_t);
}

int mw_unwind_here(void *ucontext, void *cursor, uintptr_t *ips, int max, int *complete) {
    int n = 0;
    *complete = 0;
    unw_cursor_t *c = cursor;
    /* On x86-64 unw_context_t is ucontext_t: start from the interrupted context. */
    if (unw_init_local2(c, (unw_context_t *)ucontext, UNW_INIT_SIGNAL_FRAME) != 0) return 0;
    for (;;) {
        unw_word_t ip;
        if (unw_get_reg(c, UNW_REG_IP, &ip) != 0 || ip == 0) break;
        ips[n++] = (uintptr_t)ip;
        if (n >= max) break;
        int r = unw_step(c);
        if (r <= 0) {
            *complete = r == 0;
            break;
        }
    }
    return n;
}

uint32_t mw_unwind_combine_ips(mw_profbuf_t *b, const uintptr_t *ips, int k, int complete,
                               const mw_rawframe_t *py, int npy, mw_id_t *out, uint32_t cap) {
    static sym_t *sy[MW_UNWIND_MAX_FRAMES];
    static int gstart[MW_UNWIND_MAX_FRAMES + 4096], gend[MW_UNWIND_MAX_FRAMES + 4096];
    const int gmax = (int)(sizeof gstart / sizeof *gstart);
    if (k > MW_UNWIND_MAX_FRAMES) k = MW_UNWIND_MAX_FRAMES;
    /* Python eval calls, leaf first. */
    int m = 0, cur = 0;
    for (int i = 0; i < npy && m < gmax; i++) {
        for (int e = 0; e < py[i].eval_entry && m < gmax; e++) {
            gstart[m] = cur;
            gend[m++] = i + 1;
            cur = i + 1;
        }
    }
    if (cur < npy && m < gmax) {
        gstart[m] = cur;
        gend[m++] = npy;
    }
    /* Native frames, symbolized (again if the cache was emptied under our pointers). */
    int nev = 0, last_eval = -1;
    for (int attempt = 0; attempt < 2; attempt++) {
        uint32_t clears = g_sy_clears;
        nev = 0;
        last_eval = -1;
        for (int i = 0; i < k; i++) {
            sy[i] = sy_lookup(i == 0 ? ips[i] : ips[i] - 1);
            if (sy[i] && (sy[i]->flags & SY_EVAL)) {
                nev++;
                last_eval = i;
            }
        }
        if (clears == g_sy_clears) break;
    }
    if (nev != m && !(nev < m && !complete)) g_st.mismatches++;
    uint32_t n = 0;
    int j = 0;
    int show = g_show_internal;
#define EMIT(id)                                                                                   \
    do {                                                                                           \
        mw_id_t id_ = (id);                                                                        \
        if (n < cap) out[n++] = id_; /* 0: a full table; the caller cuts the stack there */        \
    } while (0)
#define EMIT_GROUP(g)                                                                              \
    do {                                                                                           \
        for (int x = gstart[g]; x < gend[g]; x++)                                                  \
            EMIT(mw_symcache_frame(b, &py[x]));                                                    \
    } while (0)
    for (int i = 0; i < k && n < cap; i++) {
        sym_t *e = sy[i];
        if (!e) continue;
        if (e->flags & SY_EVAL) {
            if (j < m) EMIT_GROUP(j);
            j++;
            if (show) EMIT(sy_frame(b, e));
            continue;
        }
        if (!show) {
            if (e->flags & (SY_INTERNAL | SY_ROOT)) continue;
            if ((e->flags & SY_LIBC) && last_eval >= 0 && i > last_eval) continue;
        }
        EMIT(sy_frame(b, e));
    }
    for (; j < m && n < cap; j++)
        EMIT_GROUP(j);
#undef EMIT_GROUP
#undef EMIT
    return n;
}
