/* mw_termflush — a process ended by SIGTERM's or SIGHUP's default action still exports its last
 * window.
 *
 * Why: a process whose SIGTERM has its default disposition (a plain script, a worker, a queue
 * consumer: whatever sets no handler) dies at once on `kill`, `docker stop` or a Kubernetes
 * rolling update, without atexit: everything sampled since the last export was lost, silently.
 * So does one whose SIGHUP has its default disposition (Python's) when its terminal or SSH
 * session goes away.
 *
 * What: mw_termflush_arm() installs, for each of SIGTERM and SIGHUP whose disposition is SIG_DFL,
 * a C handler, and starts a thread ("mw-termflush", every signal blocked) waiting for it. On the
 * signal the handler wakes that thread and returns: the app runs on meanwhile (it asked for no
 * handler and sees none: Python's signal.getsignal still says SIG_DFL). The thread exports the
 * current window (mw_export_flush: the store and the upload queue, at most
 * MW_TERMFLUSH_EXPORT_S), waits for the uploader to deliver what it holds (at most
 * MW_TERMFLUSH_UPLOAD_S), puts SIG_DFL back and sends the process the same signal again: it dies
 * of it as it would have, that much later (10-50 ms with the local store). A second signal
 * meanwhile changes nothing. A disposition set afterwards (signal.signal, sigaction; nohup's
 * SIG_IGN before) replaces or keeps out the handler, and the thread waits for ever, unused.
 *
 * Arming again where SIGTERM's disposition went back to SIG_DFL puts the handler back (a pool
 * worker running a task: middleware/children.py); where it is the handler already (or the app's),
 * it costs one sigaction call. SIGHUP is armed once per process (a disposition the app gives it
 * later is the app's).
 *
 * Threads: arm from any thread, GIL held (the tracker's start). The handler is async-signal-safe
 * (getpid, sem_post, sigaction, raise). Fork: the child inherits the handler but not the thread;
 * until it arms again (its tracker's restart), the signal takes the default action at once.
 */
#ifndef MW_TERMFLUSH_H
#define MW_TERMFLUSH_H

#define MW_TERMFLUSH_EXPORT_S 2.0
#define MW_TERMFLUSH_UPLOAD_S 2.0

/* Arms SIGTERM, then SIGHUP (whose outcome is not returned). 1: SIGTERM armed (now or already);
 * 0: SIGTERM has another disposition than SIG_DFL or this handler (the app's, a server's, the
 * pool worker's Python handler: nothing done for it); -1: the thread could not be started (errno
 * set). */
int mw_termflush_arm(void);

#endif
