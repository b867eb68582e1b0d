"""The text protocol: parsing a player's reply, and the game core that referees a dialogue.

A reply is ``[message] text`` or ``[propose] (x books, y hats, z balls)`` (the counts the
speaker keeps); anything after ``[END]`` is dropped. This module is the wire format's one home:
``message_reply`` and ``proposal_reply`` write a well-formed reply (bots, the terminal player,
the Lewis importer and the tests all go through them), ``parse_reply`` maps *any* string to a
``Message``, a ``Proposal``, a ``SidedProposal`` or a typed ``ProtocolError`` — it never
raises — and ``message_text`` reads the text of an accepted message back out of a transcript
line.

**No forged turns.** A reply that contains a special-token marker of any chat-model family
(``SPECIAL_TOKEN``: ``<|im_start|>``, ``<start_of_turn>``, ``</s>``, ``[INST]``, …) is refused
with ``ErrorCode.SPECIAL_TOKEN``. Such text would otherwise be rendered into the partner's
prompt, where the chat template's tokenizer reads it as control tokens (a forged end of turn, a
forged system message). ``parse_reply`` checks it first, before the tags (``[message] hi</s>``
is a special token, not a message), on what is left once ``[END]`` and what follows are cut
(that part never reaches a prompt). It is the one place replies enter a game, so every way in
goes through it: ``Game.step``, ``Game.check`` (the web app's participants), the terminal
player and every agent. The Hugging Face layer also encodes message text as plain text: defence
in depth, not a reason to drop this.

**The phrasings of a proposal accepted.** The body is read as item counts (``2 books``,
``one hat``, ``no balls``, ``a ball``, ``-1 books``), each given to a side by these rules:

1. A count given to no side is the speaker's: the canonical ``(x books, y hats, z balls)``, and
   ``2 balls, 1 hat, 0 books`` in any order.
2. A phrase of the speaker's gives it the counts that follow — ``I keep``, ``I take``, ``I get``,
   ``I want``, ``I have``, ``I receive``, ``I'll have``, ``I'd like (to keep)``, ``I would
   take`` (any of will/would/can/could/should/shall/may), ``give me``, ``let me keep``, ``my
   share``, and ``me:`` or ``mine:`` opening a clause.
3. A phrase of the partner's gives the partner the counts that follow — ``you keep``, ``you
   take``, ``you get``, ``you want``, ``you have``, ``you can have``, ``you'll get``, ``you to
   have`` (as in "I want you to have"), ``give you``, ``leaving you``, ``your share``, and
   ``you:`` or ``yours:`` opening a clause.
4. ``for me``, ``to me``, ``mine`` (the speaker's) and ``for you``, ``to you``, ``yours`` (the
   partner's) right after counts (``2 books for me``, ``(0 books, 0 hats, 3 balls) for you``,
   ``the 3 balls are yours``) give that side every count since the last phrase or sentence end;
   if a phrase before gave one of them to the other side it is unclear, and refused
   (``I keep 2 books, 1 hat for you``). At the start of a clause they lead like rules 2–3
   (``for me: 2 books, for you: 1 hat``).
5. A leading phrase gives counts only when one follows at once (``the``, ``all``, ``only``,
   ``:``, ``(`` may stand between), and keeps giving them up to the next phrase or the end of
   the sentence (``.``, ``;``, ``!``, ``?``, a new line). A phrase with no count after it (``I
   have a proposal for you: (…)``, ``I get that you want the balls, so (…)``) gives nothing.
6. The speaker keeps, of each item, the count stated for itself, or the count on the table minus
   the count stated for the partner. An item stated for both sides must add up to the count
   (else: inconsistent), an item stated for neither side is missing, an item stated twice for
   one side is given twice: all three refused as malformed. A partner's count beyond what is on
   the table leaves the speaker a negative count: out of range.

Only the game knows the counts, so a proposal that states any partner's share parses to a
``SidedProposal``, which ``Game`` resolves into the ``Proposal`` of the counts kept; the
transcript line (``Proposal.canonical``) is always the canonical form of what the speaker keeps.

``Game`` is the one referee used everywhere (rollouts, the terminal, the web app, the Lewis
importer). It owns whose turn it is, the hidden proposals, the rejection rules (among them a
reply longer than ``max_reply_chars``, which is kept only cut), the message cap, the abort after
consecutive rejections, and each player's chat transcript. It returns structured results and
does no I/O.
"""

