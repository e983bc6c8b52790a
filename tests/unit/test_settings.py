"""Every setting resolves in one place: the profiler (its local store), the uploader and ``serve``
see the same value for every variable the package reads, and a bad value is said once.

The variables are found in the package's source (string literals naming ``MW_*``, ``OTEL_*`` or
``PYROSCOPE_*`` variables or the standard CA-certificate ones, ``getenv`` calls in csrc/), not
taken from the settings table, so a variable read anywhere without a row, or a row without a
case here, fails the first test. The
last tests run the real thing: a profiled app whose local store and uploads must carry the same
service name and sample rate, and the ``serve`` command, which imports the local store.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

import pytest

from middleware import config
from middleware.config import ProfilerConfig, UploadConfig, resolve_config, resolve_upload_config
from middleware.pprof import parse_pprof
from support.fake_backend import FakeBackend

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "middleware"
VARIABLE = re.compile(r"(?:(?:MW|OTEL|PYROSCOPE)_[A-Z0-9_]*[A-Z0-9]|SSL_CERT_FILE|SSL_CERT_DIR|CURL_CA_BUNDLE)\Z")

#: Where the uploader goes when the variable under test is not itself the destination.
BACKEND = {"MW_PROFILING_SERVER_URL": "http://127.0.0.1:9"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One variable: a good value and what the profiler (P) and the uploader (U) must see; a bad
    value (None: every non-blank text is accepted); other variables it needs."""

    good: str
    profiler: dict[str, Any]
    uploader: dict[str, Any]
    bad: str | None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


OTLP = {"MW_PROFILING_EXPORTER": "otlp"}  # the OTLP exporter's variables are read with it only

