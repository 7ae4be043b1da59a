"""How good a policy is, by the gold oracle: its mean gold score and components on held-out prompts, and its
win rate against a reference policy on the same prompts.

    metrics, samples = gold_eval(model, tok, prompts, GoldOracle.from_config(cfg.data.world), settings, batch_size=32)
    metrics["eval/gold_score"]       # mean gold score of the replies, in [0, 1]

    metrics, outputs = versus_sft(answer)   # THE evaluation of a method against SFT: PPO's final one and every
                                            # method stage's (greedy and sampled, win rate with its 95% interval)

Under accelerate with several processes every process answers its share of the prompts and the results are gathered,
so each process returns the same metrics; call these on every process.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pipeline.core.dist import rank_and_world, gather, shard
from pipeline.data.prompts import as_messages, prompt_batch
from pipeline.inference.generation import generate
from pipeline.inference.sampler import decode_responses, sample
from pipeline.rl.forward import response_logits
from pipeline.rl.ops import full_kl
from pipeline.rl.readout import score_rollout


def _prompt_text(messages: list[dict]) -> str:
    """A prompt for a table cell: the last user turn, with earlier turns marked as such."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def gold_eval(
    model,
    tokenizer,
    prompts: Sequence,
    oracle,
    settings,
    batch_size: int = 32,
    device=None,
    seed: int = 0,
    prefix: str = "eval",
    max_samples: Optional[int] = None,
) -> tuple[dict, list[list]]:
    """Answer `prompts` (lists of messages, or {"messages": ...} records) and score the replies with the oracle.

    Returns (metrics, samples): `<prefix>/gold_score` (mean), `<prefix>/gold/<component>` (means),
    `<prefix>/response_tokens` (mean generated tokens), `<prefix>/ended_fraction` (share that closed their turn
    before max_new_tokens); samples are [prompt, response, gold score] rows in prompt order (`max_samples` first).
    """
    msgs = [as_messages(p) for p in prompts]
    mine = shard(len(msgs))
    replies = generate(
        model, tokenizer, [msgs[i] for i in mine], settings, batch_size, device, seed=seed + 7919 * rank_and_world()[0]
    )
    rows = {}
    for i, r in zip(mine, replies):
        if i not in rows:
            rows[i] = (i, str(r), oracle.components(msgs[i], str(r)), r.n_tokens, r.ended)
    rows = sorted({r[0]: r for r in gather(list(rows.values()))}.values(), key=lambda x: x[0])
    n = max(len(rows), 1)
    metrics = {
        f"{prefix}/gold_score": sum(c["total"] for _, _, c, _, _ in rows) / n,
        f"{prefix}/response_tokens": sum(t for *_, t, _ in rows) / n,
        f"{prefix}/ended_fraction": sum(e for *_, e in rows) / n,
    }
    for k in rows[0][2] if rows else {}:
        if k != "total":
            metrics[f"{prefix}/gold/{k}"] = sum(c[k] for _, _, c, _, _ in rows) / n
    samples = [[_prompt_text(msgs[i]), text, round(c["total"], 4)] for i, text, c, _, _ in rows[:max_samples]]
    return metrics, samples


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of prompts where a beats b (paired by position); a tie counts half."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_rate: {len(scores_a)} scores against {len(scores_b)}")
    if not scores_a:
        return float("nan")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)


