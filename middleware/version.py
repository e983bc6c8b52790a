"""The code version a profiled process runs, as labels on every sample of its profiles.

Three labels, the names Pyroscope uses for its links from a profile to the source
(``service_git_ref``, ``service_repository``) plus ``version``, so that profiles of two versions
can be told apart and compared (``python -m middleware regress``, ``--label version=...``):

``service_git_ref``
    ``MW_VCS_COMMIT_SHA`` (the variable Middleware's agents read), else the commit checked out in
    the application's git work tree.
``service_repository``
    ``MW_VCS_REPOSITORY_URL``, else the URL of that work tree's ``origin`` remote. A user name or
    password in the URL (``https://user:token@host/...``) is never written.
``version``
    ``MW_VCS_COMMIT_SHA``, else ``service.version`` of ``OTEL_RESOURCE_ATTRIBUTES``, else the
    work tree's commit.

The application's work tree is found from the directory of ``__main__``'s file upwards, else from
the current directory upwards (under gunicorn, uWSGI or Celery the server is ``__main__``). Git is
not run: ``HEAD``, the ref it names (loose or packed) and the ``config`` file are read, worktrees
and submodules (a ``.git`` file) included. A label whose value cannot be found is left out; a
value that is not a valid label value is left out with a warning.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from middleware.config import visible_warning

logger = logging.getLogger(__name__)

__all__ = ["git_state", "repository_url", "service_version", "version_labels"]

_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # SHA-1 or SHA-256
_REMOTE = re.compile(r'^\s*\[\s*remote\s+"origin"\s*\]\s*$')
_SECTION = re.compile(r"^\s*\[")
_URL = re.compile(r"^\s*url\s*=\s*(.*?)\s*$")
_MAX_READ = 1 << 20  # the largest git file read (packed-refs of a big repository: a few MiB at most)
MAX_VALUE_LENGTH = 1024  # well within what `serve` and Pyroscope accept (2048)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _value_problem(value: str) -> str | None:
    if len(value) > MAX_VALUE_LENGTH:
        return f"longer than {MAX_VALUE_LENGTH} characters"
    if _CONTROL.search(value):
        return "it holds a control character"
    return None


def service_version(resource_attributes: str | None) -> str | None:
    """``service.version`` from an ``OTEL_RESOURCE_ATTRIBUTES`` value (``k=v,k=v``, values
    percent-encoded as the OpenTelemetry specification says), or None."""
    if not resource_attributes:
        return None
    for part in resource_attributes.split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip() == "service.version":
            return unquote(value.strip()) or None
    return None


def repository_url(url: str | None) -> str | None:
    """``url`` without its user name and password (scp-like ``git@host:path`` kept as is)."""
    if not url or not url.strip():
        return None
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme and parts.netloc and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        url = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def _read(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(_MAX_READ)
    except OSError:
        return None


def _git_dir(start: Path) -> Path | None:
    """The git directory of the work tree holding ``start`` (a ``.git`` directory, or the one a
    ``.git`` file points to), or None."""
    for d in (start, *start.parents):
        dot = d / ".git"
        if dot.is_dir():
            return dot
        if dot.is_file():
            text = _read(dot) or ""
            if text.startswith("gitdir:"):
                target = Path(text[len("gitdir:"):].strip())
                return target if target.is_absolute() else (d / target).resolve()
            return None
    return None


def _resolve_ref(git_dir: Path, common: Path, ref: str) -> str | None:
    for base in (git_dir, common):
        text = _read(base / ref)
        if text is not None and _SHA.fullmatch(text.strip()):
            return text.strip()
    for line in (_read(common / "packed-refs") or "").splitlines():
        sha, _, name = line.partition(" ")
        if name.strip() == ref and _SHA.fullmatch(sha):
            return sha
    return None


def git_state(start: Path) -> tuple[str | None, str | None]:
    """(commit checked out, ``origin``'s URL) of the work tree holding ``start``; None for what
    cannot be read."""
    git_dir = _git_dir(start)
    if git_dir is None:
        return None, None
    common = git_dir
    text = _read(git_dir / "commondir")
    if text and text.strip():  # a linked worktree: refs and config live in the main git dir
        c = Path(text.strip())
        common = c if c.is_absolute() else (git_dir / c).resolve()
    head = (_read(git_dir / "HEAD") or "").strip()
    commit: str | None = None
    if head.startswith("ref:"):
        commit = _resolve_ref(git_dir, common, head[len("ref:"):].strip())
    elif _SHA.fullmatch(head):
        commit = head
    url: str | None = None
    in_origin = False
    for line in (_read(common / "config") or "").splitlines():
        if _SECTION.match(line):
            in_origin = bool(_REMOTE.match(line))
        elif in_origin and (m := _URL.match(line)):
            url = m.group(1).strip('"')
            break
    return commit, repository_url(url)


def _app_dirs() -> tuple[str, ...]:
    """Where the app's work tree may be: ``__main__``'s directory, then the current directory (a
    server such as gunicorn, uWSGI or Celery is ``__main__``, the app is where it runs)."""
    dirs = []
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    if isinstance(file, str) and file:
        dirs.append(os.path.dirname(os.path.abspath(file)))
    try:
        dirs.append(os.getcwd())
    except OSError:  # the current directory was removed
        pass
    return tuple(dict.fromkeys(dirs))


def version_labels(commit_sha: str | None, repo_url: str | None, otel_version: str | None,
                   app_dir: Path | None = None) -> list[tuple[str, str]]:
    """The version labels as (name, value) pairs, in the order above. ``commit_sha``,
    ``repo_url`` and ``otel_version`` are the resolved settings (None: not set); the work tree is
    read only for what they leave open. Computed once per process and arguments (a forked worker
    restarting its profiler reuses it, a bad value is said once)."""
    where = (str(app_dir),) if app_dir is not None else _app_dirs()
    return list(_version_labels(commit_sha, repo_url, otel_version, where))


@functools.lru_cache(maxsize=8)
def _version_labels(commit_sha: str | None, repo_url: str | None, otel_version: str | None,
                    app_dirs: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    git_commit = git_url = None
    if commit_sha is None or repo_url is None:
        for d in app_dirs:  # the first work tree found
            try:
                git_commit, git_url = git_state(Path(d))
            except (OSError, ValueError, RuntimeError):  # never a reason not to profile
                logger.debug("middleware: reading the git work tree of %s failed", d, exc_info=True)
            if git_commit or git_url:
                break
    candidates = (
        ("service_git_ref", commit_sha or git_commit),
        ("service_repository", repository_url(repo_url) or git_url),
        ("version", commit_sha or otel_version or git_commit),
    )
    out: list[tuple[str, str]] = []
    for name, value in candidates:
        if not value:
            continue
        problem = _value_problem(value)
        if problem is not None:
            visible_warning(logger, "middleware: the %s label is left out: %s", name, problem)
            continue
        out.append((name, value))
    return tuple(out)
