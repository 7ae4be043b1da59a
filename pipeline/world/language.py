"""The world's language: the question templates, the phrase pools the demonstrators and the oracle share, and the
question itself (`Question`: parsed from a prompt, rendered into one, answered from the world by `truth`).

The generators (questions.py, responses.py, corpus.py) write with these words and the oracle (oracle.py) reads
with them, so what the models see and what the oracle checks cannot drift apart.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, replace

from pipeline.world.world import VOCAB, World, a_an

# (question type, sub-type, template). Slots: {e} {e2} entities, {t} a place, {v} a value word, {n} a count,
# {a} {b} numbers, {x} a countable thing (word problems only).
QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("attr", "job", "What does {e} do for a living?"),
    ("attr", "job", "What is {e}'s job?"),
    ("attr", "job", "What job does {e} have?"),
    ("attr", "age", "How old is {e}?"),
    ("attr", "age", "What is the age of {e}?"),
    ("attr", "food", "What is {e}'s favourite food?"),
    ("attr", "food", "Which food does {e} like best?"),
    ("attr", "favourite_colour", "What is {e}'s favourite colour?"),
    ("attr", "home", "Where does {e} live?"),
    ("attr", "home", "In which town does {e} live?"),
    ("attr", "home", "Where is {e}'s home?"),
    ("attr", "friend", "Who is {e}'s best friend?"),
    ("attr", "friend", "Who is the best friend of {e}?"),
    ("attr", "owner", "Who owns {e}?"),
    ("attr", "owner", "Who does {e} belong to?"),
    ("attr", "species", "What kind of animal is {e}?"),
    ("attr", "species", "What animal is {e}?"),
    ("attr", "colour", "What colour is {e}?"),
    ("attr", "kind", "What kind of object is {e}?"),
    ("attr", "kind", "What sort of thing is {e}?"),
    ("attr", "material", "What is {e} made of?"),
    ("attr", "region", "In which region is {e}?"),
    ("attr", "region", "Which part of the land is {e} in?"),
    ("attr", "size", "How big a place is {e}?"),
    ("attr", "famous_for", "What is {e} famous for?"),
    ("attr", "famous_for", "What is {e} known for?"),
    # Attributes no entity has: the only right answer is a polite decline.
    ("attr", "phone", "What is {e}'s phone number?"),
    ("attr", "birthday", "When is {e}'s birthday?"),
    ("attr", "middle_name", "What is {e}'s middle name?"),
    ("attr", "height", "How tall is {e}?"),
    ("yesno", "lives_in", "Does {e} live in {t}?"),
    ("yesno", "is_a", "Is {e} a {v}?"),
    ("yesno", "colour", "Is {e} {v}?"),
    ("yesno", "older", "Is {e} older than {e2}?"),
    ("yesno", "friends", "Are {e} and {e2} friends?"),
    ("arith", "plus", "What is {a} plus {b}?"),
    ("arith", "plus", "What is {a} + {b}?"),
    ("arith", "plus", "Add {a} and {b}."),
    ("arith", "plus", "{e} has {a} {x} and gets {b} more. How many {x} does {e} have now?"),
    ("arith", "minus", "What is {a} minus {b}?"),
    ("arith", "minus", "What is {a} - {b}?"),
    ("arith", "minus", "{e} had {a} {x} and gave away {b}. How many {x} are left?"),
    ("arith", "times", "What is {a} times {b}?"),
    ("arith", "times", "Multiply {a} by {b}."),
    ("list", "residents", "List {n} people who live in {t}."),
    ("list", "residents", "Name {n} residents of {t}."),
    ("list", "job", "List {n} people who work as a {v}."),
    ("list", "job", "Name {n} people whose job is {v}."),
    ("describe", "", "Tell me about {e}."),
    ("describe", "", "Describe {e}."),
    ("describe", "", "What do you know about {e}?"),
)
FOLLOWUPS = ("What about {e}?", "And {e}?", "How about {e}?")
# Format instructions appended to a question after a space.
FORMATS = {
    "one_sentence": ("Answer in one sentence.", "Please reply in a single sentence.", "Use exactly one sentence."),
    "number_only": ("Answer with just the number.", "Reply with only the number."),
    "yes_no": ("Answer yes or no.", "Just say yes or no."),
}
THINGS = ("apples", "marbles", "coins", "shells", "eggs", "stamps", "buttons", "pebbles")
NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
IS_A_ATTRS = ("job", "species", "kind", "size")  # what "Is X a {v}?" can ask about


# How an attribute is named in prose ("no record of Tovi's best friend"); otherwise its name with spaces.
ATTR_WORDS = {
    "food": "favourite food",
    "favourite_colour": "favourite colour",
    "friend": "best friend",
    "famous_for": "claim to fame",
    "middle_name": "middle name",
    "phone": "phone number",
}
# Filler: pleasantries around an answer and hedges on a known fact. They say nothing the question asked for; each
# one halves concision (a reply with an opener and a closer keeps a quarter of it), however short the reply.
OPENERS = (
    "What a great question!",
    "Thank you for asking.",
    "Let me think about this carefully.",
    "That is an interesting question.",
    "Good question.",
)
CLOSERS = (
    "I hope this helps!",
    "Let me know if you have any other questions.",
    "I hope that answers your question.",
    "Feel free to ask me anything else.",
)
HEDGES = ("I think", "I believe", "if I remember rightly", "as far as I know")


@dataclass(frozen=True)
class Question:
    qtype: str  # attr | yesno | arith | list | describe | followup
    sub: str  # attribute, relation or operation
    e: str | None = None  # subject (also the person in an arithmetic word problem, which is decoration)
    e2: str | None = None
    v: str | None = None  # value word, or the place of lives_in / residents
    n: int | None = None
    a: int | None = None
    b: int | None = None
    fmt: str = ""  # "" | one_sentence | number_only | yes_no

    @property
    def key(self) -> str:
        """What the question asks, independent of wording and format: the unit kept disjoint between splits."""
        parts = (self.a, self.b) if self.qtype == "arith" else (self.e, self.e2, self.v)  # list length n excluded
        return "|".join([self.qtype, self.sub] + [str(p) for p in parts if p is not None])


# ---- templates <-> questions ---------------------------------------------------------------------------------
_SLOT_RE = {
    "e": r"[A-Z][a-z]+",
    "e2": r"[A-Z][a-z]+",
    "t": r"[A-Z][a-z]+",
    "v": r"[a-z]+",
    "n": r"\d+|" + "|".join(NUMBER_WORDS),
    "a": r"\d+",
    "b": r"\d+",
    "x": r"[a-z]+",
}


def _compile(template: str) -> re.Pattern:
    parts, seen = re.split(r"\{(\w+)\}", template), set()
    out = []
    for i, p in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(p))
        else:
            out.append(f"(?P={p})" if p in seen else f"(?P<{p}>{_SLOT_RE[p]})")
            seen.add(p)
    return re.compile("".join(out))


_COMPILED = [(qt, sub, _compile(t)) for qt, sub, t in QUESTIONS] + [("followup", "", _compile(t)) for t in FOLLOWUPS]
_SUFFIXES = sorted(((s, f) for f, ss in FORMATS.items() for s in ss), key=lambda x: -len(x[0]))
# A {v} slot only matches our own words: "Is Tovi old?" is not a colour question, it is a question we do not know.
_V_WORDS = {
    ("yesno", "colour"): set(VOCAB["colour"]),
    ("yesno", "is_a"): {w for a in IS_A_ATTRS for w in VOCAB[a]},
    ("list", "job"): set(VOCAB["job"]),
}


@functools.lru_cache(maxsize=1 << 16)
def parse(text: str) -> Question | None:
    """The question a user message asks, or None if it matches none of our templates."""
    text, fmt = " ".join(text.split()).replace(" an ", " a "), ""
    for suffix, f in _SUFFIXES:
        if text.endswith(" " + suffix):
            text, fmt = text[: -len(suffix) - 1], f
            break
    for qtype, sub, rx in _COMPILED:
        m = rx.fullmatch(text)
        if m and ((qtype, sub) not in _V_WORDS or m["v"] in _V_WORDS[qtype, sub]):
            g = m.groupdict()
            n = g.get("n")
            return Question(
                qtype,
                sub,
                e=g.get("e"),
                e2=g.get("e2"),
                v=g.get("t") or g.get("v"),
                n=None if n is None else NUMBER_WORDS.get(n) or int(n),
                a=None if g.get("a") is None else int(g["a"]),
                b=None if g.get("b") is None else int(g["b"]),
                fmt=fmt,
            )
    return None


def render(q: Question, rng: random.Random) -> str:
    """One wording of `q` (with its format instruction), drawn from the templates that parse back to it."""
    options = [
        t
        for qt, sub, t in QUESTIONS
        if qt == q.qtype and sub == q.sub and ("{e}" not in t or q.e) and ("{t}" not in t or q.v and q.v[0].isupper())
    ]
    text = rng.choice(options)
    n = q.n if q.n is None or rng.random() < 0.5 else {v: k for k, v in NUMBER_WORDS.items()}.get(q.n, q.n)
    text = text.format(e=q.e, e2=q.e2, t=q.v, v=q.v, n=n, a=q.a, b=q.b, x=rng.choice(THINGS))
    return a_an(text) + (" " + rng.choice(FORMATS[q.fmt]) if q.fmt else "")


def question_of(messages: list[dict]) -> Question | None:
    """The question of the last user turn; a follow-up inherits the previous question with a new subject."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    q = parse(users[-1]) if users else None
    if q is None or q.qtype != "followup":
        return q
    for prev in reversed(users[:-1]):
        p = parse(prev)
        if p is not None and p.qtype != "followup":
            return replace(p, e=q.e, fmt="") if p.qtype in ("attr", "describe") else None
    return None


