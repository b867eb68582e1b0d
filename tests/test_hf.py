"""The transformers backend on a tiny model built in code: batching, prefix reuse, specs."""

import copy

import pytest
import torch

from parlay.agents import AgentError, load_agent
from parlay.agents.base import Sampling
from parlay.agents.hf import HFAgent, load_model
from parlay.agents.hf_layer import render, stop_ids
from parlay.games import objective
from parlay.rollout import plan_games, play_games
from parlay.testing import check_agents

GREEDY = Sampling(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model64(tiny_lm):
    """A float64 copy of the tiny model, so that padding cannot flip a greedy choice by rounding
    (a copy: the session's tiny model stays float32 for every other test)."""
    model, tokenizer, _ = tiny_lm
    return copy.deepcopy(model).to(torch.float64), tokenizer


def _play(agent, n=6, cap=4, seed=0):
    return play_games(agent, agent, plan_games(n, seed), objective("semi-competitive"), max_messages=cap)


def test_tiny_model_passes_the_agent_invariants(tiny_lm):
    _, _, path = tiny_lm
    agent = load_agent(f"hf:{path}", Sampling(temperature=1.0, max_new_tokens=8))
    check_agents(agent, load_agent("bot:random"), objective("cooperative"), n=4, seed=1, max_messages=4)


def test_prefix_reuse_gives_the_same_games_with_less_prefill(model64):
    model, tokenizer = model64
    with_reuse = HFAgent(model, tokenizer, GREEDY, prefix_reuse=True)
    without = HFAgent(model, tokenizer, GREEDY, prefix_reuse=False)
    a, b = _play(with_reuse), _play(without)
    assert [e.turns for e in a] == [e.turns for e in b]
    assert with_reuse.stats["reused_tokens"] > 0
    assert with_reuse.stats["prefill_tokens"] < without.stats["prefill_tokens"] / 2
    assert with_reuse.stats["generated_tokens"] == without.stats["generated_tokens"]


def test_a_shared_prefix_gives_the_same_games_with_less_prefill(model64):
    """The system prompt's shared head is prefilled once for all conversations, not once each."""
    model, tokenizer = model64
    shared = HFAgent(model, tokenizer, GREEDY, prefix_reuse=True)
    own_only = HFAgent(model, tokenizer, GREEDY, prefix_reuse=True, share_prefix=False)
    games, obj = plan_games(8, 0), objective("cooperative")
    # Against a bot that speaks first in some games: the model's conversations start in two calls.
    a, b = (play_games(m, load_agent("bot:conceder"), games, obj, max_messages=4) for m in (shared, own_only))
    assert [e.turns for e in a] == [e.turns for e in b]
    assert {e.first_speaker for e in a} == {"A", "B"}
    head = len(shared._shared[0].tokens) if shared._shared else 0
    assert head > 20  # the whole head of the system prompt, tokens
    # Every conversation but the first took the head from the shared prefix.
    conversations = len(shared.conversation_tokens)
    assert conversations == 8
    assert own_only.stats["prefill_tokens"] - shared.stats["prefill_tokens"] == (conversations - 1) * head
    assert HFAgent(model, tokenizer, GREEDY, prefix_reuse=False).share_prefix is False


def test_the_in_place_cache_plays_what_transformers_own_cache_plays(model64):
    """Models with sliding-window layers keep transformers' DynamicCache; both give the same games."""
    model, tokenizer = model64
    sampling = Sampling(temperature=1.0, max_new_tokens=10)
    roomy, dynamic = HFAgent(model, tokenizer, sampling), HFAgent(model, tokenizer, sampling)
    dynamic.engine.roomy = False
    a, b = _play(roomy), _play(dynamic)
    assert roomy.engine.roomy and [e.turns for e in a] == [e.turns for e in b]
    assert dynamic.stats == roomy.stats and roomy.stats["reused_tokens"] > 0


def test_batched_generation_equals_one_at_a_time(model64):
    model, tokenizer = model64
    agent = HFAgent(model, tokenizer, GREEDY, prefix_reuse=False)
    prompts = [render(tokenizer, [{"role": "user", "content": "hi " * n}], True) for n in (1, 5, 17)]
    batched = agent.generate(prompts, None, [0, 1, 2])
    single = [agent.generate([p], None, [s])[0] for s, p in enumerate(prompts)]
    assert batched == single


def test_rows_that_end_early_ride_along_without_changing_the_others(model64):
    """Ended rows stay in the batch until they are a quarter of it; every reply is what it is alone."""
    model, tokenizer = model64
    agent = HFAgent(model, tokenizer, Sampling(temperature=1.0, max_new_tokens=12), prefix_reuse=False)
    prompts = [render(tokenizer, [{"role": "user", "content": "hi " * n}], True) for n in range(1, 13)]
    free = agent.generate(prompts, None, list(range(12)))
    # Make a token that the replies reach at different steps end a reply, so rows end one by one.
    firsts: dict[int, set[int]] = {}  # token -> the steps at which it first appears, over the rows
    for out in free:
        for tok in set(out):
            firsts.setdefault(tok, set()).add(out.index(tok))
    agent.engine.stop_ids = {max(firsts, key=lambda t: len(firsts[t]))}
    batched = agent.generate(prompts, None, list(range(12)))
    assert len({len(b) for b in batched}) > 2  # the rows really did end at different steps
    assert batched == [agent.generate([p], None, [i])[0] for i, p in enumerate(prompts)]


def test_a_batch_that_runs_out_of_memory_is_halved_and_gives_the_same_games(model64, caplog):
    model, tokenizer = model64
    roomy = HFAgent(model, tokenizer, GREEDY)
    expected = _play(roomy, n=6)
    agent = HFAgent(model, tokenizer, GREEDY)
    sample = agent.sample

    def small_memory(prompts, keys, seeds):
        if len(prompts) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return sample(prompts, keys, seeds)

    agent.sample = small_memory
    assert [e.turns for e in _play(agent, n=6)] == [e.turns for e in expected]
    assert agent.max_batch == 3 and "retrying in batches of 3" in caplog.text  # 6 conversations, then 3


def test_sampling_is_seeded(tiny_lm):
    model, tokenizer, _ = tiny_lm
    agent = HFAgent(model, tokenizer, Sampling(temperature=1.0, max_new_tokens=10))
    prompt = [render(tokenizer, [{"role": "user", "content": "hello"}], True)]
    assert agent.generate(prompt, None, [7]) == agent.generate(prompt, None, [7])
    outs = {tuple(agent.generate(prompt, None, [s])[0]) for s in range(6)}
    assert len(outs) > 1


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""Where the sampler's tests run: the batched draw runs on the model's device."""


@pytest.fixture
def sampler(tiny_lm):
    """An agent at a temperature and top-p: ``sampler(1.0, 0.5).engine.sample(logits, generators)``."""
    model, tokenizer, _ = tiny_lm
    return lambda temperature=1.0, top_p=1.0: HFAgent(model, tokenizer, Sampling(temperature=temperature, top_p=top_p))


@pytest.mark.parametrize("device", DEVICES)
def test_the_batched_sampler_draws_from_the_distribution_and_never_a_token_without_mass(sampler, device):
    logits = torch.tensor([[0.0, -float("inf"), 1.0, 2.0, -float("inf")]], device=device)
    n = 20000
    drawn = sampler().engine.sample(logits.repeat(n, 1), [torch.Generator().manual_seed(i) for i in range(n)])
    assert drawn.device.type == device
    share = torch.bincount(drawn.cpu(), minlength=5) / n
    assert share[1] == 0 and share[4] == 0
    assert torch.allclose(share, torch.softmax(logits[0].cpu(), -1), atol=0.015)  # 4+ standard errors
    # top-p keeps only the nucleus: here the single most likely token
    nucleus = sampler(top_p=0.5).engine.sample(
        logits.repeat(50, 1), [torch.Generator().manual_seed(i) for i in range(50)]
    )
    assert set(nucleus.tolist()) == {3}


@pytest.mark.parametrize("device", DEVICES)
def test_a_draw_at_the_top_of_the_unit_interval_is_the_last_token_with_mass(sampler, monkeypatch, device):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([1.0 - 2**-53], dtype=torch.float64))
    logits = torch.tensor([[3.0, 0.0, -float("inf"), -float("inf")]], device=device)
    assert sampler().engine.sample(logits, [torch.Generator()]).tolist() == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_draw_depends_on_its_seed_and_logits_not_on_the_batch(sampler, device):
    logits = (torch.randn(12, 300, generator=torch.Generator().manual_seed(0)) * 3).to(device)
    alone = [
        sampler().engine.sample(logits[i : i + 1], [torch.Generator().manual_seed(100 + i)]).item() for i in range(12)
    ]
    together = sampler().engine.sample(logits, [torch.Generator().manual_seed(100 + i) for i in range(12)]).tolist()
    assert alone == together and len(set(together)) > 3


def test_spec_options_and_errors(tiny_lm, tmp_path):
    _, _, path = tiny_lm
    agent = load_agent(f"hf:{path}+reuse=0+dtype=float32")
    assert isinstance(agent, HFAgent) and not agent.prefix_reuse
    assert not load_agent(f"hf:{path}+share=0").share_prefix
    assert load_agent(f"hf:{path}+select=1").select and not load_agent(f"hf:{path}").select
    with pytest.raises(AgentError, match="unknown option"):
        load_agent(f"hf:{path}+colour=blue")
    with pytest.raises(AgentError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(AgentError, match="unknown dtype"):
        load_agent(f"hf:{path}+dtype=int3")


@pytest.mark.slow
def test_embedded_smollm2_loads_and_speaks(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLAY_CACHE", str(tmp_path))
    agent = load_agent("hf:smollm2-135m", Sampling(temperature=0.0, max_new_tokens=16))
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").exists()
    eps = play_games(agent, agent, plan_games(2, 0), objective(0), max_messages=2)
    assert all(t.tokens and t.text for e in eps for t in e.turns)


@pytest.mark.slow
def test_embedded_conversion_keeps_a_log_readable(tmp_path):
    """Converting the embedded GGUF with stderr going to a log writes a line or two, not a
    progress bar redrawn for each of its tensors."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PARLAY_CACHE": str(tmp_path)}
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from parlay.agents.models import resolve; resolve('smollm2-135m')"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").exists()
    assert "de-quantizing" not in done.stderr and "\r" not in done.stderr
    assert "converted SmolLM2-135M-Instruct.Q4_1.gguf in" in done.stderr


