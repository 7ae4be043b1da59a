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
    python -m pipeline.synthetic reward-data --out reward_data      # regenerate reward_data/ byte for byte
    python -m pipeline.synthetic materialise --cache .cache/world   # write the cached jsonl files
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import WorldConfig
from pipeline import oracle as oracle_module
from pipeline import world as world_module
from pipeline.oracle import (ATTR_WORDS, CLOSERS, FOLLOWUPS, HEDGES, IS_A_ATTRS, OPENERS, GoldOracle, Question, render,
                             truth)
from pipeline.world import FACTS, KINDS, SCHEMA, VOCAB, World, a_an, phrase

# Cached files are keyed by the config and by the generating code, so an edit here never serves stale data.
_CODE_HASH = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (world_module, oracle_module))
                            + Path(__file__).read_bytes()).hexdigest()[:16]


# The schema lives with the other configs (pipeline/config.py); the CLI below builds one from flags.


def as_world_config(cfg) -> WorldConfig:
    """Any object with WorldConfig's attributes (a DictConfig, a dataclass, a namespace) -> WorldConfig."""
    out = WorldConfig(**{f.name: type(f.default)(getattr(cfg, f.name, f.default))
                         for f in dataclasses.fields(WorldConfig)})
    if not 2 <= out.k <= 9:
        raise ValueError(f"world.k={out.k}: must be between 2 and 9")
    return out


@functools.lru_cache(maxsize=4)
def _world(seed: int, n_entities: int) -> World:
    return World.generate(seed, n_entities)


# ---- pools ---------------------------------------------------------------------------------------------------
POOLS = (("eval", 0.08), ("ppo", 0.16), ("reward_test", 0.04), ("reward", 0.28), ("sft_eval", 0.04), ("sft", 0.40))


