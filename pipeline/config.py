"""Structured config schema for every stage.

Each root config in conf/ starts from one of these dataclasses, so a mistyped key or a wrong type fails at
composition time with Hydra's own error naming the key. Groups (model, data, optim, logger, paths, preset)
merge on top. Values that differ per preset live in conf/preset/, not here: the defaults below are only the
shape and a sane fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConfig:
    root: str = "runs"  # runs/<run>/<stage>/ lives here
    cache: str = ".cache"  # generated synthetic data, keyed by its config


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "rlhf-pipeline"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online iff an API key is configured) | online | offline
    log_model: bool = True  # upload each stage's final/ as a model artifact


@dataclass
class ModelConfig:
    # A Hugging Face causal LM (hub name or local folder). None: build `arch` from scratch with the sizes below.
    name_or_path: Optional[str] = None
    arch: str = "llama"
    vocab_size: int = 4096  # the tokenizer stage trains to this size
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 688
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    trust_remote_code: bool = False


@dataclass
class WorldConfig:
    """The seeded synthetic world (pipeline/world.py) and the sizes of everything generated from it."""

    seed: int = 1234
    n_entities: int = 300
    corpus_docs: int = 60000
    sft_dialogues: int = 6000
    sft_eval_dialogues: int = 300
    bad_fraction: float = 0.3
    reward_prompts: int = 3000
    reward_test_prompts: int = 300
    k: int = 4
    label_temperature: float = 1.0
    eval_prompts: int = 200
    ppo_prompts: int = 2000


@dataclass
class SourceConfig:
    """Where one kind of data comes from (see pipeline/formats.py for the formats)."""

    kind: str = "world"  # world (built-in synthetic data) | local (files) | hub (a datasets name)
    path: Optional[str] = None  # file, glob or hub dataset name
    name: Optional[str] = None  # hub dataset config
    split: str = "train"
    format: str = "auto"  # text | messages | prompt_completion | pairs | hh | ranked | prompts
    field: Optional[str] = None  # column override (text or messages column)
    on_bad_record: str = "error"  # error | skip (skips are counted in the log and manifest)


@dataclass
class DataConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    corpus: SourceConfig = field(default_factory=lambda: SourceConfig(format="text"))
    sft: SourceConfig = field(default_factory=lambda: SourceConfig(format="messages"))
    sft_eval: SourceConfig = field(default_factory=lambda: SourceConfig(format="messages", split="eval"))
    preference: SourceConfig = field(default_factory=lambda: SourceConfig(format="ranked", split="train"))
    preference_test: SourceConfig = field(default_factory=lambda: SourceConfig(format="ranked", split="test"))
    prompts: SourceConfig = field(default_factory=lambda: SourceConfig(format="prompts", split="ppo"))
    eval_prompts: SourceConfig = field(default_factory=lambda: SourceConfig(format="prompts", split="eval"))
    val_fraction: float = 0.02  # held-out share of the pretraining corpus (by document)
    max_docs: Optional[int] = None  # cap the corpus (quick experiments)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class TokenizerTrain:
    min_frequency: int = 2
    max_docs: Optional[int] = 50000  # BPE statistics saturate long before the whole corpus


@dataclass
class PretrainTrain:
    batch_size: int = 16  # sequences per device per micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    block_size: Optional[int] = None  # None: model.max_seq_len
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200  # intermediate checkpoint (resume point)
    log_every: int = 10
    keep_checkpoints: int = 2


@dataclass
class StageConfig:
    """Keys shared by every stage's root config."""

    stage: str = MISSING
    run: str = "default"
    parent_run: Optional[str] = None  # where parent stages are found; None = the same run (sweeps set it)
    seed: int = 0
    force: bool = False  # redo a finished stage
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TokenizerConfig(StageConfig):
    stage: str = "tokenizer"
    train: TokenizerTrain = field(default_factory=TokenizerTrain)


@dataclass
class PretrainConfig(StageConfig):
    stage: str = "pretrain"
    train: PretrainTrain = field(default_factory=PretrainTrain)


SCHEMAS: dict[str, Any] = {"tokenizer": TokenizerConfig, "pretrain": PretrainConfig}


def register(name: str, schema: Any) -> None:
    SCHEMAS[name] = schema
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)


for _name, _schema in list(SCHEMAS.items()):
    register(_name, _schema)
