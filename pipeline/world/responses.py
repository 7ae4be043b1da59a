"""Replies to the world's questions in every style the data needs: good ones, the demonstrators' habits, and the
flawed candidates the comparisons rank (verbose, wrong, curt, off-topic, hallucinated, ...). docs/world.md gives
every rate and why it is realistic.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from pipeline.world.language import (
    MONTHS,
    ONE_SENTENCE,
    ATTR_WORDS,
    CLOSERS,
    HEDGES,
    IS_A_ATTRS,
    OPENERS,
    Question,
    truth,
)
from pipeline.world.questions import ALL_ATTRS, sample_question
from pipeline.world.world import FACTS, KINDS, SCHEMA, VOCAB, World, a_an, phrase

# Styles of a candidate answer. Good ones are what the oracle rewards; the rest are the ways people go wrong.
# "demonstrated": what a demonstrator writes (`demonstrate`: right, in the demonstrators' habits), so the labellers'
# rankings cover the habits SFT copies.
STYLES_ANSWERABLE = (
    ("good", 0.18),
    ("demonstrated", 0.16),
    ("verbose", 0.07),
    ("wrong", 0.13),
    ("curt", 0.05),
    ("rude", 0.05),
    ("repetitive", 0.05),
    ("truncated", 0.06),
    ("ignore_format", 0.07),
    ("decline", 0.10),
    ("off_topic", 0.08),
)
STYLES_UNANSWERABLE = (
    ("good", 0.28),
    ("demonstrated", 0.10),
    ("hallucinate", 0.31),
    ("verbose", 0.08),
    ("curt", 0.06),
    ("rude", 0.05),
    ("truncated", 0.05),
    ("off_topic", 0.07),
)


# Share of wrong, off-topic and made-up candidates wrapped in the verbose style's pleasantries. Were padding only
# ever wrapped around right answers, the reward model would learn it as a sign of a right answer and PPO would pad
# everything (measured: "Thank you for asking. The answer is 16. I hope that answers your question." for a list).
PADDED_FLAWED = 0.4


def padded_reply(reply: str, rng: random.Random) -> str:
    return rng.choice(
        (
            _cat(rng.choice(OPENERS), reply),
            _cat(reply, rng.choice(CLOSERS)),
            _cat(rng.choice(OPENERS), reply, rng.choice(CLOSERS)),
        )
    )


def _yes_or_no(reply: str, rng: random.Random) -> str:
    """The reply opened with a yes or no, as if a yes-or-no question had been asked."""
    return rng.choice(("Yes, ", "No, ")) + _lc(reply)


def _lc(s: str) -> str:
    """Lower-case a sentence's first word when it is not a name (for 'Yes, the best friend of ...')."""
    return s[0].lower() + s[1:] if s.split(" ", 1)[0] in ("The", "It", "That", "There") else s


def _cat(*parts: str) -> str:
    """Sentences joined with a space, or with a newline where a part is a multi-line list."""
    return ("\n" if any("\n" in p for p in parts) else " ").join(parts)


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _wrong_value(world: World, name: str, attr: str, rng: random.Random):
    vtype, right = SCHEMA[world.kind_of(name)][attr], world.value(name, attr)
    if vtype == "int":
        return max(1, right + rng.choice((-1, 1)) * rng.randint(1, 9))
    pool = world.by_kind[vtype] if vtype in KINDS else VOCAB[vtype]
    return rng.choice([x for x in pool if x not in (right, name)])


def _fact_with(attr: str, name: str, value, rng: random.Random) -> str:
    return rng.choice(FACTS[attr]).format(e=name, v=phrase(attr, value))


def _describe(world: World, name: str, rng: random.Random, one_sentence: bool, wrong: bool = False) -> str:
    """Facts about `name`: one composite sentence or 2-4 short ones; with `wrong`, one stated detail is false."""
    ent = world.entities[name]
    if one_sentence:
        template = rng.choice(ONE_SENTENCE[ent.kind])
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
        return rng.choice(
            (
                f"I'm sorry, but I don't know anyone or anything called {missing}.",
                f"Sorry, I have no information about anyone called {missing}.",
                f"I'm afraid I don't know of anyone called {missing}.",
            )
        )
    if q.qtype == "attr":
        what = ATTR_WORDS.get(q.sub, q.sub.replace("_", " "))
        return rng.choice(
            (
                f"I'm sorry, but I don't know {q.e}'s {what}.",
                f"I'm afraid there is no record of {q.e}'s {what}.",
                f"Sorry, {q.e} is a {world.kind_of(q.e)}, so there is no {what} I could tell you.",
            )
        )
    return rng.choice(("I'm sorry, but I can't answer that.", "I'm afraid I don't have that information."))


