"""PPO end to end on the smoke chain: the stage's contract, and that it really learns."""

import json
import shutil

import pytest
from conftest import REPO, SMOKE, compose_stage, run_stage

from pipeline.core.io import inventory


def _metrics(root, run, stage):
    return json.loads((root / run / stage / "manifest.json").read_text())["metrics"]


def _curve(root, run, key):
    rows = [json.loads(x) for x in (root / run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def check_greedy_eval(root, run, overrides=(), nproc=1):
    """Recompute the PPO stage's greedy held-out evaluation (eval/...) from its saved outputs and the two final
    checkpoints, without the stage's evaluation code: the eval/samples table must hold every held-out prompt once, in
    prompt order, whichever process answered it (process r answers prompts r, r + nproc, ..., eval_batch_size at a
    time, and the shards are gathered back into prompt order); the gold oracle must give its texts their recorded
    scores; win and tie rates, gold scores and components are recomputed from those rows; the greedy replies are
    generated again from ppo/final and its parent sft/final (plain `generate`, cut after the first end of turn, the
    same batches as each process) and must be the table's; and the KL along PPO's replies is summed here, token by
    token, from the two models' tempered next-token distributions. Returns the KL recomputed."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.formats import load_prompts
    from pipeline.data.prompts import prompt_batch
    from pipeline.data.tokenizer import end_of_turn_ids, load_tokenizer
    from pipeline.world.oracle import GoldOracle

    cfg = compose_stage("ppo", [*SMOKE, *overrides])
    t, m = cfg.train, _metrics(root, run, "ppo")
    prompts = [p["messages"] for p in load_prompts(cfg.data.eval_prompts, cfg.data.world, REPO / cfg.paths.cache)[0]]
    prompts = prompts[: t.eval_prompts]
    n = len(prompts)
    batches = [
        mine[s : s + t.eval_batch_size]
        for r in range(nproc)  # what each process generated at once
        for mine in [list(range(n))[r::nproc]]
        for s in range(0, len(mine), t.eval_batch_size)
    ]
    assert m["eval/n_prompts"] == n and sorted(i for b in batches for i in b) == list(range(n))

    table = [json.loads(x) for x in (root / run / "ppo" / "eval_samples.jsonl").read_text().splitlines()][-1]
    assert table["columns"] == ["prompt", "sft", "sft_gold", "ppo", "ppo_gold"] and table["step"] == t.iterations
    rows = table["rows"]
    assert 0 < n <= 32 and len(rows) == n  # the table keeps 32 rows: all of them here
    assert [r[0] for r in rows] == [p[-1]["content"] for p in prompts]
    oracle = GoldOracle.from_config(cfg.data.world)
    parts = {
        who: [oracle.components(p, r[col]) for p, r in zip(prompts, rows)]
        for who, col in (("gold", 3), ("sft_gold", 1))
    }
    for who, col in (("gold", 4), ("sft_gold", 2)):
        assert [c["total"] for c in parts[who]] == [r[col] for r in rows], who
        for k in parts[who][0]:
            key = f"eval/{who}/{k}" if k != "total" else ("eval/gold_score" if who == "gold" else "eval/sft_gold_score")
            assert m[key] == pytest.approx(sum(c[k] for c in parts[who]) / n, abs=1e-9), key
    ppo_gold, sft_gold = [r[4] for r in rows], [r[2] for r in rows]
    wins = sum(p > s for p, s in zip(ppo_gold, sft_gold))
    ties = sum(p == s for p, s in zip(ppo_gold, sft_gold))
    assert m["eval/win_rate_vs_sft"] == pytest.approx((wins + 0.5 * ties) / n, abs=1e-12)
    assert m["eval/tie_rate_vs_sft"] == pytest.approx(ties / n, abs=1e-12)

    tok = load_tokenizer(root / run / "ppo" / "final", need_chat_template=True)
    ends = torch.tensor(end_of_turn_ids(tok))
    sft_run = json.loads((root / run / "ppo" / "manifest.json").read_text())["parent_runs"]["sft"]
    models = {
        w: AutoModelForCausalLM.from_pretrained(root / r / w / "final", dtype=torch.float32).eval()
        for w, r in (("ppo", run), ("sft", sft_run))
    }
    texts, lengths, kls = {"ppo": {}, "sft": {}}, {"ppo": {}, "sft": {}}, {}  # by prompt index
    with torch.no_grad():
        for b in batches:
            ids, am = prompt_batch(tok, [prompts[i] for i in b], t.max_prompt_tokens, "cpu")
            P = ids.shape[1]
            for who, model in models.items():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=am,
                    do_sample=False,
                    max_new_tokens=t.max_new_tokens,
                    eos_token_id=ends.tolist(),
                    pad_token_id=tok.pad_token_id,
                )
                resp = out[:, P:]
                is_end = torch.isin(resp, ends)
                keep = (is_end.cumsum(-1) - is_end.long()) == 0  # up to and including the first end of turn
                texts[who].update(
                    zip(b, (tok.decode(r[k], skip_special_tokens=True).strip() for r, k in zip(resp, keep)))
                )
                lengths[who].update(zip(b, keep.sum(-1).tolist()))
                if who == "ppo":  # KL(PPO || SFT) at the sampling temperature, along PPO's reply
                    mask = torch.cat([am, keep.long()], 1)
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)
                    lp, lq = (
                        torch.log_softmax(
                            models[w](input_ids=out, attention_mask=mask, position_ids=pos)
                            .logits[:, P - 1 : -1]
                            .float()
                            / t.temperature,
                            -1,
                        )
                        for w in ("ppo", "sft")
                    )
                    kls.update(zip(b, ((lp.exp() * (lp - lq)).sum(-1) * keep).sum(-1).tolist()))
    for who, col in (("ppo", 3), ("sft", 1)):
        assert [texts[who][i] for i in range(n)] == [r[col] for r in rows], who
    assert m["eval/response_tokens"] == pytest.approx(sum(lengths["ppo"].values()) / n, abs=1e-9)
    assert m["eval/sft_response_tokens"] == pytest.approx(sum(lengths["sft"].values()) / n, abs=1e-9)
    kl = sum(kls.values()) / n
    print(
        f"\n{run}: eval/kl {m['eval/kl']:.6g}, recomputed {kl:.6g}; win rate {m['eval/win_rate_vs_sft']}, "
        f"ties {m['eval/tie_rate_vs_sft']}"
    )
    assert m["eval/kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    return kl


def test_ppo_stage_contract(smoke_chain):
    run_stage("ppo", *SMOKE, f"paths.root={smoke_chain}")
    m = _metrics(smoke_chain, "default", "ppo")
    for k in ("eval/gold_score", "eval/sft_gold_score", "eval/win_rate_vs_sft", "eval/kl", "eval/reward"):
        assert k in m, k
    # win and tie rates, gold scores and KL recomputed from the saved replies and the two checkpoints; the policy
    # moved, so its KL from SFT is positive (0 would mean the reference is the policy itself)
    assert check_greedy_eval(smoke_chain, "default") > 0
    # the components are the oracle's: their weighted sum is the gold score, for PPO and for SFT alike
    from pipeline.world.oracle import WEIGHTS

    for who, total in (("gold", "eval/gold_score"), ("sft_gold", "eval/sft_gold_score")):
        parts = sum(w * m[f"eval/{who}/{k}"] for k, w in WEIGHTS.items())
        assert parts == pytest.approx(m[total], abs=1e-6)  # each total is rounded to 6 places
    for k in (
        "eval/sampled/gold_score",
        "eval/sampled/sft_gold_score",
        "eval/sampled/win_rate_vs_sft",
        "eval/sampled/tie_rate_vs_sft",
        "eval/sampled/kl",
    ):
        assert k in m, k
    assert m["eval/sampled/kl"] > 0
    # held-out evaluations before the first iteration, every train.eval_every (2) and after the last (4)
    assert len(_curve(smoke_chain, "default", "periodic/gold_score")) == 3
    kl = _curve(smoke_chain, "default", "periodic/kl")
    assert kl[0] == 0.0 and kl[-1] > 0  # SFT itself: the same model reads the same logits, exactly; then it moved
    d = smoke_chain / "default" / "ppo"
    assert len(json.loads((d / "periodic.json").read_text())) == 3
    assert (d / "overoptimization.png").stat().st_size > 1000
    for key in (
        "ppo/score",
        "ppo/gold_score",
        "ppo/kl",
        "ppo/kl_coef",
        "ppo/entropy",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/value_loss",
        "ppo/explained_variance",
        "ppo/response_length",
        "ppo/ratio_mean",
        "ppo/gen_tokens_per_s",
        "ppo/episodes_per_s",
        "ppo/grad_norm",
        "ppo/value_grad_norm",
    ):
        assert len(_curve(smoke_chain, "default", key)) == 4, key
    # training tokens (the methods table's cost column): each iteration adds its 8 episodes' replies and their
    # prompts (at least one token each), and the manifest holds the total
    tokens, lengths = (
        _curve(smoke_chain, "default", "train/tokens"),
        _curve(smoke_chain, "default", "ppo/response_length"),
    )
    added = [b - a for a, b in zip([0, *tokens], tokens)]
    assert all(n >= 8 * (r + 1) for n, r in zip(added, lengths)), (added, lengths)
    assert m["train/tokens"] == tokens[-1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(d / "final")


def test_ppo_that_cannot_move_stays_the_sft_policy(smoke_chain):
    """optim.lr=0: every update leaves the weights as they were, so the trained policy is the SFT model and every
    comparison with SFT must come out even, greedy and sampled (PPO and SFT sample with the same seed): KL exactly 0,
    every reply a tie (win rate 0.5, tie rate 1), the same gold score, reward and length. The SFT figures are also
    those the trained run measured for SFT (same model, prompts and seeds), recomputed here by another process
    through the policy's side of the evaluation: an SFT evaluation that used the trained policy, or a PPO one
    seeded unlike SFT's, fails this."""
    from safetensors.torch import load_file

    common = [*SMOKE, f"paths.root={smoke_chain}"]
    run_stage("ppo", *common)  # the trained run (already complete when the contract test ran first)
    still = ["optim.lr=0", "train.iterations=2"]
    run_stage("ppo", *common, "run=still", "parent_run=default", *still)
    a = load_file(smoke_chain / "still" / "ppo" / "final" / "model.safetensors")
    b = load_file(smoke_chain / "default" / "sft" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # the premise: nothing moved
    m, trained = _metrics(smoke_chain, "still", "ppo"), _metrics(smoke_chain, "default", "ppo")
    for prefix in ("eval", "eval/sampled"):
        assert m[f"{prefix}/kl"] == 0.0, prefix
        assert m[f"{prefix}/win_rate_vs_sft"] == 0.5 and m[f"{prefix}/tie_rate_vs_sft"] == 1.0, prefix
        for k in ("gold_score", "reward", "response_tokens"):
            assert m[f"{prefix}/{k}"] == m[f"{prefix}/sft_{k}"], (prefix, k)
            assert m[f"{prefix}/sft_{k}"] == trained[f"{prefix}/sft_{k}"], (prefix, k)
    assert check_greedy_eval(smoke_chain, "still", still) == pytest.approx(0.0, abs=1e-7)
    # the periodic evaluations draw the same samples each time: the same policy scores the same, at KL 0, and as
    # the trained run's policy did before its first update
    rows = json.loads((smoke_chain / "still" / "ppo" / "periodic.json").read_text())
    first = json.loads((smoke_chain / "default" / "ppo" / "periodic.json").read_text())[0]
    assert [r["iteration"] for r in rows] == [0, 2]
    assert all({**r, "iteration": 0} == first for r in rows) and first["kl"] == 0.0, (rows, first)
    # training: the sampler's log-probs against the reference's, and the PPO ratio, up to float rounding
    assert max(map(abs, _curve(smoke_chain, "still", "ppo/kl"))) < 1e-5
    assert max(abs(x - 1) for x in _curve(smoke_chain, "still", "ppo/ratio_mean")) < 1e-5
    assert _curve(smoke_chain, "still", "ppo/clipfrac") == [0.0, 0.0]


RULE = [
    "train.reward=contains:is",
    "train.iterations=6",
    "train.rollout_batch_size=16",
    "train.minibatch_size=8",
    "train.kl_coef=0",
    "train.missing_eos_penalty=null",
    "train.save_every=100",
    "train.eval_prompts=4",
]


def test_ppo_learns_a_trivially_learnable_reward(smoke_chain):
    """Reward 1 when the reply contains 'is': a wrong gradient sign, mask or advantage fails this."""
    run_stage("ppo", *SMOKE, f"paths.root={smoke_chain}", "run=rule", "parent_run=default", *RULE, "optim.lr=1e-3")
    r = _curve(smoke_chain, "rule", "ppo/reward")
    assert len(r) == 6
    assert sum(r[-2:]) / 2 > sum(r[:2]) / 2 + 0.2, r
    assert _curve(smoke_chain, "rule", "ppo/kl")[-1] > 0.1  # it moved away from the SFT policy to get there
    # its greedy replies differ from SFT's: the evaluation's win rate, ties and KL, recomputed from them
    assert check_greedy_eval(smoke_chain, "rule", RULE) > 0.1


def test_ppo_with_lora_learns_through_the_adapter_against_the_base(smoke_chain):
    """LoRA on the actor: the adapter learns the rule, and the reference is the adapter-disabled base (were it the
    adapted policy itself, the KL would stay 0); final/ is the merged model, a plain checkpoint."""
    run_stage(
        "ppo",
        *SMOKE,
        f"paths.root={smoke_chain}",
        "run=lora",
        "parent_run=default",
        "peft=lora",
        *RULE,
        "optim.lr=3e-3",
    )
    r = _curve(smoke_chain, "lora", "ppo/reward")
    assert sum(r[-2:]) / 2 > sum(r[:2]) / 2 + 0.2, r
    assert _curve(smoke_chain, "lora", "ppo/kl")[-1] > 0.1
    final = smoke_chain / "lora" / "ppo" / "final"
    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()


def test_reward_model_with_another_vocabulary_is_refused(smoke_chain, tmp_path):
    from pipeline.data.tokenizer import train_bpe

    root = tmp_path / "runs"
    for stage in ("sft", "reward"):
        shutil.copytree(smoke_chain / "default" / stage, root / "other" / stage)
    final = root / "other" / "reward" / "final"
    train_bpe([f"zebra {i} quux" for i in range(300)], 300, 1).save_pretrained(final)
    manifest = root / "other" / "reward" / "manifest.json"  # a whole, finished stage: just another vocabulary
    m = json.loads(manifest.read_text())
    m["final_files"] = inventory(final)
    manifest.write_text(json.dumps(m))
    p = run_stage("ppo", *SMOKE, f"paths.root={root}", "run=other", check=False)
    assert p.returncode == 2 and "differs from the policy's" in p.stderr and "Traceback" not in p.stderr
    assert not (root / "other" / "ppo" / "final").exists()


def test_missing_reward_stage_names_the_command(tmp_path):
    p = run_stage("ppo", *SMOKE, f"paths.root={tmp_path}", check=False)
    assert p.returncode == 2 and "make reward" in p.stderr


def test_report_card_and_compare(smoke_chain):
    """The report card and the comparison read the finished stages back: headline metrics, where the gold score
    comes from (each component for pretrained, SFT and PPO), answers side by side; compare lists the runs."""
    from pipeline.world.oracle import WEIGHTS

    common = [*SMOKE, f"paths.root={smoke_chain}"]
    run_stage("ppo", *common)  # already complete when the contract test ran first
    p = run_stage("report", *common, "samples=2")
    assert "PPO gold" in p.stdout
    text = (smoke_chain / "default" / "report.md").read_text()
    assert "| ppo | `eval/win_rate_vs_sft` |" in text and "**Prompt 2.**" in text and "- *ppo* [" in text
    rows = [line for line in text.splitlines() if line.split("|")[1:2] and line.split("|")[1].strip() in WEIGHTS]
    assert len(rows) == len(WEIGHTS)
    m = _metrics(smoke_chain, "default", "ppo")
    for line in rows:
        k, w, pre, sft, sft_ppo, ppo = [c.strip() for c in line.strip("|").split("|")]
        assert float(w) == WEIGHTS[k] and pre != "–" and sft != "–"
        assert float(sft_ppo) == pytest.approx(m[f"eval/sft_gold/{k}"], abs=1e-3)
        assert float(ppo) == pytest.approx(m[f"eval/gold/{k}"], abs=1e-3)
    c = run_stage("compare", f"paths.root={smoke_chain}")
    compared = (smoke_chain / "compare.md").read_text()
    assert "compare:" in c.stdout and "| default |" in compared
    # the PPO stage's periodic held-out evaluations make the over-optimisation figure across runs
    assert (smoke_chain / "default" / "ppo" / "periodic.json").is_file() and "ppo_overoptimization.png" in compared
    assert (smoke_chain / "compare_figs" / "ppo_overoptimization.png").stat().st_size > 1000
    bad = run_stage("compare", f"paths.root={smoke_chain}", "runs=[nope]", check=False)
    assert bad.returncode == 2 and "no such run" in bad.stderr and "Traceback" not in bad.stderr
