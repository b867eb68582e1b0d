"""Runs over seeds: bad input, the layout (a seed folder is a plain run's), resume that never
replays a complete seed, run:RUN/seed-S@K, export --seed, and the figures across seeds against
references computed here (plain numpy loops, hand-worked cases)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from parlay.agents import load_agent
from parlay.agents.resolve import expand_rounds, resolve_run
from parlay.config import ConfigError, load_config, parse_config
from parlay.episode import write_episodes
from parlay.evaluate import compute_metrics
from parlay.evaluate.seeds import (
    hierarchical_interval,
    interquartile_mean,
    load_seeds,
    probability_of_improvement,
)
from parlay.evaluate.tables import seed_tables
from parlay.games import objective
from parlay.loop import Hooks, train_seeds
from parlay.rollout import plan_games, play_games
from parlay.run import ModelRef, RoundRecord, RunDir
from parlay.seeds import SeedRuns, parse_seeds, pick_seed, seed_config, seeds_of
from parlay.specs import RunSpec
from tests.test_cli import run
from tests.test_loop import config

# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("text", "message"),
    [("0,1,1", "seed 1 is given twice"), ("0,a", "'a' is not a whole number"), ("1.5", "not a whole number"),
     (" , ", "no seed given"), ("0,-1", "-1 is negative")],
)  # fmt: skip
def test_bad_seeds_option_is_named(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        parse_seeds(text)
    assert str(exc.value).startswith("--seeds")


@pytest.mark.parametrize(
    ("seeds", "message"),
    [([0, 2, 2], "seeds: seed 2 is listed twice"), ([], "seeds: give at least one seed"),
     ([0, "x"], "seeds.1"), ([0, 1.5], "seeds.1"), ([0, -1], "seeds.1")],
)  # fmt: skip
def test_bad_seeds_key_is_named(seeds, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"seeds": seeds}, "c.yaml")


def test_seeds_given_twice_must_agree():
    cfg = parse_config({"seeds": [0, 1]}, "c.yaml")
    assert seeds_of(cfg, None) == [0, 1] and seeds_of(cfg, [0, 1]) == [0, 1]
    assert seeds_of(parse_config({}, "c.yaml"), None) is None
    with pytest.raises(ConfigError, match=r"--seeds 2,3 and the config's seeds: \[0, 1\] disagree"):
        seeds_of(cfg, [2, 3])


def test_cli_refuses_bad_seeds_before_anything_runs(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump({"runs_dir": str(tmp_path / "runs"), "name": "x", "seeds": [0, 1]}))
    for args, message in [
        (["--seeds", "0,0"], "--seeds: seed 0 is given twice"),
        (["--seeds", "0,1", "--resume"], "no run over seeds here to resume"),
        (["--seeds", "-1"], "--seeds: -1 is negative"),  # numpy's SeedSequence takes no negative seed
        (["--set", "seed=-1"], "seed: Input should be greater"),
    ]:
        r = run("train", "--config", str(c), *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- the statistics


def _reference_interval(groups, resamples, rng):
    """The two-stage bootstrap written out plainly: draw seeds, then each drawn seed's games."""
    means = []
    for _ in range(resamples):
        picked = rng.integers(0, len(groups), len(groups))
        means.append(np.mean([groups[s][rng.integers(0, len(groups[s]), len(groups[s]))].mean() for s in picked]))
    return np.percentile(means, [2.5, 97.5])


def test_hierarchical_interval_agrees_with_a_plain_numpy_reference():
    rng = np.random.default_rng(5)
    groups = [rng.normal(loc, 1.0, n) for loc, n in [(0.5, 40), (1.5, 60), (0.0, 50), (1.0, 30)]]
    mean, (low, high) = hierarchical_interval(groups, seed=1, resamples=8000)
    assert mean == pytest.approx(np.mean([g.mean() for g in groups]))
    ref_low, ref_high = _reference_interval(groups, 8000, np.random.default_rng(2))
    width = ref_high - ref_low
    assert abs(low - ref_low) < 0.06 * width and abs(high - ref_high) < 0.06 * width
    # Its spread against the two-stage variance worked out by hand: (1/S)(var of seed means + mean of var/n).
    sd = np.sqrt((np.var([g.mean() for g in groups]) + np.mean([np.var(g) / len(g) for g in groups])) / len(groups))
    assert (high - low) == pytest.approx(2 * 1.96 * sd, rel=0.12)
    # Games alone would be far narrower: the seeds' spread is in the interval.
    pooled = np.concatenate(groups)
    assert high - low > 2 * 2 * 1.96 * pooled.std() / np.sqrt(len(pooled))


