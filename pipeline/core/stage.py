"""What every stage does between finding its parents and its first real step, in one place:

    state = PartialState(cpu=not torch.cuda.is_available())   # or the stage's Accelerator
    run = StageRun(cfg, is_main=state.is_main_process)
    sft = run.parent("sft")                                     # lookups first: a redone parent makes this stale
    begun = begin_stage(cfg, run, state, parents=[sft])
    if begun is None:                                           # already complete with this config: nothing to do
        return
    tracker, say, t0 = begun

A stage's failure is recorded, and its tracker closed, in one place: `failures_recorded`, which the entry point
(pipeline.core.entry) wraps every command in, and a library caller wraps a stage function in. A stage has no except
block of its own.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, NamedTuple, Optional, Sequence

from pipeline.core.runs import StageRun, fail_current
from pipeline.core.tracking import Tracker, close_open


class Begun(NamedTuple):
    tracker: Tracker  # metrics.jsonl and W&B, the parents' artifacts used
    say: Callable[..., None]  # print on the main process, nothing on the others
    t0: float  # when the stage's work began (time/stage_s)


def begin_stage(cfg, run: StageRun, group, parents: Sequence[Optional[dict]] = ()) -> Optional[Begun]:
    """Decide whether the stage runs (every process of `group`, a PartialState or an Accelerator, from the same
    manifest), then seed, open the tracker with its parents' lineage and quiet the datasets progress bars. None when
    the stage is already complete with this config and these parents."""
    import datasets
    from accelerate.utils import set_seed

    if not run.begin(barrier=group.wait_for_everyone):
        return None
    t0 = time.time()
    set_seed(cfg.seed)
    tracker = Tracker(cfg, run, group.is_main_process)
    for p in parents:
        if p:
            tracker.use_parent(p)
    datasets.disable_progress_bars()
    say = print if group.is_main_process else (lambda *a, **k: None)
    return Begun(tracker, say, t0)


@contextlib.contextmanager
def failures_recorded():
    """Whatever stops the stage run inside (an exception, Ctrl-C; not a clean exit) is recorded in its manifest as
    `failed` with the reason, and every tracker it opened is closed (the W&B run marked failed); then it goes on up."""
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            fail_current(e)
        close_open()
        raise
