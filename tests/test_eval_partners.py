"""``parlay eval --agents … --partners …``: each agent with fixed partners on the same games, a run
over seeds as the family of its seeds' models. Every figure is checked against one computed here
from the episode files (the agent's seat's ``rewards``, paired by game id); bots only."""

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from parlay.agents import resolve
from parlay.agents.base import Sampling
from parlay.episode import read_episodes
from parlay.errors import UserError
from parlay.evaluate.partners import entrants, partners_of, play_partners
from parlay.evaluate.tables import partner_eval_tables
from parlay.evaluate.tournament import pair_file
from parlay.games import objective
from parlay.specs import BotSpec, RunSpec, parse_spec
from tests.test_cli import run
from tests.test_seeds import _bot_seed_run

GAMES = 8


def _play(agents, partners, out, **hooks):
    specs = [parse_spec(s) for s in agents], [parse_spec(s) for s in partners]
    return play_partners(*specs, objective(0), GAMES, 3, out, 8, Sampling(), **hooks)


def _own(out: Path, result, agent: str, partner: str) -> dict[str, float]:
    """The agent's reward per game against the partner, mean of its two seats, from the files."""
    i, j = result["players"].index(agent), result["players"].index(partner)
    as_a = {ep.id: ep.rewards[0] for ep in read_episodes(pair_file(out, i, j))}
    as_b = {ep.id: ep.rewards[1] for ep in read_episodes(pair_file(out, j, i))}
    assert as_a.keys() == as_b.keys() and len(as_a) == GAMES
    return {g: (as_a[g] + as_b[g]) / 2 for g in as_a}


def _agreement(out: Path, result, agent: str, partner: str) -> float:
    i, j = result["players"].index(agent), result["players"].index(partner)
    eps = read_episodes(pair_file(out, i, j)) + read_episodes(pair_file(out, j, i))
    return float(np.mean([ep.agreed for ep in eps]))


def _row(result, agent: str, partner: str):
    return next(r for r in result["rows"] if r["agent"] == agent and r["partner"] == partner)


def test_single_agents_with_fixed_partners_match_their_games(tmp_path):
    out = tmp_path / "eval"
    agents, partners = ["bot:hard", "bot:cooperative"], ["bot:conceder", "bot:random"]
    result = _play(agents, partners, out)
    assert result["players"] == agents + partners and len(result["rows"]) == 4
    for p in partners:
        first = _own(out, result, "bot:hard", p)
        for a in agents:
            row, own = _row(result, a, p), _own(out, result, a, p)
            assert row["kind"] == "bot" and row["seeds"] is None
            assert row["mean_reward"] == pytest.approx(np.mean(list(own.values())))
            assert row["ci95"][0] <= row["mean_reward"] <= row["ci95"][1]
            assert row["agreement_rate"] == pytest.approx(_agreement(out, result, a, p))
        change = _row(result, "bot:cooperative", p)["vs_first"]
        own = _own(out, result, "bot:cooperative", p)
        assert change["games"] == GAMES
        assert change["mean"] == pytest.approx(np.mean([own[g] - first[g] for g in own]))
        assert _row(result, "bot:hard", p)["vs_first"] is None
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result))

    # A rerun replays nothing and gives the same figures.
    files = {p: p.read_bytes() for p in (out / "pairs").iterdir()}
    seen, replayed = [], []
    again = _play(agents, partners, out, on_start=lambda total, done: seen.append((total, done)),
                  on_episode=replayed.append)  # fmt: skip
    assert seen == [(len(files) * GAMES, len(files) * GAMES)] and replayed == []
    assert {p: p.read_bytes() for p in (out / "pairs").iterdir()} == files
    assert again["rows"] == result["rows"]
    with pytest.raises(ValueError, match="differs in partners"):
        _play(agents, ["bot:conceder"], out)


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """A run over seeds 0-2 (round 0: bot:hard, round 1: another bot), as tests/test_seeds makes it."""
    parent = tmp_path_factory.mktemp("runs") / "multi"
    for s, later in [(0, "bot:cooperative"), (1, "bot:conceder"), (2, "bot:cooperative")]:
        _bot_seed_run(parent, s, later, games=4)
    return parent


@pytest.fixture
def bot_models(monkeypatch):
    """A run's round model that is a bot's name plays as that bot (the runs here hold no weights)."""
    real = resolve.resolve_run

    def as_bot(spec):
        name, agent = real(spec)
        return name, BotSpec(agent.model.removeprefix("bot:"))

    monkeypatch.setattr(resolve, "resolve_run", as_bot)


