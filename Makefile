# loraswap: `make serve` and `make test` work on a fresh Linux machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PACKAGES := basemodel service adapters training

.PHONY: install serve test lint typecheck pytest clean bench bench-gpu demo faults fuzz load

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# No GPU here: take torch's CPU build (a plain `torch` would pull a multi-GB CUDA build).
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	else $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/loraswap model init-tiny --if-missing
	$(VENV)/bin/loraswap serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two workers on the two cores of the reference machine (each test process runs one intra-op thread, see
# tests/conftest.py); a file's tests stay on one worker, so module and session fixtures are built once per
# worker. PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test: lint typecheck pytest

SHAPE ?= tiny
bench: $(STAMP)  # hot-swap benchmark: make bench [SHAPE=sd15|sdxl|sd3|flux]; training: $(PY) -m loadtests.bench_train
	$(PY) -m loadtests.bench_swap --shape $(SHAPE)

bench-gpu: $(STAMP)  # every GPU row of every shape (sd15, sdxl, sd3, flux) in ≤9 min on one H100; DRY=1: CPU rehearsal
	$(PY) -m loadtests.bench_gpu $(if $(DRY),--dry,)

# The reliability suites (docs/reliability.md); results under $(RESULTS) (git-ignored).
# Bounded variants: make faults FAULTS_ARGS=--quick, make load LOAD_ARGS=--quick, make fuzz FUZZ_ARGS='--cases 500'
RESULTS ?= loadtests/results
faults: $(STAMP)  # store outages through the fault proxy, then kill -9 of the CLI and the server
	$(PY) -m loadtests.faults --out $(RESULTS)/faults.json $(FAULTS_ARGS)

fuzz: $(STAMP)  # Hypothesis on the adapter reader/normaliser, schemathesis against /schema
	$(PY) -m loadtests.fuzz all $(FUZZ_ARGS)

load: $(STAMP)  # locust over a Zipf mix of 50 adapters, ramp to saturation, 3-minute soak
	$(PY) -m loadtests.load $(LOAD_ARGS)

DEMO_BASE ?= tiny-sd
DEMO_ARGS ?=
demo: $(STAMP)  # "A LoRA you can see" (docs/training.md): synth a brown concept, train, score base vs adapter
	$(PY) -m loadtests.lora_demo --base-model $(DEMO_BASE) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .loraswap .pytest_cache .mypy_cache .ruff_cache *.egg-info
