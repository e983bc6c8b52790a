"""``middleware-run COMMAND [ARGS...]``: profile a Python program without changing its code.

Like ``ddtrace-run`` and ``opentelemetry-instrument``: the command is executed (``exec``: same
process id, exit code, signals, standard streams) with :mod:`middleware.bootstrap` first on
``PYTHONPATH``, whose ``sitecustomize`` starts :class:`~middleware.MwTracker` when an interpreter
starts. So the program and every Python process it starts are profiled — gunicorn's master and
workers (forked workers restart the sampler at fork, with or without ``--preload``),
``multiprocessing`` spawn and forkserver children, subprocesses — configured only by the ``MW_*``
and ``OTEL_*`` variables (``MW_APM_COLLECT_PROFILING=false``: nothing is started). An app that
creates its own ``MwTracker()`` gets the running one.

Not covered: interpreters started with ``-S`` or ``-I`` (they import no ``sitecustomize``,
``-E``/``-I`` ignore ``PYTHONPATH``), and programs that clear ``PYTHONPATH`` for their children.
An existing ``sitecustomize`` of the environment still runs, after ours.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")
USAGE = "usage: middleware-run COMMAND [ARGS...]  (profiles COMMAND and the Python processes it starts)"


def command_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the bootstrap directory first on ``PYTHONPATH`` (once), and a relative
    ``MW_PROFILE_DIR`` made absolute: the processes the command starts in other directories
    write to the same store."""
    from middleware.config import SETTINGS

    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOTSTRAP_DIR]
    out = {**env, "PYTHONPATH": os.pathsep.join([BOOTSTRAP_DIR, *parts])}
    row = SETTINGS["profile_dir"]
    for var in row.env:
        store = row.parse(env.get(var, ""))  # absolute, or None for none/off/unset
        if store is not None:
            out[var] = store
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        (sys.stderr if not args else sys.stdout).write(USAGE + "\n")
        return 2 if not args else 0
    program = shutil.which(args[0])
    if program is None:
        sys.stderr.write(f"middleware-run: {args[0]}: command not found\n")
        return 127
    try:
        os.execve(program, args, command_environment(dict(os.environ)))
    except OSError as exc:
        sys.stderr.write(f"middleware-run: {args[0]}: {exc.strerror or exc}\n")
        return 126
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
