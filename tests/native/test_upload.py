"""The native uploader speaks docs/protocol.md: request shape, auth, key exchange, configuration.

Every test runs the real uploader thread (middleware._native) against a recording backend on
127.0.0.1 (tests/support/fake_backend.py). Fault handling lives in test_upload_faults.py.
"""
from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings

import pytest

from middleware.pprof import parse_pprof
from middleware.upload_config import (
    DEFAULT_AUTH_URL,
    DEFAULT_SERVER_URL_TEMPLATE,
    UploadConfig,
    drain_upload_messages,
    parse_tags,
    resolve_service_name,
    resolve_upload_config,
)
from support.fake_backend import Response
from support.upload_native import (  # noqa: F401 - no_uploader_left is an autouse fixture
    assert_accounting,
    messages,
    native,
    no_uploader_left,
    payload,
    start,
    stats,
    wait_until,
)

pytestmark = pytest.mark.asan


# ---------------------------------------------------------------- the request


def test_upload_request_has_the_protocol_path_query_headers_and_body(backend):
    # GIVEN an uploader with tags, a tenant, a bearer token and a user agent
    start(backend.url + "/", tags="env=prod,region=eu-1", tenant_id="acme", bearer_token="tok123",
          user_agent="middleware-python/9.9", sample_rate=97, spy_name="middleware-python")
    body = payload(1)
    # WHEN one interval's profile is submitted
    assert native.upload_submit(body, 1_700_000_000, 1_700_000_010) is True
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    # THEN exactly one POST {server}/ingest arrives, shaped as docs/protocol.md says
    [req] = backend.ingests()
    assert req.method == "POST" and req.path == "/ingest"  # trailing '/' of the base URL ignored
    assert req.q("name") == "svc{env=prod,region=eu-1}"
    assert "name=svc%7Benv%3Dprod%2Cregion%3Deu-1%7D" in req.raw_query  # URL-encoded on the wire
    assert req.q("from") == "1700000000" and req.q("until") == "1700000010"
    assert req.q("format") == "pprof"
    assert req.q("sampleRate") == "97"
    assert req.q("spyName") == "middleware-python"
    assert req.headers["x-scope-orgid"] == "acme"
    assert req.headers["content-type"] == "binary/octet-stream"
    assert req.headers["authorization"] == "Bearer tok123"
    assert req.headers["user-agent"] == "middleware-python/9.9"
    assert "expect" not in req.headers
    # and the body is the submitted gzipped pprof, byte for byte, and decodes as pprof
    assert req.body == body
    assert req.body[:2] == b"\x1f\x8b"
    prof = parse_pprof(req.body)
    assert [f.function for f in prof.samples[0].stack] == ["main", "handle", "work_1"]
    assert gzip.decompress(req.body)  # plain pprof inside
    s = stats()
    assert (s["submitted"], s["uploaded"], s["failed_attempts"], s["last_status"]) == (1, 1, 0, 200)
    assert_accounting(s)


def test_without_tenant_or_credentials_no_such_headers_are_sent(backend):
    start(backend.url)
    native.upload_submit(payload(2), 10, 20)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    [req] = backend.ingests()
    assert req.q("name") == "svc"  # no tags: no braces
    assert "x-scope-orgid" not in req.headers
    assert "authorization" not in req.headers
    assert backend.auths() == []


