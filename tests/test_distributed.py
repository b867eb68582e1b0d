"""Ray rollouts on a real local Ray instance with 2 CPU workers: the same games as in process, in
plan order through the one writer, and a worker killed mid-round loses and duplicates nothing."""

import os
import signal
import sys

import pytest

from parlay.agents import load_agent
from parlay.agents.base import Sampling
from parlay.config import ConfigError
from parlay.episode import EpisodeWriter, read_episodes
from parlay.games import objective
from parlay.rollout import Match, plan_games, play_matches

ray = pytest.importorskip("ray", reason="Ray is part of the dev install (pip install -e '.[dev]')")

from parlay.distributed import RayPool, RemoteAgent  # noqa: E402

OBJ = objective("cooperative")


@pytest.fixture(scope="module")
def pool():
    pool = RayPool(2)
    yield pool
    pool.close()
    ray.shutdown()


def remote_matches(games, a: str, b: str, writer=None, sampling: Sampling | None = None):
    ra, rb = RemoteAgent(a, sampling or Sampling()), RemoteAgent(b, sampling or Sampling())
    return [Match(g, ra, rb, {"round": 0}, writer) for g in games]


def test_workers_play_the_same_games_as_this_process_and_write_them_in_plan_order(pool, tmp_path):
    games = plan_games(30, 4)
    seen = []
    with EpisodeWriter(tmp_path / "e.jsonl") as writer:
        remote = pool.play_matches(remote_matches(games, "bot:hard", "bot:cooperative", writer), OBJ, 12, seen.append)
    local = play_matches(
        [Match(g, load_agent("bot:hard"), load_agent("bot:cooperative"), {"round": 0}) for g in games], OBJ, 12
    )
    assert [e.model_dump() for e in remote] == [e.model_dump() for e in local]
    assert [e.id for e in seen] == [g.id for g in games]
    assert [e.id for e in read_episodes(tmp_path / "e.jsonl")] == [g.id for g in games]


def test_a_worker_killed_mid_round_has_its_games_played_elsewhere_once(pool, tmp_path, parrot_lm):
    games = plan_games(16, 9)
    spec = f"hf:{parrot_lm}"
    sampling = Sampling(max_new_tokens=24, seed=3)
    victim = pool.pids()[1]
    killed = []

    def kill_once(_episode):
        if not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    before, replayed = pool.replaced, pool.replayed
    with EpisodeWriter(tmp_path / "e.jsonl") as writer:
        episodes = pool.play_matches(remote_matches(games, spec, "bot:hard", writer, sampling), OBJ, 8, kill_once)
    assert killed and pool.replaced == before + 1 and victim not in pool.pids()
    assert pool.replayed > replayed  # the dead worker had games in hand, and they were played again
    written = [e.id for e in read_episodes(tmp_path / "e.jsonl")]
    assert written == [g.id for g in games]  # every game once, in plan order
    assert [e.id for e in episodes] == written
    assert all(e.meta["agents"] == {"A": spec, "B": "bot:hard"} for e in episodes)
    assert all(e.outcome.status != "failed" for e in episodes)


def test_an_agent_that_cannot_be_loaded_is_an_error_not_a_retry(pool):
    with pytest.raises(Exception, match="unknown agent 'bot:nobody'"):
        pool.play_matches(remote_matches(plan_games(2, 0), "bot:nobody", "bot:hard"), OBJ, 6)
    before = pool.replaced
    assert pool.play_matches(remote_matches(plan_games(2, 0), "bot:hard", "bot:hard"), OBJ, 6)
    assert pool.replaced == before


def test_a_tournament_and_a_round_of_the_loop_run_on_the_workers(pool, tmp_path, parrot_lm):
    from parlay.evaluate.tournament import run_tournament
    from parlay.loop import Loop
    from tests.test_loop import config

    specs = ["bot:hard", "bot:cooperative", "bot:conceder"]
    sampling = Sampling()
    remote = run_tournament(
        [RemoteAgent(s, sampling) for s in specs], OBJ, 6, 1, tmp_path / "t-ray", 10, sampling,
        resamples=50, play=pool.play_matches,
    )  # fmt: skip
    local = run_tournament([load_agent(s) for s in specs], OBJ, 6, 1, tmp_path / "t-local", 10, sampling, resamples=50)
    assert remote["pairs"] == local["pairs"] and remote["ratings"] == local["ratings"]

    pool.close()  # the loop starts its own 2 workers on this Ray instance, which has 2 CPUs
    cfg = config(
        tmp_path, str(parrot_lm), rounds=1, rollout={"workers": 2}, heldout={"partners": ["bot:hard"], "games": 4}
    )
    history = Loop(cfg).run()
    assert [r.round for r in history] == [0, 1]
    episodes = list(read_episodes(cfg.run_dir / "rounds" / "1" / "episodes.jsonl"))
    assert len(episodes) == 4 and history[1].heldout


def test_what_cannot_work_is_refused_with_a_clear_error(pool, monkeypatch):
    with pytest.raises(ConfigError, match="has 2 CPUs"):
        RayPool(3)
    with pytest.raises(ConfigError, match="at least 1"):
        RayPool(0)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'parlay\[ray\]'"):
        RayPool(2)


def test_an_unreachable_ray_address_fails_fast():
    from parlay.distributed.ray_pool import _check_reachable

    with pytest.raises(ConfigError, match="cannot reach a Ray cluster"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        _check_reachable("nowhere")
