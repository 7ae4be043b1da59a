"""A model read only where it matters: logits or values at the token positions asked for, none for the prompt."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from pipeline.core.errors import UserError


class TokenModel(torch.nn.Module):
    """A Hugging Face causal LM (head: lm_head) or *ForSequenceClassification model (head: score) read only at the
    token positions asked for: logits or values where they are needed, none for the prompt. The stages hand this
    wrapper, not the inner model, to accelerate.prepare: under DDP/FSDP the forward that computes the loss must be
    the wrapped module's, or the gradients are never all-reduced."""

    def __init__(self, model, autocast=None):
        super().__init__()
        self.model = model  # generate / save_pretrained / disable_adapter go to this one
        # a model accelerate does not prepare (PPO's frozen reference and reward model) runs its forward under this
        # context, e.g. Accelerator.autocast: the same mixed precision as the prepared policy and critic, so the
        # reference's log-probs equal the policy's at the first iteration (KL 0) under bf16 too
        self.autocast = autocast
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the adapted model
        prefix = getattr(base, "base_model_prefix", "")
        if getattr(base, prefix, None) is None or _head(base) is None:
            raise UserError(
                f"{type(base).__name__}: cannot find its backbone (.{prefix or 'base_model_prefix'}) "
                f"and output head (lm_head, score or classifier)"
            )
        self._base = [base]  # in a list: not registered a second time as a submodule

    def tie_weights(self, *args, **kwargs):
        """The inner model's own (a tied lm_head and embedding made one parameter again): accelerate's FSDP2
        preparation moves the prepared module to the meta device and re-ties through this method, without which the
        head would become a second, separately trained parameter."""
        base = self._base[0]
        if hasattr(base, "tie_weights"):
            base.tie_weights(*args, **kwargs)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor], select: Tensor
    ) -> Tensor:
        """Head outputs at `select` (indices into the flattened [rows * width] positions; any shape S): [*S, D]."""
        base = self._base[0]
        with self.autocast() if self.autocast is not None else nullcontext():
            h = getattr(base, base.base_model_prefix)(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            return _head(base)(h.flatten(0, 1)[select])


def _head(base):
    """lm_head of a causal LM; the scalar head of a Llama/Qwen/Mistral/GPT-2 ... sequence classifier."""
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for head in (lm_head, getattr(base, "score", None), getattr(base, "classifier", None)):
        if head is not None:
            return head
    return None


def disable_dropout(model) -> None:
    """PPO's ratio and KL assume the same function computes old and new log-probs: no dropout anywhere. The
    config's rates are not enough: a module copies its rate when it is built (Llama's attention keeps its own
    `attention_dropout` and applies it in train mode), so the float rates on the modules are zeroed too."""
    rates = (
        "attention_dropout",
        "hidden_dropout",
        "dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "attn_dropout",
        "dropout_p",
        "dropout_rate",
    )
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for k in rates:
            if isinstance(getattr(m, k, None), float):
                setattr(m, k, 0.0)
    for k in rates:
        if hasattr(model.config, k) and isinstance(getattr(model.config, k), float):
            setattr(model.config, k, 0.0)


def fold_normalisation(model, mean: float, std: float) -> None:
    """Make a sequence classifier output (score - mean) / std instead of its score: its scalar head becomes a biased
    linear layer with weight W / std and bias (b - mean) / std. PPO's critic starts as the reward model but is
    trained on returns built from the normalised score; with the raw head its first values sit on the reward
    model's scale, so the last token's TD error starts biased by the difference (favouring late tokens and long
    replies) until value clipping lets the critic catch up."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = next((n for n in ("score", "classifier") if isinstance(getattr(base, n, None), torch.nn.Linear)), None)
    if name is None:
        raise UserError(f"{type(base).__name__}: no linear scalar head (score or classifier) to normalise")
    head = getattr(base, name)
    new = torch.nn.Linear(
        head.in_features, head.out_features, bias=True, device=head.weight.device, dtype=head.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(head.weight / std)
        new.bias.copy_(((head.bias if head.bias is not None else 0.0) - mean) / std)
    new.requires_grad_(head.weight.requires_grad)
    setattr(base, name, new)
