"""Endpoint labels from the framework glue: Flask (signals, lazy import hook) and plain WSGI.

In-process tests share the process's tracker (the ``mw_tracker`` fixture of our pytest plugin)
and look at the samples of functions that only they run. Import order and "does not import
Flask" are checked in fresh interpreters.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from middleware.integrations import _post_import

ROOT = Path(__file__).resolve().parents[2]


def spin(seconds: float) -> int:
    """Burn ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


def endpoints_of(tracker: Any, function: str) -> dict[str | None, int]:
    """CPU samples of stacks that contain ``function``, per ``endpoint`` label value."""
    profile = tracker.snapshot()
    i = profile.value_index("samples")
    out: dict[str | None, int] = {}
    for s in profile.samples:
        if s.values[i] and any(f.function == function for f in s.stack):
            key = s.label("endpoint")
            out[key] = out.get(key, 0) + s.values[i]
    return out


# ------------------------------------------------------------------------------------------------
# Flask, in process
# ------------------------------------------------------------------------------------------------
def work_in_item_view() -> int:
    return spin(0.3)


def work_in_other_view() -> int:
    return spin(0.3)


def work_in_404_handler() -> int:
    return spin(0.2)


def work_outside_requests() -> int:
    return spin(0.2)


def work_with_user_label() -> int:
    return spin(0.2)


@pytest.fixture
def flask_app(mw_tracker: Any) -> Iterator[Any]:
    flask = pytest.importorskip("flask")
    from middleware.integrations import flask as mw_flask
    from middleware.integrations import install_all, installed

    install_all(mw_tracker)  # what the tracker did at start; idempotent
    assert "flask" in installed() and mw_flask.is_installed()
    app = flask.Flask("labels_test")

    @app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:
        work_in_item_view()
        return "item"

    @app.route("/other/<name>")
    def other(name: str) -> str:
        work_in_other_view()
        return "other"

    @app.route("/user/<name>")
    def user(name: str) -> str:
        from middleware.labels import labels

        with labels(customer=name):
            work_with_user_label()
        return "user"

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        work_in_404_handler()
        return "nope", 404

    yield app


def test_request_samples_carry_the_url_rule(mw_tracker: Any, flask_app: Any) -> None:
    # WHEN a request runs the view
    response = flask_app.test_client().get("/items/42")
    assert response.status_code == 200
    # THEN the view's samples are labelled with the rule, not the concrete path
    assert endpoints_of(mw_tracker, "work_in_item_view").keys() == {"/items/<int:item_id>"}
    assert sum(endpoints_of(mw_tracker, "work_in_item_view").values()) >= 10


def test_label_is_gone_after_the_request(mw_tracker: Any, flask_app: Any) -> None:
    flask_app.test_client().get("/items/1")
    work_outside_requests()
    assert endpoints_of(mw_tracker, "work_outside_requests").keys() == {None}


def test_unmatched_requests_get_a_bounded_label(mw_tracker: Any, flask_app: Any) -> None:
    from middleware.integrations.flask import UNMATCHED

    assert flask_app.test_client().get("/no/such/page").status_code == 404
    assert endpoints_of(mw_tracker, "work_in_404_handler").keys() == {UNMATCHED}


def test_user_labels_add_to_the_endpoint(mw_tracker: Any, flask_app: Any) -> None:
    flask_app.test_client().get("/user/acme")
    profile = mw_tracker.snapshot()
    labelled = {
        (s.label("endpoint"), s.label("customer"))
        for s in profile.samples
        if any(f.function == "work_with_user_label" for f in s.stack)
    }
    assert labelled == {("/user/<name>", "acme")}


