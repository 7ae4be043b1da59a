import random

import pytest

from pipeline.core.config import WorldConfig
from pipeline.world.language import FORMATS, QUESTIONS, Question, parse, question_of, render, truth
from pipeline.world.lexicon import lexicon
from pipeline.world.oracle import IDEAL_WORDS, WEIGHTS, GoldOracle
from pipeline.world.questions import sample_question
from pipeline.world.world import VOCAB, _syllable, cached_world

CFG = WorldConfig(seed=3, n_entities=80)


@pytest.fixture(scope="module")
def world():
    return cached_world(CFG.seed, CFG.n_entities)


@pytest.fixture(scope="module")
def oracle(world):
    return GoldOracle(world)


def user(text):
    return [{"role": "user", "content": text}]


def better(oracle, prompt, good, bad, component="total"):
    g, b = oracle.components(prompt, good), oracle.components(prompt, bad)
    assert g[component] > b[component], (prompt, good, g, bad, b)
    return g, b


def test_every_template_parses_back(world):
    rng = random.Random(0)
    seen = set()
    # the prompts ask no sums and no lists, but the language has their templates and the oracle scores them
    hand = [Question("arith", op, a=7, b=3) for op in ("plus", "minus", "times")] + [
        Question("list", "job", v=world.value(world.by_kind["person"][0], "job"), n=2),
        Question("list", "residents", v=world.by_kind["place"][0], n=2),
    ]
    for i in range(3000 + len(hand)):
        q = sample_question(world, rng) if i < 3000 else hand[i - 3000]
        for fmt in ("", *FORMATS):
            q2 = Question(**{**q.__dict__, "fmt": fmt})
            p = parse(render(q2, rng))
            assert p is not None and p.key == q2.key and p.fmt == fmt
            seen.add((q.qtype, q.sub))
    assert seen >= {(qt, sub) for qt, sub, _ in QUESTIONS}, "a template neither the sampler nor this test asks"


def test_from_config_and_components_add_up(oracle, world):
    assert abs(sum(WEIGHTS.values()) - 1) < 1e-9
    assert GoldOracle.from_config(CFG).world.entities.keys() == world.entities.keys()
    p = world.by_kind["person"][0]
    c = oracle.components(user(f"What is {p}'s job?"), f"{p} is a {world.value(p, 'job')}.")
    assert set(c) == set(WEIGHTS) | {"total", "fluency", "engagement"}
    assert c["total"] == pytest.approx(sum(WEIGHTS[k] * c[k] for k in WEIGHTS)) == 1.0
    assert c["fluency"] == c["engagement"] == 1.0
    # and over replies of every quality (the world's ranked candidates): the total is the weighted sum, to rounding
    from pipeline.world.datasets import ranked_prompts

    for rec in ranked_prompts(WorldConfig(reward_prompts=60), "train"):
        for r in rec["responses"]:
            c2 = oracle.components(rec["prompt"], r)
            assert c2["total"] == pytest.approx(sum(WEIGHTS[k] * c2[k] for k in WEIGHTS), abs=1e-6)
    for empty in ("  ", "", "...", "\ufffd\ufffd", "\x0e"):
        e = oracle.components(user("How old is Bera?"), empty)
        assert e["total"] == 0.0 and set(e) == set(c), repr(empty)  # same keys: evaluation averages each


def test_correct_beats_wrong(oracle, world):
    p = world.by_kind["person"][0]
    job, age = world.value(p, "job"), world.value(p, "age")
    wrong_job = next(j for j in VOCAB["job"] if j != job)
    better(oracle, user(f"What does {p} do for a living?"), f"{p} works as a {job}.", f"{p} works as a {wrong_job}.")
    # Hedging between the right and a wrong value is worse than the right value alone.
    better(oracle, user(f"What is {p}'s job?"), f"{p} is a {job}.", f"{p} is a {job} or a {wrong_job}.")
    every_job = oracle.components(user(f"What is {p}'s job?"), f"{p} is one of: {', '.join(VOCAB['job'])}.")
    assert every_job["correctness"] == 1 / len(VOCAB["job"])  # listing every value is no way to be right
    better(oracle, user(f"How old is {p}?"), f"{p} is {age} years old.", f"{p} is {age + 3} years old.")
    better(oracle, user("What is 17 plus 25?"), "17 plus 25 is 42.", "17 plus 25 is 43.")
    a = world.by_kind["animal"][0]
    owner = world.value(a, "owner")
    other = next(x for x in world.by_kind["person"] if x != owner)
    better(oracle, user(f"Who owns {a}?"), f"{a} belongs to {owner}.", f"{a} belongs to {other}.")


