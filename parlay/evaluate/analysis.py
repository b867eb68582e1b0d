"""A run directory read back: every round's games, metrics with intervals, and the paper's analyses.

Reads the run directory through ``parlay/run.py``, its one owner. A run cut short is read as far as it goes,
and ``RunView.missing`` says, in words, what is not there: rounds not played yet, a round whose
games are still being written, a file that cannot be read. Only a folder with no games at all
is an error.

The analyses beyond the per-round metrics (Liao et al. 2024, §6):
- ``round_score_correlation``: Pearson's r of round number with game reward, over all games and
  over agreed games only — does training raise the score of a deal, or only the chance of one?
- best and worst dialogue of each round, for reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from parlay.episode import Episode, EpisodeFileError, ReadReport, read_episodes
from parlay.evaluate.metrics import RESAMPLES, game_rewards, summarize
from parlay.evaluate.sweep import read_sweep
from parlay.evaluate.tournament import read_tournament
from parlay.run import RoundRecord, RunDir, RunDirError, StageDir, TrainInfo

__all__ = ["RoundView", "RunDirError", "RunView", "load_run", "round_score_correlation"]


@dataclass
class RoundView:
    k: int
    episodes: list[Episode]
    record: RoundRecord | None
    """``metrics.json`` as the loop wrote it (model, training, paired change vs round 0); None
    while the round is still being played."""
    summary: dict[str, Any]
    """``{"metrics": …, "ci95": …}`` recomputed from the games."""

    @property
    def complete(self) -> bool:
        return self.record is not None

    @property
    def train(self) -> TrainInfo | None:
        return self.record.train if self.record else None

    def best_and_worst(self) -> tuple[Episode, Episode] | None:
        """The game with the highest mean reward and the one with the lowest (first by id on ties)."""
        if not self.episodes:
            return None
        rewards = game_rewards(self.episodes)
        best = min(self.episodes, key=lambda ep: (-rewards[ep.id], ep.id))
        worst = min(self.episodes, key=lambda ep: (rewards[ep.id], ep.id))
        return best, worst


@dataclass
class RunView:
    dir: Path
    config: dict[str, Any] | None
    rounds: list[RoundView]
    missing: list[str] = field(default_factory=list)
    tournament: dict[str, Any] | None = None
    sweep: dict[str, Any] | None = None
    """A λ sweep in ``RUN_DIR/eval`` (``parlay eval --lambdas``)."""

    @property
    def name(self) -> str:
        return (self.config or {}).get("name") or self.dir.name


def load_run(run_dir: Path, seed: int = 0, resamples: int = RESAMPLES) -> RunView:
    """Read a run directory; see the module docstring for what counts as missing."""
    run = RunDir(run_dir)
    run_dir = run.path
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    missing: list[str] = []
    config = None
    config_path = run.config_file
    if config_path.exists():
        try:
            config = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            missing.append(f"config.yaml cannot be read ({exc}); settings are not shown")
        if config is not None and not isinstance(config, dict):
            missing.append("config.yaml is not a mapping of settings; settings are not shown")
            config = None
    else:
        missing.append("config.yaml is missing; settings are not shown")
    rounds = []
    for k in run.present_rounds():
        view = _read_round(run.round(k), k, seed, resamples, missing)
        if view is not None:
            rounds.append(view)
    if not rounds:
        if config is None and not run.present_rounds():
            raise RunDirError(f"{run_dir}: not a run directory (no config.yaml, no rounds/)")
        raise RunDirError(f"{run_dir}: no round has games yet (rounds/0/episodes.jsonl is missing or empty)")
    planned = (config or {}).get("rounds")
    if isinstance(planned, int):
        absent = [k for k in range(planned + 1) if k not in {r.k for r in rounds}]
        if absent:
            missing.append(f"round(s) {', '.join(map(str, absent))} of 0..{planned} not played yet")
    tournament = _optional(run.eval_dir / "tournament.json", read_tournament, missing)
    sweep = _optional(run.eval_dir / "sweep.json", read_sweep, missing)
    return RunView(run_dir, config, rounds, missing, tournament, sweep)


def _optional(path: Path, read, missing: list[str]) -> dict[str, Any] | None:
    """What ``read`` makes of ``path`` when it exists; a file it refuses is named in ``missing``."""
    if not path.exists():
        return None
    try:
        return read(path)
    except ValueError as exc:  # TournamentError is one
        missing.append(str(exc))
        return None


def _read_round(stage: StageDir, k: int, seed: int, resamples: int, missing: list[str]) -> RoundView | None:
    path = stage.episodes
    if not path.exists():
        if stage.train_info_file.exists() or stage.model.exists():
            missing.append(f"round {k}: trained, but no game played yet")
        else:
            missing.append(f"round {k}: no games yet")
        return None
    report = ReadReport()
    try:
        episodes = read_episodes(path, report)
    except EpisodeFileError as exc:
        missing.append(f"round {k}: games cannot be read: {exc}")
        return None
    if report.truncated_tail:
        missing.append(f"round {k}: the last game in episodes.jsonl was cut short and is left out")
    if not episodes:
        missing.append(f"round {k}: episodes.jsonl is empty")
        return None
    record = None
    if stage.complete:
        try:
            record = stage.record()
        except RunDirError as exc:
            missing.append(f"round {k}: {exc}")
    else:
        missing.append(f"round {k} is not complete: {len(episodes)} game(s) so far, no metrics.json")
    return RoundView(k, episodes, record, summarize(episodes, seed=seed + k, resamples=resamples))


def round_score_correlation(
    rounds: list[RoundView], seed: int = 0, resamples: int = RESAMPLES
) -> dict[str, dict[str, Any] | None]:
    """Pearson's r of round number with game reward, with a bootstrap 95 % interval over games:
    over all games, and over agreed games only. None where fewer than two rounds or no spread."""

    def corr(agreed_only: bool) -> dict[str, Any] | None:
        pairs = []
        for r in rounds:
            rewards = game_rewards(r.episodes)
            pairs += [(r.k, rewards[ep.id]) for ep in r.episodes if ep.agreed or not agreed_only]
        if len(pairs) < 3:
            return None
        x, y = np.array(pairs, dtype=float).T
        if x.std() == 0 or y.std() == 0:
            return None
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(x), (resamples, len(x)))
        xs, ys = x[idx], y[idx]
        xs_c, ys_c = xs - xs.mean(1, keepdims=True), ys - ys.mean(1, keepdims=True)
        denom = np.sqrt((xs_c**2).sum(1) * (ys_c**2).sum(1))
        rs = np.divide((xs_c * ys_c).sum(1), denom, out=np.zeros(resamples), where=denom > 0)
        low, high = np.percentile(rs, [2.5, 97.5])
        return {"r": float(np.corrcoef(x, y)[0, 1]), "ci95": [float(low), float(high)], "games": len(x)}

    return {"all": corr(False), "agreed": corr(True)}
