"""The text protocol: parsing a player's reply, and the game core that referees a dialogue.

A reply is ``[message] text`` or ``[propose] (x books, y hats, z balls)`` (the counts the
speaker keeps); anything after ``[END]`` is dropped. This module is the wire format's one home:
``message_reply`` and ``proposal_reply`` write a well-formed reply (bots, the terminal player,
the Lewis importer and the tests all go through them), ``parse_reply`` maps *any* string to a
``Message``, a ``Proposal`` or a typed ``ProtocolError`` — it never raises — and
``message_text`` reads the text of an accepted message back out of a transcript line.

``Game`` is the one referee used everywhere (rollouts, the terminal, the web app, the Lewis
importer). It owns whose turn it is, the hidden proposals, the rejection rules (among them a
reply longer than ``max_reply_chars``, which is kept only cut), the message cap, the abort after
consecutive rejections, and each player's chat transcript. It returns structured results and
does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel

from parlay import prompts
from parlay.games.dond import (
    ARTICLES,
    DEFAULT_MAX_MESSAGES,
    ITEM_PATTERN,
    ITEMS,
    MAX_CONSECUTIVE_ERRORS,
    MAX_REPLY_CHARS,
    NUMBER_WORDS,
    Context,
    Counts,
    Objective,
    describe_items,
    other,
)

# --------------------------------------------------------------------------- parsing


class ErrorCode(StrEnum):
    """Every way a reply can be rejected; each has its own feedback line in protocol.toml."""

    EMPTY = "empty"
    NO_PREFIX = "no_prefix"
    TWO_PREFIXES = "two_prefixes"
    EMPTY_MESSAGE = "empty_message"
    MALFORMED_PROPOSAL = "malformed_proposal"
    OUT_OF_RANGE = "out_of_range"
    PROPOSAL_OWED = "proposal_owed"
    PROPOSAL_TOO_EARLY = "proposal_too_early"
    TOO_LONG = "too_long"


MESSAGE_TAG = "[message]"
PROPOSE_TAG = "[propose]"


def message_reply(text: str) -> str:
    """'Hello' → '[message] Hello': a message reply."""
    return f"{MESSAGE_TAG} {text}"


def proposal_reply(kept: Counts) -> str:
    """(1, 2, 0) → '[propose] (1 book, 2 hats, 0 balls)': a proposal to keep these counts."""
    return f"{PROPOSE_TAG} ({describe_items(kept)})"


@dataclass(frozen=True)
class Message:
    text: str

    def canonical(self) -> str:
        return message_reply(self.text)


@dataclass(frozen=True)
class Proposal:
    kept: Counts
    """How many books, hats and balls the proposer keeps (may be out of range until checked)."""

    def canonical(self) -> str:
        return proposal_reply(self.kept)


@dataclass(frozen=True)
class ProtocolError:
    code: ErrorCode
    detail: str


Parsed = Message | Proposal | ProtocolError

_END = re.compile(r"\[\s*end\s*\]", re.IGNORECASE)
_TAG = re.compile(r"\[\s*(message|propose|proposal)\s*\]", re.IGNORECASE)
_COUNT_WORDS = NUMBER_WORDS | ARTICLES
_ITEM_COUNT = re.compile(
    rf"(?P<num>-?\d+|{'|'.join(_COUNT_WORDS)})\s+(?P<item>{ITEM_PATTERN})(?:e?s)?\b",
    re.IGNORECASE,
)


def _parse_proposal_body(body: str) -> Proposal | ProtocolError:
    found = list(_ITEM_COUNT.finditer(body))
    if not found:
        return ProtocolError(ErrorCode.MALFORMED_PROPOSAL, f"no item counts in {body!r}")
    counts: dict[str, int] = {}
    for m in found:
        item = m["item"].lower()
        if item in counts:
            return ProtocolError(ErrorCode.MALFORMED_PROPOSAL, f"{item}s given twice")
        num = m["num"].lower()
        counts[item] = _COUNT_WORDS[num] if num in _COUNT_WORDS else int(num)
    missing = [f"{item}s" for item in ITEMS if item not in counts]
    if missing:
        return ProtocolError(ErrorCode.MALFORMED_PROPOSAL, f"missing {', '.join(missing)}")
    return Proposal(tuple(counts[item] for item in ITEMS))  # type: ignore[arg-type]


def parse_reply(text: str) -> Parsed:
    """Parse one reply, tolerant of case, spacing, singular/plural and a trailing ``[END]``."""
    if not isinstance(text, str):
        return ProtocolError(ErrorCode.EMPTY, f"reply is not text: {type(text).__name__}")
    text = _END.split(text, maxsplit=1)[0].strip()
    if not text:
        return ProtocolError(ErrorCode.EMPTY, "empty reply")
    tags = list(_TAG.finditer(text))
    if not tags:
        return ProtocolError(ErrorCode.NO_PREFIX, "no [message] or [propose] tag")
    if len(tags) > 1:
        return ProtocolError(ErrorCode.TWO_PREFIXES, f"{len(tags)} tags")
    tag = tags[0]
    if tag.start() != 0:
        return ProtocolError(ErrorCode.NO_PREFIX, "text before the tag")
    body = text[tag.end() :].lstrip(" \t:").strip()
    if tag[1].lower() == "message":
        if not body:
            return ProtocolError(ErrorCode.EMPTY_MESSAGE, "no text after [message]")
        return Message(" ".join(body.split()))
    return _parse_proposal_body(body)


def message_text(line: str) -> str | None:
    """The text of a transcript line that is an accepted message, else None (proposals, the
    game's own lines)."""
    parsed = parse_reply(line)
    return parsed.text if isinstance(parsed, Message) else None


# --------------------------------------------------------------------------- records of play


class Turn(BaseModel):
    """One attempt by one player: accepted (a message or a proposal) or rejected."""

    player: Literal["A", "B"]
    text: str
    """The reply exactly as produced."""
    accepted: bool
    kind: Literal["message", "proposal"] | None = None
    message: str | None = None
    proposal: list[int] | None = None
    error: ErrorCode | None = None
    detail: str | None = None
    feedback: str | None = None
    tokens: int | None = None
    """Tokens generated for this reply, when the agent reports them."""
    logprobs: list[float] | None = None
    """The sampler's log-probability (natural log) of each generated token of the reply, its stop
    token excluded, under the model's own distribution (temperature 1, no top-p), when the agent
    reports them: the trainer compares its own with these (sampler–trainer parity)."""


OutcomeStatus = Literal["deal", "invalid_deal", "no_deal", "aborted", "failed"]


class Outcome(BaseModel):
    status: OutcomeStatus
    reason: str = ""
    proposals: dict[str, list[int]] = {}
    """What each player proposed to keep, by player."""

    @property
    def agreed(self) -> bool:
        return self.status == "deal"


ChatMessage = dict[str, str]


# --------------------------------------------------------------------------- the game core


class Game:
    """The referee of one dialogue. Feed it replies with ``step`` until ``is_terminal``."""

    def __init__(
        self,
        context: Context,
        objective: Objective,
        first_speaker: str = "A",
        max_messages: int | None = DEFAULT_MAX_MESSAGES,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
        max_reply_chars: int | None = MAX_REPLY_CHARS,
    ) -> None:
        if first_speaker not in ("A", "B"):
            raise ValueError(f"first speaker must be 'A' or 'B', got {first_speaker!r}")
        if max_messages is not None and max_messages < 1:
            raise ValueError(f"message cap must be >= 1, got {max_messages}")
        self.context = context
        self.objective = objective
        self.first_speaker = first_speaker
        self.max_messages = max_messages
        self.max_consecutive_errors = max_consecutive_errors
        if max_reply_chars is not None and max_reply_chars < 1:
            raise ValueError(f"reply length limit must be >= 1, got {max_reply_chars}")
        self.max_reply_chars = max_reply_chars
        self.turns: list[Turn] = []
        self.outcome: Outcome | None = None
        self.n_messages = 0
        self.consecutive_errors = 0
        self._proposals: dict[str, Counts] = {}
        self._current = first_speaker
        self.transcripts: dict[str, list[ChatMessage]] = {
            p: [{"role": "system", "content": prompts.system_prompt(context, p, objective, max_messages)}]
            for p in ("A", "B")
        }
        self.transcripts[first_speaker].append({"role": "user", "content": prompts.protocol_lines()["kickoff"]})
        self._pending_retries: list[ChatMessage] = []

    # -- state

    @property
    def is_terminal(self) -> bool:
        return self.outcome is not None

    @property
    def current_player(self) -> str | None:
        return None if self.is_terminal else self._current

    @property
    def proposal_owed(self) -> bool:
        """True when the partner has proposed and the current player must propose too."""
        return len(self._proposals) == 1

    def conversation(self, player: str | None = None) -> list[ChatMessage]:
        """What ``player`` (default: the one to move) sees now, including rejected attempts
        since their last accepted reply and the feedback each got."""
        player = player or self._current
        convo = list(self.transcripts[player])
        if player == self._current:
            convo += self._pending_retries
        return convo

    # -- moves

    def step(self, text: str, tokens: int | None = None, logprobs: list[float] | None = None) -> Turn:
        """Apply the current player's reply; return the recorded Turn (``tokens`` and ``logprobs``
        as the agent reported them, see ``Turn``)."""
        if self.is_terminal:
            raise RuntimeError("the game is over")
        player = self._current
        limit = self.max_reply_chars
        if limit is not None and isinstance(text, str) and len(text) > limit:
            cut = f"{text[:limit]} […{len(text) - limit} more characters not kept]"
            return self._reject(player, cut, ProtocolError(ErrorCode.TOO_LONG, f"{len(text)} characters"), tokens)
        extra = {"tokens": tokens, "logprobs": logprobs}
        parsed = self._check(parse_reply(text))
        if isinstance(parsed, ProtocolError):
            return self._reject(player, text, parsed, tokens)
        self.consecutive_errors = 0
        self._pending_retries = []
        partner = other(player)
        if isinstance(parsed, Message):
            turn = Turn(player=player, text=text, accepted=True, kind="message", message=parsed.text, **extra)
            self.n_messages += 1
            self.transcripts[player].append({"role": "assistant", "content": parsed.canonical()})
            self.transcripts[partner].append({"role": "user", "content": parsed.canonical()})
        else:
            turn = Turn(
                player=player, text=text, accepted=True, kind="proposal", proposal=list(parsed.kept), **extra
            )
            self._proposals[player] = parsed.kept
            self.transcripts[player].append({"role": "assistant", "content": parsed.canonical()})
            if len(self._proposals) == 1:
                self.transcripts[partner].append(
                    {"role": "user", "content": prompts.protocol_lines()["partner_proposed"]}
                )
        self.turns.append(turn)
        self._current = partner
        self._maybe_finish()
        return turn

    def check(self, text: str) -> ProtocolError | None:
        """The rejection ``step`` would give this reply now (None: it would be accepted), without
        applying it. A user interface uses it to refuse a person's move with the protocol's own
        feedback, without counting it towards the abort after consecutive rejections."""
        if self.is_terminal:
            raise RuntimeError("the game is over")
        if self.max_reply_chars is not None and isinstance(text, str) and len(text) > self.max_reply_chars:
            return ProtocolError(ErrorCode.TOO_LONG, f"{len(text)} characters")
        parsed = self._check(parse_reply(text))
        return parsed if isinstance(parsed, ProtocolError) else None

    def feedback(self, error: ProtocolError) -> str:
        """The protocol's feedback line for a rejection in this game."""
        return prompts.feedback(error.code.value, self.context, self.max_reply_chars)

    def _check(self, parsed: Parsed) -> Parsed:
        """Context-dependent rules on top of the parse."""
        if isinstance(parsed, ProtocolError):
            return parsed
        if isinstance(parsed, Message) and self.proposal_owed:
            return ProtocolError(ErrorCode.PROPOSAL_OWED, "message sent when a proposal is owed")
        if isinstance(parsed, Proposal):
            if self.n_messages == 0:
                return ProtocolError(ErrorCode.PROPOSAL_TOO_EARLY, "proposal before any message")
            if not self.context.in_range(parsed.kept):
                return ProtocolError(
                    ErrorCode.OUT_OF_RANGE, f"kept {parsed.kept} but the counts are {self.context.counts}"
                )
        return parsed

    def _reject(self, player: str, text: str, error: ProtocolError, tokens: int | None) -> Turn:
        fb = self.feedback(error)
        turn = Turn(
            player=player, text=text, accepted=False, error=error.code, detail=error.detail, feedback=fb, tokens=tokens
        )
        self.turns.append(turn)
        self.consecutive_errors += 1
        self._pending_retries += [{"role": "assistant", "content": text}, {"role": "user", "content": fb}]
        if self.consecutive_errors >= self.max_consecutive_errors:
            self.outcome = Outcome(status="aborted", reason=f"{self.consecutive_errors} consecutive rejected replies")
        return turn

    def _maybe_finish(self) -> None:
        if len(self._proposals) == 2:
            a, b = self._proposals["A"], self._proposals["B"]
            proposals = {"A": list(a), "B": list(b)}
            if tuple(x + y for x, y in zip(a, b, strict=True)) == self.context.counts:
                self.outcome = Outcome(status="deal", proposals=proposals)
            else:
                self.outcome = Outcome(
                    status="invalid_deal", reason="the proposals do not divide the items", proposals=proposals
                )
        elif self.max_messages is not None and self.n_messages >= self.max_messages and not self._proposals:
            self.outcome = Outcome(status="no_deal", reason=f"message cap of {self.max_messages} reached")

    def end(self, status: Literal["no_deal", "failed"], reason: str) -> None:
        """End the game from outside: a walk-away (``no_deal``) or a backend failure (``failed``)."""
        if self.is_terminal:
            raise RuntimeError("the game is over")
        self.outcome = Outcome(status=status, reason=reason, proposals={p: list(k) for p, k in self._proposals.items()})

    # -- results

    @property
    def raw_scores(self) -> tuple[int, int]:
        """(X_A, X_B); both 0 unless the game ended in a valid deal."""
        if self.outcome is None or not self.outcome.agreed:
            return 0, 0
        return self.context.scores_for(self._proposals["A"])

    @property
    def rewards(self) -> tuple[float, float]:
        if self.outcome is None or not self.outcome.agreed:
            return 0.0, 0.0
        return self.objective.rewards(*self.raw_scores)
