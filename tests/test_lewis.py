"""Importing Lewis et al. (2017)-format dialogues; the data here is written by the test."""

import pytest

from parlay.evaluate import compute_metrics
from parlay.lewis import import_file, import_lines


def side(inp, partner, turns, output):
    dialogue = " ".join(f"{who}: {text} <eos>" for who, text in turns)
    return (
        f"<input> {inp} </input> <dialogue> {dialogue} </dialogue> <output> {output} </output> "
        f"<partner_input> {partner} </partner_input>"
    )


def swap(turns):
    return [("THEM" if who == "YOU" else "YOU", text) for who, text in turns]


# counts 1 book, 2 hats, 2 balls; YOU values (0,2,3), THEM values (2,2,2)
YOU_IN, THEM_IN = "1 0 2 2 2 3", "1 2 2 2 2 2"
DEAL = [("YOU", "i want the balls"), ("THEM", "ok i take the rest"), ("YOU", "deal"), ("THEM", "<selection>")]
NO_DEAL = [("THEM", "give me everything"), ("YOU", "no way"), ("THEM", "<selection>")]
DEAL_OUT = "item0=0 item1=0 item2=2 item0=1 item1=2 item2=0"
THEM_OUT = "item0=1 item1=2 item2=0 item0=0 item1=0 item2=2"
DISAGREE = " ".join(["<disagree>"] * 6)


def lines():
    return [
        side(YOU_IN, THEM_IN, DEAL, DEAL_OUT),
        side(YOU_IN, THEM_IN, NO_DEAL, DISAGREE),
        side(THEM_IN, YOU_IN, swap(DEAL), THEM_OUT),
        "this is not a dialogue",
        side(THEM_IN, YOU_IN, swap(NO_DEAL), " ".join(["<no_agreement>"] * 6)),
        side(YOU_IN, THEM_IN, [("YOU", "lonely"), ("THEM", "<selection>")], DEAL_OUT),
        side("1 0 2 2 2 9", THEM_IN, DEAL, DEAL_OUT),
        side(THEM_IN, "1 0 2 2 2 9", swap(DEAL), THEM_OUT),
    ]


def test_pairs_sides_and_replays_them():
    result = import_lines(lines())
    assert len(result.episodes) == 2
    deal, no_deal = result.episodes
    assert deal.outcome.status == "deal"
    assert deal.raw_scores == [6, 6] and deal.rewards == [6.0, 6.0]
    assert deal.first_speaker == "A"
    assert [t.message for t in deal.turns if t.kind == "message"] == ["i want the balls", "ok i take the rest", "deal"]
    assert deal.objective["name"] == "semi-competitive"
    assert no_deal.outcome.status == "no_deal" and no_deal.first_speaker == "B"
    assert deal.meta["lines"] == [1, 3]


def test_bad_and_unpaired_lines_are_reported():
    result = import_lines(lines())
    bad = dict(result.bad_lines)
    assert "missing <input>" in bad[4]
    assert "invalid context" in bad[7]
    assert result.unpaired == [6]


def test_metrics_of_an_imported_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines()) + "\n")
    result = import_file(path)
    m = compute_metrics(result.episodes)
    assert m["agreement_rate"] == 0.5
    assert m["mean_raw_score"] == 3.0  # (6 + 6) / 2 for the deal, 0 for the other
    assert m["pareto_rate"] == 0.5


# The selection halves read by their itemN index: (YOU keep, THEM keep) is the deal, whatever the order.
REORDERED_OUT = "item2=2 item0=0 item1=0 item1=2 item2=0 item0=1"  # YOU (0, 0, 2), THEM (1, 2, 0), shuffled
REORDERED_THEM = "item2=0 item0=1 item1=2 item1=0 item2=2 item0=0"  # the other side: (1, 2, 0), (0, 0, 2)


def test_an_output_is_read_by_item_index_not_position():
    ordered = import_lines([side(YOU_IN, THEM_IN, DEAL, DEAL_OUT), side(THEM_IN, YOU_IN, swap(DEAL), THEM_OUT)])
    shuffled = import_lines(
        [side(YOU_IN, THEM_IN, DEAL, REORDERED_OUT), side(THEM_IN, YOU_IN, swap(DEAL), REORDERED_THEM)]
    )
    assert not shuffled.bad_lines and len(shuffled.episodes) == 1
    (deal,) = shuffled.episodes
    # YOU (player A) keeps item0=0, item1=0, item2=2 and THEM (player B) item0=1, item1=2, item2=0
    assert deal.outcome.status == "deal" and deal.outcome.proposals == {"A": [0, 0, 2], "B": [1, 2, 0]}
    assert deal.raw_scores == [6, 6]  # A: 2 balls x 3; B: 1 book x 2 + 2 hats x 2
    assert deal.outcome == ordered.episodes[0].outcome


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("item0=0 item0=0 item2=2 item0=1 item1=2 item2=0", "item0 twice for YOU"),
        ("item0=0 item1=0 item2=2 item0=1 item1=2 item1=0", "item1 twice for THEM"),
        ("item0=0 item1=0 item3=2 item0=1 item1=2 item2=0", "out of range"),
        ("item0=0 item1=0 item2=2 item0=1 item1=2", "must hold 6 entries"),
        ("item0=0 item1=0 item2=2 item0=1 item1=2 item2=0 item0=0", "must hold 6 entries"),
        ("item0=0 item1=x item2=2 item0=1 item1=2 item2=0", "'item1=x'"),
        ("item0=0 item1=0 item2=-2 item0=1 item1=2 item2=0", "'item2=-2'"),
        ("item0=0 item1=0 item2=2 <disagree> <disagree> <disagree>", "'<disagree>'"),
        ("book=0 item1=0 item2=2 item0=1 item1=2 item2=0", "'book=0'"),
    ],
)
def test_a_malformed_output_is_a_reported_bad_line(output, reason):
    good_other_side = side(THEM_IN, YOU_IN, swap(DEAL), THEM_OUT)
    result = import_lines([side(YOU_IN, THEM_IN, DEAL, output), good_other_side])
    assert result.episodes == []
    bad = dict(result.bad_lines)
    assert list(bad) == [1] and reason in bad[1], bad
    assert result.unpaired == [2]  # its partner line is kept, unpaired, never paired with another deal
