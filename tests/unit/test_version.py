"""The code-version labels (middleware.version): where each value comes from, in which order, and
how a git work tree is read without running git (loose and packed refs, a detached HEAD, a linked
worktree), credentials never kept."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from middleware.version import git_state, repository_url, service_version, version_labels

pytestmark = pytest.mark.unit

SHA1 = "1" * 40
SHA2 = "2" * 40


def _git(root: Path, head: str, refs: dict[str, str] | None = None, packed: str | None = None,
         config: str | None = None) -> Path:
    git = root / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text(head + "\n")
    for name, sha in (refs or {}).items():
        (git / name).parent.mkdir(parents=True, exist_ok=True)
        (git / name).write_text(sha + "\n")
    if packed is not None:
        (git / "packed-refs").write_text(packed)
    if config is not None:
        (git / "config").write_text(config)
    return git


CONFIG = """[core]
\tbare = false
[remote "upstream"]
\turl = https://git.example/fork.git
[remote "origin"]
\turl = https://deploy:s3cret@git.example/shop.git
\tfetch = +refs/heads/*:refs/remotes/origin/*
"""


def test_service_version_is_read_from_the_resource_attributes():
    assert service_version("service.name=shop,service.version=1.4.2") == "1.4.2"
    assert service_version(" service.version = 2%2C0 ") == "2,0"  # values are percent-encoded
    assert service_version("service.name=shop") is None
    assert service_version("") is None and service_version(None) is None


def test_repository_urls_lose_their_credentials():
    assert repository_url("https://deploy:s3cret@git.example/shop.git") == "https://git.example/shop.git"
    assert repository_url("https://token@git.example/shop") == "https://git.example/shop"
    assert repository_url("git@git.example:team/shop.git") == "git@git.example:team/shop.git"
    assert repository_url("  ") is None


def test_a_branch_checked_out_is_its_loose_ref(tmp_path):
    _git(tmp_path, "ref: refs/heads/main", {"refs/heads/main": SHA1}, config=CONFIG)
    (tmp_path / "app" / "pkg").mkdir(parents=True)
    assert git_state(tmp_path / "app" / "pkg") == (SHA1, "https://git.example/shop.git")


def test_a_packed_ref_and_a_detached_head(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _git(a, "ref: refs/heads/release", packed=f"# pack-refs with: peeled\n{SHA2} refs/heads/release\n^{SHA1}\n")
    _git(b, SHA2)
    assert git_state(a) == (SHA2, None)
    assert git_state(b) == (SHA2, None)


def test_a_linked_worktree_reads_refs_and_config_from_the_main_repository(tmp_path):
    main = tmp_path / "main"
    main.mkdir()
    git = _git(main, "ref: refs/heads/main", {"refs/heads/main": SHA1}, config=CONFIG)
    wt_git = git / "worktrees" / "feature"
    wt_git.mkdir(parents=True)
    (wt_git / "HEAD").write_text("ref: refs/heads/feature\n")
    (wt_git / "commondir").write_text("../..\n")
    (git / "refs" / "heads" / "feature").write_text(SHA2 + "\n")
    wt = tmp_path / "feature"
    wt.mkdir()
    (wt / ".git").write_text(f"gitdir: {wt_git}\n")
    assert git_state(wt) == (SHA2, "https://git.example/shop.git")


def test_no_work_tree_no_labels(tmp_path):
    assert git_state(tmp_path) == (None, None)
    assert version_labels(None, None, None, tmp_path) == []


def test_the_variables_come_before_the_work_tree(tmp_path):
    _git(tmp_path, "ref: refs/heads/main", {"refs/heads/main": SHA1}, config=CONFIG)
    assert version_labels(None, None, None, tmp_path) == [
        ("service_git_ref", SHA1), ("service_repository", "https://git.example/shop.git"), ("version", SHA1)]
    # service.version names the version when no commit is given; the work tree still gives the ref
    assert version_labels(None, None, "1.4.2", tmp_path) == [
        ("service_git_ref", SHA1), ("service_repository", "https://git.example/shop.git"), ("version", "1.4.2")]
    # MW_VCS_COMMIT_SHA / MW_VCS_REPOSITORY_URL beat both (a URL given with a token loses it too)
    assert ("service_repository", "https://git.example/x.git") in version_labels(
        "abc", "https://ci:tok3n@git.example/x.git", None, tmp_path)
    assert version_labels("abc123", "https://git.example/other", "1.4.2", tmp_path) == [
        ("service_git_ref", "abc123"), ("service_repository", "https://git.example/other"), ("version", "abc123")]


def test_a_value_that_cannot_be_a_label_is_left_out_and_said(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="middleware"):
        labels = version_labels("x" * 2000, None, "1.0", tmp_path)
    assert labels == []  # the commit is both the ref and the version
    said = [r.getMessage() for r in caplog.records]
    assert sum("label is left out: longer than 1024 characters" in m for m in said) == 2, said
