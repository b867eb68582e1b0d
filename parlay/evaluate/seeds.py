"""Figures across seeds: every round-vs-round-0 change of a multi-seed run with an interval over runs.

A run over seeds (``parlay/seeds.py``) holds one run per seed. For every complete round k ≥ 1 and
every *figure* — the model's own reward over all its training games, with each training partner,
with each held-out partner — each seed gives a paired change: the mean over the games both
round k and round 0 played (same ids: same seeded contexts, first speakers and sampling seeds) of
the learner's reward at round k minus at round 0 (``metrics.learner_rewards``). Across seeds:

- **mean**: the mean of the seeds' changes (each seed weighs the same, whatever its games).
- **95 % interval: a hierarchical (two-stage) bootstrap**: resample the seeds with replacement,
  then, within each resampled seed, its games with replacement (paired: a game keeps its round k
  and round 0 rewards together), and take the mean over the resampled seeds of their mean
  changes; the 2.5th and 97.5th percentiles of 2,000 such means. Why this one: it accounts for
  both sources of variation — which seed (the training run's luck) and which games (the
  measurement's) — where a t-interval over seed means would treat each seed's mean as exact and,
  with 3-5 seeds, rest on a normality it cannot check; and it needs no assumption on the shape of
  either. Agarwal et al. (2021), "Deep Reinforcement Learning at the Edge of the Statistical
  Precipice" (NeurIPS), recommend exactly this for few-run results: interval estimates from a
  stratified bootstrap over runs instead of point estimates. With few seeds the interval is
  still too narrow (a bootstrap cannot see the seeds it did not run); treat 3 seeds as the least.
- **IQM**: the interquartile mean of the seeds' changes — the mean of the middle 50 % after
  discarding the lowest and highest 25 % (``int(0.25 · n)`` from each end, as
  ``scipy.stats.trim_mean(x, 0.25)`` and Agarwal et al.'s ``rliable`` do); robust to one
  outlying seed where the mean is not. With fewer than 4 seeds nothing is cut and it equals the
  mean. Given with 3 seeds or more.
- **P(improvement)**: Agarwal et al.'s probability of improvement, P(X > Y): the chance that a
  randomly chosen seed's round-k score X is above a randomly chosen seed's round-0 score Y,
  ties counting half (the Mann-Whitney U statistic divided by n·m), over the seeds' mean own
  rewards on the figure's paired games. 0.5: no better than chance; 1: every round-k seed above
  every round-0 seed. Given with 3 seeds or more.

Every quantity is in reward points per game (the learner's side), like the single-run
``vs_round0``. numpy only (scipy is not a dependency of parlay; its ``trim_mean`` and
``mannwhitneyu`` compute the same and the tests check the hand-computed values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parlay.episode import Episode, ReadReport, read_episodes
from parlay.evaluate.metrics import METRICS, RESAMPLES, GameTable, learner_rewards, resample_weights
from parlay.run import RunDir, RunDirError
from parlay.seeds import SeedRuns, seed_folder

MIN_SEEDS_FOR_RANKS = 3
"""Seeds needed before the IQM and the probability of improvement are given."""
ALL_GAMES = "all"
"""The figure over all of a round's training games (the record's ``vs_round0``)."""


# ---------------------------------------------------------------------- the statistics


def hierarchical_draws(
    sizes: Sequence[int],
    stat: Callable[[int, np.ndarray], np.ndarray],
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> np.ndarray:
    """Bootstrap replicates (shape: resamples) of the mean over seeds of a per-seed statistic,
    resampling seeds, then games within each drawn seed.

    ``sizes[s]``: games of seed s; ``stat(s, w)``: the statistic of seed s under game
    multiplicities ``w`` (rows × sizes[s], as ``metrics.resample_weights`` makes them), one value
    per row. Each of the resamples × seeds draws gets a game resample of its own, so a seed drawn
    twice in one replicate is resampled twice."""
    n = len(sizes)
    if n == 0:
        raise ValueError("no seeds to resample")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, (resamples, n))  # resample × slot → seed
    total = np.zeros(resamples)
    for s, games in enumerate(sizes):
        rows = np.nonzero(picks == s)[0]  # one entry per slot that drew seed s
        if len(rows):
            w = resample_weights(games, int(rng.integers(2**63)), len(rows))
            np.add.at(total, rows, stat(s, w))
    return total / n


def _means(groups: Sequence[np.ndarray]) -> Callable[[int, np.ndarray], np.ndarray]:
    return lambda s, w: (w @ groups[s]) / len(groups[s])


def hierarchical_interval(
    groups: Sequence[np.ndarray], seed: int = 0, resamples: int = RESAMPLES
) -> tuple[float, list[float]]:
    """(mean over seeds of each seed's mean, its hierarchical bootstrap 95 % percentile
    interval) of per-game values ``groups[s]`` (shape: games of seed s) — e.g. paired changes."""
    draws = hierarchical_draws([len(g) for g in groups], _means(groups), seed, resamples)
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(np.mean([g.mean() for g in groups])), [float(low), float(high)]


def interquartile_mean(values: Sequence[float]) -> float:
    """The mean of ``values`` after cutting ``int(0.25 · n)`` of them from each end of the sorted
    list (scipy's ``trim_mean(values, 0.25)``; Agarwal et al. 2021's IQM)."""
    x = np.sort(np.asarray(values, dtype=float))
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def probability_of_improvement(after: Sequence[float], before: Sequence[float]) -> float:
    """P(X > Y) + ½·P(X = Y) for X drawn from ``after`` and Y from ``before`` (every pair
    counted: the Mann-Whitney U statistic over n·m; Agarwal et al. 2021)."""
    x = np.asarray(after, dtype=float)[:, None]
    y = np.asarray(before, dtype=float)[None, :]
    return float(((x > y) + 0.5 * (x == y)).mean())


@dataclass
class SeedChange:
    """One figure's paired games in one seed at one round: the learner's reward per game at
    round k and at round 0 (same games, same order)."""

    seed: int
    after: np.ndarray
    before: np.ndarray

    @property
    def change(self) -> float:
        return float((self.after - self.before).mean())


def across_seeds(changes: Sequence[SeedChange], seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """The figure across seeds: ``{"seeds", "games" (per seed), "per_seed" ({seed: change}),
    "mean", "ci95", "iqm", "p_improvement"}`` (the last two None under ``MIN_SEEDS_FOR_RANKS``)."""
    diffs = [c.after - c.before for c in changes]
    mean, ci = hierarchical_interval(diffs, seed, resamples)
    per_seed = [c.change for c in changes]
    enough = len(changes) >= MIN_SEEDS_FOR_RANKS
    return {
        "seeds": [c.seed for c in changes],
        "games": [len(d) for d in diffs],
        "per_seed": dict(zip([c.seed for c in changes], per_seed, strict=True)),
        "mean": mean,
        "ci95": ci,
        "iqm": interquartile_mean(per_seed) if enough else None,
        "p_improvement": (
            probability_of_improvement([c.after.mean() for c in changes], [c.before.mean() for c in changes])
            if enough
            else None
        ),
    }


def metric_across_seeds(
    tables: Sequence[GameTable], name: str, seed: int = 0, resamples: int = RESAMPLES
) -> tuple[float, list[float]]:
    """A metric of ``metrics.METRICS`` averaged over seeds (``tables[s]``: one seed's games), with
    its hierarchical bootstrap 95 % interval (seeds, then games)."""
    stat = METRICS[name]
    value = float(np.mean([stat(t, np.ones((1, t.games)))[0] for t in tables]))
    draws = hierarchical_draws([t.games for t in tables], lambda s, w: stat(tables[s], w), seed, resamples)
    low, high = np.percentile(draws, [2.5, 97.5])
    return value, [float(low), float(high)]


# ---------------------------------------------------------------------- a multi-seed run read back


def _episodes(path: Path, missing: list[str], label: str) -> list[Episode]:
    if not path.exists():
        return []
    report = ReadReport()
    episodes = read_episodes(path, report)
    if report.truncated_tail:
        missing.append(f"{label}: the last game of {path.name} was cut short and is left out")
    return episodes


def _paired(after: dict[str, float], before: dict[str, float], seed: int) -> SeedChange | None:
    common = sorted(after.keys() & before.keys())
    if not common:
        return None
    return SeedChange(seed, np.array([after[g] for g in common]), np.array([before[g] for g in common]))


def seed_figures(run: RunDir, seed: int, k: int, missing: list[str]) -> dict[str, SeedChange]:
    """Round k's paired changes from round 0 in one seed's run, by figure: ``all`` (every
    training game), ``partner:<name>`` (each training partner's games; left out when ``self``
    is the only partner, being ``all``), ``heldout:<spec>`` (each held-out partner)."""
    label = f"{seed_folder(seed)} round {k}"
    try:
        cfg = run.load_config()
    except ValueError as exc:  # a config that no longer reads (ConfigError is one)
        missing.append(f"{seed_folder(seed)}: {exc}")
        return {}
    if cfg.rollout.contexts != "same":
        return {}  # each round drew its own games: nothing to pair
    now = _episodes(run.round(k).episodes, missing, label)
    then = _episodes(run.round(0).episodes, missing, f"{seed_folder(seed)} round 0")
    out: dict[str, SeedChange] = {}
    if (c := _paired(learner_rewards(now), learner_rewards(then), seed)) is not None:
        out[ALL_GAMES] = c

    def partner(ep: Episode) -> str:
        return ep.meta.get("partner", "self")

    names = list(dict.fromkeys(partner(ep) for ep in now))
    if names != ["self"]:
        for name in names:
            mine = [ep for ep in now if partner(ep) == name]
            before = [ep for ep in then if partner(ep) == name]
            if (c := _paired(learner_rewards(mine), learner_rewards(before), seed)) is not None:
                out[f"partner:{name}"] = c
    for i, spec in enumerate(str(p) for p in cfg.heldout.partners):
        now_h = _episodes(run.round(k).heldout_episodes(i), missing, label)
        then_h = _episodes(run.round(0).heldout_episodes(i), missing, f"{seed_folder(seed)} round 0")
        if (c := _paired(learner_rewards(now_h), learner_rewards(then_h), seed)) is not None:
            out[f"heldout:{spec}"] = c
    return out


def figure_label(key: str) -> str:
    """``all`` → "all games", ``partner:bot:x`` → "bot:x", ``heldout:bot:y`` → "bot:y *"."""
    if key == ALL_GAMES:
        return "all games"
    kind, _, name = key.partition(":")
    return name + (" *" if kind == "heldout" else "")


@dataclass
class SeedsView:
    """A multi-seed run read back: per seed its complete rounds' games, and the figures across seeds."""

    dir: Path
    seeds: list[int]
    config: dict[str, Any] | None
    tables: dict[int, dict[int, GameTable]]
    """seed → round → its complete round's games (figures of ``metrics.METRICS``)."""
    changes: list[dict[str, Any]]
    """One entry per (round ≥ 1, figure): ``{"k", "figure", "label"} | across_seeds(…)``, over the
    seeds whose round k is complete."""
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return (self.config or {}).get("name") or self.dir.name

    @property
    def rounds(self) -> list[int]:
        """Rounds complete in at least one seed."""
        return sorted({k for by_round in self.tables.values() for k in by_round})


def load_seeds(path: Path, seed: int = 0, resamples: int = RESAMPLES) -> SeedsView:
    """Read the multi-seed run in ``path`` (``RunDirError`` if it is none; ``ConfigError`` if its
    seeds disagree: ``SeedRuns.check``). A round counts in a seed once complete; seeds lacking
    a round are named in ``missing``. ``seed``: of the bootstrap."""
    runs = SeedRuns.find(path)
    if runs is None:
        raise RunDirError(f"{path}: not a run over seeds (no seeds.json, no seed-<s>/ folder with a config.yaml)")
    missing = runs.check()
    manifest = runs.read_manifest()
    present = runs.present_seeds()
    seeds = [s for s in runs.seeds() if s in present]
    config = manifest["config"] if manifest else runs.run(seeds[0]).load_config().model_dump(mode="json")
    tables: dict[int, dict[int, GameTable]] = {}
    per_round: dict[tuple[int, str], list[SeedChange]] = {}
    for s in seeds:
        run = runs.run(s)
        complete = run.complete_rounds()
        if not complete:
            missing.append(f"{seed_folder(s)}: no complete round yet")
        tables[s] = {}
        for k in complete:
            episodes = _episodes(run.round(k).episodes, missing, f"{seed_folder(s)} round {k}")
            if episodes:
                tables[s][k] = GameTable(episodes)
            if k == 0:
                continue
            for key, change in seed_figures(run, s, k, missing).items():
                per_round.setdefault((k, key), []).append(change)
    last = max((max(t) for t in tables.values() if t), default=0)
    for s in seeds:
        lacking = [k for k in range(last + 1) if k not in tables[s]]
        if lacking and tables[s]:
            missing.append(f"{seed_folder(s)}: round(s) {', '.join(map(str, lacking))} not complete")
    if not any(tables.values()):
        raise RunDirError(f"{path}: no seed has a complete round yet")
    changes = []
    for i, ((k, key), group) in enumerate(sorted(per_round.items(), key=lambda item: (item[0][0], _order(item[0][1])))):
        changes.append({"k": k, "figure": key, "label": figure_label(key)} | across_seeds(group, seed + i, resamples))
    return SeedsView(runs.path, seeds, config, tables, changes, missing)


def _order(key: str) -> tuple[int, str]:
    return ({"all": 0, "partner": 1, "heldout": 2}[key.partition(":")[0]], key)
