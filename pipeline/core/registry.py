"""The stages of the pipeline, in the order `make all` runs them: one spec each, and the only place the list lives.

    python -m pipeline.core.registry              # the stage names in order (the Makefile reads its targets from here)
    python -m pipeline.core.registry --methods    # the method stages (make methods runs them; make all does not)
    python -m pipeline.core.registry --describe   # one line each, for make help

A spec says what the rest of the house needs to know about a stage without importing it: the config schema it
composes on (pipeline/core/config.py), the stages whose final/ it reads, which parts of `data` it reads (the rest
stays out of its config hash, so changing PPO's prompts does not redo pretraining), the metrics the report card and
`make compare` show first, whether its final/ is a chat model, and whether `make all` runs it: the other ways to learn
from preferences (DPO, RLOO, GRPO, best-of-n, expert iteration) are stages with parents, manifests and targets like
the rest, but they are alternatives to PPO rather than steps after it, so `make methods` runs them on demand and the
chain stays within its time budget. Adding a stage is a script in stages/, a root
config in conf/, its schema, and one spec here (CONTRIBUTING.md walks through it).

Standard library only: the Makefile runs this file with the system Python, before any virtual environment exists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str  # the stage's folder in runs/<run>/, its make target and its script, stages/<name>.py
    help: str  # one line for `make help`: what it makes
    schema: str  # the name of its structured config in pipeline/core/config.py
    parents: tuple[str, ...] = ()  # stages whose final/ it reads; each must be complete first
    data: tuple[str, ...] = ()  # the parts of cfg.data it reads ("world.x": one field of the world config)
    headline: tuple[str, ...] = ()  # the figures that say what it did, in the order a reader wants them
    policy: bool = False  # its final/ is a causal LM that chat, generate and serve can talk to
    chain: bool = True  # `make all` runs it; False: a method stage, run by `make <name>` or `make methods`

    @property
    def module(self) -> str:
        return f"stages.{self.name}"


_WORLD = ("world.seed", "world.n_entities")
# every method's figures come from one evaluation (sampled: best-of-n has no greedy form), so they line up
_METHOD = (
    "eval/sampled/gold_score",
    "eval/sampled/sft_gold_score",
    "eval/sampled/win_rate_vs_sft",
    "eval/sampled/win_rate_ci_low",
    "eval/sampled/win_rate_ci_high",
    "eval/sampled/kl",
    "eval/gold_score",
    "eval/win_rate_vs_sft",
)
_CORPUS = (*_WORLD, "world.corpus_docs", "corpus", "max_docs")

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "tokenizer",
        "train the BPE tokenizer on the corpus",
        "TokenizerConfig",
        data=_CORPUS,
        headline=("tokenizer/vocab_size", "tokenizer/chars_per_token"),
    ),
    StageSpec(
        "pretrain",
        "pretrain the causal LM",
        "PretrainConfig",
        parents=("tokenizer",),
        data=(*_CORPUS, "val_fraction"),
        headline=("eval/loss", "eval/perplexity", "model/params"),
        policy=True,
    ),
    StageSpec(
        "sft",
        "supervised fine-tuning on demonstrations (TRL)",
        "SFTConfig",
        parents=("pretrain",),
        data=(
            *_WORLD,
            "world.sft_dialogues",
            "world.sft_eval_dialogues",
            "world.bad_fraction",
            "world.habit_scale",
            "world.eval_prompts",
            "sft",
            "sft_eval",
            "eval_prompts",
        ),
        headline=("eval/loss", "eval/gold_score", "eval/pretrain_gold_score"),
        policy=True,
    ),
    StageSpec(
        "reward",
        "reward model on ranked pairs (TRL)",
        "RewardConfig",
        parents=("sft",),
        data=("world", "preference", "preference_test", "prompts"),
        headline=("eval/accuracy", "eval/gold_accuracy", "eval/ece"),
    ),
    StageSpec(
        "ppo",
        "RLHF with PPO against the reward model",
        "PPOConfig",
        parents=("sft", "reward"),
        data=("world", "prompts", "eval_prompts", "corpus"),
        headline=(
            "eval/gold_score",
            "eval/sft_gold_score",
            "eval/win_rate_vs_sft",
            "eval/kl",
            "eval/reward",
            "eval/sampled/gold_score",
            "eval/sampled/sft_gold_score",
            "eval/sampled/win_rate_vs_sft",
            "eval/sampled/kl",
        ),
        policy=True,
    ),
    # the methods: each starts from the same SFT policy and learns from the same comparisons (or reward model), and
    # each is scored by pipeline.eval.gold.versus_sft, as PPO's final evaluation is
    StageSpec(
        "bon",
        "best-of-n at inference time with the reward model (no new weights)",
        "BoNConfig",
        parents=("sft", "reward"),
        data=("world", "eval_prompts"),
        chain=False,
        headline=_METHOD,
    ),
    StageSpec(
        "dpo",
        "DPO on the reward stage's comparisons (TRL)",
        "DPOConfig",
        parents=("sft", "reward"),
        data=("world", "preference", "eval_prompts"),
        headline=_METHOD,
        policy=True,
        chain=False,
    ),
    StageSpec(
        "expert_iteration",
        "best of n SFT samples by the reward model, fine-tuned on (rounds)",
        "ExpertIterationConfig",
        parents=("sft", "reward"),
        data=("world", "prompts", "eval_prompts"),
        headline=_METHOD,
        policy=True,
        chain=False,
    ),
    StageSpec(
        "rloo",
        "RLOO against the reward model (TRL)",
        "RLOOConfig",
        parents=("sft", "reward"),
        data=("world", "prompts", "eval_prompts"),
        headline=_METHOD,
        policy=True,
        chain=False,
    ),
    StageSpec(
        "grpo",
        "GRPO against the reward model (TRL)",
        "GRPOConfig",
        parents=("sft", "reward"),
        data=("world", "prompts", "eval_prompts"),
        headline=_METHOD,
        policy=True,
        chain=False,
    ),
)

SPECS: dict[str, StageSpec] = {s.name: s for s in STAGES}
ORDER: tuple[str, ...] = tuple(s.name for s in STAGES if s.chain)  # make all, in order
METHODS: tuple[str, ...] = tuple(s.name for s in STAGES if not s.chain)  # make methods, in order
# newest first: the policy chat, generate and the report pick when none is named (the chain's; a method's by name)
POLICY_STAGES: tuple[str, ...] = tuple(s.name for s in reversed(STAGES) if s.policy and s.chain)
POLICIES: tuple[str, ...] = tuple(s.name for s in reversed(STAGES) if s.policy)  # every chat model stage=... names


# ---- rounds of iterated RLHF (make iterate): round r > 1 of a stage lives in its own folder of the run ----------
ROUND_STAGES: tuple[str, ...] = ("reward", "ppo", "dpo")  # the stages a round of make iterate remakes


def stage_folder(name: str, round: int = 1) -> str:
    """The folder of `name`'s round `round` in runs/<run>/: the stage's own name for round 1 (the one-shot stage
    make all makes), <name>_r<round> for the later rounds of make iterate (reward_r2, ppo_r2, ...)."""
    return name if round <= 1 else f"{name}_r{round}"


def split_folder(folder: str) -> tuple[str, int]:
    """stage_folder's inverse: 'ppo_r3' -> ('ppo', 3), 'ppo' -> ('ppo', 1)."""
    head, sep, tail = folder.rpartition("_r")
    if sep and tail.isdigit() and head in ROUND_STAGES and int(tail) > 1:
        return head, int(tail)
    return folder, 1


def spec(name: str) -> StageSpec:
    if name not in SPECS:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(SPECS)}")
    return SPECS[name]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--describe"]:  # make help
        print("\n".join(f"{s.name.replace('_', '-')}\t{s.help} -> runs/<run>/{s.name}/final" for s in STAGES))
    elif sys.argv[1:] == ["--methods"]:
        print(" ".join(METHODS))
    else:
        print(" ".join(ORDER))
