"""PPO throughput and quality: our stage (`python -m stages.ppo`) against TRL 1.12's PPOTrainer, one workload.

    python bench/ppo_vs_trl.py                                   # smoke preset: builds its SFT and RM first
    python bench/ppo_vs_trl.py --runs-root runs --run default --preset cpu --iterations 20
    python bench/ppo_vs_trl.py --rounds 2                        # ours, TRL, TRL, ours: resists a busy machine
    python bench/ppo_vs_trl.py --seeds 0,1,2                     # gold over three seeds per side

What it does, in one run:

1. Makes bench/.venv-trl112 once (a stamp file marks it done): a virtualenv from this Python with torch==2.13.0
   (the pin keeps pip on the CPU build), then trl==1.12.0 and whatever transformers/accelerate/datasets pip
   resolves for it. TRL's side runs there, ours in the project environment.
2. Takes the SFT policy and the reward model of a finished run (<runs-root>/<run>/sft/final and reward/final), or
   builds them first with `python -m stages.{tokenizer,pretrain,sft,reward} preset=<preset>` into a temporary
   runs root when --runs-root does not hold them.
3. Fixes one workload from our composed `ppo` config (preset plus the flags here): rollout batch, minibatch, PPO
   epochs, iterations, max new tokens, temperature, KL coefficient and estimator, clip ranges, vf_coef, gamma,
   lambda, learning rate and AdamW settings, the scoring forward-pass chunk, and the score itself (the reward
   model's scalar, read where our stage reads it, normalised with the reward stage's mean/std, and for a reply
   without an end of turn put missing_eos_penalty below the batch's lowest finished one). Prompts: the world's PPO
   prompts (pipeline.data.formats.load_prompts), chat-templated as our stage does.
4. Runs ours as `python -m stages.ppo` with those overrides (logger=none, no checkpoints or sample tables inside
   the loop, a 2-prompt final evaluation) and TRL as bench/_trl_ppo_driver.py in the TRL venv
   (`trl.experimental.ppo.PPOTrainer`; see that file for the settings that make it run this workload). Each is a
   separate process with the same OMP_NUM_THREADS.
5. Timing, the same phases on both sides: rollout (generation, scoring passes, advantages) + PPO update of each
   iteration, excluding model loading, the final evaluation and saving. Ours: the stage's own per-iteration
   `ppo/episodes_per_s` (episodes / (rollout + update seconds)); TRL: from drawing the rollout batch to logging the
   iteration. The first --warmup-iterations of every run are dropped. Headline: episodes / seconds summed over
   the kept iterations (per side, over all rounds); the median iteration is printed too, and the wall time
   between consecutive iteration ends (which adds logging and, for TRL, its gc.collect/empty_cache calls).
6. Gold score: each final policy (ours from runs/<run>/ppo/final, TRL's from trainer.save_model) and the SFT
   policy answer the held-out evaluation prompts with pipeline.inference.generation.generate — greedy, and sampled at
   the
   training temperature (--gold-samples seeded samples per prompt) — judged by pipeline.world.oracle.GoldOracle.
   With --seeds, every seed runs on both sides (the seed sets sampling and initialisation, as `seed=` does for
   the stage) and each side's gold score is the mean over its seeds' final policies: one run per side is not
   enough, as which shortcut of the reward model a run finds, and when, varies from seed to seed.
7. Prints a table and adds a row to the "## PPO vs TRL 1.12" section of bench/results.md (other sections kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import BENCH, REPO
from _common import machine as machine_name
from _common import run_logged, update_results

from pipeline.core.registry import ORDER

SECTION = "## PPO vs TRL 1.12"
TRL_VENV = BENCH / ".venv-trl112"
TRL_STAMP = TRL_VENV / ".stamp-trl-1.12.0-torch-2.13.0"
DRIVER = BENCH / "_trl_ppo_driver.py"
OURS_RUN = "ppo-vs-trl"


# ---- the TRL 1.12 virtualenv -----------------------------------------------------------------------------------
def trl_python() -> Path:
    py = TRL_VENV / "bin" / "python"
    if TRL_STAMP.exists() and py.exists():
        return py
    print(f"[bench] creating {TRL_VENV.relative_to(REPO)} (torch==2.13.0, then trl==1.12.0; once, a few minutes)")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # pinned first: unpinned, pip would pull a CUDA build
    subprocess.run(pip + ["trl==1.12.0"], check=True)
    out = subprocess.run(
        [
            str(py),
            "-c",
            "import trl, transformers, accelerate, torch; print(trl.__version__, "
            "transformers.__version__, accelerate.__version__, torch.__version__)",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if out[0] != "1.12.0":
        raise SystemExit(f"{TRL_VENV}: trl {out[0]} installed, expected 1.12.0")
    for old in TRL_VENV.glob(".stamp-*"):
        old.unlink()
    TRL_STAMP.write_text(" ".join(out) + "\n")
    return py


# ---- the parent run: SFT policy and reward model ---------------------------------------------------------------
def complete(stage_dir: Path) -> bool:
    try:
        return (
            json.loads((stage_dir / "manifest.json").read_text()).get("status") == "complete"
            and (stage_dir / "final").is_dir()
        )
    except (OSError, json.JSONDecodeError):
        return False


def ensure_parent(root: Path, run: str, preset: str, env: dict) -> None:
    if complete(root / run / "sft") and complete(root / run / "reward"):
        return
    todo = [s for s in ORDER[: ORDER.index("ppo")] if not complete(root / run / s)]
    print(f"[bench] building {run}'s {', '.join(todo)} (preset={preset}) under the runs root")
    for stage in todo:
        dt = run_logged(
            [
                sys.executable,
                "-m",
                f"stages.{stage}",
                f"preset={preset}",
                "logger=none",
                f"paths.root={root}",
                f"run={run}",
            ],
            root / f"build-{stage}.log",
            env,
        )
        print(f"[bench]   {stage}: {dt:.0f} s")


# ---- the workload ----------------------------------------------------------------------------------------------
def compose_ppo(preset: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import pipeline.core.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("ppo", overrides=[f"preset={preset}", *overrides])


def check_supported(cfg) -> None:
    """The features both trainers have; anything else in the preset would make the two workloads differ."""
    t = cfg.train
    problems = [
        msg
        for bad, msg in (
            (t.reward != "model", f"train.reward={t.reward} (TRL's PPOTrainer scores with a reward model)"),
            (t.ptx_coef > 0, "train.ptx_coef > 0"),
            (t.adaptive_kl, "train.adaptive_kl"),
            (t.ema_decay is not None, "train.ema_decay"),
            (t.top_k or t.top_p != 1.0, "train.top_k/top_p"),
            (not t.whiten_advantages, "train.whiten_advantages=false"),
            (t.critic_init != "reward", "train.critic_init=policy"),
            (t.grad_accum != 1, "train.grad_accum > 1"),
            (t.kl_estimator not in ("k1", "k3"), f"train.kl_estimator={t.kl_estimator}"),
            (cfg.peft.enabled, "peft"),
            (cfg.optim.warmup_steps, "optim.warmup_steps > 0"),
            (t.rollout_batch_size % t.minibatch_size, "rollout batch not a multiple of the minibatch"),
        )
        if bad
    ]
    if problems:
        raise SystemExit("this preset uses what the comparison does not cover: " + "; ".join(problems))


def workload(cfg, rm_stats: dict) -> dict:
    t, o = cfg.train, cfg.optim
    normalise = t.normalize_reward and t.reward == "model"
    return {
        "iterations": t.iterations,
        "rollout_batch_size": t.rollout_batch_size,
        "minibatch_size": t.minibatch_size,
        "ppo_epochs": t.ppo_epochs,
        "max_new_tokens": t.max_new_tokens,
        "forward_batch_size": t.forward_batch_size,
        "temperature": t.temperature,
        "kl_coef": t.kl_coef,
        "kl_estimator": t.kl_estimator,
        "clip_range": t.clip_range,
        "clip_range_value": t.clip_range_value,
        "vf_coef": t.vf_coef,
        "gamma": t.gamma,
        "lam": t.lam,
        "lr": o.lr,
        "critic_lr": t.critic_lr or o.lr,
        "beta1": o.beta1,
        "beta2": o.beta2,
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "min_lr_ratio": o.min_lr_ratio,
        "missing_eos_penalty": t.missing_eos_penalty,
        "seed": cfg.seed,
        "rm_mean": rm_stats.get("mean", 0.0) if normalise else 0.0,
        "rm_std": max(rm_stats.get("std", 1.0), 1e-6) if normalise else 1.0,
    }


# ---- the two sides ---------------------------------------------------------------------------------------------
def ours_worker(clock: str, argv: list[str]) -> None:
    """`python -m stages.ppo ARGV`, in this process; with clock=cpu the stage's loop timer (`time.time` in
    stages/ppo.py, which only times) reads this process's CPU time instead, as TRL's side does."""
    import types

    import stages.ppo as stage

    sys.argv = ["stages.ppo", "--config-path", str(REPO / "conf"), *argv]  # imported, not run as __main__
    if clock == "cpu":
        stage.time = types.SimpleNamespace(time=time.process_time)
    stage.main()


def run_ours(
    root: Path, parent: str, preset: str, overrides: list[str], w: dict, n: int, env: dict, clock: str
) -> dict:
    beyond, name = w["iterations"] + 1, f"{OURS_RUN}-{n}"
    shutil.rmtree(root / name, ignore_errors=True)  # a fresh metrics.jsonl (the tracker appends)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--ours-worker",
        clock,
        f"preset={preset}",
        "logger=none",
        f"paths.root={root}",
        f"run={name}",
        f"parent_run={parent}",
        "force=true",
        *overrides,
        "train.eval_prompts=2",
        "train.eval_sampled=false",
        "train.periodic_eval_prompts=0",
        f"train.save_every={beyond}",
        "train.sample_every=0",
    ]
    dt = run_logged(cmd, root / f"ours.{n}.log", env)
    stage = root / name / "ppo"
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = sorted((r for r in rows if "ppo/episodes_per_s" in r), key=lambda r: r["step"])
    B = w["rollout_batch_size"]
    final = root / f"ours.{n}.final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(stage / "final", final)
    return {
        "iteration_s": [B / r["ppo/episodes_per_s"] for r in rows],
        "wall_s": [b["time"] - a["time"] for a, b in zip(rows, rows[1:])],
        "response_length": [r["ppo/response_length"] for r in rows],
        "score": [r["ppo/reward"] for r in rows],
        "kl": [r["ppo/kl"] for r in rows],
        "final": final,
        "process_s": dt,
        "command": "-m stages.ppo " + " ".join(cmd[4:]).replace(str(root), "<tmp>"),
    }


def run_trl(py: Path, root: Path, spec: dict, n: int, env: dict) -> dict:
    spec = {**spec, "output_dir": str(root / f"trl.{n}.out"), "save_dir": str(root / f"trl.{n}.final")}
    spec_path, out = root / f"trl.{n}.spec.json", root / f"trl.{n}.json"
    spec_path.write_text(json.dumps(spec))
    dt = run_logged([py, DRIVER, spec_path, out], root / f"trl.{n}.log", env)
    r = json.loads(out.read_text())
    logs = r["logs"]
    return {
        "iteration_s": r["iteration_s"],
        "wall_s": r["wall_s"][1:],  # wall_s[0] starts at on_train_begin
        "gc_s": r["gc_s"],
        "response_length": [x["response_length"] for x in logs],
        "score": [x["objective/scores"] for x in logs],
        "kl": [x["objective/kl"] for x in logs],
        "final": Path(spec["save_dir"]),
        "process_s": dt,
        "versions": r["versions"],
        "optimizer_steps": r["optimizer_steps"],
    }


def rates(runs: list[dict], B: int, warmup: int) -> dict:
    kept = [s for r in runs for s in r["iteration_s"][warmup:]]
    if not kept:
        raise SystemExit(f"no iteration left after {warmup} warmup iteration(s): raise --iterations")
    walls = [s for r in runs for s in r["wall_s"][max(warmup - 1, 0) :]]
    lengths = [x for r in runs for x in r["response_length"][warmup:]]
    gc_s = [s for r in runs for s in r.get("gc_s", [0.0] * len(r["iteration_s"]))[warmup:]]
    return {
        "mean": B * len(kept) / sum(kept),
        "gc_share": sum(gc_s) / sum(kept),
        "mean_without_gc": B * len(kept) / (sum(kept) - sum(gc_s)),
        "median": B / statistics.median(kept),
        "best": B / min(kept),
        "wall": B * len(walls) / sum(walls) if walls else float("nan"),
        "n": len(kept),
        "length": sum(lengths) / len(lengths),
        "per_run": [B * len(r["iteration_s"][warmup:]) / sum(r["iteration_s"][warmup:]) for r in runs],
    }


# ---- gold score ------------------------------------------------------------------------------------------------
def gold_scores(
    models: dict[str, Path], prompts: list, oracle, max_new_tokens: int, temperature: float, samples: int, seed: int
) -> dict:
    from omegaconf import OmegaConf

    from pipeline.inference.generation import generate
    from pipeline.models.loading import load_policy

    base = dict(max_new_tokens=max_new_tokens, top_k=0, top_p=1.0, repetition_penalty=1.0, num_beams=1)
    greedy = OmegaConf.create({**base, "do_sample": False, "temperature": 1.0})
    sampled = OmegaConf.create({**base, "do_sample": True, "temperature": temperature})
    out = {}
    for name, path in models.items():
        model, tok = load_policy(path, precision="fp32")
        replies = generate(model, tok, prompts, greedy, batch_size=32)
        g = oracle.score_batch(prompts, replies)
        s = [
            oracle.score_batch(prompts, generate(model, tok, prompts, sampled, batch_size=32, seed=seed + k))
            for k in range(samples)
        ]
        per_prompt = [(gi + sum(x[i] for x in s)) / (1 + samples) for i, gi in enumerate(g)]
        out[name] = {
            "greedy": sum(g) / len(g),
            "sampled": sum(map(sum, s)) / (len(prompts) * samples) if samples else float("nan"),
            "per_prompt": per_prompt,
            "example": str(replies[0]),
        }
    return out


def mean_gold(runs: list[dict]) -> dict:
    """gold_scores entries of several seeds as one: means of the scores and of each prompt's score."""
    n = len(runs)
    return {
        "greedy": sum(r["greedy"] for r in runs) / n,
        "sampled": sum(r["sampled"] for r in runs) / n,
        "per_prompt": [sum(x) / n for x in zip(*(r["per_prompt"] for r in runs))],
        "example": runs[-1]["example"],
    }


