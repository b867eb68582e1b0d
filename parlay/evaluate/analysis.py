"""A run directory read back: every round's games, metrics with intervals, and the paper's analyses.

Reads only what the loop writes (DESIGN.md, "Runs"). A run cut short is read as far as it goes,
and ``RunView.missing`` says, in words, what is not there: rounds not played yet, a round whose
games are still being written, a file that cannot be read. Only a folder with no games at all
is an error.

The analyses beyond the per-round metrics (Liao et al. 2024, §6):
- ``round_score_correlation``: Pearson's r of round number with game reward, over all games and
  over agreed games only — does training raise the score of a deal, or only the chance of one?
- best and worst dialogue of each round, for reading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from parlay.episode import Episode, EpisodeFileError, ReadReport, read_episodes
from parlay.evaluate.metrics import RESAMPLES, game_rewards, summarize
from parlay.evaluate.tournament import TournamentError, read_tournament


class RunDirError(ValueError):
    """A folder that is not a run directory, or a run with no games yet."""


@dataclass
class RoundView:
    k: int
    episodes: list[Episode]
    complete: bool
    """Its ``metrics.json`` exists: the loop finished the round."""
    row: dict[str, Any] | None
    """``metrics.json`` as the loop wrote it (model, train stats, paired change vs round 0)."""
    summary: dict[str, Any]
    """``{"metrics": …, "ci95": …}`` recomputed from the games."""

    @property
    def train(self) -> dict[str, Any]:
        return (self.row or {}).get("train") or {}

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

    @property
    def name(self) -> str:
        return (self.config or {}).get("name") or self.dir.name


def load_run(run_dir: Path, seed: int = 0, resamples: int = RESAMPLES) -> RunView:
    """Read a run directory; see the module docstring for what counts as missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    missing: list[str] = []
    config = None
    config_path = run_dir / "config.yaml"
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
    present = sorted(int(p.name) for p in (run_dir / "rounds").glob("*") if p.is_dir() and p.name.isdigit())
    for k in present:
        view = _read_round(run_dir / "rounds" / str(k), k, seed, resamples, missing)
        if view is not None:
            rounds.append(view)
    if not rounds:
        if config is None and not (run_dir / "rounds").exists():
            raise RunDirError(f"{run_dir}: not a run directory (no config.yaml, no rounds/)")
        raise RunDirError(f"{run_dir}: no round has games yet (rounds/0/episodes.jsonl is missing or empty)")
    planned = (config or {}).get("rounds")
    if isinstance(planned, int):
        absent = [k for k in range(planned + 1) if k not in {r.k for r in rounds}]
        if absent:
            missing.append(f"round(s) {', '.join(map(str, absent))} of 0..{planned} not played yet")
    tournament = None
    if (run_dir / "eval" / "tournament.json").exists():
        try:
            tournament = read_tournament(run_dir / "eval" / "tournament.json")
        except TournamentError as exc:
            missing.append(str(exc))
    return RunView(run_dir, config, rounds, missing, tournament)


def _read_round(rdir: Path, k: int, seed: int, resamples: int, missing: list[str]) -> RoundView | None:
    path = rdir / "episodes.jsonl"
    if not path.exists():
        if (rdir / "train_stats.json").exists() or (rdir / "model").exists():
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
    row = None
    if (rdir / "metrics.json").exists():
        try:
            row = json.loads((rdir / "metrics.json").read_text())
        except json.JSONDecodeError as exc:
            missing.append(f"round {k}: metrics.json cannot be read ({exc.msg})")
    else:
        missing.append(f"round {k} is not complete: {len(episodes)} game(s) so far, no metrics.json")
    return RoundView(k, episodes, row is not None, row, summarize(episodes, seed=seed + k, resamples=resamples))


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
