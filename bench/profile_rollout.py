"""Where a rollout's time goes, and what bounds it on this machine.

    .venv/bin/python bench/profile_rollout.py [--games 64] [--dtype float32]

1. The machine's limits: peak matmul FLOP/s at the dtype (large square matmuls), the matmul rate
   at the small row counts decoding runs at, and memory bandwidth (a large copy).
2. One forward step of the model at batch 16/32/64 with a 400-token cache (every other row
   left-padded, as in a real batch), and one prefill of 64 new tokens per row: time, achieved
   FLOP/s, and the compute and memory bound of that step.
3. A round of the quickstart's rollout (its sampling, cap and reply length; self-play, prefix reuse)
   under torch.profiler, with operator time grouped: matmuls, attention, cache handling, sampling,
   other tensor work; tokenisation (chat rendering) timed separately; the rest of the wall time is
   Python between operators.

Figures are printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from parlay.agents import hf_layer
from parlay.agents.base import Sampling
from parlay.agents.hf import HFAgent, load_model
from parlay.agents.hf_layer import pick_dtype
from parlay.games import objective
from parlay.rollout import plan_games, play_games

RESULTS = Path(__file__).with_name("RESULTS.md")
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "cache": ("aten::cat", "aten::index", "aten::copy_", "aten::fill_", "aten::zeros", "aten::clone", "aten::nonzero"),
    "sampling": ("aten::softmax", "aten::_softmax", "aten::exponential_", "aten::multinomial", "aten::argmax",
                 "aten::sort", "aten::cumsum"),
}  # fmt: skip


def best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine_limits(dtype: torch.dtype) -> dict[str, float]:
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    peak = 2 * n**3 / best_of(lambda: a @ b)
    rows = torch.randn(64, 576, dtype=dtype)
    w = torch.randn(1536, 576, dtype=dtype)
    small = 2 * 64 * 576 * 1536 / best_of(lambda: torch.nn.functional.linear(rows, w), 20)
    x = torch.empty(64 * 2**20)
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() * 4 / best_of(lambda: y.copy_(x))
    return {"peak": peak, "small": small, "bandwidth": bandwidth}


def step_figures(model, batch: int, cached: int, params: int, limits: dict[str, float]) -> dict[str, float]:
    """One decode step (1 new token a row over ``cached`` positions) and one 64-token prefill."""
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, cached, cfg.head_dim)
    past = [[(torch.randn(shape[1:], dtype=model.dtype), torch.randn(shape[1:], dtype=model.dtype))
             for _ in range(cfg.num_hidden_layers)] for _ in range(batch)]  # fmt: skip
    from transformers.cache_utils import Cache

    from parlay.agents.hf_engine import _roomy_layer_class

    mask = torch.ones((batch, cached + 1), dtype=torch.long)
    mask[::2, : cached // 8] = 0  # left padding in every other row, as in a real batch: never a mask-free step

    def decode():
        layers = [_roomy_layer_class()(1) for _ in range(cfg.num_hidden_layers)]
        for i, layer in enumerate(layers):
            layer.reserve(batch, shape[1], cached, shape[3], model.dtype, "cpu")
            for r in range(batch):
                layer._k[r, :, :cached], layer._v[r, :, :cached] = past[r][i]
        cache = Cache(layers=layers)
        t = time.perf_counter()
        model(
            input_ids=torch.zeros((batch, 1), dtype=torch.long),
            attention_mask=mask,
            position_ids=torch.full((batch, 1), cached),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return time.perf_counter() - t

    with torch.inference_mode():
        decode()
        step = min(decode() for _ in range(3))
        ids = torch.zeros((batch, 64), dtype=torch.long)
        prefill = best_of(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), 2)
    kv_bytes = (
        batch * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * cached * model.dtype.itemsize
    )
    weight_bytes = params * model.dtype.itemsize
    flops = 2 * params * batch
    return {
        "step_ms": 1000 * step,
        "step_gflops": flops / step / 1e9,
        "compute_bound_ms": 1000 * flops / limits["peak"],
        "small_matmul_bound_ms": 1000 * flops / limits["small"],
        "memory_bound_ms": 1000 * (weight_bytes + kv_bytes) / limits["bandwidth"],
        "prefill_ms": 1000 * prefill,
        "prefill_gflops": 2 * params * batch * 64 / prefill / 1e9,
    }


def profile_round(model, tokenizer, games: int, sampling: Sampling, max_messages: int) -> dict[str, float]:
    agent = HFAgent(model, tokenizer, sampling)
    rendering = [0.0]
    render = hf_layer.render

    def timed_render(*args, **kwargs):
        t = time.perf_counter()
        try:
            return render(*args, **kwargs)
        finally:
            rendering[0] += time.perf_counter() - t

    hf_layer.render = timed_render
    try:
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            play_games(agent, agent, plan_games(games, 0), objective("cooperative"), max_messages)
        wall = time.perf_counter() - start
    finally:
        hf_layer.render = render
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        group = next(
            (g for g, names in GROUPS.items() if any(event.key.startswith(n) for n in names)), "other tensor work"
        )
        groups[group] += event.self_cpu_time_total / 1e6
    ops = sum(groups.values())
    return {
        "wall": wall,
        **groups,
        "tokenisation": rendering[0],
        "python and the rest": max(0.0, wall - ops - rendering[0]),
        "generated": agent.stats["generated_tokens"],
        "prefilled": agent.stats["prefill_tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--games", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-messages", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.5)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    limits = machine_limits(pick_dtype(args.dtype, "cpu"))
    steps = {b: step_figures(model, b, 400, params, limits) for b in (16, 32, 64)}
    sampling = Sampling(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    rnd = profile_round(model, tokenizer, args.games, sampling, args.max_messages)

    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    lines = [
        f"\n## rollout profile — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"Machine: {machine}; model {args.model} ({params / 1e6:.0f}M params, {args.dtype}).",
        f"Limits: peak matmul {limits['peak'] / 1e9:.0f} GFLOP/s (2048²); a 64-row × 576 → 1536 matmul "
        f"{limits['small'] / 1e9:.0f} GFLOP/s; memory copy {limits['bandwidth'] / 1e9:.1f} GB/s.",
        "",
        "| batch | decode step ms | GFLOP/s | compute bound ms | small-matmul bound ms | memory bound ms "
        "| prefill 64 tok/row ms | prefill GFLOP/s |",
        "|" + "---|" * 8,
    ]
    for b, f in steps.items():
        lines.append(
            f"| {b} | {f['step_ms']:.0f} | {f['step_gflops']:.0f} | {f['compute_bound_ms']:.0f} "
            f"| {f['small_matmul_bound_ms']:.0f} | {f['memory_bound_ms']:.0f} | {f['prefill_ms']:.0f} "
            f"| {f['prefill_gflops']:.0f} |"
        )
    wall = rnd["wall"]
    lines += [
        "",
        f"A round: {args.games} self-play games (cooperative, cap {args.max_messages}, ≤{args.max_new_tokens} new "
        f"tokens, temperature {args.temperature}, prefix reuse) in {wall:.0f} s under the profiler; "
        f"{rnd['prefilled']} tokens prefilled, {rnd['generated']} generated.",
        "",
        "| where | s | share |",
        "|---|---|---|",
    ]
    for key in ("matmul", "attention", "cache", "sampling", "other tensor work", "tokenisation", "python and the rest"):
        lines.append(f"| {key} | {rnd.get(key, 0.0):.1f} | {rnd.get(key, 0.0) / wall:.0%} |")
    text = "\n".join(lines)
    print(text)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
