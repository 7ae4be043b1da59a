"""Everything the pipeline trains and evaluates on, generated deterministically from the world and a `WorldConfig`.

    corpus_documents  plain-English documents for pretraining: profiles, place notes, stories, letters,
                      question-and-answer prose, arithmetic
    sft_dialogues     demonstrations, single- and multi-turn; `bad_fraction` of them are verbose, partly wrong or
                      curt, as human demonstrations are, so SFT alone stops short of the oracle's optimum
    ranked_prompts    K candidates per prompt ranked by the gold oracle through Plackett-Luce noise at
                      `label_temperature`, calibrated so ~75% of pairwise labels agree with the gold order
                      (InstructGPT's inter-annotator agreement)
    eval_prompts      held-out evaluation prompts;  ppo_prompts: the pool PPO trains on

Disjointness: every question has a `key` (what it asks, independent of wording and format), and a hash of
(seed, key) assigns it to exactly one pool (`POOLS`); questions about made-up names are pooled by the name. Each
generator draws only from its own pool, so evaluation prompts are never seen in SFT, reward or PPO data, and the
corpus's Q&A prose uses only SFT-pool questions. The facts themselves are all stated in the corpus, as a
pretrained model should know them: what is held out is the question, not the knowledge.

Determinism: every generator uses its own `random.Random(f"{seed}:{purpose}")` (string seeds hash with SHA-512,
independent of PYTHONHASHSEED), iterates in a fixed order, and files are written with sorted keys and fixed
separators, so the same config gives byte-identical files.

CLI:
    python -m pipeline.world.datasets reward-data --out reward_data      # regenerate reward_data/ byte for byte
    python -m pipeline.world.datasets materialise --cache .cache/world   # write the cached jsonl files
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import replace
from pathlib import Path

from pipeline.core.config import WorldConfig
from pipeline.core.io import json_line, write_jsonl, write_text
from pipeline.data.pairs import expand_pairs
from pipeline.world.corpus import corpus_documents
from pipeline.world.labellers import label_agreement, labelled
from pipeline.world.language import SYSTEMS, FOLLOWUPS, Question, render, truth
from pipeline.world.oracle import GoldOracle
from pipeline.world.questions import weighted_pick, pool_key, question_in_pool, pool_of
from pipeline.world.responses import (
    BAD_STYLES,
    HABITS,
    PADDED_FLAWED,
    STYLES_ANSWERABLE,
    STYLES_UNANSWERABLE,
    padded_reply,
    demonstrate,
    respond,
)
from pipeline.world.world import World, cached_world, as_world_config

# Cached files are keyed by the config and by the generating code, so an edit here never serves stale data.
_CODE_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()[
    :16
]


# ---- dialogues -----------------------------------------------------------------------------------------------
def _prompt(world: World, rng: random.Random, pool: str, seed: int) -> tuple[list[dict], Question]:
    """A prompt ending in a user turn: 1-3 questions from one pool; earlier turns answered well."""
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.1 else []
    n_turns = 1 if rng.random() < 0.75 else rng.randint(2, 3)
    q = None
    for i in range(n_turns):
        if i:
            msgs.append({"role": "assistant", "content": respond(world, q, rng)})
        follow = _followup(world, q, rng, pool, seed) if q and q.qtype in ("attr", "describe") else None
        if follow:
            q, text = follow
        else:
            q = question_in_pool(world, rng, pool, seed)
            text = render(q, rng)
        msgs.append({"role": "user", "content": text})
    return msgs, q


def _followup(world: World, prev: Question, rng: random.Random, pool: str, seed: int):
    if rng.random() < 0.5:
        return None
    kind = world.kind_of(prev.e)
    for _ in range(20):
        e = rng.choice(world.ghosts) if rng.random() < 0.1 or kind is None else rng.choice(world.by_kind[kind])
        q = replace(prev, e=e, fmt="")
        if e != prev.e and pool_of(pool_key(world, q), seed) == pool:
            return q, rng.choice(FOLLOWUPS).format(e=e)
    return None


def _dialogues(cfg: WorldConfig, n: int, pool: str, with_habits: bool = False) -> list[dict]:
    world, rng = cached_world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:dialogues:{pool}")
    out = []
    for _ in range(n):
        msgs, q = _prompt(world, rng, pool, cfg.seed)
        if rng.random() < cfg.bad_fraction:
            reply, shown = respond(world, q, rng, rng.choice(BAD_STYLES)), ["flawed"]
        else:
            reply, shown = demonstrate(world, q, rng, cfg.habit_scale)
        out.append(
            {"messages": msgs + [{"role": "assistant", "content": reply}]} | ({"habits": shown} if with_habits else {})
        )
    return out


def sft_dialogues(world_cfg, split: str = "train") -> list[dict]:
    """Demonstrations {"messages": [...]}; split "train" (sft_dialogues) or "eval" (sft_eval_dialogues)."""
    cfg = as_world_config(world_cfg)
    n, pool = _split(split, {"train": (cfg.sft_dialogues, "sft"), "eval": (cfg.sft_eval_dialogues, "sft_eval")})
    return _dialogues(cfg, n, pool)


def _split(split: str, options: dict):
    if split not in options:
        raise ValueError(f"split {split!r}: expected one of {', '.join(options)}")
    return options[split]


# At most this many held-out prompts (wordings, formats, earlier turns) ask one question: a few facts asked over and
# over would make the held-out figures a measurement of those facts (in a 40-entity world, 200 prompts drawn freely
# asked one description 25 times).
MAX_PER_KEY = 3


def _prompts(cfg: WorldConfig, n: int, pool: str, max_per_key: int = 0) -> list[dict]:
    world, rng = cached_world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:prompts:{pool}")
    out, seen, per_key = [], set(), {}
    for _ in range(50 * n):  # distinct prompts; a tiny world may run out, then we return fewer
        if len(out) == n:
            break
        msgs, q = _prompt(world, rng, pool, cfg.seed)
        text = json.dumps(msgs, sort_keys=True)
        if text not in seen and not (max_per_key and per_key.get(q.key, 0) >= max_per_key):
            seen.add(text)
            per_key[q.key] = per_key.get(q.key, 0) + 1
            out.append({"messages": msgs})
    return out


def eval_prompts(world_cfg) -> list[dict]:
    cfg = as_world_config(world_cfg)
    return _prompts(cfg, cfg.eval_prompts, "eval", MAX_PER_KEY)


def ppo_prompts(world_cfg) -> list[dict]:
    cfg = as_world_config(world_cfg)
    return _prompts(cfg, cfg.ppo_prompts, "ppo")


def ranked_prompts(world_cfg, split: str = "train") -> list[dict]:
    """{"id", "prompt", "responses", "ranks" (noisy label, 0 = best), "gold_scores"} for each reward prompt."""
    cfg = as_world_config(world_cfg)
    n, pool = _split(split, {"train": (cfg.reward_prompts, "reward"), "test": (cfg.reward_test_prompts, "reward_test")})
    world, rng = cached_world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:ranked:{split}")
    oracle = GoldOracle(world)
    out = []
    for i in range(n):
        prompt, q = _prompt(world, rng, pool, cfg.seed)
        styles = STYLES_ANSWERABLE if truth(world, q) is not None else STYLES_UNANSWERABLE
        responses: list[str] = []
        for _ in range(50 * cfg.k):
            style = weighted_pick(rng, styles)
            r = respond(world, q, rng, style)
            if style in ("wrong", "off_topic", "hallucinate") and rng.random() < PADDED_FLAWED:
                r = padded_reply(r, rng)
            if r not in responses:
                responses.append(r)
            if len(responses) == cfg.k:
                break
        out.append(labelled(f"{split}-{i:05d}", prompt, responses, oracle, cfg.label_temperature, rng))
    return out


def world_hash(world_cfg) -> str:
    cfg = dataclasses.asdict(as_world_config(world_cfg))
    return hashlib.sha256(json_line({"code": _CODE_HASH, **cfg}).encode()).hexdigest()[:12]


FILES = {
    "corpus": lambda c: ({"text": d} for d in corpus_documents(c)),
    "sft": lambda c: sft_dialogues(c, "train"),
    "sft_eval": lambda c: sft_dialogues(c, "eval"),
    "eval_prompts": eval_prompts,
    "ppo_prompts": ppo_prompts,
}


def materialise(world_cfg, cache_dir) -> dict[str, Path]:
    """Write (or reuse) cache_dir/<config hash>/{corpus,sft,sft_eval,eval_prompts,ppo_prompts}.jsonl."""
    cfg = as_world_config(world_cfg)
    d = Path(cache_dir) / world_hash(cfg)
    d.mkdir(parents=True, exist_ok=True)
    paths = {name: d / f"{name}.jsonl" for name in FILES}
    for name, make in FILES.items():
        if not paths[name].exists():
            write_jsonl(paths[name], make(cfg))
    if not (d / "world_config.json").exists():  # provenance for whoever finds the folder
        write_text(d / "world_config.json", json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    return paths


# ---- reward_data/ --------------------------------------------------------------------------------------------
_README = """# reward_data/

