"""Every path and dotted name the docs, docstrings and comments mention exists: a file moved or renamed leaves no
pointer to nowhere behind it. Paths are repository paths (pipeline/..., stages/..., serving/..., bench/..., tests/...,
conf/..., docs/..., reward_data/..., .ci/...), `{a,b}` expanded; dotted names are pipeline.<module>[.<attribute>...],
resolved by importing the longest module prefix and reading the rest as attributes. Placeholders (`<run>`, `*`, an
f-string's `{name}`) are not paths, and what a command makes (bench/out/, bench's virtualenvs) need not exist yet."""

import importlib
import itertools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATH = re.compile(
    r"(?<![\w/.-])((?:pipeline|stages|serving|bench|tests|conf|docs|reward_data|\.ci)/[\w./{},*<>-]*[\w}>*])"
)
DOTTED = re.compile(r"(?<![\w.])(pipeline(?:\.[A-Za-z_]\w*)+)")
MADE_BY_COMMANDS = ("bench/out/", "bench/.venv")  # bench scripts write these (bench/README.md)


def _files() -> list[Path]:
    docs = itertools.chain(
        REPO.glob("*.md"), *(REPO.joinpath(d).glob("*.md") for d in ("docs", "reward_data", "bench"))
    )
    code = itertools.chain(
        *(REPO.joinpath(d).rglob("*.py") for d in ("pipeline", "stages", "serving", "bench", "tests"))
    )
    conf = REPO.joinpath("conf").rglob("*.yaml")
    here = Path(__file__).resolve()  # this file's examples of stale references are the point of its second test
    return [
        p
        for p in itertools.chain(docs, code, conf, [REPO / "Makefile"])
        if "fixtures" not in p.parts and p.resolve() != here
    ]


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    if "," not in m.group(1):  # an f-string's {name}: a placeholder, not a set of alternatives
        return []
    return [x for alt in m.group(1).split(",") for x in _expand(path[: m.start()] + alt + path[m.end() :])]


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def stale_references(files=None) -> list[str]:
    out = []
    for f in files or _files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            where = f"{f.relative_to(REPO)}:{n}"
            for m in PATH.finditer(line):
                path = m.group(1).rstrip(".,")
                if any(c in path for c in "<>*") or path.startswith(MADE_BY_COMMANDS):
                    continue
                out += [f"{where}: {p}" for p in _expand(path) if not (REPO / p).exists()]
            out += [f"{where}: {m.group(1)}" for m in DOTTED.finditer(line) if not _resolves(m.group(1).rstrip("."))]
    return out


def test_every_path_and_dotted_name_resolves():
    stale = stale_references()
    assert not stale, f"{len(stale)} references to nothing:\n" + "\n".join(stale)


def test_the_check_finds_what_it_is_for(tmp_path):
    """The checker itself: a moved file, a renamed attribute and a wrong module are found; the real ones, the
    alternatives of a {a,b} and the placeholders pass."""
    f = REPO / "tests" / ".references_probe.md"
    f.write_text(
        "pipeline/oracle.py and pipeline.tokenizer.end_of_turn_ids and pipeline.rl.readout.no_such_name\n"
        "pipeline/world/oracle.py, pipeline.data.tokenizer.end_of_turn_ids, stages/{ppo,sft}.py, "
        "runs/<run>/ppo, conf/{name}.yaml, stages/{ppo,nope}.py, bench/out/anything\n"
    )
    try:
        found = [s.split(": ", 1)[1] for s in stale_references([f])]
    finally:
        f.unlink()
    assert found == [
        "pipeline/oracle.py",
        "pipeline.tokenizer.end_of_turn_ids",
        "pipeline.rl.readout.no_such_name",
        "stages/nope.py",
    ]