def test_basic_auth_is_sent_when_configured(backend):
    start(backend.url, basic_user="alice", basic_password="s3cret:x")
    native.upload_submit(payload(3), 10, 20)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    [req] = backend.ingests()
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret:x").decode()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself (no system bundle trusts it), and its key."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_backends_are_verified_against_the_configured_ca_certificates(self_signed):
    from support.fake_backend import FakeBackend

    cert, key = self_signed
    with FakeBackend(tls=(cert, key)) as tls_backend:
        # the certificate's own file as the CA file (SSL_CERT_FILE): trusted, the profile arrives
        cfg = resolve_upload_config(env={"MW_PROFILING_SERVER_URL": tls_backend.url, "SSL_CERT_FILE": cert})
        assert cfg is not None and cfg.ca_file == cert
        start(tls_backend.url, ca_file=cfg.ca_file)
        native.upload_submit(payload(1), 10, 20)
        assert native.upload_flush(5.0) == 0
        native.upload_stop(1.0)
        assert len(tls_backend.ingests()) == 1 and stats()["uploaded"] == 1
        # the system's bundle (the default): the self-signed server is refused, and it is said why
        default = resolve_upload_config(env={"MW_PROFILING_SERVER_URL": tls_backend.url})
        assert default is not None and default.ca_file is not None and default.ca_file != cert
        start(tls_backend.url, ca_file=default.ca_file)
        native.upload_submit(payload(2), 10, 20)
        assert wait_until(lambda: stats()["failed_attempts"] >= 1, 5.0), stats()
        native.upload_stop(0.5)
        assert len(tls_backend.ingests()) == 1 and stats()["uploaded"] == 0
        assert any("certificate" in m.lower() for _, m in messages()), messages()


def test_the_ca_file_is_the_systems_bundle_unless_a_variable_names_one(tmp_path, caplog):
    from middleware import config

    url = {"MW_PROFILING_SERVER_URL": "https://collector.example"}
    system = resolve_upload_config(env=url)
    assert system is not None and system.ca_file in config.SYSTEM_CA_FILES and os.path.isfile(system.ca_file)
    assert system.ca_path is None
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    both = resolve_upload_config(env={**url, "SSL_CERT_FILE": str(pem), "CURL_CA_BUNDLE": "/elsewhere.pem",
                                      "SSL_CERT_DIR": str(tmp_path)})
    assert both is not None and both.ca_file == str(pem) and both.ca_path == str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="middleware"):
        missing = resolve_upload_config(env={**url, "SSL_CERT_FILE": str(tmp_path / "absent.pem")})
    assert missing is not None and missing.ca_file == system.ca_file
    assert any("SSL_CERT_FILE" in r.getMessage() for r in caplog.records), caplog.text


def test_profiles_arrive_in_order_with_their_own_time_windows(backend):
    start(backend.url)
    bodies = [payload(i) for i in range(6)]
    for i, b in enumerate(bodies):
        assert native.upload_submit(b, 1000 + 10 * i, 1010 + 10 * i)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    got = backend.ingests()
    assert [(r.q("from"), r.q("until")) for r in got] == [(str(1000 + 10 * i), str(1010 + 10 * i)) for i in range(6)]
    assert [r.body for r in got] == bodies
    assert_accounting(stats())


def test_tenant_placeholder_in_server_url_is_substituted(backend):
    start(backend.url + "/t/{tenant}/profiling/", tenant_id="acme")
    native.upload_submit(payload(4), 1, 2)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    [req] = backend.ingests()
    assert req.path == "/t/acme/profiling/ingest"


