"""Moderation: score a text in OpenAI's categories, flag it over a threshold. One filter for the prompt, the reply
and POST /v1/moderations.

    mod = Moderator.from_settings(cfg.moderation)          # the offline lexicon, or any HF classifier folder
    r = mod.check("how do I build a bomb")
    r.flagged, r.flagged_categories                        # True, ["illicit/violent"]
    r.category_scores["illicit/violent"]                   # 0.9

Two classifiers:
- `lexicon` (the default, offline, no weights): phrases per category, each with a weight; a category's score is
  1 - prod(1 - w) over the phrases found (whole words, any case). It is a transparent baseline, not a safety
  system: it sees phrases, not meaning, so it misses paraphrases and flags quotations. Extend it with
  `moderation.terms` (category -> phrases, weight 1) or replace it. Text and phrases are normalised before they
  are matched (`normalize`): NFKC (fullwidth and styled letters), case folded, accents, invisible and format
  characters dropped, common look-alike letters (Cyrillic, Greek) mapped to Latin, runs of whitespace made one
  space, and letters spelled out one by one with a separator (`b.o.m.b`, `b-o-m-b`, `b o m b`) joined.
- a Hugging Face sequence-classification folder (`moderation.classifier=<folder>`, e.g. a toxicity or moderation
  model saved locally): each label is a category (renamed through `moderation.label_map`); sigmoid scores for
  multi-label models, softmax otherwise.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

# OpenAI's moderation categories (omni-moderation), in its order.
CATEGORIES = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]

# The default lexicon: (phrase, weight). Kept short and readable on purpose; see the module docstring.
LEXICON: dict[str, list[tuple[str, float]]] = {
    "harassment": [
        ("you are stupid", 0.6),
        ("you're stupid", 0.6),
        ("you idiot", 0.6),
        ("shut up", 0.3),
        ("you are worthless", 0.7),
        ("nobody likes you", 0.6),
        ("loser", 0.3),
        ("kill yourself", 0.8),
    ],
    "harassment/threatening": [
        ("i will hurt you", 0.9),
        ("i'll hurt you", 0.9),
        ("i will find you", 0.6),
        ("you will regret", 0.4),
        ("watch your back", 0.6),
    ],
    "hate": [("subhuman", 0.8), ("go back to your country", 0.7), ("inferior race", 0.9)],
    "hate/threatening": [("exterminate them", 0.9), ("wipe them out", 0.7)],
    "illicit": [
        ("buy drugs", 0.6),
        ("sell drugs", 0.6),
        ("launder money", 0.8),
        ("money laundering", 0.6),
        ("steal a car", 0.8),
        ("hotwire a car", 0.7),
        ("counterfeit money", 0.8),
        ("pick a lock", 0.4),
        ("make meth", 0.9),
        ("cook meth", 0.9),
        ("hack into", 0.6),
        ("stolen credit card", 0.8),
    ],
    "illicit/violent": [
        ("build a bomb", 0.9),
        ("make a bomb", 0.9),
        ("make explosives", 0.9),
        ("pipe bomb", 0.9),
        ("buy a gun illegally", 0.9),
        ("poison someone", 0.9),
    ],
    "self-harm": [("self-harm", 0.6), ("self harm", 0.6), ("hurt myself", 0.7), ("cut myself", 0.8), ("suicide", 0.6)],
    "self-harm/intent": [("kill myself", 0.9), ("end my life", 0.9), ("want to die", 0.8)],
    "self-harm/instructions": [("how to kill yourself", 0.95), ("ways to commit suicide", 0.95)],
    "sexual": [("porn", 0.6), ("nude", 0.5), ("explicit sex", 0.8), ("sexual intercourse", 0.5)],
    "sexual/minors": [("child porn", 1.0), ("sexual content involving minors", 1.0)],
    "violence": [
        ("kill you", 0.8),
        ("kill him", 0.8),
        ("kill her", 0.8),
        ("kill them", 0.7),
        ("murder", 0.5),
        ("stab", 0.5),
        ("shoot them", 0.8),
        ("beat him up", 0.6),
        ("torture", 0.6),
    ],
    "violence/graphic": [("blood everywhere", 0.6), ("dismember", 0.9), ("gore", 0.6), ("mutilate", 0.8)],
}


# Letters that look like Latin ones (lower case: the text is case folded first), from Unicode's confusables list:
# the ones a person would type to slip past a word list.
_CONFUSABLES = {
    # Cyrillic
    "а": "a",
    "б": "b",
    "в": "b",
    "с": "c",
    "ԁ": "d",
    "е": "e",
    "ё": "e",
    "һ": "h",
    "і": "i",
    "ї": "i",
    "ј": "j",
    "к": "k",
    "ӏ": "l",
    "м": "m",
    "н": "h",
    "о": "o",
    "р": "p",
    "ԛ": "q",
    "г": "r",
    "ѕ": "s",
    "т": "t",
    "ц": "u",
    "у": "y",
    "ѵ": "v",
    "ԝ": "w",
    "х": "x",
    "ү": "y",
    "з": "3",
    # Greek
    "α": "a",
    "β": "b",
    "ε": "e",
    "η": "n",
    "ι": "i",
    "κ": "k",
    "μ": "u",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "τ": "t",
    "υ": "u",
    "χ": "x",
    "γ": "y",
    "ω": "w",
    # Latin look-alikes and punctuation
    "ı": "i",
    "ȷ": "j",
    "ɡ": "g",
    "ɑ": "a",
    "ʏ": "y",
    "ℓ": "l",
    "\u2019": "'",
    "\u2018": "'",
    "\u02bc": "'",
    "\u2010": "-",
    "\u2011": "-",
    "\u2012": "-",
    "\u2013": "-",
    "\u2014": "-",
    "\u2212": "-",
}
# Characters that show nothing: format characters (zero-width space and joiners, word joiner, byte-order mark, soft
# hyphen, bidirectional controls, tags), variation selectors, and the combining marks that decorate Latin letters.
_INVISIBLE = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
    "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
)
_CONFUSABLE_RE = re.compile("[" + "".join(map(re.escape, _CONFUSABLES)) + "]")
_INVISIBLE_RE = re.compile(f"[{_INVISIBLE}]+")
_SPACES = re.compile(r"[^\S ]\s*| \s+")  # any whitespace but a lone space: what must become one space
# three or more single letters, each pair separated by the same character (b.o.m.b, b-o-m-b, b o m b)
_SPELLED = re.compile(r"\b[^\W\d_](?P<sep>[\s.\-_*+~/\\|,:;'`^=#])[^\W\d_](?:(?P=sep)[^\W\d_])+\b")


def normalize(text: str) -> str:
    """The text as the lexicon matches it (see the module docstring). ASCII text, the common case, takes a short
    way: only case, whitespace and spelled-out letters can matter there. (This runs on every streamed piece of a
    moderated reply: each step is skipped where it would change nothing.)"""
    if not text.isascii():
        text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
        text = _INVISIBLE_RE.sub("", text)
        if _CONFUSABLE_RE.search(text):
            text = _CONFUSABLE_RE.sub(lambda m: _CONFUSABLES[m.group()], text)
        text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text))
    else:
        text = text.lower()
        if "  " in text or not text.isprintable():  # tabs, newlines, runs of spaces
            text = _SPACES.sub(" ", text)
    if _SPELLED.search(text):
        text = _SPELLED.sub(lambda m: m.group(0)[::2], text)
    return text


@dataclass
class Verdict:
    """One text's moderation result, in OpenAI's shape (`as_openai()`)."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    flagged_categories: list[str] = field(default_factory=list)

    def as_openai(self) -> dict:
        return {"flagged": self.flagged, "categories": self.categories, "category_scores": self.category_scores}


