/* mw_threads — see mw_threads.h. Open addressing keyed by tid with tombstones (-1). */
#include "mw_threads.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    _Atomic long tid; /* 0 empty, -1 tombstone */
    _Atomic uint32_t labelset;
    _Atomic uint32_t labelset_seq; /* bumped on every labelset write: tells A->B->A apart */
    _Atomic uint32_t seq;          /* odd while the name is being written */
    char name[MW_THREAD_NAME_MAX];
} mw_tslot_t;

static mw_tslot_t g_slots[MW_THREADS_MAX];
static pthread_mutex_t g_wlock = PTHREAD_MUTEX_INITIALIZER;
static atomic_uint_fast64_t g_refused;

static uint32_t slot_hash(long tid) {
    return (uint32_t)((unsigned long)tid * 2654435761u);
}

/* Writer lock held. Returns the slot of tid, creating it if asked. */
static mw_tslot_t *find(long tid, int create) {
    mw_tslot_t *free_slot = NULL;
    uint32_t h = slot_hash(tid);
    for (uint32_t k = 0; k < MW_THREADS_MAX; k++) {
        mw_tslot_t *s = &g_slots[(h + k) & (MW_THREADS_MAX - 1)];
        long t = atomic_load(&s->tid);
        if (t == tid) return s;
        if (t == -1 && !free_slot) free_slot = s;
        if (t == 0) {
            if (!free_slot) free_slot = s;
            break;
        }
    }
    if (!create || !free_slot) return NULL;
    atomic_store(&free_slot->labelset, 0);
    atomic_fetch_add(&free_slot->seq, 1);
    free_slot->name[0] = '\0';
    atomic_fetch_add(&free_slot->seq, 1);
    atomic_store(&free_slot->tid, tid);
    return free_slot;
}

int mw_threads_set_name(long tid, const char *name) {
    pthread_mutex_lock(&g_wlock);
    mw_tslot_t *s = find(tid, 1);
    if (s) {
        atomic_fetch_add(&s->seq, 1);
        strncpy(s->name, name, MW_THREAD_NAME_MAX - 1);
        s->name[MW_THREAD_NAME_MAX - 1] = '\0';
        atomic_fetch_add(&s->seq, 1);
    } else {
        atomic_fetch_add(&g_refused, 1);
    }
    pthread_mutex_unlock(&g_wlock);
    return s ? 0 : -1;
}

int mw_threads_set_labelset(long tid, uint32_t labelset) {
    pthread_mutex_lock(&g_wlock);
    mw_tslot_t *s = find(tid, 1);
    if (s) {
        atomic_store(&s->labelset, labelset);
        atomic_fetch_add(&s->labelset_seq, 1);
    } else
        atomic_fetch_add(&g_refused, 1);
    pthread_mutex_unlock(&g_wlock);
    return s ? 0 : -1;
}

/* Forgotten threads whose names the sampler may still need: the CPU samples their handlers
 * left (and the last one credited at their end) are named at the sampler's next drain, after
 * the Thread object is gone. A name is dropped at the second reap after its forget, so one whole
 * drain sees it; a thread that takes the id again meanwhile (its name written since) keeps it.
 * Writer lock held for all of it. */
#define DYING_MAX 1024
static struct {
    long tid;
    uint32_t seq;   /* the slot's name sequence at the forget */
    uint32_t epoch; /* g_epoch at the forget */
} g_dying[DYING_MAX];
static uint32_t g_ndying, g_epoch;

void mw_threads_forget(long tid) {
    pthread_mutex_lock(&g_wlock);
    mw_tslot_t *s = find(tid, 0);
    if (s && g_ndying < DYING_MAX) {
        g_dying[g_ndying].tid = tid;
        g_dying[g_ndying].seq = atomic_load(&s->seq);
        g_dying[g_ndying].epoch = g_epoch;
        g_ndying++;
    } else if (s) { /* more forgotten than the sampler reaps (it is stopped): at once */
        atomic_store(&s->tid, -1);
    }
    pthread_mutex_unlock(&g_wlock);
}

