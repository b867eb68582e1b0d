"""One writer per folder, and a length limit on replies."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from parlay.agents import load_agent
from parlay.agents.base import Agent, Reply
from parlay.agents.openai_compat import OpenAIAgent
from parlay.games import MAX_REPLY_CHARS, Context, objective
from parlay.locking import LOCK_NAME, FolderLock, LockError
from parlay.protocol import ErrorCode, Game
from parlay.rollout import plan_games, play_games
from tests.openai_server import start_chat_server
from tests.test_cli import BIN, run
from tests.test_loop import config

HOLD = (
    "import sys, time; from parlay.locking import FolderLock; FolderLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(120)"
)


def _holder(folder):
    """A separate process that takes the folder's lock and keeps it until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_names_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockError, match=rf"being written by PID {proc.pid} on {socket.gethostname()}"):
            FolderLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_waiting_writer_gets_the_lock_when_the_holder_ends(tmp_path):
    """What a report does: wait for another report to finish instead of failing."""
    import threading

    proc = _holder(tmp_path)
    threading.Timer(1.0, proc.kill).start()
    started = time.monotonic()
    with FolderLock(tmp_path, wait=30):
        assert time.monotonic() - started >= 0.9
    proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_and_said(tmp_path, caplog):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # the file still names it
    with caplog.at_level("WARNING"), FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by PID {proc.pid}" in caplog.text
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json at all", "cannot be read as a parlay lock"),
        (json.dumps({"host": "node-7", "pid": 12, "started": "2026-01-01T00:00:00+00:00", "command": "parlay train"}),
         "on another host"),
    ],
)  # fmt: skip
def test_a_lock_file_that_cannot_be_trusted_needs_the_flag(tmp_path, content, message):
    (tmp_path / LOCK_NAME).write_text(content)
    with pytest.raises(LockError, match=message) as refused:
        FolderLock(tmp_path).acquire()
    assert "--steal-lock" in str(refused.value)
    assert (tmp_path / LOCK_NAME).read_text() == content  # untouched
    with FolderLock(tmp_path, steal=True):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_two_train_processes_on_one_run(parrot_lm, tmp_path):
    """The second `parlay train --resume` is refused while the first runs; the first finishes unharmed."""
    c = tmp_path / "c.yaml"
    c.write_text(config(tmp_path, str(parrot_lm), rounds=2).to_yaml())
    run_dir = tmp_path / "runs" / "t"
    env = {**os.environ, "COLUMNS": "120"}
    first = subprocess.Popen([*BIN, "train", "-c", str(c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while not ((run_dir / LOCK_NAME).exists() and (run_dir / LOCK_NAME).read_text()):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        second = run("train", "-c", str(c), "--resume")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"being written by PID {first.pid} on {socket.gethostname()}" in second.stderr
        assert first.poll() is None  # still running
        while not (run_dir / "rounds" / "0" / "metrics.json").exists() and first.poll() is None:
            time.sleep(0.05)
        live = run("report", str(run_dir))  # a reader: works on the live run, without its lock
        assert live.returncode == 0, live.stderr
        _, errs = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, errs.decode()[-2000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run_dir / LOCK_NAME).read_text() == ""
    r = run("train", "-c", str(c), "--resume", "--set", "rounds=2")  # free again: nothing left to do
    assert r.returncode == 0, r.stderr


def test_resuming_a_run_locked_from_another_host_says_how_to_override(tmp_path):
    cfg = config(tmp_path, "unused", rounds=0)
    c = tmp_path / "c.yaml"
    c.write_text(cfg.to_yaml())
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    holder = {"host": "node-7", "pid": 12, "started": "2026-01-01T00:00:00+00:00", "command": "parlay train"}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    r = run("train", "-c", str(c), "--resume")
    assert r.returncode == 2 and "node-7" in r.stderr and "--steal-lock" in r.stderr


# --------------------------------------------------------------------------- reply length


class Runaway(Agent):
    spec = "test:runaway"

    def act(self, requests):
        return [Reply("[message] " + "x" * 100_000) for _ in requests]


def test_an_over_long_reply_is_rejected_with_its_own_feedback_and_kept_cut():
    game = Game(Context((1, 2, 2), (0, 2, 3), (2, 2, 2)), objective(0), max_reply_chars=50)
    turn = game.step("[message] " + "y" * 200)
    assert not turn.accepted and turn.error == ErrorCode.TOO_LONG and "50 characters" in turn.feedback
    assert len(turn.text) < 120 and "more characters not kept" in turn.text
    assert game.step("[message] short").accepted  # the retry goes through
    with pytest.raises(ValueError, match="reply length limit"):
        Game(Context((1, 2, 2), (0, 2, 3), (2, 2, 2)), objective(0), max_reply_chars=0)


def test_a_runaway_agent_is_rejected_and_never_stored_whole():
    episodes = play_games(Runaway(), load_agent("bot:hard"), plan_games(3, 0), objective(0), 6)
    for ep in episodes:
        own = [t for t in ep.turns if t.player == "A"]
        assert own and all(t.error == ErrorCode.TOO_LONG for t in own)
        assert all(len(t.text) < MAX_REPLY_CHARS + 60 for t in ep.turns)
        assert ep.outcome.status == "aborted" or ep.first_speaker == "B"
        assert len(ep.model_dump_json()) < 20_000


def test_a_runaway_endpoint_is_rejected_too(monkeypatch):
    server, url = start_chat_server()
    try:
        agent = OpenAIAgent("runaway", url)
        ep = play_games(agent, load_agent("bot:conceder"), plan_games(1, 2), objective(1), 6)[0]
    finally:
        server.shutdown()
    rejected = [t for t in ep.turns if t.player == "A"]
    assert rejected and all(t.error == ErrorCode.TOO_LONG for t in rejected)
    assert "1000 characters" in rejected[0].feedback and len(ep.model_dump_json()) < 30_000
