"""End to end on the smoke preset: tokenizer -> pretrain, as a user runs them (subprocesses)."""

import json

from conftest import SMOKE, run_stage


def _manifest(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())


def test_final_loads_with_plain_transformers(smoke_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = smoke_root / "default" / "pretrain" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    ids = tok(text, return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    m = _manifest(smoke_root, "default", "pretrain")
    assert m["status"] == "complete" and m["parents"]["tokenizer"]
    assert {"eval/loss", "eval/perplexity"} <= set(m["metrics"])
    assert m["metrics"]["eval/loss"] < 6.5  # it learned something from ln(1024) = 6.93


def test_second_run_says_done(smoke_root):
    p = run_stage("pretrain", *SMOKE, f"paths.root={smoke_root}")
    assert "already complete" in p.stdout


def test_killed_run_resumes_to_the_same_result(smoke_root):
    common = [*SMOKE, f"paths.root={smoke_root}", "run=killed", "parent_run=default"]
    p = run_stage("pretrain", *common, env={"PIPELINE_CRASH_AT_STEP": "15"}, check=False)
    assert p.returncode == 137
    d = smoke_root / "killed" / "pretrain"
    assert not (d / "final").exists() and (d / "checkpoints" / "step_00000015").is_dir()
    assert _manifest(smoke_root, "killed", "pretrain")["status"] == "running"
    run_stage("pretrain", *common)
    resumed, straight = _manifest(smoke_root, "killed", "pretrain"), _manifest(smoke_root, "default", "pretrain")
    assert resumed["resumed_from"] == 15 and resumed["status"] == "complete"
    assert abs(resumed["metrics"]["eval/loss"] - straight["metrics"]["eval/loss"]) < 1e-4


def _one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    for n in needles:
        assert n in err[0], err[0]


def test_missing_parent_is_one_line(tmp_path):
    p = run_stage("pretrain", *SMOKE, f"paths.root={tmp_path}", "run=fresh", check=False)
    _one_line_error(p, "tokenizer", "make tokenizer RUN=fresh")


def test_bad_corpus_is_one_line(smoke_root, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words.")
    for path, needle in ((empty, "empty.txt"), (tiny, "less than one block"), (tmp_path / "nope.txt", "nope.txt")):
        p = run_stage(
            "pretrain",
            *SMOKE,
            f"paths.root={smoke_root}",
            "run=bad",
            "parent_run=default",
            "data=local_text",
            f"data.corpus.path={path}",
            check=False,
        )
        _one_line_error(p, needle)
    assert not (smoke_root / "bad" / "pretrain" / "final").exists()


def test_unloadable_model_is_one_line(tmp_path):
    p = run_stage(
        "pretrain", *SMOKE, f"paths.root={tmp_path}", "model=hf", "model.name_or_path=no-such-org/no-model", check=False
    )
    _one_line_error(p, "no-such-org/no-model")


def test_mistyped_key_fails_naming_it(tmp_path):
    p = run_stage("pretrain", *SMOKE, f"paths.root={tmp_path}", "optim.lrr=1", check=False)
    assert p.returncode != 0 and "lrr" in p.stderr


def test_two_processes_match_one(smoke_root):
    """2 ranks x 4 sequences see exactly the blocks that 1 rank x 4 sequences x 2 accumulation steps sees (the
    sampler shards the global batch), so the two runs must agree. (Against one batch of 8 they agree only up to
    float rounding, which 30 steps at a high learning rate amplify to ~1e-2.)"""
    from conftest import run_multiproc

    common = [*SMOKE, f"paths.root={smoke_root}", "parent_run=default", "train.batch_size=4"]
    run_multiproc("pretrain", *common, "run=ddp")
    run_stage("pretrain", *common, "run=accum", "train.grad_accum=2")
    one, two = _manifest(smoke_root, "accum", "pretrain"), _manifest(smoke_root, "ddp", "pretrain")
    assert two["metrics"]["train/tokens"] == one["metrics"]["train/tokens"]
    assert abs(two["metrics"]["eval/loss"] - one["metrics"]["eval/loss"]) < 1e-4