void mw_threads_reap(void) {
    pthread_mutex_lock(&g_wlock);
    uint32_t kept = 0;
    for (uint32_t i = 0; i < g_ndying; i++) {
        if (g_dying[i].epoch == g_epoch) { /* forgotten since the last reap: one drain more */
            g_dying[kept++] = g_dying[i];
            continue;
        }
        mw_tslot_t *s = find(g_dying[i].tid, 0);
        if (s && atomic_load(&s->seq) == g_dying[i].seq) atomic_store(&s->tid, -1);
    }
    g_ndying = kept;
    g_epoch++;
    pthread_mutex_unlock(&g_wlock);
}

/* Readers (no lock, async-signal-safe): the slot of tid, or NULL. */
static mw_tslot_t *slot_of(long tid) {
    uint32_t h = slot_hash(tid);
    for (uint32_t k = 0; k < MW_THREADS_MAX; k++) {
        mw_tslot_t *s = &g_slots[(h + k) & (MW_THREADS_MAX - 1)];
        long t = atomic_load(&s->tid);
        if (t == 0) return NULL;
        if (t == tid) return s;
    }
    return NULL;
}

uint32_t mw_threads_lookup(long tid, char *name, size_t cap, uint32_t *name_seq) {
    name[0] = '\0';
    *name_seq = 0;
    mw_tslot_t *s = slot_of(tid);
    if (!s) return 0;
    for (int tries = 0; tries < 4; tries++) {
        uint32_t a = atomic_load(&s->seq);
        if (a & 1) continue;
        size_t n = cap < MW_THREAD_NAME_MAX ? cap : MW_THREAD_NAME_MAX;
        /* Racy copy validated by the sequence counter (a seqlock). */
        for (size_t i = 0; i < n; i++)
            name[i] = ((volatile char *)s->name)[i];
        name[n - 1] = '\0';
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load(&s->seq) == a) {
            *name_seq = a + 1;
            return atomic_load(&s->labelset);
        }
    }
    name[0] = '\0';
    return atomic_load(&s->labelset);
}

uint32_t mw_threads_name_seq(long tid) {
    mw_tslot_t *s = slot_of(tid);
    uint32_t a = s ? atomic_load(&s->seq) : 1;
    return a & 1 ? 0 : a + 1;
}

uint32_t mw_threads_labelset_seq(long tid) {
    mw_tslot_t *s = slot_of(tid);
    return s ? atomic_load(&s->labelset_seq) : 0;
}

uint32_t mw_threads_labelset_now(long tid) {
    mw_tslot_t *s = slot_of(tid);
    return s ? atomic_load(&s->labelset) : 0;
}

void mw_threads_reset_after_fork(void) {
    pthread_mutex_init(&g_wlock, NULL);
    g_ndying = 0;
    /* Only the slots in use are written: a write to each would copy every page of the table
     * (copy-on-write), ~0.5 ms of every fork. */
    for (int i = 0; i < MW_THREADS_MAX; i++)
        if (atomic_load_explicit(&g_slots[i].tid, memory_order_relaxed))
            atomic_store(&g_slots[i].tid, 0);
}

uint64_t mw_threads_refused(void) {
    return atomic_load(&g_refused);
}

long mw_threads_proc_read(long tid, const char *file, char *buf, size_t cap) {
    char path[96];
    if (cap < 2) return -1;
    snprintf(path, sizeof path, "/proc/self/task/%ld/%s", tid, file);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = '\0';
    return (long)n;
}

int mw_threads_sigmasks(long tid, uint64_t *pending, uint64_t *shared_pending, uint64_t *blocked) {
    char buf[2048];
    if (mw_threads_proc_read(tid, "status", buf, sizeof buf) < 0) return -1;
    static const char *const keys[] = {"\nSigPnd:", "\nShdPnd:", "\nSigBlk:"};
    uint64_t *out[] = {pending, shared_pending, blocked};
    for (int k = 0; k < 3; k++) {
        const char *p = strstr(buf, keys[k]);
        if (!p) return -1;
        *out[k] = strtoull(p + strlen(keys[k]), NULL, 16);
    }
    return 0;
}

int mw_threads_signal_pending(int sig) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return 0;
    struct dirent *e;
    int any = 0;
    while (!any && (e = readdir(d)) != NULL) {
        long tid = strtol(e->d_name, NULL, 10);
        uint64_t pnd, shd, blk;
        if (tid > 0 && mw_threads_sigmasks(tid, &pnd, &shd, &blk) == 0)
            any = (int)(((pnd | shd) >> (sig - 1)) & 1);
    }
    closedir(d);
    return any;
}
