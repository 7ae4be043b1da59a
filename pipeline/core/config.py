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

from pipeline.core.registry import STAGES


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
    # Sized to the cpu preset's 2M-parameter model (docs/world.md): 40 entities, each named in hundreds of corpus
    # documents. Measured on its pretrained model, completing a fact sentence: 300 entities gave SFT a held-out
    # correctness of 0.39; 80 entities 29% of facts recalled, 40 entities 49% (77% with the preset's lr 4e-3).
    n_entities: int = 40
    corpus_docs: int = 60000
    sft_dialogues: int = 6000
    sft_eval_dialogues: int = 300
    bad_fraction: float = 0.1  # demonstrations plainly flawed: a wrong fact or a curt fragment
    habit_scale: float = 1.0  # times the demonstrators' habit rates (pipeline.synthetic.HABITS); 0: no habits
    reward_prompts: int = 3000
    reward_test_prompts: int = 300
    k: int = 4
    label_temperature: float = 0.21  # calibrated: ~75% pairwise agreement with the gold ranking
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


SCHEMAS: dict[str, Any] = {}  # config name -> schema, for every entry point


def register(name: str, schema: Any) -> None:
    SCHEMAS[name] = schema
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)


# ---- sft / reward / inference (stages/sft.py, stages/reward.py, stages/chat.py) ----


@dataclass
class GenerationSettings:
    """Decoding (pipeline/generation.py). conf/generation/{greedy,sample,beam}.yaml are the usual choices."""

    max_new_tokens: int = 96
    do_sample: bool = False  # False: greedy (num_beams=1) or beam search (num_beams>1)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    num_beams: int = 1


@dataclass
class LoraSettings:
    """LoRA through peft (conf/peft/lora.yaml turns it on)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"  # or a comma-separated list: q_proj,v_proj
    merge: bool = True  # merge into the base weights on save; false: final/ holds the adapter only


@dataclass
class SFTTrain:
    batch_size: int = 16  # dialogues per device per micro-step (or packed blocks with packing=true)
    grad_accum: int = 1
    max_steps: int = 500
    max_length: Optional[int] = None  # tokens per dialogue, longer ones are truncated (counted); None: model.max_seq_len
    packing: bool = False
    eval_every: int = 100  # held-out loss on data.sft_eval and a table of sample responses
    eval_batch_size: Optional[int] = None  # None: batch_size
    save_every: int = 100  # Trainer checkpoint (resume point)
    log_every: int = 10
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    sample_prompts: int = 8  # fixed eval prompts answered at each evaluation (the samples table)
    gold_eval_prompts: Optional[int] = None  # cap data.eval_prompts for the final gold evaluation; None: all
    gen_batch_size: int = 32
    eval_pretrained: bool = True  # also score the starting model: eval/pretrain_gold_score


@dataclass
class RewardTrain:
    batch_size: int = 16  # preference pairs per device per micro-step
    grad_accum: int = 1
    max_steps: int = 500
    max_length: Optional[int] = None  # prompt + response tokens; longer pairs are dropped (counted); None: model.max_seq_len
    eval_every: int = 100
    eval_batch_size: Optional[int] = None  # None: batch_size
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    center_rewards_coefficient: Optional[float] = None  # e.g. 0.01 pulls rewards towards mean zero
    group_by_prompt: bool = False  # InstructGPT: all pairs of one prompt's ranking in the same batch
    max_prompts: Optional[int] = None  # train on the pairs of the first N prompts of data.preference; None: all
    max_test_prompts: Optional[int] = None  # the same for data.preference_test
    calibration_bins: int = 10
    stats_prompts: int = 256  # prompts of data.prompts answered by the SFT policy to measure reward mean/std
    stats_samples: int = 4  # answers per stats prompt (pairs of them give reward/gold_pair_accuracy)
    gen_batch_size: int = 32


@dataclass
class SFTConfig(StageConfig):
    stage: str = "sft"
    train: SFTTrain = field(default_factory=SFTTrain)
    peft: LoraSettings = field(default_factory=LoraSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # for the gold evaluation


@dataclass
class OnPolicySettings:
    """Comparisons of the SFT policy's own samples, ranked by simulated labellers (pipeline/labellers.py)."""

    prompts: int = 0  # the first N prompts of data.preference; 0, or data that is not the world's: none
    samples: int = 4  # replies per prompt, drawn with the stage's `generation` settings
    label_temperature: Optional[float] = None  # Plackett-Luce noise; None: data.world.label_temperature


