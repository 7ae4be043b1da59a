"""Loading any checkpoint the pipeline meets: a stage's final/ (merged, or a LoRA adapter on its base), or any
Hugging Face causal LM or sequence classifier by hub name or folder; and the precision it runs in.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pipeline.core.errors import UserError


def dtype_for(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def mixed_precision(precision: str) -> str:
    """accelerate's mixed_precision flag: weights stay fp32, matmuls run in bf16 on GPU."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


@contextlib.contextmanager
def whole_weights():
    """Models loaded inside are whole, even under DeepSpeed ZeRO-3. Once a Trainer's arguments have turned ZeRO-3 on,
    transformers partitions every `from_pretrained` as it loads (zero.Init, keyed on the DeepSpeed config it holds
    in `transformers.integrations.deepspeed`), so a frozen model used outside the DeepSpeed engine (the policy whose
    answers give the reward statistics, the previous round's reward model) would hold empty shards and fail at its
    first forward (`'weight' must be 2-D`). The config is set aside for the block and put back after. (accelerate's
    `zero3_init_context_manager(enable=False)` does not do it: it installs the same stage-3 config again.)"""
    from transformers.integrations import deepspeed as hf_ds

    if not hf_ds.is_deepspeed_zero3_enabled():
        yield
        return
    held = hf_ds._hf_deepspeed_config_weak_ref()  # the Trainer keeps the object alive; the module only a weakref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(held)


def _adapter(path) -> bool:
    """A stage saved with peft.merge=false: final/ holds a LoRA adapter that names its base model."""
    return (Path(path) / "adapter_config.json").exists()


def _load(what: str, path, load):
    from pipeline.core.hub import hub_name, offline, offline_hint

    cut_off = hub_name(path) and offline()  # probed first: offline, the load fails at once instead of retrying
    try:
        return load()  # offline, a hub name may still be in the local cache
    except (OSError, ValueError) as e:
        if cut_off:
            raise UserError(f"cannot load {what} '{path}': {offline_hint(repr(str(path)))}") from None
        raise UserError(
            f"cannot load {what} '{path}' (not a local checkpoint, or a hub name while offline): "
            f"{str(e).splitlines()[0]}"
        ) from None


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A causal LM from a folder or hub name. A LoRA adapter folder is loaded onto its base model and merged."""
    if _adapter(path):
        from peft import AutoPeftModelForCausalLM

        return _load(
            "model",
            path,
            lambda: AutoPeftModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=trust_remote_code
            ).merge_and_unload(),
        )
    from transformers import AutoModelForCausalLM

    return _load(
        "model",
        path,
        lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code),
    )


def load_sequence_classifier(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A model with a scalar head (num_labels=1): a reward model, PPO's critic, or a causal LM's checkpoint given a
    fresh head (the reward stage's start). A LoRA adapter folder (peft.merge=false; it carries its score head) is
    loaded onto its base and merged. transformers' warning that the head is newly initialised is hidden: from a causal
    LM that is the point, and from an adapter the head is restored right after."""
    try:  # TRL's context that hides the expected "score.weight newly initialised / lm_head unused" warnings
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # pragma: no cover — a TRL without it: the warning is harmless
        from contextlib import nullcontext as suppress_seqcls_warning
    if _adapter(path):
        from peft import AutoPeftModelForSequenceClassification as Auto
    else:
        from transformers import AutoModelForSequenceClassification as Auto

    with suppress_seqcls_warning():
        model = _load(
            "a reward or value model from",
            path,
            lambda: Auto.from_pretrained(str(path), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code),
        )
    return model.merge_and_unload() if _adapter(path) else model


def fit_special_ids(model, tok):
    """The model's bos / eos / pad token ids (config and generation config) made to fit the tokenizer it is trained
    with: an id outside the vocabulary (a GPT-2 config's bos 50256 with a smaller tokenizer) is replaced by the
    tokenizer's own, so no stage saves, and no load warns about, a token that does not exist."""
    n = len(tok)
    own = {
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key, fallback in own.items():
            v = getattr(cfg, key, None) if cfg is not None else None
            ids = v if isinstance(v, list) else [v]
            if v is not None and any(i is None or not 0 <= i < n for i in ids):
                setattr(cfg, key, fallback)
    return model


def load_policy(path: str | Path, precision: str = "auto", device=None, trust_remote_code: bool = False):
    """(model, tokenizer) of a chat model, from a stage's final/ or any HF checkpoint folder, on `device` in eval
    mode: what chat, generate, the report and the evaluations answer with."""
    from pipeline.data.tokenizer import load_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = load_tokenizer(path, need_chat_template=True)
    with whole_weights():  # an answering model runs outside any DeepSpeed engine
        model = load_causal_lm(path, dtype=dtype_for(precision, device), trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tok


def load_reward_model(path, precision: str = "auto", device=None):
    """(reward model, tokenizer) from a reward stage's final/ (merged, or a LoRA adapter with its score head), in
    eval mode, its pad id set so the head reads the last real token."""
    from pipeline.data.tokenizer import load_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = load_tokenizer(path, need_chat_template=True)
    model = load_sequence_classifier(path, dtype_for(precision, device))
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok
