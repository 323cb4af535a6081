# The front door. `make bench` and `make test` set everything up on a fresh machine and run.
# torch: an existing install (e.g. a CUDA build on a GPU machine) is kept; otherwise the local
# CPU wheel torch==2.13.0 is installed. The extension is built against that torch
# (--no-build-isolation: an isolated build would fetch torch again).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check
export MAX_JOBS ?= 2

.PHONY: setup test bench bench-suite study results gpu-check

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) "triton>=3.6"
	@$(PIP) setuptools wheel ninja numpy tqdm matplotlib scikit-learn pytest expecttest pytest-benchmark pyyaml pillow onnx onnxscript onnxruntime build
	@# torchvision + timm for tests/test_integration_*.py (their pure-Python model code; tests/model_zoo.py
	@# imports torchvision's CUDA wheel on the CPU torch); --no-deps keeps the installed torch.
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torchvision') and u.find_spec('timm')))" \
		|| $(PIP) --no-deps torchvision==0.28.0 timm==1.0.31
	$(PIP) --no-build-isolation -e .
	@$(PYTHON) -c "import normkernels as nk; print('normkernels backends:', nk.backends())"

test: setup
	$(PYTHON) -m pytest tests -q -p no:cacheprovider

bench: setup
	$(PYTHON) benchmarks/bench.py --quick

bench-suite: setup
	$(PYTHON) -m pytest benchmarks -q --benchmark-only

study: setup
	$(PYTHON) -m normkernels study --quick

# Regenerate the committed results for this machine's device.
results: setup
	$(PYTHON) benchmarks/bench.py --e2e --write-results benchmarks/results

# GPU readiness (issues #11, #19). One prepared command for a fresh GPU machine that fits the ~7
# minutes a lent machine gives one command (deadline 400 s): the Triton AOT compile first (it fills
# Triton's cache for what follows), the sm_90 build, the op tests on the GPU, the benchmark (nk vs
# torch, then torch.compile), the ResNet-50 step, each stage with its own cap (the caps add up to
# less than the deadline), results written atomically into $(GPU_CHECK_OUT) (default
# benchmarks/results). Without a GPU: a rehearsal of the same plumbing on the CPU (CI runs it:
# tests/test_gpu_check.py). No `setup` prerequisite: the GPU machine has no package registry.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py
