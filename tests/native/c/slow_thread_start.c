/* A slow thread start that a test can preload (LD_PRELOAD): every thread created with
 * pthread_create after the first burns SLOW_START_MS (default 400) milliseconds of its own CPU
 * before its start routine runs, as a thread's start does, much slower, under a sanitizer. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

typedef struct {
    void *(*fn)(void *);
    void *arg;
} start_t;

static atomic_int g_created;

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *slow_start(void *p) {
    start_t s = *(start_t *)p;
    free(p);
    const char *ms = getenv("SLOW_START_MS");
    double end = thread_cpu_s() + (ms ? atof(ms) : 400.0) / 1000.0;
    while (thread_cpu_s() < end) {
    }
    return s.fn(s.arg);
}

int pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *), void *arg) {
    static int (*real)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
    if (!real) *(void **)&real = dlsym(RTLD_NEXT, "pthread_create");
    start_t *s = atomic_fetch_add(&g_created, 1) > 0 ? malloc(sizeof *s) : NULL;
    if (!s) return real(t, attr, fn, arg);
    s->fn = fn;
    s->arg = arg;
    int rc = real(t, attr, slow_start, s);
    if (rc != 0) free(s);
    return rc;
}
