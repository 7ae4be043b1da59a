"""Structured config schema for every stage.

Each root config in conf/ starts from one of these dataclasses, so a mistyped key or a wrong type fails at
composition time with Hydra's own error naming the key. Groups (model, data, optim, logger, paths, preset)
merge on top. Values that differ per preset live in conf/preset/, not here: the defaults below are only the
shape and a sane fallback.

Every field carries its help text in `metadata={"help": ...}` (through `opt` and `group`), as TRL's dataclasses do:
`describe(name)` prints them for a command's `--help`, and tests/test_config_help.py checks that none is missing.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.core.registry import STAGES


def opt(
    default: Any, help: str, *, choices: Optional[tuple] = None, positive: bool = False, between: Optional[tuple] = None
) -> Any:
    """A field with a plain default, its help text, and what a valid value is: one of `choices`, above 0
    (`positive`), or within `between` = (low, high), inclusive (None: no bound on that side). `problems` checks
    them on a composed config (null always passes: a value left unset)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if positive:
        meta["positive"] = True
    if between is not None:
        meta["between"] = tuple(between)
    return field(default=default, metadata=meta)


def group(factory: Callable[[], Any], help: str) -> Any:
    """A field whose default `factory` builds (a nested config, a list), and its help text."""
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class PathsConfig:
    root: str = opt("runs", "folder holding every run: a stage writes <root>/<run>/<stage>/")
    cache: str = opt(
        ".cache",
        "folder for the generated synthetic data (corpus, dialogues, prompts), one subfolder "
        "per world config and generating code, reused by every run with the same world",
    )


@dataclass
class LoggerConfig:
    backend: str = opt(
        "wandb", "wandb | none (metrics.jsonl in the stage folder is always written)", choices=("wandb", "none")
    )
    project: str = opt("rlhf-pipeline", "the W&B project; each run is a group in it, each stage a job type")
    entity: Optional[str] = opt(None, "the W&B entity (user or team); null: the logged-in account's default")
    mode: str = opt(
        "auto",
        "auto (online iff an API key is configured) | online | offline | disabled (no W&B at all); the WANDB_MODE "
        "environment variable wins",
        choices=("auto", "online", "offline", "disabled"),
    )
    log_model: bool = opt(True, "upload each stage's final/ as a model artifact")


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = opt(
        None,
        "a Hugging Face causal LM (hub name or local folder); null: build `arch` from scratch with the sizes below",
    )
    arch: str = opt(
        "llama",
        "llama (a Llama-style model built from the sizes below) | hf (load name_or_path)",
        choices=("llama", "hf"),
    )
    vocab_size: int = opt(
        4096, "the tokenizer stage trains to this size (the built model takes the trained tokenizer's actual size)"
    )
    hidden_size: int = opt(256, "width of the built model's residual stream (a multiple of num_heads)", positive=True)
    num_layers: int = opt(4, "transformer layers of the built model", positive=True)
    num_heads: int = opt(4, "attention heads of the built model", positive=True)
    num_kv_heads: int = opt(
        4,
        "key/value heads (grouped-query attention; num_heads must be a multiple of it; "
        "= num_heads: plain multi-head attention)",
    )
    intermediate_size: int = opt(688, "hidden width of the built model's SwiGLU MLP")
    max_seq_len: int = opt(
        256,
        "context length in tokens of the built model; also the default pretraining block "
        "size and the SFT / reward max_length",
        positive=True,
    )
    rope_theta: float = opt(10000.0, "base of the rotary position embedding's frequencies")
    tie_embeddings: bool = opt(True, "share the input embedding matrix with the output projection")
    dropout: float = opt(0.0, "attention dropout of the built model (PPO turns every dropout off)")
    trust_remote_code: bool = opt(
        False, "let transformers run a hub model's own modelling code (from_pretrained's trust_remote_code)"
    )
    start_over: bool = opt(
        False,
        "sft with name_or_path set: start from name_or_path itself even when this run has "
        "a finished pretrain stage (by default sft continues from the run's own pretrained "
        "model, so make all with model=hf does continued pretraining, then SFT on it)",
    )


@dataclass
class WorldConfig:
    """The seeded synthetic world (pipeline/world/world.py) and the sizes of everything generated from it."""

    seed: int = opt(
        1234,
        "seed of the synthetic world: its entities and every dataset generated from it (the "
        "training seed is the top-level `seed`); reward_data/ was generated with 1234",
    )
    n_entities: int = opt(
        40,
        "entities in the world, each named in hundreds of corpus documents. Sized to the cpu "
        "preset's 2M-parameter model (docs/world.md). Measured on its pretrained model, "
        "completing a fact sentence: 300 entities gave SFT a held-out correctness of 0.39; 80 "
        "entities 29% of facts recalled, 40 entities 49% (77% with the preset's lr 4e-3; 71% of "
        "every fact once sums and lists left the corpus, 81% with twice the pretraining); at least 20",
        between=(20, None),
    )
    corpus_docs: int = opt(60000, "pretraining documents generated (data.corpus with kind world)")
    sft_dialogues: int = opt(6000, "demonstration dialogues generated for SFT training (data.sft with kind world)")
    sft_eval_dialogues: int = opt(
        300, "held-out demonstration dialogues for SFT's eval/loss (data.sft_eval with kind world)"
    )
    bad_fraction: float = opt(0.1, "share of demonstrations that are plainly flawed: a wrong fact or a curt fragment")
    habit_scale: float = opt(
        1.0, "times the demonstrators' habit rates (pipeline.world.responses.HABITS); 0: no habits"
    )
    reward_prompts: int = opt(
        3000,
        "ranked prompts in the world's reward training split (data.preference): the "
        "first N of reward_data/train.jsonl, generated afresh if it holds fewer or the "
        "world differs",
    )
    reward_test_prompts: int = opt(
        300, "ranked prompts in the world's reward test split (data.preference_test, reward_data/test.jsonl)"
    )
    k: int = opt(
        4, "candidate responses per ranked prompt, K (2 to 9), expanded to up to K(K-1)/2 pairs", between=(2, 9)
    )
    label_temperature: float = opt(
        0.21,
        "Plackett-Luce temperature with which the simulated labellers rank the "
        "gold scores (higher: noisier); calibrated: ~75% pairwise agreement with "
        "the gold ranking",
    )
    eval_prompts: int = opt(200, "held-out evaluation prompts generated (data.eval_prompts with kind world)")
    ppo_prompts: int = opt(
        2000,
        "prompts generated for PPO training (data.prompts with kind world; the reward "
        "stage's statistics are measured on them too)",
    )


@dataclass
class SourceConfig:
    """Where one kind of data comes from (see pipeline/data/formats.py for the formats)."""

    kind: str = opt(
        "world",
        "world (built-in synthetic data) | local (files) | hub (a datasets name)",
        choices=("world", "local", "hub"),
    )
    path: Optional[str] = opt(None, "file, glob or hub dataset name; `{split}` in a local path is replaced by split")
    name: Optional[str] = opt(None, "hub dataset config")
    split: str = opt(
        "train",
        "the hub split, or the local path's `{split}`; kind world picks the file with it: sft "
        "train | eval, preferences train | test, prompts ppo | eval",
    )
    format: str = opt(
        "auto",
        "text | messages | prompt_completion | pairs | hh | ranked | prompts; auto: the "
        "loader's default, or told apart by the records' fields",
    )
    field: Optional[str] = opt(None, "column override (text or messages column; the prompt column for prompts)")
    on_bad_record: str = opt(
        "error", "error | skip (skips are counted in the log and manifest)", choices=("error", "skip")
    )


