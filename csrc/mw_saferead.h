/* mw_saferead — read this process's memory without ever faulting.
 *
 * The sampler thread reads frames, code objects and strings that application threads may free
 * at any moment. Every such read goes through mw_safe_read(), which copies with
 * process_vm_readv(2) on our own pid: an unmapped address makes the system call fail with
 * EFAULT instead of raising SIGSEGV. If process_vm_readv is unavailable (seccomp, old kernel;
 * probed once by mw_saferead_init), reads fail and the sampler drops samples: it never falls
 * back to a direct dereference.
 *
 * Thread safety: any thread may call; the functions are async-signal-safe (one system call,
 * no locks, no allocation). A successful read may still return torn data (the object changed
 * while it was copied): callers validate what they read.
 */
#ifndef MW_SAFEREAD_H
#define MW_SAFEREAD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* Probes the primitive. Returns 0 when safe reads work, -1 otherwise. Call once, any thread. */
int mw_saferead_init(void);

/* Copies len bytes at addr into dst. Returns 0 on success, -1 if any byte was unreadable
 * (dst contents are then unspecified). addr == 0 fails. */
int mw_safe_read(const void *addr, size_t len, void *dst);

/* Reads several regions in one system call. Returns the number of leading iovecs that were
 * read completely (0..n); a partially read iovec counts as failed. */
int mw_safe_readv(const struct iovec *local, const struct iovec *remote, int n);

/* Number of failed reads since start (relaxed atomic counter). */
uint64_t mw_saferead_failures(void);

/* ---- mw_readcache: page-granular read cache for one consistent walk ----------------------------
 *
 * A walk over a thread's frames reads many small structs that sit close together (3.11+ frames
 * are contiguous in the thread's data stack; a recursive stack reuses one code object). The
 * cache copies whole 4 KiB pages with mw_safe_read and serves later reads from the copies, so a
 * deep stack costs a few system calls instead of two per frame. Copies are only as fresh as the
 * walk: the owner resets the cache before each thread's walk.
 *
 * Owned and used by one thread (the sampler); no locks; async-signal-safe (no allocation: the
 * caller provides the storage).
 */
#define MW_PAGE_SIZE 4096u
#define MW_READCACHE_PAGES 128u /* direct-mapped slots: 512 KiB of copies */

/* ---- mw_guard: direct reads by a thread of ITS OWN memory, in a signal handler ---------------
 *
 * A thread interrupted by its CPU timer (mw_cputimer) reads its own frames. process_vm_readv
 * costs 1-2 us per page there; a plain load costs nothing but faults on an unmapped page (a
 * frame chunk or code object freed in the instant the thread was interrupted). A guard makes
 * plain loads safe: mw_guard_install() puts a SIGSEGV/SIGBUS handler in front of whatever was
 * installed; a fault inside a guarded copy (same thread, address inside the range being copied)
 * jumps back out of the copy, which fails; any other fault goes to the previous handler exactly
 * as if ours were not there (default action: restored and re-raised by the faulting
 * instruction). Guarded copies are only used while mw_guard_active() says our handler is still
 * the installed one (an application or faulthandler may replace it later: reads then fall back
 * to process_vm_readv).
 *
 * A guard is owned by one thread at a time (mw_cputimer's scratch slots, claimed with CAS);
 * A caller may also guard a whole sequence of copies itself: sigsetjmp(g->jb, 0) in the frame that
 * stays active, then session = armed = 1; copies are then plain loads, and a fault in any of them
 * returns to that sigsetjmp. Guards are registered once (at most MW_GUARDS) so the fault handler
 * can find the faulting thread's. Everything here is async-signal-safe. The copy is not
 * instrumented by sanitizers. */
#include <setjmp.h>
#include <stdatomic.h>
#define MW_GUARDS 16
typedef struct mw_guard {
    sigjmp_buf jb;
    _Atomic long owner;        /* kernel tid of the thread using the guard, 0 when free */
    volatile int armed;        /* inside a guarded copy (or session) */
    volatile int session;      /* the caller did sigsetjmp(jb) around many copies: plain copies */
    volatile uintptr_t lo, hi; /* the range being copied */
    uint64_t faults;           /* copies that faulted (recovered) */
    volatile uint64_t stamp;   /* when it was last armed (mw_guard_arm) */
} mw_guard_t;

