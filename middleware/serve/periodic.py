"""A background job of `serve` run now and then every ``interval`` seconds on a daemon thread
(the local-store importer, the regression detector).

Subclasses implement :meth:`Periodic.step`; it returns False to end the thread (the store
closed). ``stop()`` sets the stop event (which ``step`` may watch to end early) and joins the
thread; start/stop are called by the server's own thread.
"""
from __future__ import annotations

import threading


class Periodic:
    """Calls :meth:`step` at once and then every ``interval`` seconds until :meth:`stop`."""

    thread_name = "mw-serve-periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> bool:
        """One pass; False ends the thread. Must not raise (report and go on)."""
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set() and self.step():
            self._stop.wait(self.interval)