@dataclass
class DataConfig:
    world: WorldConfig = group(
        WorldConfig,
        "the seeded synthetic world and the sizes of the datasets generated "
        "from it (every source of kind world, and the gold oracle)",
    )
    corpus: SourceConfig = group(
        lambda: SourceConfig(format="text"), "pretraining documents: the tokenizer, pretraining and PPO-ptx read them"
    )
    sft: SourceConfig = group(lambda: SourceConfig(format="messages"), "demonstration dialogues SFT trains on")
    sft_eval: SourceConfig = group(
        lambda: SourceConfig(format="messages", split="eval"), "held-out demonstrations for SFT's eval/loss"
    )
    preference: SourceConfig = group(
        lambda: SourceConfig(format="ranked", split="train"), "comparisons the reward model trains on"
    )
    preference_test: SourceConfig = group(
        lambda: SourceConfig(format="ranked", split="test"),
        "held-out comparisons for the reward model's accuracy and calibration",
    )
    prompts: SourceConfig = group(
        lambda: SourceConfig(format="prompts", split="ppo"),
        "prompts PPO trains on; the reward stage measures its reward statistics on them",
    )
    eval_prompts: SourceConfig = group(
        lambda: SourceConfig(format="prompts", split="eval"),
        "held-out prompts of the gold evaluations (SFT, PPO, the report)",
    )
    val_fraction: float = opt(0.02, "held-out share of the pretraining corpus (by document)")
    max_docs: Optional[int] = opt(None, "cap the corpus at its first N documents (quick experiments); null: all")


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "peak learning rate of AdamW, reached after warmup_steps")
    min_lr_ratio: float = opt(0.1, "cosine decays to lr * min_lr_ratio by the last step")
    warmup_steps: int = opt(50, "optimizer steps of linear warmup from 0 to lr")
    weight_decay: float = opt(0.1, "AdamW's decoupled weight decay")
    beta1: float = opt(0.9, "AdamW's beta1: decay rate of the gradient's running mean")
    beta2: float = opt(0.95, "AdamW's beta2: decay rate of the squared gradient's running mean")
    eps: float = opt(1e-8, "AdamW's epsilon, added to the denominator")
    max_grad_norm: float = opt(
        1.0, "gradients are clipped to this global L2 norm before each step (PPO: actor and critic each on its own)"
    )


@dataclass
class TokenizerTrain:
    min_frequency: int = opt(2, "a BPE merge needs a pair seen at least this many times")
    max_docs: Optional[int] = opt(
        50000, "train on the first N corpus documents (BPE statistics saturate long before the whole corpus); null: all"
    )


@dataclass
class PretrainTrain:
    batch_size: int = opt(16, "sequences (blocks) per device per micro-step", positive=True)
    grad_accum: int = opt(1, "micro-steps per optimizer step (gradient accumulation)", positive=True)
    max_steps: int = opt(1000, "optimizer steps (the cosine schedule's length)", positive=True)
    block_size: Optional[int] = opt(None, "tokens per packed training block; null: model.max_seq_len")
    eval_every: int = opt(200, "steps between held-out evaluations (eval/loss, eval/perplexity)", positive=True)
    eval_batches: int = opt(8, "held-out batches per evaluation (eval_batches * batch_size blocks)")
    save_every: int = opt(200, "steps between intermediate checkpoints (resume points)", positive=True)
    log_every: int = opt(10, "steps between train/loss logs", positive=True)
    keep_checkpoints: int = opt(
        2, "resume points kept while the stage runs (older ones are deleted; all go once it completes)"
    )


@dataclass
class StageConfig:
    """Keys shared by every stage's root config."""

    stage: str = opt(MISSING, "the stage this config runs (set by each stage's schema)")
    run: str = opt(
        "default", "the run's name: the stage writes <paths.root>/<run>/<stage>/ (a sweep appends its overrides)"
    )
    parent_run: Optional[str] = opt(None, "where parent stages are found; null: the same run (sweeps set it)")
    seed: int = opt(
        0,
        "the stage's training seed: initialisation, data order, held-out split, sampling (the world "
        "has its own, data.world.seed)",
    )
    force: bool = opt(False, "redo a finished stage, or replace one made with a different config")
    precision: str = opt(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16: the training's mixed precision (weights stay fp32)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    paths: PathsConfig = group(PathsConfig, "where runs and the generated data live (conf/paths)")
    logger: LoggerConfig = group(LoggerConfig, "experiment tracking: W&B on top of metrics.jsonl (conf/logger)")
    model: ModelConfig = group(
        ModelConfig, "the model: a hub checkpoint or one built from the sizes (conf/model, sizes from the preset)"
    )
    data: DataConfig = group(DataConfig, "where every kind of data comes from, and the synthetic world (conf/data)")
    optim: OptimConfig = group(OptimConfig, "AdamW with linear warmup and cosine decay (conf/optim)")


@dataclass
class TokenizerConfig(StageConfig):
    stage: str = opt("tokenizer", "the stage this config runs")
    train: TokenizerTrain = group(
        TokenizerTrain, "byte-level BPE training on the corpus (model.vocab_size is the target size)"
    )


@dataclass
class PretrainConfig(StageConfig):
    stage: str = opt("pretrain", "the stage this config runs")
    train: PretrainTrain = group(PretrainTrain, "the pretraining loop (budget from conf/preset/pretrain)")


SCHEMAS: dict[str, Any] = {}  # config name -> schema, for every entry point


def register(name: str, schema: Any) -> None:
    SCHEMAS[name] = schema
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)


# ---- sft / reward / inference (stages/sft.py, stages/reward.py, stages/tools/chat.py) ----


@dataclass
class GenerationSettings:
    """Decoding (pipeline/inference/generation.py). conf/generation/{greedy,sample,beam}.yaml are the usual choices."""

    max_new_tokens: int = opt(96, "reply length limit in tokens (a reply also stops at the end of its turn)")
    do_sample: bool = opt(
        False, "True: sample (temperature, top_k, top_p); False: greedy (num_beams=1) or beam search (num_beams>1)"
    )
    temperature: float = opt(1.0, "sampling temperature (with do_sample)")
    top_k: int = opt(0, "sample only from the k most likely tokens (with do_sample); 0: off")
    top_p: float = opt(
        1.0, "nucleus sampling: only the most likely tokens holding this much probability (with do_sample); 1.0: off"
    )
    repetition_penalty: float = opt(
        1.0, "transformers' repetition penalty: > 1 discourages tokens already in the text; 1.0: off"
    )
    num_beams: int = opt(1, "beams of beam search when do_sample is false; 1: greedy")


@dataclass
class LoraSettings:
    """LoRA through peft (conf/peft/lora.yaml turns it on)."""

    enabled: bool = opt(False, "train LoRA adapters on a frozen base instead of every weight")
    r: int = opt(16, "rank of each LoRA update")
    alpha: int = opt(32, "LoRA alpha: the update is scaled by alpha / r")
    dropout: float = opt(0.05, "dropout on the LoRA branch's input (PPO uses 0)")
    target_modules: str = opt("all-linear", "all-linear or a comma-separated list of module names: q_proj,v_proj")
    merge: bool = opt(True, "merge into the base weights on save; false: final/ holds the adapter only")


