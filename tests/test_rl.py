"""Online RL (weights.scheme: rl): advantages with role baselines, the clipped policy-gradient loss
with its KL anchor, learning from failures, groups of games per context, and bad settings."""

import math

import pytest
import torch

from parlay.config import ConfigError, RLConfig, TrainConfig, WeightConfig, parse_config
from parlay.episode import PlayerEpisode
from parlay.games import objective
from parlay.improve import TrainingDiverged
from parlay.improve.batches import tokenize
from parlay.improve.examples import select_examples
from parlay.improve.sft import _token_logps, policy_gradient_loss, train, weighted_nll
from parlay.improve.weights import rl_advantages
from parlay.loop import Loop
from parlay.rollout import plan_games
from parlay.run import RunDir, prepare_run
from tests.test_loop import config
from tests.test_sft import bot_examples


def side(reward, first, context="c1"):
    return PlayerEpisode("e", "A", [], reward, 0, False, context, first=first)


def test_advantages_compare_each_side_with_the_others_of_its_role():
    sides = [side(4, True), side(2, True), side(0, True), side(6, False), side(2, False), side(9, True, "c2")]
    group = rl_advantages(sides, RLConfig(baseline="group", scale="none"))
    # First speakers on c1: 4 against (2+0)/2, 2 against 2, 0 against 3; second speakers: 6-2, 2-6;
    # the only side of its group has no baseline.
    assert group == [3.0, 0.0, -3.0, 4.0, -4.0, 0.0]
    role = rl_advantages(sides, RLConfig(baseline="role", scale="none"))
    assert role[5] == pytest.approx(9 - (4 + 2 + 0) / 3) and role[3] == 4.0
    scaled = rl_advantages(sides, RLConfig(baseline="group"))
    std = torch.tensor(group).std(unbiased=False).item()
    assert scaled == pytest.approx([a / std for a in group])


def test_the_policy_gradient_loss_by_hand():
    torch.manual_seed(0)
    logp = torch.log(torch.rand(6)).requires_grad_()  # log π of 6 own tokens of two sequences
    row = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = torch.tensor([1.5, -2.0])
    now = logp.detach()
    # At the round-start model (ratio 1) the anchor is 0 and the gradient is REINFORCE's: that of
    # the NLL weighted by the advantage; nothing is clipped and the approximate KL is 0.
    loss, _, figures = policy_gradient_loss(logp, now, row, adv, clip=0.2, kl=0.5)
    nll, _, _ = weighted_nll(logp, row, adv)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(nll, logp)[0], atol=1e-6)
    assert figures.approx_kl == 0 and figures.clipped == 0
    # A positive advantage whose ratio is already above 1 + ε gets no more push (clipped); the
    # anchor alone pulls it back. The KL is the k3 sum: r − 1 − log r = e − 2 per token.
    old = now - 1.0  # the model now gives every sampled token e times the round-start probability
    loss, _, figures = policy_gradient_loss(logp, old, row, torch.tensor([1.0, 1.0]), clip=0.2, kl=0.0)
    assert torch.autograd.grad(loss, logp)[0].abs().max() == 0
    assert figures.clipped == 6 and figures.approx_kl == pytest.approx(6 * (math.e - 2), rel=1e-5)
    anchored, _, _ = policy_gradient_loss(logp, old, row, torch.tensor([1.0, 1.0]), clip=0.2, kl=1.0)
    assert anchored.item() > loss.item() and torch.autograd.grad(anchored, logp)[0].abs().max() > 0


def test_rl_lowers_what_failed_and_raises_what_worked(tiny_lm, tmp_path):
    _, tokenizer, path = tiny_lm
    a, b = bot_examples(1)[:2]
    examples = [a.model_copy(update={"weight": 1.0}), b.model_copy(update={"weight": -1.0})]
    cfg = TrainConfig(lr=3e-3, epochs=6, batch_size=2, grad_accum=1, warmup_steps=0, dtype="float32")
    train(examples, str(path), tmp_path / "rl", cfg, weights=WeightConfig(scheme="rl"), seed=0)

    from parlay.agents.hf import load_model

    stops = {tokenizer.eos_token_id}
    rows, _, _ = tokenize(examples, tokenizer, stops, 1024)

    def mean_own_logp(model):
        out = []
        for own in _token_logps(model, rows, tokenizer.pad_token_id, 2, "cpu", True):
            out.append(sum(own) / len(own))
        return out

    before = mean_own_logp(load_model(str(path), dtype="float32", device="cpu")[0])
    after = mean_own_logp(load_model(str(path), str(tmp_path / "rl"), dtype="float32", device="cpu")[0])
    assert after[0] > before[0] and after[1] < before[1]


