"""Play many games at once between two agents (or one agent with itself).

Each step gathers the pending turn of every unfinished game, sends all requests meant for one
agent in a single ``act`` call, and applies the replies through the game core; a rejected
reply is simply asked for again at the next step, with the feedback in the conversation.
Finished games are written out at once. Everything random derives from one seed: per game a
seed (context draw, first speaker) and per attempt a seed handed to the agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parlay.agents.base import Agent, Reply, TurnRequest
from parlay.episode import Episode, EpisodeWriter, ReadReport, read_episodes
from parlay.games.contexts import sample_contexts
from parlay.games.dond import DEFAULT_MAX_MESSAGES, MAX_REPLY_CHARS, Context, Objective, RuleError
from parlay.protocol import Game

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GameSpec:
    """What one game is played on, fixed before play starts."""

    id: str
    context: Context
    first_speaker: str
    seed: int
    opening: tuple[str, ...] = ()
    """Replies replayed before any agent moves (a recorded game's messages, for agents to carry
    on from; ``evaluate/proxy.py``), each of which the protocol must accept; the episode's
    ``meta["opening"]`` says how many of its turns they are. The game's message cap counts the
    agents' messages only: it is raised by the opening's."""


def derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def plan_games(n: int, seed: int, contexts: Sequence[Context] | None = None, group_size: int = 1) -> list[GameSpec]:
    """``n`` seeded games: contexts drawn uniformly (or taken in turn from ``contexts``) and a
    random first speaker. With ``group_size`` G, games come in groups of G consecutive games on
    the first one's context. The same arguments always give the same games, and the first k
    games of a larger plan equal a plan of k."""
    specs = []
    for i in range(n):
        game_seed = derive_seed(seed, i)
        rng = np.random.default_rng(game_seed)
        ctx = contexts[i % len(contexts)] if contexts else sample_contexts(1, rng)[0]
        if group_size > 1 and not contexts:  # the group's first game drew it
            ctx = sample_contexts(1, np.random.default_rng(derive_seed(seed, i - i % group_size)))[0]
        first = "A" if rng.random() < 0.5 else "B"
        specs.append(GameSpec(id=f"s{seed}-g{i:06d}", context=ctx, first_speaker=first, seed=game_seed))
    return specs


def split_finished(path: Path, games: Sequence[GameSpec]) -> tuple[dict[str, Episode], list[GameSpec]]:
    """The planned games already in the append-only file ``path`` (by id) and those still to play.

    A torn last line (a kill mid-write) is not a finished game: it is played again."""
    have: dict[str, Episode] = {}
    if path.exists():
        report = ReadReport()
        planned = {g.id for g in games}
        for ep in read_episodes(path, report):
            if ep.id in planned:
                have.setdefault(ep.id, ep)
        if report.truncated_tail:
            log.warning("%s: the last line was cut short by an interrupted write; that game is played again", path)
    return have, [g for g in games if g.id not in have]


@dataclass(frozen=True)
class Match:
    """One game to play: who sits as A and as B, what its episode carries, where it is written."""

    game: GameSpec
    a: Agent
    b: Agent
    meta: dict = field(default_factory=dict)
    writer: EpisodeWriter | None = None


def play_games(
    agent_a: Agent,
    agent_b: Agent,
    games: Sequence[GameSpec],
    objective: Objective,
    max_messages: int | None = DEFAULT_MAX_MESSAGES,
    writer: EpisodeWriter | None = None,
    on_episode: Callable[[Episode], None] | None = None,
    meta: dict | None = None,
    max_reply_chars: int | None = MAX_REPLY_CHARS,
) -> list[Episode]:
    """Play ``games`` between the same two agents to the end; return their episodes in order."""
    matches = [Match(g, agent_a, agent_b, meta or {}, writer) for g in games]
    return play_matches(matches, objective, max_messages, on_episode, max_reply_chars)


PlayMatches = Callable[..., list[Episode]]
"""``play_matches`` or another player with its signature (``distributed.RayPool.play_matches``)."""


def play_matches(
    matches: Sequence[Match],
    objective: Objective,
    max_messages: int | None = DEFAULT_MAX_MESSAGES,
    on_episode: Callable[[Episode], None] | None = None,
    max_reply_chars: int | None = MAX_REPLY_CHARS,
) -> list[Episode]:
    """Play every match to the end, all at once: an agent that sits in several matches (a model
    playing itself, a bot and an earlier checkpoint) answers all its pending turns in one ``act``
    call. Returns the episodes in the order of ``matches``."""
    live = {i: start_game(m.game, objective, max_messages, max_reply_chars) for i, m in enumerate(matches)}
    done: dict[int, Episode] = {}

    def finish(i: int, game: Game) -> None:
        m = matches[i]
        meta = {"agents": {"A": m.a.spec, "B": m.b.spec}} | m.meta | {"seed": m.game.seed}
        if m.game.opening:  # its first turns were replayed, not played by the agents
            meta["opening"] = len(m.game.opening)
        episode = Episode.from_game(game, m.game.id, meta)
        done[i] = episode
        del live[i]
        if m.writer is not None:
            m.writer.write(episode)
        if on_episode is not None:
            on_episode(episode)

    while live:
        by_agent: dict[int, list[tuple[int, Game, TurnRequest]]] = {}
        agent_of: dict[int, Agent] = {}
        for i, game in live.items():
            m = matches[i]
            request = turn_request(game, m.game.id, m.game.seed)
            agent = m.a if request.player == "A" else m.b
            by_agent.setdefault(id(agent), []).append((i, game, request))
            agent_of[id(agent)] = agent
        for key, batch in by_agent.items():
            replies = act_safely(agent_of[key], [req for _, _, req in batch])
            for (i, game, _), reply in zip(batch, replies, strict=True):
                if reply.error is not None:
                    game.end("failed", reply.error)
                else:
                    game.step(reply.text, reply.tokens, reply.logprobs)
                if game.is_terminal:
                    finish(i, game)
    return [done[i] for i in range(len(matches))]


def start_game(
    spec: GameSpec, objective: Objective, max_messages: int | None, max_reply_chars: int | None = MAX_REPLY_CHARS
) -> Game:
    """The game of ``spec`` with its opening replayed. ``RuleError`` naming the game when the
    protocol refuses a reply of the opening, or when the opening ends the game."""
    cap = None if max_messages is None else max_messages + len(spec.opening)
    game = Game(spec.context, objective, spec.first_speaker, cap, max_reply_chars=max_reply_chars)
    for i, text in enumerate(spec.opening):
        turn = game.step(text)
        if not turn.accepted or game.is_terminal:
            why = f"rejected ({turn.error}: {turn.detail})" if not turn.accepted else "ends the game"
            raise RuleError(f"game {spec.id}: reply {i + 1} of its opening {why}: {text[:60]!r}")
    return game


def turn_request(game: Game, game_id: str, game_seed: int) -> TurnRequest:
    """What the player to move in ``game`` is asked, with the attempt's seed derived from the
    game's seed and the turn: the one place a turn request is built (rollouts, the web app)."""
    player = game.current_player
    if player is None:
        raise RuntimeError(f"game {game_id} is over: nobody is to move")
    return TurnRequest(
        game_id=game_id,
        player=player,
        messages=game.conversation(),
        context=game.context,
        objective=game.objective,
        proposal_owed=game.proposal_owed,
        n_messages=game.n_messages,
        max_messages=game.max_messages,
        seed=derive_seed(game_seed, len(game.turns)),
    )


def act_safely(agent: Agent, requests: list[TurnRequest]) -> list[Reply]:
    """The agent's replies; a backend that fails outright fails these games, not the run."""
    try:
        replies = agent.act(requests)
    except Exception as exc:
        log.exception("agent %s failed on a batch of %d requests", agent.spec, len(requests))
        return [Reply("", error=f"{type(exc).__name__}: {exc}") for _ in requests]
    if len(replies) != len(requests):
        error = f"agent {agent.spec} returned {len(replies)} replies for {len(requests)} requests"
        return [Reply("", error=error) for _ in requests]
    return replies
