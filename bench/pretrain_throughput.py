"""Pretraining throughput: our stage (`python -m stages.pretrain`) against a bare PyTorch loop, side by side.

    make bench                                        # = python bench/pretrain_throughput.py
    python bench/pretrain_throughput.py --preset smoke --steps 30 --warmup-steps 10
    python bench/pretrain_throughput.py --steps 60 --rounds 3 --runs-root bench/out/runs   # keep the runs

What it does, in one run:

1. Measures this machine's matmul peak: fp32 `torch.matmul` of two 2048 x 2048 matrices, best of a few repeats,
   with the torch thread count the training uses (taken before and after the training runs; the best counts).
2. Runs the tokenizer stage, then the pretrain stage as a subprocess (`preset=<preset> train.max_steps=<steps>`,
   eval and checkpoints pushed past the last step, `logger=none`, `force=true`) into a temporary runs root, and
   reads the stage's own per-interval `train/tokens_per_s` (one interval per train.log_every steps) from
   runs/bench/pretrain/metrics.jsonl, skipping the intervals that end within the first --warmup-steps steps.
3. Runs a bare loop in a second subprocess (this file with --bare-worker, so the two share no allocator, thread
   pool or import state and start alike): the identical model (build_from_config on the stage's resolved
   config.yaml, seeded like the stage), the identical packed blocks and the identical batches (the stage's own
   batch_indices, precomputed before timing), AdamW with the stage's parameter groups and hyperparameters, the
   stage's learning-rate schedule (so the losses can be compared), and a minimal loop: forward, backward, clip,
   step, zero_grad. It is timed like the stage: one `.item()` every log_every steps closes an interval, and the
   same warmup intervals are skipped.
   The runs alternate, --rounds of each (stage, bare, bare, stage, ...). The headline tokens/s of a side is the
   median interval of its fastest run: another process can only slow a run down, so the fastest run is the least
   disturbed (pooled medians, means and best intervals are printed too). The spread between a side's runs and the
   load average flag a busy machine; on a shared 2-core box, measure when it is otherwise idle.
4. Prints tokens/s of each, the ratio stage/bare (target >= 0.95 on CPU), the model FLOP utilisation of each
   (tokens/s * flops_per_token / measured peak) and the machine, and appends a row to the
   "## Pretraining throughput" section of bench/results.md (other sections are kept as they are).

Both loops are given the same OMP_NUM_THREADS (--threads, default torch's own default here), so the peak, the
stage and the bare loop all run with one thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO
from _common import machine as machine_name
from _common import run_logged, update_results

SECTION = "## Pretraining throughput"
RUN = "bench"


def matmul_peak(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """(best, median) fp32 matmul GFLOP/s with the current torch thread count."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(2):
        torch.matmul(a, b, out=c)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return max(rates), statistics.median(rates)


# ---- timing helpers shared by both sides -----------------------------------------------------------------------
def post_warmup(intervals: list[tuple[int, int, float]], warmup: int) -> list[tuple[int, float]]:
    """intervals: (end_step, tokens, seconds) in step order -> (tokens, seconds) of those starting at or after
    step `warmup`."""
    kept, prev = [], 0
    for end, tokens, secs in intervals:
        if prev >= warmup:
            kept.append((tokens, secs))
        prev = end
    if not kept:
        raise SystemExit(f"no interval left after {warmup} warmup steps: raise --steps")
    return kept


def summarise(kept: list[tuple[int, float]]) -> dict:
    """Median of the per-interval rates (the headline: robust to another process stealing a core for a while),
    plus the plain mean (all tokens / all time) and the best interval."""
    rates = [tok / secs for tok, secs in kept]
    return {
        "median": statistics.median(rates),
        "mean": sum(t for t, _ in kept) / sum(s for _, s in kept),
        "best": max(rates),
        "rates": rates,
        "n": len(rates),
    }


# ---- the stage -------------------------------------------------------------------------------------------------


def stage_intervals(rows: list[dict]) -> list[tuple[int, int, float]]:
    """The stage's logged rows -> (end_step, tokens, seconds) per interval."""
    out, prev = [], 0
    for r in sorted(rows, key=lambda r: r["step"]):
        step = int(r["step"])
        tokens = round(r["train/tokens"] / step) * (step - prev)  # train/tokens = step * tokens_per_step
        out.append((step, tokens, tokens / r["train/tokens_per_s"]))
        prev = step
    return out