def test_interquartile_mean_and_probability_of_improvement_by_hand():
    assert interquartile_mean([4, 1, 3, 2]) == pytest.approx(2.5)  # 1 and 4 cut
    assert interquartile_mean([100, 0, 1, 2, 3, 4, 5, 6]) == pytest.approx(3.5)  # two cut from each end
    assert interquartile_mean([1.0, 2.0, 9.0]) == pytest.approx(4.0)  # int(0.75) = 0: nothing cut
    # after (3, 2, 1) against before (1, 1, 0): 3 wins for 3, 3 for 2, and for 1: two ties and a win.
    assert probability_of_improvement([3, 2, 1], [1, 1, 0]) == pytest.approx(8 / 9)
    assert probability_of_improvement([1, 1], [1, 1]) == 0.5
    assert probability_of_improvement([0], [1, 2]) == 0.0


# --------------------------------------------------------------------------- a multi-seed run read back


def _bot_seed_run(parent: Path, seed: int, later: str, games: int = 10, lam: float = 0.0) -> RunDir:
    """Seed ``seed``'s run as a plain run makes it with --set runs_dir=PARENT --set name=seed-S:
    round 0 plays bot:hard with itself, round 1 ``later`` with itself; bot:random is held out.
    ``lam``: the objective the run's config names (its games are played under λ = 0 all the same)."""
    data = {"runs_dir": str(parent), "name": f"seed-{seed}", "seed": seed, "rounds": 1, "objective": lam}
    data |= {"rollout": {"games": games, "max_messages": 8}, "heldout": {"partners": ["bot:random"], "games": 6}}
    cfg = parse_config(data, "test")
    run = RunDir(cfg.run_dir)
    run.create(cfg)
    for k, bot in enumerate(["bot:hard", later]):
        agent = load_agent(bot)
        eps = play_games(agent, agent, plan_games(games, seed), objective(0), 8)
        write_episodes(run.round(k).episodes, eps)
        held = play_games(agent, load_agent("bot:random"), plan_games(6, seed + 50), objective(0), 8)
        write_episodes(run.round(k).heldout_episodes(0), held)
        run.write_record(RoundRecord(round=k, model=ModelRef(base=bot), metrics=compute_metrics(eps), minutes=0))
    return run


def _change(run: RunDir, k: int, held: bool = False) -> float:
    """The seed's paired change computed here: game means of both seats, matched by id."""
    from parlay.episode import read_episodes

    path = (lambda s: s.heldout_episodes(0)) if held else (lambda s: s.episodes)
    now = {ep.id: np.mean(ep.rewards) for ep in read_episodes(path(run.round(k)))}
    then = {ep.id: np.mean(ep.rewards) for ep in read_episodes(path(run.round(0)))}
    return float(np.mean([now[g] - then[g] for g in now]))


@pytest.fixture(scope="module")
def bot_seeds(tmp_path_factory):
    parent = tmp_path_factory.mktemp("runs") / "multi"
    runs = {s: _bot_seed_run(parent, s, later) for s, later in [(0, "bot:cooperative"), (1, "bot:conceder"),
                                                                 (2, "bot:cooperative")]}  # fmt: skip
    return parent, runs


def test_a_parent_of_plain_seed_runs_is_read_as_one(bot_seeds):
    parent, runs = bot_seeds
    assert not (parent / "seeds.json").exists()  # made by hand: no manifest
    view = load_seeds(parent, resamples=500)
    assert view.seeds == [0, 1, 2] and view.rounds == [0, 1] and view.missing == []
    by_figure = {c["figure"]: c for c in view.changes}
    assert set(by_figure) == {"all", "heldout:bot:random"}
    for key, held in [("all", False), ("heldout:bot:random", True)]:
        c = by_figure[key]
        expected = {s: _change(r, 1, held) for s, r in runs.items()}
        assert c["per_seed"] == pytest.approx(expected)
        assert c["mean"] == pytest.approx(np.mean(list(expected.values())))
        assert c["ci95"][0] <= c["mean"] <= c["ci95"][1]
        assert c["iqm"] == pytest.approx(np.mean(list(expected.values())))  # 3 seeds: nothing cut
        assert 0.0 <= c["p_improvement"] <= 1.0
    # Each seed's change agrees with what its own record says of round 1 (written by another path).
    record = runs[1].round(1).record()
    assert record.metrics["games"] == 10


