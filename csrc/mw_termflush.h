/* mw_termflush — a process ended by SIGTERM's default action still exports its last window.
 *
 * Why: a process whose SIGTERM has its default disposition (a plain script, a worker, a queue
 * consumer: whatever sets no handler) dies at once on `kill`, `docker stop` or a Kubernetes
 * rolling update, without atexit: everything sampled since the last export was lost, silently.
 *
 * What: mw_termflush_arm() installs, only where SIGTERM's disposition is SIG_DFL, a C handler
 * and starts a thread ("mw-termflush", every signal blocked) waiting for it. On SIGTERM the
 * handler wakes that thread and returns: the app runs on meanwhile (it asked for no handler and
 * sees none: Python's signal.getsignal still says SIG_DFL). The thread exports the current window
 * (mw_export_flush: the store and the upload queue, at most MW_TERMFLUSH_EXPORT_S), waits for the
 * uploader to deliver what it holds (at most MW_TERMFLUSH_UPLOAD_S), puts SIG_DFL back and sends
 * the process SIGTERM again: it dies of it as it would have, that much later (10-50 ms with the
 * local store). A disposition set afterwards (signal.signal, sigaction) replaces the handler, and
 * the thread waits for ever, unused.
 *
 * Arming again where SIGTERM's disposition went back to SIG_DFL puts the handler back (a pool
 * worker running a task: middleware/children.py); where it is the handler already, it costs one
 * sigaction call.
 *
 * Threads: arm from any thread, GIL held (the tracker's start). The handler is async-signal-safe
 * (getpid, sem_post, sigaction, raise). Fork: the child inherits the handler but not the thread;
 * until it arms again (its tracker's restart), a SIGTERM in it takes the default action at once.
 */
#ifndef MW_TERMFLUSH_H
#define MW_TERMFLUSH_H

#define MW_TERMFLUSH_EXPORT_S 2.0
#define MW_TERMFLUSH_UPLOAD_S 2.0

/* 1: armed (now or already); 0: SIGTERM has another disposition than SIG_DFL or this handler
 * (the app's, a server's, the pool worker's Python handler: nothing done); -1: the thread could
 * not be started (errno set). */
int mw_termflush_arm(void);

#endif
