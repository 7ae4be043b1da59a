"""The house's rules, checked on the code itself: no import cycle among the library's modules, no top-level name
defined in two of them, and the stage list spelled out only in pipeline/core/registry.py."""

import ast
import itertools
import re
from pathlib import Path

from pipeline.core.registry import METHODS, ORDER, POLICIES, POLICY_STAGES, SPECS

REPO = Path(__file__).resolve().parents[1]
LIBRARY = sorted((REPO / "pipeline").rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """The pipeline modules `path` imports, at module level or inside a function (a lazy import that only hides a
    cycle from Python is still a cycle: oracle.lexicon once imported the generators that import the oracle)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return out


def test_no_import_cycle():
    graph = {module_name(p): imports(p) for p in LIBRARY}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_name_defined_in_two_library_modules():
    homes: dict[str, list[str]] = {}
    for p in LIBRARY:
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "main":
                homes.setdefault(node.name, []).append(module_name(p))
    twice = {k: v for k, v in homes.items() if len(v) > 1}
    assert not twice, f"one concept, several homes: {twice}"


def test_the_stage_list_lives_in_the_registry():
    """No other file of the library, the stages, the benches or the Makefile spells out the stages as a list (four
    or more names side by side; a pair such as PPO against SFT is a comparison, not the list)."""
    name = r"""["'](?:%s)["']""" % "|".join((*ORDER, *METHODS))
    listed = re.compile(r"\s*,\s*".join([name] * 4))
    files = [*LIBRARY, *(REPO / "stages").rglob("*.py"), *(REPO / "bench").glob("*.py"), REPO / "Makefile"]
    offenders = [str(p.relative_to(REPO)) for p in files if p.name != "registry.py" and listed.search(p.read_text())]
    assert not offenders, f"stage names listed outside pipeline/core/registry.py: {offenders}"
    assert "tokenizer pretrain sft reward ppo" not in (REPO / "Makefile").read_text()


def test_registry_specs_are_consistent():
    import pipeline.core.config as config

    order = (*ORDER, *METHODS)  # a method's parents are chain stages: make all makes them before make methods
    assert list(SPECS) == list(order) and all(SPECS[m].parents and not SPECS[m].chain for m in METHODS)
    for name, spec in SPECS.items():
        assert config.SCHEMAS[name] is getattr(config, spec.schema), name
        assert all(order.index(p) < order.index(name) for p in spec.parents), f"{name}: a parent runs after it"
        assert name in METHODS or all(p in ORDER for p in spec.parents), f"{name}: the chain needs a method"
        assert (REPO / "stages" / f"{name}.py").is_file() and (REPO / "conf" / f"{name}.yaml").is_file(), name
    assert POLICY_STAGES == ("ppo", "sft", "pretrain")  # newest first: chat's default when none is named
    assert set(POLICIES) == set(POLICY_STAGES) | {m for m in METHODS if SPECS[m].policy}  # stage=dpo etc. by name
    # every stage's data keys exist in the data config
    data = config.DataConfig()
    for spec, key in itertools.chain.from_iterable(((s, k) for k in s.data) for s in SPECS.values()):
        head, _, field = key.partition(".")
        assert hasattr(data, head) and (not field or hasattr(getattr(data, head), field)), (spec.name, key)