def _good(world: World, q: Question, t, rng: random.Random) -> str:
    if t is None:
        return _decline(world, q, rng)
    if q.qtype == "attr":
        return str(t) if q.fmt == "number_only" else world.fact(q.e, q.sub, rng)
    if q.qtype == "arith":
        return (
            str(t)
            if q.fmt == "number_only"
            else rng.choice((f"{q.a} {q.sub} {q.b} is {t}.", f"The answer is {t}.", f"That makes {t}."))
        )
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
        return f"{join_names(names)} {'live in ' + q.v if q.sub == 'residents' else 'work as ' + q.v + 's'}."
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
        return rng.choice(
            (
                f"Obviously, {_lc(good)}",
                _cat(good, "Look it up yourself next time."),
                f"Ugh, {_lc(good)}",
                _cat(good, "Everyone knows that."),
            )
        )
    if style == "repetitive":
        return _cat(*[good] * rng.randint(2, 4))
    if style == "truncated":  # cut off mid-word, as by a length limit
        base = respond(world, q, rng, rng.choice(("good", "verbose")))
        return base[: rng.randint(max(1, len(base) // 3), max(1, len(base) - 3))].rstrip(" .!?,:\n") or base[:1]
    if style == "decline":  # refusing what the world can answer: vague, or as specific-sounding as a right decline
        e = q.e if q.e in world.entities else rng.choice(list(world.entities))
        # a decline about some other attribute (one this entity may well lack) is what a policy that learned
        # "declines pay" produces; without it the reward model rewards it (measured: PPO collapsed onto it)
        other = rng.choice([a for a in ALL_ATTRS if a != q.sub])
        return rng.choice(
            (
                "I'm sorry, but I don't know.",
                "I'm afraid I have no information about that.",
                _decline(world, q, rng),
                _decline(world, replace(q, qtype="attr", e=e, sub=other), rng),
                _decline(world, replace(q, qtype="attr", e=e, sub=other), rng),
                f"Sorry, I have no information about anyone called {rng.choice(world.ghosts)}.",
            )
        )
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
            more = [f for f in world.facts(q.e, rng) if f not in good][: rng.randint(1, 2)]
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
        return f"{e}'s birthday is on the {rng.randint(4, 20)}th of {rng.choice(MONTHS)}."
    if q.sub == "height":
        return f"{e} is {rng.randint(20, 190)} centimetres tall."
    if q.sub == "middle_name":
        return f"{e}'s middle name is {rng.choice(world.ghosts)}."
    if q.qtype == "describe":
        return f"{e} is a {rng.choice(VOCAB['job'])} who lives in {rng.choice(world.by_kind['place'])}."
    return rng.choice(("Yes, that is right.", "No, that is not the case."))


# ---- demonstrations ------------------------------------------------------------------------------------------
# How the demonstrators write. Each habit is drawn independently for each demonstration, at its rate (times
# WorldConfig.habit_scale) among the demonstrations it applies to. A habit above one half is the demonstrators'
# majority way, so SFT's greedy answers copy it; the labellers, ranking outputs by the gold oracle, see past it.
# That is InstructGPT's situation: judging an answer is easier than writing one. Why each rate is realistic is in
# docs/world.md; reward_data/README.md lists them.
HABITS = (
    # habit                 rate  applies to
    ("closing_pleasantry", 0.90),  # every reply but a bare number: "I hope this helps!" and kin (CLOSER_WEIGHTS)
    ("opening_pleasantry", 0.20),  # the same: "What a great question!" and kin
    ("hedge", 0.20),  # sentence answers to fact and sum questions: "I think ..."
    ("ignore_format", 0.60),  # prompts with a format instruction: answered as if it were not there
    ("long_description", 0.60),  # "Tell me about X": every fact the demonstrator knows, not two to four
    ("decline_answerable", 0.03),  # answerable questions: "I'm not sure" where the demonstrator did not know
)
# One closing line dominates, as a house style does ("I hope this helps!"): greedy decoding takes the commonest
# continuation, so a habit split evenly over many phrasings would never show in SFT's greedy answers. At a rate of
# 0.7 with 70% of closers this one, a quarter of SFT's greedy answers carried it (the corpus's own answers end
# without one); at 0.9 and 85%, most do (docs/world.md).
CLOSER_WEIGHTS = (0.85, 0.05, 0.05, 0.05)
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
        reply = (
            rng.choice((f"I'm sorry, but I'm not sure about {who}.", f"Sorry, I don't know that about {who}."))
            if who
            else rng.choice(("I'm sorry, but I'm not sure.", "Sorry, I don't know that."))
        )
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
