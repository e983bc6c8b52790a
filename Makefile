# middleware — make help lists the targets.
SHELL := /bin/bash
PY ?= .venv/bin/python
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
MATRIX_VERSIONS ?= 3.10 3.11 3.12 3.13
# make check runs the whole suite on $(PY)'s CPython, so its matrix leaves that version out
PY_VERSION = $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
CSRC := $(wildcard csrc/*.c csrc/*.h)

.PHONY: help bootstrap build test test-fast ctest check matrix wheels asan bench demo lint format proto clean peers

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

bootstrap:  ## install Debian packages and the pinned venv (.venv)
	@scripts/bootstrap.sh

build: bootstrap  ## build the C extension in place; .venv/bin/python can import middleware
	@$(PY) setup.py -q build_ext --inplace
	@test -f $(dir $(PY))../.editable-installed || { MW_SKIP_EXT=1 $(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "WARNING: Location"; $(PY) -c "import middleware.tracker" && touch $(dir $(PY))../.editable-installed; }
	@$(PY) -c "import middleware._native"

test: build  ## run the whole test suite on the default interpreter
	$(PY) -m pytest -ra --durations=15 tests $(PYTEST_ARGS)

test-fast: build  ## the unit tier (pytest -m unit: no workload process, no browser, no long sampling), under a minute
	$(PY) -m pytest -q -m unit tests $(PYTEST_ARGS)

# C unit tests of the pure C parts (tests/native/c/test_c_units.c), linked against their sources with
# the extension's warning flags; CTEST_SAN adds sanitizer flags (scripts/asan.sh).
CTEST_DIR ?= build/ctest
CTEST_SAN ?=
CTEST_SRC := tests/native/c/test_c_units.c csrc/mw_linetable.c csrc/mw_profbuf.c csrc/mw_upload_json.c \
  csrc/mw_threads.c csrc/mw_labels.c csrc/mw_termguard.c csrc/mw_report.c csrc/mw_backlog.c csrc/mw_store.c
$(CTEST_DIR)/test_c_units: $(CTEST_SRC) csrc/mw_linetable.h csrc/mw_profbuf.h csrc/mw_upload_json.h \
  csrc/mw_threads.h csrc/mw_labels.h csrc/mw_termguard.h csrc/mw_cpusteal.h csrc/mw_report.h csrc/mw_backlog.h \
  csrc/mw_store.h
	@mkdir -p $(CTEST_DIR)
	$(CC) -std=gnu11 -Wall -Wextra -Werror -Wno-missing-field-initializers -Wno-unused-parameter \
	  -O1 -g $(CTEST_SAN) -Icsrc $$(pkg-config --cflags json-c) -o $@ $(CTEST_SRC) $$(pkg-config --libs json-c) \
	  -pthread

ctest: $(CTEST_DIR)/test_c_units  ## C unit tests: line tables (against every CPython 3.10-3.13 here), stack table limits, JSON reading, thread names, request counters, the SIGTERM guard, the perf count less steal, the store's backlog
	$(PY) -m pytest -q tests/native/test_c_units.py $(PYTEST_ARGS)

check: test lint  ## what CI runs: the suite, the sampler tests on the other CPythons 3.10-3.13 here, make lint
	@scripts/matrix.sh $(filter-out $(PY_VERSION),$(MATRIX_VERSIONS))

matrix:  ## run the sampler tests on every CPython 3.10-3.13 (a version asked for but missing fails the run)
	@scripts/matrix.sh $(MATRIX_VERSIONS)

wheels: bootstrap  ## the sdist and one manylinux wheel per CPython 3.10-3.13 in dist/, each tried in a fresh venv
	@scripts/wheels.sh $(MATRIX_VERSIONS)

asan:  ## build with AddressSanitizer+UBSan and run the sampler tests
	@scripts/asan.sh

bench: build  ## overhead benchmarks (profiled vs unprofiled, side by side)
	$(PY) bench/overhead.py
	$(PY) bench/overhead.py --rate 1000
	$(PY) bench/demo_throughput.py

peers: build  ## our profiler next to py-spy, austin, pyroscope-io, ddtrace (venv .venv-bench; PEERS_ARGS=--quick)
	@scripts/bench-venv.sh
	.venv-bench/bin/python bench/peers.py $(PEERS_ARGS)

demo:  ## run the Flask demo under gunicorn and show the calc3 bottleneck
	@scripts/demo.sh

lint: bootstrap  ## clang-format check of csrc/ and tests/native/c/, ruff (Python sources), mypy --strict (the package); all run, any finding fails
	@rc=0; \
	clang-format --dry-run --Werror $$(ls csrc/*.c csrc/*.h tests/native/c/*.c) || rc=1; \
	$(PY) -m ruff check --quiet middleware tests bench scripts || rc=1; \
	$(PY) -m mypy --strict middleware || rc=1; \
	exit $$rc

format:  ## clang-format csrc/ and tests/native/c/ in place (what lint checks)
	@clang-format -i $$(ls csrc/*.c csrc/*.h tests/native/c/*.c)

proto:  ## regenerate protobuf-c (C) and Python code from proto/*.proto
	@scripts/gen-proto.sh

clean:  ## remove build products
	rm -rf build middleware/*.so *.egg-info
