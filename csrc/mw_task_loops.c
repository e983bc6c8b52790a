/* mw_task_loops — the table of event loops and their threads; see mw_tasks.h (loops) and
 * mw_task_loops.h for the contract. */
#include "mw_task_loops.h"

#include <pthread.h>
#include <string.h>

static pthread_mutex_t g_loops_lock = PTHREAD_MUTEX_INITIALIZER;
static mw_taskloop_t g_loops[MW_TASK_LOOPS];
static int g_nloops;
static uint64_t g_loops_version = 1; /* changes with every change of the table */
static uint64_t g_refused, g_found;  /* loops not followed (table full); found from samples */

int mw_tasks_loop_set(long tid, uintptr_t loop, const mw_rawframe_t *base, int nbase) {
    int rc = 0;
    pthread_mutex_lock(&g_loops_lock);
    int i = 0;
    while (i < g_nloops && g_loops[i].tid != tid)
        i++;
    if (!loop) {
        if (i < g_nloops) g_loops[i] = g_loops[--g_nloops];
    } else if (i == g_nloops && g_nloops == MW_TASK_LOOPS) {
        g_refused++;
        rc = -1;
    } else {
        if (i == g_nloops) g_nloops++;
        if (nbase > MW_TASK_BASE_MAX) nbase = MW_TASK_BASE_MAX;
        if (nbase < 0) nbase = 0;
        g_loops[i].tid = tid;
        g_loops[i].loop = loop;
        g_loops[i].nbase = nbase;
        if (nbase) memcpy(g_loops[i].base, base, (size_t)nbase * sizeof *base);
    }
    g_loops_version++;
    pthread_mutex_unlock(&g_loops_lock);
    return rc;
}

int mw_tasks_loops(mw_taskloop_t *out, int max, uint64_t *version) {
    pthread_mutex_lock(&g_loops_lock);
    int n = g_nloops < max ? g_nloops : max;
    if (*version != g_loops_version) {
        for (int i = 0; i < n; i++) {
            out[i].tid = g_loops[i].tid;
            out[i].loop = g_loops[i].loop;
            out[i].nbase = g_loops[i].nbase;
            memcpy(out[i].base, g_loops[i].base, (size_t)g_loops[i].nbase * sizeof *out[i].base);
        }
        *version = g_loops_version;
    }
    pthread_mutex_unlock(&g_loops_lock);
    return n;
}

void mw_tasks_after_fork_child(void) {
    pthread_mutex_init(&g_loops_lock, NULL);
    g_nloops = 0;
    g_loops_version++;
}

void mw_task_loops_count_found(void) {
    pthread_mutex_lock(&g_loops_lock);
    g_found++;
    pthread_mutex_unlock(&g_loops_lock);
}

void mw_task_loops_counts(uint64_t *refused, uint64_t *found) {
    pthread_mutex_lock(&g_loops_lock);
    *refused = g_refused;
    *found = g_found;
    pthread_mutex_unlock(&g_loops_lock);
}
