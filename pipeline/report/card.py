"""Reading finished runs back: manifests, metric curves and headline tables (no network, no W&B needed)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.registry import METHODS, ORDER, STAGES, split_folder
from pipeline.core.runs import read_manifest

# The figures that say what each stage did, in the order a reader wants them (each stage's spec names them).
HEADLINE = {s.name: list(s.headline) for s in STAGES}


def stage_manifests(root: Path, run: str) -> dict[str, dict]:
    """Every stage folder's manifest in a run, by folder: the chain, the methods, and make iterate's later rounds
    (ppo_r2, reward_r2, dpo_r2, ...) after the stage they repeat."""
    from pipeline.core.registry import ROUND_STAGES, stage_folder

    out = {}
    for stage in (*ORDER, *METHODS):
        folders = [stage]
        if stage in ROUND_STAGES:
            r = 2
            while (root / run / stage_folder(stage, r)).exists():
                folders.append(stage_folder(stage, r))
                r += 1
        for folder in folders:
            m = read_manifest(root / run / folder) if (root / run / folder).exists() else None
            if m:
                out[folder] = m
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
    rows = [
        (
            k,
            w,
            sft.get(f"eval/pretrain/gold/{k}"),
            sft.get(f"eval/gold/{k}"),
            ppo.get(f"eval/sft_gold/{k}"),
            ppo.get(f"eval/gold/{k}"),
        )
        for k, w in weights.items()
    ]
    return rows if any(v is not None for row in rows for v in row[2:]) else []


def all_runs(root: Path) -> list[str]:
    stages = (*ORDER, *METHODS)
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and any((p / s / "manifest.json").exists() for s in stages))
        if root.exists()
        else []
    )


# PPO's final evaluation, greedy and sampled: (label, PPO's key, SFT's key or None), the prefix left out
PPO_EVAL = [
    ("gold score", "gold_score", "sft_gold_score"),
    ("win rate vs SFT (ties half)", "win_rate_vs_sft", None),
    ("tie rate vs SFT", "tie_rate_vs_sft", None),
    ("KL to SFT (nats)", "kl", None),
    ("reward model score", "reward", "sft_reward"),
    ("reply tokens", "response_tokens", "sft_response_tokens"),
]


def decoding_rows(ppo_metrics: dict, weights: dict[str, float]) -> list[tuple]:
    """(what, SFT greedy, PPO greedy, SFT sampled, PPO sampled): PPO's final evaluation under both decodings
    (eval/... and eval/sampled/...), its headline figures then the gold components; None where not measured (a run
    from before the sampled evaluation, or train.eval_sampled=false). Empty without a PPO evaluation."""
    g = ppo_metrics.get
    rows = [
        (
            label,
            g(f"eval/{s}") if s else None,
            g(f"eval/{p}"),
            g(f"eval/sampled/{s}") if s else None,
            g(f"eval/sampled/{p}"),
        )
        for label, p, s in PPO_EVAL
    ]
    rows += [
        (
            f"gold: {k}",
            g(f"eval/sft_gold/{k}"),
            g(f"eval/gold/{k}"),
            g(f"eval/sampled/sft_gold/{k}"),
            g(f"eval/sampled/gold/{k}"),
        )
        for k in weights
    ]
    return rows if any(v is not None for row in rows for v in row[1:]) else []


# ---- the methods table (make methods): every way to learn from the preferences, scored alike -----------------


def _minutes(m: dict):
    """A stage's wall time in minutes: its own time/stage_s, else its manifest's start and end."""
    import datetime

    s = m.get("metrics", {}).get("time/stage_s")
    if s is not None:
        return s / 60
    try:
        a, b = (datetime.datetime.strptime(m[k], "%Y-%m-%dT%H:%M:%S%z") for k in ("started", "ended"))
    except (KeyError, ValueError):
        return None
    return (b - a).total_seconds() / 60


def method_rows(manifests: dict[str, dict]) -> list[dict]:
    """One row per complete method (PPO included, SFT first as the baseline), from the manifests alone: the sampled
    evaluation every method shares (pipeline.eval.gold.versus_sft: best-of-n has no greedy form) -- gold score,
    win rate over SFT with its 95% bootstrap interval, whether the interval clears 0.5, KL to SFT (best-of-n: its
    bound), reply tokens -- with the greedy gold where measured, wall minutes and training tokens."""
    done = {s: m for s, m in manifests.items() if m.get("status") == "complete"}
    rows = []
    rounds = lambda st: [f for f in done if split_folder(f)[0] == st and split_folder(f)[1] > 1]  # noqa: E731
    for stage in (x for st in ("ppo", *METHODS) for x in (st, *sorted(rounds(st), key=lambda f: split_folder(f)[1]))):
        g = done.get(stage, {}).get("metrics", {}).get
        if g("eval/sampled/gold_score") is None:
            continue
        if not rows:
            greedy = next(
                (v for m in done.values() if (v := m.get("metrics", {}).get("eval/sft_gold_score")) is not None), None
            )  # best-of-n has none: any method's greedy SFT answers
            rows.append(
                {
                    "method": "sft",
                    "gold": g("eval/sampled/sft_gold_score"),
                    "win": 0.5,
                    "lo": None,
                    "hi": None,
                    "lc": 0.5,
                    "lc_lo": None,
                    "lc_hi": None,
                    "objective": None,
                    "beats": None,
                    "kl": 0.0,
                    "length": g("eval/sampled/sft_response_tokens"),
                    "greedy": greedy,
                    "minutes": _minutes(done["sft"]) if "sft" in done else None,
                    "tokens": None,
                    "n": g("eval/sampled/n_prompts"),
                }
            )
        lo, hi = g("eval/sampled/win_rate_ci_low"), g("eval/sampled/win_rate_ci_high")
        rw = done[stage].get("reward") or {}
        obj = (
            None
            if stage == "dpo" or split_folder(stage)[0] == "dpo"
            else (f"{rw.get('objective')} of {rw.get('ensemble')}" if rw.get("ensemble", 1) > 1 else "single RM")
        )
        rows.append(
            {
                "method": stage,
                "gold": g("eval/sampled/gold_score"),
                "win": g("eval/sampled/win_rate_vs_sft"),
                "lo": lo,
                "hi": hi,
                "lc": g("eval/sampled/lc_win_rate_vs_sft"),
                "lc_lo": g("eval/sampled/lc_win_rate_ci_low"),
                "lc_hi": g("eval/sampled/lc_win_rate_ci_high"),
                "objective": obj,
                "beats": None if lo is None else ("above" if lo > 0.5 else "below" if hi < 0.5 else "no"),
                "kl": g("eval/sampled/kl"),
                "length": g("eval/sampled/response_tokens"),
                "greedy": g("eval/gold_score"),
                "minutes": _minutes(done[stage]),
                "tokens": g("train/tokens"),
                "n": g("eval/sampled/n_prompts"),
            }
        )
    return rows


def methods_table(rows: list[dict]) -> list[str]:
    """AlpacaFarm's table for one run, as markdown lines."""
    f = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    out = [
        "| method | optimised | gold (sampled) | win rate vs SFT [95% CI] | beats SFT? | length-controlled win "
        "rate [95% CI] | KL to SFT | reply tokens | gold (greedy) | minutes | training tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f" [{f(r['lo'], 2)}, {f(r['hi'], 2)}]" if r["lo"] is not None else ""
        lc = f(r.get("lc"), 2) + (f" [{f(r['lc_lo'], 2)}, {f(r['lc_hi'], 2)}]" if r.get("lc_lo") is not None else "")
        out.append(
            f"| {r['method']} | {r.get('objective') or '–'} | {f(r['gold'])} | {f(r['win'], 2)}{ci} | "
            f"{r['beats'] or '–'} | {lc} | {f(r['kl'], 2)} "
            f"| {f(r['length'], 1)} | {f(r['greedy'])} | {f(r['minutes'], 1)} | "
            f"{'–' if r['tokens'] is None else int(r['tokens'])} |"
        )
    return out


def round_rows(root: Path, run: str, method: str = "ppo") -> list[dict]:
    """One row per complete round of iterated RLHF (make iterate), round 1 being the one-shot stage: the greedy
    evaluation against SFT and against the round before (win rates with their 95% intervals), correctness, KL to
    SFT, and the round's reward model: its pairs of the current policy's answers in the gold order and its
    correlation with gold there, before (the previous round's model) and after its update, and the labels spent."""
    from pipeline.core.registry import stage_folder

    rows, r = [], 1
    while True:
        pol = (
            read_manifest(root / run / stage_folder(method, r))
            if (root / run / stage_folder(method, r)).exists()
            else None
        )
        if not pol or pol.get("status") != "complete":
            break
        d = root / pol.get("parent_runs", {}).get(stage_folder("reward", r), run) / stage_folder("reward", r)
        rm = (read_manifest(d) if d.exists() else None) or {}
        g, h = pol.get("metrics", {}).get, rm.get("metrics", {}).get
        rows.append(
            {
                "round": r,
                "stage": stage_folder(method, r),
                "gold": g("eval/gold_score"),
                "sft_gold": g("eval/sft_gold_score"),
                "win": g("eval/win_rate_vs_sft"),
                "lo": g("eval/win_rate_ci_low"),
                "hi": g("eval/win_rate_ci_high"),
                "tie": g("eval/tie_rate_vs_sft"),
                "win_prev": g("eval/win_rate_vs_previous"),
                "prev_lo": g("eval/win_rate_vs_previous_ci_low"),
                "prev_hi": g("eval/win_rate_vs_previous_ci_high"),
                "correct": g("eval/gold/correctness"),
                "sft_correct": g("eval/sft_gold/correctness"),
                "kl": g("eval/kl"),
                "sampled_gold": g("eval/sampled/gold_score"),
                "sampled_win": g("eval/sampled/win_rate_vs_sft"),
                "pair_before": h("reward/before_gold_pair_accuracy"),
                "pair_after": h("reward/gold_pair_accuracy"),
                "corr_before": h("reward/before_gold_correlation"),
                "corr_after": h("reward/gold_correlation"),
                "labels": h("labels/round_pairs") if method == "ppo" else g("labels/round_pairs"),
                "total_labels": h("labels/total_pairs") if method == "ppo" else g("labels/total_pairs"),
                "minutes": (_minutes(pol) or 0) + (_minutes(rm) or 0) if rm else _minutes(pol),
            }
        )
        r += 1
    return rows


def rounds_table(rows: list[dict]) -> list[str]:
    """The per-round table of iterated RLHF, as markdown lines."""
    f = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    ci = lambda v, lo, hi: f"{f(v, 2)}" + (f" [{f(lo, 2)}, {f(hi, 2)}]" if lo is not None else "")  # noqa: E731
    out = [
        "| round | stage | gold (greedy) | win rate vs SFT [95% CI] | ties | win rate vs previous [95% CI] | "
        "correctness | KL to SFT | RM pairs in gold order, before -> after | RM gold correlation, before -> after "
        "| pairs labelled (round / all) | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['round']} | {r['stage']} | {f(r['gold'])} | {ci(r['win'], r['lo'], r['hi'])} | "
            f"{f(r['tie'], 2)} | {ci(r['win_prev'], r['prev_lo'], r['prev_hi']) if r['round'] > 1 else '–'} | "
            f"{f(r['correct'])} | {f(r['kl'], 2)} | {f(r['pair_before'])} -> {f(r['pair_after'])} | "
            f"{f(r['corr_before'])} -> {f(r['corr_after'])} | "
            f"{'–' if r['labels'] is None else int(r['labels'])} / "
            f"{'–' if r['total_labels'] is None else int(r['total_labels'])} | {f(r['minutes'], 1)} |"
        )
    return out
