/* mw_termguard — see mw_termguard.h. */
#define _GNU_SOURCE
#include "mw_termguard.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define REKICK_NS 50000000L /* 50 ms between re-sends to the main thread */
#define REKICK_MAX 100      /* then the guard gives up (5 s) */

typedef void (*plain_handler_t)(int);

/* Written by arm (main thread, GIL held), read by the handler. */
static _Atomic(plain_handler_t) g_chain; /* the handler the guard runs in front of */
static atomic_int g_main_tid;            /* the thread that armed: the main thread */
static pid_t g_timer_pid;                /* process the timer belongs to (0: none) */
static timer_t g_timer;
static atomic_int g_timer_ok;
static atomic_int g_ticking;   /* the re-send timer runs */
static atomic_int g_ticks;     /* signals the guard handled since it started ticking */
static atomic_ulong g_rekicks; /* re-sends, this process */

static pid_t gettid_now(void) {
    return (pid_t)syscall(SYS_gettid);
}

static void guard_handler(int sig) {
    int saved = errno;
    plain_handler_t chain = atomic_load(&g_chain);
    if (chain) chain(sig);
    pid_t main_tid = (pid_t)atomic_load(&g_main_tid);
    if (main_tid > 0 && gettid_now() != main_tid) {
        /* another thread took it: the main thread's blocking call would not see it */
        syscall(SYS_tgkill, getpid(), main_tid, sig);
        atomic_fetch_add(&g_rekicks, 1);
    } else if (atomic_load(&g_timer_ok) && g_timer_pid == getpid()) {
        if (!atomic_exchange(&g_ticking, 1)) {
            struct itimerspec its;
            memset(&its, 0, sizeof its);
            its.it_value.tv_nsec = REKICK_NS;
            its.it_interval.tv_nsec = REKICK_NS;
            timer_settime(g_timer, 0, &its, NULL);
        } else if (atomic_fetch_add(&g_ticks, 1) + 1 >= REKICK_MAX) {
            struct itimerspec off;
            memset(&off, 0, sizeof off);
            timer_settime(g_timer, 0, &off, NULL);
        } else {
            atomic_fetch_add(&g_rekicks, 1);
        }
    }
    errno = saved;
}

/* The guard's action once made (flags and mask of the handler it chains to), main thread only. */
static struct sigaction g_guard_action;
static int g_guard_made;

int mw_termguard_arm(void) {
    struct sigaction cur;
    plain_handler_t chain = atomic_load(&g_chain);
    if (g_guard_made && g_timer_pid == getpid()) {
        /* the usual case: the same handler as last time was just put back (CPython's C handler,
         * one function for every Python handler): one system call */
        if (sigaction(SIGTERM, &g_guard_action, &cur) != 0) return -1;
        if (cur.sa_handler == chain || cur.sa_handler == guard_handler) return 0;
        if (sigaction(SIGTERM, &cur, NULL) != 0) return -1; /* another handler: put it back */
    }
    if (sigaction(SIGTERM, NULL, &cur) != 0) return -1;
    if (cur.sa_handler == guard_handler) return 0;
    if ((cur.sa_flags & SA_SIGINFO) || cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN) {
        errno = EINVAL;
        return -1;
    }
    pid_t pid = getpid();
    if (g_timer_pid != pid) { /* first arm in this process (or in a forked child) */
        struct sigevent sev;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = SIGTERM;
        sev._sigev_un._tid = gettid_now();
        atomic_store(&g_timer_ok, 0);
        atomic_store(&g_ticking, 0);
        atomic_store(&g_ticks, 0);
        atomic_store(&g_rekicks, 0);
        if (timer_create(CLOCK_MONOTONIC, &sev, &g_timer) != 0) return -1;
        g_timer_pid = pid;
        atomic_store(&g_timer_ok, 1);
    }
    atomic_store(&g_main_tid, (int)gettid_now());
    atomic_store(&g_chain, cur.sa_handler);
    g_guard_action = cur;
    g_guard_action.sa_handler = guard_handler;
    g_guard_made = 1;
    return sigaction(SIGTERM, &g_guard_action, NULL);
}

unsigned long mw_termguard_rekicks(void) {
    return atomic_load(&g_rekicks);
}
