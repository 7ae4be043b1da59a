"""SFT and reward stages: the assistant-only loss mask, batches that keep a prompt's pairs together, an end-to-end
smoke run (tokenizer -> pretrain -> sft -> reward, then chat and generate on the result), and one clear line for
each bad input."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import SMOKE, compose_stage

from pipeline.core.errors import UserError

SFT_METRICS = {
    "eval/loss",
    "eval/gold_score",
    "eval/pretrain_gold_score",
    "eval/ended_fraction",
    "eval/response_tokens",
    "eval/gold/correctness",
}
RM_METRICS = {
    "eval/accuracy",
    "eval/gold_accuracy",
    "eval/ece",
    "eval/margin",
    "eval/loss",
    "reward/mean",
    "reward/std",
    "reward/gold_correlation",
    "reward/gold_pair_accuracy",
    "data/onpolicy_pairs",
    "onpolicy/label_agreement",
    "onpolicy/gold_mean",
}


def manifest(root: Path, stage: str, run: str = "default") -> dict:
    return json.loads((root / run / stage / "manifest.json").read_text())


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# ---- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_smoke_configs_compose_and_shrink(stage):
    cfg = compose_stage(stage, SMOKE + ["train.max_steps=2", "peft=lora", "generation=sample"])
    assert cfg.stage == stage and cfg.train.max_steps == 2 and cfg.peft.enabled and cfg.generation.do_sample
    cpu = compose_stage(stage)
    assert cpu.train.max_steps > compose_stage(stage, SMOKE).train.max_steps


def test_inference_configs_compose():
    for name in ("chat", "generate"):
        cfg = compose_stage(name, ["stage=sft", "generation=beam"])
        assert cfg.stage == "sft" and cfg.generation.num_beams > 1


# ---- the assistant-only loss mask --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(smoke_root):
    """The smoke pretrained checkpoint: our tokenizer with its chat template, a small Llama."""
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models.loading import load_causal_lm

    final = smoke_root / "default" / "pretrain" / "final"
    return load_tokenizer(final, need_chat_template=True), load_causal_lm(final), final


def test_assistant_only_loss_covers_exactly_the_assistant_turns(tiny, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    from pipeline.trainers.hf import trainer_args

    tok, model, _ = tiny
    cfg = compose_stage("sft", SMOKE)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How old is Bera?"},
        {"role": "assistant", "content": "Bera is 34 years old."},
        {"role": "user", "content": "And Tovi?"},
        {"role": "assistant", "content": "Tovi is 12."},
    ]
    args = trainer_args(
        SFTConfig,
        cfg,
        SimpleNamespace(ckpt_root=tmp_path),
        cfg.train,
        evaluate=False,
        max_length=128,
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list([{"messages": msgs}]), processing_class=tok
    )
    ex = trainer.train_dataset[0]
    spans, cur = [], []
    for i, label in zip(ex["input_ids"], ex["labels"]):
        if label != -100:
            assert label == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    # Each assistant turn with its <|end|> (so the model learns to stop); nothing of the system or user turns.
    assert [tok.decode(s) for s in spans] == ["Bera is 34 years old.<|end|>", "Tovi is 12.<|end|>"]
    n_masked = sum(label == -100 for label in ex["labels"])
    assert n_masked == len(ex["input_ids"]) - sum(map(len, spans)) > 10


# ---- group_by_prompt -------------------------------------------------------------------------------------------


def _check_groups(batches, groups):
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(len(groups)))  # every pair once per epoch
    for b in batches:
        for g in {groups[i] for i in b}:  # a group in a batch is there whole
            assert {i for i in b if groups[i] == g} == {i for i, x in enumerate(groups) if x == g}


def test_group_batch_sampler_keeps_groups_whole():
    from pipeline.trainers.reward import GroupBatchSampler

    groups = [f"p{g}" for g in range(20) for _ in range(3 + g % 4)]
    s = GroupBatchSampler(groups, groups_per_batch=3, seed=0)
    epochs = []
    for epoch in (0, 1, 0):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 7
        _check_groups(batches, groups)
        epochs.append(batches)
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1]  # reshuffled per epoch, reproducibly


def test_reward_trainer_batches_whole_groups(tiny, tmp_path):
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig

    from pipeline.trainers.hf import trainer_args
    from pipeline.trainers.reward import make_trainer_class

    tok, _, final = tiny
    rm = AutoModelForSequenceClassification.from_pretrained(final, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {g}?"}],
            "chosen": [{"role": "assistant", "content": f"Good answer {g}.{k}"}],
            "rejected": [{"role": "assistant", "content": f"Bad {g}"}],
            "group": f"g{g}",
        }
        for g in range(12)
        for k in range(6 - g % 3)
    ]
    cfg = compose_stage("reward", SMOKE + ["train.batch_size=10"])
    args = trainer_args(
        RewardConfig, cfg, SimpleNamespace(ckpt_root=tmp_path), cfg.train, evaluate=False, max_length=128
    )
    trainer = make_trainer_class(True, seed=0)(
        model=rm, args=args, processing_class=tok, train_dataset=datasets.Dataset.from_list(rows)
    )
    dl = trainer.get_train_dataloader()
    groups = [r["group"] for r in rows]
    batches = list(dl.batch_sampler)
    _check_groups(batches, groups)
    assert len({len({groups[i] for i in b}) for b in batches[:-1]}) == 1  # the same number of prompts per batch
    first = next(iter(dl))  # each distinct completion once: here every chosen differs, a group shares its rejected
    n_groups = len({groups[i] for i in batches[0]})
    assert first["pair_index"].shape == (len(batches[0]), 2)
    assert first["input_ids"].shape[0] == len(batches[0]) + n_groups
    # The same loss as TRL's RewardTrainer on the usual chosen-half / rejected-half batch of those pairs.
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(first))
        usual = trainer.data_collator([trainer.train_dataset[i] for i in batches[0]])
        theirs = super(type(trainer), trainer).compute_loss(trainer.model, dict(usual))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_collate_groups_scores_each_completion_once():
    from pipeline.trainers.reward import collate_groups

    a, b, c = [5, 6, 7], [5, 8], [5, 9, 9, 9]
    batch = collate_groups(
        [
            {"chosen_ids": a, "rejected_ids": b},
            {"chosen_ids": a, "rejected_ids": c},
            {"chosen_ids": b, "rejected_ids": c},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 0, 0], [5, 9, 9, 9]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 4]
    assert batch["pair_index"].tolist() == [[0, 1], [0, 2], [1, 2]]


# ---- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_done(smoke_chain):
    """smoke_root after `python -m stages.sft` and `python -m stages.reward` (conftest's smoke_chain, which the PPO
    tests share), run as a user would."""
    return smoke_chain


def test_sft_end_to_end(sft_done):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = manifest(sft_done, "sft")
    assert m["status"] == "complete" and m["adapter"] is False
    assert SFT_METRICS <= m["metrics"].keys(), sorted(m["metrics"])
    d = sft_done / "default" / "sft"
    final = d / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and "{% generation %}" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    assert not (d / "checkpoints").exists()  # resume points go once the stage is complete
    rows = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16] and rows[0]["columns"] == ["prompt", "response", "gold_score"]
    assert any(json.loads(x).get("eval/loss") for x in (d / "metrics.jsonl").read_text().splitlines())


def test_reward_end_to_end_and_reruns_are_noops(sft_done, capsys):
    from transformers import AutoModelForSequenceClassification

    from stages.reward import run_reward
    from stages.sft import run_sft

    m = manifest(sft_done, "reward")
    assert m["status"] == "complete" and RM_METRICS <= m["metrics"].keys(), sorted(m["metrics"])
    # the statistics PPO normalises with are the ones measured (a reward model that reads one fixed token, e.g.
    # padding, scores every answer alike: std 0)
    assert m["reward_stats"] == {"mean": m["metrics"]["reward/mean"], "std": m["metrics"]["reward/std"]}
    assert m["reward_stats"]["std"] > 0
    final = sft_done / "default" / "reward" / "final"
    rm = AutoModelForSequenceClassification.from_pretrained(final)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    assert json.loads((final / "reward_stats.json").read_text())["mean"] == m["reward_stats"]["mean"]
    _check_test_pair_metrics(rm, final, m["metrics"])

    # the SFT policy's own samples, ranked by the simulated labellers, saved in reward_data/'s format
    from pipeline.data.formats import expand_pairs
    from pipeline.world.oracle import GoldOracle

    cfg = compose_stage("reward", SMOKE)
    records = [json.loads(x) for x in (final.parent / "onpolicy_comparisons.jsonl").read_text().splitlines()]
    assert 0 < len(records) <= cfg.onpolicy.prompts == m["metrics"]["onpolicy/prompts"]
    assert m["metrics"]["onpolicy/ranked_prompts"] == len(records)
    assert m["metrics"]["data/onpolicy_pairs"] == len(expand_pairs(records)) > 0
    oracle = GoldOracle.from_config(cfg.data.world)
    for rec in records:
        assert 2 <= len(set(rec["responses"])) == len(rec["responses"]) <= cfg.onpolicy.samples
        assert sorted(rec["ranks"]) == list(range(len(rec["responses"])))
        assert [round(oracle.score(rec["prompt"], r), 4) for r in rec["responses"]] == rec["gold_scores"]

    for fn, stage in ((run_sft, "sft"), (run_reward, "reward")):
        fn(compose_stage(stage, SMOKE + [f"paths.root={sft_done}"]))
        assert "nothing to do" in capsys.readouterr().out


def _check_test_pair_metrics(rm, final, metrics):
    """The reward stage's eval/* recomputed here from its final reward model on the test pairs it evaluates (the
    first train.max_test_prompts prompts of data.preference_test whose pairs fit max_length), each sequence scored
    alone by the classifier's own pooling: accuracy is the share of positive margins (ties half), gold accuracy
    the share that agree in sign with the gold margin (gold ties left out), ECE sigmoid(margin)'s calibration
    computed by hand, margin and Bradley-Terry loss their means."""
    import math

    import torch

    from pipeline.data.formats import check_prompt_lengths, load_preferences
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.rl.readout import conversation_ids
    from pipeline.trainers.reward import first_groups

    cfg = compose_stage("reward", SMOKE)
    t = cfg.train
    tok = load_tokenizer(final, need_chat_template=True)
    max_len = min(t.max_length or cfg.model.max_seq_len, rm.config.max_position_embeddings)
    pairs = first_groups(load_preferences(cfg.data.preference_test, cfg.data.world)[0], t.max_test_prompts)
    pairs = check_prompt_lengths(pairs, tok, max_len, cfg.data.preference_test.on_bad_record, "test")[0]
    margins, gold = [], []
    rm.eval()
    with torch.no_grad():
        for p in pairs:
            ids = [conversation_ids(tok, list(p["prompt"]) + list(p[side])) for side in ("chosen", "rejected")]
            if max(map(len, ids)) > max_len:
                continue
            c, r = (float(rm(input_ids=torch.tensor([x])).logits[0, 0]) for x in ids)
            margins.append(c - r)
            gold.append(p.get("gold_margin"))
    n = len(margins)
    assert n == metrics["eval/pairs"] > 0 and n + metrics["eval/too_long_pairs"] == len(pairs)
    assert metrics["eval/accuracy"] == sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in margins) / n
    judged = [(x, g) for x, g in zip(margins, gold) if g]
    assert metrics["eval/gold_pairs"] == len(judged) > 0
    agree = [0.5 if x == 0 else float((x > 0) == (g > 0)) for x, g in judged]
    assert metrics["eval/gold_accuracy"] == pytest.approx(sum(agree) / len(agree))
    assert metrics["eval/margin"] == pytest.approx(sum(margins) / n, abs=1e-5)
    assert metrics["eval/loss"] == pytest.approx(sum(math.log(1 + math.exp(-x)) for x in margins) / n, abs=1e-5)
    # ECE: the chosen reply is always the labelled winner, so the confidence is sigmoid(|margin|) and the
    # prediction is right when the margin is positive; 10 bins of width 0.05 over [0.5, 1]
    bins = {}
    for x in margins:
        conf = 1 / (1 + math.exp(-abs(x)))
        bins.setdefault(min(int((conf - 0.5) / 0.05), 9), []).append((conf, float(x > 0)))
    ece = sum(abs(sum(r for _, r in b) - sum(c for c, _ in b)) for b in bins.values()) / n
    print(
        f"\nreward model on {n} test pairs: accuracy {metrics['eval/accuracy']:.4f}, ECE {metrics['eval/ece']:.5f} "
        f"(by hand {ece:.5f}), {len(bins)} bins in use"
    )
    assert metrics["eval/ece"] == pytest.approx(ece, abs=1e-5)


def test_preference_metrics_by_hand():
    """Accuracy, gold accuracy, margin and ECE of four hand-picked margins, worked out by hand."""
    import math

    from pipeline.eval.reward_model import preference_metrics

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # margins 2.0 (right, confidence 0.881, bin [0.85, 0.9)), -2.1 (wrong, 0.891, the same bin), 0.0 (a tie: half
    # right for accuracy, a wrong prediction at confidence 0.5, bin [0.5, 0.55)), 0.5 (right, 0.622, bin [0.6, 0.65))
    m = preference_metrics([2.0, 0.0, 1.0, 0.5], [0.0, 2.1, 1.0, 0.0], gold_margins=[1.0, 1.0, 0.0, -1.0])
    assert m["eval/accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["eval/margin"] == pytest.approx((2.0 - 2.1 + 0 + 0.5) / 4)
    assert m["eval/pairs"] == 4
    assert m["eval/gold_accuracy"] == pytest.approx(1 / 3) and m["eval/gold_pairs"] == 3  # the gold tie left out
    ece = (2 * abs(0.5 - (sig(2.0) + sig(2.1)) / 2) + abs(0.0 - 0.5) + abs(1.0 - sig(0.5))) / 4
    assert m["eval/ece"] == pytest.approx(ece, abs=1e-12)
    assert ece == pytest.approx(0.41231, abs=1e-5)


def test_chat_and_generate_on_the_sft_checkpoint(sft_done, tmp_path):
    from pipeline.core.runs import resolve_checkpoint
    from pipeline.models.loading import load_policy
    from stages.tools.chat import chat
    from stages.tools.generate import run_generate

    cfg = compose_stage("chat", [f"paths.root={sft_done}", "stage=sft", "generation.max_new_tokens=8"])
    path, label, _ = resolve_checkpoint(cfg)
    assert label == "default/sft"
    model, tok = load_policy(path)
    said = iter(["Hello?", "/reset", "What is 2 plus 2?", "/quit"])
    out = []
    chat(model, tok, cfg, read=lambda _: next(said), write=out.append)
    assert "".join(out).count("bot> ") == 2 and "(new conversation)" in "".join(out)

    (tmp_path / "q.jsonl").write_text(
        '{"prompt": "How old is Bera?"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n'
    )
    out = run_generate(
        compose_stage(
            "generate",
            [f"paths.root={sft_done}", f"input={tmp_path / 'q.jsonl'}", "stage=sft", "generation.max_new_tokens=8"],
        )
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert out.name == "q.sft.responses.jsonl" and len(rows) == 2 and {"response", "ended"} <= rows[0].keys()
    out = run_generate(
        compose_stage("generate", [f"paths.root={sft_done}", "stage=sft", "limit=3", "generation.max_new_tokens=8"])
    )
    assert all("gold_score" in json.loads(x) for x in out.read_text().splitlines())


def test_chat_picks_the_latest_policy_stage(tmp_path):
    from pipeline.core.runs import resolve_checkpoint

    def done(stage, run="default"):
        d = tmp_path / run / stage
        (d / "final").mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": stage, "status": "complete"}))

    def pick(*overrides):
        return resolve_checkpoint(compose_stage("chat", [f"paths.root={tmp_path}", *overrides]))[1]

    with pytest.raises(UserError) as e:
        pick()
    assert "make sft" in one_line(e)
    for s in ("tokenizer", "pretrain", "sft", "reward"):
        done(s)
    assert pick() == "default/sft"  # reward is newer, but it is no chat model
    done("ppo")
    assert pick() == "default/ppo" and pick("stage=pretrain") == "default/pretrain"
    for bad in ("stage=reward", "stage=sft", f"checkpoint={tmp_path / 'nowhere'}"):
        with pytest.raises(UserError) as e:
            pick(bad, *(["run=other"] if bad == "stage=sft" else []))
        one_line(e)


# ---- bad input: one clear line ---------------------------------------------------------------------------------


def test_missing_parent_stage(tmp_path):
    from stages.reward import run_reward
    from stages.sft import run_sft

    for fn, stage, parent in ((run_sft, "sft", "pretrain"), (run_reward, "reward", "sft")):
        with pytest.raises(UserError) as e:
            fn(compose_stage(stage, SMOKE + [f"paths.root={tmp_path}"]))
        assert f"stage '{parent}'" in one_line(e) and f"make {parent}" in str(e.value)


def test_tokenizer_without_chat_template(smoke_root, tmp_path):
    from stages.sft import run_sft

    folder = tmp_path / "no_template"
    shutil.copytree(smoke_root / "default" / "pretrain" / "final", folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(UserError) as e:
        run_sft(compose_stage("sft", SMOKE + [f"paths.root={tmp_path}", f"model.name_or_path={folder}"]))
    assert "no chat template" in one_line(e)


def test_reward_data_without_usable_pairs(sft_done, tmp_path):
    from stages.reward import run_reward

    same = {"prompt": "Q?", "chosen": "A.", "rejected": "A."}  # chosen == rejected: a bad record, skipped
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(same) for _ in range(3)) + "\n")
    common = SMOKE + [
        f"paths.root={sft_done}",
        "parent_run=default",
        "data.preference.kind=local",
        f"data.preference.path={tmp_path / 'pairs.jsonl'}",
        "data.preference.format=pairs",
    ]
    with pytest.raises(UserError) as e:
        run_reward(compose_stage("reward", common + ["run=nopairs", "data.preference.on_bad_record=skip"]))
    assert "no usable preference" in one_line(e) and "3 bad" in str(e.value)
    with pytest.raises(UserError) as e:  # the default on_bad_record=error names the file and line instead
        run_reward(compose_stage("reward", common + ["run=badpair"]))
    assert "pairs.jsonl:1" in one_line(e)

    wordy = {"prompt": "Why?", "chosen": "Because. " * 100, "rejected": "No. " * 100}  # fits no max_length of 128
    (tmp_path / "wordy.jsonl").write_text(json.dumps(wordy) + "\n")
    with pytest.raises(UserError) as e:
        run_reward(
            compose_stage(
                "reward",
                common[:-2]
                + [f"data.preference.path={tmp_path / 'wordy.jsonl'}", "data.preference.format=pairs", "run=wordy"],
            )
        )
    assert "no usable preference pairs" in one_line(e) and "max_length=128" in str(e.value)

    long = {"prompt": "Why? " * 400, "chosen": "A.", "rejected": "B."}
    (tmp_path / "long.jsonl").write_text(json.dumps(long) + "\n")
    with pytest.raises(UserError) as e:
        run_reward(
            compose_stage(
                "reward",
                common[:-2]
                + [f"data.preference.path={tmp_path / 'long.jsonl'}", "data.preference.format=pairs", "run=longprompt"],
            )
        )
    assert "longer than" in one_line(e)


def test_onpolicy_comparisons_need_the_world_and_two_samples(sft_done, tmp_path, capsys):
    from pipeline.core.config import problems
    from stages.reward import run_reward

    assert problems(compose_stage("reward", SMOKE + ["onpolicy.samples=1"])) == [
        "onpolicy.samples=1 must be at least 2 (a ranking compares replies)"
    ]
    assert problems(compose_stage("reward", SMOKE + ["onpolicy.prompts=0", "onpolicy.samples=1"])) == []
    # other preference data has no oracle to label samples: said once, and the stage trains on the data alone
    pairs = [{"prompt": f"Question {i}?", "chosen": "A fine answer.", "rejected": "no"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run_reward(
        compose_stage(
            "reward",
            SMOKE
            + [
                f"paths.root={sft_done}",
                "parent_run=default",
                "run=localpairs",
                "data.preference.kind=local",
                "data.preference.format=pairs",
                "train.max_steps=2",
                f"data.preference.path={tmp_path / 'pairs.jsonl'}",
            ],
        )
    )
    assert "onpolicy.prompts=16 ignored" in capsys.readouterr().out
    m = manifest(sft_done, "reward", "localpairs")
    assert m["status"] == "complete" and "data/onpolicy_pairs" not in m["metrics"]
    assert not (sft_done / "localpairs" / "reward" / "onpolicy_comparisons.jsonl").exists()


def test_simulated_labellers_rank_by_the_gold_score():
    import random

    from pipeline.core.config import WorldConfig
    from pipeline.world.labellers import distinct_prompts, label_agreement, labelled
    from pipeline.world.oracle import GoldOracle

    oracle = GoldOracle.from_config(WorldConfig())
    p = [{"role": "user", "content": "What is 9 plus 8?"}]
    replies = ["That makes 17.", "That makes 16.", "Bananas"]
    sharp = labelled("x", p, replies, oracle, 1e-3, random.Random(0))  # no noise: the gold order
    assert sharp["gold_scores"][0] > sharp["gold_scores"][1] > sharp["gold_scores"][2]
    assert sharp["ranks"] == [0, 1, 2] and label_agreement([sharp]) == 1.0
    noisy = [labelled("x", p, replies, oracle, 1.0, random.Random(s)) for s in range(200)]
    assert 0.4 < label_agreement(noisy) < 0.9  # T=1 is far noisier than the data's 0.21: some labels flip
    groups = [{"group": g, "prompt": [{"role": "user", "content": g}]} for g in "aabbbcd"]
    assert [q[0]["content"] for q in distinct_prompts(groups, 3)] == ["a", "b", "c"]


def test_pair_accuracy_compares_answers_to_the_same_prompt_only():
    import math

    from pipeline.eval.reward_model import pair_accuracy

    # (reward, gold): prompt 1 has pairs (a,b) right, (a,c) right, (b,c) wrong; prompt 2 a gold tie (skipped),
    # prompt 3 a reward tie (half); across prompts nothing is compared, though there every order would be wrong
    groups = [[(2.0, 1.0), (1.0, 0.5), (1.5, 0.0)], [(9.0, 0.3), (9.0, 0.3)], [(-5.0, 0.2), (-5.0, 0.9)]]
    assert pair_accuracy(groups) == (1 + 1 + 0 + 0.5) / 4
    assert math.isnan(pair_accuracy([[(1.0, 0.5), (2.0, 0.5)], [(3.0, 0.1)]]))


# ---- resume ----------------------------------------------------------------------------------------------------


def test_interrupted_sft_resumes_from_its_last_checkpoint(sft_done):
    from transformers import TrainerCallback

    from stages.sft import run_sft

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    cfg = compose_stage(
        "sft",
        SMOKE
        + [
            f"paths.root={sft_done}",
            "run=resume",
            "parent_run=default",
            "train.max_steps=8",
            "train.save_every=4",
            "train.eval_every=8",
            "train.sample_prompts=0",
            "train.gold_eval_prompts=4",
            "train.eval_pretrained=false",
        ],
    )
    from pipeline.core.stage import failures_recorded

    with pytest.raises(KeyboardInterrupt), failures_recorded():  # as the entry point runs every stage
        run_sft(cfg, callbacks=(Crash(),))
    d = sft_done / "resume" / "sft"
    assert manifest(sft_done, "sft", "resume")["status"] == "failed"
    assert [p.name for p in (d / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (d / "final").exists()
    run_sft(cfg)
    m = manifest(sft_done, "sft", "resume")
    assert m["status"] == "complete" and m["resumed_from"] == 4 and "eval/loss" in m["metrics"]
    assert not (d / "checkpoints").exists()
