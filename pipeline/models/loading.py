"""Loading any checkpoint the pipeline meets: a stage's final/ (merged, or a LoRA adapter on its base), or any
Hugging Face causal LM or sequence classifier by hub name or folder; and the precision it runs in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

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



def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{path}' (not a local checkpoint, or a hub name while offline): "
                        f"{str(e).splitlines()[0]}")



def load_for_inference(path: str | Path, precision: str = "auto", device=None, trust_remote_code: bool = False):
    """(model, tokenizer) from a stage's final/ or any HF checkpoint folder, on `device`, in eval mode. A LoRA
    adapter folder (peft.merge=false) is loaded onto its base model and merged."""
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models.loading import dtype_for, load_causal_lm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype_for(precision, device)
    path = Path(path)
    tok = load_tokenizer(path, need_chat_template=True)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                         trust_remote_code=trust_remote_code).merge_and_unload()
    else:
        model = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tok



def load_reward_model(path, precision: str = "auto", device=None):
    """(reward model, tokenizer) from a reward stage's final/ (a merged model, or a LoRA adapter with its score
    head when peft.merge=false), in eval mode."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models.loading import dtype_for

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype_for(precision, device)
    tok = load_tokenizer(path, need_chat_template=True)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        try:  # the base loads with a fresh score head (restored from the adapter): hide that warning
            from trl.trainer.reward_trainer import suppress_seqcls_warning
        except ImportError:  # pragma: no cover
            from contextlib import nullcontext as suppress_seqcls_warning
        with suppress_seqcls_warning():
            model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
        model = model.merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok



def load_critic(path: str, dtype):
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a value model from '{path}': {str(e).splitlines()[0]}")
    return model