@dataclass
class RewardConfig(StageConfig):
    stage: str = "reward"
    train: RewardTrain = field(default_factory=RewardTrain)
    peft: LoraSettings = field(default_factory=LoraSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # SFT samples: on-policy, stats
    onpolicy: OnPolicySettings = field(default_factory=OnPolicySettings)


@dataclass
class ChatConfig:
    """stages/chat.py: talk to a checkpoint. Not a pipeline stage: writes nothing."""

    stage: Optional[str] = None  # whose final/ to load; None: the latest complete stage of the run
    checkpoint: Optional[str] = None  # any Hugging Face checkpoint folder (wins over stage)
    run: str = "default"
    seed: int = 0
    precision: str = "auto"
    system: Optional[str] = None  # system prompt opening every conversation
    paths: PathsConfig = field(default_factory=PathsConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class GenerateConfig(ChatConfig):
    """stages/generate.py: responses for a prompts file."""

    input: Optional[str] = None  # .jsonl ({"messages": [...]} or {"prompt": "..."}) or .txt; None: built-in eval prompts
    output: Optional[str] = None  # .jsonl; None: next to the input (or in the run folder) as *.responses.jsonl
    batch_size: int = 16
    limit: Optional[int] = None  # first N prompts only
    gold: bool = True  # add the gold oracle's score when the prompts are the built-in world's


for _name, _schema in {"chat": ChatConfig, "generate": GenerateConfig}.items():
    register(_name, _schema)


# ---- ppo / report / compare (stages/ppo.py, stages/report.py, stages/compare.py) ----


@dataclass
class PPOTrain:
    """Every implementation detail of RLHF-PPO is a switch here (Huang et al. 2024, InstructGPT, Ziegler et al.)."""

    iterations: int = 100
    rollout_batch_size: int = 32  # prompts per process per iteration
    minibatch_size: int = 16  # episodes per optimizer step (per process)
    grad_accum: int = 1  # micro-batches per minibatch
    ppo_epochs: int = 4  # passes over each rollout batch
    forward_batch_size: int = 32  # chunk size of the no-grad scoring passes
    pack_sequences: int = 4  # forward passes on real tokens only, this many sequences per row; 0: padded batches
    old_logprobs: str = "auto"  # generate (the sampler's own) | recompute (a forward pass) | auto: generate in fp32
    max_prompt_tokens: int = 192
    max_new_tokens: int = 48
    temperature: float = 0.7  # sampling temperature; log-probs are computed under the same temperature
    top_k: int = 0  # 0: off. Anything but plain temperature sampling makes the behaviour policy differ from pi
    top_p: float = 1.0
    reward: str = "model"  # model | gold (PPO on the oracle itself: a perfect-RM ceiling) | contains:<text> (sanity check)
    normalize_reward: bool = True  # (score - mean) / std with the reward stage's statistics on SFT samples
    # a reply that never ends (no end-of-turn within max_new_tokens) scores this far below the batch's lowest
    # finished reply: min(its own score, the lowest finished one) - penalty, on the normalised scale (a clamp below the
    # minimum, not TRL's plain subtraction, which can leave it above finished replies; ppo_math.penalise_unfinished).
    # >= 0; null keeps the reward model's score
    missing_eos_penalty: Optional[float] = 1.0
    kl_coef: float = 0.05  # beta
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs (per token, in the reward)
    adaptive_kl: bool = False  # Ziegler et al.'s proportional controller
    kl_target: float = 6.0  # nats per sequence
    kl_horizon: int = 10000  # episodes
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    critic_init: str = "reward"  # reward (InstructGPT) | policy (the SFT model with a fresh value head)
    critic_lr: Optional[float] = None  # None: optim.lr
    ptx_coef: float = 0.0  # PPO-ptx: + coef * LM loss on the pretraining corpus (InstructGPT used 27.8; see docs)
    ptx_batch_size: int = 4
    ema_decay: Optional[float] = None  # e.g. 0.99: the saved policy is an EMA of the actor
    eval_prompts: int = 200  # held-out prompts for the final PPO-vs-SFT evaluation
    eval_batch_size: int = 32
    # the final evaluation is greedy (eval/..., the headline); true: also sampled at `temperature` (eval/sampled/...)
    eval_sampled: bool = True
    # every eval_every iterations (and before the first, and after the last), the policy answers the first
    # periodic_eval_prompts held-out prompts, sampled at `temperature` (Gao et al. 2022): periodic/gold_score,
    # periodic/reward (the reward model's score, normalised and penalised as the training rewards), periodic/kl
    # (exact KL to SFT along the replies), the lines of the over-optimisation plot. periodic_eval_prompts 0: off
    eval_every: int = 10
    periodic_eval_prompts: int = 64
    save_every: int = 10  # iterations between resume points
    keep_checkpoints: int = 2
    sample_every: int = 10  # iterations between sample tables
    log_samples: int = 8


@dataclass
class PPOConfig(StageConfig):
    stage: str = "ppo"
    train: PPOTrain = field(default_factory=PPOTrain)
    peft: LoraSettings = field(default_factory=LoraSettings)  # LoRA on the actor; the reference is the base


@dataclass
class ReportConfig:
    """stages/report.py: runs/<run>/report.md from the manifests, metrics and a few side-by-side answers."""

    run: str = "default"
    seed: int = 0
    precision: str = "auto"
    samples: int = 6  # held-out prompts answered by every model, side by side
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # unused; `make all ARGS=logger=none` reaches here too
    model: ModelConfig = field(default_factory=ModelConfig)  # unused; lets the presets compose
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class CompareConfig:
    """stages/compare.py: several runs side by side (after a sweep), from manifests alone."""

    runs: List[str] = field(default_factory=list)  # empty: every run under paths.root
    out: Optional[str] = None  # default: <paths.root>/compare.md
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # unused, as in ReportConfig


for _name, _schema in {"report": ReportConfig, "compare": CompareConfig}.items():
    register(_name, _schema)
for _spec in STAGES:  # every training stage composes on the schema its spec names
    register(_spec.name, globals()[_spec.schema])


# ---- validation: every bad argument collected and reported at once ----

_CHOICES = {
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "logger.backend": ("wandb", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "model.arch": ("llama", "hf"),
    "train.kl_estimator": ("k1", "k2", "k3", "abs"),
    "train.critic_init": ("reward", "policy"),
    "train.old_logprobs": ("auto", "generate", "recompute"),
}
_POSITIVE = ("train.batch_size", "train.grad_accum", "train.max_steps", "train.iterations", "train.rollout_batch_size",
             "train.minibatch_size", "train.ppo_epochs", "train.max_new_tokens", "train.log_every", "train.eval_every",
             "train.save_every", "model.hidden_size", "model.num_layers", "model.num_heads", "model.max_seq_len")


def problems(cfg) -> list[str]:
    """What is wrong with a composed stage config, as `key: problem` lines (empty when all is well)."""
    from omegaconf import OmegaConf

    out = []
    get = lambda key: OmegaConf.select(cfg, key, default=None)  # noqa: E731
    for key, allowed in _CHOICES.items():
        v = get(key)
        if v is not None and v not in allowed:
            out.append(f"{key}={v!r} is not one of {', '.join(allowed)}")
    for key in _POSITIVE:
        v = get(key)
        if v is not None and v <= 0:
            out.append(f"{key}={v} must be positive")
    if get("model.arch") == "hf" and not get("model.name_or_path"):
        out.append("model.name_or_path is required with model=hf (a hub name or a local folder)")
    for name, src in (get("data") or {}).items():
        if not OmegaConf.is_dict(src) or "kind" not in src:
            continue
        if src.kind not in ("world", "local", "hub"):
            out.append(f"data.{name}.kind={src.kind!r} is not one of world, local, hub")
        elif src.kind != "world" and not src.path:
            out.append(f"data.{name}.path is required for kind '{src.kind}'")
        if src.on_bad_record not in ("error", "skip"):
            out.append(f"data.{name}.on_bad_record={src.on_bad_record!r} is not one of error, skip")
    reward = get("train.reward")
    if reward is not None and reward not in ("model", "gold") and not str(reward).startswith("contains:"):
        out.append(f"train.reward={reward!r} is not one of model, gold, contains:<text>")
    if (get("onpolicy.prompts") or 0) > 0 and get("onpolicy.samples") < 2:
        out.append(f"onpolicy.samples={get('onpolicy.samples')} must be at least 2 (a ranking compares replies)")
    pen = get("train.missing_eos_penalty")
    if pen is not None and pen < 0:
        out.append(f"train.missing_eos_penalty={pen} must be >= 0: it is how far below the lowest finished reply an "
                   f"unfinished one scores (null: no penalty)")
    mb, rb = get("train.minibatch_size"), get("train.rollout_batch_size")
    if mb and rb and mb > rb:
        out.append(f"train.minibatch_size={mb} is larger than train.rollout_batch_size={rb}")
    return out


def validate(cfg) -> None:
    from pipeline.core.errors import UserError

    found = problems(cfg)
    if found:
        raise UserError(f"{len(found)} problem{'s' if len(found) > 1 else ''} in the config: " + "; ".join(found))
