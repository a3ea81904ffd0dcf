# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv at the repository root, install the pinned requirements and build the
# extensions; a second run rebuilds nothing that has not changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.stamp-requirements
BUILT := build/.stamp-extensions
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
export PYTHONPATH := $(CURDIR)

.PHONY: demo test build venv bench gpu-check clean

venv: $(INSTALLED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

build: $(BUILT)

# --no-build-isolation is implicit here: setup.py runs in .venv, next to the pinned torch.
$(BUILT): $(INSTALLED) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py build_ext --inplace
	mkdir -p build && touch $@

test: $(BUILT)
	$(PY) -m pytest tests -ra

demo: $(BUILT)
	$(PY) -m train.demo --out runs/demo

bench: $(BUILT)
	$(PY) -m benchmarks.bench_kendall

# On a machine with a CUDA GPU: build, the whole suite on CUDA tensors, the GPU benchmark (~10 min).
gpu-check: $(INSTALLED)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh benchmarks/results/gpu_check

clean:
	rm -rf build rkkd_kernels/*.so