def win_rate_interval(
    scores_a: Sequence[float], scores_b: Sequence[float], resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval of `win_rate(a, b)`: prompts are drawn with replacement, the pairs kept
    together, `resamples` times. Seeded, so a resumed or repeated evaluation reports the same interval."""
    import random

    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_rate_interval: {len(scores_a)} scores against {len(scores_b)}")
    n = len(scores_a)
    if not n or resamples < 1:
        return float("nan"), float("nan")
    outcome = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(outcome, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return means[round(tail * (resamples - 1))], means[round((1 - tail) * (resamples - 1))]


def _lc_fit(y: torch.Tensor, x: torch.Tensor, ridge: float = 1e-3, steps: int = 25) -> torch.Tensor:
    """Intercepts of logistic regressions y ~ sigmoid(a + b * x), one per row of y and x ([R, n]; y in [0, 1],
    fractional for ties), by Newton's method with a small ridge on b (a win that length explains perfectly would
    otherwise send b to infinity). Returns a, [R]."""
    R = y.shape[0]
    w = torch.zeros(R, 2, dtype=torch.float64)
    X = torch.stack([torch.ones_like(x), x], -1)  # [R, n, 2]
    reg = torch.diag(torch.tensor([0.0, ridge], dtype=torch.float64))
    for _ in range(steps):
        p = torch.sigmoid((X * w[:, None, :]).sum(-1))
        grad = (X * (p - y)[..., None]).sum(1) + w @ reg
        H = (
            torch.einsum("rni,rnj->rij", X * (p * (1 - p))[..., None], X)
            + reg
            + 1e-9 * torch.eye(2, dtype=torch.float64)
        )
        w = w - torch.linalg.solve(H, grad[..., None])[..., 0]
    return w[:, 0]


def length_controlled_win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    len_a: Sequence[float],
    len_b: Sequence[float],
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The win rate of a over b at equal reply length, as AlpacaEval 2's length-controlled win rate: the per-prompt
    outcome (1 win, 0.5 tie, 0 loss) regressed by logistic regression on the length difference, squashed as
    AlpacaEval squashes it, tanh((len_a - len_b) / its standard deviation), and read at a difference of 0:
    sigmoid(intercept). Where a wins only by being longer this is 0.5; where length plays no part it is the plain
    win rate. Returns (rate, low, high), the interval a percentile bootstrap over prompts (refitted each time)."""
    n = len(scores_a)
    if not (n == len(scores_b) == len(len_a) == len(len_b)):
        raise ValueError(f"length_controlled_win_rate: {n}, {len(scores_b)} scores, {len(len_a)}, {len(len_b)} lengths")
    if not n:
        return float("nan"), float("nan"), float("nan")
    y = torch.tensor(
        [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)], dtype=torch.float64
    )
    d = torch.tensor([float(a) - float(b) for a, b in zip(len_a, len_b)], dtype=torch.float64)
    sd = float(d.std(correction=0))
    x = torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)
    rate = float(torch.sigmoid(_lc_fit(y[None], x[None]))[0])
    if resamples < 1:
        return rate, float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    boot = torch.sigmoid(_lc_fit(y[idx], x[idx])).sort().values
    tail = (1 - level) / 2
    return rate, float(boot[round(tail * (resamples - 1))]), float(boot[round((1 - tail) * (resamples - 1))])


def eval_metrics(ppo: dict, sft: dict, prefix: str = "eval", resamples: int = 1000) -> dict:
    """The final evaluation's figures from `rollout_eval`'s (gathered) outputs for a policy (PPO, or any method)
    and SFT on the same prompts: <prefix>/gold_score, sft_gold_score, win_rate_vs_sft (ties count half) with its 95%
    bootstrap interval over prompts (win_rate_ci_low, win_rate_ci_high), the length-controlled win rate
    (lc_win_rate_vs_sft, lc_win_rate_ci_low, lc_win_rate_ci_high: at equal reply length, length_controlled_win_rate),
    tie_rate_vs_sft, kl, reward (the reward
    model's raw score), sft_reward, response_tokens, sft_response_tokens, n_prompts, and the gold components
    <prefix>/gold/<component>, <prefix>/sft_gold/<component>: where the gold score moved (PPO's gains in one
    component can hide losses in another, correctness typically)."""
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    lo, hi = win_rate_interval(ppo["gold"], sft["gold"], resamples)
    lc, lc_lo, lc_hi = length_controlled_win_rate(ppo["gold"], sft["gold"], ppo["length"], sft["length"], resamples)
    out = {
        f"{prefix}/gold_score": mean(ppo["gold"]),
        f"{prefix}/sft_gold_score": mean(sft["gold"]),
        f"{prefix}/win_rate_vs_sft": win_rate(ppo["gold"], sft["gold"]),
        f"{prefix}/win_rate_ci_low": lo,
        f"{prefix}/win_rate_ci_high": hi,
        f"{prefix}/lc_win_rate_vs_sft": lc,
        f"{prefix}/lc_win_rate_ci_low": lc_lo,
        f"{prefix}/lc_win_rate_ci_high": lc_hi,
        f"{prefix}/tie_rate_vs_sft": mean([float(a == b) for a, b in zip(ppo["gold"], sft["gold"])]),
        f"{prefix}/kl": mean(ppo["kl"]),
        f"{prefix}/reward": mean(ppo["reward"]),
        f"{prefix}/sft_reward": mean(sft["reward"]),
        f"{prefix}/response_tokens": mean(ppo["length"]),
        f"{prefix}/sft_response_tokens": mean(sft["length"]),
        f"{prefix}/n_prompts": len(ppo["gold"]),
    }
    for who, name in ((ppo, "gold"), (sft, "sft_gold")):
        for k in who["components"][0] if who["components"] else {}:
            if k != "total":
                out[f"{prefix}/{name}/{k}"] = mean([c[k] for c in who["components"]])
    return out


