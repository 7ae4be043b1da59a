"""The stages of the pipeline, in the order `make all` runs them: one spec each, and the only place the list lives.

    python -m pipeline.core.registry              # the stage names in order (the Makefile reads its targets from here)
    python -m pipeline.core.registry --describe   # one line each, for make help

A spec says what the rest of the house needs to know about a stage without importing it: the config schema it
composes on (pipeline/core/config.py), the stages whose final/ it reads, which parts of `data` it reads (the rest
stays out of its config hash, so changing PPO's prompts does not redo pretraining), the metrics the report card and
`make compare` show first, and whether its final/ is a chat model. Adding a stage is a script in stages/, a root
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

    @property
    def module(self) -> str:
        return f"stages.{self.name}"


_WORLD = ("world.seed", "world.n_entities")
_CORPUS = (*_WORLD, "world.corpus_docs", "corpus", "max_docs")

STAGES: tuple[StageSpec, ...] = (
    StageSpec("tokenizer", "train the BPE tokenizer on the corpus", "TokenizerConfig",
              data=_CORPUS, headline=("tokenizer/vocab_size", "tokenizer/chars_per_token")),
    StageSpec("pretrain", "pretrain the causal LM", "PretrainConfig", parents=("tokenizer",),
              data=(*_CORPUS, "val_fraction"), headline=("eval/loss", "eval/perplexity", "model/params"), policy=True),
    StageSpec("sft", "supervised fine-tuning on demonstrations (TRL)", "SFTConfig", parents=("pretrain",),
              data=(*_WORLD, "world.sft_dialogues", "world.sft_eval_dialogues", "world.bad_fraction",
                    "world.habit_scale", "world.eval_prompts", "sft", "sft_eval", "eval_prompts"),
              headline=("eval/loss", "eval/gold_score", "eval/pretrain_gold_score"), policy=True),
    StageSpec("reward", "reward model on ranked pairs (TRL)", "RewardConfig", parents=("sft",),
              data=("world", "preference", "preference_test", "prompts"),
              headline=("eval/accuracy", "eval/gold_accuracy", "eval/ece")),
    StageSpec("ppo", "RLHF with PPO against the reward model", "PPOConfig", parents=("sft", "reward"),
              data=("world", "prompts", "eval_prompts", "corpus"),
              headline=("eval/gold_score", "eval/sft_gold_score", "eval/win_rate_vs_sft", "eval/kl", "eval/reward",
                        "eval/sampled/gold_score", "eval/sampled/sft_gold_score", "eval/sampled/win_rate_vs_sft",
                        "eval/sampled/kl"), policy=True),
)

SPECS: dict[str, StageSpec] = {s.name: s for s in STAGES}
ORDER: tuple[str, ...] = tuple(SPECS)
# newest first: the policy chat, generate and the report pick when none is named
POLICY_STAGES: tuple[str, ...] = tuple(s.name for s in reversed(STAGES) if s.policy)


def spec(name: str) -> StageSpec:
    if name not in SPECS:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(ORDER)}")
    return SPECS[name]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--describe"]:  # make help
        print("\n".join(f"{s.name}\t{s.help} -> runs/<run>/{s.name}/final" for s in STAGES))
    else:
        print(" ".join(ORDER))