from __future__ import annotations

import functools
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
    SPECIAL_TOKEN = "special_token"
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

SPECIAL_TOKEN = re.compile(
    r"(?i:<[|｜][^\s|｜]+[|｜]>"
    r"|<(?:start_of_turn|end_of_turn|bos|eos|pad|unk|mask)>"
    r"|</?s>"
    r"|\[/?inst\]"
    r"|<</?sys>>)"
    r"|\[/?(?:TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS|TOOL_CONTENT|SYSTEM_PROMPT|IMG|IMG_BREAK|IMG_END)\]"
)
"""A special-token marker of a chat-model family: text a reply may not contain.

- angle-pipe tokens ``<|name|>`` with any name without spaces: ChatML (Qwen, SmolLM)
  ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``; Llama 3 ``<|begin_of_text|>``,
  ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``; Phi-3 ``<|user|>``,
  ``<|assistant|>``, ``<|system|>``, ``<|end|>``; and DeepSeek's full-width ``<｜User｜>``;
- Gemma ``<start_of_turn>``, ``<end_of_turn>``, ``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``,
  ``<mask>``;
- sentencepiece ``<s>``, ``</s>`` (Llama 2, Mistral);
- Llama 2 / Mistral ``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``;
- Mistral v3 and later control tokens ``[TOOL_CALLS]``, ``[AVAILABLE_TOOLS]``,
  ``[/AVAILABLE_TOOLS]``, ``[TOOL_RESULTS]``, ``[/TOOL_RESULTS]``, ``[TOOL_CONTENT]``,
  ``[SYSTEM_PROMPT]``, ``[/SYSTEM_PROMPT]``, ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``.

A tokenizer matches special tokens exactly, so inner spaces are not tolerated (``< |x| >`` is
plain text to every tokenizer); case is ignored except for Mistral's upper-case control words
(``[img]`` is ordinary text), which refuses a little more than the tokenizers would.
"""


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


Share = tuple[int | None, int | None, int | None]
"""A count per item type, None where the proposal states none."""


@dataclass(frozen=True)
class SidedProposal:
    """A proposal that states what the partner keeps of some items: per item type, the count
    stated for the speaker and the count stated for the partner (None: not stated; every item
    has at least one). Only the counts on the table turn it into what the speaker keeps
    (``resolve``), so ``Game`` resolves it."""

    speaker: Share
    partner: Share

    def resolve(self, counts: Counts) -> Proposal | ProtocolError:
        """What the speaker keeps: its own count, or the count minus the partner's; an item
        stated for both sides must add up to ``counts``."""
        kept = []
        for item, c, mine, theirs in zip(ITEMS, counts, self.speaker, self.partner, strict=True):
            if mine is not None and theirs is not None and mine + theirs != c:
                return ProtocolError(
                    ErrorCode.MALFORMED_PROPOSAL,
                    f"inconsistent: {mine} {item}s for the speaker and {theirs} for the partner, but there are {c}",
                )
            kept.append(mine if mine is not None else c - theirs)  # type: ignore[operator]
        return Proposal(tuple(kept))  # type: ignore[arg-type]


Parsed = Message | Proposal | SidedProposal | ProtocolError

_END = re.compile(r"\[\s*end\s*\]", re.IGNORECASE)
_TAG = re.compile(r"\[\s*(message|propose|proposal)\s*\]", re.IGNORECASE)
_COUNT_WORDS = NUMBER_WORDS | ARTICLES
_ITEM_COUNT = re.compile(
    rf"(?<!\w)(?P<num>-?\d+|{'|'.join(_COUNT_WORDS)})\s+(?P<item>{ITEM_PATTERN})(?:e?s)?\b",
    re.IGNORECASE,
)