@torch.no_grad()
def rollout_eval(
    model,
    prompts,
    *,
    tok,
    end_ids,
    t,
    oracle,
    reward_model,
    closing,
    ref_logits,
    dev,
    pack: int,
    greedy: bool,
    backend: str = "hf",
) -> dict:
    """Greedy or sampled (at the training temperature) replies to held-out prompts: gold score and its components,
    the reward model's raw score (the one readout), exact KL to the reference along the reply (summed over its
    tokens, at the sampling temperature), length, whether it ended."""
    out = {"gold": [], "components": [], "reward": [], "kl": [], "length": [], "text": [], "ended": []}
    for s in range(0, len(prompts), t.eval_batch_size):
        batch = prompts[s : s + t.eval_batch_size]
        ids, am = prompt_batch(tok, batch, t.max_prompt_tokens, dev)
        ro = sample(
            model,
            tok,
            ids,
            am,
            end_ids,
            t.max_new_tokens,
            t.temperature,
            t.top_k,
            t.top_p,
            greedy=greedy,
            backend=backend,
        )
        texts = decode_responses(tok, ro)
        kl = full_kl(response_logits(model, ro, pack), ref_logits(ro), ro.response_mask, t.temperature)
        parts = [oracle.components(p, x) for p, x in zip(batch, texts)]
        out["gold"] += [c["total"] for c in parts]
        out["components"] += parts
        out["reward"] += score_rollout(reward_model, ro, closing, pack).tolist()
        out["kl"] += kl.tolist()
        out["length"] += ro.response_mask.sum(-1).tolist()
        out["text"] += texts
        out["ended"] += ro.ended.tolist()
    return out


def gathered(evaluate, prompts: list) -> dict:
    """`evaluate(prompts)` (a `rollout_eval`-shaped dict of lists) on this process's shard of `prompts`, gathered
    from every process (padding repeats dropped), in prompt order: every process returns the whole of it."""
    mine = shard(len(prompts))
    out = evaluate([prompts[i] for i in mine])
    rows = {i: {k: v[j] for k, v in out.items()} for j, i in enumerate(mine)}
    rows = dict(sorted(gather(list(rows.items()))))
    return {k: [r[k] for r in rows.values()] for k in out}


def versus_sft(answer, greedy: bool = True, sampled: bool = True, resamples: int = 1000) -> tuple[dict, dict]:
    """THE evaluation of a method against SFT, the one PPO's final evaluation and every method stage make:
    `answer(who, greedy)` gives the gathered `rollout_eval` outputs of the method (who="policy") or of SFT
    (who="sft") on the same held-out prompts. Greedy figures are eval/..., sampled ones eval/sampled/...
    (`eval_metrics`: gold score and components, win and tie rate over SFT with the win rate's bootstrap interval,
    the reward model's score, KL to SFT, reply length). Returns (metrics, {prefix: [method's, SFT's outputs]})."""
    metrics, outputs = {}, {}
    for prefix, g in (("eval", True), ("eval/sampled", False)):
        if (g and greedy) or (not g and sampled):
            both = [answer("policy", g), answer("sft", g)]
            outputs[prefix] = both
            metrics.update(eval_metrics(*both, prefix, resamples))
    return metrics, outputs


