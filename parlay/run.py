"""The run directory: every path in it, its typed records, and which model each round played.

A run is a folder; this module is the only code that spells its paths:

    RUN/config.yaml                   the resolved config (``RunDir.create`` / ``RunDir.resume``)
    RUN/warm_start/                   a stage: episodes.jsonl, train.jsonl, model/, train_stats.json
    RUN/rounds/<k>/                   a stage, plus metrics.json
        episodes.jsonl                appended one finished game at a time
        train.jsonl                   the training examples (``improve/examples.py``)
        model/                        adapter (or full weights), renamed into place when complete
        model.checkpoint/             while training, with train.checkpoint_steps (``improve/sft.py``)
        train_stats.json              a ``TrainInfo``: what was selected and what training made
        heldout/<i>.jsonl             the games with held-out partner i (``heldout.partners``)
        metrics.json                  a ``RoundRecord``, written last: the round is complete
    RUN/metrics.jsonl                 one ``RoundRecord`` per complete round, rewritten from the above
    RUN/tensorboard/, RUN/wandb/      with ``tracking:`` set
    RUN/report.html, RUN/plots/       ``parlay report``
    RUN/eval/                         a tournament the report shows (``parlay eval --out``)

Round 0 is the starting model's play; round k trains the round k−1 model on round k−1's games,
then plays. ``run:DIR[@K]`` names round K's model (default: the last complete round) wherever an
agent spec is taken; ``run:DIR@all`` in a tournament's agents stands for every complete round.
This module says which model a round played (``RunDir.round_model``); the agent that plays it
is the agents' business (``agents/resolve.py``).
Records carry ``schema_version``; files written before it existed (version 1: a flat
``metrics.json``, an untyped ``train_stats.json``) are read and converted; version 2 lacks only
the optional per-partner and held-out figures of version 3.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parlay.config import RunConfig, parse_config
from parlay.episode import first_problem
from parlay.errors import ConfigError
from parlay.files import write_lines_atomic
from parlay.specs import RunSpec, model_spec, parse_spec

RUN_SCHEMA_VERSION = 3

RESUMABLE_CHANGES = {"rounds", "early_stop", "tracking", "train.micro_batch_tokens"}
"""Settings a resumed run may change (a section, or one key in it); any other difference from the
saved config is refused. ``train.micro_batch_tokens`` cuts micro-batches, not steps: the gradient
stays as it was, so a run short of memory can lower it and go on."""


class RunDirError(ValueError):
    """A folder that is not a run directory, a run with nothing to read, or an unreadable record."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Record):
    """A model a round plays with: a base model (name, hub id, path or ``openai:…``) plus an adapter."""

    base: str
    adapter: str | None = None


class SelectionInfo(_Record):
    """How a stage's training examples were chosen (``improve/examples.py``)."""

    player_episodes: int
    rule: str
    """The filter rule that decided (differs from the configured one after a fallback)."""
    passed_filter: int
    kept: int
    """Examples written to train.jsonl: passed the rule, have turns of their own, passed the
    judge gate, and weigh more than zero."""
    note: str = ""
    """What happened when the rule kept nothing."""
    judge: dict[str, Any] | None = None
    """With a judge: how many it rated, and the correlation of its ratings with the rewards."""


SAMPLER_KL_TOLERANCE = 1e-3
"""Nats per token of sampler–trainer KL (``TrainStats.sampler_kl``) above which a round is called
out (log warning, report note). The sampler and the trainer hold the same weights, so in fp32 they
differ only by the order of float additions (batched, KV-cached decoding against one full forward):
per-token log-prob differences of 1e-6..1e-5, a KL of about d²/2 ≈ 1e-10. A KL of 1e-3 needs
differences of about 0.045 nats per token (KL ≈ mean d²/2): another chat rendering or tokenisation,
a temperature or top-p applied to the reported log-probs, another adapter or stale weights. bf16 on
either side brings rounding alone towards this level (issue 11 measured a KL of 0.001 between a
bf16 merged adapter and fp32), so in a bf16 run a note near the tolerance asks for a look; in fp32,
anything above it is a bug."""


