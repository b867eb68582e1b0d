"""Checks every game implementation and every agent must pass (cf. PettingZoo's api_test).

``check_game`` drives the game core with seeded random replies — valid and malformed — and
checks its invariants; ``check_agents`` plays seeded games between two agents, twice, and checks
termination, determinism, score bounds and the objective's formula. New backends run these in
their own tests.
"""

from __future__ import annotations

import numpy as np

from parlay.agents.base import Agent
from parlay.episode import Episode
from parlay.games.dond import Context, Objective
from parlay.protocol import Game, message_reply, proposal_reply
from parlay.rollout import plan_games, play_games


class CheckFailed(AssertionError):
    pass


def _require(ok: bool, what: str, ep: Episode | None = None) -> None:
    if not ok:
        raise CheckFailed(f"{what}" + (f" (episode {ep.id})" if ep else ""))


def check_episode(ep: Episode, obj: Objective) -> None:
    """Invariants every finished episode satisfies, whoever played it."""
    ctx = ep.game_context()
    xa, xb = ep.raw_scores
    _require(0 <= xa <= 10 and 0 <= xb <= 10, f"raw scores {ep.raw_scores} outside [0, 10]", ep)
    low, high = obj.reward_bounds()
    _require(all(low <= r <= high for r in ep.rewards), f"rewards {ep.rewards} outside [{low}, {high}]", ep)
    if ep.agreed:
        a, b = ep.outcome.proposals["A"], ep.outcome.proposals["B"]
        _require([x + y for x, y in zip(a, b, strict=True)] == list(ctx.counts), "a deal must split the items", ep)
        _require(tuple(ep.raw_scores) == ctx.scores_for(tuple(a)), "raw scores must follow the deal", ep)
        expected = obj.rewards(xa, xb)
        _require(all(abs(r - e) < 1e-9 for r, e in zip(ep.rewards, expected, strict=True)), "reward formula", ep)
    else:
        _require(ep.raw_scores == [0, 0] and ep.rewards == [0.0, 0.0], "no deal must score 0 for both", ep)
    streak = 0
    for turn in ep.turns:
        streak = 0 if turn.accepted else streak + 1
        if not turn.accepted:
            _require(turn.error is not None and bool(turn.feedback), "a rejected turn needs a reason and feedback", ep)
        _require(streak <= 5, "more than 5 consecutive rejections without an abort", ep)
    if ep.outcome.status == "aborted":
        _require(streak == 5, "an abort follows exactly 5 consecutive rejections", ep)
    for player in ("A", "B"):
        own = [t for t in ep.turns if t.player == player and t.accepted]
        said = [m for m in ep.transcripts[player] if m["role"] == "assistant"]
        _require(len(own) == len(said), f"{player}'s transcript must hold exactly its accepted turns", ep)
        partner = "B" if player == "A" else "A"
        for t in ep.turns:
            if t.player == partner and t.kind == "proposal":
                hidden = proposal_reply(tuple(t.proposal))  # type: ignore[arg-type]
                leaked = any(hidden in m["content"] for m in ep.transcripts[player] if m["role"] == "user")
                _require(not leaked, f"{partner}'s proposal leaked to {player}", ep)
    if ep.max_messages is not None:
        _require(len(ep.messages()) <= ep.max_messages, "message cap exceeded", ep)


def check_agents(
    agent_a: Agent, agent_b: Agent, obj: Objective, n: int = 20, seed: int = 0, max_messages: int = 20
) -> list[Episode]:
    """Play ``n`` seeded games twice; check termination, determinism and every episode."""
    games = plan_games(n, seed)
    first = play_games(agent_a, agent_b, games, obj, max_messages)
    again = play_games(agent_a, agent_b, games, obj, max_messages)
    _require(len(first) == n, f"{len(first)} episodes for {n} games")
    for ep1, ep2 in zip(first, again, strict=True):
        _require(ep1.model_dump() == ep2.model_dump(), "same seed must give the same episode", ep1)
        check_episode(ep1, obj)
    return first


def random_reply(rng: np.random.Generator, counts: tuple[int, ...]) -> str:
    """A random reply: valid messages and proposals, and every kind of malformed output."""
    kept = tuple(int(rng.integers(0, c + 2)) for c in counts)
    options = [
        message_reply(f"offer {int(rng.integers(100))}"),
        proposal_reply(kept),  # type: ignore[arg-type]
        f"[PROPOSE] ({kept[0]} book, {kept[1]} hat, {kept[2]} ball) [END] trailing",
        "",
        "no tag at all",
        "[message] a [message] b",
        "[message]   ",
        "[propose] (two books)",
    ]
    return options[int(rng.integers(len(options)))]


def check_game(context: Context, obj: Objective, seed: int, max_messages: int = 20) -> Game:
    """Drive one game with seeded random replies to the end and check its invariants."""
    rng = np.random.default_rng(seed)
    first = "A" if rng.random() < 0.5 else "B"
    game = Game(context, obj, first, max_messages)
    limit = (max_messages + 2) * 5 + 5
    for _ in range(limit):
        if game.is_terminal:
            break
        before = len(game.turns)
        game.step(random_reply(rng, context.counts))
        _require(len(game.turns) == before + 1, "each step records exactly one turn")
    _require(game.is_terminal, f"game did not end within {limit} replies")
    check_episode(Episode.from_game(game, f"check-{seed}"), obj)
    return game