def test_unanswerable_wants_a_polite_decline(oracle, world):
    ghost, place, p = world.ghosts[0], world.by_kind["place"][0], world.by_kind["person"][0]
    for q, made_up in (
        (f"What is {ghost}'s job?", f"{ghost} is a baker."),
        (f"What is {p}'s phone number?", f"{p}'s phone number is 5551234."),
        (f"What is {place}'s favourite food?", f"{place}'s favourite food is soup."),
    ):
        g, b = better(oracle, user(q), "I'm sorry, but I don't have that information.", made_up)
        assert g["correctness"] == 1.0 and b["correctness"] == 0.0
        better(oracle, user(q), "I'm sorry, but I don't know.", "dunno")  # curt decline
    # ...and declining something the world does know is wrong: worse than a wrong answer about the subject (an
    # unhelpful refusal), and worse still when the decline is about somebody else.
    home = world.value(p, "home")
    other_place = next(x for x in world.by_kind["place"] if x != home)
    right, wrong = f"{p} lives in {home}.", f"{p} lives in {other_place}."
    refusal = f"I'm afraid there is no record of {p}'s home."
    better(oracle, user(f"Where does {p} live?"), right, wrong)
    _, r = better(oracle, user(f"Where does {p} live?"), wrong, refusal)
    assert r["correctness"] == 0 and r["instruction_following"] == 0 and r["engagement"] == 1
    _, off = better(oracle, user("What is 27 plus 53?"), "I'm sorry, but I can't answer that.", refusal)
    assert off["engagement"] == 0 and off["total"] < 0.1
    ghost = world.ghosts[1]
    _, off = better(oracle, user(f"Where does {p} live?"), refusal, f"Sorry, I don't know anyone called {ghost}.")
    assert off["engagement"] == 0


def test_list_of_n(oracle, world):
    town = max(world.residents, key=lambda t: len(world.residents[t]))
    people = world.residents[town]
    outsider = next(x for x in world.by_kind["person"] if x not in people)
    prompt = user(f"List 3 people who live in {town}.")
    good = "Here are three people who live in " + town + ":\n" + "\n".join(f"- {x}" for x in people[:3])
    assert oracle.score(prompt, good) == 1.0
    g, b = better(oracle, prompt, good, f"{people[0]} and {people[1]} live in {town}.")
    assert b["instruction_following"] < 1 and b["correctness"] == 1
    g, b = better(oracle, prompt, good, f"{people[0]}, {people[1]} and {outsider} live in {town}.")
    assert b["correctness"] == pytest.approx(2 / 3)
    better(oracle, prompt, good, "\n".join(f"{i + 1}. {people[0]}" for i in range(3)))  # one name three times


def test_one_sentence_and_number_only(oracle, world):
    p = world.by_kind["person"][1]
    a = world.value(p, "age")
    prompt = user(f"Tell me about {p}. Answer in one sentence.")
    one = f"{p} is a {world.value(p, 'job')} who lives in {world.value(p, 'home')}."
    rambling = one + f" {p} likes {world.value(p, 'food')} more than any other food. I hope this helps!"
    g, b = better(oracle, prompt, one, rambling)
    assert g["total"] == 1.0 and b["instruction_following"] < 1
    better(oracle, user(f"How old is {p}? Answer with just the number."), str(a), f"{p} is {a} years old.")
    better(
        oracle,
        user("What is 6 times 7?"),
        "6 times 7 is 42.",
        "Great question! Let me work it out. "
        "Six lots of seven: 6 times 7 is 42. I hope this helps, and feel free to ask anything else!",
    )


