"""Partner leagues and held-out evaluation in the loop: the mix, what is trained on, the records,
bad partner settings, a partner that fails, and checkpoints as partners after a resume."""

from collections import Counter

import pytest

from parlay.agents import Sampling, load_agent
from parlay.config import ConfigError, parse_config
from parlay.episode import all_player_episodes, read_episodes
from parlay.evaluate.report import write_report
from parlay.evaluate.tables import partners_table, rounds_table
from parlay.games import objective
from parlay.improve.examples import has_own_turns, learner_sides, read_examples
from parlay.league import TRAINING, League, assign_partners, heldout_games, round_games
from parlay.loop import Loop
from parlay.rollout import Match, plan_games, play_matches
from parlay.run import ModelRef, RoundRecord, RunDir, prepare_run
from parlay.specs import BotSpec, SelfPartner
from tests.test_loop import config
from tests.test_tracking import scalars

MIX = [
    {"agent": "self", "share": 0.5},
    {"agent": "bot:conceder", "share": 0.25},
    {"agent": "checkpoint:latest", "share": 0.25},
]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"partners": [{"agent": "self", "share": 0.6}]}, "partners: the shares add up to 0.6, not 1"),
        ({"partners": [{"agent": "checkpoint:best", "share": 1}]}, "partners.0.agent"),
        ({"partners": [{"agent": "self", "share": 0.5}] * 2}, "listed twice"),
        ({"partners": [{"agent": "self"}]}, "partners.0.share"),
        (
            {"partners": MIX, "heldout": {"partners": ["bot:conceder"]}},
            "heldout.partners: bot:conceder is also a training partner",
        ),
        (
            {"warm_start": {"bots": ["bot:hard", "bot:hard"]}, "heldout": {"partners": ["bot:hard"]}},
            "heldout.partners: bot:hard is also a training partner",
        ),
        ({"heldout": {"partners": ["self"]}}, "heldout.partners: self"),
    ],
)
def test_bad_partner_settings_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "c.yaml")


def test_partner_shares_are_exact_and_fixed_by_the_seed():
    cfg = parse_config({"partners": MIX, "seed": 3})
    games = plan_games(10, 3)
    labels = assign_partners(games, cfg)
    # 10 games: 5, 2.5 and 2.5 → the remainders go in order of size, then of listing.
    assert Counter(labels) == {"self": 5, "bot:conceder": 3, "checkpoint:latest": 2}
    assert assign_partners(games, cfg) == labels and labels != sorted(labels, key=labels.index)
    held = parse_config({"heldout": {"partners": ["bot:hard", "bot:random"], "games": 3}})
    first, second = heldout_games(held, 0), heldout_games(held, 1)  # the same contexts, ids of their own
    assert [g.context for g in first] == [g.context for g in second]
    assert [g.id for g in first] == [g.id.replace("h1-", "h0-") for g in second] and first[0].id.startswith("h0-")


