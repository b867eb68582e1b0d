"""Filters, weights, judge ratings and the OpenAI fine-tuning route: pure, offline, table-driven."""

import json
import math

import pytest
import torch

from parlay.config import FilterConfig, WeightConfig
from parlay.episode import PlayerEpisode
from parlay.improve import judge as judging
from parlay.improve.examples import TrainExample, select_examples
from parlay.improve.filters import baselines, select
from parlay.improve.openai_ft import FineTuneError, chat_record, copies, export, fine_tune
from parlay.improve.weights import awr_weights, iw_factor, normalise, static_weights


def pe(reward: float, agreed: bool = True, ctx: str = "c1", i: int = 0) -> PlayerEpisode:
    messages = [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "start"},
        {"role": "assistant", "content": f"[message] hi {i}"},
    ]
    return PlayerEpisode(f"g{i}", "A", messages, reward, int(reward), agreed, ctx)


ROUND = [pe(0, False, i=0), pe(4, i=1), pe(6, i=2), pe(10, i=3), pe(0, True, i=4)]  # mean 4


@pytest.mark.parametrize(
    ("settings", "kept"),
    [
        ({"rule": "above_mean"}, [2, 3]),  # strictly above 4
        ({"rule": "nonzero"}, [1, 2, 3]),
        ({"rule": "agreed"}, [1, 2, 3, 4]),
        ({"rule": "all"}, [0, 1, 2, 3, 4]),
        ({"rule": "threshold", "threshold": 6}, [2, 3]),
        ({"rule": "top_fraction", "fraction": 0.4}, [2, 3]),
        ({"rule": "top_fraction", "fraction": 0.5}, [1, 2, 3]),  # ceil(2.5) = 3
        ({"rule": "above_mean", "keep_valid_ties": True}, [2, 3, 4]),  # the agreed 0, not the no-deal 0
    ],
)
def test_filter_rules(settings, kept):
    assert select(ROUND, FilterConfig(**settings)).kept == kept


def test_per_context_baseline_compares_with_games_on_the_same_context():
    eps = [pe(2, ctx="a", i=0), pe(4, ctx="a", i=1), pe(8, ctx="b", i=2), pe(10, ctx="b", i=3)]
    assert baselines(eps, per_context=True) == [3, 3, 9, 9]
    assert select(eps, FilterConfig(baseline="context")).kept == [1, 3]
    assert select(eps, FilterConfig(baseline="round")).kept == [2, 3]  # round mean 6


def test_empty_selection_is_reported_and_follows_the_policy():
    flat = [pe(5, i=i) for i in range(4)]  # nobody is strictly above the mean
    skipped = select(flat, FilterConfig(on_empty="skip"))
    assert skipped.kept == [] and "skipped" in skipped.note
    fallback = select(flat, FilterConfig(on_empty="nonzero"))
    assert fallback.kept == [0, 1, 2, 3] and fallback.rule == "nonzero" and "fell back" in fallback.note
    assert select([], FilterConfig()).kept == []


def test_keeping_mostly_no_deal_sides_against_a_negative_mean_is_called_out():
    # A competitive round: two lost deals, one won, three sides without a deal (mean -1).
    lost = [pe(-4, i=0), pe(-3, i=1), pe(1, i=2), pe(0, False, i=3), pe(0, False, i=4), pe(0, False, i=5)]
    above = select(lost, FilterConfig(rule="above_mean"))
    assert above.kept == [2, 3, 4, 5] and "3 of the 4 kept sides ended without a deal" in above.note
    won = select(lost, FilterConfig(rule="nonzero"))
    assert won.kept == [2] and won.note == ""
    assert select(ROUND, FilterConfig(rule="above_mean")).note == ""  # a positive mean: nothing to say


JUDGE = "openai:judge@http://127.0.0.1:9"  # a judge spec; never called: the ratings are given


