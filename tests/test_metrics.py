"""Metric definitions on hand-built games."""

import math

import pytest

from parlay.episode import Episode
from parlay.evaluate import compute_metrics
from parlay.games import Context, objective
from parlay.protocol import Game

CTX = Context(counts=(1, 2, 2), values_a=(0, 2, 3), values_b=(2, 2, 2))


def played(replies, obj="semi-competitive", cap=20):
    g = Game(CTX, objective(obj), "A", cap)
    for r in replies:
        g.step(r)
    return Episode.from_game(g, f"g{len(replies)}")


def test_metrics_on_two_hand_worked_games():
    deal = played(
        [
            "[message] balls for me",
            "bad reply",
            "[message] ok",
            "[propose] (0 books, 0 hats, 2 balls)",
            "[propose] (1 book, 2 hats, 0 balls)",
        ]
    )
    greedy = played(["[message] mine", "[propose] (1 book, 2 hats, 2 balls)", "[propose] (1 book, 2 hats, 2 balls)"])
    m = compute_metrics([deal, greedy])
    assert m["games"] == 2
    assert m["agreement_rate"] == 0.5
    assert m["mean_reward"] == pytest.approx(3.0)  # (6+6)/2 and (0+0)/2, averaged
    assert m["mean_raw_score_agreed"] == 6.0
    assert m["reward_ceiling"] == 6.0 and m["raw_score_ceiling"] == 6.0
    assert m["pareto_rate"] == 0.5 and m["pareto_rate_agreed"] == 1.0
    assert m["welfare_ratio"] == pytest.approx((12 / 12 + 0) / 2)
    assert m["error_rate"] == pytest.approx(1 / 8)  # 1 rejected of 8 attempts
    assert m["messages_per_game"] == 1.5
    assert m["abort_rate"] == 0.0


def test_cooperative_rewards_and_aborts():
    deal = played(
        ["[message] x", "[propose] (0 books, 0 hats, 2 balls)", "[propose] (1 book, 2 hats, 0 balls)"],
        obj="cooperative",
    )
    aborted = played([""] * 5, obj="cooperative")
    m = compute_metrics([deal, aborted])
    # B proposes first here: B keeps the balls (4), A the book and hats (4); cooperative reward 8 each.
    assert m["mean_reward"] == pytest.approx(4.0)
    assert m["abort_rate"] == 0.5 and m["reward_ceiling"] == 12.0


def test_ngram_entropy_and_vocabulary_of_the_shipped_metrics():
    # Bigrams are counted within each message: "a b a b" gives ab, ba, ab; "a" gives none.
    m = compute_metrics([played(["[message] A b a B", "[message] a"], cap=2)])
    assert m["ngram_entropy_2"] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert m["vocabulary_size"] == 2
    assert compute_metrics([played(["[message] a"], cap=1)])["ngram_entropy_2"] == 0.0