# Whose a count is, in a proposal's text: the phrases of the module docstring's list.
_VERB = r"(?:(?:like|want|love)\s+to\s+)?(?:keep|take|get|want|have|receive|like)\b"
_MODAL = r"(?:['’](?:ll|d)|\s+(?:will|would|can|could|should|shall|may))?"
_LINE_START = r"(?:^|(?<=[(;,.!?\n]))\s*"
_SIDE_PHRASE = re.compile(
    rf"(?P<me_lead>\bi{_MODAL}\s+{_VERB}|\bgive\s+me\b|\blet\s+me\s+(?:keep|take|have|get)\b"
    rf"|\bmy\s+(?:share|part|side|half|portion)\b|{_LINE_START}(?:me|mine)\s*:)"
    rf"|(?P<you_lead>\byou{_MODAL}\s+{_VERB}|\byou\s+to\s+(?:keep|take|get|have|receive)\b|\bgive\s+you\b"
    rf"|\bleav(?:e|es|ing)\s+you\b|\byour\s+(?:share|part|side|half|portion)\b|{_LINE_START}(?:you|yours)\s*:)"
    r"|(?P<me_either>\b(?:for|to)\s+me\b|\bmine\b)"
    r"|(?P<you_either>\b(?:for|to)\s+you\b|\byours\b)",
    re.IGNORECASE,
)
"""``*_lead`` phrases come before the counts they give; ``*_either`` ones before or after."""
_SENTENCE_END = re.compile(r"[;!?\n]|\.(?!\d)")
_BEFORE_COUNTS = re.compile(r"(?:[\s:=(–—]|\b(?:the|all|only|just|both|of|is|are|would|will|be)\b)*", re.IGNORECASE)
"""What may stand between a leading phrase and its first count ("you keep the 3 balls")."""
_AFTER_COUNTS = re.compile(r"[\s)\]]*(?:(?:are|is|go|goes|will\s+go|would\s+go|will\s+be|would\s+be)\s+)?", re.I)
"""What may stand between counts and a following ``for me`` or ``yours`` ("3 balls are yours")."""
_CLAUSE_START = re.compile(r"(?:^|[(;,.!?\n:]|\band|\bthen|\bso)\s*$", re.IGNORECASE)
"""What precedes a ``for me``/``for you`` that leads ("…, for you 3 balls"), unlike the ``for
you`` of "a proposal for you: (…)"."""

_PARTNER_WORD = re.compile(
    r"\b(?:you|your|yours|you['’](?:re|ll|d|ve)|u|ur|they|them|their|theirs|partner|partner['’]s|other|opponent)\b",
    re.IGNORECASE,
)
"""Words that name the partner. A proposal that names the partner anywhere the side phrases did
not read ("your 1 book, my 2 hats", "they keep 1 book", "1 book to them") is refused as unclear:
a count meant for the partner is never read as the speaker's."""

_SPEAKER, _PARTNER = "speaker", "partner"


def _count(m: re.Match[str]) -> tuple[int, int]:
    """(item index, count) of one ``N items`` match."""
    num = m["num"].lower()
    return ITEMS.index(m["item"].lower()), _COUNT_WORDS[num] if num in _COUNT_WORDS else int(num)


def _record(group: list[tuple[int, int, str | None]], stated: dict[str, dict[int, int]]) -> ProtocolError | None:
    """Enter a group's counts into ``stated`` (side → item → count); a count stated for no side
    is the speaker's (the canonical form). An item stated twice for one side is an error."""
    for i, n, side in group:
        owner = side or _SPEAKER
        if i in stated[owner]:
            return ProtocolError(ErrorCode.MALFORMED_PROPOSAL, f"{ITEMS[i]}s given twice for the {owner}")
        stated[owner][i] = n
    return None


