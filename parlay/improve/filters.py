"""Which player-episodes a round learns from.

Rules (``FilterConfig.rule``), all over the player-episodes of one round:

- ``above_mean``: reward strictly above the baseline — the paper's rule, with the baseline the
  mean over all player-episodes of the round, or (``baseline: context``) over those played on the
  same context;
- ``nonzero``: reward above zero (the player scored);
- ``agreed``: the sides of valid deals (the warm start's default on demonstrations);
- ``all``: everything;
- ``top_fraction``: the ``fraction`` with the highest rewards (ties broken by order of play);
- ``threshold``: reward at least ``threshold``.

``keep_valid_ties`` adds the sides of valid deals whose reward is exactly 0, which a strictly
competitive objective produces for every even split (the paper's competitive variant). When
nothing passes, ``on_empty`` says what happens: ``skip`` trains nothing this round, ``nonzero``
falls back to that rule; either way the result says so.

When the baseline is negative (most deals lost points, as under a competitive objective early
on), ``above_mean`` keeps the sides that ended without a deal; if they are most of what it kept,
the result's note says so, since training on them teaches the model to avoid deals
(docs/RESULTS.md, the competitive runs) and ``nonzero`` keeps only the sides that won.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from parlay.config import FilterConfig
from parlay.episode import PlayerEpisode


@dataclass(frozen=True)
class Selection:
    kept: list[int]
    """Indices of the kept player-episodes, in order of play."""
    baselines: list[float]
    """Per player-episode (all of them), the mean reward it was compared with."""
    rule: str
    """The rule that produced ``kept`` (differs from the configured one after a fallback)."""
    note: str = ""
    """What happened when the configured rule kept nothing."""


def baselines(episodes: Sequence[PlayerEpisode], per_context: bool = False) -> list[float]:
    """The round mean for each player-episode, or the mean over the same context."""
    if not episodes:
        return []
    if not per_context:
        mean = sum(p.reward for p in episodes) / len(episodes)
        return [mean] * len(episodes)
    groups: dict[str, list[float]] = defaultdict(list)
    for p in episodes:
        groups[p.context_key].append(p.reward)
    means = {k: sum(v) / len(v) for k, v in groups.items()}
    return [means[p.context_key] for p in episodes]


def _passes(rule: str, episodes: Sequence[PlayerEpisode], base: list[float], cfg: FilterConfig) -> list[bool]:
    rewards = [p.reward for p in episodes]
    if rule == "above_mean":
        return [r > b for r, b in zip(rewards, base, strict=True)]
    if rule == "nonzero":
        return [r > 0 for r in rewards]
    if rule == "agreed":
        return [p.agreed for p in episodes]
    if rule == "all":
        return [True] * len(rewards)
    if rule == "threshold":
        return [r >= cfg.threshold for r in rewards]
    if rule == "top_fraction":
        k = math.ceil(cfg.fraction * len(rewards))
        order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
        top = set(order[:k])
        return [i in top for i in range(len(rewards))]
    raise ValueError(f"unknown filter rule {rule!r}")


def select(episodes: Sequence[PlayerEpisode], cfg: FilterConfig) -> Selection:
    """Apply the configured rule (and ``keep_valid_ties``, and the empty-set policy)."""
    base = baselines(episodes, per_context=cfg.baseline == "context")

    def run(rule: str) -> list[int]:
        ok = _passes(rule, episodes, base, cfg)
        if cfg.keep_valid_ties:
            ok = [k or (p.agreed and p.reward == 0) for k, p in zip(ok, episodes, strict=True)]
        return [i for i, k in enumerate(ok) if k]

    kept = run(cfg.rule)
    if kept or not episodes:
        return Selection(kept, base, cfg.rule, _no_deal_warning(episodes, base, kept))
    note = f"rule {cfg.rule} kept none of {len(episodes)} player-episodes"
    if cfg.on_empty == "nonzero" and cfg.rule != "nonzero":
        kept = run("nonzero")
        return Selection(kept, base, "nonzero", f"{note}; fell back to nonzero, which kept {len(kept)}")
    return Selection([], base, cfg.rule, f"{note}; this round's training is skipped")


def _no_deal_warning(episodes: Sequence[PlayerEpisode], base: list[float], kept: list[int]) -> str:
    """A note when most kept sides passed only because their no-deal 0 beat a negative baseline."""
    no_deal = [i for i in kept if not episodes[i].agreed and episodes[i].reward == 0 and base[i] < 0]
    if 2 * len(no_deal) <= len(kept):
        return ""
    return (
        f"{len(no_deal)} of the {len(kept)} kept sides ended without a deal and pass only because the baseline "
        f"is negative (most deals lost points): training on them teaches the model to avoid deals; "
        f"filter.rule: nonzero keeps only the sides that won"
    )
