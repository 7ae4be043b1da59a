"""Running the model for the engine: a batch of rows that grows (prefill) and shrinks, one token per row a step.

    runner = make_runner(model)                # LlamaRunner when the checkpoint is a Llama, else HFRunner
    logits = runner.step([], [ids_a, ids_b])   # prefill two prompts, appended to the batch: [2, vocab]
    logits = runner.step([tok_1, tok_2], [ids_c])  # feed each row its newest token, and prefill a third: [3, vocab]
    order = runner.remove([0])                 # drop row 0; the rows left, as their old indices, in order

Two ways, one contract (tests/test_serving.py checks both against `model.generate`, token for token):
- HFRunner: any Hugging Face causal LM through its own forward and a DynamicCache. Rows are left-padded to a
  common length; joining rows are prefilled apart and their caches merged in, and columns that every row has as
  padding are cut when rows leave.
- LlamaRunner: Llama-architecture checkpoints (ours, and the Hub's Llamas with plain RoPE) run by a lean forward
  of a dozen tensor ops per layer over a preallocated cache with one slot per row: q/k/v and gate/up fused into
  one matmul each, no cache concatenation, and a row that leaves is replaced by the last one (one slot copied),
  so the batch is always the first B slots and attention reads a view, not a copy. A step is one forward over
  the running rows' tokens and the joining prompts' tokens packed together (vLLM's mixed prefill and decode), not
  a prefill pass and then a decoding pass. On a small model the HF forward's Python overhead is most of a step;
  this path is several times faster there.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F


class HFRunner:
    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed the forward's past_key_values to cache; older releases know only the old name.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # The prefill needs the last position's logits only: not computing the others saves the output
        # projection over the whole prompt.
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cache = None
        self._mask: Optional[torch.Tensor] = None  # [B, T]: 1 where the cache holds a real token
        self._pos: Optional[torch.Tensor] = None  # [B]: the position of each row's next token

    @property
    def size(self) -> int:
        return 0 if self._pos is None else len(self._pos)

    def _forward(self, ids, mask, pos, cache, last_only=False):
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            use_cache=True,
            **{self._cache_kw: cache},
            **(self._last_only if last_only else {}),
        )
        c = getattr(out, "past_key_values", None)
        if c is None:
            c = getattr(out, "cache", None)
        return out.logits[:, -1, :], (c if c is not None else cache)

    def step(self, last: list[int], prompts: list[list[int]] = ()) -> torch.Tensor:
        """The running rows' next logits, then the new prompts' (prefilled apart, then merged into the batch)."""
        out = [self._decode(last)] if len(last) else []
        if prompts:
            out.append(self._add(prompts))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _add(self, prompts: list[list[int]]) -> torch.Tensor:
        from transformers import DynamicCache

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, pos, DynamicCache(config=self.model.config), last_only=True)
        self._merge(cache, mask, mask.sum(-1))
        return logits

    def _decode(self, last: list[int]) -> torch.Tensor:
        self._mask = torch.cat([self._mask, torch.ones((len(last), 1), dtype=torch.long)], dim=1)
        logits, self._cache = self._forward(torch.tensor(last)[:, None], self._mask, self._pos[:, None], self._cache)
        self._pos = self._pos + 1
        return logits

    def remove(self, drop: list[int]) -> list[int]:
        gone = set(drop)
        keep = [i for i in range(self.size) if i not in gone]
        if not keep:
            self._cache, self._mask, self._pos = None, None, None
            return keep
        idx = torch.tensor(keep, dtype=torch.long)
        self._cache.batch_select_indices(idx.to(self.device))
        self._mask, self._pos = self._mask[idx], self._pos[idx]
        # Columns that every remaining row has as padding are dead weight in every later step: cut them.
        dead = int((self._mask.cumsum(-1) == 0).all(0).sum())
        if dead:
            self._rebuild([(layer.keys[:, :, dead:], layer.values[:, :, dead:]) for layer in self._cache.layers])
            self._mask = self._mask[:, dead:]
        return keep

    def _rebuild(self, data) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache(ddp_cache_data=data, config=self.model.config)

    def _merge(self, cache, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        """Append prefilled rows (their cache and mask) to the batch, left-padding the shorter side."""
        if self._cache is None:
            self._cache, self._mask, self._pos = cache, mask, lengths.clone()
            return
        old_t, new_t = self._mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)

        def pad(x, t):  # [B, H, T, D] -> [B, H, width, D], zeros in front
            return F.pad(x, (0, 0, width - t, 0)) if t < width else x

        self._rebuild(
            [
                (
                    torch.cat([pad(a.keys, old_t), pad(b.keys, new_t)]),
                    torch.cat([pad(a.values, old_t), pad(b.values, new_t)]),
                )
                for a, b in zip(self._cache.layers, cache.layers)
            ]
        )
        self._mask = torch.cat([F.pad(self._mask, (width - old_t, 0)), F.pad(mask, (width - new_t, 0))])
        self._pos = torch.cat([self._pos, lengths])


class LlamaRunner:
    """See the module docstring. `supports(model)` says whether a checkpoint can take this path."""

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        return (
            type(model).__name__ == "LlamaForCausalLM"
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and rope.get("rope_type", "default") == "default"
            and getattr(cfg, "hidden_act", "silu") == "silu"
            and getattr(cfg, "pretraining_tp", 1) == 1
        )

    def __init__(self, model, max_rows: int, max_len: int, fuse: bool = True):
        """fuse: q/k/v and gate/up as one matmul each, from weights concatenated once (a copy: serving's frozen
        model); false reads the model's own parameter tensors, so a runner over a policy being trained always runs
        its current weights, with nothing copied or reloaded after an update (the RL sampler's case)."""
        cfg, m = model.config, model.model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.eps = cfg.rms_norm_eps
        self.embed = m.embed_tokens.weight
        self.norm = m.norm.weight
        self.head = model.lm_head.weight
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            gu = (mlp.gate_proj.weight, mlp.up_proj.weight)
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    torch.cat(qkv) if fuse else qkv,
                    a.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    torch.cat(gu) if fuse else gu,
                    mlp.down_proj.weight,
                )
            )
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        inv = 1.0 / theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], -1)
        self.cos = ang.cos().to(self.device, self.dtype)
        # rotate_half(x) * sin is x rolled by half a head times sin with its first half negated: one op fewer
        half = self.hd // 2
        self.sin = (ang.sin() * torch.cat([-torch.ones(half), torch.ones(half)])).to(self.device, self.dtype)
        shape = (len(self.layers), max_rows, self.nkv, max_len, self.hd)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.max_len = max_len
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # each slot's next position
        self.slots = torch.arange(max_rows, device=self.device)
        self.n = 0

    @property
    def size(self) -> int:
        return self.n

    def _rms(self, x, w):
        if self.dtype == torch.float32:  # one fused op, bit for bit the model's own RMSNorm in float32
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        x32 = x.float()  # in half precision the model normalises in float32, then scales in its own dtype
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.dtype) * w

    def _rope(self, x, cos, sin):  # x [N, H, D]; cos/sin [N, 1, D] (sin sign-folded, see __init__)
        return x * cos + x.roll(self.hd // 2, -1) * sin

    def _decode_attention(self, q, k, v, mask):
        """One query per row over its slot ([B, H, 1, D] against [B, Hkv, S, D]), the additive mask [B, 1, 1, S]
        hiding what lies past each row's position. Written out: for a single query, PyTorch's CPU SDPA kernel costs
        several times what these three ops do."""
        if self.nkv != self.nh:
            k, v = (x.repeat_interleave(self.nh // self.nkv, 1) for x in (k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.hd**-0.5).add_(mask)
        return torch.matmul(torch.softmax(scores, -1), v)

    def step(self, last: list[int], prompts: list[list[int]] = ()) -> torch.Tensor:
        """One forward for the whole batch: the running rows' newest tokens and the new prompts' every token, packed
        into one sequence of N tokens, so a step with joining requests costs one pass, not a prefill pass and a
        decoding pass. The linear layers see [N, hidden]; only attention splits: the running rows (one query each)
        read their own slots up to their position, the new rows (right-padded to a common width, causal) theirs.
        Returns the logits [B + n, vocab] of each running row, then of each prompt's last token."""
        b, n = self.n, len(prompts)
        width = max(map(len, prompts)) if n else 0
        dev = self.device
        if n:
            # packed tokens: row i < b at its position; prompt j's tokens at b + j * width + 0..width-1 (padding
            # after a prompt is computed and written to cache slots that decoding overwrites before it is read)
            ids = torch.zeros(b + n * width, dtype=torch.long)
            ids[:b] = torch.tensor(last, dtype=torch.long)
            for j, p in enumerate(prompts):
                ids[b + j * width : b + j * width + len(p)] = torch.tensor(p, dtype=torch.long)
            ids = ids.to(dev)
            pos = torch.cat([self.pos[:b], torch.arange(width, device=dev).repeat(n)])
            slot = torch.cat([self.slots[:b], self.slots[b : b + n].repeat_interleave(width)])
        else:  # decoding only, the common step
            ids, pos, slot = torch.tensor(last, dtype=torch.long, device=dev), self.pos[:b].clone(), self.slots[:b]
        # where each token's key and value go in the cache, as rows of its [rows * heads * length, head_dim] view
        at = ((slot[:, None] * self.nkv + torch.arange(self.nkv, device=dev)) * self.max_len + pos[:, None]).flatten()
        span = int(self.pos[:b].max()) + 1 if b else 0
        mask = None
        if b:  # -inf after each row's own position: an additive mask, built once for every layer
            mask = torch.zeros((b, 1, 1, span), device=dev, dtype=self.dtype).masked_fill_(
                torch.arange(span, device=dev)[None, None, None, :] > self.pos[:b, None, None, None], float("-inf")
            )
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        nq, nk, hd, gqa = self.nh * self.hd, self.nkv * self.hd, self.hd, self.nkv != self.nh
        x = self.embed[ids]
        for i, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.layers):
            h = self._rms(x, w_in)
            qkv = (
                F.linear(h, w_qkv)
                if isinstance(w_qkv, torch.Tensor)
                else torch.cat([F.linear(h, w) for w in w_qkv], -1)
            )
            qk = self._rope(qkv[:, : nq + nk].view(-1, self.nh + self.nkv, hd), cos, sin)  # q and k in one go
            q = qk[:, : self.nh]
            self.k[i].view(-1, hd).index_copy_(0, at, qk[:, self.nh :].reshape(-1, hd))
            self.v[i].view(-1, hd).index_copy_(0, at, qkv[:, nq + nk :].reshape(-1, hd))
            parts = []
            if b:
                parts.append(
                    self._decode_attention(
                        q[:b, :, None], self.k[i, :b, :, :span], self.v[i, :b, :, :span], mask
                    ).reshape(b, nq)
                )
            if n:
                qn = q[b:].view(n, width, self.nh, hd).transpose(1, 2)
                new = slice(b, b + n)
                parts.append(
                    F.scaled_dot_product_attention(
                        qn, self.k[i, new, :, :width], self.v[i, new, :, :width], is_causal=True, enable_gqa=gqa
                    )
                    .transpose(1, 2)
                    .reshape(n * width, nq)
                )
            x = x + F.linear(parts[0] if len(parts) == 1 else torch.cat(parts), w_o)
            h = self._rms(x, w_post)
            gate, up = (
                F.linear(h, w_gu).chunk(2, -1) if isinstance(w_gu, torch.Tensor) else (F.linear(h, w) for w in w_gu)
            )
            x = x + F.linear(F.silu(gate) * up, w_down)
        if n:
            lengths = torch.tensor([len(p) for p in prompts], device=dev)
            self.pos[b : b + n] = lengths
            x = x[torch.cat([torch.arange(b, device=dev), b + torch.arange(n, device=dev) * width + lengths - 1])]
        self.pos[:b] += 1
        self.n += n
        return F.linear(self._rms(x, self.norm), self.head).float()

    def remove(self, drop: list[int]) -> list[int]:
        order = list(range(self.n))
        for i in sorted(drop, reverse=True):  # the last row moves into the hole: one slot copied, not all
            last = self.n - 1
            if i != last:
                used = int(self.pos[last])  # the positions it has written; the rest of the slot is never read
                self.k[:, i, :, :used] = self.k[:, last, :, :used]
                self.v[:, i, :, :used] = self.v[:, last, :, :used]
                self.pos[i] = self.pos[last]
                order[i] = order[last]
            order.pop()
            self.n -= 1
        return order


def make_runner(model, pad_id: int, max_rows: int, context: int, fast: bool = True, budget_bytes: float = 2 * 2**30):
    """The LlamaRunner where the checkpoint allows it and its cache fits `budget_bytes`, else the HF forward."""
    if fast and LlamaRunner.supports(model):
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        size = 2 * cfg.num_hidden_layers * max_rows * cfg.num_key_value_heads * context * hd
        if size * next(model.parameters()).element_size() <= budget_bytes:
            return LlamaRunner(model, max_rows, context)
    return HFRunner(model, pad_id)
