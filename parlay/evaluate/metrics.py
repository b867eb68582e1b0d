"""Metrics of a set of episodes, with bootstrap intervals.

Averages run over games and both players; a game without a valid deal counts as 0. Every
figure is computed here and nowhere else, so the CLI, the training loop, tournaments and reports
agree.

- ``error_rate`` is rejected attempts over all attempts (accepted + rejected).
- ``tokens_per_game`` counts generated tokens where the agents reported them, else words.
- Vocabulary and n-gram entropy are over the lower-cased words of accepted messages.
- ``mean_reward_a`` / ``mean_reward_b``: one seat's mean reward (in cross-play: one agent's).
- ``above_mean_share``: share of player-episodes whose reward is above the mean of the set (what
  the paper's filter keeps).
- ``ceiling_share``: each game's mean reward as a share of that game's ceiling (the mean reward of
  its best division under the objective), averaged over games whose ceiling is above zero: how
  well the players divided, no deal counting as 0.
- ``nash_distance``: distance of the outcome (X_A, X_B) from the Nash bargaining point of the
  context (``Context.nash_point``), in units of the total value (10 points); no deal is (0, 0).
  ``nash_distance_agreed``: the same over agreed games only — how well a deal divides, apart
  from reaching one.
- ``competitiveness``: the mean of the contexts' competitiveness index (``Context.competitiveness``:
  1 = strictly opposed values), to read the other figures against.
- ``inconsistency_rate``: share of accepted messages that misstate the speaker's own counts or
  values, by the rules of ``consistency.py``.

Every metric is a function of per-game multiplicities ``w`` (shape resamples × games): the point
estimate is ``w = 1``, and a bootstrap resample is ``w = how often each game was drawn``. So one
definition serves both, and 2,000 resamples of every metric of a 64-game round take about 0.1 s
on two CPU cores.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from parlay.episode import Episode
from parlay.evaluate.consistency import violations
from parlay.games.dond import TOTAL_VALUE

_WORD = re.compile(r"[a-z0-9']+")
NGRAM_ORDERS = (2, 3, 4, 5)
RESAMPLES = 2000


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def episode_figures(ep: Episode) -> dict[str, Any]:
    """Per-game figures the aggregate metrics are built from."""
    ctx = ep.game_context()
    xa, xb = ep.raw_scores
    agreed = ep.agreed
    reported = [t.tokens for t in ep.turns if t.tokens is not None]
    messages = [(t.player, t.message or "") for _, t in ep.message_turns()]
    reward, ceiling = sum(ep.rewards) / len(ep.rewards), ctx.reward_ceiling(ep.game_objective())
    na, nb = ctx.nash_point
    nash_distance = ((xa - na) ** 2 + (xb - nb) ** 2) ** 0.5 / TOTAL_VALUE
    return {
        "agreed": agreed,
        "reward": reward,
        "raw": (xa + xb) / 2,
        "ceiling": ceiling,
        "ceiling_share": reward / ceiling if ceiling > 0 else 0.0,
        "has_ceiling": ceiling > 0,
        "nash_distance": nash_distance,
        "nash_distance_agreed": nash_distance if agreed else 0.0,
        "competitiveness": ctx.competitiveness,
        "raw_ceiling": ctx.max_welfare / 2,
        "pareto": agreed and ctx.is_pareto_optimal(xa, xb),
        "welfare_ratio": (xa + xb) / ctx.max_welfare,
        "attempts": len(ep.turns),
        "rejected": sum(not t.accepted for t in ep.turns),
        "aborted": ep.outcome.status == "aborted",
        "failed": ep.outcome.status == "failed",
        "messages": len(messages),
        "inconsistent": sum(bool(violations(text, ctx, who)) for who, text in messages),
        "tokens": sum(reported) if reported else sum(len(words(t.text)) for t in ep.turns),
    }


class GameTable:
    """The figures of a set of games as arrays, one entry per game, ready to be weighted."""

    def __init__(self, episodes: Sequence[Episode]) -> None:
        figs = [episode_figures(ep) for ep in episodes]
        keys = figs[0].keys() if figs else ()
        self.games = len(figs)
        self.col = {k: np.array([f[k] for f in figs], dtype=float) for k in keys}
        self.player_rewards = np.array([ep.rewards for ep in episodes], dtype=float).reshape(-1, 2)
        # Word n-grams as (game, id, count) triples: a weighted count is one bincount.
        self.grams: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
        token_lists = [[words(m) for m in ep.messages()] for ep in episodes]
        for n in (1, *NGRAM_ORDERS):
            ids: dict[tuple[str, ...], int] = {}
            game_idx, gram_idx, counts = [], [], []
            for g, lists in enumerate(token_lists):
                c = Counter(tuple(t[i : i + n]) for t in lists for i in range(len(t) - n + 1))
                for gram, k in c.items():
                    game_idx.append(g)
                    gram_idx.append(ids.setdefault(gram, len(ids)))
                    counts.append(k)
            self.grams[n] = (np.array(game_idx, int), np.array(gram_idx, int), np.array(counts, float), len(ids))

    def gram_counts(self, w: np.ndarray, n: int) -> np.ndarray:
        """(resamples × distinct n-grams) counts under game weights ``w``."""
        game_idx, gram_idx, counts, size = self.grams[n]
        out = np.zeros((len(w), size))
        for r, row in enumerate(w):
            out[r] = np.bincount(gram_idx, weights=row[game_idx] * counts, minlength=size)
        return out


Statistic = Callable[[GameTable, np.ndarray], np.ndarray]


def _ratio(num: str, den: str | None = None) -> Statistic:
    """Σ w·num / Σ w·den (den: one per game); 0 where the denominator is 0."""

    def stat(t: GameTable, w: np.ndarray) -> np.ndarray:
        top = w @ t.col[num]
        bottom = w @ t.col[den] if den else w.sum(axis=1)
        return np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)

    return stat


def _seat(player: int) -> Statistic:
    """Mean reward of one seat (0: player A, 1: player B) — in cross-play, of one agent."""

    def stat(t: GameTable, w: np.ndarray) -> np.ndarray:
        games = w.sum(axis=1)
        top = w @ t.player_rewards[:, player]
        return np.divide(top, games, out=np.zeros_like(top), where=games > 0)

    return stat


def _above_mean_share(t: GameTable, w: np.ndarray) -> np.ndarray:
    players = 2 * w.sum(axis=1)
    safe = np.maximum(players, 1)
    mean = (w @ t.player_rewards.sum(axis=1)) / safe
    above = (t.player_rewards[None, :, :] > mean[:, None, None]).sum(axis=2)
    return np.where(players > 0, (w * above).sum(axis=1) / safe, 0.0)


def _vocabulary(t: GameTable, w: np.ndarray) -> np.ndarray:
    return (t.gram_counts(w, 1) > 0).sum(axis=1).astype(float)


def _entropy(n: int) -> Statistic:
    def stat(t: GameTable, w: np.ndarray) -> np.ndarray:
        c = t.gram_counts(w, n)
        total = c.sum(axis=1, keepdims=True)
        p = np.divide(c, total, out=np.zeros_like(c), where=total > 0)
        return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis=1)

    return stat


METRICS: dict[str, Statistic] = {
    "games": lambda t, w: w.sum(axis=1),
    "agreement_rate": _ratio("agreed"),
    "mean_reward": _ratio("reward"),
    "mean_reward_a": _seat(0),
    "mean_reward_b": _seat(1),
    "mean_raw_score": _ratio("raw"),
    "mean_raw_score_agreed": _ratio("raw", "agreed"),
    "reward_ceiling": _ratio("ceiling"),
    "raw_score_ceiling": _ratio("raw_ceiling"),
    "pareto_rate": _ratio("pareto"),
    "pareto_rate_agreed": _ratio("pareto", "agreed"),
    "welfare_ratio": _ratio("welfare_ratio"),
    "ceiling_share": _ratio("ceiling_share", "has_ceiling"),
    "nash_distance": _ratio("nash_distance"),
    "nash_distance_agreed": _ratio("nash_distance_agreed", "agreed"),
    "competitiveness": _ratio("competitiveness"),
    "error_rate": _ratio("rejected", "attempts"),
    "abort_rate": _ratio("aborted"),
    "failure_rate": _ratio("failed"),
    "messages_per_game": _ratio("messages"),
    "tokens_per_game": _ratio("tokens"),
    "above_mean_share": _above_mean_share,
    "inconsistency_rate": _ratio("inconsistent", "messages"),
    "vocabulary_size": _vocabulary,
    **{f"ngram_entropy_{n}": _entropy(n) for n in NGRAM_ORDERS},
}
"""Every metric, in the order tables show them."""

LABELS: dict[str, tuple[str, str, str]] = {
    # name: (label, short label for wide tables, format)
    "games": ("games", "games", "{:.0f}"),
    "agreement_rate": ("agreement rate", "agree", "{:.1%}"),
    "mean_reward": ("mean reward", "reward", "{:.2f}"),
    "mean_reward_a": ("mean reward of A", "A's reward", "{:.2f}"),
    "mean_reward_b": ("mean reward of B", "B's reward", "{:.2f}"),
    "mean_raw_score": ("mean raw score", "raw", "{:.2f}"),
    "mean_raw_score_agreed": ("raw score (agreed)", "raw (agreed)", "{:.2f}"),
    "reward_ceiling": ("reward ceiling", "ceiling", "{:.2f}"),
    "raw_score_ceiling": ("raw score ceiling", "raw ceiling", "{:.2f}"),
    "pareto_rate": ("Pareto-optimal", "Pareto", "{:.1%}"),
    "pareto_rate_agreed": ("Pareto-optimal (agreed)", "Pareto (agreed)", "{:.1%}"),
    "welfare_ratio": ("welfare ratio", "welfare", "{:.3f}"),
    "ceiling_share": ("share of the ceiling", "of ceiling", "{:.1%}"),
    "nash_distance": ("distance to the Nash point", "Nash dist.", "{:.3f}"),
    "nash_distance_agreed": ("distance to Nash (agreed)", "Nash (agreed)", "{:.3f}"),
    "competitiveness": ("competitiveness of the contexts", "competitive", "{:.2f}"),
    "error_rate": ("error rate", "errors", "{:.1%}"),
    "abort_rate": ("abort rate", "aborts", "{:.1%}"),
    "failure_rate": ("failure rate", "failures", "{:.1%}"),
    "messages_per_game": ("messages / game", "messages", "{:.1f}"),
    "tokens_per_game": ("tokens / game", "tokens", "{:.0f}"),
    "above_mean_share": ("above the mean", "above mean", "{:.1%}"),
    "inconsistency_rate": ("inconsistent messages", "inconsistent", "{:.1%}"),
    "vocabulary_size": ("vocabulary", "vocabulary", "{:.0f}"),
    **{f"ngram_entropy_{n}": (f"{n}-gram entropy (bits)", f"H{n}", "{:.2f}") for n in NGRAM_ORDERS},
}
"""How tables name and print each metric."""

INTEGER_METRICS = {"games", "vocabulary_size"}
TEXT_METRICS = {"vocabulary_size", *(f"ngram_entropy_{n}" for n in NGRAM_ORDERS)}
"""Counts of distinct words and n-grams shrink when games are drawn with repetition, so their
resamples sit below the point estimate; their interval is shifted by that bias (below)."""


def compute_metrics(episodes: Sequence[Episode] | GameTable) -> dict[str, Any]:
    """Every metric over ``episodes``; see the module docstring for definitions."""
    table = episodes if isinstance(episodes, GameTable) else GameTable(episodes)
    if not table.games:
        return {name: 0 if name in INTEGER_METRICS else 0.0 for name in METRICS}
    ones = np.ones((1, table.games))
    out: dict[str, Any] = {}
    for name, stat in METRICS.items():
        value = float(stat(table, ones)[0])
        out[name] = round(value) if name in INTEGER_METRICS else value
    return out


def resample_weights(games: int, seed: int = 0, resamples: int = RESAMPLES) -> np.ndarray:
    """How often each game is drawn in each bootstrap resample (resamples × games)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, games, (resamples, games))
    return np.stack([np.bincount(row, minlength=games) for row in draws]).astype(float)