def test_selfplay_command_with_a_local_model(tiny_lm, tmp_path):
    from tests.test_cli import run

    _, _, path = tiny_lm
    out = tmp_path / "self.jsonl"
    r = run(
        "selfplay",
        "--model",
        f"hf:{path}",
        "-n",
        "3",
        "--max-messages",
        "2",
        "--max-new-tokens",
        "6",
        "-o",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 3
    assert '"games": 3' in r.stdout


def test_missing_local_model_is_a_clear_cli_error(tmp_path):
    from tests.test_cli import run

    r = run("selfplay", "--model", f"hf:{tmp_path / 'nothing'}", "-n", "1")
    assert r.returncode == 2 and "cannot load model" in r.stderr and "Traceback" not in r.stderr


def test_bf16_on_a_cpu_without_it_falls_back_to_float32_and_says_so(monkeypatch, caplog):
    from parlay.agents import hf_layer

    monkeypatch.setattr(hf_layer, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert hf_layer.pick_dtype("bf16", "cpu") == torch.float32
        assert hf_layer.pick_dtype("bfloat16", "cpu") == torch.float32
        assert hf_layer.pick_dtype("auto", "cpu") == torch.float32
    assert "no native bf16" in caplog.text
    assert hf_layer.pick_dtype("bf16", "cuda") == torch.bfloat16
    monkeypatch.setattr(hf_layer, "cpu_has_bf16", lambda: True)
    assert hf_layer.pick_dtype("bf16", "cpu") == torch.bfloat16
    assert hf_layer.pick_dtype("auto", "cpu") == torch.bfloat16
    with pytest.raises(AgentError, match="unknown dtype"):
        hf_layer.pick_dtype("int3", "cpu")


def test_the_engine_decodes_what_transformers_generate_gives_with_and_without_its_cache(model64):
    """The token-level engine alone: a batch of two prompts of different lengths, then each
    conversation continued from the keys and values the engine returned, against ``generate``."""
    from parlay.agents.hf_engine import DecodeEngine

    model, tokenizer = model64
    stops = stop_ids(tokenizer)
    engine = DecodeEngine(model, tokenizer.pad_token_id, stops, Sampling(temperature=0.0, max_new_tokens=8))

    def reference(ids):
        t = torch.tensor([ids])
        kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": sorted(stops), "pad_token_id": 0}
        full = model.generate(t, attention_mask=torch.ones_like(t), **kwargs)[0, len(ids) :].tolist()
        return full[: next((i for i, x in enumerate(full) if x in stops), len(full))]

    first = [render(tokenizer, [{"role": "user", "content": "hi " * n}], True) for n in (2, 9)]
    # Kept: the keys and values of every token fed, the prompt and the reply but its last (8 tokens
    # long, it is cut, not stopped: its last token was drawn, never fed).
    out = engine.decode(first, [None, None], [0, 1], [True, True])
    assert out.tokens == [reference(ids) for ids in first]
    assert all(
        kv is not None and kv[0][0].shape[1] == len(p) + min(len(t), 7)
        for kv, p, t in zip(out.kv, first, out.tokens, strict=True)
    )
    extra = tokenizer("<|im_end|>\n<|im_start|>user\nand then?", add_special_tokens=False)["input_ids"]
    second = [p + t + extra for p, t in zip(first, out.tokens, strict=True)]
    again = engine.decode(second, out.kv, [0, 1], [False, False])
    assert again.tokens == [reference(ids) for ids in second] and again.kv == [None, None]


def _prefixed_prompts(tokenizer, n):
    system = {"role": "system", "content": "You negotiate over books, hats and balls. " * 3}
    return [render(tokenizer, [system, {"role": "user", "content": "hi " * (2 + 5 * i)}], True) for i in range(n)]


@pytest.mark.parametrize("rows", [1, 3])
def test_a_prefix_kept_once_gives_the_logits_of_a_whole_forward(model64, rows):
    """The shared prefix's keys and values apart from the rows' (cascade attention): every step's
    logits are transformers' own for the whole sequence, with one row (no padding) or several."""
    from parlay.agents.hf_engine import DecodeEngine

    model, tokenizer = model64
    engine = DecodeEngine(
        model, tokenizer.pad_token_id, stop_ids(tokenizer), Sampling(temperature=1.0, max_new_tokens=6)
    )
    assert engine.cascade  # the tiny Llama runs SDPA attention, so it was switched
    prompts = _prefixed_prompts(tokenizer, rows)
    prefix = engine.prefill(prompts[0][:20])
    seen: list[torch.Tensor] = []
    sample = engine.sample
    engine.sample = lambda logits, gens: (seen.append(logits.clone()), sample(logits, gens))[1]
    # Row 0 continues from 4 cached tokens of its own after the prefix; the others start at it.
    own = engine.prefill(prompts[0][:24])
    past = [[(k[:, 20:], v[:, 20:]) for k, v in own]] + [None] * (rows - 1)
    out = engine.decode(prompts, past, list(range(rows)), [True] * rows, prefix)
    assert out.offset == 20
    together = min(min(len(t) for t in out.tokens) + 1, 6)  # steps before any row left the batch
    for i, (ids, toks) in enumerate(zip(prompts, out.tokens, strict=True)):
        whole = model(torch.tensor([ids + toks])).logits[0, len(ids) - 1 :]
        steps = torch.stack([s[i] for s in seen[:together]])
        # float64 unless an earlier test moved the shared tiny model (test_sampling_is_seeded: float32)
        atol = 1e-9 if model.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(steps[: len(whole)], whole[: len(steps)], rtol=0, atol=atol)
        # Kept: the row's own keys and values after the prefix, those of a whole forward.
        kv = out.kv[i]
        assert kv is not None and kv[0][0].shape[1] == len(ids) + min(len(toks), 5) - 20


def test_a_model_whose_layers_do_not_take_the_prefix_gets_copies_of_it(model64, caplog):
    """A family that does not hand the keyword down to its attention is caught after one step:
    the decoder says so and gives its rows copies of the prefix, with the same replies."""
    from parlay.agents import hf_attention
    from parlay.agents.hf_engine import DecodeEngine

    model, tokenizer = model64
    prompts = _prefixed_prompts(tokenizer, 2)
    engine = DecodeEngine(model, tokenizer.pad_token_id, stop_ids(tokenizer), GREEDY)
    prefix = engine.prefill(prompts[0][:20])
    expected = engine.decode(prompts, [None, None], [0, 1], [False, False], prefix).tokens
    model.set_attn_implementation("sdpa")  # transformers' own attention: the keyword is ignored
    try:
        engine.cascade = True
        with caplog.at_level("WARNING"):
            got = engine.decode(prompts, [None, None], [0, 1], [False, False], prefix)
        assert got.tokens == expected and got.offset == 0 and not engine.cascade
        assert "did not reach 2 of 2 layers" in caplog.text
    finally:
        model.set_attn_implementation(hf_attention.NAME)


def test_conversations_keep_only_their_own_keys_after_the_shared_prefix(model64):
    model, tokenizer = model64
    agent = HFAgent(model, tokenizer, GREEDY)
    _play(agent, n=4)
    head = agent._shared[0]
    entries = list(agent._cache.values())
    assert entries and all(e.base is head for e in entries)
    assert all(e.kv[0][0].shape[1] == len(e.tokens) - len(head.tokens) for e in entries)


def test_rows_whose_whole_prompt_but_its_last_token_is_shared_see_only_their_filled_keys(model64):
    """Identical new prompts (a group's first turn): the shared prefix is all but the last token,
    so the first step has one query per row and no key of the row's own before it; the reply's
    room after it must stay masked."""
    model, tokenizer = model64
    agent = HFAgent(model, tokenizer, Sampling(temperature=1.0, max_new_tokens=16))
    prompt = _prefixed_prompts(tokenizer, 1)[0]
    seen: list[torch.Tensor] = []
    sample = agent.engine.sample
    agent.engine.sample = lambda logits, gens: (seen.append(logits.clone()), sample(logits, gens))[1]
    agent.sample([prompt, prompt], [("g0", "A"), ("g1", "A")], [0, 1])
    assert len(agent._shared[0].tokens) == len(prompt) - 1
    whole = model(torch.tensor([prompt])).logits[0, -1]
    atol = 1e-9 if model.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(seen[0], whole.expand(2, -1), rtol=0, atol=atol)


# -- the selection step: every proposal the likeliest legal split


def _reference_logps(model, prompt: list[int], continuation: list[int]) -> list[float]:
    """Log-probabilities of ``continuation`` after ``prompt`` from one plain forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + continuation])).logits[0].double()
    logps = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return logps.gather(-1, torch.tensor(continuation)[:, None])[:, 0].tolist()


@pytest.mark.parametrize("cascade", [True, False])
def test_scoring_continuations_matches_a_plain_forward_pass(model64, cascade):
    """With the prompt's head kept apart (cascade attention) and with the whole prompt in every
    row: continuations of different lengths, left-padded in one batch."""
    model, tokenizer = model64
    engine = HFAgent(model, tokenizer, GREEDY).engine
    engine.cascade = cascade
    prompt = render(
        tokenizer, [{"role": "system", "content": "Split 3 books."}, {"role": "user", "content": "hi"}], True
    )
    continuations = [tokenizer.encode(t, add_special_tokens=False) for t in ("a", "two books for me", "x y")]
    assert len({len(c) for c in continuations}) == 3
    got = engine.score(prompt, continuations)
    for cont, logps in zip(continuations, got, strict=True):
        assert logps == pytest.approx(_reference_logps(model, prompt, cont), abs=1e-9)


def _proposal_request(counts=(1, 2, 3), owed=False, said="[message] hello, what do you value?"):
    from parlay import prompts
    from parlay.agents.base import TurnRequest
    from parlay.games import Context

    ctx = Context(counts, (2, 1, 1), (1, 1, 1))
    obj = objective("semi-competitive")
    messages = [
        {"role": "system", "content": prompts.system_prompt(ctx, "A", obj, 6)},
        {"role": "user", "content": said},
    ]
    return TurnRequest("g", "A", messages, ctx, obj, owed, 1, 6, 0)


def test_the_selection_step_proposes_the_likeliest_legal_split_when_none_was_stated(model64):
    from parlay.protocol import Proposal, parse_reply, proposal_reply

    model, tokenizer = model64
    agent = HFAgent(model, tokenizer, GREEDY, select=True)
    request = _proposal_request(owed=True)
    (reply,) = agent.act([request])
    # The reference: every split's reply rendered as the assistant's turn, scored by a plain forward pass.
    prompt = render(tokenizer, request.messages, True)
    totals = {}
    for kept in request.context.allocations:
        full = render(tokenizer, [*request.messages, {"role": "assistant", "content": proposal_reply(kept)}], False)
        assert full[: len(prompt)] == prompt
        end = next(i for i in range(len(prompt), len(full)) if full[i] in stop_ids(tokenizer)) + 1
        totals[kept] = _reference_logps(model, prompt, full[len(prompt) : end])
    best = max(totals, key=lambda k: sum(totals[k]))
    assert len(totals) == 2 * 3 * 4
    assert reply.text == proposal_reply(best) and parse_reply(reply.text) == Proposal(best)
    assert reply.logprobs == pytest.approx(totals[best][:-1], abs=1e-5) and reply.tokens == len(totals[best]) - 1


def test_the_selection_step_proposes_the_split_last_stated_in_words(model64):
    from parlay.protocol import proposal_reply

    model, tokenizer = model64
    agent = HFAgent(model, tokenizer, GREEDY, select=True)
    # The partner (user) gives this player the book and keeps the rest: of (1 book, 2 hats, 3 balls),
    # this player keeps (1, 0, 0).
    request = _proposal_request(owed=True, said="[message] you take the book, I take the rest")
    (reply,) = agent.act([request])
    assert reply.text == proposal_reply((1, 0, 0))
    prompt = render(tokenizer, request.messages, True)
    full = render(tokenizer, [*request.messages, {"role": "assistant", "content": reply.text}], False)
    reference = _reference_logps(model, prompt, full[len(prompt) :])
    assert reply.logprobs == pytest.approx(reference[: reply.tokens], abs=1e-5)


def test_the_selection_step_leaves_talk_sampled_and_replaces_sampled_proposals(model64, monkeypatch):
    from parlay.agents.base import ModelAgent, Reply

    model, tokenizer = model64
    agent = HFAgent(model, tokenizer, GREEDY, select=True)
    free, owed = _proposal_request(), _proposal_request(owed=True)
    sampled = {"g": "[message] hello"}
    seen = []

    def fake_act(self, requests):
        seen.append(len(requests))
        return [Reply(sampled["g"]) for _ in requests]

    monkeypatch.setattr(ModelAgent, "act", fake_act)
    talk, proposal = agent.act([free, owed])
    assert seen == [1]  # the owed proposal was never sampled
    assert talk.text == "[message] hello" and proposal.text.startswith("[propose] (")
    # Sampled proposals in every spelling the parser takes (one out of range): the counts are chosen instead.
    for text in [
        "[PROPOSE] (9 books, 0 hats, 0 balls)",
        "  [proposal] (1 book, 2 hats, 3 balls)",
        "[ Propose ]: 1 book",
    ]:
        sampled["g"] = text
        (chosen,) = agent.act([free])
        assert chosen.text == proposal.text


def test_a_game_closes_on_the_split_stated_in_words(tiny_lm):
    """Played through the game: the partner states a split in words and proposes it; the model
    (a random tiny one, which cannot write a proposal) owes a proposal, answers at once with the
    other side of that split, and the game ends in that deal."""
    from parlay.agents.base import Agent, Reply
    from parlay.games import Context
    from parlay.protocol import message_reply, proposal_reply
    from parlay.rollout import GameSpec

    class Proposer(Agent):
        spec = "proposer"

        def act(self, requests):
            return [Reply(proposal_reply((r.context.counts[0], 0, 0))) for r in requests]

    _, _, path = tiny_lm
    agent = load_agent(f"hf:{path}+select=1", Sampling(temperature=1.0, max_new_tokens=8))
    ctx = Context((2, 2, 1), (1, 2, 2), (3, 1, 1))
    opening = (message_reply("I take the books, you take the rest"), message_reply("ok"))
    games = [GameSpec(id=f"g{i}", context=ctx, first_speaker="B", seed=i, opening=opening) for i in range(3)]
    for ep in play_games(agent, Proposer(), games, objective("cooperative"), max_messages=4):
        a_turns = [t for t in ep.turns[len(opening) :] if t.player == "A"]
        assert [t.kind for t in a_turns] == ["proposal"] and a_turns[0].accepted  # no sampled attempt first
        assert ep.agreed and ep.outcome.proposals == {"A": [0, 2, 1], "B": [2, 0, 0]}