class TrainStats(_Record):
    """What one training pass did (the hf trainer, in process or under ``accelerate launch``)."""

    examples: int
    skipped_examples: int
    """Examples with no own tokens left (after cutting to max_length), not trained on."""
    truncated_examples: int
    steps: int
    tokens: int
    """Tokens processed (all positions), over all passes and processes."""
    own_tokens: int
    """Tokens in the loss, over all passes and processes."""
    loss_first: float
    loss_last: float
    nll_first: float
    nll_last: float
    """Unweighted NLL per own token of the first and last optimiser steps (all their micro-batches)."""
    seconds: float
    tokens_per_second: float
    mean_iw: float | None = None
    """iw-SFT: mean importance factor over the run."""
    losses: list[float] = Field(default_factory=list)
    """The loss of each optimiser step: over all its micro-batches and processes, the weighted sum
    over own tokens divided by their number (as one big batch would have it)."""
    grad_norms: list[float] = Field(default_factory=list)
    """The global L2 norm of each optimiser step's gradient, before clipping to ``train.max_grad_norm``."""
    approx_kls: list[float] | None = None
    """Online RL, per optimiser step: the approximate KL(π_old ‖ π) per own token, π_old the
    round-start model that played (k3: the mean of r − 1 − log r, r = π/π_old; cleanrl's
    ``approx_kl``). None for other schemes."""
    clip_fractions: list[float] | None = None
    """Online RL, per step: the share of own tokens whose ratio r was outside [1 − ε, 1 + ε]."""
    entropies: list[float] | None = None
    """Online RL, per step: the policy's mean entropy (nats) at the own tokens' positions."""
    sampler_kl: float | None = None
    """Sampler–trainer parity, before the first step: the mean per-token KL(sampler ‖ trainer) at
    the sampled tokens (k3 estimator, exp(d) − d − 1 with d = log p_trainer − log p_sampler), the
    trainer being the round-start model as loaded for training; None when no example carried the
    sampler's log-probs (``improve/sft.sampler_parity``, ``SAMPLER_KL_TOLERANCE``)."""
    sampler_logp_abs_diff: float | None = None
    """Parity: the mean |d| per token."""
    sampler_tokens: int = 0
    """Parity: sampled tokens compared."""
    sampler_turns: int = 0
    """Parity: assistant turns compared."""
    sampler_turns_not_comparable: int = 0
    """Parity: turns with the sampler's log-probs whose tokens do not line up with the trainer's."""


class FineTuneJob(_Record):
    """What an OpenAI fine-tuning job made."""

    model: str
    lines: int
    """Lines of the uploaded training file."""


class TrainInfo(_Record):
    """``train_stats.json``: what a stage (warm start or round k ≥ 1) trained on and what it made."""

    schema_version: int = RUN_SCHEMA_VERSION
    selection: SelectionInfo | None = None
    trained: bool
    """False when nothing was selected: the stage plays the model it started from."""
    model: ModelRef
    """The model this stage produced (the one it started from when nothing was trained)."""
    stats: TrainStats | None = None
    job: FineTuneJob | None = None
    failure: str | None = None
    """Why training failed (a non-finite loss): nothing was saved, the stage plays the model it
    started from."""

    @property
    def steps(self) -> int:
        return self.stats.steps if self.stats else 0


class RoundRecord(_Record):
    """``metrics.json``: a complete round."""

    schema_version: int = RUN_SCHEMA_VERSION
    round: int
    model: ModelRef
    """The model that played the round's games."""
    metrics: dict[str, Any]
    """Every metric of ``evaluate/metrics.py`` over the round's games."""
    train: TrainInfo | None = None
    """How the round's model was trained (None for round 0)."""
    minutes: float
    vs_round0: dict[str, Any] | None = None
    """With ``rollout.contexts: same``: the paired change in the trained model's reward from round 0,
    with its interval."""
    partners: dict[str, dict[str, Any]] | None = None
    """Per training partner (``self``, ``checkpoint@J``, a spec): ``metrics.partner_summary`` of its
    games, with the paired change from round 0 where the same partner played the same games."""
    heldout: dict[str, dict[str, Any]] | None = None
    """Per held-out partner: ``metrics.partner_summary`` of its games and the paired change from
    round 0 (same games)."""


# ---------------------------------------------------------------------- reading older records


def _v1_train(data: dict[str, Any], model: ModelRef) -> TrainInfo | None:
    """A version-1 ``train`` dict: trainer figures, filter figures and an OpenAI job side by side."""
    if not data:
        return None
    selection = None
    if "filter_rule" in data:
        selection = SelectionInfo(
            player_episodes=data["player_episodes"],
            rule=data["filter_rule"],
            passed_filter=data["passed_filter"],
            kept=data.get("kept", 0),
            note=data.get("filter_note", ""),
            judge=data.get("judge"),
        )
    stats_keys = TrainStats.model_fields.keys()
    stats = TrainStats(**{k: v for k, v in data.items() if k in stats_keys}) if "steps" in data else None
    job = FineTuneJob(model=data["model"], lines=data["lines"]) if "lines" in data else None
    return TrainInfo(selection=selection, trained=not data.get("skipped"), model=model, stats=stats, job=job)