def test_selection_keeps_negative_advantages_and_drops_zero_ones(tmp_path):
    from tests.test_evaluate import bot_games

    episodes = bot_games("bot:random", "bot:conceder", n=12, obj="cooperative")
    cfg = parse_config({"filter": {"rule": "all"}, "weights": {"scheme": "rl", "rl": {"baseline": "role"}}})
    selected = select_examples(episodes, cfg.filter, cfg.weights)
    weights = [e.weight for e in selected.examples]
    assert any(w < 0 for w in weights) and any(w > 0 for w in weights) and 0 not in weights


def test_groups_of_games_share_a_context_and_leave_plans_without_groups_as_they_were():
    grouped, plain = plan_games(8, 3, group_size=4), plan_games(8, 3)
    assert [g.id for g in grouped] == [g.id for g in plain]
    assert len({g.context for g in grouped[:4]}) == 1 and len({g.context for g in grouped[4:]}) == 1
    assert grouped[0].context == plain[0].context and grouped[4].context == plain[4].context
    assert plan_games(6, 3, group_size=4)[:6] == grouped[:6]  # a plan's first games do not depend on its size
    assert len({g.seed for g in grouped}) == 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"weights": {"scheme": "rl"}, "filter": {"rule": "all"}}, "rollout.group_size"),
        ({"weights": {"scheme": "rl", "rl": {"baseline": "role"}}}, "filter.rule: all"),
        ({"weights": {"scheme": "rl", "rl": {"kl": -0.1}}, "filter": {"rule": "all"}}, "weights.rl.kl"),
        ({"weights": {"scheme": "rl", "rl": {"clip": 0}}, "filter": {"rule": "all"}}, "weights.rl.clip"),
    ],
)
def test_rl_settings_that_cannot_work_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "c.yaml")


def bot_round_zero(cfg):
    """Round 0's planned games, played by two bots and written where the loop finds them: the
    loop keeps finished games, so its round 0 has deals and failures to learn from."""
    from parlay.agents import load_agent
    from parlay.episode import write_episodes
    from parlay.league import round_games
    from parlay.rollout import play_games

    a, b = load_agent("bot:cooperative"), load_agent("bot:conceder")
    episodes = play_games(a, b, round_games(cfg, 0), objective(cfg.objective), cfg.rollout.max_messages)
    write_episodes(RunDir(cfg.run_dir).round(0).episodes, episodes)
    assert len({ep.rewards[0] for ep in episodes}) > 1


def rl_run(parrot_lm, tmp_path, **train):
    """An RL run of one round on groups of 4 games, whose round 0 the bots played; its records."""
    cfg = config(
        tmp_path,
        str(parrot_lm),
        rounds=1,
        rollout={"games": 8, "group_size": 4},
        weights={"scheme": "rl", "rl": {"baseline": "group"}},
        **({"train": train} if train else {}),
    )
    prepare_run(cfg, False)
    bot_round_zero(cfg)
    return cfg, Loop(cfg).run()


def test_a_diverging_round_is_marked_failed_and_plays_the_previous_model(parrot_lm, tmp_path):
    """A learning rate that turns the loss into NaN: the round says so, keeps the round-0 model,
    and no model folder is written."""
    with pytest.raises(TrainingDiverged):
        cfg = TrainConfig(lr=1e30, epochs=4, batch_size=2, grad_accum=1, warmup_steps=0, dtype="float32")
        train(bot_examples(1), str(parrot_lm), tmp_path / "nan", cfg)
    assert not (tmp_path / "nan").exists()
    cfg, history = rl_run(parrot_lm, tmp_path, lr=1e30, lora=False, min_steps=8)
    info = history[1].train
    assert info is not None and not info.trained and "loss is nan" in (info.failure or "").lower()
    assert history[1].model == history[0].model and not RunDir(cfg.run_dir).round(1).model.exists()


def test_an_rl_round_trains_on_both_signs(parrot_lm, tmp_path):
    cfg, history = rl_run(parrot_lm, tmp_path)
    from parlay.improve.examples import read_examples

    examples = read_examples(RunDir(cfg.run_dir).round(1).train_data)
    assert history[1].train.trained and history[1].train.stats.steps >= 1
    weights = [e.weight for e in examples]
    assert any(w < 0 for w in weights) and any(w > 0 for w in weights) and 0 not in weights
