"""Rule-based negotiators that speak the text protocol: fixed opponents, fast test partners and
demonstrators for warm-starting small models.

- ``hard``: a Boulware bargainer. Opens by claiming everything it values and concedes slowly
  over the dialogue (aspiration u(t) = u_max − (u_max − u_min)·t^(1/e) with e < 1).
- ``conceder``: the same time-dependent tactic with e > 1 and a lower reservation, so it gives
  ground early (Faratin et al. 1998 style concession).
- ``cooperative``: states its values, reads the partner's, and steers to the allocation with the
  highest joint welfare (the most even one among ties).
- ``random``: says random things, proposes at random and also emits malformed replies of every
  kind, to exercise the protocol.

Bots are stateless: each reply is a function of the conversation so far and the request's seed,
so play is reproducible. They learn about the partner only by reading the partner's words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parlay.agents import language
from parlay.agents.base import Agent, Reply, TurnRequest
from parlay.games.dond import Counts
from parlay.protocol import message_reply, message_text, proposal_reply


@dataclass
class _Reading:
    """What a bot gathers from the conversation so far."""

    partner_offer: Counts | None = None
    """What the partner last offered to let *me* keep."""
    partner_accepted: bool = False
    """The partner's last message accepted my last offer."""
    my_offer: Counts | None = None
    """What I last asked to keep."""
    i_accepted: bool = False
    """My last message accepted the partner's offer, and no worse one for me has come since."""
    accepted: Counts | None = None
    """The partner offer my standing acceptance answered (None once withdrawn)."""
    partner_values: dict[int, int] | None = None
    partner_wants: tuple[int, ...] = (0, 0, 0)
    """How often the partner asked for each item type."""
    stated_values: bool = False
    partner_messages: int = 0


def _read(req: TurnRequest) -> _Reading:
    """An acceptance holds for the offer it answered: a later partner offer that is worse for me
    withdraws it, so a partner cannot win a "deal" and then ask for more."""
    counts = req.context.counts
    score = lambda kept: req.context.raw_score(req.player, kept)  # noqa: E731
    r = _Reading(partner_values={})
    wants = [0, 0, 0]
    for msg in req.messages[1:]:
        text = message_text(msg["content"])
        if text is None:
            continue
        offer = language.read_offer(text, counts)
        if msg["role"] == "user":
            r.partner_messages += 1
            r.partner_accepted = language.is_acceptance(text) and r.my_offer is not None
            if offer is not None:
                r.partner_offer = offer[1]  # the listener (me) gets this
                for i, k in enumerate(offer[0]):
                    wants[i] += k > 0
                if r.accepted is not None and score(r.partner_offer) < score(r.accepted):
                    r.i_accepted, r.accepted = False, None
            r.partner_values.update(language.read_values(text))  # type: ignore[union-attr]
        elif msg["role"] == "assistant":
            r.i_accepted = language.is_acceptance(text)
            r.accepted = r.partner_offer if r.i_accepted else None
            r.partner_accepted = False
            r.stated_values = r.stated_values or bool(language.read_values(text))
            if offer is not None:
                r.my_offer = offer[0]
    r.partner_wants = tuple(wants)
    if not r.partner_values:
        r.partner_values = None
    return r


def _rng(req: TurnRequest) -> np.random.Generator:
    return np.random.default_rng(req.seed)


def _time(req: TurnRequest) -> float:
    cap = req.max_messages or 20
    return min(1.0, req.n_messages / max(1, cap - 2))


def _near_cap(req: TurnRequest) -> bool:
    return req.max_messages is not None and req.n_messages >= req.max_messages - 2


def _propose(kept: Counts) -> Reply:
    return Reply(proposal_reply(kept))


def _say(text: str) -> Reply:
    return Reply(message_reply(text))


class ScriptedAgent(Agent):
    """Base of the bots: one ``reply`` per request, no batching needed."""

    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        return [self.reply(req) for req in requests]

    def reply(self, req: TurnRequest) -> Reply:
        raise NotImplementedError


