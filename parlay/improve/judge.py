"""LLM-judge ratings of player-episodes (SOTOPIA-π style).

Any language model can judge through the plain completion call (``Agent.complete``): it reads
the judge instructions as the system prompt and, as the user turn, the player's own
instructions and its side of the dialogue, and answers with a whole number from 0 to 10. The
rating then filters (rating >= min_rating) or weights the player-episode (``examples.py``). A
reply without a readable rating gets ``None``: it is counted, and such episodes are dropped by
the filter and weigh 0. ``correlation`` tells how far the ratings follow the true reward.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from parlay import prompts
from parlay.agents.base import Agent, Prompt
from parlay.episode import PlayerEpisode

_RATING = re.compile(r"(?<![\d.])(10|\d)(?:\.\d+)?(?![\d])")


def parse_rating(text: str) -> float | None:
    """The first whole number 0-10 in a judge's reply, or None."""
    match = _RATING.search(text)
    return float(match.group(1)) if match else None


def render(pe: PlayerEpisode) -> str:
    """The player's instructions and its side of the dialogue, as one text for the judge."""
    system, *turns = pe.messages
    names = {"assistant": "Player", "user": "Partner / game"}
    dialogue = "\n".join(f"{names[m['role']]}: {m['content']}" for m in turns)
    return f"The player's instructions:\n{system['content']}\n\nThe dialogue:\n{dialogue}"


def rate(judge: Agent, episodes: Sequence[PlayerEpisode], seed: int = 0) -> list[float | None]:
    """One rating per player-episode."""
    requests = [
        Prompt(
            [{"role": "system", "content": prompts.judge_prompt()}, {"role": "user", "content": render(pe)}], seed + i
        )
        for i, pe in enumerate(episodes)
    ]
    replies = judge.complete(requests) if requests else []
    return [None if r.error else parse_rating(r.text) for r in replies]


def correlation(ratings: Sequence[float | None], rewards: Sequence[float]) -> dict[str, float | int | None]:
    """Pearson and Spearman correlation of the readable ratings with the true rewards."""
    pairs = [(r, w) for r, w in zip(ratings, rewards, strict=True) if r is not None]
    out: dict[str, float | int | None] = {"rated": len(pairs), "unreadable": len(ratings) - len(pairs)}
    if len(pairs) < 3:
        return out | {"pearson": None, "spearman": None}
    x, y = np.array(pairs, dtype=float).T
    if x.std() == 0 or y.std() == 0:
        return out | {"pearson": None, "spearman": None}

    def ranks(v: np.ndarray) -> np.ndarray:
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    return out | {
        "pearson": float(np.corrcoef(x, y)[0, 1]),
        "spearman": float(np.corrcoef(ranks(x), ranks(y))[0, 1]),
    }
