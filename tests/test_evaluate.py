"""Evaluation: bootstrap intervals, the consistency rules and judge, cross-play tournaments, and
``parlay eval`` on files and agents."""

import csv
import json

import numpy as np
import pytest

from parlay.agents import Reply, Sampling, load_agent
from parlay.agents.base import Agent, ModelAgent
from parlay.episode import read_episodes
from parlay.evaluate import METRICS, compute_metrics, metric_intervals
from parlay.evaluate.consistency import judge_summary, messages_of, parse_verdict, violations
from parlay.evaluate.metrics import GameTable, resample_weights
from parlay.evaluate.tournament import TournamentError, pair_file, run_tournament
from parlay.games import Context, objective
from parlay.rollout import plan_games, play_games
from tests.openai_server import start_chat_server
from tests.test_cli import run


def bot_games(a="bot:hard", b="bot:conceder", n=24, seed=3, obj="semi-competitive"):
    return play_games(load_agent(a), load_agent(b), plan_games(n, seed), objective(obj), 10)


# --------------------------------------------------------------------------- intervals


def test_weighted_metrics_equal_metrics_of_the_resampled_games():
    """A bootstrap resample as weights gives exactly the metrics of the games drawn, duplicates included."""
    episodes = bot_games("bot:random", "bot:conceder", n=12) + bot_games("bot:hard", "bot:hard", n=6, seed=9)
    table = GameTable(episodes)
    w = resample_weights(len(episodes), seed=5, resamples=3)
    for row in w:
        drawn = [ep for ep, times in zip(episodes, row, strict=True) for _ in range(int(times))]
        expected = compute_metrics(drawn)
        for name, stat in METRICS.items():
            assert stat(table, row[None, :])[0] == pytest.approx(expected[name], abs=1e-9), name


def test_intervals_hold_the_point_estimate_and_shrink_with_more_games():
    few, many = bot_games("bot:random", "bot:conceder", n=16), bot_games("bot:random", "bot:conceder", n=160)
    for episodes in (few, many):
        point, ci = compute_metrics(episodes), metric_intervals(episodes, seed=1)
        assert set(ci) == set(METRICS) - {"games"}
        for name, (low, high) in ci.items():
            assert low <= point[name] + 1e-9 and point[name] <= high + 1e-9, name
    width = {len(e): np.diff(metric_intervals(e, seed=1)["mean_reward"])[0] for e in (few, many)}
    assert width[160] < width[16]
    assert metric_intervals([]) == {} and compute_metrics([])["games"] == 0


# --------------------------------------------------------------------------- consistency

CTX = Context(counts=(1, 3, 1), values_a=(4, 0, 6), values_b=(7, 1, 0))


@pytest.mark.parametrize(
    "message, speaker, broken",
    [
        ("I'd like 3 hats; you can have 1 book and 1 ball.", "A", []),
        ("I want 4 hats.", "A", ["count_exceeds"]),
        ("I'd like two balls please", "B", ["count_exceeds"]),
        ("My offer: I get 1 book and 1 hat, you get 1 book and 3 hats.", "A", ["split_exceeds"]),
        ("What if you take nothing and I keep 1 book and 3 hats?", "B", []),
        ("Deal. I take 1 book and you take 3 hats and 1 ball.", "A", []),
        ("You get 2 hats, I get 2 hats.", "A", ["split_exceeds"]),
        ("The ball is worth 6 to me.", "A", []),
        ("the ball is worth 2 points to me", "A", ["value_misstated"]),
        ("I value hats at 1", "B", []),
        ("I value the hats at 2", "B", ["value_misstated"]),
        ("My hats are worth 3", "B", []),  # in total: 3 hats at 1
        ("Books are worthless to me.", "A", ["value_misstated"]),
        ("Hats are worthless to me.", "A", []),
        ("Hats are worth 1 to you, I think.", "A", []),  # a claim about the partner is not checked
    ],
)
def test_consistency_rules(message, speaker, broken):
    assert violations(message, CTX, speaker) == broken


