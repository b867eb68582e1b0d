"""Experiment tracking: TensorBoard and Weights & Biases, both optional (``tracking:`` in a config).

Metric names say where a figure comes from: ``rollout/…`` (a round's self-play games),
``train/…`` (a round's fine-tuning, and ``train/loss`` per optimiser step against
``train/step``), ``eval/…`` (comparisons: the paired change against round 0, tournaments).
Round figures are logged against ``round``.

TensorBoard writes to ``<dir>/tensorboard``. W&B writes under ``<dir>/wandb`` and follows its
own environment (``WANDB_MODE=offline`` logs without a network, ``WANDB_PROJECT`` names the
project, default ``parlay``); a resumed run continues the same W&B run.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BACKENDS = ("tensorboard", "wandb")


class TrackingError(ValueError):
    """An unknown tracking backend, or one whose package is missing."""


def flatten(prefix: str, data: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``data`` (nested dicts joined by ``/``) under ``prefix/``."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out |= flatten(name, value)
        elif isinstance(value, bool | int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


class Tracker:
    """Sends namespaced metrics to every chosen backend; with no backend it does nothing."""

    def __init__(self, backends: list[str], log_dir: Path, name: str, config: dict[str, Any] | None = None) -> None:
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown:
            raise TrackingError(f"unknown tracking backend(s) {unknown}: expected {', '.join(BACKENDS)}")
        self._tb: Any = None
        self._wandb: Any = None
        self._defined: set[str] = set()
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise TrackingError(f"tracking: tensorboard needs `pip install tensorboard` ({exc})") from None
            self._tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError:
                raise TrackingError("tracking: wandb needs `pip install wandb`") from None
            (log_dir / "wandb").mkdir(parents=True, exist_ok=True)
            id_file = log_dir / "wandb" / "run-id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "parlay"),
                name=name,
                id=run_id,
                resume="allow",
                dir=str(log_dir),
                config=config or {},
            )

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log(self, metrics: Mapping[str, float], step: int, step_name: str = "round") -> None:
        """Log ``metrics`` (already namespaced) at ``step`` of the axis ``step_name``."""
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            for key in metrics.keys() - self._defined:
                self._wandb.define_metric(key, step_metric=step_name)
                self._defined.add(key)
            self._wandb.log(dict(metrics) | {step_name: step})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def track_eval(backends: str, log_dir: Path, result: Mapping[str, Any]) -> None:
    """Log an evaluation once (step 0): per pair of a tournament (``eval/A vs B/…``), or the
    metrics of a set of games (``eval/…``), plus a judge's figures (``eval/judge/…``)."""
    tracker = Tracker([t.strip() for t in backends.split(",") if t.strip()], log_dir, log_dir.name, None)
    try:
        figures: dict[str, float] = {}
        if "pairs" in result:
            for p in result["pairs"]:
                figures |= flatten(f"eval/{p['a']} vs {p['b']}", p["metrics"])
        else:
            figures = flatten("eval", {k: v for k, v in result.items() if k not in ("ci95", "judge_consistency")})
        figures |= flatten("eval/judge", result.get("judge_consistency") or {})
        tracker.log(figures, 0)
    finally:
        tracker.close()
