"""The trainer: the assistant-only mask, the weighted loss, and a tiny model that really learns."""

import contextlib
import json
import math
import re
import resource
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from transformers.utils.import_utils import is_torch_greater_or_equal

from parlay.agents import load_agent
from parlay.agents.hf_layer import TemplateError, assistant_mask, stop_ids
from parlay.config import TrainConfig, WeightConfig
from parlay.episode import player_episodes
from parlay.games import objective
from parlay.improve import TrainDataError
from parlay.improve.examples import TrainExample, read_examples, write_examples
from parlay.improve.sft import checkpoint_file, train, weighted_nll
from parlay.rollout import plan_games, play_games
from tests.conftest import tiny_tokenizer


def bot_examples(n_games: int = 6) -> list[TrainExample]:
    bot = load_agent("bot:cooperative")
    episodes = play_games(bot, bot, plan_games(n_games, 3), objective("cooperative"), 6)
    return [TrainExample(messages=pe.messages, reward=pe.reward) for ep in episodes for pe in player_episodes(ep)]


def test_mask_covers_exactly_the_players_own_turns_and_their_end_tokens():
    tok = tiny_tokenizer()
    for ex in bot_examples(3):
        ids, mask = assistant_mask(tok, ex.messages)
        assert len(ids) == len(mask)
        own = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
        expected = "".join(m["content"] + "<|im_end|>" for m in ex.messages if m["role"] == "assistant")
        assert own == expected
        # …and nothing of the system prompt, the partner's turns or the role headers.
        context = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert all(m["content"] in context for m in ex.messages if m["role"] != "assistant")
        assert context.count("<|im_start|>assistant") == sum(m["role"] == "assistant" for m in ex.messages)


def test_a_template_that_does_not_close_an_assistant_turn_is_refused_naming_the_boundary():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(TemplateError, match=r"writes '\|.*' after an assistant turn"):
        assistant_mask(tok, bot_examples(1)[0].messages)


def test_a_template_that_rewrites_a_message_is_refused():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(TemplateError, match="changes the text of a message"):
        assistant_mask(tok, bot_examples(1)[0].messages)


def test_weighted_nll_by_hand():
    # Two sequences with 2 and 1 own tokens; every token costs ln 2 (a uniform choice of two).
    ln2 = torch.log(torch.tensor(2.0))
    logp, row = torch.full((3,), -ln2.item()), torch.tensor([0, 0, 1])
    w = torch.tensor([1.0, 3.0])
    loss, seq_logp, factor = weighted_nll(logp, row, w)
    assert loss.item() == pytest.approx(((2 * 1 + 1 * 3) * ln2 / 3).item())
    assert seq_logp.tolist() == pytest.approx([-ln2.item(), -ln2.item()]) and factor.tolist() == [1.0, 1.0]
    zero, _, _ = weighted_nll(logp, row, torch.zeros(2))
    assert zero.item() == 0
    # Divided by the step's own tokens, not the micro-batch's.
    share, _, _ = weighted_nll(logp, row, w, own_tokens=6)
    assert share.item() == pytest.approx(loss.item() / 2)
    # A reweighting (iw-SFT's) multiplies the weights, from the same forward pass.
    doubled, _, factor = weighted_nll(logp, row, w, reweight=lambda lp: torch.full_like(lp, 2.0))
    assert doubled.item() == pytest.approx(2 * loss.item()) and factor.tolist() == [2.0, 2.0]


def test_stop_tokens_come_from_the_tokenizer_and_its_template():
    tok = tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tok) == {end}
    # A template whose turns end with another special token: that token stops a reply too.
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|eot|>{% endfor %}" + (
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    eot = tok.convert_tokens_to_ids("<|eot|>")

    from transformers import GenerationConfig

    assert stop_ids(tok, GenerationConfig(eos_token_id=[end, 5])) == {end, eot, 5}


def _tensors(path):
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def test_lora_training_lowers_the_loss_changes_the_adapter_and_leaves_the_base_alone(tiny_lm, tmp_path):
    _, _, path = tiny_lm
    base_before = _tensors(path / "model.safetensors")
    examples = bot_examples(4)
    cfg = TrainConfig(lr=3e-3, epochs=6, batch_size=4, grad_accum=2, warmup_steps=0)
    stats = train(examples, str(path), tmp_path / "round1", cfg, seed=0)
    assert stats.steps >= 4 and stats.loss_last < stats.loss_first - 0.1
    assert all(b < a for a, b in zip(stats.losses, stats.losses[1:], strict=False))
    assert stats.own_tokens > 0 and stats.tokens > stats.own_tokens
    adapter1 = _tensors(tmp_path / "round1" / "adapter_model.safetensors")
    # Continue from that adapter for a second round: the adapter moves again, the base never.
    train(examples, str(path), tmp_path / "round2", cfg, adapter=str(tmp_path / "round1"), epochs=1)
    adapter2 = _tensors(tmp_path / "round2" / "adapter_model.safetensors")
    lora_b = [k for k in adapter1 if "lora_B" in k]
    assert lora_b and all(adapter1[k].abs().sum() > 0 for k in lora_b)  # B starts at zero
    assert any(not torch.equal(adapter1[k], adapter2[k]) for k in adapter1)
    base_after = _tensors(path / "model.safetensors")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert not (tmp_path / "round1.partial").exists()


