"""Experiment tracking: a local metrics.jsonl always, Weights & Biases on top when configured.

W&B runs offline unless an API key is configured (then `wandb sync runs/<run>/<stage>/wandb/offline-*` uploads
later), one group per pipeline run, one job_type per stage, each stage's final/ a model artifact that the next
stage declares as its input, so W&B draws the lineage. Tracking must never kill training: every W&B call is
guarded, and a failure turns W&B off for the rest of the stage with one warning.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.core.registry import stage_folder

_SECRET = re.compile(r"(api[_-]?key|token|secret|password)", re.I)


def scrub(obj: Any) -> Any:
    """Drop anything that looks like a credential before a config is logged or saved."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def wandb_mode(requested: str) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def artifact_name(run: str, stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{run}-{stage}")


_OPEN: list = []  # trackers not yet closed: the entry point closes them when a stage fails (close_open)


def close_open() -> None:
    """Close every tracker still open in this process (metrics.jsonl flushed, the W&B run marked failed): what the
    entry point does when a stage raises, so no stage needs its own except block for it."""
    for t in list(_OPEN):
        t.close()


class Tracker:
    def __init__(self, cfg: DictConfig, stage_run, is_main: bool = True):
        self.stage_run = stage_run
        self.is_main = is_main
        self.wandb = None
        self._jsonl = None
        if not is_main:
            return
        _OPEN.append(self)
        self._jsonl = open(stage_run.dir / "metrics.jsonl", "a")
        if cfg.logger.backend == "none":
            return
        if cfg.logger.backend != "wandb":
            print(f"warning: logger.backend={cfg.logger.backend!r} unknown; using only metrics.jsonl", file=sys.stderr)
            return
        self.log_model = cfg.logger.log_model
        try:
            import wandb

            id_file = stage_run.dir / "wandb_id"  # the same W&B run continues after a resume
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=stage_run.run,
                job_type=stage_run.stage,
                name=f"{stage_run.run}/{stage_run.name}",
                id=run_id,
                resume="allow",
                dir=str(stage_run.dir),
                mode=wandb_mode(cfg.logger.mode),
                config=scrub(OmegaConf.to_container(cfg, resolve=True)),
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # noqa: BLE001 — tracking is optional, training is not
            self._disable(e)

    def _disable(self, e: Exception) -> None:
        print(
            f"warning: W&B disabled for this stage ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"metrics still go to metrics.jsonl",
            file=sys.stderr,
        )
        self.wandb = None

    def _guard(self, fn, *a, **kw):
        if self.wandb is None:
            return None
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._guard(self.wandb.log if self.wandb else None, metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """Sample tables go to W&B and to a local jsonl so the report can show them offline."""
        if not self.is_main:
            return
        with open(self.stage_run.dir / f"{key.replace('/', '_')}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "columns": columns, "rows": rows}) + "\n")
        if self.wandb is not None:
            import wandb

            self._guard(lambda: self.wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step))

    def image(self, key: str, path: Path, step: Optional[int] = None) -> None:
        if self.wandb is not None:
            import wandb

            self._guard(lambda: self.wandb.log({key: wandb.Image(str(path))}, step=step))

    def use_parent(self, parent: dict) -> None:
        """Declare the parent's model artifact as this stage's input (the lineage edge). W&B cannot resolve an
        artifact offline, so offline runs record the parent in their config (`lineage`) instead; runs made online
        get the real edge in W&B's lineage graph."""
        if self.wandb is None:
            return
        folder = stage_folder(parent["stage"], parent.get("round", 1))  # ppo_r2: round 2's
        name = artifact_name(parent["run"], folder)
        self._guard(
            lambda: self.wandb.config.update(
                {"lineage": {folder: {"artifact": name, "fingerprint": parent.get("fingerprint")}}},
                allow_val_change=True,
            )
        )
        if self.wandb is not None and not self.wandb.offline:
            try:
                self.wandb.use_artifact(f"{name}:latest")
            except Exception as e:  # noqa: BLE001 — e.g. the parent ran with logger=none: no artifact to link
                print(f"warning: W&B lineage: cannot use artifact {name} ({e})", file=sys.stderr)

    def finish(self, metrics: dict, final_dir: Optional[Path] = None) -> None:
        if not self.is_main:
            return
        if self.wandb is not None:
            import wandb

            def fin():
                self.wandb.summary.update({k: float(v) for k, v in metrics.items()})
                if final_dir is not None and self.log_model:
                    art = wandb.Artifact(
                        artifact_name(self.stage_run.run, self.stage_run.name),
                        type="model",
                        metadata={
                            "stage": self.stage_run.stage,
                            "round": self.stage_run.round,
                            **metrics,
                            "fingerprint": self.stage_run.manifest.get("fingerprint"),
                        },
                    )
                    art.add_dir(str(final_dir))
                    self.wandb.log_artifact(art)
                self.wandb.finish()

            self._guard(fin)
        self.close()

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
            self.wandb = None
