"""Deal or No Deal rules: contexts, objectives, proposals, scoring and welfare.

Pure: no language model, no I/O. Everything a metric or a player needs to know about the
game itself is computed here, once.

A *context* is what one game is played on: the item counts and each player's private values
(Lewis et al. 2017). An *objective* turns the two raw scores into rewards with a single
weight λ: reward_A = X_A + λ·X_B.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

ITEMS: tuple[str, ...] = ("book", "hat", "ball")
"""The three item types, in the order every count/value tuple uses."""

NUMBER_WORDS: dict[str, int] = {
    w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
} | {"no": 0}
"""Counts written as words ("two books", "no hats"); every reader of counts in text uses this table."""
ARTICLES: dict[str, int] = {"a": 1, "an": 1}
"""Articles that stand for one item ("a hat"), for readers that accept them as counts."""
ITEM_PATTERN = "|".join(ITEMS)
"""``book|hat|ball``: the alternation of item names for regular expressions (singular; readers add
``(?:e?s)?`` for plurals)."""

PLAYERS: tuple[str, str] = ("A", "B")

TOTAL_VALUE = 10
"""Σ count·value for each player."""
MIN_ITEMS, MAX_ITEMS = 5, 7
MIN_COUNT, MAX_COUNT = 1, 4
DEFAULT_MAX_MESSAGES = 20
"""Messages after which a game without two proposals ends with no deal, unless set otherwise."""
MAX_CONSECUTIVE_ERRORS = 5
"""Rejected replies in a row that abort a game (both score 0)."""
MAX_REPLY_CHARS = 1000
"""Longest reply, in characters, unless set otherwise: a longer one is rejected (and stored cut),
so one runaway reply cannot bloat a run's files and every later prompt of its game."""

Counts = tuple[int, int, int]


def other(player: str) -> str:
    """The partner of ``player`` ("A" ↔ "B")."""
    return "B" if player == "A" else "A"


class RuleError(ValueError):
    """A context, objective or allocation that breaks the game's rules."""


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """How much the partner's raw score counts in a player's reward: λ ∈ [−1, 1]."""

    lam: float
    name: str

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, int | float) and math.isfinite(self.lam)):
            raise RuleError(f"objective weight λ must be a number, got {self.lam!r}")
        if not -1.0 <= self.lam <= 1.0:
            raise RuleError(f"objective weight λ must lie in [-1, 1], got {self.lam}")

    def rewards(self, raw_a: float, raw_b: float) -> tuple[float, float]:
        """(reward_A, reward_B) for raw scores (X_A, X_B)."""
        return raw_a + self.lam * raw_b, raw_b + self.lam * raw_a

    def reward_bounds(self) -> tuple[float, float]:
        """The smallest and largest reward any player can get under this objective."""
        low = min(0.0, self.lam * TOTAL_VALUE)
        high = TOTAL_VALUE + max(0.0, self.lam * TOTAL_VALUE)
        return low, high

    @property
    def preset(self) -> str | None:
        """The preset's name when λ equals one, else None."""
        return next((name for name, lam in OBJECTIVE_PRESETS.items() if lam == self.lam), None)

    def to_dict(self) -> dict[str, float | str]:
        return {"name": self.name, "lam": self.lam}


OBJECTIVE_PRESETS: dict[str, float] = {
    "cooperative": 1.0,
    "semi-competitive": 0.0,
    "competitive": -1.0,
}
"""The paper's three objectives. Any λ in between is legal too."""


def objective(spec: str | float | Objective) -> Objective:
    """An Objective from a preset name (``cooperative``…), a number, or ``lambda=0.5``.

    >>> objective("competitive").lam
    -1.0
    >>> objective("0.5").name
    'lambda=0.5'
    """
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, bool):
        raise RuleError(f"objective must be a preset name or a number, got {spec!r}")
    if isinstance(spec, int | float):
        lam = float(spec)
    else:
        text = spec.strip().lower().replace("_", "-")
        if text in OBJECTIVE_PRESETS:
            return Objective(OBJECTIVE_PRESETS[text], text)
        text = text.removeprefix("lambda=").removeprefix("λ=")
        try:
            lam = float(text)
        except ValueError:
            presets = ", ".join(OBJECTIVE_PRESETS)
            raise RuleError(f"unknown objective {spec!r}: expected one of {presets} or a number in [-1, 1]") from None
    checked = Objective(lam, "")  # validates the range before naming
    name = checked.preset or f"lambda={lam:g}"
    return Objective(lam, name)


# --------------------------------------------------------------------------- contexts


