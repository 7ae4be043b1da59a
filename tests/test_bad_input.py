"""Bad input never costs finished work: every mistake a user can make with data, config, paths or a redone stage
ends in exit code 2 and one line that names the file (and line or record), the key, or the command to run, and the
finished run's files are byte for byte what they were, force=true included.

Each case runs the real command line (`python -m stages.<name> args...`) in this process, so the suite stays fast:
the finished run is the session's smoke chain (tokenizer, pretrain, sft and reward of run `default`).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE

from pipeline.core import tracking
from pipeline.core.registry import ORDER

BINARY = bytes(range(256)) * 8  # NUL bytes and invalid UTF-8 sequences
UTF16 = '{"text": "Bera works as a baker."}\n'.encode("utf-16")


def write(d: Path, name: str, content) -> str:
    p = d / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return str(p)


def snapshot(run_dir: Path) -> dict:
    """Every file of the run's stages with its bytes (a force=true attempt works beside them, in .<stage>.next/)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and not p.relative_to(run_dir).parts[0].startswith(".")
    }


def cli(name: str, *args: str, capsys) -> tuple[int, str]:
    """`python -m stages.<name> args...` in this process: (exit code, stderr)."""
    module = f"stages.{name}" if (REPO / "stages" / f"{name}.py").is_file() else f"stages.tools.{name}"
    main = importlib.import_module(module).main
    argv = sys.argv
    sys.argv = [module, *args]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """Bad files, written once."""
    d = tmp_path_factory.mktemp("bad")
    user = {"role": "user", "content": "How old is Bera?"}
    ok = {"role": "assistant", "content": "Bera is 34."}
    return {
        "binary_txt": write(d, "corpus.txt", BINARY),
        "binary_jsonl": write(d, "binary.jsonl", BINARY),
        "utf16_jsonl": write(d, "utf16.jsonl", UTF16),
        "empty_txt": write(d, "empty.txt", ""),
        "empty_jsonl": write(d, "empty.jsonl", ""),
        "broken_jsonl": write(d, "broken.jsonl", json.dumps({"messages": [user, ok]}) + '\n{"messages": [\n'),
        "unknown_role": write(
            d, "role.jsonl", json.dumps({"messages": [{"role": "robot", "content": "hi"}, ok]}) + "\n"
        ),
        "no_messages": write(d, "nomsg.jsonl", json.dumps({"text": "no messages here"}) + "\n"),
        "no_assistant": write(d, "noasst.jsonl", json.dumps({"messages": [user]}) + "\n"),
        "pairs_no_rejected": write(d, "pairs.jsonl", json.dumps({"prompt": "Q?", "chosen": "A."}) + "\n"),
        "pairs_broken": write(d, "pairs_broken.jsonl", "not json at all\n"),
        "prompts_broken": write(d, "prompts.jsonl", json.dumps({"prompt": "How old is Bera?"}) + "\n{oops\n"),
        "prompt_long": write(d, "long.jsonl", json.dumps({"prompt": "Tell me about Bera. " * 40}) + "\n"),
        "prompts_txt_binary": write(d, "prompts.txt", BINARY),
        "json_cut_short": write(d, "cut.json", "[" + json.dumps({"messages": [user, ok]}) + ', {"mess'),
        "missing": str(d / "does_not_exist.jsonl"),
    }


def local(key: str, path: str, fmt: str) -> list[str]:
    return [f"data.{key}.kind=local", f"data.{key}.path={path}", f"data.{key}.format={fmt}"]


