"""The pretraining corpus: plain-English documents about the world (profiles, place notes, stories, letters,
question-and-answer prose), each kind at its share of the corpus (`DOC_KINDS`).
"""

from __future__ import annotations

import random

from pipeline.world.language import render
from pipeline.world.questions import weighted_pick, question_in_pool
from pipeline.world.responses import join_names, respond
from pipeline.world.world import World, cached_world, a_an, as_world_config


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
    who = (
        f"Nobody lives in {t} any more."
        if not people
        else rng.choice((f"The people who live in {t} are {join_names(people)}.", f"{join_names(people)} live in {t}."))
    )
    return " ".join(world.facts(t, rng) + [who])


def _doc_story(world: World, rng: random.Random, seed: int) -> str:
    p = rng.choice(world.by_kind["person"])
    a, f = world.entities[p].attrs, world.value(p, "friend")
    fh = world.value(f, "home")
    s = [
        rng.choice(
            (f"One morning, {p} woke up early in {a['home']}.", f"It was a quiet day in {a['home']}, where {p} lives.")
        ),
        rng.choice(
            (
                f"{p} works as a {a['job']}, and the work went well that day.",
                f"After a long day of work as a {a['job']}, {p} was hungry.",
            )
        ),
        f"For lunch {p} ate {a['food']}, which is {p}'s favourite food.",
    ]
    for o in world.possessions[p][:2]:
        oa = world.entities[o].attrs
        s.append(
            f"{o} the {oa['species']} came along too."
            if "species" in oa
            else f"{p} brought {o}, a {oa['colour']} {oa['kind']} made of {oa['material']}."
        )
    s.append(
        f"Later {p} visited {f}, {p}'s best friend, who "
        + (f"also lives in {fh}." if fh == a["home"] else f"lives in {fh}.")
    )
    s.append(rng.choice((f"In the evening {p} went home to {a['home']}.", "It was a good day.")))
    return " ".join(s)


def _doc_letter(world: World, rng: random.Random, seed: int) -> str:
    p = rng.choice(world.by_kind["person"])
    a = world.entities[p].attrs
    return (
        f"Dear {a['friend']},\nGreetings from {a['home']}! I am still working as a {a['job']}, and I still eat "
        f"{a['food']} whenever I can. "
        + rng.choice(("I hope you are well.", "Write back soon."))
        + f"\nYour best friend, {p}"
    )


def _doc_qa(world: World, rng: random.Random, seed: int) -> str:
    qs, ans = rng.choice((("Q: ", "A: "), ("Question: ", "Answer: "), ("User: ", "Assistant: ")))
    pairs = []
    for _ in range(rng.randint(2, 5)):
        q = question_in_pool(world, rng, "sft", seed)
        pairs.append(f"{qs}{render(q, rng)}\n{ans}{respond(world, q, rng)}")
    return "\n\n".join(pairs)


DOC_KINDS = ((_doc_profile, 0.35), (_doc_place, 0.08), (_doc_story, 0.18), (_doc_letter, 0.06), (_doc_qa, 0.33))


def corpus_documents(world_cfg) -> list[str]:
    cfg = as_world_config(world_cfg)
    world, rng = cached_world(cfg.seed, cfg.n_entities), random.Random(f"{cfg.seed}:corpus")
    return [a_an(weighted_pick(rng, DOC_KINDS)(world, rng, cfg.seed)) for _ in range(cfg.corpus_docs)]