Human-preference-style comparisons for reward-model training, generated from the synthetic world
(`WorldConfig`: seed {seed}, {n_entities} entities, K = {k}, label temperature {temperature}). Regenerate byte for
byte with

    {command}

| file | prompts | responses per prompt (K) | pairs (all K-choose-2, rank ties skipped) |
|---|---|---|---|
| train.jsonl | {n_train} | {k} | {p_train} |
| test.jsonl | {n_test} | {k} | {p_test} |

One JSON object per line:

    {{"id": "train-00000",
     "prompt": [{{"role": "user", "content": "..."}}, ...],   # TRL conversational messages, ends in a user turn
     "responses": ["...", ...],                                # K distinct candidate answers of mixed quality
     "ranks": [2, 0, 3, 1],                                    # the noisy "human" label, 0 = best
     "gold_scores": [0.61, 0.98, 0.2, 0.9]}}                   # the gold oracle (pipeline/world/oracle.py), in [0, 1]

Candidates are drawn from these styles (`STYLES_*` in pipeline/world/responses.py):

- prompts the world can answer: {styles_answerable}
- prompts it cannot answer (unknown name, undefined attribute): {styles_unanswerable}

"demonstrated" is what the SFT demonstrators write: a right answer in their habits (`HABITS`; docs/world.md),
each drawn independently at its rate among the replies it applies to: {habits}. The
labellers see past the habits: each filler phrase (pleasantry or hedge) halves concision, an ignored format costs
instruction following.