# (name, stage, args, what the one line must name); {root} and {bad:<key>} are filled in per case
CASES = [
    # config keys, values and groups: every entry point
    ("typo-tokenizer", "tokenizer", ["optim.lrr=1"], "optim.lr"),
    ("typo-pretrain", "pretrain", ["train.max_stepz=3"], "train.max_steps"),
    ("typo-plus", "pretrain", ["+optim.lrr=1"], "optim.lrr"),
    ("typo-sft", "sft", ["train.batchsize=2"], "train.batch_size"),
    ("typo-reward", "reward", ["onpolicy.prompt=3"], "onpolicy.prompts"),
    ("typo-ppo", "ppo", ["train.kl_coeff=0.1"], "train.kl_coef"),
    ("typo-chat", "chat", ["generation.temprature=1"], "generation.temperature"),
    ("typo-generate", "generate", ["limitt=3"], "limit"),
    ("typo-report", "report", ["sampels=2"], "samples"),
    ("typo-compare", "compare", ["outt=x.md"], "out"),
    ("typo-dpo", "dpo", ["train.betta=0.1"], "train.beta"),
    ("typo-rloo", "rloo", ["train.num_generation=4"], "train.num_generations"),
    ("typo-grpo", "grpo", ["train.num_generation=4"], "train.num_generations"),
    ("typo-bon", "bon", ["bon.nn=4"], "bon.n"),
    ("typo-expert-iteration", "expert_iteration", ["train.sample=4"], "train.samples"),
    ("typo-methods", "methods", ["runn=x"], "run"),
    ("typo-rounds", "rounds", ["methd=ppo"], "method"),
    ("typo-serve", "serve", ["limits.requests_per_minut=5"], "limits.requests_per_minute"),
    ("word-for-number", "pretrain", ["train.max_steps=many"], "train.max_steps"),
    ("list-for-number", "ppo", ["train.kl_coef=[1,2]"], "train.kl_coef"),
    ("no-such-preset", "sft", ["preset=nope"], "preset"),
    ("no-such-data-config", "reward", ["data=nope"], "data"),
    ("zero-batch", "sft", ["train.batch_size=0"], "train.batch_size"),
    ("bad-precision", "reward", ["precision=fp8"], "precision"),
    ("bad-estimator", "ppo", ["train.kl_estimator=k9"], "train.kl_estimator"),
    (
        "minibatch-over-rollout",
        "ppo",
        ["train.minibatch_size=64", "train.rollout_batch_size=8"],
        "train.minibatch_size",
    ),
    ("negative-penalty", "ppo", ["train.missing_eos_penalty=-1"], "train.missing_eos_penalty"),
    ("bad-reward-kind", "ppo", ["train.reward=oracle"], "train.reward"),
    ("local-without-path", "sft", ["data.sft.kind=local"], "data.sft.path"),
    # files: not UTF-8, empty, missing, malformed, with the wrong fields
    ("corpus-binary-tokenizer", "tokenizer", ["run=b1", *local("corpus", "{bad:binary_txt}", "text")], "corpus.txt"),
    (
        "corpus-binary-pretrain",
        "pretrain",
        [
            "run=b2",
            "model=hf",
            "model.name_or_path={root}/default/pretrain/final",
            *local("corpus", "{bad:binary_jsonl}", "text"),
        ],
        "binary.jsonl",
    ),
    ("corpus-utf16", "tokenizer", ["run=b3", *local("corpus", "{bad:utf16_jsonl}", "text")], "utf16.jsonl"),
    ("corpus-empty", "tokenizer", ["run=b4", *local("corpus", "{bad:empty_txt}", "text")], "corpus"),
    ("corpus-missing", "tokenizer", ["run=b5", *local("corpus", "{bad:missing}", "text")], "does_not_exist"),
    (
        "sft-broken-json",
        "sft",
        ["run=b6", "parent_run=default", *local("sft", "{bad:broken_jsonl}", "messages")],
        "broken.jsonl:2",
    ),
    (
        "sft-unknown-role",
        "sft",
        ["run=b7", "parent_run=default", *local("sft", "{bad:unknown_role}", "messages")],
        "role.jsonl:1",
    ),
    (
        "sft-no-messages",
        "sft",
        ["run=b8", "parent_run=default", *local("sft", "{bad:no_messages}", "messages")],
        "nomsg.jsonl:1",
    ),
    (
        "sft-no-assistant",
        "sft",
        ["run=b9", "parent_run=default", *local("sft", "{bad:no_assistant}", "messages")],
        "noasst.jsonl:1",
    ),
    (
        "sft-binary",
        "sft",
        ["run=b10", "parent_run=default", *local("sft", "{bad:binary_jsonl}", "messages")],
        "binary.jsonl",
    ),
    (
        "sft-utf16",
        "sft",
        ["run=b11", "parent_run=default", *local("sft", "{bad:utf16_jsonl}", "messages")],
        "utf16.jsonl",
    ),
    (
        "sft-empty",
        "sft",
        ["run=b12", "parent_run=default", *local("sft", "{bad:empty_jsonl}", "messages")],
        "empty.jsonl",
    ),
    (
        "sft-json-cut-short",
        "sft",
        ["run=b13", "parent_run=default", *local("sft", "{bad:json_cut_short}", "messages")],
        "cut.json:1",
    ),
    (
        "pairs-no-rejected",
        "reward",
        ["run=b14", "parent_run=default", *local("preference", "{bad:pairs_no_rejected}", "pairs")],
        "pairs.jsonl:1",
    ),
    (
        "pairs-broken",
        "reward",
        ["run=b15", "parent_run=default", *local("preference", "{bad:pairs_broken}", "pairs")],
        "pairs_broken.jsonl:1",
    ),
    (
        "pairs-binary",
        "reward",
        ["run=b16", "parent_run=default", *local("preference", "{bad:binary_jsonl}", "pairs")],
        "binary.jsonl",
    ),
    (
        "pairs-missing",
        "reward",
        ["run=b17", "parent_run=default", *local("preference", "{bad:missing}", "pairs")],
        "does_not_exist",
    ),
    (
        "prompts-broken",
        "ppo",
        ["run=b18", "parent_run=default", *local("prompts", "{bad:prompts_broken}", "prompts")],
        "prompts.jsonl:2",
    ),
    (
        "prompts-utf16",
        "ppo",
        ["run=b19", "parent_run=default", *local("prompts", "{bad:utf16_jsonl}", "prompts")],
        "utf16.jsonl",
    ),
    (
        "prompt-too-long",
        "ppo",
        [
            "run=b20",
            "parent_run=default",
            "train.max_prompt_tokens=16",
            *local("prompts", "{bad:prompt_long}", "prompts"),
        ],
        "record 1",
    ),
    ("generate-missing-input", "generate", ["input={bad:missing}", "paths.root={root}"], "does_not_exist"),
    (
        "generate-binary-txt",
        "generate",
        ["input={bad:prompts_txt_binary}", "paths.root={root}", "stage=sft"],
        "prompts.txt",
    ),
    ("generate-utf16", "generate", ["input={bad:utf16_jsonl}", "paths.root={root}", "stage=sft"], "utf16.jsonl"),
    # parents, checkpoints, paths and names
    ("missing-parent-sft", "sft", ["run=fresh"], "make pretrain RUN=fresh"),
    ("missing-parent-ppo", "ppo", ["run=fresh"], "make reward RUN=fresh"),
    ("chat-not-a-policy", "chat", ["stage=reward", "paths.root={root}"], "stage=reward"),
    ("chat-no-checkpoint", "chat", ["checkpoint={bad:missing}"], "does_not_exist"),
    ("report-no-run", "report", ["run=nope", "paths.root={root}"], "make all RUN=nope"),
    ("compare-no-run", "compare", ["runs=[nope]", "paths.root={root}"], "nope"),
    ("bad-run-name", "sft", ["run=a/b"], "run name"),
    (
        "offline-hub-name",
        "pretrain",
        ["run=b21", "model=hf", "model.name_or_path=no-such-org/no-model"],
        "no-such-org/no-model",
    ),
    # force=true on finished stages with bad data: the finished stage stays as it was
    ("force-tokenizer", "tokenizer", ["force=true", *local("corpus", "{bad:binary_txt}", "text")], "corpus.txt"),
    ("force-sft", "sft", ["force=true", *local("sft", "{bad:broken_jsonl}", "messages")], "broken.jsonl:2"),
    (
        "force-reward",
        "reward",
        ["force=true", *local("preference", "{bad:pairs_no_rejected}", "pairs")],
        "pairs.jsonl:1",
    ),
    ("different-config-refused", "sft", ["train.max_steps=3"], "force=true"),
]


