# The two commands of the quick start:
#   make run    set up (virtual environment + install) and run the main job on the bundled letter data
#   make test   set up and run the whole test suite; the test of the dashboard's training page
#               runs in a headless Chromium and is skipped without one (Debian/Ubuntu:
#               apt-get install chromium chromium-driver)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORES := data/stores
RUNS := runs
# style is enforced, not claimed: ruff's lint rules (pyproject.toml, lines of at most 120
# characters) and ruff's formatter over every Python file of the project
CODE := pipeline kernels tests bench cluster docs

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,plot]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/pipeline ingest data/letter/letter-recognition.data $(STORES)/letter-train.zarr \
	    --target 0 --rows 0:16000 --force
	$(BIN)/pipeline ingest data/letter/letter-recognition.data $(STORES)/letter-test.zarr \
	    --target 0 --rows 16000: --like $(STORES)/letter-train.zarr --force
	$(BIN)/pipeline inspect $(STORES)/letter-train.zarr
	$(BIN)/pipeline train $(STORES)/letter-train.zarr --out $(RUNS)/letter --force --workers 2 \
	    --report $(RUNS)/letter-report.html
	$(BIN)/pipeline evaluate $(RUNS)/letter $(STORES)/letter-test.zarr
	@echo "model, history and checkpoint: $(RUNS)/letter/  performance report: $(RUNS)/letter-report.html"

# two test processes (pytest-xdist), one test module each at a time: module-scoped clusters are made
# once, and a module waiting on processes or timeouts leaves the other core to the next module
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

lint: $(VENV)/.installed
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,plot,bench]"
	$(BIN)/python -m bench

clean:
	rm -rf $(STORES) $(RUNS) bench/out
