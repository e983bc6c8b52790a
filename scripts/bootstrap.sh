#!/usr/bin/env bash
# Installs everything middleware needs on a Debian 12 machine: the C libraries and tools from
# Debian (scripts/apt-packages.txt) and a virtualenv with the pinned Python dependencies.
#   scripts/bootstrap.sh [PYTHON]   -> .venv (default python3) or .venv-X.Y for another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}

missing=()
while read -r pkg; do
  [ -z "$pkg" ] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < scripts/apt-packages.txt
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$PY" = python3 ]; then venv=.venv; else venv=.venv-$ver; fi
stamp="$venv/.requirements.sha"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: creating $venv with $("$PY" --version)"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