CASES: dict[str, Case] = {
    "MW_APM_COLLECT_PROFILING": Case("false", {"enabled": False}, {}, "maybe"),
    "OTEL_SERVICE_NAME": Case("shop api", {"service_name": "shop-api"}, {"app_name": "shop-api"}, None),
    "MW_SERVICE_NAME": Case("billing  worker", {"service_name": "billing-worker"}, {"app_name": "billing-worker"},
                            None),
    "MW_PROFILING_SAMPLE_RATE": Case("250", {"sample_rate": 250}, {"sample_rate": 250}, "0"),
    "MW_PROFILING_WALL_RATE": Case("50", {"wall_rate": 50}, {}, "fast"),
    "MW_PROFILING_UPLOAD_INTERVAL": Case("2.5", {"upload_interval": 2.5}, {}, "soon"),
    "MW_PROFILE_DIR": Case("/srv/profiles", {"profile_dir": "/srv/profiles", "profile_dir_set": True}, {}, None),
    "MW_PROFILE_DIR_MAX_MB": Case("64", {"store_max_mb": 64}, {}, "0"),
    "MW_PROFILING_MAX_DEPTH": Case("64", {"max_depth": 64}, {}, "1e9"),
    "MW_PROFILING_NATIVE": Case("true", {"native": True}, {}, "sometimes"),
    "MW_PROFILING_NATIVE_INTERNAL": Case("yes", {"native_show_internal": True}, {}, "2"),
    "MW_PROFILING_INSTRUMENT": Case("off", {"instrument": False}, {}, "maybe"),
    "MW_PROFILING_LOCKS": Case("false", {"locks": False}, {}, "sometimes"),
    "MW_PROFILING_LOCK_RATE": Case("250000", {"lock_rate": 250000}, {}, "-1"),
    "MW_PROFILING_MEMORY": Case("true", {"memory": True}, {}, "sometimes"),
    "MW_PROFILING_MEMORY_RATE": Case("65536", {"memory_rate": 65536}, {}, "0"),
    "MW_PROFILING_MEMORY_DUTY": Case("50", {"memory_duty": 50}, {}, "0"),
    "MW_PROFILING_UPLOAD": Case("no", {"upload": False}, {}, "never"),
    "MW_CUSTOM_RESOURCE_ATTRIBUTES": Case("env=prod, team=core", {"tags": {"env": "prod", "team": "core"}},
                                          {"tags": "env=prod,team=core"}, "bad-name=1"),
    "MW_PROFILING_SERVER_URL": Case("http://collector.example:4040", {},
                                    {"server_url": "http://collector.example:4040"}, "ftp://collector"),
    "MW_API_KEY": Case("key-1", {}, {"api_key": "key-1"}, "line1\nline2"),
    "MW_AUTH_URL": Case("http://auth.example/api", {}, {"auth_url": "http://auth.example/api"}, "not a url"),
    "MW_PROFILING_TENANT_ID": Case("acme", {}, {"tenant_id": "acme"}, "bad tenant!"),
    "MW_PROFILING_BEARER_TOKEN": Case("tok", {}, {"bearer_token": "tok"}, "a\x01b"),
    "MW_PROFILING_BASIC_AUTH_USER": Case("ann", {}, {"basic_user": "ann"}, "a\x01b"),
    "MW_PROFILING_BASIC_AUTH_PASSWORD": Case("pw", {}, {"basic_password": "pw"}, "a\x01b",
                                             extra={"MW_PROFILING_BASIC_AUTH_USER": "ann"}),
    "MW_VCS_COMMIT_SHA": Case("0123abcd", {"commit_sha": "0123abcd"}, {}, "a\x01b"),
    "MW_VCS_REPOSITORY_URL": Case("https://git.example/shop.git", {"repository_url": "https://git.example/shop.git"},
                                  {}, "a\x01b"),
    "OTEL_RESOURCE_ATTRIBUTES": Case("service.version=1.2.3", {"resource_attributes": "service.version=1.2.3"}, {},
                                     "a\x01b"),
    "MW_PROFILING_UPLOAD_QUEUE": Case("32", {}, {"queue_max": 32}, "lots"),
    "MW_PROFILING_SPAN_LINKS": Case("false", {"span_links": False}, {}, "maybe"),
    "MW_PROFILING_EXPORTER": Case("otlp", {}, {"exporter": "otlp",
                                               "server_url": "http://localhost:4318/v1development/profiles"}, "kafka"),
    "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT": Case("http://collector:4318/p", {}, {"server_url": "http://collector:4318/p"},
                                                 "ftp://collector", extra=OTLP),
    "OTEL_EXPORTER_OTLP_ENDPOINT": Case("http://collector:4318/", {},
                                        {"server_url": "http://collector:4318/v1development/profiles"},
                                        "ftp://collector", extra=OTLP),
    "OTEL_EXPORTER_OTLP_PROFILES_HEADERS": Case("api-key=a%20b", {}, {"otlp_headers": (("api-key", "a b"),)},
                                                "no-value\x01", extra=OTLP),
    "OTEL_EXPORTER_OTLP_HEADERS": Case("api-key=a%20b", {}, {"otlp_headers": (("api-key", "a b"),)}, "no-value\x01",
                                       extra=OTLP),
    "OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION": Case("gzip", {}, {"otlp_gzip": True}, "zstd", extra=OTLP),
    "OTEL_EXPORTER_OTLP_COMPRESSION": Case("gzip", {}, {"otlp_gzip": True}, "zstd", extra=OTLP),
    "MW_PROFILING_PUSH_API": Case("yes", {}, {"use_push_api": True}, "maybe"),
    "SSL_CERT_FILE": Case(__file__, {}, {"ca_file": __file__}, "/nonexistent/ca.pem"),
    "CURL_CA_BUNDLE": Case(str(ROOT / "tests" / "conftest.py"), {}, {"ca_file": str(ROOT / "tests" / "conftest.py")},
                           "/nonexistent/b.pem"),
    "SSL_CERT_DIR": Case(str(ROOT / "tests"), {}, {"ca_path": str(ROOT / "tests")}, "/nonexistent/certs"),
}
#: Read by the process as a whole (tested below), not a field of either configuration.
PROCESS_WIDE = {"MW_PROFILING_QUIET"}
#: The ``serve`` command's own settings: its options' defaults, read by ``serve`` alone.
SERVE_ONLY = {"MW_SERVE_TOKEN", "MW_SERVE_REQUEST_TIMEOUT", "MW_SERVE_MAX_CONNECTIONS",
              "MW_SERVE_MAX_SERIES_PER_UPLOAD", "MW_SERVE_MAX_SERIES_PER_SERVICE", "MW_SERVE_RETENTION",
              "MW_SERVE_MAX_SIZE"}


