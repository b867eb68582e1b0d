"""Episode records and their files: round trips, torn writes, corrupt lines."""

import json

import pytest

from parlay.agents import load_agent
from parlay.episode import (
    SCHEMA_VERSION,
    EpisodeFileError,
    EpisodeWriter,
    ReadReport,
    player_episodes,
    read_episodes,
    write_episodes,
)
from parlay.games import objective
from parlay.rollout import plan_games, play_games


@pytest.fixture(scope="module")
def episodes():
    a, b = load_agent("bot:random"), load_agent("bot:conceder")
    return play_games(a, b, plan_games(12, seed=3), objective("cooperative"))


def test_round_trip_keeps_everything(tmp_path, episodes):
    path = tmp_path / "eps.jsonl"
    write_episodes(path, episodes)
    back = read_episodes(path)
    assert [e.model_dump() for e in back] == [e.model_dump() for e in episodes]
    line = json.loads(path.read_text().splitlines()[0])
    assert line["schema_version"] == SCHEMA_VERSION
    assert {"context", "objective", "first_speaker", "turns", "outcome", "raw_scores", "rewards", "transcripts"} <= set(
        line
    )
    assert any(not t.accepted for e in episodes for t in e.turns)  # rejected attempts are recorded


def test_truncated_last_line_is_reported_not_fatal(tmp_path, episodes):
    path = tmp_path / "eps.jsonl"
    write_episodes(path, episodes[:3])
    with path.open("a") as f:
        f.write(episodes[3].model_dump_json()[:50])  # a writer killed mid-line
    report = ReadReport()
    assert len(read_episodes(path, report)) == 3
    assert report.truncated_tail


def test_corrupt_middle_line_names_the_line(tmp_path, episodes):
    path = tmp_path / "eps.jsonl"
    lines = [e.model_dump_json() for e in episodes[:3]]
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EpisodeFileError, match=r"eps.jsonl:2: not valid JSON"):
        read_episodes(path)


def test_wrong_field_and_version_are_named(tmp_path, episodes):
    data = json.loads(episodes[0].model_dump_json())
    data["rewards"] = "lots"
    (tmp_path / "a.jsonl").write_text(json.dumps(data) + "\n")
    with pytest.raises(EpisodeFileError, match=r"a.jsonl:1: field 'rewards'"):
        read_episodes(tmp_path / "a.jsonl")
    data["schema_version"] = 99
    (tmp_path / "b.jsonl").write_text(json.dumps(data) + "\n")
    with pytest.raises(EpisodeFileError, match="schema version 99"):
        read_episodes(tmp_path / "b.jsonl")
    with pytest.raises(EpisodeFileError, match="cannot read"):
        read_episodes(tmp_path / "missing.jsonl")


def test_appending_writer_repairs_a_torn_tail(tmp_path, episodes):
    path = tmp_path / "eps.jsonl"
    with EpisodeWriter(path) as w:
        w.write(episodes[0])
    with path.open("a") as f:
        f.write('{"schema_version": 1, "id": "half')
    with EpisodeWriter(path, append=True) as w:
        w.write(episodes[1])
    report = ReadReport()
    assert [e.id for e in read_episodes(path, report)] == [episodes[0].id, episodes[1].id]
    assert not report.truncated_tail


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, episodes):
    path = tmp_path / "eps.jsonl"
    write_episodes(path, episodes[:2])

    def exploding():
        yield episodes[2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_episodes(path, exploding())
    assert len(read_episodes(path)) == 2
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_player_episodes_hold_only_accepted_turns(episodes):
    for ep in episodes:
        sides = player_episodes(ep)
        assert [s.player for s in sides] == ["A", "B"]
        for side, reward in zip(sides, ep.rewards, strict=True):
            assert side.reward == reward
            assert side.messages[0]["role"] == "system"
            own = [t for t in ep.turns if t.player == side.player and t.accepted]
            assert len([m for m in side.messages if m["role"] == "assistant"]) == len(own)
            rejected = {t.text for t in ep.turns if not t.accepted and t.text}
            assert not rejected & {m["content"] for m in side.messages}
        assert sides[0].context_key == sides[1].context_key