def test_push_api_sends_a_push_request_our_server_decodes(backend):
    from middleware.serve.ingest import IngestLimits, decode_push

    # GIVEN the optional push API
    start(backend.url, use_push_api=True, tags="env=prod,service_name=dup", tenant_id="acme", bearer_token="t")
    bodies = [payload(5), payload(6)]
    for i, b in enumerate(bodies):
        native.upload_submit(b, 10 + i, 20 + i)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    # THEN each profile is one POST {server}/push.v1.PusherService/Push (application/proto)
    reqs = backend.ingests()
    assert [r.path for r in reqs] == ["/push.v1.PusherService/Push"] * 2
    ids = set()
    for req, body in zip(reqs, bodies, strict=True):
        assert req.raw_query == ""
        assert req.headers["content-type"] == "application/proto"
        assert req.headers["x-scope-orgid"] == "acme" and req.headers["authorization"] == "Bearer t"
        # which the local `serve` (an independent PushRequest decoder) accepts
        [up] = decode_push(req.headers, req.body, IngestLimits())
        assert up.params.service == "svc"
        assert up.params.tags == (("env", "prod"),)  # service_name is not repeated as a tag
        assert up.pprof_plain == gzip.decompress(body) and up.tenant == "acme"
        [uid] = re.findall(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", req.body)
        ids.add(uid)
    assert len(ids) == 2  # every RawSample has its own ID
    assert stats()["uploaded"] == 2


E2E_SCRIPT = """
import time, json
from middleware.tracker import MwTracker
from middleware import _native

def upload_e2e_busy_loop(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += sum(i * i for i in range(200))
    return x

t = MwTracker(service_name="e2e svc", sample_rate=200, upload_interval=0.3, profile_dir="off")
upload_e2e_busy_loop(1.2)
t.stop()
print(json.dumps(_native.upload_stats()))
"""


def test_tracker_exporter_and_uploader_end_to_end(backend, tmp_path):
    # GIVEN an app profiled by MwTracker, configured through the environment only
    env = dict(os.environ, MW_PROFILING_SERVER_URL=backend.url, MW_API_KEY="e2e-key", MW_AUTH_URL=backend.auth_url,
               MW_CUSTOM_RESOURCE_ATTRIBUTES="env=e2e", MW_PROFILING_UPLOAD_INTERVAL="0.3")
    for var in ("OTEL_SERVICE_NAME", "MW_SERVICE_NAME", "MW_PROFILING_TENANT_ID", "MW_PROFILING_PUSH_API"):
        env.pop(var, None)
    # WHEN it runs a CPU-bound function for a while and exits
    proc = subprocess.run([sys.executable, "-c", E2E_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout.strip().splitlines()[-1])
    # THEN the exporter's intervals reached the backend through the native uploader
    reqs = backend.ingests()
    assert len(reqs) >= 2 and st["uploaded"] == len(reqs) and st["auth_ok"] == 1
    assert len(backend.auths()) == 1
    frames = set()
    for r in reqs:
        assert r.path == "/ingest" and r.q("name") == "e2e-svc{env=e2e}" and r.q("sampleRate") == "200"
        assert r.headers["x-scope-orgid"] == "tenant42" and "e2e-key" not in repr(r.headers)
        assert int(r.q("from")) <= int(r.q("until"))
        prof = parse_pprof(r.body)
        frames |= {f.function for smp in prof.samples for f in smp.stack}
    assert any("upload_e2e_busy_loop" in f for f in frames)
    windows = sorted((int(r.q("from")), int(r.q("until"))) for r in reqs)
    assert windows[0][0] >= int(time.time()) - 120


def test_push_api_names_each_series_after_its_profile(backend):
    from middleware._proto import push_pb2

    # GIVEN the push API and one CPU and one lock-wait (block) profile submitted
    start(backend.url, use_push_api=True, tenant_id="acme")
    native.upload_submit(payload(1), 10, 20)
    native.upload_submit(payload(2), 10, 20, "block")
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    # THEN their series carry __name__ process_cpu and block, Pyroscope's names of the two families
    names = []
    for req in backend.ingests():
        msg = push_pb2.PushRequest.FromString(req.body)
        names += [lp.value for series in msg.series for lp in series.labels if lp.name == "__name__"]
    assert names == ["process_cpu", "block"]


# ---------------------------------------------------------------- key -> tenant exchange


def test_api_key_is_exchanged_for_a_tenant_exactly_once(backend):
    # GIVEN an API key and MW_AUTH_URL pointing at the backend, no tenant configured
    start(backend.url, api_key="mw-key-SECRET", auth_url=backend.auth_url)
    # WHEN many intervals are uploaded
    for i in range(12):
        native.upload_submit(payload(i), 100 + i, 110 + i)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    # THEN the exchange happened once, as docs/protocol.md describes
    [auth] = backend.auths()
    assert auth.method == "POST"
    assert auth.headers["authorization"] == "Bearer mw-key-SECRET"
    assert auth.headers["content-type"] == "application/x-www-form-urlencoded"
    assert auth.body == b""
    # and every upload carries the tenant, never the key
    ingests = backend.ingests()
    assert len(ingests) == 12
    for r in ingests:
        assert r.headers["x-scope-orgid"] == "tenant42"
        assert "mw-key-SECRET" not in repr(r.headers) + r.raw_query
        assert "authorization" not in r.headers
    assert backend.auths()[0].t < ingests[0].t
    s = stats()
    assert (s["auth_ok"], s["auth_failed"], s["uploaded"]) == (1, 0, 12)
    text = " ".join(m for _, m in messages())
    assert "tenant42" in text and "mw-key-SECRET" not in text


def test_tenant_id_given_means_no_exchange(backend):
    start(backend.url, api_key="k", auth_url=backend.auth_url, tenant_id="given")
    native.upload_submit(payload(0), 1, 2)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    assert backend.auths() == []
    assert backend.ingests()[0].headers["x-scope-orgid"] == "given"


@pytest.mark.parametrize(
    "body, tenant",
    [
        (b'{"success":true,"data":{"project_uid":"abc"}}', "abc"),
        (b' {\n "data" : { "other": [1, {"x": null}, "s\\"}"], "project_uid" : "p-1.x_Y" },\r\n'
         b' "message": "ok", "success" : true } ', "p-1.x_Y"),
        (b'{"success":true,"data":{"project_uid":"\\u0061b\\/c"}}', None),  # '/' is not a tenant char
        (b'{"success":true,"data":{"project_uid":"\\u0061bc"}}', "abc"),
        (b'{"data":{"project_uid":"nested"},"success":true,"extra":{"a":{"b":[[],{}]}}}', "nested"),
    ],
)
def test_auth_response_parsing_accepts_valid_json_shapes(backend, body, tenant):
    backend.auth(200, body)
    start(backend.url, api_key="k", auth_url=backend.auth_url, backoff_initial_s=0.05, backoff_max_s=0.05)
    native.upload_submit(payload(0), 1, 2)
    if tenant is None:
        assert wait_until(lambda: stats()["auth_failed"] >= 2)
        native.upload_stop(0.0)
        assert backend.ingests() == [] and stats()["auth_ok"] == 0
        return
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    assert backend.ingests()[0].headers["x-scope-orgid"] == tenant


@pytest.mark.parametrize(
    "first",
    [
        Response(status=200, body=b'{"success":false,"data":{"project_uid":"abc"}}'),
        Response(status=200, body=b'{"success":true,"data":{}}'),
        Response(status=200, body=b'{"success":true,"data":{"project_uid":42}}'),
        Response(status=200, body=b'{"success":true,"data":{"project_uid":"has space"}}'),
        Response(status=200, body=b'{"success":true,"data":{"project_uid":"' + b"a" * 200 + b'"}}'),
        Response(status=200, body=b'{"success":true,"data":{"project_uid":"abc"}'),  # truncated
        Response(status=200, body=b'{"success":true,"data":{"project_uid":"abc"}} trailing'),
        Response(status=200, body=b"<html>not json</html>"),
        Response(status=200, body=b'{"a":' * 100 + b"1" + b"}" * 100),  # too deep
        Response(status=401, body=b'{"success":false,"message":"invalid key"}'),
        Response(status=500, body=b"oops"),
        Response(kind="garbage"),
    ],
)
def test_failed_exchange_is_retried_then_uploads_proceed(backend, first):
    # GIVEN an auth endpoint that fails once (bad JSON, wrong status, garbage), then works
    backend.auth_script(first)
    start(backend.url, api_key="k", auth_url=backend.auth_url)
    native.upload_submit(payload(0), 1, 2)
    # WHEN the uploader retries with backoff
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    # THEN exactly two exchanges happened, and the profile went out with the tenant
    assert len(backend.auths()) == 2
    [req] = backend.ingests()
    assert req.headers["x-scope-orgid"] == "tenant42"
    s = stats()
    assert (s["auth_failed"], s["auth_ok"], s["uploaded"]) == (1, 1, 1)
    levels_texts = messages()
    warnings_ = [t for lvl, t in levels_texts if lvl == logging.WARNING]
    assert len(warnings_) == 1 and "MW_AUTH_URL" in warnings_[0]


def test_exchange_failing_forever_keeps_profiles_bounded_and_never_uploads(backend):
    backend.auth(403, b"forbidden")
    start(backend.url, api_key="k", auth_url=backend.auth_url, queue_max=3)
    for i in range(10):
        native.upload_submit(payload(i), i, i + 1)
    assert wait_until(lambda: stats()["auth_failed"] >= 3)
    native.upload_stop(0.2)
    s = stats()
    assert backend.ingests() == []
    assert s["queue_high"] <= 3 and s["dropped_queue_full"] == 7 and s["dropped_at_exit"] == 3
    assert_accounting(s)
    msgs = messages()
    assert sum("MW_AUTH_URL" in t for _, t in msgs) == 1  # one message, not one per attempt
    assert any("403" in t and "MW_API_KEY" in t for _, t in msgs)


# ---------------------------------------------------------------- start / stop contract


def test_start_rejects_unusable_configuration(backend):
    with pytest.raises(RuntimeError, match="neither server_url nor api_key"):
        native.upload_start(app_name="svc")
    with pytest.raises(RuntimeError, match="http"):
        native.upload_start(app_name="svc", server_url="ftp://127.0.0.1/")
    with pytest.raises(RuntimeError, match="control"):
        start(backend.url, tenant_id="a\r\nX-Evil: 1")
    with pytest.raises(RuntimeError, match="app_name"):
        start(backend.url, app_name="")
    with pytest.raises(RuntimeError, match="tenant"):
        native.upload_start(app_name="svc", server_url=backend.url + "/{tenant}")
    with pytest.raises(TypeError):
        native.upload_start(app_name="svc", server_url=backend.url, no_such_option=1)
    assert not native.upload_running()
    assert native.upload_submit(b"x", 1, 2) is False  # not running: refused, not queued
    start(backend.url)
    with pytest.raises(RuntimeError, match="already running"):
        start(backend.url)
    native.upload_stop(1.0)
    assert not native.upload_running()
    native.upload_stop(1.0)  # a second stop is a no-op


def test_restart_resets_statistics(backend):
    start(backend.url)
    native.upload_submit(payload(0), 1, 2)
    native.upload_stop(2.0)
    assert stats()["uploaded"] == 1  # still readable after stop
    start(backend.url)
    assert stats()["submitted"] == 0
    native.upload_submit(payload(1), 3, 4)
    native.upload_stop(2.0)
    assert stats()["uploaded"] == 1
    assert len(backend.ingests()) == 2


def test_empty_profile_is_refused(backend):
    start(backend.url)
    assert native.upload_submit(b"", 1, 2) is False
    native.upload_stop(1.0)
    assert stats()["submitted"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_starts_with_a_fresh_uploader(backend):
    # GIVEN a running uploader with a profile stuck in its queue (backend hanging)
    backend.hang()
    start(backend.url, total_timeout_s=5.0)
    native.upload_submit(payload(0), 1, 2)
    assert wait_until(lambda: len(backend.ingests()) == 1)
    # WHEN the process forks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded process" on 3.12+
        pid = os.fork()
    if pid == 0:  # child: no uploader inherited; a new one works (the backend is the parent's)
        code = 1
        try:
            s = native.upload_stats()
            if not native.upload_running() and s["queued"] == 0 and s["submitted"] == 0:
                code = 2
                native.upload_start(server_url=backend.url + "/child", app_name="child", total_timeout_s=5.0)
                native.upload_submit(b"child-body", 5, 6)
                native.upload_stop(0.0)  # the backend hangs: nothing more to check here
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    # THEN the child saw a stopped, empty uploader and could start its own
    assert os.WEXITSTATUS(status) == 0
    # and the parent's uploader is unaffected
    assert native.upload_running() and stats()["queued"] == 1
    backend.healthy()
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    assert stats()["uploaded"] == 1


# ---------------------------------------------------------------- Python-side configuration


def test_config_is_accepted_by_upload_start(backend):
    cfg = resolve_upload_config(server_url=backend.url, app_name="my svc", tags={"env": "prod"}, env={},
                                backoff_initial_s=0.05)
    assert isinstance(cfg, UploadConfig) and cfg.enabled
    native.upload_start(**dataclasses.asdict(cfg))
    native.upload_submit(payload(0), 1, 2)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    [req] = backend.ingests()
    assert req.q("name") == "my-svc{env=prod}"
    assert req.headers["user-agent"].startswith("middleware-python/")


def test_config_arguments_beat_environment_beat_defaults():
    env = {
        "MW_API_KEY": "envkey",
        "MW_SERVICE_NAME": "mw-name",
        "OTEL_SERVICE_NAME": "otel name",
        "MW_PROFILING_SERVER_URL": "http://env.example:4040",
        "MW_AUTH_URL": "http://auth.example/api",
        "MW_CUSTOM_RESOURCE_ATTRIBUTES": "env=staging, team=core",
        "MW_PROFILING_TENANT_ID": "t1",
        "MW_PROFILING_BEARER_TOKEN": "bt",
        "MW_PROFILING_UPLOAD_QUEUE": "32",
        "MW_PROFILING_PUSH_API": "yes",
        "MW_PROFILING_SAMPLE_RATE": "250",
    }
    cfg = resolve_upload_config(env=env)
    assert cfg is not None
    assert cfg.api_key == "envkey" and cfg.app_name == "otel-name"  # OTEL_SERVICE_NAME wins
    assert cfg.server_url == "http://env.example:4040" and cfg.auth_url == "http://auth.example/api"
    assert cfg.tags == "env=staging,team=core" and cfg.tenant_id == "t1" and cfg.bearer_token == "bt"
    assert (cfg.queue_max, cfg.use_push_api, cfg.sample_rate) == (32, True, 250)
    cfg = resolve_upload_config(env=env, app_name="arg", server_url="https://arg.example", queue_max=4,
                                use_push_api=False, tags="a=1", sample_rate=99)
    assert cfg is not None
    assert (cfg.app_name, cfg.server_url, cfg.queue_max, cfg.use_push_api, cfg.tags, cfg.sample_rate) == (
        "arg", "https://arg.example", 4, False, "a=1", 99)
    cfg = resolve_upload_config(env={"MW_SERVICE_NAME": "only mw", "MW_PROFILING_SERVER_URL": "http://h"})
    assert cfg is not None and cfg.app_name == "only-mw" and cfg.auth_url == DEFAULT_AUTH_URL
    assert resolve_service_name(None, {}) == f"python-service-{os.getpid()}"


def test_the_tracker_call_shape_is_supported():
    # middleware/tracker.py passes service_name=, sample_rate= and its tags dict
    cfg = resolve_upload_config(service_name="tracked svc", sample_rate=123, tags={"env": "t"},
                                env={"MW_PROFILING_SERVER_URL": "http://h"})
    assert cfg is not None and (cfg.app_name, cfg.sample_rate, cfg.tags) == ("tracked-svc", 123, "env=t")


def test_no_destination_means_no_upload_config():
    # neither MW_PROFILING_SERVER_URL nor MW_API_KEY: profiles stay local, nothing to start
    assert resolve_upload_config(env={"MW_SERVICE_NAME": "svc"}) is None
    assert resolve_upload_config(env={"MW_PROFILING_TENANT_ID": "t", "MW_PROFILING_BEARER_TOKEN": "x"}) is None


def test_api_key_without_server_url_uses_the_tenant_template():
    cfg = resolve_upload_config(env={"MW_API_KEY": "k"})
    assert cfg is not None and cfg.enabled
    assert cfg.server_url == DEFAULT_SERVER_URL_TEMPLATE == "https://{tenant}.middleware.io/profiling"
    cfg = resolve_upload_config(env={"MW_API_KEY": "k", "MW_PROFILING_TENANT_ID": "acme"})
    assert cfg is not None and cfg.server_url == "https://acme.middleware.io/profiling"


def test_bad_values_warn_and_fall_back_to_defaults(caplog):
    env = {
        "MW_PROFILING_UPLOAD_QUEUE": "lots",
        "MW_PROFILING_PUSH_API": "maybe",
        "MW_PROFILING_SERVER_URL": "ftp://nope",
        "MW_PROFILING_TENANT_ID": "bad tenant!",
        "MW_PROFILING_SAMPLE_RATE": "0",
        "MW_AUTH_URL": "not a url",
    }
    with caplog.at_level(logging.WARNING, logger="middleware.upload_config"):
        cfg = resolve_upload_config(env=env, api_key="good-key", total_timeout_s=float("nan"), backoff_max_s=-1)
    assert cfg is not None
    assert (cfg.queue_max, cfg.use_push_api, cfg.tenant_id, cfg.sample_rate) == (16, False, None, 100)
    assert cfg.server_url == DEFAULT_SERVER_URL_TEMPLATE  # the bad URL is ignored, the key's default used
    assert (cfg.auth_url, cfg.total_timeout_s, cfg.backoff_max_s) == (DEFAULT_AUTH_URL, 30.0, 60.0)
    for var in ("MW_PROFILING_UPLOAD_QUEUE", "MW_PROFILING_PUSH_API", "MW_PROFILING_SERVER_URL",
                "MW_PROFILING_TENANT_ID", "MW_PROFILING_SAMPLE_RATE", "MW_AUTH_URL",
                "total_timeout_s", "backoff_max_s"):
        assert var in caplog.text, var


def test_a_bad_api_key_is_dropped_without_echoing_it(caplog):
    with caplog.at_level(logging.WARNING, logger="middleware.upload_config"):
        assert resolve_upload_config(env={"MW_API_KEY": "line1\nline2"}) is None
    assert "MW_API_KEY" in caplog.text and "line1" not in caplog.text


def test_tags_are_validated_per_protocol(caplog):
    with caplog.at_level(logging.WARNING, logger="middleware.upload_config"):
        got = parse_tags("env=prod, __name__=x, 9lives=1, ok_2=v, env=again, bad-name=1, empty=, b={x}, noeq, _u=1")
    assert got == "env=prod,ok_2=v,_u=1"
    for bad in ("__name__", "9lives", "repeated tag 'env'", "bad-name", "empty", "'b'", "noeq"):
        assert bad in caplog.text, bad
    assert parse_tags({"a": "1", "b": 2}) == "a=1,b=2"
    assert parse_tags("") is None and parse_tags(None) is None


def test_basic_auth_needs_a_user_and_bearer_wins(caplog):
    with caplog.at_level(logging.WARNING, logger="middleware.upload_config"):
        cfg = resolve_upload_config(env={"MW_PROFILING_BASIC_AUTH_PASSWORD": "pw"}, server_url="http://h")
        assert cfg.basic_password is None
        cfg = resolve_upload_config(env={}, server_url="http://h", bearer_token="t", basic_user="u", basic_password="p")
        assert (cfg.bearer_token, cfg.basic_user, cfg.basic_password) == ("t", None, None)
    assert "without a user" in caplog.text and "bearer" in caplog.text


def test_repr_hides_secrets():
    r = repr(resolve_upload_config(env={}, server_url="http://h", api_key="KEY1", bearer_token="TOK1"))
    assert r != "None"
    r += repr(resolve_upload_config(env={}, server_url="http://h", basic_user="u", basic_password="PW1"))
    assert "KEY1" not in r and "TOK1" not in r and "PW1" not in r
    assert "api_key='***'" in r and "basic_password='***'" in r and "basic_user='u'" in r


def test_drain_upload_messages_logs_each_message_once(backend, caplog):
    backend.status(401, body=b"bad token")
    start(backend.url)
    for i in range(3):
        native.upload_submit(payload(i), i, i + 1)
    assert native.upload_flush(5.0) == 0
    native.upload_stop(1.0)
    with caplog.at_level(logging.INFO, logger="middleware.upload_config"):
        assert drain_upload_messages(native) == 1
        assert drain_upload_messages() == 0
    [rec] = caplog.records
    assert rec.levelno == logging.ERROR and "401" in rec.getMessage() and "bad token" in rec.getMessage()

