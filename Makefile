# The pipeline from the command line. `make help` lists the targets.
#   make all                         tokenizer -> pretrain -> sft -> reward -> ppo -> report
#   make iterate ROUNDS=3            then rounds 2..3: fresh comparisons -> reward_r<r> -> ppo_r<r> (docs/ppo.md)
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
comma := ,

# The training stages, in order, come from their specs (pipeline/core/registry.py: standard library only, so the
# system Python reads it before .venv exists); each is `python -m stages.<name>`. The method stages (DPO, RLOO,
# GRPO, best-of-n, expert iteration) are alternatives to PPO, not steps of make all: make methods runs them.
STAGES := $(shell $(PYTHON) -m pipeline.core.registry)
ifeq ($(STAGES),)
$(error cannot read the stage list: $(PYTHON) -m pipeline.core.registry failed (run make from the repository root))
endif
METHODS := $(shell $(PYTHON) -m pipeline.core.registry --methods)
DASHED  := $(foreach m,$(METHODS),$(if $(findstring _,$(m)),$(subst _,-,$(m))))  # make expert-iteration: stages.expert_iteration

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.stamp-* && touch $@

.PHONY: help setup all $(STAGES) $(METHODS) $(DASHED) methods iterate report compare chat serve generate reward-data lint test test-slow bench clean
help:  ## list the targets
	@grep -hE '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14
	@$(PYTHON) -m pipeline.core.registry --describe | expand -t 14

setup: $(STAMP)  ## create .venv and install the project with its dev extras (once)

all: $(STAGES) report  ## the whole pipeline, ending with the report card

$(STAGES) $(METHODS): $(STAMP)
	$(PY) -m stages.$@ $(STAGE_ARGS)

$(DASHED): $(STAMP)
	$(PY) -m stages.$(subst -,_,$@) $(STAGE_ARGS)

methods: $(STAMP)  ## every method on the run's SFT policy and reward model -> runs/<run>/methods.md (after make all)
	@set -e; for m in $(METHODS); do echo "$(PY) -m stages.$$m $(STAGE_ARGS)"; $(PY) -m stages.$$m $(STAGE_ARGS); done
	$(PY) -m stages.tools.methods run=$(RUN) $(filter paths.%,$(ARGS))

ROUNDS ?= 3
METHOD ?= ppo
iterate: $(STAMP)  ## iterated RLHF after make all: rounds 2..ROUNDS (3) of fresh labels, reward update, PPO -> runs/<run>/rounds.md
	@set -e; for r in $$(seq 2 $(ROUNDS)); do \
	  if [ "$(METHOD)" = dpo ]; then steps="dpo"; else steps="reward ppo"; fi; \
	  for s in $$steps; do echo "$(PY) -m stages.$$s round=$$r $(STAGE_ARGS)"; \
	    $(PY) -m stages.$$s round=$$r iterate.policy=$(METHOD) $(STAGE_ARGS); done; done
	$(PY) -m stages.tools.rounds run=$(RUN) method=$(METHOD) $(filter paths.%,$(ARGS))

report: $(STAMP)  ## report card: runs/<run>/report.md with plots and side-by-side answers
	$(PY) -m stages.tools.report run=$(RUN) $(if $(PRESET),preset=$(PRESET)) $(ARGS)

RUNS ?=
compare: $(STAMP)  ## several runs side by side: make compare RUNS="a b" -> runs/compare.md
	$(PY) -m stages.tools.compare 'runs=[$(subst $(eval) ,$(comma),$(strip $(RUNS)))]' $(ARGS)

chat: $(STAMP)  ## chat in the terminal with the latest stage of the run (ARGS="stage=sft" to pick one)
	$(PY) -m stages.tools.chat run=$(RUN) $(ARGS)

serve: $(STAMP)  ## OpenAI-compatible API + chat page on 127.0.0.1:8000 (ARGS as for chat; docs/serving.md)
	$(PY) -m stages.tools.serve run=$(RUN) $(ARGS)

generate: $(STAMP)  ## responses for a prompts file: make generate ARGS="input=prompts.jsonl"
	$(PY) -m stages.tools.generate run=$(RUN) $(ARGS)

reward-data: $(STAMP)  ## regenerate reward_data/ byte for byte from the seeded world
	$(PY) -m pipeline.world.datasets reward-data --out reward_data

test: $(STAMP)  ## fast tests, end-to-end smoke included (~minutes on 2 cores; installs chromium for the chat page)
	@bash .ci/browser
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff: the linter and the formatter's check (ruff format . fixes the format)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-slow: $(STAMP)  ## slower checks (marked slow)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)  ## the benchmark suite (~1 h on 2 cores, idle machine); figures to stdout and bench/results.md
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/pipeline_time.py --presets smoke cpu --runs-root bench/out/runs
	$(PY) bench/ppo_vs_trl.py --preset cpu --runs-root bench/out/runs/cpu --run default
	$(PY) bench/bon_frontier.py --runs-root bench/out/runs/cpu --run default
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) bench/serve_throughput.py --checkpoint bench/out/runs/cpu/default/sft/final --threads 1
	$(PY) bench/serve_throughput.py --checkpoint bench/out/runs/cpu/default/sft/final --threads 1 --client openai

clean:  ## remove runs/ and generated data caches (keeps .venv)
	rm -rf runs .cache