@dataclass(frozen=True)
class Context:
    """Item counts and both players' private values for one game."""

    counts: Counts
    values_a: Counts
    values_b: Counts

    def __post_init__(self) -> None:
        for name in ("counts", "values_a", "values_b"):
            seq = getattr(self, name)
            if len(seq) != len(ITEMS) or not all(isinstance(x, int) and x >= 0 for x in seq):
                raise RuleError(f"{name} must be {len(ITEMS)} non-negative integers, got {seq!r}")
            object.__setattr__(self, name, tuple(seq))

    def values(self, player: str) -> Counts:
        return self.values_a if player == "A" else self.values_b

    def raw_score(self, player: str, kept: Counts) -> int:
        """Σ value·count of the items ``player`` keeps."""
        return sum(v * k for v, k in zip(self.values(player), kept, strict=True))

    @cached_property
    def allocations(self) -> tuple[Counts, ...]:
        """Every way to split the items, as the counts player A keeps."""
        return tuple(itertools.product(*(range(c + 1) for c in self.counts)))  # type: ignore[misc]

    def complement(self, kept: Counts) -> Counts:
        """What the partner keeps when one player keeps ``kept``."""
        return tuple(c - k for c, k in zip(self.counts, kept, strict=True))  # type: ignore[return-value]

    def in_range(self, kept: Counts) -> bool:
        return all(0 <= k <= c for k, c in zip(kept, self.counts, strict=True))

    def scores_for(self, kept_by_a: Counts) -> tuple[int, int]:
        """(X_A, X_B) when A keeps ``kept_by_a`` and B the rest."""
        return self.raw_score("A", kept_by_a), self.raw_score("B", self.complement(kept_by_a))

    @cached_property
    def max_welfare(self) -> int:
        """max X_A + X_B over all allocations: each item goes to whoever values it more."""
        return sum(c * max(va, vb) for c, va, vb in zip(self.counts, self.values_a, self.values_b, strict=True))

    @cached_property
    def _score_pairs(self) -> frozenset[tuple[int, int]]:
        return frozenset(self.scores_for(a) for a in self.allocations)

    def is_pareto_optimal(self, raw_a: int, raw_b: int) -> bool:
        """True iff no allocation gives both players at least these scores and one more."""
        return not any(xa >= raw_a and xb >= raw_b and (xa > raw_a or xb > raw_b) for xa, xb in self._score_pairs)

    @cached_property
    def nash_point(self) -> tuple[int, int]:
        """(X_A, X_B) of the Nash bargaining solution with no deal (0, 0) as the fallback: the
        allocation with the largest X_A·X_B (ties: the larger welfare, then the first in order)."""
        pairs = [self.scores_for(a) for a in self.allocations]
        return max(pairs, key=lambda p: (p[0] * p[1], p[0] + p[1]))

    @cached_property
    def competitiveness(self) -> float:
        """How opposed the two players' interests are: minus the correlation of X_A and X_B over
        all allocations. 1: every item is worth the same to both (what one gains the other
        loses); lower: more room for divisions good for both."""
        xa, xb = zip(*(self.scores_for(a) for a in self.allocations), strict=True)
        ma, mb = sum(xa) / len(xa), sum(xb) / len(xb)
        cov = sum((a - ma) * (b - mb) for a, b in zip(xa, xb, strict=True))
        var_a, var_b = sum((a - ma) ** 2 for a in xa), sum((b - mb) ** 2 for b in xb)
        return -cov / (var_a * var_b) ** 0.5 if var_a and var_b else 0.0

    def reward_ceiling(self, obj: Objective) -> float:
        """Mean reward per player under the best allocation: (1+λ)/2 · max welfare.

        For λ > −1 the best allocation maximises joint welfare; for λ = −1 every allocation has
        mean reward 0.
        """
        return (1.0 + obj.lam) / 2.0 * self.max_welfare

    def is_valid(self) -> bool:
        """The Lewis et al. constraints (``context_problems``)."""
        return not context_problems(self.counts, self.values_a, self.values_b)

    def to_dict(self) -> dict[str, list[int]]:
        return {"counts": list(self.counts), "values_a": list(self.values_a), "values_b": list(self.values_b)}

    @classmethod
    def from_dict(cls, data: dict[str, list[int]]) -> Context:
        return cls(tuple(data["counts"]), tuple(data["values_a"]), tuple(data["values_b"]))  # type: ignore[arg-type]


def context_problems(counts: Counts, values_a: Counts, values_b: Counts) -> list[str]:
    """Every context rule a (counts, values_a, values_b) triple breaks; empty if valid.

    Counts are 1..4 of each type with 5..7 items in all; each player's items are worth 10 in
    total; every type is worth something to someone; some type is worth something to both."""
    problems = []
    if not all(MIN_COUNT <= c <= MAX_COUNT for c in counts):
        problems.append(f"each count must be {MIN_COUNT}..{MAX_COUNT}")
    if not MIN_ITEMS <= sum(counts) <= MAX_ITEMS:
        problems.append(f"total items must be {MIN_ITEMS}..{MAX_ITEMS}, got {sum(counts)}")
    for who, vals in (("A", values_a), ("B", values_b)):
        total = sum(c * v for c, v in zip(counts, vals, strict=True))
        if total != TOTAL_VALUE:
            problems.append(f"player {who}'s items are worth {total} in total, not {TOTAL_VALUE}")
    if any(va == 0 and vb == 0 for va, vb in zip(values_a, values_b, strict=True)):
        problems.append("some item type is worth nothing to both players")
    if not any(va > 0 and vb > 0 for va, vb in zip(values_a, values_b, strict=True)):
        problems.append("no item type is valued by both players")
    return problems


def count_phrase(n: int, item: str) -> str:
    """(2, 'hat') → '2 hats'; (1, 'book') → '1 book'. The one plural rule of the item names."""
    return f"{n} {item}{'' if n == 1 else 's'}"


def describe_items(kept: Counts) -> str:
    """(1, 2, 0) → '1 book, 2 hats, 0 balls' — the canonical proposal body."""
    return ", ".join(count_phrase(k, item) for k, item in zip(kept, ITEMS, strict=True))
