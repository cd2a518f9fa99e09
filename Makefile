# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv with pip when it is missing and install every dependency from requirements.lock
# (pip-compile --generate-hashes: each transitive version pinned and hash-checked; torch is the pinned CPU
# wheel), then this project in editable mode without resolving anything again (--no-deps).
# `make lock` refreshes the lock from pyproject.toml's ranges; `make check-latest` tries the newest
# versions those ranges allow in a scratch venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test install clean bench data browser malloc lock check-latest

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP) malloc

# The whole chain on the embedded default; opens nothing, prints where report.html is. The first run on a
# new machine measures a quick profile of this CPU (cached in ~/.cache/muxtune/profiles afterwards).
demo: $(STAMP) malloc
	$(BIN)/plan-and-run examples/quickstart.yaml

# Headless Chromium for tests/test_report.py's render check (Debian/Ubuntu, root). Best effort: where apt
# cannot install it the render test reports itself skipped, naming this target.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	  echo "make browser: could not install chromium; the report render test will be skipped"

# tcmalloc, which the commands that train start themselves on (muxtune/allocator.py: glibc's malloc keeps what
# steps free, ~1.5x the tensors' memory). Debian/Ubuntu, root; best effort: without it they use glibc's malloc.
malloc:
	@ldconfig -p | grep -q libtcmalloc_minimal.so.4 || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null) || \
	  echo "make malloc: could not install tcmalloc (libtcmalloc-minimal4); training runs on glibc's malloc"

# -P: the checkout root is never on sys.path (our top-level kernels/ would shadow the `kernels` package
# that transformers imports; tests/test_install.py checks every entry point).
test: $(STAMP) browser malloc
	$(BIN)/python -P -m pytest -q tests

# Refresh the lock after changing pyproject.toml's dependencies (see README, "Dependencies").
lock:
	test -x .lock-venv/bin/pip-compile || ($(PY) -m venv .lock-venv && .lock-venv/bin/pip install --quiet pip-tools)
	.lock-venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
	  --extra dev --strip-extras --output-file requirements.lock pyproject.toml

# The newest versions pyproject.toml's ranges allow, in a scratch venv, on a fast subset of the tests.
check-latest:
	$(PY) tools/check_latest.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.mux_vs_separate

data:
	$(PY) examples/make_data.py --out examples/data

clean:
	rm -rf $(VENV) .lock-venv runs build *.egg-info