/* Arms g (armed = 1) with a stamp from a process-wide clock. A thread may hold two armed guards
 * at once (an allocation's walk interrupted by the CPU-timer handler, whose walk has a guard of
 * its own): a fault goes to the one armed last, the innermost. Async-signal-safe. */
extern _Atomic uint64_t mw_guard_clock;
static inline void mw_guard_arm(mw_guard_t *g) {
    g->stamp = atomic_fetch_add_explicit(&mw_guard_clock, 1, memory_order_relaxed) + 1;
    atomic_signal_fence(memory_order_seq_cst);
    g->armed = 1;
}

/* Installs the fault handlers (once; any thread, GIL held). 0, or -1 (not installed). */
int mw_guard_install(void);
/* mw_guard_install(), unless MW_PROFILING_DIRECT_READS=0 turns direct reads off: 1 when guarded
 * direct reads may be used, 0 otherwise. Same threads and rules as mw_guard_install. */
int mw_guard_allowed(void);
/* 1 when our SIGSEGV handler is still the installed one (one sigaction query). */
int mw_guard_active(void);
/* Registers a guard with the fault handler (before its first use). 0 or -1 (table full). */
int mw_guard_register(mw_guard_t *g);

/* Makes the calling thread's mw_safe_read/mw_safe_readv calls (and its readcaches, from their
 * next reset) guarded direct copies under g instead of process_vm_readv, until
 * mw_saferead_direct_end():
 * for the sampler thread, whose reads of other threads' frames are then plain loads (a system
 * call per read costs more than the whole walk). One thread at a time; the caller must own g
 * (g->owner = its kernel tid, g registered), have SIGSEGV and SIGBUS unblocked, and have just
 * seen mw_guard_active(). Other threads' calls are unaffected. Not async-signal-safe to begin
 * or end; the reads themselves stay async-signal-safe. */
void mw_saferead_direct_begin(mw_guard_t *g);
void mw_saferead_direct_end(void);

typedef struct mw_readcache {
    uintptr_t page[MW_READCACHE_PAGES]; /* page address + 1 (0 = empty) */
    uint64_t hits, misses;
    mw_guard_t *guard; /* non-NULL: copy directly under this guard (the caller's own memory) */
    uint8_t data[MW_READCACHE_PAGES][MW_PAGE_SIZE];
} mw_readcache_t;

/* Empties the cache. With guard non-NULL (and mw_guard_active()), later reads through it are
 * guarded direct copies (nothing cached); with NULL, process_vm_readv through the page cache.
 * Reset puts the cache of the thread in mw_saferead_direct_begin() in direct mode under its
 * guard, and any other cache in the page-cache mode. */
void mw_readcache_reset(mw_readcache_t *c);
void mw_readcache_direct(mw_readcache_t *c, mw_guard_t *guard);

/* Copies exactly [addr, addr+len) in the cache's mode, without caching it (one system call, or
 * a guarded direct copy). 0 or -1. */
int mw_readcache_read_exact(mw_readcache_t *c, const void *addr, size_t len, void *dst);

/* Like mw_safe_readv, through the cache's mode (direct under its guard, or one system call). */
int mw_readcache_readv(mw_readcache_t *c, const struct iovec *local, const struct iovec *remote,
                       int n);
/* Like mw_safe_read, through the cache. When the page is missing, up to `below` pages under it
 * are fetched in the same system call (frames of older calls live at lower addresses). */
int mw_readcache_read(mw_readcache_t *c, const void *addr, size_t len, void *dst, unsigned below);

/* Copies the given pages (addresses anywhere inside them; up to 16) into the cache in ONE system
 * call, skipping pages already cached. Returns the number copied; a page that cannot be read
 * ends the batch (the rest are read on demand later). */
int mw_readcache_prefetch(mw_readcache_t *c, const uintptr_t *pages, unsigned n);

#endif
