/* mw_saferead — see mw_saferead.h for the mechanism and contract. */
#define _GNU_SOURCE
#include "mw_saferead.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

static _Atomic pid_t g_pid; /* cached: glibc's getpid() is a system call; refreshed after fork */
static atomic_int g_ok;

/* The one thread whose mw_safe_read/mw_safe_readv calls are guarded direct copies (the sampler,
 * during a tick), and its guard. */
static mw_guard_t *_Atomic g_direct_guard;
static pthread_t g_direct_thread;

/* In a forked child too: our pid changed, and the thread that read directly is not there. */
static void refresh_pid(void) {
    atomic_store(&g_pid, getpid());
    atomic_store(&g_direct_guard, NULL);
}
static atomic_uint_fast64_t g_failures;

int mw_saferead_init(void) {
    static const uint64_t probe = 0x6d77736166657264ULL;
    uint64_t out = 0;
    static int registered;
    if (!registered) {
        registered = 1;
        pthread_atfork(NULL, NULL, refresh_pid);
    }
    refresh_pid();
    struct iovec l = {&out, sizeof out}, r = {(void *)&probe, sizeof probe};
    ssize_t n = process_vm_readv(g_pid, &l, 1, &r, 1, 0);
    int ok = (n == (ssize_t)sizeof out && out == probe);
    /* An unmapped page must fail cleanly, not fault. */
    if (ok) {
        struct iovec bad = {(void *)16, 8};
        ok = process_vm_readv(g_pid, &l, 1, &bad, 1, 0) < 0;
    }
    atomic_store(&g_ok, ok);
    return ok ? 0 : -1;
}

static int guarded_copy(mw_guard_t *g, const void *addr, size_t len, void *dst);

static inline mw_guard_t *direct_guard(void) {
    mw_guard_t *g = atomic_load_explicit(&g_direct_guard, memory_order_relaxed);
    return g && pthread_equal(g_direct_thread, pthread_self()) ? g : NULL;
}

void mw_saferead_direct_begin(mw_guard_t *g) {
    g_direct_thread = pthread_self();
    atomic_store(&g_direct_guard, g);
}

void mw_saferead_direct_end(void) {
    atomic_store(&g_direct_guard, NULL);
}

int mw_safe_read(const void *addr, size_t len, void *dst) {
    mw_guard_t *g = direct_guard();
    if (g) {
        if (guarded_copy(g, addr, len, dst) == 0) return 0;
        goto fail;
    }
    if (addr == NULL || !atomic_load_explicit(&g_ok, memory_order_relaxed)) goto fail;
    if (len == 0) return 0;
    struct iovec l = {dst, len}, r = {(void *)addr, len};
    ssize_t n =
        process_vm_readv(atomic_load_explicit(&g_pid, memory_order_relaxed), &l, 1, &r, 1, 0);
    if (n == (ssize_t)len) return 0;
fail:
    atomic_fetch_add_explicit(&g_failures, 1, memory_order_relaxed);
    return -1;
}

int mw_safe_readv(const struct iovec *local, const struct iovec *remote, int n) {
    mw_guard_t *g = direct_guard();
    if (g) {
        int done = 0;
        while (done < n && guarded_copy(g, remote[done].iov_base, remote[done].iov_len,
                                        local[done].iov_base) == 0)
            done++;
        if (done < n) atomic_fetch_add_explicit(&g_failures, 1, memory_order_relaxed);
        return done;
    }
    if (n <= 0 || !atomic_load_explicit(&g_ok, memory_order_relaxed)) return 0;
    ssize_t got = process_vm_readv(atomic_load_explicit(&g_pid, memory_order_relaxed), local,
                                   (unsigned long)n, remote, (unsigned long)n, 0);
    if (got < 0) {
        atomic_fetch_add_explicit(&g_failures, 1, memory_order_relaxed);
        return 0;
    }
    int done = 0;
    size_t acc = 0;
    while (done < n && acc + remote[done].iov_len <= (size_t)got)
        acc += remote[done++].iov_len;
    /* A short batch is normal (callers read speculatively past what they need): only a batch
     * that read nothing counts as a failure. */
    if (done == 0) atomic_fetch_add_explicit(&g_failures, 1, memory_order_relaxed);
    return done;
}

uint64_t mw_saferead_failures(void) {
    return atomic_load_explicit(&g_failures, memory_order_relaxed);
}

/* ---- mw_guard ---------------------------------------------------------------------------------
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>

static mw_guard_t *_Atomic g_guards[MW_GUARDS];
_Atomic uint64_t mw_guard_clock;

/* A user-space address of this architecture (x86-64 and arm64: below 2^47 / 2^48). */
static int mw_addr_plausible(uintptr_t a) {
#if defined(__x86_64__) || defined(__aarch64__)
    return a < ((uintptr_t)1 << 48);
#else
    return 1;
#endif
}
static struct sigaction g_prev_segv, g_prev_bus;
static atomic_int g_guard_installed;