def test_one_path_from_games_to_examples():
    """Rule, then sides with turns of their own, then the judge gate, then weights; zero weights dropped."""
    from parlay.agents import load_agent
    from parlay.episode import Episode, all_player_episodes
    from parlay.games import objective
    from parlay.protocol import Game
    from parlay.rollout import plan_games, play_games

    episodes = play_games(load_agent("bot:hard"), load_agent("bot:conceder"), plan_games(10, 3), objective(1), 8)
    aborted = Game(episodes[0].game_context(), objective(1))
    for _ in range(5):
        aborted.step("no tag")  # five rejections: neither side ever had a turn accepted
    episodes.append(Episode.from_game(aborted, "aborted"))
    sides = all_player_episodes(episodes)
    silent = [i for i, s in enumerate(sides) if not any(m["role"] == "assistant" for m in s.messages)]
    assert len(silent) == 2
    everything = select_examples(episodes, FilterConfig(rule="all"), WeightConfig())
    assert everything.info.passed_filter == len(sides) and everything.info.kept == len(sides) - len(silent)
    assert [(e.episode_id, e.player) for e in everything.examples] == [
        (s.episode_id, s.player) for i, s in enumerate(sides) if i not in silent
    ]
    # A judge gate at 5 of ratings 0, 3, 6, 9, …: only the sides rated 6 and 9 pass.
    ratings = [float((3 * i) % 12) for i in range(len(sides))]
    judged = WeightConfig(scheme="judge", judge={"agent": JUDGE, "mode": "filter", "min_rating": 5})
    gated = select_examples(episodes, FilterConfig(rule="all"), judged, ratings)
    assert {e.rating for e in gated.examples} <= {6.0, 9.0} and gated.info.judge["rated"] == len(sides)
    # Judge weights: a rating of 0 weighs 0, and such examples are not written at all.
    weighted = select_examples(
        episodes, FilterConfig(rule="all"), WeightConfig(scheme="judge", judge={"agent": JUDGE}), ratings
    )
    assert all(e.weight > 0 for e in weighted.examples) and all(e.rating != 0 for e in weighted.examples)
    with pytest.raises(ValueError, match="rating of every player-episode"):
        select_examples(episodes, FilterConfig(), judged)


def test_awr_weights_follow_the_formula_and_are_clipped():
    assert awr_weights([5, 3, 20], [4, 4, 4], beta=2.0, w_max=5.0) == pytest.approx(
        [math.exp(0.5), math.exp(-0.5), 5.0]
    )
    w = static_weights(WeightConfig(scheme="awr", beta=2.0), [5, 3, 20], [4, 4, 4])
    assert sum(w) == pytest.approx(3) and w[0] > w[1]


def test_static_weights_per_scheme():
    assert static_weights(WeightConfig(), [1, 2], [0, 0]) == [1.0, 1.0]
    assert static_weights(WeightConfig(scheme="iw_sft"), [1, 2], [0, 0]) == [1.0, 1.0]
    judged = static_weights(WeightConfig(scheme="judge"), [1, 2, 3], [0, 0, 0], [2, 6, None])
    assert judged == pytest.approx([0.75, 2.25, 0.0])  # 0.2 : 0.6 : 0, scaled to mean 1
    with pytest.raises(ValueError, match="ratings"):
        static_weights(WeightConfig(scheme="judge"), [1], [0])
    assert normalise([0, 0]) == [0.0, 0.0]


def test_iw_factor_is_the_clipped_exponentiated_mean_log_ratio_and_carries_no_gradient():
    logp = torch.tensor([-1.0, -2.0, 0.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -5.0])
    f = iw_factor(logp, ref, temperature=2.0, w_max=3.0)
    assert f.tolist() == pytest.approx([math.exp(1.0), math.exp(-2.0), 3.0])
    assert not f.requires_grad


@pytest.mark.parametrize(
    ("text", "rating"),
    [("7", 7), ("Rating: 10/10, flawless", 10), ("I'd say 3.5 because", 3), ("no idea", None), ("42", None)],
)
def test_parse_rating(text, rating):
    assert judging.parse_rating(text) == rating


def test_judge_rates_through_any_agent_and_reports_correlation():
    from parlay.agents import AgentError, ModelAgent, Reply, load_agent

    class RewardReader(ModelAgent):
        """A judge that reads the player's reward from a marker we plant in the dialogue."""

        spec = "test:judge"

        def complete(self, prompts):
            return [Reply(f"Rating {p.messages[1]['content'].count('good')}") for p in prompts]

    items = []
    for i in range(4):
        p = pe(i * 2, i=i)
        p.messages[-1]["content"] += " good" * i
        items.append(p)
    ratings = judging.rate(RewardReader(), items)
    assert ratings == [0, 1, 2, 3]
    with pytest.raises(AgentError, match="cannot answer free-form prompts"):
        judging.rate(load_agent("bot:hard"), items)
    corr = judging.correlation(ratings, [p.reward for p in items])
    assert corr["pearson"] == pytest.approx(1.0) and corr["spearman"] == pytest.approx(1.0)
    assert judging.correlation([None, 1, None], [1, 2, 3]) == {
        "rated": 1,
        "unreadable": 2,
        "pearson": None,
        "spearman": None,
    }


