"""Method — best-of-n: the SFT policy's best of n samples by the reward model, evaluated like a policy.

    make bon                                          # = python -m stages.bon
    python -m stages.bon bon.n=64 run=bon64 parent_run=default

No new weights: the "policy" is a procedure, sample n replies from SFT at eval.temperature and answer with the one
the reward model (read as PPO reads it) scores highest. It is what a reward model buys with no training at all,
and its KL to SFT is bounded by log n - (n-1)/n. The evaluation is the one every method gets
(pipeline.eval.gold.versus_sft), sampled only: the picks among the first m of the same samples, for every power of
2 below n, make its curve on the gold-KL plot of `make methods`. final/bon.json records the recipe.
"""

import json
import time

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.runs import StageRun
from pipeline.core.stage import begin_stage
from pipeline.eval.gold import kl_bound, win_rate
from pipeline.trainers.methods import Judge, sample_rows, summary


@entry("bon")
def main(cfg: DictConfig) -> None:
    # ---- setup -------------------------------------------------------------------------------------------
    state = PartialState(cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=state.is_main_process)
    sft_parent = run.parent("sft")
    rm_parent = run.parent("reward")
    begun = begin_stage(cfg, run, state, parents=[sft_parent, rm_parent])
    if begun is None:
        return
    tracker, say, t0 = begun
    n = cfg.bon.n

    # ---- models and prompts: SFT samples, the reward model picks ------------------------------------------
    judge = Judge(cfg, sft_parent, rm_parent, state.device)
    run.update(reward=judge.reward_model.describe())  # the methods table says what each method optimised
    also = sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})
    say(
        f"[bon] best of {n} SFT samples by the reward model on {len(judge.prompts)} held-out prompts "
        f"(KL bound {kl_bound(n):.3f} nats)"
    )

    # ---- the evaluation: the same one as every method's ---------------------------------------------------
    metrics, outputs = judge.versus_sft(best_of=n, also=also)
    mine, sft = outputs["eval/sampled"]
    curve = [
        {
            "n": m,
            "kl": kl_bound(m),
            "gold": sum(mine[f"m:{m}:gold"]) / max(len(mine[f"m:{m}:gold"]), 1),
            "win_rate": win_rate(mine[f"m:{m}:gold"], sft["gold"]),
            "rm_score": sum(mine[f"m:{m}:reward"]) / max(len(mine[f"m:{m}:reward"]), 1),
            "length": sum(mine[f"m:{m}:length"]) / max(len(mine[f"m:{m}:length"]), 1),
        }
        for m in also
    ]
    metrics.update({"bon/n": n, "bon/kl_bound": kl_bound(n), "train/tokens": 0, "time/stage_s": time.time() - t0})
    tracker.log(metrics, step=0)
    tracker.table(
        "eval/samples",
        ["prompt", "sft", "sft_gold", "bon", "bon_gold"],
        sample_rows(judge.prompts, outputs["eval/sampled"]),
        step=0,
    )

    # ---- save: the recipe, no weights ---------------------------------------------------------------------
    def save(d):
        (d / "bon.json").write_text(
            json.dumps(
                {
                    "method": "best-of-n",
                    "n": n,
                    "temperature": cfg.eval.temperature,
                    "max_new_tokens": cfg.eval.max_new_tokens,
                    "policy": f"{sft_parent['run']}/sft",
                    "reward_model": f"{rm_parent['run']}/reward",
                    "kl_bound": kl_bound(n),
                },
                indent=1,
            )
        )

    run.finish(save, metrics, n=n, kl_bound=kl_bound(n), curve=curve)
    tracker.finish(metrics)
    say(summary("bon", metrics) + "; by n: " + ", ".join(f"{r['n']}: {r['gold']:.3f}" for r in curve))


if __name__ == "__main__":
    main()
