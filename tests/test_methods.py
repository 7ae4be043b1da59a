"""The method stages (bon, dpo, expert_iteration, rloo, grpo) and what they share: the one evaluation against SFT
on hand-made scores, the methods table on hand-made manifests, a DPO that must learn an obvious rule, a smoke run
of every stage on the smoke chain, and bad input as one line each."""

import importlib
import json
import math
import shutil
import sys

import pytest
from conftest import SMOKE, compose_stage, run_stage

from pipeline.eval.gold import eval_metrics, kl_bound, versus_sft, win_rate, win_rate_interval


# ---- the shared evaluation, by hand -----------------------------------------------------------------------------


def test_win_rate_interval_by_hand():
    # every prompt won, lost or tied: every resample says the same
    assert win_rate_interval([0.9] * 10, [0.1] * 10) == (1.0, 1.0)
    assert win_rate_interval([0.1] * 10, [0.9] * 10) == (0.0, 0.0)
    assert win_rate_interval([0.5] * 10, [0.5] * 10) == (0.5, 0.5)
    # 200 wins and 200 losses: win rate 0.5, and the bootstrap interval is the binomial one, 0.5 +- 1.96 * 0.5 / 20
    a, b = [1.0] * 200 + [0.0] * 200, [0.5] * 400
    assert win_rate(a, b) == 0.5
    lo, hi = win_rate_interval(a, b, resamples=2000)
    assert lo == pytest.approx(0.5 - 0.049, abs=0.01) and hi == pytest.approx(0.5 + 0.049, abs=0.01)
    assert win_rate_interval(a, b, resamples=2000) == (lo, hi)  # seeded: a resumed run reports the same
    # 3 wins, 1 tie (half), 0 losses of 4: 0.875; an interval of 4 prompts can only take quarter-and-eighth steps
    lo, hi = win_rate_interval([1, 1, 1, 0.5], [0, 0, 0, 0.5], resamples=500)
    assert win_rate([1, 1, 1, 0.5], [0, 0, 0, 0.5]) == 0.875 and 0.5 <= lo < 0.875 < hi == 1.0
    assert all(math.isnan(x) for x in win_rate_interval([], []))


def _out(gold, kl=0.0, length=5):
    n = len(gold)
    return {
        "gold": gold,
        "components": [{"total": g, "correctness": g} for g in gold],
        "reward": [0.0] * n,
        "kl": [kl] * n,
        "length": [length] * n,
        "text": ["x"] * n,
        "ended": [True] * n,
    }


def test_eval_metrics_and_versus_sft_on_known_scores():
    policy, sft = _out([0.9, 0.8, 0.2, 0.5], kl=1.5, length=7), _out([0.1, 0.8, 0.3, 0.4])
    m = eval_metrics(policy, sft, "eval/sampled", resamples=300)
    assert m["eval/sampled/win_rate_vs_sft"] == (1 + 0.5 + 0 + 1) / 4
    assert m["eval/sampled/tie_rate_vs_sft"] == 0.25 and m["eval/sampled/kl"] == 1.5
    assert m["eval/sampled/gold_score"] == pytest.approx(0.6) and m["eval/sampled/sft_gold_score"] == pytest.approx(0.4)
    assert m["eval/sampled/gold/correctness"] == pytest.approx(0.6)
    assert m["eval/sampled/win_rate_ci_low"] <= 0.625 <= m["eval/sampled/win_rate_ci_high"]
    calls = []

    def answer(who, greedy):
        calls.append((who, greedy))
        return policy if who == "policy" else sft

    metrics, outputs = versus_sft(answer, resamples=300)
    assert calls == [("policy", True), ("sft", True), ("policy", False), ("sft", False)]  # PPO's order and seeds
    assert set(outputs) == {"eval", "eval/sampled"} and metrics["eval/win_rate_vs_sft"] == 0.625
    calls.clear()
    metrics, outputs = versus_sft(answer, greedy=False, resamples=300)  # best-of-n: sampled only
    assert calls == [("policy", False), ("sft", False)] and "eval/gold_score" not in metrics
    assert kl_bound(1) == 0 and kl_bound(4) == pytest.approx(math.log(4) - 0.75)


