"""Rollout throughput on the embedded model: one game at a time vs batched vs batched + prefix reuse
vs batched + prefix reuse + one shared system-prompt prefix, and the last in bf16.

    .venv/bin/python bench/rollout.py [--games 24] [--serial-games 4] [--dtype float32] [--modes acdf]

(a) plays games one at a time and re-sends the whole conversation every turn (how the paper's
code plays); (b) batches every pending turn of all games, recomputing each prompt; (c) does the
same with per-conversation KV reuse; (d) adds one cached prefix (the system prompt's head, up to
the game's own facts) shared by all conversations; (e) is (d) in bf16 (what ``dtype: auto`` plays
on a CPU that computes bf16 natively; left out on one that does not). All play the same seeded
games; (a)-(d) in ``--dtype``. Reported per mode:
games/min, generated tokens/s, tokens processed per game (prefilled + generated) against the
unique tokens per game (the longest sequence each conversation reached), and the share of the
hardware limit: 2·params·tokens processed per second over the measured peak matmul FLOP/s at the
mode's dtype. (f) is (d) with the shared prefix copied into every row's cache, as the decoder
did before it kept the prefix once (``hf_attention``): (d) vs (f) is that change alone.
``--games 64`` batches as many conversations as the main job does (its default batch,
``DEFAULT_BATCH``); ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``
run an AVX2 CPU's kernels on an AVX-512 one (named in the report; an approximation of that class,
whose clocks and memory differ); ``--modes`` runs only the modes named (``b``, recomputing every prompt, is
expected to be the slowest at 64 games). Figures are appended to bench/RESULTS.md with the CPU class and the commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

import torch

from parlay.agents.base import Sampling
from parlay.agents.hf import HFAgent, load_model
from parlay.agents.hf_layer import cpu_has_bf16, pick_dtype
from parlay.agents.machine import calibrate, describe
from parlay.games import objective
from parlay.proxy import source_commit
from parlay.rollout import plan_games, play_games

RESULTS = Path(__file__).with_name("RESULTS.md")
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that keep torch, oneDNN and MKL to an older instruction set (``avx2``,
``AVX2``, ``AVX2``): an AVX-512 machine then runs an AVX2 machine's kernels; named in the report."""


def peak_matmul_flops(dtype: torch.dtype) -> float:
    """The machine's matmul rate in ``dtype`` (FLOP/s), the calibration ``parlay doctor`` uses."""
    return calibrate(dtype, seconds=3.0)


def commit_label() -> str:
    """``1064ab2``, ``1064ab2+`` with uncommitted changes to parlay/, or ``unknown`` outside git."""
    full = source_commit()
    return "unknown" if full is None else full[:7] + ("+" if full.endswith("+") else "")