def _literals() -> set[tuple[str, str]]:
    """(file, variable) for every string literal of the package that is a variable's name."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_proto" in path.parts:
            continue
        with tokenize.open(path) as f:
            for tok in tokenize.generate_tokens(f.readline):
                if tok.type == tokenize.STRING:
                    text = tok.string.strip("\"'")
                    if VARIABLE.match(text):
                        found.add((str(path.relative_to(ROOT)), text))
    return found


def _native_getenv() -> set[str]:
    return {m for c in (ROOT / "csrc").glob("*.c") for m in re.findall(r'getenv\("([A-Z0-9_]+)"\)', c.read_text())}


def _table_variables() -> set[str]:
    return {v for row in config.SETTINGS.values() for v in row.env}


def test_every_variable_read_has_one_row_and_a_case_here():
    in_python = {var for _, var in _literals()}
    assert in_python, "no variable found: the scan is broken"
    assert in_python - SERVE_ONLY == _table_variables() | set(config.NATIVE_VARIABLES), \
        "a variable without a row, or a row nobody reads"
    assert _table_variables() == set(CASES) | PROCESS_WIDE
    assert _native_getenv() == set(config.NATIVE_VARIABLES), "the native side reads a variable not listed"
    assert set(config.NATIVE_VARIABLES) - _table_variables() == {"MW_PROFILING_CPU_TIMER",
                                                                 "MW_PROFILING_DIRECT_READS",
                                                                 "MW_PROFILING_MEMORY_HOOKS"}


def test_no_other_module_names_a_variable_of_the_table():
    outside = {(path, var) for path, var in _literals()
               if var in _table_variables() and path != "middleware/config.py"}
    assert outside == set()


def test_each_row_is_a_field_of_the_configurations_that_read_it():
    profiler = {f.name for f in dataclasses.fields(ProfilerConfig)}
    uploader = {f.name for f in dataclasses.fields(UploadConfig)}
    # rows the uploader resolves into another field: the OTLP endpoint into the URL posted to
    derived = {"service_name": "app_name", "otlp_profiles_endpoint": "server_url", "otlp_endpoint": "server_url",
               "otlp_compression": "otlp_gzip"}
    for row in config.SETTINGS.values():
        up_field = derived.get(row.name, row.name)
        assert (config.PROFILER in row.used_by) == (row.name in profiler), row.name
        assert (config.UPLOADER in row.used_by) == (up_field in uploader), row.name
        if row.name in profiler:
            assert getattr(ProfilerConfig(), row.name) == row.default_value(), row.name
        if up_field in uploader and row.name not in ("service_name", "tags") and row.name not in derived:
            assert getattr(UploadConfig(), up_field) == row.default_value(), row.name


def _uploader_env(var: str, value: str, case: Case) -> dict[str, str]:
    base = {} if var in ("MW_PROFILING_SERVER_URL", "MW_API_KEY") else dict(BACKEND)
    return {**base, **case.extra, var: value}


def _handed_over(p: ProfilerConfig, env: dict[str, str]) -> UploadConfig | None:
    """What the tracker starts the uploader with: the profiler's resolved values."""
    return resolve_upload_config(service_name=p.service_name, sample_rate=p.sample_rate, tags=p.tags, env=env)


@pytest.mark.parametrize("var", sorted(CASES))
@pytest.mark.asan
def test_a_good_value_reaches_the_profiler_and_the_uploader_alike(var, caplog):
    case = CASES[var]
    env = _uploader_env(var, case.good, case)
    with caplog.at_level(logging.WARNING, logger="middleware"):
        p = resolve_config(env)
        u = resolve_upload_config(env=env)
        handed = _handed_over(p, env)
    assert caplog.records == [], [r.getMessage() for r in caplog.records]
    for attr, want in case.profiler.items():
        assert getattr(p, attr) == want, attr
    assert u is not None and handed == u  # the uploader sees the same from env as from the profiler
    for attr, want in case.uploader.items():
        assert getattr(u, attr) == want, attr
    # the values both read are equal on both sides
    assert p.service_name == u.app_name
    assert p.sample_rate == u.sample_rate
    assert (",".join(f"{k}={v}" for k, v in p.tags.items()) or None) == u.tags
    # and a variable the other side does not read changes nothing there
    defaults_p, defaults_u = resolve_config({**env, var: ""}), resolve_upload_config(env={**env, var: ""})
    if not case.profiler:
        assert p == defaults_p
    if not case.uploader and defaults_u is not None:
        assert u == defaults_u