@dataclass
class TrainerBudget:
    """The Hugging Face Trainer's budget (pipeline/trainers/hf.py trainer_args): SFT's and the reward stage's train
    groups inherit it, and so do the methods that train through a Trainer."""

    batch_size: int = opt(16, "examples per device per micro-step", positive=True)
    grad_accum: int = opt(1, "micro-steps per optimizer step (gradient accumulation)", positive=True)
    max_steps: int = opt(200, "optimizer steps (the cosine schedule's length)", positive=True)
    eval_every: int = opt(50, "steps between periodic evaluations, where the method has them", positive=True)
    eval_batch_size: Optional[int] = opt(None, "examples per device per evaluation batch; null: batch_size")
    save_every: int = opt(50, "steps between Trainer checkpoints (resume points)", positive=True)
    log_every: int = opt(10, "steps between train/... logs", positive=True)
    keep_checkpoints: int = opt(2, "Trainer checkpoints kept while the stage runs (all go once it completes)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, slower")


@dataclass
class SFTTrain(TrainerBudget):
    """TrainerBudget with this stage's defaults and words, and its own settings."""

    batch_size: int = opt(16, "dialogues per device per micro-step (or packed blocks with packing=true)", positive=True)
    max_steps: int = opt(500, "optimizer steps (the cosine schedule's length)", positive=True)
    max_length: Optional[int] = opt(
        None, "tokens per dialogue, longer ones are truncated (counted); null: model.max_seq_len"
    )
    packing: bool = opt(
        False, "pack several dialogues into each max_length block (TRL's packing); held-out dialogues stay unpacked"
    )
    eval_every: int = opt(
        100, "steps between evaluations: held-out loss on data.sft_eval and a table of sample responses", positive=True
    )
    eval_batch_size: Optional[int] = opt(None, "dialogues per device per held-out loss batch; null: batch_size")
    save_every: int = opt(100, "steps between Trainer checkpoints (resume points)", positive=True)
    sample_prompts: int = opt(8, "fixed eval prompts answered at each evaluation (the samples table)")
    gold_eval_prompts: Optional[int] = opt(None, "cap data.eval_prompts for the final gold evaluation; null: all")
    gen_batch_size: int = opt(32, "prompts per generation batch in the gold evaluations and the samples table")
    eval_pretrained: bool = opt(True, "also score the starting model: eval/pretrain_gold_score")


@dataclass
class RewardTrain(TrainerBudget):
    """TrainerBudget with this stage's defaults and words, and its own settings."""

    batch_size: int = opt(16, "preference pairs per device per micro-step", positive=True)
    max_steps: int = opt(500, "optimizer steps (the cosine schedule's length)", positive=True)
    max_length: Optional[int] = opt(
        None, "prompt + response tokens; longer pairs are dropped (counted); null: model.max_seq_len"
    )
    eval_every: int = opt(
        100,
        "steps between evaluations on data.preference_test (accuracy, gold accuracy, calibration, margin)",
        positive=True,
    )
    eval_batch_size: Optional[int] = opt(
        None, "sequences per batch when scoring the test pairs and the statistics answers; null: batch_size"
    )
    save_every: int = opt(100, "steps between Trainer checkpoints (resume points)", positive=True)
    center_rewards_coefficient: Optional[float] = opt(
        None,
        "adds coef * mean((r_chosen + r_rejected)^2) to the "
        "loss (TRL), e.g. 0.01 pulls rewards towards mean zero; "
        "null: off",
    )
    group_by_prompt: bool = opt(False, "InstructGPT: all pairs of one prompt's ranking in the same batch")
    ensemble: int = opt(
        1,
        "K reward models (Coste et al. 2023): member 0 is final/ itself, member k final/members/k, "
        "listed with each one's statistics in final/ensemble.json; a method combines them by its "
        "reward_objective. 1: the single reward model. Each member costs one more training run",
        positive=True,
    )
    ensemble_diversity: str = opt(
        "seed",
        "what makes the members differ: seed (head initialisation and batch order "
        "by seed + k, the same pairs) | bootstrap (also a resample of the prompts, "
        "with replacement, whole rankings kept); see docs/ppo.md for the measured "
        "choice",
        choices=("seed", "bootstrap"),
    )
    max_prompts: Optional[int] = opt(None, "train on the pairs of the first N prompts of data.preference; null: all")
    max_test_prompts: Optional[int] = opt(None, "the same for data.preference_test")
    calibration_bins: int = opt(10, "equal-width confidence bins of eval/ece (calibration of sigmoid(margin))")
    stats_prompts: int = opt(256, "prompts of data.prompts answered by the SFT policy to measure reward mean/std")
    stats_samples: int = opt(4, "answers per stats prompt (pairs of them give reward/gold_pair_accuracy)")
    gen_batch_size: int = opt(32, "prompts per generation batch (the on-policy samples and the stats answers)")


@dataclass
class SFTConfig(StageConfig):
    stage: str = opt("sft", "the stage this config runs")
    train: SFTTrain = group(SFTTrain, "the SFT Trainer's settings (budget from conf/preset/sft)")
    peft: LoraSettings = group(LoraSettings, "LoRA instead of full fine-tuning (conf/peft)")
    generation: GenerationSettings = group(
        GenerationSettings, "decoding for the gold evaluation and the samples table (conf/generation)"
    )


@dataclass
class OnPolicySettings:
    """Comparisons of the SFT policy's own samples, ranked by simulated labellers (pipeline/world/labellers.py)."""

    prompts: int = opt(0, "the first N prompts of data.preference; 0, or data that is not the world's: none")
    samples: int = opt(4, "replies per prompt, drawn with the stage's `generation` settings (at least 2)")
    label_temperature: Optional[float] = opt(None, "Plackett-Luce noise; null: data.world.label_temperature")


@dataclass
class IterateSettings:
    """Iterated RLHF (`make iterate`; docs/ppo.md "Iterated RLHF"): round r > 1 labels fresh comparisons of round
    r-1's policy, updates the reward model on every comparison gathered so far, and continues PPO from that policy
    against it. One group for the round's stages (reward, ppo, dpo), so one ARGS reaches them all."""

    prompts: int = opt(
        512,
        "comparisons per round: prompts of data.prompts whose `samples` replies from the "
        "current policy the simulated labellers rank (round r takes the (r-1)-th slice, "
        "wrapping around); the label budget of a round",
        positive=True,
    )
    samples: int = opt(4, "replies per labelled prompt, K (a ranking of the distinct ones gives up to K(K-1)/2 pairs)")
    reward_init: str = opt(
        "continue",
        "continue (round r's reward model starts from round r-1's) | sft (retrained "
        "from the SFT policy with a fresh head); either trains on all comparisons "
        "gathered so far",
        choices=("continue", "sft"),
    )
    reward_steps: Optional[int] = opt(
        None, "optimizer steps of a round's reward update; null: train.max_steps", positive=True
    )
    fresh_share: Optional[float] = opt(
        None,
        "the share of the reward update's pairs that are this round's fresh ones (repeated to reach it; "
        "null: as many as they are, about 8% in round 2 of the cpu preset, so 300 steps see a third of them once)",
    )
    kl_anchor: str = opt(
        "sft",
        "sft (every round's KL penalty is to the SFT policy, as Llama 2 and Anthropic "
        "did) | previous (to the policy the round starts from)",
        choices=("sft", "previous"),
    )
    policy: str = opt(
        "ppo",
        "ppo | dpo: the method whose round r-1 policy the labellers see (dpo: online DPO, "
        "whose rounds label their own samples and need no reward model)",
        choices=("ppo", "dpo"),
    )


