#!/usr/bin/env bash
# Creates .venv-bench, the virtualenv of bench/peers.py: the peer profilers pinned in
# bench/requirements-peers.txt, and this checkout importable as `middleware` (a .pth file pointing
# at the repository, so the extension built in place by `make build` is the one imported).
# Idempotent: does nothing once the venv holds every requirement of the current file. Each
# requirement is installed on its own: one that fails is reported (peers.py then shows that peer
# as n/a) and retried on the next call.
#   scripts/bench-venv.sh [PYTHON]   (default python3, the interpreter of .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
venv=.venv-bench
req=bench/requirements-peers.txt
stamp="$venv/.requirements.sha"
want=$( { sha256sum "$req" | cut -d' ' -f1; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ ! -x "$venv/bin/python" ] || [ "$("$venv/bin/python" -c 'import sys; print(sys.version)')" != "$("$PY" -c 'import sys; print(sys.version)')" ]; then
    echo "bench-venv: creating $venv with $("$PY" --version)"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
  fi
  failed=()
  while read -r line; do
    spec=${line%%#*}; spec=${spec// /}
    [ -z "$spec" ] && continue
    if ! "$venv/bin/pip" install -q --disable-pip-version-check "$spec" >"$venv/pip-last.log" 2>&1; then
      failed+=("$spec")
      grep -v "^WARNING: Location" "$venv/pip-last.log" | tail -3 | sed 's/^/  /'
    fi
  done < "$req"
  if [ ${#failed[@]} -eq 0 ]; then
    echo "$want" > "$stamp"
  else
    echo "bench-venv: could not install: ${failed[*]} (bench/peers.py shows them as n/a)"
  fi
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/middleware-checkout.pth"
"$venv/bin/python" -c "import middleware._native" 2>/dev/null \
  || echo "bench-venv: middleware._native does not import yet: run make build"
