/* The sampler's clocks: now on each, a moment on both, a window's wall-clock start (contract:
 * mw_sampler.h). Pure functions of the clocks; any thread. */
#include "mw_sampler.h"

#include <time.h>

int64_t mw_now_realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t mw_window_start(mw_stamp_t start, mw_stamp_t now) {
    int64_t ran = now.mono_ns - start.mono_ns, gap = (now.real_ns - start.real_ns) - ran;
    if (gap < 0) gap = -gap;
    return gap > MW_CLOCK_STEP_NS + ran / 100 ? now.real_ns - ran : start.real_ns;
}

int64_t mw_now_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

mw_stamp_t mw_stamp_now(void) {
    mw_stamp_t t = {mw_now_realtime_ns(), mw_now_monotonic_ns()};
    return t;
}
