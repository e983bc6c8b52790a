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

typedef struct mw_readcache {
    uintptr_t page[MW_READCACHE_PAGES]; /* page address + 1 (0 = empty) */
    uint64_t hits, misses;
    uint8_t data[MW_READCACHE_PAGES][MW_PAGE_SIZE];
} mw_readcache_t;

void mw_readcache_reset(mw_readcache_t *c);
/* Like mw_safe_read, through the cache. When the page is missing, up to `below` pages under it
 * are fetched in the same system call (frames of older calls live at lower addresses). */
int mw_readcache_read(mw_readcache_t *c, const void *addr, size_t len, void *dst, unsigned below);

#endif