{padded:.0%} of the wrong, off-topic and made-up candidates come wrapped in the verbose style's pleasantries ("Thank
you for asking.", "I hope this helps!"), as the right verbose ones are: padding is no sign of a right answer here.

`ranks` is a Plackett-Luce sample over the gold scores at temperature T = {temperature}: the first place goes to
a response with probability proportional to exp(gold / T), the next among the rest likewise, and so on. Measured
agreement of the pairwise labels with the gold order, over pairs with distinct gold scores: train
{agree_train:.3f}, test {agree_test:.3f}, in line with the 73-77% inter-annotator agreement reported for
InstructGPT. {ties_train:.1%} of train pairs have equal gold scores (e.g. two equally good answers); their labels
are pure noise and they are left out of the agreement figure.

Prompts here are disjoint (by question, not only by wording) from the SFT, PPO and evaluation prompts: see
`POOLS` in pipeline/world/questions.py. Load with `pipeline.data.formats.load_preferences` (format `ranked`), which
expands each record into all its pairs with `pipeline.data.formats.expand_pairs`.
"""


def write_reward_data(out_dir, world_cfg=None) -> dict:
    """Write train.jsonl, test.jsonl and README.md (with the measured numbers) into `out_dir`."""
    cfg = as_world_config(world_cfg or WorldConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = "".join(
        f" --{f.name.replace('_', '-')} {getattr(cfg, f.name)}"
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != f.default
    )
    show = lambda styles: ", ".join(f"{name} {p:.0%}" for name, p in styles)  # noqa: E731
    stats = {
        "seed": cfg.seed,
        "n_entities": cfg.n_entities,
        "k": cfg.k,
        "temperature": cfg.label_temperature,
        "command": f"python -m pipeline.world.datasets reward-data --out reward_data{flags}",
        "styles_answerable": show(STYLES_ANSWERABLE),
        "styles_unanswerable": show(STYLES_UNANSWERABLE),
        "padded": PADDED_FLAWED,
        "habits": ", ".join(f"{name.replace('_', ' ')} {r:.0%}" for name, r in HABITS),
    }
    for split in ("train", "test"):
        recs = ranked_prompts(cfg, split)
        write_jsonl(out / f"{split}.jsonl", recs)
        pairs = expand_pairs(recs)
        stats.update(
            {
                f"n_{split}": len(recs),
                f"p_{split}": len(pairs),
                f"agree_{split}": label_agreement(recs),
                f"ties_{split}": sum(p["gold_margin"] == 0 for p in pairs) / max(len(pairs), 1),
            }
        )
    write_text(out / "README.md", _README.format(**stats))
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.world.datasets", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reward-data", help="write reward_data/ (ranked comparisons)")
    r.add_argument("--out", default="reward_data")
    m = sub.add_parser("materialise", help="write the cached corpus, SFT and prompt files")
    m.add_argument("--cache", default=".cache/world")
    for p in sub.choices.values():
        for f in dataclasses.fields(WorldConfig):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    cfg = WorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)})
    t0 = time.perf_counter()
    if args.cmd == "reward-data":
        s = write_reward_data(args.out, cfg)
        for split in ("train", "test"):
            mb = (Path(args.out) / f"{split}.jsonl").stat().st_size / 1e6
            print(
                f"{args.out}/{split}.jsonl: {s[f'n_{split}']} prompts x {cfg.k} responses, {s[f'p_{split}']} pairs, "
                f"{mb:.2f} MB; label agreement with gold {s[f'agree_{split}']:.3f} (T={cfg.label_temperature})"
            )
    else:
        for name, path in materialise(cfg, args.cache).items():
            with open(path, encoding="utf-8") as f:
                n = sum(1 for _ in f)
            print(f"{name:13s} {n:7d} records {path.stat().st_size / 1e6:8.2f} MB  {path}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