def test_full_fine_tuning_changes_every_trained_weight(tiny_lm, tmp_path):
    _, _, path = tiny_lm
    before = _tensors(path / "model.safetensors")
    cfg = TrainConfig(lora=False, lr=1e-3, epochs=2, batch_size=4, grad_accum=1, warmup_steps=0)
    stats = train(bot_examples(2), str(path), tmp_path / "full", cfg)
    after = _tensors(tmp_path / "full" / "model.safetensors")
    assert stats.loss_last < stats.loss_first
    assert sum(not torch.equal(before[k], after[k]) for k in before) == len(before)
    assert (tmp_path / "full" / "tokenizer_config.json").exists()


def test_iw_sft_recomputes_its_factor_and_zero_weights_learn_nothing(tiny_lm, tmp_path):
    _, _, path = tiny_lm
    examples = bot_examples(2)
    cfg = TrainConfig(lr=3e-3, epochs=3, batch_size=4, grad_accum=1, warmup_steps=0)
    stats = train(examples, str(path), tmp_path / "iw", cfg, weights=WeightConfig(scheme="iw_sft", w_max=2.0))
    # At the first step theta = pi_ref (factor 1); as theta learns the data, the ratio grows.
    assert stats.mean_iw is not None and 1.0 < stats.mean_iw <= 2.0
    zero = [e.model_copy(update={"weight": 0.0}) for e in examples]
    stats0 = train(zero, str(path), tmp_path / "zero", cfg)
    adapter = _tensors(tmp_path / "zero" / "adapter_model.safetensors")
    assert stats0.loss_last == 0 and all(adapter[k].abs().sum() == 0 for k in adapter if "lora_B" in k)


class Killed(BaseException):
    """Stands for a kill: nothing in the trainer may catch it."""


def kill_at(step):
    """A step hook that kills the training when optimiser step ``step`` is done."""

    def hook(done, of, loss, tokens):
        if done == step:
            raise Killed

    return hook


def recorder(seen):
    """A step hook that notes each optimiser step done."""
    return lambda done, of, loss, tokens: seen.append(done)


