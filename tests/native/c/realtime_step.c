/* A wall clock that a test can step: preloaded (LD_PRELOAD) into a child, it adds to every
 * CLOCK_REALTIME reading made through clock_gettime (the profiler's and Python's time.time alike)
 * the sum of the steps asked for with realtime_step(ns) (ctypes). Other clocks are untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

static _Atomic int64_t g_offset_ns;

void realtime_step(int64_t ns) {
    atomic_fetch_add(&g_offset_ns, ns);
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        int64_t t = (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec + atomic_load(&g_offset_ns);
        ts->tv_sec = t / 1000000000LL;
        ts->tv_nsec = t % 1000000000LL;
    }
    return rc;
}