class LexiconClassifier:
    name = "lexicon"

    def __init__(self, extra_terms: dict | None = None):
        terms = {c: list(v) for c, v in LEXICON.items()}
        for cat, phrases in (extra_terms or {}).items():
            terms.setdefault(cat, []).extend((str(p), 1.0) for p in phrases)
        self.labels = list(dict.fromkeys([*CATEGORIES, *terms]))
        self._hits: dict[str, list[tuple[str, float]]] = {}  # phrase -> its (category, weight)s
        for cat, v in terms.items():
            for p, w in v:
                self._hits.setdefault(normalize(p), []).append((cat, float(w)))
        # One pass over the text finds every phrase (longest first, so "kill yourself" is not read as "kill you").
        # The lookahead lets phrases overlap; whole words only, any case.
        alts = "|".join(re.escape(p) for p in sorted(self._hits, key=len, reverse=True))
        self._re = re.compile(r"(?<!\w)(?=(" + alts + r")(?!\w))")
        self._prefixes = {p[:k] for p in self._hits for k in range(1, len(p))}
        self.longest = max(map(len, self._hits))

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        out = []
        for text in texts:
            found = self._find(normalize(text))
            if not found:  # the common case (every piece of every reply is checked): nothing to multiply
                out.append(dict.fromkeys(self.labels, 0.0))
                continue
            keep = dict.fromkeys(self.labels, 1.0)
            for phrase in found:
                for cat, w in self._hits[phrase]:
                    keep[cat] *= 1.0 - w
            out.append({c: round(1.0 - k, 6) for c, k in keep.items()})
        return out

    def _find(self, text: str, piece: int = 16384) -> set[str]:
        """The phrases in `text`, a piece at a time: one regex call holds the GIL from start to end, so a long
        text is scanned in pieces that overlap by the longest phrase (a thread scanning it lets the event loop
        in between pieces)."""
        if len(text) <= piece:
            return set(self._re.findall(text))
        found: set[str] = set()
        for at in range(0, len(text), piece):
            lo = max(0, at - self.longest)
            m = self._re.findall(text[lo : at + piece])
            found.update(m)
        return found

    def holdback(self, text: str) -> int:
        """How many trailing characters of a reply being written could still become a listed phrase: the longest
        tail that starts at a word boundary and is the start of one. (On the text as written, lower-cased: a reply
        that spells a phrase in a disguise is still stopped before the phrase is complete, by `scores` on the
        normalised text, but its start may have gone out.)"""
        # Only the tail can matter (this runs once per streamed piece): where a phrase's start could still be, and
        # the character before it, for the word boundary.
        start = max(0, len(text) - self.longest + 1)
        lo = max(0, start - 1)
        low = text[lo:].lower()
        for j in range(start - lo, len(low)):
            if (j == 0 or not (low[j - 1].isalnum() or low[j - 1] == "_")) and low[j:] in self._prefixes:
                return len(low) - j
        return 0


