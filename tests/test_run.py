"""Run directories, manifests, handoff, atomic final/, checkpoints."""

from pathlib import Path

import pytest
from conftest import compose_stage

from pipeline.core.errors import UserError
from pipeline.core.runs import StageRun, config_hash, latest_stage, read_manifest


def _cfg(root, stage="pretrain", *over):
    return compose_stage(stage, ["preset=smoke", "logger=none", f"paths.root={root}", *over])


def _complete(root, stage, *over):
    r = StageRun(_cfg(root, stage, *over))
    for p in {"pretrain": ["tokenizer"]}.get(stage, []):
        r.parent(p)
    assert r.begin()
    r.finish(lambda d: (d / "weights.bin").write_text("w"), {"eval/loss": 1.5})
    return r


def test_fresh_stage_runs_then_is_done(tmp_path, capsys):
    r = _complete(tmp_path, "tokenizer")
    m = read_manifest(r.dir)
    assert m["status"] == "complete" and m["metrics"] == {"eval/loss": 1.5}
    assert m["config_hash"] == r.hash and m["fingerprint"] and m["versions"]["torch"]
    assert (r.dir / "final" / "weights.bin").exists() and (r.dir / "config.yaml").exists()
    again = StageRun(_cfg(tmp_path, "tokenizer"))
    assert again.begin() is False
    assert "already complete" in capsys.readouterr().out


def test_different_config_is_refused_and_untouched(tmp_path):
    r = _complete(tmp_path, "tokenizer")
    before = (r.dir / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="force=true .* run=<new name> parent_run=default "):  # Hydra's keys
        StageRun(_cfg(tmp_path, "tokenizer", "train.min_frequency=7")).begin()
    assert (r.dir / "manifest.json").read_bytes() == before and (r.final_dir / "weights.bin").exists()
    forced = StageRun(_cfg(tmp_path, "tokenizer", "train.min_frequency=7", "force=true"))
    assert forced.begin() is True


def test_missing_parent_names_the_command(tmp_path):
    r = StageRun(_cfg(tmp_path, "pretrain", "run=exp1"))
    with pytest.raises(UserError) as e:
        r.parent("tokenizer")
    msg = str(e.value)
    assert "tokenizer" in msg and "make tokenizer RUN=exp1" in msg and "\n" not in msg


def test_redone_parent_makes_child_stale(tmp_path):
    _complete(tmp_path, "tokenizer")
    _complete(tmp_path, "pretrain")
    _complete(tmp_path, "tokenizer", "force=true")  # parent redone: new fingerprint
    child = StageRun(_cfg(tmp_path, "pretrain"))
    child.parent("tokenizer")
    with pytest.raises(UserError, match="older parent"):
        child.begin()


def test_final_is_atomic_when_saving_crashes(tmp_path):
    r = StageRun(_cfg(tmp_path, "tokenizer"))
    assert r.begin()

    def broken(d: Path):
        (d / "half.bin").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        r.finish(broken, {})
    assert not r.final_dir.exists()
    assert read_manifest(r.dir)["status"] == "running"
    assert latest_stage(tmp_path, "default") is None


def test_checkpoints_keep_latest_and_ignore_partial(tmp_path):
    r = StageRun(_cfg(tmp_path, "tokenizer"))
    r.begin()
    for step in (10, 20, 30):
        r.save_checkpoint(step, lambda d: (d / "model.bin").write_text("m"), keep=2)
    names = sorted(p.name for p in r.ckpt_root.iterdir())
    assert names == ["step_00000020", "step_00000030"]
    (r.ckpt_root / ".tmp_step_00000040").mkdir()  # a save killed midway
    (r.ckpt_root / "step_00000050").mkdir()  # renamed but without state.json: not trusted
    assert r.latest_checkpoint().name == "step_00000030"


def test_checkpoints_of_another_config_are_discarded(tmp_path):
    r = StageRun(_cfg(tmp_path, "tokenizer"))
    r.begin()
    r.save_checkpoint(5, lambda d: None)
    other = StageRun(_cfg(tmp_path, "tokenizer", "train.min_frequency=9"))
    assert other.begin() and other.latest_checkpoint() is None


def test_config_hash_ignores_bookkeeping_and_unused_data():
    base = compose_stage("pretrain", ["preset=smoke"])
    assert config_hash(base) == config_hash(compose_stage("pretrain", ["preset=smoke", "run=other", "logger=none"]))
    assert config_hash(base) == config_hash(compose_stage("pretrain", ["preset=smoke", "data.world.ppo_prompts=7"]))
    assert config_hash(base) != config_hash(compose_stage("pretrain", ["preset=smoke", "optim.lr=0.1"]))


def test_unwritable_root_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to"):
        StageRun(_cfg(blocker / "runs", "tokenizer")).begin()


