"""Binary wheels install and profile where nothing can be compiled, and the sdist says what it lacks.

The wheel of the running CPython is built the way `make wheels` builds it (scripts/wheels.sh: the
sdist, a wheel built from it, repaired by auditwheel), installed into a fresh venv of the same
interpreter that runs from an empty directory with LD_LIBRARY_PATH empty (nothing of the build
tree is importable, no library is found but those the wheel vendors and the base system's), and
profiles the calc workload to a pprof file that `go tool pprof` reads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support.processes import clean_env

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
GO = shutil.which("go")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(ROOT / "scripts" / "wheels.sh"), "--dist", str(out), VERSION],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def _wheel(dist: Path) -> Path:
    tag = "cp" + VERSION.replace(".", "")
    (whl,) = dist.glob(f"middleware-*-{tag}-{tag}-manylinux_*_x86_64.whl")
    return whl


def test_the_wheel_vendors_its_libraries_and_is_consistent_with_its_tag(dist: Path) -> None:
    whl = _wheel(dist)
    tag = re.search(r"(manylinux_\d+_\d+_x86_64)\.whl$", whl.name).group(1)
    names = zipfile.ZipFile(whl).namelist()
    vendored = {Path(n).name.split("-")[0] for n in names if n.startswith("middleware.libs/")}
    # what the two extensions link beyond the C library and zlib (a manylinux base library)
    for lib in ("libcurl", "libprotobuf", "libunwind", "libelf", "libjson"):
        assert any(v.startswith(lib) for v in vendored), (lib, sorted(vendored))
    assert any(n.startswith("middleware/_native.") for n in names)
    assert any(n.startswith("middleware/_upload.") for n in names)
    show = subprocess.run([str(ROOT / ".venv" / "bin" / "auditwheel"), "show", str(whl)],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    text = " ".join(show.stdout.split())
    assert f'is consistent with the following platform tag: "{tag}"' in text, text


@pytest.mark.skipif(GO is None, reason="go (golang-go) is not installed")
def test_the_wheel_profiles_in_a_fresh_venv_that_cannot_see_the_build_tree(dist: Path, tmp_path: Path) -> None:
    whl = _wheel(dist)
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(whl)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    calc = tmp_path / "calc"
    calc.mkdir()
    shutil.copy(ROOT / "demo_flask" / "calculations.py", calc)
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    env = {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["LD_LIBRARY_PATH"] = ""
    proc = subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "scripts" / "wheel_smoke.py"), "--calc", str(calc),
         "--out", str(tmp_path / "profiles"), "--build-tree", str(ROOT)],
        capture_output=True, text=True, timeout=120, cwd=str(run_dir), env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout)
    assert r["module"].startswith(str(venv)) and r["native"].startswith(str(venv)), r
    assert r["calc_cpu_ms"]["calc3"] > r["calc_cpu_ms"]["calc1"], r  # the demo's bottleneck leads
    # the console scripts: middleware-run profiles a command with no code change
    code = "import sys; print('middleware._native' in sys.modules)"
    run = subprocess.run([str(venv / "bin" / "middleware-run"), str(venv / "bin" / "python"), "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=str(run_dir),
                         env={**env, "MW_PROFILE_DIR": str(tmp_path / "run-store")})
    assert run.returncode == 0 and run.stdout.strip() == "True", (run.stdout, run.stderr)
    assert subprocess.run([str(venv / "bin" / "middleware"), "--help"], capture_output=True,
                          timeout=60).returncode == 0
    (profile,) = r["files"]
    top = subprocess.run([GO, "tool", "pprof", "-top", "-sample_index=cpu", profile],
                         capture_output=True, text=True, timeout=120)
    assert top.returncode == 0, top.stderr
    assert re.search(r"^\s*\S+\s+[\d.]+%.*\bcalc3\b", top.stdout, re.M), top.stdout


def _curl_include_dirs() -> list[str]:
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    dirs = ["/usr/include/curl", "/usr/local/include/curl"] + ([f"/usr/include/{multiarch}/curl"] if multiarch else [])
    return [d for d in dirs if os.path.isdir(d)]


def test_the_sdist_without_curl_headers_fails_with_one_line_naming_the_package(dist: Path, tmp_path: Path) -> None:
    """The curl headers are hidden from this one build (an empty file system mounted over their
    directory in a private mount namespace), nothing is uninstalled from the machine."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding the headers needs root and unshare (a private mount namespace)")
    (sdist,) = dist.glob("middleware-*.tar.gz")
    hide = " && ".join(f"mount -t tmpfs none {d}" for d in _curl_include_dirs())
    assert hide, "no curl include directory found on this machine"
    py = ROOT / ".venv" / "bin" / "python"
    script = (f"{hide} && cd {tmp_path} && tar xzf {sdist} && cd middleware-* && "
              f"{py} -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check -w {tmp_path}/out .")
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    lines = [ln for ln in out.splitlines() if "C headers not found" in ln]
    assert len(lines) == 1, out[-3000:]
    assert "curl/curl.h" in lines[0] and "libcurl4-openssl-dev" in lines[0], lines[0]
    assert "fatal error" not in out, out[-3000:]  # no compiler error: the check ran first
    assert all(os.listdir(d) for d in _curl_include_dirs())  # the machine's headers are untouched
