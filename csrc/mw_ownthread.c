/* mw_ownthread — see mw_ownthread.h. */
#define _GNU_SOURCE
#include "mw_ownthread.h"

#include <signal.h>
#include <sys/prctl.h>

int mw_ownthread_create(pthread_t *t, const char *name, void *(*fn)(void *), void *arg) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_t attr, *ap = NULL;
    int masked = 0; /* the caller's own mask changed (no pthread_attr_setsigmask_np) */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
    if (pthread_attr_init(&attr) == 0) {
        if (pthread_attr_setsigmask_np(&attr, &all) == 0)
            ap = &attr;
        else
            pthread_attr_destroy(&attr);
    }
#endif
    if (!ap) masked = pthread_sigmask(SIG_SETMASK, &all, &old) == 0;
    char was[16] = "";
    int renamed = prctl(PR_GET_NAME, was, 0, 0, 0) == 0 && prctl(PR_SET_NAME, name, 0, 0, 0) == 0;
    int rc = pthread_create(t, ap, fn, arg);
    if (renamed) prctl(PR_SET_NAME, was, 0, 0, 0);
    if (masked) pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (ap) pthread_attr_destroy(ap);
    return rc;
}