class ScriptedJudge(ModelAgent):
    """Says yes when a message mentions four of something, else no; one reply unreadable."""

    spec = "judge:scripted"

    def complete(self, prompts):
        replies = []
        for r in prompts:
            text = r.messages[-1]["content"]
            verdict = "Yes, there are not that many." if " 4 " in text else "No."
            replies.append(Reply("maybe" if "two balls" in text else verdict))
        return replies


def test_judge_verdicts_and_their_agreement_with_the_rules():
    assert parse_verdict("Yes - it claims 4 hats") is True and parse_verdict("no.") is False
    assert parse_verdict("I cannot tell") is None
    episodes = bot_games(n=8)
    summary = judge_summary(ScriptedJudge(), episodes, limit=10)
    assert summary["messages"] == 10 and summary["judge"] == "judge:scripted"
    assert 0 <= summary["inconsistency_rate"] <= 1 and 0 <= summary["agreement_with_rules"] <= 1


# --------------------------------------------------------------------------- tournaments


class Counting(Agent):
    def __init__(self, inner):
        self.inner, self.spec, self.requests = inner, inner.spec, 0

    def act(self, requests):
        self.requests += len(requests)
        return self.inner.act(requests)


def test_tournament_plays_every_ordered_pair_on_the_same_games(tmp_path):
    agents = [load_agent(s) for s in ("bot:hard", "bot:conceder", "bot:cooperative")]
    obj = objective("cooperative")
    result = run_tournament(agents, obj, 6, 2, tmp_path, 10, Sampling(), resamples=200)
    assert len(result["pairs"]) == 9
    contexts = set()
    for p in result["pairs"]:
        episodes = [json.loads(x) for x in (tmp_path / p["episodes"]).read_text().splitlines()]
        assert [e["meta"]["agents"] for e in episodes[:1]] == [{"A": p["a"], "B": p["b"]}]
        contexts.add(tuple(sorted(json.dumps(e["context"], sort_keys=True) + e["id"] for e in episodes)))
        assert p["metrics"]["games"] == 6
        low, high = p["ci95"]["mean_reward"]
        assert low <= p["metrics"]["mean_reward"] <= high
    assert len(contexts) == 1  # every pair played the very same games
    matrix = result["matrix"]
    by = {(p["a"], p["b"]): p["metrics"] for p in result["pairs"]}
    expected = (
        by[("bot:hard", "bot:conceder")]["mean_reward_a"] + by[("bot:conceder", "bot:hard")]["mean_reward_b"]
    ) / 2
    assert matrix["reward"][0][1] == pytest.approx(expected)
    changes = {(c["agent"], c["partner"]): c for c in result["vs_first"]}
    assert len(changes) == 2 * 3  # agents 1 and 2, each against all three partners
    files = {(p["a"], p["b"]): tmp_path / p["episodes"] for p in result["pairs"]}

    def own(agent, partner):  # agent's reward per game against partner, both seats averaged
        as_a = {e["id"]: e["rewards"][0] for e in map(json.loads, files[(agent, partner)].read_text().splitlines())}
        as_b = {e["id"]: e["rewards"][1] for e in map(json.loads, files[(partner, agent)].read_text().splitlines())}
        return {g: (as_a[g] + as_b[g]) / 2 for g in as_a}

    conceder, hard = own("bot:conceder", "bot:cooperative"), own("bot:hard", "bot:cooperative")
    diffs = [conceder[g] - hard[g] for g in conceder]

    change = changes[("bot:conceder", "bot:cooperative")]
    assert change["mean"] == pytest.approx(sum(diffs) / len(diffs)) and change["games"] == 6
    assert changes[("bot:conceder", "itself")]["first"] == "bot:hard"
    rows = list(csv.DictReader((tmp_path / "tournament.csv").open()))
    assert len(rows) == 9 and {"a", "b", "mean_reward", "mean_reward_low", "mean_reward_high"} <= rows[0].keys()
    saved = json.loads((tmp_path / "tournament.json").read_text())
    assert saved["agents"] == [a.spec for a in agents]
    assert sorted(r["agent"] for r in saved["ratings"]) == sorted(saved["agents"])


