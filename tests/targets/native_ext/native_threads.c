/* Threads with no Python thread state, for the sampler's truth tests (loaded with ctypes by
 * tests/targets/native_threads_workload.py; no Python headers):
 *   - burners: burn a given CPU time on their own CPU clock, then wait to be released (so they are
 *     still there when the profile is taken), optionally under a kernel thread name;
 *   - a caller: burns, then calls a C function pointer (a ctypes callback: Python runs in that
 *     thread only for the call, under a thread state made and dropped by ctypes), in rounds;
 *   - a crowd: thousands of unnamed threads, each burning a little CPU in rounds with sleeps
 *     between (a thread-per-connection C server, a runaway pool);
 *   - a churn: a thread making short-lived threads one after the other, each burning a few ms and
 *     ending (a thread per task), all ended long before any listing of threads can read them.
 * Every thread reports its own CPU time (CLOCK_THREAD_CPUTIME_ID), the truth the test checks
 * against. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
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

static void burn_ns(int64_t ns) {
    volatile uint64_t x = 0;
    int64_t end = cpu_now() + ns;
    while (cpu_now() < end)
        for (int i = 0; i < 2000; i++)
            x += (uint64_t)i;
}

static void burn(long ms) {
    burn_ns((int64_t)ms * 1000000LL);
}

static pthread_mutex_t g_release_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_release_cond = PTHREAD_COND_INITIALIZER;

/* Off CPU until mw_native_release (no polling: thousands of threads wait here). */
static void wait_released(void) {
    pthread_mutex_lock(&g_release_lock);
    while (!atomic_load(&g_released))
        pthread_cond_wait(&g_release_cond, &g_release_lock);
    pthread_mutex_unlock(&g_release_lock);
}

static void release_all(void) {
    pthread_mutex_lock(&g_release_lock);
    atomic_store(&g_released, 1);
    pthread_cond_broadcast(&g_release_cond);
    pthread_mutex_unlock(&g_release_lock);
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
    wait_released();
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

/* ---- the crowd ---- */
typedef struct {
    pthread_t th;
    int64_t cpu_ns;
} member_t;

static member_t *g_crowd;
static int g_crowd_n;
static long g_crowd_us, g_crowd_rounds;
static atomic_int g_crowd_done;
static atomic_llong g_crowd_cpu;

static void *crowd_run(void *arg) {
    member_t *m = arg;
    for (long r = 0; r < g_crowd_rounds; r++) {
        burn_ns((int64_t)g_crowd_us * 1000);
        struct timespec off = {0, 30 * 1000000}; /* off CPU: a scan or two between bursts */
        nanosleep(&off, NULL);
    }
    m->cpu_ns = cpu_now();
    atomic_fetch_add(&g_crowd_cpu, m->cpu_ns);
    atomic_fetch_add(&g_crowd_done, 1);
    wait_released();
    return NULL;
}

/* Starts n threads (64 KiB stacks) that each burn burn_us of CPU `rounds` times, sleeping 30 ms
 * after each burst; returns how many started. */
int mw_native_crowd(int n, long burn_us, long rounds) {
    g_crowd = calloc((size_t)n, sizeof *g_crowd);
    if (!g_crowd) return 0;
    g_crowd_us = burn_us;
    g_crowd_rounds = rounds;
    atomic_store(&g_released, 0);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (g_crowd_n = 0; g_crowd_n < n; g_crowd_n++)
        if (pthread_create(&g_crowd[g_crowd_n].th, &attr, crowd_run, &g_crowd[g_crowd_n]) != 0) break;
    pthread_attr_destroy(&attr);
    return g_crowd_n;
}

/* How many of the crowd have done their work. */
int mw_native_crowd_done(void) {
    return atomic_load(&g_crowd_done);
}

/* The CPU time the crowd's threads used, together (ns), once they are done. */
int64_t mw_native_crowd_cpu_ns(void) {
    return (int64_t)atomic_load(&g_crowd_cpu);
}

/* ---- the churn ---- */
static pthread_t g_churner;
static int g_churn_n, g_churning;
static long g_churn_ms;
static atomic_int g_churn_done;
static atomic_llong g_churn_cpu;

static void *churn_one(void *arg) {
    (void)arg;
    burn(g_churn_ms);
    atomic_fetch_add(&g_churn_cpu, cpu_now());
    return NULL;
}

static void *churn_run(void *arg) {
    (void)arg;
    for (int i = 0; i < g_churn_n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, churn_one, NULL) != 0) break;
        pthread_join(t, NULL);
    }
    atomic_fetch_add(&g_churn_cpu, cpu_now()); /* the churner's own (creating, joining) */
    atomic_store(&g_churn_done, 1);
    return NULL;
}

/* Starts a thread that makes n threads one after the other, each burning ms of CPU and ending;
 * 0 when started. */
int mw_native_churn(int n, long ms) {
    g_churn_n = n;
    g_churn_ms = ms;
    atomic_store(&g_churn_done, 0);
    atomic_store(&g_churn_cpu, 0);
    g_churning = pthread_create(&g_churner, NULL, churn_run, NULL) == 0;
    return g_churning ? 0 : -1;
}

/* 1 when the churn is over (every thread it made has ended). */
int mw_native_churn_done(void) {
    return atomic_load(&g_churn_done);
}

/* The CPU time of the churn's threads (and of the thread making them), together (ns). */
int64_t mw_native_churn_cpu_ns(void) {
    return (int64_t)atomic_load(&g_churn_cpu);
}

/* Lets every thread end, and waits for them. */
void mw_native_release(void) {
    release_all();
    for (int i = 0; i < g_n; i++)
        pthread_join(g_w[i].th, NULL);
    g_n = 0;
    for (int i = 0; i < g_crowd_n; i++)
        pthread_join(g_crowd[i].th, NULL);
    free(g_crowd);
    g_crowd = NULL;
    g_crowd_n = 0;
    if (g_churning) pthread_join(g_churner, NULL);
    g_churning = 0;
}
