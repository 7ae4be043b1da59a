"""The report card of one run: runs/<run>/report.md with plots, headline metrics and side-by-side answers.

    make report                                  # = python -m stages.tools.report
    python -m stages.tools.report run=lr3e-4 samples=10

Reads the manifests and metrics.jsonl of every finished stage (no network), plots the curves, and has the
pretrained, SFT and PPO models answer the same held-out prompts, each answer with its gold score.
"""

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.registry import POLICY_STAGES
from pipeline.data.formats import load_prompts
from pipeline.inference.generation import generate
from pipeline.models.loading import load_policy
from pipeline.report.card import (
    component_rows,
    curve,
    decoding_rows,
    fmt,
    headline_rows,
    round_rows,
    rounds_table,
    stage_manifests,
)
from pipeline.report.plots import curves_plot, overoptimization_plot, rounds_plot
from pipeline.world.oracle import WEIGHTS, GoldOracle


@entry("report")
def main(cfg: DictConfig) -> None:
    root = Path(cfg.paths.root)
    run_dir = root / cfg.run
    manifests = {s: m for s, m in stage_manifests(root, cfg.run).items() if m.get("status") == "complete"}
    if not manifests:
        raise UserError(
            f"no finished stage in {run_dir}; run the pipeline first: make all"
            + ("" if cfg.run == "default" else f" RUN={cfg.run}")
        )
    figs = run_dir / "report"
    figs.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # ---- plots from metrics.jsonl ----------------------------------------------------------------------
    plots = []

    def plot(name, stage, keys, title, ylabel=""):
        series = {k: curve(root, cfg.run, stage, k) for k in keys}
        if stage in manifests and any(series.values()):
            plots.append((title, curves_plot(series, figs / f"{name}.png", title, ylabel=ylabel)))

    plot("pretrain_loss", "pretrain", ["train/loss", "eval/loss"], "Pretraining loss", "loss")
    plot("sft_loss", "sft", ["train/loss", "eval/loss"], "SFT loss", "loss")
    plot("reward_accuracy", "reward", ["eval/accuracy", "eval/gold_accuracy"], "Reward model accuracy", "accuracy")
    plot("ppo_reward", "ppo", ["ppo/reward", "ppo/gold_score"], "PPO: reward model vs gold", "score")
    plot("ppo_kl", "ppo", ["ppo/kl"], "PPO: KL to the SFT policy", "nats / sequence")
    plot(
        "ppo_periodic",
        "ppo",
        ["periodic/gold_score", "periodic/reward"],
        "PPO: held-out evaluations during training (sampled)",
        "score",
    )
    hist, periodic = run_dir / "ppo" / "history.json", run_dir / "ppo" / "periodic.json"
    if "ppo" in manifests and hist.exists():
        plots.append(
            (
                "Over-optimisation (Gao et al. axes): held-out evaluations (lines), training batches (faint)",
                overoptimization_plot(
                    json.loads(hist.read_text()),
                    figs / "overoptimization.png",
                    periodic=json.loads(periodic.read_text()) if periodic.exists() else None,
                    alarm_at=int(manifests["ppo"].get("metrics", {}).get("alarm/fired_at", 0)),
                ),
            )
        )

    # ---- the same held-out prompts answered by every model ---------------------------------------------
    prompts = [p["messages"] for p in load_prompts(cfg.data.eval_prompts, cfg.data.world, cfg.paths.cache)[0]]
    prompts = prompts[: cfg.samples]
    oracle = GoldOracle.from_config(cfg.data.world) if cfg.data.eval_prompts.kind == "world" else None
    answers = {}
    for stage in reversed(POLICY_STAGES):  # pretrain, sft, ppo
        if stage in manifests and prompts:
            model, tok = load_policy(run_dir / stage / "final", cfg.precision)
            replies = [str(r) for r in generate(model, tok, prompts, cfg.generation, batch_size=16, seed=cfg.seed)]
            scores = oracle.score_batch(prompts, replies) if oracle else [None] * len(replies)
            answers[stage] = list(zip(replies, scores))
            del model

    # ---- report.md -----------------------------------------------------------------------------------------
    L = [f"# Report card: run `{cfg.run}`", ""]
    L += ["| stage | status | started | ended | config |", "|---|---|---|---|---|"]
    for s, m in manifests.items():
        L.append(f"| {s} | {m['status']} | {m.get('started', '')} | {m.get('ended', '')} | `{m['config_hash']}` |")
    L += ["", "## Headline metrics", "", "| stage | metric | value |", "|---|---|---|"]
    L += [f"| {s} | `{k}` | {v} |" for s, k, v in headline_rows(manifests)]
    parts = component_rows(manifests, WEIGHTS)
    if parts:
        m = {s: manifests.get(s, {}).get("metrics", {}) for s in ("sft", "ppo")}
        L += [
            "",
            "## Where the gold score comes from",
            "",
            "Mean of each gold-oracle component on the held-out prompts (greedy answers); the gold score is their "
            "weighted sum. A gain in one component can hide a loss in another. The SFT stage's evaluation gives "
            "the first two columns, the PPO stage's (its own reply length) the last two.",
            "",
            "| component | weight | pretrained | SFT | SFT (PPO's evaluation) | PPO |",
            "|---|---|---|---|---|---|",
        ]
        L += [f"| {k} | {w:g} | " + " | ".join(fmt(v) for v in vals) + " |" for k, w, *vals in parts]
        L.append(
            "| **gold score** | | "
            + " | ".join(
                fmt(m[s].get(k))
                for s, k in (
                    ("sft", "eval/pretrain_gold_score"),
                    ("sft", "eval/gold_score"),
                    ("ppo", "eval/sft_gold_score"),
                    ("ppo", "eval/gold_score"),
                )
            )
            + " |"
        )
    both = decoding_rows(manifests.get("ppo", {}).get("metrics", {}), WEIGHTS)
    if both:
        L += [
            "",
            "## PPO's final evaluation: greedy and sampled",
            "",
            "PPO and SFT answer the same held-out prompts greedily (the headline figures above) and sampled at the "
            "training temperature (the policy PPO optimised; `eval/sampled/...`). Win and tie rates compare PPO's "
            "answer with SFT's on each prompt by gold score; KL is exact, summed along PPO's replies.",
            "",
            "| | SFT greedy | PPO greedy | SFT sampled | PPO sampled |",
            "|---|---|---|---|---|",
        ]
        L += [f"| {what} | " + " | ".join(fmt(v) for v in vals) + " |" for what, *vals in both]
    rounds = round_rows(root, cfg.run)
    if len(rounds) > 1:  # make iterate ran: iterated RLHF round by round (round 1 is the one-shot PPO above)
        png = rounds_plot(rounds, figs / "rounds.png", title=f"{cfg.run}: iterated RLHF by round")
        L += [
            "",
            "## Iterated RLHF, round by round",
            "",
            "Every round after the first labels fresh comparisons of the previous round's policy, updates the "
            "reward model on all comparisons so far and continues PPO against it (`make iterate`). Greedy "
            "held-out answers; win rates count ties half, with 95% bootstrap intervals over prompts.",
            "",
        ]
        L += rounds_table(rounds) + ["", f"![by round](report/{png.name})"]
    L += ["", "## Curves", ""] + [f"### {t}\n\n![{t}](report/{p.name})\n" for t, p in plots]
    if answers:
        L += [
            "## The same held-out prompts, answered by each model",
            "",
            f"Decoding: {'greedy' if not cfg.generation.do_sample else 'sampled'}, "
            f"max {cfg.generation.max_new_tokens} new tokens. Gold score in brackets (higher is better).",
            "",
        ]
        for i, p in enumerate(prompts):
            L.append(f"**Prompt {i + 1}.** {_md(p[-1]['content'])}\n")
            for stage, rows in answers.items():
                text, score = rows[i]
                L.append(f"- *{stage}* [{'–' if score is None else f'{score:.2f}'}]: {_md(text) or '(empty)'}")
            L.append("")
    out = run_dir / "report.md"
    out.write_text("\n".join(L))

    # ---- three lines for the terminal ------------------------------------------------------------------
    g = lambda s, k: manifests.get(s, {}).get("metrics", {}).get(k)  # noqa: E731
    print(f"report: {out}")
    print(
        f"  pretrain eval/perplexity {_f(g('pretrain', 'eval/perplexity'))} | SFT gold "
        f"{_f(g('sft', 'eval/gold_score'))}"
        f" (pretrained {_f(g('sft', 'eval/pretrain_gold_score'))}) | RM gold accuracy "
        f"{_f(g('reward', 'eval/gold_accuracy'))}"
    )
    print(
        f"  PPO gold {_f(g('ppo', 'eval/gold_score'))} vs SFT {_f(g('ppo', 'eval/sft_gold_score'))}, "
        f"win rate {_f(g('ppo', 'eval/win_rate_vs_sft'))}, KL {_f(g('ppo', 'eval/kl'))} (greedy); sampled: "
        f"{_f(g('ppo', 'eval/sampled/gold_score'))} vs {_f(g('ppo', 'eval/sampled/sft_gold_score'))}, win rate "
        f"{_f(g('ppo', 'eval/sampled/win_rate_vs_sft'))}, KL {_f(g('ppo', 'eval/sampled/kl'))}"
    )


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _md(s: str) -> str:
    return s.replace("\n", " ").replace("|", "\\|")


if __name__ == "__main__":
    main()