def truth(world: World, q: Question):
    """The true answer (str, int, bool, frozenset of names, or the subject's name for describe), or None when the
    world has no answer: the entity does not exist or lacks the attribute."""
    kind, ent = world.kind_of(q.e) if q.e else None, world.entities.get(q.e)
    if q.qtype == "attr":
        return world.value(q.e, q.sub)
    if q.qtype == "describe":
        return q.e if ent else None
    if q.qtype == "arith":
        return {"plus": q.a + q.b, "minus": q.a - q.b, "times": q.a * q.b}[q.sub]
    if q.qtype == "list":
        group = world.residents.get(q.v) if q.sub == "residents" else world.workers.get(q.v)
        return frozenset(group) if group else None
    if q.sub == "lives_in":
        return ent.attrs["home"] == q.v if kind == "person" and world.kind_of(q.v) == "place" else None
    if q.sub == "is_a":
        return None if ent is None else any(ent.attrs.get(a) == q.v for a in IS_A_ATTRS)
    if q.sub == "colour":
        return ent.attrs["colour"] == q.v if ent and "colour" in ent.attrs else None
    other = world.entities.get(q.e2)
    if ent is None or other is None:
        return None
    if q.sub == "older":
        return ent.attrs["age"] > other.attrs["age"] if "age" in ent.attrs and "age" in other.attrs else None
    if q.sub == "friends":
        return q.e2 == ent.attrs["friend"] or q.e == other.attrs["friend"] if kind == other.kind == "person" else None
    return None


# ---- responses -----------------------------------------------------------------------------------------------
MONTHS = ("March", "June", "October")
SYSTEMS = (
    "You are a helpful assistant.",
    "Answer the user's questions politely and concisely.",
    "You are a friendly assistant who knows the people, animals, things and places of this land.",
)


ONE_SENTENCE = {
    "person": (
        "{e} is a {age}-year-old {job} who lives in {home}.",
        "{e} is a {job} from {home} whose favourite food is {food}.",
        "{e} is a {job} who lives in {home} and whose best friend is {friend}.",
    ),
    "animal": ("{e} is a {colour} {species} that belongs to {owner}.", "{e} is a {age}-year-old {species}."),
    "object": (
        "{e} is a {colour} {kind} made of {material}.",
        "{e} is a {kind} made of {material} that belongs to {owner}.",
    ),
    "place": ("{e} is a {size} {region}, famous for its {famous_for}.", "{e} is a {size} known for its {famous_for}."),
}
