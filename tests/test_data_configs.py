"""Every example data config in conf/data composes into its stage and loads a fixture in its real format."""

import pytest
from conftest import REPO, compose_stage

from pipeline.data.formats import load_corpus, load_preferences, load_prompts, load_sft

FIX = REPO / "tests" / "fixtures" / "formats"

CASES = [  # (data option, stage, {source: fixture}, loader)
    ("local_text", "pretrain", {"corpus": "corpus.txt"}, load_corpus),
    ("local_text", "pretrain", {"corpus": "corpus.jsonl"}, load_corpus),
    ("local_text", "pretrain", {"corpus": "corpus.csv"}, load_corpus),
    ("local_sft", "sft", {"sft": "sft_messages.jsonl", "sft_eval": "sft_messages.jsonl"}, load_sft),
    (
        "local_prompt_completion",
        "sft",
        {"sft": "sft_prompt_completion.jsonl", "sft_eval": "sft_prompt_completion.jsonl"},
        load_sft,
    ),
    (
        "local_pairs",
        "reward",
        {"preference": "pairs_conversational.jsonl", "preference_test": "pairs_plain.jsonl"},
        load_preferences,
    ),
    ("local_ranked", "reward", {"preference": "ranked.jsonl", "preference_test": "ranked.jsonl"}, load_preferences),
    ("local_prompts", "ppo", {"prompts": "prompts.jsonl", "eval_prompts": "prompts.jsonl"}, load_prompts),
]


@pytest.mark.parametrize("option,stage,files,loader", CASES, ids=[f"{c[0]}-{list(c[2].values())[0]}" for c in CASES])
def test_data_option_loads_its_fixture(option, stage, files, loader, tmp_path):
    over = [f"data={option}"] + [f"data.{src}.path={FIX / name}" for src, name in files.items()]
    cfg = compose_stage(stage, ["preset=smoke", *over])
    for src in files:
        source = cfg.data[src]
        if loader is load_preferences:
            records, skipped = loader(source, cfg.data.world, source.split)
        else:
            records, skipped = loader(source, cfg.data.world, str(tmp_path))
        assert records and skipped == 0, (option, src)


def test_hh_hub_config_composes_and_fails_cleanly_offline(monkeypatch, tmp_path):
    from pipeline.core.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    cfg = compose_stage("reward", ["preset=smoke", "data=hh_rlhf"])
    assert cfg.data.preference.format == "hh" and cfg.data.preference.kind == "hub"
    with pytest.raises(UserError, match="Anthropic/hh-rlhf"):
        load_preferences(cfg.data.preference, cfg.data.world, "train")


def test_unset_path_and_other_mistakes_are_reported_together():
    from pipeline.core.config import validate
    from pipeline.core.errors import UserError

    cfg = compose_stage("sft", ["preset=smoke", "data=local_sft", "precision=fp64", "train.batch_size=0"])
    with pytest.raises(UserError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith("4 problems") and "data.sft.path is required" in msg and "data.sft_eval.path" in msg
    assert "precision='fp64'" in msg and "train.batch_size=0" in msg and "\n" not in msg
    with pytest.raises(UserError, match="model.name_or_path is required"):
        validate(compose_stage("pretrain", ["preset=smoke", "model=hf"]))
