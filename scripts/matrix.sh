#!/usr/bin/env bash
# Runs the sampler-core tests on every CPython among the given versions found under pyenv, each
# with its own venv (.venv-X.Y) and its own build of the extension (the .so carries the version
# tag, so builds for several versions live side by side), and prints which ran and passed.
# Every version asked for must be installed: a missing one fails the run (it is not skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
declare -A result
ran=()
for v in "$@"; do
  py=$(scripts/pyenv-python.sh "$v")
  if [ -z "$py" ]; then
    echo "matrix: CPython $v was asked for but is not installed (no $root/versions/$v.*/bin/python$v)" >&2
    result[$v]="MISSING (not installed)"; continue
  fi
  ran+=("$v")
  echo "=== matrix: CPython $v ($py)"
  if ! scripts/bootstrap.sh "$py" >/dev/null; then result[$v]="FAILED (venv)"; continue; fi
  venv=.venv-$v
  if ! "$venv/bin/python" setup.py -q build_ext --inplace >/tmp/mw-matrix-build-$v.log 2>&1; then
    cat /tmp/mw-matrix-build-$v.log; result[$v]="FAILED (build)"; continue
  fi
  # Of the sampling modes' variants only the default runs here: ticks only (MW_PROFILING_CPU_TIMER=off)
  # and POSIX timers differ from it in the C that places a sample and in the kernel's way of sending
  # the signal, the same on every version, while the frame reads they make are the default's; the
  # suite's interpreter runs them (about 35 s and 45 s a version saved). So do the tests marked
  # interpreter_independent: they check such C (timers, ticks, signal masks, the signal's route, the
  # rate, the record pool's size) on workloads whose frames the other tests read too (~50 s a version).
  if MW_STRESS_SECONDS=${MW_MATRIX_STRESS_SECONDS:-8} "$venv/bin/python" -m pytest -q -p no:cacheprovider \
       -m "sampler and not interpreter_independent" -k "not ticks-only and not posix-timer" \
       tests/native/test_sampler.py tests/native/test_truth.py tests/native/test_stress.py \
       tests/native/test_locks.py tests/native/test_task_stacks.py tests/native/test_native_threads.py \
       tests/unit/test_config.py; then
    result[$v]="passed"
  else
    result[$v]="FAILED"
  fi
done
echo
echo "matrix summary (sampler tests per CPython):"
rc=0
for v in "$@"; do
  echo "  CPython $v: ${result[$v]}"
  case "${result[$v]}" in passed) ;; *) rc=1 ;; esac
done
[ $# -gt 0 ] || { echo "matrix: no CPython version asked for"; rc=1; }
[ ${#ran[@]} -gt 0 ] || { echo "matrix: no CPython among $* found"; rc=1; }
exit $rc