class ConcessionBot(ScriptedAgent):
    """Time-dependent concession on the bot's own raw score."""

    def __init__(self, name: str, exponent: float, reservation: float) -> None:
        self.spec = f"bot:{name}"
        self.exponent = exponent
        self.reservation = reservation

    def aspiration(self, req: TurnRequest) -> float:
        top = float(sum(c * v for c, v in zip(req.context.counts, req.values, strict=True)))
        return top - (top - self.reservation) * _time(req) ** (1.0 / self.exponent)

    def _best_offer(self, req: TurnRequest, r: _Reading, floor: float) -> Counts:
        """The split I can ask for: my score ≥ floor, as much as possible for the partner."""
        ctx = req.context
        est = r.partner_values
        want = r.partner_wants

        def partner_guess(kept: Counts) -> float:
            give = ctx.complement(kept)
            if est:
                return sum(est.get(i, 1) * g for i, g in enumerate(give))
            return sum((1 + want[i]) * g for i, g in enumerate(give))

        candidates = [k for k in ctx.allocations if ctx.raw_score(req.player, k) >= floor]
        if not candidates:
            candidates = [max(ctx.allocations, key=lambda k: ctx.raw_score(req.player, k))]
        return max(candidates, key=lambda k: (partner_guess(k), ctx.raw_score(req.player, k), k))

    def reply(self, req: TurnRequest) -> Reply:
        r = _read(req)
        rng = _rng(req)
        ctx, me = req.context, req.player
        score = lambda kept: ctx.raw_score(me, kept)  # noqa: E731
        if req.proposal_owed:
            if r.i_accepted and r.partner_offer is not None:
                return _propose(r.partner_offer)
            if r.partner_offer is not None and score(r.partner_offer) >= self.reservation:
                return _propose(r.partner_offer)
            return _propose(r.my_offer or self._best_offer(req, r, self.aspiration(req)))
        if r.partner_accepted and r.my_offer is not None:
            return _propose(r.my_offer)
        if r.i_accepted and r.partner_offer is not None:
            return _propose(r.partner_offer)
        floor = self.aspiration(req)
        if r.partner_offer is not None and (
            score(r.partner_offer) >= floor or (_near_cap(req) and score(r.partner_offer) >= self.reservation)
        ):
            kept = r.partner_offer
            return _say(language.say_accept(rng, kept, ctx.complement(kept)))
        if _near_cap(req) and r.my_offer is not None:
            return _propose(r.my_offer)
        kept = self._best_offer(req, r, floor)
        text = language.say_offer(rng, kept, ctx.complement(kept), refusal=r.partner_offer is not None)
        return _say(text)


class CooperativeBot(ScriptedAgent):
    """Shares its values and steers to the joint-welfare maximum."""

    spec = "bot:cooperative"

    def _target(self, req: TurnRequest, r: _Reading) -> Counts:
        ctx, me = req.context, req.player
        mine = req.values
        if r.partner_values:
            theirs = [r.partner_values.get(i, 0) for i in range(3)]
        else:  # unknown: assume the partner wants what it asked for, and anything I don't value
            theirs = [1 + 2 * r.partner_wants[i] + (3 if mine[i] == 0 else 0) for i in range(3)]

        def welfare(kept: Counts) -> tuple[float, float, Counts]:
            give = ctx.complement(kept)
            own = ctx.raw_score(me, kept)
            other = sum(t * g for t, g in zip(theirs, give, strict=True))
            return own + other, -abs(own - other), kept

        return max(ctx.allocations, key=welfare)

    def reply(self, req: TurnRequest) -> Reply:
        r = _read(req)
        rng = _rng(req)
        ctx = req.context
        target = self._target(req, r)
        if req.proposal_owed:
            if r.partner_offer is not None and (r.i_accepted or ctx.raw_score(req.player, r.partner_offer) > 0):
                return _propose(r.partner_offer)
            return _propose(r.my_offer or target)
        if r.partner_accepted and r.my_offer is not None:
            return _propose(r.my_offer)
        if r.i_accepted and r.partner_offer is not None:
            return _propose(r.partner_offer)
        if not r.stated_values:
            text = language.say_values(rng, req.values)
            if r.partner_values is None:
                text += " What are yours?"
            return _say(text)
        offer = r.partner_offer
        if offer is not None and (offer == target or (_near_cap(req) and ctx.raw_score(req.player, offer) > 0)):
            return _say(language.say_accept(rng, offer, ctx.complement(offer)))
        if _near_cap(req) and r.my_offer is not None:
            return _propose(r.my_offer)
        return _say(language.say_offer(rng, target, ctx.complement(target)))


class RandomBot(ScriptedAgent):
    """Random talk, random proposals, and malformed replies of every kind."""

    spec = "bot:random"
    error_rate = 0.25

    def _malformed(self, rng: np.random.Generator, req: TurnRequest) -> str:
        counts = req.context.counts
        choices = [
            "",
            "I think we should split things evenly.",
            "[message] fine [propose] (1 book, 1 hat, 1 ball)",
            "[message]",
            "[propose] I want the books",
            proposal_reply((counts[0] + 1, 0, 0)),
            proposal_reply((1, 1, 1)) if req.n_messages == 0 else message_reply("wait, one more thing"),
        ]
        return choices[rng.integers(len(choices))]

    def reply(self, req: TurnRequest) -> Reply:
        rng = _rng(req)
        if rng.random() < self.error_rate:
            return Reply(self._malformed(rng, req))
        kept = tuple(int(rng.integers(c + 1)) for c in req.context.counts)
        if req.proposal_owed or (req.n_messages > 0 and rng.random() < 0.2):
            return _propose(kept)  # type: ignore[arg-type]
        if rng.random() < 0.3:
            return _say(language.say_values(rng, tuple(int(v) for v in rng.integers(0, 5, 3))))
        return _say(language.say_offer(rng, kept, req.context.complement(kept)))  # type: ignore[arg-type]


BOTS = {
    "hard": lambda: ConcessionBot("hard", exponent=0.3, reservation=6.0),
    "conceder": lambda: ConcessionBot("conceder", exponent=2.0, reservation=3.0),
    "cooperative": CooperativeBot,
    "random": RandomBot,
}
"""The bots by name; ``bot:NAME`` in an agent spec."""