@dataclass
class RewardConfig(StageConfig):
    stage: str = opt("reward", "the stage this config runs")
    sampler: str = opt(
        "engine",
        "how replies are sampled: engine (the continuous-batching engine's runner, as "
        "serving runs it, for Llama checkpoints; any other model falls back to hf) | hf "
        "(Hugging Face generate on a padded batch: the reference). Same greedy tokens; "
        "pipeline/inference/sampler.py",
        choices=("engine", "hf"),
    )
    round: int = opt(
        1,
        "the round of iterated RLHF (make iterate): 1 is the one-shot reward stage; r > 1 writes "
        "runs/<run>/reward_r<r>/ from round r-1's policy and reward model (`iterate`)",
        positive=True,
    )
    iterate: IterateSettings = group(IterateSettings, "what a round of iterated RLHF does (used when round > 1)")
    train: RewardTrain = group(RewardTrain, "the reward Trainer's settings (budget from conf/preset/reward)")
    peft: LoraSettings = group(LoraSettings, "LoRA instead of full fine-tuning (conf/peft)")
    generation: GenerationSettings = group(
        GenerationSettings, "decoding of the SFT samples: on-policy comparisons, reward statistics (conf/generation)"
    )
    onpolicy: OnPolicySettings = group(
        OnPolicySettings,
        "comparisons of the SFT policy's own samples, ranked by simulated labellers, added to data.preference",
    )


