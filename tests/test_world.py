import random
from itertools import combinations

import pytest

from pipeline.world.world import KINDS, SCHEMA, VOCAB, World, a_an


@pytest.fixture(scope="module")
def world():
    return World.generate(7, 120)


def test_same_seed_same_world_other_seed_other_world(world):
    again = World.generate(7, 120)
    assert [(e.name, e.kind, e.attrs) for e in world.entities.values()] == [
        (e.name, e.kind, e.attrs) for e in again.entities.values()
    ]
    assert world.ghosts == again.ghosts
    assert set(World.generate(8, 120).entities) != set(world.entities)


def test_sizes_names_and_ghosts(world):
    assert len(world.entities) == 120
    assert all(world.by_kind[k] for k in KINDS)
    names = list(world.entities)
    assert all(n[0].isupper() and n[1:].islower() and n.isalpha() for n in names)
    assert not set(world.ghosts) & set(names), "a ghost must not exist, or 'unanswerable' questions have answers"
    with pytest.raises(ValueError):
        World.generate(1, 5)


def test_relations_point_at_the_right_kinds(world):
    for e in world.entities.values():
        assert set(e.attrs) == set(SCHEMA[e.kind])
        for attr, vtype in SCHEMA[e.kind].items():
            v = e.attrs[attr]
            if vtype in KINDS:
                assert world.kind_of(v) == vtype and v != e.name
            elif vtype != "int":
                assert v in VOCAB[vtype]
    assert sum(map(len, world.residents.values())) == len(world.by_kind["person"])
    assert all(world.value(p, "home") == t for t, people in world.residents.items() for p in people)


def test_vocabularies_are_disjoint():
    # The oracle reads "baker" as a claim about a job; that only works if no word belongs to two attributes.
    for (a, wa), (b, wb) in combinations(VOCAB.items(), 2):
        assert not set(wa) & set(wb), (a, b)


def test_facts_state_the_truth(world):
    rng = random.Random(0)
    p = world.by_kind["person"][0]
    facts = " ".join(world.facts(p, rng))
    for attr in ("job", "food", "home", "friend"):
        assert str(world.value(p, attr)) in facts
    assert (
        a_an("a owl and a cat, a 8-year-old and a 80-year-old, a 11-year-old")
        == "an owl and a cat, an 8-year-old and an 80-year-old, an 11-year-old"
    )
