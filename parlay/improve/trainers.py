"""One trainer interface: ``fit(stage, start, …) -> TrainInfo``, whatever does the training.

- ``InlineTrainer``: ``sft.train`` in this process (CPU or one GPU);
- ``AccelerateTrainer``: the same trainer under ``accelerate launch -m parlay sft`` (several GPUs,
  DeepSpeed, FSDP), reading back the figures it writes;
- ``OpenAITrainer``: an OpenAI fine-tuning job on the chat fine-tuning export of the examples.

The in-process trainer takes the examples as the loop selected them (``FitRequest.examples``);
the others, and a request without them, read the stage's ``train.jsonl`` (always written first, as
the record of what was trained on). Each returns what it made as a ``TrainInfo`` whose ``model``
is the model to play next. ``make_trainer`` picks one from ``train.backend`` and ``train.launcher``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from parlay.config import RunConfig
from parlay.improve.examples import TrainExample, read_examples
from parlay.run import FineTuneJob, ModelRef, SelectionInfo, StageDir, TrainInfo

StepHook = Callable[[int, int, float, int], None]
"""(steps done, steps in all, the loss of the step just done, the tokens it processed)."""


@dataclass(frozen=True)
class FitRequest:
    """One training pass: train ``start`` on ``stage``'s ``train.jsonl`` into ``stage``'s ``model/``."""

    stage: StageDir
    start: ModelRef
    selection: SelectionInfo
    seed: int
    epochs: float | None = None
    lr: float | None = None
    examples: Sequence[TrainExample] | None = None
    """The examples of ``train.jsonl`` as they were written, or None to read them from it."""

    def training_examples(self) -> Sequence[TrainExample]:
        return self.examples if self.examples is not None else read_examples(self.stage.train_data)


class Trainer(Protocol):
    def fit(
        self, request: FitRequest, on_step: StepHook | None = None, note: Callable[[str], None] | None = None
    ) -> TrainInfo:
        """Train; return what was made."""


def _produced(cfg: RunConfig, request: FitRequest) -> ModelRef:
    """The model an hf trainer leaves in the stage's ``model/``: an adapter on the same base, or full weights."""
    if cfg.train.lora:
        return ModelRef(base=request.start.base, adapter=str(request.stage.model))
    return ModelRef(base=str(request.stage.model))


@dataclass
class InlineTrainer:
    cfg: RunConfig

    def fit(self, request: FitRequest, on_step: StepHook | None = None, note=None) -> TrainInfo:
        from parlay.improve.sft import train

        stats = train(
            request.training_examples(),
            request.start.base,
            request.stage.model,
            self.cfg.train,
            adapter=request.start.adapter,
            weights=self.cfg.weights,
            seed=request.seed,
            epochs=request.epochs,
            lr=request.lr,
            on_step=on_step,
            resume=True,  # a checkpoint beside the stage's model can only be this stage's, interrupted
        )
        return TrainInfo(selection=request.selection, trained=True, model=_produced(self.cfg, request), stats=stats)


@dataclass
class AccelerateTrainer:
    cfg: RunConfig
    config_file: Path
    """The run's saved config, whose train and weights sections ``parlay sft`` reads."""

    def fit(self, request: FitRequest, on_step: StepHook | None = None, note=None) -> TrainInfo:
        from parlay.improve.sft import read_stats

        stats_file = request.stage.path / "sft_stats.json"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", *self.cfg.train.accelerate_args,
            "-m", "parlay", "sft", str(request.stage.train_data), "--model", request.start.base,
            "--out", str(request.stage.model), "--config", str(self.config_file), "--stats", str(stats_file),
            "--seed", str(request.seed), "--resume",
        ]  # fmt: skip
        if request.start.adapter:
            cmd += ["--adapter", request.start.adapter]
        if request.epochs is not None:
            cmd += ["--epochs", str(request.epochs)]
        if request.lr is not None:
            cmd += ["--lr", str(request.lr)]
        if note:
            note("training under: " + " ".join(cmd))
        result = subprocess.run(cmd, env=os.environ.copy())
        if result.returncode != 0:
            raise RuntimeError(f"accelerate launch failed with exit status {result.returncode}: {' '.join(cmd)}")
        stats = read_stats(stats_file)
        return TrainInfo(selection=request.selection, trained=True, model=_produced(self.cfg, request), stats=stats)


@dataclass
class OpenAITrainer:
    cfg: RunConfig

    def fit(self, request: FitRequest, on_step: StepHook | None = None, note=None) -> TrainInfo:
        from parlay.improve.openai_ft import export, fine_tune

        name, _, url = request.start.base.removeprefix("openai:").partition("@")
        path = request.stage.path / "openai_train.jsonl"
        lines = export(request.training_examples(), path, seed=self.cfg.seed)
        new = fine_tune(
            path,
            self.cfg.train.openai_base_model or name,
            url or None,
            suffix=self.cfg.name[:18],
            seed=self.cfg.seed,
            poll_seconds=self.cfg.train.poll_seconds,
            on_status=(lambda s: note(f"{request.stage.path.name}: fine-tuning job {s}")) if note else None,
        )
        model = f"openai:{new}" + (f"@{url}" if url else "")
        return TrainInfo(
            selection=request.selection,
            trained=True,
            model=ModelRef(base=model),
            job=FineTuneJob(model=model, lines=lines),
        )


def make_trainer(cfg: RunConfig, config_file: Path) -> Trainer:
    if cfg.train.backend == "openai":
        return OpenAITrainer(cfg)
    if cfg.train.launcher == "accelerate":
        return AccelerateTrainer(cfg, config_file)
    return InlineTrainer(cfg)
