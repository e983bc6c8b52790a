"""End to end: every sample of every profile a tracked process writes to the local store and
uploads carries the code version it runs (service_git_ref, service_repository, version), taken
from its git work tree, or from MW_VCS_COMMIT_SHA / MW_VCS_REPOSITORY_URL /
OTEL_RESOURCE_ATTRIBUTES when set; the CLI selects profiles by version with --label."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.pprof import find_profile_files, parse_pprof, read_pprof_file

pytestmark = pytest.mark.asan

APP = """
import time
from middleware import MwTracker

def versioned_busy_loop(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += sum(i * i for i in range(200))
    return x

t = MwTracker(service_name="versioned", upload_interval=0.3)
versioned_busy_loop(1.0)
t.stop()
"""


def _git_app(root: Path) -> str:
    """A git work tree holding app.py, its origin URL with credentials; returns its commit."""
    root.mkdir()
    (root / "app.py").write_text(APP)
    git = ["git", "-C", str(root), "-c", "user.email=t@example", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "app.py"], ["commit", "-qm", "app"],
                 ["remote", "add", "origin", "https://deploy:s3cret@git.example/shop.git"]):
        subprocess.run(git + args, check=True, capture_output=True, timeout=30)
    return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _run(app_dir: Path, store: Path, cwd: Path | None = None, **env: str) -> None:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MW_", "OTEL_"))}
    e.update(MW_PROFILE_DIR=str(store), **env)
    proc = subprocess.run([sys.executable, str(app_dir / "app.py")], cwd=str(cwd or app_dir.parent), env=e,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _labels_of_every_sample(store: Path) -> set[tuple[tuple[str, str], ...]]:
    files = find_profile_files(store)
    assert files, "no profile written"
    seen = set()
    for f in files:
        for s in read_pprof_file(f).samples:
            seen.add(tuple(sorted((k, v) for k, v in s.labels if k in ("service_git_ref", "service_repository",
                                                                        "version"))))
    return seen


def test_the_work_trees_commit_and_origin_label_every_sample(tmp_path):
    commit = _git_app(tmp_path / "shop")
    store = tmp_path / "store"
    _run(tmp_path / "shop", store)
    want = (("service_git_ref", commit), ("service_repository", "https://git.example/shop.git"), ("version", commit))
    assert _labels_of_every_sample(store) == {want}
    assert "s3cret" not in b"".join(f.read_bytes() for f in store.iterdir()).decode("latin-1")
    # the CLI selects the version's samples, and none of another version
    cli = [sys.executable, "-m", "middleware", "top", str(store), "--format", "json"]
    mine = subprocess.run(cli + ["--label", f"version={commit}"], capture_output=True, text=True, timeout=60)
    other = subprocess.run(cli + ["--label", "version=0000"], capture_output=True, text=True, timeout=60)
    assert mine.returncode == 0 and "versioned_busy_loop" in mine.stdout, mine.stderr
    assert "versioned_busy_loop" not in other.stdout


def test_a_server_run_as_main_finds_the_work_tree_from_the_current_directory(tmp_path):
    # gunicorn, uWSGI or Celery is __main__ (its script lives elsewhere); the app runs in its tree
    commit = _git_app(tmp_path / "shop")
    runner = tmp_path / "venv-bin"
    runner.mkdir()
    (runner / "app.py").write_text(APP)
    store = tmp_path / "store"
    _run(runner, store, cwd=tmp_path / "shop")
    assert _labels_of_every_sample(store) == {
        (("service_git_ref", commit), ("service_repository", "https://git.example/shop.git"), ("version", commit))}


def test_the_variables_name_the_version_and_reach_the_uploader(tmp_path, backend):
    _git_app(tmp_path / "shop")
    store = tmp_path / "store"
    _run(tmp_path / "shop", store, MW_VCS_COMMIT_SHA="abc123", MW_VCS_REPOSITORY_URL="https://git.example/prod.git",
         OTEL_RESOURCE_ATTRIBUTES="service.version=4.2", MW_PROFILING_SERVER_URL=backend.url,
         MW_PROFILING_TENANT_ID="t1", MW_PROFILE_DIR_MAX_MB="64")
    want = (("service_git_ref", "abc123"), ("service_repository", "https://git.example/prod.git"),
            ("version", "abc123"))
    assert _labels_of_every_sample(store) == {want}
    uploads = backend.ingests()
    assert uploads
    for r in uploads:
        for s in parse_pprof(r.body).samples:
            assert want == tuple(sorted((k, v) for k, v in s.labels if k in dict(want))), s.labels


def test_service_version_names_the_version_without_a_commit(tmp_path):
    app = tmp_path / "plain"
    app.mkdir()
    (app / "app.py").write_text(APP)
    store = tmp_path / "store"
    _run(app, store, OTEL_RESOURCE_ATTRIBUTES="service.name=shop,service.version=4.2")
    assert _labels_of_every_sample(store) == {(("version", "4.2"),)}


def test_two_versions_in_one_store_compare_by_label(tmp_path):
    app = tmp_path / "plain"
    app.mkdir()
    (app / "app.py").write_text(APP)
    store = tmp_path / "store"
    for version in ("v1", "v2"):
        _run(app, store, MW_VCS_COMMIT_SHA=version)
    cli = [sys.executable, "-m", "middleware"]
    diff = subprocess.run(cli + ["diff", str(store), "--before-label", "version=v1", "--after-label", "version=v2"],
                          capture_output=True, text=True, timeout=60)
    assert diff.returncode == 0 and "versioned_busy_loop" in diff.stdout, diff.stderr
    same = subprocess.run(cli + ["regress", str(store), str(store), "--before-label", "version=v1",
                                 "--after-label", "version=v2"], capture_output=True, text=True, timeout=60)
    assert same.returncode == 0, same.stdout + same.stderr  # the same code: no regression
