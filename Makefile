# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv with pip when it is missing and install torch (pinned CPU-friendly
# wheel) plus this project in editable mode with its dev extras.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test install clean bench data browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole chain on the embedded default; opens nothing, prints where report.html is. The first run on a
# new machine measures a quick profile of this CPU (cached in ~/.cache/muxtune/profiles afterwards).
demo: $(STAMP)
	$(BIN)/plan-and-run examples/quickstart.yaml

# Headless Chromium for tests/test_report.py's render check (Debian/Ubuntu, root). Best effort: where apt
# cannot install it the render test reports itself skipped, naming this target.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	  echo "make browser: could not install chromium; the report render test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.mux_vs_separate

data:
	$(PY) examples/make_data.py --out examples/data

clean:
	rm -rf $(VENV) runs build *.egg-info
