/* mw_cpusteal — a perf task-clock count less the time the thread did not have its CPU.
 *
 * A perf task-clock event counts the thread's time on its CPU by the scheduler's clock
 * (local_clock), which runs on while the host has taken the virtual CPU away ("steal": a noisy
 * neighbour, a burstable instance out of credits). The thread's CPU clock
 * (CLOCK_THREAD_CPUTIME_ID, what thread_time, top and the process's CPU report) does not count
 * stolen time on a kernel with CONFIG_PARAVIRT_TIME_ACCOUNTING (Debian's, the clouds' KVM guests).
 * Samples laid in the raw count would then come more often than the thread's CPU warrants, and
 * the profile would hold more CPU than the process used (measured once: 1.30 times the truth of
 * 1,500 light threads on a VM whose host was busy). So each reading of the count is paired with a
 * reading of the thread's own clock, and over each interval between two readings the count may
 * not advance by more than the clock did (plus MW_STEAL_SLACK_NS for the two reads not being at
 * one instant): the excess is steal, set aside for good.
 *
 * The other way round, the clock also counts what the count misses (the CPU of each context
 * switch, ~18 us here: task-clock stops before the switch and starts after it); that is not
 * steal, and the count is left as it is there (never raised).
 *
 * Pure arithmetic on the caller's state: no lock, no system call, async-signal-safe. The state is
 * owned by one thread at a time (the CPU-timer handler of the thread the event counts, or the
 * code that arms the event before enabling it / credits it after the thread has exited).
 */
#ifndef MW_CPUSTEAL_H
#define MW_CPUSTEAL_H

#include <stdint.h>

#define MW_STEAL_SLACK_NS 20000ULL /* what two reads a few us apart can disagree by, and more */

typedef struct {
    uint64_t count; /* the event's count at the last reading */
    uint64_t clock; /* the thread's CPU clock then */
    uint64_t steal; /* count set aside so far (the event's count that was not the thread's CPU) */
    int known;      /* 0: no reading yet (the first one only sets the pair) */
} mw_steal_t;

/* Starts from a reading (count, clock) taken before the event counts anything of interest. */
static inline void mw_steal_start(mw_steal_t *s, uint64_t count, uint64_t clock, int known) {
    s->count = count;
    s->clock = clock;
    s->steal = 0;
    s->known = known;
}

/* Takes a new reading; returns the count less all steal so far (never more than count). Sets
 * *stolen to the steal found over this interval (0 mostly). Readings out of order (a clock
 * going back: not a thread's CPU clock) set nothing aside. */
static inline uint64_t mw_steal_less(mw_steal_t *s, uint64_t count, uint64_t clock,
                                     uint64_t *stolen) {
    *stolen = 0;
    if (s->known && count >= s->count && clock >= s->clock) {
        uint64_t dc = count - s->count, dt = clock - s->clock;
        if (dc > dt + MW_STEAL_SLACK_NS) {
            *stolen = dc - dt;
            s->steal += *stolen;
        }
    }
    s->count = count;
    s->clock = clock;
    s->known = 1;
    return count > s->steal ? count - s->steal : 0;
}

#endif
