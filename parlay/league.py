"""Who a round's model plays: the partner mix it trains with and the held-out partners it is
measured against.

``partners:`` splits a round's games by share between the model itself (``self``), earlier rounds'
models of the run (``checkpoint:latest|uniform|prioritised``) and fixed agents (bots, other
models, endpoints, ``run:DIR@K``). Which game goes to which partner depends only on the run's
seed, so with ``rollout.contexts: same`` a partner gets the same games every round. The trained
model sits as player A against a partner, and only its side is trained on (``meta.learner``);
self-play trains on both sides. Checkpoints:

- ``latest``: the previous round's model;
- ``uniform``: one of the earlier rounds' (distinct) models, drawn per game;
- ``prioritised``: drawn per game with weight 1 − (the share of the ceiling the model reached with
  that checkpoint in the previous round's games; 1 for one it has not met), at least 0.05 — the
  general-sum reading of "the opponents it still loses to".

Round 0 has no earlier model: its checkpoint games are self-play.

``heldout:`` names evaluation partners that are not in the mix (nor the warm start's
demonstrators): every round's model plays the same seeded games with each, written apart from the
training games (``rounds/<k>/heldout/``) and never trained on.

Every fixed partner is loaded before anything runs, so a spec that cannot be loaded is an error
that names its key; a partner that fails during a round fails its games (recorded as failed).

A round is planned once, as a value (``League.plan`` → ``RoundPlan``): every game of the round,
training and held-out, with its partner, the learner's seats and the table (file) it is written
to. The loop plays the plan's unfinished games and reads the results back by the plan
(``RoundPlan.collect``), never by the episodes' metadata; held-out evaluation is the plan's
held-out tables, made in ``League.plan`` and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parlay.agents import AgentError, load_agent
from parlay.agents.base import Agent, Sampling
from parlay.agents.resolve import model_agent, resolve_run
from parlay.config import RunConfig
from parlay.episode import Episode, read_episodes
from parlay.errors import ConfigError
from parlay.evaluate.metrics import partner_summary
from parlay.rollout import GameSpec, derive_seed, plan_games, split_finished
from parlay.run import ModelRef, RoundRecord, RunDir
from parlay.specs import AgentSpec, CheckpointPartner, RunSpec, SelfPartner

SELF = "self"
MIN_PRIORITY = 0.05
HELDOUT_SEED = 50221
TRAINING = 0
"""The plan's table of training games; held-out partner i's table is i + 1."""


def round_games(cfg: RunConfig, k: int) -> list[GameSpec]:
    """Round k's seeded games: the same every round with ``rollout.contexts: same``."""
    r = cfg.rollout
    return plan_games(r.games, cfg.seed if r.contexts == "same" else derive_seed(cfg.seed, k), group_size=r.group_size)


def assign_partners(games: Sequence[GameSpec], cfg: RunConfig) -> list[str]:
    """Each game's partner (the text of a ``partners[].agent``): counts by largest remainder of
    the shares, spread over the games by a permutation seeded by the run's seed."""
    n, shares = len(games), [p.share for p in cfg.partners]
    counts = [int(s * n) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] * n - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    labels = [str(p.agent) for p, c in zip(cfg.partners, counts, strict=True) for _ in range(c)]
    order = np.random.default_rng(derive_seed(cfg.seed, 104729)).permutation(n)
    return [labels[i] for i in order]


def heldout_games(cfg: RunConfig, index: int) -> list[GameSpec]:
    """The games every round plays with held-out partner ``index``: one plan for all partners
    (the same contexts), with ids of their own."""
    plan = plan_games(cfg.heldout.games, derive_seed(cfg.seed, HELDOUT_SEED))
    return [dataclasses.replace(g, id=f"h{index}-{g.id}") for g in plan]


@dataclass(frozen=True)
class Table:
    """A file of a round's games: its training games (``heldout`` None), or one held-out partner's."""

    path: Path
    heldout: AgentSpec | None = None