def test_bad_run_name(tmp_path):
    with pytest.raises(UserError, match="run name"):
        StageRun(_cfg(tmp_path, "tokenizer", "run='a b/c'"))


def test_corrupt_manifest_is_reported(tmp_path):
    r = StageRun(_cfg(tmp_path, "tokenizer"))
    r.dir.mkdir(parents=True)
    (r.dir / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        r.begin()


def test_damaged_checkpoint_is_refused(tmp_path):
    r = StageRun(_cfg(tmp_path, "tokenizer"))
    r.begin()
    ck = r.save_checkpoint(10, lambda d: (d / "model.bin").write_bytes(b"x" * 100))
    (ck / "model.bin").write_bytes(b"x" * 10)  # truncated after the fact
    with pytest.raises(UserError, match="damaged .*model.bin is 10 bytes, expected 100"):
        r.latest_checkpoint()


def test_unloadable_checkpoint_is_one_line(tmp_path):
    r = StageRun(_cfg(tmp_path, "tokenizer"))
    r.begin()
    ck = r.save_checkpoint(10, lambda d: None)

    def load(d):
        raise RuntimeError("PytorchStreamReader failed reading zip archive\nlong trace")

    with pytest.raises(UserError, match="cannot be loaded .*PytorchStreamReader") as e:
        r.load_checkpoint(ck, load)
    assert "\n" not in str(e.value)


def test_damaged_parent_final_is_refused(tmp_path):
    _complete(tmp_path, "tokenizer")
    (tmp_path / "default" / "tokenizer" / "final" / "weights.bin").write_text("")
    with pytest.raises(UserError, match='damaged .*weights.bin.*make tokenizer ARGS="force=true"'):
        StageRun(_cfg(tmp_path, "pretrain")).parent("tokenizer")


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_force_is_a_transaction_the_old_stage_stays_until_the_new_one_completes(tmp_path):
    r = _complete(tmp_path, "tokenizer")
    before = _files(r.dir)
    forced = StageRun(_cfg(tmp_path, "tokenizer", "train.min_frequency=7", "force=true"))
    assert forced.begin() is True
    assert forced.dir != r.dir and forced.dir.name == ".tokenizer.next"
    assert _files(r.dir) == before  # manifest, config.yaml, final/ untouched while it runs
    assert read_manifest(forced.dir)["status"] == "running"
    forced.fail("ValueError: bad data")  # the new run fails: children still see the old, complete stage
    assert _files(r.dir) == before and read_manifest(r.dir)["status"] == "complete"
    child = StageRun(_cfg(tmp_path, "pretrain"))
    assert child.parent("tokenizer")["fingerprint"] == read_manifest(r.dir)["fingerprint"]

    again = StageRun(_cfg(tmp_path, "tokenizer", "train.min_frequency=7", "force=true"))
    assert again.begin() is True
    again.finish(lambda d: (d / "weights.bin").write_text("new"), {"eval/loss": 0.5})
    m = read_manifest(r.dir)
    assert again.dir == r.dir and m["status"] == "complete" and m["metrics"] == {"eval/loss": 0.5}
    assert (r.final_dir / "weights.bin").read_text() == "new" and "min_frequency: 7" in (
        r.dir / "config.yaml"
    ).read_text()
    assert not (tmp_path / "default" / ".tokenizer.next").exists()


def test_an_interrupted_parent_is_reported_with_the_command_that_resumes_it(tmp_path):
    r = StageRun(_cfg(tmp_path, "tokenizer"))
    assert r.begin()
    r.update(pid=2**22 + 12345, overrides=["preset=smoke", "train.min_frequency=3"])  # a process that is gone
    with pytest.raises(UserError) as e:
        StageRun(_cfg(tmp_path, "pretrain")).parent("tokenizer")
    assert "interrupted" in str(e.value)
    assert 'make tokenizer PRESET=smoke ARGS="train.min_frequency=3"' in str(e.value)
    r.fail("UserError: data.corpus: no usable documents")
    with pytest.raises(UserError, match="failed .*no usable documents.*rerun: make tokenizer PRESET=smoke"):
        StageRun(_cfg(tmp_path, "pretrain")).parent("tokenizer")


def test_a_switch_added_later_keeps_old_runs_hashes():
    """model.start_over came after runs were made: off, it leaves the hash as it was without it (those runs stay
    complete); on, it is a different config."""
    from omegaconf import OmegaConf

    cfg = compose_stage("sft", ["preset=smoke"])
    without = OmegaConf.to_container(cfg)
    del without["model"]["start_over"]
    assert config_hash(OmegaConf.create(without)) == config_hash(cfg)
    assert config_hash(compose_stage("sft", ["preset=smoke", "model.start_over=true"])) != config_hash(cfg)
