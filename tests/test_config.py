"""Every root config composes under every preset; mistakes in keys or types fail at composition."""

import pytest
from conftest import CONF, PRESETS, ROOTS, compose_stage
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

PRESET_ROOTS = [r for r in ROOTS if "- preset:" in (CONF / f"{r}.yaml").read_text()]


@pytest.mark.parametrize("root", PRESET_ROOTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_root_composes_under_every_preset(root, preset):
    cfg = compose_stage(root, [f"preset={preset}"])
    assert cfg.get("stage") in (root, None)
    assert cfg.paths.root and cfg.run == "default"


@pytest.mark.parametrize("root", sorted(set(ROOTS) - set(PRESET_ROOTS)))
def test_tools_compose(root):
    assert compose_stage(root).paths.root


def test_pipeline_stages_all_have_presets():
    assert {"tokenizer", "pretrain", "sft", "reward", "ppo"} <= set(PRESET_ROOTS)


def test_presets_differ_where_it_matters():
    smoke, cpu = compose_stage("pretrain", ["preset=smoke"]), compose_stage("pretrain")
    assert cpu.model.hidden_size > smoke.model.hidden_size
    assert cpu.train.max_steps > smoke.train.max_steps
    # The world itself (entities, seed) is the same under every preset: reward_data/ was generated from it.
    assert cpu.data.world.seed == smoke.data.world.seed and cpu.data.world.n_entities == smoke.data.world.n_entities


@pytest.mark.parametrize("bad", ["optim.lrr=1e-3", "model.hiden_size=8", "train.max_step=3", "nosuchkey=1"])
def test_mistyped_key_fails_naming_it(bad):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_stage("pretrain", [bad])
    assert bad.split("=")[0].split(".")[-1] in str(e.value) + str(e.value.__cause__)


def test_wrong_type_fails():
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose_stage("pretrain", ["optim.lr=fast"])


def test_overrides_apply():
    cfg = compose_stage("pretrain", ["optim.lr=3e-4", "run=x", "logger=none", "model.num_layers=1"])
    assert cfg.optim.lr == 3e-4 and cfg.run == "x" and cfg.logger.backend == "none" and cfg.model.num_layers == 1


def test_validation_is_declared_on_the_fields():
    """opt(choices=, positive=, between=) on a hand-made schema: every bad value reported, each as one `key=value`
    line, nested groups named by their dotted key; null and in-range values pass."""
    import dataclasses
    from typing import Optional

    from omegaconf import OmegaConf

    from pipeline.core.config import _declared_problems, group, opt

    @dataclasses.dataclass
    class Inner:
        steps: Optional[int] = opt(None, "steps", positive=True)
        share: float = opt(0.5, "share", between=(0, 1))

    @dataclasses.dataclass
    class Outer:
        mode: str = opt("a", "a | b", choices=("a", "b"))
        inner: Inner = group(Inner, "inner")

    good = OmegaConf.structured(Outer)
    assert _declared_problems(good) == []
    bad = OmegaConf.merge(good, {"mode": "c", "inner": {"steps": 0, "share": 1.5}})
    assert _declared_problems(bad) == [
        "mode='c' is not one of a, b",
        "inner.steps=0 must be positive",
        "inner.share=1.5 must be between 0 and 1",
    ]


def test_a_composed_stage_reports_every_declared_problem_at_once():
    """The real PPO config, three bad values in three groups: one UserError naming all three."""
    from pipeline.core.config import validate
    from pipeline.core.errors import UserError

    cfg = compose_stage("ppo", ["preset=smoke", "train.kl_estimator=k9", "train.ppo_epochs=0", "precision=fp8"])
    with pytest.raises(UserError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith("3 problems in the config")
    assert "train.kl_estimator='k9' is not one of k1, k2, k3, abs" in msg
    assert "train.ppo_epochs=0 must be positive" in msg
    assert "precision='fp8' is not one of auto, fp32, bf16, fp16" in msg
