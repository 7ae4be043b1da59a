"""Stage 0 — train a byte-level BPE tokenizer on the pretraining corpus.

    make tokenizer                               # = python -m stages.tokenizer
    python -m stages.tokenizer model.vocab_size=8192 run=big-vocab

Skipped when model.name_or_path names a pretrained model: that model brings its own tokenizer. Under several
processes the main one trains and saves it while the others wait (BPE training is one multi-threaded job).
"""

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.runs import StageRun
from pipeline.core.tracking import Tracker
from pipeline.data.formats import load_corpus
from pipeline.data.tokenizer import train_bpe


@entry("tokenizer")
def main(cfg: DictConfig) -> None:
    if cfg.model.name_or_path:
        print(f"[tokenizer] skipped: model.name_or_path={cfg.model.name_or_path} brings its own tokenizer")
        return
    state = PartialState(cpu=not torch.cuda.is_available())
    run = StageRun(cfg, is_main=state.is_main_process)
    if not run.begin(barrier=state.wait_for_everyone):
        return
    if not state.is_main_process:
        state.wait_for_everyone()  # until the main process has saved final/
        return
    tracker = Tracker(cfg, run)

    docs, skipped = load_corpus(cfg.data.corpus, cfg.data.world, cfg.paths.cache)
    docs = docs[: cfg.data.max_docs] if cfg.data.max_docs else docs
    sample = docs[: cfg.train.max_docs] if cfg.train.max_docs else docs
    print(f"[tokenizer] training BPE to {cfg.model.vocab_size} tokens on {len(sample)} documents")
    tok = train_bpe(sample, cfg.model.vocab_size, cfg.train.min_frequency)

    # Compression on documents the BPE did not see: a quick sanity figure for the vocabulary size.
    held = docs[len(sample) :][:2000] or docs[:2000]
    n_tok = sum(len(x) for x in tok(held, add_special_tokens=False)["input_ids"])
    metrics = {
        "tokenizer/vocab_size": len(tok),
        "tokenizer/chars_per_token": sum(map(len, held)) / max(n_tok, 1),
        "data/skipped_records": skipped,
    }
    print(f"[tokenizer] vocab {len(tok)}, {metrics['tokenizer/chars_per_token']:.2f} chars/token")
    tracker.log(metrics, step=0)
    run.finish(tok.save_pretrained, metrics)
    tracker.finish(metrics, run.final_dir)
    print(f"[tokenizer] saved {run.final_dir}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
