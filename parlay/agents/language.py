"""The bots' small command of English: saying and reading offers, values and agreement.

Bots speak the same text protocol a model does, so what they understand of a partner comes
from the words alone. ``read_offer`` finds who gets what in a message ("I'll take the books,
you can have the rest"), ``read_values`` finds stated values ("hats are worth 3 to me"),
``is_acceptance`` spots "deal"/"agreed", ``last_stated_split`` finds the split a conversation
last put into words (the selection step of ``hf.py``). The ``say_*`` functions phrase the same
facts in varied words, chosen with the caller's random generator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from parlay.games.dond import ARTICLES, ITEM_PATTERN, ITEMS, NUMBER_WORDS, Counts, count_phrase
from parlay.protocol import ChatMessage, is_feedback, message_text

_WORD_NUM = NUMBER_WORDS | ARTICLES
_MENTION = re.compile(
    rf"\b(?P<q>\d+|{'|'.join(_WORD_NUM)}|the|both|all(?: of)?(?: the)?|every)\s+"
    rf"(?P<item>{ITEM_PATTERN})(?P<pl>e?s)?\b",
    re.IGNORECASE,
)
_SUBJECT = re.compile(r"\b(?P<who>i|me|my|mine|you|your|yours)\b", re.IGNORECASE)
_REST = re.compile(r"\b(the rest|everything else|all the rest|the others|what'?s left|the remaining)\b", re.I)
_ACCEPT = re.compile(r"\b(deal|agreed|agree|accept|sounds good|works for me|it'?s a deal|fine by me)\b", re.I)
_REFUSE = re.compile(r"\b(no deal|not|don'?t|can'?t|won'?t|reject|no way|too little|too much)\b", re.I)
_VALUE_PATTERNS = [
    re.compile(rf"\b(?:each |a |every )?(?P<item>{ITEM_PATTERN})(?:e?s)?\s+(?:are|is)\s+worth\s+(?P<v>\d+)", re.I),
    re.compile(rf"\b(?P<item>{ITEM_PATTERN})(?:e?s)?\s*[:=]\s*(?P<v>\d+)", re.I),
    re.compile(rf"\b(?P<v>\d+)\s+points?\s+(?:for|per)\s+(?:each\s+|a\s+|every\s+)?(?P<item>{ITEM_PATTERN})", re.I),
]


def _quantity(q: str, plural: bool, available: int) -> int:
    q = q.lower()
    if q.isdigit():
        return int(q)
    if q in _WORD_NUM:
        return _WORD_NUM[q]
    if q == "both":
        return 2
    if q == "the":
        return available if plural else 1
    return available  # all, all the, every


def read_offer(text: str, counts: Counts) -> tuple[Counts, Counts] | None:
    """(what the speaker keeps, what the listener gets) stated in ``text``, or None.

    Each item mention belongs to the nearest subject before it ("I …" / "you …" / "give me …").
    Items nobody mentions go to the side that said "the rest", else to the side not mentioned.
    """
    speaker: dict[int, int] = {}
    listener: dict[int, int] = {}
    rest_side: str | None = None
    subjects = [(m.start(), m["who"].lower()) for m in _SUBJECT.finditer(text)]

    def side_at(pos: int) -> str | None:
        before = [who for start, who in subjects if start < pos]
        if not before:
            return None
        return "speaker" if before[-1] in ("i", "me", "my", "mine") else "listener"

    for m in _MENTION.finditer(text):
        side = side_at(m.start())
        if side is None:
            continue
        i = ITEMS.index(m["item"].lower())
        n = _quantity(m["q"], bool(m["pl"]), counts[i])
        target = speaker if side == "speaker" else listener
        target[i] = target.get(i, 0) + n
    for m in _REST.finditer(text):
        rest_side = side_at(m.start()) or rest_side
    if not speaker and not listener:
        return None
    keep = []
    for i, c in enumerate(counts):
        if i in speaker and i in listener:
            if speaker[i] + listener[i] != c:
                return None
            keep.append(speaker[i])
        elif i in speaker:
            keep.append(speaker[i])
        elif i in listener:
            keep.append(c - listener[i])
        elif rest_side is not None:
            keep.append(c if rest_side == "speaker" else 0)
        else:
            keep.append(0 if speaker else c)  # unmentioned goes to the side not mentioned
        if not 0 <= keep[-1] <= c:
            return None
    kept = tuple(keep)
    return kept, tuple(c - k for c, k in zip(counts, kept, strict=True))  # type: ignore[return-value]


def last_stated_split(messages: Sequence[ChatMessage], counts: Counts) -> Counts | None:
    """The counts this player keeps under the split that the latest message of ``messages`` (a
    player's conversation: its own messages as ``assistant``, its partner's as ``user``) stating
    one gives it (``read_offer``, turned to this player's side), or None when no message states a
    split. Proposals, the game's own lines and this player's rejected attempts (a line the game's
    feedback follows: the partner never saw it) are not read."""
    for i in range(len(messages) - 1, -1, -1):
        msg = messages[i]
        rejected = i + 1 < len(messages) and is_feedback(messages[i + 1]["content"])
        text = message_text(msg["content"]) if msg["role"] in ("user", "assistant") and not rejected else None
        offer = read_offer(text, counts) if text is not None else None
        if offer is not None:
            return offer[0] if msg["role"] == "assistant" else offer[1]  # type: ignore[return-value]
    return None


def read_values(text: str) -> dict[int, int]:
    """Item index → value, for every value the speaker states about themselves."""
    found: dict[int, int] = {}
    for pattern in _VALUE_PATTERNS:
        for m in pattern.finditer(text):
            found.setdefault(ITEMS.index(m["item"].lower()), int(m["v"]))
    return found


def is_acceptance(text: str) -> bool:
    return bool(_ACCEPT.search(text)) and not _REFUSE.search(text)


# --------------------------------------------------------------------------- saying things


def items_phrase(kept: Counts) -> str:
    """(2, 0, 1) → '2 books and 1 ball'; nothing → 'nothing'."""
    parts = [count_phrase(n, item) for n, item in zip(kept, ITEMS, strict=True) if n > 0]
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_OFFERS = [
    "How about I take {mine} and you get {yours}?",
    "I'd like {mine}; you can have {yours}.",
    "What if you take {yours} and I keep {mine}?",
    "My offer: I get {mine}, you get {yours}.",
    "Let me suggest this: I keep {mine} and you take {yours}.",
    "Could I have {mine}? Then you would get {yours}.",
]
_ACCEPTS = [
    "Deal. I take {mine} and you take {yours}.",
    "Agreed: I get {mine}, you get {yours}.",
    "That works for me. So I keep {mine} and you get {yours}.",
    "Sounds good, it's a deal: I take {mine}, you take {yours}.",
]
_REFUSALS = ["That doesn't work for me.", "I can't accept that.", "That's too little for me.", "Not quite."]
_VALUE_INTROS = ["For me, ", "My values: ", "To be open with you, for me ", "Here is what matters to me: "]


def say_offer(rng: np.random.Generator, mine: Counts, yours: Counts, refusal: bool = False) -> str:
    text = _OFFERS[rng.integers(len(_OFFERS))].format(mine=items_phrase(mine), yours=items_phrase(yours))
    if refusal:
        text = f"{_REFUSALS[rng.integers(len(_REFUSALS))]} {text}"
    return text


def say_accept(rng: np.random.Generator, mine: Counts, yours: Counts) -> str:
    return _ACCEPTS[rng.integers(len(_ACCEPTS))].format(mine=items_phrase(mine), yours=items_phrase(yours))


def say_values(rng: np.random.Generator, values: Counts) -> str:
    parts = [f"{item}s are worth {v}" for v, item in zip(values, ITEMS, strict=True)]
    return _VALUE_INTROS[rng.integers(len(_VALUE_INTROS))] + ", ".join(parts[:-1]) + " and " + parts[-1] + "."