def eval_record(outputs: dict) -> dict:
    """What a PPO stage keeps of its final evaluation (eval_outputs.json) for the next round to compare with: the
    policy's gold score per held-out prompt, and its reply, greedy ("eval") and sampled ("eval/sampled")."""
    return {prefix: {"gold": mine["gold"], "text": mine["text"]} for prefix, (mine, _) in outputs.items()}


def versus_previous(mine: dict, previous: dict, resamples: int = 1000) -> dict:
    """A round against the one before it, on the same held-out prompts (paired by position): for each prefix both
    have, <prefix>/win_rate_vs_previous with its 95% bootstrap interval, tie rate and the previous round's gold."""
    out = {}
    for prefix, m in mine.items():
        p = previous.get(prefix)
        if p is None or len(p["gold"]) != len(m["gold"]):
            continue
        lo, hi = win_rate_interval(m["gold"], p["gold"], resamples)
        out.update(
            {
                f"{prefix}/win_rate_vs_previous": win_rate(m["gold"], p["gold"]),
                f"{prefix}/win_rate_vs_previous_ci_low": lo,
                f"{prefix}/win_rate_vs_previous_ci_high": hi,
                f"{prefix}/tie_rate_vs_previous": sum(a == b for a, b in zip(m["gold"], p["gold"])) / len(p["gold"]),
                f"{prefix}/previous_gold_score": sum(p["gold"]) / max(len(p["gold"]), 1),
            }
        )
    return out


def kl_bound(n: int) -> float:
    """log n - (n-1)/n: the KL of best-of-n sampling to the policy it samples from as Stiennon et al. (2020) give
    it, which Beirami et al. (2024) show is an upper bound (reached when no two samples tie)."""
    import math

    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n_eval(
    model,
    prompts,
    *,
    tok,
    end_ids,
    t,
    oracle,
    reward_model,
    closing,
    dev,
    pack: int,
    n: int,
    also: Sequence[int] = (),
    backend: str = "hf",
) -> dict:
    """Best-of-n as a policy: `n` replies per prompt sampled from `model` at t.temperature, the reward model's
    best (the one readout) is the answer. The outputs have `rollout_eval`'s keys, the KL being the bound
    `kl_bound(n)`; `also` gives the pick among the first m of the same samples for each m, as "m:<m>:gold",
    "m:<m>:reward" and "m:<m>:length" (a curve over n at the cost of one draw)."""
    out = {"gold": [], "components": [], "reward": [], "kl": [], "length": [], "text": [], "ended": []}
    for m in also:
        out.update({f"m:{m}:gold": [], f"m:{m}:reward": [], f"m:{m}:length": []})
    for s in range(0, len(prompts), t.eval_batch_size):
        batch = prompts[s : s + t.eval_batch_size]
        many = [p for p in batch for _ in range(n)]  # prompt-major: prompt i's samples are rows i*n .. i*n+n-1
        ids, am = prompt_batch(tok, many, t.max_prompt_tokens, dev)
        ro = sample(model, tok, ids, am, end_ids, t.max_new_tokens, t.temperature, t.top_k, t.top_p, backend=backend)
        texts = decode_responses(tok, ro)
        rm = score_rollout(reward_model, ro, closing, pack).cpu().view(len(batch), n)
        length = ro.response_mask.sum(-1).view(len(batch), n)
        ended = ro.ended.view(len(batch), n)
        parts = [oracle.components(p, x) for p, x in zip(many, texts)]
        for i in range(len(batch)):
            for m in also:
                j = i * n + int(rm[i, :m].argmax())
                out[f"m:{m}:gold"].append(parts[j]["total"])
                out[f"m:{m}:reward"].append(float(rm.view(-1)[j]))
                out[f"m:{m}:length"].append(int(length.view(-1)[j]))
            k = int(rm[i].argmax())
            j = i * n + k
            out["gold"].append(parts[j]["total"])
            out["components"].append(parts[j])
            out["reward"].append(float(rm[i, k]))
            out["kl"].append(kl_bound(n))
            out["length"].append(int(length[i, k]))
            out["text"].append(texts[j])
            out["ended"].append(bool(ended[i, k]))
    return out