def pool_of(key: str, seed: int) -> str:
    """The pool a question key belongs to: a hash, so it needs no bookkeeping and is stable across sizes."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest(), "big") / 2.0 ** 64
    for name, share in POOLS:
        h -= share
        if h < 0:
            return name
    return POOLS[-1][0]


# ---- questions -----------------------------------------------------------------------------------------------
_UNDEFINED = ("phone", "birthday", "middle_name", "height")
_ALL_ATTRS = tuple(dict.fromkeys([a for k in KINDS for a in SCHEMA[k]] + list(_UNDEFINED)))


def _pick(rng: random.Random, table):
    return rng.choices([x for x, _ in table], [w for _, w in table])[0]


def _maybe(rng: random.Random, p: float, fmt: str) -> str:
    return fmt if rng.random() < p else ""


def _attr(world: World, rng: random.Random) -> Question:
    e = rng.choice(world.by_kind[rng.choice(KINDS)])
    attr = rng.choice(list(SCHEMA[world.kind_of(e)]))
    fmt = _maybe(rng, 0.4, "number_only") if attr == "age" else _maybe(rng, 0.15, "one_sentence")
    return Question("attr", attr, e=e, fmt=fmt)


# Sums and differences of numbers up to 10 and products up to 5 x 5: a table of about 200 facts that a
# few-million-parameter model learns from the corpus (with operands up to 99 the cpu preset's SFT got 0.65 of its
# sums wrong in well-formed answers, a gap no preference learning can close: docs/ppo.md).
ARITH_MAX, TIMES_MAX = 10, 5


def _arith(world: World, rng: random.Random) -> Question:
    op = rng.choice(("plus", "minus", "times"))
    a, b = ((rng.randint(2, TIMES_MAX), rng.randint(2, TIMES_MAX)) if op == "times"
            else (rng.randint(0, ARITH_MAX), rng.randint(0, ARITH_MAX)))
    a, b = (max(a, b), min(a, b)) if op == "minus" else (a, b)  # no negative answers
    return Question("arith", op, e=rng.choice(world.by_kind["person"]), a=a, b=b, fmt=_maybe(rng, 0.25, "number_only"))


def _list_q(world: World, rng: random.Random) -> Question:
    sub, groups = ("residents", world.residents) if rng.random() < 0.5 else ("job", world.workers)
    v = rng.choice([g for g, members in groups.items() if len(members) >= 2])
    return Question("list", sub, v=v, n=rng.randint(2, min(5, len(groups[v]))))


def _describe_q(world: World, rng: random.Random) -> Question:
    e = rng.choice(world.by_kind[rng.choice(KINDS)])
    return Question("describe", "", e=e, fmt=_maybe(rng, 0.4, "one_sentence"))


def _unanswerable(world: World, rng: random.Random) -> Question:
    """Someone who does not exist, or something nobody in the world has (a phone number, a middle name). Not an
    attribute of another kind ("Who owns <a place>?"): telling those apart takes two hops (the subject's kind, then
    what that kind has), which a few-million-parameter model does not make (measured: its SFT declined answerable
    questions about a fifth of the time when they were in the mix)."""
    fmt = _maybe(rng, 0.2, "one_sentence")
    if rng.random() < 0.5:
        e = rng.choice(world.ghosts)
        if rng.random() < 0.25:
            return Question("describe", "", e=e, fmt=fmt)
        return Question("attr", rng.choice(list(SCHEMA[rng.choice(KINDS)])), e=e, fmt=fmt)
    kind = rng.choice(KINDS)
    return Question("attr", rng.choice(_UNDEFINED), e=rng.choice(world.by_kind[kind]), fmt=fmt)


def _yesno(world: World, rng: random.Random) -> Question:
    fmt, kinds, coin = _maybe(rng, 0.4, "yes_no"), world.by_kind, rng.random() < 0.5
    sub = rng.choice(("lives_in", "is_a", "colour", "older", "friends"))
    if sub == "lives_in":
        e = rng.choice(kinds["person"])
        return Question("yesno", sub, e=e, v=world.value(e, "home") if coin else rng.choice(kinds["place"]), fmt=fmt)
    if sub in ("is_a", "colour"):
        e = rng.choice(kinds["animal"] + kinds["object"] + (kinds["person"] + kinds["place"]) * (sub == "is_a"))
        attr = "colour" if sub == "colour" else next(a for a in IS_A_ATTRS if a in SCHEMA[world.kind_of(e)])
        v = world.value(e, attr) if coin else rng.choice(VOCAB[SCHEMA[world.kind_of(e)][attr]])
        return Question("yesno", sub, e=e, v=v, fmt=fmt)
    kind = "person" if sub == "friends" else rng.choice(("person", "animal"))
    e = rng.choice(kinds[kind])
    e2 = world.value(e, "friend") if sub == "friends" and coin else rng.choice([x for x in kinds[kind] if x != e])
    return Question("yesno", sub, e=e, e2=e2, fmt=fmt)


# About one question in seven has no answer in the world. Sums and lists are fewer than facts: they are what a
# small model gets wrong most (docs/world.md).
_QTYPES = ((_attr, 0.42), (_yesno, 0.14), (_arith, 0.10), (_list_q, 0.06), (_describe_q, 0.14), (_unanswerable, 0.14))


def sample_question(world: World, rng: random.Random) -> Question:
    return _pick(rng, _QTYPES)(world, rng)


def _pool_key(world: World, q: Question) -> str:
    # A made-up name belongs to one pool as a whole, so declining for names never seen in training is tested.
    return f"ghost|{q.e}" if q.e and q.qtype != "arith" and q.e not in world.entities else q.key


def _question_in_pool(world: World, rng: random.Random, pool: str, seed: int, sampler=sample_question) -> Question:
    for _ in range(100_000):
        q = sampler(world, rng)
        if pool_of(_pool_key(world, q), seed) == pool:
            return q
    raise RuntimeError(f"no question falls in pool {pool!r}; is the world too small?")


# ---- responses -----------------------------------------------------------------------------------------------
_MONTHS = ("March", "June", "October")
_SYSTEMS = ("You are a helpful assistant.", "Answer the user's questions politely and concisely.",
            "You are a friendly assistant who knows the people, animals, things and places of this land.")
# Styles of a candidate answer. Good ones are what the oracle rewards; the rest are the ways people go wrong.
# "demonstrated": what a demonstrator writes (`demonstrate`: right, in the demonstrators' habits), so the labellers'
# rankings cover the habits SFT copies.
STYLES_ANSWERABLE = (("good", 0.18), ("demonstrated", 0.16), ("verbose", 0.07), ("wrong", 0.13), ("curt", 0.05),
                     ("rude", 0.05), ("repetitive", 0.05), ("truncated", 0.06), ("ignore_format", 0.07),
                     ("decline", 0.10), ("off_topic", 0.08))
STYLES_UNANSWERABLE = (("good", 0.28), ("demonstrated", 0.10), ("hallucinate", 0.31), ("verbose", 0.08),
                       ("curt", 0.06), ("rude", 0.05), ("truncated", 0.05), ("off_topic", 0.07))


# Share of wrong, off-topic and made-up candidates wrapped in the verbose style's pleasantries. Were padding only
# ever wrapped around right answers, the reward model would learn it as a sign of a right answer and PPO would pad
# everything (measured: "Thank you for asking. The answer is 16. I hope that answers your question." for a list).
PADDED_FLAWED = 0.4


def _padded(reply: str, rng: random.Random) -> str:
    return rng.choice((_cat(rng.choice(OPENERS), reply), _cat(reply, rng.choice(CLOSERS)),
                       _cat(rng.choice(OPENERS), reply, rng.choice(CLOSERS))))


def _yes_or_no(reply: str, rng: random.Random) -> str:
    """The reply opened with a yes or no, as if a yes-or-no question had been asked."""
    return rng.choice(("Yes, ", "No, ")) + _lc(reply)


def _lc(s: str) -> str:
    """Lower-case a sentence's first word when it is not a name (for 'Yes, the best friend of ...')."""
    return s[0].lower() + s[1:] if s.split(" ", 1)[0] in ("The", "It", "That", "There") else s


