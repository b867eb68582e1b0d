"""Import Lewis et al. (2017) Deal or No Deal dialogues as semi-competitive Episodes.

Their ``train/val/test.txt`` hold one dialogue per line, written from one player's side::

    <input> c v c v c v </input> <dialogue> YOU: … <eos> THEM: … <eos> YOU: <selection>
    </dialogue> <output> item0=a item1=b item2=c item0=d item1=e item2=f </output>
    <partner_input> c v c v c v </partner_input>

Each dialogue appears twice, once from each side. We pair the two sides (same inputs crossed,
same utterances with YOU/THEM swapped), replay the utterances through the same game core the
rollouts use, and end with each side's selection as its proposal. ``<disagree>``-style outputs
become games without a deal. Lines that cannot be parsed or paired are reported, never dropped
in silence. parlay ships none of this data; bring your own copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from parlay.episode import Episode
from parlay.games.contexts import parse_player_line
from parlay.games.dond import ITEMS, Context, Counts, RuleError, context_problems, objective
from parlay.protocol import Game, message_reply, proposal_reply

_SECTION = {
    name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL) for name in ("input", "dialogue", "output", "partner_input")
}
_ITEM = re.compile(r"^item(\d+)=(\d+)$")


class LewisFormatError(ValueError):
    """One line that is not a Lewis dialogue."""


@dataclass(frozen=True)
class LewisLine:
    lineno: int
    counts: Counts
    my_values: Counts
    partner_values: Counts
    utterances: tuple[tuple[str, str], ...]
    """(speaker, text) with speaker "YOU" or "THEM"; the selection marker is not included."""
    selector: str | None
    """Who wrote ``<selection>``, if anyone."""
    output: tuple[Counts, Counts] | None
    """(what YOU keep, what THEM keep), or None for a disagreement."""

    def key(self) -> tuple:
        return (self.my_values, self.partner_values, self.counts, self.utterances)

    def mirror_key(self) -> tuple:
        swap = {"YOU": "THEM", "THEM": "YOU"}
        flipped = tuple((swap[who], text) for who, text in self.utterances)
        return (self.partner_values, self.my_values, self.counts, flipped)


def _numbers(text: str, what: str) -> tuple[Counts, Counts]:
    try:
        return parse_player_line(text)
    except RuleError as exc:
        raise LewisFormatError(f"<{what}>: {exc}") from None


def parse_line(line: str, lineno: int = 0) -> LewisLine:
    sections = {}
    for name, pattern in _SECTION.items():
        m = pattern.search(line)
        if m is None:
            raise LewisFormatError(f"missing <{name}>…</{name}>")
        sections[name] = m[1].strip()
    counts, mine = _numbers(sections["input"], "input")
    partner_counts, theirs = _numbers(sections["partner_input"], "partner_input")
    if counts != partner_counts:
        raise LewisFormatError(f"item counts differ: {counts} vs partner's {partner_counts}")
    utterances: list[tuple[str, str]] = []
    selector = None
    for chunk in sections["dialogue"].split("<eos>"):
        chunk = chunk.strip()
        if not chunk:
            continue
        who, sep, text = chunk.partition(":")
        who = who.strip().upper()
        if not sep or who not in ("YOU", "THEM"):
            raise LewisFormatError(f"utterance without 'YOU:' or 'THEM:': {chunk[:40]!r}")
        text = text.strip()
        if "<selection>" in text:
            selector = who
            text = text.replace("<selection>", "").strip()
        if text:
            if utterances and utterances[-1][0] == who:  # one speaker twice in a row: one turn
                utterances[-1] = (who, f"{utterances[-1][1]} {text}")
            else:
                utterances.append((who, text))
    return LewisLine(lineno, counts, mine, theirs, tuple(utterances), selector, _output(sections["output"]))


def _output(text: str) -> tuple[Counts, Counts] | None:
    """(what YOU keep, what THEM keep) from ``item0=a item1=b item2=c item0=d item1=e item2=f``,
    each half read by its ``itemN`` index (in any order), or None for six ``<marker>`` entries
    (a disagreement). A missing, repeated or unknown index is an error, never another deal."""
    tokens = text.split()
    if len(tokens) != 2 * len(ITEMS):
        raise LewisFormatError(f"<output> must hold {2 * len(ITEMS)} entries, got {len(tokens)}")
    if all(t.startswith("<") and t.endswith(">") for t in tokens):
        return None
    halves = []
    for who, half in (("YOU", tokens[: len(ITEMS)]), ("THEM", tokens[len(ITEMS) :])):
        kept: dict[int, int] = {}
        for token in half:
            m = _ITEM.match(token)
            if m is None:
                raise LewisFormatError(f"<output> entries must be itemN=K or <marker>, got {token!r} in {text!r}")
            index = int(m[1])
            if index >= len(ITEMS):
                raise LewisFormatError(f"<output> has {token!r}: item index out of range 0..{len(ITEMS) - 1}")
            if index in kept:
                raise LewisFormatError(f"<output> gives item{index} twice for {who}")
            kept[index] = int(m[2])
        halves.append(tuple(kept[i] for i in range(len(ITEMS))))  # three distinct indices in 0..2: all present
    return halves[0], halves[1]  # type: ignore[return-value]


@dataclass
class ImportResult:
    episodes: list[Episode] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    """(line number, reason) for lines that could not be parsed or replayed."""
    unpaired: list[int] = field(default_factory=list)
    """Line numbers of dialogues whose other side is not in the file."""


def _episode(a: LewisLine, b: LewisLine, source: str) -> Episode:
    problems = context_problems(a.counts, a.my_values, b.my_values)
    if problems:
        raise LewisFormatError(f"invalid context: {'; '.join(problems)}")
    ctx = Context(a.counts, a.my_values, b.my_values)
    player = {"YOU": "A", "THEM": "B"}  # from a's side
    first = player[a.utterances[0][0]] if a.utterances else "A"
    game = Game(ctx, objective("semi-competitive"), first_speaker=first, max_messages=None)
    for who, text in a.utterances:
        assert game.current_player == player[who]  # merged utterances alternate
        turn = game.step(message_reply(text))
        if not turn.accepted:
            raise LewisFormatError(f"utterance rejected by the protocol ({turn.error}): {text[:40]!r}")
    if a.output is None or b.output is None:
        game.end("no_deal", "no agreement in the Lewis data")
    else:
        kept = {"A": a.output[0], "B": b.output[0]}
        for _ in range(2):
            p = game.current_player
            turn = game.step(proposal_reply(kept[p]))  # type: ignore[index]
            if not turn.accepted:
                raise LewisFormatError(f"selection rejected by the protocol ({turn.error}: {turn.detail})")
    return Episode.from_game(game, f"lewis-{a.lineno}-{b.lineno}", {"source": source, "lines": [a.lineno, b.lineno]})


def import_lines(lines: list[str], source: str = "<lines>") -> ImportResult:
    result = ImportResult()
    parsed: list[LewisLine] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append(parse_line(line, i))
        except LewisFormatError as exc:
            result.bad_lines.append((i, str(exc)))
    waiting: dict[tuple, list[LewisLine]] = {}
    for ln in parsed:
        partners = waiting.get(ln.mirror_key())
        if partners:
            first = partners.pop(0)
            try:
                result.episodes.append(_episode(first, ln, source))
            except LewisFormatError as exc:
                result.bad_lines.append((first.lineno, f"{exc} (paired with line {ln.lineno})"))
        else:
            waiting.setdefault(ln.key(), []).append(ln)
    result.unpaired = sorted(ln.lineno for group in waiting.values() for ln in group)
    return result


def import_file(path: str | Path) -> ImportResult:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LewisFormatError(f"{path}: cannot read: {exc}") from None
    return import_lines(text.splitlines(), source=str(path))