def test_a_rounds_plan_holds_every_game_once_and_results_come_back_by_the_plan(tmp_path):
    """One value per round: the training games (each with its partner and the learner's seats)
    and every held-out partner's games, each with its file; what was played is read back by the
    plan, whatever order the files hold it in and whatever the episodes' metadata say."""
    cfg = config(tmp_path, "m", rollout={"games": 8}, partners=MIX, heldout={"partners": ["bot:hard"], "games": 3})
    run = RunDir(cfg.run_dir)
    league = League(cfg, run, Sampling())
    r0 = RoundRecord(round=0, model=ModelRef(base="m0"), metrics={}, minutes=0.0)
    plan = league.plan(1, [r0])
    assert [t.path for t in plan.tables] == [run.round(1).episodes, run.round(1).heldout_episodes(0)]
    assert [t.heldout for t in plan.tables] == [None, BotSpec("hard")]
    training = [g for g in plan.games if g.table == TRAINING]
    assert [g.game for g in training] == round_games(cfg, 1) and len(plan.games) == 8 + 3
    labels = assign_partners(round_games(cfg, 1), cfg)  # checkpoint:latest is round 0's model in round 1
    assert [g.name for g in training] == [{"checkpoint:latest": "checkpoint@0"}.get(x, x) for x in labels]
    assert {g.partner for g in training if g.name == "checkpoint@0"} == {ModelRef(base="m0")}
    assert [g.meta["learner"] for g in training] == ["AB" if x == "self" else "A" for x in labels]
    held = [g for g in plan.games if g.table == 1]
    assert [g.game for g in held] == heldout_games(cfg, 0)
    assert held[0].meta == {"round": 1, "partner": "bot:hard", "learner": "A", "heldout": True}
    # Round 0 has no earlier model: its checkpoint games are self-play.
    assert {g.name for g in league.plan(0, []).games if g.table == TRAINING} == {"self", "bot:conceder"}
    # Play the held-out table backwards, with metadata that names nobody: collect goes by the plan.
    learner = load_agent("bot:cooperative")
    matches = [Match(g.game, learner, league.agent(g, learner), {"partner": "?"}) for g in reversed(held)]
    played = play_matches(matches, objective(cfg.objective), cfg.rollout.max_messages)
    have = [{}, {ep.id: ep for ep in played}]
    have[0] = {g.game.id: played[0] for g in training}  # stand-ins: only the order is checked here
    games = plan.collect(have)
    assert [ep.id for _, ep in games.heldout[0]] == [g.game.id for g in held]
    assert [g for g, _ in games.training] == training and len(games.episodes) == 8
    assert isinstance(league.plan(0, []).games[0].partner, SelfPartner | BotSpec)
    league.close()


def test_a_partner_that_cannot_be_loaded_stops_the_run_before_anything_runs(tmp_path):
    cfg = prepare_run(config(tmp_path, "no-such-model", partners=[{"agent": "bot:nobody", "share": 1}]), False)
    with pytest.raises(ConfigError, match=r"partners\.0\.agent: bot:nobody"):
        Loop(cfg).run()
    assert RunDir(cfg.run_dir).present_rounds() == []
    cfg = config(tmp_path, "m", name="u", heldout={"partners": ["run:/no/such/run"]})
    with pytest.raises(ConfigError, match=r"heldout\.partners\.0: run:/no/such/run"):
        Loop(prepare_run(cfg, False)).run()