# ---- results.md ------------------------------------------------------------------------------------------------
HEADER = (
    "| date | machine | threads | clock | load avg | preset | workload | TRL ep/s | ours ep/s | ours/TRL | "
    "gold greedy TRL / ours / SFT | gold sampled TRL / ours / SFT |"
)
INTRO = (
    "`python bench/ppo_vs_trl.py`: the same PPO workload (same SFT policy, reward model, prompts, batch sizes, "
    "epochs, response length, temperature, KL coefficient, learning rate, iterations) through TRL 1.12's "
    "`trl.experimental.ppo.PPOTrainer` and through `python -m stages.ppo`. ep/s: episodes per second of "
    "rollout + update, summed over the iterations after warmup (loading, final evaluation and saving "
    "excluded), on wall time or on each process's CPU time (clock cpu: steadier when other work shares the "
    "machine). Gold: the gold oracle on the held-out evaluation prompts, greedy and sampled at the training "
    "temperature. Workload: iterations x rollout batch / minibatch x PPO epochs, max new tokens. Target: "
    "ours/TRL >= 2 at an equal or better gold score. One row per run, newest last."
)


# ---- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset", default="smoke", help="conf/preset/<name> for sizes and the PPO budget (default: smoke)"
    )
    ap.add_argument(
        "--runs-root",
        default=None,
        help="paths.root holding <run>/sft/final and <run>/reward/final (default: a temporary folder "
        "where they are built first)",
    )
    ap.add_argument("--run", default="bench", help="the run holding the SFT policy and reward model (default: bench)")
    ap.add_argument("--iterations", type=int, default=20, help="PPO iterations on each side (default: 20)")
    ap.add_argument("--rollout-batch-size", type=int, default=None, help="episodes per iteration (default: preset's)")
    ap.add_argument("--minibatch-size", type=int, default=None, help="episodes per optimizer step (default: preset's)")
    ap.add_argument("--ppo-epochs", type=int, default=None, help="passes over each rollout batch (default: preset's)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length cap (default: preset's)")
    ap.add_argument(
        "--forward-batch-size",
        type=int,
        default=None,
        help="chunk of the no-grad scoring passes and of TRL's generation (default: preset's)",
    )
    ap.add_argument("--warmup-iterations", type=int, default=1, help="iterations not timed at the start of every run")
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, each run on both sides; gold is averaged over them (default: the config's seed)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="runs of each side, alternating ours, TRL, TRL, ours, ... (default: 1)"
    )
    ap.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts for the gold score (default: all)")
    ap.add_argument(
        "--gold-samples",
        type=int,
        default=2,
        help="seeded sampled replies per held-out prompt for the sampled gold score (default: 2)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's default)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what times an iteration on both sides: wall time, or the process's CPU time (steadier on "
        "a machine other work shares; pair it with --threads 1) (default: wall)",
    )
    ap.add_argument("--keep", default=None, help="keep the work folder (logs, both final policies) at this path")
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")
    if sys.argv[1:2] == ["--ours-worker"]:  # internal: bench/ppo_vs_trl.py --ours-worker CLOCK STAGE_ARGS...
        sys.path.insert(0, str(REPO))
        ours_worker(sys.argv[2], sys.argv[3:])
        return
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import torch

    from pipeline.data.formats import load_prompts
    from pipeline.data.tokenizer import end_of_turn_ids, load_tokenizer
    from pipeline.rl.readout import turn_closing
    from pipeline.world.oracle import GoldOracle

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    }
    trl_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # TRL's side imports nothing from here
    machine = machine_name()
    load_start = os.getloadavg()[0]
    print(
        f"[bench] {machine}; python {platform.python_version()}, torch {torch.__version__}, {threads} threads; "
        f"load average {load_start:.2f}"
    )
    if load_start > 0.5:
        print(
            "[bench] warning: the machine is busy; wall-clock figures will be noisy: --threads 1 --clock cpu "
            "--rounds 2 resists it best"
        )

    py_trl = trl_python()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-ppo-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # ---- parent run: use it, or build it; the work folder links to it so ours' stage finds its parents
        src_root = Path(args.runs_root).resolve() if args.runs_root else work / "parent"
        src_root.mkdir(parents=True, exist_ok=True)
        ensure_parent(src_root, args.run, args.preset, env)
        root = work / "runs"
        root.mkdir(exist_ok=True)
        if not (root / args.run).exists():
            (root / args.run).symlink_to(src_root / args.run, target_is_directory=True)
        sft, rm = src_root / args.run / "sft" / "final", src_root / args.run / "reward" / "final"

        # ---- one workload, from our composed config
        overrides = [f"train.iterations={args.iterations}"] + [
            f"train.{k}={v}"
            for k, v in (
                ("rollout_batch_size", args.rollout_batch_size),
                ("minibatch_size", args.minibatch_size),
                ("ppo_epochs", args.ppo_epochs),
                ("max_new_tokens", args.max_new_tokens),
                ("forward_batch_size", args.forward_batch_size),
            )
            if v is not None
        ]
        cfg = compose_ppo(args.preset, overrides)
        check_supported(cfg)
        rm_manifest = json.loads((rm.parent / "manifest.json").read_text())
        w = workload(cfg, rm_manifest.get("reward_stats") or {})
        tok = load_tokenizer(sft, need_chat_template=True)
        end_ids = end_of_turn_ids(tok)
        if len(end_ids) != 1:
            raise SystemExit(f"TRL's PPOTrainer takes one stop token; this tokenizer ends turns with {end_ids}")
        prompts, _ = load_prompts(cfg.data.prompts, cfg.data.world, cfg.paths.cache)
        texts = [tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True) for p in prompts]
        prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]  # as pipeline.data.prompts.encode_prompts
        too_long = sum(len(x) > cfg.train.max_prompt_tokens for x in prompt_ids)
        if too_long:
            raise SystemExit(f"{too_long} prompts exceed train.max_prompt_tokens={cfg.train.max_prompt_tokens}")
        spec = {
            "sft": str(sft),
            "reward": str(rm),
            "prompt_ids": prompt_ids,
            "end_id": end_ids[0],
            "closing": turn_closing(tok),  # where the reward model is read: the same token as in our stage
            "rm_mean": w["rm_mean"],
            "rm_std": w["rm_std"],
            "workload": w,
            "threads": threads,
            "clock": args.clock,
        }
        B = w["rollout_batch_size"]
        shape = f"{w['iterations']} it x {B} / {w['minibatch_size']} x {w['ppo_epochs']} ep, {w['max_new_tokens']} tok"
        print(
            f"[bench] workload: {shape}; temperature {w['temperature']}, kl_coef {w['kl_coef']}, lr {w['lr']} "
            f"(critic {w['critic_lr']}), "
            f"{len(prompt_ids)} prompts; SFT {sft.relative_to(src_root)} under the runs root"
        )

        # ---- the runs: each seed on both sides, alternating which goes first
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [cfg.seed]
        order = [
            (seed, s)
            for seed in seeds
            for r in range(args.rounds)
            for s in (("ours", "trl") if r % 2 == 0 else ("trl", "ours"))
        ]
        runs: dict[str, list] = {"ours": [], "trl": []}
        finals: dict[str, Path] = {}  # the last run of each side and seed
        for n, (seed, side) in enumerate(order):
            ws = {**w, "seed": seed}
            r = (
                run_ours(root, args.run, args.preset, overrides + [f"seed={seed}"], ws, n, env, args.clock)
                if side == "ours"
                else run_trl(py_trl, work, {**spec, "workload": ws}, n, trl_env)
            )
            runs[side].append(r)
            finals[f"{side}:{seed}"] = r["final"]
            it = r["iteration_s"][args.warmup_iterations :]
            print(
                f"[bench] {side:4s} run {len(runs[side])} (seed {seed}): "
                f"{B * len(it) / max(sum(it), 1e-9):.2f} episodes/s "
                f"(iterations {', '.join(f'{x:.2f}' for x in r['iteration_s'])} s; "
                f"{r['process_s']:.0f} s in all; KL at the end {r['kl'][-1]:.2f})"
            )
        load_end = os.getloadavg()[0]

        # ---- gold score: each side's final policies (one per seed), and the SFT policy
        eval_prompts, _ = load_prompts(cfg.data.eval_prompts, cfg.data.world, cfg.paths.cache)
        eval_prompts = [p["messages"] for p in eval_prompts][: args.eval_prompts]
        oracle = GoldOracle.from_config(cfg.data.world)
        t = time.time()
        each = gold_scores(
            {**finals, "sft": sft},
            eval_prompts,
            oracle,
            w["max_new_tokens"],
            w["temperature"],
            args.gold_samples,
            cfg.seed,
        )
        gold = {
            "sft": each["sft"],
            **{side: mean_gold([each[f"{side}:{seed}"] for seed in seeds]) for side in ("ours", "trl")},
        }
        for side in ("ours", "trl"):
            print(
                f"[bench] gold greedy {side} by seed: "
                + ", ".join(f"{seed}: {each[f'{side}:{seed}']['greedy']:.3f}" for seed in seeds)
            )
        print(f"[bench] gold scores on {len(eval_prompts)} held-out prompts ({time.time() - t:.0f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    T, ours = rates(runs["trl"], B, args.warmup_iterations), rates(runs["ours"], B, args.warmup_iterations)
    ratio = ours["mean"] / T["mean"]
    v = runs["trl"][-1]["versions"]
    g = {k: f"{gold['trl'][k]:.3f} / {gold['ours'][k]:.3f} / {gold['sft'][k]:.3f}" for k in ("greedy", "sampled")}
    # Paired over prompts (each prompt's greedy and sampled scores averaged): ours - TRL, with its standard error.
    d = [a - b for a, b in zip(gold["ours"]["per_prompt"], gold["trl"]["per_prompt"])]
    d_mean = sum(d) / len(d)
    d_se = (sum((x - d_mean) ** 2 for x in d) / max(len(d) - 1, 1) / len(d)) ** 0.5
    better = d_mean >= -2 * d_se  # not worse beyond noise
    last = {s: runs[s][-1] for s in runs}
    per_run = lambda x: ", ".join(f"{r:.2f}" for r in x["per_run"])  # noqa: E731
    rows = [
        ("machine", machine),
        ("threads / load", f"{threads} torch threads; load average {load_start:.2f} at start, {load_end:.2f} at end"),
        (
            "TRL side",
            f"trl {v['trl']}, transformers {v['transformers']}, accelerate {v['accelerate']}, "
            f"torch {v['torch']} ({TRL_VENV.relative_to(REPO)}); {runs['trl'][-1]['optimizer_steps']} "
            f"optimizer steps",
        ),
        ("ours", "python " + runs["ours"][-1]["command"]),
        (
            "workload",
            f"{shape}; preset {args.preset}; {len(prompt_ids)} prompts; forward chunk {w['forward_batch_size']}",
        ),
        (
            "timed",
            f"iterations {args.warmup_iterations + 1}..{w['iterations']} of {args.rounds} run(s) per side "
            f"and seed (seeds {', '.join(map(str, seeds))}): {T['n']} TRL / {ours['n']} ours",
        ),
        (
            "episodes/s TRL",
            f"{T['mean']:.2f} (median iteration {T['median']:.2f}, best {T['best']:.2f}; wall "
            f"between iteration ends {T['wall']:.2f}; per run {per_run(T)})",
        ),
        (
            "episodes/s ours",
            f"{ours['mean']:.2f} (median iteration {ours['median']:.2f}, best {ours['best']:.2f}; wall "
            f"between iteration ends {ours['wall']:.2f}; per run {per_run(ours)})",
        ),
        (
            "ratio ours/TRL",
            f"{ratio:.2f} ({'ok' if ratio >= 2 else 'BELOW'} target 2; medians "
            f"{ours['median'] / T['median']:.2f}, wall {ours['wall'] / T['wall']:.2f})",
        ),
        (
            "TRL's gc.collect",
            f"{T['gc_share']:.0%} of TRL's timed iterations; without it TRL would run "
            f"{T['mean_without_gc']:.2f} episodes/s (ours / that "
            f"{ours['mean'] / T['mean_without_gc']:.2f})",
        ),
        ("response tokens", f"TRL {T['length']:.1f}, ours {ours['length']:.1f} (mean per episode, timed iterations)"),
        (
            "train score",
            f"normalised RM score, last iteration: TRL {last['trl']['score'][-1]:.2f}, "
            f"ours {last['ours']['score'][-1]:.2f}; KL TRL {last['trl']['kl'][-1]:.2f}, "
            f"ours {last['ours']['kl'][-1]:.2f}",
        ),
        (
            "gold greedy",
            f"TRL {gold['trl']['greedy']:.3f}, ours {gold['ours']['greedy']:.3f}, "
            f"SFT {gold['sft']['greedy']:.3f} ({len(eval_prompts)} held-out prompts; mean over "
            f"{len(seeds)} seed(s) per side)",
        ),
        (
            "gold sampled",
            f"TRL {gold['trl']['sampled']:.3f}, ours {gold['ours']['sampled']:.3f}, "
            f"SFT {gold['sft']['sampled']:.3f} (T={w['temperature']}, {args.gold_samples} per prompt)",
        ),
        (
            "gold ours - TRL",
            f"{d_mean:+.3f} +- {d_se:.3f} (paired over prompts, greedy and sampled averaged; "
            f"{'not worse' if better else 'WORSE'} beyond 2 standard errors)",
        ),
        (
            "verdict",
            f"{'ok' if ratio >= 2 and better else 'NOT MET'}: ours/TRL {ratio:.2f} (target >= 2), gold "
            f"{'equal or better within noise' if better else 'WORSE'}",
        ),
        (
            "first reply",
            f"TRL {gold['trl']['example']!r}; ours {gold['ours']['example']!r}; SFT {gold['sft']['example']!r}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {val}" for k, val in rows))

    if not args.no_results:
        cells = [
            time.strftime("%Y-%m-%d"),
            machine,
            str(threads),
            args.clock,
            f"{load_start:.2f}",
            args.preset,
            shape + (f", seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else ""),
            f"{T['mean']:.2f}",
            f"{ours['mean']:.2f}",
            f"{ratio:.2f}",
            g["greedy"],
            g["sampled"],
        ]
        update_results(SECTION, INTRO, HEADER, "| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        print(f"\n[bench] row added to bench/results.md ({SECTION[3:]})")


if __name__ == "__main__":
    main()