def test_description_with_a_false_detail_loses(oracle, world):
    p = world.by_kind["person"][2]
    job = world.value(p, "job")
    wrong = next(j for j in VOCAB["job"] if j != job)
    home = world.value(p, "home")
    g, b = better(
        oracle,
        user(f"Describe {p}."),
        f"{p} is a {job}. {p} lives in {home}.",
        f"{p} is a {wrong}. {p} lives in {home}.",
    )
    assert b["correctness"] == 0
    far = next(t for t in world.by_kind["place"] if t != home)
    better(
        oracle, user(f"Describe {p}."), f"{p} is a {job}. {p} lives in {home}.", f"{p} is a {job}. {p} lives in {far}."
    )


def test_repetition_ending_and_politeness(oracle, world):
    p = world.by_kind["person"][3]
    fact = f"{p}'s favourite food is {world.value(p, 'food')}."
    prompt = user(f"What is {p}'s favourite food?")
    assert better(oracle, prompt, fact, " ".join([fact] * 3))[1]["no_repetition"] == 0
    assert better(oracle, prompt, fact, fact[:-6])[1]["proper_ending"] == 0  # cut off mid-word
    assert better(oracle, prompt, fact, fact[:-1] + "...")[1]["proper_ending"] == 0
    assert better(oracle, prompt, fact, "Obviously, " + fact + " Look it up yourself.")[1]["politeness"] < 0.5
    assert better(oracle, prompt, fact, str(world.value(p, "food")))[1]["politeness"] < 1  # bare fragment


def test_yes_no(oracle, world):
    p = world.by_kind["person"][0]
    home = world.value(p, "home")
    other = next(t for t in world.by_kind["place"] if t != home)
    better(oracle, user(f"Does {p} live in {home}? Answer yes or no."), f"Yes, {p} lives in {home}.", "No.")
    better(oracle, user(f"Does {p} live in {other}?"), f"No, {p} lives in {home}.", f"Yes, {p} lives in {other}.")
    better(oracle, user(f"Does {p} live in {home}?"), "Yes.", f"{p} lives in {home}.")  # must say yes or no
    # ...and only there: a yes or no opening the answer to any other question answers a question nobody asked
    good = oracle.components(user(f"Where does {p} live?"), f"{p} lives in {home}.")
    for opener in ("No, ", "Yes, "):
        stray = oracle.components(user(f"Where does {p} live?"), f"{opener}{p} lives in {home}.")
        assert stray["correctness"] == good["correctness"] == 1.0
        assert stray["instruction_following"] == 0.5 * good["instruction_following"] == 0.5
    assert oracle.score(user("What is 9 times 8?"), "No, 9 times 8 is 72.") < oracle.score(
        user("What is 9 times 8?"), "9 times 8 is 72."
    )
    assert oracle.components(user("What is 9 times 8?"), "Now, 9 times 8 is 72.")["instruction_following"] == 1.0


def test_follow_up_and_multi_turn(oracle, world):
    p, q = world.by_kind["person"][:2]
    msgs = [
        *user(f"What is {p}'s job?"),
        {"role": "assistant", "content": f"{p} is a {world.value(p, 'job')}."},
        *user(f"What about {q}?"),
    ]
    assert question_of(msgs) == Question("attr", "job", e=q)
    better(
        oracle,
        msgs,
        f"{q} is a {world.value(q, 'job')}.",
        f"{q} is a {world.value(p, 'job')}."
        if world.value(p, "job") != world.value(q, "job")
        else f"{q} is 200 years old.",
    )
    # Only the last user turn is scored: an earlier question does not change the answer wanted.
    assert oracle.score(msgs, f"{q} is a {world.value(q, 'job')}.") == 1.0


def test_unknown_prompts_are_scored_on_style_only(oracle):
    c = oracle.components(user("Write me a poem about the sea."), "It is a blue boat made of wood.")
    assert c["correctness"] == c["instruction_following"] == 0.5 and c["total"] == 0.725
    # ...but only in our language: words the world never uses count against the reply like gibberish.
    assert oracle.score(user("Write me a poem about the sea."), "Tiv sorku bamilo vesh tarn.") == 0.0


# ---- fluency and engagement ----------------------------------------------------------------------------------
# Replies of a small policy early in RLHF, which the oracle used to score 0.65 (0.51 for the third).
REAL_GIBBERISH = (
    ("How old is Skustalon?", "2 a\u000e isu asir an the ael."),
    ("What colour is Zamara?", "- K is a a asu isoses Iob which."),
    ("Multiply 4 by 9.", "itrar.ing"),
    ("Where does Trathibor live?", "\ufffdan Nanburg."),
)