@dataclass
class CheckpointChoice:
    """Which chat model a tool loads (runs.resolve_checkpoint reads these keys): chat, generate and serve."""

    stage: Optional[str] = opt(
        None, "whose final/ to load (a policy stage); null: the latest complete stage of the run"
    )
    checkpoint: Optional[str] = opt(None, "any Hugging Face checkpoint folder (wins over stage)")
    run: str = opt("default", "the run whose stages are looked up: <paths.root>/<run>/")
    precision: str = opt(
        "auto",
        "dtype of the weights: auto (bf16 on a GPU that supports it, fp32 otherwise) | fp32 | bf16 | fp16",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    paths: PathsConfig = group(PathsConfig, "where runs live (conf/paths)")


@dataclass
class ChatConfig(CheckpointChoice):
    """stages/tools/chat.py: talk to a checkpoint. Not a pipeline stage: writes nothing."""

    seed: int = opt(0, "seed of the sampling (chat adds the turn number)")
    system: Optional[str] = opt(None, "system prompt opening every conversation (generate: every prompt without one)")
    generation: GenerationSettings = group(GenerationSettings, "decoding (conf/generation)")


@dataclass
class GenerateConfig(ChatConfig):
    """stages/tools/generate.py: responses for a prompts file."""

    input: Optional[str] = opt(
        None, '.jsonl ({"messages": [...]} or {"prompt": "..."}) or .txt; null: built-in eval prompts'
    )
    output: Optional[str] = opt(None, ".jsonl; null: next to the input (or in the run folder) as *.responses.jsonl")
    batch_size: int = opt(16, "prompts per generation batch")
    limit: Optional[int] = opt(None, "first N prompts only")
    gold: bool = opt(True, "add the gold oracle's score when the prompts are the built-in world's")


@dataclass
class AuthSettings:
    keys_env: Optional[str] = opt(
        "RLHF_API_KEYS", "environment variable holding the API keys, comma-separated (null: none from the environment)"
    )
    keys_file: Optional[str] = opt(None, "a file of API keys, one per line (# comments); read with keys_env")


@dataclass
class LimitSettings:
    requests_per_minute: int = opt(
        600, "requests per minute per API key (a bucket that refills continuously)", positive=True
    )
    tokens_per_minute: int = opt(
        200_000,
        "tokens per minute per API key: prompt + max_tokens x n charged up front, "
        "the unused part given back when the request ends",
        positive=True,
    )
    concurrent_requests: int = opt(16, "requests of one API key in flight at once; more get 429", positive=True)
    max_body_bytes: int = opt(1_048_576, "largest request body; a bigger one gets 413", positive=True)
    max_messages: int = opt(
        2048, "messages in one chat completion at most; more get 400 before anything is tokenised", positive=True
    )
    max_moderation_inputs: int = opt(32, "texts in one /v1/moderations request at most; more get 400", positive=True)


@dataclass
class EngineSettings:
    max_batch: int = opt(32, "rows (choices) decoded together at most; more requests wait their turn", positive=True)
    max_waiting: int = opt(512, "requests waiting for a row at most; more get 503 (overloaded)", positive=True)
    max_tokens_default: Optional[int] = opt(
        None,
        "max_tokens of a request that sets none (null: the rest of the model's context, as OpenAI's API does)",
        positive=True,
    )
    seed: int = opt(0, "seed of the sampling of requests that give no seed")
    threads: Optional[int] = opt(
        None,
        "torch's CPU threads (null: torch's default, one per core); on a small model, 1 leaves a core to the HTTP side",
        positive=True,
    )
    fast_path: bool = opt(
        True,
        "run Llama checkpoints through the lean forward with a slot cache "
        "(pipeline/inference/runners.py); false: the model's own forward for every architecture",
    )
    process: bool = opt(
        True,
        "run the engine in a process of its own (serving/worker.py), so that the model and "
        "the HTTP side do not share one GIL; false: a thread of the server's process",
    )


@dataclass
class ModerationSettings:
    input: bool = opt(True, "moderate the prompt: a flagged one is refused (400, code content_filter)")
    output: bool = opt(
        True, "moderate the reply as it is written: a flagged one ends with finish_reason content_filter"
    )
    classifier: str = opt(
        "lexicon",
        "lexicon (built-in phrase lists, offline; see serving/moderation.py) | a Hugging "
        "Face sequence-classification folder",
    )
    categories: Optional[List[str]] = opt(
        None, "categories that flag (null: all the classifier has); the others are still scored"
    )
    threshold: float = opt(0.5, "score at or above which a category flags", between=(0, 1))
    # Any, not Dict[...]: OmegaConf cannot merge a command-line mapping into a typed dict that defaults to null.
    thresholds: Any = opt(None, "per-category thresholds over `threshold`, e.g. '{violence: 0.8}'")
    terms: Any = opt(
        None, "extra phrases per category for the lexicon (weight 1: one match flags), e.g. '{violence: [pummel]}'"
    )
    label_map: Any = opt(None, "a HF classifier's label -> category name (unmapped labels keep their name)")


@dataclass
class ServeConfig(CheckpointChoice):
    """stages/tools/serve.py: an OpenAI-compatible API and a chat page for a checkpoint."""

    host: str = opt("127.0.0.1", "address to bind; anything but loopback needs an API key")
    port: int = opt(8000, "TCP port", between=(1, 65535))
    model_name: Optional[str] = opt(
        None, "the model id clients send and /v1/models lists (null: <run>/<stage>, or the checkpoint folder's name)"
    )
    log_level: str = opt(
        "info",
        "uvicorn's and the server's log level: debug | info | warning | error",
        choices=("debug", "info", "warning", "error"),
    )
    stream_interval: int = opt(
        1,
        "tokens per streamed chunk at most, as vLLM's --stream-interval: 1 sends each "
        "token as it comes (OpenAI's way); more sends fewer, longer chunks (less work for "
        "server and client per token, coarser streaming); the first text and the end go "
        "out at once",
        positive=True,
    )
    auth: AuthSettings = group(AuthSettings, "API keys")
    limits: LimitSettings = group(LimitSettings, "rate and size limits, per API key")
    engine: EngineSettings = group(EngineSettings, "the batching generation engine")
    moderation: ModerationSettings = group(ModerationSettings, "the moderation filter on prompts and replies")


for _name, _schema in {"chat": ChatConfig, "generate": GenerateConfig, "serve": ServeConfig}.items():
    register(_name, _schema)


# ---- ppo / report / compare (stages/ppo.py, stages/tools/report.py, stages/tools/compare.py) ----


@dataclass
class PPOTrain:
    """Every implementation detail of RLHF-PPO is a switch here (Huang et al. 2024, InstructGPT, Ziegler et al.)."""

    iterations: int = opt(
        100,
        "PPO iterations, each: sample prompts, generate, score, update (the learning-rate "
        "schedules span all their optimizer steps)",
        positive=True,
    )
    rollout_batch_size: int = opt(32, "prompts per process per iteration (one reply each)", positive=True)
    minibatch_size: int = opt(16, "episodes per optimizer step (per process)", positive=True)
    grad_accum: int = opt(
        1, "micro-batches per minibatch (the gradient is the minibatch's token mean however it is split)", positive=True
    )
    ppo_epochs: int = opt(4, "passes over each rollout batch", positive=True)
    forward_batch_size: int = opt(
        32, "chunk size of the no-grad scoring passes (old and reference log-probs, values, reward)"
    )
    pack_sequences: int = opt(4, "forward passes on real tokens only, this many sequences per row; 0: padded batches")
    old_logprobs: str = opt(
        "auto",
        "generate (the sampler's own) | recompute (a forward pass) | auto: generate in fp32",
        choices=("auto", "generate", "recompute"),
    )
    max_prompt_tokens: int = opt(
        192, "longest chat-templated prompt in tokens; a longer one is an error, not truncated"
    )
    max_new_tokens: int = opt(
        48,
        "reply length limit in tokens, in training and evaluation (a reply that reaches "
        "it is unfinished: see missing_eos_penalty)",
        positive=True,
    )
    temperature: float = opt(0.7, "sampling temperature; log-probs are computed under the same temperature")
    top_k: int = opt(0, "0: off. Anything but plain temperature sampling makes the behaviour policy differ from pi")
    top_p: float = opt(
        1.0,
        "nucleus sampling of the rollouts; 1.0: off (as with top_k, anything else makes the "
        "behaviour policy differ from pi)",
    )
    reward: str = opt(
        "model", "model | gold (PPO on the oracle itself: a perfect-RM ceiling) | contains:<text> (sanity check)"
    )
    normalize_reward: bool = opt(
        True,
        "(score - mean) / std with the reward stage's statistics on SFT samples (an "
        "ensemble's members are always normalised, each with its own)",
    )
    reward_objective: str = opt(
        "mean",
        "with a reward-model ensemble (reward stage train.ensemble=K): what is "
        "optimised of the members' normalised scores: mean | worst (their minimum, "
        "WCO) | uwo (mean - uwo_lambda * their variance, Coste et al. 2023). One "
        "member: its score, whatever this says",
        choices=("mean", "worst", "uwo"),
    )
    uwo_lambda: float = opt(1.0, "reward_objective=uwo: the weight of the members' variance (normalised units)")
    missing_eos_penalty: Optional[float] = opt(
        1.0,
        "a reply that never ends (no end-of-turn within max_new_tokens) "
        "scores this far below the batch's lowest finished reply: min(its "
        "own score, the lowest finished one) - penalty, on the normalised "
        "scale (a clamp below the minimum, not TRL's plain subtraction, "
        "which can leave it above finished replies; "
        "pipeline.rl.shaping.penalise_unfinished). >= 0; null keeps the reward "
        "model's score",
    )
    kl_coef: float = opt(
        0.05,
        "beta: the KL penalty coefficient; every reply token's reward is -beta times its KL "
        "estimate to the SFT reference (the starting value with adaptive_kl)",
    )
    kl_estimator: str = opt(
        "k1",
        "k1 | k2 | k3 | abs (per token, in the reward): k1 = log(pi / ref), k2 = k1^2 / 2, "
        "k3 = (ref / pi - 1) - log(ref / pi), abs = |k1|",
        choices=("k1", "k2", "k3", "abs"),
    )
    adaptive_kl: bool = opt(False, "Ziegler et al.'s proportional controller: steer kl_coef towards kl_target")
    kl_target: float = opt(6.0, "the adaptive controller's target KL to the reference, in nats per sequence")
    kl_horizon: int = opt(
        10000,
        "the adaptive controller's horizon, in episodes: beta *= 1 + clip(KL / target - 1, "
        "-0.2, 0.2) * episodes / horizon",
    )
    gamma: float = opt(1.0, "GAE discount factor per reply token (1: no discount)")
    lam: float = opt(
        0.95, "GAE lambda: 1 = Monte Carlo returns (unbiased, high variance), 0 = one-step TD (leans on the critic)"
    )
    whiten_advantages: bool = opt(
        True, "normalise the advantages to mean 0, std 1 over the rollout batch's reply tokens (per process)"
    )
    clip_range: float = opt(
        0.2, "PPO's policy ratio clip epsilon: the surrogate clips pi / pi_old to [1 - eps, 1 + eps]"
    )
    clip_range_value: float = opt(
        0.2,
        "value clip epsilon: the value loss also scores the new value clipped to "
        "within +-this of the rollout's, and takes the larger error (reward units)",
    )
    vf_coef: float = opt(
        0.1,
        "the value-loss weight: one backward of policy loss + vf_coef * value loss (the critic "
        "is its own model, so it scales the critic's gradients)",
    )
    critic_init: str = opt(
        "reward", "reward (InstructGPT) | policy (the SFT model with a fresh value head)", choices=("reward", "policy")
    )
    critic_lr: Optional[float] = opt(None, "the critic's learning rate; null: optim.lr")
    ptx_coef: float = opt(0.0, "PPO-ptx: + coef * LM loss on the pretraining corpus (InstructGPT used 27.8; see docs)")
    ptx_batch_size: int = opt(
        4, "pretraining-corpus blocks (min(model.max_seq_len, 256) tokens each) per micro-batch of the PPO-ptx loss"
    )
    ema_decay: Optional[float] = opt(None, "e.g. 0.99: the saved policy is an EMA of the actor")
    eval_prompts: int = opt(200, "held-out prompts for the final PPO-vs-SFT evaluation")
    eval_batch_size: int = opt(32, "prompts per generation batch in the periodic and final evaluations")
    eval_sampled: bool = opt(
        True,
        "the final evaluation is greedy (eval/..., the headline); true: also sampled at "
        "`temperature` (eval/sampled/...)",
    )
    eval_every: int = opt(
        10,
        "iterations between periodic held-out evaluations (also before the first and after "
        "the last; see periodic_eval_prompts)",
        positive=True,
    )
    periodic_eval_prompts: int = opt(
        64,
        "at every periodic evaluation the policy answers the first N held-out "
        "prompts, sampled at `temperature` (Gao et al. 2022): periodic/gold_score, "
        "periodic/reward (the reward model's score, normalised and penalised as "
        "the training rewards), periodic/kl (exact KL to SFT along the replies), "
        "the lines of the over-optimisation plot. 0: off",
    )
    save_every: int = opt(10, "iterations between resume points", positive=True)
    keep_checkpoints: int = opt(
        2, "resume points kept while the stage runs (older ones are deleted; all go once it completes)"
    )
    sample_every: int = opt(10, "iterations between sample tables (ppo/samples); 0: none")
    log_samples: int = opt(8, "rows of each sample table: prompt, reply, gold score, reward-model score")


@dataclass
class AlarmSettings:
    """The reward-hacking alarm (pipeline/rl/alarm.py, docs/ppo.md): from what a user without a gold oracle has, the
    reward-model ensemble's members' disagreement on the policy's own samples and the proxy reward. It fires when
    the proxy is rising while the members disagree more and more. Needs train.ensemble >= 2 in the reward stage."""

    enabled: bool = opt(
        True,
        "watch every iteration (alarm/* metrics, a console line, the over-optimisation "
        "plot's mark); off: nothing is logged",
    )
    window: int = opt(5, "iterations in each trailing mean (the proxy's and the disagreement's)", positive=True)
    rise: float = opt(1.0, "the disagreement must exceed (1 + rise) times its lowest trailing mean so far")
    patience: int = opt(3, "iterations in a row the condition must hold before it fires", positive=True)


@dataclass
class PPOConfig(StageConfig):
    stage: str = opt("ppo", "the stage this config runs")
    sampler: str = opt(
        "engine",
        "how replies are sampled: engine (the continuous-batching engine's runner, as "
        "serving runs it, for Llama checkpoints; any other model falls back to hf) | hf "
        "(Hugging Face generate on a padded batch: the reference). Same greedy tokens; "
        "pipeline/inference/sampler.py",
        choices=("engine", "hf"),
    )
    round: int = opt(
        1,
        "the round of iterated RLHF (make iterate): 1 is the one-shot PPO from SFT; r > 1 writes "
        "runs/<run>/ppo_r<r>/, continuing round r-1's policy against round r's reward model",
        positive=True,
    )
    iterate: IterateSettings = group(IterateSettings, "what a round of iterated RLHF does (used when round > 1)")
    train: PPOTrain = group(
        PPOTrain, "the PPO loop: every implementation detail is a switch here (budget from conf/preset/ppo)"
    )
    alarm: AlarmSettings = group(AlarmSettings, "the reward-hacking alarm, from the ensemble's disagreement")
    peft: LoraSettings = group(
        LoraSettings, "LoRA on the actor; the reference is the base (the adapter disabled, no second copy)"
    )


# ---- the methods: other ways to learn from the same preferences (stages/{bon,dpo,expert_iteration,rloo,grpo}.py) --


@dataclass
class MethodEval:
    """The one evaluation every method gets, PPO's final evaluation included (pipeline.eval.gold.versus_sft): the
    same held-out prompts answered by the method and by SFT, greedy and sampled, scored by the gold oracle."""

    prompts: int = opt(200, "the first N of data.eval_prompts (PPO: train.eval_prompts)", positive=True)
    batch_size: int = opt(50, "prompts per generation batch", positive=True)
    max_prompt_tokens: int = opt(192, "longest chat-templated prompt in tokens; a longer one is an error")
    max_new_tokens: int = opt(48, "reply length limit in tokens (PPO: train.max_new_tokens)", positive=True)
    temperature: float = opt(
        0.7,
        "the sampled evaluation's temperature, and the one the exact KL to SFT is taken under (PPO: train.temperature)",
    )
    top_k: int = opt(0, "top-k of the sampled evaluation; 0: off")
    top_p: float = opt(1.0, "nucleus sampling of the sampled evaluation; 1.0: off")
    greedy: bool = opt(
        True,
        "also the greedy evaluation (eval/...); the sampled one (eval/sampled/...) is always "
        "made, since best-of-n has only that",
    )
    bootstrap: int = opt(1000, "bootstrap resamples of the prompts for the win rate's 95% interval", positive=True)
    periodic_prompts: int = opt(
        64,
        "RLOO, GRPO: the first N held-out prompts answered every train.eval_every steps "
        "(sampled: gold, reward-model score, exact KL), the method's curve on the gold-KL "
        "plot; 0: off",
    )


@dataclass
class BoNSettings:
    n: int = opt(
        16,
        "replies sampled from SFT per prompt (at eval.temperature); the reward model's best is the "
        "answer. Its KL to SFT is at most log n - (n-1)/n; the manifest also gives every power of 2 "
        "below n, the first m of the same samples (a curve over n)",
        positive=True,
    )
    reward_objective: str = opt(
        "mean",
        "with a reward-model ensemble (reward stage train.ensemble=K): what is "
        "optimised of the members' normalised scores: mean | worst (their minimum, "
        "WCO) | uwo (mean - uwo_lambda * their variance, Coste et al. 2023). One "
        "member: its score, whatever this says",
        choices=("mean", "worst", "uwo"),
    )
    uwo_lambda: float = opt(1.0, "reward_objective=uwo: the weight of the members' variance (normalised units)")


@dataclass
class BoNConfig(StageConfig):
    stage: str = opt("bon", "the stage this config runs")
    sampler: str = opt(
        "engine",
        "how replies are sampled: engine (the continuous-batching engine's runner, as "
        "serving runs it, for Llama checkpoints; any other model falls back to hf) | hf "
        "(Hugging Face generate on a padded batch: the reference). Same greedy tokens; "
        "pipeline/inference/sampler.py",
        choices=("engine", "hf"),
    )
    bon: BoNSettings = group(BoNSettings, "best-of-n with the reward model (conf/preset/bon)")
    eval: MethodEval = group(MethodEval, "the shared evaluation against SFT")


@dataclass
class DPOTrain(TrainerBudget):
    beta: float = opt(0.1, "DPO's beta: the strength of the implicit KL to the SFT reference (IPO: its regularisation)")
    loss_type: str = opt(
        "sigmoid",
        "TRL's DPO loss: sigmoid (DPO) | ipo | hinge | robust | ... (trl.DPOConfig)",
        choices=(
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "nca_pair",
            "robust",
            "bco_pair",
            "sppo_hard",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sigmoid_norm",
        ),
    )
    max_length: Optional[int] = opt(
        None, "prompt + reply tokens; longer pairs are cut at the end; null: model.max_seq_len"
    )
    onpolicy: bool = opt(
        True,
        "also the on-policy comparisons the reward stage recorded "
        "(onpolicy_comparisons.jsonl), as the reward model learnt from them",
    )
    max_prompts: Optional[int] = opt(None, "the pairs of the first N prompts of data.preference; null: all")


@dataclass
class DPOConfig(StageConfig):
    stage: str = opt("dpo", "the stage this config runs")
    sampler: str = opt(
        "engine",
        "how replies are sampled: engine (the continuous-batching engine's runner, as "
        "serving runs it, for Llama checkpoints; any other model falls back to hf) | hf "
        "(Hugging Face generate on a padded batch: the reference). Same greedy tokens; "
        "pipeline/inference/sampler.py",
        choices=("engine", "hf"),
    )
    round: int = opt(
        1,
        "the round of online DPO (make iterate ARGS=iterate.policy=dpo): 1 is the offline DPO on "
        "the reward stage's comparisons; r > 1 writes runs/<run>/dpo_r<r>/, trained from round r-1's "
        "policy on fresh comparisons of its own samples",
        positive=True,
    )
    iterate: IterateSettings = group(IterateSettings, "what a round of online DPO does (used when round > 1)")
    train: DPOTrain = group(DPOTrain, "TRL's DPOTrainer (budget from conf/preset/dpo)")
    peft: LoraSettings = group(LoraSettings, "LoRA on the policy; the reference is the adapter-disabled base")
    eval: MethodEval = group(MethodEval, "the shared evaluation against SFT")


@dataclass
class ExpertIterationTrain(TrainerBudget):
    rounds: int = opt(
        1,
        "rounds of sample -> keep the reward model's best -> fine-tune; each round samples from the "
        "previous round's policy (round 1: SFT)",
        positive=True,
    )
    prompts: int = opt(
        512, "PPO prompts (data.prompts) per round; round r takes the r-th slice, wrapping around", positive=True
    )
    samples: int = opt(4, "replies per prompt, n: the reward model's best of them is kept", positive=True)
    temperature: float = opt(0.7, "sampling temperature of the candidates")
    max_new_tokens: int = opt(48, "candidate length limit in tokens", positive=True)
    gen_batch_size: int = opt(32, "prompts per generation batch")
    max_length: Optional[int] = opt(None, "tokens per kept dialogue; null: model.max_seq_len")
    reward_objective: str = opt(
        "mean",
        "with a reward-model ensemble (reward stage train.ensemble=K): what is "
        "optimised of the members' normalised scores: mean | worst (their minimum, "
        "WCO) | uwo (mean - uwo_lambda * their variance, Coste et al. 2023). One "
        "member: its score, whatever this says",
        choices=("mean", "worst", "uwo"),
    )
    uwo_lambda: float = opt(1.0, "reward_objective=uwo: the weight of the members' variance (normalised units)")


@dataclass
class ExpertIterationConfig(StageConfig):
    stage: str = opt("expert_iteration", "the stage this config runs")
    sampler: str = opt(
        "engine",
        "how replies are sampled: engine (the continuous-batching engine's runner, as "
        "serving runs it, for Llama checkpoints; any other model falls back to hf) | hf "
        "(Hugging Face generate on a padded batch: the reference). Same greedy tokens; "
        "pipeline/inference/sampler.py",
        choices=("engine", "hf"),
    )
    train: ExpertIterationTrain = group(
        ExpertIterationTrain,
        "rejection-sampling fine-tuning (budget from conf/preset/expert_iteration); max_steps per round",
    )
    peft: LoraSettings = group(LoraSettings, "LoRA instead of full fine-tuning (conf/peft)")
    eval: MethodEval = group(MethodEval, "the shared evaluation against SFT")


@dataclass
class GroupRLTrain(TrainerBudget):
    """RLOO's and GRPO's settings (TRL's trainers; pipeline/trainers/group_rl.py)."""

    num_generations: int = opt(
        4,
        "k: replies per prompt; each is judged against the others of its group (RLOO: "
        "their mean, leaving it out; GRPO: the group's mean and spread). batch_size must be "
        "a multiple of it",
        positive=True,
    )
    beta: float = opt(
        0.05, "KL to the SFT policy: RLOO subtracts beta * KL from the reward, GRPO adds beta * KL (k3) to the loss"
    )
    temperature: float = opt(0.7, "sampling temperature of the replies (PPO: train.temperature)")
    max_new_tokens: int = opt(48, "reply length limit in tokens", positive=True)
    max_prompt_tokens: int = opt(192, "longest chat-templated prompt in tokens; a longer one is an error")
    reward: str = opt(
        "model",
        "model (read as PPO reads it: pipeline.rl.readout) | gold (the oracle itself) | contains:<text> (sanity check)",
    )
    normalize_reward: bool = opt(True, "(score - mean) / std with the reward stage's statistics, as PPO")
    reward_objective: str = opt(
        "mean",
        "with a reward-model ensemble (reward stage train.ensemble=K): what is "
        "optimised of the members' normalised scores: mean | worst (their minimum, "
        "WCO) | uwo (mean - uwo_lambda * their variance, Coste et al. 2023). One "
        "member: its score, whatever this says",
        choices=("mean", "worst", "uwo"),
    )
    uwo_lambda: float = opt(1.0, "reward_objective=uwo: the weight of the members' variance (normalised units)")
    missing_eos_penalty: Optional[float] = opt(
        1.0,
        "a reply that never ends scores this far below the group batch's "
        "lowest finished one, as PPO's train.missing_eos_penalty; null: off",
    )
    epsilon: float = opt(0.2, "the policy ratio's clip range")
    num_iterations: int = opt(1, "updates per batch of replies (mu)")
    loss_type: str = opt(
        "dapo",
        "GRPO only: TRL's loss aggregation: dapo | grpo | dr_grpo | bnpo | ...",
        choices=("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    )
    scale_rewards: str = opt(
        "group", "GRPO only: group | batch | none: how advantages are scaled", choices=("group", "batch", "none")
    )


@dataclass
class RLOOConfig(StageConfig):
    stage: str = opt("rloo", "the stage this config runs")
    sampler: str = opt(
        "engine",
        "how replies are sampled: engine (the continuous-batching engine's runner, as "
        "serving runs it, for Llama checkpoints; any other model falls back to hf) | hf "
        "(Hugging Face generate on a padded batch: the reference). Same greedy tokens; "
        "pipeline/inference/sampler.py",
        choices=("engine", "hf"),
    )
    train: GroupRLTrain = group(GroupRLTrain, "TRL's RLOOTrainer (budget from conf/preset/rloo)")
    peft: LoraSettings = group(LoraSettings, "LoRA on the policy (conf/peft)")
    eval: MethodEval = group(MethodEval, "the shared evaluation against SFT")


@dataclass
class GRPOConfig(StageConfig):
    stage: str = opt("grpo", "the stage this config runs")
    sampler: str = opt(
        "engine",
        "how replies are sampled: engine (the continuous-batching engine's runner, as "
        "serving runs it, for Llama checkpoints; any other model falls back to hf) | hf "
        "(Hugging Face generate on a padded batch: the reference). Same greedy tokens; "
        "pipeline/inference/sampler.py",
        choices=("engine", "hf"),
    )
    train: GroupRLTrain = group(GroupRLTrain, "TRL's GRPOTrainer (budget from conf/preset/grpo)")
    peft: LoraSettings = group(LoraSettings, "LoRA on the policy (conf/peft)")
    eval: MethodEval = group(MethodEval, "the shared evaluation against SFT")


@dataclass
class MethodsConfig:
    """stages/tools/methods.py: runs/<run>/methods.md, every method side by side, from their manifests."""

    run: str = opt("default", "the run whose methods are tabled: <paths.root>/<run>/")
    paths: PathsConfig = group(PathsConfig, "where runs live (conf/paths)")
    logger: LoggerConfig = group(LoggerConfig, "unused, as in ReportConfig")


@dataclass
class RoundsConfig:
    """stages/tools/rounds.py: runs/<run>/rounds.md, iterated RLHF round by round, from the manifests."""

    run: str = opt("default", "the run whose rounds are tabled: <paths.root>/<run>/")
    method: str = opt("ppo", "ppo | dpo: the rounds of which method (make iterate METHOD=...)")
    paths: PathsConfig = group(PathsConfig, "where runs live (conf/paths)")
    logger: LoggerConfig = group(LoggerConfig, "unused, as in ReportConfig")


@dataclass
class ReportConfig:
    """stages/tools/report.py: runs/<run>/report.md from the manifests, metrics and a few side-by-side answers."""

    run: str = opt("default", "the run to report on: <paths.root>/<run>/")
    seed: int = opt(0, "seed of the side-by-side answers' decoding")
    precision: str = opt(
        "auto",
        "dtype of the weights: auto (bf16 on a GPU that supports it, fp32 otherwise) | fp32 | bf16 | fp16",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    samples: int = opt(6, "held-out prompts answered by every model, side by side")
    paths: PathsConfig = group(PathsConfig, "where runs live (conf/paths)")
    logger: LoggerConfig = group(LoggerConfig, "unused; `make all ARGS=logger=none` reaches here too")
    model: ModelConfig = group(ModelConfig, "unused; lets the presets compose")
    data: DataConfig = group(
        DataConfig, "the world and data.eval_prompts: which held-out prompts, scored by which gold oracle"
    )
    generation: GenerationSettings = group(GenerationSettings, "decoding of the side-by-side answers (conf/generation)")


@dataclass
class CompareConfig:
    """stages/tools/compare.py: several runs side by side (after a sweep), from manifests alone."""

    runs: List[str] = group(list, "the runs to compare; empty: every run under paths.root")
    out: Optional[str] = opt(None, "the report file; null: <paths.root>/compare.md (figures beside it)")
    paths: PathsConfig = group(PathsConfig, "where runs live (conf/paths)")
    logger: LoggerConfig = group(LoggerConfig, "unused, as in ReportConfig")


for _name, _schema in {
    "report": ReportConfig,
    "compare": CompareConfig,
    "methods": MethodsConfig,
    "rounds": RoundsConfig,
}.items():
    register(_name, _schema)
for _spec in STAGES:  # every training stage composes on the schema its spec names
    register(_spec.name, globals()[_spec.schema])


# ---- validation: every bad argument collected and reported at once ----


def _within(v, lo, hi) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _declared_problems(node, prefix: str = "") -> list[str]:
    """The `choices`, `positive` and `between` of every field (opt's), checked on a composed config, group by group:
    each node of a structured config knows the dataclass it came from."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    out = []
    t = OmegaConf.get_type(node)
    meta = {f.name: f.metadata for f in dataclasses.fields(t)} if dataclasses.is_dataclass(t) else {}
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            continue
        v, name, m = node[key], f"{prefix}{key}", meta.get(key, {})
        if isinstance(v, DictConfig):
            out += _declared_problems(v, name + ".")
        elif v is None:
            continue
        elif "choices" in m and v not in m["choices"]:
            out.append(f"{name}={v!r} is not one of {', '.join(m['choices'])}")
        elif m.get("positive") and v <= 0:
            out.append(f"{name}={v} must be positive")
        elif "between" in m and not _within(v, *m["between"]):
            lo, hi = m["between"]
            out.append(f"{name}={v} must be " + (f"between {lo} and {hi}" if hi is not None else f"at least {lo}"))
    return out


def problems(cfg) -> list[str]:
    """What is wrong with a composed stage config, as `key: problem` lines (empty when all is well)."""
    from omegaconf import OmegaConf

    out = _declared_problems(cfg)  # what each field declares (opt's choices, positive, between)
    get = lambda key: OmegaConf.select(cfg, key, default=None)  # noqa: E731
    if get("model.arch") == "hf" and not get("model.name_or_path"):
        out.append("model.name_or_path is required with model=hf (a hub name or a local folder)")
    for name, src in (get("data") or {}).items():
        if not OmegaConf.is_dict(src) or "kind" not in src:
            continue
        if src.kind in ("local", "hub") and not src.path:
            out.append(f"data.{name}.path is required for kind '{src.kind}'")
    reward = get("train.reward")
    if reward is not None and reward not in ("model", "gold") and not str(reward).startswith("contains:"):
        out.append(f"train.reward={reward!r} is not one of model, gold, contains:<text>")
    if (get("onpolicy.prompts") or 0) > 0 and get("onpolicy.samples") < 2:
        out.append(f"onpolicy.samples={get('onpolicy.samples')} must be at least 2 (a ranking compares replies)")
    pen = get("train.missing_eos_penalty")
    if pen is not None and pen < 0:
        out.append(
            f"train.missing_eos_penalty={pen} must be >= 0: it is how far below the lowest finished reply an "
            f"unfinished one scores (null: no penalty)"
        )
    k = get("train.num_generations")
    if k is not None and k < 2:
        out.append(
            f"train.num_generations={k} must be at least 2: each reply is judged against the others of its prompt"
        )
    elif k and (get("train.batch_size") or 0) % k:
        out.append(f"train.batch_size={get('train.batch_size')} must be a multiple of train.num_generations={k}")
    share = get("iterate.fresh_share")
    if share is not None and not 0 < share < 1:
        out.append(f"iterate.fresh_share={share} must be between 0 and 1 (null: the fresh pairs as many as they are)")
    if get("round") is not None and get("round") > 1 and get("iterate.samples") < 2:
        out.append(f"iterate.samples={get('iterate.samples')} must be at least 2 (a ranking compares replies)")
    mb, rb = get("train.minibatch_size"), get("train.rollout_batch_size")
    if mb and rb and mb > rb:
        out.append(f"train.minibatch_size={mb} is larger than train.rollout_batch_size={rb}")
    return out


def validate(cfg) -> None:
    from pipeline.core.errors import UserError

    found = problems(cfg)
    if found:
        raise UserError(f"{len(found)} problem{'s' if len(found) > 1 else ''} in the config: " + "; ".join(found))


# ---- help: every field's text, for each command's --help ----

_WIDTH = 120


def _fields(schema: Any, prefix: str = ""):
    """(dotted key, dataclass field, default value) of every field of `schema` (a dataclass or an instance of one),
    depth first: a nested config's own entry, then its fields. Defaults come from an instance, so a group built by a
    factory (data.corpus: SourceConfig(format="text")) shows the values it really starts with."""
    obj = schema() if isinstance(schema, type) else schema
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + f.name, f, value
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{f.name}.")


def fields_help(schema: Any) -> dict[str, str]:
    """Dotted key -> help text for every field of `schema`, nested ones included ("" where a field has none)."""
    return {key: f.metadata.get("help", "") for key, f, _ in _fields(schema)}


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and value.strip() == value and " " not in value else repr(value)
    return repr(value)


def _type(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def describe(name: str) -> str:
    """Every field of the schema registered as `name` (SCHEMAS), with dotted key, type, default and help, grouped by
    top-level section and wrapped at 120 characters: what a command's --help prints."""
    if name not in SCHEMAS:
        raise KeyError(f"no config schema named {name!r}; the names are {', '.join(SCHEMAS)}")
    schema = SCHEMAS[name]
    helps = fields_help(schema)
    sections: dict[str, list[tuple[str, str, bool]]] = {"": []}  # top-level name -> (head, help, is a config) rows
    titles: dict[str, str] = {}
    for key, f, value in _fields(schema):
        top = key.split(".")[0]
        if key == top and dataclasses.is_dataclass(value):
            titles[top] = f"{key} ({_type(f)}): {helps[key]}"
            sections[top] = []
            continue
        nested = dataclasses.is_dataclass(value)
        head = f"{key}  {_type(f)}" if nested else f"{key}  {_type(f)} = {_show(value)}"
        sections["" if key == top else top].append((head, helps[key], nested))  # "": the top-level plain keys
    titles[""] = "top level"
    out = [
        textwrap.fill(
            f"Defaults below are the schema's ({schema.__name__}); conf/<name>.yaml's groups (and its "
            f"preset, where it has one) set many of them: --cfg job prints the composed values.",
            _WIDTH,
        )
    ]
    for top, rows in sections.items():
        if not rows:
            continue
        out += ["", textwrap.fill(titles[top], _WIDTH, subsequent_indent="    ", break_on_hyphens=False)]
        col = min(max(len(h) for h, _, _ in rows), 56) + 4  # help column: 2 indent + the widest head (capped) + 2
        for head, text, nested in rows:
            if nested:  # a config inside the section (data.world, data.corpus, ...): set off by a blank line
                out.append("")
            body = textwrap.wrap(text, _WIDTH - col, break_long_words=False, break_on_hyphens=False) or [""]
            if len(head) + 4 > col:  # a head too wide for the column: its help starts on the next line
                out.append(f"  {head}")
            else:
                out.append(f"  {head.ljust(col - 4)}  {body.pop(0)}".rstrip())
            out += [" " * col + line for line in body]
    return "\n".join(out) + "\n"