def test_every_entry_point_has_a_case():
    """Every command a user types (each config schema's entry point) gets at least a mistyped key here: a new stage
    or tool without one fails this test. Case names are unique (they are the test ids)."""
    from pipeline.core.config import SCHEMAS

    missing = sorted(set(SCHEMAS) - {c[1] for c in CASES})
    assert not missing, f"entry points without a bad-input case: {missing}"
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, stage, args, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_costs_nothing(name, stage, args, names, smoke_chain, bad, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = smoke_chain
    fill = lambda a: a.replace("{root}", str(root)).replace("{bad:", "\0").split("\0")  # noqa: E731
    args = [
        "".join(part if i == 0 else bad[part.split("}")[0]] + part.split("}", 1)[1] for i, part in enumerate(fill(a)))
        for a in args
    ]
    if stage in ORDER or stage in ("report",):
        args = [*SMOKE, f"paths.root={root}", *args]
    before = snapshot(root / "default")
    code, err = cli(stage, *args, capsys=capsys)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("wandb:", "Loading weights"))]
    assert code == 2, f"exit code {code}, stderr:\n{err[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one line:\n{err[-3000:]}"
    assert "Traceback" not in err
    assert names in lines[0], f"{names!r} not in: {lines[0]}"
    assert snapshot(root / "default") == before, "the finished run changed"
    assert not tracking._OPEN, "the failed stage left its tracker open (metrics.jsonl, the W&B run)"
    run = next((a.split("=", 1)[1] for a in args if a.startswith("run=")), "default")
    m_path = root / run / stage / "manifest.json"
    if run != "default" and m_path.exists():  # a stage that had begun records why it stopped, on every stage
        m = json.loads(m_path.read_text())
        assert m["status"] == "failed" and m["error"] == lines[0][len("error: ") :], m
    for stage_dir in (root / "default").glob(".*.next"):  # a failed force=true attempt says why, beside the stage
        m = json.loads((stage_dir / "manifest.json").read_text())
        assert m["status"] == "failed" and m["error"]