@pytest.mark.parametrize("weights", [None, WeightConfig(scheme="iw_sft", w_max=2.0)], ids=["uniform", "iw_sft"])
def test_a_killed_training_resumes_from_its_checkpoint_to_the_same_weights(tiny_lm, tmp_path, weights):
    _, _, path = tiny_lm
    examples = bot_examples(4)
    cfg = TrainConfig(
        lr=3e-3, epochs=4, batch_size=2, grad_accum=2, warmup_steps=2, checkpoint_steps=3, dtype="float32"
    )
    whole = train(examples, str(path), tmp_path / "whole", cfg, weights=weights, seed=5)
    assert whole.steps > 7 and not checkpoint_file(tmp_path / "whole").exists()

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(examples, str(path), out, cfg, weights=weights, seed=5, on_step=kill_at(7))
    assert checkpoint_file(out).exists() and not out.exists()  # steps 1-6 saved, step 7 lost with the kill
    # A kill while a checkpoint was being written leaves a partial folder: never read.
    torn = checkpoint_file(out).with_name(out.name + ".checkpoint.partial")
    torn.mkdir()
    (torn / "trainer.json").write_bytes(b"torn")
    steps_seen = []
    resumed = train(examples, str(path), out, cfg, weights=weights, seed=5, resume=True, on_step=recorder(steps_seen))
    assert steps_seen[0] == 7  # went on after the checkpoint at step 6
    assert resumed.losses == whole.losses and resumed.tokens == whole.tokens and resumed.mean_iw == whole.mean_iw
    a, b = _tensors(tmp_path / "whole" / "adapter_model.safetensors"), _tensors(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same final weights, bit for bit
    assert not checkpoint_file(out).exists()


def test_a_checkpoint_of_other_data_or_without_resume_is_not_continued(tiny_lm, tmp_path, caplog):
    _, _, path = tiny_lm
    examples = bot_examples(2)
    cfg = TrainConfig(lr=3e-3, epochs=4, batch_size=2, grad_accum=1, checkpoint_steps=2, dtype="float32")
    out = tmp_path / "out"
    with pytest.raises(Killed):
        train(examples, str(path), out, cfg, on_step=kill_at(3))
    assert checkpoint_file(out).exists()
    seen = []
    train(examples[:2], str(path), out, cfg, resume=True, on_step=recorder(seen))
    assert seen[0] == 1 and "other data or settings" in caplog.text  # other data: from the start
    with pytest.raises(Killed):
        train(examples, str(path), out, cfg, on_step=kill_at(3))
    seen.clear()
    train(examples, str(path), out, cfg, on_step=recorder(seen))  # no resume: from the start
    assert seen[0] == 1 and not checkpoint_file(out).exists()
    checkpoint_file(out).mkdir()
    (checkpoint_file(out) / "trainer.json").write_bytes(b"not a checkpoint")
    seen.clear()
    train(examples, str(path), out, cfg, resume=True, on_step=recorder(seen))
    assert seen[0] == 1 and "unreadable training checkpoint" in caplog.text


def test_training_data_errors_name_the_line(tmp_path):
    write_examples(tmp_path / "train.jsonl", bot_examples(1))
    assert len(read_examples(tmp_path / "train.jsonl")) == 2
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write(json.dumps({"messages": "not a list"}) + "\n")
    with pytest.raises(TrainDataError, match=r"train.jsonl:3"):
        read_examples(tmp_path / "train.jsonl")
    no_own = [TrainExample(messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])]
    with pytest.raises(TrainDataError, match="own tokens"):
        train(no_own, "unused", tmp_path / "out", TrainConfig())


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_train_as_one_process_does(tiny_lm, tmp_path):
    """Two CPU processes (DDP over gloo) through `accelerate launch -m parlay sft`, as on several
    GPUs, with 2 examples each per step, against one process with 4 per step: the same examples
    in every step, so the same losses and the same weights, up to the order of float additions
    (stated tolerance: 1e-5 relative on losses, 1e-5 absolute on weights)."""
    import os
    import subprocess
    import sys

    _, _, path = tiny_lm
    write_examples(tmp_path / "train.jsonl", bot_examples(4))  # 8 sides: whole steps of 4
    common = "  grad_accum: 1\n  dtype: float32\n  lr: 3.0e-3\n  epochs: 3\n  warmup_steps: 2\n"
    (tmp_path / "two.yaml").write_text("train:\n  batch_size: 2\n" + common)
    (tmp_path / "one.yaml").write_text("train:\n  batch_size: 4\n" + common)
    sft = ["-m", "parlay", "sft", str(tmp_path / "train.jsonl"), "--model", str(path), "--seed", "3"]
    # --multi_gpu is torchrun's launcher; without a GPU its processes meet over gloo (--cpu would
    # run a single process).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    runs = {
        "two": [*launch, "--num_processes", "2", *sft],
        "one": [sys.executable, *sft],
    }
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # processes on the CPU, even on a GPU machine
    for name, cmd in runs.items():
        files = [
            "--out",
            str(tmp_path / name),
            "-c",
            str(tmp_path / f"{name}.yaml"),
            "--stats",
            f"{tmp_path}/{name}.json",
        ]
        r = subprocess.run([*cmd, *files], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["steps"] == two["steps"] == 6 and one["loss_last"] < one["loss_first"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    a, b = (_tensors(tmp_path / n / "adapter_model.safetensors") for n in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)


# --------------------------------------------------------------------------- exact step gradients

SHORT_REPLY = "hi"  # 3 own tokens with its end-of-turn token
LONG_REPLY = "[message] " + "I want the books and you take the hats. " * 4  # 60 own tokens


def mixed_examples(scheme: str) -> list[TrainExample]:
    """Four examples of very different lengths (short, long, short, long) and weights (signed
    advantages under rl): a step over them weighs every own token alike only if its loss is
    divided by the step's own tokens, not averaged over micro-batches."""
    weights = [1.5, -1.0, 0.5, 2.0] if scheme == "rl" else [1.5, 0.5, 1.0, 2.0]
    return [
        TrainExample(
            messages=[
                {"role": "system", "content": "You negotiate books, hats and balls."},
                {"role": "user", "content": "The negotiation starts now."},
                {"role": "assistant", "content": reply},
            ],
            weight=w,
        )
        for reply, w in zip([SHORT_REPLY, LONG_REPLY] * 2, weights, strict=True)
    ]


class StepRecorder:
    """Every optimiser step's trainable parameters and gradients as the optimiser sees them just
    before it steps, and the parameters after the last step (global optimiser hooks: nothing of the
    trainer is touched)."""

    def __init__(self):
        self.steps: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.after: list[torch.Tensor] = []

    @staticmethod
    def _params(optimizer):
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _before(self, optimizer, args, kwargs):
        params = self._params(optimizer)
        self.steps.append(([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params]))

    def _after(self, optimizer, args, kwargs):
        self.after = [p.detach().clone() for p in self._params(optimizer)]

    def __enter__(self):
        self.handles = [register_optimizer_step_pre_hook(self._before), register_optimizer_step_post_hook(self._after)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def reference_model(path, cfg: TrainConfig, params: list[torch.Tensor]):
    """The model as plain transformers (and peft) build it, its trainable weights set to ``params``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.lora:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules)
        model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.shape for p in trainable] == [p.shape for p in params]
    with torch.no_grad():
        for p, value in zip(trainable, params, strict=True):
            p.copy_(value)
    return model.eval(), trainable


def own_logps(model, tokenizer, examples):
    """log π of each own target token of each example: one plain forward pass per example."""
    out = []
    for ex in examples:
        ids, mask = assistant_mask(tokenizer, ex.messages)
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append(logp[torch.tensor(mask[1:], dtype=torch.bool)])
    return out


def by_hand_loss(logps, start_logps, examples, weights: WeightConfig):
    """One step's loss over all examples as one batch, from the formulas: the sum over every own
    token of its weighted loss, divided by the number of own tokens; and the unweighted NLL per own token."""
    total = sum(len(lp) for lp in logps)
    terms = []
    for lp, old, ex in zip(logps, start_logps, examples, strict=True):
        if weights.scheme == "rl":  # PPO's clipped surrogate on the ratio to the round-start model + the k3 anchor
            ratio, eps = torch.exp(lp - old), weights.rl.clip
            surrogate = -torch.minimum(ratio * ex.weight, ratio.clamp(1 - eps, 1 + eps) * ex.weight)
            terms.append((surrogate + weights.rl.kl * (torch.exp(old - lp) + (lp - old) - 1)).sum())
        else:
            factor = 1.0
            if weights.scheme == "iw_sft":  # exp(T · mean log-ratio), clipped, not differentiated
                factor = torch.exp(weights.iw_temperature * (lp.mean().detach() - old.mean())).clamp(0, weights.w_max)
            terms.append(-(ex.weight * factor * lp).sum())
    nll = -sum(lp.sum() for lp in logps).item() / total
    return sum(terms) / total, nll


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def assert_one_big_batch(path, tokenizer, examples, weights: WeightConfig, cfg: TrainConfig, rec: StepRecorder, stats):
    """The optimiser steps ``rec`` saw against the same steps computed here with plain torch on all
    the examples as one batch (every step takes them all): the loss from its formula, its gradient
    by autograd, a plain AdamW. The same gradients and logged losses within 1e-5 relative, and the
    same weights within 1e-4 of the update (AdamW divides each gradient element by its own size,
    which magnifies float rounding where a gradient is near zero; the gradients agree to ~1e-7)."""
    assert stats.steps == len(rec.steps) >= 2
    model, trainable = reference_model(path, cfg, rec.steps[0][0])
    with torch.no_grad():
        start_logps = own_logps(model, tokenizer, examples)
    adamw = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    for s, (_, grads) in enumerate(rec.steps):
        loss, nll = by_hand_loss(own_logps(model, tokenizer, examples), start_logps, examples, weights)
        adamw.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)  # torch's own clipping
        assert stats.grad_norms[s] == pytest.approx(norm.item(), rel=1e-5)
        want, got = flat(p.grad for p in trainable), flat(grads)
        assert (got - want).norm() <= 1e-5 * want.norm(), f"step {s + 1}: {((got - want).norm() / want.norm()):.1e}"
        assert stats.losses[s] == pytest.approx(loss.item(), rel=1e-5)
        if s in (0, len(rec.steps) - 1):
            assert (stats.nll_first if s == 0 else stats.nll_last) == pytest.approx(nll, rel=1e-5)
        adamw.step()
    start, want, got = flat(rec.steps[0][0]), flat(p.detach() for p in trainable), flat(rec.after)
    assert (got - want).norm() <= 1e-4 * (want - start).norm()


def step_config(lora: bool, batch_size: int, grad_accum: int, max_grad_norm: float | None = 1.0) -> TrainConfig:
    """Two optimiser steps of four examples each (batch × accumulation × processes = 4)."""
    lr = 2e-2 if lora else 2e-3  # enough for the second step's model to differ from the first's
    return TrainConfig(
        lora=lora, lr=lr, epochs=2, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=0, dtype="float32",
        max_grad_norm=max_grad_norm,
    )  # fmt: skip


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("scheme", ["uniform", "awr", "judge", "iw_sft", "rl"])
def test_accumulated_steps_have_the_gradient_of_one_big_batch(tiny_lm, tmp_path, scheme, lora):
    """Batch 1 × accumulation 4 over examples of 3 and 60 own tokens, two optimiser steps, as one
    batch of four would have them (``assert_one_big_batch``). The code this replaced, which
    averaged per-micro-batch token means, is 120-260 % off in the gradient here."""
    _, tokenizer, path = tiny_lm
    examples, weights, cfg = mixed_examples(scheme), WeightConfig(scheme=scheme, w_max=3.0), step_config(lora, 1, 4)
    with StepRecorder() as rec:
        stats = train(examples, str(path), tmp_path / "out", cfg, weights=weights, seed=1)
    assert_one_big_batch(path, tokenizer, examples, weights, cfg, rec, stats)


@pytest.mark.parametrize("scheme", ["uniform", "iw_sft", "rl"])
@pytest.mark.parametrize("shape", [(2, 2), (4, 1)], ids=["2x2", "4x1"])
def test_micro_batches_of_several_rows_share_their_head_and_keep_the_gradient_clipped(
    tiny_lm, tmp_path, monkeypatch, scheme, shape
):
    """Micro-batches of two and four rows, sorted by length within the step, whose common head
    (system prompt and first user turn) runs once for the whole step (``losses.StepHead``): the same
    clipped gradients, losses and weights as one batch computed by hand with every row whole,
    clipped by torch's ``clip_grad_norm_`` to a norm small enough that every step is clipped."""
    from parlay.improve import losses

    _, tokenizer, path = tiny_lm
    shared, heads = [], []
    real_rest, real_run = losses.StepHead.rest, losses.StepHead.run.__func__
    monkeypatch.setattr(losses.StepHead, "rest", lambda h, m, b: shared.append(b.shared) or real_rest(h, m, b))
    monkeypatch.setattr(
        losses.StepHead,
        "run",
        classmethod(lambda c, m, ids, detached=True: heads.append(detached) or real_run(c, m, ids, detached)),
    )
    examples, weights = mixed_examples(scheme), WeightConfig(scheme=scheme, w_max=3.0)
    cfg = step_config(True, *shape, max_grad_norm=0.01)
    with StepRecorder() as rec:
        stats = train(examples, str(path), tmp_path / "out", cfg, weights=weights, seed=1)
    assert shared and min(shared) >= 16 and all(n > 0.01 for n in stats.grad_norms)
    assert sum(heads) == stats.steps and len(shared) >= stats.steps * 4 // shape[0]  # one step head a step
    assert_one_big_batch(path, tokenizer, examples, weights, cfg, rec, stats)


@pytest.mark.parametrize(
    ("scheme", "modules"), [("uniform", "all-linear"), ("rl", "all-linear"), ("uniform", ["q_proj"])]
)
def test_micro_batches_cut_to_a_token_budget_keep_the_gradient_of_one_big_batch(
    tiny_lm, tmp_path, monkeypatch, scheme, modules
):
    """``train.micro_batch_tokens`` cuts batch 4 × accumulation 1 into micro-batches of at most that
    many padded positions (a row longer than it alone): each micro-batch the trainer ran keeps to
    the budget, two ran per step where one was configured, and the steps have the gradient, loss
    and weights of one batch computed by hand — also with LoRA on the queries only, where the
    shared head's first keys and values take no gradient and the later ones do."""
    from parlay.improve import sft

    _, tokenizer, path = tiny_lm
    examples, weights = mixed_examples(scheme), WeightConfig(scheme=scheme, w_max=3.0)
    longest = max(len(tokenizer.apply_chat_template(e.messages, tokenize=True, return_dict=False)) for e in examples)
    budget = 2 * longest  # two of the longest rows fit; four never do
    ran, real = [], sft.collate
    monkeypatch.setattr(sft, "collate", lambda rows, *a, **k: ran.append(rows) or real(rows, *a, **k))
    cfg = step_config(True, 4, 1).model_copy(update={"micro_batch_tokens": budget, "target_modules": modules})
    with StepRecorder() as rec:
        stats = train(examples, str(path), tmp_path / "out", cfg, weights=weights, seed=1)
    trained = [rows for rows in ran if len(rows) < 4]  # (rl's first pass scores the rows four at a time)
    assert len(trained) == 2 * stats.steps and all(
        len(rows) * max(len(r.ids) for r in rows) <= budget for rows in trained
    )
    assert_one_big_batch(path, tokenizer, examples, weights, cfg, rec, stats)


def test_the_automatic_token_budget_keeps_the_same_activation_bytes_in_every_dtype(tiny_lm, tmp_path, monkeypatch):
    """``micro_batch_tokens: auto`` (the default) is 1024 positions of two bytes each: 1024 in bf16 and
    float16, 512 in float32, which is what a float32 training hands to ``batches.plan``; a number is
    itself, null leaves micro-batches whole, and anything else is refused when the config is read."""
    from pydantic import ValidationError

    from parlay.improve import sft

    assert TrainConfig().micro_batch_tokens == "auto"
    budgets = {dtype: sft.micro_batch_budget("auto", dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    assert budgets == {torch.bfloat16: 1024, torch.float16: 1024, torch.float32: 512}
    assert sft.micro_batch_budget(300, torch.float32) == 300 and sft.micro_batch_budget(None, torch.bfloat16) is None
    for bad in ("big", 8, 1.5, True):
        with pytest.raises(ValidationError, match="micro_batch_tokens"):
            TrainConfig(micro_batch_tokens=bad)
    planned, real = [], sft.plan
    monkeypatch.setattr(sft, "plan", lambda *a, **k: planned.append(a[7]) or real(*a, **k))
    _, _, path = tiny_lm
    for i, cfg in enumerate([TrainConfig(dtype="float32"), TrainConfig(dtype="fp16", lora=False, lr=1e-4)]):
        train(mixed_examples("uniform")[:4], str(path), tmp_path / f"out{i}", cfg, seed=0)
    assert planned == [512, 512]  # full fine-tuning keeps float32 weights: its activations are float32


def test_a_token_budget_cuts_each_micro_batch_into_even_pieces_and_leaves_the_steps_as_drawn():
    """``batches.plan`` with ``max_tokens``: the same steps (examples, order, own-token counts) as
    without it, each micro-batch cut into consecutive pieces that keep to the budget (a row longer
    than the budget on its own), whose sizes differ by at most one row; with two processes every
    process runs as many micro-batches as the other (DeepSpeed and FSDP communicate at each)."""
    from parlay.improve.batches import Row, plan

    lengths = [30, 90, 200, 45, 61, 500, 120, 75, 33, 260, 88, 150]
    rows = [Row(ids=list(range(n)), mask=[0] * (n - 5) + [1] * 5, weight=1.0) for n in lengths]
    cut_any = False
    for nproc in (1, 2):
        counts = []
        for rank in range(nproc):
            whole = plan(rows, 4, 2, 6, nproc, rank, torch.Generator().manual_seed(3))
            cut = plan(rows, 4, 2, 6, nproc, rank, torch.Generator().manual_seed(3), max_tokens=400)
            assert [s.own_tokens for s in whole] == [s.own_tokens for s in cut]
            counts.append([len(c.micro_batches) for c in cut])
            for w, c in zip(whole, cut, strict=True):
                assert [i for b in w.micro_batches for i in b] == [i for b in c.micro_batches for i in b]
                for piece in c.micro_batches:
                    assert len(piece) == 1 or len(piece) * max(lengths[i] for i in piece) <= 400
                cut_any |= len(c.micro_batches) > len(w.micro_batches)
            for w, c in zip(whole, cut, strict=True):  # each micro-batch's pieces: even
                pieces = iter(c.micro_batches)
                for batch in w.micro_batches:
                    group, held = [], []
                    while held != batch:
                        group.append(next(pieces))
                        held = [i for b in group for i in b]
                    assert max(map(len, group)) - min(map(len, group)) <= 1
        assert all(n == counts[0] for n in counts)
    assert cut_any
    one = plan(rows, 4, 1, 3, 1, 0, torch.Generator().manual_seed(0), max_tokens=10_000)
    assert all(len(b) == 4 for s in one for b in s.micro_batches)  # nothing to cut


@pytest.mark.skipif(
    not is_torch_greater_or_equal("2.13", accept_dev=True), reason="grouped_query_sdpa leaves older torch as it is"
)
def test_grouped_query_attention_trains_without_repeated_keys_and_values_and_the_same_gradient(
    tiny_lm, tmp_path, monkeypatch
):
    """``sft.grouped_query_sdpa`` on a grouped-query model (4 query heads over 2 key/value heads) with
    padded rows: transformers' ``repeat_kv`` is not called, torch picks its flash kernel (not the
    math one, which would make the copies itself), and the loss and every weight's gradient are
    transformers' default path's (which repeats them); the switch is removed afterwards. The trainer
    runs every step under it: no training forward repeats keys and values."""
    import os

    from torch.nn.attention import SDPBackend
    from transformers.integrations import sdpa_attention

    from parlay.improve import sft

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    model, _, path = tiny_lm
    ids = torch.tensor([[5, 9, 14, 3, 7, 21, 8, 2], [0, 0, 0, 11, 4, 6, 19, 2]])
    mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    repeats, real = [], sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: repeats.append(torch.is_grad_enabled()) or real(x, n))
    try:
        ref_loss, ref = loss_and_grads()
        assert repeats, "transformers' default path repeats keys and values under a padding mask"
        repeats.clear()
        with sft.grouped_query_sdpa("cpu"):
            loss, grads = loss_and_grads()
        assert not repeats and "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    finally:
        model.zero_grad()
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    q, kv = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    causal = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 1, 8, 8)
    assert torch._fused_sdp_choice(q, kv, kv, causal, 0.0, False, enable_gqa=True) == SDPBackend.FLASH_ATTENTION.value
    train(mixed_examples("uniform")[:4], str(path), tmp_path / "out", step_config(True, 2, 2), seed=0)
    assert True not in repeats  # (the trainer's scoring passes, without gradients, may repeat them)


def test_bf16_lora_keeps_no_copy_of_the_adapted_layers_inputs_and_the_same_gradient(tiny_lm):
    """``sft.mixed_precision`` on a bf16 base with peft's float32 adapter. What autograd keeps for
    the backward pass of one forward, counted against the base model's own (the adapter disabled):
    under it the adapter adds only its rank-r activations, while peft's own path (which casts every
    adapted layer's input to float32) or autocast alone (which casts it back to bf16) add a copy of
    every adapted layer's input. The adapter's gradients stay float32 and agree with peft's path
    to bf16's precision, and so does the loss."""
    from parlay.improve.batches import collate, tokenize
    from parlay.improve.losses import token_logps
    from parlay.improve.sft import _load_for_training, mixed_precision

    _, tokenizer, path = tiny_lm
    model, tokenizer = _load_for_training(str(path), None, TrainConfig(dtype="bfloat16"), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # a trained adapter (lora_B starts at zero: no gradient for A)
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05
    rows, _, _ = tokenize(mixed_examples("uniform")[:2], tokenizer, stop_ids(tokenizer, None), 1024)
    batch = collate(rows, tokenizer.pad_token_id, "cpu", share=False)

    def run(mode: str):
        kept, seen = [0], set()

        def pack(t):
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                kept[0] += t.untyped_storage().nbytes()
            return t

        model.zero_grad()
        with (
            model.disable_adapter() if mode == "base" else contextlib.nullcontext(),
            mixed_precision(model, "cpu", mode == "mixed")
            if mode != "autocast"
            else torch.autocast("cpu", torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            loss = -token_logps(model, batch)[0].mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return loss.item(), grads, kept[0]

    model.enable_input_require_grads()  # the base alone keeps what it keeps in LoRA training
    _, _, base = run("base")
    model.disable_input_require_grads()
    loss_peft, grads_peft, peft = run("peft")
    _, _, autocast_alone = run("autocast")
    loss_mixed, grads_mixed, mixed = run("mixed")
    # autocast alone keeps a bf16 copy of each adapted layer's input (q, k and v each their own),
    # peft's path a float32 one; under mixed_precision the adapter keeps the input the layer has.
    assert base < mixed < autocast_alone < peft and mixed - base < 0.5 * (peft - base)
    assert len(grads_mixed) == len(grads_peft) and all(g.dtype == torch.float32 for g in grads_mixed)
    want, got = flat(grads_peft), flat(grads_mixed)
    assert (got - want).norm() <= 0.05 * want.norm() and want.norm() > 0
    assert loss_mixed == pytest.approx(loss_peft, rel=0.02)


def test_in_bf16_the_steps_shared_head_gives_the_gradient_of_rows_run_whole(tiny_lm, tmp_path, monkeypatch):
    """bf16 LoRA training (autocast, ``sft.mixed_precision``) with the step's shared head run once
    (``losses.StepHead``: its keys and values bf16, their gradients summed in float32) against the
    same training with every row run whole: the same first-step gradient to bf16's precision."""
    from parlay.agents import hf_layer
    from parlay.improve import sft

    _, _, path = tiny_lm
    monkeypatch.setattr(hf_layer, "cpu_has_bf16", lambda: True)
    cfg = step_config(True, 2, 2).model_copy(update={"dtype": "bf16"})
    grads = {}
    for share in (True, False):
        monkeypatch.setattr(sft, "_can_share_heads", lambda model, share=share: share)
        with StepRecorder() as rec:
            train(mixed_examples("uniform"), str(path), tmp_path / f"out-{share}", cfg, seed=1)
        grads[share] = flat(rec.steps[0][1])
    want, got = grads[False], grads[True]
    assert want.norm() > 0 and (got - want).norm() <= 0.02 * want.norm()


def test_rl_records_its_vital_signs_per_step_and_other_schemes_only_the_gradient_norm(tiny_lm, tmp_path):
    """cleanrl's figures at every step of online RL: at the first step the policy is the
    round-start model (KL 0, nothing clipped); later steps move away from it (KL > 0); the entropy
    is that of the model's next-token distribution (at most log V). SFT records only the norm."""
    _, tokenizer, path = tiny_lm
    cfg = TrainConfig(lr=2e-2, epochs=4, batch_size=2, grad_accum=1, warmup_steps=0, dtype="float32")
    rl = train(mixed_examples("rl"), str(path), tmp_path / "rl", cfg, weights=WeightConfig(scheme="rl"), seed=1)
    assert rl.steps == len(rl.approx_kls) == len(rl.clip_fractions) == len(rl.entropies) == len(rl.grad_norms) >= 4
    assert abs(rl.approx_kls[0]) < 1e-6 and rl.clip_fractions[0] == 0 and max(rl.approx_kls[1:]) > 1e-4
    assert all(0 <= c <= 1 for c in rl.clip_fractions) and all(0 < e <= math.log(len(tokenizer)) for e in rl.entropies)
    sft = train(mixed_examples("uniform"), str(path), tmp_path / "sft", cfg, seed=1)
    assert sft.approx_kls is None and sft.entropies is None and len(sft.grad_norms) == sft.steps
    assert all(n > 0 for n in sft.grad_norms)


DRIVER = """
import sys
import torch
sys.path.insert(0, {root!r})
from accelerate import PartialState
from parlay.config import WeightConfig
from parlay.improve.sft import train
from tests.test_sft import StepRecorder, mixed_examples, step_config

out = {{}}
for scheme, lora in {cases!r}:
    with StepRecorder() as rec:
        stats = train(mixed_examples(scheme), {path!r}, {tmp!r} + f"/{{scheme}}-{{lora}}", step_config(lora, 1, 2),
                      weights=WeightConfig(scheme=scheme, w_max=3.0), seed=1)
    out[(scheme, lora)] = (rec.steps, rec.after, stats.model_dump())
if PartialState().is_main_process:
    torch.save(out, {tmp!r} + "/recorded.pt")
"""


@pytest.mark.slow
def test_two_processes_with_accumulation_have_the_gradient_of_one_big_batch(tiny_lm, tmp_path):
    """Two CPU processes (DDP over gloo, through ``accelerate launch``) with batch 1 × accumulation
    2, over examples of 3 and 60 own tokens: each optimiser step's gradient (after DDP's average),
    logged loss and updated weights are those of one batch of four computed by hand
    (``assert_one_big_batch``), for every weight scheme, LoRA and full fine-tuning."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from parlay.run import TrainStats

    _, tokenizer, path = tiny_lm
    cases = [(scheme, lora) for scheme in ("uniform", "awr", "judge", "iw_sft", "rl") for lora in (True, False)]
    root = str(Path(__file__).resolve().parents[1])
    (tmp_path / "driver.py").write_text(DRIVER.format(root=root, cases=cases, path=str(path), tmp=str(tmp_path)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # processes on the CPU, even on a GPU machine
    r = subprocess.run([*launch, str(tmp_path / "driver.py")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = torch.load(tmp_path / "recorded.pt", weights_only=False)
    for (scheme, lora), (steps, after, stats) in recorded.items():
        rec = StepRecorder()
        rec.steps, rec.after = steps, after
        weights = WeightConfig(scheme=scheme, w_max=3.0)
        cfg = step_config(lora, 1, 2)
        assert_one_big_batch(path, tokenizer, mixed_examples(scheme), weights, cfg, rec, TrainStats(**stats))


# --------------------------------------------------------------------------- sampler–trainer parity


def with_sampled_logprobs(model, tokenizer, examples, shift: float = 0.0) -> list[TrainExample]:
    """The examples with each assistant turn's log-probs as a sampler on ``model`` would report
    them (its content tokens, the end-of-turn token left out), from one plain forward pass over the
    rendered conversation, plus ``shift``."""
    out = []
    for ex in examples:
        ids, mask = assistant_mask(tokenizer, ex.messages)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        runs, start = [], None  # each assistant turn: a run of mask 1 (content + end of turn)
        for t, m in enumerate([*mask, 0]):
            if m and start is None:
                start = t
            elif not m and start is not None:
                runs.append((start, t))
                start = None
        sampled = [[logp[t - 1].item() + shift for t in range(a, b - 1)] for a, b in runs]
        out.append(ex.model_copy(update={"sampled_logprobs": sampled}))
    return out


def test_sampler_trainer_parity_is_zero_on_the_same_model_and_measures_a_known_gap(tiny_lm, tmp_path, caplog):
    """Log-probs a plain forward pass of the same model gives: the trainer's KL is ~0 on every
    turn that lines up; shifted by 0.05 nats, its mean |Δ log p| is 0.05 and its KL the k3 value
    exp(−0.05) + 0.05 − 1, above the tolerance (a warning). A turn without log-probs is left out,
    one whose length does not match the trainer's tokens is counted as not comparable."""
    model, tokenizer, path = tiny_lm
    examples = bot_examples(1)
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, dtype="float32")
    for shift in (0.0, 0.05):
        exact = with_sampled_logprobs(model, tokenizer, examples, shift)
        first, second = exact[0].sampled_logprobs, exact[1].sampled_logprobs
        exact[0] = exact[0].model_copy(update={"sampled_logprobs": [None, *first[1:]]})
        exact[1] = exact[1].model_copy(update={"sampled_logprobs": [second[0][:-1], *second[1:]]})
        compared = [lp for ex in exact for lp in ex.sampled_logprobs[1:]]
        stats = train(exact, str(path), tmp_path / f"shift{shift}", cfg)
        assert stats.sampler_tokens == sum(len(lp) for lp in compared) > 0
        assert stats.sampler_turns == len(compared) and stats.sampler_turns_not_comparable == 1
        if shift == 0:
            assert 0 <= stats.sampler_kl < 1e-6 and stats.sampler_logp_abs_diff < 1e-5
            assert "above the tolerance" not in caplog.text
        else:
            assert stats.sampler_logp_abs_diff == pytest.approx(shift, abs=1e-5)
            assert stats.sampler_kl == pytest.approx(math.exp(-shift) + shift - 1, rel=1e-3)
            assert "above the tolerance" in caplog.text


def test_parity_costs_no_forward_pass_of_its_own_and_none_without_logprobs(tiny_lm, tmp_path, monkeypatch):
    """iw-SFT's round-start pass serves the parity too; without the sampler's log-probs (and with
    no scheme that needs the round-start model) there is no pass and no parity figure."""
    from parlay.improve import sft

    model, tokenizer, path = tiny_lm
    calls = []
    real = sft._token_logps
    monkeypatch.setattr(sft, "_token_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, dtype="float32")
    carried = with_sampled_logprobs(model, tokenizer, bot_examples(1))
    stats = train(carried, str(path), tmp_path / "iw", cfg, weights=WeightConfig(scheme="iw_sft"))
    assert len(calls) == 1 and stats.sampler_kl < 1e-6 and stats.mean_iw is not None
    calls.clear()
    plain = train(bot_examples(1), str(path), tmp_path / "plain", cfg)
    assert calls == [] and plain.sampler_kl is None and plain.sampler_tokens == 0


def test_games_played_by_the_hf_agent_line_up_with_the_trainer(parrot_lm, tmp_path):
    """End to end: games the transformers agent plays (fp32, batched, KV-cached) carry its
    log-probs into the examples, and the trainer, loading the same model for training, agrees
    with them to float rounding (the agent reports them to 5 decimals)."""
    from parlay.config import FilterConfig
    from parlay.improve.examples import select_examples

    agent = load_agent(f"hf:{parrot_lm}+dtype=float32")
    episodes = play_games(agent, agent, plan_games(2, 0), objective("cooperative"), 4)
    examples = select_examples(episodes, FilterConfig(rule="all"), WeightConfig()).examples
    assert examples and any(ex.sampled_logprobs for ex in examples)
    cfg = TrainConfig(lora=False, lr=1e-4, epochs=1, batch_size=4, grad_accum=1, dtype="float32")
    stats = train(examples, str(parrot_lm), tmp_path / "out", cfg)
    assert stats.sampler_turns_not_comparable == 0 and stats.sampler_tokens > 0
    # Measured: KL 4e-12, mean |Δ log p| 2.4e-6 (rounding to 5 decimals alone: 2.5e-6).
    assert stats.sampler_kl < 1e-9 and stats.sampler_logp_abs_diff < 1e-5


def test_training_progress_reaches_a_log_as_plain_lines(monkeypatch):
    """When stderr is not a terminal (a log file, CI, nohup), each stage writes one line when it
    starts and then, every ``PROGRESS_EVERY`` seconds, a plain line: steps done of all, training
    tokens/s, an ETA and the loss; never a bar."""
    import io

    from rich.console import Console

    from parlay import cli

    log = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=log, force_terminal=False, width=200))
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.0)
    hooks = cli.RichHooks()
    hooks.stage("warm start: training on 254 examples", 32)
    for loss in (2.0, 1.5):
        hooks.advance(loss=loss, tokens=3000)
    hooks.end_stage()
    lines = log.getvalue().splitlines()
    assert lines[0] == "warm start: training on 254 examples (32)"
    assert lines[1].startswith("  warm start: training on 254 examples: 1/32, ") and "ETA " in lines[1]
    assert "2/32" in lines[2] and "tok/s" in lines[2] and "loss 1.500" in lines[2]
    assert lines[3].startswith("  done in ") and "\x1b[" not in log.getvalue()  # no bar, no colour codes
    assert all(line.count("tok/s") <= 1 for line in lines)  # each figure once
    hooks.stage("warm start: bot:conceder vs bot:conceder", 2)  # bots produce no model tokens
    hooks.advance(deals=1)
    hooks.end_stage()
    bot_lines = log.getvalue().splitlines()[4:]
    assert "deals 1" in bot_lines[1] and all("tok/s" not in line for line in bot_lines)
    # Games end together near a stage's end: before half are done, the time so far, no ETA or rate.
    hooks.stage("round 0: play", 160)
    hooks.advance(deals=1, tokens=400)
    hooks.advance(n=79, deals=50, tokens=40000)
    hooks.advance(deals=1, tokens=400)
    hooks.end_stage()
    play = log.getvalue().splitlines()[-4:]
    assert re.fullmatch(r"  round 0: play: 1/160, deals 1, 0m\d\ds so far", play[0])
    assert "80/160" in play[1] and "tok/s" in play[1] and "ETA " in play[1] and "so far" not in play[1]
    assert play[3].startswith("  done in ") and "tok/s" in play[3]
    # the process's peak so far, as the kernel counts it (kB on Linux): the stage that set it shows
    peak = float(re.search(r", peak memory so far (\d+\.\d) GB$", play[3]).group(1))
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, abs=0.06)
    hooks.stage("warm start: bot:conceder vs bot:conceder", 2)  # games not reported one by one (proxy build)
    hooks.end_stage()
    assert re.fullmatch(r"  done in \d+ s; peak memory so far \d+\.\d GB", log.getvalue().splitlines()[-1])


def test_a_log_hears_from_a_stage_whose_first_games_take_minutes(monkeypatch):
    """No game ends for a while (they are played together): a line still comes every
    ``PROGRESS_EVERY`` seconds, and none after the stage ends."""
    import io

    from rich.console import Console

    from parlay import cli

    log = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=log, force_terminal=False, width=200))
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.2)
    hooks = cli.RichHooks()
    hooks.stage("round 0: play", 160)
    time.sleep(0.9)
    hooks.end_stage()
    lines = log.getvalue().splitlines()
    waiting = [line for line in lines if re.fullmatch(r"  round 0: play: 0/160, 0m00s so far", line)]
    assert lines[0] == "round 0: play (160)" and len(waiting) >= 2 and lines[-1].startswith("  done in ")
    time.sleep(0.5)
    assert log.getvalue().splitlines() == lines  # the ticker stopped with the stage
