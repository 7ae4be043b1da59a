"""Supervised fine-tuning helpers around TRL's SFTTrainer: the sample table at each evaluation, long dialogues
counted."""

from __future__ import annotations

from transformers import TrainerCallback

from pipeline.eval.gold import gold_eval


def count_long(tokenizer, convs: list[list[dict]], max_length: int) -> int:
    """How many conversations tokenize to more than max_length tokens."""
    n = 0
    for i in range(0, len(convs), 512):
        ids = tokenizer.apply_chat_template(convs[i : i + 512], tokenize=True, return_dict=True)["input_ids"]
        n += sum(len(x) > max_length for x in ids)
    return n


class SamplesCallback(TrainerCallback):
    """At every evaluation: fixed eval prompts answered by the current model -> a W&B table (+ samples.jsonl)."""

    def __init__(self, tok, prompts, oracle, cfg, tracker, say):
        self.tok, self.prompts, self.oracle, self.cfg, self.tracker, self.say = tok, prompts, oracle, cfg, tracker, say

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.prompts or model is None:
            return
        m, rows = gold_eval(
            model,
            self.tok,
            self.prompts,
            self.oracle,
            self.cfg.generation,
            self.cfg.train.gen_batch_size,
            seed=self.cfg.seed,
            prefix="eval/samples",
        )
        self.tracker.table("samples", ["prompt", "response", "gold_score"], rows, step=state.global_step)
        self.tracker.log({"eval/samples_gold_score": m["eval/samples/gold_score"]}, step=state.global_step)
        loss = (metrics or {}).get("eval_loss", float("nan"))
        self.say(
            f"[sft] step {state.global_step}: eval/loss {loss:.4f}, "
            f"gold score of {len(self.prompts)} samples {m['eval/samples/gold_score']:.3f}"
        )
