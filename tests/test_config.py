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
