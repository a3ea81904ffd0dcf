# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv at the repository root, install the pinned requirements, and build the compiled
# kernels in place (setup.py: the CPU library, and the CUDA kernel where nvcc is), again only when
# csrc/ or setup.py changed since the last build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.stamp-requirements
BUILT := build/.stamp-kernels
KERNEL_SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
export PYTHONPATH := $(CURDIR)

.PHONY: demo test build venv bench gpu-check wheel clean

venv: $(INSTALLED)

$(INSTALLED): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The kernels, into rkkd_kernels/ (setup.py rebuilds only the objects whose inputs changed).
build: $(BUILT)

$(BUILT): $(INSTALLED) $(KERNEL_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	@mkdir -p $(dir $@) && touch $@

test: $(BUILT)
	$(PY) -m pytest tests -ra

demo: $(BUILT)
	$(PY) -m train.demo --out runs/demo

bench: $(BUILT)
	$(PY) -m benchmarks.bench_kendall

# The binary wheel, as pip builds it for users (into dist/).
wheel: $(INSTALLED)
	$(PY) -m pip wheel --no-deps -w dist .

# On a machine with a CUDA GPU: the whole suite on CUDA tensors, the GPU benchmark (~10 min).
gpu-check: $(BUILT)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh benchmarks/results/gpu_check

clean:
	rm -rf build dist *.egg-info rkkd_kernels/*.so rkkd_kernels/_build_info.json
