"""The training loop: config errors, rounds, the run directory, resume after a kill, early stop,
empty filters, warm start, and the OpenAI route against a loopback server."""

import json
from pathlib import Path

import pytest
import yaml

from parlay.agents.resolve import model_agent
from parlay.config import ConfigError, load_config, parse_config
from parlay.episode import read_episodes
from parlay.loop import Hooks, Loop
from parlay.run import ModelRef, RunDir, prepare_run
from parlay.specs import HFSpec, VLLMSpec, parse_spec
from tests.openai_server import start_chat_server
from tests.test_cli import run
from tests.test_tracking import scalars


def config(tmp_path: Path, model: str, **sections):
    data = {
        "name": "t",
        "runs_dir": str(tmp_path / "runs"),
        "model": model,
        "objective": "cooperative",
        "rounds": 2,
        "rollout": {"games": 4, "max_messages": 4, "max_new_tokens": 16, "temperature": 0.0},
        "filter": {"rule": "all"},
        "train": {"lr": 1e-3, "batch_size": 4, "grad_accum": 1, "warmup_steps": 0},
    }
    for key, value in sections.items():
        data[key] = data[key] | value if isinstance(value, dict) and key in data else value
    return parse_config(data, "test")


class Recorder(Hooks):
    def __init__(self):
        self.notes, self.rounds = [], []

    def note(self, text):
        self.notes.append(text)

    def round_done(self, record, records):
        self.rounds.append(record.round)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rollout": {"gamez": 3}}, "rollout.gamez: unknown key"),
        ({"rollout": {"games": "many"}}, "rollout.games"),
        ({"rollout": {"games": 0}}, "rollout.games"),
        ({"filter": {"rule": "best"}}, "filter.rule"),
        ({"objective": "friendly"}, "objective"),
        ({"weights": {"scheme": "judge"}}, "judge.agent"),
        ({"warm_start": {"bots": ["bot:hard"]}}, "warm_start.bots"),
        ({"model": "openai:gpt-4o-mini"}, "train.backend: openai"),
        ({"rollout": {"backend": "vllm"}}, "rollout.backend: vllm plays full weights"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "c.yaml")