# ---- the bare loop (runs in its own process: --bare-worker) ----------------------------------------------------
def bare_worker(stage_dir: Path, steps: int, out: Path) -> None:
    import torch
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    import pipeline.core.config  # noqa: F401
    from pipeline.data.formats import load_corpus
    from pipeline.data.packing import batch_indices, pack, split_documents
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models.build import build_from_config, flops_per_token, n_params

    cfg = OmegaConf.load(stage_dir / "config.yaml")  # the stage's resolved config: same sizes, same data, same seed
    tok = load_tokenizer(str(Path(cfg.paths.root) / (cfg.parent_run or cfg.run) / "tokenizer" / "final"))
    set_seed(cfg.seed)  # as the stage does right before building the model: identical initial weights
    model = build_from_config(cfg.model, tok)
    t = cfg.train
    block = t.block_size or cfg.model.max_seq_len

    docs, _ = load_corpus(cfg.data.corpus, cfg.data.world, cfg.paths.cache)
    docs = docs[: cfg.data.max_docs] if cfg.data.max_docs else docs
    train_docs, _ = split_documents(docs, cfg.data.val_fraction, cfg.seed)
    blocks = pack(train_docs, tok, block)
    # The stage's own batches, gathered once here so that the timed loop does nothing but train.
    batches = [
        [
            blocks[batch_indices(len(blocks), t.batch_size, s, m, t.grad_accum, 1, 0, cfg.seed)]
            for m in range(t.grad_accum)
        ]
        for s in range(steps)
    ]

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, cfg.optim.warmup_steps, t.max_steps, min_lr_rate=cfg.optim.min_lr_ratio
    )
    tokens_per_step = t.batch_size * t.grad_accum * block
    model.train()

    intervals, losses = [], {}
    t_log, since = time.time(), 0
    for step in range(steps):
        for x in batches[step]:
            loss = model(input_ids=x, labels=x).loss
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        since += 1
        done = step + 1
        if done % t.log_every == 0 or done == steps:
            losses[done] = loss.item()  # the one sync per interval, as in the stage
            now = time.time()
            intervals.append((done, since * tokens_per_step, now - t_log))
            t_log, since = now, 0

    out.write_text(
        json.dumps(
            {
                "intervals": intervals,
                "losses": losses,
                "threads": torch.get_num_threads(),
                "flops_per_token": flops_per_token(model, block),
                "params": n_params(model),
                "block": block,
                "tokens_per_step": tokens_per_step,
                "batch_size": t.batch_size,
                "grad_accum": t.grad_accum,
                "blocks_shape": list(blocks.shape),
            }
        )
    )


# ---- results.md ------------------------------------------------------------------------------------------------
HEADER = (
    "| date | machine | torch threads | preset | timed steps per side | load avg | run spread | peak GFLOP/s "
    "| stage tok/s | bare tok/s | stage/bare | MFU stage | MFU bare |"
)
INTRO = (
    "`python bench/pretrain_throughput.py` (`make bench`): tokens/s of `python -m stages.pretrain` and of a bare "
    "PyTorch loop on the same model, batches and optimizer, after warmup (runs alternate; per side the median "
    "logged interval of its fastest run); MFU = tokens/s x flops_per_token / the measured fp32 matmul peak "
    "(best of 2048^3 matmuls, same threads). Load avg: the 1-minute load when the run started (this figure above "
    "~0.5 means another process shared the cores); run spread: the largest gap between two runs of one side (above 5%: "
    "disturbed, do not trust the ratio). One row per run, newest last."
)


