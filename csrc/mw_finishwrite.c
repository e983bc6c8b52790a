/* mw_finishwrite — finishing a write(2) our signal cut short; see mw_finishwrite.h. */
#define _GNU_SOURCE
#include "mw_finishwrite.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__linux__)

/* `mov $1,%eax` (write's system call number) then `syscall`: the 7 bytes before the return. */
static const unsigned char WRITE_SITE[7] = {0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05};
#define WRITE_FN_SPAN 1024 /* at most this much of the C library's write is searched */
#define MAX_SITES 4

static _Atomic uint64_t g_finished, g_bytes;

/* The cut write each thread last left short (an app's signal came, or the write returned short):
 * a signal of ours that became pending meanwhile is taken as the handler returns, at the very
 * same point of the same call (same instruction, stack pointer and count), and its handler must
 * leave that call to the app, not wait in it again: the app's signal's handler (CPython's sets a
 * flag) waits for the thread to get back to it, and a write that never ends would hang. Keyed by
 * thread id; two threads sharing a slot only mean that one may wait in such a call once more. */
#define LEFT_SLOTS 64
static struct {
    _Atomic long tid;
    _Atomic uint64_t sp, ip, count;
} g_left[LEFT_SLOTS];

static int left_before(long tid, uint64_t sp, uint64_t ip, uint64_t count) {
    unsigned i = (unsigned long)tid % LEFT_SLOTS;
    return atomic_load_explicit(&g_left[i].tid, memory_order_relaxed) == tid &&
           atomic_load_explicit(&g_left[i].sp, memory_order_relaxed) == sp &&
           atomic_load_explicit(&g_left[i].ip, memory_order_relaxed) == ip &&
           atomic_load_explicit(&g_left[i].count, memory_order_relaxed) == count;
}

static void leave(long tid, uint64_t sp, uint64_t ip, uint64_t count) {
    unsigned i = (unsigned long)tid % LEFT_SLOTS;
    atomic_store_explicit(&g_left[i].tid, 0, memory_order_relaxed);
    atomic_store_explicit(&g_left[i].sp, sp, memory_order_relaxed);
    atomic_store_explicit(&g_left[i].ip, ip, memory_order_relaxed);
    atomic_store_explicit(&g_left[i].count, count, memory_order_relaxed);
    atomic_store_explicit(&g_left[i].tid, tid, memory_order_relaxed);
}
static uintptr_t g_sites[MAX_SITES]; /* return addresses of write's system calls; set once */
static int g_nsites;

void mw_finishwrite_init(void) {
    if (g_nsites) return;
    /* the C library's own write, not an interposer's (a sanitizer's or a tracer's wrapper calls
     * it in turn) */
    void *libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    if (!libc) return;
    const unsigned char *fn = (const unsigned char *)dlsym(libc, "write");
    dlclose(libc); /* RTLD_NOLOAD: only the reference just taken is dropped */
    Dl_info info;
    const ElfW(Sym) *sym = NULL;
    if (!fn || !dladdr1(fn, &info, (void **)&sym, RTLD_DL_SYMENT) || !sym) return;
    size_t span = sym->st_size < WRITE_FN_SPAN ? (size_t)sym->st_size : WRITE_FN_SPAN;
    int n = 0;
    for (size_t i = 0; i + sizeof WRITE_SITE <= span && n < MAX_SITES; i++)
        if (memcmp(fn + i, WRITE_SITE, sizeof WRITE_SITE) == 0)
            g_sites[n++] = (uintptr_t)(fn + i + sizeof WRITE_SITE);
    g_nsites = n;
}

void mw_finishwrite_stats(uint64_t *finished, uint64_t *bytes, uint64_t *watched) {
    *finished = atomic_load_explicit(&g_finished, memory_order_relaxed);
    *bytes = atomic_load_explicit(&g_bytes, memory_order_relaxed);
    *watched = (uint64_t)g_nsites;
}

static int is_write_return(uintptr_t ip) {
    for (int i = 0; i < g_nsites; i++)
        if (g_sites[i] == ip) return 1;
    return 0;
}

void mw_finishwrite_after_signal(void *ucv, int our_sig) {
    ucontext_t *uc = ucv;
    greg_t *g = uc->uc_mcontext.gregs;
    uint64_t done = (uint64_t)g[REG_RAX], want = (uint64_t)g[REG_RDX];
    /* a partial count: 0 < done < want (a count is below 2^47: no user buffer is larger) */
    if (done == 0 || done >= want || want >= (1ULL << 47)) return;
    if (!is_write_return((uintptr_t)g[REG_RIP])) return;
    int saved_errno = errno;
    long tid = (long)syscall(SYS_gettid);
    uint64_t sp = (uint64_t)g[REG_RSP], ip = (uint64_t)g[REG_RIP];
    if (left_before(tid, sp, ip, done)) { /* left to the app already (see g_left) */
        errno = saved_errno;
        return;
    }
    int fd = (int)g[REG_RDI];
    const char *buf = (const char *)g[REG_RSI];
    /* wait as the write would have: the app's signals as the interrupted code had them, ours
     * (and SIGTRAP, the perf events' other route) blocked */
    sigset_t during, before, pending;
    memcpy(&during, &uc->uc_sigmask, sizeof during);
    sigaddset(&during, SIGTRAP);
    if (our_sig > 0) sigaddset(&during, our_sig);
    /* a signal of the app's that came while this handler ran (every signal blocked here) would be
     * taken as the mask below is set, before the write waits, and would not end it: it ends the
     * app's call as it would have, with the count so far (the window left is this check's) */
    if (sigpending(&pending) == 0)
        for (int s = 1; s < NSIG; s++)
            if (sigismember(&pending, s) == 1 && sigismember(&during, s) == 0) {
                leave(tid, sp, ip, done);
                errno = saved_errno;
                return;
            }
    pthread_sigmask(SIG_SETMASK, &during, &before);
    /* one call, as the app made one: it returns short only for what would have cut the app's
     * own call short (its signal, a send timeout, a non-blocking descriptor) */
    long r = syscall(SYS_write, fd, buf + done, (size_t)(want - done));
    uint64_t added = r > 0 ? (uint64_t)r : 0;
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    if (done + added < want) leave(tid, sp, ip, done + added);
    if (added) {
        g[REG_RAX] = (greg_t)(done + added);
        atomic_fetch_add_explicit(&g_finished, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&g_bytes, added, memory_order_relaxed);
    }
    errno = saved_errno;
}

#else

void mw_finishwrite_stats(uint64_t *finished, uint64_t *bytes, uint64_t *watched) {
    *finished = *bytes = *watched = 0;
}
void mw_finishwrite_init(void) {}
void mw_finishwrite_after_signal(void *uc, int our_sig) {
    (void)uc;
    (void)our_sig;
}

#endif