def test_overrides_and_files(tmp_path):
    cfg = load_config(None, ["rollout.games=5", "objective=0.5", "train.lora=false"])
    assert cfg.rollout.games == 5 and cfg.objective == 0.5 and cfg.train.lora is False
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rollout.games"])
    (tmp_path / "bad.yaml").write_text("rollout: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(Path(__file__).parents[1] / "configs" / "cpu-quickstart.yaml").warm_start.enabled


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    spec = model_agent(ModelRef(base=cfg.model, adapter=cfg.adapter), cfg.rollout)
    assert isinstance(spec, {"hf": HFSpec, "vllm": VLLMSpec}[cfg.rollout.backend]) and spec.model == cfg.model
    assert parse_spec(str(spec)) == spec  # what a record says is what plays


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("rounds: 2\nrollout:\n  gamez: 3\n")
    r = run("train", "--config", str(tmp_path / "c.yaml"))
    assert r.returncode == 2
    assert "rollout.gamez: unknown key" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- rounds


def test_rounds_train_play_and_fill_the_run_directory(parrot_lm, tmp_path):
    cfg = prepare_run(config(tmp_path, str(parrot_lm), tracking=["tensorboard"]), resume=False)
    hooks = Recorder()
    history = Loop(cfg, hooks).run()
    run_dir = tmp_path / "runs" / "t"
    assert [r.round for r in history] == hooks.rounds == [0, 1, 2]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rollout"]["games"] == 4
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert RunDir(run_dir).records() == history  # what was written reads back as it was
    for k in (1, 2):
        stats = json.loads((run_dir / "rounds" / str(k) / "train_stats.json").read_text())
        assert stats["trained"] and stats["selection"]["kept"] == 8 and stats["stats"]["steps"] >= 1
        assert (run_dir / "rounds" / str(k) / "model" / "adapter_model.safetensors").exists()
        assert len((run_dir / "rounds" / str(k) / "train.jsonl").read_text().splitlines()) == 8
        assert history[k].model.adapter == str(run_dir / "rounds" / str(k) / "model")
        assert history[k].train.model == history[k].model and history[k].vs_round0["games"] == 4
    episodes = read_episodes(run_dir / "rounds" / "2" / "episodes.jsonl")
    assert episodes[0].meta["agents"]["A"].startswith(f"hf:{parrot_lm}+adapter=")
    # Every round replays the same seeded games.
    ids = [[e.id for e in read_episodes(run_dir / "rounds" / str(k) / "episodes.jsonl")] for k in range(3)]
    assert ids[0] == ids[1] == ids[2]
    # Tracking: round figures against the round, the loss against the optimiser step.
    logged = scalars(run_dir / "tensorboard")
    assert [step for step, _ in logged["rollout/mean_reward"]] == [0, 1, 2]
    assert logged["rollout/agreement_rate"][2][1] == pytest.approx(history[2].metrics["agreement_rate"])
    assert [step for step, _ in logged["train/kept"]] == [1, 2] and [s for s, _ in logged["eval/vs_round0"]] == [1, 2]
    assert len(logged["train/loss"]) == sum(h.train.steps for h in history[1:])


def test_resume_after_a_kill_loses_and_duplicates_nothing(parrot_lm, tmp_path):
    cfg = prepare_run(config(tmp_path, str(parrot_lm), rounds=1), resume=False)
    Loop(cfg).run()
    r1 = tmp_path / "runs" / "t" / "rounds" / "1"
    complete = (r1 / "episodes.jsonl").read_text().splitlines()
    # A kill in the middle of round 1's play: two games written, a third torn mid-line.
    (r1 / "metrics.json").unlink()
    (r1 / "episodes.jsonl").write_text("\n".join(complete[:2]) + "\n" + complete[2][:50])
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run(cfg, resume=False)
    before = (r1 / "model" / "adapter_model.safetensors").stat().st_mtime_ns
    Loop(prepare_run(cfg, resume=True)).run()
    lines = (r1 / "episodes.jsonl").read_text().splitlines()
    assert lines[:2] == complete[:2]
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(json.loads(x)["id"] for x in complete)
    assert (r1 / "model" / "adapter_model.safetensors").stat().st_mtime_ns == before  # not retrained
    # A kill during training: the partial model is thrown away and training runs again.
    (r1 / "metrics.json").unlink()
    (r1 / "train_stats.json").unlink()
    (r1 / "model").rename(r1 / "model.partial")
    Loop(prepare_run(cfg, resume=True)).run()
    assert (r1 / "model").exists() and not (r1 / "model.partial").exists()
    assert len(read_episodes(r1 / "episodes.jsonl")) == 4


def test_resume_refuses_changed_settings_but_takes_more_rounds(parrot_lm, tmp_path):
    cfg = prepare_run(config(tmp_path, str(parrot_lm), rounds=0), resume=False)
    Loop(cfg).run()
    with pytest.raises(ConfigError, match=r"rollout\.games"):
        prepare_run(config(tmp_path, str(parrot_lm), rounds=0, rollout={"games": 5}), resume=True)
    with pytest.raises(ConfigError, match="no run here"):
        prepare_run(config(tmp_path / "elsewhere", str(parrot_lm)), resume=True)
    with pytest.raises(ConfigError, match=r"in train\.lr;"):
        prepare_run(config(tmp_path, str(parrot_lm), rounds=0, train={"lr": 5e-4}), resume=True)
    # A lower micro-batch budget cuts micro-batches, not steps: a run short of memory goes on with it.
    lowered = config(tmp_path, str(parrot_lm), rounds=1, train={"micro_batch_tokens": 64})
    history = Loop(prepare_run(lowered, resume=True)).run()
    assert [r.round for r in history] == [0, 1]


def test_an_empty_filter_skips_training_and_says_so(parrot_lm, tmp_path):
    # The parrot never reaches a deal: every reward is 0, so nothing is strictly above the mean.
    cfg = prepare_run(config(tmp_path, str(parrot_lm), rounds=1, filter={"rule": "above_mean"}), resume=False)
    hooks = Recorder()
    history = Loop(cfg, hooks).run()
    assert not history[1].train.trained and history[1].train.selection.kept == 0
    assert history[1].model == history[0].model
    assert any("kept none" in n for n in hooks.notes) and any("plays the round 0 model" in n for n in hooks.notes)


def test_early_stop_ends_the_run_when_reward_stops_improving(parrot_lm, tmp_path):
    cfg = config(tmp_path, str(parrot_lm), rounds=4, early_stop={"patience": 1}, filter={"rule": "above_mean"})
    hooks = Recorder()
    history = Loop(prepare_run(cfg, resume=False), hooks).run()
    assert [r.round for r in history] == [0, 1]
    assert any("stopped early" in n for n in hooks.notes)


# --------------------------------------------------------------------------- warm start, OpenAI route


def test_warm_start_from_init_data_on_the_command_line(parrot_lm, tmp_path):
    bots = tmp_path / "bots.jsonl"
    r = run("play", "--a", "bot:cooperative", "--b", "bot:cooperative", "-n", "4", "--objective", "cooperative",
            "--max-messages", "6", "-o", str(bots))  # fmt: skip
    assert r.returncode == 0, r.stderr
    c = tmp_path / "c.yaml"
    c.write_text(config(tmp_path, str(parrot_lm), rounds=0).to_yaml())
    r = run("train", "--config", str(c), "--init-data", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
    r = run("train", "--config", str(c), "--init-data", str(bots))
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs" / "t"
    stats = json.loads((run_dir / "warm_start" / "train_stats.json").read_text())
    assert stats["stats"]["examples"] == 8 and stats["stats"]["steps"] >= 1 and stats["selection"]["rule"] == "agreed"
    row = json.loads((run_dir / "rounds" / "0" / "metrics.json").read_text())
    assert row["model"]["adapter"] == str(run_dir / "warm_start" / "model")
    assert "reward" in r.stdout and "agree" in r.stdout  # the round table
    assert (run_dir / "report.html").exists() and (run_dir / "plots" / "curves.png").exists()  # and a report


def test_openai_route_trains_with_a_job_and_plays_the_new_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    server, url = start_chat_server()
    try:
        cfg = config(
            tmp_path,
            f"openai:base-model@{url}",
            rounds=1,
            train={"backend": "openai", "poll_seconds": 0.01},
            weights={"scheme": "judge", "judge": {"agent": f"openai:judge@{url}", "mode": "weight"}},
        )
        history = Loop(prepare_run(cfg, resume=False)).run()
    finally:
        server.shutdown()
    r1 = tmp_path / "runs" / "t" / "rounds" / "1"
    assert history[1].model.base == f"openai:ft:base-model:parlay:1@{url}"
    assert read_episodes(r1 / "episodes.jsonl")[0].meta["agents"]["A"] == history[1].model.base
    assert history[1].train.job.lines > 0
    judged = history[1].train.selection.judge
    assert judged["rated"] == 8 and judged["unreadable"] == 0
    examples = [json.loads(x) for x in (r1 / "train.jsonl").read_text().splitlines()]
    assert all(e["rating"] is not None for e in examples)
    exported = (r1 / "openai_train.jsonl").read_text().splitlines()
    assert exported and '"weight": 1' in exported[0]


def test_export_of_a_round_is_exactly_what_it_trained_on(tmp_path):
    """`parlay export RUN --round K --format train` goes through the same selection as round K."""
    from parlay.agents import load_agent
    from parlay.episode import write_episodes
    from parlay.games import objective
    from parlay.rollout import plan_games, play_games
    from parlay.run import ModelRef, TrainInfo

    cfg = config(
        tmp_path,
        "unused",
        rounds=1,
        objective="semi-competitive",
        filter={"rule": "above_mean", "baseline": "context", "keep_valid_ties": True},
        weights={"scheme": "awr", "beta": 2.0},
    )
    prepare_run(cfg, resume=False)
    episodes = play_games(load_agent("bot:hard"), load_agent("bot:conceder"), plan_games(16, 1), objective(0), 8)
    run_dir = RunDir(cfg.run_dir)
    write_episodes(run_dir.round(0).episodes, episodes)

    class Recorded:  # stands in for the trainer: what round 1 trains on is all this test reads
        def fit(self, job, on_step=None, note=None):
            return TrainInfo(selection=job.selection, trained=True, model=ModelRef(base="trained"))

    loop = Loop(cfg)
    loop.trainer = Recorded()
    info = loop.improve(1, ModelRef(base="unused"))
    trained_on = run_dir.round(1).train_data.read_text()
    weights = [json.loads(line)["weight"] for line in trained_on.splitlines()]
    assert 0 < info.selection.kept < 32 and len(set(weights)) > 1  # a real selection, real AWR weights
    out = tmp_path / "exported.jsonl"
    r = run("export", str(cfg.run_dir), "--round", "1", "--format", "train", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == trained_on
    r = run("export", str(cfg.run_dir), "--round", "2", "-o", str(out))
    assert r.returncode == 2 and "round 1's games" in r.stderr


def test_a_max_length_shorter_than_a_games_opening_is_refused_before_play(tiny_lm, tmp_path):
    """The least ``train.max_length`` is the opening as the model's own template renders it plus
    one reply (computed here with transformers' ``apply_chat_template``); one token less is
    refused, naming the setting, before any game is played."""
    from parlay.games import objective
    from parlay.protocol import Game
    from parlay.rollout import plan_games

    _, tokenizer, path = tiny_lm
    game = plan_games(1, 0)[0]
    opening = Game(game.context, objective("cooperative"), game.first_speaker, 4).conversation(game.first_speaker)
    need = len(tokenizer.apply_chat_template(opening, add_generation_prompt=True, tokenize=True, return_dict=False))
    need += 16  # rollout.max_new_tokens in config()
    short = prepare_run(config(tmp_path, str(path), rounds=0, train={"max_length": need - 1}), resume=False)
    with pytest.raises(ConfigError, match=rf"train\.max_length={need - 1} .* at least {need}"):
        Loop(short).run()
    assert not (RunDir(short.run_dir).round(0).episodes).exists()
    Loop(short.model_copy(update={"train": short.train.model_copy(update={"max_length": need})})).check_room()


def test_a_refused_max_length_leaves_no_run_folder_behind(tiny_lm, tmp_path):
    """``parlay train`` (one seed or several) refuses a too-short ``train.max_length`` before the
    run folder, a seed folder or the seeds manifest is written: the corrected config then starts
    afresh instead of meeting 'already holds a run' and, with --resume, 'keeps its settings'."""
    from parlay.loop import train, train_seeds
    from parlay.seeds import SeedRuns

    _, tokenizer, path = tiny_lm
    from parlay.games import objective
    from parlay.protocol import Game
    from parlay.rollout import plan_games

    game = plan_games(1, 0)[0]
    opening = Game(game.context, objective("cooperative"), game.first_speaker, 4).conversation(game.first_speaker)
    ids = tokenizer.apply_chat_template(opening, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(ids) > 32
    short = config(tmp_path, str(path), rounds=0, train={"max_length": 32})
    with pytest.raises(ConfigError, match=r"train\.max_length=32"):
        train(short, resume=False)
    assert not Path(short.run_dir).exists()
    with pytest.raises(ConfigError, match=r"train\.max_length=32"):
        train_seeds(short, [0, 1], resume=False)
    assert not Path(short.run_dir).exists() and SeedRuns.find(short.run_dir) is None
