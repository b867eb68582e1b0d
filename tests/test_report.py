"""``parlay report``: a run directory read back, the analyses, the HTML page in a real headless
Chromium, and partial or broken runs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from parlay.agents import Sampling, load_agent
from parlay.config import ConfigError, parse_config
from parlay.episode import write_episodes
from parlay.evaluate import compute_metrics
from parlay.evaluate.analysis import RunDirError, load_run, round_score_correlation
from parlay.evaluate.report import write_report
from parlay.evaluate.tournament import run_tournament
from parlay.games import objective
from parlay.loop import Loop
from parlay.rollout import plan_games, play_games
from parlay.run import (
    RUN_SCHEMA_VERSION,
    ModelRef,
    RunDir,
    SelectionInfo,
    TrainInfo,
    TrainStats,
    expand_rounds,
    prepare_run,
    round_agent_spec,
)
from tests.test_cli import run
from tests.test_evaluate import ScriptedJudge

CHROMIUM = Path("/usr/bin/chromium")
STATS = TrainStats(
    examples=3, skipped_examples=0, truncated_examples=0, steps=2, tokens=90, own_tokens=30, loss_first=0.9,
    loss_last=0.5, nll_first=0.9, nll_last=0.5, seconds=1.0, tokens_per_second=90.0,
)  # fmt: skip
# Rounds get better partners, as a run that learns would: no deals, some, many.
ROUND_PLAYERS = [("bot:hard", "bot:hard"), ("bot:hard", "bot:conceder"), ("bot:cooperative", "bot:cooperative")]


def make_run(root: Path, rounds_played: int = 3, planned: int = 2) -> Path:
    """A run directory as the loop writes it, with bots standing in for each round's model. Round 0's
    record is written as the first version of parlay wrote it (metrics flat beside the rest), which
    must still read."""
    data = {"name": "r", "runs_dir": str(root), "objective": "cooperative", "rounds": planned}
    cfg = prepare_run(parse_config(data | {"rollout": {"games": 12, "max_messages": 8}}, "test"), resume=False)
    loop, run = Loop(cfg), RunDir(cfg.run_dir)
    games = plan_games(12, 0)
    model = ModelRef(base="smollm2-135m")
    selection = SelectionInfo(player_episodes=24, rule="above_mean", passed_filter=3, kept=3)
    for k in range(rounds_played):
        a, b = (load_agent(s) for s in ROUND_PLAYERS[k])
        episodes = play_games(a, b, games, objective("cooperative"), 8, meta={"round": k})
        write_episodes(run.round(k).episodes, episodes)
        if k == 0:
            flat = {"round": 0, "model": {"base": model.base, "adapter": None}} | compute_metrics(episodes)
            run.round(0).record_file.write_text(json.dumps(flat | {"train": {}, "minutes": 6.0}))
            continue
        info = TrainInfo(selection=selection, trained=True, model=model, stats=STATS)
        run.write_record(loop.record(k, model, episodes, [], info, 6.0))
    return cfg.run_dir


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


def test_load_run_and_round_score_correlation(run_dir):
    view = load_run(run_dir, resamples=100)
    assert [r.k for r in view.rounds] == [0, 1, 2] and view.missing == []
    assert all(r.complete and r.summary["metrics"]["games"] == 12 for r in view.rounds)
    old, new = view.rounds[0].record, view.rounds[1].record  # a version-1 record, converted; a new one
    assert old.schema_version == 1 and old.train is None and old.metrics == view.rounds[0].summary["metrics"]
    assert new.schema_version == RUN_SCHEMA_VERSION and new.train.selection.kept == 3 and new.vs_round0["games"] == 12
    best, worst = view.rounds[2].best_and_worst()
    assert sum(best.rewards) >= sum(worst.rewards)
    corr = round_score_correlation(view.rounds, resamples=200)
    pairs = [(r.k, sum(ep.rewards) / 2) for r in view.rounds for ep in r.episodes]
    assert corr["all"]["r"] == pytest.approx(np.corrcoef(np.array(pairs).T)[0, 1])
    assert corr["all"]["games"] == 36 and corr["all"]["ci95"][0] <= corr["all"]["r"] <= corr["all"]["ci95"][1]
    agreed = sum(ep.agreed for r in view.rounds for ep in r.episodes)
    assert corr["agreed"] is None or corr["agreed"]["games"] == agreed


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    tournament = [load_agent(s) for s in ("bot:hard", "bot:cooperative")]
    run_tournament(tournament, objective("cooperative"), 4, 0, run_dir / "eval", 8, Sampling(), resamples=50)
    r = run("report", str(run_dir))
    assert r.returncode == 0, r.stderr
    report = run_dir / "report.html"
    assert {p.name for p in (run_dir / "plots").iterdir()} == {
        "curves.png",
        "rewards.png",
        "dialogue.png",
        "crossplay.png",
    }
    page_text = report.read_text()
    assert 'src="data:image/png;base64,' in page_text and "plots/" not in page_text  # self-contained
    moved = tmp_path / "elsewhere.html"
    shutil.copy(report, moved)  # it renders away from its run directory too

    assert CHROMIUM.exists(), "the report test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "shot.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(moved.as_uri())
            assert page.locator("#title").inner_text() == "parlay report: r"
            assert page.locator("#rounds tr").count() == 4  # header + 3 rounds
            assert page.locator("#correlation tr").count() == 3
            assert page.locator("#crossplay tr").count() == 5  # header + 4 ordered pairs
            assert page.locator("#vs-first tr").count() == 3  # header + agent 1 against both partners
            assert page.locator(".dialogue").count() == 6  # best and worst of 3 rounds
            assert page.locator("#missing").count() == 0
            text = page.locator("body").inner_text()
            assert "object at 0x" not in text and "items: " in text and "outcome: " in text
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 4 and all(w > 300 for w in widths)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[0] > 1500  # the whole page, not a first screen
    assert pixels.std() > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not blank


def test_run_specs_name_a_round_model(run_dir):
    assert round_agent_spec(f"run:{run_dir}") == (f"run:{run_dir}@2", "hf:smollm2-135m")
    assert round_agent_spec(f"run:{run_dir}@0") == (f"run:{run_dir}@0", "hf:smollm2-135m")  # a version-1 record
    assert round_agent_spec("bot:hard") == ("bot:hard", "bot:hard")
    with pytest.raises(ConfigError, match="round 5 is not complete"):
        round_agent_spec(f"run:{run_dir}@5")
    with pytest.raises(ConfigError, match="whole number"):
        round_agent_spec(f"run:{run_dir}@last")
    assert expand_rounds(f"run:{run_dir}@all") == [f"run:{run_dir}@{k}" for k in (0, 1, 2)]
    assert expand_rounds("bot:hard") == ["bot:hard"]
    with pytest.raises(ConfigError, match="no complete round"):
        expand_rounds(f"run:{run_dir}/nothing@all")


def test_a_judge_adds_its_inconsistency_rate_per_round(run_dir):
    path, _ = write_report(run_dir, judge=ScriptedJudge(), judge_limit=5)
    page = path.read_text()
    assert "inconsistent (judge)" in page and "judge:scripted" in page


def test_partial_run_reports_what_exists_and_what_is_missing(tmp_path):
    run_dir = make_run(tmp_path, rounds_played=2, planned=3)
    r1 = run_dir / "rounds" / "1"
    (r1 / "metrics.json").unlink()  # round 1 still playing: a few games written, the last one torn
    lines = (r1 / "episodes.jsonl").read_text().splitlines(keepends=True)
    (r1 / "episodes.jsonl").write_text("".join(lines[:5]) + lines[5][:40])
    (run_dir / "rounds" / "2").mkdir()
    (run_dir / "rounds" / "2" / "train_stats.json").write_text("{}")
    path, view = write_report(run_dir)
    assert [r.k for r in view.rounds] == [0, 1] and not view.rounds[1].complete
    assert view.rounds[1].summary["metrics"]["games"] == 5
    missing = "\n".join(view.missing)
    assert "round 1 is not complete: 5 game(s) so far" in missing
    assert "cut short" in missing and "round 2: trained, but no game played yet" in missing
    assert "round(s) 2, 3 of 0..3 not played yet" in missing
    page = path.read_text()
    assert 'id="missing"' in page and "round 1 is not complete" in page


def test_broken_runs_get_clear_errors(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not a run directory"):
        load_run(tmp_path / "empty")
    run_dir = make_run(tmp_path / "x", rounds_played=1)
    (run_dir / "rounds" / "0" / "episodes.jsonl").write_text("{broken\n")
    with pytest.raises(RunDirError, match="no round has games yet"):
        load_run(run_dir)
    r = run("report", str(run_dir))
    assert r.returncode == 2 and "no round has games yet" in r.stderr and "Traceback" not in r.stderr
    run_dir = make_run(tmp_path / "y", rounds_played=2)
    (run_dir / "rounds" / "1" / "episodes.jsonl").write_text("{broken\n")
    _, view = write_report(run_dir)
    assert any("round 1: games cannot be read" in m and "episodes.jsonl:1" in m for m in view.missing)


def test_a_lambda_sweep_plays_the_same_games_at_each_objective_and_reaches_the_report(run_dir):
    out = run_dir / "eval"
    args = ["eval", "--agents", "bot:hard,bot:cooperative", "--lambdas", "1,0,-1", "-n", "12", "--out", str(out)]
    r = run(*args, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [p["lambda"] for p in result["points"]] == [1.0, 0.0, -1.0]
    files = [out / p["episodes"] for p in result["points"]]
    games = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    assert len({tuple(sorted((g["id"], json.dumps(g["context"])) for g in gs)) for gs in games}) == 1  # same games
    assert [gs[0]["objective"]["lam"] for gs in games] == [1.0, 0.0, -1.0]
    cooperative, competitive = result["points"][0]["metrics"], result["points"][2]["metrics"]
    assert cooperative["mean_reward_a"] > competitive["mean_reward_a"]  # the score counts the partner's points
    assert (out / "sweep.png").stat().st_size > 0
    again = run(*args, "--json")  # rerun: every game is already there, none is played twice
    assert again.returncode == 0 and json.loads(again.stdout)["points"] == result["points"]
    assert all(len(f.read_text().splitlines()) == 12 for f in files)
    page = write_report(run_dir)[0].read_text()
    assert 'id="plot-sweep"' in page
    bad = run("eval", "--agents", "bot:hard", "--lambdas", "1,2", "-n", "2", "--out", str(out / "x"))
    assert bad.returncode == 2 and "--lambdas" in bad.stderr
    (out / "sweep.json").write_text("{}")
    view = load_run(run_dir, resamples=50)
    assert view.sweep is None and any("not a sweep file" in m for m in view.missing)


def test_the_training_section_shows_the_sampler_trainer_kl_per_round_and_calls_out_a_divergence(run_dir):
    """Round 1's player and trainer agree (KL 3e-9: a line, no note); round 2's do not (KL 0.02:
    the row is called out). The figures travel in each round's metrics.json."""
    run = RunDir(run_dir)
    rl = {"approx_kls": [0.0, 0.003, 0.08], "clip_fractions": [0.0, 0.1, 0.25], "entropies": [2.5, 2.25, 2.0]}
    parity = {
        1: {"sampler_kl": 3e-9, "sampler_logp_abs_diff": 2.5e-6, "grad_norms": [0.5, 3.25]},
        2: {"sampler_kl": 0.02, "sampler_logp_abs_diff": 0.15, "grad_norms": [1.5, 0.75, 0.25]} | rl,
    }
    for k, figures in parity.items():
        record = run.round(k).record()
        stats = STATS.model_copy(
            update=figures | {"sampler_tokens": 400, "sampler_turns": 30, "sampler_turns_not_comparable": 2}
        )
        run.write_record(record.model_copy(update={"train": record.train.model_copy(update={"stats": stats})}))
    assert json.loads((run_dir / "rounds" / "2" / "metrics.json").read_text())["train"]["stats"]["sampler_kl"] == 0.02
    page = write_report(run_dir)[0].read_text()
    assert 'id="training"' in page and "sampler–trainer KL (per token)" in page
    table = page[page.index('<table id="training">') : page.index("</table>", page.index('<table id="training">'))]
    rows = table.split("<tr")[2:]  # round 1, round 2
    assert len(rows) == 2
    assert "3.00e-09" in rows[0] and "above" not in rows[0] and 'class="warn"' not in rows[0]
    assert "2.00e-02" in rows[1] and "above 0.001" in rows[1] and 'class="warn"' in rows[1]
    # The gradient norm of every round (last, and the largest); RL's vital signs where it ran, and
    # a note when its approximate KL to the model that played went above 0.05.
    assert "3.25 (max 3.25)" in rows[0] and "0.25 (max 1.50)" in rows[1]
    assert "RL approx KL" in table and "8.0e-02 (max 8.0e-02)" in rows[1] and "25% (max 25%)" in rows[1]
    assert "2.50 → 2.00" in rows[1] and "approximate KL above 0.05" in rows[1] and "approximate KL" not in rows[0]
