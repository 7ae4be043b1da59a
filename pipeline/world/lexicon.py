"""The words of the world's language, which the oracle's fluency reads: its names, its vocabulary, function words,
and every word its generators write (read once per world from a fixed sample of what they produce).
"""

from __future__ import annotations

import random
import re

from pipeline.world.corpus import DOC_KINDS
from pipeline.world.language import (
    MONTHS,
    ONE_SENTENCE,
    SYSTEMS,
    ATTR_WORDS,
    CLOSERS,
    FOLLOWUPS,
    FORMATS,
    HEDGES,
    NUMBER_WORDS,
    OPENERS,
    QUESTIONS,
    THINGS,
    render,
)
from pipeline.world.questions import weighted_pick, sample_question
from pipeline.world.responses import STYLES_ANSWERABLE, STYLES_UNANSWERABLE, respond
from pipeline.world.world import REGION_PHRASE, FACTS, VOCAB, World

# ---- fluency: the words of this world's language ----------------------------------------------------------------
# A token is a run of anything but whitespace and punctuation, so a control or replacement character stays inside its
# token and makes it a non-word ("\ufffdan", "a\x0e"); apostrophes count only inside a token ("don't", "Tovi's").
_TOKEN = re.compile(r"[^\s.,!?;:\"'()\[\]{}*/\u2022\u2026-]+(?:'[^\s.,!?;:\"'()\[\]{}*/\u2022\u2026-]+)*")


NUMBER = re.compile(r"\d+(?:st|nd|rd|th|s)?")


FUNCTION_WORDS = frozenset(
    """
a an the this that these those some any no not none all every each both either neither other another such
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs one ones
who whom whose which what when where why how whatever whoever here there
is am are was were be been being do does did done doing has have had having will would shall should can could may
might must ought let lets
and or but nor so yet if then than because as while though although unless until since whether
of in on at to for with without from by about into onto over under after before between through during up down
out off again further once also too very just only even still already never always often sometimes ever quite
more most less least much many few lot lots own same well yes ok okay please thanks thank sorry hello hi
n't don't doesn't didn't isn't aren't wasn't weren't can't cannot couldn't won't wouldn't shouldn't haven't hasn't
hadn't i'm i've i'd i'll you're you've you'd you'll he's she's it's we're we've they're they've that's there's
what's who's here's let's
""".split()
)


_LEXICON_SAMPLES = 1500  # generated documents, and questions answered in every style, read per world
LEXICONS: dict = {}


def word_tokens(low: str) -> list[str]:
    return _TOKEN.findall(low.replace("\u2019", "'") if "\u2019" in low else low)


def lexicon(world: World) -> tuple[frozenset, frozenset]:
    """(words, prefixes of words) of `world`'s language, built once per world: its names (entities, places, ghosts),
    its attribute vocabulary, FUNCTION_WORDS, and every word of the question templates and of a deterministic sample
    of what the generators (questions.py, responses.py, corpus.py) write: documents, prompts, and answers in every
    style."""
    key = (world.seed, tuple(world.entities), world.ghosts)
    if key not in LEXICONS:
        texts = [
            *world.entities,
            *world.ghosts,
            *(w + "s" for ws in VOCAB.values() for w in ws),
            *(w for ws in VOCAB.values() for w in ws),
            *(t for _, _, t in QUESTIONS),
            *FOLLOWUPS,
            *(x for xs in FORMATS.values() for x in xs),
            *THINGS,
            *NUMBER_WORDS,
            *(x for xs in FACTS.values() for x in xs),
            *REGION_PHRASE.values(),
            *OPENERS,
            *CLOSERS,
            *HEDGES,
            *SYSTEMS,
            *MONTHS,
            *ATTR_WORDS.values(),
            *(x for xs in ONE_SENTENCE.values() for x in xs),
        ]
        rng = random.Random(f"{world.seed}:lexicon")
        styles = sorted({s for s, _ in STYLES_ANSWERABLE + STYLES_UNANSWERABLE} - {"truncated"})  # cut words
        for _ in range(_LEXICON_SAMPLES):
            texts.append(weighted_pick(rng, DOC_KINDS)(world, rng, world.seed))
            q = sample_question(world, rng)
            texts.append(render(q, rng))
            texts.extend(respond(world, q, rng, s) for s in styles)
        words = set(FUNCTION_WORDS)
        for text in texts:
            words.update(word_tokens(re.sub(r"\{\w+\}", " ", text).lower()))
        words = {w for w in words if not NUMBER.fullmatch(w)}
        words |= {w + "'s" for w in words if not w.endswith("'s")}  # possessives
        prefixes = frozenset(w[:i] for w in words for i in range(1, len(w)))
        # Numbers are words too (NUMBER); the common ones are listed so that most replies need no second look.
        LEXICONS[key] = (frozenset(words | {str(i) for i in range(10_000)}), prefixes)
    return LEXICONS[key]
