"""middleware: continuous profiling for Python services, with a native sampling core.

    from middleware import MwTracker
    tracker = MwTracker()
"""
from __future__ import annotations

import logging

from middleware.tracker import MwTracker

__all__ = ["MwTracker", "__version__"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
