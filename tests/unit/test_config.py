"""Configuration: arguments beat environment variables beat defaults; bad values warn and fall
back to the default, never raise."""
from __future__ import annotations

import logging

import pytest

from middleware.config import default_profile_dir, resolve_config

pytestmark = [pytest.mark.sampler, pytest.mark.unit]


def test_defaults():
    c = resolve_config({})
    assert c.sample_rate == 100 and c.upload_interval == 10.0 and c.enabled
    assert c.profile_dir == default_profile_dir()
    assert c.service_name.startswith("python-service-")


def test_env_then_args():
    env = {"MW_PROFILING_SAMPLE_RATE": "250", "MW_SERVICE_NAME": "my svc", "MW_PROFILE_DIR": "/tmp/x"}
    c = resolve_config(env)
    assert c.sample_rate == 250 and c.service_name == "my-svc" and c.profile_dir == "/tmp/x"
    c = resolve_config(env, sample_rate=50, service_name="arg")
    assert c.sample_rate == 50 and c.service_name == "arg"
    assert resolve_config({**env, "OTEL_SERVICE_NAME": "otel"}).service_name == "otel"


def test_an_unknown_option_is_named_in_a_warning_and_changes_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="middleware.config"):
        c = resolve_config({}, sampel_rate=5)
    assert c.sample_rate == 100
    msgs = [r.getMessage() for r in caplog.records if "sampel_rate" in r.getMessage()]
    assert len(msgs) == 1 and "did you mean 'sample_rate'" in msgs[0], caplog.text


@pytest.mark.parametrize("bad", ["fast", "0", "-5", "100000", ""])
def test_bad_sample_rate_warns_and_uses_default(bad, caplog):
    with caplog.at_level(logging.WARNING, logger="middleware.config"):
        c = resolve_config({"MW_PROFILING_SAMPLE_RATE": bad})
    assert c.sample_rate == 100
    if bad:
        assert any("MW_PROFILING_SAMPLE_RATE" in r.getMessage() for r in caplog.records)


def test_bad_values_never_raise(caplog):
    env = {"MW_PROFILING_UPLOAD_INTERVAL": "soon", "MW_APM_COLLECT_PROFILING": "maybe",
           "MW_PROFILING_MAX_DEPTH": "1e9", "MW_CUSTOM_RESOURCE_ATTRIBUTES": "a=1,broken,b=2"}
    c = resolve_config(env)
    assert c.upload_interval == 10.0 and c.enabled is True and c.max_depth == 1024
    assert c.tags == {"a": "1", "b": "2"}


def test_profiling_can_be_disabled():
    assert resolve_config({"MW_APM_COLLECT_PROFILING": "false"}).enabled is False
    assert resolve_config({}, profile_dir="none").profile_dir is None


def test_a_relative_or_home_store_directory_is_made_absolute_when_resolved(tmp_path, monkeypatch):
    # a daemon that changes its working directory after the tracker started keeps writing where
    # it was asked to (before: the windows after a chdir went to <new cwd>/store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_config({"MW_PROFILE_DIR": "store"}).profile_dir == str(tmp_path / "store")
    assert resolve_config({}, profile_dir="./a/../b").profile_dir == str(tmp_path / "b")
    assert resolve_config({"MW_PROFILE_DIR": "~/profiles"}).profile_dir == str(tmp_path / "home" / "profiles")
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    assert resolve_config({}).profile_dir == str(tmp_path / "cache" / "middleware" / "profiles")


def test_tracker_with_bad_rate_env_still_profiles(workload):
    r = workload("lines", "--seconds", "1", env={"MW_PROFILING_SAMPLE_RATE": "not-a-number"})
    assert r["stats"]["ticks"] > 50  # the default 100 Hz, not a crash
