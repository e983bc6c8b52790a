/* mw_termflush — see mw_termflush.h. */
#define _GNU_SOURCE
#include "mw_termflush.h"

#include "mw_export.h"
#include "mw_ownthread.h"
#include "mw_upload.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

static sem_t g_sem;
static atomic_int g_pid;     /* the process whose thread waits (0: none) */
static atomic_int g_sig;     /* the signal held back (0: none yet) */
static atomic_int g_hup_pid; /* the process in which SIGHUP was armed (or found taken) */

static void default_action(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

static void on_term(int sig) {
    int saved = errno, none = 0;
    if (atomic_load(&g_pid) != (int)getpid()) {
        /* a forked child that has not armed again: no thread here to export */
        default_action(sig);
        raise(sig); /* blocked while this handler runs: the default action as it returns */
    } else if (atomic_compare_exchange_strong(&g_sig, &none, sig)) {
        sem_post(&g_sem);
    }
    errno = saved;
}

/* SIG_DFL, or this handler inherited through a fork */
static int ours_or_default(const struct sigaction *sa) {
    return !(sa->sa_flags & SA_SIGINFO) && (sa->sa_handler == SIG_DFL || sa->sa_handler == on_term);
}

static void *flusher(void *arg) {
    (void)arg;
    while (sem_wait(&g_sem) != 0) {
    }
    int sig = atomic_load(&g_sig);
    mw_export_flush(MW_TERMFLUSH_EXPORT_S);
    mw_upload_flush_registered(MW_TERMFLUSH_UPLOAD_S);
    default_action(sig);
    kill(getpid(), sig);
    return NULL;
}

/* The thread that waits for the handler, started once per process. */
static int start_flusher(int pid) {
    if (atomic_load(&g_pid) == pid) return 0;
    if (sem_init(&g_sem, 0, 0) != 0) return -1;
    atomic_store(&g_sig, 0);
    pthread_t t;
    int rc = mw_ownthread_create(&t, "mw-termflush", flusher, NULL); /* the profiler's own */
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    pthread_detach(t);
    atomic_store(&g_pid, pid);
    return 0;
}

/* The handler for sig where its disposition is SIG_DFL: 1 (now or already), 0, -1 (errno). */
static int arm(int sig, int pid) {
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) != 0) return -1;
    if (!ours_or_default(&cur)) return 0;
    if (cur.sa_handler == on_term && atomic_load(&g_pid) == pid) return 1;
    if (start_flusher(pid) != 0) return -1;
    struct sigaction sa, was;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sa.sa_flags = SA_RESTART; /* the app's calls go on as if nothing came */
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, &was) != 0) return -1;
    if (!ours_or_default(&was)) {
        sigaction(sig, &was, NULL); /* set by another thread meanwhile: theirs */
        return 0;
    }
    return 1;
}

int mw_termflush_arm(void) {
    int pid = (int)getpid(), r = arm(SIGTERM, pid);
    if (r >= 0 &&
        atomic_exchange(&g_hup_pid, pid) != pid) /* once per process: tasks re-arm SIGTERM */
        arm(SIGHUP, pid);
    return r;
}