def run_mode(name, model, tokenizer, games, sampling, reuse, serial, max_messages, params, peak, share=None):
    """``share``: None (no shared prefix), "once" (kept once, ``hf_attention``) or "copied" (into every row)."""
    agent = HFAgent(model, tokenizer, sampling, prefix_reuse=reuse, share_prefix=share is not None)
    agent.engine.cascade = agent.engine.cascade and share != "copied"
    obj = objective("semi-competitive")
    start = time.perf_counter()
    if serial:
        episodes = [play_games(agent, agent, [g], obj, max_messages)[0] for g in games]
    else:
        episodes = play_games(agent, agent, games, obj, max_messages)
    secs = time.perf_counter() - start
    st = agent.stats
    processed = st["prefill_tokens"] + st["generated_tokens"]
    unique = sum(agent.conversation_tokens.values())
    return {
        "mode": name,
        "games": len(episodes),
        "seconds": secs,
        "games_per_min": 60 * len(episodes) / secs,
        "gen_tok_s": st["generated_tokens"] / secs,
        "processed_per_game": processed / len(episodes),
        "unique_per_game": unique / len(episodes),
        "hw_share": 2 * params * processed / secs / peak,
        "turns": sum(len(e.turns) for e in episodes),
        "turn_texts": [[t.text for t in e.turns] for e in episodes],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--games", type=int, default=24)
    parser.add_argument("--serial-games", type=int, default=4, help="games for mode (a), the first of the same plan")
    parser.add_argument("--max-messages", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="abcdef", help="modes to run, e.g. acd (ratios to (a) need a)")
    args = parser.parse_args()
    bf16 = cpu_has_bf16() and pick_dtype(args.dtype, "cpu") != torch.bfloat16
    unknown = set(args.modes) - set("abcdf" + ("e" if bf16 else ""))
    if unknown or not args.modes:
        runs = "a-d, f" + (", e" if bf16 else "")
        parser.error(f"--modes: {''.join(sorted(unknown)) or 'none given'}; this machine runs {runs}")

    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    peak = peak_matmul_flops(pick_dtype(args.dtype, "cpu"))
    sampling = Sampling(temperature=0.7, max_new_tokens=args.max_new_tokens)
    games = plan_games(args.games, args.seed)
    modes = [  # name, model, peak, games, prefix reuse, one game at a time, shared prefix
        ("(a) one game at a time, no reuse", model, peak, games[: args.serial_games], False, True, None),
        ("(b) batched, no reuse", model, peak, games, False, False, None),
        ("(c) batched + prefix reuse", model, peak, games, True, False, None),
        ("(d) batched + prefix reuse + shared prefix", model, peak, games, True, False, "once"),
        ("(f) = (d), the shared prefix copied into every row", model, peak, games, True, False, "copied"),
    ]
    bf16_peak = None
    if bf16 and "e" in args.modes:
        bf16_model, _ = load_model(args.model, dtype="bfloat16", device="cpu")
        bf16_peak = peak_matmul_flops(torch.bfloat16)
        modes.append(("(e) = (d) in bf16", bf16_model, bf16_peak, games, True, False, "once"))
    modes = [m for m in modes if m[0][1] in args.modes]
    rows = {
        name[1]: run_mode(name, m, tokenizer, planned, sampling, reuse, serial, args.max_messages, params, p, share)
        for name, m, p, planned, reuse, serial, share in modes
    }
    texts = {k: r.pop("turn_texts") for k, r in rows.items()}
    header = (
        "| mode | games | s | games/min | gen tok/s | processed tok/game | unique tok/game | processed/unique "
        "| share of peak |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows.values():
        lines.append(
            f"| {r['mode']} | {r['games']} | {r['seconds']:.0f} | {r['games_per_min']:.2f} | {r['gen_tok_s']:.1f} "
            f"| {r['processed_per_game']:.0f} | {r['unique_per_game']:.0f} "
            f"| {r['processed_per_game'] / r['unique_per_game']:.2f} | {r['hw_share']:.1%} |"
        )
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_") or "glibc's default"
    machine = f"{describe().summary()}; torch {torch.__version__}; commit {commit_label()}"
    machine += f"; glibc's mmap threshold: {malloc}"
    isa = [f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k)]
    if isa:  # the kernels of an older CPU class, on this one: an approximation of that class, not a measurement of it
        machine += f"; kernels limited by {' '.join(isa)} (torch reports {torch.backends.cpu.get_cpu_capability()})"
    gain = {k: r["games_per_min"] for k, r in rows.items()}
    ratios = [f"({k}) vs (a): {gain[k] / gain['a']:.1f}×" for k in gain if k != "a" and "a" in gain]
    if "b" in gain and "c" in gain:
        ratios.append(f"(c) vs (b): {gain['c'] / gain['b']:.1f}×")
    if "c" in gain and "d" in gain:
        same = sum(c == d for c, d in zip(texts["c"], texts["d"], strict=True))
        n = len(texts["c"])
        ratios.append(f"(d) vs (c): {gain['d'] / gain['c']:.2f}×, {same} of {n} games the same, turn for turn")
    if "d" in gain and "f" in gain:
        same = sum(d == f for d, f in zip(texts["d"], texts["f"], strict=True))
        ratios.append(f"(d) vs (f): {gain['d'] / gain['f']:.2f}×, {same} of {len(texts['d'])} games the same")
    if "d" in gain and "e" in gain:
        ratios.append(f"(e) vs (d): {gain['e'] / gain['d']:.2f}×")
    text = "\n".join(
        [
            f"\n## rollout — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            f"Machine: {machine}; model {args.model} ({params / 1e6:.0f}M params, {args.dtype}"
            f"{', and bf16 for (e)' if bf16_peak else ''}); peak matmul {peak / 1e9:.0f} GFLOP/s"
            f"{f' ({bf16_peak / 1e9:.0f} in bf16)' if bf16_peak else ''}; {args.games} games, "
            f"cap {args.max_messages} messages, ≤{args.max_new_tokens} new tokens per reply.",
            "",
            *lines,
            "",
            ("Games/min: " + "; ".join(ratios) + ".") if ratios else "",
        ]
    )
    print(text)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
