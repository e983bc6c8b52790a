/* mw_ownthread — see mw_ownthread.h. */
#define _GNU_SOURCE
#include "mw_ownthread.h"

#include <signal.h>
#include <sys/prctl.h>

int mw_ownthread_create(pthread_t *t, const char *name, void *(*fn)(void *), void *arg) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the thread starts with every signal blocked */
    char was[16] = "";
    int renamed = prctl(PR_GET_NAME, was, 0, 0, 0) == 0 && prctl(PR_SET_NAME, name, 0, 0, 0) == 0;
    int rc = pthread_create(t, NULL, fn, arg);
    if (renamed) prctl(PR_SET_NAME, was, 0, 0, 0);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}
