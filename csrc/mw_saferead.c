/* mw_saferead — see mw_saferead.h for the mechanism and contract. */
#define _GNU_SOURCE
#include "mw_saferead.h"

#include <errno.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

static pid_t g_pid;
static atomic_int g_ok;
static atomic_uint_fast64_t g_failures;

int mw_saferead_init(void) {
    static const uint64_t probe = 0x6d77736166657264ULL;
    uint64_t out = 0;
    g_pid = getpid();
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
    /* getpid() is cheap but after fork the cached pid would be the parent's: re-read it. */
    ssize_t n = process_vm_readv(getpid(), &l, 1, &r, 1, 0);
    if (n == (ssize_t)len) return 0;
fail:
    atomic_fetch_add_explicit(&g_failures, 1, memory_order_relaxed);
    return -1;
}

int mw_safe_readv(const struct iovec *local, const struct iovec *remote, int n) {
    if (n <= 0 || !atomic_load_explicit(&g_ok, memory_order_relaxed)) return 0;
    ssize_t got = process_vm_readv(getpid(), local, (unsigned long)n, remote, (unsigned long)n, 0);
    if (got < 0) {
        atomic_fetch_add_explicit(&g_failures, 1, memory_order_relaxed);
        return 0;
    }
    int done = 0;
    size_t acc = 0;
    while (done < n && acc + remote[done].iov_len <= (size_t)got) acc += remote[done++].iov_len;
    if (done < n) atomic_fetch_add_explicit(&g_failures, 1, memory_order_relaxed);
    return done;
}

uint64_t mw_saferead_failures(void) {
    return atomic_load_explicit(&g_failures, memory_order_relaxed);
}
