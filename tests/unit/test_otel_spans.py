"""The OpenTelemetry hook: which spans label samples, and that every label goes back.

In-process, with the real SDK (``opentelemetry-sdk``): the hook wraps ``opentelemetry.context``'s
attach/detach; the labels pushed are read back with ``middleware.labels.current_labels``.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags  # noqa: E402

from middleware import labels  # noqa: E402
from middleware.integrations import otel  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.asan]  # asan: the C span hooks under the sanitizers


@pytest.fixture(scope="module")
def tracer() -> Iterator[Any]:
    otel.install(otel_context)
    provider = TracerProvider()
    yield provider.get_tracer("hook-test")


def _hex(span: Any) -> str:
    return format(span.get_span_context().span_id, "016x")


def test_a_root_span_labels_its_context_and_children_change_nothing(tracer: Any) -> None:
    assert labels.current_labels() == {}
    with tracer.start_as_current_span("root") as root:
        got = labels.current_labels()
        assert got == {"span_id": _hex(root), "span_name": "root"}
        with tracer.start_as_current_span("child") as child:
            assert labels.current_labels() == got
            assert otel.PROFILE_ID_ATTRIBUTE not in (child.attributes or {})
        with trace.use_span(root):  # the same span made current again: no second push
            assert labels.current_labels() == got
        assert labels.current_labels() == got
    assert labels.current_labels() == {}


def test_a_remote_parent_makes_the_server_span_the_local_root(tracer: Any) -> None:
    remote = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
    try:
        assert labels.current_labels() == {}  # a remote span is not ours to label
        with tracer.start_as_current_span("server") as server:
            assert labels.current_labels()["span_id"] == _hex(server)
            sid = labels.current_span()
            assert sid is not None and sid.trace_id == "0af7651916cd43dd8448eb211c80319c"
    finally:
        otel_context.detach(token)
    assert labels.current_labels() == {}


def test_span_labels_merge_over_the_requests_own_labels_and_go_back(tracer: Any) -> None:
    with labels.labels(endpoint="/x"):
        with tracer.start_as_current_span("GET /x") as root:
            assert labels.current_labels() == {"endpoint": "/x", "span_id": _hex(root), "span_name": "GET /x"}
            with labels.labels(customer="acme"):
                assert labels.current_labels()["span_id"] == _hex(root)
        assert labels.current_labels() == {"endpoint": "/x"}
    assert labels.current_labels() == {}


def test_threads_and_tasks_each_keep_their_own_root(tracer: Any) -> None:
    seen: dict[str, str] = {}

    def worker(name: str) -> None:
        with tracer.start_as_current_span(name) as root:
            for _ in range(200):
                assert labels.current_labels()["span_id"] == _hex(root)
            seen[name] = _hex(root)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen.values())) == 4

    async def task(name: str) -> str:
        with tracer.start_as_current_span(name) as root:
            for _ in range(20):
                await asyncio.sleep(0)
                assert labels.current_labels()["span_id"] == _hex(root)
            return _hex(root)

    async def main() -> list[str]:
        return await asyncio.gather(*(task(f"a{i}") for i in range(8)))

    assert len(set(asyncio.run(main()))) == 8
    assert labels.current_labels() == {}


def test_the_hooks_are_the_extensions_and_the_python_ones_follow_the_same_rules(tracer: Any) -> None:
    assert type(otel_context.attach).__name__ == "SpanHook" and otel_context.attach._mw_wrapped
    assert otel_context.attach.__name__ == "attach"  # the wrapped function's attributes show through
    original = SimpleNamespace(attach=otel_context.attach.__wrapped__, detach=otel_context.detach.__wrapped__)
    root = tracer.start_span("py-root")
    child = tracer.start_span("py-child", context=trace.set_span_in_context(root))
    native = labels._native_mod
    labels._native_mod = None  # no extension module: the Python wrappers (labels stay in context)
    try:
        assert otel.install(original) and type(original.attach).__name__ == "function"
    finally:
        labels._native_mod = native
    token = original.attach(trace.set_span_in_context(root))
    got = labels.current_labels()
    assert got == {"span_id": _hex(root), "span_name": "py-root"}
    inner = original.attach(trace.set_span_in_context(child))
    assert labels.current_labels() == got  # a child changes nothing
    original.detach(inner)
    original.detach(token)
    assert labels.current_labels() == {}
    root.end()
    child.end()


def test_the_root_span_links_its_profile_when_a_sample_carried_it(tracer: Any, tmp_path: Any) -> None:
    from middleware import MwTracker

    def burn(seconds: float) -> None:
        deadline = time.thread_time() + seconds
        while time.thread_time() < deadline:  # CPU samples at 100 Hz
            pass

    tracker = MwTracker(service_name="otel-link-test", profile_dir=str(tmp_path), instrument=False)
    try:
        with tracer.start_as_current_span("first"):  # the process's first labels take the Python path
            pass
        linked0 = tracker.stats()["spansets_linked"]
        with tracer.start_as_current_span("linked") as root:
            burn(0.15)
            assert otel.PROFILE_ID_ATTRIBUTE not in (root.attributes or {})  # set when it stops being current
        assert root.attributes[otel.PROFILE_ID_ATTRIBUTE] == _hex(root)
        assert type(root.attributes[otel.PROFILE_ID_ATTRIBUTE]) is str  # not the SpanId: it would keep its sets
        with tracer.start_as_current_span("outer") as outer:
            with tracer.start_as_current_span("inner") as inner:
                burn(0.1)
        assert outer.attributes[otel.PROFILE_ID_ATTRIBUTE] == _hex(outer)
        assert otel.PROFILE_ID_ATTRIBUTE not in (inner.attributes or {})  # children never
        assert tracker.stats()["spansets_linked"] >= linked0 + 2
        # ended before it stops being current (as ASGI instrumentation does): too late, counted
        missed0 = tracker.stats()["spansets_link_missed"]
        ended = tracer.start_span("ended-first")
        with trace.use_span(ended, end_on_exit=False):
            burn(0.1)
            ended.end()
        assert otel.PROFILE_ID_ATTRIBUTE not in (ended.attributes or {})
        assert tracker.stats()["spansets_link_missed"] == missed0 + 1

        async def request() -> Any:  # in a thread running an event loop: set when it becomes current
            with tracer.start_as_current_span("async-root") as span:
                assert span.attributes[otel.PROFILE_ID_ATTRIBUTE] == _hex(span)
                await asyncio.sleep(0)
            return span

        assert asyncio.run(request()).attributes[otel.PROFILE_ID_ATTRIBUTE]
    finally:
        tracker.stop()


def test_a_spans_label_sets_are_released_when_its_id_goes_even_through_a_garbage_cycle(tmp_path: Any) -> None:
    import gc

    from middleware import MwTracker

    tracker = MwTracker(service_name="otel-release-test", profile_dir=str(tmp_path), instrument=False)
    try:
        before = tracker.stats()
        for i in range(300):
            sid = labels.SpanId(format(i + 1, "016x"), format(i + 1, "032x"))
            assert sid.over(0, "req") != 0 and sid.over(0, "req") == sid.over(0, "other name")  # one set per base
            if i % 2:
                cycle: list[Any] = [sid]
                cycle.append(cycle)  # only the collector frees it
                del cycle
            del sid
        gc.collect()
        after = tracker.stats()
        delta = {k: after[k] - before[k] for k in after if k.startswith("spansets")}
        assert delta["spansets_created"] == 300 and delta["spansets_released"] == 300, (delta, before)
    finally:
        tracker.stop()


def test_the_c_hooks_keep_no_reference_they_took(tracer: Any, tmp_path: Any) -> None:
    import sys

    from middleware import MwTracker

    tracker = MwTracker(service_name="otel-refs-test", profile_dir=str(tmp_path), instrument=False)
    try:
        with tracer.start_as_current_span("first"):  # the process's first labels take the Python path
            pass
        state = labels._applied.__dict__
        span = tracer.start_span("again")
        context = trace.set_span_in_context(span)
        before = sys.getrefcount(state), sys.getrefcount(span), sys.getrefcount(context)
        for _ in range(1000):
            token = otel_context.attach(context)
            assert labels.current_labels()["span_id"] == _hex(span)
            otel_context.detach(token)
        del token
        assert (sys.getrefcount(state), sys.getrefcount(span), sys.getrefcount(context)) == before
        assert labels.current_labels() == {}
        span.end()
    finally:
        tracker.stop()


def test_a_users_own_span_id_label_is_a_span_label_too() -> None:
    with labels.labels(span_id="00f067aa0ba902b7", span_name="manual"):
        sid = labels.current_span()
        assert sid is not None and sid == "00f067aa0ba902b7" and sid.span_int == 0x00F067AA0BA902B7
    with labels.labels(span_id="not-hex"):  # any other value stays an ordinary label
        assert labels.current_span() is None and labels.current_labels() == {"span_id": "not-hex"}
