#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UBSan into a separate tree (build-asan/) and runs
# the sampler, stress, export and upload tests against it, with the ASan runtime preloaded
# (the interpreter itself is not instrumented). Any ASan/UBSan report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh >/dev/null
out=build-asan
rm -rf "$out"; mkdir -p "$out"
cp -r middleware "$out/"
rm -f "$out"/middleware/_native*.so
MW_SANITIZE=1 .venv/bin/python setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" --force
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:log_path=$PWD/$out/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$PWD/$out/ubsan"
export PYTHONPATH="$PWD/$out"
export MW_STRESS_SECONDS=${MW_STRESS_SECONDS:-20}
export PYTHONMALLOC=malloc
echo "asan: extension at $(ls $out/middleware/_native*.so)"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider tests -k "sampler or stress or upload or export" \
  -m "not browser" --deselect tests/test_sampler.py::test_profile_cpu_total_matches_process_cpu
rc=$?
set -e
if ls "$out"/asan* "$out"/ubsan* >/dev/null 2>&1; then
  echo "asan: sanitizer reports:"; cat "$out"/asan* "$out"/ubsan* 2>/dev/null | head -100; exit 1
fi
echo "asan: no sanitizer report"
exit $rc
