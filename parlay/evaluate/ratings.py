"""Ratings of a tournament's agents: Bradley–Terry on paired comparisons, with intervals.

A general-sum game has no winner (under the cooperative objective both players score the same),
but a tournament is a paired design: every agent plays every partner on the same seeded games.
So in game g, agent x *beats* agent y with partner z when x's own reward with z (averaged over
its two seats) is above y's with the same z on the same game; equal rewards are a tie, half a
win each. A Bradley–Terry model, P(x beats y) = s_x / (s_x + s_y), is fitted to all these
comparisons by minorisation–maximisation (Hunter, 2004), with half a win each way added to every
pair so that an agent that never lost keeps a finite rating. Ratings are on the Elo scale
(400·log10 s), centred on the agents' mean, with percentile 95 % intervals from refitting on
games drawn with replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parlay.episode import Episode

PRIOR_WINS = 0.5
ELO = 400 / np.log(10)


def _own(played: dict[tuple[int, int], list[Episode]], x: int, z: int, games: list[str]) -> np.ndarray:
    """Agent x's reward with partner z in each game, averaged over its two seats."""
    as_a = {ep.id: ep.rewards[0] for ep in played[(x, z)]}
    as_b = {ep.id: ep.rewards[1] for ep in played[(z, x)]}
    return np.array([(as_a[g] + as_b[g]) / 2 for g in games])


def game_comparisons(n: int, played: dict[tuple[int, int], list[Episode]]) -> np.ndarray:
    """wins[g, x, y]: in game g, how often x beat y over the partners both played (ties: ½)."""
    games = sorted({ep.id for ep in played[(0, 0)]})
    own = np.stack([np.stack([_own(played, x, z, games) for z in range(n)]) for x in range(n)])  # x, z, g
    diff = own[:, None, :, :] - own[None, :, :, :]  # x, y, z, g
    wins = (diff > 0) + 0.5 * (diff == 0)
    eye = np.eye(n, dtype=bool)
    wins[eye] = 0.0
    return wins.sum(axis=2).transpose(2, 0, 1)  # g, x, y


def fit_bradley_terry(wins: np.ndarray, iterations: int = 500) -> np.ndarray:
    """Log-strengths (mean 0) from a matrix of wins[x, y] (x over y)."""
    n = len(wins)
    w = wins + PRIOR_WINS * (1 - np.eye(n))
    games = w + w.T
    total = w.sum(axis=1)
    s = np.ones(n)
    for _ in range(iterations):
        denom = (games / (s[:, None] + s[None, :])).sum(axis=1)
        new = total / denom
        new /= np.exp(np.log(new).mean())
        if np.allclose(new, s, rtol=1e-10, atol=0):
            break
        s = new
    return np.log(s) - np.log(s).mean()


def ratings(
    specs: Sequence[str], played: dict[tuple[int, int], list[Episode]], seed: int = 0, resamples: int = 200
) -> list[dict[str, Any]]:
    """Each agent's rating (Elo scale) with its bootstrap 95 % interval, best first."""
    n = len(specs)
    if n < 2:
        return []
    per_game = game_comparisons(n, played)
    point = fit_bradley_terry(per_game.sum(axis=0)) * ELO
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_game), (resamples, len(per_game)))
    boot = np.stack([fit_bradley_terry(per_game[d].sum(axis=0)) * ELO for d in draws])
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    order = np.argsort(-point, kind="stable")
    return [{"agent": specs[i], "rating": float(point[i]), "ci95": [float(low[i]), float(high[i])]} for i in order]
