"""Which share of the work this process does under `accelerate launch`, and putting the shares back together.

One sharding rule for every stage: every world-size-th item from the process's rank, padded so that every process
runs the same number of forward passes (`shard`), and `gather` to concatenate the results on every process.
"""

from __future__ import annotations

import functools


def rank_and_world():
    """(rank, world size) of this process; (0, 1) outside accelerate."""
    from accelerate import PartialState

    s = PartialState()
    return s.process_index, s.num_processes


def shard(n: int) -> list[int]:
    """The indices of n items this process handles (every world-size-th, from its rank). Every process gets the
    same count: a short shard repeats its first index (drop repeats with `seen`), because under FSDP / ZeRO-3 all
    processes must run the same number of forward passes or they wait for each other forever."""
    rank, world = rank_and_world()
    mine = list(range(rank, n, world))
    per = -(-n // world)
    return mine + [mine[0] if mine else 0] * (per - len(mine)) if n else []


def gather(items: list) -> list:
    """Concatenate every process's `items` (a plain list outside accelerate)."""
    if rank_and_world()[1] == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack to stderr and the process goes on: where a hung rank
    waits. Multi-process tests send it to every rank before they kill a launch that ran out of time."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (ValueError, OSError, AttributeError):  # stderr is not a real file (a stage run inside pytest's capture)
            pass


def allow_fsdp_on_cpu() -> None:
    """Make `accelerate launch` with an FSDP config (conf/accelerate/fsdp_cpu2.yaml) really shard on CPU processes.

    accelerate 1.16 turns FSDP into plain data parallelism when there is no GPU: its state takes the FSDP branch only
    for GPU-like process groups, so on CPU the FSDP plugin is dropped without a word, the run is MULTI_CPU (DDP), and
    a test of "FSDP on CPU" proves nothing. FSDP2 itself (torch's fully_shard over gloo) works on CPU, so this lifts
    that one gate: when the launcher asked for FSDP and the state came out MULTI_CPU, the state becomes FSDP with the
    launcher's plugin, exactly as it would on GPUs. It changes nothing on a GPU or without an FSDP launch. Called once
    per process by every entry point (pipeline.core.entry), before any Accelerator exists."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # every later state reads it

    init._fsdp_on_cpu = True
    AcceleratorState.__init__ = init


def launch() -> dict:
    """How this process was launched, for the manifest: the world size, the parallelism and its sharding settings,
    read from the environment `accelerate launch` sets (so it is known before any process group exists)."""
    import os

    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        keys = ("VERSION", "RESHARD_AFTER_FORWARD", "AUTO_WRAP_POLICY", "STATE_DICT_TYPE", "OFFLOAD_PARAMS")
        keys += ("CPU_RAM_EFFICIENT_LOADING",)
        return {
            "world_size": world,
            "parallelism": "fsdp",
            "sharding": {k.lower(): env[f"FSDP_{k}"] for k in keys if f"FSDP_{k}" in env},
        }
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return {"world_size": world, "parallelism": "deepspeed", "sharding": {"zero_stage": stage}}
    return {"world_size": world, "parallelism": "ddp" if world > 1 else "none", "sharding": None}