# ---- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="cpu", help="conf/preset/<name> (default: cpu)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run of each loop (default: 40)")
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=10,
        help="steps not timed at the start of every run, rounded up to the stage's log_every (default: 10)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each loop, alternating stage, bare, bare, stage, ... (default: 2)",
    )
    ap.add_argument(
        "--runs-root",
        default=None,
        help="paths.root for the tokenizer and pretrain runs (default: a temporary folder, removed after)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the peak and both loops (default: torch's default here)",
    )
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    ap.add_argument("--bare-worker", nargs=3, metavar=("STAGE_DIR", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.bare_worker:
        sys.path.insert(0, str(REPO))
        d, steps, out = args.bare_worker
        bare_worker(Path(d), int(steps), Path(out))
        return

    sys.path.insert(0, str(REPO))
    import torch
    from hydra import compose, initialize_config_dir

    import pipeline.core.config  # noqa: F401  (registers the schemas the compose below needs)

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    }
    py = sys.executable
    machine = machine_name()
    load_start = os.getloadavg()[0]
    print(
        f"[bench] {machine}; python {platform.python_version()}, torch {torch.__version__}, {threads} threads; "
        f"load average {load_start:.2f}"
    )
    if load_start > 0.5:
        print(
            "[bench] warning: the machine is busy; figures will be noisy (the fastest of the runs resists some of it)"
        )

    # The stage's log_every sets the interval grid (and so the warmup rounding): compose its config as it will.
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"preset={args.preset}"])
    log_every = cfg.train.log_every
    warmup = -(-args.warmup_steps // log_every) * log_every
    if args.steps <= warmup:
        raise SystemExit(f"--steps {args.steps} leaves nothing after {warmup} warmup steps (log_every {log_every})")

    peak_before = matmul_peak()
    print(f"[bench] fp32 matmul 2048^3: best {peak_before[0]:.1f} GFLOP/s, median {peak_before[1]:.1f}")

    root = Path(args.runs_root) if args.runs_root else Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    order = [side for r in range(args.rounds) for side in (("stage", "bare") if r % 2 == 0 else ("bare", "stage"))]
    kept: dict[str, list] = {"stage": [], "bare": []}
    per_run: dict[str, list] = {"stage": [], "bare": []}
    stage_losses, loss_diffs, bare = None, [], None
    try:
        root.mkdir(parents=True, exist_ok=True)
        common = [f"preset={args.preset}", "logger=none", f"paths.root={root}", f"run={RUN}"]
        dt = run_logged([py, "-m", "stages.tokenizer", *common], root / "tokenizer.log", env)
        print(f"[bench] tokenizer stage ready ({dt:.0f} s)")
        beyond = args.steps + 1  # no eval and no checkpoint inside the timed steps
        stage_cmd = [
            py,
            "-m",
            "stages.pretrain",
            *common,
            f"train.max_steps={args.steps}",
            f"train.eval_every={beyond}",
            f"train.save_every={beyond}",
            "force=true",
        ]
        stage_dir = root / RUN / "pretrain"
        print("[bench] stage: python -m stages.pretrain " + " ".join(stage_cmd[3:]).replace(str(root), "<runs-root>"))
        print(f"[bench] timing steps {warmup + 1}..{args.steps} of each run; order: {', '.join(order)}")

        for n, side in enumerate(order):
            since = time.time()
            if side == "stage":
                dt = run_logged(stage_cmd, root / f"pretrain.{n}.log", env)
                rows = [
                    json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
                ]
                rows = [r for r in rows if r.get("time", 0) >= since and "train/tokens_per_s" in r]
                run_kept = post_warmup(stage_intervals(rows), warmup)
                losses = {int(r["step"]): r["train/loss"] for r in rows}
            else:
                out = root / f"bare.{n}.json"
                dt = run_logged(
                    [py, str(Path(__file__).resolve()), "--bare-worker", str(stage_dir), str(args.steps), str(out)],
                    root / f"bare.{n}.log",
                    env,
                )
                bare = json.loads(out.read_text())
                run_kept = post_warmup([tuple(i) for i in bare["intervals"]], warmup)
                losses = {int(k): v for k, v in bare["losses"].items()}
            if stage_losses is None:  # the first run is the stage's: every later run is compared with it
                stage_losses = losses
            else:
                loss_diffs += [abs(losses[k] - stage_losses[k]) for k in losses if k in stage_losses]
            kept[side] += run_kept
            per_run[side].append(summarise(run_kept))
            print(
                f"[bench] {side:5s} run {len(per_run[side])}: {per_run[side][-1]['median']:.0f} tokens/s "
                f"(intervals: {', '.join(f'{r:.0f}' for r in per_run[side][-1]['rates'])}; {dt:.0f} s in all)"
            )
        manifest = json.loads((stage_dir / "manifest.json").read_text())
    finally:
        if not args.runs_root:
            shutil.rmtree(root, ignore_errors=True)

    peak_after = matmul_peak()
    load_end = os.getloadavg()[0]
    peak = max(peak_before[0], peak_after[0])
    S, B = summarise(kept["stage"]), summarise(kept["bare"])
    # Headline of a side: the median interval of its fastest run. Another process only ever slows a run down, so
    # the fastest run is the least disturbed one; both sides get the same treatment. The spread between a side's
    # runs says how much the machine disturbed them.
    head = {side: max(r["median"] for r in per_run[side]) for side in per_run}
    spread = max(max(r["median"] for r in runs) / min(r["median"] for r in runs) - 1 for runs in per_run.values())
    noisy = load_start > 0.5 or spread > 0.05
    fpt = bare["flops_per_token"]
    mfu_s, mfu_b = head["stage"] * fpt / (peak * 1e9), head["bare"] * fpt / (peak * 1e9)
    ratio = head["stage"] / head["bare"]
    verdict = "ok" if ratio >= 0.95 else "BELOW"
    if noisy:
        verdict = f"{verdict}, but the machine was busy: rerun on an idle machine before believing it"
    m = manifest.get("metrics", {})
    same_params = m.get("model/params") == bare["params"]
    same_blocks = m.get("data/train_blocks") == bare["blocks_shape"][0]
    timed = f"{S['n'] * log_every} stage / {B['n'] * log_every} bare"

    rows = [
        ("machine", machine),
        ("torch threads", f"{threads} (bare loop reports {bare['threads']})"),
        ("load average", f"{load_start:.2f} at start, {load_end:.2f} at end"),
        (
            "fp32 matmul peak",
            f"{peak:.1f} GFLOP/s (best of 2048^3 matmuls; before {peak_before[0]:.1f}, after {peak_after[0]:.1f})",
        ),
        (
            "model",
            f"{bare['params'] / 1e6:.2f}M params, {fpt / 1e6:.2f} MFLOP/token, train blocks {bare['blocks_shape']}",
        ),
        (
            "batch",
            f"{bare['batch_size']} x {bare['block']} tokens x grad_accum {bare['grad_accum']} "
            f"= {bare['tokens_per_step']} tokens/step",
        ),
        (
            "timed",
            f"steps {warmup + 1}..{args.steps} of {args.rounds} run(s) each: {timed} steps in intervals of {log_every}",
        ),
        (
            "tokens/s stage",
            f"{head['stage']:.0f} median interval of the fastest run (all runs: median "
            f"{S['median']:.0f}, mean {S['mean']:.0f}, best {S['best']:.0f})",
        ),
        (
            "tokens/s bare",
            f"{head['bare']:.0f} median interval of the fastest run (all runs: median "
            f"{B['median']:.0f}, mean {B['mean']:.0f}, best {B['best']:.0f})",
        ),
        ("ratio stage/bare", f"{ratio:.3f} (target 0.95: {verdict})"),
        (
            "",
            f"all runs pooled: medians {S['median'] / B['median']:.3f}, means {S['mean'] / B['mean']:.3f}, "
            f"best intervals {S['best'] / B['best']:.3f}",
        ),
        ("run spread", f"{spread:.1%} (largest gap between two runs of one side; above 5% = disturbed)"),
        ("MFU stage", f"{mfu_s:.1%}"),
        ("MFU bare", f"{mfu_b:.1%}"),
        (
            "same work",
            f"params {'equal' if same_params else 'DIFFER'}, train blocks "
            f"{'equal' if same_blocks else 'DIFFER'}, largest loss difference from the first stage run "
            f"at the logged steps {f'{max(loss_diffs):.1e}' if loss_diffs else 'n/a'}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))

    if not args.no_results:
        cells = [
            time.strftime("%Y-%m-%d"),
            machine,
            str(threads),
            args.preset,
            timed,
            f"{load_start:.2f}",
            f"{spread:.1%}",
            f"{peak:.1f}",
            f"{head['stage']:.0f}",
            f"{head['bare']:.0f}",
            f"{ratio:.3f}",
            f"{mfu_s:.1%}",
            f"{mfu_b:.1%}",
        ]
        update_results(SECTION, INTRO, HEADER, "| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        print(f"\n[bench] row added to bench/results.md ({SECTION[3:]})")


if __name__ == "__main__":
    main()