def test_a_league_round_trains_only_on_the_models_sides_and_records_every_partner(parrot_lm, tmp_path):
    cfg = config(
        tmp_path,
        str(parrot_lm),
        rounds=1,
        rollout={"games": 8},
        partners=MIX,
        heldout={"partners": ["bot:hard"], "games": 4},
        tracking=["tensorboard"],
    )
    history = Loop(prepare_run(cfg, False)).run()
    run = RunDir(cfg.run_dir)
    r0, r1 = (read_episodes(run.round(k).episodes) for k in (0, 1))
    # Round 0 has no earlier model: its checkpoint share is self-play. Round 1 meets round 0's model.
    assert Counter(ep.meta["partner"] for ep in r0) == {"self": 6, "bot:conceder": 2}
    assert Counter(ep.meta["partner"] for ep in r1) == {"self": 4, "bot:conceder": 2, "checkpoint@0": 2}
    for ep in r1:
        assert ep.meta["learner"] == ("AB" if ep.meta["partner"] == "self" else "A")
        if ep.meta["partner"] == "checkpoint@0":
            assert "adapter" not in ep.meta["agents"]["B"]  # round 0 played the starting model
    # Round 1 trained on round 0's games: both sides of self-play, the model's side of the rest,
    # and never a held-out game.
    learner = {ep.id: ep.meta["learner"] for ep in r0}
    examples = read_examples(run.round(1).train_data)
    assert examples and all(ex.player in learner[ex.episode_id] for ex in examples)
    sides = [s for s in learner_sides(r0) if has_own_turns(s)]  # filter rule "all"
    assert len(learner_sides(r0)) == 2 * 6 + 2 < len(all_player_episodes(r0))
    assert [(ex.episode_id, ex.player) for ex in examples] == [(s.episode_id, s.player) for s in sides]
    # Held-out games: the same seeded games each round, written apart, with a paired change.
    h0, h1 = (read_episodes(run.round(k).heldout_episodes(0)) for k in (0, 1))
    assert sorted(e.id for e in h0) == sorted(e.id for e in h1) == sorted(g.id for g in heldout_games(cfg, 0))
    assert all(e.meta["partner"] == "bot:hard" and e.meta["agents"]["B"] == "bot:hard" for e in h1)
    rec = history[1]
    assert rec.heldout["bot:hard"]["games"] == 4 and rec.heldout["bot:hard"]["vs_round0"]["games"] == 4
    assert history[0].heldout["bot:hard"].get("vs_round0") is None
    assert set(rec.partners) == {"self", "bot:conceder", "checkpoint@0"}
    assert rec.partners["bot:conceder"]["vs_round0"]["games"] == 2  # same partner, same games as round 0
    assert rec.partners["checkpoint@0"].get("vs_round0") is None
    assert RunDir(cfg.run_dir).records() == history
    logged = scalars(cfg.run_dir / "tensorboard")
    assert [step for step, _ in logged["eval/heldout/bot:hard/reward"]] == [0, 1]
    # The report plots and tables the model with each partner, held-out ones marked.
    page = write_report(cfg.run_dir)[0].read_text()
    assert 'id="plot-partners"' in page and 'id="partners"' in page and "bot:hard *" in page
    assert (cfg.run_dir / "plots" / "partners.png").exists()
    table = partners_table(history)
    assert table is not None and table.row_count == 2 * (3 + 1) - 1  # round 0 met no checkpoint
    # Both of a run's tables fit an 80-column log whole: no line longer, no cell cut short.
    import io

    from rich.console import Console

    log = io.StringIO()
    Console(file=log, width=80, force_terminal=False).print(rounds_table(history), table)
    lines = log.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in log.getvalue()
    assert sum("bot:hard *" in line for line in lines) == 2  # one line per row, not wrapped


def test_a_partner_that_fails_fails_its_games_not_the_run(parrot_lm, tmp_path, monkeypatch):
    from parlay.agents.scripted import RandomBot

    def broken(self, requests):
        raise RuntimeError("the partner's server went away")

    monkeypatch.setattr(RandomBot, "act", broken)
    partners = [{"agent": "self", "share": 0.5}, {"agent": "bot:random", "share": 0.5}]
    cfg = config(tmp_path, str(parrot_lm), rounds=0, rollout={"games": 8}, partners=partners)
    history = Loop(prepare_run(cfg, False)).run()
    episodes = read_episodes(RunDir(cfg.run_dir).round(0).episodes)
    failed = [ep for ep in episodes if ep.outcome.status == "failed"]
    assert len(episodes) == 8 and {ep.meta["partner"] for ep in failed} == {"bot:random"}
    assert "went away" in failed[0].outcome.reason
    assert history[0].partners["bot:random"]["games"] == 4


def test_checkpoint_partners_load_after_a_resume(parrot_lm, tmp_path):
    partners = [{"agent": "self", "share": 0.5}, {"agent": "checkpoint:uniform", "share": 0.5}]
    cfg = config(tmp_path, str(parrot_lm), rounds=1, rollout={"games": 4}, partners=partners)
    Loop(prepare_run(cfg, False)).run()
    more = config(tmp_path, str(parrot_lm), rounds=2, rollout={"games": 4}, partners=partners)
    history = Loop(prepare_run(more, resume=True)).run()
    r2 = read_episodes(RunDir(cfg.run_dir).round(2).episodes)
    met = {ep.meta["partner"] for ep in r2} - {"self"}
    assert met and met <= {"checkpoint@0", "checkpoint@1"}
    assert [r.round for r in history] == [0, 1, 2]
    # Any command takes a round's model by name: run:DIR@K.
    agent = load_agent(f"run:{cfg.run_dir}@1")
    assert agent.spec == f"run:{cfg.run_dir}@1" and agent.model is not None
    agent.close()
