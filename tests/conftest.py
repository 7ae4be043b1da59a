"""Shared test helpers: compose the real configs (shrunk), and run stages as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.core.registry import SPECS

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ROOTS = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "common")
PRESETS = sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_stage(stage: str, overrides: list[str] = ()):
    import pipeline.core.config  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=stage, overrides=list(overrides))


def run_stage(
    stage: str, *overrides: str, env: dict | None = None, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m stages.<stage> overrides...` from the repo root, as `make <stage>` does."""
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    module = f"stages.{stage}" if stage in SPECS else f"stages.tools.{stage}"
    p = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{module} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """A runs root in which the smoke tokenizer and pretrain stages have run once (shared by the e2e tests)."""
    root = tmp_path_factory.mktemp("runs")
    common = ["preset=smoke", "logger=none", f"paths.root={root}"]
    run_stage("tokenizer", *common)
    run_stage("pretrain", *common)
    return root


SMOKE = ["preset=smoke", "logger=none"]


@pytest.fixture(scope="session")
def tiny_tok():
    """Our BPE tokenizer trained on a few hundred world-like sentences: the tokenizer of the tiny random models the
    generation and serving tests build."""
    from pipeline.data.tokenizer import train_bpe

    return train_bpe(
        [f"Bera is {i} years old. Tovi works as a baker. What is {i} plus {i + 1}?" for i in range(300)], 400
    )


@pytest.fixture(scope="session")
def smoke_chain(smoke_root) -> Path:
    """smoke_root plus the SFT and reward stages: everything PPO needs."""
    common = ["preset=smoke", "logger=none", f"paths.root={smoke_root}"]
    run_stage("sft", *common)
    run_stage("reward", *common)
    return smoke_root


def run_multiproc(
    stage: str,
    *overrides: str,
    nproc: int = 2,
    timeout: int = 900,
    config: str = "cpu2.yaml",
    script: Path | None = None,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """The stage under `accelerate launch` with `nproc` CPU processes (gloo), as a multi-GPU launch would run it:
    conf/accelerate/<config> (cpu2.yaml: DDP; fsdp_cpu2.yaml: FSDP2). `script` runs that file instead of
    `-m stages.<stage>`. A launch still running after `timeout` seconds fails the test with every rank's Python
    stack: each worker gets SIGUSR1 (pipeline.core.dist.stacks_on_sigusr1 prints its threads' stacks), then the
    whole launch is killed, so a hang shows where each rank waits instead of hanging the suite."""
    import signal
    import socket
    import time

    import psutil

    with socket.socket() as s:  # a free port for the rendezvous (port 0 is not understood by the workers)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    target = [str(script)] if script else ["-m", f"stages.{stage}"]
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(CONF / "accelerate" / config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(port),
        *target,
        *overrides,
    ]
    p = subprocess.Popen(
        cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "python" in c.name().lower()]
        # The workers only (SIGUSR1 would end the launcher, and with it the workers' stderr), one at a time: they
        # share one stderr, and two stacks written at once come out interleaved line by line.
        for w in workers:
            try:
                w.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
            time.sleep(1.5)
        for w in workers:  # torch's launcher starts each worker in a session of its own: killed one by one
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=60)
        raise AssertionError(
            f"accelerate launch stages.{stage} ({config}) still running after {timeout} s; killed. The Python stacks"
            f" of its {len(workers)} worker processes (SIGUSR1), then the end of its output:\n{err[-20000:]}\n"
            f"{out[-3000:]}"
        ) from None
    result = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(
            f"accelerate launch stages.{stage} ({config}) failed ({p.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
        )
    return result
