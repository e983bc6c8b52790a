/* Threads with no Python thread state, for the sampler's truth tests (loaded with ctypes by
 * tests/targets/native_threads_workload.py; no Python headers):
 *   - burners: burn a given CPU time on their own CPU clock, then wait to be released (so they are
 *     still there when the profile is taken), optionally under a kernel thread name;
 *   - a caller: burns, then calls a C function pointer (a ctypes callback: Python runs in that
 *     thread only for the call, under a thread state made and dropped by ctypes), in rounds.
 * Every thread reports its own CPU time (CLOCK_THREAD_CPUTIME_ID), the truth the test checks
 * against. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define MAX_THREADS 16

typedef void (*callback_t)(int);

typedef struct {
    pthread_t th;
    long burn_ms, rounds;
    callback_t cb;
    char name[16];
    int64_t cpu_ns;
} worker_t;

static worker_t g_w[MAX_THREADS];
static int g_n;
static atomic_int g_released;

static int64_t cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void burn(long ms) {
    volatile uint64_t x = 0;
    int64_t end = cpu_now() + (int64_t)ms * 1000000LL;
    while (cpu_now() < end)
        for (int i = 0; i < 2000; i++)
            x += (uint64_t)i;
}

static void *run(void *arg) {
    worker_t *w = arg;
    if (w->name[0]) pthread_setname_np(pthread_self(), w->name);
    if (w->cb) {
        for (long r = 0; r < w->rounds; r++) {
            burn(w->burn_ms);
            w->cb((int)r);
        }
    } else {
        burn(w->burn_ms);
    }
    w->cpu_ns = cpu_now();
    struct timespec ms = {0, 1000000};
    while (!atomic_load(&g_released))
        nanosleep(&ms, NULL);
    return NULL;
}

static int start(long burn_ms, long rounds, callback_t cb, const char *name) {
    if (g_n >= MAX_THREADS) return -1;
    worker_t *w = &g_w[g_n];
    memset(w, 0, sizeof *w);
    w->burn_ms = burn_ms;
    w->rounds = rounds;
    w->cb = cb;
    if (name) strncpy(w->name, name, sizeof w->name - 1);
    atomic_store(&g_released, 0);
    if (pthread_create(&w->th, NULL, run, w) != 0) return -1;
    return g_n++;
}

/* A thread that burns burn_ms of CPU, named `name` (NULL: the name it inherits). */
int mw_native_burner(long burn_ms, const char *name) {
    return start(burn_ms, 0, NULL, name);
}

/* A thread that burns burn_ms, then calls cb(round), `rounds` times. */
int mw_native_caller(long burn_ms, long rounds, callback_t cb) {
    return start(burn_ms, rounds, cb, NULL);
}

/* 1 when thread i has done its work (its CPU time is known). */
int mw_native_done(int i) {
    return i >= 0 && i < g_n && g_w[i].cpu_ns > 0;
}

/* Thread i's CPU time when it had done its work (ns). */
int64_t mw_native_cpu_ns(int i) {
    return i >= 0 && i < g_n ? g_w[i].cpu_ns : -1;
}

/* Lets every thread end, and waits for them. */
void mw_native_release(void) {
    atomic_store(&g_released, 1);
    for (int i = 0; i < g_n; i++)
        pthread_join(g_w[i].th, NULL);
    g_n = 0;
}