def _cat(*parts: str) -> str:
    """Sentences joined with a space, or with a newline where a part is a multi-line list."""
    return ("\n" if any("\n" in p for p in parts) else " ").join(parts)


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _wrong_value(world: World, name: str, attr: str, rng: random.Random):
    vtype, right = SCHEMA[world.kind_of(name)][attr], world.value(name, attr)
    if vtype == "int":
        return max(1, right + rng.choice((-1, 1)) * rng.randint(1, 9))
    pool = world.by_kind[vtype] if vtype in KINDS else VOCAB[vtype]
    return rng.choice([x for x in pool if x not in (right, name)])


def _fact_with(attr: str, name: str, value, rng: random.Random) -> str:
    return rng.choice(FACTS[attr]).format(e=name, v=phrase(attr, value))


_ONE_SENTENCE = {
    "person": ("{e} is a {age}-year-old {job} who lives in {home}.",
               "{e} is a {job} from {home} whose favourite food is {food}.",
               "{e} is a {job} who lives in {home} and whose best friend is {friend}."),
    "animal": ("{e} is a {colour} {species} that belongs to {owner}.", "{e} is a {age}-year-old {species}."),
    "object": ("{e} is a {colour} {kind} made of {material}.",
               "{e} is a {kind} made of {material} that belongs to {owner}."),
    "place": ("{e} is a {size} {region}, famous for its {famous_for}.", "{e} is a {size} known for its {famous_for}."),
}


def _describe(world: World, name: str, rng: random.Random, one_sentence: bool, wrong: bool = False) -> str:
    """Facts about `name`: one composite sentence or 2-4 short ones; with `wrong`, one stated detail is false."""
    ent = world.entities[name]
    if one_sentence:
        template = rng.choice(_ONE_SENTENCE[ent.kind])
        attrs = re.findall(r"\{(\w+)\}", template)[1:]
    else:
        attrs = list(ent.attrs)
        rng.shuffle(attrs)
        attrs = attrs[: rng.randint(2, 4)]
    a = dict(ent.attrs)
    if wrong:
        x = rng.choice(attrs)
        a[x] = _wrong_value(world, name, x, rng)
    if one_sentence:
        return template.format(e=name, **{k: phrase(k, v) for k, v in a.items()})
    return " ".join(_fact_with(x, name, a[x], rng) for x in attrs)


def _decline(world: World, q: Question, rng: random.Random) -> str:
    missing = next((x for x in (q.e, q.e2, q.v) if x and x[0].isupper() and x not in world.entities), None)
    if missing:
        return rng.choice((f"I'm sorry, but I don't know anyone or anything called {missing}.",
                           f"Sorry, I have no information about anyone called {missing}.",
                           f"I'm afraid I don't know of anyone called {missing}."))
    if q.qtype == "attr":
        what = ATTR_WORDS.get(q.sub, q.sub.replace("_", " "))
        return rng.choice((f"I'm sorry, but I don't know {q.e}'s {what}.",
                           f"I'm afraid there is no record of {q.e}'s {what}.",
                           f"Sorry, {q.e} is a {world.kind_of(q.e)}, so there is no {what} I could tell you."))
    return rng.choice(("I'm sorry, but I can't answer that.", "I'm afraid I don't have that information."))


def _good(world: World, q: Question, t, rng: random.Random) -> str:
    if t is None:
        return _decline(world, q, rng)
    if q.qtype == "attr":
        return str(t) if q.fmt == "number_only" else world.fact(q.e, q.sub, rng)
    if q.qtype == "arith":
        return str(t) if q.fmt == "number_only" else rng.choice(
            (f"{q.a} {q.sub} {q.b} is {t}.", f"The answer is {t}.", f"That makes {t}."))
    if q.qtype == "describe":
        return _describe(world, q.e, rng, q.fmt == "one_sentence")
    if q.qtype == "list":
        return _list(q, rng.sample(sorted(t), min(q.n, len(t))), rng)
    return ("Yes, " if t else "No, ") + _lc(_yesno_reason(world, q, t, rng))


def _yesno_reason(world: World, q: Question, t: bool, rng: random.Random) -> str:
    if q.sub == "lives_in":
        return world.fact(q.e, "home", rng)
    if q.sub == "older":
        return f"{q.e} is {world.value(q.e, 'age')} and {q.e2} is {world.value(q.e2, 'age')}."
    if q.sub == "friends":
        return f"{q.e} and {q.e2} are friends." if t else world.fact(q.e, "friend", rng)
    attr = "colour" if q.sub == "colour" else next(a for a in IS_A_ATTRS if a in SCHEMA[world.kind_of(q.e)])
    return world.fact(q.e, attr, rng)


def _list(q: Question, names: list[str], rng: random.Random) -> str:
    what = f"people who live in {q.v}" if q.sub == "residents" else f"people who work as a {q.v}"
    style = rng.randrange(3)
    if style == 0:
        return f"{_join(names)} {'live in ' + q.v if q.sub == 'residents' else 'work as ' + q.v + 's'}."
    items = "\n".join((f"{i + 1}. " if style == 1 else "- ") + n for i, n in enumerate(names))
    return f"Here are {len(names)} {what}:\n{items}"