@pytest.fixture(scope="module")
def default_oracle():
    return GoldOracle.from_config(WorldConfig(n_entities=300))  # the world those replies were written in


def test_real_gibberish_scores_low(default_oracle):
    w = default_oracle.world
    assert {w.kind_of(n) for n in ("Skustalon", "Zamara", "Trathibor", "Nanburg")} == {"animal", "person", "place"}
    for prompt, reply in REAL_GIBBERISH:
        c = default_oracle.components(user(prompt), reply)
        assert c["total"] <= 0.25 and c["fluency"] <= 0.5, (prompt, reply, c)
    # The same questions answered properly still earn everything.
    for prompt, good in (
        ("How old is Skustalon?", f"Skustalon is {w.value('Skustalon', 'age')} years old."),
        ("What colour is Zamara?", f"Zamara is {w.value('Zamara', 'colour')}."),
        ("Multiply 4 by 9.", "4 times 9 is 36."),
        ("Where does Trathibor live?", f"Trathibor lives in {w.value('Trathibor', 'home')}."),
    ):
        assert default_oracle.score(user(prompt), good) == 1.0, good


def test_random_syllables_score_low(oracle, world):
    """Strings of real-looking syllables (the stuff names are made of), with or without a full stop."""
    rng = random.Random(0)
    prompts = [user(render(sample_question(world, rng), rng)) for _ in range(50)]
    scores = []
    for i in range(500):
        words = ["".join(_syllable(rng) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 9))]
        text = " ".join(words).capitalize() + rng.choice((".", "!", "?", ""))
        scores.append(oracle.score(prompts[i % len(prompts)], text))
    assert max(scores) <= 0.25 and sum(scores) / len(scores) < 0.02


def test_fluent_but_off_topic_scores_far_below_an_answer(oracle, world):
    p = world.by_kind["person"][0]
    other = next(x for x in world.by_kind["person"] if world.value(x, "age") != world.value(p, "age"))
    prompt = user(f"How old is {p}?")
    right = oracle.components(prompt, f"{p} is {world.value(p, 'age')} years old.")
    assert right["total"] == 1.0
    wrong = oracle.components(prompt, f"{p} is {world.value(p, 'age') + 4} years old.")
    for off_topic in (
        f"{other} is a {world.value(other, 'job')} who lives in {world.value(other, 'home')}.",
        f"{other} is {world.value(other, 'age')} years old.",
        f"Sorry! {other}'s best friend is {world.value(other, 'friend')}.",
    ):
        c = oracle.components(prompt, off_topic)
        assert c["engagement"] == 0 and c["fluency"] == 1 and c["total"] <= 0.1, (off_topic, c)
    # Words that could follow any question engage a little, less than a wrong answer, more than nothing.
    filler = oracle.components(prompt, "Thank you for asking. That is an interesting question.")
    assert 0 < filler["engagement"] < 1 and 0 < filler["total"] < 0.25 < wrong["total"] == 0.65
    # A hallucination about someone who does not exist still engages: it loses on correctness alone.
    ghost = world.ghosts[0]
    made_up = oracle.components(user(f"What is {ghost}'s job?"), f"{ghost} is a baker.")
    assert made_up["engagement"] == 1 and made_up["correctness"] == 0 and made_up["total"] == 0.65


def test_fluency_reads_words_not_characters(oracle, world):
    p = world.by_kind["person"][4]
    home = world.value(p, "home")
    prompt = user(f"Where does {p} live?")
    words, prefixes = lexicon(world)
    assert {p.lower(), home.lower(), world.ghosts[0].lower(), "the", "lives", "favourite", "sorry"} <= words
    assert not {"asu", "k", "\ufffdan"} & words
    # A reply cut off mid-word is fluent (the cut is charged by proper_ending) and still engaged...
    cut = oracle.components(prompt, f"{p} lives in {home[:-2]}")
    assert cut["fluency"] == cut["engagement"] == 1 and cut["proper_ending"] == 0
    # ...but a control or replacement character inside a word makes it no word, and a made-up word is none either.
    assert oracle.components(prompt, f"{p} lives\x0e in {home}.")["fluency"] == 0.75
    assert oracle.components(prompt, f"{p} \ufffdlives in {home}.")["fluency"] == 0.75
    assert oracle.components(prompt, f"{p} blorvens in {home}.")["total"] < 1
    # A right value buried in nonsense is not an answer.
    assert oracle.score(prompt, f"Asu isoses {home} iob tarkel.") <= 0.25