@dataclass(frozen=True)
class PlannedGame:
    """One game of a round's plan: the learner sits as A against ``partner`` (both seats in
    self-play); its episode goes to the plan's table ``table``."""

    game: GameSpec
    partner: SelfPartner | ModelRef | AgentSpec
    """Itself, an earlier round's model (a checkpoint), or a fixed or held-out agent."""
    name: str
    """The partner as the records name it: ``self``, ``checkpoint@J`` or the spec's text."""
    table: int
    round: int

    @property
    def self_play(self) -> bool:
        return isinstance(self.partner, SelfPartner)

    @property
    def meta(self) -> dict[str, Any]:
        """What the episode records of its plan (``rollout`` adds the agents and the seed)."""
        meta: dict[str, Any] = {"round": self.round, "partner": self.name, "learner": "AB" if self.self_play else "A"}
        return meta | {"heldout": True} if self.table != TRAINING else meta


@dataclass(frozen=True)
class RoundPlan:
    """Every game of round ``round``: the training games (table 0) in the order of
    ``round_games``, then each held-out partner's (table i + 1) in the order of ``heldout_games``."""

    round: int
    tables: list[Table]
    games: list[PlannedGame]

    def finished(self) -> list[dict[str, Episode]]:
        """Per table, the planned games already in its file, by id (a torn last line is not one)."""
        out = []
        for t, table in enumerate(self.tables):
            out.append(split_finished(table.path, [g.game for g in self.games if g.table == t])[0])
        return out

    def collect(self, played: list[dict[str, Episode]]) -> RoundGames:
        """Every planned game's episode, by table, in plan order (``played``: per table, by id)."""
        by_table: list[list[tuple[PlannedGame, Episode]]] = [[] for _ in self.tables]
        for g in self.games:
            by_table[g.table].append((g, played[g.table][g.game.id]))
        return RoundGames(by_table[TRAINING], by_table[1:])


@dataclass(frozen=True)
class RoundGames:
    """A played round, keyed by its plan: each game with the plan entry it was played for."""

    training: list[tuple[PlannedGame, Episode]]
    heldout: list[list[tuple[PlannedGame, Episode]]]
    """Per held-out partner, in the order of ``heldout.partners``."""

    @property
    def episodes(self) -> list[Episode]:
        return [ep for _, ep in self.training]

    @property
    def heldout_episodes(self) -> list[list[Episode]]:
        return [[ep for _, ep in table] for table in self.heldout]

    def by_partner(self) -> dict[str, list[Episode]]:
        """The training games per partner name, partners in order of their first game."""
        out: dict[str, list[Episode]] = {}
        for g, ep in self.training:
            out.setdefault(g.name, []).append(ep)
        return out


