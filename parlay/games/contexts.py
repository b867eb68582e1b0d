"""Where games come from: every valid context, seeded uniform samples, and Lewis files.

``all_contexts()`` enumerates every valid ordered (counts, values_A, values_B) triple under the
rules of ``dond.context_problems``; ``sample_contexts`` draws uniformly from it with an explicit generator.
``read_selfplay_file`` reads the Lewis et al. ``selfplay.txt`` format, one player per line
(``cnt val cnt val cnt val``), lines 2i and 2i+1 being the two players of game i.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

from parlay.games.dond import (
    ITEMS,
    MAX_COUNT,
    MAX_ITEMS,
    MIN_COUNT,
    MIN_ITEMS,
    TOTAL_VALUE,
    Context,
    Counts,
    RuleError,
    context_problems,
)


class ContextFileError(ValueError):
    """A context file that cannot be read; the message names the file and line."""


def _value_vectors(counts: Counts) -> Iterator[Counts]:
    """All non-negative integer value vectors with Σ count·value = 10."""
    ranges = [range(TOTAL_VALUE // c + 1) for c in counts]
    for vals in itertools.product(*ranges):
        if sum(c * v for c, v in zip(counts, vals, strict=True)) == TOTAL_VALUE:
            yield vals  # type: ignore[misc]


@cache
def all_contexts() -> tuple[Context, ...]:
    """Every valid ordered context, in a fixed order."""
    out = []
    for counts in itertools.product(range(MIN_COUNT, MAX_COUNT + 1), repeat=len(ITEMS)):
        if not MIN_ITEMS <= sum(counts) <= MAX_ITEMS:
            continue
        vectors = list(_value_vectors(counts))  # type: ignore[arg-type]
        for va, vb in itertools.product(vectors, repeat=2):
            if not context_problems(counts, va, vb):  # type: ignore[arg-type]
                out.append(Context(counts, va, vb))  # type: ignore[arg-type]
    return tuple(out)


def sample_contexts(n: int, rng: np.random.Generator | int) -> list[Context]:
    """``n`` contexts drawn uniformly (with replacement) from ``all_contexts()``."""
    if n < 0:
        raise ValueError(f"number of contexts must be >= 0, got {n}")
    rng = np.random.default_rng(rng)
    pool = all_contexts()
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


def parse_player_line(line: str) -> tuple[Counts, Counts]:
    """'cnt val cnt val cnt val' → (counts, values), the Lewis layout of one player's input."""
    parts = line.split()
    if len(parts) != 2 * len(ITEMS) or not all(p.isdigit() for p in parts):
        raise RuleError(f"expected 6 non-negative integers 'cnt val cnt val cnt val', got {line!r}")
    nums = [int(p) for p in parts]
    return tuple(nums[0::2]), tuple(nums[1::2])  # type: ignore[return-value]


def parse_selfplay_lines(lines: list[str], source: str = "<lines>") -> list[Context]:
    """Contexts from Lewis ``selfplay.txt`` lines; blank lines are ignored."""
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
    if len(numbered) % 2:
        lineno = numbered[-1][0]
        raise ContextFileError(f"{source}:{lineno}: odd number of player lines; each game needs two")
    contexts = []
    for (ln_a, text_a), (ln_b, text_b) in zip(numbered[0::2], numbered[1::2], strict=True):
        try:
            counts_a, values_a = parse_player_line(text_a)
        except RuleError as exc:
            raise ContextFileError(f"{source}:{ln_a}: {exc}") from None
        try:
            counts_b, values_b = parse_player_line(text_b)
        except RuleError as exc:
            raise ContextFileError(f"{source}:{ln_b}: {exc}") from None
        if counts_a != counts_b:
            raise ContextFileError(f"{source}:{ln_b}: item counts {counts_b} differ from line {ln_a}'s {counts_a}")
        problems = context_problems(counts_a, values_a, values_b)
        if problems:
            raise ContextFileError(f"{source}:{ln_a}-{ln_b}: invalid context: {'; '.join(problems)}")
        contexts.append(Context(counts_a, values_a, values_b))
    return contexts


def read_selfplay_file(path: str | Path) -> list[Context]:
    """Contexts from a Lewis ``selfplay.txt``-format file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContextFileError(f"{path}: cannot read context file: {exc}") from None
    contexts = parse_selfplay_lines(text.splitlines(), source=str(path))
    if not contexts:
        raise ContextFileError(f"{path}: no contexts in file")
    return contexts
