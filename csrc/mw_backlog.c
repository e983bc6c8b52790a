/* mw_backlog — see mw_backlog.h. */
#include "mw_backlog.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t start_ms;
    uint8_t *data;
    size_t len;
} entry_t;

/* Guarded by g_lock: a ring of g_n entries from g_head, oldest first. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static entry_t g_ring[MW_BACKLOG_MAX_FILES];
static size_t g_head, g_n, g_bytes;
static mw_backlog_stats_t g_stats;

int mw_backlog_waits_for(int err) {
    return err == ENOSPC || err == EDQUOT || err == EMFILE || err == ENFILE;
}

/* Frees the oldest entry (written or dropped: the caller counts which). */
static void pop_oldest_locked(void) {
    entry_t *e = &g_ring[g_head];
    g_bytes -= e->len;
    free(e->data);
    memset(e, 0, sizeof *e);
    g_head = (g_head + 1) % MW_BACKLOG_MAX_FILES;
    g_n--;
}

int mw_backlog_keep(int64_t start_ms, const void *data, size_t len) {
    uint8_t *copy = len <= MW_BACKLOG_MAX_BYTES ? malloc(len ? len : 1) : NULL;
    pthread_mutex_lock(&g_lock);
    g_stats.kept++;
    if (!copy) {
        g_stats.dropped++;
        pthread_mutex_unlock(&g_lock);
        return -1;
    }
    memcpy(copy, data, len);
    while (g_n > 0 && (g_n == MW_BACKLOG_MAX_FILES || g_bytes + len > MW_BACKLOG_MAX_BYTES)) {
        pop_oldest_locked();
        g_stats.dropped++;
    }
    entry_t *e = &g_ring[(g_head + g_n) % MW_BACKLOG_MAX_FILES];
    e->start_ms = start_ms;
    e->data = copy;
    e->len = len;
    g_n++;
    g_bytes += len;
    pthread_mutex_unlock(&g_lock);
    return 0;
}

size_t mw_backlog_write(const char *dir, const char *service, long pid, uint64_t max_bytes,
                        mw_backlog_result_t *out) {
    memset(out, 0, sizeof *out);
    for (;;) {
        pthread_mutex_lock(&g_lock);
        if (g_n == 0) {
            pthread_mutex_unlock(&g_lock);
            return 0;
        }
        entry_t e = g_ring[g_head]; /* stays in the ring while written: only this thread writes */
        pthread_mutex_unlock(&g_lock);

        mw_store_result_t res;
        int failed =
            mw_store_write(dir, service, pid, e.start_ms, e.data, e.len, max_bytes, &res) != 0;
        out->files_evicted += res.files_evicted;
        out->bytes_evicted += res.bytes_evicted;
        pthread_mutex_lock(&g_lock);
        if (failed) {
            size_t left = g_n;
            pthread_mutex_unlock(&g_lock);
            out->failure = res;
            return left;
        }
        out->files_written++;
        out->bytes_written += res.bytes_written;
        out->dir_bytes = res.dir_bytes;
        pop_oldest_locked();
        g_stats.written++;
        pthread_mutex_unlock(&g_lock);
    }
}

void mw_backlog_stats(mw_backlog_stats_t *out) {
    pthread_mutex_lock(&g_lock);
    *out = g_stats;
    out->waiting = g_n;
    out->waiting_bytes = g_bytes;
    pthread_mutex_unlock(&g_lock);
}

void mw_backlog_atfork_prepare(void) {
    pthread_mutex_lock(&g_lock);
}

void mw_backlog_atfork_parent(void) {
    pthread_mutex_unlock(&g_lock);
}

void mw_backlog_atfork_child(void) {
    pthread_mutex_init(&g_lock, NULL);
    for (size_t i = 0; i < g_n; i++)
        free(g_ring[(g_head + i) % MW_BACKLOG_MAX_FILES].data);
    memset(g_ring, 0, sizeof g_ring);
    g_head = g_n = g_bytes = 0;
    memset(&g_stats, 0, sizeof g_stats);
}
