"""Talk to a checkpoint in the terminal, the reply streaming in as it is generated.

    make chat                                        # the latest complete policy stage of the run (ppo, sft, pretrain)
    make chat ARGS="stage=sft"                       # that stage of the run
    make chat ARGS="checkpoint=path/to/folder generation=greedy system='Answer briefly.'"
    python -m stages.tools.chat run=lr3e-4 generation.temperature=1.0

The conversation is kept: each reply sees the earlier turns (the oldest fall out once they exceed the model's
context). /reset starts over, /quit or Ctrl-D leaves; Ctrl-C stops a reply mid-way.
"""

from __future__ import annotations

import sys
import threading

from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.runs import resolve_checkpoint


def chat(model, tok, cfg, read=input, write=sys.stdout.write) -> None:
    """The read-reply loop; `read`/`write` are parameters so tests can drive it."""
    from pipeline.inference.generation import stream

    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(system)
    turn = 0
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            return
        if line == "/reset":
            history = list(system)
            write("(new conversation)\n")
            continue
        if line.startswith("/"):
            write("commands: /reset (new conversation), /quit\n")
            continue
        history.append({"role": "user", "content": line})
        write("bot> ")
        stop = threading.Event()
        pieces = []
        try:
            for piece in stream(model, tok, history, cfg.generation, seed=cfg.seed + turn, stop=stop):
                pieces.append(piece)
                write(piece)
                getattr(sys.stdout, "flush", lambda: None)()
        except KeyboardInterrupt:
            stop.set()
            write(" (stopped)")
        write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
        turn += 1


@entry("chat")
def main(cfg: DictConfig) -> None:
    from pipeline.models.loading import load_policy

    path, label, _ = resolve_checkpoint(cfg)
    model, tok = load_policy(path, cfg.precision)
    g = cfg.generation
    how = (
        "greedy"
        if not g.do_sample and g.num_beams == 1
        else f"beam search ({g.num_beams})"
        if not g.do_sample
        else f"sampling (temperature {g.temperature}, top_p {g.top_p})"
    )
    print(
        f"chatting with {label} ({path}), {how}, up to {g.max_new_tokens} tokens a reply. "
        f"/reset starts over, /quit leaves."
    )
    chat(model, tok, cfg)


if __name__ == "__main__":
    main()
