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
 * reading of the thread's own clock, and the count may not gain on the clock (by more than
 * MW_STEAL_SLACK_NS, the two reads not being at one instant): what it gains is steal, set aside
 * for good.
 *
 * The other way round, the clock also counts what the count misses (the CPU of each context
 * switch, ~18 us here: task-clock stops before the switch and starts after it); that is not
 * steal, and the count is left as it is there (never raised).
 *
 * The two reads of a reading are not at one instant, and the gap between them varies (an
 * interrupt or a long VM exit between them: 20-560 us measured here at 10 kHz, about one reading
 * in a thousand). A reading with a long gap has the clock ahead by that much for that reading
 * only: measured interval by interval, the clock leads over the interval before and lags by as
 * much over the one after, and the lag alone looked like steal (read jitter set aside 0.5-5% of a
 * 10 kHz count on a quiet VM whose host reported no steal meanwhile). So the count is compared
 * with the clock through their offset (clock less the count net of steal) at each reading: steal
 * is the offset falling below the lowest of the last MW_STEAL_READINGS readings, a spike of one
 * or two readings is no level to fall from, and a lasting rise (a context switch) is one after
 * MW_STEAL_READINGS readings. The level a fall is measured from is never more than
 * MW_STEAL_CREDIT_NS below the last reading's (a stretch the count missed, an event that
 * stopped, is not taken as a spike of any size). A real steal right after a context switch is
 * under-counted by that switch (~18 us).
 */
#ifndef MW_CPUSTEAL_H
#define MW_CPUSTEAL_H

#include <stdint.h>

/* What two reads a few us apart can disagree by, and more. */
#define MW_STEAL_SLACK_NS 20000LL
/* The largest spike of the last reading's offset that a fall is measured past. */
#define MW_STEAL_CREDIT_NS 2000000LL
/* The readings whose lowest offset is the level a fall is measured from. */
#define MW_STEAL_READINGS 3

typedef struct {
    uint64_t count; /* the event's count at the last reading */
    uint64_t clock; /* the thread's CPU clock then */
    uint64_t steal; /* count set aside so far (the event's count that was not the thread's CPU) */
    int64_t off[MW_STEAL_READINGS]; /* clock - (count - steal) at the last readings, newest first */
    int noff;                       /* how many of off[] are known (0: no reading yet) */
} mw_steal_t;

/* Starts from a reading (count, clock) taken before the event counts anything of interest;
 * known 0: no such reading (the first mw_steal_less only sets the pair). */
static inline void mw_steal_start(mw_steal_t *s, uint64_t count, uint64_t clock, int known) {
    s->count = count;
    s->clock = clock;
    s->steal = 0;
    s->off[0] = (int64_t)(clock - count);
    s->noff = known ? 1 : 0;
}

/* Takes a new reading; returns the count less all steal so far (never more than count). Sets
 * *stolen to the steal found at this reading (0 mostly): how far the offset fell below its
 * level, when that is more than MW_STEAL_SLACK_NS. Readings out of order (a clock going back:
 * not a thread's CPU clock) set nothing aside and start the offsets over. */
static inline uint64_t mw_steal_less(mw_steal_t *s, uint64_t count, uint64_t clock,
                                     uint64_t *stolen) {
    *stolen = 0;
    if (s->noff && (count < s->count || clock < s->clock)) s->noff = 0;
    uint64_t net = count > s->steal ? count - s->steal : 0;
    int64_t off = (int64_t)(clock - net);
    if (s->noff) {
        int64_t level = s->off[0];
        for (int i = 1; i < s->noff; i++)
            if (s->off[i] < level) level = s->off[i];
        if (level < s->off[0] - MW_STEAL_CREDIT_NS) level = s->off[0] - MW_STEAL_CREDIT_NS;
        if (off < level - MW_STEAL_SLACK_NS) {
            uint64_t fell = (uint64_t)(level - off);
            if (fell > net) fell = net; /* never below zero */
            *stolen = fell;
            s->steal += fell;
            net -= fell;
            off += (int64_t)fell;
        }
    }
    for (int i = MW_STEAL_READINGS - 1; i > 0; i--)
        s->off[i] = s->off[i - 1];
    s->off[0] = off;
    if (s->noff < MW_STEAL_READINGS) s->noff++;
    s->count = count;
    s->clock = clock;
    return net;
}

#endif
