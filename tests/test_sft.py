"""The trainer: the assistant-only mask, the weighted loss, and a tiny model that really learns."""

import json

import pytest
import torch
from safetensors.torch import load_file

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


def test_a_template_that_does_not_render_prefixes_as_prefixes_is_refused():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(TemplateError, match="prefixes"):
        assistant_mask(tok, bot_examples(1)[0].messages)


def test_weighted_nll_by_hand():
    # Two sequences of 3 tokens over a vocabulary of 2; uniform logits → every token costs ln 2.
    logits = torch.zeros(2, 3, 2)
    ids = torch.tensor([[0, 1, 0], [1, 1, 1]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    w = torch.tensor([1.0, 3.0])
    loss, seq_logp, factor = weighted_nll(logits, ids, mask, w)
    ln2 = torch.log(torch.tensor(2.0))
    assert loss.item() == pytest.approx(((2 * 1 + 1 * 3) * ln2 / 3).item())
    assert seq_logp.tolist() == pytest.approx([-ln2.item(), -ln2.item()]) and factor.tolist() == [1.0, 1.0]
    zero, _, _ = weighted_nll(logits, ids, mask, torch.zeros(2))
    assert zero.item() == 0
    # A reweighting (iw-SFT's) multiplies the weights, from the same forward pass.
    doubled, _, factor = weighted_nll(logits, ids, mask, w, reweight=lambda logp: torch.full_like(logp, 2.0))
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

    def hook(done, of, loss):
        if done == step:
            raise Killed

    return hook


def recorder(seen):
    """A step hook that notes each optimiser step done."""
    return lambda done, of, loss: seen.append(done)


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
    # A kill while a checkpoint was being written leaves a partial file: never read.
    checkpoint_file(out).with_name(out.name + ".checkpoint.pt.partial").write_bytes(b"torn")
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
    checkpoint_file(out).write_bytes(b"not a checkpoint")
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
