"""Tracking: metrics.jsonl always, W&B offline by default, never fatal, no secrets in logged configs."""

import json

from conftest import compose_stage

from pipeline.core.runs import StageRun
from pipeline.core.tracking import Tracker, scrub, wandb_mode


def test_scrub_drops_credentials():
    cfg = {"logger": {"api_key": "abc", "project": "p"}, "x": [{"WANDB_TOKEN": "t"}], "lr": 1}
    assert scrub(cfg) == {
        "logger": {"api_key": "<redacted>", "project": "p"},
        "x": [{"WANDB_TOKEN": "<redacted>"}],
        "lr": 1,
    }


def test_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"


def _run(tmp_path, *over):
    r = StageRun(compose_stage("tokenizer", ["preset=smoke", f"paths.root={tmp_path}", *over]))
    r.begin()
    return r


def test_offline_wandb_run_lands_in_the_stage_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-that-must-not-leak-0000000000")
    r = _run(tmp_path)
    t = Tracker(r.cfg, r)
    assert t.wandb is not None
    t.log({"train/loss": 1.0}, step=1)
    r.finish(lambda d: (d / "w").write_text("w"), {"eval/loss": 1.0})
    t.finish({"eval/loss": 1.0}, r.final_dir)
    runs = list((r.dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    assert json.loads((r.dir / "metrics.jsonl").read_text().splitlines()[0])["train/loss"] == 1.0
    for p in r.dir.rglob("*"):
        if p.is_file() and p.stat().st_size < 5_000_000:
            assert b"secret-key-that-must-not-leak" not in p.read_bytes(), p


def test_broken_wandb_never_kills_training(tmp_path, monkeypatch, capsys):
    import wandb

    def boom(*a, **k):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", boom)
    r = _run(tmp_path)
    t = Tracker(r.cfg, r)
    assert t.wandb is None and "W&B disabled" in capsys.readouterr().err
    t.log({"train/loss": 2.0}, step=1)  # still recorded locally
    t.finish({})
    assert "train/loss" in (r.dir / "metrics.jsonl").read_text()


def test_failing_log_call_disables_wandb_not_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = _run(tmp_path)
    t = Tracker(r.cfg, r)

    def bad_log(*a, **k):
        raise OSError("No space left on device")

    t.wandb.log = bad_log
    t.log({"train/loss": 3.0}, step=2)
    assert t.wandb is None
    t.finish({})


def test_logger_none_writes_only_jsonl(tmp_path):
    r = _run(tmp_path, "logger=none")
    t = Tracker(r.cfg, r)
    assert t.wandb is None
    t.log({"a": 1.0}, step=0)
    t.finish({})
    assert not (r.dir / "wandb").exists()
