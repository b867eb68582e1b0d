"""Cross-play: every ordered pair of a set of agents on the same seeded games.

Each ordered pair (A, B) — self-play on the diagonal included — plays the same planned games
(contexts, first speakers, sampling seeds), so pairs differ only in who played: a paired design.
Every metric of ``metrics.py`` comes with a bootstrap 95 % interval over games.

The output folder is the whole state, and an interrupted tournament continues where it stopped:

    OUT/setup.json           who plays, the objective, games, seed, sampling (checked on resume)
    OUT/pairs/<i>-<j>.jsonl  the games of agent i (player A) against agent j (player B)
    OUT/tournament.json      per pair: metrics and intervals; the cross-play matrices; each agent's
                             paired change from the first agent against every partner; ratings
                             with intervals (``ratings.py``)
    OUT/tournament.csv       one row per pair: each metric with its interval

``play_tournament`` is ``parlay eval --agents``: it expands ``run:DIR@all``, loads the agents
(here, or on Ray workers), holds the folder's lock and runs ``run_tournament``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parlay.agents import load_agents
from parlay.agents.base import Agent, Sampling
from parlay.agents.resolve import expand_rounds, resolve_run
from parlay.distributed import RayPool, RemoteAgent
from parlay.episode import Episode, EpisodeWriter, read_episodes
from parlay.evaluate.metrics import METRICS, paired_bootstrap, summarize
from parlay.evaluate.ratings import ratings
from parlay.files import write_lines_atomic
from parlay.games.dond import Objective
from parlay.locking import FolderLock
from parlay.rollout import Match, PlayMatches, plan_games, play_matches, split_finished
from parlay.specs import AgentSpec, RunSpec

log = logging.getLogger(__name__)


class TournamentError(ValueError):
    """A tournament folder that holds a different tournament, or a tournament that cannot run."""


@dataclass(frozen=True)
class Setup:
    """What a tournament is: saved first, compared on resume."""

    agents: list[str]
    objective: dict[str, Any]
    games: int
    seed: int
    max_messages: int | None
    sampling: dict[str, Any]


def pair_file(out: Path, i: int, j: int) -> Path:
    return out / "pairs" / f"{i}-{j}.jsonl"


def check_setup(out: Path, setup: Any) -> None:
    """Save ``setup`` (a dataclass: what the folder's games are) in ``out/setup.json``, or, when
    one is there, raise ``TournamentError`` naming the fields in which it differs."""
    path = out / "setup.json"
    wanted = asdict(setup)
    if path.exists():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in wanted if saved.get(k) != wanted[k])
        if differ:
            raise TournamentError(
                f"{out} holds a different tournament (it differs in {', '.join(differ)}); "
                "choose another output folder or remove this one"
            )
    else:
        write_lines_atomic(path, [json.dumps(wanted, indent=1)])


def run_tournament(
    agents: Sequence[Agent],
    obj: Objective,
    games: int,
    seed: int,
    out: Path,
    max_messages: int | None,
    sampling: Sampling,
    on_start: Callable[[int, int], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
    resamples: int = 2000,
    play: PlayMatches = play_matches,
) -> dict[str, Any]:
    """Play every ordered pair of ``agents`` (their ``spec`` names them) and summarise each.

    All pairs' missing games are played at once (``play``: in this process, where an agent that
    sits in several pairs answers all its turns in one batch, or on Ray workers); each pair's
    games go to its own file. ``on_start(games, already_played)`` is called before play, over
    all pairs. Returns what ``tournament.json`` holds."""
    specs = [a.spec for a in agents]
    if len(set(specs)) != len(specs):
        raise TournamentError(f"an agent is listed twice: {', '.join(specs)}")
    setup = Setup(specs, obj.to_dict(), games, seed, max_messages, asdict(sampling))
    check_setup(out, setup)
    plan = plan_games(games, seed)
    pairs = [(i, j) for i in range(len(agents)) for j in range(len(agents))]
    by_pair = play_pairs(agents, pairs, plan, obj, out, max_messages, on_start, on_episode, play)
    summaries: list[dict[str, Any]] = []
    for i, j in pairs:
        path = pair_file(out, i, j)
        summaries.append(
            {"a": specs[i], "b": specs[j], "a_index": i, "b_index": j, "episodes": str(path.relative_to(out))}
        )
        summaries[-1] |= summarize(by_pair[(i, j)], seed=seed, resamples=resamples)
    changes = changes_from_first(specs, by_pair, seed)
    result = asdict(setup) | {"pairs": summaries, "matrix": cross_play_matrix(specs, summaries), "vs_first": changes}
    result["ratings"] = ratings(specs, by_pair, seed)
    write_lines_atomic(out / "tournament.json", [json.dumps(result, indent=1)])
    write_csv(out / "tournament.csv", summaries)
    return result


def play_pairs(
    agents: Sequence[Agent],
    pairs: Sequence[tuple[int, int]],
    plan: Sequence[Any],
    obj: Objective,
    out: Path,
    max_messages: int | None,
    on_start: Callable[[int, int], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
    play: PlayMatches = play_matches,
) -> dict[tuple[int, int], list[Episode]]:
    """Each pair (i, j) — ``agents[i]`` as player A, ``agents[j]`` as B — on the planned games,
    in plan order. Games already in a pair's file (``pair_file``) are kept, the missing ones
    played at once (``play``: in this process, where an agent that sits in several pairs
    answers all its turns in one batch, or on Ray workers) and appended to it.
    ``on_start(games, already_played)`` is called before play, over all pairs."""
    have: dict[tuple[int, int], dict[str, Episode]] = {}
    matches: list[Match] = []
    pair_of: list[tuple[int, int]] = []  # the pair of each match
    with ExitStack() as files:
        for i, j in pairs:
            path = pair_file(out, i, j)
            have[(i, j)], todo = split_finished(path, plan)
            if todo:
                writer = files.enter_context(EpisodeWriter(path, append=True))
                meta = {"tournament": str(out)}
                matches += [Match(g, agents[i], agents[j], meta, writer) for g in todo]
                pair_of += [(i, j)] * len(todo)
        if on_start is not None:
            on_start(len(pairs) * len(plan), sum(len(h) for h in have.values()))
        played = play(matches, obj, max_messages, on_episode) if matches else []
    for pair, ep in zip(pair_of, played, strict=True):
        have[pair][ep.id] = ep
    return {pair: [have[pair][g.id] for g in plan] for pair in pairs}


@contextmanager
def loaded_agents(
    specs: Sequence[AgentSpec],
    sampling: Sampling,
    out: Path,
    workers: int = 0,
    ray_address: str | None = None,
    steal_lock: bool = False,
) -> Iterator[tuple[list[Agent], PlayMatches]]:
    """The agents ``specs`` name, loaded here or with ``workers`` > 0 by that many Ray actors
    (``ray_address``: a running cluster), and the function that plays their matches, while
    ``out``'s lock is held; every agent (and the pool) closed on the way out."""
    pool = RayPool(workers, ray_address) if workers else None
    try:
        if pool is not None:  # the workers load the agents; run:DIR@K keeps its round
            agents: list[Agent] = [
                RemoteAgent(resolve_run(s)[0] if isinstance(s, RunSpec) else s, sampling) for s in specs
            ]
        else:
            agents = load_agents(specs, sampling)
        try:
            with FolderLock(out, steal=steal_lock):
                yield agents, (pool.play_matches if pool else play_matches)
        finally:
            for agent in agents:
                agent.close()
    finally:
        if pool is not None:
            pool.close()