# ---- the methods table, from hand-made manifests ---------------------------------------------------------------


def _manifest(root, stage, metrics, **extra):
    d = root / "r" / stage
    (d / "final").mkdir(parents=True)
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "stage": stage,
                "run": "r",
                "status": "complete",
                "config_hash": "x",
                "started": "2026-01-01T10:00:00+0000",
                "ended": "2026-01-01T10:06:00+0000",
                "metrics": metrics,
                **extra,
            }
        )
    )
    return d


def _method(gold, win, lo, hi, kl, **more):
    return {
        "eval/sampled/gold_score": gold,
        "eval/sampled/sft_gold_score": 0.60,
        "eval/sampled/win_rate_vs_sft": win,
        "eval/sampled/win_rate_ci_low": lo,
        "eval/sampled/win_rate_ci_high": hi,
        "eval/sampled/kl": kl,
        "eval/sampled/response_tokens": 12.0,
        "eval/sampled/sft_response_tokens": 14.0,
        "eval/sampled/n_prompts": 200,
        **more,
    }


def test_methods_table_from_hand_made_manifests(tmp_path):
    from stages.tools import methods

    root = tmp_path / "runs"
    _manifest(root, "sft", {"eval/gold_score": 0.65})
    ppo = _manifest(
        root,
        "ppo",
        _method(
            0.66,
            0.58,
            0.52,
            0.64,
            1.1,
            **{
                "eval/gold_score": 0.70,
                "eval/sft_gold_score": 0.65,
                "eval/sampled/lc_win_rate_vs_sft": 0.55,
                "eval/sampled/lc_win_rate_ci_low": 0.50,
                "eval/sampled/lc_win_rate_ci_high": 0.60,
            },
        ),
    )
    (ppo / "periodic.json").write_text(
        json.dumps(
            [
                {"iteration": 0, "kl": 0.0, "gold": 0.6, "reward": 0.0},
                {"iteration": 40, "kl": 1.0, "gold": 0.66, "reward": 0.5},
            ]
        )
    )
    _manifest(
        root,
        "bon",
        _method(0.63, 0.55, 0.49, 0.61, kl_bound(16), **{"train/tokens": 0, "time/stage_s": 60.0}),
        curve=[{"n": 1, "kl": 0.0, "gold": 0.6}, {"n": 16, "kl": kl_bound(16), "gold": 0.63}],
        reward={"ensemble": 4, "objective": "mean"},
    )
    _manifest(root, "dpo", _method(0.55, 0.41, 0.35, 0.47, 3.0, **{"eval/gold_score": 0.6, "train/tokens": 123}))
    _manifest(root, "grpo", {"eval/gold_score": 0.7})  # no sampled evaluation (failed or old): left out
    methods.main.run(compose_stage("methods", ["run=r", f"paths.root={root}"]))
    text = (root / "r" / "methods.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    }
    assert list(rows) == ["sft", "ppo", "bon", "dpo"]
    # method | optimised | gold | win [CI] | beats? | length-controlled win | KL | tokens | greedy | min | train tok
    assert rows["sft"][1:5] == ["–", "0.600", "0.50", "–"] and rows["sft"][6] == "0.00" and rows["sft"][8] == "0.650"
    assert rows["ppo"][1:5] == ["single RM", "0.660", "0.58 [0.52, 0.64]", "above"]
    assert rows["ppo"][5] == "0.55 [0.50, 0.60]" and rows["ppo"][6:9] == ["1.10", "12.0", "0.700"]
    assert rows["ppo"][9] == "6.0"  # minutes from the manifest's start and end
    assert rows["bon"][3:5] == ["0.55 [0.49, 0.61]", "no"] and rows["bon"][6] == f"{kl_bound(16):.2f}"
    assert rows["bon"][1] == "mean of 4" and rows["bon"][9] == "1.0"
    assert rows["dpo"][1] == "–" and rows["dpo"][4] == "below" and rows["dpo"][10] == "123"
    assert "Beat SFT beyond their confidence interval: ppo." in text
    assert (root / "r" / "methods.png").stat().st_size > 1000
    run_stage("compare", f"paths.root={root}")
    assert "### r" in (root / "compare.md").read_text()


# ---- the stages, end to end on the smoke chain ------------------------------------------------------------------


def _m(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())


def _curve(root, run, stage, key):
    rows = [json.loads(x) for x in (root / run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


SAMPLED = (
    "gold_score",
    "sft_gold_score",
    "win_rate_vs_sft",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "kl",
    "reward",
    "response_tokens",
)


@pytest.mark.parametrize(
    "stage, extra",
    [("bon", []), ("dpo", []), ("expert_iteration", []), ("grpo", []), ("rloo", ["train.reward=gold"])],
    ids=["bon", "dpo", "expert_iteration", "grpo", "rloo-gold"],
)
def test_method_stage_smoke(stage, extra, smoke_chain):
    common = [*SMOKE, f"paths.root={smoke_chain}", *extra]
    run_stage(stage, *common)
    m = _m(smoke_chain, "default", stage)
    assert m["status"] == "complete" and set(m["parents"]) == {"sft", "reward"}
    for k in SAMPLED:
        assert f"eval/sampled/{k}" in m["metrics"], k
    g = m["metrics"]
    assert g["eval/sampled/win_rate_ci_low"] <= g["eval/sampled/win_rate_vs_sft"] <= g["eval/sampled/win_rate_ci_high"]
    # every method is scored on the same held-out prompts with the same draw for SFT as the others and PPO's
    assert g["eval/sampled/n_prompts"] == compose_stage("ppo", SMOKE).train.eval_prompts
    final = smoke_chain / "default" / stage / "final"
    if stage == "bon":
        assert json.loads((final / "bon.json").read_text())["n"] == 4
        assert g["eval/sampled/kl"] == pytest.approx(kl_bound(4)) and [c["n"] for c in m["curve"]] == [1, 2, 4]
        assert "eval/gold_score" not in g
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(final)
        assert g["eval/sampled/kl"] > 0 and "eval/gold_score" in g and g["train/tokens"] > 0
    if stage in ("grpo", "rloo"):  # the held-out curve: before the first step, every 2 and after the last (4)
        rows = json.loads((smoke_chain / "default" / stage / "periodic.json").read_text())
        assert [r["iteration"] for r in rows] == [0, 2, 4] and rows[0]["kl"] == 0.0
    if stage == "expert_iteration":  # two rounds, each with its kept replies
        assert all((smoke_chain / "default" / stage / f"round_{r}.jsonl").is_file() for r in (1, 2))
    p = run_stage(stage, *common)  # the same command again: already complete, nothing redone
    assert "already complete" in p.stdout and _m(smoke_chain, "default", stage)["fingerprint"] == m["fingerprint"]


def test_dpo_loss_falls_on_a_preference_set_with_an_obvious_rule(smoke_chain, tmp_path):
    """Every chosen reply says the same sentence, every rejected one another: DPO must learn to prefer it."""
    pairs = tmp_path / "pairs.jsonl"
    qs = ["How old is Bera?", "What does Tovi do?", "Where does Mipor live?", "Who is Zafa's friend?"] * 8
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": "Bera is a baker."}],
                    "rejected": [{"role": "assistant", "content": "No no no no no."}],
                }
            )
            + "\n"
            for q in qs
        )
    )
    run_stage(
        "dpo",
        *SMOKE,
        f"paths.root={smoke_chain}",
        "run=rule",
        "parent_run=default",
        "data.preference.kind=local",
        f"data.preference.path={pairs}",
        "data.preference.format=pairs",
        "train.onpolicy=false",
        "train.max_prompts=null",
        "train.max_steps=12",
        "optim.lr=1e-3",
        "train.save_every=100",
        "eval.prompts=4",
    )
    loss = _curve(smoke_chain, "rule", "dpo", "train/loss")
    acc = _curve(smoke_chain, "rule", "dpo", "train/rewards/accuracies")
    assert len(loss) >= 10 and loss[0] == pytest.approx(math.log(2), abs=0.02), loss
    assert sum(loss[-3:]) / 3 < 0.4 < loss[0] and acc[-1] == 1.0, (loss, acc)


