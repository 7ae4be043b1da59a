"""Reading finished runs back: manifests, metric curves and headline tables (no network, no W&B needed)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.registry import METHODS, ORDER, STAGES
from pipeline.core.runs import read_manifest

# The figures that say what each stage did, in the order a reader wants them (each stage's spec names them).
HEADLINE = {s.name: list(s.headline) for s in STAGES}


def stage_manifests(root: Path, run: str) -> dict[str, dict]:
    out = {}
    for stage in (*ORDER, *METHODS):
        m = read_manifest(root / run / stage) if (root / run / stage).exists() else None
        if m:
            out[stage] = m
    return out


def curve(root: Path, run: str, stage: str, key: str) -> list[tuple[float, float]]:
    """(step, value) points of one metric; a resumed stage may log a step twice: the last one wins."""
    p = root / run / stage / "metrics.jsonl"
    pts: dict[float, float] = {}
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if key in row:
                pts[row["step"]] = row[key]
    return sorted(pts.items())


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def headline_rows(manifests: dict[str, dict]) -> list[tuple[str, str, str]]:
    rows = []
    for stage, keys in HEADLINE.items():
        m = manifests.get(stage)
        if not m:
            continue
        for k in keys:
            if k in m.get("metrics", {}):
                rows.append((stage, k, fmt(m["metrics"][k])))
    return rows


def component_rows(manifests: dict[str, dict], weights: dict[str, float]) -> list[tuple]:
    """(component, weight, pretrained, SFT, SFT as PPO evaluates it, PPO): mean gold components on the held-out
    prompts, None where a stage has not run. The first two come from the SFT stage's evaluation, the last two from
    the PPO stage's, which answers with its own `train.max_new_tokens`: compare within a pair."""
    sft = manifests.get("sft", {}).get("metrics", {})
    ppo = manifests.get("ppo", {}).get("metrics", {})
    rows = [(k, w, sft.get(f"eval/pretrain/gold/{k}"), sft.get(f"eval/gold/{k}"), ppo.get(f"eval/sft_gold/{k}"),
             ppo.get(f"eval/gold/{k}")) for k, w in weights.items()]
    return rows if any(v is not None for row in rows for v in row[2:]) else []


def all_runs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any((p / s / "manifest.json").exists()
                                                                        for s in (*ORDER, *METHODS))) if root.exists() else []


# PPO's final evaluation, greedy and sampled: (label, PPO's key, SFT's key or None), the prefix left out
PPO_EVAL = [("gold score", "gold_score", "sft_gold_score"), ("win rate vs SFT (ties half)", "win_rate_vs_sft", None),
            ("tie rate vs SFT", "tie_rate_vs_sft", None), ("KL to SFT (nats)", "kl", None),
            ("reward model score", "reward", "sft_reward"), ("reply tokens", "response_tokens", "sft_response_tokens")]


def decoding_rows(ppo_metrics: dict, weights: dict[str, float]) -> list[tuple]:
    """(what, SFT greedy, PPO greedy, SFT sampled, PPO sampled): PPO's final evaluation under both decodings
    (eval/... and eval/sampled/...), its headline figures then the gold components; None where not measured (a run
    from before the sampled evaluation, or train.eval_sampled=false). Empty without a PPO evaluation."""
    g = ppo_metrics.get
    rows = [(label, g(f"eval/{s}") if s else None, g(f"eval/{p}"), g(f"eval/sampled/{s}") if s else None,
             g(f"eval/sampled/{p}")) for label, p, s in PPO_EVAL]
    rows += [(f"gold: {k}", g(f"eval/sft_gold/{k}"), g(f"eval/gold/{k}"), g(f"eval/sampled/sft_gold/{k}"),
              g(f"eval/sampled/gold/{k}")) for k in weights]
    return rows if any(v is not None for row in rows for v in row[1:]) else []
