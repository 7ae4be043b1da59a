"""Run directories, manifests and the handoff between stages.

    runs/<run>/<stage>/
        config.yaml        the resolved config this stage ran with
        manifest.json      stage, run, status, config hash, parent fingerprint, versions, git commit, times, metrics
        metrics.jsonl      every logged metric (the report reads these, no network needed)
        checkpoints/       intermediate resume points, removed once the stage completes
        final/             a plain Hugging Face checkpoint; appears only when complete (written aside, then renamed)

A stage finds its input only through its parent's manifest. A finished stage with the same config (and the same
parent) is not redone; a different config is refused unless `force=true`, so finished work is never overwritten
by accident.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.core.dist import launch
from pipeline.core.errors import UserError
from pipeline.core.io import damaged, inventory, write_json_atomic
from pipeline.core.registry import ORDER, POLICIES, POLICY_STAGES, SPECS, split_folder, stage_folder

# Keys that never change what a stage computes, so they stay out of the config hash.
_UNHASHED = {"run", "parent_run", "force", "paths", "logger"}
# settings added after runs were made, at the value that behaves as before: left out of the hash at that value, so
# a finished stage stays finished when the code learns a new switch (a whole group: None as the key)
_ADDED_AT = [
    ("model", "start_over", False),
    ("train", "ensemble", 1),
    ("train", "ensemble_diversity", "seed"),
    ("train", "reward_objective", "mean"),
    ("train", "uwo_lambda", 1.0),
    ("bon", "reward_objective", "mean"),
    ("bon", "uwo_lambda", 1.0),
    ("alarm", None, {"enabled": True, "window": 5, "rise": 1.0, "patience": 3}),
    ("iterate", "fresh_share", None),
]


_PACKAGES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "wandb", "hydra-core", "tokenizers"]


def config_hash(cfg: DictConfig) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    c = {k: v for k, v in c.items() if k not in _UNHASHED}
    if c.get("round", 1) == 1:  # round 1 is the one-shot stage: the iteration settings do not reach it
        c.pop("round", None)
        c.pop("iterate", None)
    for group, key, value in _ADDED_AT:  # switches added later, at their old behaviour: runs keep their hash
        if key is None and c.get(group) == value:
            c.pop(group)
        elif (
            key is not None
            and isinstance(c.get(group), dict)
            and key in c[group]
            and c[group][key] == value
            and type(c[group][key]) is type(value)
        ):
            c[group].pop(key)
    used = SPECS[c["stage"]].data if c.get("stage") in SPECS else None
    if used is not None and isinstance(c.get("data"), dict):
        data = c["data"]
        c["data"] = {k: (data[k] if "." not in k else data[k.split(".")[0]][k.split(".")[1]]) for k in used}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_command(stage: str, run: str, overrides: Optional[list[str]] = None, extra: str = "") -> str:
    """The make command that (re)makes `stage` of `run` with the same overrides (preset included) it was, or would
    be, made with; `extra` is appended to ARGS (e.g. force=true)."""
    overrides = list(overrides or [])
    preset = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "preset"), None)
    args = [o for o in overrides if o.split("=", 1)[0] not in ("preset", "run", "force", "parent_run", "round")]
    args += [extra] if extra else []
    stage, r = split_folder(stage)
    target = f"make {stage}" if r == 1 else f"make iterate ROUNDS={r}"  # a later round is made by make iterate
    return (
        target
        + ("" if run == "default" else f" RUN={run}")
        + (f" PRESET={preset}" if preset else "")
        + (f' ARGS="{" ".join(args)}"' if args else "")
    )


def command_overrides() -> list[str]:
    """The overrides this command was started with (Hydra's task overrides; empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # Hydra not initialised (tests, library use)
        return []


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def describe_unfinished(m: dict, stage: str, run: str, overrides: list[str]) -> str:
    """Why a stage is not complete, in words, with the command that fixes it: failed (and why), interrupted (its
    process is gone: rerunning resumes it), or still running (and where)."""
    status = m.get("status")
    again = make_command(stage, run, m.get("overrides", overrides))
    if status == "failed":
        return f"failed ({m.get('error', 'no reason recorded')}); fix that and rerun: {again}"
    if status == "running":
        if m.get("host") == platform.node() and m.get("pid") and not _alive(m["pid"]):
            return f"interrupted (its process {m['pid']} is gone); resume it: {again}"
        return (
            f"still running (process {m.get('pid', '?')} on {m.get('host', '?')}); wait for it, or if it is dead: "
            f"{again}"
        )
    return f"not complete (status: {status}); make it: {again}"


_CURRENT: list = []  # the StageRun this process has begun, so the entry point can record a failure on any stage


def failure_reason(e: BaseException) -> str:
    """What a manifest records of why a stage stopped: a UserError's own line, else the exception's first line."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(e, UserError):
        return str(e)
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def fail_current(e: BaseException) -> None:
    """Record why the stage this process is running stopped (any exception, Ctrl-C included) in its manifest."""
    for run in _CURRENT:
        run.fail(failure_reason(e))


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> Optional[str]:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(stage_dir: Path) -> Optional[dict]:
    p = Path(stage_dir) / "manifest.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{p}: unreadable manifest ({e}); delete the stage folder or rerun with force=true")


def run_name(cfg: DictConfig) -> str:
    """The run's folder name. In a Hydra sweep (-m) each job gets its own run, suffixed by its overrides,
    while parents are still looked up in the base run (parent_run)."""
    name = cfg.run
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            ov = [o for o in hc.overrides.task if o.split("=")[0].lstrip("+~") not in ("run", "force", "parent_run")]
            suffix = re.sub(r"[^A-Za-z0-9._=,-]+", "_", ",".join(ov))
            name = f"{name}__{suffix}" if suffix else f"{name}__{hc.job.num}"
    except ValueError:  # Hydra not initialised (tests, library use)
        pass
    if not re.fullmatch(r"[A-Za-z0-9._=,+-]+(__[A-Za-z0-9._=,+-]+)?", name):
        raise UserError(f"run name '{name}' may only use letters, digits and . _ = , + -")
    return name


class StageRun:
    """One stage of one run: its folder, its manifest, its parent, its checkpoints."""

    def __init__(self, cfg: DictConfig, is_main: bool = True):
        self.cfg = cfg
        self.stage = cfg.stage
        self.round = int(cfg.get("round", 1) or 1)  # make iterate's round; 1: the one-shot stage
        self.name = stage_folder(self.stage, self.round)  # its folder in the run: ppo, or ppo_r2 for round 2
        self.run = run_name(cfg)
        self.parent_run = cfg.parent_run or cfg.run
        self.root = Path(cfg.paths.root)
        self.dir = self.root / self.run / self.name
        self.final_dir = self.dir / "final"
        self.ckpt_root = self.dir / "checkpoints"
        self.is_main = is_main
        self.hash = config_hash(cfg)
        self.replacing: Optional[Path] = None  # the finished stage folder a force=true run will replace
        self.parents: dict[str, dict] = {}
        self.manifest: dict = {}

    # ---- parents -------------------------------------------------------------------------------------------
    def parent(self, stage: str) -> dict:
        """The complete manifest of `stage` in the parent run, or one line saying how to make it. A later round of
        make iterate looks in its own run first: its rounds (and the round-1 policy they continue) live there, while
        the chain it grew from (sft, the first reward model) may be parent_run's."""
        where = self.parent_run
        if self.round > 1 and (split_folder(stage)[1] > 1 or (self.root / self.run / stage).exists()):
            where = self.run
        d = self.root / where / stage
        m = read_manifest(d)
        ov = command_overrides()
        if m is None:
            raise UserError(
                f"stage '{stage}' of run '{where}' is missing ({d}); make it first: {make_command(stage, where, ov)}"
            )
        if m.get("status") != "complete" or not (d / "final").is_dir():
            raise UserError(f"stage '{stage}' of run '{where}' is {describe_unfinished(m, stage, where, ov)} ({d})")
        problem = damaged(d / "final", m.get("final_files", {}))
        if problem:
            raise UserError(
                f"{d / 'final'} is damaged ({problem}); redo it: "
                f"{make_command(stage, where, m.get('overrides', ov), 'force=true')}"
            )
        m["dir"] = str(d)
        m["final"] = str(d / "final")
        self.parents[stage] = m
        return m

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def _parent_fingerprints(self) -> dict:
        return {s: m.get("fingerprint") for s, m in sorted(self.parents.items())}

    def begin(self, barrier: Callable[[], None] = lambda: None) -> bool:
        """Decide whether to run. Returns False when the stage is already complete with this config.
        Call after `parent()` lookups so a re-done parent makes this stage stale. Every process decides from the
        same manifest before the main one rewrites it (hence the barrier)."""
        old = read_manifest(self.dir)
        same = (
            old is not None
            and old.get("config_hash") == self.hash
            and old.get("parents", {}) == self._parent_fingerprints()
        )
        if old and old.get("status") == "complete" and self.final_dir.is_dir():
            if same and not self.cfg.force:
                if self.is_main:
                    print(
                        f"[{self.name}] already complete in {self.dir} (config {self.hash}); "
                        f"nothing to do (force=true reruns it)"
                    )
                return False
            if not self.cfg.force:
                why = "a different config" if old.get("config_hash") != self.hash else "an older parent stage"
                raise UserError(
                    f"{self.dir} holds a finished '{self.name}' made with {why}; "
                    f"add force=true to replace it, or run=<new name> parent_run={self.parent_run} for a new "
                    f"run beside it"
                )
            # force=true over a finished stage is a transaction: the new run is made beside it, in .<stage>.next/,
            # and swapped in by one rename when it completes; until then (and if it fails) children see the old one
            self._stage_in(self.dir.parent / f".{self.name}.next")
            old = read_manifest(self.dir)  # an earlier forced attempt with the same config is resumed
            if old and (old.get("config_hash") != self.hash or old.get("parents", {}) != self._parent_fingerprints()):
                if self.is_main:
                    shutil.rmtree(self.dir, ignore_errors=True)
                old = None
        if old and old.get("config_hash") != self.hash and self.ckpt_root.exists():
            # Resume points of another config are useless here and would be picked up by mistake.
            if self.is_main:
                print(f"[{self.name}] discarding checkpoints of a different config in {self.ckpt_root}")
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
        barrier()
        if self.is_main:
            self._check_writable()
            self.manifest = {
                "stage": self.stage,
                "round": self.round,
                "run": self.run,
                "status": "running",
                "config_hash": self.hash,
                "parents": self._parent_fingerprints(),
                "parent_runs": {s: m["run"] for s, m in self.parents.items()},
                "versions": _versions(),
                "git_commit": _git_commit(),
                "host": platform.node(),
                "pid": os.getpid(),
                "launch": launch(),  # world size, and FSDP's / ZeRO's sharding when launched with them
                "overrides": [o for o in command_overrides() if o.split("=", 1)[0].lstrip("+~") != "force"],
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "metrics": {},
                "resumed_from": None,
            }
            if old and old.get("status") != "complete" and old.get("config_hash") == self.hash:
                self.manifest["started"] = old.get("started", self.manifest["started"])
            self._write_manifest()
            (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        _CURRENT[:] = [self]
        return True

    def _stage_in(self, d: Path) -> None:
        """Make this run's files in `d`, to be swapped with the stage's folder by `finish`."""
        self.replacing, self.dir = self.dir, d
        self.final_dir, self.ckpt_root = d / "final", d / "checkpoints"

    def _check_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write_probe_{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"cannot write to {self.dir}: {e.strerror or e}; "
                f"set paths.root=<writable folder> or fix its permissions"
            )

    def _write_manifest(self) -> None:
        write_json_atomic(self.dir / "manifest.json", self.manifest)

    def update(self, **fields) -> None:
        if self.is_main:
            self.manifest.update(fields)
            self._write_manifest()

    def fail(self, reason: str) -> None:
        if self.is_main and self.manifest and self.manifest.get("status") == "running":
            self.update(status="failed", error=reason, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Optional[Path]:
        """Newest complete resume point. Incomplete ones never have their final name (written aside, renamed);
        one damaged after the fact (a file truncated or deleted) is refused with a clear message."""
        if not self.ckpt_root.is_dir():
            return None
        done = sorted(
            p for p in self.ckpt_root.iterdir() if re.fullmatch(r"step_\d{8}", p.name) and (p / "state.json").exists()
        )
        if not done:
            return None
        try:
            files = json.loads((done[-1] / "state.json").read_text()).get("files", {})
        except (json.JSONDecodeError, OSError):
            files, problem = {}, "state.json is unreadable"
        else:
            problem = damaged(done[-1], files)
        if problem:
            raise UserError(
                f"checkpoint {done[-1]} is damaged ({problem}); delete that folder to resume from "
                f"the one before it, or pass force=true to start the stage over"
            )
        return done[-1]

    def load_checkpoint(self, ckpt: Path, load: Callable[[Path], None]) -> int:
        """Restore a resume point with `load(dir)`; a failure is reported as one line, not a library traceback."""
        try:
            load(ckpt)
        except Exception as e:  # noqa: BLE001 — whatever the library raised, the user's fix is the same
            raise UserError(
                f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]});"
                f" delete that folder to resume from an earlier one, or pass force=true to start over"
            )
        step = int(ckpt.name.split("_")[1])
        self.update(resumed_from=step)
        return step

    def save_checkpoint(
        self, step: int, save: Callable[[Path], None], keep: int = 2, barrier: Callable[[], None] = lambda: None
    ) -> Path:
        """`save(tmp_dir)` runs on every process (accelerate saves per-rank RNG state); rename on the main one."""
        tmp = self.ckpt_root / f".tmp_step_{step:08d}"
        dst = self.ckpt_root / f"step_{step:08d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        save(tmp)
        barrier()
        if self.is_main:
            write_json_atomic(tmp / "state.json", {"step": step, "config_hash": self.hash, "files": inventory(tmp)})
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
            old = sorted(p for p in self.ckpt_root.iterdir() if re.fullmatch(r"step_\d{8}", p.name))
            for p in old[:-keep]:
                shutil.rmtree(p, ignore_errors=True)
        barrier()
        return dst

    # ---- completion ----------------------------------------------------------------------------------------
    def finish(
        self, save_final: Callable[[Path], None], metrics: dict, keep_checkpoints: bool = False, **extra
    ) -> None:
        """Write final/ aside and rename it into place, then mark the manifest complete (main process only)."""
        if not self.is_main:
            return
        tmp = self.dir / f".final.tmp_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_final(tmp)
        self.manifest["final_files"] = inventory(tmp)
        if self.final_dir.exists():  # force=true: swap the old one out only once the new one is whole
            old = self.dir / f".final.old_{os.getpid()}"
            os.replace(self.final_dir, old)
            os.replace(tmp, self.final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, self.final_dir)
        ended = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.manifest.update(extra)
        self.manifest.update(
            status="complete",
            ended=ended,
            metrics=_plain(metrics),
            fingerprint=hashlib.sha256(f"{self.hash}{ended}{uuid.uuid4()}".encode()).hexdigest()[:16],
        )
        self._write_manifest()
        if not keep_checkpoints:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
        if self.replacing is not None:  # force=true: the finished new stage takes the old one's place in one rename
            exchange(self.dir, self.replacing)
            shutil.rmtree(self.dir, ignore_errors=True)  # now the old stage
            self.dir, self.replacing = self.replacing, None
            self.final_dir, self.ckpt_root = self.dir / "final", self.dir / "checkpoints"