def test_openai_export_weights_assistant_turns_and_repeats_weighted_examples(tmp_path):
    ex = TrainExample(messages=pe(3).messages, weight=2.0)
    record = chat_record(ex)
    assert [m.get("weight") for m in record["messages"]] == [None, None, 1]
    assert copies([2.0, 0.0, 1.0]) == [2, 0, 1]
    many = copies([0.5] * 4000, seed=1)
    assert 0.45 < sum(many) / 4000 < 0.55
    n = export([ex, TrainExample(messages=pe(1).messages, weight=1.0)], tmp_path / "ft.jsonl")
    lines = (tmp_path / "ft.jsonl").read_text().splitlines()
    assert n == len(lines) == 3
    assert all(json.loads(line)["messages"][0]["role"] == "system" for line in lines)


def test_fine_tune_job_against_a_loopback_server(tmp_path):
    from openai import OpenAI

    from tests.openai_server import start_chat_server

    server, url = start_chat_server()
    try:
        export([TrainExample(messages=pe(3).messages)], tmp_path / "ft.jsonl")
        client = OpenAI(base_url=url, api_key="test", max_retries=0)
        seen = []
        model = fine_tune(tmp_path / "ft.jsonl", "base-model", client=client, poll_seconds=0.01, on_status=seen.append)
        assert model == "ft:base-model:parlay:1"
        assert seen[0] == "validating_files" and seen[-1] == "succeeded"
        assert server.uploads and b'"weight": 1' in server.uploads[0]
        with pytest.raises(FineTuneError, match="failed: bad file"):
            fine_tune(tmp_path / "ft.jsonl", "fail-model", client=client, poll_seconds=0.01)
    finally:
        server.shutdown()


def test_examples_carry_the_samplers_logprobs_of_the_turns_they_learn_from():
    """Each assistant message gets the log-probs of the accepted turn it came from, in order; a
    turn the game rewrote (canonical form), one that followed a rejected attempt (its prompt held
    that attempt) and one without log-probs get None; games with none carry None."""
    from parlay.agents import load_agent
    from parlay.episode import Episode
    from parlay.games import all_contexts, objective
    from parlay.protocol import Game, proposal_reply
    from parlay.rollout import plan_games, play_games

    game = Game(all_contexts()[0], objective(1), first_speaker="A")  # counts (1, 1, 3)
    game.step("[message] I want the books.", logprobs=[-0.1, -0.2, -0.3])  # A: as sampled
    game.step("no tag", logprobs=[-1.0])  # B: rejected
    game.step("[message] you take the hats", logprobs=[-0.5, -0.6])  # B: after a rejected attempt
    game.step("[message]  fine,  deal?", logprobs=[-0.7])  # A: rewritten to "[message] fine, deal?"
    game.step("[message] ok")  # B: no log-probs reported
    game.step(proposal_reply((1, 0, 0)), logprobs=[-0.01])  # A
    game.step(" " + proposal_reply((0, 1, 3)) + "\n", logprobs=[-0.02, -0.03])  # B: the same once stripped
    assert game.outcome.status == "deal"
    selected = select_examples([Episode.from_game(game, "g")], FilterConfig(rule="all"), WeightConfig())
    a, b = selected.examples
    assert (a.player, b.player) == ("A", "B")
    assert a.sampled_logprobs == [[-0.1, -0.2, -0.3], None, [-0.01]]
    assert b.sampled_logprobs == [None, None, [-0.02, -0.03]]
    for ex in (a, b):  # aligned with the assistant messages, in order
        assert len(ex.sampled_logprobs) == sum(m["role"] == "assistant" for m in ex.messages)
    bot = load_agent("bot:cooperative")
    bots = select_examples(
        play_games(bot, bot, plan_games(2, 0), objective(1), 6), FilterConfig(rule="all"), WeightConfig()
    )
    assert bots.examples and all(ex.sampled_logprobs is None for ex in bots.examples)
