"""The GPU path, measured: rollout and training throughput of the transformers backend on CUDA.

    python bench/gpu.py [--shapes smollm2-135m,qwen2.5-1.5b,llama-7b] [--batches 16,64,256]

No weights are downloaded: each model is built from a config written here with random weights
(SmolLM2-135M's shape, Qwen2.5-1.5B's shape as a Llama with q/k/v biases — a Qwen2 config would
reload with Qwen's own tokenizer class — and a Llama-2-7B-style shape), with a word-level
tokenizer of the same vocabulary size and a ChatML template, so every matrix has its real size.
A random model never speaks the protocol, so its games end after five rejected replies of
``--max-new-tokens`` tokens each: the workload is decoding, as in a round, though not a game's
real length. Reported: games/min and generated tokens/s at each batch (games played at once),
the share of the GPU's measured bf16 matmul peak (2 · parameters · tokens processed per second),
the model's forward calls in the rollout and the milliseconds each took (a decode step is one
call, with the agent's sampling and cache handling around it), the time of a bare decode step of
the model alone at that batch and the share of it the GPU spent in kernels (low: the host, not
the GPU, sets the pace), and LoRA and full fine-tuning tokens/s through ``improve/sft.train``.
Figures are printed and appended to bench/RESULTS.md with the device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

RESULTS = Path(__file__).with_name("RESULTS.md")
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def shape_config(name: str):
    from transformers import LlamaConfig

    if name == "smollm2-135m":
        return LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
        )  # fmt: skip
    if name == "qwen2.5-1.5b":  # Qwen2.5's architecture is Llama's with biases on q, k and v
        return LlamaConfig(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, attention_bias=True,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
        )  # fmt: skip
    if name == "llama-7b":
        return LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        )  # fmt: skip
    raise SystemExit(f"unknown shape {name!r}: expected smollm2-135m, qwen2.5-1.5b or llama-7b")


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` entries (three of them ChatML's special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.chat_template = TEMPLATE
    return fast


def build(name: str, device: str):
    from transformers import AutoModelForCausalLM

    config = shape_config(name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval(), word_tokenizer(config.vocab_size)


def peak_bf16(device: str, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - t)


def rollout(model, tokenizer, games: int, max_new_tokens: int, params: int, peak: float) -> dict[str, float]:
    from parlay.agents.base import Sampling
    from parlay.agents.hf import HFAgent
    from parlay.games import objective
    from parlay.rollout import plan_games, play_games

    agent = HFAgent(model, tokenizer, Sampling(temperature=1.0, max_new_tokens=max_new_tokens), max_batch=games)
    forwards = [0]
    hook = model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        episodes = play_games(agent, agent, plan_games(games, 0), objective("cooperative"), 6)
        torch.cuda.synchronize()
        secs = time.perf_counter() - start
    finally:
        hook.remove()
    figures = {
        "games": len(episodes),
        "seconds": secs,
        "games_per_min": 60 * len(episodes) / secs,
        "gen_tok_s": agent.stats["generated_tokens"] / secs,
        "peak_share": 2 * params * (agent.stats["prefill_tokens"] + agent.stats["generated_tokens"]) / secs / peak,
        "forwards": forwards[0],
        "ms_per_forward": 1000 * secs / max(1, forwards[0]),
    }
    del agent  # its cached prefixes would crowd the bare step's cache out of GPU memory
    torch.cuda.empty_cache()
    try:
        figures["bare_step_ms"], figures["gpu_busy"] = bare_decode_step(model, games)
    except torch.OutOfMemoryError:
        print(f"bare decode step at batch {games}: out of GPU memory; its columns are left empty", flush=True)
        figures["bare_step_ms"] = figures["gpu_busy"] = float("nan")
        torch.cuda.empty_cache()
    return figures


def bare_decode_step(model, batch: int, cached: int = 300) -> tuple[float, float]:
    """One decode step of the model alone (batch rows, one new token each over a ``cached``-token
    cache): its milliseconds, and the share of them the GPU spent in kernels (profiled)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, cached), device="cuda")
    new = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).cache

        def step() -> None:
            model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        ms = 100 * (time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    # Kernel time, counted once: from the kernels' own events, or where a profiler lists none, from
    # the operators that launched them (their self device time), whichever it recorded.
    events = prof.key_averages()
    kernels = max(
        sum(e.self_device_time_total for e in events if e.device_type.name == side) for side in ("CUDA", "CPU")
    )
    return ms, kernels / 1e6 / wall


def training(name: str, model, tokenizer, lora: bool, steps: int) -> dict[str, float]:
    """Tokens/s of the optimiser steps alone (loading, tokenising and saving excluded), through sft.train."""
    from parlay.config import TrainConfig
    from parlay.improve.examples import TrainExample
    from parlay.improve.sft import train

    words = [f"w{i}" for i in range(3, 3000)]
    examples = [
        TrainExample(
            messages=[
                {"role": "system", "content": " ".join(words[i : i + 300])},
                {"role": "user", "content": " ".join(words[i + 300 : i + 500])},
                {"role": "assistant", "content": " ".join(words[i + 500 : i + 800])},
            ]
        )
        for i in range(8 * steps)
    ]
    times: list[float] = []

    def on_step(done: int, of: int, loss: float, *_: object) -> None:  # (…, tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        # Keep the word-level tokenizer: without this, a Qwen2 config loads Qwen's own tokenizer class.
        settings = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(
            json.dumps(settings | {"tokenizer_class": "PreTrainedTokenizerFast"})
        )
        cfg = TrainConfig(lora=lora, batch_size=8, grad_accum=1, epochs=1, warmup_steps=0, dtype="bf16")
        stats = train(examples, str(path), Path(tmp) / "out", cfg, on_step=on_step)
    per_step = stats.tokens / stats.steps
    return {
        "tokens_per_second": per_step * (len(times) - 1) / (times[-1] - times[0]),
        "tokens_per_step": per_step,
        "steps": stats.steps,
        "whole_call_seconds": stats.seconds,
    }


def render(rows: list[dict], train_rows: list[dict], device: str, peak: float, max_new_tokens: int) -> str:
    lines = [
        f"\n## gpu — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"Device: {device}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; random-weight models in bf16, "
        f"≤{max_new_tokens} new tokens a reply (a random model's games end after five rejected replies: a "
        "decoding workload, not real game lengths).",
        "",
        "| shape | params | games at once | s | games/min | gen tok/s | share of bf16 peak "
        "| forward calls | ms a call | bare decode step ms | GPU busy in it |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def show(value, spec: str) -> str:  # "–": not measured (rows recorded before a column existed, an OOM)
        return "–" if value is None or value != value else format(value, spec)

    columns = (("forwards", "d"), ("ms_per_forward", ".1f"), ("bare_step_ms", ".1f"), ("gpu_busy", ".0%"))
    for r in rows:
        extra = " | ".join(show(r.get(key), spec) for key, spec in columns)
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {r['batch']} | {r['seconds']:.1f} | {r['games_per_min']:.0f} "
            f"| {r['gen_tok_s']:.0f} | {r['peak_share']:.3%} | {extra} |"
        )
    if train_rows:
        lines += [
            "",
            "| shape | training (bf16, batch 8 × ~800 tokens) | tokens/s (steps 2..n) | steps | whole call s |",
            "|---|---|---|---|---|",
        ]
        for t in train_rows:
            lines.append(
                f"| {t['shape']} | {t['method']} | {t['tokens_per_second']:.0f} | {t['steps']} "
                f"| {t['whole_call_seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2-135m,qwen2.5-1.5b,llama-7b")
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--full-train", default="smollm2-135m,qwen2.5-1.5b", help="Shapes also fully fine-tuned.")
    parser.add_argument("--out", default=None, help="Also write each figure as a JSON line here, as it comes.")
    parser.add_argument(
        "--from-json", nargs="*", default=None, help="Only render these --out files into bench/RESULTS.md."
    )
    args = parser.parse_args()
    if args.from_json is not None:
        records = [json.loads(line) for path in args.from_json for line in Path(path).read_text().splitlines()]
        head = next(r for r in records if r["kind"] == "device")
        rows = [r for r in records if r["kind"] == "rollout"]
        train_rows = [r for r in records if r["kind"] == "training"]
        text = render(rows, train_rows, head["device"], head["peak"], head["max_new_tokens"])
    else:
        text = run(args)
    print(text)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text + "\n")


def run(args) -> str:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py measures the CUDA path and needs a GPU")
    device = "cuda"
    peak = peak_bf16(device)
    name_of_device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    rows, train_rows = [], []

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    emit({"kind": "device", "device": name_of_device, "peak": peak, "max_new_tokens": args.max_new_tokens})
    for name in args.shapes.split(","):
        model, tokenizer = build(name, device)
        params = sum(p.numel() for p in model.parameters())
        for games in [int(b) for b in args.batches.split(",") if b]:
            r = rollout(model, tokenizer, games, args.max_new_tokens, params, peak)
            rows.append({"kind": "rollout", "shape": name, "params": params, "batch": games, **r})
            emit(rows[-1])
        if not args.no_train:
            for lora in (True, False):
                if not lora and name not in args.full_train.split(","):
                    continue
                t = training(name, model, tokenizer, lora, args.train_steps)
                train_rows.append({"kind": "training", "shape": name, "method": "LoRA" if lora else "full", **t})
                emit(train_rows[-1])
        del model
        torch.cuda.empty_cache()
    return render(rows, train_rows, name_of_device, peak, args.max_new_tokens)


if __name__ == "__main__":
    main()
