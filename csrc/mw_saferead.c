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

static void refresh_pid(void) {
    atomic_store(&g_pid, getpid());
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

int mw_safe_read(const void *addr, size_t len, void *dst) {
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

/* ---- mw_readcache ---------------------------------------------------------------------------- */
#include <string.h>

static inline unsigned rc_slot(uintptr_t page) {
    return (unsigned)((page / MW_PAGE_SIZE) & (MW_READCACHE_PAGES - 1));
}

void mw_readcache_reset(mw_readcache_t *c) {
    memset(c->page, 0, sizeof c->page);
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
