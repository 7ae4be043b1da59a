"""A small seeded world whose facts are known exactly, so every stage can be scored against the truth.

`World.generate(seed, n_entities)` makes a few hundred entities of four kinds:

    person  job, age, food (favourite), favourite_colour, home (a place), friend (a person)
    animal  species, colour, age, owner (a person)
    object  kind, colour, material, owner (a person)
    place   region, size, famous_for

Every name is built from syllables by a `random.Random(seed)`; nothing is copied from real data. Vocabularies are
disjoint across attributes (no colour is also a food), which is what lets the oracle read a claim in free text as a
claim about one attribute. `World.fact` renders one fact as an English sentence; the corpus, the demonstrations and
the good candidate answers all use it, so what the model reads and what the oracle checks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from dataclasses import dataclass, field

from pipeline.core.config import WorldConfig

KINDS = ("person", "animal", "object", "place")

VOCAB: dict[str, tuple[str, ...]] = {
    "job": (
        "baker",
        "teacher",
        "farmer",
        "potter",
        "sailor",
        "doctor",
        "weaver",
        "painter",
        "carpenter",
        "fisher",
        "miller",
        "gardener",
        "tailor",
        "smith",
        "singer",
        "builder",
        "nurse",
        "clerk",
        "cook",
        "guard",
    ),
    "food": (
        "bread",
        "plums",
        "soup",
        "rice",
        "apples",
        "noodles",
        "pears",
        "cherries",
        "carrots",
        "porridge",
        "dumplings",
        "figs",
        "lentils",
        "pancakes",
        "olives",
        "mushrooms",
        "beans",
        "walnuts",
    ),
    "colour": ("red", "blue", "green", "yellow", "purple", "grey", "white", "black", "brown", "pink"),
    "species": (
        "cat",
        "dog",
        "rabbit",
        "goat",
        "parrot",
        "tortoise",
        "hedgehog",
        "ferret",
        "owl",
        "duck",
        "pony",
        "donkey",
        "goose",
        "lizard",
    ),
    "kind": (
        "lamp",
        "clock",
        "kite",
        "drum",
        "bicycle",
        "boat",
        "chair",
        "flute",
        "teapot",
        "umbrella",
        "wagon",
        "bell",
        "mirror",
        "compass",
        "basket",
    ),
    "material": ("wood", "iron", "brass", "stone", "clay", "silver", "copper", "bone"),
    "region": ("north", "south", "east", "west", "coast", "hills", "valley", "marshes"),
    "size": ("hamlet", "village", "town", "city"),
    "famous_for": ("pottery", "lace", "honey", "cider", "wool", "cheese", "bridges", "gardens", "lanterns", "music"),
}

# kind -> attribute -> value type: a VOCAB key, "int", or the entity kind a relation points to.
SCHEMA: dict[str, dict[str, str]] = {
    "person": {
        "job": "job",
        "age": "int",
        "food": "food",
        "favourite_colour": "colour",
        "home": "place",
        "friend": "person",
    },
    "animal": {"species": "species", "colour": "colour", "age": "int", "owner": "person"},
    "object": {"kind": "kind", "colour": "colour", "material": "material", "owner": "person"},
    "place": {"region": "region", "size": "size", "famous_for": "famous_for"},
}
AGE_RANGE = {"person": (18, 90), "animal": (1, 20)}

# One fact as a sentence. {e}: the entity, {v}: the value (already phrased, see `phrase`).
FACTS: dict[str, tuple[str, ...]] = {
    "job": ("{e} works as a {v}.", "{e} is a {v}.", "{e} earns a living as a {v}."),
    "age": ("{e} is {v} years old.", "{e} is {v}."),
    "food": ("{e}'s favourite food is {v}.", "{e} likes {v} more than any other food."),
    "favourite_colour": ("{e}'s favourite colour is {v}.", "{e} likes {v} best of all colours."),
    "home": ("{e} lives in {v}.", "{e}'s home is in {v}."),
    "friend": ("{e}'s best friend is {v}.", "The best friend of {e} is {v}."),
    "owner": ("{e} belongs to {v}.", "{e} is owned by {v}."),
    "species": ("{e} is a {v}.",),
    "colour": ("{e} is {v}.", "The colour of {e} is {v}."),
    "kind": ("{e} is a {v}.",),
    "material": ("{e} is made of {v}.",),
    "region": ("{e} lies {v}.", "{e} is {v}."),
    "size": ("{e} is a {v}.",),
    "famous_for": ("{e} is famous for its {v}.", "{e} is known for its {v}."),
}
REGION_PHRASE = {
    "coast": "on the coast",
    "hills": "in the hills",
    "valley": "in the valley",
    "marshes": "in the marshes",
}

# Names: one or two syllables, then a consonant and an ending that is never a bare "e" (people, animals, objects) or
# a place suffix; this keeps them from spelling the English words our sentences start with (also _RESERVED).
_ONSETS = "b d f g h k l m n p r s t v z".split() * 4 + "br dr gr kr tr st sk th".split()
_VOWELS = "a e i o u a o".split()
_CODAS = [""] * 10 + ["n", "r", "l", "s", "m"]
_ENDINGS = "a o i u an on in ar or el is".split()
_PLACE_SUFFIX = "ford by mere wick ton holm dale stead burg haven".split()
_RESERVED = {w for words in VOCAB.values() for w in words} | set(
    "here sure sorry yes no the what how who where which when tell list name add multiply describe does are is "
    "and one once later after that then look let dear some none more made take home note rose hello thanks mama papa "
    "sofa soda data tuna solo memo drama".split()
)


_AN = re.compile(r"\ba (?=[aeiou]|8|11\b|18\b)")


def a_an(text: str) -> str:
    """English indefinite article: "a owl" -> "an owl", "a 8-year-old" -> "an 8-year-old"."""
    return _AN.sub("an ", text)


def phrase(attr: str, value) -> str:
    """A value as it reads inside a sentence ("north" -> "in the north")."""
    if attr == "region":
        return REGION_PHRASE.get(value, f"in the {value}")
    return str(value)


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    attrs: dict = field(hash=False)


@dataclass
class World:
    seed: int
    entities: dict[str, Entity]
    ghosts: tuple[str, ...]  # plausible names that are NOT in the world: subjects of unanswerable questions

    def __post_init__(self):
        self.by_kind = {k: [n for n, e in self.entities.items() if e.kind == k] for k in KINDS}
        self.residents = {p: [] for p in self.by_kind["place"]}
        self.workers = {j: [] for j in VOCAB["job"]}
        self.possessions = {p: [] for p in self.by_kind["person"]}
        for n in self.by_kind["person"]:
            self.residents[self.entities[n].attrs["home"]].append(n)
            self.workers[self.entities[n].attrs["job"]].append(n)
        for k in ("animal", "object"):
            for n in self.by_kind[k]:
                self.possessions[self.entities[n].attrs["owner"]].append(n)

    @classmethod
    def generate(cls, seed: int, n_entities: int) -> "World":
        if n_entities < 20:
            raise ValueError(f"n_entities={n_entities}: the world needs at least 20 entities")
        rng = random.Random(f"world:{seed}")
        n_place = max(3, n_entities // 12)
        n_person = n_entities // 2
        n_animal = (n_entities - n_place - n_person) // 2
        n_object = n_entities - n_place - n_person - n_animal
        taken: set[str] = set()

        def new_name(kind: str) -> str:
            while True:
                stem = "".join(_syllable(rng) for _ in range(rng.randint(1, 2)))
                s = (
                    stem
                    + (rng.choice(_PLACE_SUFFIX) if kind == "place" else rng.choice(_ONSETS) + rng.choice(_ENDINGS))
                ).capitalize()
                if 4 <= len(s) <= 10 and s.lower() not in _RESERVED and s not in taken:
                    taken.add(s)
                    return s

        names = {
            k: [new_name(k) for _ in range(n)]
            for k, n in (("place", n_place), ("person", n_person), ("animal", n_animal), ("object", n_object))
        }
        people = names["person"]
        # A few big places and many small ones: some lists have many answers, some have few.
        town_weight = [1.0 / (i + 1) ** 0.5 for i in range(n_place)]
        # Best friends in pairs; with an odd count the one left over befriends someone already paired.
        order = rng.sample(people, len(people))
        best = dict(zip(order[0::2], order[1::2])) | dict(zip(order[1::2], order[0::2]))
        best.setdefault(order[-1], order[0])

        def draw(kind: str, attr: str, name: str):
            vtype = SCHEMA[kind][attr]
            if vtype == "int":
                return rng.randint(*AGE_RANGE[kind])
            if attr == "home":
                return rng.choices(names["place"], town_weight)[0]
            if attr == "friend":
                return best[name]
            return rng.choice(people if vtype == "person" else VOCAB[vtype])

        ents = {n: Entity(n, k, {a: draw(k, a, n) for a in SCHEMA[k]}) for k in names for n in names[k]}
        ghosts = tuple(
            new_name(rng.choice(("person", "person", "animal", "place"))) for _ in range(max(20, n_entities // 2))
        )
        return cls(seed, ents, ghosts)

    # ---- reading the world ---------------------------------------------------------------------------------
    def kind_of(self, name: str) -> str | None:
        e = self.entities.get(name)
        return e.kind if e else None

    def value(self, name: str, attr: str):
        """The true value, or None when the entity does not exist or has no such attribute."""
        e = self.entities.get(name)
        return None if e is None else e.attrs.get(attr)

    def related(self, name: str) -> set[str]:
        """Names a description of `name` may mention truthfully: itself, what it points to, what points to it."""
        e = self.entities[name]
        out = {name} | {v for a, v in e.attrs.items() if SCHEMA[e.kind][a] in KINDS}
        if e.kind == "person":
            out |= set(self.possessions[name]) | {
                p for p in self.by_kind["person"] if self.entities[p].attrs["friend"] == name
            }
        elif e.kind == "place":
            out |= set(self.residents[name])
        return out

    def fact(self, name: str, attr: str, rng: random.Random) -> str:
        return a_an(rng.choice(FACTS[attr]).format(e=name, v=phrase(attr, self.value(name, attr))))

    def facts(self, name: str, rng: random.Random) -> list[str]:
        """Every fact about `name`, one sentence each, in a random order."""
        attrs = list(self.entities[name].attrs)
        rng.shuffle(attrs)
        return [self.fact(name, a, rng) for a in attrs]


def as_world_config(cfg) -> WorldConfig:
    """Any object with WorldConfig's attributes (a DictConfig, a dataclass, a namespace) -> WorldConfig."""
    out = WorldConfig(
        **{f.name: type(f.default)(getattr(cfg, f.name, f.default)) for f in dataclasses.fields(WorldConfig)}
    )
    if not 2 <= out.k <= 9:
        raise ValueError(f"world.k={out.k}: must be between 2 and 9")
    return out


@functools.lru_cache(maxsize=4)
def cached_world(seed: int, n_entities: int) -> World:
    return World.generate(seed, n_entities)


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
