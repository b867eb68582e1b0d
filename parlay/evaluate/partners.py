"""Fixed partners: each agent plays each of a set of partners on the same seeded games.

``parlay eval --agents A1,A2,… --partners P1,P2,…``. Every agent meets every partner on the same
planned games (``rollout.plan_games``: contexts, first speakers, sampling seeds), in both seats
as in a tournament, so agents differ only in who played: a paired design. Per agent and partner:
the agent's own reward per game (the mean of its two seats, ``tournament.own_rewards``), its
mean with a 95 % interval, the games' agreement rate, and the paired change from the **first**
agent with the same partner on the same games.

An agent ``run:RUN@K`` where RUN is a run over seeds (``parlay/seeds.py``) is the *family* of its
seeds' round-K models: each seed's model plays the partners, and the figures are across seeds
(``evaluate/seeds.py``: a hierarchical bootstrap over seeds, then games). Its change from the
first agent is paired per seed — seed s's round K against seed s's model of the first agent
(say ``run:RUN@0``) — and aggregated by ``seeds.across_seeds`` (mean, interval, IQM and the
probability of improvement with ≥ 3 seeds). A single model is a family of one: the same code
gives the plain bootstrap over games, and its change from the first agent is
``metrics.paired_bootstrap``. Families and single models cannot be paired with each other.

The output folder is the whole state, and a rerun continues where it stopped (the tournament's
machinery: ``tournament.play_pairs``, ``loaded_agents``, ``check_setup``):

    OUT/setup.json           agents, partners, the models that play, objective, games, seed, sampling
    OUT/pairs/<i>-<j>.jsonl  the games of player i (seat A) against player j (seat B); players are
                             ``setup.json``'s ``players``: every agent's models, then the partners
    OUT/result.json          per agent and partner: the figures above
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from parlay.agents.base import Agent, Sampling
from parlay.agents.resolve import expand_rounds
from parlay.episode import Episode
from parlay.errors import UserError
from parlay.evaluate.metrics import GameTable, paired_bootstrap
from parlay.evaluate.seeds import SeedChange, across_seeds, hierarchical_interval, metric_across_seeds
from parlay.evaluate.tournament import check_setup, loaded_agents, own_rewards, play_pairs
from parlay.files import write_lines_atomic
from parlay.games.dond import Objective
from parlay.rollout import PlayMatches, plan_games, play_matches
from parlay.seeds import SeedRuns
from parlay.specs import AgentSpec, RunSpec, partner_kind

T = TypeVar("T")
RESULT = "result.json"


@dataclass(frozen=True)
class Entrant(Generic[T]):
    """One agent as given (``label``) and the models that play for it: ``(seed, model)`` per seed
    of a run over seeds, or ``(None, model)`` alone."""

    label: str
    members: list[tuple[int | None, T]]

    @property
    def over_seeds(self) -> bool:
        return self.members[0][0] is not None


def entrants(specs: Sequence[AgentSpec]) -> list[Entrant[AgentSpec]]:
    """``--agents``: one entrant per spec — ``run:RUN@K`` over seeds the family of its seeds,
    ``run:DIR@all`` of a single run one entrant per complete round. ``UserError`` naming
    ``--agents``: a run over seeds with ``@all``, families mixed with single models, or
    families that share no seed."""
    out: list[Entrant[AgentSpec]] = []
    for spec in specs:
        runs = SeedRuns.find(spec.path) if isinstance(spec, RunSpec) else None
        if runs is None:
            out += [Entrant(str(one), [(None, one)]) for one in expand_rounds(spec)]
            continue
        assert isinstance(spec, RunSpec)
        if spec.round == "all":
            raise UserError(f"--agents: {spec} is a run over seeds; name one round per agent, e.g. run:{spec.path}@0")
        out.append(Entrant(str(spec), list(zip(runs.present_seeds(), expand_rounds(spec), strict=True))))
    families = [e.label for e in out if e.over_seeds]
    if families and len(families) < len(out):
        single = next(e.label for e in out if not e.over_seeds)
        raise UserError(
            f"--agents: {families[0]} is a run over seeds and {single} a single model: the change from the "
            "first agent pairs seed with seed, so give only runs over the same seeds or only single models"
        )
    if families:
        first = {s for s, _ in out[0].members}
        for e in out[1:]:
            if not first & {s for s, _ in e.members}:
                raise UserError(f"--agents: {e.label} shares no seed with {out[0].label}; nothing to pair")
    return out


def partners_of(specs: Sequence[AgentSpec]) -> list[AgentSpec]:
    """``--partners``: each spec, ``run:DIR@all`` one partner per complete round. ``UserError``
    naming ``--partners`` for a run over seeds (a partner is one model) or a partner given twice."""
    out: list[AgentSpec] = []
    for spec in specs:
        if isinstance(spec, RunSpec) and SeedRuns.find(spec.path) is not None:
            raise UserError(
                f"--partners: {spec} is a run over seeds; a partner is one model: run:{spec.path}/seed-<s>@K"
            )
        out += expand_rounds(spec)
    texts = [str(s) for s in out]
    if twice := sorted({t for t in texts if texts.count(t) > 1}):
        raise UserError(f"--partners: {', '.join(twice)} given twice")
    return out


@dataclass(frozen=True)
class Setup:
    """What a fixed-partner evaluation is: saved first, compared on resume."""

    agents: list[str]
    partners: list[str]
    players: list[str]
    """Every model that plays, in file order (``pairs/<i>-<j>.jsonl``)."""
    objective: dict[str, Any]
    games: int
    seed: int
    max_messages: int | None
    sampling: dict[str, Any]


def _players(entrants: Sequence[Entrant[T]], partners: Sequence[T], key: Callable[[T], str]) -> list[T]:
    """Every distinct model (by ``key``): the agents' in order, then the partners'."""
    seen: dict[str, T] = {}
    for model in [m for e in entrants for _, m in e.members] + list(partners):
        seen.setdefault(key(model), model)
    return list(seen.values())


def run_partners(
    agents: Sequence[Entrant[Agent]],
    partners: Sequence[Agent],
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
    """Play every model of ``agents`` against every partner in both seats on ``games`` planned
    games (the missing ones only) and summarise; returns what ``result.json`` holds."""
    players = _players(agents, partners, lambda a: a.spec)
    index = {a.spec: i for i, a in enumerate(players)}
    setup = Setup(
        [e.label for e in agents],
        [p.spec for p in partners],
        [p.spec for p in players],
        obj.to_dict(),
        games,
        seed,
        max_messages,
        asdict(sampling),
    )
    check_setup(out, setup)
    plan = plan_games(games, seed)
    pairs = list(
        dict.fromkeys(
            pair
            for e in agents
            for _, m in e.members
            for p in partners
            for pair in ((index[m.spec], index[p.spec]), (index[p.spec], index[m.spec]))
        )
    )
    played = play_pairs(players, pairs, plan, obj, out, max_messages, on_start, on_episode, play)
    rows = []
    for p in partners:
        j = index[p.spec]

        def own(model: Agent, j: int = j) -> dict[str, float]:
            return own_rewards(played, index[model.spec], j)

        first = {s: own(m) for s, m in agents[0].members}
        for x, entrant in enumerate(agents):
            mine = {s: own(m) for s, m in entrant.members}
            groups = [np.array([mine[s][g.id] for g in plan]) for s in mine]
            mean, ci = hierarchical_interval(groups, seed, resamples)
            tables = [GameTable(played[(index[m.spec], j)] + played[(j, index[m.spec])]) for _, m in entrant.members]
            agreement, agreement_ci = metric_across_seeds(tables, "agreement_rate", seed, resamples)
            row: dict[str, Any] = {
                "agent": entrant.label,
                "agent_index": x,
                "partner": p.spec,
                "kind": partner_kind(p.spec),
                "seeds": [s for s, _ in entrant.members] if entrant.over_seeds else None,
                "games": games,
                "mean_reward": mean,
                "ci95": ci,
                "agreement_rate": agreement,
                "agreement_ci95": agreement_ci,
                "vs_first": None if x == 0 else _change(mine, first, plan, seed, resamples, entrant.over_seeds),
            }
            if entrant.over_seeds:
                row["per_seed"] = {s: float(g.mean()) for s, g in zip(mine, groups, strict=True)}
            rows.append(row)
    rows.sort(key=lambda r: r["agent_index"])
    result = asdict(setup) | {"rows": rows}
    write_lines_atomic(out / RESULT, [json.dumps(result, indent=1)])
    return result


def _change(
    mine: dict[int | None, dict[str, float]],
    first: dict[int | None, dict[str, float]],
    plan: Sequence[Any],
    seed: int,
    resamples: int,
    over_seeds: bool,
) -> dict[str, Any] | None:
    """The paired change from the first agent: over games for a single model, across the seeds
    both families have (seed with seed, game with game) for a family."""
    if not over_seeds:
        return paired_bootstrap(mine[None], first[None], seed)
    common = [s for s in mine if s in first]
    changes = [
        SeedChange(s, np.array([mine[s][g.id] for g in plan]), np.array([first[s][g.id] for g in plan]))  # type: ignore[arg-type]
        for s in common
    ]
    return across_seeds(changes, seed, resamples)


def play_partners(
    agents: Sequence[AgentSpec],
    partners: Sequence[AgentSpec],
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
    """``run_partners`` of the agents and partners the specs name (``entrants``, ``partners_of``),
    loaded here or on Ray workers, holding ``out``'s lock. Raises ``UserError`` (see
    ``entrants``), ``AgentError``, ``TournamentError`` (a folder of another evaluation),
    ``LockError``, ``DistributedError``."""
    groups = entrants(agents)
    partner_specs = partners_of(partners)
    models = _players(groups, partner_specs, str)
    with loaded_agents(models, sampling, out, workers, ray_address, steal_lock) as (loaded, play):
        by_text = dict(zip(map(str, models), loaded, strict=True))
        playing = [Entrant(e.label, [(s, by_text[str(m)]) for s, m in e.members]) for e in groups]
        return run_partners(
            playing,
            [by_text[str(p)] for p in partner_specs],
            obj,
            games,
            seed,
            out,
            max_messages,
            sampling,
            on_start,
            on_episode,
            play=play,
        )