def test_a_run_over_seeds_is_a_family_paired_seed_by_seed(seed_run, bot_models, tmp_path):
    out = tmp_path / "eval"
    first, later = f"run:{seed_run}@0", f"run:{seed_run}@1"
    partners = ["bot:random", "bot:conceder"]
    result = _play([first, later], partners, out)
    assert result["players"][:6] == [f"run:{seed_run}/seed-{s}@{k}" for k in (0, 1) for s in (0, 1, 2)]
    for p in partners:
        row = _row(result, later, p)
        assert row["seeds"] == [0, 1, 2]
        own = {s: _own(out, result, f"run:{seed_run}/seed-{s}@1", p) for s in (0, 1, 2)}
        before = {s: _own(out, result, f"run:{seed_run}/seed-{s}@0", p) for s in (0, 1, 2)}
        per_seed = {s: np.mean([own[s][g] - before[s][g] for g in own[s]]) for s in own}
        change = row["vs_first"]
        assert change["per_seed"] == pytest.approx(per_seed)
        assert change["mean"] == pytest.approx(np.mean(list(per_seed.values())))
        assert change["ci95"][0] <= change["mean"] <= change["ci95"][1]
        assert change["iqm"] == pytest.approx(change["mean"])  # 3 seeds: nothing is cut
        assert 0 <= change["p_improvement"] <= 1
        assert row["mean_reward"] == pytest.approx(np.mean([np.mean(list(o.values())) for o in own.values()]))
        assert row["agreement_rate"] == pytest.approx(
            np.mean([_agreement(out, result, f"run:{seed_run}/seed-{s}@1", p) for s in (0, 1, 2)])
        )

    # 80 columns, nothing cut short, even with a long partner path and many seeds.
    long = "proxy:/work/runs/proxy-lewis200-init-with-a-much-longer-name-than-usual"
    text = json.dumps(result).replace('"bot:random"', json.dumps(long))
    wide = json.loads(text)
    for r in wide["rows"]:
        r["kind"] = "proxy" if r["partner"] == long else r["kind"]
        if r["vs_first"]:
            r["vs_first"]["per_seed"] |= {str(s): -10.25 for s in range(3, 12)}
            r["seeds"] = list(range(12))
    console = Console(width=300, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for table in partner_eval_tables(wide):
        console.print(table)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80 and not any("…" in line for line in lines)
    shown = "".join(line.strip() for line in lines)
    assert long in shown and "P0 proxy" in shown and "seed 11" in shown


def test_bad_input_names_the_option(seed_run, tmp_path):
    with pytest.raises(UserError, match=r"--agents: .* is a run over seeds and bot:hard a single model"):
        entrants([RunSpec(str(seed_run), 0), parse_spec("bot:hard")])
    with pytest.raises(UserError, match=r"--agents: .*name one round per agent"):
        entrants([RunSpec(str(seed_run), "all")])
    with pytest.raises(UserError, match=r"--partners: .* is a run over seeds; a partner is one model"):
        partners_of([RunSpec(str(seed_run), 1)])
    with pytest.raises(UserError, match="--partners: bot:random given twice"):
        partners_of([parse_spec("bot:random"), parse_spec("bot:random")])
    r = run("eval", "--agents", "bot:hard", "--partners", "bot:random,openai:", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--partners:" in r.stderr and "'openai:'" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_the_objective_is_the_runs_own_unless_given(bot_models, tmp_path):
    """A cooperative run's model is measured in cooperative games unless --objective says
    otherwise (it used to be semi-competitive whatever the run); an agent given twice is refused."""
    from typer.testing import CliRunner

    from parlay import cli

    run_dir = _bot_seed_run(tmp_path / "runs", 0, "bot:cooperative", games=4, lam=1.0).path
    for given, lam in [([], 1.0), (["--objective", "competitive"], -1.0)]:
        out = tmp_path / f"eval{lam}"
        args = ["eval", "--agents", f"run:{run_dir}@1", "--partners", "bot:conceder", "-n", "4", "--out", str(out)]
        done = CliRunner().invoke(cli.app, [*args, *given, "--json"])
        assert done.exit_code == 0, done.output
        assert json.loads((out / "setup.json").read_text())["objective"]["lam"] == lam
        assert all(ep.objective["lam"] == lam for ep in read_episodes(next(out.rglob("*.jsonl"))))
    twice = CliRunner().invoke(cli.app, ["eval", "--agents", "bot:hard,bot:hard", "--partners", "bot:conceder"])
    assert twice.exit_code == 2 and "--agents: bot:hard given twice" in twice.output


def test_cli_prints_tables_and_json(tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--agents", "bot:hard,bot:cooperative", "--partners", "bot:conceder", "-n", "6", "--out", str(out)]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "P0 bot" in r.stdout and "vs agent 0" in r.stdout
    assert max(map(len, r.stdout.splitlines())) <= 80
    r = run(*args, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [(x["agent"], x["partner"]) for x in rows] == [(a, "bot:conceder") for a in ("bot:hard", "bot:cooperative")]
