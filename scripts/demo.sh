#!/usr/bin/env bash
# make demo: the Flask demo under gunicorn, profiled, and where its time goes.
#
#   1. installs what it needs (scripts/bootstrap.sh, make build)
#   2. starts the collector: `python -m middleware serve` on loopback (the agent pushes to it, as
#      it would to Grafana Pyroscope); the agent also writes its local store, which `top` reads
#   3. starts gunicorn with 2 workers on demo_flask (wsgi:app), on loopback
#   4. drives load on /calculate1/<n> and /calculate2/<n> for a few seconds (wrk, else
#      bench/loadgen.py), then stops gunicorn gracefully so the workers flush their profiles
#   5. prints the table for /calculate2 (calc3 on top), the web page's URL and a flame graph file
#
# Settings (environment): MW_DEMO_SECONDS (load duration, default 8), MW_DEMO_PORT (gunicorn,
# default: a free port), MW_DEMO_SERVE_PORT (default 4040, or a free port if taken),
# MW_DEMO_KEEP_SERVER (1: leave the collector running for the web page - the default; 0: stop it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
SECONDS_OF_LOAD=${MW_DEMO_SECONDS:-8}
KEEP_SERVER=${MW_DEMO_KEEP_SERVER:-1}
CALC1_N=300
CALC2_N=9
RULE2='/calculate2/<int:number>'

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing (scripts/bootstrap.sh, make build)"
scripts/bootstrap.sh
make -s build

WORK=$(mktemp -d /tmp/mw-demo.XXXXXX)
STORE=$WORK/profiles
mkdir -p "$STORE"
GUNICORN_PID=""
SERVE_PID=""
cleanup() {
  if [ -n "$GUNICORN_PID" ] && kill -0 "$GUNICORN_PID" 2>/dev/null; then
    kill -TERM "$GUNICORN_PID" 2>/dev/null || true
    wait "$GUNICORN_PID" 2>/dev/null || true
  fi
  if [ -n "$SERVE_PID" ] && [ "$KEEP_SERVER" != 1 ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_free() { "$PY" -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; }
wait_http() {  # URL SECONDS PID: wait until URL answers 2xx while PID lives
  "$PY" - "$@" <<'EOF'
import os, sys, time, urllib.request
url, limit, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"demo: the process behind {url} exited")
    try:
        with urllib.request.urlopen(url, timeout=2):
            sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(f"demo: {url} did not answer within {limit:g}s")
EOF
}

# -- 2. the collector -------------------------------------------------------------------------
export MW_SERVICE_NAME=flask-demo
export MW_PROFILING_MEMORY=true  # memory profiles are off by default (their cost); the demo shows them
export MW_PROFILE_DIR=$STORE
if "$PY" -m middleware serve --help >/dev/null 2>&1; then
  SERVE_PORT=${MW_DEMO_SERVE_PORT:-4040}
  if ! port_free "$SERVE_PORT"; then
    echo "port $SERVE_PORT is taken; using another one"
    SERVE_PORT=$(free_port)
  fi
  say "starting the collector: python -m middleware serve on 127.0.0.1:$SERVE_PORT"
  nohup "$PY" -m middleware serve --host 127.0.0.1 --port "$SERVE_PORT" --data "$WORK/serve" \
    --no-store-import >"$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  wait_http "http://127.0.0.1:$SERVE_PORT/healthz" 20 "$SERVE_PID"
  export MW_PROFILING_SERVER_URL=http://127.0.0.1:$SERVE_PORT
else
  say "no 'serve' command: profiles go to the local store $STORE only"
fi

# -- 3. gunicorn ------------------------------------------------------------------------------
PORT=${MW_DEMO_PORT:-$(free_port)}
BASE=http://127.0.0.1:$PORT
say "starting gunicorn (2 workers) on $BASE"
(cd demo_flask && exec "$PY" -m gunicorn -c gunicorn.conf.py --bind "127.0.0.1:$PORT" --workers 2) \
  >"$WORK/gunicorn.log" 2>&1 &
GUNICORN_PID=$!
wait_http "$BASE/calculate1/1" 30 "$GUNICORN_PID"

# -- 4. load ----------------------------------------------------------------------------------
say "load: ${SECONDS_OF_LOAD}s on $BASE/calculate1/$CALC1_N and $BASE/calculate2/$CALC2_N"
if command -v wrk >/dev/null; then
  wrk -t1 -c2 -d"${SECONDS_OF_LOAD}s" --timeout 20s "$BASE/calculate1/$CALC1_N" >"$WORK/wrk1.txt" &
  W1=$!
  wrk -t1 -c2 -d"${SECONDS_OF_LOAD}s" --timeout 20s "$BASE/calculate2/$CALC2_N" >"$WORK/wrk2.txt" &
  W2=$!
  wait "$W1" "$W2"
  echo "/calculate1/$CALC1_N: $(grep -h 'Requests/sec' "$WORK/wrk1.txt")"
  echo "/calculate2/$CALC2_N: $(grep -h 'Requests/sec' "$WORK/wrk2.txt")"
else
  "$PY" bench/loadgen.py --seconds "$SECONDS_OF_LOAD" --connections 4 \
    "$BASE/calculate1/$CALC1_N" "$BASE/calculate2/$CALC2_N"
fi

say "stopping gunicorn gracefully (the workers write their last profiles)"
kill -TERM "$GUNICORN_PID"
wait "$GUNICORN_PID" || true
GUNICORN_PID=""
ls "$STORE"

# -- 5. results -------------------------------------------------------------------------------
if [ -n "$SERVE_PID" ]; then
  "$PY" - "http://127.0.0.1:$SERVE_PORT" <<'EOF' || true
import json, sys, urllib.request
base = sys.argv[1]
def get(path):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return json.load(r)
services = {s["name"]: s for s in get("/api/services")["services"]}
demo = services.get("flask-demo")
if demo is None:
    print("demo: warning: the collector received no profile (see the agent's log above)")
else:
    endpoints = get("/api/label_values?service=flask-demo&name=endpoint")["values"]
    print(f"the collector received {demo['profiles']} profiles; endpoints: {', '.join(endpoints)}")
EOF
fi

say "where /calculate2 spends its CPU time"
echo "\$ python -m middleware top --label 'endpoint=$RULE2' $STORE"
"$PY" -m middleware top --label "endpoint=$RULE2" --limit 12 "$STORE"
echo
echo "\$ python -m middleware sandwich --label 'endpoint=$RULE2' calc3 $STORE"
"$PY" -m middleware sandwich --label "endpoint=$RULE2" calc3 "$STORE"

say "where /calculate2 allocates memory"
echo "\$ python -m middleware top --type alloc_space --label 'endpoint=$RULE2' $STORE"
"$PY" -m middleware top --type alloc_space --label "endpoint=$RULE2" --limit 8 "$STORE"

FLAME=$WORK/calculate2-flamegraph.html
"$PY" -m middleware flamegraph --label "endpoint=$RULE2" -o "$FLAME" --title "flask-demo $RULE2" "$STORE"
say "results"
echo "flame graph of /calculate2: $FLAME"
echo "local store (pprof files):  $STORE"
if [ -n "$SERVE_PID" ]; then
  echo "web page:                   http://127.0.0.1:$SERVE_PORT/  (service flask-demo)"
  if [ "$KEEP_SERVER" = 1 ]; then
    echo "the collector keeps running for the page; stop it with: kill $SERVE_PID"
  else
    echo "(the collector stops now, MW_DEMO_KEEP_SERVER=0; the flame graph file stays)"
  fi
fi