static void chain(int sig, siginfo_t *si, void *uc, const struct sigaction *prev) {
    if (prev->sa_flags & SA_SIGINFO) {
        prev->sa_sigaction(sig, si, uc);
        return;
    }
    if (prev->sa_handler == SIG_DFL || prev->sa_handler == SIG_IGN) {
        /* Give the fault its default action: the faulting instruction runs again and faults
         * with the default disposition (or a raise()d signal is re-raised). */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
        if (si->si_code <= 0) raise(sig); /* sent, not a fault: deliver it again */
        return;
    }
    prev->sa_handler(sig);
}

static void on_fault(int sig, siginfo_t *si, void *uc) {
    long me = (long)syscall(SYS_gettid);
    mw_guard_t *hit = NULL;
    for (int i = 0; i < MW_GUARDS; i++) {
        mw_guard_t *g = atomic_load(&g_guards[i]);
        /* Inside a guarded copy of this thread: the copy loop is the only code that runs armed.
         * (si_addr is not checked against the range: a non-canonical address faults with a
         * general-protection fault whose si_addr is 0.) A SIGSEGV sent by kill() is not a
         * fault of the copy: it takes its course. Of two armed guards of this thread (a
         * handler's walk nested in another walk), the one armed last. */
        if (g && g->armed && si->si_code > 0 && atomic_load(&g->owner) == me &&
            (!hit || g->stamp > hit->stamp))
            hit = g;
    }
    if (hit) {
        hit->faults++;
        siglongjmp(hit->jb, 1);
    }
    chain(sig, si, uc, sig == SIGBUS ? &g_prev_bus : &g_prev_segv);
}

int mw_guard_install(void) {
    if (atomic_load(&g_guard_installed)) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    /* NODEFER: a fault in a guarded copy leaves by siglongjmp without restoring a mask. */
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &g_prev_segv) != 0) return -1;
    if (sigaction(SIGBUS, &sa, &g_prev_bus) != 0) {
        sigaction(SIGSEGV, &g_prev_segv, NULL);
        return -1;
    }
    atomic_store(&g_guard_installed, 1);
    return 0;
}

int mw_guard_allowed(void) {
    const char *direct = getenv("MW_PROFILING_DIRECT_READS");
    return !(direct && strcmp(direct, "0") == 0) && mw_guard_install() == 0;
}

int mw_guard_active(void) {
    if (!atomic_load_explicit(&g_guard_installed, memory_order_relaxed)) return 0;
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur) != 0) return 0;
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault;
}

int mw_guard_register(mw_guard_t *g) {
    for (int i = 0; i < MW_GUARDS; i++) {
        mw_guard_t *z = NULL;
        if (atomic_load(&g_guards[i]) == g) return 0;
        if (atomic_compare_exchange_strong(&g_guards[i], &z, g)) return 0;
    }
    return -1;
}

/* A copy the compiler must not turn into a memcpy call (sanitizers intercept memcpy) and the
 * sanitizers must not check (the source is memory the application may have freed). */
__attribute__((no_sanitize("address", "undefined"), noinline)) static void
raw_copy(volatile const uint8_t *src, uint8_t *dst, size_t len) {
    size_t i = 0;
    while (i < len && ((uintptr_t)(src + i) & 7)) {
        dst[i] = src[i];
        i++;
    }
    for (; i + 8 <= len; i += 8) { /* aligned word loads: a deep stack is kilobytes */
        uint64_t w = *(volatile const uint64_t *)(src + i);
        memcpy(dst + i, &w, 8);
    }
    for (; i < len; i++)
        dst[i] = src[i];
}

static int guarded_copy(mw_guard_t *g, const void *addr, size_t len, void *dst) {
    if (len == 0) return 0;
    uintptr_t a = (uintptr_t)addr;
    if (a < 4096 || a + len < a || !mw_addr_plausible(a + len - 1)) return -1;
    if (g->session) { /* the caller's sigsetjmp guards this copy */
        raw_copy((volatile const uint8_t *)addr, dst, len);
        return 0;
    }
    if (sigsetjmp(g->jb, 0)) {
        g->armed = 0;
        return -1;
    }
    g->lo = a;
    g->hi = a + len;
    mw_guard_arm(g);
    atomic_signal_fence(memory_order_seq_cst);
    raw_copy((volatile const uint8_t *)addr, dst, len);
    atomic_signal_fence(memory_order_seq_cst);
    g->armed = 0;
    return 0;
}

