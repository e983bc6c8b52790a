/* mw_report — a failure the user must see, shown once per kind on stderr.
 *
 * Counters in stats() say how often something failed; this says THAT it failed, where a user
 * looks by default (stderr), once per kind for the life of the process (a fork child starts
 * afresh), so a backend that refuses every window prints one line, not one per window. Lines
 * start with "middleware: ". MW_PROFILING_QUIET=1 (read once) silences them; the counters stay.
 *
 * Threads: any thread (a relaxed atomic per kind, one write(2) per report); no lock, no malloc.
 * Not async-signal-safe (vsnprintf).
 */
#ifndef MW_REPORT_H
#define MW_REPORT_H

typedef enum {
    MW_REPORT_STORE_WRITE = 0,    /* the local store could not be written (read-only, permission) */
    MW_REPORT_STORE_FULL,         /* ENOSPC / EDQUOT in the local store */
    MW_REPORT_UPLOAD_AUTH,        /* the backend answered 401/403 */
    MW_REPORT_UPLOAD_REJECTED,    /* the backend answered another 4xx: the window is dropped */
    MW_REPORT_UPLOAD_UNREACHABLE, /* refused, timeout, DNS: retried, then dropped */
    MW_REPORT_UPLOAD_DROPPED,     /* windows dropped by the uploader (queue full, retries spent) */
    MW_REPORT_ENCODE,             /* a window could not be encoded (memory, zlib) */
    MW_REPORT_SAMPLER,            /* the sampler could not start or lost its read primitive */
    MW_REPORT_CPU_TIMER,          /* MW_PROFILING_CPU_TIMER unknown, or what it asks is not here */
    MW_REPORT_TABLE_FULL,         /* a window's stack/frame/name tables filled: less detail kept */
    MW_REPORT_LABELS_FULL,        /* the process's label registry is full: new label sets refused */
    MW_REPORT_SPANS_FULL,         /* the span label table is full: requests without span_id */
    MW_REPORT_SAMPLES_LOST,       /* CPU-timer samples lost: the sampler thread fell behind */
    MW_REPORT_EXITS_LOST,         /* ending threads' last clocks lost: the ring was full */
    MW_REPORT_THREADS_CUT,        /* more Python threads than the ticks list: the oldest unread */
    MW_REPORT_SIGNAL_TAKEN,       /* the app installed its own handler for our signal */
    MW_REPORT_CPU_TIMER_LOST,     /* the app closed our perf event descriptors: armed again */
    MW_REPORT_STORE_NO_FD,        /* EMFILE / ENFILE creating a file in the local store */
    MW_REPORT_KINDS
} mw_report_kind_t;

/* Writes "middleware: <message>\n" to stderr the first time `kind` is reported; later calls
 * for the same kind do nothing. Returns 1 when written, 0 otherwise. */
int mw_report_once(mw_report_kind_t kind, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* 1 when `kind` has been reported (written or silenced) in this process. */
int mw_report_done(mw_report_kind_t kind);

/* In a fork child: every kind may be reported again. */
void mw_report_reset_after_fork(void);

#endif