def test_ratings_follow_paired_wins_and_carry_intervals():
    """Bradley–Terry on paired comparisons: by hand on a small case, then on a real tournament."""
    from parlay.evaluate.ratings import fit_bradley_terry, ratings

    # x beats y 3 times in 4, y beats z 3 times in 4: x > y > z, y in the middle, mean 0.
    wins = np.array([[0, 3, 4], [1, 0, 3], [0, 1, 0]], dtype=float)
    s = fit_bradley_terry(wins)
    assert s[0] > s[1] > s[2] and s.mean() == pytest.approx(0, abs=1e-9)
    # The fit is a fixed point of the likelihood: expected wins equal observed wins (with the prior).
    w = wins + 0.5 * (1 - np.eye(3))
    p = np.exp(s)[:, None] / (np.exp(s)[:, None] + np.exp(s)[None, :])
    assert ((w + w.T) * p).sum(axis=1) - np.diag((w + w.T) * p) == pytest.approx(w.sum(axis=1), rel=1e-6)

    agents = [load_agent(s) for s in ("bot:random", "bot:conceder", "bot:cooperative")]
    specs = [a.spec for a in agents]
    played = {
        (i, j): play_games(a, b, plan_games(16, 4), objective("cooperative"), 10)
        for i, a in enumerate(agents)
        for j, b in enumerate(agents)
    }
    rated = ratings(specs, played, seed=0, resamples=100)
    assert [r["agent"] for r in rated][-1] == "bot:random"  # rarely closes a deal: the worst partner
    for r in rated:
        low, high = r["ci95"]
        assert low <= r["rating"] <= high and high - low > 0
    assert sum(r["rating"] for r in rated) == pytest.approx(0, abs=1e-6)


def test_an_interrupted_tournament_plays_only_what_is_missing(tmp_path):
    specs = ("bot:hard", "bot:conceder")
    obj = objective("semi-competitive")
    first = run_tournament([load_agent(s) for s in specs], obj, 5, 0, tmp_path, 10, Sampling(), resamples=50)
    path = pair_file(tmp_path, 1, 0)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:25])  # two games lost, one of them torn mid-line
    agents = [Counting(load_agent(s)) for s in specs]
    again = run_tournament(agents, obj, 5, 0, tmp_path, 10, Sampling(), resamples=50)
    assert again["pairs"] == first["pairs"]
    assert agents[0].requests > 0 and agents[0].requests < 15  # only the 2 missing games of one pair
    with pytest.raises(TournamentError, match="differs in games"):
        run_tournament([load_agent(s) for s in specs], obj, 7, 0, tmp_path, 10, Sampling())
    with pytest.raises(TournamentError, match="listed twice"):
        run_tournament([load_agent("bot:hard"), load_agent("bot:hard")], obj, 2, 0, tmp_path / "x", 10, Sampling())


# --------------------------------------------------------------------------- the command


def test_eval_agents_writes_tables_csv_and_json(tmp_path):
    out = tmp_path / "t"
    r = run("eval", "--agents", "bot:hard,bot:cooperative", "-n", "4", "--out", str(out), "--objective", "cooperative")
    assert r.returncode == 0, r.stderr
    assert "cross-play" in r.stdout and "bot:cooperative" in r.stdout and "row agent" in r.stdout
    assert "[" in r.stdout  # intervals
    assert (out / "tournament.csv").exists() and len(list((out / "pairs").glob("*.jsonl"))) == 4
    r = run("eval", "--agents", "bot:hard,hf:/no/such/model", "-n", "2", "--out", str(tmp_path / "u"))
    assert r.returncode == 2 and "hf:/no/such/model" in r.stderr and "Traceback" not in r.stderr
    r = run("eval", "--agents", "bot:hard,run:" + str(tmp_path / "nowhere"), "--out", str(tmp_path / "v"))
    assert r.returncode == 2 and "nowhere: no run here (config.yaml is missing)" in r.stderr
    r = run("eval", str(out / "pairs" / "0-1.jsonl"), "--agents", "bot:hard")
    assert r.returncode == 2 and "either" in r.stderr


