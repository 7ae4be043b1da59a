# The pipeline from the command line. `make help` lists the targets.
#   make all                         tokenizer -> pretrain (then sft -> reward -> ppo -> report as they land)
#   make pretrain ARGS="optim.lr=3e-4" RUN=lr3e-4 PRESET=smoke
# Every target first makes .venv (once; redone only when pyproject.toml changes).

SHELL := /bin/bash
.DEFAULT_GOAL := help
.NOTPARALLEL:

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build onto machines without a GPU.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.stamp-$(shell cksum pyproject.toml 2>/dev/null | cut -d' ' -f1)

RUN    ?= default
PRESET ?=
ARGS   ?=
STAGE_ARGS = run=$(RUN) $(if $(PRESET),preset=$(PRESET)) $(ARGS)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.stamp-* && touch $@

.PHONY: help setup all tokenizer pretrain test test-slow bench clean
help:  ## list the targets
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

setup: $(STAMP)  ## create .venv and install the project with its dev extras (once)

all: tokenizer pretrain  ## the whole pipeline on the default preset (what exists so far)
	@echo "pipeline done: runs/$(RUN)/"

tokenizer: $(STAMP)  ## train the BPE tokenizer on the corpus -> runs/$(RUN)/tokenizer/final
	$(PY) -m stages.tokenizer $(STAGE_ARGS)

pretrain: $(STAMP)  ## pretrain the causal LM -> runs/$(RUN)/pretrain/final
	$(PY) -m stages.pretrain $(STAGE_ARGS)

test: $(STAMP)  ## fast tests, end-to-end smoke included (~minutes on 2 cores)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## slower checks (marked slow)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)  ## benchmarks; figures go to stdout and bench/results.md
	$(PY) bench/pretrain_throughput.py

clean:  ## remove runs/ and generated data caches (keeps .venv)
	rm -rf runs .cache