def exchange(a: Path, b: Path) -> None:
    """Swap two folders. Linux's renameat2(RENAME_EXCHANGE) does it in one atomic step, so a reader sees one or the
    other, never neither; elsewhere three renames (a reader may find `b` missing for a moment)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(-100, os.fsencode(str(a)), -100, os.fsencode(str(b)), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
            return
    except (AttributeError, OSError):
        pass
    tmp = Path(b).with_name(Path(b).name + f".swap_{os.getpid()}")
    os.replace(b, tmp)
    os.replace(a, b)
    os.replace(tmp, a)


def _plain(d: dict) -> dict:
    return {
        k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (bool, int, str)) else v) for k, v in d.items()
    }


def latest_stage(root: str | Path, run: str) -> Optional[Path]:
    """The last complete stage of a run (for chat/generate defaults)."""
    for stage in reversed(ORDER):
        d = Path(root) / run / stage
        m = read_manifest(d) if d.exists() else None
        if m and m.get("status") == "complete" and (d / "final").is_dir():
            return d
    return None


def crash_point(step: int) -> None:
    """Fault injection for tests: PIPELINE_CRASH_AT_STEP=N kills the process (like SIGKILL, no cleanup) right
    after step N's checkpoint, so resume can be tested deterministically."""
    at = os.environ.get("PIPELINE_CRASH_AT_STEP")
    if at is not None and int(at) == step:
        os._exit(137)


