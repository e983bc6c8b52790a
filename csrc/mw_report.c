/* mw_report — see mw_report.h. */
#include "mw_report.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_int g_done[MW_REPORT_KINDS];
static atomic_int g_quiet = -1; /* -1: MW_PROFILING_QUIET not read yet */

static int quiet(void) {
    int q = atomic_load_explicit(&g_quiet, memory_order_relaxed);
    if (q < 0) {
        const char *v = getenv("MW_PROFILING_QUIET");
        q = v && (strcmp(v, "1") == 0 || strcmp(v, "true") == 0 || strcmp(v, "yes") == 0);
        atomic_store_explicit(&g_quiet, q, memory_order_relaxed);
    }
    return q;
}

int mw_report_once(mw_report_kind_t kind, const char *fmt, ...) {
    if ((unsigned)kind >= MW_REPORT_KINDS) return 0;
    if (atomic_exchange_explicit(&g_done[kind], 1, memory_order_relaxed)) return 0;
    if (quiet()) return 0;
    char line[512];
    int n = snprintf(line, sizeof line, "middleware: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0) return 0;
    size_t len = strnlen(line, sizeof line - 2);
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    return w == (ssize_t)len;
}

int mw_report_done(mw_report_kind_t kind) {
    return (unsigned)kind < MW_REPORT_KINDS && atomic_load(&g_done[kind]);
}

void mw_report_reset_after_fork(void) {
    for (int k = 0; k < MW_REPORT_KINDS; k++)
        atomic_store(&g_done[k], 0);
}