def _v1_trained_model(data: dict[str, Any], start: ModelRef, out: Path, lora: bool) -> ModelRef:
    """The model a version-1 ``train_stats.json`` stands for, which it did not record."""
    if data.get("skipped"):
        return start
    if "lines" in data:
        return ModelRef(base=data["model"])
    return ModelRef(base=start.base, adapter=str(out)) if lora else ModelRef(base=str(out))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return data


def _validate(cls: type[_Record], data: dict[str, Any], path: Path):
    version = data.get("schema_version", 1)
    if isinstance(version, int) and version > RUN_SCHEMA_VERSION:
        raise RunDirError(
            f"{path}: record version {version}, written by a newer parlay (this one reads up to {RUN_SCHEMA_VERSION})"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RunDirError(f"{path}: {first_problem(exc)}") from None


def read_round_record(path: Path) -> RoundRecord:
    data = _read_json(path)
    if "schema_version" not in data:  # version 1: the metrics flat beside the rest
        data = dict(data)
        fixed = {k: data.pop(k) for k in ("round", "model", "minutes") if k in data}
        vs, train = data.pop("vs_round0", None), data.pop("train", None) or {}
        model = _validate(ModelRef, fixed.get("model") or {}, path)
        data = fixed | {"schema_version": 1, "metrics": data, "vs_round0": vs, "train": _v1_train(train, model)}
    return _validate(RoundRecord, data, path)


# ---------------------------------------------------------------------- the folders


@dataclass(frozen=True)
class StageDir:
    """``warm_start/`` or ``rounds/<k>/``: one stage's games, training data, model and records."""

    path: Path

    @property
    def episodes(self) -> Path:
        return self.path / "episodes.jsonl"

    @property
    def train_data(self) -> Path:
        return self.path / "train.jsonl"

    @property
    def model(self) -> Path:
        return self.path / "model"

    def heldout_episodes(self, index: int) -> Path:
        """The games with held-out partner ``index`` of ``heldout.partners`` (never trained on)."""
        return self.path / "heldout" / f"{index}.jsonl"

    @property
    def train_info_file(self) -> Path:
        return self.path / "train_stats.json"

    @property
    def record_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def complete(self) -> bool:
        return self.record_file.exists()

    def train_info(self, start: ModelRef, lora: bool = True) -> TrainInfo | None:
        """What this stage trained (None if it has not yet). ``start`` and ``lora`` read a
        version-1 file, which did not record the model it made."""
        if not self.train_info_file.exists():
            return None
        data = _read_json(self.train_info_file)
        if "schema_version" not in data:
            return _v1_train(data, _v1_trained_model(data, start, self.model, lora)) or TrainInfo(
                trained=False, model=start
            )
        return _validate(TrainInfo, data, self.train_info_file)

    def write_train_info(self, info: TrainInfo) -> None:
        write_lines_atomic(self.train_info_file, [info.model_dump_json()])

    def record(self) -> RoundRecord:
        return read_round_record(self.record_file)


class RunDir:
    """A run's folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / "config.yaml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    report_file = property(lambda self: self.path / "report.html")
    plots = property(lambda self: self.path / "plots")
    eval_dir = property(lambda self: self.path / "eval")
    warm_start = property(lambda self: StageDir(self.path / "warm_start"))

    def round(self, k: int) -> StageDir:
        return StageDir(self.path / "rounds" / str(k))

    def present_rounds(self) -> list[int]:
        """Every round with a folder, complete or not, in order."""
        folders = (self.path / "rounds").glob("*")
        return sorted(int(p.name) for p in folders if p.is_dir() and p.name.isdigit())

    def complete_rounds(self) -> list[int]:
        """The rounds whose ``metrics.json`` exists, in order (a gap ends the list)."""
        rounds: list[int] = []
        while self.round(len(rounds)).complete:
            rounds.append(len(rounds))
        return rounds

    def complete_rounds_of(self, asked: object) -> list[int]:
        """``complete_rounds``, or ``ConfigError`` naming ``asked`` (the spec that named this run)
        when there is none."""
        rounds = self.complete_rounds()
        if not rounds:
            raise ConfigError(f"{asked}: {self.path} has no complete round (no rounds/0/metrics.json)")
        return rounds

    def round_model(self, asked: object, k: int | None = None) -> tuple[int, ModelRef]:
        """(K, the model round K played), K defaulting to the last complete round; ``ConfigError``
        naming ``asked`` when the run has no complete round or round K is not complete."""
        rounds = self.complete_rounds_of(asked)
        chosen = rounds[-1] if k is None else k
        if chosen not in rounds:
            raise ConfigError(f"{asked}: round {chosen} is not complete in {self.path} (complete: 0..{rounds[-1]})")
        return chosen, self.round(chosen).record().model

    def records(self) -> list[RoundRecord]:
        """The record of every complete round, in order."""
        return [self.round(k).record() for k in self.complete_rounds()]

    def write_record(self, record: RoundRecord) -> list[RoundRecord]:
        """Complete a round: its ``metrics.json``, then ``metrics.jsonl`` rewritten; returns every record."""
        write_lines_atomic(self.round(record.round).record_file, [record.model_dump_json(indent=1)])
        records = self.records()
        write_lines_atomic(self.metrics_file, (r.model_dump_json() for r in records))
        return records

    # -- the config

    def load_config(self) -> RunConfig:
        if not self.config_file.exists():
            raise ConfigError(f"{self.path}: no run here (config.yaml is missing)")
        try:
            data = yaml.safe_load(self.config_file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.config_file}: not valid YAML: {exc}") from None
        return parse_config(data, str(self.config_file))

    def create(self, cfg: RunConfig) -> None:
        """A new run: the folder and its resolved config; refused where a run already is."""
        if self.config_file.exists():
            raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it, or choose another name")
        self.path.mkdir(parents=True, exist_ok=True)
        write_lines_atomic(self.config_file, [cfg.to_yaml()])

    def resume(self, cfg: RunConfig) -> RunConfig:
        """Check ``cfg`` against the saved config: only ``RESUMABLE_CHANGES`` may differ; those
        are saved. Returns the config to go on with."""
        saved = self.load_config()
        differ = _differences(saved.model_dump(), cfg.model_dump())
        blocked = sorted(d for d in differ if not covered(d, RESUMABLE_CHANGES))
        if blocked:
            allowed = ", ".join(sorted(RESUMABLE_CHANGES))
            raise ConfigError(
                f"{self.config_file}: the config given differs from the saved run in {', '.join(blocked)}; "
                f"a resumed run keeps its settings (only {allowed} may change)"
            )
        if differ:
            write_lines_atomic(self.config_file, [cfg.to_yaml()])
        return cfg


def covered(key: str, keys: Iterable[str]) -> bool:
    """Whether the dotted config key ``key`` is one of ``keys`` or lies in a section among them."""
    keys = set(keys)
    return key in keys or key.split(".")[0] in keys


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = a.keys() | b.keys()
        return [d for k in sorted(keys) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def prepare_run(cfg: RunConfig, resume: bool) -> RunConfig:
    """Create the run directory of ``cfg`` (or, with ``resume``, check ``cfg`` against it)."""
    run = RunDir(cfg.run_dir)
    if resume:
        return run.resume(cfg)
    run.create(cfg)
    return cfg


# Kept for callers of old (tests/test_report.py); the agents' own are ``parlay.agents.resolve``.


def expand_rounds(spec: str) -> list[str]:
    """``run:DIR@all`` → ``run:DIR@0``, ``run:DIR@1``, … (every complete round); any other spec alone."""
    parsed = parse_spec(spec)
    if not isinstance(parsed, RunSpec) or parsed.round != "all":
        return [spec]
    return [str(RunSpec(parsed.path, k)) for k in RunDir(parsed.path).complete_rounds_of(spec)]


def round_agent_spec(spec: str) -> tuple[str, str]:
    """``run:DIR[@K]`` → (``run:DIR@K``, the agent spec of round K's model of the run in DIR);
    K defaults to the last complete round. Any other spec is returned as (spec, spec)."""
    parsed = parse_spec(spec)
    if not isinstance(parsed, RunSpec):
        return spec, spec
    if parsed.round == "all":
        raise ConfigError(f"{spec}: the round after @ must be a whole number")
    run = RunDir(parsed.path)
    k, model = run.round_model(spec, parsed.round)
    rollout = run.load_config().rollout
    return str(RunSpec(parsed.path, k)), str(
        model_spec(model.base, model.adapter, rollout.dtype, rollout.batch, rollout.backend)
    )
