"""middleware: continuous profiling for Python services, with a native sampling core.

    from middleware import MwTracker
    tracker = MwTracker()

The sampler reads CPython's private structures, whose layout changes with every minor version,
so the extension is built only for the versions whose layouts it knows
(:data:`SUPPORTED_PYTHON`). On any other interpreter ``import middleware`` still works: it says
once that profiling is off, and :class:`MwTracker` does nothing, so the app runs unprofiled.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

from middleware.config import ProfilerConfig, visible_warning
from middleware.tracker import MwTracker as _MwTracker

__all__ = ["MwTracker", "SUPPORTED_PYTHON", "python_supported", "__version__"]
__version__ = "0.1.0"

#: The CPython minor versions whose internal layouts the sampler knows (first, last); the same
#: range is refused at build time by setup.py and by ``#error`` in csrc/mw_pyframes.c.
SUPPORTED_PYTHON = ((3, 10), (3, 13))

logger = logging.getLogger(__name__)
# Records of ours go where the app's logging sends them; the few problems a user must see
# without any logging set up are also written to stderr once (config.visible_warning).
logger.addHandler(logging.NullHandler())


def python_supported() -> bool:
    """Whether this interpreter is a CPython whose layouts the sampler knows."""
    return sys.implementation.name == "cpython" and SUPPORTED_PYTHON[0] <= sys.version_info[:2] <= SUPPORTED_PYTHON[1]


_said_unsupported = False


def _say_unsupported() -> None:
    global _said_unsupported
    if _said_unsupported:
        return
    _said_unsupported = True
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_PYTHON
    visible_warning(
        logger,
        "middleware: %s %d.%d is not supported by middleware %s (CPython %d.%d to %d.%d: the sampler reads "
        "each version's internal structures); profiling is off, the app runs unprofiled",
        "CPython" if sys.implementation.name == "cpython" else sys.implementation.name,
        sys.version_info[0], sys.version_info[1], __version__, lo_major, lo_minor, hi_major, hi_minor,
    )


if python_supported():
    MwTracker = _MwTracker
else:
    class MwTracker(_MwTracker):  # type: ignore[no-redef]
        """On an interpreter the sampler does not know: a tracker that does nothing.

        No native code is loaded; ``running`` is False, ``flush()`` returns False, ``stats()`` is
        empty, ``snapshot()`` has no samples and ``labels()`` is a context manager that does
        nothing.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _say_unsupported()
            self.config = ProfilerConfig(enabled=False)
            self._profiler = None

        def labels(self, **kv: object) -> Any:
            return contextlib.nullcontext()

        def stats(self) -> dict[str, int]:
            return {}

        def snapshot(self, reset: bool = False) -> Any:
            from middleware.profile import Profile

            return Profile()

    _say_unsupported()
