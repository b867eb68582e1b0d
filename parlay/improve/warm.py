"""The warm start's demonstrations: bot games a model imitates before it plays (paper §5.3).

A small model does not follow the text protocol by itself; imitating the valid deals of games
between two bots first teaches it the wire format and what a proposal that divides the items
looks like. ``loop.Loop.warm_start`` (before round 0) and ``improve/proxy.py`` (before a human
proxy learns from people) both take their demonstrations and examples from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from parlay.agents import load_agent
from parlay.config import WarmStartConfig, WeightConfig
from parlay.episode import Episode
from parlay.errors import UserError
from parlay.games.dond import Objective
from parlay.improve.examples import Selected, select_examples
from parlay.rollout import derive_seed, plan_games, play_games


def bot_demonstrations(
    ws: WarmStartConfig,
    obj: Objective,
    seed: int,
    max_messages: int | None,
    on_start: Callable[[str, int], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> list[Episode]:
    """``ws.games`` seeded games between ``ws.bots`` (A, B) under ``obj``; ``on_start(label,
    games)`` is told before they are played."""
    a, b = (load_agent(s) for s in ws.bots or [])
    games = plan_games(ws.games, derive_seed(seed, 7919))
    if on_start is not None:
        on_start(f"warm start: {a.spec} vs {b.spec}", len(games))
    return play_games(a, b, games, obj, max_messages, on_episode=on_episode)


def warm_examples(episodes: Sequence[Episode], ws: WarmStartConfig) -> Selected:
    """The demonstrations' sides that pass ``ws.filter``, uniformly weighted; ``UserError`` when none does."""
    selected = select_examples(episodes, ws.filter, WeightConfig())
    if not selected.examples:
        raise UserError(f"warm start: no demonstration passes filter rule {ws.filter.rule!r}")
    return selected
