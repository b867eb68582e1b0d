"""Rules on hand-worked contexts, the context space, objectives and context files."""

import numpy as np
import pytest

from parlay.games import Context, ContextFileError, RuleError, all_contexts, objective, read_selfplay_file
from parlay.games.contexts import parse_selfplay_lines, sample_contexts
from parlay.games.dond import context_problems

# counts (1 book, 2 hats, 2 balls); A values hats and balls, B values everything.
CTX = Context(counts=(1, 2, 2), values_a=(0, 2, 3), values_b=(2, 2, 2))


def test_raw_scores_follow_the_split():
    assert CTX.scores_for((0, 0, 2)) == (6, 6)  # A: 2 balls·3; B: 1 book·2 + 2 hats·2
    assert CTX.scores_for((1, 2, 2)) == (10, 0)
    assert CTX.scores_for((0, 0, 0)) == (0, 10)


def test_max_welfare_gives_each_item_to_whoever_values_it_more():
    # book → B (2), hats tie (2 each → 4), balls → A (3 each → 6): 2 + 4 + 6
    assert CTX.max_welfare == 12
    assert max(sum(CTX.scores_for(k)) for k in CTX.allocations) == 12


@pytest.mark.parametrize(
    ("raw", "optimal"),
    [((6, 6), True), ((10, 2), True), ((0, 10), True), ((10, 0), False), ((6, 4), False), ((0, 0), False)],
)
def test_pareto_check_on_hand_worked_scores(raw, optimal):
    # (6,4): A keeps 2 balls, B gets the book but only 1 hat… someone can do better: (6,6).
    assert CTX.is_pareto_optimal(*raw) is optimal


def test_ceiling_per_objective():
    assert CTX.reward_ceiling(objective("cooperative")) == 12
    assert CTX.reward_ceiling(objective("semi-competitive")) == 6
    assert CTX.reward_ceiling(objective("competitive")) == 0
    assert CTX.reward_ceiling(objective(0.5)) == 9


@pytest.mark.parametrize(("name", "lam"), [("cooperative", 1.0), ("semi-competitive", 0.0), ("competitive", -1.0)])
def test_presets_equal_their_formula(name, lam):
    obj = objective(name)
    assert obj.lam == lam and obj.name == name
    for xa, xb in [(0, 0), (6, 4), (10, 3), (2, 9)]:
        assert obj.rewards(xa, xb) == (xa + lam * xb, xb + lam * xa)


def test_intermediate_lambda_is_named_and_bounded():
    obj = objective("0.25")
    assert obj.name == "lambda=0.25" and obj.preset is None
    assert obj.rewards(4, 8) == (6.0, 9.0)
    assert objective("lambda=-0.5").reward_bounds() == (-5.0, 10.0)
    assert objective("Semi_Competitive").lam == 0.0


@pytest.mark.parametrize("bad", ["nice", "1.5", "-2", "nan", "inf"])
def test_bad_objectives_are_rejected_with_the_expected_values(bad):
    with pytest.raises(RuleError, match=r"objective|\[-1, 1\]"):
        objective(bad)


def test_every_enumerated_context_is_valid_and_unique():
    pool = all_contexts()
    assert len(pool) == len(set(pool)) > 1000
    for ctx in pool:
        assert ctx.is_valid()
        assert 5 <= sum(ctx.counts) <= 7
        assert ctx.raw_score("A", ctx.counts) == ctx.raw_score("B", ctx.counts) == 10


def test_enumeration_is_complete_on_one_count_vector():
    # Brute force over all value vectors for counts (1, 2, 2).
    expected = set()
    vals = [v for v in np.ndindex(11, 6, 6) if v[0] * 1 + v[1] * 2 + v[2] * 2 == 10]
    for va in vals:
        for vb in vals:
            if not context_problems((1, 2, 2), va, vb):
                expected.add(((1, 2, 2), tuple(va), tuple(vb)))
    got = {(c.counts, c.values_a, c.values_b) for c in all_contexts() if c.counts == (1, 2, 2)}
    assert got == expected


def test_context_problems_name_each_broken_rule():
    assert context_problems((1, 1, 1), (2, 3, 5), (5, 3, 2)) == ["total items must be 5..7, got 3"]
    problems = context_problems((1, 2, 2), (10, 0, 0), (0, 5, 0))
    assert "some item type is worth nothing to both players" in problems
    assert "no item type is valued by both players" in problems


def test_sampling_is_seeded_and_uniform_enough():
    assert sample_contexts(50, 7) == sample_contexts(50, 7)
    assert sample_contexts(50, 7) != sample_contexts(50, 8)
    draws = sample_contexts(20000, np.random.default_rng(0))
    counts_share = np.mean([c.counts == (1, 2, 2) for c in draws])
    expected = sum(c.counts == (1, 2, 2) for c in all_contexts()) / len(all_contexts())
    assert abs(counts_share - expected) < 0.01


def test_selfplay_file_round_trip(tmp_path):
    path = tmp_path / "selfplay.txt"
    path.write_text("1 0 2 2 2 3\n1 2 2 2 2 2\n\n4 1 1 3 1 3\n4 2 1 2 1 0\n")
    assert read_selfplay_file(path) == [
        CTX,
        Context((4, 1, 1), (1, 3, 3), (2, 2, 0)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 0 2 2 2 3\n", r"selfplay.txt:1: odd number"),
        ("1 0 2 2 2\n1 2 2 2 2 2\n", r"selfplay.txt:1: expected 6 non-negative integers"),
        ("1 0 2 2 2 3\n1 2 2 2 3 2\n", r"selfplay.txt:2: item counts"),
        ("1 0 2 2 2 4\n1 2 2 2 2 2\n", r"selfplay.txt:1-2: invalid context: player A's items are worth 12"),
    ],
)
def test_malformed_context_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "selfplay.txt"
    path.write_text(text)
    with pytest.raises(ContextFileError, match=message):
        read_selfplay_file(path)


def test_missing_and_empty_context_files(tmp_path):
    with pytest.raises(ContextFileError, match="cannot read"):
        read_selfplay_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ContextFileError, match="no contexts"):
        read_selfplay_file(tmp_path / "empty.txt")
    assert parse_selfplay_lines([]) == []


def test_nash_point_and_competitiveness_of_a_context():
    same = Context((1, 2, 3), (1, 3, 1), (1, 3, 1))  # identical values: what one gains the other loses
    assert same.competitiveness == pytest.approx(1.0)
    apart = Context((1, 2, 3), (4, 3, 0), (0, 2, 2))  # B wants what A does not: room for both
    assert apart.competitiveness < 0.5
    # The Nash point maximises the product of the two scores.
    xa, xb = apart.nash_point
    assert xa * xb == max(apart.scores_for(a)[0] * apart.scores_for(a)[1] for a in apart.allocations)
    assert (xa, xb) == (10, 6)  # A keeps the book and both hats, B the three balls