int mw_readcache_read_exact(mw_readcache_t *c, const void *addr, size_t len, void *dst) {
    return c->guard ? guarded_copy(c->guard, addr, len, dst) : mw_safe_read(addr, len, dst);
}

int mw_readcache_readv(mw_readcache_t *c, const struct iovec *local, const struct iovec *remote,
                       int n) {
    if (!c->guard) return mw_safe_readv(local, remote, n);
    int done = 0;
    while (done < n && guarded_copy(c->guard, remote[done].iov_base, remote[done].iov_len,
                                    local[done].iov_base) == 0)
        done++;
    return done;
}

/* ---- mw_readcache ---------------------------------------------------------------------------- */

static inline unsigned rc_slot(uintptr_t page) {
    return (unsigned)((page / MW_PAGE_SIZE) & (MW_READCACHE_PAGES - 1));
}

void mw_readcache_reset(mw_readcache_t *c) {
    memset(c->page, 0, sizeof c->page);
    /* The direct-read thread copies exactly what it reads: whole pages would cost it a
     * cache-line transfer from the other core for every line of them. */
    c->guard = direct_guard();
}

void mw_readcache_direct(mw_readcache_t *c, mw_guard_t *guard) {
    c->guard = guard;
}

/* Fetches `page` and up to `below` pages under it in one process_vm_readv; the pages are read
 * in descending order so an unmapped lower page only shortens the batch. */
static int rc_fetch(mw_readcache_t *c, uintptr_t page, unsigned below) {
    struct iovec l[8], r[8];
    unsigned n = 0;
    if (below > 7) below = 7;
    for (unsigned k = 0; k <= below; k++) {
        uintptr_t p = page - (uintptr_t)k * MW_PAGE_SIZE;
        if (p > page || p == 0) break; /* wrapped */
        unsigned s = rc_slot(p);
        if (k > 0 && c->page[s] == p + 1) break; /* already cached */
        l[n].iov_base = c->data[s];
        l[n].iov_len = MW_PAGE_SIZE;
        r[n].iov_base = (void *)p;
        r[n].iov_len = MW_PAGE_SIZE;
        c->page[s] = 0;
        n++;
    }
    int got = mw_safe_readv(l, r, (int)n);
    for (int k = 0; k < got; k++)
        c->page[rc_slot((uintptr_t)r[k].iov_base)] = (uintptr_t)r[k].iov_base + 1;
    c->misses++;
    return got > 0 ? 0 : -1;
}

int mw_readcache_read(mw_readcache_t *c, const void *addr, size_t len, void *dst, unsigned below) {
    uintptr_t a = (uintptr_t)addr;
    if (a == 0) return -1;
    if (c->guard) return guarded_copy(c->guard, addr, len, dst);
    uint8_t *out = dst;
    while (len > 0) {
        uintptr_t page = a & ~(uintptr_t)(MW_PAGE_SIZE - 1);
        size_t off = a - page, n = MW_PAGE_SIZE - off;
        if (n > len) n = len;
        unsigned s = rc_slot(page);
        if (c->page[s] != page + 1) {
            /* The slot may be taken by a page of the current read: never evict within a read. */
            if (rc_fetch(c, page, below) != 0) return -1;
        } else {
            c->hits++;
        }
        memcpy(out, c->data[s] + off, n);
        out += n;
        a += n;
        len -= n;
    }
    return 0;
}

int mw_readcache_prefetch(mw_readcache_t *c, const uintptr_t *pages, unsigned n) {
    if (c->guard) return 0; /* direct reads: nothing to batch */
    struct iovec l[16], r[16];
    unsigned k = 0;
    for (unsigned i = 0; i < n && k < 16; i++) {
        uintptr_t p = pages[i] & ~(uintptr_t)(MW_PAGE_SIZE - 1);
        if (p == 0) continue;
        unsigned s = rc_slot(p);
        if (c->page[s] == p + 1) continue;
        int dup = 0;
        for (unsigned j = 0; j < k && !dup; j++)
            dup = rc_slot((uintptr_t)r[j].iov_base) == s;
        if (dup) continue; /* two pages for one slot: the later one waits for its own miss */
        c->page[s] = 0;
        l[k].iov_base = c->data[s];
        l[k].iov_len = MW_PAGE_SIZE;
        r[k].iov_base = (void *)p;
        r[k].iov_len = MW_PAGE_SIZE;
        k++;
    }
    if (k == 0) return 0;
    /* process_vm_readv stops at the first unreadable page: pages after it are simply not cached */
    int got = mw_safe_readv(l, r, (int)k);
    for (int j = 0; j < got; j++)
        c->page[rc_slot((uintptr_t)r[j].iov_base)] = (uintptr_t)r[j].iov_base + 1;
    c->misses++;
    return got;
}