def test_report_of_a_run_over_seeds_html_and_tables(bot_seeds, tmp_path):
    parent, _ = bot_seeds
    r = run("report", str(parent))
    assert r.returncode == 0, r.stderr
    html = (parent / "report.html").read_text()
    assert 'id="changes"' in html and "seed 2" in html and "bot:random *" in html
    assert (parent / "plots" / "curves.png").exists() and (parent / "plots" / "changes.png").exists()
    assert "across seeds" in r.stdout and "IQM" in r.stdout
    view = load_seeds(parent, resamples=200)
    wide = Console(width=300, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for table in seed_tables([*view.changes, view.changes[-1] | {"label": "run:/a/long/path/of/some/run@3"}],
                             list(range(12))):  # fmt: skip
        wide.print(table)
    lines = wide.export_text().splitlines()
    assert lines and max(map(len, lines)) <= 80


def test_a_seed_folder_from_another_config_is_refused(bot_seeds, tmp_path):
    _, runs = bot_seeds
    other = tmp_path / "mixed"
    for s in (0, 1):
        src = runs[s].path
        (other / f"seed-{s}").mkdir(parents=True)
        for p in src.rglob("*"):
            if p.is_file():
                dest = other / f"seed-{s}" / p.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(p.read_bytes())
    cfg_file = other / "seed-1" / "config.yaml"
    data = yaml.safe_load(cfg_file.read_text())
    cfg_file.write_text(yaml.safe_dump(data | {"objective": 1}))
    with pytest.raises(ConfigError, match=r"seed-1/config.yaml: differs from .*seed-0/config.yaml in objective"):
        load_seeds(other)
    cfg_file.write_text(yaml.safe_dump(data | {"seed": 7}))
    with pytest.raises(ConfigError, match="seed: 7 in a folder named seed-1"):
        load_seeds(other)


def test_a_single_run_is_not_started_over_a_run_over_seeds(bot_seeds):
    """``parlay train`` without --seeds into a folder of seed runs would write a config.yaml that
    hides them (the folder would then read as one single run): refused, with or without --resume,
    and nothing is written."""
    from parlay.loop import train

    parent, _ = bot_seeds
    before = sorted(p.relative_to(parent) for p in parent.rglob("*"))
    cfg = parse_config({"runs_dir": str(parent.parent), "name": parent.name, "rounds": 1}, "test")
    for resume, hint in [(False, "choose another name"), (True, "resume it with --seeds 0,1,2 --resume")]:
        with pytest.raises(ConfigError, match=rf"holds a run over seeds \(seed-0, seed-1, seed-2\); {hint}"):
            train(cfg, resume)
    assert sorted(p.relative_to(parent) for p in parent.rglob("*")) == before
    assert SeedRuns.find(parent) is not None


def test_run_specs_pick_a_seed_and_eval_expands_every_seed(bot_seeds):
    parent, _ = bot_seeds
    name, agent = resolve_run(RunSpec(str(parent / "seed-1"), 1))
    assert name == RunSpec(str(parent / "seed-1"), 1) and str(agent) == "hf:bot:conceder"
    with pytest.raises(ConfigError, match=r"holds one run per seed \(seed-0, seed-1, seed-2\); name one seed's model"):
        resolve_run(RunSpec(str(parent), 1))
    assert expand_rounds(RunSpec(str(parent), 1)) == [RunSpec(str(parent / f"seed-{s}"), 1) for s in (0, 1, 2)]
    assert len(expand_rounds(RunSpec(str(parent), "all"))) == 6


def test_export_takes_a_seed(bot_seeds, tmp_path):
    parent, _ = bot_seeds
    assert pick_seed(parent, 2) == parent / "seed-2"
    assert pick_seed(parent / "seed-2", None) == parent / "seed-2"
    with pytest.raises(ConfigError, match="choose one with --seed S"):
        pick_seed(parent, None)
    with pytest.raises(ConfigError, match="holds no run for seed 5"):
        pick_seed(parent, 5)
    with pytest.raises(ConfigError, match="is not a run over seeds"):
        pick_seed(parent / "seed-2", 2)
    out = tmp_path / "x.jsonl"
    r = run("export", str(parent), "--seed", "1", "--keep", "all", "--format", "jsonl", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2 * 2 * 10  # both rounds, both sides, 10 games
    r = run("export", str(parent), "--format", "jsonl", "-o", str(out))
    assert r.returncode == 2 and "--seed" in r.stderr


# --------------------------------------------------------------------------- training over seeds


class Notes(Hooks):
    def __init__(self):
        self.notes = []

    def note(self, text):
        self.notes.append(text)


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def test_train_over_seeds_lays_out_plain_runs_and_resumes_only_the_unfinished(parrot_lm, tmp_path):
    cfg = config(tmp_path, str(parrot_lm), rounds=0, rollout={"games": 2, "max_messages": 2})
    parent = tmp_path / "runs" / "t"
    done = train_seeds(cfg, [0, 1, 2], resume=False)
    assert sorted(done) == [0, 1, 2] and all(len(r) == 1 for r in done.values())
    manifest = json.loads((parent / "seeds.json").read_text())
    assert manifest["seeds"] == [0, 1, 2] and "seed" not in manifest["config"] and manifest["config"]["name"] == "t"
    # A seed folder is what a plain run makes with --set runs_dir=PARENT --set name=seed-S --set seed=S.
    c = tmp_path / "c.yaml"
    c.write_text(cfg.to_yaml())
    plain = load_config(c, [f"runs_dir={parent}", "name=seed-1", "seed=1"])
    saved = (parent / "seed-1" / "config.yaml").read_text()
    assert saved == plain.to_yaml() + "\n" and plain.to_yaml() == seed_config(cfg, 1).to_yaml()
    ids = {s: (parent / f"seed-{s}" / "rounds" / "0" / "episodes.jsonl").read_text() for s in (0, 1)}
    assert ids[0] != ids[1]  # another seed: other games
    with pytest.raises(ConfigError, match="already holds a run over seeds; pass --resume"):
        train_seeds(cfg, [0, 1, 2], resume=False)
    # Seed 2 killed in round 0: one game written, the record not.
    r0 = parent / "seed-2" / "rounds" / "0"
    complete = (r0 / "episodes.jsonl").read_text().splitlines()
    (r0 / "metrics.json").unlink()
    (r0 / "episodes.jsonl").write_text(complete[0] + "\n")
    # A seed folder whose settings changed is refused before any seed runs.
    seed1 = parent / "seed-1" / "config.yaml"
    saved = seed1.read_text()
    seed1.write_text(saved.replace("games: 2", "games: 3", 1))
    with pytest.raises(ConfigError, match=r"seed-1/config.yaml: differs from .*seeds.json in rollout.games"):
        train_seeds(cfg, [0, 1, 2], resume=True)
    assert (r0 / "episodes.jsonl").read_text().splitlines() == complete[:1]
    seed1.write_text(saved)
    before = {s: _files(parent / f"seed-{s}") for s in (0, 1)}
    hooks = Notes()
    done = train_seeds(cfg, [0, 1, 2], resume=True, hooks=hooks)
    assert {s: _files(parent / f"seed-{s}") for s in (0, 1)} == before  # not replayed, not rewritten
    assert "seed 0: complete, not played again" in hooks.notes and "seed 1: complete, not played again" in hooks.notes
    lines = (r0 / "episodes.jsonl").read_text().splitlines()
    # Resumed: the rest played once, the same games. Their log-probabilities agree up to rounding
    # only: the resumed batch, one game, has no shared prefix to keep apart (hf_attention).
    assert lines[0] == complete[0] and len(lines) == len(complete)
    resumed, whole = (sorted((json.loads(x) for x in ls), key=lambda e: e["id"]) for ls in (lines, complete))
    logprobs = [[t.pop("logprobs") for t in e["turns"]] for e in (*resumed, *whole)]
    assert resumed == whole
    half = len(logprobs) // 2
    for got, want in zip(logprobs[:half], logprobs[half:], strict=True):
        assert len(got) == len(want) and all(g == pytest.approx(w, abs=1e-3) for g, w in zip(got, want, strict=True))
    assert RunDir(parent / "seed-2").complete_rounds() == [0]
    assert SeedRuns(parent).seeds() == [0, 1, 2]
