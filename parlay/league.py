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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from parlay.agents import AgentError, load_agent
from parlay.agents.base import Agent, Sampling
from parlay.config import ConfigError, RunConfig
from parlay.episode import Episode, EpisodeWriter, read_episodes
from parlay.evaluate.metrics import partner_summary
from parlay.rollout import GameSpec, Match, derive_seed, plan_games
from parlay.run import ModelRef, RoundRecord, RunDir, round_agent_spec

SELF = "self"
MIN_PRIORITY = 0.05
HELDOUT_SEED = 50221


def round_games(cfg: RunConfig, k: int) -> list[GameSpec]:
    """Round k's seeded games: the same every round with ``rollout.contexts: same``."""
    r = cfg.rollout
    return plan_games(r.games, cfg.seed if r.contexts == "same" else derive_seed(cfg.seed, k), group_size=r.group_size)


def assign_partners(games: Sequence[GameSpec], cfg: RunConfig) -> list[str]:
    """Each game's partner (a ``partners[].agent`` string): counts by largest remainder of the
    shares, spread over the games by a permutation seeded by the run's seed."""
    n, shares = len(games), [p.share for p in cfg.partners]
    counts = [int(s * n) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] * n - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    labels = [p.agent for p, c in zip(cfg.partners, counts, strict=True) for _ in range(c)]
    order = np.random.default_rng(derive_seed(cfg.seed, 104729)).permutation(n)
    return [labels[i] for i in order]


def heldout_games(cfg: RunConfig, index: int) -> list[GameSpec]:
    """The games every round plays with held-out partner ``index``: one plan for all partners
    (the same contexts), with ids of their own."""
    plan = plan_games(cfg.heldout.games, derive_seed(cfg.seed, HELDOUT_SEED))
    return [dataclasses.replace(g, id=f"h{index}-{g.id}") for g in plan]


class League:
    """The partners of a run, loaded once; ``matches`` gives each round's games."""

    def __init__(
        self, cfg: RunConfig, run: RunDir, sampling: Sampling, load: Callable[[str, Sampling], Agent] = load_agent
    ) -> None:
        self.cfg, self.run, self.sampling, self.load = cfg, run, sampling, load
        self.fixed: dict[str, Agent] = {}
        for i, p in enumerate(cfg.partners):
            if p.agent != SELF and not p.agent.startswith("checkpoint:"):
                self.fixed[p.agent] = self._load(f"partners.{i}.agent", p.agent)
        self.heldout = {spec: self._load(f"heldout.partners.{i}", spec) for i, spec in enumerate(cfg.heldout.partners)}
        self._checkpoints: dict[str, Agent] = {}

    def _load(self, key: str, spec: str) -> Agent:
        try:
            return self.load(round_agent_spec(spec)[1], self.sampling)
        except (AgentError, ConfigError) as exc:
            raise ConfigError(f"{key}: {spec}: {exc}") from None

    # -- a round's games

    def matches(
        self, k: int, games: Sequence[GameSpec], learner: Agent, records: list[RoundRecord], writer: EpisodeWriter
    ) -> list[Match]:
        """Round k's games: each with its partner, the learner as A (both seats in self-play)."""
        pool = self._pool(records[:k])
        planned = round_games(self.cfg, k)
        label_of = dict(zip((g.id for g in planned), assign_partners(planned, self.cfg), strict=True))
        index = {g.id: i for i, g in enumerate(planned)}
        wanted = {label_of[g.id] for g in games}
        priorities = self._priorities(k, pool) if "checkpoint:prioritised" in wanted else {}
        out = []
        for game in games:
            partner, name = self._partner(k, label_of[game.id], index[game.id], pool, priorities, learner)
            meta = {"round": k, "partner": name, "learner": "AB" if partner is learner else "A"}
            out.append(Match(game, learner, partner, meta, writer))
        return out

    def _pool(self, earlier: list[RoundRecord]) -> dict[int, ModelRef]:
        """Earlier rounds' distinct models, each under the last round that played it."""
        last: dict[ModelRef, int] = {}
        for r in earlier:
            last[r.model] = r.round
        return {j: m for m, j in sorted(last.items(), key=lambda t: t[1])}

    def _partner(
        self, k: int, label: str, i: int, pool: dict[int, ModelRef], priorities: dict[int, float], learner: Agent
    ) -> tuple[Agent, str]:
        if label == SELF or (label.startswith("checkpoint:") and not pool):
            return learner, SELF
        if not label.startswith("checkpoint:"):
            return self.fixed[label], label
        rounds = list(pool)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, k, i, 613))
        if label == "checkpoint:latest":
            j = rounds[-1]
        elif label == "checkpoint:uniform":
            j = rounds[int(rng.integers(len(rounds)))]
        else:
            w = np.array([priorities[j] for j in rounds])
            j = rounds[int(rng.choice(len(rounds), p=w / w.sum()))]
        return self._checkpoint(pool[j]), f"checkpoint@{j}"

    def _checkpoint(self, model: ModelRef) -> Agent:
        r = self.cfg.rollout
        spec = model.agent_spec(r.dtype, r.batch, r.backend)
        if spec not in self._checkpoints:
            self._checkpoints[spec] = self.load(spec, self.sampling)
        return self._checkpoints[spec]

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

    # -- held-out evaluation

    def heldout_matches(self, k: int, learner: Agent, done: dict[str, set[str]]) -> tuple[list[Match], list]:
        """The held-out games round k still has to play (``done``: ids already played, per
        partner), and the writers to close after."""
        matches, writers = [], []
        for i, (spec, partner) in enumerate(self.heldout.items()):
            todo = [g for g in heldout_games(self.cfg, i) if g.id not in done.get(spec, set())]
            if not todo:
                continue
            writer = EpisodeWriter(self.run.round(k).heldout_episodes(i), append=True)
            writers.append(writer)
            meta = {"round": k, "partner": spec, "learner": "A", "heldout": True}
            matches += [Match(g, learner, partner, meta, writer) for g in todo]
        return matches, writers

    def close(self) -> None:
        for agent in [*self.fixed.values(), *self.heldout.values(), *self._checkpoints.values()]:
            agent.close()
        self._checkpoints.clear()

    def end_round(self) -> None:
        """Checkpoint partners are reloaded each round (the pool grows); fixed ones stay."""
        for agent in self._checkpoints.values():
            agent.close()
        self._checkpoints.clear()
