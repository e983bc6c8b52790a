"""Why every CPU sample re-arms its timer: what the re-arm costs, and what skipping it would bias.

    .venv/bin/python bench/cpu_timer_rearm.py [--seconds 1] [--trials 5]

Part 1, cost: a C probe (compiled here with ``cc``) burns ``--seconds`` of CPU under a perf
``task-clock`` event of period 1 ms whose overflow signal runs a handler doing, per mode: nothing,
one ``read`` of the count, a ``read`` and ``PERF_EVENT_IOC_PERIOD`` (a new random period: what the
sampler's handler does), or a ``PERF_EVENT_IOC_REFRESH`` that re-enables a stopped event. Printed:
the handler's time per signal (``CLOCK_MONOTONIC`` around it), medians over ``--trials`` runs.

Part 2, bias: a simulation of a thread whose code alternates between two parts A and B on a fixed
rhythm of CPU time (A and B each ``q`` µs) while samples are taken every period P = 1 ms of the
thread's CPU clock. Each sample's handler time (``h_A`` or ``h_B`` µs, counted by the thread's
clock but not part of its work) shifts the work's phase under the next sample. Samples are laid
in slots of P at a random instant in their slot, drawn afresh every ``K`` samples (K = 1: the
sampler's jittered slots, one re-arm per sample; K = 8 or 32: a re-arm every K samples; K = 0: a
fixed period). Printed: A's share of the samples (truth: 50%).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
#define _GNU_SOURCE
#include <linux/perf_event.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <signal.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
static int fd, mode;
static volatile uint64_t nsig, hns;
static uint64_t P = 1000000, st = 88172645463325252ULL;
static int64_t mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}
static void handler(int s, siginfo_t *si, void *uc) {
    (void)s; (void)si; (void)uc;
    int64_t t0 = mono();
    nsig++;
    uint64_t c;
    if (mode == 1 || mode == 2) { if (read(fd, &c, 8) < 0) abort(); }
    if (mode == 2) {
        st ^= st << 13; st ^= st >> 7; st ^= st << 17;
        uint64_t n = P / 2 + st % P;
        ioctl(fd, PERF_EVENT_IOC_PERIOD, &n);
    }
    if (mode == 3) ioctl(fd, PERF_EVENT_IOC_REFRESH, 1);
    hns += mono() - t0;
}
int main(int argc, char **argv) {
    mode = atoi(argv[1]);
    double seconds = atof(argv[2]);
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.type = PERF_TYPE_SOFTWARE; a.size = sizeof a; a.config = PERF_COUNT_SW_TASK_CLOCK;
    a.sample_period = P; a.disabled = 1;
    fd = syscall(SYS_perf_event_open, &a, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0) { perror("perf_event_open"); return 2; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler; sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN + 1, &sa, 0);
    fcntl(fd, F_SETFL, O_ASYNC); fcntl(fd, F_SETSIG, SIGRTMIN + 1);
    struct f_owner_ex o = {F_OWNER_TID, (pid_t)syscall(SYS_gettid)};
    fcntl(fd, F_SETOWN_EX, &o);
    if (mode == 3) ioctl(fd, PERF_EVENT_IOC_REFRESH, 1); else ioctl(fd, PERF_EVENT_IOC_ENABLE, 0);
    struct timespec c0, c1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    volatile double x = 0;
    for (;;) {
        for (int i = 0; i < 1000000; i++) x += i * 0.5;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
        if ((c1.tv_sec - c0.tv_sec) + (c1.tv_nsec - c0.tv_nsec) / 1e9 >= seconds) break;
    }
    printf("%lu %.3f\n", (unsigned long)nsig, hns / 1e3 / (nsig ? nsig : 1));
    return 0;
}
"""

MODES = ("nothing", "read", "read + IOC_PERIOD", "IOC_REFRESH (re-enable)")


def cost(seconds: float, trials: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "probe.c", Path(d) / "probe"
        src.write_text(PROBE)
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", str(exe), str(src)], check=True)
        print("handler work per signal (perf task-clock, period 1 ms), median of", trials, "runs:")
        for mode, name in enumerate(MODES):
            runs = []
            for _ in range(trials):
                out = subprocess.run([str(exe), str(mode), str(seconds)], capture_output=True, text=True, check=True)
                runs.append(float(out.stdout.split()[1]))
            print(f"  {name:26s} {statistics.median(runs):6.2f} us")


def share_of_a(k: int, q: float, h_a: float, h_b: float, n: int, seed: int, period: float = 1000.0) -> float:
    rnd = random.Random(seed)
    handler_total = 0.0
    in_a = 0
    u = rnd.random() * period
    for i in range(n):
        if k and i % k == 0:
            u = rnd.random() * period
        work = i * period + u - handler_total  # the work's own CPU time at this sample
        a = (work % (2 * q)) < q
        in_a += a
        handler_total += h_a if a else h_b
    return in_a / n


def bias(samples: int) -> None:
    print("A's share of the samples, % (truth 50), P = 1 ms:")
    print("  q (us)  h_A/h_B (us)   K=1 (per sample)   K=8     K=32    K=0 (fixed)")
    for q, h_a, h_b in ((100, 6, 4), (250, 6, 4), (500, 6, 4), (300, 40, 10), (333.5, 6, 4)):
        row = [statistics.mean(share_of_a(k, q, h_a, h_b, samples, s) for s in range(3)) * 100 for k in (1, 8, 32, 0)]
        cells = "  ".join(f"{v:6.2f}" for v in row[1:])
        print(f"  {q:6g}  {h_a:4g}/{h_b:<4g}       {row[0]:6.2f}            {cells}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--samples", type=int, default=100000, help="simulated samples per case and seed")
    args = ap.parse_args()
    try:
        cost(args.seconds, args.trials)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"cost probe unavailable here: {exc}", file=sys.stderr)
    bias(args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
