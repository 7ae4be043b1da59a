"""Best-of-n against the SFT policy: how much better a policy that stays close to SFT could be, and what the reward
model can pick out of the SFT model's own samples. The yardstick for a PPO run (Gao et al. 2022, section 3).

    python bench/bon_frontier.py --runs-root runs --run default            # after `make all`
    python bench/bon_frontier.py --runs-root runs --run default --n 1,2,4,8,16 --no-results

For every held-out prompt the PPO stage evaluates on, the SFT policy answers greedily (the baseline PPO is judged
against) and samples max(n) replies with PPO's sampling settings. For each n, best-of-n keeps one of the first n
samples: the one the gold oracle scores highest ("oracle": the most a policy could gain by choosing among answers
SFT already gives), or the one the reward model scores highest ("RM": what the reward model can see in the
policy's own samples). Each is scored by gold, and its win rate over SFT's greedy answers is taken exactly like
the PPO stage's eval/win_rate_vs_sft (ties count half). Best-of-n is a policy whose KL from SFT is at most
log n - (n-1)/n nats (Stiennon et al. 2020; Beirami et al. 2024 show it is a bound), so the table reads as
gold against KL, beside the PPO stage's own eval/gold_score, eval/win_rate_vs_sft and eval/kl when it has run.

The greedy answers are the reference: "+greedy" adds SFT's greedy answer to the oracle's candidates, so its win
rate counts only prompts where a sample beats greedy (that column is not a best-of-n policy: the KL bound does not
cover it). Needs a synthetic-world run (the oracle is the world's).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

from _common import REPO, machine, update_results  # (bench/ is on sys.path)

sys.path.insert(0, str(REPO))


def kl_bound(n: int) -> float:
    return math.log(n) - (n - 1) / n


def best_of_n(gold: list[float], reward: list[float], greedy_gold: list[float], k: int, n: int) -> dict:
    """Gold of the pick among the first n of each prompt's k samples (gold and reward are prompt-major, k per
    prompt): by gold ("oracle"), by gold with the greedy answer also a candidate ("greedy+oracle"), by reward
    ("rm"; the first of equal rewards)."""
    if not 1 <= n <= k or len(gold) != len(reward) or len(gold) != k * len(greedy_gold):
        raise ValueError(
            f"best_of_n: n={n}, k={k}, {len(gold)} gold, {len(reward)} rewards, {len(greedy_gold)} prompts"
        )
    groups = [range(i * k, i * k + n) for i in range(len(greedy_gold))]
    oracle = [max(gold[j] for j in g) for g in groups]
    return {
        "oracle": oracle,
        "greedy+oracle": [max(o, g) for o, g in zip(oracle, greedy_gold)],
        "rm": [gold[max(g, key=lambda j: reward[j])] for g in groups],
    }


def rm_scores(rm, tok, prompts: list, replies: list[str], batch_size: int) -> list[float]:
    """The reward model's score of each (prompt, reply): the one readout every stage uses (the head at the last
    token of the chat-templated conversation, where the reward stage trained it and PPO reads it)."""
    from pipeline.rl.readout import score_texts

    return score_texts(rm, tok, prompts, replies, batch_size=batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--run", default="default")
    ap.add_argument("--n", default="1,2,4,8,16", help="comma-separated sample counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    a = ap.parse_args()
    try:
        ns = sorted({int(x) for x in a.n.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--n {a.n}: give whole numbers separated by commas, e.g. 1,2,4,8") from None
    if not ns or ns[0] < 1:
        raise SystemExit(f"--n {a.n}: counts must be >= 1")

    import torch
    from omegaconf import OmegaConf

    import pipeline.core.config  # noqa: F401
    from pipeline.core.runs import make_command, read_manifest
    from pipeline.data.formats import load_prompts
    from pipeline.eval.gold import win_rate
    from pipeline.inference.generation import generate
    from pipeline.models.loading import load_policy, load_reward_model
    from pipeline.world.oracle import GoldOracle

    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.runs_root) / a.run
    done = {s: m for s in ("sft", "reward", "ppo") if (m := read_manifest(run / s)) and m.get("status") == "complete"}
    for s in ("sft", "reward"):
        if s not in done:
            raise SystemExit(f"{run / s}: no complete '{s}' stage; make it first ({make_command(s, a.run)})")
    cfg = OmegaConf.load(run / ("ppo" if "ppo" in done else "reward") / "config.yaml")
    if cfg.data.eval_prompts.kind != "world":
        raise SystemExit("the gold oracle belongs to the synthetic world; this run's eval prompts are not the world's")
    if "ppo" in done:  # PPO's own sampling settings; otherwise the reward stage's (what its on-policy pairs used)
        temperature, max_new = cfg.train.temperature, cfg.train.max_new_tokens
        n_prompts = cfg.train.eval_prompts
    else:
        temperature, max_new, n_prompts = cfg.generation.temperature, cfg.generation.max_new_tokens, None
    prompts, _ = load_prompts(cfg.data.eval_prompts, cfg.data.world, cfg.paths.cache)
    prompts = [p["messages"] for p in prompts][:n_prompts]
    oracle = GoldOracle.from_config(cfg.data.world)

    def settings(sample: bool):
        return SimpleNamespace(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            num_beams=1,
        )

    policy, tok = load_policy(run / "sft" / "final", "fp32", "cpu")[:2]
    greedy = [str(r) for r in generate(policy, tok, prompts, settings(False), batch_size=a.batch_size)]
    k = ns[-1]
    asked = [p for p in prompts for _ in range(k)]  # prompt-major: each prompt's k samples side by side
    samples = [str(r) for r in generate(policy, tok, asked, settings(True), batch_size=a.batch_size, seed=a.seed)]
    del policy
    g_greedy = oracle.score_batch(prompts, greedy)
    g_samples = oracle.score_batch(asked, samples)
    rm, rm_tok = load_reward_model(run / "reward" / "final", "fp32", "cpu")[:2]
    r_samples = rm_scores(rm, rm_tok, asked, samples, a.batch_size)

    rows = {n: best_of_n(g_samples, r_samples, g_greedy, k, n) for n in ns}

    print(f"{run}: {len(prompts)} held-out prompts, SFT samples at temperature {temperature}, {max_new} new tokens")
    print(f"SFT greedy gold {statistics.mean(g_greedy):.3f}")
    print(
        f"{'n':>4} {'KL bound':>8} | {'oracle gold':>11} {'win':>5} | {'+greedy gold':>12} {'win':>5} | "
        f"{'RM gold':>7} {'win':>5}"
    )
    for n, r in rows.items():
        print(
            f"{n:>4} {kl_bound(n):>8.2f} | {statistics.mean(r['oracle']):>11.3f} "
            f"{win_rate(r['oracle'], g_greedy):>5.3f}"
            f" | {statistics.mean(r['greedy+oracle']):>12.3f} {win_rate(r['greedy+oracle'], g_greedy):>5.3f}"
            f" | {statistics.mean(r['rm']):>7.3f} {win_rate(r['rm'], g_greedy):>5.3f}"
        )
    ppo = done.get("ppo", {}).get("metrics", {})
    ppo_cell = "-"
    if ppo:
        ppo_cell = f"{ppo['eval/gold_score']:.3f} / {ppo['eval/win_rate_vs_sft']:.3f} / {ppo['eval/kl']:.2f}"
        print(
            f"PPO stage: gold {ppo['eval/gold_score']:.3f}, win rate {ppo['eval/win_rate_vs_sft']:.3f}, "
            f"KL {ppo['eval/kl']:.2f} (SFT gold {ppo['eval/sft_gold_score']:.3f})"
        )
    if a.no_results:
        return

    def cells(key, f):
        return " / ".join(f"{f(rows[n][key]):.3f}" for n in ns)

    def wins(x):
        return win_rate(x, g_greedy)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    update_results(
        "## Best-of-n frontier",
        "`python bench/bon_frontier.py`: on the PPO stage's held-out prompts, best-of-n of the SFT policy's own "
        "samples (PPO's temperature), chosen by the gold oracle or by the reward model, scored by gold; win rates "
        "against SFT's greedy answers as in eval/win_rate_vs_sft. KL of best-of-n from SFT is at most "
        "log n - (n-1)/n. Columns list one figure per n.",
        "| date | machine | load avg | run | prompts | T | n | KL bound | SFT greedy gold | oracle gold | oracle win "
        "| RM gold | RM win | PPO gold / win / KL |",
        f"| {datetime.date.today()} | {machine()} | {load:.2f} | {a.run} | {len(prompts)} | {temperature} | "
        f"{'/'.join(map(str, ns))} | {' / '.join(f'{kl_bound(n):.2f}' for n in ns)} | "
        f"{statistics.mean(g_greedy):.3f} | {cells('oracle', statistics.mean)} | {cells('oracle', wins)} | "
        f"{cells('rm', statistics.mean)} | {cells('rm', wins)} | {ppo_cell} |",
    )
    print("row added to bench/results.md")


if __name__ == "__main__":
    main()
