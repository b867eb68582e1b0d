"""Human proxies: build (manifest), proxy:DIR as an agent, check against references, bad input.

People's games are built here in code (parlay ships no human data); the proxy is a tiny model."""

import hashlib
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from parlay.agents import load_agent
from parlay.agents.base import Agent, Reply
from parlay.config import RunConfig, TrainConfig
from parlay.episode import Episode, read_episodes, write_episodes
from parlay.errors import UserError
from parlay.games import RuleError, all_contexts, objective
from parlay.improve.proxy import build_proxy
from parlay.protocol import Game, message_reply, proposal_reply
from parlay.proxy import ProxyDir, ProxyError
from parlay.rollout import plan_games, play_games
from parlay.specs import ProxySpec, parse_spec, partner_kind

TALK = ["i would like the books", "you can have the hats then", "deal", "ok"]


def human_game(i: int, agree: bool, agents: dict | None = None) -> Episode:
    """A game as two people might play it: a few messages, then complementary selections (or none)."""
    ctx = all_contexts()[i * 37]
    game = Game(ctx, objective("semi-competitive"), first_speaker="AB"[i % 2], max_messages=None)
    for text in TALK[: 2 + i % 3]:
        assert game.step(message_reply(text)).accepted
    if agree:
        mine = tuple(c // 2 for c in ctx.counts)
        first = game.current_player
        game.step(proposal_reply(mine))
        game.step(proposal_reply(tuple(c - m for c, m in zip(ctx.counts, mine, strict=True))))
        assert game.outcome.agreed and first
    else:
        game.end("no_deal", "no agreement")
    meta = {"source": "test"} | ({"agents": agents} if agents else {})
    return Episode.from_game(game, f"h{i}", meta)


def tiny_cfg(path) -> RunConfig:
    return RunConfig(model=str(path), train={"lr": 1e-2, "epochs": 1, "min_steps": 1, "batch_size": 4, "grad_accum": 1})


@pytest.fixture(scope="module")
def human_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("people")
    train, held = root / "train.jsonl", root / "held.jsonl"
    write_episodes(train, [human_game(i, agree=i % 4 != 3) for i in range(8)])
    write_episodes(held, [human_game(i, agree=i != 22) for i in range(20, 24)])
    return train, held


@pytest.fixture(scope="module")
def built(tiny_lm, human_files, tmp_path_factory):
    _, _, path = tiny_lm
    out = tmp_path_factory.mktemp("proxies") / "p"
    manifest = build_proxy(human_files[0], out, tiny_cfg(path), warm_start=None)
    return out, manifest


def test_manifest_records_what_it_learned_from(built, human_files, tiny_lm):
    out, manifest = built
    train = human_files[0]
    assert manifest.episodes == str(train)
    on_disk = json.loads((out / "proxy.json").read_text())
    assert on_disk["episodes_sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert (on_disk["games"], on_disk["agreed_games"]) == (8, 6)
    assert on_disk["sides"] == "auto" and on_disk["side_counts"] == {"A": 8, "B": 8}  # both people of each game
    assert on_disk["examples"] == 16 and on_disk["keep"] == "all"
    assert on_disk["objectives"] == [{"name": "semi-competitive", "lam": 0.0}]
    assert on_disk["base"] == str(tiny_lm[2]) and on_disk["init"] is None and on_disk["warm_start"] is None
    assert on_disk["parlay_version"] and on_disk["train_stats"]["steps"] >= 1
    assert (out / "model" / "adapter_config.json").is_file()
    assert ProxyDir(out).model_ref().adapter == str(out / "model")


def test_a_study_export_imitates_the_person_only(tiny_lm, tmp_path):
    study = tmp_path / "study.jsonl"
    write_episodes(study, [human_game(i, True, {"A": "human", "B": "bot:hard"}) for i in range(3)])
    m = build_proxy(study, tmp_path / "p", tiny_cfg(tiny_lm[2]), warm_start=None)
    assert m.side_counts == {"A": 3, "B": 0}


def test_the_warm_start_on_bot_deals_comes_first(tiny_lm, human_files, tmp_path):
    from parlay.config import WarmStartConfig

    ws = WarmStartConfig(bots=["bot:conceder", "bot:conceder"], games=4, epochs=1.0)
    m = build_proxy(human_files[0], tmp_path / "p", tiny_cfg(tiny_lm[2]), warm_start=ws)
    demos = read_episodes(tmp_path / "p" / "warm_start" / "episodes.jsonl")
    assert len(demos) == 4 and any(ep.agreed for ep in demos)
    assert m.start.adapter == str(tmp_path / "p" / "warm_start" / "model") and m.warm_start["games"] == 4
    assert (tmp_path / "p" / "model" / "adapter_config.json").is_file()


def test_proxy_spec_resolves_and_plays_with_a_bot(built):
    out, _ = built
    spec = parse_spec(f"proxy:{out}")
    assert spec == ProxySpec(str(out)) and str(spec) == f"proxy:{out}" and partner_kind(str(spec)) == "proxy"
    agent = load_agent(spec)
    try:
        assert agent.spec == f"proxy:{out}"
        episodes = play_games(agent, load_agent("bot:conceder"), plan_games(2, 0), objective(0), max_messages=4)
    finally:
        agent.close()
    assert len(episodes) == 2 and all(ep.outcome.status for ep in episodes)
    assert all(ep.meta["agents"]["A"] == f"proxy:{out}" for ep in episodes)


def test_a_proxy_proposes_with_the_selection_step_unless_built_without(built, tiny_lm, human_files, tmp_path):
    """``proxy:DIR`` plays with the selection step (``agents/hf.py``) as its manifest says; a
    manifest written before the setting existed plays with it; ``--no-select`` turns it off."""
    from parlay.agents.resolve import resolve_proxy

    out, manifest = built
    assert manifest.select and resolve_proxy(ProxySpec(str(out))).select
    agent = load_agent(f"proxy:{out}")
    try:
        assert agent.select
    finally:
        agent.close()
    old = tmp_path / "old"
    shutil.copytree(out, old)
    record = json.loads((old / "proxy.json").read_text())
    del record["select"]
    (old / "proxy.json").write_text(json.dumps(record))
    assert ProxyDir(old).manifest().select
    plain = build_proxy(human_files[0], tmp_path / "plain", tiny_cfg(tiny_lm[2]), warm_start=None, select=False)
    assert not plain.select and not resolve_proxy(ProxySpec(str(tmp_path / "plain"))).select


def test_only_a_check_played_as_the_proxy_plays_can_refuse_it(built, tmp_path):
    """A check with the other proposal setting (``proxy check --no-select``) does not decide
    whether the proxy, which plays with the selection step, is refused."""
    out = tmp_path / "p"
    shutil.copytree(built[0], out)
    record = json.loads((out / "proxy.json").read_text())
    check = {"episodes": "h.jsonl", "episodes_sha256": "0", "games": 4, "sides": "AB", "human_turns": 8,
             "human_tokens": 80, "loglik_proxy": -1.0, "loglik_base": -2.0, "loglik_turn_proxy": -1.0,
             "loglik_turn_base": -2.0, "human_agreement": 0.75, "human_reward": 5.0, "proxy_games": 4,
             "proxy_agreement": 0.0, "proxy_reward": 0.0, "attempts": 10, "accepted": 2, "acceptance": 0.2,
             "max_messages": 4, "seed": 0}  # fmt: skip
    assert record["select"] is True
    (out / "check.json").write_text(json.dumps(check | {"select": False}))
    assert ProxyDir(out).playable().adapter == str(out / "model")
    for select in (True, None):  # the same setting, or a check from before the setting was recorded
        (out / "check.json").write_text(json.dumps(check | {"select": select}))
        with pytest.raises(ProxyError, match="rejected 80%"):
            ProxyDir(out).playable()


def _reference_logliks(model, tokenizer, episodes: list[Episode]) -> tuple[float, float]:
    """Mean log-lik per token and per turn of every assistant turn (content + <|im_end|>), plain torch."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, count, per_turn = 0.0, 0, []
    for ep in episodes:
        for seat in "AB":
            msgs = ep.transcripts[seat]
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                prefix = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                start = len(tokenizer(prefix, add_special_tokens=False).input_ids)
                stop = start + len(tokenizer(m["content"], add_special_tokens=False).input_ids)
                assert ids[stop] == end
                turn = [logp[t - 1, ids[t]].item() for t in range(start, stop + 1)]
                total, count = total + sum(turn), count + len(turn)
                per_turn.append(sum(turn) / len(turn))
    return total / count, sum(per_turn) / len(per_turn)


def test_check_against_references(built, human_files, tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from parlay.agents.base import Sampling
    from parlay.evaluate.proxy import check_proxy

    _, tokenizer, base_path = tiny_lm
    out = tmp_path / "p"
    shutil.copytree(built[0], out)  # the check's record would refuse the shared proxy as a partner
    held = read_episodes(human_files[1])
    # float32, as the references below (dtype auto would pick bf16 on a CPU with native bf16)
    train = TrainConfig(dtype="float32")
    check = check_proxy(out, human_files[1], sampling=Sampling(max_new_tokens=8), max_messages=4, train=train)

    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    assert check.loglik_base == pytest.approx(_reference_logliks(base, tokenizer, held)[0], abs=1e-4)
    assert check.loglik_turn_base == pytest.approx(_reference_logliks(base, tokenizer, held)[1], abs=1e-4)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out / "model")
    per_token, per_turn = _reference_logliks(tuned.merge_and_unload().eval(), tokenizer, held)
    assert check.loglik_proxy == pytest.approx(per_token, abs=1e-4)
    assert check.loglik_turn_proxy == pytest.approx(per_turn, abs=1e-4)
    assert check.loglik_proxy > check.loglik_base  # trained on the same kind of talk

    assert check.games == 4 and check.human_agreement == 0.75
    assert check.human_reward == pytest.approx(sum(sum(e.rewards) / 2 for e in held) / 4)
    played = read_episodes(out / "check_games.jsonl")
    assert [ep.game_context() for ep in played] == [ep.game_context() for ep in held]
    assert [ep.first_speaker for ep in played] == [ep.first_speaker for ep in held]
    assert check.proxy_agreement == sum(ep.agreed for ep in played) / 4
    turns = [t for ep in played for t in ep.turns]
    assert (check.attempts, check.accepted) == (len(turns), sum(t.accepted for t in turns))
    # A random tiny model speaks no protocol: rejected on most turns, so refused as a partner from now on.
    assert check.acceptance < 0.5
    with pytest.raises(ProxyError, match="rejected"):
        load_agent(f"proxy:{out}")


class _Closer(Agent):
    """Carries on from the people's talk by the rules of ``how``: ``"split"`` proposes what its
    seat kept in the people's game (known here by game id), ``"extremes"`` proposes nothing first
    and everything second (a deal, not the people's), ``"talk"`` only ever sends a message."""

    spec = "closer"

    def __init__(self, how: str, people: list[Episode]) -> None:
        self.how, self.kept = how, {ep.id: ep.outcome.proposals for ep in people if ep.agreed}

    def act(self, requests):
        replies = []
        for r in requests:
            people_id = r.game_id.split("-", 2)[-1]
            if self.how == "talk" or people_id not in self.kept or not r.game_id.startswith("close-"):
                replies.append(Reply(message_reply("what do you think")))
            elif self.how == "split":
                replies.append(Reply(proposal_reply(tuple(self.kept[people_id][r.player]))))
            else:
                keep = r.context.counts if r.proposal_owed else (0, 0, 0)
                replies.append(Reply(proposal_reply(tuple(keep))))
        return replies


CLOSERS = [("split", 1.0, 1.0), ("extremes", 1.0, 0.0), ("talk", 0.0, 0.0)]


@pytest.mark.parametrize(("how", "agreement", "same"), CLOSERS)
def test_closing_the_peoples_deals(built, human_files, tmp_path, how, agreement, same):
    """The proxy carries on from each agreed held game's own messages: the figures are what the
    rules make of three scripted closers (the people's split, a deal of extremes, talk only)."""
    from parlay.evaluate.proxy import CLOSE_MESSAGES, check_proxy

    out = tmp_path / "p"
    shutil.copytree(built[0], out)
    held = read_episodes(human_files[1])
    check = check_proxy(out, human_files[1], max_messages=4, load=lambda spec, sampling: _Closer(how, held))
    agreed = [ep for ep in held if ep.agreed]
    assert check.close_games == len(agreed) == 3 and check.close_messages == CLOSE_MESSAGES
    assert (check.close_agreement, check.close_same_split) == (agreement, same)
    closed = read_episodes(out / "check_closing.jsonl")
    for game, people in zip(closed, agreed, strict=True):
        talk = [t.text for t in people.turns if t.kind == "message"]
        assert [t.text for t in game.turns[: len(talk)]] == talk  # the people's own messages first
        assert game.game_context() == people.game_context() and game.first_speaker == people.first_speaker
        assert game.meta["opening"] == len(talk)  # the replayed turns are marked as not the proxy's
        if how == "talk":  # the cap counts the proxy's own messages only
            messages = sum(t.accepted and t.kind == "message" for t in game.turns)
            assert messages == game.max_messages == len(talk) + CLOSE_MESSAGES and not game.agreed
    assert len(read_episodes(out / "check_games.jsonl")) == len(held)  # the games with itself, apart


def test_an_opening_the_protocol_refuses_is_named():
    from parlay.rollout import GameSpec, start_game

    ctx = all_contexts()[5]
    spec = GameSpec("g1", ctx, "A", 0, opening=(message_reply("hi"), "no tag here"))
    with pytest.raises(RuleError, match=r"game g1: reply 2 of its opening rejected"):
        start_game(spec, objective(0), 4)
    game = start_game(GameSpec("g2", ctx, "A", 0, opening=(message_reply("hi"),) * 3), objective(0), 2)
    assert game.n_messages == 3 and game.max_messages == 5 and game.current_player == "B"


def test_cli_check_prints_the_table_and_fails_a_proxy_the_protocol_rejects(built, human_files, tmp_path):
    from parlay.cli import app

    out = tmp_path / "p"
    shutil.copytree(built[0], out)
    args = ["proxy", "check", str(out), "--episodes", str(human_files[1]), "-n", "2", "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, [*args, "--max-messages", "4"], terminal_width=80)
    assert result.exit_code == 2, result.output
    assert "log-lik per token" in result.output and "replies accepted" in result.output
    assert "selection step" in result.output  # played with it, as built
    assert json.loads((out / "check.json").read_text())["select"] is True
    assert max(len(line) for line in result.stdout.splitlines()) <= 80  # the table; a log line stays whole
    assert "rejected" in result.output


def test_a_check_with_the_other_proposal_setting_is_filed_apart_and_refuses_nothing(built, human_files, tmp_path):
    """``proxy check --no-select`` on a proxy that plays with the selection step: its figures go to
    ``check_sampled*``, the proxy's own failing check stays in ``check.json`` and keeps refusing it."""
    from parlay.cli import app

    out = tmp_path / "p"
    shutil.copytree(built[0], out)
    args = ["proxy", "check", str(out), "--episodes", str(human_files[1]), "-n", "2", "--max-new-tokens", "8"]
    own = CliRunner().invoke(app, [*args, "--max-messages", "4"], terminal_width=80)
    assert own.exit_code == 2 and "while this is its last check" in own.output
    before = (out / "check.json").read_text()
    other = CliRunner().invoke(app, [*args, "--max-messages", "4", "--no-select"], terminal_width=80)
    assert other.exit_code == 2 and "does not refuse it" in other.output, other.output
    assert (out / "check.json").read_text() == before
    assert json.loads((out / "check_sampled.json").read_text())["select"] is False
    assert (out / "check_sampled_games.jsonl").is_file() and (out / "check_sampled_closing.jsonl").is_file()
    with pytest.raises(ProxyError, match="rejected"):
        load_agent(f"proxy:{out}")


def test_cli_set_without_a_config_changes_only_what_it_names(tiny_lm, human_files, tmp_path):
    """``proxy build --set KEY=V`` without -c applies V on top of the default recipe: the warm start
    plays the games asked for (it was the built-in 128 whatever --set said), and the recipe's
    other settings stay (README: "after first imitating the valid deals of 128 games"; lr 5e-4)."""
    from parlay.cli import app

    out = tmp_path / "p"
    sets = ["warm_start.games=2", "train.batch_size=4", "train.grad_accum=1", "train.min_steps=1"]
    args = ["proxy", "build", "--episodes", str(human_files[0]), "--out", str(out), "--model", str(tiny_lm[2])]
    result = CliRunner().invoke(app, [*args, *[x for kv in sets for x in ("--set", kv)], "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert len(read_episodes(out / "warm_start" / "episodes.jsonl")) == 2
    manifest = json.loads((out / "proxy.json").read_text())
    assert manifest["warm_start"]["games"] == 2 and manifest["warm_start"]["bots"] == ["bot:conceder"] * 2
    assert manifest["lr"] == 5e-4


# ------------------------------------------------------------------ bad input


def test_no_agreed_games_is_refused_before_training(tiny_lm, tmp_path):
    bad = tmp_path / "nodeal.jsonl"
    write_episodes(bad, [human_game(i, agree=False) for i in range(3)])
    with pytest.raises(UserError, match=f"{bad}: none of its 3 games ended in a deal"):
        build_proxy(bad, tmp_path / "p", tiny_cfg(tiny_lm[2]), warm_start=None)
    assert not (tmp_path / "p").exists()


def test_no_turns_of_the_imitated_side_is_refused(tiny_lm, tmp_path):
    bots = tmp_path / "bots.jsonl"  # a study-like export where no seat is a person
    write_episodes(bots, [human_game(i, True, {"A": "bot:hard", "B": "bot:hard"}) for i in range(2)])
    with pytest.raises(UserError, match=f"{bots}: no turns of the side"):
        build_proxy(bots, tmp_path / "p", tiny_cfg(tiny_lm[2]), warm_start=None)
    assert not (tmp_path / "p").exists()


def test_a_folder_that_is_not_a_proxy(tmp_path, human_files):
    from parlay.evaluate.proxy import check_proxy

    with pytest.raises(ProxyError, match="not a proxy folder"):
        load_agent(f"proxy:{tmp_path}")
    with pytest.raises(ProxyError, match="not a proxy folder"):
        check_proxy(tmp_path, human_files[1])


def test_checking_on_its_own_training_file_is_refused(built, human_files):
    from parlay.evaluate.proxy import check_proxy

    with pytest.raises(UserError, match="trained on this very file"):
        check_proxy(built[0], human_files[0])


def test_the_web_checks_accept_a_proxy(built, tmp_path):
    from parlay.web.checks import _check

    assert "proxy folder found" in _check(f"proxy:{built[0]}")
    with pytest.raises(ValueError, match="not a proxy folder"):
        _check(f"proxy:{tmp_path}")
