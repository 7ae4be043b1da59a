"""Decoding for every stage: chat prompts in, replies out, cut at the end of the assistant's turn.

    replies = generate(model, tok, [[{"role": "user", "content": "How old is Tovi?"}]], settings, batch_size=16)
    replies[0]            # "Tovi is 42 years old."  (a str)
    replies[0].ended      # True: the model closed its turn itself (False: it ran into max_new_tokens)
    replies[0].n_tokens   # generated tokens, the end-of-turn token included

Prompts go through the tokenizer's chat template with the generation prompt, are left-padded into batches and run
through `model.generate` with the KV cache; decoding (greedy, temperature, top-k, top-p, repetition penalty, beam
search) comes from a `GenerationSettings` (conf/generation/*.yaml). Generation stops at any end-of-turn id
(`pipeline.data.tokenizer.end_of_turn_ids`: our <|end|>, plus eos for hub models). With a seed the result is a pure
function of (model, prompts, settings, batch_size, seed): the global RNG is forked, not disturbed.
"""

from __future__ import annotations

from contextlib import contextmanager
from threading import Event, Thread
from typing import Iterator, Optional

import torch

from pipeline.data.prompts import encode_prompts, left_pad
from pipeline.data.tokenizer import end_of_turn_ids
from pipeline.inference.sampler import engine_applies, engine_sample
from pipeline.models.tokens import ended, response_mask


class Reply(str):
    """A reply's text (special tokens removed), with how it ended. Behaves as a plain str everywhere else."""

    ended: bool
    n_tokens: int
    token_ids: list[int]

    def __new__(cls, text: str, ended: bool, token_ids: list[int]):
        s = super().__new__(cls, text)
        s.ended, s.token_ids, s.n_tokens = ended, token_ids, len(token_ids)
        return s

    def __reduce__(self):  # keep the fields through pickling (accelerate's gather_object pickles)
        return (Reply, (str(self), self.ended, self.token_ids))


def generation_config(settings, tokenizer, **overrides):
    """A complete transformers GenerationConfig: every decoding field explicit, so nothing leaks in from the
    model's own generation_config (transformers fills unset fields from it)."""
    from transformers import GenerationConfig

    sample = bool(settings.do_sample)
    return GenerationConfig(
        max_new_tokens=int(settings.max_new_tokens),
        do_sample=sample,
        num_beams=int(settings.num_beams),
        # Greedy and beam search ignore these; they get the library's neutral values so nothing warns.
        temperature=float(settings.temperature) if sample else 1.0,
        top_k=int(settings.top_k) if sample else 50,
        top_p=float(settings.top_p) if sample else 1.0,
        repetition_penalty=float(settings.repetition_penalty),
        use_cache=True,
        early_stopping=True if settings.num_beams > 1 else None,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **overrides,
    )


def saved_generation_config(tokenizer, max_new_tokens: int):
    """The decoding a saved chat checkpoint carries in its generation_config.json (pretrain's and SFT's final/): what
    plain transformers `generate` uses on it, sampling at 0.7 / top-p 0.95 and stopping at the end of the turn."""
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=True,
        temperature=0.7,
        top_p=0.95,
        max_new_tokens=int(max_new_tokens),
    )


def _context_len(model) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


@contextmanager
def _seeded(seed: Optional[int], device):
    """Seed torch for the block and put the global RNG state back afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    settings,
    batch_size: int = 16,
    device=None,
    seed: Optional[int] = None,
    backend: str = "hf",
) -> list[Reply]:
    """Replies to `prompts` (lists of messages ending in a user turn) in order, as `Reply` strings. backend
    "engine" (or "auto") samples through the continuous-batching engine's runner where it applies (a Llama
    checkpoint, no beams, no repetition penalty: pipeline/inference/sampler.py), else `model.generate`."""
    if not prompts:
        return []
    device = device or model_device(model)
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gc = generation_config(settings, tokenizer)
    ctx = _context_len(model)
    max_prompt = max(1, ctx - int(settings.max_new_tokens)) if ctx else None
    ids = encode_prompts(tokenizer, prompts, max_prompt)
    # Longest first: similar lengths share a batch, so less padding; the original order is restored at the end.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[Optional[Reply]] = [None] * len(ids)
    engine = (
        backend != "hf"
        and int(settings.num_beams) == 1
        and float(settings.repetition_penalty) == 1.0
        and engine_applies(model)
    )
    was_training = model.training
    model.eval()
    try:
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            input_ids, mask = left_pad([ids[i] for i in idx], pad, device)
            with _seeded(None if seed is None else seed + b, device):
                if engine:
                    resp = engine_sample(
                        model,
                        tokenizer,
                        input_ids,
                        mask,
                        stop,
                        int(settings.max_new_tokens),
                        float(settings.temperature),
                        int(settings.top_k),
                        float(settings.top_p),
                        greedy=not settings.do_sample,
                    ).response_ids
                else:
                    seqs = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gc)
                    resp = seqs[:, input_ids.shape[1] :]  # cut after the first end-of-turn, as every rollout is
            for row, n, done, i in zip(
                resp.tolist(), response_mask(resp, stop, pad).sum(-1).tolist(), ended(resp, stop).tolist(), idx
            ):
                text = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                out[i] = Reply(text, done, row[:n])
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def stream(
    model, tokenizer, messages: list[dict], settings, device=None, seed: Optional[int] = None, stop=None
) -> Iterator[str]:
    """Yield the reply to one conversation piece by piece as it is generated (for chat). Beam search cannot
    stream, so it yields the whole reply at once. Setting the threading.Event `stop` ends generation early."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = stop if stop is not None else Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    if settings.num_beams > 1:
        yield str(generate(model, tokenizer, [messages], settings, 1, device, seed)[0])
        return
    device = device or model_device(model)
    ctx = _context_len(model)
    ids = encode_prompts(tokenizer, [messages], max(1, ctx - int(settings.max_new_tokens)) if ctx else None)[0]
    input_ids = torch.tensor([ids], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad(), _seeded(seed, device):
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    generation_config=generation_config(settings, tokenizer),
                    stopping_criteria=StoppingCriteriaList([_Stop()]),
                )
        except BaseException as e:  # noqa: BLE001 — re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    model.eval()
    t = Thread(target=work, daemon=True)
    t.start()
    try:
        for piece in streamer:
            yield piece
    finally:  # also when the consumer stops early (Ctrl-C, or it closed the generator): the worker ends at once
        stop.set()
        t.join()
    if errors:
        raise errors[0]
