"""Importing Lewis et al. (2017)-format dialogues; the data here is written by the test."""

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