def _parse_proposal_body(body: str) -> Proposal | SidedProposal | ProtocolError:
    """Read a proposal's body by the rules of the module docstring: a ``Proposal`` when every
    count is the speaker's, a ``SidedProposal`` when some are the partner's."""
    counts = list(_ITEM_COUNT.finditer(body))
    if not counts:
        return ProtocolError(ErrorCode.MALFORMED_PROPOSAL, f"no item counts in {body!r}")
    count_starts = {m.start() for m in counts}
    events = sorted(
        [(m.start(), "count", m) for m in counts]
        + [(m.start(), "side", m) for m in _SIDE_PHRASE.finditer(body)]
        + [(m.start(), "end", m) for m in _SENTENCE_END.finditer(body)],
        key=lambda event: event[0],
    )
    phrases = [(m.start(), m.end()) for m in _SIDE_PHRASE.finditer(body)]
    loose = [w for w in _PARTNER_WORD.finditer(body) if not any(a <= w.start() < b for a, b in phrases)]
    stated: dict[str, dict[int, int]] = {_SPEAKER: {}, _PARTNER: {}}
    scope: str | None = None  # the side of the last leading phrase, up to the next phrase or sentence end
    group: list[tuple[int, int, str | None]] = []  # (item, count, side) since the last phrase or sentence end
    last_count_end = covered = 0
    for start, kind, m in events:
        if start < covered:  # inside a match already read
            continue
        covered = m.end()
        if kind == "count":
            group.append((*_count(m), scope))
            last_count_end = m.end()
            continue
        if kind == "end":
            scope = None
        else:
            which = m.lastgroup or ""
            side = _SPEAKER if which.startswith("me") else _PARTNER
            either = which.endswith("either")
            if either and group and _AFTER_COUNTS.fullmatch(body, last_count_end, start):  # "3 balls for you"
                clash = next((i for i, _, s in group if s not in (None, side)), None)
                if clash is not None:
                    return ProtocolError(
                        ErrorCode.MALFORMED_PROPOSAL, f"unclear whose {ITEMS[clash]}s: {m[0].strip()!r} after them"
                    )
                group[:] = [(i, n, side) for i, n, _ in group]
                scope = None
            elif _BEFORE_COUNTS.match(body, m.end()).end() in count_starts and (  # type: ignore[union-attr]
                not either or _CLAUSE_START.search(body, 0, start)
            ):
                scope = side  # "you keep the 3 balls", "…, for me 2 books"
            else:
                continue  # a side word that gives no counts ("I have a proposal for you:"): read past it
        if (error := _record(group, stated)) is not None:
            return error
        group = []
    if (error := _record(group, stated)) is not None:
        return error
    if loose:
        return ProtocolError(
            ErrorCode.MALFORMED_PROPOSAL, f"unclear whose items: {loose[0][0]!r} names the partner unread"
        )
    missing = [f"{item}s" for i, item in enumerate(ITEMS) if i not in stated[_SPEAKER] and i not in stated[_PARTNER]]
    if missing:
        return ProtocolError(ErrorCode.MALFORMED_PROPOSAL, f"missing {', '.join(missing)}")
    if not stated[_PARTNER]:
        return Proposal(tuple(stated[_SPEAKER][i] for i in range(len(ITEMS))))  # type: ignore[arg-type]
    mine, theirs = (tuple(stated[side].get(i) for i in range(len(ITEMS))) for side in (_SPEAKER, _PARTNER))
    return SidedProposal(mine, theirs)  # type: ignore[arg-type]


def parse_reply(text: str) -> Parsed:
    """Parse one reply, tolerant of case, spacing, singular/plural and a trailing ``[END]``;
    a reply with a chat special token before ``[END]`` is refused before any tag is read."""
    if not isinstance(text, str):
        return ProtocolError(ErrorCode.EMPTY, f"reply is not text: {type(text).__name__}")
    text = _END.split(text, maxsplit=1)[0].strip()
    if not text:
        return ProtocolError(ErrorCode.EMPTY, "empty reply")
    forged = SPECIAL_TOKEN.search(text)
    if forged is not None:
        return ProtocolError(ErrorCode.SPECIAL_TOKEN, f"special token {forged[0]!r}")
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


def is_proposal_attempt(text: str) -> bool:
    """Whether a reply opens with the proposal tag in any spelling the parser accepts
    (``[propose]``, ``[Proposal]``, ``[ propose ]``, leading spaces), whatever follows it."""
    tag = _TAG.match(text.lstrip())
    return tag is not None and tag[1].lower() != "message"


@functools.cache
def _feedback_patterns() -> re.Pattern[str]:
    lines = prompts.protocol_lines()["feedback"].values()
    parts = [".*".join(re.escape(piece) for piece in re.split(r"\{\w+\}", line)) for line in lines]
    return re.compile("|".join(f"(?:{p})" for p in parts), re.DOTALL)


def is_feedback(line: str) -> bool:
    """Whether a conversation line is the game's feedback on a rejected reply (``Game.feedback``):
    the player's line before it is an attempt its partner never saw."""
    return _feedback_patterns().fullmatch(line) is not None


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
            turn = Turn(player=player, text=text, accepted=True, kind="proposal", proposal=list(parsed.kept), **extra)
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

    def _check(self, parsed: Parsed) -> Message | Proposal | ProtocolError:
        """Context-dependent rules on top of the parse; a ``SidedProposal`` comes out resolved
        into the ``Proposal`` of what the speaker keeps."""
        if isinstance(parsed, SidedProposal):
            parsed = parsed.resolve(self.context.counts)
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
