/* mw_cputrap — the SIGTRAP route of the perf CPU-timer samples; see mw_cputrap.h. */
#define _GNU_SOURCE
#include "mw_cputrap.h"

#include "mw_cputimer.h"
#include "mw_unwind.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct sigaction g_prev;
static volatile sig_atomic_t g_installed;

static void on_trap(int sig, siginfo_t *si, void *uc) {
    int saved_errno = errno;
    if (si && si->si_code == MW_TRAP_PERF) {
        mw_cputimer_on_signal(si, uc);
        errno = saved_errno;
        return;
    }
    /* Not ours: what was installed before gets it. */
    if (g_prev.sa_flags & SA_SIGINFO) {
        g_prev.sa_sigaction(sig, si, uc);
    } else if (g_prev.sa_handler == SIG_IGN) {
        /* ignored before us: still ignored */
    } else if (g_prev.sa_handler == SIG_DFL) {
        /* its default action, as without us: a trap instruction or a raise() ends the process */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
        raise(sig);
    } else {
        g_prev.sa_handler(sig);
    }
    errno = saved_errno;
}

/* Whether a tracer (a debugger, strace) is attached: /proc/self/status's TracerPid. */
static int traced(void) {
    FILE *f = fopen("/proc/self/status", "re");
    if (!f) return 0;
    char line[256];
    long pid = 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "TracerPid:", 10) == 0) {
            pid = strtol(line + 10, NULL, 10);
            break;
        }
    fclose(f);
    return pid != 0;
}

int mw_cputrap_install(const char **why) {
    if (g_installed) {
        if (mw_cputrap_ours()) return 0;
        *why = "SIGTRAP has another handler now";
        return -1;
    }
    struct sigaction cur;
    if (sigaction(SIGTRAP, NULL, &cur) != 0 || (cur.sa_flags & SA_SIGINFO) ||
        cur.sa_handler != SIG_DFL) {
        *why = "SIGTRAP has a handler";
        return -1;
    }
    if (traced()) {
        *why = "a tracer is attached (each SIGTRAP would stop the process)";
        return -1;
    }
    struct sigaction sa;
    mw_unwind_signal_action(&sa, on_trap); /* as the real-time route's */
    if (sigaction(SIGTRAP, &sa, &g_prev) != 0) {
        *why = "sigaction(SIGTRAP) failed";
        return -1;
    }
    g_installed = 1;
    return 0;
}

int mw_cputrap_ours(void) {
    struct sigaction cur;
    return g_installed && sigaction(SIGTRAP, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
           cur.sa_sigaction == on_trap;
}

uint64_t mw_cputrap_data(const siginfo_t *si) {
    uint64_t v = 0;
    memcpy(&v, (const char *)&si->si_addr + sizeof(void *), sizeof v);
    return v;
}