def test_eval_with_a_judge_behind_an_openai_compatible_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    eps = tmp_path / "eps.jsonl"
    assert run("play", "--a", "bot:random", "--b", "bot:hard", "-n", "8", "-o", str(eps)).returncode == 0
    server, url = start_chat_server()
    try:
        r = run("eval", str(eps), "--judge", f"openai:checker@{url}", "--judge-limit", "12", "--json")
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    judged = json.loads(r.stdout)["judge_consistency"]
    assert judged["messages"] == 12 and judged["unreadable"] == 0
    checked = messages_of(read_episodes(eps))[:12]
    flagged = sum(any(d in m.text for d in "56789") for m in checked)  # the server's rule of thumb
    assert judged["judge"] == f"openai:checker@{url}" and judged["inconsistency_rate"] == flagged / 12


def test_eval_files_prints_intervals_and_rejects_bad_files(tmp_path):
    eps = tmp_path / "eps.jsonl"
    assert run("play", "-n", "12", "-o", str(eps)).returncode == 0
    r = run("eval", str(eps))
    assert r.returncode == 0 and "95% CI" in r.stdout and "inconsistent messages" in r.stdout
    result = json.loads(run("eval", str(eps), "--json").stdout)
    assert result["games"] == 12 and len(result["ci95"]["mean_reward"]) == 2
    empty, corrupt = tmp_path / "empty.jsonl", tmp_path / "corrupt.jsonl"
    empty.write_text("")
    corrupt.write_text(eps.read_text().splitlines()[0] + "\n{not json\n" + eps.read_text().splitlines()[1] + "\n")
    r = run("eval", str(eps), str(empty))
    assert r.returncode == 2 and "empty.jsonl: no episodes" in r.stderr
    r = run("eval", str(corrupt))
    assert r.returncode == 2 and "corrupt.jsonl:2" in r.stderr


def test_division_metrics_separate_reaching_a_deal_from_dividing_well():
    """ceiling share, distance to the Nash point and the contexts' competitiveness, by hand."""
    from parlay.episode import Episode
    from parlay.protocol import Game, message_reply, proposal_reply

    def scripted_episode(ctx, obj, proposals):
        game = Game(ctx, objective(obj), "A", 6)
        game.step(message_reply("hello"))
        game.step(message_reply("hello to you"))
        for kept in proposals:
            game.step(proposal_reply(kept))
        return Episode.from_game(game, f"g{len(proposals)}{proposals}")

    ctx = Context((1, 2, 3), (4, 3, 0), (0, 2, 2))  # Nash point (10, 6): A keeps (1, 2, 0)
    nash = scripted_episode(ctx, "cooperative", [(1, 2, 0), (0, 0, 3)])
    worse = scripted_episode(ctx, "cooperative", [(1, 0, 0), (0, 2, 3)])  # (4, 10): a deal, not the best
    none = scripted_episode(ctx, "cooperative", [(1, 2, 3), (1, 2, 3)])  # proposals that do not fit
    m = compute_metrics([nash, worse, none])
    ceiling = ctx.reward_ceiling(objective("cooperative"))  # 16: A the book and hats, B the balls
    assert m["ceiling_share"] == pytest.approx((16 / ceiling + 14 / ceiling + 0) / 3)
    d_worse = ((4 - 10) ** 2 + (10 - 6) ** 2) ** 0.5 / 10
    d_none = (10**2 + 6**2) ** 0.5 / 10
    assert m["nash_distance"] == pytest.approx((0 + d_worse + d_none) / 3)
    assert m["nash_distance_agreed"] == pytest.approx(d_worse / 2)
    assert m["competitiveness"] == pytest.approx(ctx.competitiveness)