def play_tournament(
    specs: Sequence[AgentSpec],
    obj: Objective,
    games: int,
    seed: int,
    out: Path,
    max_messages: int | None,
    sampling: Sampling,
    workers: int = 0,
    ray_address: str | None = None,
    steal_lock: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> dict[str, Any]:
    """``run_tournament`` of the agents ``specs`` name (``run:DIR@all``: every complete round of
    the run, each ``run:DIR@K``), holding ``out``'s lock. The agents are loaded here, or with
    ``workers`` > 0 by that many Ray actors (``ray_address``: a running cluster). Returns what
    ``tournament.json`` holds. Raises ``AgentError``/``ConfigError`` for an agent that cannot be
    loaded, ``TournamentError``, ``LockError`` (another writer), ``DistributedError``."""
    specs = [one for spec in specs for one in expand_rounds(spec)]
    with loaded_agents(specs, sampling, out, workers, ray_address, steal_lock) as (agents, play):
        return run_tournament(agents, obj, games, seed, out, max_messages, sampling, on_start, on_episode, play=play)


def tournament_episodes(out: Path, result: dict[str, Any]) -> list[Episode]:
    """Every game of the tournament in ``out`` (``result``: its ``tournament.json``), pair by pair."""
    return [ep for p in result["pairs"] for ep in read_episodes(out / p["episodes"])]


def cross_play_matrix(specs: list[str], pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Row agent against column agent, over both seats: the row agent's mean reward, and the
    agreement rate of their games."""
    n = len(specs)
    reward, agreement = np.zeros((n, n)), np.zeros((n, n))
    by = {(p["a_index"], p["b_index"]): p["metrics"] for p in pairs}
    for i in range(n):
        for j in range(n):
            as_a, as_b = by[(i, j)], by[(j, i)]
            reward[i, j] = (as_a["mean_reward_a"] + as_b["mean_reward_b"]) / 2
            agreement[i, j] = (as_a["agreement_rate"] + as_b["agreement_rate"]) / 2
    return {"agents": specs, "reward": reward.tolist(), "agreement": agreement.tolist()}


def own_rewards(played: dict[tuple[int, int], list[Episode]], i: int, j: int) -> dict[str, float]:
    """Agent i's reward against agent j in each planned game, averaged over its two seats."""
    as_a = {ep.id: ep.rewards[0] for ep in played[(i, j)]}
    as_b = {ep.id: ep.rewards[1] for ep in played[(j, i)]}
    return {g: (as_a[g] + as_b[g]) / 2 for g in as_a.keys() & as_b.keys()}


def changes_from_first(
    specs: list[str], played: dict[tuple[int, int], list[Episode]], seed: int
) -> list[dict[str, Any]]:
    """How each agent does against each partner compared with the first agent (say, round 0) with
    the same partner, game by game (paired): agent x's own reward against z minus the first
    agent's against z. Against "itself": x's self-play minus the first agent's self-play."""
    out = []
    for x in range(1, len(specs)):
        for z in range(len(specs)):
            before = own_rewards(played, 0, 0 if z == x else z)
            change = paired_bootstrap(own_rewards(played, x, z), before, seed)
            out.append({"agent": specs[x], "partner": "itself" if z == x else specs[z], "first": specs[0]} | change)
    return out


def write_csv(path: Path, pairs: list[dict[str, Any]]) -> None:
    names = list(METRICS)
    header = ["a", "b"] + [c for m in names for c in (m, f"{m}_low", f"{m}_high")]
    rows = []
    for p in pairs:
        row: list[Any] = [p["a"], p["b"]]
        for m in names:
            low, high = p["ci95"].get(m, ["", ""])
            row += [p["metrics"][m], low, high]
        rows.append(row)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    write_lines_atomic(path, text.getvalue().splitlines())


def read_tournament(path: Path) -> dict[str, Any]:
    """A ``tournament.json`` read back, with a clear error when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TournamentError(f"{path}: not a readable tournament file ({exc})") from None
    if not isinstance(data, dict) or not {"agents", "pairs", "matrix", "vs_first"} <= data.keys():
        raise TournamentError(f"{path}: not a tournament file (agents, pairs, matrix and vs_first are expected)")
    return data
