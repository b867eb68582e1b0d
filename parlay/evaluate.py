"""Metrics of a set of episodes (DESIGN.md, "Metrics" — normative).

Averages run over games and both players; a game without a valid deal counts as 0. Every
figure is computed here and nowhere else, so the CLI, the training loop and the reports agree.

- ``error_rate`` is rejected attempts over all attempts (accepted + rejected).
- ``tokens_per_game`` counts generated tokens where the agents reported them, else words.
- Vocabulary and n-gram entropy are over the lower-cased words of accepted messages.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from parlay.episode import Episode

_WORD = re.compile(r"[a-z0-9']+")
NGRAM_ORDERS = (2, 3, 4, 5)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_entropy(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """Shannon entropy (bits) of the n-gram distribution over all messages."""
    counts: Counter[tuple[str, ...]] = Counter()
    for toks in token_lists:
        counts.update(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def episode_figures(ep: Episode) -> dict[str, Any]:
    """Per-game figures the aggregate metrics are built from."""
    ctx = ep.game_context()
    xa, xb = ep.raw_scores
    agreed = ep.agreed
    attempts = len(ep.turns)
    rejected = sum(not t.accepted for t in ep.turns)
    reported = [t.tokens for t in ep.turns if t.tokens is not None]
    words = sum(len(_words(t.text)) for t in ep.turns)
    return {
        "agreed": agreed,
        "reward": _mean(ep.rewards),
        "raw": (xa + xb) / 2,
        "ceiling": ctx.reward_ceiling(ep.game_objective()),
        "raw_ceiling": ctx.max_welfare / 2,
        "pareto": agreed and ctx.is_pareto_optimal(xa, xb),
        "welfare_ratio": (xa + xb) / ctx.max_welfare,
        "attempts": attempts,
        "rejected": rejected,
        "aborted": ep.outcome.status == "aborted",
        "failed": ep.outcome.status == "failed",
        "messages": len(ep.messages()),
        "tokens": sum(reported) if reported else words,
    }


def compute_metrics(episodes: Sequence[Episode]) -> dict[str, Any]:
    """Every DESIGN.md metric over ``episodes``; see the module docstring for definitions."""
    figs = [episode_figures(ep) for ep in episodes]
    agreed = [f for f in figs if f["agreed"]]
    token_lists = [_words(m) for ep in episodes for m in ep.messages()]
    attempts = sum(f["attempts"] for f in figs)
    metrics: dict[str, Any] = {
        "games": len(figs),
        "agreement_rate": _mean([f["agreed"] for f in figs]),
        "mean_reward": _mean([f["reward"] for f in figs]),
        "mean_raw_score": _mean([f["raw"] for f in figs]),
        "mean_raw_score_agreed": _mean([f["raw"] for f in agreed]),
        "reward_ceiling": _mean([f["ceiling"] for f in figs]),
        "raw_score_ceiling": _mean([f["raw_ceiling"] for f in figs]),
        "pareto_rate": _mean([f["pareto"] for f in figs]),
        "pareto_rate_agreed": _mean([f["pareto"] for f in agreed]),
        "welfare_ratio": _mean([f["welfare_ratio"] for f in figs]),
        "error_rate": sum(f["rejected"] for f in figs) / attempts if attempts else 0.0,
        "abort_rate": _mean([f["aborted"] for f in figs]),
        "failure_rate": _mean([f["failed"] for f in figs]),
        "messages_per_game": _mean([f["messages"] for f in figs]),
        "tokens_per_game": _mean([f["tokens"] for f in figs]),
        "vocabulary_size": len({w for toks in token_lists for w in toks}),
    }
    for n in NGRAM_ORDERS:
        metrics[f"ngram_entropy_{n}"] = ngram_entropy(token_lists, n)
    return metrics


def game_rewards(episodes: Sequence[Episode]) -> dict[str, float]:
    """Each game's reward, averaged over its two players, by game id."""
    return {ep.id: sum(ep.rewards) / len(ep.rewards) for ep in episodes}


def paired_difference(
    after: Sequence[Episode], before: Sequence[Episode], seed: int = 0, resamples: int = 10_000
) -> dict[str, Any] | None:
    """Mean reward difference over the games both sets played (same ids: same seeded context,
    first speaker and sampling seeds), with a bootstrap 95 % confidence interval; None when the
    two sets share no game."""
    a, b = game_rewards(after), game_rewards(before)
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    diffs = np.array([a[i] - b[i] for i in common])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"games": len(common), "mean": float(diffs.mean()), "ci95": [float(low), float(high)]}