@pytest.mark.parametrize("var", sorted(v for v, c in CASES.items() if c.bad is not None))
def test_a_bad_value_is_the_default_on_both_sides_and_is_said_once(var, caplog):
    case = CASES[var]
    assert case.bad is not None
    env = _uploader_env(var, case.bad, case)
    unset = {k: v for k, v in env.items() if k != var}
    with caplog.at_level(logging.WARNING, logger="middleware"):
        p = resolve_config(env)
        handed = _handed_over(p, env)
    said = [r.getMessage() for r in caplog.records if var in r.getMessage()]
    # the tracker's path (profiler, then the uploader with the profiler's values): said once
    assert len(said) == 1, said
    shown = "'bad-name'" if var == "MW_CUSTOM_RESOURCE_ATTRIBUTES" else repr(case.bad)
    if case.bad.isprintable():
        assert shown in said[0], said
    assert p == resolve_config(unset)
    assert handed == _handed_over(resolve_config(unset), unset)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="middleware"):
        u = resolve_upload_config(env=env)
    said = [r.getMessage() for r in caplog.records if var in r.getMessage()]
    assert len(said) == (1 if case.uploader else 0), said
    assert u == resolve_upload_config(env=unset)


def test_the_transport_settings_reach_both_exporters():
    # queue, timeouts, backoff and CA files apply whichever exporter sends the profiles
    given = dict(queue_max=3, connect_timeout_s=0.5, total_timeout_s=2.0, backoff_initial_s=0.1, backoff_max_s=0.4,
                 ca_path=str(ROOT / "tests"))
    for env in ({**BACKEND}, {"MW_PROFILING_EXPORTER": "otlp"}):
        u = resolve_upload_config(env=env, **given)
        assert u is not None
        assert {k: getattr(u, k) for k in given} == given, env


def test_secrets_are_never_shown(caplog):
    with caplog.at_level(logging.WARNING, logger="middleware"):
        resolve_upload_config(env={"MW_API_KEY": "SECRET1\x01", "MW_PROFILING_SERVER_URL": "http://h"},
                              bearer_token="SECRET2\x01", basic_user="u", basic_password="SECRET3\x01")
    text = caplog.text
    assert "MW_API_KEY" in text and "bearer_token" in text and "basic_password" in text
    assert "SECRET" not in text


def test_quiet_follows_the_native_rule():
    # csrc/mw_report.c: exactly "1", "true" or "yes"
    assert [config.quiet({"MW_PROFILING_QUIET": v}) for v in ("1", "true", "yes", "TRUE", "0", " 1", "")] == [
        True, True, True, False, False, False, False]
    assert config.quiet({}) is False


def test_the_service_name_rule_is_one_for_arguments_and_variables(caplog):
    with caplog.at_level(logging.WARNING, logger="middleware"):
        by_arg = resolve_config({}, service_name='a "b" {c=d}, e').service_name
        by_env = resolve_config({"MW_SERVICE_NAME": 'a "b" {c=d}, e'}).service_name
        uploaded = resolve_upload_config(env={"OTEL_SERVICE_NAME": 'a "b" {c=d}, e', **BACKEND})
    assert by_arg == by_env == "a--b---c-d---e"
    assert uploaded is not None and uploaded.app_name == by_env
    assert sum("not allowed in a series name" in r.getMessage() for r in caplog.records) == 3


def test_tags_by_argument_follow_the_tag_rule(caplog):
    with caplog.at_level(logging.WARNING, logger="middleware"):
        p = resolve_config({"MW_CUSTOM_RESOURCE_ATTRIBUTES": "from_env=1"},
                           tags={"ok": "1", "__x": "2", "v": "a,b", "n" * 1025: "3"})
    assert p.tags == {"ok": "1"}  # the argument wins, checked like the variable
    assert "'__x' in tags" in caplog.text and "'v' in tags" in caplog.text
    assert "longer than 1024 characters" in caplog.text  # the label-name rule of middleware.labels