def test_concurrent_requests_on_threads_keep_their_own_endpoint(
    mw_tracker: Any, flask_app: Any
) -> None:
    # GIVEN two threads serving different routes at the same time
    def hammer(path: str) -> None:
        client = flask_app.test_client()
        for _ in range(2):
            assert client.get(path).status_code == 200

    threads = [
        threading.Thread(target=hammer, args=("/items/7",)),
        threading.Thread(target=hammer, args=("/other/x",)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # THEN each view's samples carry only its own route
    assert endpoints_of(mw_tracker, "work_in_item_view").keys() == {"/items/<int:item_id>"}
    assert endpoints_of(mw_tracker, "work_in_other_view").keys() == {"/other/<name>"}


# ------------------------------------------------------------------------------------------------
# plain WSGI
# ------------------------------------------------------------------------------------------------
def work_in_wsgi_call() -> int:
    return spin(0.2)


def work_in_wsgi_body() -> int:
    return spin(0.2)


def test_wsgi_middleware_labels_the_call_and_the_body(mw_tracker: Any) -> None:
    from werkzeug.test import Client

    from middleware.integrations.wsgi import MwWsgiMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        work_in_wsgi_call()
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            work_in_wsgi_body()  # runs while the server iterates, after app() returned
            yield b"done"

        return body()

    response = Client(MwWsgiMiddleware(app)).get("/plain/path")
    assert response.get_data() == b"done"
    assert endpoints_of(mw_tracker, "work_in_wsgi_call").keys() == {"/plain/path"}
    assert endpoints_of(mw_tracker, "work_in_wsgi_body").keys() == {"/plain/path"}


# ------------------------------------------------------------------------------------------------
# import order and laziness, in fresh interpreters
# ------------------------------------------------------------------------------------------------
FRESH_APP = """
import json, sys, tempfile, time
{first}
{second}
assert "flask" in sys.modules
app = Flask("fresh")

def view_work():
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass

@app.route("/calc/<int:n>")
def calc(n):
    view_work()
    return "ok"

assert app.test_client().get("/calc/3").status_code == 200
profile = tracker.snapshot()
found = sorted({{s.label("endpoint") or "" for s in profile.samples
                 if any(f.function == "view_work" for f in s.stack)}})
print(json.dumps({{"endpoints": found, "flask_before": FLASK_BEFORE}}))
tracker.stop()
"""
TRACKER = (
    "from middleware import MwTracker\n"
    "FLASK_BEFORE = 'flask' in sys.modules\n"
    "tracker = MwTracker(service_name='fresh', profile_dir=tempfile.mkdtemp())"
)
FLASK = "from flask import Flask"


def _python(code: str, tmp_path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("flask_first", [False, True], ids=["tracker-first", "flask-first"])
def test_flask_is_instrumented_whatever_the_import_order(tmp_path: Path, flask_first: bool) -> None:
    first, second = (FLASK, TRACKER) if flask_first else (TRACKER, FLASK)
    out = _python(FRESH_APP.format(first=first, second=second), tmp_path)
    assert out["flask_before"] is flask_first
    assert out["endpoints"] == ["/calc/<int:n>"]


def test_starting_the_tracker_does_not_import_flask(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, sys, tempfile
        from middleware import MwTracker
        from middleware.integrations import install_all, installed
        from middleware.integrations._post_import import pending
        tracker = MwTracker(service_name="lazy", profile_dir=tempfile.mkdtemp())
        install_all(tracker)
        print(json.dumps({"flask": "flask" in sys.modules, "installed": sorted(installed()),
                          "pending": pending()}))
        tracker.stop()
        """
    )
    out = _python(code, tmp_path)
    # flask is neither imported nor hooked yet, only waited for (among other lazily hooked modules)
    assert out["flask"] is False and out["installed"] == [] and "flask" in out["pending"], out


# ------------------------------------------------------------------------------------------------
# the post-import hook itself
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _forget(name: str) -> None:
    sys.modules.pop(name, None)
    _post_import.cancel(name)


def test_hook_runs_after_the_module_body_once(module_dir: Path) -> None:
    (module_dir / "mw_hooked_a.py").write_text("VALUE = 41 + 1\n")
    seen: list[Any] = []
    try:
        _post_import.when_imported("mw_hooked_a", lambda m: seen.append(m.VALUE))
        assert seen == [] and "mw_hooked_a" in _post_import.pending()
        module = importlib.import_module("mw_hooked_a")
        assert seen == [42]
        # the module keeps its real loader, and the hook is gone
        assert type(module.__loader__).__name__ == "SourceFileLoader"
        assert "exec_module" not in vars(module.__loader__)
        assert "mw_hooked_a" not in _post_import.pending()
        importlib.reload(module)
        assert seen == [42]
    finally:
        _forget("mw_hooked_a")


def test_hook_on_an_imported_module_runs_at_once(module_dir: Path) -> None:
    (module_dir / "mw_hooked_b.py").write_text("X = 1\n")
    try:
        importlib.import_module("mw_hooked_b")
        seen: list[str] = []
        _post_import.when_imported("mw_hooked_b", lambda m: seen.append(m.__name__))
        assert seen == ["mw_hooked_b"]
        assert _post_import._FINDER not in sys.meta_path or _post_import.pending()
    finally:
        _forget("mw_hooked_b")


def test_failing_import_keeps_the_hook_and_failing_hooks_do_not_break_imports(
    module_dir: Path,
) -> None:
    source = module_dir / "mw_hooked_c.py"
    source.write_text("raise RuntimeError('broken module')\n")
    seen: list[str] = []

    def bad_hook(module: Any) -> None:
        raise ValueError("instrumentation bug")

    try:
        _post_import.when_imported("mw_hooked_c", bad_hook)
        _post_import.when_imported("mw_hooked_c", lambda m: seen.append("ok"))
        with pytest.raises(RuntimeError, match="broken module"):
            importlib.import_module("mw_hooked_c")
        assert seen == [] and "mw_hooked_c" in _post_import.pending()
        sys.modules.pop("mw_hooked_c", None)
        source.write_text("Y = 2\n")
        importlib.invalidate_caches()
        assert importlib.import_module("mw_hooked_c").Y == 2  # bad_hook's error was logged only
        assert seen == ["ok"]
    finally:
        _forget("mw_hooked_c")