# ---- bad input: one line each ----------------------------------------------------------------------------------


def cli(name, *args, capsys):
    module = f"stages.{name}"
    main = importlib.import_module(module).main
    argv, sys.argv = sys.argv, [module, *args]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("wandb:", "Loading weights"))]


def test_bad_input_is_one_line(smoke_chain, tmp_path, capsys):
    common = [*SMOKE, f"paths.root={smoke_chain}"]
    no_prompt = tmp_path / "noprompt.jsonl"
    no_prompt.write_text(json.dumps({"chosen": "Bera is a baker.", "rejected": "Bera is a cook."}) + "\n")
    other = tmp_path / "runs"
    shutil.copytree(smoke_chain / "default" / "sft", other / "other" / "sft")  # an SFT policy, no reward model
    cases = [
        (
            "dpo",
            [
                *common,
                "run=np",
                "parent_run=default",
                "data.preference.kind=local",
                f"data.preference.path={no_prompt}",
                "data.preference.format=pairs",
            ],
            "noprompt.jsonl:1",
        ),
        ("bon", [*SMOKE, f"paths.root={other}", "run=other"], "make reward RUN=other"),
        ("grpo", [*SMOKE, f"paths.root={other}", "run=other"], "make reward RUN=other"),
        ("bon", [*common, "bon.n=0"], "bon.n=0 must be positive"),
        ("expert_iteration", [*common, "train.samples=0"], "train.samples=0 must be positive"),
        ("grpo", [*common, "train.num_generations=1"], "train.num_generations=1 must be at least 2"),
        ("rloo", [*common, "train.batch_size=6"], "multiple of train.num_generations"),
        ("dpo", [*common, "train.loss_type=nope"], "train.loss_type='nope'"),
        ("rloo", [*common, "train.reward=oracle"], "train.reward"),
        ("dpo", [*common, "train.betta=1"], "train.beta"),
    ]
    for stage, args, names in cases:
        code, lines = cli(stage, *args, capsys=capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (stage, args, lines)
        assert names in lines[0], (names, lines[0])
    m = _m(smoke_chain, "np", "dpo")  # a stage that had begun records why it stopped
    assert m["status"] == "failed" and "noprompt.jsonl:1" in m["error"]
    assert not (other / "other" / "bon").exists()


# ---- bench/methods.py: over seeds, on the smoke preset ------------------------------------------------------------


def _bench():
    import runpy

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return runpy.run_path(str(REPO / "bench" / "methods.py"))
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_bench_summary_over_seeds_by_hand():
    def row(m, g, beats):
        return {"method": m, "gold": g, "win": 0.6, "beats": beats, "kl": 1.0, "length": 10.0, "minutes": 2.0}

    s = {r["method"]: r for r in _bench()["summarise"]({0: [row("dpo", 0.5, "above")], 1: [row("dpo", 0.7, "no")]})}
    assert s["dpo"]["seeds"] == 2 and s["dpo"]["gold"] == pytest.approx(0.6)
    assert s["dpo"]["sd"] == pytest.approx(0.1414, abs=1e-4) and (s["dpo"]["above"], s["dpo"]["below"]) == (1, 0)


def test_bench_runs_methods_over_a_seed(smoke_chain):
    out = _bench()["main"](
        [
            "--runs-root",
            str(smoke_chain),
            "--run",
            "default",
            "--preset",
            "smoke",
            "--seeds",
            "0",
            "--methods",
            "bon,rloo",
        ]
    )
    methods = [r["method"] for r in out["per_seed"][0]]
    assert methods == ["sft", "ppo", "bon", "rloo"], methods
    assert set(out["speed"]) == {"ppo (ours)", "rloo (TRL)"} and all(v[0] > 0 for v in out["speed"].values())
    assert out["minutes"][0] > 0 and (smoke_chain / "default__seed0" / "methods.md").is_file()
    # one evaluation: SFT's sampled answers are the same draw whether PPO's final evaluation or a method's made them
    sft = {
        s: _m(smoke_chain, "default__seed0", s)["metrics"]["eval/sampled/sft_gold_score"]
        for s in ("ppo", "bon", "rloo")
    }
    assert len(set(sft.values())) == 1, sft


def test_rloo_and_grpo_read_the_reward_model_as_ppo_does(smoke_chain):
    """TRL hands the reward function its own completion tokens; rebuilt into PPO's rollout, they must score exactly
    what PPO's readout gives the same replies (normalised with the reward stage's statistics, unfinished replies
    below finished ones), and the text readout agrees on finished replies."""
    import torch

    from pipeline.data.prompts import prompt_batch
    from pipeline.data.tokenizer import end_of_turn_ids, load_tokenizer
    from pipeline.inference.sampler import decode_responses, sample
    from pipeline.models.loading import load_causal_lm, load_sequence_classifier
    from pipeline.models.token_model import TokenModel
    from pipeline.rl.readout import score_rollout, score_texts, turn_closing
    from pipeline.rl.shaping import penalise_unfinished
    from pipeline.trainers.group_rl import PipelineReward
    from pipeline.world.oracle import GoldOracle

    d = smoke_chain / "default"
    tok = load_tokenizer(d / "sft" / "final", need_chat_template=True)
    policy = TokenModel(load_causal_lm(d / "sft" / "final").eval())
    rm = TokenModel(load_sequence_classifier(d / "reward" / "final").eval())
    stats = _m(smoke_chain, "default", "reward")["reward_stats"]
    prompts = [[{"role": "user", "content": q}] for q in ("How old is Bera?", "What does Tovi do?")] * 4
    torch.manual_seed(0)
    ids, am = prompt_batch(tok, prompts, 192, "cpu")
    ro = sample(policy, tok, ids, am, end_of_turn_ids(tok), 12, 1.0)
    completion_ids = [r[m].tolist() for r, m in zip(ro.response_ids, ro.response_mask)]  # what TRL passes
    texts = decode_responses(tok, ro)
    reward = PipelineReward(
        "model", tok, end_of_turn_ids(tok), 192, rm, turn_closing(tok), stats=stats, missing_eos_penalty=1.0
    )
    got = reward(prompts, [[{"role": "assistant", "content": x}] for x in texts], completion_ids=completion_ids)
    ppo = penalise_unfinished((score_rollout(rm, ro, turn_closing(tok)) - stats["mean"]) / stats["std"], ro.ended, 1.0)
    assert got == pytest.approx(ppo.tolist(), abs=1e-5)
    # the text readout (re-tokenizing the decoded reply) agrees wherever the reply's tokens survive the round trip;
    # where they do not, TRL's tokens are what the policy said, hence the rebuilt rollout
    text = score_texts(rm, tok, prompts, texts)
    same = [
        e and tok(x, add_special_tokens=False)["input_ids"] == c[:-1]
        for x, c, e in zip(texts, completion_ids, ro.ended.tolist())
    ]
    assert any(same)
    for g, x, ok in zip(got, text, same):
        if ok:
            assert g == pytest.approx((x - stats["mean"]) / stats["std"], abs=1e-4)
    gold = PipelineReward("gold", tok, [], 192, oracle=GoldOracle.from_config(compose_stage("grpo", SMOKE).data.world))
    assert gold(prompts, [[{"role": "assistant", "content": x}] for x in texts]) == pytest.approx(
        gold.oracle.score_batch(prompts, texts)
    )