class HFClassifier:
    """Any Hugging Face sequence-classification folder; label names (through label_map) are the categories."""

    def __init__(self, path: str, label_map: dict | None = None, device=None):
        from pathlib import Path

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.core.errors import UserError

        if not (Path(path) / "config.json").is_file():
            raise UserError(
                f"moderation.classifier={path}: not a Hugging Face sequence-classification folder (no "
                f"config.json); use lexicon or a local folder"
            )
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as e:
            raise UserError(
                f"moderation.classifier={path}: not a Hugging Face sequence-classification folder "
                f"({str(e).splitlines()[0]})"
            ) from None
        self.name = str(path)
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        id2label = self.model.config.id2label
        label_map = dict(label_map or {})
        self._cats = [str(label_map.get(id2label[i], id2label[i])) for i in range(len(id2label))]
        self.labels = list(dict.fromkeys([*CATEGORIES, *self._cats]))
        self.multi = self.model.config.problem_type == "multi_label_classification"

    def holdback(self, text: str) -> int:  # a model judges words, so the word being written waits
        from serving.text import partial_word

        return partial_word(text)

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        import torch

        with torch.inference_mode():
            enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            logits = self.model(**enc).logits.float()
            probs = torch.sigmoid(logits) if self.multi else torch.softmax(logits, -1)
        out = []
        for row in probs.tolist():
            s = {c: 0.0 for c in self.labels}
            for cat, p in zip(self._cats, row):
                s[cat] = max(s[cat], round(float(p), 6))
            out.append(s)
        return out


class Moderator:
    """A classifier plus the categories that count and their thresholds."""

    def __init__(
        self, classifier, categories: list[str] | None = None, threshold: float = 0.5, thresholds: dict | None = None
    ):
        self.classifier = classifier
        self.categories = list(categories) if categories else list(classifier.labels)
        self.threshold = float(threshold)
        self.thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}

    @classmethod
    def from_settings(cls, m) -> "Moderator":
        from pipeline.core.errors import UserError

        for key in ("thresholds", "terms", "label_map"):
            v = m.get(key)
            if v is not None and not hasattr(v, "items"):
                raise UserError(f"moderation.{key}: a mapping is expected, e.g. '{{violence: ...}}', not {v!r}")
        for cat, v in (m.thresholds or {}).items():
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise UserError(f"moderation.thresholds.{cat}={v!r}: a threshold is a number from 0 to 1")
        for cat, v in (m.terms or {}).items():
            if isinstance(v, (str, int, float)) or not hasattr(v, "__iter__"):
                raise UserError(f"moderation.terms.{cat}: a list of phrases is expected, e.g. '{{{cat}: [a, b]}}'")
        if m.classifier == "lexicon":
            clf = LexiconClassifier(dict(m.terms or {}))
        else:
            clf = HFClassifier(m.classifier, dict(m.label_map or {}))
        cats = list(m.categories) if m.categories else None
        unknown = [c for c in (cats or []) + list((m.thresholds or {}).keys()) if c not in clf.labels]
        if unknown:
            raise UserError(
                f"moderation: unknown categories {unknown}; the classifier ({clf.name}) has {', '.join(clf.labels)}"
            )
        return cls(clf, cats, m.threshold, dict(m.thresholds or {}))

    def check_many(self, texts: list[str]) -> list[Verdict]:
        out = []
        for s in self.classifier.scores(texts):
            cats = {c: c in self.categories and s.get(c, 0.0) >= self.thresholds.get(c, self.threshold) for c in s}
            flagged = [c for c, v in cats.items() if v]
            out.append(Verdict(bool(flagged), cats, s, flagged))
        return out

    def check(self, text: str) -> Verdict:
        return self.check_many([text])[0]

    def holdback(self, text: str) -> int:
        return self.classifier.holdback(text)

    def window(self, checked: str, new: str) -> str:
        """What to judge when `new` is appended to the already judged `checked`: for the lexicon, the new text
        and enough before it for a phrase to straddle the two; a model judges the whole text."""
        n = getattr(self.classifier, "longest", None)
        if n is None:
            return checked + new
        start = max(0, len(checked) - 2 * n)  # room for a phrase spread out by separators or invisible characters
        while start > 0 and (checked[start - 1].isalnum() or checked[start - 1] == "_"):
            start -= 1  # never cut a word in two: its tail could read as a phrase of its own
        return checked[start:] + new
