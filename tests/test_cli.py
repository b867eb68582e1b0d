"""The ``parlay`` command end to end, in a subprocess as a user would run it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_lewis import lines

BIN = [sys.executable, "-m", "parlay"]


def run(*args, cwd=None, input=None):
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([*BIN, *args], capture_output=True, text=True, cwd=cwd, env=env, input=input, timeout=300)


def test_play_then_eval(tmp_path):
    out = tmp_path / "eps.jsonl"
    r = run("play", "--a", "bot:hard", "--b", "bot:cooperative", "-n", "60", "--seed", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "agreement rate" in r.stdout
    assert len(out.read_text().splitlines()) == 60
    r = run("eval", str(out), "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)  # the documented metric keys at the top level, the intervals beside them
    for key in [
        "games",
        "agreement_rate",
        "mean_reward",
        "mean_raw_score",
        "mean_raw_score_agreed",
        "pareto_rate",
        "pareto_rate_agreed",
        "welfare_ratio",
        "error_rate",
        "abort_rate",
        "messages_per_game",
    ]:
        assert key in metrics
    assert metrics["games"] == 60 and 0 < metrics["agreement_rate"] <= 1
    low, high = metrics["ci95"]["agreement_rate"]
    assert low <= metrics["agreement_rate"] <= high


def test_play_is_deterministic_under_a_seed(tmp_path):
    for name in ("one", "two"):
        assert run("play", "-n", "20", "--seed", "9", "-o", str(tmp_path / f"{name}.jsonl")).returncode == 0
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()


def test_import_lewis_then_eval(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("\n".join(lines()) + "\n")
    out = tmp_path / "lewis.jsonl"
    r = run("import-lewis", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 lines that could not be read" in r.stderr and "1 lines whose other side is missing" in r.stderr
    metrics = json.loads(run("eval", str(out), "--json").stdout)
    assert metrics["games"] == 2 and metrics["agreement_rate"] == 0.5


def test_contexts_file_drives_the_games(tmp_path):
    ctx = tmp_path / "selfplay.txt"
    ctx.write_text("1 0 2 2 2 3\n1 2 2 2 2 2\n")
    out = tmp_path / "eps.jsonl"
    assert run("play", "-n", "3", "--contexts", str(ctx), "-o", str(out)).returncode == 0
    contexts = {json.dumps(json.loads(line)["context"]) for line in out.read_text().splitlines()}
    assert len(contexts) == 1


def test_human_play_in_the_terminal(tmp_path):
    out = tmp_path / "human.jsonl"
    typed = "I would like the balls, you take the rest\npropose 0 0 2\npropose 0 0 2\npropose 0 0 2\n" * 3
    r = run("play", "--human", "--b", "bot:cooperative", "-n", "1", "--seed", "1", "-o", str(out), input=typed)
    assert r.returncode == 0, r.stderr
    assert "Your values" in r.stdout
    episode = json.loads(out.read_text())
    assert episode["meta"]["agents"]["A"] == "human"
    assert any(t["player"] == "A" and t["accepted"] for t in episode["turns"])


def test_human_leaving_is_recorded_as_failed(tmp_path):
    out = tmp_path / "human.jsonl"
    nowhere = f"run:{tmp_path / 'nowhere'}"  # with --human, seat A is the person: --a is not read
    r = run("play", "--human", "--a", nowhere, "-n", "1", "--seed", "2", "-o", str(out), input="")
    assert r.returncode == 0, r.stderr
    episode = json.loads(out.read_text())
    assert episode["outcome"]["status"] in ("failed",) and "left" in episode["outcome"]["reason"]


def _user_error(*args):
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


def test_user_errors_are_one_clear_line(tmp_path: Path):
    assert "unknown objective 'friendly'" in _user_error("play", "--objective", "friendly")
    assert "[-1, 1]" in _user_error("play", "--objective", "1.5")
    assert "unknown agent 'bot:nice'" in _user_error("play", "--a", "bot:nice")
    bad_ctx = tmp_path / "ctx.txt"
    bad_ctx.write_text("1 2 3\n")
    assert f"{bad_ctx}:1" in _user_error("play", "--contexts", str(bad_ctx))
    corrupt = tmp_path / "c.jsonl"
    corrupt.write_text("{not json}\n{}\n")
    assert f"{corrupt}:1: not valid JSON" in _user_error("eval", str(corrupt))
    assert "cannot read" in _user_error("eval", str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert "no episodes" in _user_error("eval", str(empty))
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    assert "no dialogue could be imported" in _user_error("import-lewis", str(junk), "-o", str(tmp_path / "o.jsonl"))


def test_export_player_episodes_for_openai_and_as_jsonl(tmp_path):
    eps = tmp_path / "eps.jsonl"
    assert run("play", "--a", "bot:hard", "--b", "bot:conceder", "-n", "20", "-o", str(eps)).returncode == 0
    r = run("export", str(eps), "-o", str(tmp_path / "ft.jsonl"), "--keep", "above_mean")
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert 0 < len(records) < 40
    assert all(m.get("weight") == 1 for rec in records for m in rec["messages"] if m["role"] == "assistant")
    r = run("export", str(eps), "-o", str(tmp_path / "all.jsonl"), "--format", "jsonl")
    rows = [json.loads(x) for x in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"reward", "agreed", "messages"} <= rows[0].keys()
    r = run("export", str(tmp_path), "-o", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2 and "no run here" in r.stderr
    r = run("export", str(eps), "-o", str(tmp_path / "x.jsonl"), "--format", "parquet")
    assert r.returncode == 2 and "expected train, openai, jsonl, hf" in r.stderr
    r = run("play", "-n", "2", "-o", str(tmp_path))  # a folder, not a file
    assert r.returncode == 2 and "is a folder" in r.stderr and "Traceback" not in r.stderr


def test_export_a_hugging_face_dataset(tmp_path):
    from datasets import load_from_disk

    eps = tmp_path / "eps.jsonl"
    assert run("play", "--a", "bot:hard", "--b", "bot:conceder", "-n", "10", "-o", str(eps)).returncode == 0
    for _ in range(2):  # a second export replaces the first
        r = run("export", str(eps), "-o", str(tmp_path / "ds"), "--format", "hf", "--keep", "nonzero")
        assert r.returncode == 0, r.stderr
    data = load_from_disk(str(tmp_path / "ds"))
    rows = [json.loads(x) for x in eps.read_text().splitlines()]
    nonzero = sum(r > 0 for row in rows for r in row["rewards"])
    assert len(data) == nonzero and set(data.column_names) >= {"reward", "messages", "agreed", "meta"}
    assert all(r > 0 for r in data["reward"]) and data[0]["messages"][0]["role"] == "system"
    assert json.loads(data[0]["meta"])["agents"]["A"] == "bot:hard"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    r = run("export", str(eps), "-o", str(tmp_path / "notes"), "--format", "hf")
    assert r.returncode == 2 and "not a saved dataset" in r.stderr and (tmp_path / "notes" / "mine.txt").exists()


def test_a_log_keeps_each_line_whole_and_a_run_over_seeds_names_its_machine(tmp_path):
    """stderr piped to a file at 80 columns: the machine line and a long error stay one line each
    (a log is read with grep), and ``train --seeds`` starts with the machine line as a single run does."""
    c = tmp_path / "c.yaml"
    c.write_text(json.dumps({"runs_dir": str(tmp_path / "a-long-folder-name" / "runs"), "name": "multi"}))
    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([*BIN, "train", "-c", str(c), "--seeds", "0,1", "--resume"], capture_output=True, text=True,
                       env=env, timeout=300)  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    (machine,) = [line for line in lines if line.startswith("machine: ")]
    assert re.search(r"\d+ threads? on \d+ cores?", machine) and "this run: dtype" in machine and len(machine) > 80
    (error,) = [line for line in lines if line.startswith("error: ")]
    assert error.endswith("no run over seeds here to resume (no seeds.json, no seed-<s>/ folder)"), r.stderr
    assert len(lines) == 3  # run directory, machine, error


def test_a_warning_in_a_log_is_one_plain_line(tmp_path):
    """Logging's records in a piped log: one line each with time and level, whatever COLUMNS
    says (Rich's handler wraps a long record into columns, which grep then cuts apart)."""
    out = tmp_path / "a-folder-with-a-name-long-enough-to-pass-eighty-columns" / "eps.jsonl"
    out.parent.mkdir()
    assert run("play", "-n", "3", "--seed", "2", "-o", str(out)).returncode == 0
    out.write_text(out.read_text()[:-40])  # the last game's line cut short by an interrupted write
    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([*BIN, "eval", str(out), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    (warning,) = [line for line in r.stderr.splitlines() if "WARNING" in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING .*", warning), warning
    assert f"{out}:3: last line is truncated (interrupted write); skipped" in warning
    assert json.loads(r.stdout)["games"] == 2
