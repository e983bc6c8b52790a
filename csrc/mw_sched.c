/* mw_sched — the sampler thread's own time slice (contract: mw_sched.h). */
#define _GNU_SOURCE
#include "mw_sched.h"

#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct mw_sched_attr { /* the kernel's struct sched_attr, first version (48 bytes): its header
                        * clashes with <sched.h> */
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
};

uint64_t mw_sched_short_slice(uint64_t ns) {
    struct mw_sched_attr a;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) != 0) return 0;
    if (a.sched_policy != SCHED_OTHER && a.sched_policy != SCHED_BATCH) return 0; /* not ours */
    a.size = sizeof a;
    a.sched_flags = 0;
    a.sched_runtime = ns;
    if (syscall(SYS_sched_setattr, 0, &a, 0) != 0) return 0;
    memset(&a, 0, sizeof a);
    return syscall(SYS_sched_getattr, 0, &a, sizeof a, 0) == 0 && a.sched_runtime == ns ? ns : 0;
}
