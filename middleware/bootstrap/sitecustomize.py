"""Started by ``middleware-run`` (its directory first on ``PYTHONPATH``): profiles this interpreter.

Imported by :mod:`site` when the interpreter starts. Starts :class:`middleware.MwTracker` with the
settings of the environment (nothing when ``MW_APM_COLLECT_PROFILING=false``), then runs the
environment's own ``sitecustomize``, if there is one further on the path. Never raises: a
profiler that cannot start leaves the program running unprofiled (with one line on stderr).
"""
import importlib.machinery
import importlib.util
import os
import sys


def _start() -> None:
    try:
        from middleware import MwTracker

        MwTracker()
    except Exception as exc:  # the program must run, profiled or not
        try:
            from middleware.config import quiet

            silent = quiet()
        except Exception:
            silent = False
        if not silent:
            sys.stderr.write(f"middleware: middleware-run could not start the profiler ({type(exc).__name__}: "
                             f"{exc}); the program runs unprofiled\n")


def _chain() -> None:
    """Runs the next ``sitecustomize`` on the path (the one ours shadows), as ``sitecustomize``."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_start()
_chain()
