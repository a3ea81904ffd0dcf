# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv at the repository root and install the pinned requirements. Nothing is compiled
# up front: the CPU kernel is built on its first use, once per machine and torch, into the cache
# folder (~/.cache/rkkd_kernels, or $RKKD_CACHE_DIR), and the CUDA kernel only where a GPU is (the
# test suite compiles it once where nvcc can, to catch compile errors).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.stamp-requirements
export PYTHONPATH := $(CURDIR)

.PHONY: demo test build venv bench gpu-check clean

venv: $(INSTALLED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Build the kernels now instead of on first use (the CUDA one where a GPU is, or RKKD_BUILD_CUDA=1)
# and print what this installation has.
build: $(INSTALLED)
	$(PY) -m rkkd_kernels --build

test: $(INSTALLED)
	$(PY) -m pytest tests -ra

demo: $(INSTALLED)
	$(PY) -m train.demo --out runs/demo

bench: $(INSTALLED)
	$(PY) -m benchmarks.bench_kendall

# On a machine with a CUDA GPU: build, the whole suite on CUDA tensors, the GPU benchmark (~10 min).
gpu-check: $(INSTALLED)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh benchmarks/results/gpu_check

# Build outputs of the clone (the kernels built on first use live in the cache folder above).
clean:
	rm -rf build dist rkkd_kernels/_prebuilt *.egg-info
