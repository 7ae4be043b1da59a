"""The RL sampler's two back ends side by side (pipeline/inference/sampler.py): reply tokens per second of HF
`generate` on a padded batch against the continuous-batching engine's runner, on a finished run's SFT policy, at the
batch sizes the pipeline samples at (PPO's rollout batch, the shared evaluation's, best-of-n's n x prompts).

    python bench/sampler_speed.py --policy runs/default/sft/final                 # cpu preset batch sizes
    python bench/sampler_speed.py --policy runs/default/sft/final --batches 32 --repeats 5 --threads 1

The two alternate, repeat after repeat, on the same prompts (the world's held-out prompts, chat-templated) and the
same seeds; a figure is the median over repeats of reply tokens / wall seconds of one `sample` call (greedy and
sampled at T=0.7), and the ratio is engine / hf from the same repeats. Rows go to the "## Sampler back ends" section
of bench/results.md. Target (issue 28): the evaluation's and best-of-n's sampling at least 2x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import REPO, machine, update_results  # (bench/ is on sys.path)

sys.path.insert(0, str(REPO))
from pipeline.data.prompts import prompt_batch
from pipeline.data.tokenizer import end_of_turn_ids, load_tokenizer
from pipeline.inference.sampler import sample
from pipeline.models.loading import load_causal_lm

SECTION = "## Sampler back ends"
HEADER = (
    "| date | machine | threads | load avg | policy | batch | decoding | max new tokens | reply tokens (mean) | "
    "hf tok/s | engine tok/s | engine / hf |"
)
INTRO = (
    "`python bench/sampler_speed.py`: reply tokens per second of one `pipeline.inference.sampler.sample` call, "
    "HF `generate` on a padded batch against the engine's runner (rows leave as they end), alternating on the "
    "same prompts and seeds; medians over repeats. Load avg: the 1-minute load at the start (above the thread "
    "count: something else shared the cores). One row per setting, newest last."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="a causal LM folder (a stage's final/)")
    ap.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[32, 50, 48],
        help="rows per call: PPO's rollout batch, the evaluation's, best-of-n's (3 prompts x 16)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import os

    load = os.getloadavg()[0]
    tok = load_tokenizer(args.policy, need_chat_template=True)
    model = load_causal_lm(args.policy).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    from pathlib import Path

    from omegaconf import OmegaConf

    import pipeline.core.config  # noqa: F401
    from pipeline.data.formats import load_prompts

    cfg = OmegaConf.load(Path(args.policy).parent / "config.yaml")  # the stage's own config: its world's prompts
    questions = [p["messages"] for p in load_prompts(cfg.data.eval_prompts, cfg.data.world, cfg.paths.cache)[0]]
    end = end_of_turn_ids(tok)
    for B in args.batches:
        prompts = [questions[i % len(questions)] for i in range(B)]
        ids, am = prompt_batch(tok, prompts, 192, torch.device("cpu"))
        for greedy in (True, False):
            rates = {"hf": [], "engine": []}
            lengths = []
            for r in range(args.repeats):
                for backend in ("hf", "engine") if r % 2 == 0 else ("engine", "hf"):
                    torch.manual_seed(r)
                    t0 = time.perf_counter()
                    ro = sample(model, tok, ids, am, end, args.max_new_tokens, 0.7, greedy=greedy, backend=backend)
                    dt = time.perf_counter() - t0
                    n = int(ro.response_mask.sum())
                    rates[backend].append(n / dt)
                    lengths.append(n / B)
            hf, eng = statistics.median(rates["hf"]), statistics.median(rates["engine"])
            ratio = statistics.median(e / h for e, h in zip(rates["engine"], rates["hf"]))
            mode = "greedy" if greedy else "T=0.7"
            print(
                f"batch {B:3d} {mode:6s}: hf {hf:8.1f} tok/s, engine {eng:8.1f} tok/s, engine/hf {ratio:.2f} "
                f"(reply {statistics.mean(lengths):.1f} tokens)",
                flush=True,
            )
            if not args.no_results:
                cells = [
                    time.strftime("%Y-%m-%d"),
                    machine(),
                    str(torch.get_num_threads()),
                    f"{load:.2f}",
                    args.policy.rstrip("/").split("/")[-2] if "/" in args.policy else args.policy,
                    str(B),
                    mode,
                    str(args.max_new_tokens),
                    f"{statistics.mean(lengths):.1f}",
                    f"{hf:.0f}",
                    f"{eng:.0f}",
                    f"{ratio:.2f}",
                ]
                update_results(SECTION, INTRO, HEADER, "| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
