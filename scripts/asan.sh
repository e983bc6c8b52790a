#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UBSan into a separate tree (build-asan/) and runs
# the tests marked sampler or asan (sampler, stress, export, upload) against it, with the ASan runtime preloaded
# (the interpreter itself is not instrumented). Any ASan/UBSan report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh >/dev/null
out=build-asan
root=$PWD
rm -rf "$out"; mkdir -p "$out"
# A copy of the tree whose in-place extension is the sanitized one: the tests' child processes
# put their own checkout first on sys.path, so they must run from this copy.
cp -r middleware tests demo_flask bench pyproject.toml setup.py "$out/"
rm -f "$out"/middleware/_native*.so
MW_SANITIZE=1 .venv/bin/python setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" --force
so=$(ls "$out"/middleware/_native*.so)
# (not `nm | grep -q`: with pipefail, grep quitting early can fail nm with SIGPIPE)
nm -D "$so" > "$out/nm.txt"
grep -q __asan_init "$out/nm.txt" || { echo "asan: $so is not instrumented"; exit 1; }
# The C unit tests' program (tests/native/test_c_units.py runs it), sanitized the same way.
make -s CTEST_DIR="$out/ctest" CTEST_SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
  "$out/ctest/test_c_units"
export MW_CTEST_BIN="$root/$out/ctest/test_c_units"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:log_path=$root/$out/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$root/$out/ubsan"
export PYTHONPATH="$root/$out"
export MW_STRESS_SECONDS=${MW_STRESS_SECONDS:-20}
export PYTHONMALLOC=malloc
cd "$out"
loaded=$("$root/.venv/bin/python" -c "import middleware._native as n; print(n.__file__)")
echo "asan: extension at $loaded"
case "$loaded" in "$root/$out/"*) ;; *) echo "asan: the sanitized extension is not the one loaded"; exit 1;; esac
set +e
# The selection is by marker: the sampler tests (marker sampler) and the tests marked asan
# (export, store, upload, children, the uploads that serve receives, the C unit tests). The process-CPU total is
# left out: the sanitizers' own CPU counts in the process but not in the profile.
"$root/.venv/bin/python" -m pytest -q -p no:cacheprovider tests -m "sampler or asan" \
  --deselect tests/native/test_sampler.py::test_profile_cpu_total_matches_process_cpu
rc=$?
cd "$root"
set -e
if ls "$out"/asan* "$out"/ubsan* >/dev/null 2>&1; then
  echo "asan: sanitizer reports:"; cat "$out"/asan* "$out"/ubsan* 2>/dev/null | head -100; exit 1
fi
echo "asan: no sanitizer report"
exit $rc
