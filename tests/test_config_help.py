"""Every config field carries its help text, and `describe` prints it for a command's --help."""

import dataclasses

import pytest
from conftest import ROOTS, compose_stage
from omegaconf import OmegaConf

from pipeline.core.config import SCHEMAS, describe, fields_help, group, opt

NAMES = sorted(SCHEMAS)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_entry_point_has_a_schema():
    assert {"tokenizer", "pretrain", "sft", "reward", "ppo", "chat", "generate", "report", "compare"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_field_has_help(name):
    """No field without help (that fields_help reaches every field is test_help_covers_the_composed_config's and
    test_fields_help_of_a_hand_made_schema's)."""
    helps = fields_help(SCHEMAS[name])
    missing = sorted(k for k, h in helps.items() if not str(h).strip())
    assert helps and not missing, f"{name}: fields without help: {', '.join(missing)}"


def test_fields_help_of_a_hand_made_schema():
    """A nested group's own entry, then its fields; a field made without opt() has no help ("")."""

    @dataclasses.dataclass
    class Inner:
        x: int = opt(1, "the x")
        y: int = 2

    @dataclasses.dataclass
    class Outer:
        a: str = opt("s", "the a")
        inner: Inner = group(Inner, "the inner group")

    assert fields_help(Outer) == {"a": "the a", "inner": "the inner group", "inner.x": "the x", "inner.y": ""}


@pytest.mark.parametrize("name", NAMES)
def test_every_choice_is_named_in_its_help(name):
    """A field's declared choices (opt(choices=...)) are the values its help offers: the help cannot drift from what
    validation accepts (logger.mode's help once left out `disabled`)."""
    from pipeline.core.config import _fields

    bad = []
    for key, f, _ in _fields(SCHEMAS[name]):
        for c in f.metadata.get("choices", ()):
            if c not in f.metadata["help"] and key not in OPEN_ENDED:
                bad.append(f"{key}: {c}")
    assert not bad, f"{name}: choices missing from the help: {bad}"


# TRL's loss lists: the help names the common ones and points at TRL's config for the rest
OPEN_ENDED = {"train.loss_type"}


@pytest.mark.parametrize("name", NAMES)
def test_help_covers_the_composed_config(name):
    """Every key a user can override in the composed root config (groups and presets merged) has its help."""
    if name not in ROOTS:
        pytest.skip(f"no conf/{name}.yaml")
    cfg = compose_stage(name)

    def keys(node, prefix=""):
        for k in node:
            yield prefix + str(k)
            if OmegaConf.is_dict(node._get_node(k)):
                yield from keys(node[k], f"{prefix}{k}.")

    assert set(keys(cfg)) == set(fields_help(SCHEMAS[name]))


def test_describe_ppo_shows_gamma_with_its_help():
    out = describe("ppo")
    help_text = fields_help(SCHEMAS["ppo"])["train.gamma"]
    assert "GAE" in help_text and "discount" in help_text
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("train.gamma "))
    assert "float = 1.0" in line
    assert _flat(f"train.gamma  float = 1.0 {help_text}") in _flat(out)
    assert _flat(fields_help(SCHEMAS["ppo"])["train.kl_coef"]) in _flat(out)


@pytest.mark.parametrize("name", NAMES)
def test_describe_works_for_every_schema(name):
    out = describe(name)
    helps = fields_help(SCHEMAS[name])
    flat = _flat(out)
    for key, text in helps.items():
        assert f"{key} " in out, f"{name}: {key} missing from describe"
        assert _flat(text) in flat, f"{name}: the help of {key} missing from describe"
    too_long = [ln for ln in out.splitlines() if len(ln) > 120]
    assert not too_long, f"{name}: lines over 120 characters: {too_long[:3]}"
    sections = [ln.split(" (")[0] for ln in out.splitlines() if ln and not ln.startswith(" ") and " (" in ln]
    tops = [k for k in helps if "." not in k and any(j.startswith(k + ".") for j in helps)]
    assert set(tops) <= set(sections), f"{name}: a top-level group has no section heading"


def test_describe_unknown_name():
    with pytest.raises(KeyError, match="ppo"):
        describe("nosuchconfig")