def latest_trainer_checkpoint(ckpt_root: str | Path) -> Optional[Path]:
    """Newest complete Hugging Face Trainer checkpoint (`checkpoint-<step>`) under ckpt_root, for
    `trainer.train(resume_from_checkpoint=...)`. The Trainer writes trainer_state.json last, so a folder without it
    was cut off mid-save and is passed over. (StageRun.latest_checkpoint knows only our own step_<n> names; the
    discard of another config's checkpoints in StageRun.begin and the cleanup in StageRun.finish remove the whole
    folder, so they cover Trainer checkpoints as well.)"""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    done = [
        p for p in root.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").exists()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def resolve_checkpoint(cfg) -> tuple[Path, str, Optional[Path]]:
    """(folder to load, a label for it, the stage folder if it is one) from checkpoint= / stage= / the latest."""
    if cfg.checkpoint:
        p = Path(cfg.checkpoint)
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise UserError(f"checkpoint={cfg.checkpoint}: not a Hugging Face checkpoint folder (no config.json)")
        return p, str(p), None
    root = Path(cfg.paths.root)
    if cfg.stage:
        if cfg.stage not in POLICIES:
            raise UserError(f"stage={cfg.stage}: not a chat model; choose one of {', '.join(POLICIES)}")
        d = root / cfg.run / cfg.stage
        m = read_manifest(d)
        if m is None or m.get("status") != "complete" or not (d / "final").is_dir():
            raise UserError(
                f"stage '{cfg.stage}' of run '{cfg.run}' is not complete ({d}); "
                f"make it first: {make_command(cfg.stage, cfg.run)}"
            )
        return d / "final", f"{cfg.run}/{cfg.stage}", d
    d = latest_stage(root, cfg.run)
    if d is not None and d.name not in POLICY_STAGES:  # e.g. reward done, ppo not yet: the newest policy instead
        d = next(
            (
                root / cfg.run / s
                for s in POLICY_STAGES
                if (m := read_manifest(root / cfg.run / s))
                and m.get("status") == "complete"
                and (root / cfg.run / s / "final").is_dir()
            ),
            None,
        )
    if d is None:
        raise UserError(
            f"run '{cfg.run}' has no complete policy stage under {root}; make one first: "
            f"{make_command('sft', cfg.run)} (or pass checkpoint=<folder>)"
        )
    return d / "final", f"{cfg.run}/{d.name}", d
