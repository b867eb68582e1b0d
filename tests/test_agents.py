"""Every bot pairing under every objective passes the invariant suite; bots behave as named."""

import itertools

import pytest

from parlay.agents import AgentError, language, load_agent
from parlay.agents.scripted import BOTS
from parlay.evaluate import compute_metrics
from parlay.games import all_contexts, objective
from parlay.protocol import Game, message_reply, message_text, parse_reply, proposal_reply
from parlay.rollout import plan_games, play_games, turn_request
from parlay.testing import check_agents, check_game

OBJECTIVES = ["cooperative", "semi-competitive", "competitive", "0.5"]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(BOTS, repeat=2)))
@pytest.mark.parametrize("obj", OBJECTIVES)
def test_every_bot_pairing_passes_the_invariants(a, b, obj):
    check_agents(load_agent(f"bot:{a}"), load_agent(f"bot:{b}"), objective(obj), n=12, seed=5)


@pytest.mark.parametrize("seed", range(40))
def test_game_core_under_random_replies(seed):
    ctx = all_contexts()[seed * 97 % len(all_contexts())]
    check_game(ctx, objective(OBJECTIVES[seed % 4]), seed, max_messages=1 + seed % 20)


def _metrics(a, b, n=150, obj="semi-competitive"):
    eps = play_games(load_agent(f"bot:{a}"), load_agent(f"bot:{b}"), plan_games(n, 11), objective(obj))
    return compute_metrics(eps)


def test_cooperative_bots_reach_the_welfare_maximum():
    m = _metrics("cooperative", "cooperative", obj="cooperative")
    assert m["agreement_rate"] > 0.95 and m["welfare_ratio"] > 0.97


def test_the_hard_bargainer_out_earns_the_conceder():
    eps = play_games(
        load_agent("bot:hard"), load_agent("bot:conceder"), plan_games(150, 11), objective("semi-competitive")
    )
    deals = [e for e in eps if e.agreed]
    assert len(deals) > 100
    hard = sum(e.raw_scores[0] for e in deals) / len(deals)
    soft = sum(e.raw_scores[1] for e in deals) / len(deals)
    assert hard > soft + 1


def test_the_conceder_concedes_over_time():
    eps = play_games(load_agent("bot:conceder"), load_agent("bot:hard"), plan_games(30, 2), objective(0))
    ctx = eps[0].game_context()
    asks = [language.read_offer(t.message, ctx.counts) for t in eps[0].turns if t.player == "A" and t.kind == "message"]
    scores = [ctx.raw_score("A", offer[0]) for offer in asks if offer]
    assert len(scores) >= 2 and scores[-1] < scores[0]


def test_random_bot_exercises_the_protocol():
    eps = play_games(load_agent("bot:random"), load_agent("bot:random"), plan_games(100, 1), objective(0))
    m = compute_metrics(eps)
    rejected = sum(not t.accepted for e in eps for t in e.turns)
    assert m["error_rate"] > 0.1 and m["error_rate"] == rejected / sum(len(e.turns) for e in eps)
    assert m["abort_rate"] == sum(e.outcome.status == "aborted" for e in eps) / len(eps)
    codes = {t.error for e in eps for t in e.turns if t.error}
    assert len(codes) >= 6


def test_bots_phrase_things_in_varied_ways():
    m = _metrics("conceder", "hard")
    assert m["vocabulary_size"] > 30 and m["ngram_entropy_3"] > 5


def test_bots_read_stated_values_and_offers():
    assert language.read_values("For me, books are worth 3, hats are worth 1 and balls are worth 2.") == {
        0: 3,
        1: 1,
        2: 2,
    }
    assert language.read_values("I get 4 points per hat") == {1: 4}
    counts = (2, 2, 1)
    assert language.read_offer("How about I take 2 books and 1 ball and you get 2 hats?", counts) == (
        (2, 0, 1),
        (0, 2, 0),
    )
    assert language.read_offer("I would like the books, you can have the rest", counts) == ((2, 0, 0), (0, 2, 1))
    assert language.read_offer("give me the ball", counts) == ((0, 0, 1), (2, 2, 0))
    assert language.read_offer("nice weather", counts) is None
    assert language.is_acceptance("Deal! I take the hats.")
    assert not language.is_acceptance("No deal, sorry.")


def test_the_split_last_stated_in_a_conversation_is_read_from_the_readers_side():
    """Of (2 books, 2 hats, 1 ball): the latest message that states a split decides, turned to the
    reader's side; talk without counts, proposals and the game's own lines are skipped."""
    from parlay.protocol import message_reply, proposal_reply

    counts = (2, 2, 1)
    convo = [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "The negotiation starts now."},
        {"role": "assistant", "content": message_reply("I would like the books, you can have the rest")},
        {"role": "user", "content": message_reply("no, give me the ball and one book")},
        {"role": "assistant", "content": message_reply("ok, deal")},
        {"role": "user", "content": proposal_reply((2, 2, 1))},
    ]
    # The partner's "give me the ball and one book": the partner keeps (1, 0, 1), so the reader keeps (1, 2, 0).
    assert language.last_stated_split(convo, counts) == (1, 2, 0)
    # The reader's own message counts from its side: it keeps the books.
    assert language.last_stated_split(convo[:3], counts) == (2, 0, 0)
    assert language.last_stated_split(convo[:2], counts) is None
    # Its own rejected attempt, which the partner never saw, is not read: the game's feedback follows it.
    from parlay import prompts
    from parlay.games import Context

    feedback = prompts.feedback("too_long", Context(counts, (1, 1, 1), (1, 1, 1)), 10)
    retry = [
        {"role": "assistant", "content": message_reply("I take everything")},
        {"role": "user", "content": feedback},
    ]
    assert language.last_stated_split(convo[:4] + retry, counts) == (1, 2, 0)