class League:
    """The partners of a run, loaded once: ``plan`` gives each round's games, ``agent`` the agent
    that plays a planned game's partner."""

    def __init__(
        self, cfg: RunConfig, run: RunDir, sampling: Sampling, load: Callable[[AgentSpec, Sampling], Agent] = load_agent
    ) -> None:
        self.cfg, self.run, self.sampling, self.load = cfg, run, sampling, load
        self.fixed: dict[AgentSpec, Agent] = {}
        for i, p in enumerate(cfg.partners):
            if not isinstance(p.agent, SelfPartner | CheckpointPartner):
                self.fixed[p.agent] = self._load(f"partners.{i}.agent", p.agent)
        for i, spec in enumerate(cfg.heldout.partners):
            self.fixed[spec] = self._load(f"heldout.partners.{i}", spec)
        self._checkpoints: dict[AgentSpec, Agent] = {}

    def _load(self, key: str, spec: AgentSpec) -> Agent:
        """A fixed partner; one named ``run:DIR@K`` plays as round K's model's own spec."""
        try:
            return self.load(resolve_run(spec)[1] if isinstance(spec, RunSpec) else spec, self.sampling)
        except (AgentError, ConfigError) as exc:
            raise ConfigError(f"{key}: {spec}: {exc}") from None

    # -- a round's plan

    def plan(self, k: int, records: list[RoundRecord]) -> RoundPlan:
        """Round k's games, training and held-out (``records``: the complete rounds before it)."""
        stage = self.run.round(k)
        tables = [Table(stage.episodes)]
        tables += [Table(stage.heldout_episodes(i), spec) for i, spec in enumerate(self.cfg.heldout.partners)]
        games = self._training(k, records)
        for i, spec in enumerate(self.cfg.heldout.partners):
            games += [PlannedGame(g, spec, str(spec), i + 1, k) for g in heldout_games(self.cfg, i)]
        return RoundPlan(k, tables, games)

    def _training(self, k: int, records: list[RoundRecord]) -> list[PlannedGame]:
        """Round k's training games, each with its partner: a checkpoint is drawn per game."""
        pool = self._pool(records[:k])
        planned = round_games(self.cfg, k)
        labels = assign_partners(planned, self.cfg)
        priorities = self._priorities(k, pool) if "checkpoint:prioritised" in labels else {}
        partners = {str(p.agent): p.agent for p in self.cfg.partners}
        out = []
        for i, (game, label) in enumerate(zip(planned, labels, strict=True)):
            partner = partners[label]
            if isinstance(partner, CheckpointPartner) and pool:
                j = self._draw(k, i, partner, pool, priorities)
                out.append(PlannedGame(game, pool[j], f"checkpoint@{j}", TRAINING, k))
            elif isinstance(partner, SelfPartner | CheckpointPartner):  # round 0 has no earlier model
                out.append(PlannedGame(game, SelfPartner(), SELF, TRAINING, k))
            else:
                out.append(PlannedGame(game, partner, label, TRAINING, k))
        return out

    def _pool(self, earlier: list[RoundRecord]) -> dict[int, ModelRef]:
        """Earlier rounds' distinct models, each under the last round that played it."""
        last: dict[ModelRef, int] = {}
        for r in earlier:
            last[r.model] = r.round
        return {j: m for m, j in sorted(last.items(), key=lambda t: t[1])}

    def _draw(
        self, k: int, i: int, pick: CheckpointPartner, pool: dict[int, ModelRef], priorities: dict[int, float]
    ) -> int:
        """The round of the checkpoint that game ``i`` of round ``k`` plays (seeded per game)."""
        rounds = list(pool)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, k, i, 613))
        if pick.pick == "latest":
            return rounds[-1]
        if pick.pick == "uniform":
            return rounds[int(rng.integers(len(rounds)))]
        w = np.array([priorities[j] for j in rounds])
        return rounds[int(rng.choice(len(rounds), p=w / w.sum()))]

    def _priorities(self, k: int, pool: dict[int, ModelRef]) -> dict[int, float]:
        """Per checkpoint round: 1 − the ceiling share the model reached with it last round."""
        met: dict[int, list[Episode]] = {}
        if k > 0 and self.run.round(k - 1).episodes.exists():
            for ep in read_episodes(self.run.round(k - 1).episodes):
                name = ep.meta.get("partner", "")
                if name.startswith("checkpoint@"):
                    met.setdefault(int(name.split("@")[1]), []).append(ep)
        out = {}
        for j in pool:
            share = partner_summary(met[j])["ceiling_share"] if met.get(j) else 0.0
            out[j] = max(MIN_PRIORITY, 1.0 - share)
        return out

    # -- the agents

    def agent(self, planned: PlannedGame, learner: Agent) -> Agent:
        """The agent that plays ``planned``'s partner: the learner itself, a checkpoint (loaded
        once a round, on first use) or a fixed or held-out partner (loaded once a run)."""
        if isinstance(planned.partner, SelfPartner):
            return learner
        if isinstance(planned.partner, ModelRef):
            spec = model_agent(planned.partner, self.cfg.rollout)
            if spec not in self._checkpoints:
                self._checkpoints[spec] = self.load(spec, self.sampling)
            return self._checkpoints[spec]
        return self.fixed[planned.partner]

    def close(self) -> None:
        for agent in [*self.fixed.values(), *self._checkpoints.values()]:
            agent.close()
        self._checkpoints.clear()

    def end_round(self) -> None:
        """Checkpoint partners are reloaded each round (the pool grows); fixed ones stay."""
        for agent in self._checkpoints.values():
            agent.close()
        self._checkpoints.clear()