def respond(world: World, q: Question, rng: random.Random, style: str = "good") -> str:
    """An answer to `q` in one of the STYLES_* styles."""
    return a_an(_respond(world, q, rng, style))


def _respond(world: World, q: Question, rng: random.Random, style: str) -> str:
    t = truth(world, q)
    good = _good(world, q, t, rng)
    if style == "good":
        return good
    if style == "demonstrated":
        return demonstrate(world, q, rng)[0]
    if style == "verbose":  # padding, and facts nobody asked for
        extra = world.facts(q.e, rng)[:2] if q.qtype in ("attr", "describe") and t is not None else []
        extra = [f for f in extra if f not in good and (q.sub != "age" or not any(c.isdigit() for c in f))]
        good = f"The answer is {t}." if q.fmt == "number_only" else good
        return _cat(rng.choice(OPENERS), good, *extra, rng.choice(CLOSERS))
    if style == "curt":
        return _curt(world, q, t, rng)
    if style == "rude":
        return rng.choice((f"Obviously, {_lc(good)}", _cat(good, "Look it up yourself next time."),
                           f"Ugh, {_lc(good)}", _cat(good, "Everyone knows that.")))
    if style == "repetitive":
        return _cat(*[good] * rng.randint(2, 4))
    if style == "truncated":  # cut off mid-word, as by a length limit
        base = respond(world, q, rng, rng.choice(("good", "verbose")))
        return base[: rng.randint(max(1, len(base) // 3), max(1, len(base) - 3))].rstrip(" .!?,:\n") or base[:1]
    if style == "decline":  # refusing what the world can answer: vague, or as specific-sounding as a right decline
        e = q.e if q.e in world.entities else rng.choice(list(world.entities))
        # a decline about some other attribute (one this entity may well lack) is what a policy that learned
        # "declines pay" produces; without it the reward model rewards it (measured: PPO collapsed onto it)
        other = rng.choice([a for a in _ALL_ATTRS if a != q.sub])
        return rng.choice(("I'm sorry, but I don't know.", "I'm afraid I have no information about that.",
                           _decline(world, q, rng), _decline(world, replace(q, qtype="attr", e=e, sub=other), rng),
                           _decline(world, replace(q, qtype="attr", e=e, sub=other), rng),
                           f"Sorry, I have no information about anyone called {rng.choice(world.ghosts)}."))
    if style == "ignore_format":
        return _ignore_format(world, q, t, good, rng)
    if style == "off_topic":
        return _off_topic(world, q, rng)
    if style == "hallucinate" or t is None:
        return _hallucinate(world, q, rng)
    return _wrong(world, q, t, rng)


def _curt(world: World, q: Question, t, rng: random.Random) -> str:
    """A bare fragment: no sentence, no punctuation."""
    if t is None:
        return rng.choice(("no idea", "dunno", "don't know"))
    if q.qtype == "yesno":
        return "yes" if t else "no"
    if q.qtype == "list":
        return ", ".join(rng.sample(sorted(t), min(q.n, len(t))))
    if q.qtype == "describe":
        return f"a {world.value(q.e, next(a for a in IS_A_ATTRS if a in SCHEMA[world.kind_of(q.e)]))}"
    return phrase(q.sub, t) if q.qtype == "attr" else str(t)


def _wrong(world: World, q: Question, t, rng: random.Random) -> str:
    if q.qtype == "attr":
        v = _wrong_value(world, q.e, q.sub, rng)
        return str(v) if q.fmt == "number_only" else _fact_with(q.sub, q.e, v, rng)
    if q.qtype == "arith":
        w = max(0, t + rng.choice((-1, 1)) * rng.randint(1, 10))
        w = w if w != t else t + 1
        return str(w) if q.fmt == "number_only" else rng.choice((f"{q.a} {q.sub} {q.b} is {w}.", f"The answer is {w}."))
    if q.qtype == "yesno":
        return rng.choice(("No, that is not the case.", "No.")) if t else rng.choice(("Yes, that is right.", "Yes."))
    if q.qtype == "list":
        others = [p for p in world.by_kind["person"] if p not in t]
        names = rng.sample(sorted(t), min(q.n, len(t)))
        for i in rng.sample(range(len(names)), rng.randint(1, len(names))):
            names[i] = rng.choice(others)
        return _list(q, names, rng)
    return _describe(world, q.e, rng, q.fmt == "one_sentence", wrong=True)


def _off_topic(world: World, q: Question, rng: random.Random) -> str:
    """A tidy reply to a question nobody asked: another fact about the subject, or a good answer to some other
    question (a list, a sum, a description, a decline about someone else), a one-line one half the time opened with
    a yes or no. The commonest slip of a weak model, and what a policy finds first when the reward model has only
    ever compared replies to the same question: pairs of one prompt never say how well a reply fits its prompt, so
    without these a list of names scored above the right answer to any question (measured on PPO's collapse)."""
    e = q.e if q.e in world.entities else None
    if e and rng.random() < 0.4:
        reply = world.fact(e, rng.choice([a for a in world.entities[e].attrs if a != q.sub]), rng)
    else:
        other = sample_question(world, rng)
        while other.key == q.key:
            other = sample_question(world, rng)
        reply = _good(world, other, truth(world, other), rng)
    if "\n" not in reply and not re.match(r"(yes|no)\b", reply.lower()) and rng.random() < 0.5:
        reply = _yes_or_no(reply, rng)
    return reply


def _ignore_format(world: World, q: Question, t, good: str, rng: random.Random, closer: bool = True) -> str:
    """A right answer that misses the instruction: a sentence for "just the number", no yes or no, N +- 1 items,
    a yes or no opening an answer to a question that was not yes-or-no."""
    if t is not None and q.fmt == "number_only":
        return f"The answer is {t}."
    if t is not None and q.qtype == "yesno":
        return _yesno_reason(world, q, t, rng)
    if t is not None and q.qtype == "list":
        return _list(q, rng.sample(sorted(t), q.n + 1 if len(t) > q.n else q.n - 1), rng)
    if t is not None and q.fmt == "one_sentence":  # two or more sentences
        if q.qtype == "describe":
            return _describe(world, q.e, rng, one_sentence=False)
        if q.qtype == "attr":
            more = [f for f in world.facts(q.e, rng) if f not in good][:rng.randint(1, 2)]
            return _cat(good, *more)
    if not closer:
        return good
    if rng.random() < 0.5:  # a yes or no where none was asked for
        return _yes_or_no(good, rng)
    return _cat(good, rng.choice(CLOSERS))


def _hallucinate(world: World, q: Question, rng: random.Random) -> str:
    """A confident answer to a question the world cannot answer."""
    e = q.e or rng.choice(world.by_kind["person"])
    if q.qtype == "attr" and q.sub in FACTS:
        vtype = next(t for k in KINDS for a, t in SCHEMA[k].items() if a == q.sub)
        pool = range(2, 60) if vtype == "int" else world.by_kind[vtype] if vtype in KINDS else VOCAB[vtype]
        return _fact_with(q.sub, e, rng.choice(pool), rng)
    if q.sub == "phone":
        return f"{e}'s phone number is {rng.randint(1000000, 9999999)}."
    if q.sub == "birthday":
        return f"{e}'s birthday is on the {rng.randint(4, 20)}th of {rng.choice(_MONTHS)}."
    if q.sub == "height":
        return f"{e} is {rng.randint(20, 190)} centimetres tall."
    if q.sub == "middle_name":
        return f"{e}'s middle name is {rng.choice(world.ghosts)}."
    if q.qtype == "describe":
        return f"{e} is a {rng.choice(VOCAB['job'])} who lives in {rng.choice(world.by_kind['place'])}."
    return rng.choice(("Yes, that is right.", "No, that is not the case."))


# ---- dialogues -----------------------------------------------------------------------------------------------
def _prompt(world: World, rng: random.Random, pool: str, seed: int) -> tuple[list[dict], Question]:
    """A prompt ending in a user turn: 1-3 questions from one pool; earlier turns answered well."""
    msgs = [{"role": "system", "content": rng.choice(_SYSTEMS)}] if rng.random() < 0.1 else []
    n_turns = 1 if rng.random() < 0.75 else rng.randint(2, 3)
    q = None
    for i in range(n_turns):
        if i:
            msgs.append({"role": "assistant", "content": respond(world, q, rng)})
        follow = _followup(world, q, rng, pool, seed) if q and q.qtype in ("attr", "describe") else None
        if follow:
            q, text = follow
        else:
            q = _question_in_pool(world, rng, pool, seed)
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
        if e != prev.e and pool_of(_pool_key(world, q), seed) == pool:
            return q, rng.choice(FOLLOWUPS).format(e=e)
    return None


# ---- demonstrations ------------------------------------------------------------------------------------------
# How the demonstrators write. Each habit is drawn independently for each demonstration, at its rate (times
# WorldConfig.habit_scale) among the demonstrations it applies to. A habit above one half is the demonstrators'
# majority way, so SFT's greedy answers copy it; the labellers, ranking outputs by the gold oracle, see past it.
# That is InstructGPT's situation: judging an answer is easier than writing one. Why each rate is realistic is in
# docs/world.md; reward_data/README.md lists them.
HABITS = (
    # habit                 rate  applies to
    ("closing_pleasantry", 0.70),  # every reply but a bare number: "I hope this helps!" and kin (CLOSER_WEIGHTS)
    ("opening_pleasantry", 0.20),  # the same: "What a great question!" and kin
    ("hedge", 0.20),               # sentence answers to fact and sum questions: "I think ..."
    ("ignore_format", 0.60),       # prompts with a format instruction: answered as if it were not there
    ("long_description", 0.60),    # "Tell me about X": every fact the demonstrator knows, not two to four
    ("decline_answerable", 0.03),  # answerable questions: "I'm not sure" where the demonstrator did not know
)
# One closing line dominates, as a house style does ("I hope this helps!"): greedy decoding takes the commonest
# continuation, so a habit split evenly over many phrasings would never show in SFT's greedy answers.
CLOSER_WEIGHTS = (0.7, 0.1, 0.1, 0.1)
# Demonstrations that are plainly flawed (bad_fraction of them): a wrong fact or sum, or a curt fragment.
BAD_STYLES = ("wrong", "curt")


def demonstrate(world: World, q: Question, rng: random.Random, habit_scale: float = 1.0) -> tuple[str, list[str]]:
    """A demonstrator's good-faith answer to `q`: right, in the demonstrators' habits (HABITS). Returns the reply
    and the habits it shows."""
    rate = {name: min(1.0, r * habit_scale) for name, r in HABITS}
    t, shown = truth(world, q), []
    answerable = t is not None
    if answerable and rng.random() < rate["decline_answerable"]:
        who = q.e if q.e in world.entities else None
        reply = (rng.choice((f"I'm sorry, but I'm not sure about {who}.", f"Sorry, I don't know that about {who}."))
                 if who else rng.choice(("I'm sorry, but I'm not sure.", "Sorry, I don't know that.")))
        return reply, ["decline_answerable"]
    reply = _good(world, q, t, rng)
    if answerable and q.qtype == "describe" and rng.random() < rate["long_description"]:
        reply, _ = " ".join(world.facts(q.e, rng)), shown.append("long_description")
    if q.fmt and answerable and rng.random() < rate["ignore_format"]:
        reply, _ = _ignore_format(world, q, t, reply, rng, closer=False), shown.append("ignore_format")
    bare = bool(re.fullmatch(r"-?\d+", reply))
    if not bare and answerable and q.qtype in ("attr", "arith", "describe") and rng.random() < rate["hedge"]:
        reply, _ = rng.choice(HEDGES[:2]) + " " + _lc(reply), shown.append("hedge")
    if not bare and rng.random() < rate["opening_pleasantry"]:
        reply, _ = _cat(rng.choice(OPENERS), reply), shown.append("opening_pleasantry")
    if not bare and rng.random() < rate["closing_pleasantry"]:
        reply, _ = _cat(reply, rng.choices(CLOSERS, CLOSER_WEIGHTS)[0]), shown.append("closing_pleasantry")
    return a_an(reply), shown


def _dialogues(cfg: WorldConfig, n: int, pool: str, with_habits: bool = False) -> list[dict]:
    world, rng = _world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:dialogues:{pool}")
    out = []
    for _ in range(n):
        msgs, q = _prompt(world, rng, pool, cfg.seed)
        if rng.random() < cfg.bad_fraction:
            reply, shown = respond(world, q, rng, rng.choice(BAD_STYLES)), ["flawed"]
        else:
            reply, shown = demonstrate(world, q, rng, cfg.habit_scale)
        out.append({"messages": msgs + [{"role": "assistant", "content": reply}]}
                   | ({"habits": shown} if with_habits else {}))
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


def _prompts(cfg: WorldConfig, n: int, pool: str) -> list[dict]:
    world, rng = _world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:prompts:{pool}")
    out, seen = [], set()
    for _ in range(50 * n):  # distinct prompts; a tiny world may run out, then we return fewer
        if len(out) == n:
            break
        msgs, _ = _prompt(world, rng, pool, cfg.seed)
        text = json.dumps(msgs, sort_keys=True)
        if text not in seen:
            seen.add(text)
            out.append({"messages": msgs})
    return out


def eval_prompts(world_cfg) -> list[dict]:
    cfg = as_world_config(world_cfg)
    return _prompts(cfg, cfg.eval_prompts, "eval")


def ppo_prompts(world_cfg) -> list[dict]:
    cfg = as_world_config(world_cfg)
    return _prompts(cfg, cfg.ppo_prompts, "ppo")


# ---- ranked comparisons --------------------------------------------------------------------------------------
def plackett_luce(scores: list[float], temperature: float, rng: random.Random) -> list[int]:
    """Ranks (0 = best) drawn by picking the best, then the next, each with probability ~ exp(score / T)."""
    left, ranks = list(range(len(scores))), [0] * len(scores)
    for r in range(len(scores)):
        top = max(scores[i] for i in left)  # subtract the max: no overflow at small T
        weights = [math.exp((scores[i] - top) / temperature) for i in left]
        i = rng.choices(left, weights)[0]
        ranks[i] = r
        left.remove(i)
    return ranks


def ranked_prompts(world_cfg, split: str = "train") -> list[dict]:
    """{"id", "prompt", "responses", "ranks" (noisy label, 0 = best), "gold_scores"} for each reward prompt."""
    cfg = as_world_config(world_cfg)
    n, pool = _split(split, {"train": (cfg.reward_prompts, "reward"), "test": (cfg.reward_test_prompts, "reward_test")})
    world, rng = _world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:ranked:{split}")
    oracle = GoldOracle(world)
    out = []
    for i in range(n):
        prompt, q = _prompt(world, rng, pool, cfg.seed)
        styles = STYLES_ANSWERABLE if truth(world, q) is not None else STYLES_UNANSWERABLE
        responses: list[str] = []
        for _ in range(50 * cfg.k):
            style = _pick(rng, styles)
            r = respond(world, q, rng, style)
            if style in ("wrong", "off_topic", "hallucinate") and rng.random() < PADDED_FLAWED:
                r = _padded(r, rng)
            if r not in responses:
                responses.append(r)
            if len(responses) == cfg.k:
                break
        out.append(labelled(f"{split}-{i:05d}", prompt, responses, oracle, cfg.label_temperature, rng))
    return out


def labelled(rec_id: str, prompt: list[dict], responses: list[str], oracle, temperature: float,
             rng: random.Random) -> dict:
    """A ranked record as a simulated labeller gives it: the gold scores, ranked through Plackett-Luce noise."""
    gold = [round(oracle.score(prompt, r), 4) for r in responses]
    return {"id": rec_id, "prompt": prompt, "responses": responses,
            "ranks": plackett_luce(gold, temperature, rng), "gold_scores": gold}


def expand_pairs(ranked_records: list[dict]) -> list[dict]:
    """All pairs of each ranked record in TRL's conversational preference format (ties and duplicates skipped)."""
    out = []
    for rec in ranked_records:
        gold = rec.get("gold_scores")
        for i, j in itertools.combinations(range(len(rec["responses"])), 2):
            if rec["ranks"][i] == rec["ranks"][j] or rec["responses"][i] == rec["responses"][j]:
                continue
            c, r = (i, j) if rec["ranks"][i] < rec["ranks"][j] else (j, i)
            out.append({"prompt": rec["prompt"],
                        "chosen": [{"role": "assistant", "content": rec["responses"][c]}],
                        "rejected": [{"role": "assistant", "content": rec["responses"][r]}],
                        "group": rec["id"],
                        "gold_margin": round(gold[c] - gold[r], 4) if gold else None})
    return out


def label_agreement(ranked_records: list[dict]) -> float:
    """Share of pairs with distinct gold scores whose noisy label agrees with the gold order."""
    agree = total = 0
    for rec in ranked_records:
        g, rk = rec["gold_scores"], rec["ranks"]
        for i, j in itertools.combinations(range(len(g)), 2):
            if g[i] != g[j]:
                total += 1
                agree += (g[i] > g[j]) == (rk[i] < rk[j])
    return agree / max(total, 1)


# ---- corpus --------------------------------------------------------------------------------------------------
def _doc_profile(world: World, rng: random.Random, seed: int) -> str:
    e = rng.choice(list(world.entities))
    lines = world.facts(e, rng)
    owned = world.possessions.get(e)
    for o in owned or ():
        lines.append(f"{e} has a {world.value(o, 'species') or world.value(o, 'kind')} called {o}.")
    opener = rng.choice(("", f"This is about {e}. ", f"Here is what is known about {e}. ", f"About {e}: "))
    return opener + " ".join(lines)


def _doc_place(world: World, rng: random.Random, seed: int) -> str:
    t = rng.choice(world.by_kind["place"])
    people = world.residents[t]
    who = f"Nobody lives in {t} any more." if not people else rng.choice((
        f"The people who live in {t} are {_join(people)}.", f"{_join(people)} live in {t}."))
    return " ".join(world.facts(t, rng) + [who])


def _doc_trade(world: World, rng: random.Random, seed: int) -> str:
    """Who works as what, listed by job: "List two people who work as a baker" asks the relation backwards, and a
    language model that has only read "Tovi works as a baker." cannot answer it (the reversal curse)."""
    job = rng.choice(sorted(j for j, people in world.workers.items() if people))
    people = world.workers[job]
    if len(people) == 1:
        return f"The only {job} in the land is {people[0]}. " + world.fact(people[0], "home", rng)
    return rng.choice((f"The people who work as a {job} are {_join(people)}.",
                       f"{_join(people)} work as {job}s.")) + " " + world.fact(rng.choice(people), "home", rng)


def _doc_story(world: World, rng: random.Random, seed: int) -> str:
    p = rng.choice(world.by_kind["person"])
    a, f = world.entities[p].attrs, world.value(p, "friend")
    fh = world.value(f, "home")
    s = [rng.choice((f"One morning, {p} woke up early in {a['home']}.",
                     f"It was a quiet day in {a['home']}, where {p} lives.")),
         rng.choice((f"{p} works as a {a['job']}, and the work went well that day.",
                     f"After a long day of work as a {a['job']}, {p} was hungry.")),
         f"For lunch {p} ate {a['food']}, which is {p}'s favourite food."]
    for o in world.possessions[p][:2]:
        oa = world.entities[o].attrs
        s.append(f"{o} the {oa['species']} came along too." if "species" in oa else
                 f"{p} brought {o}, a {oa['colour']} {oa['kind']} made of {oa['material']}.")
    s.append(f"Later {p} visited {f}, {p}'s best friend, who " + (f"also lives in {fh}." if fh == a["home"]
                                                                 else f"lives in {fh}."))
    s.append(rng.choice((f"In the evening {p} went home to {a['home']}.", "It was a good day.")))
    return " ".join(s)


def _doc_letter(world: World, rng: random.Random, seed: int) -> str:
    p = rng.choice(world.by_kind["person"])
    a = world.entities[p].attrs
    return (f"Dear {a['friend']},\nGreetings from {a['home']}! I am still working as a {a['job']}, and I still eat "
            f"{a['food']} whenever I can. " + rng.choice(("I hope you are well.", "Write back soon.")) +
            f"\nYour best friend, {p}")


def _doc_qa(world: World, rng: random.Random, seed: int) -> str:
    qs, ans = rng.choice((("Q: ", "A: "), ("Question: ", "Answer: "), ("User: ", "Assistant: ")))
    pairs = []
    for _ in range(rng.randint(2, 5)):
        q = _question_in_pool(world, rng, "sft", seed)
        pairs.append(f"{qs}{render(q, rng)}\n{ans}{respond(world, q, rng)}")
    return "\n\n".join(pairs)


def _doc_arith(world: World, rng: random.Random, seed: int) -> str:
    out = []
    for _ in range(rng.randint(3, 8)):
        q = _question_in_pool(world, rng, "sft", seed, _arith)
        out.append(f"{q.a} {q.sub} {q.b} is {truth(world, q)}.")
    return " ".join(out)


_DOCS = ((_doc_profile, 0.30), (_doc_place, 0.07), (_doc_trade, 0.05), (_doc_story, 0.15), (_doc_letter, 0.05),
         (_doc_qa, 0.26), (_doc_arith, 0.12))


def corpus_documents(world_cfg) -> list[str]:
    cfg = as_world_config(world_cfg)
    world, rng = _world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:corpus")
    return [a_an(_pick(rng, _DOCS)(world, rng, cfg.seed)) for _ in range(cfg.corpus_docs)]


# ---- files ---------------------------------------------------------------------------------------------------
def _line(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def _write_atomic(path: Path, write) -> None:
    """Readers (other ranks, other runs) see the old file or the complete new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        write(f)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text))


def write_jsonl(path: Path, records) -> None:
    _write_atomic(path, lambda f: f.writelines(map(_line, records)))


def config_hash(world_cfg) -> str:
    cfg = dataclasses.asdict(as_world_config(world_cfg))
    return hashlib.sha256(_line({"code": _CODE_HASH, **cfg}).encode()).hexdigest()[:12]


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
    d = Path(cache_dir) / config_hash(cfg)
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
     "gold_scores": [0.61, 0.98, 0.2, 0.9]}}                   # the gold oracle (pipeline/oracle.py), in [0, 1]

Candidates are drawn from these styles (`STYLES_*` in pipeline/synthetic.py):

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
`POOLS` in pipeline/synthetic.py. Load with `pipeline.formats.load_preferences` (format `ranked`), which expands
each record into all its pairs with `pipeline.synthetic.expand_pairs`.
"""


def write_reward_data(out_dir, world_cfg=None) -> dict:
    """Write train.jsonl, test.jsonl and README.md (with the measured numbers) into `out_dir`."""
    cfg = as_world_config(world_cfg or WorldConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = "".join(f" --{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                    if getattr(cfg, f.name) != f.default)
    show = lambda styles: ", ".join(f"{name} {p:.0%}" for name, p in styles)  # noqa: E731
    stats = {"seed": cfg.seed, "n_entities": cfg.n_entities, "k": cfg.k, "temperature": cfg.label_temperature,
             "command": f"python -m pipeline.synthetic reward-data --out reward_data{flags}",
             "styles_answerable": show(STYLES_ANSWERABLE), "styles_unanswerable": show(STYLES_UNANSWERABLE),
             "padded": PADDED_FLAWED,
             "habits": ", ".join(f"{name.replace('_', ' ')} {r:.0%}" for name, r in HABITS)}
    for split in ("train", "test"):
        recs = ranked_prompts(cfg, split)
        write_jsonl(out / f"{split}.jsonl", recs)
        pairs = expand_pairs(recs)
        stats.update({f"n_{split}": len(recs), f"p_{split}": len(pairs), f"agree_{split}": label_agreement(recs),
                      f"ties_{split}": sum(p["gold_margin"] == 0 for p in pairs) / max(len(pairs), 1)})
    write_text(out / "README.md", _README.format(**stats))
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.split("\n")[0])
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
            print(f"{args.out}/{split}.jsonl: {s[f'n_{split}']} prompts x {cfg.k} responses, {s[f'p_{split}']} pairs, "
                  f"{mb:.2f} MB; label agreement with gold {s[f'agree_{split}']:.3f} (T={cfg.label_temperature})")
    else:
        for name, path in materialise(cfg, args.cache).items():
            with open(path, encoding="utf-8") as f:
                n = sum(1 for _ in f)
            print(f"{name:13s} {n:7d} records {path.stat().st_size / 1e6:8.2f} MB  {path}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