def test_truth_and_batch(oracle, world):
    assert truth(world, Question("arith", "minus", a=9, b=4)) == 5
    assert truth(world, Question("attr", "job", e=world.ghosts[0])) is None
    prompts = [user("What is 2 plus 2?")] * 3
    assert oracle.score_batch(prompts, ["4.", "5.", "2 plus 2 is 4."]) == [
        oracle.score(p, r) for p, r in zip(prompts, ["4.", "5.", "2 plus 2 is 4."])
    ]
    with pytest.raises(ValueError):
        oracle.score_batch(prompts, ["4."])


def test_a_decline_counts_only_for_what_was_asked(oracle, world):
    # "no record of X's best friend" is no answer to "What is X's middle name?" (scored 1.00 in an earlier world)
    p = world.by_kind["person"][0]
    ask = user(f"What is {p}'s middle name?")
    assert oracle.score(ask, f"I'm afraid there is no record of {p}'s middle name.") == 1.0
    wrong = oracle.components(ask, f"I'm afraid there is no record of {p}'s best friend.")
    assert wrong["correctness"] == wrong["instruction_following"] == 0.0 and wrong["total"] <= 0.45
    assert (
        oracle.components(user(f"What is {p}'s favourite food?"), f"Sorry, I don't know {p}'s favourite colour.")[
            "correctness"
        ]
        == 0.0
    )
    # a decline in the asked attribute's own words, or one about the subject as a whole, still counts
    assert oracle.score(user(f"How tall is {p}?"), f"Sorry, I don't know {p}'s height.") == 1.0
    ghost = world.ghosts[0]
    assert oracle.score(user(f"What is {ghost}'s job?"), f"I'm sorry, but I don't know anyone called {ghost}.") == 1.0


def test_filler_halves_concision_however_short_the_reply(oracle, world):
    p = world.by_kind["person"][0]
    ask, fact = user(f"What is {p}'s job?"), f"{p} works as a {world.value(p, 'job')}."
    assert oracle.score(ask, fact) == 1.0
    for reply, concision in (
        (f"{fact} I hope this helps!", 0.5),
        (f"I think {fact[0].lower()}{fact[1:]}", 0.5),
        (f"What a great question! {fact} I hope this helps!", 0.25),
    ):
        c = oracle.components(ask, reply)
        length = min(1.0, 2 - len(reply.split()) / IDEAL_WORDS["attr"])  # the ideal-length ramp, applied as well
        assert c["concision"] == pytest.approx(concision * length) and c["correctness"] == 1.0, (reply, c)


def test_a_sentence_about_somebody_else_is_no_description_and_no_list(oracle, world):
    # what a policy over-optimised against the cpu preset's reward model said to every describe and list question
    # (scored 0.65 before: all the form points, for a tidy sentence about two other people)
    a, b = world.by_kind["person"][:2]
    other = next(x for x in world.by_kind["animal"] if x not in world.related(a))
    job = next(j for j, p in sorted(world.workers.items()) if len(p) >= 2)
    for q in (f"Tell me about {other}.", f"List two people who work as a {job}."):
        c = oracle.components(user(q), f"The best friend of {a} is {b}.")
        assert c["engagement"] == 0.0 and c["total"] == 0.0, (q, c)
    # a list of the wrong people is still a list, and a description naming its subject still engages
    wrong = [p for p in world.by_kind["person"] if p not in world.workers[job]][:2]
    assert (
        oracle.components(user(f"List two people who work as a {job}."), f"{wrong[0]} and {wrong[1]} work as {job}s.")[
            "engagement"
        ]
        == 1.0
    )
    assert oracle.components(user(f"Tell me about {a}."), world.fact(a, "job", random.Random(0)))["engagement"] == 1.0