def metric_intervals(
    episodes: Sequence[Episode] | GameTable, seed: int = 0, resamples: int = RESAMPLES
) -> dict[str, list[float]]:
    """A bootstrap 95 % interval of every metric (``games`` excepted), resampling games.

    Percentile intervals, except for ``TEXT_METRICS``: a resample repeats games, so it has fewer
    distinct words than the games themselves; their percentiles are shifted by the bootstrap's
    estimate of that bias (mean of resamples − point estimate)."""
    table = episodes if isinstance(episodes, GameTable) else GameTable(episodes)
    if not table.games:
        return {}
    w = resample_weights(table.games, seed, resamples)
    ones = np.ones((1, table.games))
    out = {}
    for name, stat in METRICS.items():
        if name == "games":
            continue
        values = stat(table, w)
        low, high = np.percentile(values, [2.5, 97.5])
        if name in TEXT_METRICS:
            bias = values.mean() - stat(table, ones)[0]
            low, high = low - bias, high - bias
        out[name] = [float(low), float(high)]
    return out


def summarize(episodes: Sequence[Episode], seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """``{"metrics": …, "ci95": …}`` for one set of games."""
    table = GameTable(episodes)
    return {"metrics": compute_metrics(table), "ci95": metric_intervals(table, seed, resamples)}


def game_rewards(episodes: Sequence[Episode]) -> dict[str, float]:
    """Each game's reward, averaged over its two players, by game id."""
    return {ep.id: sum(ep.rewards) / len(ep.rewards) for ep in episodes}


def learner_rewards(episodes: Sequence[Episode]) -> dict[str, float]:
    """Each game's reward of the side(s) being trained, by game id: ``meta["learner"]`` names
    them (``"A"`` against a partner; both, the default, in self-play)."""
    out = {}
    for ep in episodes:
        seats = [i for i, p in enumerate("AB") if p in ep.meta.get("learner", "AB")]
        out[ep.id] = sum(ep.rewards[i] for i in seats) / len(seats)
    return out


def paired_difference(
    after: Sequence[Episode], before: Sequence[Episode], seed: int = 0, resamples: int = 10_000
) -> dict[str, Any] | None:
    """The learner's mean reward difference (``learner_rewards``; in self-play the game's mean)
    over the games both sets played (same ids: same seeded context, first speaker and sampling
    seeds), with a bootstrap 95 % confidence interval; None when the two sets share no game."""
    return paired_bootstrap(learner_rewards(after), learner_rewards(before), seed, resamples)


PARTNER_METRICS = ("agreement_rate", "pareto_rate", "ceiling_share", "nash_distance_agreed", "error_rate")


def partner_summary(episodes: Sequence[Episode], before: Sequence[Episode] | None = None) -> dict[str, Any]:
    """The trained model's figures with one partner: its own mean reward (with a bootstrap 95 %
    interval), the games' agreement, Pareto share, ceiling share, distance to the Nash point and
    errors; with ``before`` (the same games at round 0), the paired change of its reward."""
    rewards = np.array(list(learner_rewards(episodes).values()))
    metrics = compute_metrics(episodes)
    out: dict[str, Any] = {"games": len(episodes), "mean_reward": float(rewards.mean()) if len(rewards) else 0.0}
    if len(rewards):
        means = (resample_weights(len(rewards), 0) @ rewards) / len(rewards)
        out["ci95"] = [float(x) for x in np.percentile(means, [2.5, 97.5])]
    out |= {name: metrics[name] for name in PARTNER_METRICS}
    if before is not None:
        out["vs_round0"] = paired_difference(episodes, before)
    return out


def format_change(change: dict[str, Any] | None) -> str:
    """A paired change as "+1.23 [+0.45, +2.01]" (empty when there is none)."""
    if not change:
        return ""
    low, high = change["ci95"]
    return f"{change['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"


def paired_bootstrap(
    after: dict[str, float], before: dict[str, float], seed: int = 0, resamples: int = 10_000
) -> dict[str, Any] | None:
    """Mean of ``after[g] - before[g]`` over the games g both have, with a bootstrap 95 % interval
    over games; None when they share no game."""
    common = sorted(after.keys() & before.keys())
    if not common:
        return None
    diffs = np.array([after[g] - before[g] for g in common])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"games": len(common), "mean": float(diffs.mean()), "ci95": [float(low), float(high)]}
