/* mw_rand — the small random draws of the sampling decisions (lock-wait and memory profiles).
 *
 * xorshift64* over a state the caller owns (0 = not seeded yet: seeded from the state's own
 * address). Not cryptographic; fast and good enough for Bernoulli and exponential draws. No
 * lock: each state has one user at a time (a thread-local one, or one the GIL serializes).
 * Async-signal-safe.
 */
#ifndef MW_RAND_H
#define MW_RAND_H

#include <stdint.h>

static inline uint64_t mw_rand_next(uint64_t *state) {
    uint64_t x = *state ? *state : ((uint64_t)(uintptr_t)state * 0x9E3779B97F4A7C15ull) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* A uniform draw in [0, 1). */
static inline double mw_rand_uniform(uint64_t *state) {
    return (double)(mw_rand_next(state) >> 11) * (1.0 / 9007199254740992.0);
}

#endif
