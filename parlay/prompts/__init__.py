"""Prompt texts, loaded as package data: system prompts per objective and the protocol's lines.

The texts themselves live beside this file (``system.txt``, ``objective_*.txt``,
``protocol.toml``); this module only fills them in. Which objective text a game gets is decided
by the table ``_OBJECTIVE_TEXT``, not by string comparisons scattered around.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources

from parlay.games.dond import ITEMS, TOTAL_VALUE, Context, Counts, Objective, count_phrase

_OBJECTIVE_TEXT: dict[str | None, str] = {
    "cooperative": "objective_cooperative.txt",
    "semi-competitive": "objective_semi_competitive.txt",
    "competitive": "objective_competitive.txt",
    None: "objective_weighted.txt",  # any λ between the presets
}


@cache
def _text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8").strip()


@cache
def protocol_lines() -> dict:
    """The fixed protocol lines of ``protocol.toml`` (kickoff, feedback per error code, …)."""
    return tomllib.loads(_text("protocol.toml"))


def inventory(counts: Counts) -> str:
    """(1, 2, 3) → '1 book, 2 hats and 3 balls'."""
    parts = [count_phrase(c, item) for c, item in zip(counts, ITEMS, strict=True)]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def values_text(values: Counts) -> str:
    """(3, 1, 0) → 'each book is worth 3 points, each hat 1 point and each ball 0 points'."""
    parts = [
        f"each {item} {'is worth ' if i == 0 else ''}{v} point{'' if v == 1 else 's'}"
        for i, (v, item) in enumerate(zip(values, ITEMS, strict=True))
    ]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def objective_text(obj: Objective) -> str:
    template = _text(_OBJECTIVE_TEXT[obj.preset])
    if obj.preset is not None:
        return template
    lines = protocol_lines()
    return template.format(
        sign="plus" if obj.lam >= 0 else "minus",
        weight=f"{abs(obj.lam):g}",
        advice=lines["advice_positive"] if obj.lam >= 0 else lines["advice_negative"],
    )


def system_prompt(context: Context, player: str, obj: Objective, max_messages: int | None) -> str:
    """The system prompt that tells ``player`` the rules, its values and its objective.

    The game's own facts (its items and this player's values) come last: every game of a run
    then shares all that precedes them, and the transformers backend computes that shared
    prefix once for all conversations instead of once per player and game."""
    cap = max_messages if max_messages is not None else "many"
    return _text("system.txt").format(
        inventory=inventory(context.counts),
        values=values_text(context.values(player)),
        total=TOTAL_VALUE,
        objective=objective_text(obj),
        max_messages=cap,
    )


def feedback(code: str, context: Context, max_reply_chars: int | None = None) -> str:
    """The line a player gets after a rejected reply with error ``code``."""
    return protocol_lines()["feedback"][code].format(inventory=inventory(context.counts), limit=max_reply_chars)


def judge_prompt() -> str:
    """The judge's instructions (``judge.txt``): rate one player-episode 0-10."""
    return _text("judge.txt")


def consistency_prompt() -> str:
    """The consistency judge's instructions (``consistency.txt``): does a message misstate facts?"""
    return _text("consistency.txt")