def test_unknown_agent_spec_is_a_clear_error():
    with pytest.raises(AgentError, match=r"unknown agent 'bot:nice'.*bot:hard"):
        load_agent("bot:nice")


@pytest.mark.parametrize("bot", ["conceder", "hard", "cooperative"])
def test_a_bot_does_not_hold_its_yes_to_a_worse_offer(bot):
    """The partner offers what the bot asks for and the bot agrees; then the partner says it keeps
    everything and proposes that. The bot's yes was to the first offer: it does not propose to
    keep nothing. When the partner only restates the offer, the bot proposes what it agreed to."""
    ctx = next(c for c in all_contexts() if all(v > 0 for v in c.values("B")))

    def offer(partner_keeps):
        return message_reply(
            f"I take {language.items_phrase(partner_keeps)} and you take "
            f"{language.items_phrase(ctx.complement(partner_keeps))}."
        )

    for asks_more in (True, False):
        game = Game(ctx, objective("cooperative"), first_speaker="A", max_messages=20)
        agent = load_agent(f"bot:{bot}")
        bot_gets, said = ctx.counts, ""
        while not language.is_acceptance(said):  # offer the bot what it last asked for until it agrees
            partner_keeps = ctx.complement(bot_gets)
            game.step(offer(partner_keeps))
            said = message_text(agent.act([turn_request(game, "g", game.n_messages)])[0].text)
            game.step(message_reply(said))
            bot_gets = (language.read_offer(said, ctx.counts) or (bot_gets,))[0]
            assert game.n_messages < 10, "the bot never agreed"
        agreed = ctx.complement(partner_keeps)
        now = ctx.counts if asks_more else partner_keeps
        game.step(offer(now))
        reply = agent.act([turn_request(game, "g", 98)])[0].text
        if not reply.startswith("[propose]"):  # it answers in words first; the partner proposes
            game.step(reply)
            game.step(proposal_reply(now))
            reply = agent.act([turn_request(game, "g", 99)])[0].text
        kept = parse_reply(reply).kept
        if asks_more:
            assert kept != (0, 0, 0), f"bot:{bot} gave everything away after agreeing to keep {agreed}"
        else:
            assert kept == agreed


def test_agent_specs_parse_once_and_render_for_records():
    """A spec's text parses to a typed value and renders back as written; two spellings of one
    agent are equal; a spec built in code renders with only the options set, defaults left out."""
    from parlay.specs import DEFAULT_BATCH, HFSpec, OpenAISpec, RunSpec, SpecError, model_spec, parse_spec

    written = "hf:m+batch=8+dtype=bf16"
    spec = parse_spec(written)
    assert spec == HFSpec("m", dtype="bf16", batch=8) == parse_spec("hf:m+dtype=bf16+batch=8")
    assert str(spec) == written and spec.render() == "hf:m+dtype=bf16+batch=8"
    assert parse_spec("openai:gpt-4o-mini@http://h:1/v1") == OpenAISpec("gpt-4o-mini", "http://h:1/v1")
    assert parse_spec("run:runs/x@2") == RunSpec("runs/x", 2) and parse_spec("run:runs/x@all").round == "all"
    assert str(model_spec("m", "a/model", "auto", DEFAULT_BATCH, "hf")) == "hf:m+adapter=a/model"
    assert str(model_spec("m", None, "bf16", 8, "hf")) == "hf:m+dtype=bf16+batch=8"
    assert str(model_spec("m", None, "bf16", 8, "vllm")) == "vllm:m+dtype=bf16"
    assert str(model_spec("openai:gpt@http://h", None, "auto", 64, "hf")) == "openai:gpt@http://h"
    assert str(model_spec("m", None, "auto", 64, "hf", select=True)) == "hf:m+select=1"
    assert parse_spec("hf:m+select=1") == HFSpec("m", select=True) and parse_spec("hf:m+select=0").select is False
    for backend, base in [("vllm", "m"), ("hf", "openai:gpt")]:
        with pytest.raises(SpecError, match="selection step"):
            model_spec(base, None, "auto", 64, backend, select=True)
    for text, message in [
        ("hf:m+select=yes", "expected 0 or 1"),
        ("hf:m+batch=0", "bad batch size"),
        ("hf:m+reuse=yes", "expected 0 or 1"),
        ("hf:m+colour=red", "unknown option"),
        ("run:x@last", "whole number"),
        ("robot:x", "unknown agent 'robot:x'"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec(text)
    with pytest.raises(SpecError, match="full weights"):
        model_spec("m", "a/model", "auto", 64, "vllm")
    assert load_agent(parse_spec("bot:hard")).spec == "bot:hard"
