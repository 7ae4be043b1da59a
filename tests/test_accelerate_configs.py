"""Every conf/accelerate/*.yaml read by accelerate's own config loader, as `accelerate launch --config_file` reads
it: the configs that cannot run here (GPUs, DeepSpeed: docs/scaling.md) are at least well-formed and say what
their comments promise. The ones that can run are run: cpu2.yaml in tests/test_multiproc.py, fsdp_cpu2.yaml in
tests/test_fsdp.py."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "accelerate"

# name: (distributed type, processes, mixed precision, what the sharding must say)
EXPECTED = {
    "cpu2.yaml": (DistributedType.MULTI_GPU, 2, "no", {}),  # the torchrun launcher; gloo when there is no GPU
    "gpu1.yaml": (DistributedType.NO, 1, "bf16", {}),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, "bf16", {}),
    "fsdp_8gpu.yaml": (DistributedType.FSDP, 8, "bf16", {"fsdp_version": 2}),
    "fsdp_cpu2.yaml": (DistributedType.FSDP, 2, "no", {"fsdp_version": 2}),
    "zero2.yaml": (DistributedType.DEEPSPEED, 8, "bf16", {"zero_stage": 2}),
    "zero3.yaml": (DistributedType.DEEPSPEED, 8, "bf16", {"zero_stage": 3, "zero3_save_16bit_model": True}),
    "zero2_cpu2.yaml": (DistributedType.DEEPSPEED, 2, "no", {"zero_stage": 2}),
    "zero3_cpu2.yaml": (DistributedType.DEEPSPEED, 2, "no", {"zero_stage": 3, "zero3_save_16bit_model": True}),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_as_accelerate_reads_it(name):
    c = load_config_from_file(str(CONFIGS / name))
    kind, n, precision, sharding = EXPECTED[name]
    assert (c.distributed_type, c.num_processes, c.mixed_precision) == (kind, n, precision)
    section = c.deepspeed_config if kind == DistributedType.DEEPSPEED else c.fsdp_config
    assert {k: section.get(k) for k in sharding} == sharding
    if kind == DistributedType.FSDP:  # the two FSDP configs shard the same way; only the hardware differs
        assert c.fsdp_config == load_config_from_file(str(CONFIGS / "fsdp_8gpu.yaml")).fsdp_config
    if name.endswith("_cpu2.yaml"):  # the CPU stand-ins: sharded as their GPU configs, on CPU processes
        assert c.use_cpu
        gpu = load_config_from_file(str(CONFIGS / name.replace("_cpu2", "").replace("fsdp", "fsdp_8gpu")))
        if kind == DistributedType.DEEPSPEED:
            assert c.deepspeed_config == gpu.deepspeed_config


def test_whole_weights_sets_zero3_aside_for_its_block_only(tmp_path):
    """Under ZeRO-3 (the config a Trainer's arguments install), transformers partitions every from_pretrained;
    inside pipeline.models.loading.whole_weights it does not, and after it the Trainer's config is back. (DeepSpeed
    is not installed here: the held config is a stand-in with its one method.)"""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import deepspeed as hf_ds

    from pipeline.models.loading import load_causal_lm, whole_weights

    LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)

    class Stage3:  # what transformers asks of the held config (HfDeepSpeedConfig itself needs DeepSpeed installed)
        def is_zero3(self):
            return True

    held = Stage3()
    hf_ds.set_hf_deepspeed_config(held)
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        with whole_weights():
            assert not hf_ds.is_deepspeed_zero3_enabled()
            model = load_causal_lm(str(tmp_path))  # loaded whole: not one zero.Init partition
        assert model.model.embed_tokens.weight.shape == (64, 16)
        assert hf_ds.is_deepspeed_zero3_enabled() and hf_ds._hf_deepspeed_config_weak_ref() is held
    finally:
        hf_ds.unset_hf_deepspeed_config()
    with whole_weights():  # without ZeRO-3 it changes nothing
        assert not hf_ds.is_deepspeed_zero3_enabled()
