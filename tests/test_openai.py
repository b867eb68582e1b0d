"""The OpenAI-compatible backend against a real loopback server, with injected faults."""

import pytest

from parlay.agents import AgentError, load_agent
from parlay.agents.openai_compat import OpenAIAgent
from parlay.games import objective
from parlay.rollout import plan_games, play_games
from tests.openai_server import start_chat_server, start_fault_proxy


@pytest.fixture
def server():
    srv, url = start_chat_server()
    yield url
    srv.shutdown()


def test_games_against_an_endpoint(server):
    agent = load_agent(f"openai:tiny@{server}")
    eps = play_games(agent, agent, plan_games(6, 0), objective("cooperative"))
    assert all(e.outcome.status in ("deal", "invalid_deal") for e in eps)
    assert all(t.tokens for e in eps for t in e.turns)
    deal = [e for e in eps if e.outcome.status == "deal"]
    assert not deal  # both keep nothing: the proposals do not divide the items


def test_faults_are_retried_and_games_complete(server):
    faults = ["429", "500", "drop", "delay", "ok", "500", "429", "delay"] * 3
    proxy, url, seen = start_fault_proxy(server, faults)
    try:
        agent = OpenAIAgent("tiny", url, max_retries=3, timeout=5, concurrency=1)
        eps = play_games(agent, agent, plan_games(5, 1), objective(0))
    finally:
        proxy.shutdown()
    assert seen["faults"] >= 10
    assert [e.outcome.reason for e in eps if e.outcome.status == "failed"] == []


def test_a_request_that_keeps_failing_fails_its_game_not_the_run(server):
    proxy, url, _ = start_fault_proxy(server, ["500"] * 4)  # the first game's first turn exhausts its tries
    try:
        agent = OpenAIAgent("tiny", url, max_retries=3, concurrency=1)
        eps = play_games(agent, agent, plan_games(3, 2), objective(0))
    finally:
        proxy.shutdown()
    assert len(eps) == 3
    failed = [e for e in eps if e.outcome.status == "failed"]
    assert len(failed) == 1 and "500" in failed[0].outcome.reason
    assert all(e.outcome.status != "failed" for e in eps if e is not failed[0])


def test_unreachable_endpoint_is_recorded_as_failed():
    agent = OpenAIAgent("tiny", "http://127.0.0.1:9/v1", max_retries=3, timeout=1)
    eps = play_games(agent, load_agent("bot:hard"), plan_games(2, 0), objective(0))
    failures = [e for e in eps if e.outcome.status == "failed"]
    assert failures and all("Connection" in e.outcome.reason for e in failures)


def test_official_api_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(AgentError, match="OPENAI_API_KEY"):
        load_agent("openai:gpt-4o-mini")