# ---------------------------------------------------------------- the real thing

APP = r"""
import time
from middleware import MwTracker

def settings_work(seconds):
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += sum(i * i for i in range(200))
    return x

t = MwTracker(instrument=False)
settings_work(0.6)
t.flush(2.0)
t.stop()
"""


def _hermetic(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_", "PYROSCOPE_"))}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), **extra)
    return env


@pytest.mark.asan
def test_the_store_and_the_uploads_carry_the_same_service_and_rate(tmp_path):
    # GIVEN an app configured by the environment only: a service name with characters a series
    # name cannot hold, a sample rate, tags (one bad), a local store and a backend
    store = tmp_path / "store"
    with FakeBackend() as backend:
        env = _hermetic(tmp_path, MW_SERVICE_NAME="shop api{v2}", MW_PROFILING_SAMPLE_RATE="250",
                        MW_CUSTOM_RESOURCE_ATTRIBUTES="env=prod,bad-name=1", MW_PROFILE_DIR=str(store),
                        MW_PROFILING_SERVER_URL=backend.url, MW_PROFILING_UPLOAD_INTERVAL="0.2")
        # WHEN it runs
        r = subprocess.run([sys.executable, "-c", APP], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
        ingests = backend.ingests()
    assert r.returncode == 0, r.stderr
    # THEN the store's files and the uploads name the same service, sampled at the same rate
    files = sorted(store.glob("*.pb.gz"))
    assert files and ingests, (files, len(ingests), r.stderr)
    services = {re.sub(r"-\d+-\d+\.pb\.gz\Z", "", f.name) for f in files}
    assert services == {"shop-api-v2-"}, services
    assert {i.q("name") for i in ingests} == {"shop-api-v2-{env=prod}"}
    assert {i.q("sampleRate") for i in ingests} == {"250"}
    periods = {parse_pprof(f.read_bytes()).period for f in files}
    periods |= {parse_pprof(i.body).period for i in ingests}
    assert periods == {1_000_000_000 // 250}, periods
    # AND each bad setting was said once, by the one place that resolves it
    lines = [line for line in r.stderr.splitlines() if line.startswith("middleware: ")]
    assert sum("series name" in line and "MW_SERVICE_NAME" in line for line in lines) == 1, lines
    assert sum("'bad-name'" in line and "MW_CUSTOM_RESOURCE_ATTRIBUTES" in line for line in lines) == 1, lines
    assert len(lines) == 2, lines


def _serve_imports(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    """What ``middleware serve`` says it imports (the agent's store among them)."""
    proc = subprocess.Popen([sys.executable, "-m", "middleware", "serve", "--port", "0", "--data",
                             str(tmp_path / "data"), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert "importing: " in line, line
    return line.rstrip("\n").split("importing: ", 1)[1]


@pytest.mark.parametrize("store", ["{tmp}/agent-store", None])
def test_serve_imports_the_store_the_agent_writes(tmp_path, monkeypatch, store):
    extra = {"MW_PROFILE_DIR": store.format(tmp=tmp_path)} if store else {}
    env = _hermetic(tmp_path, **extra)
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])  # the default store's base
    agent = resolve_config(env).profile_dir
    assert agent is not None
    assert _serve_imports(tmp_path, env) == agent


def test_serve_imports_a_relative_store_once_when_it_is_also_given_to_import(tmp_path, monkeypatch):
    # the agent's relative MW_PROFILE_DIR is made absolute; serve, told to import the same
    # directory by its relative name, does not add it a second time
    monkeypatch.chdir(tmp_path)
    env = _hermetic(tmp_path, MW_PROFILE_DIR="agent-store")
    assert resolve_config(env).profile_dir == str(tmp_path / "agent-store")
    assert _serve_imports(tmp_path, env, "--import", "agent-store") == "agent-store"


def test_serve_imports_no_store_when_the_agent_keeps_none(tmp_path):
    env = _hermetic(tmp_path, MW_PROFILE_DIR="off")
    assert resolve_config(env).profile_dir is None
    assert _serve_imports(tmp_path, env) == "none"


def test_every_environment_variable_of_the_settings_table_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [env for s in config.SETTINGS.values() for env in s.env if f"`{env}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
