"""Responses for a file of prompts, written as JSON lines.

    make generate ARGS="input=prompts.jsonl"                     # latest policy stage of the run, greedy
    make generate ARGS="input=questions.txt stage=sft generation=sample seed=1 output=answers.jsonl"
    make generate ARGS="stage=ppo"                               # no input: the built-in eval prompts, gold-scored

input: .jsonl / .json lines {"messages": [...]} (a trailing assistant turn is dropped and answered anew) or
{"prompt": "..."}; or .txt, one prompt per line. Each output line holds the prompt's messages, the "response", whether
it "ended" (closed its turn before max_new_tokens) and its "n_tokens"; with the built-in prompts also its
"gold_score". Default output: next to the input as <input>.<stage>.responses.jsonl (built-in prompts:
<paths.root>/<run>/generations/<stage>.jsonl).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.core.config import SourceConfig, WorldConfig
from pipeline.core.entry import entry
from pipeline.core.errors import UserError
from pipeline.core.io import read_utf8, write_atomic
from pipeline.core.runs import resolve_checkpoint


def read_prompts(path: str, paths_cfg) -> list[list[dict]]:
    """Prompts from a .txt (one per line) or a JSON-lines / JSON file, through pipeline.data.formats (errors name the
    file and line)."""
    from pipeline.data.formats import load_prompts

    p = Path(path)
    if not p.exists():
        raise UserError(f"input={path}: no such file")
    if p.suffix == ".txt":
        lines = [ln.strip() for ln in read_utf8(p).splitlines()]
        return [[{"role": "user", "content": ln}] for ln in lines if ln]
    src = OmegaConf.structured(SourceConfig(kind="local", path=str(p), format="prompts"))
    recs, _ = load_prompts(src, None, paths_cfg.cache)
    return [r["messages"] for r in recs]


def world_of(stage_dir) -> WorldConfig | dict:
    """The world a stage was trained in (its saved config), so the built-in prompts and oracle match it."""
    if stage_dir is not None and (stage_dir / "config.yaml").exists():
        c = OmegaConf.load(stage_dir / "config.yaml")
        if "data" in c and "world" in c.data:
            return c.data.world
    return OmegaConf.structured(WorldConfig())


def run_generate(cfg: DictConfig) -> Path:
    """Answer the prompts and write the output file; returns its path."""
    from pipeline.data.formats import load_prompts
    from pipeline.inference.generation import generate
    from pipeline.models.loading import load_policy

    path, label, stage_dir = resolve_checkpoint(cfg)
    builtin = not cfg.input
    if builtin:
        world = world_of(stage_dir)
        src = OmegaConf.structured(SourceConfig(kind="world", format="prompts", split="eval"))
        prompts = [r["messages"] for r in load_prompts(src, world, cfg.paths.cache)[0]]
    else:
        prompts = read_prompts(cfg.input, cfg.paths)
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise UserError(f"input={cfg.input}: no prompts in it")
    if cfg.system:
        prompts = [p if p[0]["role"] == "system" else [{"role": "system", "content": cfg.system}] + p for p in prompts]
    stage_name = stage_dir.name if stage_dir is not None else Path(path).name
    if cfg.output:
        out = Path(cfg.output)
    elif builtin:
        out = Path(cfg.paths.root) / cfg.run / "generations" / f"{stage_name}.jsonl"
    else:
        out = Path(cfg.input).with_suffix("").with_name(f"{Path(cfg.input).stem}.{stage_name}.responses.jsonl")

    model, tok = load_policy(path, cfg.precision)
    print(f"[generate] {len(prompts)} prompts -> {label}")
    replies = generate(model, tok, prompts, cfg.generation, cfg.batch_size, seed=cfg.seed)
    gold = None
    if builtin and cfg.gold:
        from pipeline.world.oracle import GoldOracle

        gold = GoldOracle.from_config(world).score_batch(prompts, [str(r) for r in replies])

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": p, "response": str(r), "ended": r.ended, "n_tokens": r.n_tokens}
        | ({"gold_score": gold[i]} if gold is not None else {})
        for i, (p, r) in enumerate(zip(prompts, replies))
    ]
    write_atomic(out, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    n = len(replies)
    print(
        f"[generate] wrote {out}: {n} responses, {sum(r.n_tokens for r in replies) / n:.1f} tokens on average, "
        f"{sum(r.ended for r in replies) / n:.0%} ended"
        + (f", mean gold score {sum(gold) / n:.3f}" if gold is not None else "")
    )
    return out


@entry("generate")
def main(cfg: DictConfig) -> None:
    run_generate(cfg)


if __name__ == "__main__":
    main()
